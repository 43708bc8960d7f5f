//! Which hypervisor backend runs a guest: KVM, the simulated guest, or Xen.
//!
//! The kind is named on both daemons' command lines (`--guest`) and travels in the
//! session's Hello, so that a primary and a backup of different backends are refused at the
//! handshake rather than at failover. Opening a backend of a kind (its availability probe,
//! its `DomainFactory`) is the `ha-backend` crate's job; the kind itself lives here so that
//! the session can carry it.

/// Errors naming a backend kind.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BackendKindError {
    /// A name that is not a backend's.
    #[error("{0:?} is not a guest backend (kvm, sim, xen)")]
    Unknown(String),
    /// A wire number that is not a backend's.
    #[error("{0} is not a guest backend's number")]
    UnknownNumber(u8),
}

/// A hypervisor backend.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[repr(u8)]
pub enum BackendKind {
    /// KVM: Castor's own minimal VMM on `/dev/kvm`.
    Kvm = 0,
    /// The simulated guest: memory in the process and a workload thread; no hypervisor.
    Sim = 1,
    /// Xen: an existing domain, protected from dom0 through libxenctrl.
    Xen = 2,
}

impl BackendKind {
    /// Every kind, in wire-number order.
    pub const ALL: [BackendKind; 3] = [BackendKind::Kvm, BackendKind::Sim, BackendKind::Xen];

    /// The command-line name: "kvm", "sim" or "xen".
    pub fn name(self) -> &'static str {
        match self {
            BackendKind::Kvm => "kvm",
            BackendKind::Sim => "sim",
            BackendKind::Xen => "xen",
        }
    }

    /// Whether this backend's guests are the built-in workload guests, whose status page
    /// and output ring sit at the guest ABI's addresses in memory (KVM and sim); a Xen
    /// domain is the operator's own guest, and nothing is read at those addresses.
    pub fn runs_builtin_guests(self) -> bool {
        matches!(self, BackendKind::Kvm | BackendKind::Sim)
    }

    /// The layout of this backend's guests, as the session's Hello carries it.
    pub fn guest_layout(self) -> GuestLayout {
        if self.runs_builtin_guests() {
            GuestLayout::BuiltIn {
                abi: ha_workloads::guest_abi::ABI_VERSION,
            }
        } else {
            GuestLayout::Opaque
        }
    }

    /// The number the session's Hello carries.
    pub fn to_u8(self) -> u8 {
        self as u8
    }

    /// The kind with wire number `n`.
    pub fn from_u8(n: u8) -> Result<Self, BackendKindError> {
        Self::ALL
            .get(usize::from(n))
            .copied()
            .ok_or(BackendKindError::UnknownNumber(n))
    }
}

impl std::fmt::Display for BackendKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for BackendKind {
    type Err = BackendKindError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::ALL
            .into_iter()
            .find(|k| k.name() == s)
            .ok_or_else(|| BackendKindError::Unknown(s.to_string()))
    }
}

/// What the engine may know of a guest's memory besides its size: whether the guest is a
/// built-in workload guest with a status page and an output ring at the addresses of a
/// version of the guest ABI, or the operator's own guest whose memory is opaque.
///
/// Both sides of a session must agree: a backup of another ABI version would read the
/// wrong words as progress and output after a failover.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum GuestLayout {
    /// A built-in workload guest of guest ABI version `abi`.
    BuiltIn {
        /// The guest ABI version (never 0).
        abi: u32,
    },
    /// A guest whose memory Castor copies but does not read (a Xen Linux guest).
    Opaque,
}

impl GuestLayout {
    /// The u32 the Hello carries: 0 for an opaque guest, else the ABI version.
    pub fn to_u32(self) -> u32 {
        match self {
            GuestLayout::BuiltIn { abi } => abi,
            GuestLayout::Opaque => 0,
        }
    }

    /// The layout the Hello's u32 names.
    pub fn from_u32(n: u32) -> Self {
        match n {
            0 => GuestLayout::Opaque,
            abi => GuestLayout::BuiltIn { abi },
        }
    }
}

impl std::fmt::Display for GuestLayout {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            GuestLayout::BuiltIn { abi } => write!(f, "built-in guest ABI v{abi}"),
            GuestLayout::Opaque => f.write_str("opaque guest memory"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_numbers_round_trip() {
        for k in BackendKind::ALL {
            assert_eq!(k.name().parse::<BackendKind>(), Ok(k));
            assert_eq!(k.to_string(), k.name());
            assert_eq!(BackendKind::from_u8(k.to_u8()), Ok(k));
        }
        assert_eq!(
            [BackendKind::Kvm, BackendKind::Sim, BackendKind::Xen].map(BackendKind::to_u8),
            [0, 1, 2]
        );
    }

    #[test]
    fn unknown_names_and_numbers_are_refused() {
        assert_eq!(
            "KVM".parse::<BackendKind>().unwrap_err().to_string(),
            "\"KVM\" is not a guest backend (kvm, sim, xen)"
        );
        assert_eq!(
            BackendKind::from_u8(3),
            Err(BackendKindError::UnknownNumber(3))
        );
    }

    #[test]
    fn layouts_round_trip_and_follow_the_backend() {
        for l in [GuestLayout::Opaque, GuestLayout::BuiltIn { abi: 2 }] {
            assert_eq!(GuestLayout::from_u32(l.to_u32()), l);
        }
        assert_eq!(BackendKind::Xen.guest_layout(), GuestLayout::Opaque);
        assert_eq!(
            BackendKind::Kvm.guest_layout(),
            GuestLayout::BuiltIn {
                abi: ha_workloads::guest_abi::ABI_VERSION
            }
        );
        assert_eq!(
            BackendKind::Sim.guest_layout().to_string(),
            format!(
                "built-in guest ABI v{}",
                ha_workloads::guest_abi::ABI_VERSION
            )
        );
    }
}
