//! Host-side checks of the CUDA weight store that run without a GPU: received handles are
//! validated against the local manifest before any driver call.
#![cfg(feature = "cuda")]

use protocol::cuda::{CudaError, DeviceSlotsView, IpcHandles};
use protocol::{DType, Manifest};

fn manifest() -> Manifest {
    Manifest::new([("w", vec![4, 4], DType::F32)]).expect("manifest")
}

fn handles(m: &Manifest) -> IpcHandles {
    IpcHandles {
        memory: vec![vec![0; 64]; 2],
        events: vec![vec![0; 64]; 2],
        bytes: m.total_size() as u64,
        manifest_hash: m.hash_hex(),
        generation: 1,
    }
}

#[test]
fn handles_for_another_manifest_are_refused() {
    let m = manifest();
    let other = Manifest::new([("w", vec![4, 5], DType::F32)]).expect("manifest");
    match DeviceSlotsView::open(&m, &handles(&other)) {
        Err(CudaError::Handles(msg)) => assert!(msg.contains(&m.hash_hex()), "{msg}"),
        other => panic!("expected a handles error, got {other:?}"),
    }
}

#[test]
fn inconsistent_handle_lists_are_refused() {
    let m = manifest();
    let mut h = handles(&m);
    h.events.pop();
    assert!(matches!(
        DeviceSlotsView::open(&m, &h),
        Err(CudaError::Handles(_))
    ));
    let mut h = handles(&m);
    h.bytes += 1;
    assert!(matches!(
        DeviceSlotsView::open(&m, &h),
        Err(CudaError::Handles(_))
    ));
}

#[test]
fn short_handles_are_refused_before_any_driver_call() {
    let m = manifest();
    let mut h = handles(&m);
    h.memory[1] = vec![0; 63];
    match DeviceSlotsView::open(&m, &h) {
        Err(CudaError::Handles(msg)) => assert!(msg.contains("63 bytes"), "{msg}"),
        other => panic!("expected a handles error, got {other:?}"),
    }
}

#[test]
fn device_slots_need_a_driver_or_export_64_byte_handles() {
    let m = manifest();
    if protocol::cuda::driver_available() {
        // With a driver (and a current context set up by the caller's environment), the
        // allocation either succeeds and exports one 64-byte handle pair per slot, or fails
        // with a driver error (e.g. no context) — never a panic.
        match protocol::cuda::DeviceSlots::new(&m, 2) {
            Ok(slots) => {
                let h = slots.export().expect("export");
                assert_eq!((h.memory.len(), h.events.len()), (2, 2));
                assert!(h.memory.iter().chain(&h.events).all(|x| x.len() == 64));
            }
            Err(e) => assert!(matches!(e, CudaError::Driver { .. }), "{e:?}"),
        }
    } else {
        // A driver without a device (or one that fails to initialise): a clear error.
        for r in [
            protocol::cuda::DeviceSlots::new(&m, 2).map(|_| ()),
            DeviceSlotsView::open(&m, &handles(&m)).map(|_| ()),
        ] {
            assert!(
                matches!(r, Err(CudaError::NoDevice | CudaError::Driver { .. })),
                "{r:?}"
            );
        }
    }
}
