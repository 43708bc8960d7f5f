//! The backup's restore: build a Xen domain from a committed image and state.
//!
//! The checkpoint is written as an xl save file ([`crate::stream`]) next to the backup and
//! handed to Xen's own `xl restore -p` with the domU's xl config, which builds the domain
//! (memory, vCPU state, xenstore and console, devices) exactly as after `xl save`. The new
//! domain comes back paused; the backup's `resume` lets it run. Only a checkpoint of a
//! suspended guest is restored: the restored kernel sees its suspend succeed and sets up
//! its event channels, grant tables and shared info again, as after a migration.

use std::io::BufWriter;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use ha_common::domain::DomainError;

use crate::XenFactory;
use crate::domain::XenDomain;
use crate::state::SavedState;
use crate::xc::Xc;

/// The value of `name = "..."` in an xl config (xl.cfg(5)), if any.
pub fn config_name(text: &str) -> Option<String> {
    text.lines().find_map(|l| {
        let l = l.split('#').next()?.trim();
        let (k, v) = l.split_once('=')?;
        if k.trim() != "name" {
            return None;
        }
        let v = v.trim().trim_end_matches(';').trim();
        let v = v
            .strip_prefix('"')
            .and_then(|v| v.strip_suffix('"'))
            .or_else(|| v.strip_prefix('\'').and_then(|v| v.strip_suffix('\'')))?;
        (!v.is_empty()).then(|| v.to_string())
    })
}

fn io_err(op: &'static str) -> impl FnOnce(std::io::Error) -> DomainError {
    move |e| DomainError::Backend {
        op,
        source: Box::new(e),
    }
}

/// Build a paused domain from `image` and `state` with `xl restore`.
pub fn restore(f: &XenFactory, image: &[u8], state: &[u8]) -> Result<XenDomain, DomainError> {
    let t0 = Instant::now();
    let s = SavedState::decode(state).map_err(|e| DomainError::BadState(e.to_string()))?;
    if !s.suspended {
        return Err(DomainError::BadState(
            "the checkpoint is of a paused, not a suspended, guest (ha-primary \
             --xen-hold pause): a domain restored from it would have no event channels; \
             protect the domain with --xen-hold suspend to be able to fail over"
                .into(),
        ));
    }
    let Some(config) = &f.xl_config else {
        return Err(DomainError::BadState(
            "no xl config for the restored domain: give ha-backup --xen-config FILE".into(),
        ));
    };
    let text = std::fs::read(config).map_err(io_err("read the xl config"))?;
    let name = config_name(&String::from_utf8_lossy(&text)).ok_or_else(|| {
        DomainError::BadState(format!("{} sets no name = \"...\"", config.display()))
    })?;
    if crate::resolve_domain(&name).is_ok() {
        return Err(DomainError::BadState(format!(
            "a domain named {name:?} already runs on this host: the restored one would \
             take its name (destroy it, or give --xen-config a config with another name)"
        )));
    }
    let xen = Xc::open()
        .and_then(|xc| xc.version())
        .map_err(|e| DomainError::Backend {
            op: "xc_version",
            source: Box::new(e),
        })?;
    let dir = f.work_dir.clone().unwrap_or_else(std::env::temp_dir);
    let file = dir.join(format!("castor-{name}-{}.xl-save", std::process::id()));
    let out = std::fs::File::create(&file).map_err(io_err("create the save file"))?;
    let stats = crate::stream::write_save_file(BufWriter::new(out), &s, image, &text, xen)
        .map_err(|e| DomainError::Backend {
            op: "write the save file",
            source: Box::new(e),
        })?;
    let written = t0.elapsed();
    tracing::info!(
        file = %file.display(),
        frames = stats.frames,
        holes = stats.holes,
        bytes = stats.bytes,
        ms = written.as_millis() as u64,
        "wrote the checkpoint as an xl save file; running xl restore"
    );
    let domid = xl_restore(config, &file, &name)?;
    if let Err(e) = std::fs::remove_file(&file) {
        tracing::warn!(file = %file.display(), error = %e, "cannot remove the save file");
    }
    tracing::info!(
        domid,
        name,
        source_domid = s.domid,
        write_ms = written.as_millis() as u64,
        restore_ms = (t0.elapsed() - written).as_millis() as u64,
        "xl restore built the domain from the checkpoint (paused)"
    );
    XenDomain::adopt(domid, &s)
}

/// `xl restore -p CONFIG FILE`; the new domain's id. The save file is kept on failure.
fn xl_restore(config: &Path, file: &PathBuf, name: &str) -> Result<u32, DomainError> {
    let out = Command::new("xl")
        .arg("restore")
        .arg("-p")
        .arg(config)
        .arg(file)
        .output()
        .map_err(io_err("run xl restore"))?;
    if !out.status.success() {
        let err = String::from_utf8_lossy(&out.stderr);
        let tail: Vec<&str> = err.lines().rev().take(6).collect();
        return Err(DomainError::BadState(format!(
            "xl restore failed ({}); the save file is kept at {}: {}",
            out.status,
            file.display(),
            tail.into_iter().rev().collect::<Vec<_>>().join(" | ")
        )));
    }
    crate::resolve_domain(name)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_name_is_read_from_an_xl_config() {
        let cfg = "# a domU\ntype = \"pvh\"\nname = \"castor-domu\" # the name\nmemory = 128\n";
        assert_eq!(config_name(cfg).as_deref(), Some("castor-domu"));
        assert_eq!(config_name("name='x';\n").as_deref(), Some("x"));
        assert_eq!(config_name("hostname = \"h\"\n"), None);
        assert_eq!(config_name("# name = \"c\"\n"), None);
        assert_eq!(config_name("name = \"\"\n"), None);
    }
}
