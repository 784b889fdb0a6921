//! The inner loops of the CPU segmented attention: one key tile against a pair of query vectors.
//!
//! Three steps per tile (docs/DESIGN.md §2.2, the online form of a group's state):
//! - [`Kernel::qk`]: the tile's logits `c * q.k_j` for two query vectors at once, so that each key
//!   row is loaded once for both;
//! - [`Kernel::softmax`]: the running state `(m, l, acc)` of one query vector takes the tile in:
//!   `m' = max(m, max_j x_j)`, `p_j = exp(x_j - m')`, `l' = l exp(m - m') + sum_j p_j`,
//!   `acc' = acc exp(m - m')`;
//! - [`Kernel::pv`]: `acc += sum_j p_j v_j` for the same two query vectors, each value row loaded
//!   once.
//!
//! Two implementations: [`Scalar`], portable, and `Avx2` (x86_64 with AVX2 and FMA, detected at
//! run time; it needs `head_dim % 8 == 0`).

/// The three tile steps. `k` and `v` start at the tile's first key row of the KV head; row `j` is
/// at `j * stride` and has `acc.len()` (the head dim) values.
pub(crate) trait Kernel: Copy + Send + Sync {
    /// `sa[j] = scale * qa.k_j` and `sb[j] = scale * qb.k_j` for `j < n`. May also write
    /// `sa`/`sb` up to `n` rounded up to 4 (the buffers are that long); reads only rows `< n`.
    #[allow(clippy::too_many_arguments)]
    fn qk(
        self,
        qa: &[f32],
        qb: &[f32],
        k: &[f32],
        stride: usize,
        n: usize,
        scale: f32,
        sa: &mut [f32],
        sb: &mut [f32],
    );

    /// Takes the logits `s[..n]` into the state `(mx, sum, acc)` and overwrites them with their
    /// weights `p_j = exp(s_j - mx')`; `s[n..n_pad]` is set to 0. `n == 0` leaves the state as is.
    fn softmax(
        self,
        s: &mut [f32],
        n: usize,
        n_pad: usize,
        mx: &mut f32,
        sum: &mut f64,
        acc: &mut [f32],
    );

    /// `acc_a += sum_{j<n} pa[j] v_j` and `acc_b += sum_{j<n} pb[j] v_j`.
    #[allow(clippy::too_many_arguments)]
    fn pv(
        self,
        pa: &[f32],
        pb: &[f32],
        v: &[f32],
        stride: usize,
        n: usize,
        acc_a: &mut [f32],
        acc_b: &mut [f32],
    );
}

/// The portable kernel: plain loops in f32.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Scalar;

fn dot(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

/// The state update shared by both kernels once the tile's maximum is known: returns `alpha`,
/// the factor of the old state, and sets `mx`.
fn new_max(mx: &mut f32, tile_max: f32) -> f32 {
    let m = mx.max(tile_max);
    let alpha = if *mx == f32::NEG_INFINITY {
        0.0
    } else {
        (*mx - m).exp()
    };
    *mx = m;
    alpha
}

impl Kernel for Scalar {
    fn qk(
        self,
        qa: &[f32],
        qb: &[f32],
        k: &[f32],
        stride: usize,
        n: usize,
        scale: f32,
        sa: &mut [f32],
        sb: &mut [f32],
    ) {
        let d = qa.len();
        for j in 0..n {
            let kj = &k[j * stride..j * stride + d];
            sa[j] = scale * dot(qa, kj);
            sb[j] = scale * dot(qb, kj);
        }
    }

    fn softmax(
        self,
        s: &mut [f32],
        n: usize,
        n_pad: usize,
        mx: &mut f32,
        sum: &mut f64,
        acc: &mut [f32],
    ) {
        s[n..n_pad].fill(0.0);
        if n == 0 {
            return;
        }
        let tile_max = s[..n].iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let alpha = new_max(mx, tile_max);
        let m = *mx;
        let mut tile_sum = 0f32;
        for x in &mut s[..n] {
            *x = (*x - m).exp();
            tile_sum += *x;
        }
        *sum = *sum * alpha as f64 + tile_sum as f64;
        if alpha != 1.0 {
            acc.iter_mut().for_each(|a| *a *= alpha);
        }
    }

    fn pv(
        self,
        pa: &[f32],
        pb: &[f32],
        v: &[f32],
        stride: usize,
        n: usize,
        acc_a: &mut [f32],
        acc_b: &mut [f32],
    ) {
        let d = acc_a.len();
        for j in 0..n {
            let vj = &v[j * stride..j * stride + d];
            let (a, b) = (pa[j], pb[j]);
            for ((x, y), &w) in acc_a.iter_mut().zip(acc_b.iter_mut()).zip(vj) {
                *x += a * w;
                *y += b * w;
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
pub(crate) use avx2::Avx2;

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use super::{new_max, Kernel};
    use std::arch::x86_64::*;

    /// The AVX2 + FMA kernel. A value of this type exists only where the CPU has both (see
    /// [`Avx2::detect`]): that is what makes calling its `#[target_feature]` functions sound.
    /// The head dim must be a multiple of 8.
    #[derive(Clone, Copy, Debug)]
    pub(crate) struct Avx2 {
        _detected: (),
    }

    impl Avx2 {
        /// The kernel, if this CPU has AVX2 and FMA.
        pub(crate) fn detect() -> Option<Self> {
            (is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma"))
                .then_some(Self { _detected: () })
        }
    }

    /// Lanes `[a, b, c, d, e, f, g, h]` hold the sums of the eight vectors' lanes, each summed as
    /// `((x0+x1)+(x2+x3)) + ((x4+x5)+(x6+x7))`.
    #[target_feature(enable = "avx2,fma")]
    #[allow(clippy::too_many_arguments)]
    unsafe fn hsum8(
        a: __m256,
        b: __m256,
        c: __m256,
        d: __m256,
        e: __m256,
        f: __m256,
        g: __m256,
        h: __m256,
    ) -> __m256 {
        let abcd = _mm256_hadd_ps(_mm256_hadd_ps(a, b), _mm256_hadd_ps(c, d));
        let efgh = _mm256_hadd_ps(_mm256_hadd_ps(e, f), _mm256_hadd_ps(g, h));
        _mm256_add_ps(
            _mm256_permute2f128_ps(abcd, efgh, 0x20),
            _mm256_permute2f128_ps(abcd, efgh, 0x31),
        )
    }

    /// `exp(x)` for `x <= 0` (Cephes' `expf`: `2^n` times a degree-6 polynomial on
    /// `[-ln2/2, ln2/2]`, about 1 ulp); 0 below -87, where `exp` leaves the normal range.
    #[target_feature(enable = "avx2,fma")]
    unsafe fn exp(x: __m256) -> __m256 {
        let tiny = _mm256_cmp_ps(x, _mm256_set1_ps(-87.0), _CMP_LT_OQ);
        let x = _mm256_max_ps(x, _mm256_set1_ps(-87.0));
        let n = _mm256_round_ps(
            _mm256_mul_ps(x, _mm256_set1_ps(std::f32::consts::LOG2_E)),
            _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC,
        );
        let r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693_359_4), x);
        let r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.121_944_4e-4), r);
        let mut y = _mm256_set1_ps(1.987_569_1e-4);
        for c in [
            1.398_199_9e-3,
            8.333_452e-3,
            4.166_579_6e-2,
            0.166_666_65,
            0.5,
        ] {
            y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(c));
        }
        let y = _mm256_fmadd_ps(
            y,
            _mm256_mul_ps(r, r),
            _mm256_add_ps(r, _mm256_set1_ps(1.0)),
        );
        let pow2n = _mm256_castsi256_ps(_mm256_slli_epi32::<23>(_mm256_add_epi32(
            _mm256_cvtps_epi32(n),
            _mm256_set1_epi32(127),
        )));
        _mm256_andnot_ps(tiny, _mm256_mul_ps(y, pow2n))
    }

    /// See [`Kernel::qk`]. Two query vectors times four keys per step: eight accumulators over
    /// the head dim, reduced by [`hsum8`].
    ///
    /// # Safety
    /// AVX2 and FMA present; `d = qa.len() = qb.len()` a multiple of 8; `k` holds rows
    /// `j * stride .. j * stride + d` for `j < n`; `sa`, `sb` hold `n` rounded up to 4.
    #[target_feature(enable = "avx2,fma")]
    #[allow(clippy::too_many_arguments)]
    unsafe fn qk(
        qa: &[f32],
        qb: &[f32],
        k: &[f32],
        stride: usize,
        n: usize,
        scale: f32,
        sa: &mut [f32],
        sb: &mut [f32],
    ) {
        let d = qa.len();
        let (qa, qb, k) = (qa.as_ptr(), qb.as_ptr(), k.as_ptr());
        let scale = _mm256_set1_ps(scale);
        for j in (0..n).step_by(4) {
            // Rows past n repeat row n - 1 (their results land in the padding).
            let row = |i: usize| k.add((j + i).min(n - 1) * stride);
            let (k0, k1, k2, k3) = (row(0), row(1), row(2), row(3));
            let mut acc = [_mm256_setzero_ps(); 8];
            for c in (0..d).step_by(8) {
                let (a, b) = (_mm256_loadu_ps(qa.add(c)), _mm256_loadu_ps(qb.add(c)));
                let ks = [
                    _mm256_loadu_ps(k0.add(c)),
                    _mm256_loadu_ps(k1.add(c)),
                    _mm256_loadu_ps(k2.add(c)),
                    _mm256_loadu_ps(k3.add(c)),
                ];
                for i in 0..4 {
                    acc[i] = _mm256_fmadd_ps(a, ks[i], acc[i]);
                    acc[4 + i] = _mm256_fmadd_ps(b, ks[i], acc[4 + i]);
                }
            }
            let s = _mm256_mul_ps(
                scale,
                hsum8(
                    acc[0], acc[1], acc[2], acc[3], acc[4], acc[5], acc[6], acc[7],
                ),
            );
            _mm_storeu_ps(sa.as_mut_ptr().add(j), _mm256_castps256_ps128(s));
            _mm_storeu_ps(sb.as_mut_ptr().add(j), _mm256_extractf128_ps::<1>(s));
        }
    }

    /// See [`Kernel::softmax`].
    ///
    /// # Safety
    /// AVX2 and FMA present; `n <= n_pad <= s.len()`; `acc.len()` a multiple of 8.
    #[target_feature(enable = "avx2,fma")]
    unsafe fn softmax(
        s: &mut [f32],
        n: usize,
        n_pad: usize,
        mx: &mut f32,
        sum: &mut f64,
        acc: &mut [f32],
    ) {
        s[n..n_pad].fill(0.0);
        if n == 0 {
            return;
        }
        let p = s.as_mut_ptr();
        let full = n / 8 * 8;
        let mut vmax = _mm256_set1_ps(f32::NEG_INFINITY);
        for j in (0..full).step_by(8) {
            vmax = _mm256_max_ps(vmax, _mm256_loadu_ps(p.add(j)));
        }
        let mut lanes = [0f32; 8];
        _mm256_storeu_ps(lanes.as_mut_ptr(), vmax);
        let tile_max = lanes
            .iter()
            .chain(&s[full..n])
            .copied()
            .fold(f32::NEG_INFINITY, f32::max);
        let alpha = new_max(mx, tile_max);
        let m = _mm256_set1_ps(*mx);
        let mut vsum = _mm256_setzero_ps();
        for j in (0..full).step_by(8) {
            let e = exp(_mm256_sub_ps(_mm256_loadu_ps(p.add(j)), m));
            _mm256_storeu_ps(p.add(j), e);
            vsum = _mm256_add_ps(vsum, e);
        }
        if full < n {
            // The tail through a copy padded with -inf (exp gives 0 there).
            let mut tail = [f32::NEG_INFINITY; 8];
            tail[..n - full].copy_from_slice(&s[full..n]);
            let e = exp(_mm256_sub_ps(_mm256_loadu_ps(tail.as_ptr()), m));
            _mm256_storeu_ps(tail.as_mut_ptr(), e);
            s[full..n].copy_from_slice(&tail[..n - full]);
            vsum = _mm256_add_ps(vsum, e);
        }
        _mm256_storeu_ps(lanes.as_mut_ptr(), vsum);
        let tile_sum = ((lanes[0] + lanes[4]) + (lanes[2] + lanes[6]))
            + ((lanes[1] + lanes[5]) + (lanes[3] + lanes[7]));
        *sum = *sum * alpha as f64 + tile_sum as f64;
        if alpha != 1.0 {
            let a = _mm256_set1_ps(alpha);
            let q = acc.as_mut_ptr();
            for c in (0..acc.len()).step_by(8) {
                _mm256_storeu_ps(q.add(c), _mm256_mul_ps(a, _mm256_loadu_ps(q.add(c))));
            }
        }
    }

    /// See [`Kernel::pv`]. Two query vectors times four 8-lane chunks of the head dim per pass
    /// over the keys (eight accumulators), then single chunks for the rest.
    ///
    /// # Safety
    /// AVX2 and FMA present; `d = acc_a.len() = acc_b.len()` a multiple of 8; `v` holds rows
    /// `j * stride .. j * stride + d` for `j < n`; `pa`, `pb` hold `n` values.
    #[target_feature(enable = "avx2,fma")]
    #[allow(clippy::too_many_arguments)]
    unsafe fn pv(
        pa: &[f32],
        pb: &[f32],
        v: &[f32],
        stride: usize,
        n: usize,
        acc_a: &mut [f32],
        acc_b: &mut [f32],
    ) {
        let d = acc_a.len();
        let (pa, pb, v) = (pa.as_ptr(), pb.as_ptr(), v.as_ptr());
        let (oa, ob) = (acc_a.as_mut_ptr(), acc_b.as_mut_ptr());
        let mut c0 = 0;
        while c0 + 32 <= d {
            let mut a = [_mm256_setzero_ps(); 4];
            let mut b = [_mm256_setzero_ps(); 4];
            for i in 0..4 {
                a[i] = _mm256_loadu_ps(oa.add(c0 + 8 * i));
                b[i] = _mm256_loadu_ps(ob.add(c0 + 8 * i));
            }
            for j in 0..n {
                let (wa, wb) = (
                    _mm256_broadcast_ss(&*pa.add(j)),
                    _mm256_broadcast_ss(&*pb.add(j)),
                );
                let row = v.add(j * stride + c0);
                for i in 0..4 {
                    let x = _mm256_loadu_ps(row.add(8 * i));
                    a[i] = _mm256_fmadd_ps(wa, x, a[i]);
                    b[i] = _mm256_fmadd_ps(wb, x, b[i]);
                }
            }
            for i in 0..4 {
                _mm256_storeu_ps(oa.add(c0 + 8 * i), a[i]);
                _mm256_storeu_ps(ob.add(c0 + 8 * i), b[i]);
            }
            c0 += 32;
        }
        while c0 < d {
            let (mut a, mut b) = (_mm256_loadu_ps(oa.add(c0)), _mm256_loadu_ps(ob.add(c0)));
            for j in 0..n {
                let x = _mm256_loadu_ps(v.add(j * stride + c0));
                a = _mm256_fmadd_ps(_mm256_broadcast_ss(&*pa.add(j)), x, a);
                b = _mm256_fmadd_ps(_mm256_broadcast_ss(&*pb.add(j)), x, b);
            }
            _mm256_storeu_ps(oa.add(c0), a);
            _mm256_storeu_ps(ob.add(c0), b);
            c0 += 8;
        }
    }

    /// Bounds every pointer-based loop above relies on, checked once per call (cheap next to a
    /// tile's work); a failure is a bug in the caller, hence a panic.
    fn check_rows(rows: &[f32], stride: usize, n: usize, d: usize) {
        assert!(d % 8 == 0, "the AVX2 kernel needs head_dim % 8 == 0");
        assert!(
            n == 0 || (n - 1) * stride + d <= rows.len(),
            "tile past its buffer"
        );
    }

    impl Kernel for Avx2 {
        fn qk(
            self,
            qa: &[f32],
            qb: &[f32],
            k: &[f32],
            stride: usize,
            n: usize,
            scale: f32,
            sa: &mut [f32],
            sb: &mut [f32],
        ) {
            let d = qa.len();
            check_rows(k, stride, n, d);
            let padded = n.div_ceil(4) * 4;
            assert!(qb.len() == d && sa.len() >= padded && sb.len() >= padded);
            // SAFETY: `self` exists only where AVX2 and FMA were detected; the asserts above are
            // the function's bounds requirements.
            unsafe { qk(qa, qb, k, stride, n, scale, sa, sb) }
        }

        fn softmax(
            self,
            s: &mut [f32],
            n: usize,
            n_pad: usize,
            mx: &mut f32,
            sum: &mut f64,
            acc: &mut [f32],
        ) {
            assert!(n <= n_pad && n_pad <= s.len() && acc.len() % 8 == 0);
            // SAFETY: AVX2 and FMA detected (`self`); bounds asserted above.
            unsafe { softmax(s, n, n_pad, mx, sum, acc) }
        }

        fn pv(
            self,
            pa: &[f32],
            pb: &[f32],
            v: &[f32],
            stride: usize,
            n: usize,
            acc_a: &mut [f32],
            acc_b: &mut [f32],
        ) {
            let d = acc_a.len();
            check_rows(v, stride, n, d);
            assert!(acc_b.len() == d && pa.len() >= n && pb.len() >= n);
            // SAFETY: AVX2 and FMA detected (`self`); bounds asserted above.
            unsafe { pv(pa, pb, v, stride, n, acc_a, acc_b) }
        }
    }
}
