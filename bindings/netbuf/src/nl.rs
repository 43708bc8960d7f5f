//! A small synchronous rtnetlink client: one `NETLINK_ROUTE` socket in the calling thread's
//! network namespace, one request at a time, every request acknowledged. The kernel's
//! extended ack message (`NLMSGERR_ATTR_MSG`, "Specified qdisc kind is unknown.") is kept
//! with the error, so an error names what the kernel said and not only an errno.

use netlink_packet_core::{
    NLM_F_ACK, NLM_F_DUMP, NLM_F_REQUEST, NetlinkHeader, NetlinkMessage, NetlinkPayload, NlaBuffer,
    NlasIterator,
};
use netlink_packet_route::RouteNetlinkMessage;
use netlink_sys::{Socket, SocketAddr, protocols::NETLINK_ROUTE};

/// `NLMSGERR_ATTR_MSG` (linux/netlink.h): the extended ack's text.
const NLMSGERR_ATTR_MSG: u16 = 1;
/// `NLM_F_ACK_TLVS`: the error carries extended ack attributes.
const NLM_F_ACK_TLVS: u16 = 0x200;
/// Length of a netlink message header (what a capped error echoes of the request).
const NLMSG_HDRLEN: usize = 16;
/// How long the kernel may take to answer a request (it answers at once; a request made
/// inside a checkpoint's pause must not hang it forever).
const ANSWER_WAIT: std::time::Duration = std::time::Duration::from_secs(5);

/// `SO_RCVTIMEO` on `sock`.
fn set_timeout(sock: &Socket, d: std::time::Duration) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    let tv = libc::timeval {
        tv_sec: libc::time_t::try_from(d.as_secs()).unwrap_or(libc::time_t::MAX),
        tv_usec: libc::suseconds_t::from(d.subsec_micros()),
    };
    // SAFETY: `sock` is an open socket for the whole call; `tv` is a timeval of the size
    // passed and outlives the call, which only reads it.
    let rc = unsafe {
        libc::setsockopt(
            sock.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVTIMEO,
            std::ptr::from_ref(&tv).cast(),
            std::mem::size_of::<libc::timeval>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// Errors talking rtnetlink.
#[derive(Debug, thiserror::Error)]
pub enum NlError {
    /// The socket cannot be opened, bound or used.
    #[error("rtnetlink socket: {op}")]
    Socket {
        /// What was being done.
        op: &'static str,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// The kernel refused the request.
    #[error("the kernel refused it: {source}{}", ext_text(.ext))]
    Refused {
        /// The errno (positive).
        errno: i32,
        /// The kernel's extended ack message, if it sent one.
        ext: Option<String>,
        /// The errno as an I/O error.
        #[source]
        source: std::io::Error,
    },
    /// The kernel's answer cannot be parsed.
    #[error("cannot parse the kernel's answer: {0}")]
    Decode(String),
}

fn ext_text(ext: &Option<String>) -> String {
    ext.as_ref().map_or(String::new(), |m| format!(" ({m})"))
}

impl NlError {
    /// The errno of a refused request (None for other errors).
    pub fn errno(&self) -> Option<i32> {
        match self {
            NlError::Refused { errno, .. } => Some(*errno),
            _ => None,
        }
    }

    /// The kernel's extended ack message of a refused request.
    pub fn ext(&self) -> Option<&str> {
        match self {
            NlError::Refused { ext, .. } => ext.as_deref(),
            _ => None,
        }
    }
}

/// An rtnetlink socket in the network namespace of the thread that opened it.
#[derive(Debug)]
pub struct Rtnl {
    sock: Socket,
    seq: u32,
}

impl Rtnl {
    /// Open a socket, with capped and extended acks.
    pub fn open() -> Result<Self, NlError> {
        let sock_err = |op| move |source| NlError::Socket { op, source };
        let mut sock = Socket::new(NETLINK_ROUTE).map_err(sock_err("open"))?;
        sock.bind_auto().map_err(sock_err("bind"))?;
        sock.connect(&SocketAddr::new(0, 0))
            .map_err(sock_err("connect"))?;
        // Best effort: without them an error is still an errno.
        let _ = sock.set_cap_ack(true);
        let _ = sock.set_ext_ack(true);
        set_timeout(&sock, ANSWER_WAIT).map_err(sock_err("set a receive timeout"))?;
        Ok(Self { sock, seq: 0 })
    }

    /// Send `msg` with `flags` (besides REQUEST and ACK) and collect the messages the
    /// kernel answers with until its ack (or, for a dump, its DONE).
    pub fn request(
        &mut self,
        msg: RouteNetlinkMessage,
        flags: u16,
    ) -> Result<Vec<RouteNetlinkMessage>, NlError> {
        self.seq = self.seq.wrapping_add(1);
        let seq = self.seq;
        let mut header = NetlinkHeader::default();
        header.flags = NLM_F_REQUEST | NLM_F_ACK | flags;
        header.sequence_number = seq;
        let mut req = NetlinkMessage::new(header, NetlinkPayload::from(msg));
        req.finalize();
        let mut buf = vec![0u8; req.buffer_len()];
        req.serialize(&mut buf);
        self.sock
            .send(&buf, 0)
            .map_err(|source| NlError::Socket { op: "send", source })?;
        let dump = flags & NLM_F_DUMP == NLM_F_DUMP;
        let mut out = Vec::new();
        loop {
            let (data, _) = self.sock.recv_from_full().map_err(|source| {
                let op = if source.kind() == std::io::ErrorKind::WouldBlock {
                    "waiting for the kernel's answer (none within 5 s)"
                } else {
                    "recv"
                };
                NlError::Socket { op, source }
            })?;
            let mut off = 0;
            while off < data.len() {
                let rest = &data[off..];
                let msg = NetlinkMessage::<RouteNetlinkMessage>::deserialize(rest)
                    .map_err(|e| NlError::Decode(e.to_string()))?;
                let len = msg.header.length as usize;
                if len == 0 {
                    return Err(NlError::Decode("a message of length 0".into()));
                }
                off += (len + 3) & !3;
                if msg.header.sequence_number != seq {
                    continue; // an answer to an earlier request that gave up
                }
                let flags = msg.header.flags;
                match msg.payload {
                    NetlinkPayload::Error(e) => match e.code {
                        None => return Ok(out), // the ack
                        Some(code) => {
                            let errno = code.get().abs();
                            let ext = if flags & NLM_F_ACK_TLVS != 0 {
                                ext_message(&e.header)
                            } else {
                                None
                            };
                            return Err(NlError::Refused {
                                errno,
                                ext,
                                source: std::io::Error::from_raw_os_error(errno),
                            });
                        }
                    },
                    NetlinkPayload::Done(_) if dump => return Ok(out),
                    NetlinkPayload::InnerMessage(m) => out.push(m),
                    _ => {}
                }
            }
        }
    }
}

/// The extended ack text in a capped error's payload: the echoed request header, then
/// attributes.
fn ext_message(payload: &[u8]) -> Option<String> {
    let tlvs = payload.get(NLMSG_HDRLEN..)?;
    for nla in NlasIterator::new(tlvs) {
        let nla: NlaBuffer<&[u8]> = nla.ok()?;
        if nla.kind() == NLMSGERR_ATTR_MSG {
            let v = nla.value();
            let end = v.iter().position(|&b| b == 0).unwrap_or(v.len());
            return Some(String::from_utf8_lossy(&v[..end]).trim().to_string());
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_extended_ack_text_is_found_after_the_echoed_header() {
        let mut p = vec![0u8; NLMSG_HDRLEN];
        let text = b"Specified qdisc kind is unknown\0";
        let len = 4 + text.len();
        p.extend_from_slice(&u16::try_from(len).unwrap().to_ne_bytes());
        p.extend_from_slice(&NLMSGERR_ATTR_MSG.to_ne_bytes());
        p.extend_from_slice(text);
        while !p.len().is_multiple_of(4) {
            p.push(0);
        }
        assert_eq!(
            ext_message(&p).as_deref(),
            Some("Specified qdisc kind is unknown")
        );
        assert_eq!(ext_message(&p[..8]), None);
    }
}
