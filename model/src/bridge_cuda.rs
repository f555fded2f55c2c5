//! The weight bridge over CUDA device slots (feature `cuda`): the same layout as the host slots
//! ([`WeightBridge::manifest`]), with both copies device to device on candle's stream of the
//! model's device, so that no weight crosses the host.
//!
//! The learner copies each parameter (candle keeps one allocation per tensor) into
//! `slot + offset`; the rollout server copies each tensor out of the mapped slot into new
//! tensors of its own and then lets the slot go. Copying out keeps the weight store's reader
//! contract (pin, copy, unpin at once: a slow generation never holds a slot) and leaves every
//! allocation with one owner: the importer never frees, or keeps, memory it did not allocate.
//! The copy costs one device-bandwidth pass over the weights (0.5 GB for the default model).

use crate::bridge::WeightBridge;
use crate::decoder::Decoder;
use crate::error::{ModelError, Result};
use crate::weights::Weights;
use candle_core::cuda_backend::cudarc::driver::{sys, CudaStream, DevicePtr};
use candle_core::cuda_backend::{CudaDevice, CudaStorage};
use candle_core::op::BackpropOp;
use candle_core::{DType, Device, Storage, Tensor};
use std::collections::HashMap;
use std::sync::Arc;

/// candle's stream of a CUDA device (every kernel of the model runs on it).
pub fn cuda_stream(device: &Device) -> Result<Arc<CudaStream>> {
    Ok(cuda_device(device)?.cuda_stream())
}

fn cuda_device(device: &Device) -> Result<&CudaDevice> {
    device
        .as_cuda_device()
        .map_err(|_| ModelError::Device(format!("{device:?} is not a CUDA device")))
}

fn driver(call: &'static str, r: sys::CUresult) -> Result<()> {
    if r == sys::CUresult::CUDA_SUCCESS {
        Ok(())
    } else {
        Err(ModelError::Device(format!("{call} failed: {r:?}")))
    }
}

impl WeightBridge {
    /// Enqueues on `decoder`'s stream a device-to-device copy of every published tensor
    /// ([`WeightBridge::published`]: the parameters, or the LoRA adapters) (f32,
    /// contiguous, on a CUDA device) into the device slot at `dst`, laid out by the manifest.
    ///
    /// # Safety
    /// `dst` must be a device allocation of at least `manifest().total_size()` bytes in the
    /// decoder's context, which nothing reads until the copies complete (the caller records
    /// an event on the stream after this returns; readers wait for it).
    pub unsafe fn write_device(&self, decoder: &Decoder, dst: sys::CUdeviceptr) -> Result<()> {
        let stream = cuda_stream(decoder.device())?;
        let params = self.published(decoder)?;
        stream
            .context()
            .bind_to_thread()
            .map_err(|e| ModelError::Device(format!("binding the CUDA context: {e}")))?;
        for ((name, t), spec) in params.iter().zip(self.manifest().tensors()) {
            if t.dtype() != DType::F32 {
                return Err(ModelError::UnsupportedDType {
                    name: name.clone(),
                    dtype: format!("{:?} (device slots hold f32)", t.dtype()),
                });
            }
            let (storage, layout) = t.storage_and_layout();
            let Storage::Cuda(cuda) = &*storage else {
                return Err(ModelError::Device(format!(
                    "parameter {name} is not on a GPU"
                )));
            };
            let Some((start, end)) = layout.contiguous_offsets() else {
                return Err(ModelError::InvalidInput(format!(
                    "parameter {name} is not contiguous"
                )));
            };
            let slice = cuda.as_cuda_slice::<f32>()?;
            let (src, _sync) = slice.device_ptr(&stream);
            let bytes = (end - start) * 4;
            if bytes != spec.size {
                return Err(ModelError::InvalidConfig(format!(
                    "parameter {name}: {bytes} bytes for a {}-byte slot entry",
                    spec.size
                )));
            }
            // SAFETY: `src + 4·start` is the parameter's live storage (`bytes` long, read on
            // its own stream, held by `storage`'s read guard until the copy is enqueued, and
            // candle's stream ordering keeps it alive until the copy runs: a later free is
            // enqueued after it); the caller guarantees `dst` for `total_size` bytes, and the
            // manifest keeps `offset + size` within it.
            driver("cuMemcpyDtoDAsync", unsafe {
                sys::cuMemcpyDtoDAsync_v2(
                    dst + spec.offset as u64,
                    src + (start * 4) as u64,
                    bytes,
                    stream.cu_stream(),
                )
            })?;
        }
        Ok(())
    }

    /// New tensors on `device`, copied device to device from the device slot at `src` (laid
    /// out by the manifest), in manifest order. Returns after the copies have completed, so
    /// the caller may unpin the slot at once.
    ///
    /// # Safety
    /// `src` must be readable device memory of `manifest().total_size()` bytes in `device`'s
    /// context (a buffer opened from an IPC handle), whose producing copy `device`'s stream
    /// already waits for, and which nobody writes until this returns.
    pub unsafe fn tensors_from_device(
        &self,
        src: sys::CUdeviceptr,
        device: &Device,
    ) -> Result<Vec<(String, Tensor)>> {
        let dev = cuda_device(device)?;
        let stream = dev.cuda_stream();
        stream
            .context()
            .bind_to_thread()
            .map_err(|e| ModelError::Device(format!("binding the CUDA context: {e}")))?;
        let mut tensors = Vec::with_capacity(self.manifest().tensors().len());
        for spec in self.manifest().tensors() {
            let n = spec.size / 4;
            // SAFETY: every element is written by the copy below before any kernel reads it
            // (same stream).
            let slice = unsafe { stream.alloc::<f32>(n) }
                .map_err(|e| ModelError::Device(format!("allocating {}: {e}", spec.name)))?;
            {
                let (dst, _sync) = slice.device_ptr(&stream);
                // SAFETY: `dst` is our fresh allocation of `n` f32 = `spec.size` bytes; the
                // caller guarantees `src` for `total_size` bytes, of which the manifest puts
                // this tensor at `offset..offset + size`.
                driver("cuMemcpyDtoDAsync", unsafe {
                    sys::cuMemcpyDtoDAsync_v2(
                        dst,
                        src + spec.offset as u64,
                        spec.size,
                        stream.cu_stream(),
                    )
                })?;
            }
            let storage = Storage::Cuda(CudaStorage::wrap_cuda_slice(slice, dev.clone()));
            let t = Tensor::from_storage(storage, spec.shape.clone(), BackpropOp::none(), false);
            tensors.push((spec.name.clone(), t));
        }
        // The caller unpins the slot next: the copies out of it must be done by then.
        stream
            .synchronize()
            .map_err(|e| ModelError::Device(format!("waiting for the weight copies: {e}")))?;
        Ok(tensors)
    }

    /// A frozen decoder over tensors copied out of the device slot at `src` (a bridge without
    /// adapters; see [`WeightBridge::tensors_from_device`]).
    ///
    /// # Safety
    /// As [`WeightBridge::tensors_from_device`].
    pub unsafe fn decoder_from_device(
        &self,
        src: sys::CUdeviceptr,
        device: &Device,
    ) -> Result<Decoder> {
        // SAFETY: the caller's guarantees are this function's.
        let tensors = unsafe { self.tensors_from_device(src, device) }?;
        let tensors: HashMap<String, Tensor> = tensors.into_iter().collect();
        Decoder::new(
            self.config(),
            &Weights::new(tensors, DType::F32, device)?,
            false,
        )
    }
}
