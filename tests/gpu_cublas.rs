//! The cuBLAS calls the GPU forward pass makes (`cublasGemmEx`, and the strided-batched and
//! SGEMM forms cudarc's safe wrappers use) against a plain triple loop over cuBLAS's documented
//! semantics: column-major matrices, `op(A)` and `op(B)` transposed or not, leading dimensions
//! past the rows, batch strides, bf16/f16/f32 inputs with f32 accumulation, `C = alpha op(A)
//! op(B) + beta C`, and `beta = 0` never reading C. The inputs are multiples of 1/8 in [-1, 1],
//! exact in bf16 and f16, so every product and sum below is exact in f32 and only the output's
//! rounding is left for the tolerance. On a real GPU this checks the library; on the emulated
//! device (scripts/test-emulated-gpu.sh) it checks the stand-in, so a transposed or mis-strided
//! call in `CudaOps` shows up as a wrong answer there.

use std::ffi::c_void;

use cudarc::cublas::result::{gemm_ex, gemm_strided_batched_ex, sgemm};
use cudarc::cublas::sys::{
    cublasComputeType_t, cublasGemmAlgo_t, cublasOperation_t, cudaDataType_t,
};
use cudarc::cublas::CudaBlas;
use cudarc::driver::{CudaContext, CudaSlice, CudaStream, DevicePtr, DevicePtrMut};
use half::{bf16, f16};
use std::sync::Arc;

#[derive(Clone, Copy, Debug, PartialEq)]
enum Ty {
    F32,
    Bf16,
    F16,
}

impl Ty {
    fn cuda(self) -> cudaDataType_t {
        match self {
            Ty::F32 => cudaDataType_t::CUDA_R_32F,
            Ty::Bf16 => cudaDataType_t::CUDA_R_16BF,
            Ty::F16 => cudaDataType_t::CUDA_R_16F,
        }
    }

    /// `x` rounded to this type and back (the test's inputs are exact in every type).
    fn round(self, x: f32) -> f32 {
        match self {
            Ty::F32 => x,
            Ty::Bf16 => bf16::from_f32(x).to_f32(),
            Ty::F16 => f16::from_f32(x).to_f32(),
        }
    }

    /// The relative error of one rounding to this type.
    fn eps(self) -> f32 {
        match self {
            Ty::F32 => 1e-6,
            Ty::Bf16 => 1.0 / 128.0,
            Ty::F16 => 1.0 / 1024.0,
        }
    }
}

/// Device bytes holding `values` as `ty`.
fn upload(stream: &Arc<CudaStream>, values: &[f32], ty: Ty) -> CudaSlice<u8> {
    let bytes: Vec<u8> = match ty {
        Ty::F32 => bytemuck::cast_slice(values).to_vec(),
        Ty::Bf16 => values
            .iter()
            .flat_map(|&x| bf16::from_f32(x).to_bits().to_le_bytes())
            .collect(),
        Ty::F16 => values
            .iter()
            .flat_map(|&x| f16::from_f32(x).to_bits().to_le_bytes())
            .collect(),
    };
    stream.clone_htod(&bytes).expect("upload")
}

fn download(stream: &Arc<CudaStream>, buf: &CudaSlice<u8>, ty: Ty) -> Vec<f32> {
    let bytes = stream.clone_dtoh(buf).expect("download");
    match ty {
        Ty::F32 => bytes
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
            .collect(),
        Ty::Bf16 => bytes
            .chunks_exact(2)
            .map(|c| bf16::from_bits(u16::from_le_bytes([c[0], c[1]])).to_f32())
            .collect(),
        Ty::F16 => bytes
            .chunks_exact(2)
            .map(|c| f16::from_bits(u16::from_le_bytes([c[0], c[1]])).to_f32())
            .collect(),
    }
}

/// `n` multiples of 1/8 in [-1, 1] from `seed`.
fn eighths(n: usize, seed: usize) -> Vec<f32> {
    (0..n)
        .map(|i| ((i * 7 + seed * 13 + i / 5) % 17) as f32 / 8.0 - 1.0)
        .collect()
}

/// One GEMM problem in cuBLAS's terms (column-major, `op(A)` is m x k, `op(B)` k x n, C m x n).
#[derive(Clone, Copy, Debug)]
struct Gemm {
    ta: bool,
    tb: bool,
    m: usize,
    n: usize,
    k: usize,
    lda: usize,
    ldb: usize,
    ldc: usize,
    alpha: f32,
    beta: f32,
    batch: usize,
    /// Batch strides in elements (0 when `batch` is 1).
    stride_a: usize,
    stride_b: usize,
    stride_c: usize,
}

impl Gemm {
    fn new(ta: bool, tb: bool, (m, n, k): (usize, usize, usize), pad: usize) -> Self {
        let (ar, br) = (if ta { k } else { m }, if tb { n } else { k });
        Gemm {
            ta,
            tb,
            m,
            n,
            k,
            lda: ar + pad,
            ldb: br + pad,
            ldc: m + pad,
            alpha: 1.0,
            beta: 0.0,
            batch: 1,
            stride_a: 0,
            stride_b: 0,
            stride_c: 0,
        }
    }

    /// Elements of one stored A, B and C (their last column ends at the rows it uses).
    fn sizes(&self) -> (usize, usize, usize) {
        let (ar, ac) = if self.ta {
            (self.k, self.m)
        } else {
            (self.m, self.k)
        };
        let (br, bc) = if self.tb {
            (self.n, self.k)
        } else {
            (self.k, self.n)
        };
        (
            self.lda * (ac - 1) + ar,
            self.ldb * (bc - 1) + br,
            self.ldc * (self.n - 1) + self.m,
        )
    }

    /// Elements of the whole buffers (all batches).
    fn totals(&self) -> (usize, usize, usize) {
        let (a, b, c) = self.sizes();
        let last = self.batch - 1;
        (
            self.stride_a * last + a,
            self.stride_b * last + b,
            self.stride_c * last + c,
        )
    }

    fn op(t: bool) -> cublasOperation_t {
        if t {
            cublasOperation_t::CUBLAS_OP_T
        } else {
            cublasOperation_t::CUBLAS_OP_N
        }
    }

    /// The triple loop, in f64, over the stored values; C's elements outside the m x n matrices
    /// keep their values. `out` rounds each result to the output type.
    fn reference(&self, a: &[f32], b: &[f32], c: &[f32], out: Ty) -> Vec<f32> {
        let mut r = c.to_vec();
        for z in 0..self.batch {
            let (a, b) = (&a[z * self.stride_a..], &b[z * self.stride_b..]);
            for j in 0..self.n {
                for i in 0..self.m {
                    let mut s = 0f64;
                    for p in 0..self.k {
                        let x = if self.ta {
                            a[p + i * self.lda]
                        } else {
                            a[i + p * self.lda]
                        };
                        let y = if self.tb {
                            b[j + p * self.ldb]
                        } else {
                            b[p + j * self.ldb]
                        };
                        s += x as f64 * y as f64;
                    }
                    let at = z * self.stride_c + i + j * self.ldc;
                    let old = if self.beta == 0.0 { 0.0 } else { c[at] as f64 };
                    r[at] = out.round((self.alpha as f64 * s + self.beta as f64 * old) as f32);
                }
            }
        }
        r
    }
}

enum Call {
    /// `cublasGemmEx` with inputs of the type and the output type given.
    GemmEx(Ty, Ty),
    /// `cublasGemmStridedBatchedEx`.
    StridedBatchedEx(Ty, Ty),
    /// `cublasSgemm`.
    Sgemm,
}

/// Runs `g` through `call` on inputs from `seed` and checks it against the triple loop. C starts
/// as NaN where `beta` is 0 (cuBLAS must not read it) and as numbers otherwise.
fn check(blas: &CudaBlas, stream: &Arc<CudaStream>, g: Gemm, call: Call, seed: usize) {
    let (ty_in, ty_out) = match call {
        Call::GemmEx(i, o) | Call::StridedBatchedEx(i, o) => (i, o),
        Call::Sgemm => (Ty::F32, Ty::F32),
    };
    let (na, nb, nc) = g.totals();
    let a = eighths(na, seed);
    let b = eighths(nb, seed + 1);
    let c0: Vec<f32> = if g.beta == 0.0 {
        // NaN inside the matrices, numbers in the padding (which must keep them).
        let mut c = eighths(nc, seed + 2);
        for z in 0..g.batch {
            for j in 0..g.n {
                for i in 0..g.m {
                    c[z * g.stride_c + i + j * g.ldc] = f32::NAN;
                }
            }
        }
        c
    } else {
        eighths(nc, seed + 2)
    };
    let want = g.reference(&a, &b, &c0, ty_out);
    let (da, db) = (upload(stream, &a, ty_in), upload(stream, &b, ty_in));
    let mut dc = upload(stream, &c0, ty_out);
    let h = *blas.handle();
    let (m, n, k) = (g.m as i32, g.n as i32, g.k as i32);
    let (lda, ldb, ldc) = (g.lda as i32, g.ldb as i32, g.ldc as i32);
    {
        let (pa, _ga) = da.device_ptr(stream);
        let (pb, _gb) = db.device_ptr(stream);
        let (pc, _gc) = dc.device_ptr_mut(stream);
        let alpha = (&g.alpha as *const f32).cast::<c_void>();
        let beta = (&g.beta as *const f32).cast::<c_void>();
        let (ta, tb) = (Gemm::op(g.ta), Gemm::op(g.tb));
        let f32c = cublasComputeType_t::CUBLAS_COMPUTE_32F;
        let algo = cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT;
        // SAFETY: the buffers hold totals() elements of their types, which is what the
        // dimensions, leading dimensions and strides address; alpha and beta are f32 (compute
        // type 32F); the handle runs on `stream`, where the guards record the use.
        unsafe {
            match call {
                Call::GemmEx(..) => gemm_ex(
                    h,
                    ta,
                    tb,
                    m,
                    n,
                    k,
                    alpha,
                    pa as *const c_void,
                    ty_in.cuda(),
                    lda,
                    pb as *const c_void,
                    ty_in.cuda(),
                    ldb,
                    beta,
                    pc as *mut c_void,
                    ty_out.cuda(),
                    ldc,
                    f32c,
                    algo,
                ),
                Call::StridedBatchedEx(..) => gemm_strided_batched_ex(
                    h,
                    ta,
                    tb,
                    m,
                    n,
                    k,
                    alpha,
                    pa as *const c_void,
                    ty_in.cuda(),
                    lda,
                    g.stride_a as i64,
                    pb as *const c_void,
                    ty_in.cuda(),
                    ldb,
                    g.stride_b as i64,
                    beta,
                    pc as *mut c_void,
                    ty_out.cuda(),
                    ldc,
                    g.stride_c as i64,
                    g.batch as i32,
                    f32c,
                    algo,
                ),
                Call::Sgemm => sgemm(
                    h,
                    ta,
                    tb,
                    m,
                    n,
                    k,
                    &g.alpha,
                    pa as *const f32,
                    lda,
                    pb as *const f32,
                    ldb,
                    &g.beta,
                    pc as *mut f32,
                    ldc,
                ),
            }
        }
        .unwrap_or_else(|e| panic!("{g:?}: {e:?}"));
    }
    let got = download(stream, &dc, ty_out);
    for (at, (&x, &y)) in got.iter().zip(&want).enumerate() {
        // The sums are exact in f32: what is left is the output's rounding (one ulp of it, as
        // cuBLAS may round alpha * s + beta * c in two steps).
        let tol = 2.0 * ty_out.eps() * y.abs().max(1.0 / 64.0);
        assert!(
            (x - y).abs() <= tol,
            "{g:?} {ty_in:?} -> {ty_out:?}: C[{at}] = {x}, the triple loop gives {y}"
        );
    }
}

fn setup() -> (Arc<CudaStream>, CudaBlas) {
    let ctx = CudaContext::new(0).expect("device 0");
    let stream = ctx.new_stream().expect("stream");
    let blas = CudaBlas::new(stream.clone()).expect("cuBLAS handle");
    (stream, blas)
}

/// Every transpose pair, odd sizes, padded leading dimensions, each input type with a 16-bit and
/// an f32 output, alpha and beta off their defaults and beta = 0 over a NaN C.
#[test]
#[ignore = "needs a CUDA device"]
fn gemm_ex_matches_the_triple_loop() {
    let (stream, blas) = setup();
    let mut seed = 0;
    for (ty_in, ty_out) in [
        (Ty::Bf16, Ty::Bf16),
        (Ty::Bf16, Ty::F32),
        (Ty::F16, Ty::F16),
        (Ty::F16, Ty::F32),
        (Ty::F32, Ty::F32),
    ] {
        for (ta, tb) in [(false, false), (true, false), (false, true), (true, true)] {
            for (dims, pad, alpha, beta) in [
                ((37, 29, 45), 3, 1.0, 0.0),
                ((16, 1, 64), 0, 0.75, 0.5),
                ((5, 33, 130), 7, -1.25, 1.0),
            ] {
                let mut g = Gemm::new(ta, tb, dims, pad);
                g.alpha = alpha;
                g.beta = beta;
                seed += 1;
                check(&blas, &stream, g, Call::GemmEx(ty_in, ty_out), seed);
            }
        }
    }
}

/// Batches with strides past each matrix (gaps between them), and strides of 0 (one A for every
/// batch, as a weight shared across a batch is).
#[test]
#[ignore = "needs a CUDA device"]
fn strided_batched_gemm_matches_the_triple_loop() {
    let (stream, blas) = setup();
    let mut seed = 100;
    for (ty_in, ty_out) in [(Ty::Bf16, Ty::F32), (Ty::F16, Ty::F16), (Ty::F32, Ty::F32)] {
        for (ta, tb) in [(false, false), (true, false), (false, true), (true, true)] {
            for shared_a in [false, true] {
                let mut g = Gemm::new(ta, tb, (19, 11, 23), 2);
                let (a, b, c) = g.sizes();
                g.batch = 3;
                g.stride_a = if shared_a { 0 } else { a + 5 };
                g.stride_b = b + 1;
                g.stride_c = c + 9;
                g.alpha = 0.5;
                g.beta = if shared_a { 0.0 } else { -0.25 };
                seed += 1;
                check(
                    &blas,
                    &stream,
                    g,
                    Call::StridedBatchedEx(ty_in, ty_out),
                    seed,
                );
            }
        }
    }
}

#[test]
#[ignore = "needs a CUDA device"]
fn sgemm_matches_the_triple_loop() {
    let (stream, blas) = setup();
    for (i, (ta, tb)) in [(false, false), (true, false), (false, true), (true, true)]
        .into_iter()
        .enumerate()
    {
        let mut g = Gemm::new(ta, tb, (21, 17, 40), 4);
        g.alpha = 1.5;
        g.beta = if i % 2 == 0 { 0.0 } else { 2.0 };
        check(&blas, &stream, g, Call::Sgemm, 200 + i);
    }
}
