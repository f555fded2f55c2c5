//! Survives a segment file that shrinks while it is mapped.
//!
//! Reading or writing a shared mapping past the end of its file raises SIGBUS, which kills the
//! process by default. A peer (or a person) can truncate a segment file at any time, so no size
//! check made before an access can rule the fault out. The fault is handled here instead: a
//! SIGBUS whose address lies in a registered segment replaces the whole mapping by zero-filled
//! private pages (the faulting access then completes, reading zeros or writing into memory no
//! peer sees) and marks the segment. Every ring and store operation checks the mark (one
//! atomic load, `Segment::check_unfaulted`) before it trusts what it read and before it
//! publishes what it wrote; the operations that wait or publish weights also compare the
//! file's size with the mapping (`Segment::check_intact`, one fstat), which finds a truncation
//! that no access has run into yet. A SIGBUS anywhere else goes to the handler that was
//! installed before ours, or kills the process as it would have.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Once, OnceLock};

/// Segments a process maps at once, at most; past that a segment is unguarded (its size
/// checks remain).
const RANGES: usize = 256;

struct Range {
    /// Start address; 0 marks a free entry.
    start: AtomicUsize,
    len: AtomicUsize,
    /// A fault in this range was absorbed.
    faulted: AtomicBool,
}

#[allow(clippy::declare_interior_mutable_const)] // only used to initialise the array below
const FREE: Range = Range {
    start: AtomicUsize::new(0),
    len: AtomicUsize::new(0),
    faulted: AtomicBool::new(false),
};
static TABLE: [Range; RANGES] = [FREE; RANGES];
static INSTALL: Once = Once::new();
/// The SIGBUS disposition before ours, for faults that are not ours.
static PREVIOUS: OnceLock<libc::sigaction> = OnceLock::new();

/// A registered mapping; unregistered on drop (before the mapping goes).
#[derive(Debug)]
pub(crate) struct Guard {
    index: Option<usize>,
}

impl Guard {
    /// Registers `len` bytes at `start` (a whole mapping, never unmapped while the guard lives).
    pub(crate) fn register(start: *mut u8, len: usize) -> Self {
        install();
        let start = start as usize;
        if start == 0 || len == 0 {
            return Self { index: None };
        }
        for (i, r) in TABLE.iter().enumerate() {
            // Claim a free entry by its length word first, so two registrations never share
            // one. AcqRel: a successful claim orders our writes after the previous owner's
            // release (see `drop`).
            if r.len
                .compare_exchange(0, len, Ordering::AcqRel, Ordering::Relaxed)
                .is_ok()
            {
                // Relaxed: ordered before the Release store of `start`, which publishes the
                // entry to the handler.
                r.faulted.store(false, Ordering::Relaxed);
                // Release: the handler's Acquire load of `start` then sees `len` and `faulted`.
                r.start.store(start, Ordering::Release);
                return Self { index: Some(i) };
            }
        }
        Self { index: None }
    }

    /// Whether a fault in this mapping was absorbed (its file was truncated).
    pub(crate) fn faulted(&self) -> bool {
        // Acquire pairs with the handler's Release store.
        self.index
            .is_some_and(|i| TABLE[i].faulted.load(Ordering::Acquire))
    }
}

impl Drop for Guard {
    fn drop(&mut self) {
        if let Some(i) = self.index {
            // Release: the handler stops matching this range before the entry is freed; the
            // entry is freed (len 0) last, so a new owner cannot claim it before.
            TABLE[i].start.store(0, Ordering::Release);
            TABLE[i].len.store(0, Ordering::Release);
        }
    }
}

fn install() {
    INSTALL.call_once(|| {
        // SAFETY: sigaction is plain data; all-zero is a valid empty value that we fill in.
        let mut ours: libc::sigaction = unsafe { std::mem::zeroed() };
        ours.sa_sigaction = on_sigbus as *const () as usize;
        ours.sa_flags = libc::SA_SIGINFO | libc::SA_ONSTACK | libc::SA_NODEFER;
        // SAFETY: sa_mask is a valid sigset_t inside `ours`.
        unsafe { libc::sigemptyset(&mut ours.sa_mask) };
        // SAFETY: as above; `previous` receives the old disposition.
        let mut previous: libc::sigaction = unsafe { std::mem::zeroed() };
        // SAFETY: valid pointers to initialised sigaction values; SIGBUS may be caught.
        if unsafe { libc::sigaction(libc::SIGBUS, &ours, &mut previous) } == 0 {
            let _ = PREVIOUS.set(previous);
        }
    });
}

extern "C" fn on_sigbus(sig: libc::c_int, info: *mut libc::siginfo_t, ctx: *mut libc::c_void) {
    // SAFETY: the kernel passes a valid siginfo for a SA_SIGINFO handler; for SIGBUS si_addr
    // is the faulting address.
    let addr = unsafe { (*info).si_addr() } as usize;
    for r in &TABLE {
        // Acquire pairs with the Release store in `register`: `len` is the entry's.
        let start = r.start.load(Ordering::Acquire);
        let len = r.len.load(Ordering::Relaxed);
        if start == 0 || addr < start || addr - start >= len {
            continue;
        }
        // SAFETY: [start, start + len) is a whole mapping of this process that stays mapped
        // while registered; replacing it by anonymous pages of the same size keeps every
        // pointer into it valid (the owner unmaps it later as usual). mmap is a plain system
        // call, safe to make in a signal handler.
        let p = unsafe {
            libc::mmap(
                start as *mut libc::c_void,
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_FIXED | libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        if p != libc::MAP_FAILED {
            // Release pairs with the Acquire load in `faulted`.
            r.faulted.store(true, Ordering::Release);
            return; // the access runs again, on the zero pages
        }
    }
    chain(sig, info, ctx);
}

/// A fault that is not ours: the previous handler's, or the default action (the access faults
/// again once we return and the default disposition kills the process with SIGBUS).
fn chain(sig: libc::c_int, info: *mut libc::siginfo_t, ctx: *mut libc::c_void) {
    if let Some(prev) = PREVIOUS.get() {
        let handler = prev.sa_sigaction;
        if handler != libc::SIG_DFL && handler != libc::SIG_IGN {
            if prev.sa_flags & libc::SA_SIGINFO != 0 {
                // SAFETY: a SA_SIGINFO handler has this signature; we forward the kernel's
                // arguments unchanged.
                let f: extern "C" fn(libc::c_int, *mut libc::siginfo_t, *mut libc::c_void) =
                    unsafe { std::mem::transmute(handler) };
                f(sig, info, ctx);
            } else {
                // SAFETY: a plain handler takes the signal number only.
                let f: extern "C" fn(libc::c_int) = unsafe { std::mem::transmute(handler) };
                f(sig);
            }
            return;
        }
    }
    // SAFETY: sigaction is plain data; all-zero with SIG_DFL (0) is the default disposition.
    let mut default: libc::sigaction = unsafe { std::mem::zeroed() };
    default.sa_sigaction = libc::SIG_DFL;
    // SAFETY: valid pointer to an initialised sigaction; resetting SIGBUS is always allowed.
    unsafe { libc::sigaction(libc::SIGBUS, &default, std::ptr::null_mut()) };
}
