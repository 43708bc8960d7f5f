//! A Xen guest's disk served by Castor ([`ha_nbd`]): on the primary, its image served to
//! `/dev/nbdN` before the domain starts, and the domain's disks checked against it; on the
//! backup, the replica served to the same device before `xl restore` builds the domain
//! from the same xl config.
//!
//! A domain with a disk Castor does not serve is refused (its writes would not be
//! replicated, and a failover would lose or tear them) unless the operator says so
//! (`--xen-unreplicated-disks`), which is logged as an error.

use std::path::{Path, PathBuf};
use std::process::Command;

use ha_guest::domain::{Devices, Domain, DomainError, DomainFactory, GuestSpec};
use ha_guest::image::GuestImage;
use ha_nbd::{Device, Image, ServedDisk, ServedDomain, Server};

/// Errors serving a Xen guest's disk or checking the domain's disks.
#[derive(Debug, thiserror::Error)]
pub enum XenDiskError {
    /// The image cannot be served.
    #[error("cannot serve the disk {0}")]
    Serve(PathBuf, #[source] ha_nbd::ExportError),
    /// The device cannot be attached to the server.
    #[error("cannot attach the disk's NBD device")]
    Attach(#[source] ha_nbd::AttachError),
    /// A disk image for a Xen guest without the device that serves it.
    #[error(
        "--disk with --guest xen needs --nbd-device (the /dev/nbdN the domU's xl config names)"
    )]
    NoDevice,
    /// A device without an image to serve.
    #[error("--nbd-device needs --disk (the image to serve)")]
    NoImage,
    /// The device with a guest that is not a Xen domain.
    #[error("--nbd-device is for --guest xen (a KVM guest's disk is its virtio-blk device)")]
    NotXen,
    /// `xl list -l` cannot be run or read.
    #[error("cannot read the disks of the Xen domain {domain} (xl list -l): {why}")]
    List {
        /// The domain.
        domain: String,
        /// Why.
        why: String,
    },
    /// The domain has disks Castor does not serve.
    #[error(
        "the Xen domain {domain} has disks Castor does not replicate: {disks:?} (serve its \
         disk with --disk and --nbd-device, or accept the loss with --xen-unreplicated-disks)"
    )]
    Unreplicated {
        /// The domain.
        domain: String,
        /// The disks' backend paths.
        disks: Vec<String>,
    },
    /// The domain's disk frontend did not connect within `--xen-wait`.
    #[error(
        "the Xen domain {domain}'s disk did not connect within {wait:?} (xl block-list: {state})"
    )]
    NotConnected {
        /// The domain.
        domain: String,
        /// The wait.
        wait: std::time::Duration,
        /// What `xl block-list` said last.
        state: String,
    },
    /// The domain's disk maps its buffers persistently, behind Xen's dirty log.
    #[error(
        "the Xen domain {domain}'s disks {disks:?} use persistent grants: xen-blkback writes \
         what the guest reads from its disk into frames it keeps mapped, which Xen's dirty \
         log does not see, so checkpoints would miss them; turn them off in dom0 before the \
         domain is created (echo N > /sys/module/xen_blkback/parameters/feature_persistent, \
         or load xen-blkback with feature_persistent=0)"
    )]
    PersistentGrants {
        /// The domain.
        domain: String,
        /// The disks' device ids.
        disks: Vec<String>,
    },
    /// The domain does not use the served device.
    #[error(
        "the Xen domain {domain} does not use {device} (its disks: {disks:?}): check its xl config's disk = ['phy:{device},…']"
    )]
    Unused {
        /// The domain.
        domain: String,
        /// The served device.
        device: PathBuf,
        /// The disks it has.
        disks: Vec<String>,
    },
}

/// The Unix socket the disk of `device` is served on: `$TMPDIR/castor-nbdN.sock`.
pub fn socket_for(device: &Path) -> PathBuf {
    let name = device
        .file_name()
        .map_or_else(|| "nbd".into(), |n| n.to_string_lossy().into_owned());
    std::env::temp_dir().join(format!("castor-{name}.sock"))
}

/// Check that `device` exists and is free (the backup's start, long before a failover).
pub fn check_device(device: &Path) -> Result<(), XenDiskError> {
    ha_nbd::attach::check_free(device).map_err(XenDiskError::Attach)
}

/// An image served and attached to `device`, not yet wrapped around a domain.
#[derive(Debug)]
pub struct Served {
    disk: ServedDisk,
    server: Server,
    device: Device,
}

impl Served {
    /// Serve `image` on [`socket_for`] `device` and attach `device` to it.
    pub fn start(image: &Path, device: &Path) -> Result<Self, XenDiskError> {
        // Before anything is made: a missing or busy device is the likeliest mistake.
        check_device(device)?;
        let img = Image::open(image).map_err(|e| XenDiskError::Serve(image.to_owned(), e))?;
        let socket = socket_for(device);
        let server = Server::serve(img.clone(), &socket, ha_nbd::EXPORT_NAME)
            .map_err(|e| XenDiskError::Serve(image.to_owned(), e))?;
        let device =
            Device::attach(device, &socket, ha_nbd::EXPORT_NAME).map_err(XenDiskError::Attach)?;
        tracing::info!(
            disk = %image.display(),
            device = %device.path().display(),
            socket = %socket.display(),
            "serving the guest's disk"
        );
        Ok(Self {
            disk: ServedDisk(img),
            server,
            device,
        })
    }

    /// The attached device.
    pub fn device(&self) -> &Path {
        self.device.path()
    }

    /// `domain` with this disk.
    pub fn wrap(self, domain: Box<dyn Domain>) -> Box<dyn Domain> {
        Box::new(ServedDomain::new(
            domain,
            self.disk,
            self.server,
            Some(self.device),
        ))
    }
}

/// The backend paths of the disks in `xl list -l`'s JSON for one domain.
pub fn disk_paths(json: &str) -> Result<Vec<String>, String> {
    let v: serde_json::Value = serde_json::from_str(json).map_err(|e| format!("not JSON: {e}"))?;
    let dom = v
        .as_array()
        .and_then(|a| a.first())
        .ok_or("no domain in the list")?;
    let disks = match dom.pointer("/config/disks") {
        None | Some(serde_json::Value::Null) => return Ok(Vec::new()),
        Some(d) => d.as_array().ok_or("config.disks is not a list")?,
    };
    disks
        .iter()
        .map(|d| {
            d.get("pdev_path")
                .and_then(|p| p.as_str())
                .map(str::to_string)
                .ok_or_else(|| "a disk without pdev_path".to_string())
        })
        .collect()
}

/// Whether every disk in `xl block-list`'s output is connected (state 4) and there is one.
pub fn all_connected(block_list: &str) -> bool {
    let states: Vec<&str> = block_list
        .lines()
        .skip(1)
        .filter_map(|l| l.split_whitespace().nth(3))
        .collect();
    !states.is_empty() && states.iter().all(|s| *s == "4")
}

/// `xl block-list DOMAIN`'s output: Ok when the guest's disks are all connected (its
/// kernel runs, with its block frontend), Err with what it said otherwise.
pub fn disks_connected(domain: &str) -> Result<(), String> {
    let out = Command::new("xl")
        .args(["block-list", domain])
        .output()
        .map_err(|e| e.to_string())?;
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    if out.status.success() && all_connected(&text) {
        Ok(())
    } else {
        let err = String::from_utf8_lossy(&out.stderr);
        Err(format!("{} {}", text.trim(), err.trim()).trim().to_string())
    }
}

/// The domain id in `xl list -l`'s JSON for one domain.
pub fn domid_of(json: &str) -> Result<u64, String> {
    let v: serde_json::Value = serde_json::from_str(json).map_err(|e| format!("not JSON: {e}"))?;
    v.as_array()
        .and_then(|a| a.first())
        .and_then(|d| d.get("domid"))
        .and_then(serde_json::Value::as_u64)
        .ok_or_else(|| "no domid in the list".to_string())
}

/// Whether a disk maps its I/O buffers persistently: its backend offers persistent grants
/// and its frontend takes them (xenstore's `feature-persistent` is 1 on both ends; the
/// backend writes its offer when the frontend connects).
pub fn uses_persistent_grants(backend: Option<&str>, frontend: Option<&str>) -> bool {
    backend.map(str::trim) == Some("1") && frontend.map(str::trim) == Some("1")
}

/// The device ids of `domid`'s disks that use persistent grants ([`uses_persistent_grants`],
/// read from xenstore).
fn persistent_disks(domid: u64) -> Result<Vec<String>, String> {
    let run = |args: &[&str]| -> Option<String> {
        let out = Command::new(args[0]).args(&args[1..]).output().ok()?;
        out.status
            .success()
            .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
    };
    let backend = format!("/local/domain/0/backend/vbd/{domid}");
    let ids = run(&["xenstore-list", &backend])
        .ok_or_else(|| format!("xenstore-list {backend} failed"))?;
    Ok(ids
        .split_whitespace()
        .filter(|id| {
            let b = run(&[
                "xenstore-read",
                &format!("{backend}/{id}/feature-persistent"),
            ]);
            let f = run(&[
                "xenstore-read",
                &format!("/local/domain/{domid}/device/vbd/{id}/feature-persistent"),
            ]);
            uses_persistent_grants(b.as_deref(), f.as_deref())
        })
        .map(str::to_string)
        .collect())
}

/// The disks of the running `domain`, from `xl list -l`, and its domain id.
fn domain_disks(domain: &str) -> Result<(u64, Vec<String>), XenDiskError> {
    let err = |why: String| XenDiskError::List {
        domain: domain.to_string(),
        why,
    };
    let out = Command::new("xl")
        .args(["list", "-l", domain])
        .output()
        .map_err(|e| err(e.to_string()))?;
    if !out.status.success() {
        return Err(err(String::from_utf8_lossy(&out.stderr).trim().to_string()));
    }
    let json = String::from_utf8_lossy(&out.stdout);
    Ok((
        domid_of(&json).map_err(err)?,
        disk_paths(&json).map_err(err)?,
    ))
}

/// Check the domain's disks `disks` against the served `device`: each must be it, unless
/// `allow_unreplicated` (then logged as an error); and a served device must be used.
pub fn check_disks(
    domain: &str,
    disks: &[String],
    device: Option<&Path>,
    allow_unreplicated: bool,
) -> Result<(), XenDiskError> {
    let same = |d: &str, dev: &Path| {
        Path::new(d) == dev
            || std::fs::canonicalize(d)
                .ok()
                .zip(std::fs::canonicalize(dev).ok())
                .is_some_and(|(a, b)| a == b)
    };
    let other: Vec<String> = disks
        .iter()
        .filter(|d| device.is_none_or(|dev| !same(d, dev)))
        .cloned()
        .collect();
    if let Some(dev) = device
        && !disks.iter().any(|d| same(d, dev))
    {
        return Err(XenDiskError::Unused {
            domain: domain.to_string(),
            device: dev.to_owned(),
            disks: disks.to_vec(),
        });
    }
    if !other.is_empty() {
        if !allow_unreplicated {
            return Err(XenDiskError::Unreplicated {
                domain: domain.to_string(),
                disks: other,
            });
        }
        tracing::error!(
            domain,
            disks = ?other,
            "UNREPLICATED DISKS (--xen-unreplicated-disks): their writes are not replicated; \
             a failover loses or tears them"
        );
    }
    Ok(())
}

/// [`check_disks`] on the running domain's disks; with a served `device`, also that no
/// disk uses persistent grants (xen-blkback's writes into such frames bypass the dirty
/// log: a checkpoint would miss what the guest read from its disk).
pub fn check_domain(
    domain: &str,
    device: Option<&Path>,
    allow_unreplicated: bool,
) -> Result<(), XenDiskError> {
    let (domid, disks) = domain_disks(domain)?;
    check_disks(domain, &disks, device, allow_unreplicated)?;
    if device.is_some() {
        let persistent = persistent_disks(domid).map_err(|why| XenDiskError::List {
            domain: domain.to_string(),
            why,
        })?;
        if !persistent.is_empty() {
            return Err(XenDiskError::PersistentGrants {
                domain: domain.to_string(),
                disks: persistent,
            });
        }
    }
    Ok(())
}

/// A factory whose restored guests get their replica served on a device first (the
/// backup's Xen factory with `--nbd-device`).
pub struct ServingFactory {
    inner: Box<dyn DomainFactory>,
    device: PathBuf,
}

impl std::fmt::Debug for ServingFactory {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServingFactory")
            .field("inner", &self.inner.name())
            .field("device", &self.device)
            .finish()
    }
}

impl ServingFactory {
    /// `inner`, with each restored guest's disk replica served to `device`.
    pub fn new(inner: Box<dyn DomainFactory>, device: PathBuf) -> Self {
        Self { inner, device }
    }

    /// Serve the replica of `devices` (there must be one) before `restore` runs; the inner
    /// backend restores with no devices of Castor's (the domain's disk is the device its
    /// xl config names, now the replica).
    fn serve_then(
        &self,
        devices: &Devices,
        restore: impl FnOnce(&Devices) -> Result<Box<dyn Domain>, DomainError>,
    ) -> Result<Box<dyn Domain>, DomainError> {
        let disk_err = |e: XenDiskError| DomainError::Backend {
            op: "serve the disk replica",
            source: Box::new(e),
        };
        let replica = devices
            .disk
            .as_deref()
            .ok_or_else(|| disk_err(XenDiskError::NoImage))?;
        let served = Served::start(replica, &self.device).map_err(disk_err)?;
        let d = restore(&Devices::default())?;
        Ok(served.wrap(d))
    }
}

impl DomainFactory for ServingFactory {
    fn name(&self) -> &'static str {
        self.inner.name()
    }

    fn create(&self, spec: &GuestSpec) -> Result<Box<dyn Domain>, DomainError> {
        self.inner.create(spec)
    }

    fn restore(
        &self,
        image: &[u8],
        state: &[u8],
        devices: &Devices,
    ) -> Result<Box<dyn Domain>, DomainError> {
        self.serve_then(devices, |d| self.inner.restore(image, state, d))
    }

    fn restore_image(
        &self,
        image: GuestImage,
        state: &[u8],
        devices: &Devices,
    ) -> Result<Box<dyn Domain>, DomainError> {
        self.serve_then(devices, |d| self.inner.restore_image(image, state, d))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What `xl list -l` prints for a domU with one phy disk (trimmed).
    const XL_LIST: &str = r#"[
    {
        "domid": 3,
        "config": {
            "c_info": { "type": "pvh", "name": "castor-domu" },
            "disks": [
                { "pdev_path": "/dev/nbd0", "vdev": "xvda", "backend": "phy", "format": "raw", "readwrite": 1 }
            ],
            "nics": []
        }
    }
]"#;

    #[test]
    fn a_disk_uses_persistent_grants_only_when_both_ends_say_so() {
        assert!(uses_persistent_grants(Some("1"), Some("1\n")));
        assert!(!uses_persistent_grants(Some("0"), Some("1")));
        assert!(!uses_persistent_grants(Some("1"), Some("0")));
        assert!(!uses_persistent_grants(None, Some("1")));
        assert!(!uses_persistent_grants(Some("1"), None));
        let e = XenDiskError::PersistentGrants {
            domain: "castor-domu".into(),
            disks: vec!["51712".into()],
        }
        .to_string();
        assert!(e.contains("castor-domu") && e.contains("51712"), "{e}");
        assert!(e.contains("feature_persistent"), "{e}");
    }

    #[test]
    fn the_disks_of_a_domain_are_read_from_xl_list() {
        assert_eq!(domid_of(XL_LIST).unwrap(), 3);
        assert!(domid_of("[]").is_err());
        assert_eq!(disk_paths(XL_LIST).unwrap(), vec!["/dev/nbd0".to_string()]);
        let none = r#"[{"domid": 1, "config": {"c_info": {}}}]"#;
        assert!(disk_paths(none).unwrap().is_empty());
        assert!(disk_paths("[]").is_err());
        assert!(disk_paths("xl: error").is_err());
        assert!(disk_paths(r#"[{"config": {"disks": [{"vdev": "xvda"}]}}]"#).is_err());
    }

    #[test]
    fn a_disk_castor_does_not_serve_is_refused_unless_allowed() {
        let disks = vec!["/dev/nbd0".to_string(), "/srv/other.img".to_string()];
        let dev = Path::new("/dev/nbd0");
        let e = check_disks("d", &disks, Some(dev), false).unwrap_err();
        assert!(
            matches!(&e, XenDiskError::Unreplicated { disks, .. } if disks == &["/srv/other.img"]),
            "{e}"
        );
        assert!(check_disks("d", &disks, Some(dev), true).is_ok());
        // No served disk at all: every disk is unreplicated.
        assert!(check_disks("d", &disks[..1], None, false).is_err());
        assert!(check_disks("d", &[], None, false).is_ok());
        // The served device must be the domain's.
        let e = check_disks("d", &disks[1..], Some(dev), true).unwrap_err();
        assert!(e.to_string().contains("does not use /dev/nbd0"), "{e}");
        assert!(check_disks("d", &disks[..1], Some(dev), false).is_ok());
    }

    #[test]
    fn a_disk_is_ready_once_every_frontend_is_connected() {
        let head = "Vdev  BE  handle state evt-ch ring-ref BE-path\n";
        let row = |state: u8| {
            format!(
                "51712 0   2      {state}     9      8        /local/domain/0/backend/vbd/2/51712\n"
            )
        };
        assert!(all_connected(&format!("{head}{}", row(4))));
        assert!(!all_connected(&format!("{head}{}", row(3))));
        assert!(!all_connected(&format!("{head}{}{}", row(4), row(1))));
        assert!(!all_connected(head), "no disk at all");
    }

    #[test]
    fn the_socket_is_named_after_the_device() {
        assert_eq!(
            socket_for(Path::new("/dev/nbd3")),
            std::env::temp_dir().join("castor-nbd3.sock")
        );
    }
}
