//! The backup's restore: build a Xen domain from a committed image and state.
//!
//! The checkpoint is streamed as an xl save file ([`crate::stream`]) through a named pipe
//! to Xen's own `xl restore -p` with the domU's xl config, which builds the domain
//! (memory, vCPU state, xenstore and console, devices) exactly as after `xl save`. The new
//! domain comes back paused; the backup's `resume` lets it run. Only a checkpoint of a
//! suspended guest is restored: the restored kernel sees its suspend succeed and sets up
//! its event channels, grant tables and shared info again, as after a migration.

use std::ffi::CString;
use std::io::BufWriter;
use std::os::fd::AsRawFd;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use ha_guest::domain::DomainError;

use crate::XenFactory;
use crate::domain::XenDomain;
use crate::state::SavedState;
use crate::stream::{StreamError, StreamStats};
use crate::xc::Xc;

/// How long `xl restore` may take to open the checkpoint it was given.
const XL_OPEN_TIMEOUT: Duration = Duration::from_secs(60);

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
    let want = crate::state::image_len(&s.windows);
    if image.len() as u64 != want {
        return Err(DomainError::ImageSize {
            got: image.len() as u64,
            expected: want,
        });
    }
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
    let stem = dir.join(format!("castor-{name}-{}", std::process::id()));
    let fifo = stem.with_extension("xl-stream");
    let log = stem.with_extension("xl-restore.log");
    let run = stream_to_xl("xl", config, &fifo, &log, |w| {
        crate::stream::write_save_file(w, &s, image, &text, xen)
    });
    let _ = std::fs::remove_file(&fifo);
    let xl_said = std::fs::read_to_string(&log).unwrap_or_default();
    let _ = std::fs::remove_file(&log);
    let stats = match run {
        Ok(stats) => stats,
        Err(why) => {
            // Leave the operator a save file to retry by hand (`xl restore CONFIG FILE`).
            let kept = stem.with_extension("xl-save");
            let note = match std::fs::File::create(&kept)
                .map_err(StreamError::Io)
                .and_then(|out| {
                    crate::stream::write_save_file(BufWriter::new(out), &s, image, &text, xen)
                }) {
                Ok(_) => format!(
                    "the checkpoint is saved at {} for xl restore",
                    kept.display()
                ),
                Err(e) => format!("cannot save the checkpoint to {}: {e}", kept.display()),
            };
            let tail: Vec<&str> = xl_said.lines().rev().take(6).collect();
            return Err(DomainError::BadState(format!(
                "{why}; {note}; xl said: {}",
                tail.into_iter().rev().collect::<Vec<_>>().join(" | ")
            )));
        }
    };
    let domid = crate::resolve_domain(&name)?;
    tracing::info!(
        domid,
        name,
        source_domid = s.domid,
        frames = stats.frames,
        holes = stats.holes,
        bytes = stats.bytes,
        ms = t0.elapsed().as_millis() as u64,
        "xl restore built the domain from the checkpoint (paused)"
    );
    XenDomain::adopt(domid, &s)
}

/// Run `XL restore -p CONFIG FIFO` (`XL` = `xl`, or a stand-in in tests) and feed it the save file through a named pipe, as
/// `write` produces it: no copy of the guest's memory lands on the backup's disk, and Xen
/// builds the domain while the stream is still being written. xl's output goes to `log`.
/// The error says what failed (xl exiting before it opened the pipe, the write, xl's exit).
fn stream_to_xl(
    xl: &str,
    config: &Path,
    fifo: &Path,
    log: &Path,
    write: impl FnOnce(BufWriter<std::fs::File>) -> Result<StreamStats, StreamError>,
) -> Result<StreamStats, String> {
    let _ = std::fs::remove_file(fifo);
    let c = CString::new(fifo.as_os_str().as_bytes()).map_err(|_| "bad work dir".to_string())?;
    // SAFETY: `c` is a NUL-terminated path that outlives the call.
    if unsafe { libc::mkfifo(c.as_ptr(), 0o600) } != 0 {
        return Err(format!(
            "cannot make the pipe {}: {}",
            fifo.display(),
            std::io::Error::last_os_error()
        ));
    }
    let out =
        std::fs::File::create(log).map_err(|e| format!("cannot create {}: {e}", log.display()))?;
    let err = out
        .try_clone()
        .map_err(|e| format!("{}: {e}", log.display()))?;
    let mut xl = Command::new(xl)
        .arg("restore")
        .arg("-p")
        .arg(config)
        .arg(fifo)
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err)
        .spawn()
        .map_err(|e| format!("cannot run xl restore: {e}"))?;
    // The write end opens once xl has opened the read end; xl may fail before that.
    let started = Instant::now();
    let pipe = loop {
        match std::fs::OpenOptions::new()
            .write(true)
            .custom_flags(libc::O_NONBLOCK)
            .open(fifo)
        {
            Ok(p) => break p,
            Err(e) if e.raw_os_error() == Some(libc::ENXIO) => {}
            Err(e) => {
                let _ = xl.kill();
                let _ = xl.wait();
                return Err(format!("cannot open the pipe to xl restore: {e}"));
            }
        }
        if let Ok(Some(status)) = xl.try_wait() {
            return Err(format!(
                "xl restore exited ({status}) before reading the checkpoint"
            ));
        }
        if started.elapsed() > XL_OPEN_TIMEOUT {
            let _ = xl.kill();
            let _ = xl.wait();
            return Err(format!(
                "xl restore did not open the checkpoint within {XL_OPEN_TIMEOUT:?}"
            ));
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    };
    // Blocking writes from here on.
    // SAFETY: `pipe` is an open descriptor owned by this function; F_SETFL with the flags
    // read back minus O_NONBLOCK changes nothing else.
    unsafe {
        let fd = pipe.as_raw_fd();
        let fl = libc::fcntl(fd, libc::F_GETFL);
        if fl >= 0 {
            libc::fcntl(fd, libc::F_SETFL, fl & !libc::O_NONBLOCK);
        }
    }
    let wrote = write(BufWriter::new(pipe));
    let status = xl.wait().map_err(|e| format!("xl restore: {e}"))?;
    match (wrote, status.success()) {
        (Ok(stats), true) => Ok(stats),
        (Ok(_), false) => Err(format!("xl restore failed ({status})")),
        (Err(e), _) => Err(format!(
            "streaming the checkpoint to xl restore failed ({e}; xl: {status})"
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::TscInfo;

    fn blob(suspended: bool) -> Vec<u8> {
        SavedState {
            domid: 3,
            max_gpfn: 0xfefff,
            windows: vec![0],
            holes: vec![],
            suspended,
            hvm_context: vec![1; 16],
            params: vec![(1, 0xfeffc)],
            tsc: TscInfo::default(),
        }
        .encode()
        .expect("encode")
    }

    fn refusal(f: &XenFactory, image: &[u8], state: &[u8]) -> String {
        restore(f, image, state).expect_err("refused").to_string()
    }

    /// A stand-in for `xl` running `body` (sh; `$4` is the pipe).
    fn fake_xl(dir: &Path, name: &str, body: &str) -> String {
        use std::os::unix::fs::PermissionsExt;
        let p = dir.join(name);
        std::fs::write(&p, format!("#!/bin/sh\n{body}\n")).expect("script");
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).expect("chmod");
        p.to_string_lossy().into_owned()
    }

    #[test]
    fn the_checkpoint_goes_through_the_pipe_and_xl_failures_are_reported() {
        let dir = std::env::temp_dir().join(format!("castor-fifo-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let fifo = dir.join("s.xl-stream");
        let log = dir.join("xl.log");
        let cfg = dir.join("d.cfg");
        let got = dir.join("got");
        let payload: Vec<u8> = (0..3_000_000u32).map(|i| (i % 251) as u8).collect();
        let write = |mut w: BufWriter<std::fs::File>| -> Result<StreamStats, StreamError> {
            use std::io::Write;
            w.write_all(&payload)?;
            w.flush()?;
            Ok(StreamStats::default())
        };
        // xl reads it all (after a while: the writer waits for it to open the pipe).
        let xl = fake_xl(
            &dir,
            "ok",
            &format!("sleep 0.3; cat \"$4\" > {}", got.display()),
        );
        stream_to_xl(&xl, &cfg, &fifo, &log, write).expect("streamed");
        assert_eq!(std::fs::read(&got).expect("got"), payload);
        // xl fails before it opens the checkpoint.
        let xl = fake_xl(&dir, "early", "echo 'Parsing config: bad' >&2; exit 1");
        let e = stream_to_xl(&xl, &cfg, &fifo, &log, write).expect_err("early exit");
        assert!(e.contains("before reading the checkpoint"), "{e}");
        assert!(std::fs::read_to_string(&log).expect("log").contains("bad"));
        // xl stops reading part way and fails: the write fails, nothing hangs.
        let xl = fake_xl(&dir, "midway", "head -c 1000 \"$4\" > /dev/null; exit 3");
        let e = stream_to_xl(&xl, &cfg, &fifo, &log, write).expect_err("midway");
        assert!(
            e.contains("streaming the checkpoint to xl restore failed"),
            "{e}"
        );
        // xl reads everything but fails.
        let xl = fake_xl(&dir, "late", "cat \"$4\" > /dev/null; exit 4");
        let e = stream_to_xl(&xl, &cfg, &fifo, &log, write).expect_err("late");
        assert!(e.contains("xl restore failed"), "{e}");
        std::fs::remove_dir_all(&dir).expect("cleanup");
    }

    #[test]
    fn checkpoints_that_cannot_be_restored_are_refused_before_xen_is_asked() {
        let dir = std::env::temp_dir().join(format!("castor-restore-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let named = dir.join("named.cfg");
        std::fs::write(&named, "name = \"castor-test-no-such-domain\"\n").expect("cfg");
        let unnamed = dir.join("unnamed.cfg");
        std::fs::write(&unnamed, "memory = 128\n").expect("cfg");
        let image = vec![0u8; 512 * 4096];
        let with = |cfg: &std::path::Path| XenFactory::new().with_xl_config(cfg);

        let e = refusal(&with(&named), &image, b"CASTKVM1 not ours");
        assert!(e.contains("bad header"), "{e}");
        let e = restore(&with(&named), &image[..4096], &blob(true)).expect_err("short");
        assert!(matches!(e, DomainError::ImageSize { got: 4096, .. }), "{e}");
        let e = refusal(&with(&named), &image, &blob(false));
        assert!(e.contains("paused, not a suspended"), "{e}");
        let e = refusal(&XenFactory::new(), &image, &blob(true));
        assert!(e.contains("--xen-config"), "{e}");
        let e = refusal(&with(&dir.join("missing.cfg")), &image, &blob(true));
        assert!(e.contains("read the xl config"), "{e}");
        let e = refusal(&with(&unnamed), &image, &blob(true));
        assert!(e.contains("sets no name"), "{e}");
        // Past the checks, a machine without Xen says so; nothing was written.
        if !std::path::Path::new(crate::xc::PRIVCMD).exists() {
            let e = restore(&with(&named), &image, &blob(true)).expect_err("no Xen");
            assert!(
                matches!(
                    e,
                    DomainError::Backend {
                        op: "xc_version",
                        ..
                    }
                ),
                "{e}"
            );
            let left: Vec<_> = std::fs::read_dir(std::env::temp_dir())
                .expect("tmp")
                .filter_map(|e| e.ok())
                .filter(|e| {
                    e.file_name()
                        .to_string_lossy()
                        .starts_with("castor-castor-test-no-such-domain")
                })
                .collect();
            assert!(left.is_empty(), "{left:?}");
        }
        std::fs::remove_dir_all(&dir).expect("cleanup");
    }

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
