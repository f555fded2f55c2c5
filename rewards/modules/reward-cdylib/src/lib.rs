//! Example dynamic-library reward module implementing the C ABI of `rewards::abi` (version 1).
//!
//! It scores with the built-in reward described by its `config` (a reward spec; default
//! `{"kind": "math"}`), so it agrees with the built-in `math`. Use it as a template: replace
//! `Module::score` with your own logic. Load it with
//!
//! ```toml
//! [reward]
//! kind = "dylib"
//! path = "/path/to/libreward_cdylib.so"
//! config = { kind = "math" }
//! ```

use std::ffi::c_void;
use std::panic::{catch_unwind, AssertUnwindSafe};

use rewards::abi::{self, AbiOutput, AbiSample, AbiStr};
use rewards::{Reward, RewardSpec, Sample};

/// The module's state behind the opaque pointer.
struct Module {
    reward: Box<dyn Reward>,
}

impl Module {
    fn create(config: &str) -> Result<Self, String> {
        let spec: RewardSpec = match config.trim() {
            "" | "null" => RewardSpec::from_arg("math").map_err(|e| e.to_string())?,
            text => serde_json::from_str(text).map_err(|e| format!("bad config: {e}"))?,
        };
        let reward = spec.build().map_err(|e| e.to_string())?;
        Ok(Self { reward })
    }

    fn score(&self, s: &AbiSample) -> Result<(f64, String), String> {
        // SAFETY: the host guarantees the strings of `s` are valid for the call (ABI contract).
        let text =
            |a: AbiStr| unsafe { a.as_str() }.map_err(|e| format!("input is not UTF-8: {e}"));
        let metadata = text(s.metadata_json)?;
        let sample = Sample {
            prompt: text(s.prompt)?.to_string(),
            completion: text(s.completion)?.to_string(),
            reference: text(s.reference)?.to_string(),
            metadata: if metadata.is_empty() {
                serde_json::Value::Null
            } else {
                serde_json::from_str(metadata).map_err(|e| format!("bad metadata: {e}"))?
            },
        };
        let score = self.reward.score(&sample).map_err(|e| e.to_string())?;
        Ok((score.value, score.extracted.unwrap_or_default()))
    }
}

/// Reports the ABI version this module implements.
#[no_mangle]
pub extern "C" fn nested_reft_reward_abi_version() -> u32 {
    abi::ABI_VERSION
}

/// Creates the module from its JSON config; NULL (with a message in `err`) on failure.
///
/// # Safety
/// `config` must be readable for the call; `err` must have `err_cap` writable bytes and
/// `err_len` must be valid for writes.
#[no_mangle]
pub unsafe extern "C" fn nested_reft_reward_create(
    config: AbiStr,
    err: *mut u8,
    err_cap: usize,
    err_len: *mut usize,
) -> *mut c_void {
    let made = catch_unwind(|| {
        // SAFETY: the host guarantees `config` is readable for the call.
        let text = unsafe { config.as_str() }.map_err(|e| format!("config is not UTF-8: {e}"))?;
        Module::create(text)
    })
    .unwrap_or_else(|_| Err("the module panicked while starting".into()));
    match made {
        Ok(m) => Box::into_raw(Box::new(m)).cast(),
        Err(msg) => {
            // SAFETY: forwarded from this function's contract.
            unsafe { abi::write_truncated(&msg, err, err_cap, err_len) };
            std::ptr::null_mut()
        }
    }
}

/// Scores one sample.
///
/// # Safety
/// `state` must come from `nested_reft_reward_create` and not be destroyed; `sample` and `out`
/// must be valid pointers as the ABI describes; calls on one state must not overlap.
#[no_mangle]
pub unsafe extern "C" fn nested_reft_reward_score(
    state: *mut c_void,
    sample: *const AbiSample,
    out: *mut AbiOutput,
) -> i32 {
    if state.is_null() || sample.is_null() || out.is_null() {
        return abi::SCORE_FAILED;
    }
    // SAFETY: non-null and valid per this function's contract; `state` points to a `Module`
    // made by `create`, and no other call uses it concurrently.
    let (module, sample, out) = unsafe { (&*state.cast::<Module>(), &*sample, &mut *out) };
    let result = catch_unwind(AssertUnwindSafe(|| module.score(sample)))
        .unwrap_or_else(|_| Err("the module panicked".into()));
    match result {
        Ok((value, extracted)) => {
            out.score = value;
            // SAFETY: `out.msg` has `out.msg_cap` writable bytes (ABI contract).
            unsafe { out.write_msg(&extracted) };
            abi::SCORE_OK
        }
        Err(msg) => {
            // SAFETY: as above.
            unsafe { out.write_msg(&msg) };
            abi::SCORE_FAILED
        }
    }
}

/// Frees the module.
///
/// # Safety
/// `state` must come from `nested_reft_reward_create` and is invalid afterwards.
#[no_mangle]
pub unsafe extern "C" fn nested_reft_reward_destroy(state: *mut c_void) {
    if !state.is_null() {
        // SAFETY: `state` was made by `Box::into_raw` in `create` and is freed exactly once.
        drop(unsafe { Box::from_raw(state.cast::<Module>()) });
    }
}
