//! `ha-primary`: run a guest and protect it with a backup.

use ha_backend::{PrimaryGuest, XenHold};
use ha_codec::codec::CodecConfig;
use ha_daemon::config::LoadError;
use ha_daemon::error_chain as chain;
use ha_daemon::{diskfile, keys};
use ha_guest::domain::{Devices, DomainError, GuestSpec};
use ha_primary::cli::{Cli, CliError, Command};
use ha_primary::cow::CopyPolicy;
use ha_primary::engine::{self, Config};
use ha_primary::hold::PacketHold;
use ha_primary::metrics::Metrics;
use ha_workloads::files;
use ha_workloads::guest_abi::{GuestParams, HEAP_GPA, Workload};
use std::error::Error;
use std::path::PathBuf;
use std::process::ExitCode;

fn main() -> ExitCode {
    ha_daemon::logging::init("info");
    let cli = match Cli::load(std::env::args_os()) {
        Ok(c) => c,
        Err(CliError::Load(LoadError::Clap(e))) => e.exit(),
        Err(e) => {
            eprintln!("ha-primary: {}", chain(&e));
            return ExitCode::FAILURE;
        }
    };
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("ha-primary: {}", chain(e.as_ref()));
            ExitCode::FAILURE
        }
    }
}

/// With `--disk-size`, create a missing `--disk` image (the files workload's document
/// tree written into it), or check an existing one's size.
fn provision_disk(cli: &Cli, heap: u64) -> Result<(), Box<dyn Error>> {
    let (path, size) = match (&cli.disk, cli.disk_size) {
        (_, None) => return Ok(()),
        (None, Some(_)) => return Err("--disk-size needs --disk (the image to create)".into()),
        (Some(p), Some(s)) => (p, s),
    };
    if diskfile::prepare(path, Some(size))? == diskfile::Prepared::Existing {
        return Ok(());
    }
    tracing::info!(disk = %path.display(), bytes = size, "created an empty disk image");
    if cli.workload != Workload::Files {
        return Ok(());
    }
    let file = std::fs::OpenOptions::new().write(true).open(path)?;
    let formatted = files::format_disk(cli.seed, heap, size, |at, b: &[u8]| {
        std::os::unix::fs::FileExt::write_all_at(&file, b, at)
    });
    match formatted {
        Some(Ok(l)) => {
            file.sync_all()?;
            tracing::info!(
                files = l.files,
                pages = l.file_pages,
                "wrote the files workload's document tree"
            );
            Ok(())
        }
        Some(Err(e)) => {
            Err(format!("writing the document tree into {}: {e}", path.display()).into())
        }
        None => {
            let _ = std::fs::remove_file(path);
            Err(format!(
                "--disk-size {size} is too small for the files workload's document tree and log \
                 (or --heap too small for its page cache)"
            )
            .into())
        }
    }
}

/// `ha-primary cluster`: the guests recorded in etcd under `prefix`.
fn cluster_view(
    etcd: &str,
    prefix: &str,
    json: bool,
    (ca, cert, key): (&Option<PathBuf>, &Option<PathBuf>, &Option<PathBuf>),
) -> Result<(), Box<dyn Error>> {
    let opts = ha_lease::LeaseOptions {
        etcd: Some(etcd),
        key: Some(prefix),
        ttl: std::time::Duration::from_secs(5),
        ca: ca.as_deref(),
        cert: cert.as_deref(),
        tls_key: key.as_deref(),
    };
    let Some(cfg) = opts.config("ha-primary cluster")? else {
        return Err("--etcd is empty".into());
    };
    let rows = ha_primary::cluster::rows(&ha_lease::list(&cfg, prefix)?);
    if json {
        for r in &rows {
            println!("{}", serde_json::to_string(r)?);
        }
    } else {
        print!("{}", ha_primary::cluster::table(&rows));
    }
    Ok(())
}

/// The interfaces `--net-buffer` stands for once the guest is open: `auto` is the guest's
/// own (its vifs, as xenstore lists them); the named ones were set up before it opened. A
/// Xen guest with a vif and no buffer at all is refused, unless `--no-net-buffer` says so
/// (then loudly).
fn own_vifs(
    named: &[String],
    refused: bool,
    guest: ha_backend::BackendKind,
    domain: &dyn ha_guest::domain::Domain,
) -> Result<Vec<String>, Box<dyn Error>> {
    use ha_guest::domain::AUTO_VIFS;
    if refused && !named.is_empty() {
        return Err("--net-buffer and --no-net-buffer contradict each other".into());
    }
    if named.iter().any(|v| v == AUTO_VIFS) {
        let own = domain.net_interfaces()?;
        if own.is_empty() {
            return Err(
                "--net-buffer auto: the guest has no network interface on this host".into(),
            );
        }
        return Ok(own);
    }
    if named.is_empty() && guest == ha_backend::BackendKind::Xen {
        let own = domain.net_interfaces()?;
        if refused {
            tracing::error!(
                vifs = own.join(","),
                "--no-net-buffer: the Xen guest's network output is NOT held until its \
                 checkpoint is committed; a failover can show clients replies the backup \
                 never had (docs/XEN.md)"
            );
        } else if let Some(first) = own.first() {
            return Err(format!(
                "the Xen guest has network interfaces ({}) but no --net-buffer: its output \
                 would reach clients before its checkpoint is committed; give --net-buffer \
                 {first} (or auto), or --no-net-buffer to protect it without output commit",
                own.join(", ")
            )
            .into());
        }
    }
    Ok(Vec::new())
}

/// A closed plug on each of `vifs` (`--net-buffer`).
fn net_buffers(vifs: &[String], limit: u64) -> Result<Vec<Box<dyn PacketHold>>, Box<dyn Error>> {
    let limit = u32::try_from(limit)?;
    let mut plugs: Vec<Box<dyn PacketHold>> = Vec::new();
    for vif in vifs {
        let cfg = ha_netbuf::Config {
            limit,
            ..ha_netbuf::Config::new(vif)
        };
        let nb = ha_netbuf::NetBuffer::setup(&cfg)
            .map_err(|e| format!("--net-buffer {vif}: {}", chain(&e)))?;
        plugs.push(Box::new(nb));
    }
    Ok(plugs)
}

fn run(cli: Cli) -> Result<(), Box<dyn Error>> {
    if let Some(Command::Cluster {
        etcd,
        prefix,
        json,
        etcd_ca,
        etcd_cert,
        etcd_key,
    }) = &cli.command
    {
        return cluster_view(etcd, prefix, *json, (etcd_ca, etcd_cert, etcd_key));
    }
    if let Some(Command::Keygen { file }) = &cli.command {
        keys::keygen(file)?;
        println!(
            "wrote a new pair key to {} (mode 0600); copy it to the backup host over a trusted \
             channel and give both daemons --key",
            file.display()
        );
        return Ok(());
    }
    let stop = ha_daemon::signal::stop_flag()?;
    let key = keys::pair_key(
        cli.key.as_deref(),
        cli.insecure,
        "anyone on the path can read guest memory and feed the backup",
    )?;
    let heap = cli
        .heap
        .unwrap_or(cli.memory.saturating_sub(HEAP_GPA + (1 << 20)));
    provision_disk(&cli, heap)?;
    let lease_cfg = cli
        .lease_options()
        .config(&ha_lease::holder("ha-primary"))?;
    let spec = GuestSpec {
        memory_size: cli.memory,
        params: GuestParams {
            workload: cli.workload,
            seed: cli.seed,
            heap_gpa: HEAP_GPA,
            heap_size: heap,
            rate: cli.rate.unwrap_or_else(|| cli.workload.default_rate()),
            tsc_khz: 0,
            output_every: cli.output_every,
            doorbell_every: 256,
            disk_size: 0,
        },
        devices: Devices {
            disk: cli.disk.clone(),
        },
    };
    let pipeline = cli.pipeline();
    let cfg = Config {
        backup: cli.backup,
        codec: CodecConfig {
            mode: cli.mode,
            block_size: cli.block_size,
            general: cli.codec,
            zlib_level: 1,
        },
        cache_bytes: usize::try_from(cli.cache_size)?,
        interval: cli.interval,
        pipeline,
        heartbeat: cli.heartbeat.unwrap_or(cli.interval),
        ack_timeout: cli.ack_timeout,
        fence: cli.fence,
        reprotect: cli.reprotect,
        reprotect_also: Vec::new(),
        verify_every: cli.verify_every,
        teleport: !cli.no_teleport,
        precopy_rounds: cli.precopy_rounds,
        precopy_threshold: cli.precopy_threshold,
        run_for: cli.run_for,
        output: cli.output,
        stats: cli.stats,
        events: cli.events,
        key,
        link_rate: cli.link_rate,
        backend: cli.guest,
        copy: cli.copy,
    };
    let metrics = Metrics::for_pair(cli.lease_key.as_deref());
    let metrics_addr = cli
        .metrics
        .map(|a| metrics.serve(a, cli.metrics_port_file.as_deref()))
        .transpose()?;
    tracing::info!(
        version = env!("CARGO_PKG_VERSION"),
        config = ?cli.config,
        guest = %cli.guest,
        workload = cli.workload.name(),
        memory_mib = cli.memory >> 20,
        disk = ?cli.disk,
        mode = %cli.mode,
        block = %cli.block_size,
        codec = cli.codec.name(),
        interval_ms = cli.interval.as_secs_f64() * 1e3,
        ack_timeout_ms = cli.ack_timeout.as_millis() as u64,
        policy = if cli.fence { "fence" } else { "continue" },
        verify_every = cli.verify_every,
        teleport = !cli.no_teleport,
        backup = %cli.backup,
        output = ?cli.output,
        metrics = ?metrics_addr,
        link = if cfg.key.is_some() { "noise" } else { "INSECURE" },
        "ha-primary starting"
    );
    // KVM and sim build the guest from `spec`; Xen attaches to the named existing domain.
    let guest = PrimaryGuest {
        spec,
        xen_domain: cli.xen_domain.clone(),
        xen_hold: if cli.xen_hold == "pause" {
            XenHold::Pause
        } else {
            XenHold::Suspend(cli.xen_suspend_timeout)
        },
        xen_wait: cli.xen_wait,
        nbd_device: cli.nbd_device.clone(),
        unreplicated_disks: cli.xen_unreplicated_disks,
    };
    // The key first: a guest another host runs (the backup took it over) is not started
    // here.
    let lease = match lease_cfg {
        None => None,
        Some(lc) => match ha_lease::claim(&lc)? {
            ha_lease::Claim::Ours(l) => Some(l),
            ha_lease::Claim::Theirs { holder } if cli.become_backup.is_some() => {
                // This host comes back after a failover: the guest runs at `holder`, which
                // protects it again towards this host's backup (its --reprotect-to).
                tracing::warn!(
                    key = lc.key,
                    %holder,
                    "the guest runs elsewhere now: becoming its backup (--become-backup)"
                );
                let config = cli
                    .become_backup
                    .as_deref()
                    .unwrap_or(std::path::Path::new(""));
                return Err(ha_primary::swap::exec_backup(config, None).into());
            }
            ha_lease::Claim::Theirs { holder } => {
                return Err(format!(
                    "the guest's key {} in etcd is held by {holder}: it runs there; not \
                     starting it here",
                    lc.key
                )
                .into());
            }
        },
    };
    // The guest's packets are held from here on; a missing vif, a taken IFB name or a
    // kernel without ifb or sch_plug stops the start here, before any checkpoint. Named
    // interfaces are set up before the guest opens; `auto` (and the check that a Xen
    // guest's vifs are held) needs the guest, which may not exist yet (--xen-wait).
    let named: Vec<String> = cli
        .net_buffer
        .iter()
        .filter(|v| *v != ha_guest::domain::AUTO_VIFS)
        .cloned()
        .collect();
    let mut plugs = net_buffers(&named, cli.net_buffer_limit)?;
    let mut domain = ha_backend::open_primary(cli.guest, &guest)?;
    let own = own_vifs(
        &cli.net_buffer,
        cli.no_net_buffer,
        cli.guest,
        domain.as_ref(),
    )?;
    plugs.extend(net_buffers(&own, cli.net_buffer_limit)?);
    if !plugs.is_empty() && pipeline > 1 {
        tracing::info!(
            pipeline,
            "with --net-buffer, a checkpoint taken while the previous one's packets still \
             wait for its ack sends its packets with the next ack (--pipeline 1 gives each \
             checkpoint its own)"
        );
    }
    let can_cow = domain.cow_memory().is_some();
    if cli.copy == CopyPolicy::Cow && !can_cow {
        return Err(DomainError::NoCapability(
            "copy-on-write memory (--copy cow needs KVM with userfaultfd write-protection)",
        )
        .into());
    }
    tracing::info!(copy = %cli.copy, copy_on_write_memory = can_cow, "checkpoint copy");
    domain.resume()?;
    if !cli.warm_up.is_zero() {
        tracing::info!(
            ms = cli.warm_up.as_millis() as u64,
            "warming up: the guest runs unprotected before the backup is contacted"
        );
        std::thread::sleep(cli.warm_up);
    }
    let switchover = ha_daemon::signal::switchover_flag()?;
    let summary = engine::run_leased(
        &cfg,
        domain.as_mut(),
        &stop,
        &metrics,
        lease,
        Some(&switchover),
        plugs,
    )?;
    tracing::info!(
        epochs = summary.epochs_committed,
        pause_p50_ms = summary.pause_ms_p50,
        pause_p99_ms = summary.pause_ms_p99,
        pause_copies = summary.pause_copies,
        cow_copies = summary.cow_copies,
        released = summary.outputs_released,
        backup_lost = summary.backup_lost,
        "ha-primary stopped"
    );
    println!("{}", serde_json::to_string(&summary)?);
    if summary.switched_over
        && let Some(config) = &cli.become_backup
    {
        let memory = ha_primary::swap::hold_memory(domain.as_ref())?;
        drop(domain);
        return Err(ha_primary::swap::exec_backup(config, Some(memory)).into());
    }
    Ok(())
}
