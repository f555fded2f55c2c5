//! The CPU weight store: N ≥ 2 slots of parameter data plus a control word.
//!
//! Segment layout (`name.weights`): fixed header (magic stored last, version, slot count, data
//! size, slot stride, manifest hash) at 0; generation at 64; the control word
//! `(version << 8) | slot` at 128 (0 = nothing published); reader pin words at
//! `256 + 64 * i`; slot data from 4096, page aligned.
//!
//! Protocol (a hazard-pointer scheme, all pin/control accesses SeqCst):
//! - reader: `c = control`; `pin[i] = slot(c) + 1`; re-read control; if unchanged the pin holds,
//!   else retry. While pinned it reads the slot; unpinning is a Release store of 0.
//! - writer: picks a slot that is neither current nor pinned by a live reader, fills it, then
//!   stores the new control word. A reader whose pin came after the writer's check re-reads a
//!   control word that does not name that slot, so it never validates a slot being written.
//!
//! A reader's role is an OFD lock on byte `1 + i`; a pin whose lock is free belongs to a dead
//! reader and is ignored (reclaimed) by the writer and reset by the next holder of that entry.

use std::path::Path;
use std::time::{Duration, Instant};

use crate::error::{HeaderError, OpenError, PinError, PublishError, PublishSlotError};
use crate::manifest::{to_hex, DType, Manifest};
use crate::segment::{read_header, Backoff, Segment, SegmentError, SegmentHeader};
use crate::sync::{atomic_u64_at, AtomicU64, Ordering};

/// Magic of a weight-store segment ("NRFTWGHT").
pub const WEIGHTS_MAGIC: u64 = u64::from_le_bytes(*b"NRFTWGHT");
/// Layout version of the weight-store segment.
pub const WEIGHTS_LAYOUT_VERSION: u32 = 1;
/// Reader entries per store.
pub const MAX_READERS: usize = 16;
/// Most slots a store may have.
pub const MAX_SLOTS: u32 = 8;

const EXT: &str = "weights";
const OFF_GENERATION: usize = 64;
const OFF_CONTROL: usize = 128;
const OFF_PINS: usize = 256;
const DATA_OFFSET: usize = 4096;
const WRITER_LOCK_BYTE: u64 = 0;

/// The immutable prefix of the weight-store header.
#[derive(Debug, Clone, Copy)]
#[repr(C)]
struct WeightsHeaderFixed {
    magic: u64,
    layout_version: u32,
    slots: u32,
    data_size: u64,
    slot_stride: u64,
    manifest_hash: [u8; 32],
}
const FIXED_BYTES: usize = std::mem::size_of::<WeightsHeaderFixed>();
const _: () = assert!(FIXED_BYTES == 64);

// SAFETY: `#[repr(C)]` with integer (and integer-array) fields only.
unsafe impl SegmentHeader for WeightsHeaderFixed {
    fn magic_and_version(&self) -> (u64, u32) {
        (self.magic, self.layout_version)
    }
}

/// What a weight-store header declares.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WeightsHeader {
    /// Number of slots.
    pub slots: u32,
    /// Parameter bytes per slot.
    pub data_size: u64,
    /// Distance between slots.
    pub slot_stride: u64,
    /// Manifest hash.
    pub manifest_hash: [u8; 32],
}

fn stride_for(data_size: u64) -> Option<u64> {
    data_size.max(1).checked_add(4095).map(|v| v / 4096 * 4096)
}

/// Parses and checks a weight-store header from the start of a segment.
pub fn parse_weights_header(bytes: &[u8]) -> Result<WeightsHeader, HeaderError> {
    let h: WeightsHeaderFixed = read_header(bytes, WEIGHTS_MAGIC, WEIGHTS_LAYOUT_VERSION)?;
    if !(2..=MAX_SLOTS).contains(&h.slots) {
        return Err(HeaderError::Descriptor {
            field: "slots",
            expected: 2,
            found: h.slots.into(),
        });
    }
    let stride = stride_for(h.data_size).unwrap_or(0);
    if stride == 0 || stride != h.slot_stride {
        return Err(HeaderError::Descriptor {
            field: "slot_stride",
            expected: stride,
            found: h.slot_stride,
        });
    }
    Ok(WeightsHeader {
        slots: h.slots,
        data_size: h.data_size,
        slot_stride: h.slot_stride,
        manifest_hash: h.manifest_hash,
    })
}

fn segment_size(slots: u32, stride: u64) -> Option<usize> {
    let data = stride.checked_mul(u64::from(slots))?;
    let total = data.checked_add(DATA_OFFSET as u64)?;
    usize::try_from(total)
        .ok()
        .filter(|t| *t <= isize::MAX as usize)
}

/// Entry points: create (writer), resume (restarted writer), open (reader).
#[derive(Debug)]
pub struct WeightStore;

impl WeightStore {
    /// Creates `dir/name.weights` with `slots` slots for `manifest` and returns the writer.
    pub fn create(
        dir: &Path,
        name: &str,
        manifest: &Manifest,
        slots: u32,
    ) -> Result<Writer, OpenError> {
        if !(2..=MAX_SLOTS).contains(&slots) {
            return Err(OpenError::InvalidLayout(format!(
                "{slots} slots; need 2..={MAX_SLOTS}"
            )));
        }
        let data_size = manifest.total_size() as u64;
        let stride = stride_for(data_size)
            .ok_or_else(|| OpenError::InvalidLayout("data size overflows".into()))?;
        let size = segment_size(slots, stride)
            .ok_or_else(|| OpenError::InvalidLayout("segment size overflows".into()))?;
        let seg = Segment::create(dir, name, EXT, size as u64)?;
        Segment::take_role(&seg, WRITER_LOCK_BYTE, "writer")?;
        let fixed = WeightsHeaderFixed {
            magic: 0,
            layout_version: WEIGHTS_LAYOUT_VERSION,
            slots,
            data_size,
            slot_stride: stride,
            manifest_hash: manifest.hash(),
        };
        // SAFETY: the fresh mapping is ≥ DATA_OFFSET bytes; nobody uses it before the magic.
        unsafe { std::ptr::write(seg.ptr().cast::<WeightsHeaderFixed>(), fixed) };
        let store = Mapped {
            seg,
            manifest: manifest.clone(),
            slots,
            stride: stride as usize,
        };
        store.word(OFF_GENERATION).store(1, Ordering::Relaxed);
        // Release publishes the header; pairs with the Acquire load of the magic in open.
        store.word(0).store(WEIGHTS_MAGIC, Ordering::Release);
        Ok(Writer {
            store,
            generation: 1,
            next_candidate: 0,
        })
    }

    /// Re-attaches a restarted writer; the last complete version stays published.
    pub fn resume(dir: &Path, name: &str, manifest: &Manifest) -> Result<Writer, OpenError> {
        let store = Mapped::open(dir, name, manifest)?;
        Segment::take_role(&store.seg, WRITER_LOCK_BYTE, "writer")?;
        // AcqRel: role is exclusive now; readers read it only for reporting.
        let generation = store.word(OFF_GENERATION).fetch_add(1, Ordering::AcqRel) + 1;
        Ok(Writer {
            store,
            generation,
            next_candidate: 0,
        })
    }

    /// Opens an existing store as a reader (takes a free reader entry).
    pub fn open(dir: &Path, name: &str, manifest: &Manifest) -> Result<Reader, OpenError> {
        let store = Mapped::open(dir, name, manifest)?;
        for i in 0..MAX_READERS {
            match store.seg.try_lock_byte(1 + i as u64) {
                Ok(true) => {
                    // SeqCst: clears a dead predecessor's pin before we take part in the
                    // protocol; ordered with the writer's SeqCst pin loads.
                    store.pin_word(i).store(0, Ordering::SeqCst);
                    return Ok(Reader { store, index: i });
                }
                Ok(false) => continue,
                Err(source) => {
                    return Err(OpenError::Lock {
                        path: store.seg.path().to_owned(),
                        source,
                    })
                }
            }
        }
        Err(OpenError::RoleTaken {
            role: "reader (all entries)",
            path: store.seg.path().to_owned(),
        })
    }

    /// Removes the segment file.
    pub fn remove(dir: &Path, name: &str) -> std::io::Result<()> {
        std::fs::remove_file(dir.join(format!("{name}.{EXT}")))
    }
}

#[derive(Debug)]
struct Mapped {
    seg: Segment,
    manifest: Manifest,
    slots: u32,
    stride: usize,
}

impl Mapped {
    fn open(dir: &Path, name: &str, manifest: &Manifest) -> Result<Self, OpenError> {
        let seg = Segment::open(dir, name, EXT, None)?;
        let header_err = |source| OpenError::Header {
            path: seg.path().to_owned(),
            source,
        };
        let fixed: [u8; FIXED_BYTES] = seg.published_prefix(DATA_OFFSET).map_err(header_err)?;
        let h = parse_weights_header(&fixed).map_err(header_err)?;
        if h.manifest_hash != manifest.hash() {
            return Err(OpenError::ManifestMismatch {
                expected: manifest.hash_hex(),
                found: to_hex(&h.manifest_hash),
            });
        }
        if h.data_size != manifest.total_size() as u64 {
            return Err(header_err(HeaderError::Descriptor {
                field: "data_size",
                expected: manifest.total_size() as u64,
                found: h.data_size,
            }));
        }
        let size = segment_size(h.slots, h.slot_stride).unwrap_or(0);
        if seg.len() != size {
            return Err(SegmentError::WrongSize {
                path: seg.path().to_owned(),
                expected: size as u64,
                found: seg.len() as u64,
            }
            .into());
        }
        Ok(Self {
            seg,
            manifest: manifest.clone(),
            slots: h.slots,
            stride: h.slot_stride as usize,
        })
    }

    fn word(&self, offset: usize) -> &AtomicU64 {
        debug_assert!(offset % 8 == 0 && offset + 8 <= DATA_OFFSET);
        // SAFETY: fixed 8-aligned offsets inside the header page, accessed only atomically.
        unsafe { atomic_u64_at(self.seg.ptr().add(offset).cast()) }
    }

    fn control(&self) -> &AtomicU64 {
        self.word(OFF_CONTROL)
    }

    fn pin_word(&self, i: usize) -> &AtomicU64 {
        self.word(OFF_PINS + 64 * i)
    }

    fn slot_ptr(&self, slot: u32) -> *mut u8 {
        debug_assert!(slot < self.slots);
        // SAFETY: slot < slots, and the segment is DATA_OFFSET + slots * stride bytes.
        unsafe {
            self.seg
                .ptr()
                .add(DATA_OFFSET + slot as usize * self.stride)
        }
    }

    fn reader_alive(&self, i: usize) -> std::io::Result<bool> {
        self.seg.byte_locked_by_other(1 + i as u64)
    }
}

fn unpack(word: u64) -> (u64, u32) {
    (word >> 8, (word & 0xff) as u32)
}

/// The writer handle (the learner).
#[derive(Debug)]
pub struct Writer {
    store: Mapped,
    generation: u64,
    next_candidate: u32,
}

impl Writer {
    /// The layout.
    pub fn manifest(&self) -> &Manifest {
        &self.store.manifest
    }

    /// This writer's generation (1 for the creator, +1 per restart).
    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// Fails when the store's file was truncated while mapped (see [`crate::Truncated`]).
    pub fn check_intact(&self) -> Result<(), crate::Truncated> {
        self.store.seg.check_intact()
    }

    /// Slots of the store (device slots mirror them one for one).
    pub fn slots(&self) -> u32 {
        self.store.slots
    }

    /// The latest published version (0: none).
    pub fn version(&self) -> u64 {
        // SeqCst: see the module protocol (only this process stores the control word).
        unpack(self.store.control().load(Ordering::SeqCst)).0
    }

    /// Fills an inactive, unpinned slot with `fill` and publishes it as the next version.
    /// Waits up to `timeout` while every inactive slot is pinned by a live reader.
    pub fn publish(
        &mut self,
        timeout: Duration,
        fill: impl FnOnce(&mut [u8]),
    ) -> Result<u64, PublishError> {
        self.try_publish_slot(timeout, |_, bytes| {
            fill(bytes);
            Ok::<(), std::convert::Infallible>(())
        })
        .map_err(|e| match e {
            PublishSlotError::Publish(p) => p,
            PublishSlotError::Fill(never) => match never {},
        })
    }

    /// Like [`Self::publish`], but `fill` also gets the slot index (to fill device buffers that
    /// mirror the slots) and may fail, in which case nothing is published.
    pub fn try_publish_slot<E>(
        &mut self,
        timeout: Duration,
        fill: impl FnOnce(u32, &mut [u8]) -> Result<(), E>,
    ) -> Result<u64, PublishSlotError<E>> {
        self.publish_inner(None, timeout, fill)
    }

    /// Like [`Self::publish`], but publishes under the caller's `version` (≥ 1, < 2^56), which
    /// need not be the previous version + 1: the learner publishes its optimizer step, and a
    /// learner resumed from an older checkpoint republishes that older step. Readers that must
    /// notice such a rollback compare ([`Reader::writer_generation`], version) pairs.
    pub fn publish_version<E>(
        &mut self,
        version: u64,
        timeout: Duration,
        fill: impl FnOnce(&mut [u8]) -> Result<(), E>,
    ) -> Result<u64, PublishSlotError<E>> {
        if version == 0 || version >= 1 << 56 {
            return Err(PublishError::BadVersion(version).into());
        }
        self.publish_inner(Some(version), timeout, |_, bytes| fill(bytes))
    }

    /// Like [`Self::publish_version`], with the slot index given to `fill` as in
    /// [`Self::try_publish_slot`] (device slots publish the learner's optimizer step).
    pub fn try_publish_slot_version<E>(
        &mut self,
        version: u64,
        timeout: Duration,
        fill: impl FnOnce(u32, &mut [u8]) -> Result<(), E>,
    ) -> Result<u64, PublishSlotError<E>> {
        if version == 0 || version >= 1 << 56 {
            return Err(PublishError::BadVersion(version).into());
        }
        self.publish_inner(Some(version), timeout, fill)
    }

    fn publish_inner<E>(
        &mut self,
        explicit: Option<u64>,
        timeout: Duration,
        fill: impl FnOnce(u32, &mut [u8]) -> Result<(), E>,
    ) -> Result<u64, PublishSlotError<E>> {
        self.store.seg.check_intact().map_err(PublishError::from)?;
        // SeqCst: only this process stores the control word; see the module protocol.
        let (version, current) = unpack(self.store.control().load(Ordering::SeqCst));
        let start = Instant::now();
        let mut backoff = Backoff::new();
        let slot = loop {
            if let Some(s) = self.free_slot(version, current)? {
                break s;
            }
            if backoff.snooze() && start.elapsed() >= timeout {
                return Err(PublishError::AllSlotsPinned {
                    slots: self.store.slots - 1,
                    waited: start.elapsed(),
                }
                .into());
            }
        };
        let len = self.store.manifest.total_size();
        // SAFETY: `slot` is not the published slot and no live reader pins it; a reader that
        // pins it from now on fails validation (the control word does not name it), so this
        // process has exclusive access to its `len ≤ stride` bytes until the store below.
        let data = unsafe { std::slice::from_raw_parts_mut(self.store.slot_ptr(slot), len) };
        fill(slot, data).map_err(PublishSlotError::Fill)?;
        // A file truncated while we wrote: the bytes went nowhere a reader sees.
        self.store
            .seg
            .check_unfaulted()
            .map_err(PublishError::from)?;
        let next = explicit.unwrap_or(version + 1);
        // SeqCst (⊇ Release): publishes the slot's bytes to readers, pairing with their SeqCst
        // control loads in `Reader::pin`; SeqCst orders it before our next pin scan.
        self.store
            .control()
            .store((next << 8) | u64::from(slot), Ordering::SeqCst);
        self.next_candidate = (slot + 1) % self.store.slots;
        Ok(next)
    }

    fn free_slot(&self, version: u64, current: u32) -> Result<Option<u32>, PublishError> {
        let n = self.store.slots;
        for k in 0..n {
            let cand = (self.next_candidate + k) % n;
            if version > 0 && cand == current {
                continue;
            }
            let mut pinned = false;
            for i in 0..MAX_READERS {
                // SeqCst: pairs with the reader's SeqCst pin store and control re-load; an
                // unpin (Release store of 0) seen here orders that reader's reads before our
                // writes.
                if self.store.pin_word(i).load(Ordering::SeqCst) == u64::from(cand) + 1
                    && self.store.reader_alive(i)?
                {
                    pinned = true;
                    break;
                }
            }
            if !pinned {
                return Ok(Some(cand));
            }
        }
        Ok(None)
    }
}

/// A reader handle (the rollout server). One pin at a time.
#[derive(Debug)]
pub struct Reader {
    store: Mapped,
    index: usize,
}

impl Reader {
    /// The layout.
    pub fn manifest(&self) -> &Manifest {
        &self.store.manifest
    }

    /// Fails when the store's file was truncated while mapped (see [`crate::Truncated`]).
    pub fn check_intact(&self) -> Result<(), crate::Truncated> {
        self.store.seg.check_intact()
    }

    /// The latest published version (0: none).
    pub fn latest_version(&self) -> u64 {
        // Acquire: pairs with the writer's control store (value only used as a hint).
        unpack(self.store.control().load(Ordering::Acquire)).0
    }

    /// The writer's generation: 1 for the creator, +1 per writer restart.
    pub fn writer_generation(&self) -> u64 {
        // Acquire: pairs with the writer's AcqRel increment (the value is only compared).
        self.store.word(OFF_GENERATION).load(Ordering::Acquire)
    }

    /// Whether a writer process currently holds the store.
    pub fn writer_alive(&self) -> bool {
        self.store
            .seg
            .byte_locked_by_other(WRITER_LOCK_BYTE)
            .unwrap_or(true)
    }

    /// Pins the latest published version; the writer will not touch it until the guard drops.
    pub fn pin(&mut self) -> Result<Pinned<'_>, PinError> {
        self.store.seg.check_intact()?;
        loop {
            // SeqCst: pairs with the writer's SeqCst control store (acquires the slot's bytes).
            let word = self.store.control().load(Ordering::SeqCst);
            let (version, slot) = unpack(word);
            if version == 0 {
                return Err(PinError::NothingPublished);
            }
            if slot >= self.store.slots {
                return Err(PinError::BadSlot {
                    slot: slot.into(),
                    slots: self.store.slots,
                });
            }
            // SeqCst store then SeqCst load: the writer's SeqCst pin scan either sees this pin
            // or our re-load below sees its newer control word (store-load ordering).
            self.store
                .pin_word(self.index)
                .store(u64::from(slot) + 1, Ordering::SeqCst);
            if self.store.control().load(Ordering::SeqCst) == word {
                return Ok(Pinned {
                    reader: self,
                    slot,
                    version,
                });
            }
        }
    }
}

/// A pinned, immutable version of the weights.
#[derive(Debug)]
pub struct Pinned<'a> {
    reader: &'a Reader,
    slot: u32,
    version: u64,
}

impl Pinned<'_> {
    /// The version pinned.
    pub fn version(&self) -> u64 {
        self.version
    }

    /// Index of the pinned slot (selects the matching device buffer in a GPU store).
    pub fn slot(&self) -> u32 {
        self.slot
    }

    /// Fails when the store's file was truncated since the pin: then what was read from
    /// [`Self::bytes`] may be zeros, not the weights. Check after copying them out.
    pub fn check_intact(&self) -> Result<(), crate::Truncated> {
        self.reader.store.seg.check_intact()
    }

    /// All parameter bytes of the slot (check [`Self::check_intact`] after reading them).
    pub fn bytes(&self) -> &[u8] {
        let len = self.reader.store.manifest.total_size();
        // SAFETY: the slot is pinned and validated, so the writer does not write it while this
        // guard lives; `len ≤ stride` bytes lie inside the segment.
        unsafe { std::slice::from_raw_parts(self.reader.store.slot_ptr(self.slot), len) }
    }

    /// The bytes of tensor `name`.
    pub fn tensor(&self, name: &str) -> Option<&[u8]> {
        let t = self.reader.store.manifest.get(name)?;
        self.bytes().get(t.offset..t.offset + t.size)
    }

    /// Tensor `name` as f32 (None if absent or not F32).
    pub fn tensor_f32(&self, name: &str) -> Option<&[f32]> {
        let t = self.reader.store.manifest.get(name)?;
        if t.dtype != DType::F32 {
            return None;
        }
        let b = self.tensor(name)?;
        // SAFETY: slots are page aligned and offsets 64-aligned, so `b` is 4-aligned; its
        // length is elems * 4; any bit pattern is a valid f32.
        Some(unsafe { std::slice::from_raw_parts(b.as_ptr().cast::<f32>(), b.len() / 4) })
    }
}

impl Drop for Pinned<'_> {
    fn drop(&mut self) {
        // Release: our reads of the slot happen before a writer that observes the cleared pin
        // (its SeqCst pin scan) reuses the slot.
        self.reader
            .store
            .pin_word(self.reader.index)
            .store(0, Ordering::Release);
    }
}
