//! A device tensor that knows its shape and dtype.

use cudarc::driver::{CudaSlice, CudaView, DevicePtr};
use half::{bf16, f16};

use super::Device;
use crate::error::{Error, Result};

/// Element type of a [`Tensor`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DType {
    /// 32-bit float.
    F32,
    /// IEEE half.
    F16,
    /// bfloat16.
    BF16,
}

impl DType {
    /// Bytes per element.
    pub fn size(self) -> usize {
        match self {
            DType::F32 => 4,
            DType::F16 | DType::BF16 => 2,
        }
    }

    /// Short name used in kernel names (`f32`, `f16`, `bf16`).
    pub fn name(self) -> &'static str {
        match self {
            DType::F32 => "f32",
            DType::F16 => "f16",
            DType::BF16 => "bf16",
        }
    }

    /// Rounds `x` to this dtype and back, as storing it in a tensor would.
    pub fn round(self, x: f32) -> f32 {
        match self {
            DType::F32 => x,
            DType::F16 => f16::from_f32(x).to_f32(),
            DType::BF16 => bf16::from_f32(x).to_f32(),
        }
    }
}

/// A buffer [`Tensor::from_device_buffer`] refused, given back with the reason. `?` turns it
/// into the [`Error`] (and frees the buffer).
#[derive(Debug, thiserror::Error)]
#[error("{error}")]
pub struct BufferRejected {
    /// Why.
    pub error: Error,
    /// The caller's buffer, untouched.
    pub buffer: CudaSlice<u8>,
}

impl From<BufferRejected> for Error {
    fn from(r: BufferRejected) -> Self {
        r.error
    }
}

/// A dense, row-major tensor in device memory.
pub struct Tensor {
    buf: CudaSlice<u8>,
    shape: Vec<usize>,
    dtype: DType,
}

impl std::fmt::Debug for Tensor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tensor")
            .field("shape", &self.shape)
            .field("dtype", &self.dtype)
            .finish_non_exhaustive()
    }
}

/// Rows `start..start + len` of a tensor's first dimension, read in place: a segment's K or V
/// inside a larger buffer, such as an engine's KV pool (`[capacity, n_kv_heads, head_dim]`), with
/// no copy. Made by [`Tensor::rows`].
#[derive(Clone, Copy, Debug)]
pub struct TensorRows<'a> {
    tensor: &'a Tensor,
    start: usize,
    len: usize,
}

impl<'a> TensorRows<'a> {
    /// The tensor the rows belong to.
    pub fn tensor(&self) -> &'a Tensor {
        self.tensor
    }

    /// The first row.
    pub fn start(&self) -> usize {
        self.start
    }

    /// Rows in the view.
    pub fn len(&self) -> usize {
        self.len
    }

    /// True when the view has no rows.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

/// The number of elements of a tensor of `shape`, or an error when it overflows `usize`.
pub fn element_count(shape: &[usize]) -> Result<usize> {
    shape
        .iter()
        .try_fold(1usize, |acc, &d| acc.checked_mul(d))
        .ok_or_else(|| Error::OutOfRange(format!("shape {shape:?} has too many elements")))
}

/// Errors unless a tensor of `shape` (`len` elements) can be seen as `to`.
pub fn check_reshape(shape: &[usize], len: usize, to: &[usize]) -> Result<()> {
    if element_count(to)? != len {
        return Err(Error::Shape(format!("cannot reshape {shape:?} to {to:?}")));
    }
    Ok(())
}

/// Rows `start..start + count` of the first dim of a tensor of `shape` (`len` elements): the
/// shape of those rows, and the elements per row.
pub fn row_range(
    shape: &[usize],
    len: usize,
    start: usize,
    count: usize,
) -> Result<(Vec<usize>, usize)> {
    let Some(&rows) = shape.first() else {
        return Err(Error::Shape("a scalar tensor has no rows".into()));
    };
    if start.checked_add(count).is_none_or(|end| end > rows) {
        return Err(Error::Shape(format!(
            "rows {start}..{} of a tensor with {rows}",
            start.saturating_add(count)
        )));
    }
    let mut out = shape.to_vec();
    out[0] = count;
    Ok((out, len / rows.max(1)))
}

fn encode(data: &[f32], dtype: DType) -> Vec<u8> {
    match dtype {
        DType::F32 => bytemuck::cast_slice(data).to_vec(),
        DType::F16 => {
            let v: Vec<f16> = data.iter().map(|&x| f16::from_f32(x)).collect();
            bytemuck::cast_slice(&v).to_vec()
        }
        DType::BF16 => {
            let v: Vec<bf16> = data.iter().map(|&x| bf16::from_f32(x)).collect();
            bytemuck::cast_slice(&v).to_vec()
        }
    }
}

fn decode(bytes: &[u8], dtype: DType) -> Vec<f32> {
    match dtype {
        DType::F32 => bytes
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect(),
        DType::F16 => bytes
            .chunks_exact(2)
            .map(|b| f16::from_le_bytes([b[0], b[1]]).to_f32())
            .collect(),
        DType::BF16 => bytes
            .chunks_exact(2)
            .map(|b| bf16::from_le_bytes([b[0], b[1]]).to_f32())
            .collect(),
    }
}

fn byte_len(shape: &[usize], dtype: DType) -> Result<usize> {
    element_count(shape)?
        .checked_mul(dtype.size())
        .ok_or_else(|| Error::OutOfRange(format!("shape {shape:?} is too large")))
}

impl Tensor {
    /// A zero-filled tensor.
    pub fn zeros(device: &Device, shape: &[usize], dtype: DType) -> Result<Self> {
        let buf = device
            .stream()
            .alloc_zeros::<u8>(byte_len(shape, dtype)?.max(1))?;
        Ok(Self {
            buf,
            shape: shape.to_vec(),
            dtype,
        })
    }

    /// A tensor whose contents are left as the allocator found them: for outputs that a kernel
    /// overwrites whole before anything reads them (no memset launch). Reading it before then
    /// gives stale numbers.
    pub fn uninit(device: &Device, shape: &[usize], dtype: DType) -> Result<Self> {
        // SAFETY: device memory of a plain byte type; callers write every element before reading
        // (see the call sites), and reading stale bytes would give wrong numbers, not undefined
        // behaviour on the host.
        let buf = unsafe { device.stream().alloc::<u8>(byte_len(shape, dtype)?.max(1)) }?;
        Ok(Self {
            buf,
            shape: shape.to_vec(),
            dtype,
        })
    }

    /// Wraps device memory the caller allocated (an engine's own KV pool, say) as a tensor of
    /// `shape` and `dtype`, without copying: the first `shape`'s bytes of `buf`, which must be on
    /// `device`'s context and start on a 16-byte boundary (the kernels' vector loads need it;
    /// cudarc's allocations start on 256). [`Tensor::into_device_buffer`] gives the buffer back,
    /// and so does a refusal ([`BufferRejected`]), so that a rejected buffer is not freed.
    pub fn from_device_buffer(
        device: &Device,
        buf: CudaSlice<u8>,
        shape: &[usize],
        dtype: DType,
    ) -> std::result::Result<Self, BufferRejected> {
        let t = Self {
            buf,
            shape: shape.to_vec(),
            dtype,
        };
        let check = || -> Result<()> {
            let need = byte_len(shape, dtype)?;
            if t.buf.len() < need {
                return Err(Error::Shape(format!(
                    "a buffer of {} bytes cannot hold {shape:?} {dtype:?} ({need} bytes)",
                    t.buf.len()
                )));
            }
            t.check_device(device, "buffer")?;
            let (ptr, _sync) = t.buf.device_ptr(device.stream());
            if ptr % 16 != 0 {
                return Err(Error::Shape(format!(
                    "the buffer starts at {ptr:#x}, not on a 16-byte boundary"
                )));
            }
            Ok(())
        };
        match check() {
            Ok(()) => Ok(t),
            Err(error) => Err(BufferRejected {
                error,
                buffer: t.buf,
            }),
        }
    }

    /// The device buffer, given back (see [`Tensor::from_device_buffer`]).
    pub fn into_device_buffer(self) -> CudaSlice<u8> {
        self.buf
    }

    /// The device buffer, for the caller's own kernels (row-major, the dtype's bytes; it may be
    /// longer than the tensor).
    pub fn device_buffer(&self) -> &CudaSlice<u8> {
        &self.buf
    }

    /// Uploads `data` (f32, row-major) rounded to `dtype`.
    pub fn from_f32(device: &Device, shape: &[usize], data: &[f32], dtype: DType) -> Result<Self> {
        let n = element_count(shape)?;
        if data.len() != n {
            return Err(Error::Shape(format!(
                "{} values given for shape {shape:?} ({n} elements)",
                data.len()
            )));
        }
        let mut bytes = encode(data, dtype);
        if bytes.is_empty() {
            bytes.push(0);
        }
        let buf = device.stream().clone_htod(&bytes)?;
        Ok(Self {
            buf,
            shape: shape.to_vec(),
            dtype,
        })
    }

    /// Overwrites every element with `data` (rounded to the tensor's dtype).
    pub fn copy_from_f32(&mut self, device: &Device, data: &[f32]) -> Result<()> {
        if data.len() != self.len() {
            return Err(Error::Shape(format!(
                "{} values given for shape {:?}",
                data.len(),
                self.shape
            )));
        }
        self.check_device(device, "tensor")?;
        if data.is_empty() {
            return Ok(());
        }
        let bytes = encode(data, self.dtype);
        device.stream().memcpy_htod(&bytes, &mut self.buf)?;
        Ok(())
    }

    /// Downloads the tensor as f32 (waits for the stream).
    pub fn to_f32(&self, device: &Device) -> Result<Vec<f32>> {
        self.check_device(device, "tensor")?;
        if self.is_empty() {
            return Ok(Vec::new());
        }
        let bytes = device.stream().clone_dtoh(&self.data())?;
        Ok(decode(&bytes, self.dtype))
    }

    /// The same data under another shape with as many elements (no copy).
    pub fn reshape(self, shape: &[usize]) -> Result<Self> {
        check_reshape(&self.shape, self.len(), shape)?;
        Ok(Self {
            shape: shape.to_vec(),
            ..self
        })
    }

    /// Rows `start..start + count` of the first dim, copied into a new tensor.
    pub fn copy_rows(&self, device: &Device, start: usize, count: usize) -> Result<Self> {
        self.check_device(device, "tensor")?;
        let (shape, row_len) = row_range(&self.shape, self.len(), start, count)?;
        let row_bytes = row_len * self.dtype.size();
        let mut out = Tensor::zeros(device, &shape, self.dtype)?;
        if count > 0 {
            let src = self
                .buf
                .slice(start * row_bytes..(start + count) * row_bytes);
            device.stream().memcpy_dtod(&src, &mut out.buf)?;
        }
        Ok(out)
    }

    /// Overwrites rows `start..start + n` of the first dim with the `n` rows of `src` (the same
    /// dtype and the same shape after the first dim), on the device: how an engine writes the
    /// K and V of new tokens into its preallocated KV pool, which segments then read in place
    /// ([`Tensor::rows`]). Errors, before any copy, when the rows do not fit.
    pub fn write_rows(&mut self, device: &Device, start: usize, src: &Tensor) -> Result<()> {
        self.check_device(device, "destination")?;
        src.check_device(device, "source")?;
        src.check_dtype(self.dtype, "source")?;
        let count = match (self.shape.split_first(), src.shape.split_first()) {
            (Some((_, dst_row)), Some((&n, src_row))) if dst_row == src_row => n,
            _ => {
                return Err(Error::Shape(format!(
                    "rows of shape {:?} cannot be written into a tensor of shape {:?}",
                    src.shape, self.shape
                )))
            }
        };
        let (_, row_len) = row_range(&self.shape, self.len(), start, count)?;
        let row_bytes = row_len * self.dtype.size();
        if count > 0 && row_bytes > 0 {
            let mut dst = self
                .buf
                .slice_mut(start * row_bytes..(start + count) * row_bytes);
            device.stream().memcpy_dtod(&src.data(), &mut dst)?;
        }
        Ok(())
    }

    /// Copies `src` into this tensor on the device (same shape and dtype), reusing its memory.
    pub fn copy_from(&mut self, device: &Device, src: &Tensor) -> Result<()> {
        self.check_device(device, "destination")?;
        src.check_device(device, "source")?;
        self.check_shape(src.shape(), "destination")?;
        self.check_dtype(src.dtype, "destination")?;
        if !self.is_empty() {
            device.stream().memcpy_dtod(&src.data(), &mut self.buf)?;
        }
        Ok(())
    }

    /// A copy on the device.
    pub fn try_clone(&self, device: &Device) -> Result<Self> {
        let rows = self.shape.first().copied().unwrap_or(1);
        if self.shape.is_empty() {
            let mut out = Tensor::zeros(device, &[], self.dtype)?;
            device.stream().memcpy_dtod(&self.data(), &mut out.buf)?;
            return Ok(out);
        }
        self.copy_rows(device, 0, rows)
    }

    /// Shape.
    pub fn shape(&self) -> &[usize] {
        &self.shape
    }

    /// Rows `range` of the first dimension, read in place (no copy): for segments inside a larger
    /// buffer ([`crate::cuda::Segment`] takes them). Errors unless the range lies within the rows.
    pub fn rows(&self, range: std::ops::Range<usize>) -> Result<TensorRows<'_>> {
        let count = range.end.checked_sub(range.start).ok_or_else(|| {
            Error::Shape(format!(
                "rows {}..{}: the range is reversed",
                range.start, range.end
            ))
        })?;
        row_range(&self.shape, self.len(), range.start, count)?;
        Ok(TensorRows {
            tensor: self,
            start: range.start,
            len: count,
        })
    }

    /// Element type.
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// Number of elements.
    pub fn len(&self) -> usize {
        self.shape.iter().product()
    }

    /// True when the tensor has no elements.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The tensor's bytes: the start of its buffer, which a wrapped buffer
    /// ([`Tensor::from_device_buffer`]) may outlast. For operations outside this crate (a GEMM
    /// through cuBLAS, a copy) to read.
    pub fn data(&self) -> CudaView<'_, u8> {
        self.buf.slice(0..self.len() * self.dtype.size())
    }

    /// The device buffer, for a kernel or an operation outside this crate to write (its first
    /// `len() * dtype().size()` bytes are the tensor's).
    pub fn buf_mut(&mut self) -> &mut CudaSlice<u8> {
        &mut self.buf
    }

    /// Errors unless the tensor was allocated on `device`.
    pub fn check_device(&self, device: &Device, what: &str) -> Result<()> {
        if self.buf.context().as_ref() == device.context().as_ref() {
            Ok(())
        } else {
            Err(Error::DeviceMismatch(format!(
                "{what} lives on device {}, the launch is on device {}",
                self.buf.context().ordinal(),
                device.context().ordinal()
            )))
        }
    }

    /// Errors unless the dtype is `dtype`.
    pub fn check_dtype(&self, dtype: DType, what: &str) -> Result<()> {
        if self.dtype == dtype {
            Ok(())
        } else {
            Err(Error::DType(format!(
                "{what} is {:?}, expected {:?}",
                self.dtype, dtype
            )))
        }
    }

    /// Errors unless the shape is `shape`.
    pub(crate) fn check_shape(&self, shape: &[usize], what: &str) -> Result<()> {
        if self.shape == shape {
            Ok(())
        } else {
            Err(Error::Shape(format!(
                "{what} has shape {:?}, expected {shape:?}",
                self.shape
            )))
        }
    }
}
