//! For the tests of the daemons and their users: a client of the `--metrics` endpoint
//! ([`crate::serve`]). Panics on any failure: it is for tests only (`test-support`).

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

/// Far beyond any scrape, so that a broken endpoint fails a test instead of hanging it.
pub const PATIENCE: Duration = Duration::from_secs(60);

/// The whole answer (status line, headers, body) to `GET path` on `addr`.
pub fn http_get_raw(addr: SocketAddr, path: &str) -> String {
    let fail = |e: std::io::Error| -> ! { panic!("GET {path} on {addr}: {e}") };
    let mut s = TcpStream::connect(addr).unwrap_or_else(|e| fail(e));
    s.set_read_timeout(Some(PATIENCE))
        .unwrap_or_else(|e| fail(e));
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n"
    )
    .unwrap_or_else(|e| fail(e));
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap_or_else(|e| fail(e));
    out
}

/// `GET path` on `addr`: the answer's status line and its body.
pub fn http_get(addr: SocketAddr, path: &str) -> (String, String) {
    let out = http_get_raw(addr, path);
    let (head, body) = out.split_once("\r\n\r\n").unwrap_or((&out, ""));
    (
        head.lines().next().unwrap_or("").to_string(),
        body.to_string(),
    )
}

/// The value of the sample `name` (with its labels, if any, as written) in an exposition.
pub fn sample(body: &str, name: &str) -> Option<f64> {
    body.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn samples_are_found_by_their_whole_name() {
        let body = "a_total 3\na{x=\"1\"} 2.5\nab 9\n# EOF\n";
        assert_eq!(sample(body, "a_total"), Some(3.0));
        assert_eq!(sample(body, "a{x=\"1\"}"), Some(2.5));
        assert_eq!(sample(body, "a"), None);
        assert_eq!(sample(body, "missing"), None);
    }
}
