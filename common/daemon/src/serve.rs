//! The daemons' Prometheus metrics endpoint (HTTP on the `tiny_http` crate), with its
//! port file ([`crate::port_file`]) when it binds port 0.
//!
//! `GET /metrics` answers 200 with what the render closure returns, anything else 404.
//! tiny_http reads every connection on a thread of its own, so a client that sends slowly,
//! or nothing at all, holds only its own thread and never the scrapes of others; a few
//! handler threads ([`HANDLERS`]) answer the requests once they are whole. Every accepted
//! socket inherits [`IO_TIMEOUT`] for reads and writes from the listening socket (Linux
//! copies `SO_RCVTIMEO` and `SO_SNDTIMEO` to accepted sockets; tiny_http has no timeouts of
//! its own), so an idle connection is closed after that long and a client that does not
//! read its answer holds a handler no longer than that. Connections stay open between
//! requests (HTTP/1.1 keep-alive) unless the client sends `Connection: close`.

use std::net::{SocketAddr, TcpListener};
use std::path::Path;
use std::sync::{Mutex, PoisonError};
use std::time::Duration;

use tiny_http::{Header, Method, Request, Response, Server};

use crate::port_file::{self, PortFileError};

/// Threads answering parsed requests (reading them is tiny_http's, a thread per connection).
pub const HANDLERS: usize = 4;

/// Read and write timeout of every connection: an idle or stalled client is dropped after it.
pub const IO_TIMEOUT: Duration = Duration::from_secs(5);

/// Pause before the endpoint starts again after its accept loop failed (tiny_http ends
/// its accept loop on any error of `accept`, e.g. when the process runs out of files).
const RESTART_PAUSE: Duration = Duration::from_secs(1);

/// Errors starting the endpoint.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// The address cannot be bound (or the server cannot start).
    #[error("cannot serve metrics on {addr}")]
    Bind {
        /// The address asked for.
        addr: SocketAddr,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// The port file cannot be written.
    #[error(transparent)]
    PortFile(#[from] PortFileError),
    /// The content type is not a valid header value.
    #[error("invalid content type {0:?}")]
    ContentType(&'static str),
}

/// Serve `GET /metrics` on `addr` with `content_type` and the body `render` returns.
/// Returns the bound address, also written to `port_file` if given.
pub fn serve_metrics(
    addr: SocketAddr,
    port_file: Option<&Path>,
    content_type: &'static str,
    render: impl Fn() -> String + Send + 'static,
) -> Result<SocketAddr, ServeError> {
    let bind = |source| ServeError::Bind { addr, source };
    let ctype = Header::from_bytes("Content-Type", content_type)
        .map_err(|()| ServeError::ContentType(content_type))?;
    let l = TcpListener::bind(addr).map_err(bind)?;
    let bound = l.local_addr().map_err(bind)?;
    let sock = socket2::SockRef::from(&l);
    sock.set_read_timeout(Some(IO_TIMEOUT))
        .and_then(|()| sock.set_write_timeout(Some(IO_TIMEOUT)))
        .map_err(bind)?;
    // A second handle on the listening socket, to start the server again from.
    let spare = l.try_clone().map_err(bind)?;
    if let Some(p) = port_file {
        port_file::write(p, bound)?;
    }
    let server = start(l).map_err(bind)?;
    std::thread::Builder::new()
        .name("castor-metrics".into())
        .spawn(move || {
            let render = Mutex::new(render);
            let mut server = server;
            loop {
                run(&server, &ctype, &render);
                drop(server);
                server = loop {
                    std::thread::sleep(RESTART_PAUSE);
                    match spare.try_clone().and_then(start) {
                        Ok(s) => break s,
                        Err(e) => tracing::warn!(error = %e, "cannot restart the metrics endpoint"),
                    }
                };
                tracing::info!(addr = %bound, "metrics endpoint restarted");
            }
        })
        .map_err(bind)?;
    Ok(bound)
}

/// A tiny_http server on `l`.
fn start(l: TcpListener) -> std::io::Result<Server> {
    Server::from_listener(l, None).map_err(std::io::Error::other)
}

/// Answer `server`'s requests on this thread and [`HANDLERS`]` - 1` more until its accept
/// loop ends.
fn run<F: Fn() -> String + Send>(server: &Server, ctype: &Header, render: &Mutex<F>) {
    std::thread::scope(|s| {
        for i in 1..HANDLERS {
            if let Err(e) = std::thread::Builder::new()
                .name(format!("castor-metrics-{i}"))
                .spawn_scoped(s, || handle(server, ctype, render))
            {
                tracing::warn!(error = %e, "cannot start a metrics handler thread");
            }
        }
        handle(server, ctype, render);
    });
}

/// Answer requests until the server stops; then wake the next handler so that it stops too.
fn handle<F: Fn() -> String>(server: &Server, ctype: &Header, render: &Mutex<F>) {
    loop {
        match server.recv() {
            Ok(rq) => answer(rq, ctype, render),
            Err(e) => {
                tracing::debug!(error = %e, "metrics handler stops");
                server.unblock();
                return;
            }
        }
    }
}

/// Answer one request: 200 with the metrics for `GET /metrics`, 404 otherwise.
fn answer<F: Fn() -> String>(rq: Request, ctype: &Header, render: &Mutex<F>) {
    let path = rq.url().split('?').next().unwrap_or("");
    let response = if *rq.method() == Method::Get && path == "/metrics" {
        let body = (render.lock().unwrap_or_else(PoisonError::into_inner))();
        Response::from_string(body).with_header(ctype.clone())
    } else {
        Response::from_string("not found; try GET /metrics\n").with_status_code(404)
    };
    // Always a Content-Length, never chunks: simple clients read the body as it comes.
    if let Err(e) = rq.respond(response.with_chunked_threshold(usize::MAX)) {
        tracing::debug!(error = %e, "metrics answer failed");
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::io::{Read, Write};
    use std::net::TcpStream;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};

    /// Far beyond any scrape, so that a broken endpoint fails the test instead of hanging it.
    const PATIENCE: Duration = Duration::from_secs(60);

    /// The whole answer to `GET path` on `addr`.
    pub(crate) fn get(addr: SocketAddr, path: &str) -> String {
        let mut s = TcpStream::connect(addr).expect("connect");
        s.set_read_timeout(Some(PATIENCE)).expect("timeout");
        write!(
            s,
            "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
        )
        .expect("request");
        let mut out = String::new();
        s.read_to_string(&mut out).expect("response");
        out
    }

    #[test]
    fn serves_metrics_404_and_writes_the_port_file() {
        let dir = std::env::temp_dir().join(format!("castor-serve-{}", std::process::id()));
        let _ = std::fs::create_dir_all(&dir);
        let pf = dir.join("port");
        let addr = serve_metrics(
            "127.0.0.1:0".parse().expect("addr"),
            Some(&pf),
            "text/x-test",
            || "m 1\n".into(),
        )
        .expect("serve");
        assert_eq!(
            std::fs::read_to_string(&pf).expect("port file").trim(),
            addr.to_string()
        );
        let r = get(addr, "/metrics?x=1");
        assert!(
            r.starts_with("HTTP/1.1 200 OK") && r.contains("text/x-test") && r.ends_with("m 1\n"),
            "{r}"
        );
        assert!(r.contains("Content-Length: 4\r\n"), "{r}");
        assert!(get(addr, "/other").starts_with("HTTP/1.1 404"));
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_kept_alive_connection_gets_every_answer() {
        let addr = serve_metrics(
            "127.0.0.1:0".parse().expect("addr"),
            None,
            "text/x-test",
            || "m 2\n".into(),
        )
        .expect("serve");
        let mut s = TcpStream::connect(addr).expect("connect");
        s.set_read_timeout(Some(PATIENCE)).expect("timeout");
        let mut seen = String::new();
        for _ in 0..2 {
            write!(s, "GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n").expect("request");
            // Read until this answer's body is in (the connection stays open).
            let mut buf = [0u8; 512];
            let start = seen.matches("m 2\n").count();
            while seen.matches("m 2\n").count() == start {
                let n = s.read(&mut buf).expect("response");
                assert!(n > 0, "closed early: {seen}");
                seen.push_str(&String::from_utf8_lossy(&buf[..n]));
            }
        }
        assert_eq!(seen.matches("HTTP/1.1 200 OK").count(), 2, "{seen}");
    }

    #[test]
    fn an_idle_connection_is_closed_by_the_server() {
        let addr = serve_metrics(
            "127.0.0.1:0".parse().expect("addr"),
            None,
            "text/x-test",
            String::new,
        )
        .expect("serve");
        let mut s = TcpStream::connect(addr).expect("connect");
        s.set_read_timeout(Some(PATIENCE)).expect("timeout");
        // Silent: the server gives up on it (its thread and socket freed) and closes it.
        let mut rest = Vec::new();
        s.read_to_end(&mut rest)
            .expect("the server closes an idle connection");
        let rest = String::from_utf8_lossy(&rest);
        assert!(
            rest.is_empty() || rest.starts_with("HTTP/1.1 408"),
            "{rest}"
        );
    }

    #[test]
    fn slow_and_idle_clients_do_not_block_a_scrape() {
        let addr = serve_metrics(
            "127.0.0.1:0".parse().expect("addr"),
            None,
            "text/x-test",
            || "m 3\n".into(),
        )
        .expect("serve");
        let n = HANDLERS + 2;
        // Connected, silent.
        let idle: Vec<TcpStream> = (0..n)
            .map(|_| TcpStream::connect(addr).expect("connect"))
            .collect();
        // A request begun and never finished: a header line that grows by a byte at a time.
        let mut slow: Vec<TcpStream> = (0..n)
            .map(|_| {
                let mut s = TcpStream::connect(addr).expect("connect");
                s.write_all(b"GET /metrics HTTP/1.1\r\nX-Slow: ")
                    .expect("partial request");
                s
            })
            .collect();
        // Whole requests, pipelined, whose answers are never read.
        let deaf: Vec<TcpStream> = (0..n)
            .map(|_| {
                let mut s = TcpStream::connect(addr).expect("connect");
                for _ in 0..4 {
                    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
                        .expect("request");
                }
                s
            })
            .collect();
        let stop = Arc::new(AtomicBool::new(false));
        let dribble = {
            let stop = Arc::clone(&stop);
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    for s in &mut slow {
                        let _ = s.write_all(b"a");
                    }
                    std::thread::sleep(Duration::from_millis(200));
                }
            })
        };
        for _ in 0..3 {
            let r = get(addr, "/metrics");
            assert!(
                r.starts_with("HTTP/1.1 200 OK") && r.ends_with("m 3\n"),
                "{r}"
            );
        }
        stop.store(true, Ordering::Relaxed);
        dribble.join().expect("dribbler");
        drop((idle, deaf));
    }
}
