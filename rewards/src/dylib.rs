//! Loading a dynamic-library reward module (C ABI of [`crate::abi`]) with `libloading`.

use std::ffi::c_void;
use std::path::PathBuf;
use std::sync::Mutex;

use libloading::Library;
use serde::{Deserialize, Serialize};

use crate::abi::{self, AbiOutput, AbiSample, AbiStr, AbiVersionFn, CreateFn, DestroyFn, ScoreFn};
use crate::error::{DylibError, Result, RewardError};
use crate::reward::{Reward, Sample, Score};

/// Settings of a dynamic-library module.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DylibConfig {
    /// Path of the shared library (relative to the config file's directory).
    pub path: PathBuf,
    /// Passed to the module's `create` as JSON text.
    #[serde(default)]
    pub config: serde_json::Value,
}

/// Size of the message buffer handed to `score` (extracted answer or error message).
const MSG_CAP: usize = 4096;

/// The module's state pointer.
struct State(*mut c_void);

// SAFETY: the ABI contract (see `crate::abi`) requires modules to accept calls on one state
// from any thread as long as calls do not overlap; every call goes through `DylibReward::call`,
// which holds the mutex around the state, so calls never overlap.
unsafe impl Send for State {}

/// A reward implemented by a shared library.
pub struct DylibReward {
    path: PathBuf,
    score_fn: ScoreFn,
    destroy_fn: DestroyFn,
    /// The state and the reusable message buffer; the mutex serialises calls.
    call: Mutex<(State, Vec<u8>)>,
    /// Declared last so that it is dropped after `drop` has destroyed the state.
    _lib: Library,
}

impl std::fmt::Debug for DylibReward {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DylibReward")
            .field("path", &self.path)
            .finish()
    }
}

impl DylibReward {
    /// Loads the library, checks its ABI version and creates the module's state.
    pub fn load(cfg: &DylibConfig) -> Result<Self, DylibError> {
        let path = cfg.path.clone();
        // SAFETY: loading a library runs its initialisers; a reward module is trusted code
        // chosen by the operator in the config file, exactly like the server binary itself.
        let lib = unsafe { Library::new(&path) }.map_err(|e| DylibError::Load {
            path: path.clone(),
            message: e.to_string(),
        })?;
        let sym = |name: &'static str| DylibError::MissingSymbol {
            path: path.clone(),
            symbol: name,
        };
        // SAFETY: the symbol types are the ones the ABI declares for these names; the version
        // function is checked before any other symbol is called.
        let (version, create, score_fn, destroy_fn) = unsafe {
            let v: AbiVersionFn = *lib
                .get::<AbiVersionFn>(abi::SYM_ABI_VERSION.as_bytes())
                .map_err(|_| sym(abi::SYM_ABI_VERSION))?;
            let c: CreateFn = *lib
                .get::<CreateFn>(abi::SYM_CREATE.as_bytes())
                .map_err(|_| sym(abi::SYM_CREATE))?;
            let s: ScoreFn = *lib
                .get::<ScoreFn>(abi::SYM_SCORE.as_bytes())
                .map_err(|_| sym(abi::SYM_SCORE))?;
            let d: DestroyFn = *lib
                .get::<DestroyFn>(abi::SYM_DESTROY.as_bytes())
                .map_err(|_| sym(abi::SYM_DESTROY))?;
            (v, c, s, d)
        };
        // SAFETY: a version function takes no arguments and has no preconditions.
        let found = unsafe { version() };
        if found != abi::ABI_VERSION {
            return Err(DylibError::AbiVersion {
                path,
                found,
                expected: abi::ABI_VERSION,
            });
        }
        let config = cfg.config.to_string();
        let mut err = vec![0u8; MSG_CAP];
        let mut err_len = 0usize;
        // SAFETY: ABI version 1 `create`: `config` borrows a live string for the call, `err`
        // has `MSG_CAP` writable bytes and `err_len` is a valid out-pointer.
        let state = unsafe {
            create(
                AbiStr::new(&config),
                err.as_mut_ptr(),
                MSG_CAP,
                &mut err_len,
            )
        };
        if state.is_null() {
            let n = err_len.min(MSG_CAP);
            return Err(DylibError::Create {
                path,
                message: String::from_utf8_lossy(&err[..n]).into_owned(),
            });
        }
        Ok(Self {
            path,
            score_fn,
            destroy_fn,
            call: Mutex::new((State(state), vec![0u8; MSG_CAP])),
            _lib: lib,
        })
    }
}

impl Reward for DylibReward {
    fn score(&self, sample: &Sample) -> Result<Score> {
        let metadata = if sample.metadata.is_null() {
            String::new()
        } else {
            sample.metadata.to_string()
        };
        let abi_sample = AbiSample {
            prompt: AbiStr::new(&sample.prompt),
            completion: AbiStr::new(&sample.completion),
            reference: AbiStr::new(&sample.reference),
            metadata_json: AbiStr::new(&metadata),
        };
        // A panic cannot happen while the lock is held (the FFI call cannot unwind), so a
        // poisoned lock only means another thread panicked elsewhere; the state is intact.
        let mut guard = self.call.lock().unwrap_or_else(|e| e.into_inner());
        let (state, buf) = &mut *guard;
        let mut out = AbiOutput {
            score: f64::NAN,
            msg: buf.as_mut_ptr(),
            msg_cap: buf.len(),
            msg_len: 0,
        };
        // SAFETY: `state` came from this library's `create` and is not destroyed before `drop`;
        // the sample's strings and `metadata` live until the call returns; `out.msg` points to
        // `msg_cap` writable bytes of `buf`; the mutex guard makes this the only call on
        // `state` in flight.
        let rc = unsafe { (self.score_fn)(state.0, &abi_sample, &mut out) };
        let n = out.msg_len.min(buf.len());
        let msg = String::from_utf8_lossy(&buf[..n]).into_owned();
        match rc {
            abi::SCORE_OK => {
                let mut s = Score::new(out.score);
                if !msg.is_empty() {
                    s.extracted = Some(msg);
                }
                s.checked()
            }
            abi::SCORE_FAILED => Err(RewardError::Module(msg)),
            other => Err(RewardError::Protocol(format!(
                "the library returned the unknown status {other} ({})",
                self.path.display()
            ))),
        }
    }
}

impl Drop for DylibReward {
    fn drop(&mut self) {
        let guard = self.call.get_mut().unwrap_or_else(|e| e.into_inner());
        // SAFETY: the state came from `create`, `&mut self` proves no call is in flight, and it
        // is destroyed exactly once, before the library (`_lib`) is unloaded.
        unsafe { (self.destroy_fn)(guard.0 .0) };
    }
}
