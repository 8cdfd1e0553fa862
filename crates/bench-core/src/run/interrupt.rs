//! Ctrl-C, SIGTERM and SIGHUP during a run: children run in their own process groups, so the
//! terminal's Ctrl-C reaches only the orchestrator, which kills the running child's group itself
//! and stops. A second interrupt exits at once.

use std::sync::atomic::{AtomicBool, AtomicI32, Ordering};

static INTERRUPTED: AtomicBool = AtomicBool::new(false);
/// The process group of the runner being supervised (0 = none), for the second interrupt.
static RUNNING_GROUP: AtomicI32 = AtomicI32::new(0);

/// Tells the handler which group to kill if the user will not wait for the cleanup.
pub fn set_running_group(pgid: i32) {
    RUNNING_GROUP.store(pgid, Ordering::SeqCst);
}

/// Whether Ctrl-C (SIGINT), SIGTERM or SIGHUP arrived during the run.
pub fn interrupted() -> bool {
    INTERRUPTED.load(Ordering::SeqCst)
}

extern "C" fn on_interrupt(_sig: libc::c_int) {
    // A second interrupt means the user does not want to wait for the cleanup.
    if INTERRUPTED.swap(true, Ordering::SeqCst) {
        let group = RUNNING_GROUP.load(Ordering::SeqCst);
        // SAFETY: killpg and _exit are async-signal-safe.
        unsafe {
            if group > 0 {
                libc::killpg(group, libc::SIGKILL);
            }
            libc::_exit(130)
        };
    }
}

/// Children run in their own process groups, so the terminal's Ctrl-C reaches only us; we kill
/// the running child's group ourselves and stop.
pub fn install_interrupt_handler() {
    for sig in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP] {
        // SAFETY: the handler only touches an atomic and calls _exit, both async-signal-safe;
        // `sa` is fully initialized before use.
        unsafe {
            let mut sa: libc::sigaction = std::mem::zeroed();
            sa.sa_sigaction = on_interrupt as extern "C" fn(libc::c_int) as usize;
            libc::sigemptyset(&mut sa.sa_mask);
            sa.sa_flags = libc::SA_RESTART;
            libc::sigaction(sig, &sa, std::ptr::null_mut());
        }
    }
}
