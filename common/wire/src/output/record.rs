//! Output records on the wire to the sink: the frame format (`u8 source | u64 seq |
//! payload`, frame type [`FrameType::Output`]), the daemons' [`OutputSink`], and the
//! reader a consumer runs ([`read_records`]).

use super::{OutputError, Source};
use crate::frame::{FrameReader, FrameType, MAX_FRAME, put_frame};
use ha_workloads::guest_abi::{OUTPUT_PAYLOAD, OutputRecord};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};

/// A TCP connection to the output sink.
#[derive(Debug)]
pub struct OutputSink {
    addr: SocketAddr,
    stream: std::io::BufWriter<TcpStream>,
    source: Source,
    buf: Vec<u8>,
}

impl OutputSink {
    /// Connect to the sink at `addr`, releasing as `source`.
    pub fn connect(addr: SocketAddr, source: Source) -> Result<Self, OutputError> {
        let s = TcpStream::connect(addr).map_err(|source| OutputError::Sink { addr, source })?;
        let _ = s.set_nodelay(true);
        Ok(Self {
            addr,
            stream: std::io::BufWriter::new(s),
            source,
            buf: Vec::new(),
        })
    }

    /// Send records to the world, in order, and flush.
    pub fn release(&mut self, records: &[OutputRecord]) -> Result<(), OutputError> {
        for r in records {
            self.buf.clear();
            encode_record(&mut self.buf, self.source, r);
            self.stream
                .write_all(&self.buf)
                .map_err(|source| OutputError::Sink {
                    addr: self.addr,
                    source,
                })?;
        }
        self.stream.flush().map_err(|source| OutputError::Sink {
            addr: self.addr,
            source,
        })
    }
}

/// Append one output frame: `u8 source | u64 seq | payload`.
pub fn encode_record(out: &mut Vec<u8>, source: Source, r: &OutputRecord) {
    let mut body = Vec::with_capacity(9 + r.payload.len());
    body.push(source as u8);
    body.extend_from_slice(&r.seq.to_le_bytes());
    body.extend_from_slice(&r.payload[..r.payload.len().min(OUTPUT_PAYLOAD)]);
    put_frame(out, FrameType::Output, &body);
}

/// Parse an output frame body.
pub fn decode_record(body: &[u8]) -> Result<(Source, OutputRecord), OutputError> {
    if body.len() < 9 || body.len() > 9 + OUTPUT_PAYLOAD {
        return Err(OutputError::Malformed("length"));
    }
    let source = match body[0] {
        0 => Source::Primary,
        1 => Source::Backup,
        _ => return Err(OutputError::Malformed("source")),
    };
    let seq = u64::from_le_bytes(
        body[1..9]
            .try_into()
            .map_err(|_| OutputError::Malformed("seq"))?,
    );
    Ok((
        source,
        OutputRecord {
            seq,
            payload: body[9..].to_vec(),
        },
    ))
}

/// Read output frames from `r` until EOF, calling `f` for each record.
pub fn read_records(
    r: impl Read,
    mut f: impl FnMut(Source, OutputRecord),
) -> Result<(), OutputError> {
    let mut frames = FrameReader::new(r, MAX_FRAME);
    loop {
        while let Some(frame) = frames
            .next_buffered()
            .map_err(|_| OutputError::Malformed("frame"))?
        {
            if !frame.is(FrameType::Output) {
                return Err(OutputError::Malformed("frame type"));
            }
            let (s, rec) = decode_record(frame.body())?;
            f(s, rec);
        }
        match frames.fill() {
            Ok(0) => return Ok(()),
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(_) => return Ok(()), // the releasing side died: that is a normal end here
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::testutil::rec;
    use super::*;

    #[test]
    fn frames_roundtrip() {
        let mut buf = Vec::new();
        encode_record(&mut buf, Source::Backup, &rec(9, 3));
        encode_record(&mut buf, Source::Primary, &rec(10, 4));
        let mut got = Vec::new();
        read_records(&buf[..], |s, r| got.push((s, r))).unwrap();
        assert_eq!(
            got,
            vec![(Source::Backup, rec(9, 3)), (Source::Primary, rec(10, 4))]
        );
        assert!(decode_record(&[7; 9]).is_err());
    }
}
