//! Safe wrappers over the libxenctrl and libxenforeignmemory calls Castor makes (the raw
//! bindings are `xenctrl-sys`): one [`Xc`] handle per domain, domain info, pause, log-dirty,
//! foreign mapping by gfn, HVM context, params and TSC info.

use std::io;
use std::ptr::{self, NonNull};

use xenctrl_sys as sys;

/// The device every libxenctrl call goes through.
pub const PRIVCMD: &str = crate::PRIVCMD_DEVICE;

/// Errors from libxenctrl / libxenforeignmemory.
#[derive(Debug, thiserror::Error)]
pub enum XcError {
    /// The privcmd device cannot be opened: no Xen, not dom0, or not root.
    #[error("cannot open {PRIVCMD}")]
    Privcmd(#[source] io::Error),
    /// A handle cannot be opened.
    #[error("{0} failed")]
    Open(&'static str, #[source] io::Error),
    /// A call failed.
    #[error("{op} (domain {domid}) failed")]
    Call {
        /// The libxenctrl function.
        op: &'static str,
        /// The domain.
        domid: u32,
        /// errno.
        #[source]
        source: io::Error,
    },
    /// No domain with this id.
    #[error("domain {0} does not exist")]
    NoDomain(u32),
}

/// What `xc_domain_getinfo` says of a domain.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DomInfo {
    /// Domain id.
    pub domid: u32,
    /// HVM or PVH (translated, gfn-mapped) rather than PV.
    pub hvm: bool,
    /// Paused by the toolstack.
    pub paused: bool,
    /// Shut down (suspended, crashed, powered off …).
    pub shutdown: bool,
    /// `SHUTDOWN_*` when `shutdown`.
    pub shutdown_reason: u32,
    /// Crashed.
    pub crashed: bool,
    /// Being destroyed.
    pub dying: bool,
    /// Pages the domain holds.
    pub nr_pages: u64,
    /// Highest vCPU id.
    pub max_vcpu_id: u32,
}

/// An open libxenctrl interface plus a foreign-memory handle.
#[derive(Debug)]
pub struct Xc {
    xch: NonNull<sys::xc_interface>,
    fmem: NonNull<sys::xenforeignmemory_handle>,
}

// SAFETY: libxenctrl and libxenforeignmemory handles opened without
// XC_OPENFLAG_NON_REENTRANT may be used from any thread (the libraries lock internally);
// `Xc` owns both and closes them once, in `Drop`.
unsafe impl Send for Xc {}

/// Gfns per page-type query (Xen's limit for getpageframeinfo3).
const PFN_TYPE_BATCH: usize = 1024;

fn errno() -> io::Error {
    io::Error::last_os_error()
}

impl Xc {
    /// Open the interfaces. Fails with [`XcError::Privcmd`] when Xen is not there.
    pub fn open() -> Result<Self, XcError> {
        // Checked first so that the error names the device instead of libxenctrl's log line.
        std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(PRIVCMD)
            .map_err(XcError::Privcmd)?;
        // SAFETY: null loggers make libxenctrl log to stderr; flags 0 = reentrant handle.
        let xch = unsafe { sys::xc_interface_open(ptr::null_mut(), ptr::null_mut(), 0) };
        let xch = NonNull::new(xch).ok_or_else(|| XcError::Open("xc_interface_open", errno()))?;
        // SAFETY: as above; flags must be 0.
        let fmem = unsafe { sys::xenforeignmemory_open(ptr::null_mut(), 0) };
        let Some(fmem) = NonNull::new(fmem) else {
            let e = errno();
            // SAFETY: `xch` was opened above and is not used after this.
            unsafe { sys::xc_interface_close(xch.as_ptr()) };
            return Err(XcError::Open("xenforeignmemory_open", e));
        };
        Ok(Self { xch, fmem })
    }

    fn check(op: &'static str, domid: u32, rc: i32) -> Result<(), XcError> {
        if rc < 0 {
            Err(XcError::Call {
                op,
                domid,
                source: errno(),
            })
        } else {
            Ok(())
        }
    }

    /// The domain's info, or [`XcError::NoDomain`].
    pub fn info(&self, domid: u32) -> Result<DomInfo, XcError> {
        let mut i = sys::xc_dominfo_t::default();
        // SAFETY: `i` is one writable xc_dominfo_t and max_doms is 1.
        let n = unsafe { sys::xc_domain_getinfo(self.xch.as_ptr(), domid, 1, &mut i) };
        Self::check("xc_domain_getinfo", domid, n)?;
        if n != 1 || i.domid != domid {
            return Err(XcError::NoDomain(domid));
        }
        Ok(DomInfo {
            domid,
            hvm: i.hvm() != 0,
            paused: i.paused() != 0,
            shutdown: i.shutdown() != 0,
            shutdown_reason: i.shutdown_reason,
            crashed: i.crashed() != 0,
            dying: i.dying() != 0,
            nr_pages: i.nr_pages,
            max_vcpu_id: i.max_vcpu_id,
        })
    }

    /// `xc_domain_pause`: returns once no vCPU of the domain runs.
    pub fn pause(&self, domid: u32) -> Result<(), XcError> {
        // SAFETY: plain hypercall wrapper on an open handle.
        let rc = unsafe { sys::xc_domain_pause(self.xch.as_ptr(), domid) };
        Self::check("xc_domain_pause", domid, rc)
    }

    /// `xc_domain_unpause`.
    pub fn unpause(&self, domid: u32) -> Result<(), XcError> {
        // SAFETY: plain hypercall wrapper on an open handle.
        let rc = unsafe { sys::xc_domain_unpause(self.xch.as_ptr(), domid) };
        Self::check("xc_domain_unpause", domid, rc)
    }

    /// `xc_domain_resume(fast = 1)`: let a domain that suspended itself go on as if the
    /// suspend was cancelled (its `SCHEDOP_shutdown` returns 1).
    pub fn resume_cooperative(&self, domid: u32) -> Result<(), XcError> {
        // SAFETY: plain wrapper on an open handle.
        let rc = unsafe { sys::xc_domain_resume(self.xch.as_ptr(), domid, 1) };
        Self::check("xc_domain_resume", domid, rc)
    }

    /// The hypervisor's version, `(major, minor)` (`xc_version(XENVER_version)`).
    pub fn version(&self) -> Result<(u32, u32), XcError> {
        // SAFETY: XENVER_version takes no argument and returns major << 16 | minor.
        let v = unsafe {
            sys::xc_version(
                self.xch.as_ptr(),
                sys::XENVER_version.cast_signed(),
                ptr::null_mut(),
            )
        };
        Self::check("xc_version", 0, v)?;
        let v = v.cast_unsigned();
        Ok((v >> 16, v & 0xffff))
    }

    /// `xc_domain_maximum_gpfn`: the highest gfn in the domain's p2m.
    pub fn max_gpfn(&self, domid: u32) -> Result<u64, XcError> {
        let mut gpfn: sys::xen_pfn_t = 0;
        // SAFETY: `gpfn` is a valid out pointer.
        let rc = unsafe { sys::xc_domain_maximum_gpfn(self.xch.as_ptr(), domid, &mut gpfn) };
        Self::check("xc_domain_maximum_gpfn", domid, rc)?;
        Ok(gpfn)
    }

    /// Which of `gfns` are special frames of `domid`: gfns whose frame is Xen's own (its
    /// grant table frames mapped into the guest's physmap, say) or is not there, which
    /// Xen's page-type query (`xc_get_pfn_type_batch`, getpageframeinfo3) reports as
    /// `XTAB`. libxc's save leaves such gfns out; their content is not the guest's memory,
    /// and Xen writes them without the dirty log.
    pub fn special_frames(&self, domid: u32, gfns: &[u64]) -> Result<Vec<bool>, XcError> {
        let mut out = Vec::with_capacity(gfns.len());
        for chunk in gfns.chunks(PFN_TYPE_BATCH) {
            let mut arr: Vec<sys::xen_pfn_t> = chunk.to_vec();
            let n = u32::try_from(arr.len()).unwrap_or(u32::MAX);
            // SAFETY: `arr` holds `n` gfns and outlives the call, which writes each
            // element's type over it.
            let rc = unsafe {
                sys::xc_get_pfn_type_batch(self.xch.as_ptr(), domid, n, arr.as_mut_ptr())
            };
            Self::check("xc_get_pfn_type_batch", domid, rc)?;
            out.extend(arr.iter().map(|t| {
                (*t & u64::from(sys::XEN_DOMCTL_PFINFO_LTAB_MASK))
                    == u64::from(sys::XEN_DOMCTL_PFINFO_XTAB)
            }));
        }
        Ok(out)
    }

    /// The number of frames of `domid`'s grant table (`GNTTABOP_query_size`): it grows as
    /// the guest grants more pages, each new frame mapped at a gfn of the guest's choosing.
    pub fn grant_frames(&self, domid: u32) -> Result<u32, XcError> {
        let mut q = sys::gnttab_query_size {
            dom: u16::try_from(domid).unwrap_or(u16::MAX),
            ..Default::default()
        };
        // SAFETY: `q` is a valid in/out structure for the call.
        let rc = unsafe { sys::xc_gnttab_query_size(self.xch.as_ptr(), &mut q) };
        Self::check("xc_gnttab_query_size", domid, rc)?;
        if q.status != 0 {
            return Err(XcError::Call {
                op: "GNTTABOP_query_size",
                domid,
                source: io::Error::other(format!("grant status {}", q.status)),
            });
        }
        Ok(q.nr_frames)
    }

    /// A log-dirty operation without a bitmap (`XEN_DOMCTL_SHADOW_OP_ENABLE_LOGDIRTY`,
    /// `XEN_DOMCTL_SHADOW_OP_OFF`).
    pub fn logdirty_op(&self, domid: u32, op: u32) -> Result<(), XcError> {
        // SAFETY: a null bitmap with 0 pages is what the non-harvesting ops take; no stats.
        let rc = unsafe {
            sys::xc_logdirty_control(
                self.xch.as_ptr(),
                domid,
                op,
                ptr::null_mut(),
                0,
                0,
                ptr::null_mut(),
            )
        };
        if rc < 0 {
            return Err(XcError::Call {
                op: "xc_logdirty_control",
                domid,
                source: errno(),
            });
        }
        Ok(())
    }

    /// `XEN_DOMCTL_SHADOW_OP_CLEAN`: copy the dirty bitmap of the first `pages` gfns into
    /// `buf` and clear it in Xen. Returns the number of dirty pages Xen reports.
    pub fn logdirty_clean(
        &self,
        domid: u32,
        buf: &mut HypercallBuffer,
        pages: u64,
    ) -> Result<u64, XcError> {
        self.logdirty_bitmap(
            domid,
            buf,
            pages,
            sys::XEN_DOMCTL_SHADOW_OP_CLEAN,
            "xc_logdirty_control(CLEAN)",
        )
    }

    /// `XEN_DOMCTL_SHADOW_OP_PEEK`: copy the dirty bitmap of the first `pages` gfns into
    /// `buf`, leaving it in Xen (what was written since the last CLEAN).
    pub fn logdirty_peek(
        &self,
        domid: u32,
        buf: &mut HypercallBuffer,
        pages: u64,
    ) -> Result<u64, XcError> {
        self.logdirty_bitmap(
            domid,
            buf,
            pages,
            sys::XEN_DOMCTL_SHADOW_OP_PEEK,
            "xc_logdirty_control(PEEK)",
        )
    }

    fn logdirty_bitmap(
        &self,
        domid: u32,
        buf: &mut HypercallBuffer,
        pages: u64,
        op: u32,
        call: &'static str,
    ) -> Result<u64, XcError> {
        let mut stats = sys::xc_shadow_op_stats_t::default();
        let pages = pages.min(buf.bits());
        // SAFETY: `buf.raw` describes a hypercall-safe allocation of at least `pages` bits
        // (checked above), made on this handle; `stats` is a valid out pointer.
        let rc = unsafe {
            sys::xc_logdirty_control(
                self.xch.as_ptr(),
                domid,
                op,
                &mut buf.raw,
                pages as _,
                0,
                &mut stats,
            )
        };
        if rc < 0 {
            return Err(XcError::Call {
                op: call,
                domid,
                source: errno(),
            });
        }
        Ok(u64::from(stats.dirty_count))
    }

    /// Allocate a hypercall-safe buffer of `pages` pages.
    pub fn hypercall_buffer(&self, pages: usize) -> Result<HypercallBuffer, XcError> {
        let mut raw = sys::xc_hypercall_buffer_t::default();
        let n = i32::try_from(pages).map_err(|_| {
            XcError::Open(
                "xc_hypercall_buffer_alloc_pages",
                io::Error::from(io::ErrorKind::InvalidInput),
            )
        })?;
        // SAFETY: `raw` is a zeroed (DECLARE_HYPERCALL_BUFFER-equivalent) descriptor; the
        // call sets `raw.hbuf` to `pages` zeroed, locked pages.
        let p = unsafe { sys::xc__hypercall_buffer_alloc_pages(self.xch.as_ptr(), &mut raw, n) };
        if p.is_null() {
            return Err(XcError::Open("xc_hypercall_buffer_alloc_pages", errno()));
        }
        Ok(HypercallBuffer {
            xch: self.xch,
            raw,
            pages: n,
        })
    }

    /// Map `gfns` of `domid` read-only, contiguously. Frames that cannot be mapped (holes in
    /// the gfn space, special frames) are reported in the returned mapping's `errs`.
    pub fn map(&self, domid: u32, gfns: &[u64]) -> Result<Mapping, XcError> {
        let mut errs = vec![0i32; gfns.len()];
        let arr: Vec<sys::xen_pfn_t> = gfns.to_vec();
        // SAFETY: `arr` and `errs` hold `gfns.len()` elements each and outlive the call;
        // with an error array the call maps what it can and reports the rest per frame.
        let p = unsafe {
            sys::xenforeignmemory_map(
                self.fmem.as_ptr(),
                domid,
                libc::PROT_READ,
                gfns.len(),
                arr.as_ptr(),
                errs.as_mut_ptr(),
            )
        };
        let ptr = NonNull::new(p.cast::<u8>()).ok_or_else(|| XcError::Call {
            op: "xenforeignmemory_map",
            domid,
            source: errno(),
        })?;
        Ok(Mapping {
            fmem: self.fmem,
            ptr,
            pages: gfns.len(),
            errs,
        })
    }

    /// The whole HVM context blob (`xc_domain_hvm_getcontext`). The domain should be paused.
    pub fn hvm_context(&self, domid: u32) -> Result<Vec<u8>, XcError> {
        // SAFETY: a null buffer asks for the size.
        let size =
            unsafe { sys::xc_domain_hvm_getcontext(self.xch.as_ptr(), domid, ptr::null_mut(), 0) };
        Self::check("xc_domain_hvm_getcontext(size)", domid, size)?;
        let mut buf = vec![0u8; usize::try_from(size).unwrap_or(0)];
        let len = u32::try_from(buf.len()).unwrap_or(u32::MAX);
        // SAFETY: `buf` is `len` writable bytes.
        let got = unsafe {
            sys::xc_domain_hvm_getcontext(self.xch.as_ptr(), domid, buf.as_mut_ptr(), len)
        };
        Self::check("xc_domain_hvm_getcontext", domid, got)?;
        buf.truncate(usize::try_from(got).unwrap_or(buf.len()));
        Ok(buf)
    }

    /// `xc_hvm_param_get`.
    pub fn hvm_param(&self, domid: u32, param: u32) -> Result<u64, XcError> {
        let mut v = 0u64;
        // SAFETY: `v` is a valid out pointer.
        let rc = unsafe { sys::xc_hvm_param_get(self.xch.as_ptr(), domid, param, &mut v) };
        Self::check("xc_hvm_param_get", domid, rc)?;
        Ok(v)
    }

    /// `xc_domain_get_tsc_info`.
    pub fn tsc_info(&self, domid: u32) -> Result<crate::state::TscInfo, XcError> {
        let mut t = crate::state::TscInfo::default();
        // SAFETY: the four out pointers are valid and distinct.
        let rc = unsafe {
            sys::xc_domain_get_tsc_info(
                self.xch.as_ptr(),
                domid,
                &mut t.mode,
                &mut t.elapsed_nsec,
                &mut t.khz,
                &mut t.incarnation,
            )
        };
        Self::check("xc_domain_get_tsc_info", domid, rc)?;
        Ok(t)
    }
}

impl Drop for Xc {
    fn drop(&mut self) {
        // SAFETY: both handles were opened in `open` and are closed exactly once, here;
        // every `Mapping` and `HypercallBuffer` borrows or outlives-checks them.
        unsafe {
            sys::xenforeignmemory_close(self.fmem.as_ptr());
            sys::xc_interface_close(self.xch.as_ptr());
        }
    }
}

/// A hypercall-safe buffer (for the dirty bitmap). Must be dropped before the [`Xc`] that
/// made it.
#[derive(Debug)]
pub struct HypercallBuffer {
    xch: NonNull<sys::xc_interface>,
    raw: sys::xc_hypercall_buffer_t,
    pages: i32,
}

// SAFETY: the buffer is plain locked memory owned by this value; see `Xc`'s Send.
unsafe impl Send for HypercallBuffer {}

// SAFETY: a mapping is plain memory owned by this value; see `Xc`'s Send.
unsafe impl Send for Mapping {}

impl HypercallBuffer {
    /// Capacity in bits.
    pub fn bits(&self) -> u64 {
        u64::try_from(self.pages).unwrap_or(0) * 4096 * 8
    }

    /// The buffer as 64-bit words (the bitmap Xen wrote: bit i of word i/64 = gfn i).
    pub fn words(&self) -> &[u64] {
        let n = usize::try_from(self.pages).unwrap_or(0) * 4096 / 8;
        // SAFETY: `hbuf` points to `pages` page-aligned pages allocated by libxenctrl and
        // owned by `self`; u64 alignment holds; the slice lives as long as `&self`.
        unsafe { std::slice::from_raw_parts(self.raw.hbuf.cast::<u64>(), n) }
    }
}

impl Drop for HypercallBuffer {
    fn drop(&mut self) {
        // SAFETY: allocated by xc__hypercall_buffer_alloc_pages on `xch` with `pages`
        // pages; freed once. The owning XenDomain drops it before its Xc (field order).
        unsafe {
            sys::xc__hypercall_buffer_free_pages(self.xch.as_ptr(), &mut self.raw, self.pages)
        };
    }
}

/// A read-only foreign mapping of some gfns, unmapped on drop. Must be dropped before the
/// [`Xc`] that made it (the owner keeps it in a field declared before its `Xc`).
#[derive(Debug)]
pub struct Mapping {
    fmem: NonNull<sys::xenforeignmemory_handle>,
    ptr: NonNull<u8>,
    pages: usize,
    /// errno per frame (0: mapped).
    pub errs: Vec<i32>,
}

impl Mapping {
    /// Frame `i` of the mapping, or None when it could not be mapped (a hole).
    pub fn page(&self, i: usize) -> Option<&[u8]> {
        if i >= self.pages || self.errs[i] != 0 {
            return None;
        }
        // SAFETY: frame `i` is mapped (its err is 0) for the mapping's lifetime: 4096
        // readable bytes at `ptr + i * 4096`. Frames that failed are never touched
        // (reading them would fault).
        Some(unsafe { std::slice::from_raw_parts(self.ptr.as_ptr().add(i * 4096), 4096) })
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: `ptr`/`pages` are exactly what xenforeignmemory_map returned, and the
        // handle is still open (the owner drops mappings before its Xc).
        unsafe {
            sys::xenforeignmemory_unmap(self.fmem.as_ptr(), self.ptr.as_ptr().cast(), self.pages)
        };
    }
}
