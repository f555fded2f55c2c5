//! The GPU weight store (feature `cuda`): the same [`Manifest`] over device buffers that are
//! allocated once and exported once with CUDA IPC.
//!
//! - The learner creates [`DeviceSlots`]: one device buffer and one interprocess event per slot
//!   of a CPU [`WeightStore`](crate::WeightStore) segment, which keeps doing the slot choice,
//!   versioning and pinning (its host slots may stay unused). [`DeviceSlots::publish`] copies
//!   the parameters device-to-device into the slot the store hands out, records the slot's event
//!   on the copy stream, and only then publishes the version.
//! - The rollout server receives the [`IpcHandles`] once (over the control channel), opens them
//!   with [`DeviceSlotsView::open`], pins a version with [`Reader::pin`], makes its stream wait
//!   for that slot's event ([`DeviceSlotsView::wait`]) and reads the device pointers. It must
//!   synchronise its stream before dropping the pin.
//!
//! The raw driver IPC calls exist only as FFI in `cudarc::driver::sys`; this module wraps each
//! once. The caller keeps the CUDA context current on the calling thread (e.g. with
//! `CudaContext::bind_to_thread`).

use std::time::Duration;

use cudarc::driver::sys::{self, CUdeviceptr, CUevent, CUstream};
use cudarc::driver::DriverError;

use crate::error::PublishSlotError;
use crate::manifest::Manifest;
use crate::weights::{Pinned, Writer};

/// A CUDA driver call failed, or the handles do not fit the manifest.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CudaError {
    /// The driver returned an error.
    #[error("{call}: {source}")]
    Driver {
        call: &'static str,
        source: DriverError,
    },
    /// Received handles do not match the local manifest.
    #[error("IPC handles: {0}")]
    Handles(String),
    /// The CUDA driver is installed but reports no device.
    #[error("the CUDA driver reports no GPU on this machine")]
    NoDevice,
    /// The slot index is out of range.
    #[error("slot {slot} out of range ({slots} slots)")]
    BadSlot { slot: u32, slots: u32 },
    /// Filling a slot failed (the caller's copies).
    #[error("filling a device slot: {0}")]
    Fill(String),
}

/// Publishing to device slots failed; readers keep the previous version.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DevicePublishError {
    /// The slot could not be taken (pinned, liveness check failed).
    #[error(transparent)]
    Publish(#[from] crate::PublishError),
    /// The device copy or event record failed.
    #[error(transparent)]
    Cuda(#[from] CudaError),
}

/// Whether a CUDA driver answers with at least one device (checked once per process). The
/// binaries link the driver library (`libcuda.so.1`) dynamically, so a machine without it stops
/// the process at start-up, naming the library; here the driver is present and `cuInit` tells
/// whether it has a device.
pub fn driver_available() -> bool {
    device_count().is_ok_and(|n| n > 0)
}

/// Initialises the driver and counts its devices (once per process; later calls return the
/// first answer).
pub fn device_count() -> Result<usize, CudaError> {
    static ANSWER: std::sync::OnceLock<Result<usize, sys::CUresult>> = std::sync::OnceLock::new();
    let answer = ANSWER.get_or_init(|| {
        // SAFETY: cuInit takes flags 0 (the only valid value) and may be called repeatedly.
        let r = unsafe { sys::cuInit(0) };
        if r != sys::CUresult::CUDA_SUCCESS {
            return Err(r);
        }
        let mut n: std::ffi::c_int = 0;
        // SAFETY: `n` is a valid out-pointer; the driver is initialised.
        let r = unsafe { sys::cuDeviceGetCount(&mut n) };
        if r != sys::CUresult::CUDA_SUCCESS {
            return Err(r);
        }
        Ok(usize::try_from(n).unwrap_or(0))
    });
    match *answer {
        Ok(n) => Ok(n),
        Err(r) => Err(CudaError::Driver {
            call: "cuInit",
            source: DriverError(r),
        }),
    }
}

fn require_driver() -> Result<(), CudaError> {
    match device_count()? {
        0 => Err(CudaError::NoDevice),
        _ => Ok(()),
    }
}

fn check(call: &'static str, r: sys::CUresult) -> Result<(), CudaError> {
    r.result()
        .map_err(|source| CudaError::Driver { call, source })
}

pub use crate::control::IpcHandles;

fn handle_bytes(raw: &[std::ffi::c_char; 64]) -> Vec<u8> {
    raw.iter().map(|&c| c as u8).collect()
}

fn handle_from(bytes: &[u8]) -> Result<[std::ffi::c_char; 64], CudaError> {
    let arr: &[u8; 64] = bytes
        .try_into()
        .map_err(|_| CudaError::Handles(format!("handle of {} bytes, expected 64", bytes.len())))?;
    Ok(arr.map(|b| b as std::ffi::c_char))
}

/// Device buffers and interprocess events owned by the learner.
#[derive(Debug)]
pub struct DeviceSlots {
    buffers: Vec<CUdeviceptr>,
    events: Vec<CUevent>,
    bytes: usize,
    manifest: Manifest,
}

impl DeviceSlots {
    /// Allocates `slots` device buffers of `manifest.total_size()` bytes and one interprocess
    /// event per slot, in the current context. `slots` must equal the CPU store's slot count.
    pub fn new(manifest: &Manifest, slots: u32) -> Result<Self, CudaError> {
        require_driver()?;
        let mut me = Self {
            buffers: Vec::new(),
            events: Vec::new(),
            bytes: manifest.total_size(),
            manifest: manifest.clone(),
        };
        for _ in 0..slots {
            let mut ptr: CUdeviceptr = 0;
            // SAFETY: `ptr` is a valid out-pointer; the driver allocates in the current context.
            check("cuMemAlloc", unsafe {
                sys::cuMemAlloc_v2(&mut ptr, me.bytes.max(1))
            })?;
            me.buffers.push(ptr);
            let mut ev: CUevent = std::ptr::null_mut();
            let flags = sys::CUevent_flags_enum::CU_EVENT_INTERPROCESS as u32
                | sys::CUevent_flags_enum::CU_EVENT_DISABLE_TIMING as u32;
            // SAFETY: valid out-pointer; INTERPROCESS requires DISABLE_TIMING, which is set.
            check("cuEventCreate", unsafe {
                sys::cuEventCreate(&mut ev, flags)
            })?;
            me.events.push(ev);
        }
        Ok(me)
    }

    /// Exports every buffer and event once.
    pub fn export(&self) -> Result<IpcHandles, CudaError> {
        let mut memory = Vec::new();
        let mut events = Vec::new();
        for (&ptr, &ev) in self.buffers.iter().zip(&self.events) {
            let mut mh = sys::CUipcMemHandle { reserved: [0; 64] };
            // SAFETY: `ptr` is a live allocation made by cuMemAlloc; `mh` a valid out-pointer.
            check("cuIpcGetMemHandle", unsafe {
                sys::cuIpcGetMemHandle(&mut mh, ptr)
            })?;
            memory.push(handle_bytes(&mh.reserved));
            let mut eh = sys::CUipcEventHandle { reserved: [0; 64] };
            // SAFETY: `ev` is a live interprocess event; `eh` a valid out-pointer.
            check("cuIpcGetEventHandle", unsafe {
                sys::cuIpcGetEventHandle(&mut eh, ev)
            })?;
            events.push(handle_bytes(&eh.reserved));
        }
        Ok(IpcHandles {
            memory,
            events,
            bytes: self.bytes as u64,
            manifest_hash: self.manifest.hash_hex(),
            generation: 0,
        })
    }

    /// Copies `src` (a device buffer laid out by the manifest) into the slot `writer` hands
    /// out, on `stream`, records that slot's event, then publishes the next version.
    ///
    /// # Safety
    /// `src` must be a device allocation of at least `manifest.total_size()` bytes that stays
    /// valid and unmodified until the copy on `stream` completes; `stream` must belong to the
    /// current context.
    pub unsafe fn publish(
        &self,
        writer: &mut Writer,
        src: CUdeviceptr,
        stream: CUstream,
        timeout: Duration,
    ) -> Result<u64, DevicePublishError> {
        let bytes = self.bytes;
        let fill = |dst| {
            // SAFETY: one copy of `bytes` from `src` (the caller's guarantee) into the slot
            // buffer `dst` (ours, `bytes` long), on `stream`.
            check("cuMemcpyDtoDAsync", unsafe {
                sys::cuMemcpyDtoDAsync_v2(dst, src, bytes, stream)
            })
        };
        // SAFETY: `fill` only enqueues that copy on `stream`, within the slot, reading `src`,
        // which the caller keeps valid until it completes.
        unsafe { self.publish_with(writer, None, stream, timeout, fill) }
    }

    /// As [`Self::publish`], with the copies made by `fill`, which enqueues on `stream` the
    /// writes of the slot buffer it is given (e.g. one copy per tensor into `dst + offset`),
    /// under `version` when given (as [`Writer::publish_version`]), else the next one.
    ///
    /// # Safety
    /// `fill` must only enqueue work on `stream`, write within `manifest.total_size()` bytes
    /// of the pointer it is given, and read only memory that stays valid until that work
    /// completes; `stream` must belong to the current context.
    pub unsafe fn publish_with(
        &self,
        writer: &mut Writer,
        version: Option<u64>,
        stream: CUstream,
        timeout: Duration,
        fill: impl FnOnce(CUdeviceptr) -> Result<(), CudaError>,
    ) -> Result<u64, DevicePublishError> {
        let slots = self.buffers.len() as u32;
        let fill_slot = |slot: u32, _host: &mut [u8]| -> Result<(), CudaError> {
            let (dst, ev) = match (
                self.buffers.get(slot as usize),
                self.events.get(slot as usize),
            ) {
                (Some(&d), Some(&e)) => (d, e),
                _ => return Err(CudaError::BadSlot { slot, slots }),
            };
            // The store guarantees no reader uses this slot (not current, not pinned).
            fill(dst)?;
            // SAFETY: `ev` is our live event; recording it on `stream` after the copies lets
            // a reader's cuStreamWaitEvent order its reads after them.
            check("cuEventRecord", unsafe { sys::cuEventRecord(ev, stream) })
        };
        let r = match version {
            Some(v) => writer.try_publish_slot_version(v, timeout, fill_slot),
            None => writer.try_publish_slot(timeout, fill_slot),
        };
        r.map_err(|e| match e {
            PublishSlotError::Publish(p) => DevicePublishError::Publish(p),
            PublishSlotError::Fill(c) => DevicePublishError::Cuda(c),
        })
    }

    /// Device pointer of `slot`.
    pub fn slot_ptr(&self, slot: u32) -> Option<CUdeviceptr> {
        self.buffers.get(slot as usize).copied()
    }
}

impl Drop for DeviceSlots {
    fn drop(&mut self) {
        for &ev in &self.events {
            // SAFETY: events we created and still own; errors at teardown are ignored.
            let _ = unsafe { sys::cuEventDestroy_v2(ev) };
        }
        for &ptr in &self.buffers {
            // SAFETY: allocations we made and still own.
            let _ = unsafe { sys::cuMemFree_v2(ptr) };
        }
    }
}

/// The rollout server's view of the learner's device slots.
#[derive(Debug)]
pub struct DeviceSlotsView {
    buffers: Vec<CUdeviceptr>,
    events: Vec<CUevent>,
    manifest: Manifest,
}

impl DeviceSlotsView {
    /// Opens exported handles in the current context after checking them against `manifest`.
    pub fn open(manifest: &Manifest, handles: &IpcHandles) -> Result<Self, CudaError> {
        if handles.manifest_hash != manifest.hash_hex() {
            return Err(CudaError::Handles(format!(
                "manifest hash {} differs from local {}",
                handles.manifest_hash,
                manifest.hash_hex()
            )));
        }
        if handles.bytes != manifest.total_size() as u64
            || handles.memory.len() != handles.events.len()
        {
            return Err(CudaError::Handles(format!(
                "{} bytes, {} buffers, {} events for a {}-byte manifest",
                handles.bytes,
                handles.memory.len(),
                handles.events.len(),
                manifest.total_size()
            )));
        }
        // Validate every handle before the first driver call.
        let memory: Vec<_> = handles
            .memory
            .iter()
            .map(|m| handle_from(m))
            .collect::<Result<_, _>>()?;
        let events: Vec<_> = handles
            .events
            .iter()
            .map(|e| handle_from(e))
            .collect::<Result<_, _>>()?;
        require_driver()?;
        let mut me = Self {
            buffers: Vec::new(),
            events: Vec::new(),
            manifest: manifest.clone(),
        };
        for (m, e) in memory.into_iter().zip(events) {
            let mh = sys::CUipcMemHandle { reserved: m };
            let mut ptr: CUdeviceptr = 0;
            let flags = sys::CUipcMem_flags_enum::CU_IPC_MEM_LAZY_ENABLE_PEER_ACCESS as u32;
            // SAFETY: `mh` came from cuIpcGetMemHandle in another process; valid out-pointer.
            check("cuIpcOpenMemHandle", unsafe {
                sys::cuIpcOpenMemHandle_v2(&mut ptr, mh, flags)
            })?;
            me.buffers.push(ptr);
            let eh = sys::CUipcEventHandle { reserved: e };
            let mut ev: CUevent = std::ptr::null_mut();
            // SAFETY: `eh` came from cuIpcGetEventHandle; valid out-pointer.
            check("cuIpcOpenEventHandle", unsafe {
                sys::cuIpcOpenEventHandle(&mut ev, eh)
            })?;
            me.events.push(ev);
        }
        Ok(me)
    }

    /// Makes `stream` wait until the copy that filled the pinned slot has completed; returns
    /// the slot's device pointer.
    ///
    /// # Safety
    /// `stream` must belong to the current context. Work enqueued on `stream` that reads the
    /// pointer must complete before `pinned` is dropped (synchronise the stream first).
    pub unsafe fn wait(
        &self,
        pinned: &Pinned<'_>,
        stream: CUstream,
    ) -> Result<CUdeviceptr, CudaError> {
        let slot = pinned.slot();
        let slots = self.buffers.len() as u32;
        let (ptr, ev) = match (
            self.buffers.get(slot as usize),
            self.events.get(slot as usize),
        ) {
            (Some(&p), Some(&e)) => (p, e),
            _ => return Err(CudaError::BadSlot { slot, slots }),
        };
        // SAFETY: `ev` is an opened IPC event; the caller guarantees `stream`.
        check("cuStreamWaitEvent", unsafe {
            sys::cuStreamWaitEvent(stream, ev, 0)
        })?;
        Ok(ptr)
    }

    /// Device pointer of tensor `name` inside a slot pointer returned by [`Self::wait`].
    pub fn tensor_ptr(&self, slot_ptr: CUdeviceptr, name: &str) -> Option<CUdeviceptr> {
        self.manifest
            .get(name)
            .map(|t| slot_ptr + t.offset as CUdeviceptr)
    }
}

impl Drop for DeviceSlotsView {
    fn drop(&mut self) {
        for &ev in &self.events {
            // SAFETY: events opened from IPC handles; destroying our reference is allowed.
            let _ = unsafe { sys::cuEventDestroy_v2(ev) };
        }
        for &ptr in &self.buffers {
            // SAFETY: pointers returned by cuIpcOpenMemHandle in this process.
            let _ = unsafe { sys::cuIpcCloseMemHandle(ptr) };
        }
    }
}
