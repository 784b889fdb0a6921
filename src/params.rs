//! Parameters shared by the CPU reference and the CUDA kernels, validated once at construction.
//!
//! Notation (docs/DESIGN.md §2): one query row `q`, keys `k_j`, values `v_j`, head dim `d`,
//! `s_j = q.k_j / sqrt(d)`.

use crate::error::{Error, Result};

/// How a segment's keys are masked for a query row.
///
/// The same discriminants cross the FFI boundary in segment descriptors.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u32)]
pub enum SegmentRole {
    /// A cached passage: every query row sees every key; APE attends it with scale
    /// `1/(T*sqrt(d))` and weighs the whole group with `S`.
    Context = 0,
    /// The shared prefix, the question and generated tokens: a query at position `p` sees keys at
    /// positions `<= p`; scale `1/sqrt(d)`.
    Causal = 1,
}

/// Head layout of an attention call: `n_heads` query heads share `n_kv_heads` key/value heads
/// (GQA; query head `h` reads KV head `h / (n_heads / n_kv_heads)`), each of width `head_dim`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct AttentionDims {
    /// Query heads.
    pub n_heads: usize,
    /// Key/value heads; divides `n_heads`.
    pub n_kv_heads: usize,
    /// Width of one head.
    pub head_dim: usize,
}

impl AttentionDims {
    /// Validated dims: all positive and `n_heads % n_kv_heads == 0`.
    pub fn new(n_heads: usize, n_kv_heads: usize, head_dim: usize) -> Result<Self> {
        let dims = Self {
            n_heads,
            n_kv_heads,
            head_dim,
        };
        dims.validate()?;
        Ok(dims)
    }

    /// Checks the invariants of [`AttentionDims::new`] (the fields are public, so every entry
    /// point calls this again).
    pub fn validate(&self) -> Result<()> {
        if self.n_heads == 0 || self.n_kv_heads == 0 || self.n_heads % self.n_kv_heads != 0 {
            return Err(Error::Gqa {
                n_heads: self.n_heads,
                n_kv_heads: self.n_kv_heads,
            });
        }
        if self.head_dim == 0 {
            return Err(Error::Shape("head_dim must be > 0".into()));
        }
        Ok(())
    }

    /// Query heads per KV head.
    pub fn group_size(&self) -> usize {
        self.n_heads / self.n_kv_heads
    }

    /// The KV head that query head `h` reads.
    pub fn kv_head(&self, h: usize) -> usize {
        h / self.group_size()
    }
}

/// Which form of the APE scaling factor `S` is used.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
#[repr(u32)]
pub enum ApeVariant {
    /// The released form: the context group's log-mass is `a = S * T * L_C`, i.e. the whole context
    /// carries unnormalised weight `(sum_C exp(s/T))^(S*T)`.
    #[default]
    Released = 0,
    /// The older form that multiplies the context mass by `S`: `a = T * L_C + ln S`.
    ScaledMass = 1,
}

/// APE's attention temperature `T` and scaling factor `S` (both finite and `> 0`).
///
/// With `C` the keys of all Context segments and `O` the Causal keys (prefix, question, generated):
/// `L_C = LSE_C(s/T)`, `L_O = LSE_O(s)`, `a = S*T*L_C` (released form), `b = L_O`,
/// `w = sigmoid(a - b)`, `out = w*O_C + (1-w)*O_O`, combined LSE `log(exp(a) + exp(b))`.
/// `T = S = 1` is plain softmax attention over all keys.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct ApeParams {
    temperature: f32,
    scale: f32,
    variant: ApeVariant,
}

impl ApeParams {
    /// The APE paper's defaults, `T = 0.9`, `S = 0.9`, released form.
    pub const DEFAULT_TEMPERATURE: f32 = 0.9;
    /// See [`ApeParams::DEFAULT_TEMPERATURE`].
    pub const DEFAULT_SCALE: f32 = 0.9;

    /// Validated parameters in the released form. Errors unless both are finite and `> 0`.
    pub fn new(temperature: f32, scale: f32) -> Result<Self> {
        check_positive("temperature T", temperature as f64)?;
        check_positive("scaling factor S", scale as f64)?;
        Ok(Self {
            temperature,
            scale,
            variant: ApeVariant::Released,
        })
    }

    /// `T = S = 1`: plain softmax over every key (sequential, naive parallel and Block-Attention).
    pub fn plain() -> Self {
        Self {
            temperature: 1.0,
            scale: 1.0,
            variant: ApeVariant::Released,
        }
    }

    /// The same `T` and `S` with another form of `S`.
    pub fn with_variant(self, variant: ApeVariant) -> Self {
        Self { variant, ..self }
    }

    /// Attention temperature `T`.
    pub fn temperature(&self) -> f32 {
        self.temperature
    }

    /// Scaling factor `S`.
    pub fn scale(&self) -> f32 {
        self.scale
    }

    /// Form of `S`.
    pub fn variant(&self) -> ApeVariant {
        self.variant
    }

    /// True when the correction is the identity (`T = S = 1`), in either variant.
    pub fn is_plain(&self) -> bool {
        self.temperature == 1.0 && self.scale == 1.0
    }
}

impl Default for ApeParams {
    fn default() -> Self {
        Self {
            temperature: Self::DEFAULT_TEMPERATURE,
            scale: Self::DEFAULT_SCALE,
            variant: ApeVariant::Released,
        }
    }
}

/// Errors ([`Error::InvalidParameter`]) unless `value` is finite and positive; `name` is the
/// parameter as the user knows it.
pub fn check_positive(name: &'static str, value: f64) -> Result<()> {
    if value.is_finite() && value > 0.0 {
        Ok(())
    } else {
        Err(Error::InvalidParameter {
            name,
            value,
            requirement: "must be finite and > 0",
        })
    }
}

/// Which pairs of a head's lanes RoPE rotates together.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
#[repr(u32)]
pub enum RopeLayout {
    /// Rotate-half (Hugging Face Llama): lane `i` pairs with lane `i + d/2`.
    #[default]
    Neox = 0,
    /// Adjacent pairs `(2i, 2i+1)` (llama.cpp's layout, what GGUF `llama` weights imply).
    Interleaved = 1,
}

/// Llama 3 frequency scaling (`rope_scaling.rope_type = "llama3"`).
///
/// With `w_i = 2*pi/theta_i`, `w_lo = original_max_position / low_freq_factor` and
/// `w_hi = original_max_position / high_freq_factor`: frequencies with `w_i < w_hi` are kept,
/// those with `w_i > w_lo` are divided by `factor`, and in between
/// `theta_i' = (1 - t) * theta_i / factor + t * theta_i` with
/// `t = (original_max_position / w_i - low_freq_factor) / (high_freq_factor - low_freq_factor)`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Llama3RopeScaling {
    /// `factor` (8 for Llama 3.1).
    pub factor: f64,
    /// `low_freq_factor` (1 for Llama 3.1).
    pub low_freq_factor: f64,
    /// `high_freq_factor` (4 for Llama 3.1); must exceed `low_freq_factor`.
    pub high_freq_factor: f64,
    /// `original_max_position_embeddings` (8192 for Llama 3.1).
    pub original_max_position: f64,
}

impl Llama3RopeScaling {
    fn validate(&self) -> Result<()> {
        check_positive("llama3 rope factor", self.factor)?;
        check_positive("llama3 low_freq_factor", self.low_freq_factor)?;
        check_positive("llama3 high_freq_factor", self.high_freq_factor)?;
        check_positive(
            "llama3 original_max_position_embeddings",
            self.original_max_position,
        )?;
        if self.high_freq_factor <= self.low_freq_factor {
            return Err(Error::InvalidParameter {
                name: "llama3 high_freq_factor",
                value: self.high_freq_factor,
                requirement: "must exceed low_freq_factor",
            });
        }
        Ok(())
    }

    /// The scaled frequency for an unscaled `theta` (see the type's docs for the formula).
    pub fn scale_frequency(&self, theta: f64) -> f64 {
        let wavelen = 2.0 * std::f64::consts::PI / theta;
        let w_hi = self.original_max_position / self.high_freq_factor;
        let w_lo = self.original_max_position / self.low_freq_factor;
        if wavelen < w_hi {
            theta
        } else if wavelen > w_lo {
            theta / self.factor
        } else {
            let t = (self.original_max_position / wavelen - self.low_freq_factor)
                / (self.high_freq_factor - self.low_freq_factor);
            (1.0 - t) * theta / self.factor + t * theta
        }
    }
}

/// Rotary position embedding: lane pair `i` (of `d/2`) of a head at position `p` is rotated by
/// the angle `p * theta_i`, `theta_i = base^(-2i/d)` (then Llama 3 scaling, if any):
/// `(x, y) -> (x cos - y sin, x sin + y cos)`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct RopeConfig {
    /// Width of one head; even.
    pub head_dim: usize,
    /// `rope_theta` (10000 for Llama 2, 500000 for Llama 3, 100000 for SmolLM2).
    pub base: f64,
    /// Which lanes pair up.
    pub layout: RopeLayout,
    /// Llama 3 frequency scaling, if the checkpoint asks for it.
    pub llama3_scaling: Option<Llama3RopeScaling>,
}

impl RopeConfig {
    /// Validated configuration without frequency scaling.
    pub fn new(head_dim: usize, base: f64, layout: RopeLayout) -> Result<Self> {
        let cfg = Self {
            head_dim,
            base,
            layout,
            llama3_scaling: None,
        };
        cfg.validate()?;
        Ok(cfg)
    }

    /// The same configuration with Llama 3 frequency scaling.
    pub fn with_llama3_scaling(self, scaling: Llama3RopeScaling) -> Result<Self> {
        let cfg = Self {
            llama3_scaling: Some(scaling),
            ..self
        };
        cfg.validate()?;
        Ok(cfg)
    }

    /// Checks `head_dim` even and positive, `base` finite and `> 0`, and the scaling parameters.
    pub fn validate(&self) -> Result<()> {
        if self.head_dim == 0 || self.head_dim % 2 != 0 {
            return Err(Error::Shape(format!(
                "RoPE needs an even, positive head_dim, got {}",
                self.head_dim
            )));
        }
        check_positive("RoPE base", self.base)?;
        if let Some(s) = &self.llama3_scaling {
            s.validate()?;
        }
        Ok(())
    }

    /// The `d/2` rotation frequencies `theta_i`, in f64, scaling applied.
    pub fn inv_freqs(&self) -> Vec<f64> {
        let d = self.head_dim as f64;
        (0..self.head_dim / 2)
            .map(|i| {
                let theta = self.base.powf(-2.0 * i as f64 / d);
                match &self.llama3_scaling {
                    Some(s) => s.scale_frequency(theta),
                    None => theta,
                }
            })
            .collect()
    }

    /// The two lanes of pair `i` within a head.
    pub fn pair(&self, i: usize) -> (usize, usize) {
        match self.layout {
            RopeLayout::Neox => (i, i + self.head_dim / 2),
            RopeLayout::Interleaved => (2 * i, 2 * i + 1),
        }
    }
}

/// A RoPE re-rotation of a segment's cached keys as they are read: every key is rotated by
/// `delta` positions, `k -> R(delta) k` (Block-Attention: a block prefilled from position 0 used
/// at offset `delta`). `R(a) R(b) = R(a + b)`, so this equals the key computed at its real
/// position; values are untouched. The segmented attention kernel never writes the rotated keys:
/// since `q . R(delta) k = R(-delta) q . k`, it rotates the query rows instead, once per segment.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct RopeShift {
    /// The model's RoPE (layout, frequencies); its `head_dim` must be the attention's.
    pub rope: RopeConfig,
    /// Positions to rotate by.
    pub delta: i64,
}

impl RopeShift {
    /// Checks the RoPE configuration and that it is for heads of width `head_dim`; `what` names
    /// the segment in the error.
    pub fn validate_for(&self, head_dim: usize, what: &str) -> Result<()> {
        self.rope.validate()?;
        if self.rope.head_dim != head_dim {
            return Err(Error::Shape(format!(
                "{what}: RoPE shift has head_dim {}, the attention has {head_dim}",
                self.rope.head_dim
            )));
        }
        Ok(())
    }

    /// The `d/2` pairs `(cos, sin)` of `delta * theta_i`, angles formed in f64.
    pub fn cos_sin(&self) -> Vec<(f64, f64)> {
        let delta = self.delta as f64;
        self.rope
            .inv_freqs()
            .iter()
            .map(|theta| {
                let (s, c) = (delta * theta).sin_cos();
                (c, s)
            })
            .collect()
    }
}
