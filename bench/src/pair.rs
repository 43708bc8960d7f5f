//! Running a pair for the benchmarks: finding (and under cargo, building) the daemons,
//! starting them as child processes that die with the benchmark, reading their JSON-lines
//! events, and the CPU time a process has used.

use ha_backend::BackendKind;
use ha_workloads::guest_abi::{GuestParams, HEAP_GPA, Workload};
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// Errors that stop a pair run (the drill, a comparison run) before its figures.
#[derive(Debug, thiserror::Error)]
pub enum PairError {
    /// A daemon binary is missing.
    #[error(
        "{0} not found next to ha-bench; build it with `cargo build --release -p ha-primary -p ha-backup`"
    )]
    MissingBinary(PathBuf),
    /// Building the daemons failed.
    #[error("building ha-primary and ha-backup failed")]
    Build,
    /// A process could not be started.
    #[error("cannot start {what}")]
    Spawn {
        /// Which.
        what: &'static str,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// Something the drill waits for did not happen.
    #[error("{0}; see the logs in {1}")]
    Stalled(String, PathBuf),
    /// The guest's disk images could not be made.
    #[error(transparent)]
    Disk(#[from] crate::disk::DiskError),
    /// Local I/O.
    #[error("benchmark I/O")]
    Io(#[from] std::io::Error),
}

/// The parameters `ha-primary` builds its guest with from `--workload`, `--memory`
/// (`memory_size` bytes), `--seed`, `--rate` and `--output-every` (the heap all memory
/// above 1 MiB less 1 MiB), on a disk of `disk_size` bytes (0: none): what the reference
/// model runs to check a guest, and what an unprotected baseline is created with.
pub fn guest_params(
    workload: Workload,
    memory_size: u64,
    seed: u64,
    rate: u64,
    output_every: u64,
    disk_size: u64,
) -> GuestParams {
    GuestParams {
        workload,
        seed,
        heap_gpa: HEAP_GPA,
        heap_size: workload.default_heap(memory_size),
        rate,
        tsc_khz: 0,
        output_every,
        doorbell_every: 256,
        disk_size,
    }
}

/// CPU time (user + system) a process has used so far, in ms, from `/proc/<pid>/stat`
/// (fields 14 and 15, in clock ticks of 1/100 s, Linux's USER_HZ).
pub fn cpu_ms(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    ticks_ms(stat.get(stat.rfind(')')? + 2..)?)
}

/// CPU time (user + system) of a process's threads in ms, split into the guest's vCPU
/// threads (named `castor-vcpu…` by the KVM backend, `sim-vcpu` by the simulated one) and
/// all the others (the checkpointing threads: engine, encoder, sender, receiver), from
/// `/proc/<pid>/task/*/stat`. Returns (others, vCPUs).
pub fn cpu_ms_split(pid: u32) -> Option<(u64, u64)> {
    let mut split = (0, 0);
    for task in std::fs::read_dir(format!("/proc/{pid}/task"))
        .ok()?
        .flatten()
    {
        let Ok(stat) = std::fs::read_to_string(task.path().join("stat")) else {
            continue; // the thread ended meanwhile
        };
        let (Some(open), Some(close)) = (stat.find('('), stat.rfind(')')) else {
            continue;
        };
        let name = stat.get(open + 1..close).unwrap_or_default();
        let Some(ms) = stat.get(close + 2..).and_then(ticks_ms) else {
            continue;
        };
        if name.starts_with("castor-vcpu") || name.starts_with("sim-vcpu") {
            split.1 += ms;
        } else {
            split.0 += ms;
        }
    }
    Some(split)
}

/// utime + stime (fields 14 and 15 of a stat line, counted from after the name) in ms.
fn ticks_ms(rest: &str) -> Option<u64> {
    let f: Vec<&str> = rest.split_whitespace().collect();
    let utime: u64 = f.get(11)?.parse().ok()?;
    let stime: u64 = f.get(12)?.parse().ok()?;
    Some((utime + stime) * 10)
}

/// Milliseconds since the Unix epoch.
pub fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// Find (and, under cargo, build) the daemons next to this binary.
pub fn daemons() -> Result<(PathBuf, PathBuf), PairError> {
    let exe = std::env::current_exe()?;
    let dir = exe.parent().map(Path::to_path_buf).unwrap_or_default();
    if let Ok(cargo) = std::env::var("CARGO") {
        let release = dir.ends_with("release");
        let mut cmd = Command::new(cargo);
        cmd.args(["build", "-q", "-p", "ha-primary", "-p", "ha-backup"]);
        if release {
            cmd.arg("--release");
        }
        if !cmd.status().is_ok_and(|s| s.success()) {
            return Err(PairError::Build);
        }
    }
    let (p, b) = (dir.join("ha-primary"), dir.join("ha-backup"));
    for f in [&p, &b] {
        if !f.exists() {
            return Err(PairError::MissingBinary(f.clone()));
        }
    }
    Ok((p, b))
}

/// A child process, killed (SIGKILL) and reaped when dropped.
#[derive(Debug)]
pub struct Kill(pub Child);

impl Drop for Kill {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Start `bin` with `args`, stderr to `log`, stdout discarded; `RUST_LOG` defaults to info.
pub fn spawn(
    bin: &Path,
    args: &[String],
    log: &Path,
    what: &'static str,
) -> Result<Kill, PairError> {
    spawn_in(None, bin, args, log, what)
}

/// [`spawn`] inside network namespace `netns` (through `ip netns exec`, which execs the
/// binary: the child is the daemon itself), or in this one.
pub fn spawn_in(
    netns: Option<&str>,
    bin: &Path,
    args: &[String],
    log: &Path,
    what: &'static str,
) -> Result<Kill, PairError> {
    let err = std::fs::File::create(log)?;
    let mut cmd = match netns {
        Some(ns) => {
            let mut c = Command::new("ip");
            c.args(["netns", "exec", ns]).arg(bin);
            c
        }
        None => Command::new(bin),
    };
    cmd.args(args)
        .env(
            "RUST_LOG",
            std::env::var("RUST_LOG").unwrap_or_else(|_| "info".into()),
        )
        .stdout(Stdio::null())
        .stderr(err)
        .spawn()
        .map(Kill)
        .map_err(|source| PairError::Spawn { what, source })
}

/// Read a JSON-lines events file (unreadable lines skipped).
pub fn events(path: &Path) -> Vec<Value> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}

/// The first event named `name`, waiting up to `limit` for it.
pub fn wait_event(path: &Path, name: &str, limit: Duration) -> Option<Value> {
    let t = Instant::now();
    while t.elapsed() < limit {
        if let Some(e) = events(path).into_iter().find(|e| e["event"] == name) {
            return Some(e);
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    None
}

/// The `p`-th percentile of microsecond values, in ms.
pub fn percentile(v: &[u64], p: usize) -> f64 {
    let mut s = v.to_vec();
    s.sort_unstable();
    s.get(s.len().saturating_sub(1) * p / 100)
        .map_or(0.0, |&x| x as f64 / 1000.0)
}

/// What a bench pair's `ha-backup` is started with; [`BackupSpec::args`] makes its
/// command line.
#[derive(Debug)]
pub struct BackupSpec<'a> {
    /// The run's directory: the backup writes its port to `port` there.
    pub dir: &'a Path,
    /// `--memory`.
    pub memory: &'a str,
    /// `--mode`.
    pub mode: &'a str,
    /// `--guest`.
    pub guest: BackendKind,
    /// `--interval`.
    pub interval: &'a str,
    /// `--detect-timeout`.
    pub detect_timeout: &'a str,
    /// `--key FILE` or `--insecure`.
    pub key_args: &'a [String],
}

impl BackupSpec<'_> {
    /// `ha-backup`'s arguments: listen on an ephemeral loopback port (written to
    /// `DIR/port`, see [`backup_addr`]), the pair's settings, the key, then `extra`.
    pub fn args(&self, extra: &[String]) -> Vec<String> {
        self.args_listening("127.0.0.1:0", extra)
    }

    /// [`BackupSpec::args`] listening on `listen` (an address with port 0: an ephemeral
    /// port, written to `DIR/port`).
    pub fn args_listening(&self, listen: &str, extra: &[String]) -> Vec<String> {
        let mut v: Vec<String> = [
            "--listen",
            listen,
            "--port-file",
            &self.dir.join("port").display().to_string(),
            "--memory",
            self.memory,
            "--mode",
            self.mode,
            "--guest",
            self.guest.name(),
            "--interval",
            self.interval,
            "--detect-timeout",
            self.detect_timeout,
        ]
        .iter()
        .map(|a| a.to_string())
        .collect();
        v.extend(self.key_args.iter().cloned());
        v.extend(extra.iter().cloned());
        v
    }
}

/// What a bench pair's `ha-primary` is started with; [`PrimarySpec::args`] makes its
/// command line.
#[derive(Debug)]
pub struct PrimarySpec<'a> {
    /// `--backup`.
    pub backup: &'a str,
    /// `--guest`.
    pub guest: BackendKind,
    /// `--memory`.
    pub memory: &'a str,
    /// `--workload`.
    pub workload: &'a str,
    /// `--mode`.
    pub mode: &'a str,
    /// `--interval`.
    pub interval: &'a str,
    /// `--events`.
    pub events: &'a Path,
    /// `--key FILE` or `--insecure`.
    pub key_args: &'a [String],
}

impl PrimarySpec<'_> {
    /// `ha-primary`'s arguments: the pair's settings, the key, then `extra`.
    pub fn args(&self, extra: &[String]) -> Vec<String> {
        let mut v: Vec<String> = [
            "--backup",
            self.backup,
            "--guest",
            self.guest.name(),
            "--memory",
            self.memory,
            "--workload",
            self.workload,
            "--mode",
            self.mode,
            "--interval",
            self.interval,
            "--events",
            &self.events.display().to_string(),
        ]
        .iter()
        .map(|a| a.to_string())
        .collect();
        v.extend(self.key_args.iter().cloned());
        v.extend(extra.iter().cloned());
        v
    }
}

/// Make a pair key at `key` with `ha-primary keygen`, as an operator would.
pub fn keygen(primary_bin: &Path, key: &Path, dir: &Path) -> Result<(), PairError> {
    let ok = Command::new(primary_bin)
        .arg("keygen")
        .arg(key)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|st| st.success());
    if ok {
        Ok(())
    } else {
        Err(PairError::Stalled(
            "`ha-primary keygen` failed".into(),
            dir.to_path_buf(),
        ))
    }
}

/// The address the backup wrote to its `--port-file`, waiting up to 20 s for it.
pub fn backup_addr(port_file: &Path, dir: &Path) -> Result<String, PairError> {
    let t = Instant::now();
    loop {
        if let Ok(v) = std::fs::read_to_string(port_file)
            && !v.trim().is_empty()
        {
            return Ok(v.trim().to_string());
        }
        if t.elapsed() > Duration::from_secs(20) {
            return Err(PairError::Stalled(
                "the backup did not start listening".into(),
                dir.to_path_buf(),
            ));
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// CPU time of the calling thread, in ms.
    fn thread_cpu_ms() -> u64 {
        let mut ts = libc::timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        // SAFETY: clock_gettime(2) writes one timespec into `ts`, which lives on this stack
        // frame for the call.
        unsafe {
            libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts);
        }
        u64::try_from(ts.tv_sec).unwrap_or(0) * 1000
            + u64::try_from(ts.tv_nsec).unwrap_or(0) / 1_000_000
    }

    #[test]
    fn vcpu_threads_are_counted_apart() {
        let pid = std::process::id();
        let (_, vcpu0) = cpu_ms_split(pid).unwrap();
        // A "vCPU" that burns 300 ms of its own CPU time.
        std::thread::Builder::new()
            .name("castor-vcpu9".into())
            .spawn(|| {
                let mut x = 0u64;
                while thread_cpu_ms() < 300 {
                    x = std::hint::black_box(x.wrapping_add(1));
                }
                // Still alive while the split is read below.
                std::thread::sleep(std::time::Duration::from_millis(300));
            })
            .unwrap();
        std::thread::sleep(std::time::Duration::from_millis(100));
        let t = std::time::Instant::now();
        let (others, vcpu) = loop {
            let s = cpu_ms_split(pid).unwrap();
            if s.1 >= vcpu0 + 250 || t.elapsed() > std::time::Duration::from_secs(60) {
                break s;
            }
            std::thread::sleep(std::time::Duration::from_millis(10));
        };
        assert!(vcpu >= vcpu0 + 250, "vCPU threads {vcpu} ms (was {vcpu0})");
        // The other threads' share leaves those 300 ms out of the process's total.
        let total = cpu_ms(pid).unwrap_or(0);
        assert!(
            others + 250 <= total,
            "others {others} ms, total {total} ms"
        );
    }
}
