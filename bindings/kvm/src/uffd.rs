//! The few userfaultfd calls copy-on-write checkpoints need, written against the kernel's
//! stable ABI (`linux/userfaultfd.h`): create, the API handshake, register a range for
//! write-protect faults, (un)protect a range, read fault messages.
//!
//! Written here rather than taken from the `userfaultfd` crate, whose `-sys` crate runs
//! bindgen (libclang) in its build script for every build of this backend.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

/// `UFFD_API`: the API version the handshake asks for.
const UFFD_API: u64 = 0xaa;
/// The ioctl type of userfaultfd (`UFFDIO`).
const UFFDIO: u64 = 0xaa;
/// `_UFFDIO_WRITEPROTECT`: its bit in a registration's `ioctls`.
const UFFDIO_WRITEPROTECT_NR: u64 = 0x06;
/// `UFFDIO_REGISTER_MODE_WP`.
const REGISTER_MODE_WP: u64 = 1 << 1;
/// `UFFDIO_WRITEPROTECT_MODE_WP`.
const WRITEPROTECT_MODE_WP: u64 = 1 << 0;
/// `UFFD_EVENT_PAGEFAULT`.
const EVENT_PAGEFAULT: u8 = 0x12;
/// `UFFD_PAGEFAULT_FLAG_WP`.
const PAGEFAULT_FLAG_WP: u64 = 1 << 1;
/// Size of one `struct uffd_msg`.
const MSG_SIZE: usize = 32;

/// `struct uffdio_api`.
#[repr(C)]
#[derive(Debug, Default)]
struct UffdioApi {
    api: u64,
    features: u64,
    ioctls: u64,
}

/// `struct uffdio_range`.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
struct UffdioRange {
    start: u64,
    len: u64,
}

/// `struct uffdio_register`.
#[repr(C)]
#[derive(Debug, Default)]
struct UffdioRegister {
    range: UffdioRange,
    mode: u64,
    ioctls: u64,
}

/// `struct uffdio_writeprotect`.
#[repr(C)]
#[derive(Debug, Default)]
struct UffdioWriteprotect {
    range: UffdioRange,
    mode: u64,
}

/// `_IOWR(UFFDIO, nr, size)`.
const fn iowr(nr: u64, size: usize) -> u64 {
    (3 << 30) | ((size as u64) << 16) | (UFFDIO << 8) | nr
}

const UFFDIO_API: u64 = iowr(0x3f, size_of::<UffdioApi>());
const UFFDIO_REGISTER: u64 = iowr(0x00, size_of::<UffdioRegister>());
const UFFDIO_WRITEPROTECT: u64 = iowr(UFFDIO_WRITEPROTECT_NR, size_of::<UffdioWriteprotect>());

/// A userfaultfd, non-blocking, closed on exec.
#[derive(Debug)]
pub(crate) struct Uffd {
    fd: OwnedFd,
}

/// One write-protect fault read from the userfaultfd.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct WpFault {
    /// The faulting host address.
    pub addr: u64,
}

impl Uffd {
    /// A new userfaultfd that also sees faults raised in the kernel (KVM reaches guest RAM
    /// through `get_user_pages`), after the API handshake.
    pub(crate) fn new() -> io::Result<Self> {
        // SAFETY: the userfaultfd syscall takes only flags and returns a new fd or -1.
        let rc =
            unsafe { libc::syscall(libc::SYS_userfaultfd, libc::O_CLOEXEC | libc::O_NONBLOCK) };
        if rc < 0 {
            return Err(io::Error::last_os_error());
        }
        let raw = RawFd::try_from(rc).map_err(|_| io::Error::from(io::ErrorKind::InvalidData))?;
        // SAFETY: `raw` is the fd the syscall just returned; nothing else owns it.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        let u = Self { fd };
        let mut api = UffdioApi {
            api: UFFD_API,
            ..Default::default()
        };
        u.ioctl(UFFDIO_API, &mut api)?;
        Ok(u)
    }

    fn ioctl<T>(&self, req: u64, arg: &mut T) -> io::Result<()> {
        // SAFETY: `req` is one of this module's userfaultfd ioctls and `arg` is the live
        // `#[repr(C)]` struct of its kind and size, which the kernel reads and writes back.
        let rc = unsafe {
            libc::ioctl(
                self.fd.as_raw_fd(),
                req as libc::c_ulong,
                std::ptr::from_mut(arg).cast::<libc::c_void>(),
            )
        };
        if rc < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(())
        }
    }

    /// Register `[addr, addr+len)` for write-protect faults; returns whether the kernel
    /// offers write-protection (`UFFDIO_WRITEPROTECT`) on it.
    pub(crate) fn register_wp(&self, addr: u64, len: usize) -> io::Result<bool> {
        let mut r = UffdioRegister {
            range: UffdioRange {
                start: addr,
                len: len as u64,
            },
            mode: REGISTER_MODE_WP,
            ioctls: 0,
        };
        self.ioctl(UFFDIO_REGISTER, &mut r)?;
        Ok(r.ioctls & (1 << UFFDIO_WRITEPROTECT_NR) != 0)
    }

    fn writeprotect(&self, addr: u64, len: usize, mode: u64) -> io::Result<()> {
        let mut w = UffdioWriteprotect {
            range: UffdioRange {
                start: addr,
                len: len as u64,
            },
            mode,
        };
        // The kernel refuses with EAGAIN while the address space is changing: try again.
        let mut tries = 0;
        loop {
            match self.ioctl(UFFDIO_WRITEPROTECT, &mut w) {
                Err(e) if e.raw_os_error() == Some(libc::EAGAIN) && tries < 100 => {
                    tries += 1;
                    std::thread::yield_now();
                }
                r => return r,
            }
        }
    }

    /// Write-protect a registered range.
    pub(crate) fn protect(&self, addr: u64, len: usize) -> io::Result<()> {
        self.writeprotect(addr, len, WRITEPROTECT_MODE_WP)
    }

    /// Remove write-protection from a registered range and wake the threads waiting on it.
    pub(crate) fn unprotect(&self, addr: u64, len: usize) -> io::Result<()> {
        self.writeprotect(addr, len, 0)
    }

    /// Read the pending messages (none: `Ok` with nothing added); write-protect faults go
    /// to `out`, and the count of other messages is returned.
    pub(crate) fn read_faults(&self, out: &mut Vec<WpFault>) -> io::Result<usize> {
        let mut buf = [0u8; MSG_SIZE * 64];
        // SAFETY: reads at most `buf.len()` bytes into the live buffer.
        let n = unsafe {
            libc::read(
                self.fd.as_raw_fd(),
                buf.as_mut_ptr().cast::<libc::c_void>(),
                buf.len(),
            )
        };
        if n < 0 {
            let e = io::Error::last_os_error();
            return if e.raw_os_error() == Some(libc::EAGAIN) {
                Ok(0)
            } else {
                Err(e)
            };
        }
        let n = usize::try_from(n).unwrap_or(0);
        let mut other = 0;
        for m in buf[..n].chunks_exact(MSG_SIZE) {
            // struct uffd_msg: event (u8), 7 reserved bytes, then pagefault.flags (u64)
            // and pagefault.address (u64).
            let word = |at: usize| {
                let mut b = [0u8; 8];
                b.copy_from_slice(&m[at..at + 8]);
                u64::from_ne_bytes(b)
            };
            if m[0] == EVENT_PAGEFAULT && word(8) & PAGEFAULT_FLAG_WP != 0 {
                out.push(WpFault { addr: word(16) });
            } else {
                other += 1;
            }
        }
        Ok(other)
    }
}

/// Private anonymous scratch pages (for timing faults), unmapped on drop.
#[derive(Debug)]
pub(crate) struct Scratch {
    /// Where they are mapped.
    pub addr: *mut libc::c_void,
    len: usize,
}

impl Scratch {
    /// Map `len` bytes, readable and writable.
    pub(crate) fn new(len: usize) -> io::Result<Self> {
        // SAFETY: a fresh private anonymous mapping; no existing memory is touched.
        let addr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        if addr == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        Ok(Self { addr, len })
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        // SAFETY: `addr`/`len` are exactly the mapping `new` made, and its users are done
        // with it (they borrow the Scratch).
        unsafe { libc::munmap(self.addr, self.len) };
    }
}

impl AsRawFd for Uffd {
    fn as_raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ioctl_numbers_are_the_kernels() {
        // From linux/userfaultfd.h on x86-64.
        assert_eq!(UFFDIO_API, 0xc018_aa3f);
        assert_eq!(UFFDIO_REGISTER, 0xc020_aa00);
        assert_eq!(UFFDIO_WRITEPROTECT, 0xc018_aa06);
    }

    /// What write-protecting populated anonymous pages costs on this host, without KVM
    /// (a measurement: `--ignored --nocapture`).
    #[test]
    #[ignore]
    fn measure_protect() {
        const PAGES: usize = 4096;
        let len = PAGES * 4096;
        let scratch = Scratch::new(len).unwrap();
        let addr = scratch.addr;
        // SAFETY: the mapping above, `len` bytes, readable and writable.
        unsafe { std::ptr::write_bytes(addr.cast::<u8>(), 1, len) };
        let u = Uffd::new().unwrap();
        assert!(u.register_wp(addr as u64, len).unwrap());
        for _ in 0..3 {
            let t = std::time::Instant::now();
            u.protect(addr as u64, len).unwrap();
            let p = t.elapsed();
            let t = std::time::Instant::now();
            u.unprotect(addr as u64, len).unwrap();
            eprintln!(
                "{PAGES} pages: protect {p:?} ({:.0} ns/page), unprotect {:?}",
                p.as_nanos() as f64 / PAGES as f64,
                t.elapsed()
            );
        }
    }
}
