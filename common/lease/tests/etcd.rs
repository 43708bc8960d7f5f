//! Leases against real etcd members (Debian's `etcd-server`), started by the tests on
//! loopback: claiming, keeping past the TTL, a dead holder's key passing on only after its
//! lease could have expired, release, a holder cut off from etcd, and TLS with client
//! certificates. Skipped when `etcd` is not installed, unless `CASTOR_REQUIRE_ETCD=1`.

use std::net::TcpListener;
use std::path::Path;
use std::time::{Duration, Instant};

use ha_lease::{Claim, Lease, LeaseConfig, LeaseError, TlsFiles, claim, wait_claim};
use ha_tests::{EtcdTls, etcd_or_skip};

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// One etcd member on loopback (ha-tests' starter) and its data directory, killed and
/// removed with the value.
struct Etcd {
    member: ha_tests::Etcd,
    _dir: tempfile::TempDir,
}

impl Etcd {
    /// A member over plain HTTP, or over TLS with client certificates when `tls` is given;
    /// returns once it serves clients.
    fn start(tls: Option<&EtcdTls>) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let member = match tls {
            Some(t) => ha_tests::Etcd::start_tls(dir.path(), t),
            None => ha_tests::Etcd::start(dir.path()),
        };
        Self { member, _dir: dir }
    }

    fn signal(&self, sig: &str) {
        self.member.signal(sig);
    }
}

fn config(e: &Etcd, key: &str, holder: &str) -> LeaseConfig {
    LeaseConfig {
        ttl: Duration::from_secs(2),
        margin: Duration::from_millis(500),
        ..LeaseConfig::new(vec![e.member.url.clone()], key, holder)
    }
}

fn ours(c: Claim) -> Lease {
    match c {
        Claim::Ours(l) => l,
        Claim::Theirs { holder } => panic!("key held by {holder}"),
    }
}

fn theirs(c: Claim) -> String {
    match c {
        Claim::Ours(_) => panic!("claimed a held key"),
        Claim::Theirs { holder } => holder,
    }
}

#[test]
fn a_key_is_claimed_once_and_kept_past_its_ttl() {
    if !etcd_or_skip() {
        return;
    }
    let e = Etcd::start(None);
    let a = ours(claim(&config(&e, "/castor/guests/g1", "primary-a")).unwrap());
    assert!(a.is_held());
    let b = config(&e, "/castor/guests/g1", "backup-b");
    assert_eq!(theirs(claim(&b).unwrap()), "primary-a");
    // Three TTLs later the keep-alives still hold it.
    std::thread::sleep(Duration::from_secs(6));
    assert!(a.is_held(), "lost: {:?}", a.lost());
    assert_eq!(theirs(claim(&b).unwrap()), "primary-a");
    // Another guest's key is free.
    let other = ours(claim(&config(&e, "/castor/guests/g2", "backup-b")).unwrap());
    other.release().unwrap();
}

#[test]
fn a_dead_holders_key_passes_on_only_after_it_stopped_trusting_it() {
    if !etcd_or_skip() {
        return;
    }
    let e = Etcd::start(None);
    let a = ours(claim(&config(&e, "/castor/guests/g1", "primary-a")).unwrap());
    std::thread::sleep(Duration::from_secs(1));
    let trusted_until = a.held_until().unwrap();
    drop(a); // the primary dies: no more keep-alives, no revoke
    let b = wait_claim(
        &config(&e, "/castor/guests/g1", "backup-b"),
        Duration::from_secs(20),
    )
    .unwrap();
    let claimed = Instant::now();
    assert!(
        claimed > trusted_until,
        "the backup claimed the key {:?} before the dead primary stopped trusting it",
        trusted_until - claimed
    );
    assert!(b.is_held());
}

#[test]
fn release_hands_the_key_over_at_once() {
    if !etcd_or_skip() {
        return;
    }
    let e = Etcd::start(None);
    let a = ours(claim(&config(&e, "/castor/guests/g1", "primary-a")).unwrap());
    a.release().unwrap();
    let b = ours(claim(&config(&e, "/castor/guests/g1", "backup-b")).unwrap());
    assert!(b.is_held());
}

/// A holder that marks the backup's image stale: once it lets go, a takeover is refused
/// at once naming the mark (not waited out), while a fresh start claims the key and
/// removes the mark, after which a takeover works again. Clearing the mark works too.
#[test]
fn a_stale_mark_refuses_a_takeover_until_a_fresh_start_or_a_clear() {
    if !etcd_or_skip() {
        return;
    }
    let e = Etcd::start(None);
    let key = "/castor/guests/stale";
    let a = ours(claim(&config(&e, key, "primary-a")).unwrap());
    a.mark_stale(Some("primary-a ran unprotected after 7".into()))
        .unwrap();
    a.release().unwrap();
    let t = Instant::now();
    let err = wait_claim(&config(&e, key, "backup-b"), Duration::from_secs(10)).unwrap_err();
    assert!(
        matches!(err, LeaseError::Stale(_)) && t.elapsed() < Duration::from_secs(5),
        "{err} after {:?}",
        t.elapsed()
    );
    assert!(err.to_string().contains("ran unprotected after 7"), "{err}");
    // A fresh start (a primary starting the guest anew) removes the mark.
    let c = ours(claim(&config(&e, key, "primary-c")).unwrap());
    c.release().unwrap();
    let b = wait_claim(&config(&e, key, "backup-b"), Duration::from_secs(10)).unwrap();
    // Marked and cleared by the holder: a takeover works.
    b.mark_stale(Some("b ran unprotected".into())).unwrap();
    b.mark_stale(None).unwrap();
    b.release().unwrap();
    wait_claim(&config(&e, key, "backup-d"), Duration::from_secs(10))
        .unwrap()
        .release()
        .unwrap();
}

#[test]
fn a_holder_cut_off_from_etcd_stops_trusting_its_lease_in_time() {
    if !etcd_or_skip() {
        return;
    }
    let e = Etcd::start(None);
    let a = ours(claim(&config(&e, "/castor/guests/g1", "primary-a")).unwrap());
    // etcd stands still for two TTLs: the keep-alives go unanswered.
    e.signal("STOP");
    let stopped = Instant::now();
    std::thread::sleep(Duration::from_secs(4));
    assert!(
        !a.is_held(),
        "still trusted {:?} after etcd stopped",
        stopped.elapsed()
    );
    e.signal("CONT");
    // Either etcd expired the lease (lost for good, the key free), or a keep-alive got in
    // first (held again, the key still ours): never trusted while someone else holds it.
    let deadline = Instant::now() + Duration::from_secs(20);
    while a.lost().is_none() && !a.is_held() {
        assert!(
            Instant::now() < deadline,
            "neither lost nor held again: {:?}",
            a.failing()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let b = claim(&config(&e, "/castor/guests/g1", "backup-b")).unwrap();
    match (a.lost(), b) {
        (Some(_), Claim::Ours(b)) => assert!(!a.is_held() && b.is_held()),
        (None, Claim::Theirs { holder }) => {
            assert_eq!(holder, "primary-a");
            assert!(a.is_held());
        }
        (lost, b) => panic!("inconsistent: primary lost = {lost:?}, backup's claim = {b:?}"),
    }
}

#[test]
fn etcd_out_of_reach_is_a_clear_error() {
    if !etcd_or_skip() {
        return;
    }
    let port = free_port();
    let cfg = LeaseConfig {
        ttl: Duration::from_secs(2),
        margin: Duration::from_millis(500),
        ..LeaseConfig::new(vec![format!("http://127.0.0.1:{port}")], "/k", "me")
    };
    let e = match claim(&cfg) {
        Err(e) => e,
        Ok(c) => panic!("claimed without etcd: {c:?}"),
    };
    assert!(
        matches!(
            e,
            LeaseError::Connect { .. } | LeaseError::Etcd { .. } | LeaseError::Timeout(_)
        ),
        "{e:?}"
    );
}

/// Certificates for a member over TLS and its clients, made with openssl in a directory
/// kept as long as the value.
struct Certs {
    tls: EtcdTls,
    _dir: tempfile::TempDir,
}

impl Certs {
    fn make() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let tls = EtcdTls::generate(dir.path()).unwrap_or_else(|e| panic!("{e}"));
        Self { tls, _dir: dir }
    }

    /// A client's files: the CA, its certificate and key.
    fn client(&self) -> TlsFiles {
        TlsFiles {
            ca: self.tls.ca.clone(),
            cert: self.tls.client_cert.clone(),
            key: self.tls.client_key.clone(),
        }
    }
}

#[test]
fn tls_with_client_certificates() {
    if !etcd_or_skip() {
        return;
    }
    let certs = Certs::make();
    let e = Etcd::start(Some(&certs.tls));
    let mut cfg = config(&e, "/castor/guests/g1", "primary-a");
    cfg.tls = Some(certs.client());
    let a = ours(claim(&cfg).unwrap());
    assert!(a.is_held());
    // A client whose certificate etcd's CA did not sign is refused.
    let other = Certs::make();
    let mut stranger = config(&e, "/castor/guests/g1", "stranger");
    stranger.tls = Some(TlsFiles {
        ca: certs.tls.ca.clone(),
        ..other.client()
    });
    assert!(
        claim(&stranger).is_err(),
        "a stranger's certificate was accepted"
    );
    // A missing file is named.
    let mut missing = cfg.clone();
    missing.tls = Some(TlsFiles {
        key: Path::new("/nonexistent/client.key").to_owned(),
        ..certs.client()
    });
    let err = claim(&missing).unwrap_err().to_string();
    assert!(err.contains("/nonexistent/client.key"), "{err}");
    a.release().unwrap();
}
