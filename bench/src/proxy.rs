//! A TCP proxy on loopback between a primary and its backup whose faults are switched on
//! and off while it runs: cut (both directions closed at once), stall (nothing forwarded
//! either way, the connections kept open, as a partition does), and a delay on the
//! backup → primary direction (acks arrive late). Used by the fault campaign.

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

/// The faults in force.
#[derive(Debug, Default)]
struct Faults {
    cut: AtomicBool,
    refusing: AtomicBool,
    stalled: AtomicBool,
    ack_delay_ms: AtomicU64,
    stop: AtomicBool,
}

/// The proxy; it stops forwarding when dropped.
#[derive(Debug)]
pub struct FaultProxy {
    /// Where the primary connects.
    pub addr: SocketAddr,
    faults: Arc<Faults>,
    /// Sockets of the connections, for the cut.
    conns: Arc<std::sync::Mutex<Vec<TcpStream>>>,
}

impl FaultProxy {
    /// Forward every connection made to a fresh loopback port to `backup`.
    pub fn start(backup: SocketAddr) -> std::io::Result<Self> {
        let l = TcpListener::bind("127.0.0.1:0")?;
        let addr = l.local_addr()?;
        l.set_nonblocking(true)?;
        let faults = Arc::new(Faults::default());
        let conns = Arc::new(std::sync::Mutex::new(Vec::new()));
        let (f, c) = (faults.clone(), conns.clone());
        std::thread::Builder::new()
            .name("chaos-proxy".into())
            .spawn(move || {
                while !f.stop.load(Ordering::Relaxed) {
                    let Ok((down, _)) = l.accept() else {
                        std::thread::sleep(Duration::from_millis(5));
                        continue;
                    };
                    if f.refusing.load(Ordering::SeqCst) {
                        continue; // closed at once: as if nobody listened yet
                    }
                    let _ = down.set_nonblocking(false);
                    let Ok(up) = TcpStream::connect(backup) else {
                        continue;
                    };
                    if let (Ok(d), Ok(u)) = (down.try_clone(), up.try_clone())
                        && let Ok(mut g) = c.lock()
                    {
                        g.extend([d, u]);
                    }
                    spawn_pipe(&down, &up, f.clone(), false);
                    spawn_pipe(&up, &down, f.clone(), true);
                }
            })?;
        Ok(Self {
            addr,
            faults,
            conns,
        })
    }

    /// Close every connection both ways now.
    pub fn cut(&self) {
        self.faults.cut.store(true, Ordering::SeqCst);
        if let Ok(g) = self.conns.lock() {
            for s in g.iter() {
                let _ = s.shutdown(Shutdown::Both);
            }
        }
    }

    /// Close every new connection at once while `on` (the backup behind is not there
    /// yet); connections already forwarded are kept.
    pub fn refuse(&self, on: bool) {
        self.faults.refusing.store(on, Ordering::SeqCst);
    }

    /// Forward nothing (both ways) while `on`.
    pub fn stall(&self, on: bool) {
        self.faults.stalled.store(on, Ordering::SeqCst);
    }

    /// Hold each piece of the backup → primary direction for `d` before forwarding it.
    pub fn delay_acks(&self, d: Duration) {
        let ms = u64::try_from(d.as_millis()).unwrap_or(u64::MAX);
        self.faults.ack_delay_ms.store(ms, Ordering::SeqCst);
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.faults.stop.store(true, Ordering::Relaxed);
        self.cut();
    }
}

/// Copy `from` → `to` on a thread, obeying the faults; `acks` marks the backup → primary
/// direction (the one a delay applies to).
fn spawn_pipe(from: &TcpStream, to: &TcpStream, f: Arc<Faults>, acks: bool) {
    let (Ok(mut from), Ok(mut to)) = (from.try_clone(), to.try_clone()) else {
        return;
    };
    let _ = std::thread::Builder::new()
        .name("chaos-pipe".into())
        .spawn(move || {
            let mut buf = vec![0u8; 64 << 10];
            loop {
                let n = match from.read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => n,
                };
                while f.stalled.load(Ordering::SeqCst) && !f.cut.load(Ordering::SeqCst) {
                    std::thread::sleep(Duration::from_millis(2));
                }
                let delay = if acks {
                    f.ack_delay_ms.load(Ordering::SeqCst)
                } else {
                    0
                };
                if delay > 0 {
                    std::thread::sleep(Duration::from_millis(delay));
                }
                if f.cut.load(Ordering::SeqCst) || to.write_all(&buf[..n]).is_err() {
                    break;
                }
            }
            let _ = to.shutdown(Shutdown::Write);
        });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn forwards_stalls_and_cuts() {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let p = FaultProxy::start(l.local_addr().unwrap()).unwrap();
        let mut c = TcpStream::connect(p.addr).unwrap();
        let (mut s, _) = l.accept().unwrap();
        c.write_all(b"ping").unwrap();
        let mut b = [0u8; 4];
        s.read_exact(&mut b).unwrap();
        assert_eq!(&b, b"ping");
        // Stalled: nothing arrives while it lasts, everything once it ends.
        p.stall(true);
        c.write_all(b"late").unwrap();
        s.set_read_timeout(Some(Duration::from_millis(200)))
            .unwrap();
        assert!(s.read(&mut b).is_err(), "a stalled proxy forwarded");
        p.stall(false);
        s.set_read_timeout(None).unwrap();
        s.read_exact(&mut b).unwrap();
        assert_eq!(&b, b"late");
        // Cut: both ends see the connection end.
        p.cut();
        assert_eq!(s.read(&mut b).unwrap_or(0), 0);
        assert_eq!(c.read(&mut b).unwrap_or(0), 0);
    }
}
