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
}
