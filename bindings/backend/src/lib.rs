//! `ha-backend`: the one place that opens a guest backend by kind.
//!
//! Both daemons and the benchmarks name a backend with `--guest kvm|sim|xen`
//! ([`BackendKind`]); everything that depends on which one it is happens here, the way
//! Cloud Hypervisor's `hypervisor` crate keeps one `HypervisorType` and one `new()`:
//!
//! - [`probe`]: can this machine, and this build, run the backend? The error says what is
//!   missing and what to do (`--guest sim` without `/dev/kvm`; a build with
//!   `--features xen`, or dom0 of a Xen host, for Xen).
//! - [`factory`]: the backend's [`DomainFactory`] (the backup restores with it; the
//!   benchmarks create unprotected guests with it).
//! - [`open_primary`]: the guest a primary protects, created from a [`GuestSpec`] (KVM,
//!   sim) or attached to as an existing domain (Xen).
//! - [`value_parser`] and [`value_parser_of`]: `--guest` for clap.
//! - [`xendisk`]: a Xen guest's disk served by Castor over NBD (primary and backup).
//!
//! The Xen backend is real only with this crate's `xen` feature (it forwards to ha-xen's);
//! without it Xen is still a kind that parses, and [`probe`] says the build lacks it.

#![warn(missing_docs)]

use std::path::{Path, PathBuf};

use clap::builder::{PossibleValue, PossibleValuesParser, TypedValueParser};
use ha_guest::domain::{Domain, DomainError, DomainFactory, GuestSpec};

pub mod xendisk;

pub use ha_guest::backend::{BackendKind, BackendKindError};
pub use ha_xen::Hold as XenHold;

/// Errors opening a backend.
#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    /// The backend cannot run on this machine or in this build.
    #[error("{} is not available: {why}", title(*.kind))]
    Unavailable {
        /// The backend.
        kind: BackendKind,
        /// What is missing and what to do about it.
        why: String,
        /// The OS error, when there is one.
        #[source]
        source: Option<std::io::Error>,
    },
    /// `--guest xen` names no domain to protect.
    #[error("--guest xen protects an existing domain: give --xen-domain NAME_OR_DOMID")]
    NoXenDomain,
    /// The backend could not create the guest.
    #[error("cannot create the {kind} guest")]
    Create {
        /// The backend.
        kind: BackendKind,
        /// What it said.
        #[source]
        source: DomainError,
    },
    /// The Xen guest's disk cannot be served, or the domain's disks are not all served.
    #[error("the Xen domain's disk")]
    XenDisk(#[from] xendisk::XenDiskError),
    /// The Xen domain could not be attached to.
    #[error("cannot protect the Xen domain {domain:?}")]
    Attach {
        /// The domain's name or id, as given.
        domain: String,
        /// What the backend said.
        #[source]
        source: DomainError,
    },
}

/// The backend's name in messages.
fn title(kind: BackendKind) -> &'static str {
    match kind {
        BackendKind::Kvm => "KVM",
        BackendKind::Sim => "the simulated guest",
        BackendKind::Xen => "Xen",
    }
}

/// Whether `kind` can run here: KVM needs `/dev/kvm` to open read-write; Xen needs a build
/// with the `xen` feature and `/dev/xen/privcmd` (dom0 of a Xen host); the simulated guest
/// runs anywhere.
pub fn probe(kind: BackendKind) -> Result<(), BackendError> {
    match kind {
        BackendKind::Kvm => probe_kvm(Path::new(ha_kvm::KVM_DEVICE)),
        BackendKind::Sim => Ok(()),
        BackendKind::Xen => probe_xen(ha_xen::BUILT_WITH_XEN, Path::new(ha_xen::PRIVCMD_DEVICE)),
    }
}

fn open_rw(device: &Path) -> std::io::Result<()> {
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(device)
        .map(drop)
}

fn probe_kvm(device: &Path) -> Result<(), BackendError> {
    open_rw(device).map_err(|e| BackendError::Unavailable {
        kind: BackendKind::Kvm,
        why: format!(
            "cannot open {} read-write (run with --guest sim for the simulated guest)",
            device.display()
        ),
        source: Some(e),
    })
}

fn probe_xen(built: bool, privcmd: &Path) -> Result<(), BackendError> {
    if !built {
        return Err(BackendError::Unavailable {
            kind: BackendKind::Xen,
            why: "this build has no Xen support (rebuild with --features xen)".into(),
            source: None,
        });
    }
    open_rw(privcmd).map_err(|e| BackendError::Unavailable {
        kind: BackendKind::Xen,
        why: format!(
            "cannot open {} (run in dom0 of a Xen host, as root)",
            privcmd.display()
        ),
        source: Some(e),
    })
}

/// Settings that only some backends take.
#[derive(Clone, Debug)]
pub struct FactoryOptions {
    /// KVM: keep the kernel's dirty log on (the default). Off only to measure its cost: a
    /// guest without it cannot be protected.
    pub dirty_log: bool,
    /// Xen: the protected domU's xl config, which a restore builds the new domain from.
    pub xl_config: Option<PathBuf>,
    /// Xen: the device (`/dev/nbdN`) a restored guest's disk replica is served to before
    /// the restore ([`xendisk::ServingFactory`]); the xl config names it.
    pub nbd_device: Option<PathBuf>,
}

impl Default for FactoryOptions {
    fn default() -> Self {
        Self {
            dirty_log: true,
            xl_config: None,
            nbd_device: None,
        }
    }
}

/// The [`DomainFactory`] of `kind`. It does not probe: a factory of a backend that is not
/// available fails when it creates or restores a guest (call [`probe`] to learn it early).
pub fn factory(kind: BackendKind, options: &FactoryOptions) -> Box<dyn DomainFactory> {
    match kind {
        BackendKind::Kvm => Box::new(ha_kvm::KvmFactory::new().with_dirty_log(options.dirty_log)),
        BackendKind::Sim => Box::new(ha_sim::SimFactory::new()),
        BackendKind::Xen => {
            let mut f = ha_xen::XenFactory::new();
            f.xl_config.clone_from(&options.xl_config);
            match &options.nbd_device {
                Some(dev) => Box::new(xendisk::ServingFactory::new(Box::new(f), dev.clone())),
                None => Box::new(f),
            }
        }
    }
}

/// The guest a primary protects.
#[derive(Clone, Debug)]
pub struct PrimaryGuest {
    /// The built-in workload guest to create (KVM, sim).
    pub spec: GuestSpec,
    /// Xen: the running domain to protect, by name or id (Castor does not build Xen
    /// guests; `spec` does not apply to it).
    pub xen_domain: Option<String>,
    /// Xen: how each checkpoint holds the domain still.
    pub xen_hold: XenHold,
    /// Xen: how long to wait for the domain to start (zero: it must run already).
    pub xen_wait: std::time::Duration,
    /// Xen: serve `spec.devices.disk` over NBD to this device before attaching.
    pub nbd_device: Option<PathBuf>,
    /// Xen: protect a domain with disks Castor does not serve (logged as an error).
    pub unreplicated_disks: bool,
}

/// The guest a primary of `kind` protects: a new guest built from `guest.spec` (KVM, sim;
/// paused until resumed), or the existing Xen domain `guest.xen_domain`, attached to and
/// held for checkpoints as `guest.xen_hold` says. The backend is probed first, so an
/// unavailable one fails with what is missing.
pub fn open_primary(
    kind: BackendKind,
    guest: &PrimaryGuest,
) -> Result<Box<dyn Domain>, BackendError> {
    match kind {
        BackendKind::Kvm | BackendKind::Sim => {
            if guest.nbd_device.is_some() {
                return Err(xendisk::XenDiskError::NotXen.into());
            }
            probe(kind)?;
            factory(kind, &FactoryOptions::default())
                .create(&guest.spec)
                .map_err(|source| BackendError::Create { kind, source })
        }
        BackendKind::Xen => {
            let target = guest
                .xen_domain
                .as_deref()
                .ok_or(BackendError::NoXenDomain)?;
            probe(kind)?;
            // The disk is served first: the domain can start only once its device is there.
            let served = match (&guest.spec.devices.disk, &guest.nbd_device) {
                (Some(image), Some(dev)) => Some(xendisk::Served::start(image, dev)?),
                (Some(_), None) => return Err(xendisk::XenDiskError::NoDevice.into()),
                (None, Some(_)) => return Err(xendisk::XenDiskError::NoImage.into()),
                (None, None) => None,
            };
            let d = attach_waiting(target, guest, served.is_some())?;
            xendisk::check_domain(
                target,
                served.as_ref().map(xendisk::Served::device),
                guest.unreplicated_disks,
            )?;
            tracing::info!(
                domain = target,
                memory_size = d.memory_size(),
                hold = ?guest.xen_hold,
                disk = ?guest.spec.devices.disk,
                "protecting the Xen domain; give the backup --memory {}",
                d.memory_size()
            );
            Ok(match served {
                Some(s) => s.wrap(d),
                None => d,
            })
        }
    }
}

/// Attach to the Xen domain `target`, retrying for up to `guest.xen_wait` while it does
/// not run yet (or has no memory yet: it is being built). With a served disk, only once
/// the guest's disk frontend is connected: its kernel runs and uses the disk.
fn attach_waiting(
    target: &str,
    guest: &PrimaryGuest,
    disk: bool,
) -> Result<Box<dyn Domain>, BackendError> {
    let start = std::time::Instant::now();
    let mut said = false;
    loop {
        let why = match disk.then(|| xendisk::disks_connected(target)) {
            Some(Err(state)) if start.elapsed() >= guest.xen_wait => {
                return Err(xendisk::XenDiskError::NotConnected {
                    domain: target.to_string(),
                    wait: guest.xen_wait,
                    state,
                }
                .into());
            }
            Some(Err(state)) => format!("its disk is not connected yet ({state})"),
            None | Some(Ok(())) => match ha_xen::attach_boxed(target, guest.xen_hold) {
                Ok(d) if d.memory_size() > 0 => return Ok(d),
                Ok(_) => "it has no memory yet".to_string(),
                Err(source) if start.elapsed() >= guest.xen_wait => {
                    return Err(BackendError::Attach {
                        domain: target.to_string(),
                        source,
                    });
                }
                Err(e) => e.to_string(),
            },
        };
        if start.elapsed() >= guest.xen_wait {
            return Err(BackendError::Attach {
                domain: target.to_string(),
                source: DomainError::GuestFault(why),
            });
        }
        if !said {
            tracing::info!(
                domain = target,
                wait_s = guest.xen_wait.as_secs(),
                why,
                "waiting for the Xen domain (--xen-wait)"
            );
            said = true;
        }
        std::thread::sleep(std::time::Duration::from_secs(1));
    }
}

/// A clap value parser for `--guest` that takes every backend kind (listed in `--help`).
pub fn value_parser() -> impl TypedValueParser<Value = BackendKind> {
    value_parser_of(&BackendKind::ALL)
}

/// A clap value parser for `--guest` that takes only `kinds` (a tool that cannot run every
/// backend: the benchmarks run built-in workload guests, which Xen has not). The kinds are
/// listed in `--help`, and any other name is refused with them.
pub fn value_parser_of(kinds: &[BackendKind]) -> impl TypedValueParser<Value = BackendKind> {
    PossibleValuesParser::new(kinds.iter().map(|k| PossibleValue::new(k.name())))
        .try_map(|s| s.parse::<BackendKind>())
}

#[cfg(test)]
mod tests {
    use super::*;
    use ha_daemon::error_chain;

    #[test]
    fn every_kind_has_its_own_factory() {
        for kind in BackendKind::ALL {
            assert_eq!(
                factory(kind, &FactoryOptions::default()).name(),
                kind.name()
            );
        }
    }

    #[test]
    fn the_simulated_guest_runs_anywhere_and_a_missing_device_names_it() {
        assert!(probe(BackendKind::Sim).is_ok());
        let e = probe_kvm(Path::new("/nonexistent/kvm")).unwrap_err();
        assert!(matches!(
            e,
            BackendError::Unavailable {
                kind: BackendKind::Kvm,
                ..
            }
        ));
        assert_eq!(
            e.to_string(),
            "KVM is not available: cannot open /nonexistent/kvm read-write (run with --guest \
             sim for the simulated guest)"
        );
        assert!(error_chain(&e).ends_with("No such file or directory (os error 2)"));
    }

    #[test]
    fn xen_says_whether_the_build_or_the_host_lacks_it() {
        let e = probe_xen(false, Path::new("/dev/null")).unwrap_err();
        assert_eq!(
            e.to_string(),
            "Xen is not available: this build has no Xen support (rebuild with --features xen)"
        );
        let e = probe_xen(true, Path::new("/nonexistent/privcmd")).unwrap_err();
        assert_eq!(
            e.to_string(),
            "Xen is not available: cannot open /nonexistent/privcmd (run in dom0 of a Xen \
             host, as root)"
        );
        // This build's own answer is one of the two.
        if let Err(e) = probe(BackendKind::Xen) {
            let text = e.to_string();
            assert!(
                text.contains(if ha_xen::BUILT_WITH_XEN {
                    ha_xen::PRIVCMD_DEVICE
                } else {
                    "--features xen"
                }),
                "{text}"
            );
        }
    }

    #[test]
    fn a_xen_primary_needs_a_domain_before_anything_else() {
        let guest = PrimaryGuest {
            spec: GuestSpec::idle(),
            xen_domain: None,
            xen_hold: XenHold::Pause,
            xen_wait: std::time::Duration::ZERO,
            nbd_device: None,
            unreplicated_disks: false,
        };
        assert!(matches!(
            open_primary(BackendKind::Xen, &guest),
            Err(BackendError::NoXenDomain)
        ));
    }

    #[test]
    fn a_sim_primary_is_created_paused_from_its_spec() {
        let guest = PrimaryGuest {
            spec: GuestSpec::idle(),
            xen_domain: Some("ignored".into()),
            xen_hold: XenHold::default(),
            xen_wait: std::time::Duration::ZERO,
            nbd_device: None,
            unreplicated_disks: false,
        };
        let served = PrimaryGuest {
            nbd_device: Some("/dev/nbd0".into()),
            ..guest.clone()
        };
        let Err(e) = open_primary(BackendKind::Sim, &served) else {
            panic!("a sim guest with --nbd-device was opened");
        };
        assert_eq!(
            error_chain(&e),
            "the Xen domain's disk: --nbd-device is for --guest xen (a KVM guest's disk is its \
             virtio-blk device)"
        );
        let d = open_primary(BackendKind::Sim, &guest).expect("a sim guest");
        assert_eq!(d.memory_size(), 2 << 20);
        assert!(d.is_paused());
    }

    #[test]
    fn the_clap_parsers_take_the_names_they_list() {
        use clap::{Arg, Command};
        let cmd = |p| {
            Command::new("t").arg(
                Arg::new("guest")
                    .long("guest")
                    .value_parser(p)
                    .default_value("kvm"),
            )
        };
        let all = cmd(clap::builder::ValueParser::new(value_parser()));
        let m = all
            .clone()
            .try_get_matches_from(["t", "--guest", "xen"])
            .expect("xen parses");
        assert_eq!(m.get_one::<BackendKind>("guest"), Some(&BackendKind::Xen));
        let m = all.try_get_matches_from(["t"]).expect("the default parses");
        assert_eq!(m.get_one::<BackendKind>("guest"), Some(&BackendKind::Kvm));
        let some = cmd(clap::builder::ValueParser::new(value_parser_of(&[
            BackendKind::Kvm,
            BackendKind::Sim,
        ])));
        let e = some
            .try_get_matches_from(["t", "--guest", "xen"])
            .expect_err("xen is not offered");
        let text = e.to_string();
        assert!(text.contains("[possible values: kvm, sim]"), "{text}");
    }
}
