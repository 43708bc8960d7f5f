//! The network buffer (ha-netbuf) on a guest network laid out as Xen lays it out, in
//! namespaces: the guest's output through its vif is held behind the plug and released
//! mark by mark, inbound traffic is not held, teardown leaves nothing behind, and bad
//! input (a missing vif, a taken IFB name, a kernel without `sch_plug`) is named at set-up.
//!
//! Needs root and network namespaces (skipped with a message otherwise). The plug's
//! behaviour needs a kernel with `sch_plug` (Debian's kernels have it as a module): on one
//! without it the test checks the error and the clean-up and says it skipped the rest,
//! unless `CASTOR_REQUIRE_PLUG=1`, which makes that a failure (`tests/netbuf-vm/run` runs
//! these tests under a Debian kernel that has it).

use ha_netbuf::announce;
use ha_netbuf::buffer::{self, Config, NetBuffer, NetbufError};
use ha_tests::{GuestLan, NetPair};
use std::collections::BTreeSet;
use std::net::{SocketAddr, UdpSocket};
use std::time::{Duration, Instant};

/// How long a frame that is not held takes at most to cross the namespaces here; a frame
/// still missing after it counts as held. Generous: this is no speed check.
const SETTLE: Duration = Duration::from_millis(400);

/// Guest network `id` (namespaces of its own), or None to skip the test.
fn lan(id: u8) -> Option<GuestLan> {
    root_and_netns().then(|| GuestLan::create(id).expect("guest network"))
}

fn root_and_netns() -> bool {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("skipped: the network buffer tests need root");
        return false;
    }
    NetPair::available()
}

/// The plug is missing from this kernel: fine unless the run requires it.
fn plug_missing(e: &NetbufError) -> bool {
    let missing = matches!(
        e,
        NetbufError::ModuleMissing {
            module: "sch_plug",
            ..
        }
    );
    if missing {
        assert!(
            std::env::var("CASTOR_REQUIRE_PLUG").as_deref() != Ok("1"),
            "CASTOR_REQUIRE_PLUG=1 but this kernel has no plug qdisc: {e}"
        );
        eprintln!(
            "skipped the plug's behaviour: this kernel has no sch_plug ({e}); \
             tests/netbuf-vm/run runs it under a kernel that has"
        );
    }
    missing
}

/// Datagrams `tag:0..n` from the guest to the client's port.
fn send(from: &UdpSocket, to: SocketAddr, tag: &str, n: usize) {
    for i in 0..n {
        from.send_to(format!("{tag}:{i}").as_bytes(), to)
            .expect("send from the guest");
    }
}

/// Every datagram that arrives within `SETTLE` of the last one.
fn received(sock: &UdpSocket) -> BTreeSet<String> {
    let mut got = BTreeSet::new();
    let mut buf = [0u8; 256];
    sock.set_read_timeout(Some(SETTLE)).expect("read timeout");
    while let Ok(n) = sock.recv(&mut buf) {
        got.insert(String::from_utf8_lossy(&buf[..n]).into_owned());
    }
    got
}

fn set(items: &[&str]) -> BTreeSet<String> {
    items.iter().map(|s| s.to_string()).collect()
}

/// Whether interface `name` exists in dom0.
fn exists(lan: &GuestLan, name: &str) -> bool {
    GuestLan::run_in(&lan.dom0_ns, || buffer::link_exists(name)).expect("link lookup")
}

/// Whether the IFB exists and whether the vif has an ingress qdisc, as dom0 sees them.
fn leftovers(lan: &GuestLan, ifb: &str) -> (bool, bool) {
    let kinds = GuestLan::run_in(&lan.dom0_ns, || buffer::qdisc_kinds(&lan.vif));
    let ingress = kinds.expect("qdisc list").iter().any(|k| k == "ingress");
    (exists(lan, ifb), ingress)
}

#[test]
fn the_guests_output_is_held_until_released_mark_by_mark() {
    let Some(lan) = lan(41) else { return };
    let ifb = "ifb-t41";
    let cfg = Config {
        ifb: Some(ifb.into()),
        ..Config::new(&lan.vif)
    };
    let setup = GuestLan::run_in(&lan.dom0_ns, || NetBuffer::setup(&cfg));
    let mut nb = match setup {
        Ok(nb) => nb,
        Err(e) if plug_missing(&e) => {
            // What was made before the kernel refused the plug is gone again, and the vif
            // was never touched.
            assert_eq!(leftovers(&lan, ifb), (false, false));
            return;
        }
        Err(e) => panic!("setup: {e}"),
    };
    assert_eq!(leftovers(&lan, ifb), (true, true));
    let client = GuestLan::run_in(&lan.client_ns, || {
        UdpSocket::bind((lan.client_ip, 7001)).expect("client socket")
    });
    let guest = GuestLan::run_in(&lan.guest_ns, || {
        UdpSocket::bind((lan.guest_ip, 7002)).expect("guest socket")
    });
    let to_client = SocketAddr::from((lan.client_ip, 7001));
    let to_guest = SocketAddr::from((lan.guest_ip, 7002));

    // Inbound is not held, even with the plug closed.
    send(&client, to_guest, "in", 2);
    assert_eq!(received(&guest), set(&["in:0", "in:1"]), "inbound was held");

    // Epoch 1's output: held.
    send(&guest, to_client, "a", 3);
    assert!(
        received(&client).is_empty(),
        "output left before any release"
    );
    nb.buffer().expect("mark 1");
    // Epoch 2's output, then epoch 1 is released: exactly its frames leave.
    send(&guest, to_client, "b", 2);
    std::thread::sleep(SETTLE);
    nb.release_one().expect("release 1");
    assert_eq!(received(&client), set(&["a:0", "a:1", "a:2"]));
    nb.buffer().expect("mark 2");
    // A second mark before the first is released would make the kernel forget an epoch.
    assert!(matches!(nb.buffer(), Err(NetbufError::MarkPending(_))));
    send(&guest, to_client, "c", 1);
    std::thread::sleep(SETTLE);
    nb.release_one().expect("release 2");
    assert_eq!(
        received(&client),
        set(&["b:0", "b:1"]),
        "after mark 2 leaked"
    );
    assert!(matches!(nb.release_one(), Err(NetbufError::NoMark(_))));

    // Released indefinitely: what is held leaves and new output passes.
    nb.release_indefinite().expect("release indefinitely");
    assert_eq!(received(&client), set(&["c:0"]));
    send(&guest, to_client, "d", 1);
    assert_eq!(received(&client), set(&["d:0"]));
    // A new mark closes the plug again.
    nb.buffer().expect("mark after open");
    send(&guest, to_client, "e", 1);
    assert!(received(&client).is_empty(), "output passed a closed plug");

    nb.teardown().expect("teardown");
    assert_eq!(leftovers(&lan, ifb), (false, false));
    // Without the buffer the guest's output flows directly (what was held is dropped).
    send(&guest, to_client, "f", 1);
    assert_eq!(received(&client), set(&["f:0"]));
}

#[test]
fn dropping_the_buffer_tears_it_down() {
    let Some(lan) = lan(42) else { return };
    let cfg = Config::new(&lan.vif);
    let ifb = buffer::ifb_name(&lan.vif);
    match GuestLan::run_in(&lan.dom0_ns, || NetBuffer::setup(&cfg)) {
        Ok(nb) => {
            assert_eq!(nb.ifb(), ifb);
            assert_eq!(leftovers(&lan, &ifb), (true, true));
            drop(nb);
        }
        Err(e) if plug_missing(&e) => {}
        Err(e) => panic!("setup: {e}"),
    }
    assert_eq!(leftovers(&lan, &ifb), (false, false));
}

#[test]
fn a_missing_vif_is_named_at_setup() {
    let Some(lan) = lan(43) else { return };
    let err = GuestLan::run_in(&lan.dom0_ns, || NetBuffer::setup(&Config::new("vif99.0")))
        .expect_err("a vif that does not exist");
    assert!(
        matches!(&err, NetbufError::VifMissing(v) if v == "vif99.0"),
        "{err}"
    );
    assert!(err.to_string().contains("vif99.0"), "{err}");
    // Nothing was created for it.
    assert!(!exists(&lan, "ifb-vif99.0"));
}

#[test]
fn a_taken_ifb_name_is_refused_and_the_vif_left_alone() {
    let Some(lan) = lan(44) else { return };
    let taken = "ifb-taken";
    let out = std::process::Command::new("ip")
        .args(["-n", &lan.dom0_ns, "link", "add", taken, "type", "bridge"])
        .output()
        .expect("ip");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let cfg = Config {
        ifb: Some(taken.into()),
        ..Config::new(&lan.vif)
    };
    let err = GuestLan::run_in(&lan.dom0_ns, || NetBuffer::setup(&cfg)).expect_err("taken");
    assert!(
        matches!(&err, NetbufError::IfbInUse(n) if n == taken),
        "{err}"
    );
    assert!(err.to_string().contains(taken));
    // The other interface is still there, and the vif got no ingress qdisc.
    assert_eq!(leftovers(&lan, taken), (true, false));
}

#[test]
fn a_kernel_without_the_plug_is_named_by_the_probe() {
    let Some(lan) = lan(45) else { return };
    match GuestLan::run_in(&lan.dom0_ns, || buffer::probe("ifb-probe")) {
        Ok(()) => {}
        Err(e) if plug_missing(&e) => {
            assert!(e.to_string().contains("sch_plug"), "{e}");
        }
        Err(e) => panic!("probe: {e}"),
    }
    // The probe's scratch device is gone either way.
    assert!(!exists(&lan, "ifb-probe"));
}

#[test]
fn the_gratuitous_arp_reaches_the_bridges_other_ports() {
    let Some(lan) = lan(46) else { return };
    let listener = GuestLan::run_in(&lan.client_ns, || packet_socket("eth0"));
    GuestLan::run_in(&lan.dom0_ns, || {
        announce::gratuitous_arp("br0", lan.guest_mac, lan.guest_ip, 1)
    })
    .expect("gratuitous ARP");
    let want = announce::garp_frame(lan.guest_mac, lan.guest_ip);
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let frame = recv_frame(&listener);
        if frame.as_deref() == Some(&want[..]) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no gratuitous ARP reached the client"
        );
    }
    let err = GuestLan::run_in(&lan.dom0_ns, || {
        announce::gratuitous_arp("br-nope", lan.guest_mac, lan.guest_ip, 1)
    })
    .expect_err("no such bridge");
    assert!(err.to_string().contains("br-nope"), "{err}");
}

/// A packet socket receiving ARP frames on `iface`, with a short read timeout.
fn packet_socket(iface: &str) -> std::os::fd::OwnedFd {
    use std::os::fd::FromRawFd;
    let proto = i32::from(0x0806u16.to_be());
    // SAFETY: socket(2) with constant arguments; checked below.
    let fd = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW, proto) };
    assert!(
        fd >= 0,
        "packet socket: {}",
        std::io::Error::last_os_error()
    );
    // SAFETY: `fd` was just opened and is owned by nothing else.
    let fd = unsafe { std::os::fd::OwnedFd::from_raw_fd(fd) };
    let name = std::ffi::CString::new(iface).expect("name");
    // SAFETY: `name` is NUL-terminated and outlives the call.
    let index = unsafe { libc::if_nametoindex(name.as_ptr()) };
    // SAFETY: sockaddr_ll is plain data; zeroes are valid.
    let mut addr: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
    addr.sll_family = libc::AF_PACKET as u16;
    addr.sll_protocol = 0x0806u16.to_be();
    addr.sll_ifindex = i32::try_from(index).expect("index");
    let tv = libc::timeval {
        tv_sec: 0,
        tv_usec: 200_000,
    };
    use std::os::fd::AsRawFd;
    // SAFETY: `fd` is open; `addr` and `tv` are valid for the sizes passed.
    unsafe {
        let rc = libc::bind(
            fd.as_raw_fd(),
            std::ptr::from_ref(&addr).cast(),
            std::mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t,
        );
        assert_eq!(rc, 0, "bind: {}", std::io::Error::last_os_error());
        libc::setsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVTIMEO,
            std::ptr::from_ref(&tv).cast(),
            std::mem::size_of::<libc::timeval>() as libc::socklen_t,
        );
    }
    fd
}

/// One frame (None after the timeout).
fn recv_frame(fd: &std::os::fd::OwnedFd) -> Option<Vec<u8>> {
    use std::os::fd::AsRawFd;
    let mut buf = vec![0u8; 2048];
    // SAFETY: `fd` is open and `buf` is valid for its length.
    let n = unsafe { libc::recv(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
    let n = usize::try_from(n).ok()?;
    buf.truncate(n);
    Some(buf)
}

/// Run `ha-primary` or `ha-backup` with `args` in namespace `ns` for at most `wait`; its
/// exit status and what it printed on stderr (None: it was still running, and killed).
fn daemon_in(
    ns: &str,
    name: &str,
    args: &[&str],
    wait: Duration,
) -> (Option<std::process::ExitStatus>, String) {
    use std::io::Read;
    let mut child = std::process::Command::new("ip")
        .args(["netns", "exec", ns])
        .arg(ha_tests::bin(name))
        .args(args)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("start the daemon");
    let deadline = Instant::now() + wait;
    let status = loop {
        if let Some(s) = child.try_wait().expect("wait") {
            break Some(s);
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let mut err = String::new();
    if let Some(mut e) = child.stderr.take() {
        let _ = e.read_to_string(&mut err);
    }
    (status, err)
}

/// ha-primary refuses to start, before any checkpoint (its backup does not even exist),
/// when the vif to buffer is missing, and says which.
#[test]
fn daemon_primary_names_a_missing_vif_at_start() {
    let Some(lan) = lan(47) else { return };
    let (status, err) = daemon_in(
        &lan.dom0_ns,
        "ha-primary",
        &[
            "--guest",
            "sim",
            "--memory",
            "8M",
            "--insecure",
            "--backup",
            "127.0.0.1:9",
            "--net-buffer",
            "vif77.0",
        ],
        Duration::from_secs(30),
    );
    assert!(status.is_some_and(|s| !s.success()), "{status:?}: {err}");
    assert!(
        err.contains("--net-buffer vif77.0: interface vif77.0 does not exist"),
        "{err}"
    );
    assert!(!exists(&lan, "ifb-vif77.0"));
}

/// ha-backup checks at start what failover will need: the bridge to announce on, and a
/// kernel that can buffer (named when it cannot).
#[test]
fn daemon_backup_checks_the_bridge_and_the_kernel_at_start() {
    let Some(lan) = lan(48) else { return };
    let announce = [
        "--announce-ip",
        "10.216.48.2",
        "--announce-mac",
        "02:ca:57:00:30:02",
    ];
    let base = [
        "--guest",
        "sim",
        "--memory",
        "8M",
        "--insecure",
        "--listen",
        "127.0.0.1:0",
    ];
    let args = [&base[..], &["--announce-bridge", "br-nope"], &announce[..]].concat();
    let (status, err) = daemon_in(&lan.dom0_ns, "ha-backup", &args, Duration::from_secs(30));
    assert!(status.is_some_and(|s| !s.success()), "{status:?}: {err}");
    assert!(err.contains("br-nope"), "{err}");

    let args = [
        &base[..],
        &[
            "--announce-bridge",
            "br0",
            "--net-buffer",
            &lan.vif,
            "--exit-after",
            "1s",
        ],
        &announce[..],
    ]
    .concat();
    // A backup that passed its checks listens for a primary: stopped after 5 s.
    let (status, err) = daemon_in(&lan.dom0_ns, "ha-backup", &args, Duration::from_secs(5));
    match status {
        // This kernel has no plug: the start fails and says which module is missing.
        Some(s) if !s.success() && err.contains("sch_plug") => {
            assert!(
                std::env::var("CASTOR_REQUIRE_PLUG").as_deref() != Ok("1"),
                "{err}"
            );
        }
        // It has: the backup listens (and is stopped here, waiting for a primary).
        None => {}
        other => panic!("{other:?}: {err}"),
    }
    // The probe's scratch device is gone either way.
    let links = std::process::Command::new("ip")
        .args(["-n", &lan.dom0_ns, "-o", "link"])
        .output()
        .expect("ip link");
    let links = String::from_utf8_lossy(&links.stdout);
    assert!(!links.contains("ifbprobe"), "{links}");
}

/// A protected sim guest whose "vif" is buffered by ha-primary: its packets reach the
/// client while the backup acknowledges checkpoints, stay held while the backup stands
/// still (no acks), go out once it acknowledges again, and the buffer is gone when the
/// primary stops.
#[test]
fn daemon_pair_holds_the_guests_packets_until_the_backup_acks() {
    let Some(lan) = lan(49) else { return };
    match GuestLan::run_in(&lan.dom0_ns, || buffer::probe("ifb-p49")) {
        Ok(()) => {}
        Err(e) if plug_missing(&e) => return,
        Err(e) => panic!("probe: {e}"),
    }
    let dir = ha_tests::Scratch::new("netbuf-pair");
    let s = |v: &str| v.to_string();
    let port = dir.file("port").display().to_string();
    let common = [
        s("--guest"),
        s("sim"),
        s("--memory"),
        s("16M"),
        s("--insecure"),
    ];
    let mut args = common.to_vec();
    args.extend([
        s("--listen"),
        s("127.0.0.1:0"),
        s("--port-file"),
        port.clone(),
        s("--interval"),
        s("20ms"),
        s("--detect-timeout"),
        s("60s"),
    ]);
    let dom0 = Some(lan.dom0_ns.as_str());
    let mut backup = ha_tests::Proc::spawn_in(dom0, "ha-backup", &args, dir.file("b.log"));
    let addr = ha_tests::wait_addr(&dir.file("port"), Duration::from_secs(20));
    let events = dir.file("p.events");
    let mut args = common.to_vec();
    args.extend([
        s("--backup"),
        addr.to_string(),
        s("--interval"),
        s("20ms"),
        s("--ack-timeout"),
        s("60s"),
        s("--pipeline"),
        s("1"),
        s("--net-buffer"),
        lan.vif.clone(),
        s("--events"),
        events.display().to_string(),
    ]);
    let mut primary = ha_tests::Proc::spawn_in(dom0, "ha-primary", &args, dir.file("p.log"));
    let protected = ha_tests::wait_event(&events, "protected", Duration::from_secs(60));
    assert!(protected.is_some(), "not protected: {}", primary.log_text());
    let client = GuestLan::run_in(&lan.client_ns, || {
        UdpSocket::bind((lan.client_ip, 7001)).expect("client socket")
    });
    let guest = GuestLan::run_in(&lan.guest_ns, || {
        UdpSocket::bind((lan.guest_ip, 7002)).expect("guest socket")
    });
    let to_client = SocketAddr::from((lan.client_ip, 7001));
    // Acknowledged checkpoints release the guest's packets.
    send(&guest, to_client, "p", 2);
    assert_eq!(
        until(&client, 2),
        set(&["p:0", "p:1"]),
        "{}",
        primary.log_text()
    );
    // No acks: held.
    backup.signal(libc::SIGSTOP);
    std::thread::sleep(SETTLE);
    let _ = received(&client);
    send(&guest, to_client, "q", 2);
    std::thread::sleep(Duration::from_secs(1));
    assert!(received(&client).is_empty(), "released without an ack");
    // Acks again: out they go.
    backup.signal(libc::SIGCONT);
    assert_eq!(until(&client, 2), set(&["q:0", "q:1"]));
    // A stopped primary removes its buffer.
    primary.signal(libc::SIGTERM);
    assert_eq!(
        primary.wait_for(Duration::from_secs(30)),
        Some(0),
        "{}",
        primary.log_text()
    );
    let ifb = buffer::ifb_name(&lan.vif);
    assert_eq!(leftovers(&lan, &ifb), (false, false));
}

/// Datagrams until `n` have arrived (at most 20 s).
fn until(sock: &UdpSocket, n: usize) -> BTreeSet<String> {
    let mut got = BTreeSet::new();
    let mut buf = [0u8; 256];
    sock.set_read_timeout(Some(Duration::from_millis(200)))
        .expect("read timeout");
    let deadline = Instant::now() + Duration::from_secs(20);
    while got.len() < n && Instant::now() < deadline {
        if let Ok(k) = sock.recv(&mut buf) {
            got.insert(String::from_utf8_lossy(&buf[..k]).into_owned());
        }
    }
    got
}
