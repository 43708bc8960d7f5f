//! Stand-ins for the tests of code that takes a guest (the `test-support` feature, which
//! only dev-dependencies turn on: nothing here is built into the daemons).

use ha_codec::bitmap::PageBitmap;

use crate::domain::{Domain, DomainError};

/// A guest that never runs: always paused and healthy, its memory a flat byte vector read
/// through [`Domain::read_memory`] (and the trait's default `read_pages`), no dirty pages,
/// an empty saved state, a fixed list of host interfaces, and a fixed count of pages
/// written behind its back while held ([`Domain::written_since_harvest`]).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StubDomain {
    /// The guest's memory.
    pub memory: Vec<u8>,
    /// What [`Domain::net_interfaces`] returns; `None`: the guest cannot list them
    /// ([`DomainError::NoCapability`]).
    pub vifs: Option<Vec<String>>,
    /// What [`Domain::written_since_harvest`] returns.
    pub written: u64,
}

impl StubDomain {
    /// A guest of `memory` and no network interfaces.
    pub fn with_memory(memory: Vec<u8>) -> Self {
        Self {
            memory,
            vifs: Some(Vec::new()),
            written: 0,
        }
    }

    /// A guest without memory whose host interfaces are `vifs` (`None`: it cannot list
    /// them).
    pub fn with_vifs(vifs: Option<Vec<String>>) -> Self {
        Self {
            memory: Vec::new(),
            vifs,
            written: 0,
        }
    }
}

impl Domain for StubDomain {
    fn memory_size(&self) -> u64 {
        self.memory.len() as u64
    }

    fn read_memory(&self, gpa: u64, buf: &mut [u8]) -> Result<(), DomainError> {
        let range = usize::try_from(gpa)
            .ok()
            .and_then(|at| Some(at..at.checked_add(buf.len())?));
        let src = range
            .and_then(|r| self.memory.get(r))
            .ok_or(DomainError::OutOfRange {
                gpa,
                len: buf.len() as u64,
            })?;
        buf.copy_from_slice(src);
        Ok(())
    }

    fn pause(&mut self) -> Result<(), DomainError> {
        Ok(())
    }

    fn resume(&mut self) -> Result<(), DomainError> {
        Ok(())
    }

    fn is_paused(&self) -> bool {
        true
    }

    fn harvest_dirty(&mut self, _dirty: &mut PageBitmap) -> Result<(), DomainError> {
        Ok(())
    }

    fn written_since_harvest(&mut self) -> Result<u64, DomainError> {
        Ok(self.written)
    }

    fn save_state(&mut self) -> Result<Vec<u8>, DomainError> {
        Ok(Vec::new())
    }

    fn check_health(&self) -> Result<(), DomainError> {
        Ok(())
    }

    fn net_interfaces(&self) -> Result<Vec<String>, DomainError> {
        self.vifs
            .clone()
            .ok_or(DomainError::NoCapability("a vif list"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn memory_reads_stay_inside_and_vifs_are_as_given() {
        let d = StubDomain::with_memory((0..=255u8).collect());
        let mut b = [0u8; 4];
        d.read_memory(252, &mut b).unwrap();
        assert_eq!(b, [252, 253, 254, 255]);
        assert!(matches!(
            d.read_memory(253, &mut b),
            Err(DomainError::OutOfRange { gpa: 253, len: 4 })
        ));
        assert!(matches!(
            d.read_memory(u64::MAX, &mut b),
            Err(DomainError::OutOfRange { .. })
        ));
        assert_eq!(d.net_interfaces().unwrap(), Vec::<String>::new());
        let none = StubDomain::with_vifs(None);
        assert!(matches!(
            none.net_interfaces(),
            Err(DomainError::NoCapability(_))
        ));
        assert_eq!(none.memory_size(), 0);
    }
}
