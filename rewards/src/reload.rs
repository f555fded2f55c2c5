//! Swapping the reward in place: rebuild from the config file on request or on SIGHUP.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use crate::error::{Result, SpecError};
use crate::reward::{Reward, Sample, Score};
use crate::spec::RewardSpec;

/// A reward that can be rebuilt from its config file while the server runs.
///
/// Two ways to swap a reward module:
/// * edit the config file and restart the rollout server (the reward is built at start-up);
/// * edit the config file and send SIGHUP (`systemctl reload` / `kill -HUP`): after
///   [`install_sighup`](Self::install_sighup), the next scoring call re-reads the file and
///   swaps the new reward in. If the new config is broken, the old reward stays in service
///   and the error is logged and kept in [`last_error`](Self::last_error).
///
/// In-flight batches finish on the reward they started with; the old reward (and its process
/// or library) is released when its last batch ends.
pub struct ReloadableReward {
    path: PathBuf,
    current: RwLock<Arc<dyn Reward>>,
    pending: Arc<AtomicBool>,
    generation: AtomicU64,
    last_error: Mutex<Option<String>>,
}

impl std::fmt::Debug for ReloadableReward {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReloadableReward")
            .field("path", &self.path)
            .field("generation", &self.generation())
            .finish()
    }
}

impl ReloadableReward {
    /// Builds the reward described by the config file at `path`.
    pub fn from_file(path: impl AsRef<Path>) -> Result<Self, SpecError> {
        let path = path.as_ref().to_path_buf();
        let reward: Arc<dyn Reward> = Arc::from(RewardSpec::from_file(&path)?.build()?);
        Ok(Self {
            path,
            current: RwLock::new(reward),
            pending: Arc::new(AtomicBool::new(false)),
            generation: AtomicU64::new(0),
            last_error: Mutex::new(None),
        })
    }

    /// Re-reads the config file and swaps the new reward in. On error the old one stays.
    pub fn reload(&self) -> Result<(), SpecError> {
        let built = RewardSpec::from_file(&self.path).and_then(|s| s.build());
        let mut last = self.last_error.lock().unwrap_or_else(|e| e.into_inner());
        match built {
            Ok(r) => {
                *self.current.write().unwrap_or_else(|e| e.into_inner()) = Arc::from(r);
                // Only a counter for observers; the swap itself is ordered by the RwLock.
                self.generation.fetch_add(1, Ordering::Relaxed);
                *last = None;
                Ok(())
            }
            Err(e) => {
                eprintln!(
                    "reward: reloading {} failed, keeping the previous reward: {e}",
                    self.path.display()
                );
                *last = Some(e.to_string());
                Err(e)
            }
        }
    }

    /// Asks for a reload at the next scoring call (safe to call from any thread).
    pub fn request_reload(&self) {
        // Pairs with the swap in `current()`; no data travels with the flag (the file is
        // re-read), so the ordering only needs to make the request visible.
        self.pending.store(true, Ordering::Release);
    }

    /// The flag that requests a reload; hand it to your own signal or control handler.
    pub fn reload_flag(&self) -> Arc<AtomicBool> {
        Arc::clone(&self.pending)
    }

    /// Requests a reload on every SIGHUP the process receives. Returns the registration id
    /// (pass it to `signal_hook::low_level::unregister` to stop).
    pub fn install_sighup(&self) -> std::io::Result<signal_hook::SigId> {
        signal_hook::flag::register(signal_hook::consts::SIGHUP, Arc::clone(&self.pending))
    }

    /// How many successful reloads happened.
    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Relaxed)
    }

    /// The error of the last failed reload, cleared by a successful one.
    pub fn last_error(&self) -> Option<String> {
        self.last_error
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// The reward in service, after applying a pending reload.
    pub fn current(&self) -> Arc<dyn Reward> {
        // Acquire pairs with the Release store in `request_reload` and the SeqCst store made
        // by the signal handler registered in `install_sighup`.
        if self.pending.swap(false, Ordering::Acquire) {
            // The error is logged and kept in `last_error`; the old reward stays in service.
            let _ = self.reload();
        }
        Arc::clone(&self.current.read().unwrap_or_else(|e| e.into_inner()))
    }
}

impl Reward for ReloadableReward {
    fn score(&self, sample: &Sample) -> Result<Score> {
        self.current().score(sample)
    }

    fn score_batch(&self, samples: &[Sample]) -> Vec<Result<Score>> {
        self.current().score_batch(samples)
    }
}
