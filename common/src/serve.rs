//! A minimal HTTP endpoint for the daemons' Prometheus metrics, and the port file the
//! daemons write when they bind port 0.
//!
//! One request at a time from a background thread: `GET /metrics` answers 200 with what
//! the render closure returns, anything else 404. No HTTP crate is needed for that.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Errors starting the endpoint.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// The address cannot be bound (or the thread cannot start).
    #[error("cannot serve metrics on {addr}")]
    Bind {
        /// The address asked for.
        addr: SocketAddr,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// The port file cannot be written.
    #[error("cannot write the port file {path}")]
    PortFile {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
}

/// Serve `GET /metrics` on `addr` with `content_type` and the body `render` returns.
/// Returns the bound address, also written to `port_file` if given.
pub fn serve_metrics(
    addr: SocketAddr,
    port_file: Option<&Path>,
    content_type: &'static str,
    render: impl Fn() -> String + Send + 'static,
) -> Result<SocketAddr, ServeError> {
    let l = TcpListener::bind(addr).map_err(|source| ServeError::Bind { addr, source })?;
    let bound = l
        .local_addr()
        .map_err(|source| ServeError::Bind { addr, source })?;
    if let Some(p) = port_file {
        write_port_file(p, bound).map_err(|source| ServeError::PortFile {
            path: p.to_path_buf(),
            source,
        })?;
    }
    std::thread::Builder::new()
        .name("castor-metrics".into())
        .spawn(move || {
            for conn in l.incoming() {
                match conn {
                    Ok(s) => {
                        if let Err(e) = answer(s, content_type, &render) {
                            tracing::debug!(error = %e, "metrics request failed");
                        }
                    }
                    Err(e) => tracing::debug!(error = %e, "metrics accept failed"),
                }
            }
        })
        .map_err(|source| ServeError::Bind { addr, source })?;
    Ok(bound)
}

/// Answer one HTTP/1.x request: 200 with the metrics for `GET /metrics`, 404 otherwise.
fn answer(
    mut s: TcpStream,
    content_type: &str,
    render: &dyn Fn() -> String,
) -> std::io::Result<()> {
    s.set_read_timeout(Some(Duration::from_secs(2)))?;
    s.set_write_timeout(Some(Duration::from_secs(2)))?;
    let mut req = Vec::new();
    let mut buf = [0u8; 1024];
    while !req.windows(4).any(|w| w == b"\r\n\r\n") && req.len() < 8192 {
        let n = s.read(&mut buf)?;
        if n == 0 {
            break;
        }
        req.extend_from_slice(&buf[..n]);
    }
    let line = req.split(|&b| b == b'\n').next().unwrap_or_default();
    let line = String::from_utf8_lossy(line);
    let mut parts = line.split_whitespace();
    let (method, target) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    let path = target.split('?').next().unwrap_or("");
    let (status, ctype, body) = if method == "GET" && path == "/metrics" {
        ("200 OK", content_type, render())
    } else {
        (
            "404 Not Found",
            "text/plain; charset=utf-8",
            "not found; try GET /metrics\n".to_string(),
        )
    };
    write!(
        s,
        "HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )?;
    s.flush()
}

/// Write `addr` to `path` through a temp file and a rename, so readers never see part.
pub fn write_port_file(path: &Path, addr: SocketAddr) -> std::io::Result<()> {
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(format!(".tmp.{}", std::process::id()));
    let tmp = PathBuf::from(tmp);
    {
        let mut f = std::fs::File::create(&tmp)?;
        writeln!(f, "{addr}")?;
        f.sync_all()?;
    }
    std::fs::rename(&tmp, path)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn get(addr: SocketAddr, path: &str) -> String {
        let mut s = TcpStream::connect(addr).expect("connect");
        write!(s, "GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").expect("request");
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
        assert!(get(addr, "/other").starts_with("HTTP/1.1 404"));
        let _ = std::fs::remove_dir_all(&dir);
    }
}
