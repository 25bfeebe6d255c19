//! Stopping a training run cleanly: a [`StopHandle`] anyone can trigger,
//! and an opt-in Ctrl-C (SIGINT) handler that triggers it.
//!
//! The SIGINT handler is installed only while a [`super::Trainer`] whose
//! config asks for it is training, and the handler that was there before
//! (the default, or the application's own) is put back afterwards, so a
//! library user's signal handling is never taken over silently. A second
//! Ctrl-C while the first is being honoured terminates the process as
//! usual.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use crate::error::Result;

/// Asks a running [`super::Trainer::train`] to stop after the current
/// optimizer step; it then writes a checkpoint (when it has an output
/// folder) and returns `Ok` with [`super::TrainingMetrics::stopped_early`]
/// set. Clone it to another thread and call [`StopHandle::request_stop`].
#[derive(Debug, Clone, Default)]
pub struct StopHandle(Arc<AtomicBool>);

impl StopHandle {
    /// Requests the stop.
    pub fn request_stop(&self) {
        self.0.store(true, Ordering::SeqCst);
    }

    /// Whether a stop was requested through this handle.
    #[must_use]
    pub fn is_requested(&self) -> bool {
        self.0.load(Ordering::SeqCst)
    }

    /// Forgets a request (the trainer does this once it has honoured it).
    pub(crate) fn reset(&self) {
        self.0.store(false, Ordering::SeqCst);
    }
}

/// Installs the SIGINT handler for as long as it lives.
#[derive(Debug)]
pub(crate) struct CtrlCGuard(());

impl CtrlCGuard {
    /// Installs the handler (nested guards share one installation).
    ///
    /// # Errors
    /// [`crate::Error::InvalidConfig`] where signals are not supported.
    pub(crate) fn install() -> Result<Self> {
        ctrl_c::install()?;
        Ok(Self(()))
    }
}

/// Whether Ctrl-C was pressed since the handler was installed.
pub(crate) fn ctrl_c_requested() -> bool {
    ctrl_c::requested()
}

impl Drop for CtrlCGuard {
    fn drop(&mut self) {
        ctrl_c::uninstall();
    }
}

#[cfg(unix)]
mod ctrl_c {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Mutex;

    use crate::error::{Error, Result};

    /// Set by the handler; only ever touched with atomics (signal-safe).
    static REQUESTED: AtomicBool = AtomicBool::new(false);

    /// How many guards are alive, and the handler that was there before.
    static STATE: Mutex<(usize, Option<Previous>)> = Mutex::new((0, None));

    /// `libc::sigaction` holds raw pointers only in the sense of C function
    /// addresses; it is plain data and safe to move between threads.
    struct Previous(libc::sigaction);
    // SAFETY: see above; it is only read back by `sigaction` to restore it.
    unsafe impl Send for Previous {}

    extern "C" fn on_sigint(_: libc::c_int) {
        if REQUESTED.swap(true, Ordering::SeqCst) {
            // Second Ctrl-C: do what Ctrl-C normally does. `signal` and
            // `raise` are async-signal-safe.
            // SAFETY: resets SIGINT to its default action and re-raises it.
            unsafe {
                libc::signal(libc::SIGINT, libc::SIG_DFL);
                libc::raise(libc::SIGINT);
            }
        }
    }

    pub(super) fn requested() -> bool {
        REQUESTED.load(Ordering::SeqCst)
    }

    pub(super) fn install() -> Result<()> {
        let mut state = STATE
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if state.0 == 0 {
            REQUESTED.store(false, Ordering::SeqCst);
            // SAFETY: a zeroed sigaction is a valid value; the handler only
            // touches an atomic (async-signal-safe), and the previous action
            // is saved to be restored by `uninstall`.
            unsafe {
                let mut action: libc::sigaction = std::mem::zeroed();
                action.sa_sigaction = on_sigint as extern "C" fn(libc::c_int) as usize;
                action.sa_flags = libc::SA_RESTART;
                libc::sigemptyset(&mut action.sa_mask);
                let mut previous: libc::sigaction = std::mem::zeroed();
                if libc::sigaction(libc::SIGINT, &action, &mut previous) != 0 {
                    return Err(Error::config(
                        "training config",
                        format!(
                            "stop_on_ctrl_c: cannot install a SIGINT handler: {}",
                            std::io::Error::last_os_error()
                        ),
                    ));
                }
                state.1 = Some(Previous(previous));
            }
        }
        state.0 += 1;
        Ok(())
    }

    pub(super) fn uninstall() {
        let mut state = STATE
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        state.0 = state.0.saturating_sub(1);
        if state.0 == 0 {
            if let Some(Previous(previous)) = state.1.take() {
                // SAFETY: restores the action saved by `install`.
                unsafe {
                    libc::sigaction(libc::SIGINT, &previous, std::ptr::null_mut());
                }
            }
            REQUESTED.store(false, Ordering::SeqCst);
        }
    }
}

#[cfg(not(unix))]
mod ctrl_c {
    use crate::error::{Error, Result};

    pub(super) fn requested() -> bool {
        false
    }

    pub(super) fn install() -> Result<()> {
        Err(Error::config(
            "training config",
            "stop_on_ctrl_c is supported on Unix only; use Trainer::stop_handle",
        ))
    }

    pub(super) fn uninstall() {}
}
