//! The versioned C ABI of dynamic-library reward modules (version [`ABI_VERSION`]).
//!
//! A module is a shared library exporting four functions (C declarations in
//! `rewards/include/nested_reft_reward.h`):
//!
//! ```c
//! uint32_t nested_reft_reward_abi_version(void);            /* must return 1 */
//! void *nested_reft_reward_create(nr_str config_json, uint8_t *err, size_t err_cap, size_t *err_len);
//! int32_t nested_reft_reward_score(void *state, const nr_sample *sample, nr_output *out);
//! void nested_reft_reward_destroy(void *state);
//! ```
//!
//! * `create` receives the spec's `config` value as JSON text and returns an opaque state, or
//!   NULL after writing a UTF-8 message of at most `err_cap` bytes into `err` (its length into
//!   `*err_len`).
//! * `score` returns [`SCORE_OK`] after setting `out->score` (it must be finite) and writing the
//!   extracted answer (possibly empty) into `out->msg`, or [`SCORE_FAILED`] after writing an
//!   error message there; it sets `out->msg_len` (at most `out->msg_cap`). All strings are
//!   UTF-8, not NUL-terminated, and valid only during the call. `metadata_json` is empty when
//!   the sample has no metadata.
//! * Calls on one state never overlap (the host serialises them) but may come from different
//!   threads. `destroy` is called once, after the last `score`.
//! * A module must not unwind across these functions (catch panics / exceptions).

use std::ffi::c_void;

/// The ABI version this crate implements.
pub const ABI_VERSION: u32 = 1;

/// `score` succeeded.
pub const SCORE_OK: i32 = 0;
/// `score` could not score the sample; `msg` holds the reason.
pub const SCORE_FAILED: i32 = 1;

/// Name of the version function.
pub const SYM_ABI_VERSION: &str = "nested_reft_reward_abi_version";
/// Name of the create function.
pub const SYM_CREATE: &str = "nested_reft_reward_create";
/// Name of the score function.
pub const SYM_SCORE: &str = "nested_reft_reward_score";
/// Name of the destroy function.
pub const SYM_DESTROY: &str = "nested_reft_reward_destroy";

/// A borrowed UTF-8 string: pointer and length (`nr_str`).
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct AbiStr {
    /// First byte (may be dangling when `len == 0`).
    pub ptr: *const u8,
    /// Length in bytes.
    pub len: usize,
}

impl AbiStr {
    /// Borrows `s` for the duration of a call.
    pub fn new(s: &str) -> Self {
        Self {
            ptr: s.as_ptr(),
            len: s.len(),
        }
    }

    /// Views the string.
    ///
    /// # Safety
    /// `ptr` must point to `len` readable bytes that stay valid and unmodified for `'a`
    /// (the ABI guarantees this for the duration of a call).
    pub unsafe fn as_str<'a>(self) -> Result<&'a str, std::str::Utf8Error> {
        if self.len == 0 {
            return Ok("");
        }
        // SAFETY: the caller guarantees `ptr..ptr+len` is readable for `'a`.
        let bytes = unsafe { std::slice::from_raw_parts(self.ptr, self.len) };
        std::str::from_utf8(bytes)
    }
}

/// One sample (`nr_sample`).
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct AbiSample {
    /// The prompt.
    pub prompt: AbiStr,
    /// The completion.
    pub completion: AbiStr,
    /// The reference answer.
    pub reference: AbiStr,
    /// The metadata as JSON text, empty when absent.
    pub metadata_json: AbiStr,
}

/// Where `score` writes its result (`nr_output`).
#[repr(C)]
#[derive(Debug)]
pub struct AbiOutput {
    /// The score (must be finite).
    pub score: f64,
    /// Buffer for the extracted answer or the error message.
    pub msg: *mut u8,
    /// Capacity of `msg`.
    pub msg_cap: usize,
    /// Bytes written to `msg`.
    pub msg_len: usize,
}

impl AbiOutput {
    /// Writes `s` into `msg`, truncated to `msg_cap` bytes at a character boundary.
    ///
    /// # Safety
    /// `msg` must point to `msg_cap` writable bytes (the host guarantees this during `score`).
    pub unsafe fn write_msg(&mut self, s: &str) {
        self.msg_len = 0;
        // SAFETY: forwarded to the caller.
        unsafe { write_truncated(s, self.msg, self.msg_cap, &mut self.msg_len) };
    }
}

/// Writes `s` into `buf`, truncated to `cap` bytes at a character boundary; stores the length.
///
/// # Safety
/// `buf` must point to `cap` writable bytes and `len` must be valid for writes (or null).
pub unsafe fn write_truncated(s: &str, buf: *mut u8, cap: usize, len: *mut usize) {
    let mut n = s.len().min(cap);
    while !s.is_char_boundary(n) {
        n -= 1;
    }
    if n > 0 && !buf.is_null() {
        // SAFETY: `n <= cap` and the caller guarantees `cap` writable bytes at `buf`; the
        // source is a live `&str` that cannot overlap a buffer the host handed out.
        unsafe { std::ptr::copy_nonoverlapping(s.as_ptr(), buf, n) };
    } else {
        n = 0;
    }
    if !len.is_null() {
        // SAFETY: `len` is valid for writes per the caller's contract.
        unsafe { *len = n };
    }
}

/// `nested_reft_reward_abi_version`.
pub type AbiVersionFn = unsafe extern "C" fn() -> u32;
/// `nested_reft_reward_create`.
pub type CreateFn = unsafe extern "C" fn(
    config: AbiStr,
    err: *mut u8,
    err_cap: usize,
    err_len: *mut usize,
) -> *mut c_void;
/// `nested_reft_reward_score`.
pub type ScoreFn =
    unsafe extern "C" fn(state: *mut c_void, sample: *const AbiSample, out: *mut AbiOutput) -> i32;
/// `nested_reft_reward_destroy`.
pub type DestroyFn = unsafe extern "C" fn(state: *mut c_void);
