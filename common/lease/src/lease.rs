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
    /// An etcd request took longer than a third of the TTL.
    #[error("etcd {0} timed out")]
    Timeout(&'static str),
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
}

impl Conn {
    fn open(cfg: &LeaseConfig) -> Result<Self, LeaseError> {
        cfg.validate()?;
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(LeaseError::Runtime)?;
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
        let client = rt
            .block_on(Client::connect(&cfg.endpoints, Some(opts)))
            .map_err(|source| LeaseError::Connect {
                endpoints: cfg.endpoints.join(","),
                source,
            })?;
        Ok(Self { rt, client })
    }

    /// Run `f` on the runtime, bounded by `limit`.
    fn run<T>(
        &mut self,
        op: &'static str,
        limit: Duration,
        f: impl AsyncFnOnce(&mut Client) -> Result<T, etcd_client::Error>,
    ) -> Result<T, LeaseError> {
        let client = &mut self.client;
        self.rt
            .block_on(async { tokio::time::timeout(limit, f(client)).await })
            .map_err(|_| LeaseError::Timeout(op))?
            .map_err(|source| LeaseError::Etcd { op, source })
    }

    /// One attempt: `Ok(Ok((lease, sent)))` if the key is now ours, `Ok(Err(holder))` if not.
    fn try_claim(
        &mut self,
        cfg: &LeaseConfig,
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
        let holder = cfg.holder.clone();
        let txn = Txn::new()
            .when([Compare::create_revision(key.clone(), CompareOp::Equal, 0)])
            .and_then([TxnOp::put(
                key.clone(),
                holder,
                Some(PutOptions::new().with_lease(id)),
            )])
            .or_else([TxnOp::get(key, None)]);
        let resp = self.run("claim", limit, async |c| c.txn(txn).await)?;
        if resp.succeeded() {
            return Ok(Ok((id, sent)));
        }
        let holder = resp
            .op_responses()
            .iter()
            .find_map(|r| match r {
                TxnOpResponse::Get(g) => g
                    .kvs()
                    .first()
                    .map(|kv| String::from_utf8_lossy(kv.value()).into_owned()),
                _ => None,
            })
            .unwrap_or_else(|| "(gone since)".into());
        // The lease made for the attempt holds nothing: give it back.
        if let Err(e) = self.run("lease revoke", limit, async |c| c.lease_revoke(id).await) {
            tracing::debug!(error = %e, "lease: revoking an unused lease failed; it expires by itself");
        }
        Ok(Err(holder))
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
    match conn.try_claim(cfg)? {
        Ok((id, sent)) => Ok(Claim::Ours(Lease::start(conn, cfg, id, sent)?)),
        Err(holder) => Ok(Claim::Theirs { holder }),
    }
}

/// Claim `cfg.key`, trying again every quarter TTL until it is ours or `wait` has passed
/// (a backup waiting for a lost primary's lease to expire). etcd out of reach or without
/// a leader for a while (an election after a partition) is waited out the same way; a
/// bad configuration is not.
pub fn wait_claim(cfg: &LeaseConfig, wait: Duration) -> Result<Lease, LeaseError> {
    let start = Instant::now();
    let mut conn: Option<Conn> = None;
    loop {
        let attempt = match conn.take() {
            Some(c) => Ok(c),
            None => Conn::open(cfg),
        }
        .and_then(|mut c| {
            let r = c.try_claim(cfg);
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
            Err(e @ (LeaseError::Config(_) | LeaseError::TlsFile { .. })) => return Err(e),
            Err(e) => e,
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
}

/// A held key, its lease kept alive by a thread of its own.
///
/// Dropping it stops the keep-alives without revoking: the key stays taken until the TTL
/// runs out, as when the process dies. [`Lease::release`] gives it up at once.
#[derive(Debug)]
pub struct Lease {
    key: String,
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
                        if let Command::Release(done) = c {
                            let _ = done.send(Ok(()));
                            return;
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
            let mut next = rx.recv_timeout(every.saturating_sub(started.elapsed()));
            while let Ok(Command::Publish(key, value)) = next {
                let id = self.id;
                let put = self.conn.run("status put", every, async |c| {
                    c.put(key, value, Some(PutOptions::new().with_lease(id)))
                        .await
                });
                if let Err(e) = put {
                    tracing::debug!(error = %e, "lease: publishing a status failed");
                }
                next = rx.recv_timeout(every.saturating_sub(started.elapsed()));
            }
            match next {
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => return,
                Ok(Command::Publish(..)) => {}
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
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// One keep-alive on the open stream (opening it renews once, too); after failures,
    /// also check that the key is still ours.
    fn round(&mut self, check_key: bool) -> Round {
        let limit = self.cfg.ttl / 3;
        let id = self.id;
        let sent = Instant::now();
        let granted = i64::try_from(self.cfg.ttl.as_secs()).unwrap_or(i64::MAX);
        let stream = &mut self.stream;
        let client = &mut self.conn.client;
        let renewed = self.conn.rt.block_on(async {
            tokio::time::timeout(limit, async {
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
