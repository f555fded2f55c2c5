//! Weights through CUDA device slots when the services run on a GPU (feature `cuda`).
//!
//! The host weight store keeps choosing slots, versions and pins; on a GPU its slots stay
//! unused and each has a device buffer beside it. The learner allocates the buffers once,
//! exports their CUDA IPC handles and sends them after every handshake
//! ([`Message::DeviceSlots`](protocol::control::Message::DeviceSlots)); a publication is one
//! device-to-device copy per tensor into an inactive slot, an event recorded after the copies,
//! then the version. The rollout server opens the handles (again whenever a restarted
//! learner sends new ones), pins the newest version, makes its stream wait for the slot's event
//! and copies the tensors out device to device (see `model::WeightBridge::decoder_from_device`).
//! Both services read their device from the same configuration, so both sides agree on
//! whether the weights travel through device slots.

use anyhow::Result;
use model::candle_core::{Device, Tensor};
use model::{Decoder, WeightBridge};
use protocol::control::IpcHandles;
use protocol::{Pinned, Writer};

/// The learner's device slots (on a GPU) and their exported handles.
// Built only by the CUDA build; the CPU build refuses device slots with an error.
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
pub struct LearnerSlots {
    #[cfg(feature = "cuda")]
    slots: protocol::cuda::DeviceSlots,
    handles: IpcHandles,
}

impl LearnerSlots {
    /// Device slots mirroring `writer`'s weight store, for a learner on `device`; `None` on
    /// the CPU (the host slots carry the weights).
    pub fn new(device: &Device, bridge: &WeightBridge, writer: &Writer) -> Result<Option<Self>> {
        if device.is_cpu() {
            return Ok(None);
        }
        let mut me = imp::learner_slots(device, bridge, writer.slots())?;
        me.handles.generation = writer.generation();
        Ok(Some(me))
    }

    /// The handles the rollout server opens.
    pub fn handles(&self) -> &IpcHandles {
        &self.handles
    }

    /// Publishes `decoder`'s parameters as `version`: one device-to-device copy per tensor into
    /// an inactive slot, the slot's event, then the version.
    pub fn publish(
        &self,
        writer: &mut Writer,
        bridge: &WeightBridge,
        decoder: &Decoder,
        version: u64,
    ) -> Result<()> {
        imp::publish(self, writer, bridge, decoder, version)
    }
}

/// The rollout server's view of the learner's device slots.
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
pub struct ServerSlots {
    #[cfg(feature = "cuda")]
    view: protocol::cuda::DeviceSlotsView,
    generation: u64,
}

impl ServerSlots {
    /// Opens the handles a learner sent, for a server on `device`.
    pub fn open(device: &Device, bridge: &WeightBridge, handles: &IpcHandles) -> Result<Self> {
        if device.is_cpu() {
            anyhow::bail!(
                "the learner runs on a GPU and sent its device weight slots, but this rollout \
                 server runs on the CPU: run both services on the same device"
            );
        }
        imp::open(device, bridge, handles)
    }

    /// The weight store generation whose versions these slots hold.
    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// New tensors on `device` with the published tensors of the pinned slot (manifest order),
    /// copied out device to device; returns once the copies are done (the pin may be dropped
    /// then).
    pub fn load(
        &self,
        pinned: &Pinned<'_>,
        bridge: &WeightBridge,
        device: &Device,
    ) -> Result<Vec<(String, Tensor)>> {
        imp::load(self, pinned, bridge, device)
    }
}

#[cfg(feature = "cuda")]
mod imp {
    use super::*;
    use anyhow::{anyhow, Context};
    use protocol::cuda::{CudaError, DeviceSlots, DeviceSlotsView};
    use std::time::Duration;

    pub(super) fn learner_slots(
        device: &Device,
        bridge: &WeightBridge,
        slots: u32,
    ) -> Result<LearnerSlots> {
        bind(device)?;
        let slots = DeviceSlots::new(bridge.manifest(), slots)
            .context("while allocating the device weight slots")?;
        let handles = slots
            .export()
            .context("while exporting the device weight slots")?;
        Ok(LearnerSlots { slots, handles })
    }

    pub(super) fn publish(
        me: &LearnerSlots,
        writer: &mut Writer,
        bridge: &WeightBridge,
        decoder: &Decoder,
        version: u64,
    ) -> Result<()> {
        let stream = model::cuda_stream(decoder.device())?;
        bind(decoder.device())?;
        let fill = |dst| {
            // SAFETY: `dst` is a slot buffer of `total_size` bytes that no reader uses until
            // the event recorded after these copies.
            unsafe { bridge.write_device(decoder, dst) }.map_err(|e| CudaError::Fill(e.to_string()))
        };
        // SAFETY: `fill` enqueues on `stream` (candle's stream, current context) one copy per
        // parameter into the slot it is given, each within the manifest's layout; the
        // parameters stay alive in `decoder` and candle orders any later write or free of
        // them on the same stream after the copies.
        unsafe {
            me.slots.publish_with(
                writer,
                Some(version),
                stream.cu_stream(),
                Duration::from_secs(60),
                fill,
            )
        }
        .map_err(|e| anyhow!("{e}"))
        .context("while publishing the weights to the device slots")?;
        // The copies are asynchronous: wait for them, so that the publication time measured
        // around this call is the copies' (the next step's kernels queue behind them anyway).
        stream
            .synchronize()
            .map_err(|e| anyhow!("waiting for the weight copies: {e}"))?;
        Ok(())
    }

    pub(super) fn open(
        device: &Device,
        bridge: &WeightBridge,
        handles: &IpcHandles,
    ) -> Result<ServerSlots> {
        bind(device)?;
        let view = DeviceSlotsView::open(bridge.manifest(), handles)
            .context("while opening the learner's device weight slots")?;
        Ok(ServerSlots {
            view,
            generation: handles.generation,
        })
    }

    pub(super) fn load(
        me: &ServerSlots,
        pinned: &Pinned<'_>,
        bridge: &WeightBridge,
        device: &Device,
    ) -> Result<Vec<(String, Tensor)>> {
        let stream = model::cuda_stream(device)?;
        bind(device)?;
        // SAFETY: candle's stream of `device`, in the current context; the copies that read the
        // slot complete inside `tensors_from_device` (it synchronises), before `pinned` drops.
        let src = unsafe { me.view.wait(pinned, stream.cu_stream()) }
            .context("while waiting for the published weights")?;
        // SAFETY: `src` is the pinned slot's mapped buffer of `total_size` bytes (the handles
        // were checked against this manifest), the stream waits for the copy that filled it,
        // and the pin keeps the learner from writing it until this returns.
        Ok(unsafe { bridge.tensors_from_device(src, device) }?)
    }

    fn bind(device: &Device) -> Result<()> {
        model::cuda_stream(device)?
            .context()
            .bind_to_thread()
            .map_err(|e| anyhow!("binding the CUDA context: {e}"))
    }
}

#[cfg(not(feature = "cuda"))]
mod imp {
    use super::*;
    use anyhow::bail;

    const NO_CUDA: &str = "the weights are in CUDA device slots, but this build has no CUDA \
                           support (build with `--features cuda`; both services must run on the \
                           same device)";

    pub(super) fn learner_slots(
        _device: &Device,
        _bridge: &WeightBridge,
        _slots: u32,
    ) -> Result<LearnerSlots> {
        bail!(NO_CUDA)
    }

    pub(super) fn publish(
        _me: &LearnerSlots,
        _writer: &mut Writer,
        _bridge: &WeightBridge,
        _decoder: &Decoder,
        _version: u64,
    ) -> Result<()> {
        bail!(NO_CUDA)
    }

    pub(super) fn open(
        _device: &Device,
        _bridge: &WeightBridge,
        _handles: &IpcHandles,
    ) -> Result<ServerSlots> {
        bail!(NO_CUDA)
    }

    pub(super) fn load(
        _me: &ServerSlots,
        _pinned: &Pinned<'_>,
        _bridge: &WeightBridge,
        _device: &Device,
    ) -> Result<Vec<(String, Tensor)>> {
        bail!(NO_CUDA)
    }
}
