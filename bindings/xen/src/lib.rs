//! `ha-xen`: Castor's Xen backend behind the `Domain` trait.
//!
//! Castor protects an EXISTING Xen domain (a PVH or HVM domU started with `xl create`):
//! the primary attaches to it by name or id (`ha-primary --guest xen --xen-domain NAME`),
//! pauses it with `xc_domain_pause`, harvests Xen's log-dirty bitmap with
//! `XEN_DOMCTL_SHADOW_OP_CLEAN`, reads dirty frames through `xenforeignmemory_map` by gfn,
//! and saves the HVM context, the HVM params and the TSC info. By default each checkpoint
//! is of a *suspended* guest (its kernel suspends itself at Castor's request and resumes
//! with the suspend cancelled), so that on the backup [`XenFactory::restore`] can write the
//! committed checkpoint as an xl save file and build the new domain with `xl restore`.
//!
//! | module | concern |
//! |---|---|
//! | [`state`] | the saved state blob (always built) |
//! | [`stream`] | a checkpoint as an xl save file (libxl v2 / libxc v3 stream; always built) |
//! | `xs` | xenstore: the suspend request (`xen` feature) |
//! | `xc` | safe wrappers over libxenctrl / libxenforeignmemory (`xen` feature) |
//! | `domain` | `XenDomain`, the `Domain` implementation (`xen` feature) |
//!
//! The real backend needs the `xen` cargo feature (bindgen over libxenctrl's headers:
//! Debian's `libxen-dev` and `libclang-dev`). Without it [`XenFactory`] still exists and
//! every call returns `DomainError::Unavailable` ("Xen support not built"). On a machine
//! without Xen the error is "Xen is not available: cannot open /dev/xen/privcmd: …".
//! docs/XEN.md says how to run a pair and what was verified.

#![warn(missing_docs)]

pub mod state;
pub mod stream;

#[cfg(feature = "xen")]
pub mod domain;
#[cfg(feature = "xen")]
mod restore;
#[cfg(feature = "xen")]
pub mod xc;
#[cfg(feature = "xen")]
pub mod xs;

#[cfg(feature = "xen")]
pub use domain::XenDomain;

use std::path::PathBuf;

use ha_guest::domain::{Devices, Domain, DomainError, DomainFactory, GuestSpec};

/// Whether this build has the real backend (the `xen` feature).
pub const BUILT_WITH_XEN: bool = cfg!(feature = "xen");

/// The device every libxenctrl call goes through; dom0 of a Xen host has it (in every
/// build, so that a build without the `xen` feature can still say what is missing).
pub const PRIVCMD_DEVICE: &str = "/dev/xen/privcmd";

/// The error every call returns in a build without the `xen` feature.
pub fn not_built() -> DomainError {
    DomainError::Unavailable {
        what: "Xen".into(),
        hint: "Xen support not built: rebuild with --features xen".into(),
        source: None,
    }
}

/// Creates (attaches to) and restores Xen domains (`--guest xen`).
#[derive(Clone, Debug, Default)]
pub struct XenFactory {
    /// The domain to protect (name or id), for [`DomainFactory::create`].
    pub domain: Option<String>,
    /// The domU's xl config file, used by [`DomainFactory::restore`] to name the new
    /// domain and give it its kernel and devices.
    pub xl_config: Option<PathBuf>,
    /// Where the restore writes its xl save file (default: the system temp dir).
    pub work_dir: Option<PathBuf>,
}

impl XenFactory {
    /// A factory with nothing configured.
    pub fn new() -> Self {
        Self::default()
    }

    /// Protect this domain (name or numeric id).
    pub fn with_domain(mut self, domain: impl Into<String>) -> Self {
        self.domain = Some(domain.into());
        self
    }

    /// Restore with this xl config file.
    pub fn with_xl_config(mut self, path: impl Into<PathBuf>) -> Self {
        self.xl_config = Some(path.into());
        self
    }
}

/// Resolve a domain name or id to a domain id: a number is taken as it is, a name is asked
/// of `xl domid`.
pub fn resolve_domain(name_or_id: &str) -> Result<u32, DomainError> {
    if let Ok(id) = name_or_id.parse::<u32>() {
        return Ok(id);
    }
    let out = std::process::Command::new("xl")
        .args(["domid", name_or_id])
        .output()
        .map_err(|e| DomainError::Backend {
            op: "xl domid",
            source: Box::new(e),
        })?;
    let text = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        return Err(DomainError::BadState(format!(
            "no Xen domain named {name_or_id:?} (xl domid: {})",
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    text.trim().parse().map_err(|_| {
        DomainError::BadState(format!("xl domid {name_or_id} printed {:?}", text.trim()))
    })
}

/// How a protected Xen guest is held still for each checkpoint.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Hold {
    /// Ask the guest's kernel to suspend itself (`control/shutdown = suspend`), wait for it
    /// up to this long, and resume it with the suspend cancelled. Checkpoints a restored
    /// domain can run from (the default).
    Suspend(std::time::Duration),
    /// `xc_domain_pause`: the guest does not know. Cheaper, but a domain restored from such
    /// a checkpoint has lost its event channels and grant tables (docs/XEN.md): for
    /// replication tests, not for failover.
    Pause,
}

impl Default for Hold {
    fn default() -> Self {
        Self::Suspend(std::time::Duration::from_secs(30))
    }
}

/// Attach to an existing domain by name or id, holding it for checkpoints as `hold` says.
#[cfg(feature = "xen")]
///
/// The frames Xen writes behind the dirty log are learned with the guest held the same way
/// (see [`XenDomain::learn_hidden_writes`]).
#[cfg(feature = "xen")]
pub fn attach_holding(name_or_id: &str, hold: Hold) -> Result<XenDomain, DomainError> {
    // Fail on a missing hypervisor before asking xl anything.
    // Fail on a missing hypervisor before asking xl anything.
    xc::Xc::open().map_err(|e| match e {
        xc::XcError::Privcmd(source) => DomainError::Unavailable {
            what: "Xen".into(),
            hint: format!("cannot open {}", xc::PRIVCMD),
            source: Some(Box::new(source)),
        },
        other => DomainError::Backend {
            op: "xc_interface_open",
            source: Box::new(other),
        },
    })?;
    let mut d = XenDomain::attach(resolve_domain(name_or_id)?)?;
    if let Hold::Suspend(timeout) = hold {
        d.set_cooperative(timeout)?;
    }
    d.learn_hidden_writes()?;
    Ok(d)
}

/// Attach to an existing domain by name or id; checkpoints pause it (see
/// [`attach_holding`]).
#[cfg(feature = "xen")]
pub fn attach(name_or_id: &str) -> Result<XenDomain, DomainError> {
    attach_holding(name_or_id, Hold::Pause)
}

/// Attach to an existing domain by name or id (this build has no Xen support).
#[cfg(not(feature = "xen"))]
pub fn attach(_name_or_id: &str) -> Result<Box<dyn Domain>, DomainError> {
    Err(not_built())
}

/// Attach to an existing domain by name or id, holding it as `hold` says, boxed (the same
/// call with or without the `xen` feature; without it, `DomainError::Unavailable`).
pub fn attach_boxed(name_or_id: &str, hold: Hold) -> Result<Box<dyn Domain>, DomainError> {
    #[cfg(feature = "xen")]
    {
        Ok(Box::new(attach_holding(name_or_id, hold)?))
    }
    #[cfg(not(feature = "xen"))]
    {
        let _ = hold;
        attach(name_or_id)
    }
}

impl DomainFactory for XenFactory {
    fn name(&self) -> &'static str {
        "xen"
    }

    /// Attach to the configured existing domain (Castor does not build Xen guests).
    fn create(&self, _spec: &GuestSpec) -> Result<Box<dyn Domain>, DomainError> {
        if !BUILT_WITH_XEN {
            return Err(not_built());
        }
        let Some(target) = &self.domain else {
            return Err(DomainError::BadState(
                "the Xen backend protects an existing domain: give --xen-domain NAME_OR_ID".into(),
            ));
        };
        #[cfg(feature = "xen")]
        {
            let mut d = attach(target)?;
            // A new guest starts paused; `resume` lets it go.
            d.pause()?;
            Ok(Box::new(d))
        }
        #[cfg(not(feature = "xen"))]
        attach(target)
    }

    /// Build a new domain from a committed checkpoint with `xl restore` (see
    /// `restore.rs`); it comes back paused.
    fn restore(
        &self,
        image: &[u8],
        state: &[u8],
        devices: &Devices,
    ) -> Result<Box<dyn Domain>, DomainError> {
        if devices.disk.is_some() {
            return Err(DomainError::NoCapability(
                "disk on the Xen backend (issue 20)",
            ));
        }
        #[cfg(feature = "xen")]
        {
            Ok(Box::new(restore::restore(self, image, state)?))
        }
        #[cfg(not(feature = "xen"))]
        {
            let _ = (image, state);
            Err(not_built())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numeric_ids_resolve_without_xl() {
        assert_eq!(resolve_domain("7").expect("a number"), 7);
    }

    #[cfg(not(feature = "xen"))]
    #[test]
    fn without_the_feature_every_call_says_so() {
        let f = XenFactory::new().with_domain("guest");
        let e = f
            .restore(&[], &[], &Devices::default())
            .err()
            .expect("unavailable");
        assert_eq!(
            e.to_string(),
            "Xen is not available: Xen support not built: rebuild with --features xen"
        );
        assert!(matches!(
            f.create(&GuestSpec::idle()),
            Err(DomainError::Unavailable { .. })
        ));
        assert!(matches!(attach("1"), Err(DomainError::Unavailable { .. })));
    }

    #[cfg(feature = "xen")]
    #[test]
    fn without_a_hypervisor_the_error_names_privcmd() {
        if std::path::Path::new(xc::PRIVCMD).exists() {
            return; // dom0: nothing to check here
        }
        let e = attach("1").expect_err("no Xen here");
        let mut msg = e.to_string();
        if let Some(s) = std::error::Error::source(&e) {
            msg.push_str(&format!(": {s}"));
        }
        assert!(
            msg.starts_with("Xen is not available: cannot open /dev/xen/privcmd: "),
            "{msg}"
        );
    }
}
