//! The daemons' Prometheus metrics endpoint: HTTP/1.1 on std sockets, requests parsed by
//! `httparse`, with its port file ([`crate::port_file`]) when it binds port 0.
//!
//! `GET /metrics` answers 200 with what the render closure returns, anything else 404.
//! Every connection is read and answered on a thread of its own, at most
//! [`MAX_CONNECTIONS`] at a time (one beyond is closed at once), so a client that sends
//! slowly, or nothing at all, holds only its own thread and never the scrapes of others.
//! A request must arrive whole within [`IO_TIMEOUT`] of its first byte being awaited (a
//! client dribbling a header a byte at a time is cut off then, with 408), and an answer
//! must be written within it too. Connections stay open between requests (HTTP/1.1
//! keep-alive) unless the client sends `Connection: close` or speaks HTTP/1.0.
//!
//! (Until issue 14 this was tiny_http, whose connection pool can leave a new connection
//! queued behind busy threads with none woken for it: a few clients that never finish a
//! request then starve every scrape. The test below caught it one run in five.)

use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use crate::port_file::{self, PortFileError};

/// Connections served at once; one more is closed as soon as it is accepted.
pub const MAX_CONNECTIONS: usize = 64;

/// How long a request may take to arrive whole, and an answer to be written.
pub const IO_TIMEOUT: Duration = Duration::from_secs(5);

/// The longest request head read (request line and headers).
const MAX_HEAD: usize = 8192;

/// Headers parsed at most per request.
const MAX_HEADERS: usize = 32;

/// Pause after a failed accept (e.g. the process is out of file descriptors).
const ACCEPT_PAUSE: Duration = Duration::from_millis(100);

/// Errors starting the endpoint.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// The address cannot be bound (or the server thread cannot start).
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

/// What the connections share: the content type and the render closure.
struct Endpoint<F> {
    content_type: &'static str,
    render: Mutex<F>,
    live: AtomicUsize,
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
    if content_type.bytes().any(|b| b.is_ascii_control()) {
        return Err(ServeError::ContentType(content_type));
    }
    let listener = TcpListener::bind(addr).map_err(bind)?;
    let bound = listener.local_addr().map_err(bind)?;
    if let Some(p) = port_file {
        port_file::write(p, bound)?;
    }
    let endpoint = Arc::new(Endpoint {
        content_type,
        render: Mutex::new(render),
        live: AtomicUsize::new(0),
    });
    std::thread::Builder::new()
        .name("castor-metrics".into())
        .spawn(move || accept_loop(&listener, &endpoint))
        .map_err(bind)?;
    Ok(bound)
}

/// Accept connections for ever, each onto a thread of its own.
fn accept_loop<F: Fn() -> String + Send + 'static>(
    listener: &TcpListener,
    endpoint: &Arc<Endpoint<F>>,
) {
    loop {
        let stream = match listener.accept() {
            Ok((s, _)) => s,
            Err(e) if e.kind() == ErrorKind::Interrupted => continue,
            Err(e) => {
                tracing::warn!(error = %e, "metrics endpoint: accept failed; retrying");
                std::thread::sleep(ACCEPT_PAUSE);
                continue;
            }
        };
        if endpoint.live.fetch_add(1, Ordering::AcqRel) >= MAX_CONNECTIONS {
            endpoint.live.fetch_sub(1, Ordering::AcqRel);
            tracing::debug!("metrics endpoint: too many connections; closed one at once");
            continue;
        }
        let ep = Arc::clone(endpoint);
        let spawned = std::thread::Builder::new()
            .name("castor-metrics-conn".into())
            .spawn(move || {
                if let Err(e) = connection(stream, &ep) {
                    tracing::debug!(error = %e, "metrics connection ended");
                }
                ep.live.fetch_sub(1, Ordering::AcqRel);
            });
        if let Err(e) = spawned {
            endpoint.live.fetch_sub(1, Ordering::AcqRel);
            tracing::warn!(error = %e, "metrics endpoint: cannot start a connection thread");
        }
    }
}

/// One parsed request: what the answer depends on.
struct Head {
    /// The request's length in the buffer.
    len: usize,
    /// Whether it asks for the metrics.
    metrics: bool,
    /// Whether the connection ends after the answer.
    close: bool,
}

/// Serve one connection: read requests, answer each, until the client closes, asks to,
/// or is too slow.
fn connection<F: Fn() -> String>(mut s: TcpStream, ep: &Endpoint<F>) -> std::io::Result<()> {
    s.set_write_timeout(Some(IO_TIMEOUT))?;
    let mut buf = Vec::with_capacity(1024);
    loop {
        let Some(head) = read_head(&mut s, &mut buf)? else {
            return Ok(());
        };
        buf.drain(..head.len);
        let (status, ctype, body) = if head.metrics {
            let body = (ep.render.lock().unwrap_or_else(PoisonError::into_inner))();
            ("200 OK", ep.content_type, body)
        } else {
            (
                "404 Not Found",
                "text/plain",
                "not found; try GET /metrics\n".to_string(),
            )
        };
        respond(&mut s, status, ctype, &body, head.close)?;
        if head.close {
            return Ok(());
        }
    }
}

/// Read until `buf` holds a whole request head, within [`IO_TIMEOUT`]. `None`: the client
/// closed between requests, or was answered 400/408/431 and is to be dropped.
fn read_head(s: &mut TcpStream, buf: &mut Vec<u8>) -> std::io::Result<Option<Head>> {
    let deadline = Instant::now() + IO_TIMEOUT;
    let mut chunk = [0u8; 1024];
    loop {
        let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
        let mut rq = httparse::Request::new(&mut headers);
        match rq.parse(buf) {
            Ok(httparse::Status::Complete(len)) => {
                let path = rq.path.unwrap_or("").split('?').next().unwrap_or("");
                let connection = rq
                    .headers
                    .iter()
                    .find(|h| h.name.eq_ignore_ascii_case("connection"))
                    .map(|h| String::from_utf8_lossy(h.value).to_ascii_lowercase());
                let has_body = rq.headers.iter().any(|h| {
                    h.name.eq_ignore_ascii_case("transfer-encoding")
                        || (h.name.eq_ignore_ascii_case("content-length") && h.value != b"0")
                });
                let close = has_body
                    || rq.version != Some(1)
                    || connection.is_some_and(|c| c.contains("close"));
                return Ok(Some(Head {
                    len,
                    metrics: rq.method == Some("GET") && path == "/metrics",
                    close,
                }));
            }
            Ok(httparse::Status::Partial) if buf.len() >= MAX_HEAD => {
                respond(
                    s,
                    "431 Request Header Fields Too Large",
                    "text/plain",
                    "",
                    true,
                )?;
                return Ok(None);
            }
            Ok(httparse::Status::Partial) => {}
            Err(_) => {
                respond(s, "400 Bad Request", "text/plain", "", true)?;
                return Ok(None);
            }
        }
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            respond(s, "408 Request Timeout", "text/plain", "", true)?;
            return Ok(None);
        }
        s.set_read_timeout(Some(left))?;
        match s.read(&mut chunk) {
            Ok(0) => return Ok(None),
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                if !buf.is_empty() {
                    respond(s, "408 Request Timeout", "text/plain", "", true)?;
                }
                return Ok(None);
            }
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
}

/// Write one answer, always with a Content-Length (simple clients read the body as it
/// comes).
fn respond(
    s: &mut TcpStream,
    status: &str,
    content_type: &str,
    body: &str,
    close: bool,
) -> std::io::Result<()> {
    let connection = if close { "close" } else { "keep-alive" };
    let head = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\n\
         Connection: {connection}\r\n\r\n",
        body.len()
    );
    s.write_all(head.as_bytes())?;
    s.write_all(body.as_bytes())?;
    s.flush()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{PATIENCE, http_get_raw as get};
    use std::io::{Read, Write};
    use std::net::TcpStream;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};

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
        let n = 8;
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

    #[test]
    fn a_request_dribbled_a_byte_at_a_time_is_cut_off() {
        let addr = serve_metrics(
            "127.0.0.1:0".parse().expect("addr"),
            None,
            "text/x-test",
            || "m 4\n".into(),
        )
        .expect("serve");
        let mut s = TcpStream::connect(addr).expect("connect");
        s.write_all(b"GET /metrics HTTP/1.1\r\nX-Slow: ")
            .expect("partial request");
        let mut w = s.try_clone().expect("clone");
        let stop = Arc::new(AtomicBool::new(false));
        let dribble = {
            let stop = Arc::clone(&stop);
            // Each byte well within any per-read timeout: only a whole-request deadline ends it.
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) && w.write_all(b"a").is_ok() {
                    std::thread::sleep(Duration::from_millis(100));
                }
            })
        };
        s.set_read_timeout(Some(PATIENCE)).expect("timeout");
        let mut rest = Vec::new();
        let _ = s.read_to_end(&mut rest);
        stop.store(true, Ordering::Relaxed);
        dribble.join().expect("dribbler");
        let rest = String::from_utf8_lossy(&rest);
        assert!(rest.starts_with("HTTP/1.1 408"), "{rest}");
        // And the endpoint still answers.
        assert!(get(addr, "/metrics").ends_with("m 4\n"));
    }
}
