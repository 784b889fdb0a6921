//! The crate's error type. Every public entry point validates its inputs and returns one of these
//! instead of panicking.

/// Result alias used across the crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can go wrong in ape-attn.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A scalar parameter is out of its domain (for example the APE temperature `T` is not finite
    /// and positive).
    #[error("invalid {name}: {value} ({requirement})")]
    InvalidParameter {
        /// The parameter, as the user knows it (e.g. "temperature T").
        name: &'static str,
        /// The value given.
        value: f64,
        /// What it must satisfy.
        requirement: &'static str,
    },

    /// A buffer or tensor does not have the shape the operation needs.
    #[error("shape mismatch: {0}")]
    Shape(String),

    /// The head dimension is not one the operation supports.
    #[error("unsupported head dim {head_dim} for {op}: supported are {supported:?}")]
    UnsupportedHeadDim {
        /// The operation that refused it.
        op: &'static str,
        /// The head dim given.
        head_dim: usize,
        /// The head dims this operation supports.
        supported: &'static [usize],
    },

    /// `n_heads` is not a positive multiple of `n_kv_heads`.
    #[error("invalid GQA: {n_heads} query heads cannot share {n_kv_heads} KV heads (n_heads must be a positive multiple of n_kv_heads)")]
    Gqa {
        /// Query heads.
        n_heads: usize,
        /// Key/value heads.
        n_kv_heads: usize,
    },

    /// A position or length does not fit what the kernels index with (32-bit) or overflows.
    #[error("out of range: {0}")]
    OutOfRange(String),

    /// Tensors of different dtypes were mixed, or a dtype is not supported by an operation.
    #[error("dtype mismatch: {0}")]
    DType(String),

    /// Tensors live on different devices.
    #[error("device mismatch: {0}")]
    DeviceMismatch(String),

    /// The crate was built without nvcc, so it holds no GPU kernels.
    /// The text says why and what to do (the build's own reason carries the advice once).
    #[error("the CUDA kernels were not built into this copy of ape-attn: {0}")]
    KernelsNotBuilt(&'static str),

    /// No usable CUDA driver or device.
    #[error("no CUDA device: {0}")]
    NoDevice(String),

    /// The kernel emulator stopped a launch (an invalid shared-memory address, a barrier that
    /// can never complete, a misused warp primitive).
    #[cfg(feature = "emulator")]
    #[error("kernel emulator: {0}")]
    Emulator(String),

    /// The device ran out of memory.
    #[error("GPU out of memory: {0}")]
    OutOfMemory(String),

    /// The block cache (ape-llama's) cannot hold a block within its budget.
    #[error("block cache full: {0}")]
    CacheFull(String),

    /// A request or command-line input that cannot be served as given (an empty question, an
    /// empty search grid).
    #[error("invalid input: {0}")]
    InvalidInput(String),

    /// A model file is corrupt, truncated, or of a kind ape-llama does not support.
    #[error("model file: {0}")]
    Model(String),

    /// A file could not be read.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: String,
        /// What the OS said.
        source: std::io::Error,
    },

    /// A cuBLAS call failed.
    #[error("cuBLAS error: {0}")]
    Cublas(String),

    /// A CUDA driver call failed.
    #[error("CUDA driver error: {0}")]
    Cuda(cudarc::driver::DriverError),
}

impl Error {
    /// The [`Error::Io`] of an I/O failure on `path`, for `map_err`.
    pub fn io_at(path: &std::path::Path) -> impl Fn(std::io::Error) -> Self + Copy + '_ {
        move |source| Error::Io {
            path: path.display().to_string(),
            source,
        }
    }

    /// The same error with `what: ` before its message, for the errors whose message is text
    /// (a batch names the sequence a shape or range error belongs to); others are unchanged.
    pub(crate) fn within(self, what: &str) -> Self {
        match self {
            Error::Shape(m) => Error::Shape(format!("{what}: {m}")),
            Error::OutOfRange(m) => Error::OutOfRange(format!("{what}: {m}")),
            Error::DType(m) => Error::DType(format!("{what}: {m}")),
            Error::InvalidInput(m) => Error::InvalidInput(format!("{what}: {m}")),
            other => other,
        }
    }
}

impl From<cudarc::driver::DriverError> for Error {
    fn from(e: cudarc::driver::DriverError) -> Self {
        use cudarc::driver::sys::CUresult;
        if e.0 == CUresult::CUDA_ERROR_OUT_OF_MEMORY {
            Error::OutOfMemory(e.to_string())
        } else {
            Error::Cuda(e)
        }
    }
}

impl From<cudarc::cublas::result::CublasError> for Error {
    fn from(e: cudarc::cublas::result::CublasError) -> Self {
        Error::Cublas(format!("{e:?}"))
    }
}
