//! The rollout record: one sampled completion with everything the learner needs.
//!
//! Wire layout inside a ring slot (native little-endian, every offset a multiple of 4):
//! a [`RecordHeader`] (`#[repr(C)]`, 128 bytes), then `prompt` as u32 token ids, `completion` as
//! u32 token ids, `logprobs` as f32 (one per completion token), `plan` as u16 entries (a layer
//! index in the low 14 bits, [`PLAN_SKIP_ATTN`] / [`PLAN_SKIP_MLP`] when one of the layer's two
//! blocks was skipped) padded to 4 bytes. Decoding trusts no length: every count is checked against the
//! [`Limits`] and the total against the payload size, with checked arithmetic.

use crate::crc::{copy_with_crc, crc32c_append};
use crate::error::RecordError;

/// Reward components carried per record (plus a total).
pub const MAX_REWARD_COMPONENTS: usize = 4;

/// Plan entry bits that hold the layer index (so at most 16384 layers).
pub const PLAN_LAYER_MASK: u16 = 0x3FFF;
/// Plan entry flag: the layer ran without its attention block.
pub const PLAN_SKIP_ATTN: u16 = 0x8000;
/// Plan entry flag: the layer ran without its MLP block.
pub const PLAN_SKIP_MLP: u16 = 0x4000;

/// A plan entry with both block flags set names a layer that did not run at all: such a layer
/// is left out of the plan instead, so that every plan has one encoding.
fn check_plan(plan: &[u16]) -> Result<(), RecordError> {
    match plan
        .iter()
        .find(|&&e| e & (PLAN_SKIP_ATTN | PLAN_SKIP_MLP) == PLAN_SKIP_ATTN | PLAN_SKIP_MLP)
    {
        Some(&e) => Err(RecordError::BadPlanEntry(e)),
        None => Ok(()),
    }
}

/// Why generation stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u32)]
#[non_exhaustive]
pub enum FinishReason {
    /// The end-of-sequence / end-of-turn token was sampled.
    Eos = 1,
    /// The completion hit its token limit.
    Length = 2,
    /// A stop string matched.
    Stop = 3,
    /// Generation was cancelled.
    Aborted = 4,
}

impl FinishReason {
    fn from_u32(v: u32) -> Option<Self> {
        Some(match v {
            1 => Self::Eos,
            2 => Self::Length,
            3 => Self::Stop,
            4 => Self::Aborted,
            _ => return None,
        })
    }
}

/// Sampling parameters the completion was drawn with.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Sampling {
    /// Softmax temperature.
    pub temperature: f32,
    /// Nucleus mass; 1.0 disables truncation.
    pub top_p: f32,
    /// Top-k cut-off; 0 disables it.
    pub top_k: u32,
    /// Seed of the sampler's RNG stream.
    pub seed: u64,
}

/// Reward of one completion.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Rewards {
    /// Individual components; only the first `n_components` are meaningful.
    pub components: [f32; MAX_REWARD_COMPONENTS],
    /// How many of `components` are in use (≤ [`MAX_REWARD_COMPONENTS`]).
    pub n_components: u8,
    /// The scalar reward used for advantages.
    pub total: f32,
    /// The reward function failed (timeout, crash); `total` is then a fallback.
    pub failed: bool,
}

/// Wall-clock costs of producing the record.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Timings {
    /// Nanoseconds spent generating (the whole group's share for this record).
    pub generation_ns: u64,
    /// Nanoseconds spent scoring.
    pub reward_ns: u64,
}

/// Declared maxima of a ring: every decoded count is checked against them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Maximum prompt tokens per record.
    pub max_prompt_tokens: u32,
    /// Maximum completion tokens per record.
    pub max_completion_tokens: u32,
    /// Maximum entries in the layer plan.
    pub max_plan_layers: u32,
}

impl Limits {
    /// The largest encoded record these limits allow, or `None` on overflow.
    pub fn max_record_bytes(&self) -> Option<usize> {
        encoded_len(
            self.max_prompt_tokens as usize,
            self.max_completion_tokens as usize,
            self.max_plan_layers as usize,
        )
    }
}

/// A record borrowed from the caller's buffers, written into a slot without extra copies.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RecordView<'a> {
    /// Dataset id of the prompt.
    pub prompt_id: u64,
    /// GRPO group (all G completions of one prompt share it).
    pub group_id: u64,
    /// Batch the group was generated in.
    pub batch_id: u64,
    /// Weight version the completion was sampled with.
    pub policy_version: u64,
    /// Completions in this record's group (G).
    pub group_size: u32,
    /// This completion's index in its group, `< group_size`.
    pub group_index: u32,
    /// Groups in this record's batch (the learner knows from it when a batch is complete).
    pub batch_groups: u32,
    /// Prompt token ids.
    pub prompt: &'a [u32],
    /// Completion token ids.
    pub completion: &'a [u32],
    /// Behavior log-prob log μ(y_t) per completion token.
    pub logprobs: &'a [f32],
    /// Decoder layers that ran (the nested plan), in order.
    pub plan: &'a [u16],
    /// Sampling parameters.
    pub sampling: Sampling,
    /// Reward.
    pub rewards: Rewards,
    /// Why generation stopped.
    pub finish: FinishReason,
    /// Costs.
    pub timings: Timings,
}

/// An owned record, as the learner keeps it.
#[derive(Debug, Clone, PartialEq)]
pub struct RolloutRecord {
    /// Dataset id of the prompt.
    pub prompt_id: u64,
    /// GRPO group.
    pub group_id: u64,
    /// Batch the group was generated in.
    pub batch_id: u64,
    /// Weight version the completion was sampled with.
    pub policy_version: u64,
    /// Completions in this record's group (G).
    pub group_size: u32,
    /// This completion's index in its group, `< group_size`.
    pub group_index: u32,
    /// Groups in this record's batch.
    pub batch_groups: u32,
    /// Prompt token ids.
    pub prompt: Vec<u32>,
    /// Completion token ids.
    pub completion: Vec<u32>,
    /// Behavior log-prob per completion token.
    pub logprobs: Vec<f32>,
    /// Decoder layers that ran.
    pub plan: Vec<u16>,
    /// Sampling parameters.
    pub sampling: Sampling,
    /// Reward.
    pub rewards: Rewards,
    /// Why generation stopped.
    pub finish: FinishReason,
    /// Costs.
    pub timings: Timings,
}

impl RolloutRecord {
    /// Borrows the record for writing.
    pub fn as_view(&self) -> RecordView<'_> {
        RecordView {
            prompt_id: self.prompt_id,
            group_id: self.group_id,
            batch_id: self.batch_id,
            policy_version: self.policy_version,
            group_size: self.group_size,
            group_index: self.group_index,
            batch_groups: self.batch_groups,
            prompt: &self.prompt,
            completion: &self.completion,
            logprobs: &self.logprobs,
            plan: &self.plan,
            sampling: self.sampling,
            rewards: self.rewards,
            finish: self.finish,
            timings: self.timings,
        }
    }
}

impl RecordView<'_> {
    /// Copies into an owned record.
    pub fn to_owned_record(&self) -> RolloutRecord {
        RolloutRecord {
            prompt_id: self.prompt_id,
            group_id: self.group_id,
            batch_id: self.batch_id,
            policy_version: self.policy_version,
            group_size: self.group_size,
            group_index: self.group_index,
            batch_groups: self.batch_groups,
            prompt: self.prompt.to_vec(),
            completion: self.completion.to_vec(),
            logprobs: self.logprobs.to_vec(),
            plan: self.plan.to_vec(),
            sampling: self.sampling,
            rewards: self.rewards,
            finish: self.finish,
            timings: self.timings,
        }
    }

    /// Checks the view against `limits`; returns the encoded size.
    pub fn validate(&self, limits: &Limits) -> Result<usize, RecordError> {
        check_count("prompt", self.prompt.len(), limits.max_prompt_tokens)?;
        check_count(
            "completion",
            self.completion.len(),
            limits.max_completion_tokens,
        )?;
        check_count("plan", self.plan.len(), limits.max_plan_layers)?;
        check_plan(self.plan)?;
        check_group(self.group_size, self.group_index, self.batch_groups)?;
        if self.logprobs.len() != self.completion.len() {
            return Err(RecordError::LogprobCount {
                logprobs: self.logprobs.len(),
                completion: self.completion.len(),
            });
        }
        if usize::from(self.rewards.n_components) > MAX_REWARD_COMPONENTS {
            return Err(RecordError::TooMany {
                field: "reward components",
                count: usize::from(self.rewards.n_components),
                max: MAX_REWARD_COMPONENTS as u32,
            });
        }
        encoded_len(self.prompt.len(), self.completion.len(), self.plan.len())
            .ok_or(RecordError::Overflow)
    }
}

fn check_group(size: u32, index: u32, batch_groups: u32) -> Result<(), RecordError> {
    if size == 0 || index >= size || batch_groups == 0 {
        Err(RecordError::BadGroup {
            size,
            index,
            batch_groups,
        })
    } else {
        Ok(())
    }
}

fn check_count(field: &'static str, count: usize, max: u32) -> Result<(), RecordError> {
    if count > max as usize {
        Err(RecordError::TooMany { field, count, max })
    } else {
        Ok(())
    }
}

/// The fixed part of an encoded record.
#[derive(Debug, Clone, Copy, Default)]
#[repr(C)]
pub(crate) struct RecordHeader {
    prompt_id: u64,
    group_id: u64,
    batch_id: u64,
    policy_version: u64,
    seed: u64,
    generation_ns: u64,
    reward_ns: u64,
    temperature: f32,
    top_p: f32,
    top_k: u32,
    finish: u32,
    failed: u32,
    n_reward_components: u32,
    rewards: [f32; MAX_REWARD_COMPONENTS],
    reward_total: f32,
    n_prompt: u32,
    n_completion: u32,
    n_plan: u32,
    group_size: u32,
    group_index: u32,
    batch_groups: u32,
    /// Always 0 (keeps the header a multiple of 8 bytes; one encoding per record).
    reserved: u32,
}

pub(crate) const RECORD_HEADER_BYTES: usize = std::mem::size_of::<RecordHeader>();
const _: () = assert!(RECORD_HEADER_BYTES == 128);

/// Encoded size of a record with these counts, or `None` on overflow.
pub(crate) fn encoded_len(n_prompt: usize, n_completion: usize, n_plan: usize) -> Option<usize> {
    let tokens = n_prompt
        .checked_add(n_completion.checked_mul(2)?)?
        .checked_mul(4)?;
    let plan = n_plan.checked_mul(2)?.checked_add(3)? / 4 * 4;
    RECORD_HEADER_BYTES.checked_add(tokens)?.checked_add(plan)
}

/// Byte ranges of the arrays inside an encoded record.
struct Layout {
    prompt: usize,
    completion: usize,
    logprobs: usize,
    plan: usize,
}

fn layout(h: &RecordHeader) -> Layout {
    let prompt = RECORD_HEADER_BYTES;
    let completion = prompt + 4 * h.n_prompt as usize;
    let logprobs = completion + 4 * h.n_completion as usize;
    let plan = logprobs + 4 * h.n_completion as usize;
    Layout {
        prompt,
        completion,
        logprobs,
        plan,
    }
}

impl RecordView<'_> {
    fn header(&self) -> RecordHeader {
        RecordHeader {
            prompt_id: self.prompt_id,
            group_id: self.group_id,
            batch_id: self.batch_id,
            policy_version: self.policy_version,
            seed: self.sampling.seed,
            generation_ns: self.timings.generation_ns,
            reward_ns: self.timings.reward_ns,
            temperature: self.sampling.temperature,
            top_p: self.sampling.top_p,
            top_k: self.sampling.top_k,
            finish: self.finish as u32,
            failed: u32::from(self.rewards.failed),
            n_reward_components: u32::from(self.rewards.n_components),
            rewards: self.rewards.components,
            reward_total: self.rewards.total,
            n_prompt: self.prompt.len() as u32,
            n_completion: self.completion.len() as u32,
            n_plan: self.plan.len() as u32,
            group_size: self.group_size,
            group_index: self.group_index,
            batch_groups: self.batch_groups,
            reserved: 0,
        }
    }

    /// Writes the encoded record to `dst` and returns the CRC32C of the bytes written.
    ///
    /// # Safety
    /// `dst` must be valid for writes of `len` bytes, where `len` is the value `validate`
    /// returned for this view, and no other thread or process may access those bytes meanwhile.
    pub(crate) unsafe fn write_to(&self, dst: *mut u8, len: usize, crc_seed: u32) -> u32 {
        let header = self.header();
        let l = layout(&header);
        let hbytes = as_bytes(&header);
        let parts: [&[u8]; 4] = [
            slice_bytes(self.prompt),
            slice_bytes(self.completion),
            slice_bytes(self.logprobs),
            slice_bytes(self.plan),
        ];
        let offsets = [l.prompt, l.completion, l.logprobs, l.plan];
        // SAFETY: (all copies) the caller guarantees `dst..dst+len` is writable and exclusive;
        // `layout` places every part inside `len` because `len == encoded_len(counts)`.
        unsafe { std::ptr::copy_nonoverlapping(hbytes.as_ptr(), dst, hbytes.len()) };
        let mut crc = crc32c_append(crc_seed, hbytes);
        for (part, off) in parts.iter().zip(offsets) {
            // SAFETY: see above.
            crc = unsafe { copy_with_crc(part.as_ptr(), dst.add(off), part.len(), crc) };
        }
        let pad = len - (l.plan + parts[3].len());
        if pad > 0 {
            let zeros = [0u8; 4];
            // SAFETY: the padding lies inside `len` (encoded_len rounds the plan up to 4).
            unsafe { std::ptr::write_bytes(dst.add(l.plan + parts[3].len()), 0, pad) };
            crc = crc32c_append(crc, &zeros[..pad]);
        }
        crc
    }
}

fn as_bytes(h: &RecordHeader) -> &[u8] {
    // SAFETY: RecordHeader is repr(C), Copy, made only of 4- and 8-byte scalars laid out
    // without padding (asserted by the size check above), so all its bytes are initialised.
    unsafe {
        std::slice::from_raw_parts((h as *const RecordHeader).cast::<u8>(), RECORD_HEADER_BYTES)
    }
}

fn slice_bytes<T: Copy>(s: &[T]) -> &[u8] {
    // SAFETY: only instantiated with u16, u32 and f32: padding-free plain data.
    unsafe { std::slice::from_raw_parts(s.as_ptr().cast::<u8>(), std::mem::size_of_val(s)) }
}

/// A record decoded in place: from the consumer's private copy of a slot, or, for the
/// in-place pops, from the verified slot itself (which stays reserved while this lives).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RecordRef<'a> {
    view: RecordView<'a>,
}

impl<'a> RecordRef<'a> {
    /// The borrowed fields.
    pub fn view(&self) -> &RecordView<'a> {
        &self.view
    }

    /// Copies into an owned record.
    pub fn to_owned_record(&self) -> RolloutRecord {
        self.view.to_owned_record()
    }
}

/// Decodes a record from `bytes`, which must be 4-byte aligned and must not change while the
/// result lives (a private copy, or a slot the consumer holds). Every count is checked against `limits` and the total against `bytes.len()`.
pub fn decode_record<'a>(bytes: &'a [u8], limits: &Limits) -> Result<RecordRef<'a>, RecordError> {
    if bytes.len() < RECORD_HEADER_BYTES {
        return Err(RecordError::Truncated {
            needed: RECORD_HEADER_BYTES,
            found: bytes.len(),
        });
    }
    if bytes.as_ptr() as usize % 4 != 0 {
        return Err(RecordError::Misaligned);
    }
    // SAFETY: at least RECORD_HEADER_BYTES bytes are readable; read_unaligned has no alignment
    // requirement; every bit pattern is a valid RecordHeader (plain integers and floats).
    let h: RecordHeader = unsafe { std::ptr::read_unaligned(bytes.as_ptr().cast()) };
    check_count("prompt", h.n_prompt as usize, limits.max_prompt_tokens)?;
    check_count(
        "completion",
        h.n_completion as usize,
        limits.max_completion_tokens,
    )?;
    check_count("plan", h.n_plan as usize, limits.max_plan_layers)?;
    if h.n_reward_components as usize > MAX_REWARD_COMPONENTS {
        return Err(RecordError::TooMany {
            field: "reward components",
            count: h.n_reward_components as usize,
            max: MAX_REWARD_COMPONENTS as u32,
        });
    }
    let finish = FinishReason::from_u32(h.finish).ok_or(RecordError::BadFinishReason(h.finish))?;
    check_group(h.group_size, h.group_index, h.batch_groups)?;
    if h.reserved != 0 {
        return Err(RecordError::NonZeroReserved(h.reserved));
    }
    let failed = match h.failed {
        0 => false,
        1 => true,
        other => return Err(RecordError::BadFlag(other)),
    };
    let len = encoded_len(
        h.n_prompt as usize,
        h.n_completion as usize,
        h.n_plan as usize,
    )
    .ok_or(RecordError::Overflow)?;
    if len != bytes.len() {
        return Err(RecordError::LengthMismatch {
            declared: len,
            found: bytes.len(),
        });
    }
    let l = layout(&h);
    // The plan's padding must be zero, so that every accepted record has one encoding.
    let pad_start = l.plan + 2 * h.n_plan as usize;
    if bytes[pad_start..].iter().any(|&b| b != 0) {
        return Err(RecordError::NonZeroPadding);
    }
    // SAFETY: (all four) `len == bytes.len()` proves every array lies inside `bytes`; the base
    // is 4-byte aligned and every offset is a multiple of 4, so the u32/f32/u16 views are
    // aligned; any bit pattern is a valid u32, f32 or u16; the borrow ties them to `bytes`.
    let view = unsafe {
        RecordView {
            prompt_id: h.prompt_id,
            group_id: h.group_id,
            batch_id: h.batch_id,
            policy_version: h.policy_version,
            group_size: h.group_size,
            group_index: h.group_index,
            batch_groups: h.batch_groups,
            prompt: std::slice::from_raw_parts(
                bytes.as_ptr().add(l.prompt).cast(),
                h.n_prompt as usize,
            ),
            completion: std::slice::from_raw_parts(
                bytes.as_ptr().add(l.completion).cast(),
                h.n_completion as usize,
            ),
            logprobs: std::slice::from_raw_parts(
                bytes.as_ptr().add(l.logprobs).cast(),
                h.n_completion as usize,
            ),
            plan: std::slice::from_raw_parts(bytes.as_ptr().add(l.plan).cast(), h.n_plan as usize),
            sampling: Sampling {
                temperature: h.temperature,
                top_p: h.top_p,
                top_k: h.top_k,
                seed: h.seed,
            },
            rewards: Rewards {
                components: h.rewards,
                n_components: h.n_reward_components as u8,
                total: h.reward_total,
                failed,
            },
            finish,
            timings: Timings {
                generation_ns: h.generation_ns,
                reward_ns: h.reward_ns,
            },
        }
    };
    check_plan(view.plan)?;
    Ok(RecordRef { view })
}

/// Encodes a view into a fresh, 4-byte aligned buffer (tests, fuzz corpus, tools).
pub fn encode_record(view: &RecordView<'_>, limits: &Limits) -> Result<Vec<u8>, RecordError> {
    let len = view.validate(limits)?;
    let mut out = vec![0u8; len];
    // SAFETY: `out` holds exactly `len` writable bytes and is exclusively ours.
    unsafe { view.write_to(out.as_mut_ptr(), len, 0) };
    Ok(out)
}
