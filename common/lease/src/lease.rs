//! Claiming a guest's key under a lease, and keeping the lease alive.
//!
//! [`claim`] grants a lease and, in one transaction, puts the key under it only if the key
//! does not exist; otherwise it revokes the lease it just made and says who holds the key.
//! A [`Lease`] then keeps the lease alive on a thread of its own, a keep-alive every third
//! of the TTL. It trusts the lease until `sent + TTL - margin`, where `sent` is when the
//! last keep-alive that etcd answered with a live TTL was sent: etcd starts the new TTL
//! when it receives the request, later than that, so the lease can never have expired in
//! etcd while this side still trusts it (clocks running at the same rate, the margin
//! covering the rest).
//!
//! Once a keep-alive is answered with TTL 0 the lease is gone for good: the key went with
//! it and someone else may hold it now. After keep-alives failed for a while (etcd out of
//! reach) and one succeeds again with a live TTL, the lease never expired, so the key is
//! still this side's; the keeper checks it anyway before it trusts the lease again.

use std::sync::mpsc::{self, RecvTimeoutError};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use etcd_client::{
    Certificate, Client, Compare, CompareOp, ConnectOptions, Identity, LeaseKeepAliveStream,
    LeaseKeeper, PutOptions, TlsOptions, Txn, TxnOp, TxnOpResponse,
};
use tokio::runtime::Runtime;

use crate::config::{ConfigError, LeaseConfig};

/// How long connecting to etcd may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);

/// Errors claiming or keeping a lease.
#[derive(Debug, thiserror::Error)]
pub enum LeaseError {
    /// The configuration is invalid.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// A TLS file cannot be read.
    #[error("cannot read TLS file {path}")]
    TlsFile {
        /// The file.
        path: std::path::PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// The async runtime or the keeper thread could not start.
    #[error("cannot start the lease keeper")]
    Runtime(#[source] std::io::Error),
    /// No endpoint answered.
    #[error("cannot reach etcd at {endpoints}")]
    Connect {
        /// The endpoints tried.
        endpoints: String,
        /// The client's error.
        #[source]
        source: etcd_client::Error,
    },
    /// An etcd request failed.
    #[error("etcd {op} failed")]
    Etcd {
        /// The request.
        op: &'static str,
        /// The client's error.
        #[source]
        source: etcd_client::Error,
    },
    /// TLS with etcd failed: a certificate was refused, by either side.
    #[error(
        "TLS with etcd at {endpoints} failed: {detail} (--etcd-ca must be the CA that signed \
         the members' certificates, and --etcd-cert a certificate the members' \
         --trusted-ca-file signed)"
    )]
    Tls {
        /// The endpoints.
        endpoints: String,
        /// What TLS said.
        detail: String,
        /// The client's error.
        #[source]
        source: etcd_client::Error,
    },
    /// An etcd request took longer than a third of the TTL.
    #[error("etcd {0} timed out")]
    Timeout(&'static str),
    /// The primary ran the guest unprotected past the backup's last commit (it said so in
    /// etcd before releasing that output): the backup's image is stale.
    #[error(
        "the primary ran the guest unprotected past this backup's image ({0}): taking over \
         would go back behind output the world saw"
    )]
    Stale(String),
    /// The key is no longer under this lease (it expired or was revoked).
    #[error("the guest's key is no longer under this lease")]
    NotHeld,
    /// The key stayed taken for as long as the caller would wait.
    #[error("key {key} is still held by {holder} after {waited:?}")]
    StillHeld {
        /// The key.
        key: String,
        /// Who holds it.
        holder: String,
        /// How long the caller waited.
        waited: Duration,
    },
}

/// The answer to a claim.
#[derive(Debug)]
pub enum Claim {
    /// The key is ours, under a lease now kept alive.
    Ours(Lease),
    /// Someone else holds the key.
    Theirs {
        /// Who (the key's value).
        holder: String,
    },
}

/// A connection to etcd, with the runtime that drives it.
struct Conn {
    rt: Runtime,
    client: Client,
    /// How it connected (the keeper connects to single members with them).
    opts: ConnectOptions,
    /// The endpoints, for errors, and whether they are spoken to over TLS.
    endpoints: (String, bool),
}

impl Conn {
    fn open(cfg: &LeaseConfig) -> Result<Self, LeaseError> {
        cfg.validate()?;
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(LeaseError::Runtime)?;
        let opts = connect_options(cfg)?;
        let client = rt
            .block_on(Client::connect(&cfg.endpoints, Some(opts.clone())))
            .map_err(|source| LeaseError::Connect {
                endpoints: cfg.endpoints.join(","),
                source,
            })?;
        Ok(Self {
            rt,
            client,
            opts,
            endpoints: (cfg.endpoints.join(","), cfg.tls.is_some()),
        })
    }
}

/// The client options `cfg` asks for: the connect timeout, and its TLS files read.
fn connect_options(cfg: &LeaseConfig) -> Result<ConnectOptions, LeaseError> {
    let mut opts = ConnectOptions::new().with_connect_timeout(CONNECT_TIMEOUT);
    if let Some(t) = &cfg.tls {
        let read = |path: &std::path::Path| {
            std::fs::read(path).map_err(|source| LeaseError::TlsFile {
                path: path.to_owned(),
                source,
            })
        };
        let tls = TlsOptions::new()
            .ca_certificate(Certificate::from_pem(read(&t.ca)?))
            .identity(Identity::from_pem(read(&t.cert)?, read(&t.key)?));
        opts = opts.with_tls(tls);
    }
    Ok(opts)
}

impl Conn {
    /// Run `f` on the runtime, bounded by `limit`.
    fn run<T>(
        &mut self,
        op: &'static str,
        limit: Duration,
        f: impl AsyncFnOnce(&mut Client) -> Result<T, etcd_client::Error>,
    ) -> Result<T, LeaseError> {
        let client = &mut self.client;
        let (endpoints, tls) = &self.endpoints;
        self.rt
            .block_on(async { tokio::time::timeout(limit, f(client)).await })
            .map_err(|_| LeaseError::Timeout(op))?
            .map_err(|source| {
                let detail = match &source {
                    etcd_client::Error::GRpcStatus(s) => s.message().to_owned(),
                    e => e.to_string(),
                };
                if *tls && (detail.contains("certificate") || detail.contains("handshake")) {
                    LeaseError::Tls {
                        endpoints: endpoints.clone(),
                        detail,
                        source,
                    }
                } else {
                    LeaseError::Etcd { op, source }
                }
            })
    }

    /// One attempt: `Ok(Ok((lease, sent)))` if the key is now ours, `Ok(Err(holder))` if not.
    /// A `takeover` (a backup) also needs the key's stale mark ([`stale_key`]) absent and
    /// fails with [`LeaseError::Stale`] when it is there; a fresh start (a primary starting
    /// the guest) removes the mark.
    fn try_claim(
        &mut self,
        cfg: &LeaseConfig,
        takeover: bool,
    ) -> Result<Result<(i64, Instant), String>, LeaseError> {
        let limit = cfg.ttl / 3;
        let sent = Instant::now();
        let ttl = i64::try_from(cfg.ttl.as_secs()).unwrap_or(i64::MAX);
        let id = self
            .run("lease grant", limit, async |c| {
                c.lease_grant(ttl, None).await
            })?
            .id();
        let key = cfg.key.clone();
        let stale = stale_key(&key);
        let holder = cfg.holder.clone();
        let mut when = vec![Compare::create_revision(key.clone(), CompareOp::Equal, 0)];
        let mut then = vec![TxnOp::put(
            key.clone(),
            holder,
            Some(PutOptions::new().with_lease(id)),
        )];
        if takeover {
            when.push(Compare::create_revision(stale.clone(), CompareOp::Equal, 0));
        } else {
            then.push(TxnOp::delete(stale.clone(), None));
        }
        let txn = Txn::new()
            .when(when)
            .and_then(then)
            .or_else([TxnOp::get(key, None), TxnOp::get(stale, None)]);
        let resp = self.run("claim", limit, async |c| c.txn(txn).await)?;
        if resp.succeeded() {
            return Ok(Ok((id, sent)));
        }
        let mut values = resp.op_responses().into_iter().map(|r| match r {
            TxnOpResponse::Get(g) => g
                .kvs()
                .first()
                .map(|kv| String::from_utf8_lossy(kv.value()).into_owned()),
            _ => None,
        });
        let (holder, mark) = (values.next().flatten(), values.next().flatten());
        let holder = holder.unwrap_or_else(|| "(gone since)".into());
        // The lease made for the attempt holds nothing: give it back.
        if let Err(e) = self.run("lease revoke", limit, async |c| c.lease_revoke(id).await) {
            tracing::debug!(error = %e, "lease: revoking an unused lease failed; it expires by itself");
        }
        match mark {
            Some(m) if takeover => Err(LeaseError::Stale(m)),
            _ => Ok(Err(holder)),
        }
    }
}

/// Every key under `prefix` and its value, in key order (the cluster view reads the
/// guests' keys and statuses). `cfg` says where etcd is; its key is not used.
pub fn list(cfg: &LeaseConfig, prefix: &str) -> Result<Vec<(String, Vec<u8>)>, LeaseError> {
    let mut conn = Conn::open(cfg)?;
    let p = prefix.to_owned();
    let resp = conn.run("list", cfg.ttl, async |c| {
        c.get(p, Some(etcd_client::GetOptions::new().with_prefix()))
            .await
    })?;
    Ok(resp
        .kvs()
        .iter()
        .map(|kv| {
            (
                String::from_utf8_lossy(kv.key()).into_owned(),
                kv.value().to_vec(),
            )
        })
        .collect())
}

/// Claim `cfg.key` once: it is ours if nobody holds it.
pub fn claim(cfg: &LeaseConfig) -> Result<Claim, LeaseError> {
    let mut conn = Conn::open(cfg)?;
    match conn.try_claim(cfg, false)? {
        Ok((id, sent)) => Ok(Claim::Ours(Lease::start(conn, cfg, id, sent)?)),
        Err(holder) => Ok(Claim::Theirs { holder }),
    }
}

/// The key a primary that runs the guest unprotected puts (not under its lease, so it
/// outlives it) before it releases output its backup never committed: a backup that
/// finds it does not take over ([`LeaseError::Stale`]). A primary starting the guest anew
/// removes it, and one protected again removes it ([`Lease::mark_stale`]).
pub fn stale_key(key: &str) -> String {
    format!("{key}/backup-stale")
}

/// Claim `cfg.key` to take the guest over, trying again every quarter TTL until it is ours
/// or `wait` has passed (a backup waiting for a lost primary's lease to expire). etcd out
/// of reach or without a leader for a while (an election after a partition) is waited
/// out the same way; a bad configuration, a refused certificate or a stale mark
/// ([`stale_key`]) is not.
pub fn wait_claim(cfg: &LeaseConfig, wait: Duration) -> Result<Lease, LeaseError> {
    let start = Instant::now();
    let mut conn: Option<Conn> = None;
    // After an attempt that failed (not one that found the key held), the next ones go to
    // one member at a time, in turn: a client over all of them sends each request to the
    // next member, and a member cut off from the majority holds a request until it times
    // out, so most attempts would fail while one member is cut off.
    let mut one: Option<usize> = None;
    loop {
        let single;
        let target = match one {
            Some(i) if cfg.endpoints.len() > 1 => {
                single = LeaseConfig {
                    endpoints: vec![cfg.endpoints[i % cfg.endpoints.len()].clone()],
                    ..cfg.clone()
                };
                &single
            }
            _ => cfg,
        };
        let attempt = match conn.take() {
            Some(c) => Ok(c),
            // The keeper falls back to every member: it is told of them all.
            None => Conn::open(target).map(|mut c| {
                c.endpoints = (cfg.endpoints.join(","), cfg.tls.is_some());
                c
            }),
        }
        .and_then(|mut c| {
            let r = c.try_claim(cfg, true);
            conn = Some(c);
            r
        });
        let waited = start.elapsed();
        let err = match attempt {
            Ok(Ok((id, sent))) => match conn.take() {
                Some(c) => return Lease::start(c, cfg, id, sent),
                None => return Err(LeaseError::Timeout("claim")),
            },
            Ok(Err(holder)) => LeaseError::StillHeld {
                key: cfg.key.clone(),
                holder,
                waited,
            },
            Err(
                e @ (LeaseError::Config(_)
                | LeaseError::TlsFile { .. }
                | LeaseError::Tls { .. }
                | LeaseError::Stale(_)),
            ) => {
                return Err(e);
            }
            Err(e) => {
                conn = None;
                one = Some(one.map_or(0, |i| i + 1));
                e
            }
        };
        if waited >= wait {
            return Err(err);
        }
        tracing::debug!(key = cfg.key, error = %err, "lease: not claimed yet; waiting");
        std::thread::sleep((cfg.ttl / 4).min(wait - waited));
    }
}

/// What the keeper thread tells the lease's owner.
#[derive(Debug)]
struct State {
    /// Until when the lease may be trusted (None once lost).
    until: Option<Instant>,
    /// Why it was lost, once it is.
    lost: Option<String>,
    /// The last keep-alive's failure, while they fail.
    failing: Option<String>,
}

/// What the owner tells the keeper thread.
enum Command {
    /// Revoke the lease now (a planned handover), then stop.
    Release(mpsc::Sender<Result<(), LeaseError>>),
    /// Put `value` at `key` under the lease (it goes when the lease goes).
    Publish(String, Vec<u8>),
    /// Put (Some) or delete (None) the stale mark, while the key is still ours.
    Stale(Option<String>, mpsc::Sender<Result<(), LeaseError>>),
}

/// A held key, its lease kept alive by a thread of its own.
///
/// Dropping it stops the keep-alives without revoking: the key stays taken until the TTL
/// runs out, as when the process dies. [`Lease::release`] gives it up at once.
#[derive(Debug)]
pub struct Lease {
    key: String,
    margin: Duration,
    state: Arc<Mutex<State>>,
    commands: Option<mpsc::Sender<Command>>,
    thread: Option<JoinHandle<()>>,
    id: i64,
}

impl Lease {
    fn start(conn: Conn, cfg: &LeaseConfig, id: i64, sent: Instant) -> Result<Self, LeaseError> {
        let state = Arc::new(Mutex::new(State {
            until: Some(sent + cfg.ttl - cfg.margin),
            lost: None,
            failing: None,
        }));
        let (tx, rx) = mpsc::channel();
        let keeper = Keeper {
            conn,
            cfg: cfg.clone(),
            id,
            state: Arc::clone(&state),
            stream: None,
        };
        let thread = std::thread::Builder::new()
            .name("lease-keeper".into())
            .spawn(move || keeper.run(&rx))
            .map_err(LeaseError::Runtime)?;
        tracing::info!(
            key = cfg.key,
            lease = id,
            ttl_s = cfg.ttl.as_secs(),
            "lease: key claimed"
        );
        Ok(Self {
            key: cfg.key.clone(),
            margin: cfg.margin,
            state,
            commands: Some(tx),
            thread: Some(thread),
            id,
        })
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Until when the lease may be trusted; `None` once it is lost for good.
    pub fn held_until(&self) -> Option<Instant> {
        self.lock().until
    }

    /// Whether the lease may be trusted now.
    pub fn is_held(&self) -> bool {
        self.held_until().is_some_and(|u| Instant::now() < u)
    }

    /// Why the lease is lost for good, once it is.
    pub fn lost(&self) -> Option<String> {
        self.lock().lost.clone()
    }

    /// Why the keep-alives fail, while they do (etcd out of reach, a timeout).
    pub fn failing(&self) -> Option<String> {
        self.lock().failing.clone()
    }

    /// The guest's key this lease holds.
    pub fn key(&self) -> &str {
        &self.key
    }

    /// The lease's id in etcd.
    pub fn id(&self) -> i64 {
        self.id
    }

    /// Put `value` at `key` under this lease, in the background (a status others read;
    /// it disappears with the lease). A failed put is logged, not reported.
    pub fn publish(&self, key: &str, value: Vec<u8>) {
        if let Some(c) = &self.commands {
            let _ = c.send(Command::Publish(key.to_owned(), value));
        }
    }

    /// Say in etcd (`Some(why)`, kept after the lease) that the backup's image is stale,
    /// before releasing output it never committed; or (`None`) that it is not any more,
    /// once protected again. Only while the key is still under this lease; waits for etcd
    /// at most as long as the lease may still be trusted.
    pub fn mark_stale(&self, why: Option<String>) -> Result<(), LeaseError> {
        let (tx, rx) = mpsc::channel();
        let sent = self
            .commands
            .as_ref()
            .is_some_and(|c| c.send(Command::Stale(why, tx)).is_ok());
        if !sent {
            return Err(LeaseError::Timeout("stale mark"));
        }
        // Never past the lease's trust: the owner must get to fence itself in time.
        let wait = self.held_until().map_or(Duration::ZERO, |u| {
            u.saturating_duration_since(Instant::now())
        });
        rx.recv_timeout(wait)
            .unwrap_or(Err(LeaseError::Timeout("stale mark")))
    }

    /// When the lease has expired in etcd for sure if no keep-alive was answered since
    /// (its TTL after the last answered keep-alive was sent, plus the margin); None once
    /// lost.
    pub fn expired_by(&self) -> Option<Instant> {
        self.held_until().map(|u| u + self.margin * 2)
    }

    /// Give the key up now: revoke the lease (the key goes with it).
    pub fn release(mut self) -> Result<(), LeaseError> {
        let (tx, rx) = mpsc::channel();
        let sent = self
            .commands
            .take()
            .is_some_and(|c| c.send(Command::Release(tx)).is_ok());
        let res = if sent {
            rx.recv().unwrap_or(Ok(()))
        } else {
            Ok(())
        };
        if let Some(t) = self.thread.take()
            && t.join().is_err()
        {
            tracing::warn!("lease: keeper thread panicked");
        }
        res
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        // Closing the channel stops the keeper at its next wait.
        self.commands.take();
        if let Some(t) = self.thread.take()
            && t.join().is_err()
        {
            tracing::warn!("lease: keeper thread panicked");
        }
    }
}

/// The keeper thread's side.
struct Keeper {
    conn: Conn,
    cfg: LeaseConfig,
    id: i64,
    state: Arc<Mutex<State>>,
    /// The keep-alive stream, open while etcd answers.
    stream: Option<(LeaseKeeper, LeaseKeepAliveStream)>,
}

/// One keep-alive round's outcome.
enum Round {
    /// etcd renewed the lease: trust it until `sent + ttl - margin`.
    Renewed { sent: Instant, ttl: Duration },
    /// The lease is gone (TTL 0) or the key is no longer ours.
    Gone(String),
    /// etcd did not answer in time.
    Failed(LeaseError),
}

impl Keeper {
    fn run(mut self, rx: &mpsc::Receiver<Command>) {
        let every = self.cfg.ttl / 3;
        let mut failing = false;
        // A request that came too late to go out before the keep-alive: it goes first after.
        let mut pending: Option<Command> = None;
        loop {
            let started = Instant::now();
            match self.round(failing) {
                Round::Renewed { sent, ttl } => {
                    if failing {
                        tracing::info!(
                            key = self.cfg.key,
                            "lease: etcd answers again; the lease never expired"
                        );
                    }
                    failing = false;
                    let mut s = self.lock();
                    s.until = Some(sent + ttl.saturating_sub(self.cfg.margin));
                    s.failing = None;
                }
                Round::Gone(why) => {
                    tracing::warn!(key = self.cfg.key, why, "lease: lost");
                    let mut s = self.lock();
                    s.until = None;
                    s.lost = Some(why);
                    // Nothing to keep alive; wait for the owner to let go.
                    drop(s);
                    while let Ok(c) = rx.recv() {
                        match c {
                            Command::Release(done) => {
                                let _ = done.send(Ok(()));
                                return;
                            }
                            Command::Stale(_, done) => {
                                let _ = done.send(Err(LeaseError::NotHeld));
                            }
                            Command::Publish(..) => {}
                        }
                    }
                    return;
                }
                Round::Failed(e) => {
                    if !failing {
                        tracing::warn!(key = self.cfg.key, error = %e, "lease: keep-alive failed; trusting the lease only until it could expire");
                    }
                    failing = true;
                    let why = match std::error::Error::source(&e) {
                        Some(s) => format!("{e}: {s}"),
                        None => e.to_string(),
                    };
                    self.lock().failing = Some(why);
                }
            }
            let mut next = match pending.take() {
                Some(c) => Ok(c),
                None => rx.recv_timeout(every.saturating_sub(started.elapsed())),
            };
            loop {
                // Nothing here may hold the next keep-alive back: each request is bounded
                // by the time left until it is due.
                let left = every.saturating_sub(started.elapsed());
                match next {
                    Ok(Command::Publish(key, value)) => {
                        // Statuses come once a second: one too late to go out is dropped.
                        if !left.is_zero() {
                            let id = self.id;
                            let put = self.conn.run("status put", left, async |c| {
                                c.put(key, value, Some(PutOptions::new().with_lease(id)))
                                    .await
                            });
                            if let Err(e) = put {
                                tracing::debug!(error = %e, "lease: publishing a status failed");
                            }
                        }
                    }
                    Ok(Command::Stale(why, done)) if left.is_zero() => {
                        pending = Some(Command::Stale(why, done));
                        break;
                    }
                    Ok(Command::Stale(why, done)) => {
                        let _ = done.send(self.stale(why, left));
                    }
                    Err(RecvTimeoutError::Timeout) => break,
                    Err(RecvTimeoutError::Disconnected) => return,
                    Ok(Command::Release(done)) => {
                        let id = self.id;
                        let res = self
                            .conn
                            .run("lease revoke", every, async |c| c.lease_revoke(id).await)
                            .map(|_| ());
                        self.lock().until = None;
                        tracing::info!(key = self.cfg.key, ok = res.is_ok(), "lease: released");
                        let _ = done.send(res);
                        return;
                    }
                }
                next = rx.recv_timeout(every.saturating_sub(started.elapsed()));
            }
        }
    }

    /// Open a keep-alive stream to each member on a connection of its own, all at once,
    /// for at most `limit`; the first that renews the lease becomes this keeper's
    /// connection and stream (its TTL returned). Err(Elapsed) when none answered in time.
    fn any_member(
        &mut self,
        limit: Duration,
    ) -> Result<Result<i64, etcd_client::Error>, tokio::time::error::Elapsed> {
        let id = self.id;
        let granted = i64::try_from(self.cfg.ttl.as_secs()).unwrap_or(i64::MAX);
        let (endpoints, opts) = (self.cfg.endpoints.clone(), self.conn.opts.clone());
        let won = self.conn.rt.block_on(async {
            tokio::time::timeout(limit, async {
                let mut tries = tokio::task::JoinSet::new();
                for e in endpoints {
                    let o = opts.clone();
                    tries.spawn(async move {
                        let mut c = Client::connect([e], Some(o)).await?;
                        let s = c.lease_keep_alive(id).await?;
                        Ok::<_, etcd_client::Error>((c, s))
                    });
                }
                let mut last = None;
                while let Some(done) = tries.join_next().await {
                    match done {
                        Ok(Ok(w)) => return Ok(w),
                        // The lease is gone: no member will say otherwise.
                        Ok(Err(etcd_client::Error::LeaseKeepAliveError(m)))
                            if m.contains("not found") =>
                        {
                            return Err(etcd_client::Error::LeaseKeepAliveError(m));
                        }
                        Ok(Err(e)) => last = Some(e),
                        Err(_) => {}
                    }
                }
                Err(last
                    .unwrap_or_else(|| etcd_client::Error::InvalidArgs("no etcd endpoint".into())))
            })
            .await
        })?;
        Ok(won.map(|(c, s)| {
            self.conn.client = c;
            self.stream = Some(s);
            granted
        }))
    }

    /// Put or delete the stale mark, only while the key is under this lease.
    fn stale(&mut self, why: Option<String>, limit: Duration) -> Result<(), LeaseError> {
        let (key, mark) = (self.cfg.key.clone(), stale_key(&self.cfg.key));
        let op = match why {
            Some(v) => TxnOp::put(mark, v, None),
            None => TxnOp::delete(mark, None),
        };
        let txn = Txn::new()
            .when([Compare::lease(key, CompareOp::Equal, self.id)])
            .and_then([op]);
        let resp = self
            .conn
            .run("stale mark", limit, async |c| c.txn(txn).await)?;
        if resp.succeeded() {
            Ok(())
        } else {
            Err(LeaseError::NotHeld)
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// One keep-alive: on the open stream (opening it renews once, too) for half the time a
    /// round may take; when that gets no answer, a new stream to every member at once for
    /// the rest, the first to answer kept (the balanced connection may keep a member that
    /// is cut off, or without a leader, in its pick while others answer). After failures,
    /// also check that the key is still ours.
    fn round(&mut self, check_key: bool) -> Round {
        let limit = self.cfg.ttl / 3;
        let id = self.id;
        let mut sent = Instant::now();
        let granted = i64::try_from(self.cfg.ttl.as_secs()).unwrap_or(i64::MAX);
        let stream = &mut self.stream;
        let client = &mut self.conn.client;
        let first = self.conn.rt.block_on(async {
            tokio::time::timeout(limit / 2, async {
                match stream {
                    None => {
                        // Opening the stream renews the lease once and fails if it is gone.
                        *stream = Some(client.lease_keep_alive(id).await?);
                        Ok(granted)
                    }
                    Some((keeper, messages)) => {
                        keeper.keep_alive().await?;
                        Ok(messages.message().await?.map_or(0, |r| r.ttl()))
                    }
                }
            })
            .await
        });
        let renewed = match first {
            Ok(Ok(t)) => Ok(Ok(t)),
            Ok(Err(etcd_client::Error::LeaseKeepAliveError(m))) if m.contains("not found") => {
                Ok(Err(etcd_client::Error::LeaseKeepAliveError(m)))
            }
            Ok(Err(e)) => {
                tracing::debug!(error = %e, "lease: keep-alive failed; asking every member");
                self.stream = None;
                sent = Instant::now();
                self.any_member(limit / 2)
            }
            Err(_) => {
                tracing::debug!("lease: keep-alive unanswered; asking every member");
                self.stream = None;
                sent = Instant::now();
                self.any_member(limit / 2)
            }
        };
        let ttl = match renewed {
            Ok(Ok(t)) if t > 0 => Duration::from_secs(t.unsigned_abs()),
            Ok(Ok(_)) => return Round::Gone("the lease expired in etcd".into()),
            Ok(Err(etcd_client::Error::LeaseKeepAliveError(m))) if m.contains("not found") => {
                return Round::Gone(format!("the lease expired in etcd ({m})"));
            }
            Ok(Err(source)) => {
                self.stream = None;
                return Round::Failed(LeaseError::Etcd {
                    op: "keep-alive",
                    source,
                });
            }
            Err(_) => {
                self.stream = None;
                return Round::Failed(LeaseError::Timeout("keep-alive"));
            }
        };
        if check_key {
            let key = self.cfg.key.clone();
            match self
                .conn
                .run("get", limit, async |c| c.get(key, None).await)
            {
                Ok(r) => {
                    let ours = r.kvs().first().is_some_and(|kv| {
                        kv.lease() == id && kv.value() == self.cfg.holder.as_bytes()
                    });
                    if !ours {
                        return Round::Gone("the key is no longer under this lease".into());
                    }
                }
                Err(e) => return Round::Failed(e),
            }
        }
        Round::Renewed { sent, ttl }
    }
}
