//! The backup's restore: build a running Xen domain from a committed image and state.
//!
//! Not implemented yet. The state blob is checked, then a clear error says what is missing:
//! turning the committed image (linear pages of the windows listed in the state) and the
//! state into a Xen migration stream for `xl restore`, and checkpoints the guest takes part
//! in (a suspended guest), without which a restored Linux domU has no event channels,
//! grant tables or shared info (docs/XEN.md).

use ha_common::domain::DomainError;

use crate::XenFactory;
use crate::domain::XenDomain;
use crate::state::SavedState;

/// Build a domain from `image` and `state` (not implemented: see the module docs).
pub fn restore(f: &XenFactory, image: &[u8], state: &[u8]) -> Result<XenDomain, DomainError> {
    let s = SavedState::decode(state).map_err(|e| DomainError::BadState(e.to_string()))?;
    let want = s.windows.len() as u64 * 512 * ha_common::PAGE_SIZE as u64;
    if image.len() as u64 != want {
        return Err(DomainError::ImageSize {
            got: image.len() as u64,
            expected: want,
        });
    }
    tracing::error!(
        source_domid = s.domid,
        windows = s.windows.len(),
        xl_config = ?f.xl_config,
        "Xen failover is not implemented: cannot build a domain from the checkpoint"
    );
    Err(DomainError::BadState(
        "restoring a Xen domain from a Castor checkpoint is not implemented yet (see \
         docs/XEN.md): the committed image and state are intact, but no domain is built"
            .into(),
    ))
}
