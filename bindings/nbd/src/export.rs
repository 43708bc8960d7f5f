//! A disk image served over NBD on a Unix socket, whose writes are kept for the checkpoint.
//!
//! [`Image`] is the image file: reads come from it; a write goes to it at once and is
//! appended to its write log, which the engine drains at each checkpoint through
//! [`ServedDisk`] (the [`Disk`] capability), exactly as KVM's virtio-blk device's log. A
//! write's reply is sent only after it is in the log, so a write the guest saw completed
//! is in the checkpoint of the epoch it completed in or an earlier one.
//!
//! The gate: while the guest is held for a checkpoint ([`Image::hold`]), writes wait
//! before they touch the image, so the log drained in the pause, the disk's digest and the
//! guest's memory all describe the same moment; [`Image::release`] lets them go on. A
//! write in progress when the hold begins finishes first (the log's lock is held across
//! the file write and the append).
//!
//! [`Server`] listens on the socket and serves each connection on its own thread
//! ([`crate::proto`]). A connection that reached transmission and ended — the client
//! detached, died, or spoke nonsense — means the device's disk is gone: [`Server::health`]
//! says so from then on.

use std::fs::File;
use std::os::unix::fs::{FileExt, FileTypeExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;

use ha_guest::diskimage::{self, DiskImageError};
use ha_guest::domain::{Disk, DiskWrite, DomainError};

use crate::proto;

/// Bytes of zeros written per log entry for `TRIM` / `WRITE_ZEROES` (a disk record is at
/// most 64 KiB; the engine cuts larger writes itself).
const ZERO_PIECE: u64 = 1 << 20;

/// Errors of the served image and its server.
#[derive(Debug, thiserror::Error)]
pub enum ExportError {
    /// The image cannot be opened, or is not whole 4 KiB pages.
    #[error(transparent)]
    Image(#[from] DiskImageError),
    /// Another server answers on the socket.
    #[error("NBD socket {0} is in use by a running server")]
    SocketInUse(PathBuf),
    /// The socket path is taken by something that is not a socket.
    #[error("NBD socket path {0} exists and is not a socket")]
    NotASocket(PathBuf),
    /// The socket cannot be bound.
    #[error("cannot listen on the NBD socket {path}")]
    Listen {
        /// The socket.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// The server's disk is gone: its client's connection ended.
    #[error("the NBD server on {path} lost its client: {why}")]
    Lost {
        /// The socket.
        path: PathBuf,
        /// How the connection ended.
        why: String,
    },
}

/// The image file, its write log and the checkpoint gate.
#[derive(Debug)]
pub struct Image {
    file: File,
    path: PathBuf,
    size: u64,
    log: Mutex<Log>,
    open: Condvar,
}

#[derive(Debug, Default)]
struct Log {
    writes: Vec<DiskWrite>,
    held: bool,
}

impl Image {
    /// Open the image at `path` for reading and writing; its size must be a positive
    /// multiple of 4 KiB (the disk records' and the replica's unit).
    pub fn open(path: &Path) -> Result<Arc<Self>, ExportError> {
        let (file, size) = diskimage::open(path, 4096)?;
        Ok(Arc::new(Self {
            file,
            path: path.to_owned(),
            size,
            log: Mutex::new(Log::default()),
            open: Condvar::new(),
        }))
    }

    /// The image's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn lock(&self) -> MutexGuard<'_, Log> {
        // A panic while holding the lock leaves the log whole (push is the last step).
        self.log.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The lock, once the gate is open.
    fn admitted(&self) -> MutexGuard<'_, Log> {
        let mut g = self.lock();
        while g.held {
            g = self.open.wait(g).unwrap_or_else(|p| p.into_inner());
        }
        g
    }

    /// Close the gate: from now on writes wait; returns once none is in progress.
    pub fn hold(&self) {
        self.lock().held = true;
    }

    /// Open the gate: waiting writes go on.
    pub fn release(&self) {
        self.lock().held = false;
        self.open.notify_all();
    }

    /// Move the writes completed since the last drain into `out`, in completion order.
    pub fn drain_writes(&self, out: &mut Vec<DiskWrite>) {
        out.append(&mut self.lock().writes);
    }

    /// Read `buf.len()` bytes at `offset` (inside the image).
    pub fn read_at(&self, offset: u64, buf: &mut [u8]) -> std::io::Result<()> {
        self.file.read_exact_at(buf, offset)
    }

    /// Write `data` at `offset` to the file and the log, under the gate.
    fn logged_write(&self, offset: u64, data: Vec<u8>, fua: bool) -> std::io::Result<()> {
        let mut g = self.admitted();
        self.file.write_all_at(&data, offset)?;
        if fua {
            self.file.sync_data()?;
        }
        g.writes.push(DiskWrite { offset, data });
        Ok(())
    }
}

impl proto::Export for Image {
    fn size(&self) -> u64 {
        self.size
    }

    fn read(&self, offset: u64, buf: &mut [u8]) -> std::io::Result<()> {
        self.read_at(offset, buf)
    }

    fn write(&self, offset: u64, data: Vec<u8>, fua: bool) -> std::io::Result<()> {
        self.logged_write(offset, data, fua)
    }

    fn write_zeroes(&self, offset: u64, len: u64, fua: bool) -> std::io::Result<()> {
        let mut at = offset;
        while at < offset + len {
            let n = (offset + len - at).min(ZERO_PIECE);
            self.logged_write(at, vec![0u8; n as usize], fua)?;
            at += n;
        }
        Ok(())
    }

    fn flush(&self) -> std::io::Result<()> {
        let _g = self.admitted();
        self.file.sync_data()
    }
}

/// The [`Disk`] capability of a domain whose disk an NBD [`Server`] serves.
#[derive(Debug, Clone)]
pub struct ServedDisk(pub Arc<Image>);

fn backend(op: &'static str, e: std::io::Error) -> DomainError {
    DomainError::Backend {
        op,
        source: Box::new(e),
    }
}

impl Disk for ServedDisk {
    fn disk_size(&self) -> u64 {
        self.0.size
    }

    fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<(), DomainError> {
        let len = buf.len() as u64;
        if offset.checked_add(len).is_none_or(|end| end > self.0.size) {
            return Err(DomainError::OutOfRange { gpa: offset, len });
        }
        self.0
            .read_at(offset, buf)
            .map_err(|e| backend("read the served disk image", e))
    }

    fn drain_writes(&mut self, out: &mut Vec<DiskWrite>) -> Result<(), DomainError> {
        self.0.drain_writes(out);
        Ok(())
    }

    fn image_reader(&self) -> Result<Option<File>, DomainError> {
        self.0
            .file
            .try_clone()
            .map(Some)
            .map_err(|e| backend("open a second handle on the served disk image", e))
    }
}

/// What the server's threads report.
#[derive(Debug, Default)]
struct Status {
    /// Connections that reached transmission.
    attached: u64,
    /// Why the disk is gone, once a connection in transmission ended.
    lost: Option<String>,
}

/// An NBD server for one [`Image`] on a Unix socket.
#[derive(Debug)]
pub struct Server {
    socket: PathBuf,
    listener: UnixListener,
    status: Arc<Mutex<Status>>,
    conns: Arc<Mutex<Vec<UnixStream>>>,
    accept: Option<JoinHandle<()>>,
}

impl Server {
    /// Serve `image` as the export `name` on the Unix socket `socket`. A socket file left
    /// by a server that is gone is replaced; one a server answers on is refused.
    pub fn serve(image: Arc<Image>, socket: &Path, name: &str) -> Result<Self, ExportError> {
        if let Ok(meta) = std::fs::symlink_metadata(socket) {
            if !meta.file_type().is_socket() {
                return Err(ExportError::NotASocket(socket.to_owned()));
            }
            if UnixStream::connect(socket).is_ok() {
                return Err(ExportError::SocketInUse(socket.to_owned()));
            }
            tracing::info!(socket = %socket.display(), "replacing a stale NBD socket");
            std::fs::remove_file(socket).map_err(|source| ExportError::Listen {
                path: socket.to_owned(),
                source,
            })?;
        }
        let listener = UnixListener::bind(socket).map_err(|source| ExportError::Listen {
            path: socket.to_owned(),
            source,
        })?;
        let l = listener.try_clone().map_err(|source| ExportError::Listen {
            path: socket.to_owned(),
            source,
        })?;
        let status = Arc::new(Mutex::new(Status::default()));
        let conns = Arc::new(Mutex::new(Vec::new()));
        let (st, cs, name) = (status.clone(), conns.clone(), name.to_owned());
        let accept = std::thread::Builder::new()
            .name("nbd-accept".into())
            .spawn(move || accept_loop(&l, &image, &name, &st, &cs))
            .map_err(|source| ExportError::Listen {
                path: socket.to_owned(),
                source,
            })?;
        tracing::info!(socket = %socket.display(), "NBD server listening");
        Ok(Self {
            socket: socket.to_owned(),
            listener,
            status,
            conns,
            accept: Some(accept),
        })
    }

    /// The socket's path.
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// How many connections reached transmission so far.
    pub fn attached(&self) -> u64 {
        lock(&self.status).attached
    }

    /// `Ok` while no connection in transmission has ended; the reason otherwise (the
    /// device's disk is gone).
    pub fn health(&self) -> Result<(), ExportError> {
        match &lock(&self.status).lost {
            None => Ok(()),
            Some(why) => Err(ExportError::Lost {
                path: self.socket.clone(),
                why: why.clone(),
            }),
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn accept_loop(
    l: &UnixListener,
    image: &Arc<Image>,
    name: &str,
    status: &Arc<Mutex<Status>>,
    conns: &Arc<Mutex<Vec<UnixStream>>>,
) {
    for c in l.incoming() {
        let mut c = match c {
            Ok(c) => c,
            // The listener was shut down (the server is dropped), or failed for good.
            Err(e) => {
                tracing::debug!(error = %e, "NBD server stops accepting");
                return;
            }
        };
        if let Ok(k) = c.try_clone() {
            lock(conns).push(k);
        }
        let (image, name, status) = (image.clone(), name.to_owned(), status.clone());
        let spawned = std::thread::Builder::new()
            .name("nbd-conn".into())
            .spawn(move || connection(&mut c, &image, &name, &status));
        if let Err(e) = spawned {
            tracing::error!(error = %e, "NBD server cannot start a connection's thread");
        }
    }
}

/// Serve one connection; record its end if it reached transmission.
fn connection(c: &mut UnixStream, image: &Image, name: &str, status: &Mutex<Status>) {
    match proto::handshake(c, name, image) {
        Ok(Some(())) => {}
        Ok(None) => return,
        Err(e) => {
            tracing::warn!(error = %ha_daemon::error_chain(&e), "NBD handshake failed");
            return;
        }
    }
    lock(status).attached += 1;
    tracing::info!(image = %image.path().display(), "NBD client attached");
    let why = match proto::transmission(c, image) {
        Ok(proto::End::Disconnected) => "the client disconnected (NBD_CMD_DISC)".to_string(),
        Ok(_) => "the client closed the connection without NBD_CMD_DISC".to_string(),
        Err(e) => ha_daemon::error_chain(&e),
    };
    tracing::error!(image = %image.path().display(), why, "NBD client gone: the device's disk is lost");
    lock(status).lost.get_or_insert(why);
}

impl Drop for Server {
    fn drop(&mut self) {
        // Shutting the listening socket down makes its accept fail: the thread ends.
        let _ = socket2::SockRef::from(&self.listener).shutdown(std::net::Shutdown::Both);
        for c in lock(&self.conns).drain(..) {
            let _ = c.shutdown(std::net::Shutdown::Both);
        }
        if let Some(t) = self.accept.take() {
            let _ = t.join();
        }
        let _ = std::fs::remove_file(&self.socket);
    }
}
