//! The rollout record: one sampled completion with everything the learner needs.
//!
//! Wire layout inside a ring slot (native little-endian, every offset a multiple of 4):
//! a [`RecordHeader`] (`#[repr(C)]`, 120 bytes), then `prompt` as u32 token ids, `completion` as
//! u32 token ids, `logprobs` as f32 (one per completion token), `plan` as u16 entries (a layer
//! index in the low 14 bits, [`PLAN_SKIP_ATTN`] / [`PLAN_SKIP_MLP`] when one of the layer's two
//! blocks was skipped), then the UTF-8 text of the stop string ([`FinishReason::Stop`]) and of
//! the reward's failure message, the whole tail zero-padded to 4 bytes. Decoding trusts no
//! length: every count is checked against the [`Limits`] (the texts against
//! [`MAX_STOP_BYTES`] and [`MAX_REWARD_MESSAGE_BYTES`]) and the total against the payload
//! size, with checked arithmetic.

use crate::crc::{copy_with_crc, crc32c_append};
use crate::error::RecordError;
use crate::sampling::SamplingParams;
use serde::{Deserialize, Serialize};

/// Longest stop string a record carries, in bytes.
pub const MAX_STOP_BYTES: usize = 256;
/// Longest reward failure message a record carries, in bytes ([`RewardOutcome::failed`]
/// shortens longer ones).
pub const MAX_REWARD_MESSAGE_BYTES: usize = 1024;

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

/// Why a completion ended.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FinishReason {
    /// An end-of-sequence / end-of-turn token was sampled (it is the last token).
    Eos,
    /// The completion hit its token limit.
    Length,
    /// The decoded text came to contain this stop string.
    Stop(String),
}

impl FinishReason {
    fn code(&self) -> u32 {
        match self {
            Self::Eos => 1,
            Self::Length => 2,
            Self::Stop(_) => 3,
        }
    }

    fn stop_text(&self) -> &str {
        match self {
            Self::Stop(s) => s,
            Self::Eos | Self::Length => "",
        }
    }
}

/// The reward of one completion: a value, or the reason the reward could not be computed.
///
/// A failed reward is never a silent 0: the record carries the failure and its message, and
/// the learner leaves the whole group out of the update (see `learner::prepare_batch`).
///
/// ```
/// use protocol::RewardOutcome;
///
/// assert!(!RewardOutcome::scored(1.0).is_failed());
/// let failed = RewardOutcome::failed("the reward module timed out");
/// assert_eq!(failed.failure.as_deref(), Some("the reward module timed out"));
/// ```
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct RewardOutcome {
    /// The scalar reward used for advantages; 0 when the reward failed (never trained on).
    pub value: f32,
    /// Why the reward failed (timeout, crash, bad sample); `None` when it was computed.
    pub failure: Option<String>,
}

impl RewardOutcome {
    /// A computed reward.
    pub fn scored(value: f32) -> Self {
        Self {
            value,
            failure: None,
        }
    }

    /// A failed reward with its message, shortened at a character boundary to
    /// [`MAX_REWARD_MESSAGE_BYTES`].
    pub fn failed(message: impl Into<String>) -> Self {
        let mut message = message.into();
        if message.len() > MAX_REWARD_MESSAGE_BYTES {
            let mut end = MAX_REWARD_MESSAGE_BYTES;
            while !message.is_char_boundary(end) {
                end -= 1;
            }
            message.truncate(end);
        }
        Self {
            value: 0.0,
            failure: Some(message),
        }
    }

    /// Whether the reward could not be computed.
    pub fn is_failed(&self) -> bool {
        self.failure.is_some()
    }

    fn message_text(&self) -> &str {
        self.failure.as_deref().unwrap_or("")
    }
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
            MAX_STOP_BYTES + MAX_REWARD_MESSAGE_BYTES,
        )
    }
}

/// A record borrowed from the caller's buffers, written into a slot without extra copies.
#[derive(Debug, Clone, PartialEq)]
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
    /// Sampling parameters the completion was drawn with.
    pub sampling: SamplingParams,
    /// Seed of the sampler's RNG stream.
    pub seed: u64,
    /// Reward.
    pub reward: RewardOutcome,
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
    /// Sampling parameters the completion was drawn with.
    pub sampling: SamplingParams,
    /// Seed of the sampler's RNG stream.
    pub seed: u64,
    /// Reward.
    pub reward: RewardOutcome,
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
            seed: self.seed,
            reward: self.reward.clone(),
            finish: self.finish.clone(),
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
            seed: self.seed,
            reward: self.reward.clone(),
            finish: self.finish.clone(),
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
        let stop = self.finish.stop_text().len();
        check_count("stop string bytes", stop, MAX_STOP_BYTES as u32)?;
        let message = self.reward.message_text().len();
        check_count(
            "reward message bytes",
            message,
            MAX_REWARD_MESSAGE_BYTES as u32,
        )?;
        encoded_len(
            self.prompt.len(),
            self.completion.len(),
            self.plan.len(),
            stop + message,
        )
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
    reward_failed: u32,
    reward: f32,
    n_prompt: u32,
    n_completion: u32,
    n_plan: u32,
    /// Bytes of the stop string (0 unless `finish` is Stop).
    n_stop: u32,
    /// Bytes of the reward failure message (0 unless `reward_failed` is 1).
    n_message: u32,
    group_size: u32,
    group_index: u32,
    batch_groups: u32,
    /// Always 0 (keeps the header a multiple of 8 bytes; one encoding per record).
    reserved: [u32; 2],
}

pub(crate) const RECORD_HEADER_BYTES: usize = std::mem::size_of::<RecordHeader>();
const _: () = assert!(RECORD_HEADER_BYTES == 120);

/// Encoded size of a record with these counts (`n_text`: stop string plus reward message
/// bytes), or `None` on overflow.
pub(crate) fn encoded_len(
    n_prompt: usize,
    n_completion: usize,
    n_plan: usize,
    n_text: usize,
) -> Option<usize> {
    let tokens = n_prompt
        .checked_add(n_completion.checked_mul(2)?)?
        .checked_mul(4)?;
    let tail = n_plan.checked_mul(2)?.checked_add(n_text)?.checked_add(3)? / 4 * 4;
    RECORD_HEADER_BYTES.checked_add(tokens)?.checked_add(tail)
}

/// Byte ranges of the arrays inside an encoded record.
struct Layout {
    prompt: usize,
    completion: usize,
    logprobs: usize,
    plan: usize,
    stop: usize,
    message: usize,
    end: usize,
}

fn layout(h: &RecordHeader) -> Layout {
    let prompt = RECORD_HEADER_BYTES;
    let completion = prompt + 4 * h.n_prompt as usize;
    let logprobs = completion + 4 * h.n_completion as usize;
    let plan = logprobs + 4 * h.n_completion as usize;
    let stop = plan + 2 * h.n_plan as usize;
    let message = stop + h.n_stop as usize;
    Layout {
        prompt,
        completion,
        logprobs,
        plan,
        stop,
        message,
        end: message + h.n_message as usize,
    }
}

impl RecordView<'_> {
    fn header(&self) -> RecordHeader {
        RecordHeader {
            prompt_id: self.prompt_id,
            group_id: self.group_id,
            batch_id: self.batch_id,
            policy_version: self.policy_version,
            seed: self.seed,
            generation_ns: self.timings.generation_ns,
            reward_ns: self.timings.reward_ns,
            temperature: self.sampling.temperature,
            top_p: self.sampling.top_p,
            top_k: self.sampling.top_k,
            finish: self.finish.code(),
            reward_failed: u32::from(self.reward.is_failed()),
            reward: self.reward.value,
            n_prompt: self.prompt.len() as u32,
            n_completion: self.completion.len() as u32,
            n_plan: self.plan.len() as u32,
            n_stop: self.finish.stop_text().len() as u32,
            n_message: self.reward.message_text().len() as u32,
            group_size: self.group_size,
            group_index: self.group_index,
            batch_groups: self.batch_groups,
            reserved: [0; 2],
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
        let parts: [&[u8]; 6] = [
            slice_bytes(self.prompt),
            slice_bytes(self.completion),
            slice_bytes(self.logprobs),
            slice_bytes(self.plan),
            self.finish.stop_text().as_bytes(),
            self.reward.message_text().as_bytes(),
        ];
        let offsets = [
            l.prompt,
            l.completion,
            l.logprobs,
            l.plan,
            l.stop,
            l.message,
        ];
        // SAFETY: (all copies) the caller guarantees `dst..dst+len` is writable and exclusive;
        // `layout` places every part inside `len` because `len == encoded_len(counts)`.
        unsafe { std::ptr::copy_nonoverlapping(hbytes.as_ptr(), dst, hbytes.len()) };
        let mut crc = crc32c_append(crc_seed, hbytes);
        for (part, off) in parts.iter().zip(offsets) {
            // SAFETY: see above.
            crc = unsafe { copy_with_crc(part.as_ptr(), dst.add(off), part.len(), crc) };
        }
        let pad = len - l.end;
        if pad > 0 {
            let zeros = [0u8; 4];
            // SAFETY: the padding lies inside `len` (encoded_len rounds the tail up to 4).
            unsafe { std::ptr::write_bytes(dst.add(l.end), 0, pad) };
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
/// Only the two short texts (a stop string, a reward failure message) are copied out.
#[derive(Debug, Clone, PartialEq)]
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
    check_count(
        "stop string bytes",
        h.n_stop as usize,
        MAX_STOP_BYTES as u32,
    )?;
    check_count(
        "reward message bytes",
        h.n_message as usize,
        MAX_REWARD_MESSAGE_BYTES as u32,
    )?;
    if !matches!(h.finish, 1..=3) {
        return Err(RecordError::BadFinishReason(h.finish));
    }
    if h.finish != 3 && h.n_stop != 0 {
        return Err(RecordError::StrayText(
            "a stop string without a Stop finish",
        ));
    }
    check_group(h.group_size, h.group_index, h.batch_groups)?;
    if let Some(&r) = h.reserved.iter().find(|&&r| r != 0) {
        return Err(RecordError::NonZeroReserved(r));
    }
    let failed = match h.reward_failed {
        0 => false,
        1 => true,
        other => return Err(RecordError::BadFlag(other)),
    };
    if !failed && h.n_message != 0 {
        return Err(RecordError::StrayText(
            "a reward failure message on a computed reward",
        ));
    }
    let len = encoded_len(
        h.n_prompt as usize,
        h.n_completion as usize,
        h.n_plan as usize,
        h.n_stop as usize + h.n_message as usize,
    )
    .ok_or(RecordError::Overflow)?;
    if len != bytes.len() {
        return Err(RecordError::LengthMismatch {
            declared: len,
            found: bytes.len(),
        });
    }
    let l = layout(&h);
    // The tail's padding must be zero, so that every accepted record has one encoding.
    if bytes[l.end..].iter().any(|&b| b != 0) {
        return Err(RecordError::NonZeroPadding);
    }
    let text = |range: std::ops::Range<usize>, what: &'static str| {
        std::str::from_utf8(&bytes[range]).map_err(|_| RecordError::BadText(what))
    };
    let finish = match h.finish {
        1 => FinishReason::Eos,
        2 => FinishReason::Length,
        _ => FinishReason::Stop(text(l.stop..l.message, "stop string")?.to_owned()),
    };
    let reward = RewardOutcome {
        value: h.reward,
        failure: match failed {
            true => Some(text(l.message..l.end, "reward failure message")?.to_owned()),
            false => None,
        },
    };
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
            sampling: SamplingParams {
                temperature: h.temperature,
                top_p: h.top_p,
                top_k: h.top_k,
            },
            seed: h.seed,
            reward,
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
