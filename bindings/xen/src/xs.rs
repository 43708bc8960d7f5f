//! A xenstore connection (libxenstore): the toolstack side of a cooperative suspend.
//!
//! Castor asks a guest to suspend itself the way libxl does for a guest without a suspend
//! event channel: it writes `suspend` to the guest's `control/shutdown` node, and the
//! guest's kernel (Linux: `drivers/xen/manage.c`) acknowledges by clearing the node,
//! freezes, and calls `SCHEDOP_shutdown(SHUTDOWN_suspend)`. After the checkpoint,
//! [`Xs::resume_domain`] tells xenstored the domain runs again.

use std::ffi::CString;
use std::io;
use std::ptr::NonNull;

use xenctrl_sys as sys;

/// Errors from libxenstore.
#[derive(Debug, thiserror::Error)]
pub enum XsError {
    /// No connection to xenstored (not dom0, or xenstored not running).
    #[error("cannot connect to xenstore (is xenstored running in this dom0?)")]
    Open(#[source] io::Error),
    /// A write failed.
    #[error("xenstore write of {path} failed")]
    Write {
        /// The node.
        path: String,
        /// errno.
        #[source]
        source: io::Error,
    },
    /// A path or value holds a NUL byte.
    #[error("xenstore path {0:?} holds a NUL byte")]
    Nul(String),
    /// `xs_resume_domain` failed.
    #[error("xenstore resume of domain {domid} failed")]
    Resume {
        /// The domain.
        domid: u32,
        /// errno.
        #[source]
        source: io::Error,
    },
}

/// An open xenstore connection, closed on drop.
#[derive(Debug)]
pub struct Xs {
    h: NonNull<sys::xs_handle>,
}

// SAFETY: a libxenstore handle from xs_open(0) is thread-safe (the library serialises
// requests on it with its own lock); `Xs` owns it and closes it once, in `Drop`.
unsafe impl Send for Xs {}

impl Xs {
    /// Connect to xenstored.
    pub fn open() -> Result<Self, XsError> {
        // SAFETY: flags 0 = a read-write connection; returns NULL on failure.
        let h = unsafe { sys::xs_open(0) };
        NonNull::new(h)
            .map(|h| Self { h })
            .ok_or_else(|| XsError::Open(io::Error::last_os_error()))
    }

    /// Write `value` to `path`.
    pub fn write(&self, path: &str, value: &str) -> Result<(), XsError> {
        let c = CString::new(path).map_err(|_| XsError::Nul(path.into()))?;
        let len = u32::try_from(value.len()).map_err(|_| XsError::Nul(path.into()))?;
        // SAFETY: `c` is a NUL-terminated path and `value` is `len` readable bytes; both
        // outlive the call; XBT_NULL = no transaction.
        let ok = unsafe {
            sys::xs_write(
                self.h.as_ptr(),
                sys::XBT_NULL,
                c.as_ptr(),
                value.as_ptr().cast(),
                len,
            )
        };
        if ok {
            Ok(())
        } else {
            Err(XsError::Write {
                path: path.into(),
                source: io::Error::last_os_error(),
            })
        }
    }

    /// Read `path`; None when it does not exist (or cannot be read).
    pub fn read(&self, path: &str) -> Option<String> {
        let c = CString::new(path).ok()?;
        let mut len = 0u32;
        // SAFETY: `c` is NUL-terminated and `len` a valid out pointer; the result is
        // malloc'd (or NULL) and freed below.
        let p = unsafe { sys::xs_read(self.h.as_ptr(), sys::XBT_NULL, c.as_ptr(), &mut len) };
        let p = NonNull::new(p.cast::<u8>())?;
        // SAFETY: xs_read returned `len` readable bytes at `p` (plus a NUL).
        let s = unsafe { std::slice::from_raw_parts(p.as_ptr(), len as usize) };
        let out = String::from_utf8_lossy(s).into_owned();
        // SAFETY: `p` was allocated by libxenstore with malloc and is not used after this.
        unsafe { libc::free(p.as_ptr().cast()) };
        Some(out)
    }

    /// The names of `path`'s children; empty when it does not exist (or cannot be read).
    pub fn directory(&self, path: &str) -> Vec<String> {
        let Ok(c) = CString::new(path) else {
            return Vec::new();
        };
        let mut n = 0u32;
        // SAFETY: `c` is NUL-terminated and `n` a valid out pointer; the result is one
        // malloc'd block (the array and its strings) or NULL, freed below.
        let p = unsafe { sys::xs_directory(self.h.as_ptr(), sys::XBT_NULL, c.as_ptr(), &mut n) };
        let Some(p) = NonNull::new(p) else {
            return Vec::new();
        };
        // SAFETY: xs_directory returned an array of `n` pointers to NUL-terminated strings,
        // all inside the block at `p`, which is freed only after they are copied.
        let names = unsafe { std::slice::from_raw_parts(p.as_ptr(), n as usize) }
            .iter()
            .filter(|s| !s.is_null())
            .map(|s| {
                // SAFETY: each non-null entry is a NUL-terminated string in the block.
                unsafe { std::ffi::CStr::from_ptr(*s) }
                    .to_string_lossy()
                    .into_owned()
            })
            .collect();
        // SAFETY: `p` was allocated by libxenstore with malloc and is not used after this.
        unsafe { libc::free(p.as_ptr().cast()) };
        names
    }

    /// The dom0 network interfaces of `domid`'s vifs, in device order: for each vif
    /// backend under `/local/domain/0/backend/vif/DOMID/`, its `vifname` (the `vifname=`
    /// of the domain's xl config, which Xen's hotplug script gives the interface), else
    /// netback's own name `vifDOMID.N`. Empty for a domain without vifs (or whose vifs a
    /// driver domain other than dom0 serves).
    pub fn vif_names(&self, domid: u32) -> Vec<String> {
        let base = format!("/local/domain/0/backend/vif/{domid}");
        let mut devs: Vec<u32> = self
            .directory(&base)
            .iter()
            .filter_map(|d| d.parse().ok())
            .collect();
        devs.sort_unstable();
        devs.into_iter()
            .map(|n| {
                self.read(&format!("{base}/{n}/vifname"))
                    .filter(|v| !v.is_empty())
                    .unwrap_or_else(|| format!("vif{domid}.{n}"))
            })
            .collect()
    }

    /// `xs_resume_domain`: tell xenstored that `domid`, which it saw shut down (suspended),
    /// runs again, so that it watches for the domain's next shutdown as for the first.
    pub fn resume_domain(&self, domid: u32) -> Result<(), XsError> {
        // SAFETY: plain request on an open handle.
        if unsafe { sys::xs_resume_domain(self.h.as_ptr(), domid) } {
            Ok(())
        } else {
            Err(XsError::Resume {
                domid,
                source: io::Error::last_os_error(),
            })
        }
    }
}

impl Drop for Xs {
    fn drop(&mut self) {
        // SAFETY: opened in `open`, closed once, here.
        unsafe { sys::xs_close(self.h.as_ptr()) };
    }
}
