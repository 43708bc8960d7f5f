//! SIGTERM and SIGINT as a stop flag.
//!
//! A signal handler can only reach static data, so the flag is the crate's one static;
//! everything else takes the `&AtomicBool` it is given.

use std::sync::atomic::{AtomicBool, Ordering};

static STOP: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_sig: libc::c_int) {
    // Only an atomic store: async-signal-safe.
    STOP.store(true, Ordering::Relaxed);
}

/// Install handlers for SIGTERM and SIGINT that raise the returned flag.
pub fn install() -> std::io::Result<&'static AtomicBool> {
    let handler: extern "C" fn(libc::c_int) = on_signal;
    for sig in [libc::SIGTERM, libc::SIGINT] {
        // SAFETY: `sigaction` is a plain C struct for which all-zero bytes are valid (no
        // flags, empty mask, default handler) before we fill it in.
        let mut sa: libc::sigaction = unsafe { std::mem::zeroed() };
        sa.sa_sigaction = handler as libc::sighandler_t;
        // SAFETY: `sa.sa_mask` is a valid, owned sigset_t.
        unsafe { libc::sigemptyset(&mut sa.sa_mask) };
        // SAFETY: `sa` is fully initialised and outlives the call; the handler only does an
        // atomic store, which is async-signal-safe; a null old-action pointer is allowed.
        if unsafe { libc::sigaction(sig, &sa, std::ptr::null_mut()) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(&STOP)
}
