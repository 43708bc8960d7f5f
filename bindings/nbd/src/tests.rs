//! The server against an in-test client over socketpairs and a Unix socket.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use ha_guest::diskimage::DiskImageError;
use ha_guest::domain::{Disk, DiskWrite};

use crate::export::{ExportError, Image, ServedDisk, Server};
use crate::proto::{self, End, ProtoError};

const SIZE: u64 = 1 << 20;

/// A 1 MiB image with a pattern (byte i = i % 251).
fn image(dir: &tempfile::TempDir) -> Arc<Image> {
    let path = dir.path().join("disk.img");
    let bytes: Vec<u8> = (0..SIZE).map(|i| (i % 251) as u8).collect();
    std::fs::write(&path, bytes).unwrap();
    Image::open(&path).unwrap()
}

/// The server side of a socketpair, serving `image` on a thread.
fn serve(image: &Arc<Image>) -> (UnixStream, JoinHandle<Result<End, ProtoError>>) {
    let (mut server, client) = UnixStream::pair().unwrap();
    let image = image.clone();
    let t = std::thread::spawn(move || proto::serve(&mut server, crate::EXPORT_NAME, &*image));
    (client, t)
}

fn read_n(c: &mut UnixStream, n: usize) -> Vec<u8> {
    let mut b = vec![0u8; n];
    c.read_exact(&mut b).unwrap();
    b
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes(b[at..at + 4].try_into().unwrap())
}

/// The server's greeting and the client's flags.
fn greet(c: &mut UnixStream, flags: u32) {
    let hello = read_n(c, 18);
    assert_eq!(&hello[..8], b"NBDMAGIC");
    assert_eq!(&hello[8..16], b"IHAVEOPT");
    assert_eq!(u16::from_be_bytes([hello[16], hello[17]]), 3);
    c.write_all(&flags.to_be_bytes()).unwrap();
}

fn option(c: &mut UnixStream, opt: u32, data: &[u8]) {
    let mut m = proto::IHAVEOPT.to_be_bytes().to_vec();
    m.extend_from_slice(&opt.to_be_bytes());
    m.extend_from_slice(&(data.len() as u32).to_be_bytes());
    m.extend_from_slice(data);
    c.write_all(&m).unwrap();
}

/// One option reply: (type, data).
fn opt_reply(c: &mut UnixStream, opt: u32) -> (u32, Vec<u8>) {
    let h = read_n(c, 20);
    assert_eq!(
        u64::from_be_bytes(h[..8].try_into().unwrap()),
        proto::REPLY_MAGIC
    );
    assert_eq!(u32_at(&h, 8), opt);
    let len = u32_at(&h, 16) as usize;
    (u32_at(&h, 12), read_n(c, len))
}

fn go_data(name: &str) -> Vec<u8> {
    let mut d = (name.len() as u32).to_be_bytes().to_vec();
    d.extend_from_slice(name.as_bytes());
    d.extend_from_slice(&1u16.to_be_bytes());
    d.extend_from_slice(&proto::INFO_BLOCK_SIZE.to_be_bytes());
    d
}

/// Handshake with GO; returns the export's size and flags.
fn go(c: &mut UnixStream) -> (u64, u16) {
    greet(c, 3);
    option(c, proto::OPT_GO, &go_data("castor"));
    let (kind, info) = opt_reply(c, proto::OPT_GO);
    assert_eq!(kind, proto::REP_INFO);
    assert_eq!(u16::from_be_bytes([info[0], info[1]]), proto::INFO_EXPORT);
    let size = u64::from_be_bytes(info[2..10].try_into().unwrap());
    let flags = u16::from_be_bytes([info[10], info[11]]);
    let (kind, bs) = opt_reply(c, proto::OPT_GO);
    assert_eq!(kind, proto::REP_INFO);
    assert_eq!(u32_at(&bs, 6), 4096, "preferred block size");
    assert_eq!(opt_reply(c, proto::OPT_GO).0, proto::REP_ACK);
    (size, flags)
}

fn request(c: &mut UnixStream, cmd: u16, flags: u16, handle: u64, offset: u64, len: u32) {
    let mut m = proto::REQUEST_MAGIC.to_be_bytes().to_vec();
    m.extend_from_slice(&flags.to_be_bytes());
    m.extend_from_slice(&cmd.to_be_bytes());
    m.extend_from_slice(&handle.to_be_bytes());
    m.extend_from_slice(&offset.to_be_bytes());
    m.extend_from_slice(&len.to_be_bytes());
    c.write_all(&m).unwrap();
}

/// A simple reply's error, checked for `handle`.
fn reply(c: &mut UnixStream, handle: u64) -> u32 {
    let h = read_n(c, 16);
    assert_eq!(u32_at(&h, 0), proto::SIMPLE_REPLY_MAGIC);
    assert_eq!(u64::from_be_bytes(h[8..16].try_into().unwrap()), handle);
    u32_at(&h, 4)
}

fn write(c: &mut UnixStream, handle: u64, offset: u64, data: &[u8]) -> u32 {
    request(c, proto::CMD_WRITE, 0, handle, offset, data.len() as u32);
    c.write_all(data).unwrap();
    reply(c, handle)
}

fn read(c: &mut UnixStream, handle: u64, offset: u64, len: u32) -> Result<Vec<u8>, u32> {
    request(c, proto::CMD_READ, 0, handle, offset, len);
    match reply(c, handle) {
        0 => Ok(read_n(c, len as usize)),
        e => Err(e),
    }
}

fn disc(mut c: UnixStream, t: JoinHandle<Result<End, ProtoError>>) {
    request(&mut c, proto::CMD_DISC, 0, 99, 0, 0);
    assert_eq!(t.join().unwrap().unwrap(), End::Disconnected);
}

fn drained(image: &Image) -> Vec<DiskWrite> {
    let mut w = Vec::new();
    image.drain_writes(&mut w);
    w
}

#[test]
fn reads_come_from_the_image_and_writes_reach_it_and_the_log() {
    let dir = tempfile::tempdir().unwrap();
    let img = image(&dir);
    let (mut c, t) = serve(&img);
    let (size, flags) = go(&mut c);
    assert_eq!(size, SIZE);
    assert_eq!(flags, proto::TFLAGS);
    let expect: Vec<u8> = (4096..8192u64).map(|i| (i % 251) as u8).collect();
    assert_eq!(read(&mut c, 1, 4096, 4096).unwrap(), expect);
    assert_eq!(write(&mut c, 2, 8192, &[7u8; 1024]), 0);
    assert_eq!(write(&mut c, 3, 0, &[9u8; 512]), 0);
    assert_eq!(read(&mut c, 4, 8192, 1024).unwrap(), vec![7u8; 1024]);
    request(&mut c, proto::CMD_FLUSH, 0, 5, 0, 0);
    assert_eq!(reply(&mut c, 5), 0);
    disc(c, t);
    // On the file, and in the log in completion order.
    let file = std::fs::read(img.path()).unwrap();
    assert_eq!(&file[8192..9216], &[7u8; 1024]);
    assert_eq!(&file[..512], &[9u8; 512]);
    assert_eq!(
        drained(&img),
        vec![
            DiskWrite {
                offset: 8192,
                data: vec![7; 1024]
            },
            DiskWrite {
                offset: 0,
                data: vec![9; 512]
            },
        ]
    );
    assert!(drained(&img).is_empty(), "a drain empties the log");
}

#[test]
fn export_name_answers_with_size_flags_and_the_zeroes_a_client_asks_for() {
    let dir = tempfile::tempdir().unwrap();
    let img = image(&dir);
    for (flags, zeroes) in [(1u32, 124usize), (3, 0)] {
        let (mut c, t) = serve(&img);
        greet(&mut c, flags);
        option(&mut c, proto::OPT_EXPORT_NAME, b"");
        let a = read_n(&mut c, 10 + zeroes);
        assert_eq!(u64::from_be_bytes(a[..8].try_into().unwrap()), SIZE);
        assert_eq!(u16::from_be_bytes([a[8], a[9]]), proto::TFLAGS);
        assert!(a[10..].iter().all(|&b| b == 0));
        assert_eq!(read(&mut c, 1, 0, 512).unwrap()[1], 1);
        disc(c, t);
    }
    // A name that is not served closes the connection, naming it.
    let (mut c, t) = serve(&img);
    greet(&mut c, 3);
    option(&mut c, proto::OPT_EXPORT_NAME, b"other");
    let e = t.join().unwrap().unwrap_err();
    assert_eq!(
        e.to_string(),
        "the client asked for export \"other\", which is not served here"
    );
}

#[test]
fn options_it_cannot_answer_get_error_replies_and_the_handshake_goes_on() {
    let dir = tempfile::tempdir().unwrap();
    let img = image(&dir);
    let (mut c, t) = serve(&img);
    greet(&mut c, 3);
    option(&mut c, 8, b""); // STRUCTURED_REPLY
    assert_eq!(opt_reply(&mut c, 8).0, proto::REP_ERR_UNSUP);
    option(&mut c, proto::OPT_GO, &go_data("nope"));
    assert_eq!(opt_reply(&mut c, proto::OPT_GO).0, proto::REP_ERR_UNKNOWN);
    // A name length past the data.
    option(&mut c, proto::OPT_GO, &[0, 0, 0, 50, 0, 0]);
    assert_eq!(opt_reply(&mut c, proto::OPT_GO).0, proto::REP_ERR_INVALID);
    option(&mut c, proto::OPT_LIST, b"");
    let (kind, d) = opt_reply(&mut c, proto::OPT_LIST);
    assert_eq!(kind, proto::REP_SERVER);
    assert_eq!(&d[4..], b"castor");
    assert_eq!(opt_reply(&mut c, proto::OPT_LIST).0, proto::REP_ACK);
    option(&mut c, proto::OPT_INFO, &go_data(""));
    assert_eq!(opt_reply(&mut c, proto::OPT_INFO).0, proto::REP_INFO);
    assert_eq!(opt_reply(&mut c, proto::OPT_INFO).0, proto::REP_INFO);
    assert_eq!(opt_reply(&mut c, proto::OPT_INFO).0, proto::REP_ACK);
    option(&mut c, proto::OPT_ABORT, b"");
    assert_eq!(opt_reply(&mut c, proto::OPT_ABORT).0, proto::REP_ACK);
    assert_eq!(t.join().unwrap().unwrap(), End::Aborted);
}

#[test]
fn bad_requests_get_error_replies_and_the_connection_goes_on() {
    let dir = tempfile::tempdir().unwrap();
    let img = image(&dir);
    let (mut c, t) = serve(&img);
    go(&mut c);
    assert_eq!(read(&mut c, 1, SIZE - 512, 1024), Err(proto::EINVAL));
    assert_eq!(read(&mut c, 2, u64::MAX - 100, 512), Err(proto::EINVAL));
    assert_eq!(read(&mut c, 3, 100, 512), Err(proto::EINVAL), "unaligned");
    assert_eq!(read(&mut c, 4, 0, 64 << 20), Err(proto::EOVERFLOW));
    assert_eq!(write(&mut c, 5, SIZE, &[1u8; 512]), proto::ENOSPC);
    assert_eq!(
        write(&mut c, 6, 0, &[1u8; 100]),
        proto::ENOSPC,
        "not whole sectors"
    );
    request(&mut c, 77, 0, 7, 0, 0);
    assert_eq!(reply(&mut c, 7), proto::EINVAL, "unknown command");
    request(&mut c, proto::CMD_TRIM, 0, 8, SIZE - 4096, 8192);
    assert_eq!(reply(&mut c, 8), proto::ENOSPC);
    // Nothing reached the image or the log; the connection still serves.
    assert!(drained(&img).is_empty());
    assert_eq!(read(&mut c, 9, 512, 512).unwrap()[0], (512 % 251) as u8);
    disc(c, t);
}

#[test]
fn a_truncated_stream_or_a_bad_magic_ends_the_connection_with_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let img = image(&dir);
    let (mut c, t) = serve(&img);
    go(&mut c);
    request(&mut c, proto::CMD_WRITE, 0, 1, 0, 4096);
    c.write_all(&[1u8; 1000]).unwrap();
    drop(c);
    let e = t.join().unwrap().unwrap_err();
    assert_eq!(
        e.to_string(),
        "the client's stream ended inside a write's data"
    );
    assert!(drained(&img).is_empty(), "a cut write is not taken in");

    let (mut c, t) = serve(&img);
    go(&mut c);
    c.write_all(&[0xab; 10]).unwrap();
    drop(c);
    let e = t.join().unwrap().unwrap_err();
    assert_eq!(
        e.to_string(),
        "the client's stream ended inside a request's header"
    );

    let (mut c, t) = serve(&img);
    go(&mut c);
    c.write_all(&[0u8; 28]).unwrap();
    let e = t.join().unwrap().unwrap_err();
    assert!(matches!(e, ProtoError::RequestMagic(0)), "{e}");

    let (mut c, t) = serve(&img);
    greet(&mut c, 4);
    let e = t.join().unwrap().unwrap_err();
    assert!(matches!(e, ProtoError::ClientFlags(4)), "{e}");

    // A stream that ends between requests is no error, but no DISC either.
    let (mut c, t) = serve(&img);
    go(&mut c);
    drop(c);
    assert_eq!(t.join().unwrap().unwrap(), End::Closed);
}

#[test]
fn trim_and_write_zeroes_write_zeros_that_replicate() {
    let dir = tempfile::tempdir().unwrap();
    let img = image(&dir);
    let (mut c, t) = serve(&img);
    go(&mut c);
    request(&mut c, proto::CMD_TRIM, 0, 1, 4096, 8192);
    assert_eq!(reply(&mut c, 1), 0);
    request(
        &mut c,
        proto::CMD_WRITE_ZEROES,
        proto::CMD_FLAG_FUA,
        2,
        0,
        512,
    );
    assert_eq!(reply(&mut c, 2), 0);
    assert_eq!(read(&mut c, 3, 4096, 8192).unwrap(), vec![0u8; 8192]);
    disc(c, t);
    let w = drained(&img);
    assert_eq!(w.len(), 2);
    assert_eq!((w[0].offset, w[0].data.len()), (4096, 8192));
    assert_eq!((w[1].offset, w[1].data.len()), (0, 512));
    assert!(w.iter().all(|w| w.data.iter().all(|&b| b == 0)));
}

#[test]
fn a_held_image_takes_no_write_until_released() {
    let dir = tempfile::tempdir().unwrap();
    let img = image(&dir);
    let (mut c, t) = serve(&img);
    go(&mut c);
    assert_eq!(write(&mut c, 1, 0, &[1u8; 512]), 0);
    img.hold();
    request(&mut c, proto::CMD_WRITE, 0, 2, 512, 512);
    c.write_all(&[2u8; 512]).unwrap();
    // No reply while held (a bounded wait), and the write is neither on the image nor in
    // the log: the checkpoint's drain sees exactly the first write.
    c.set_read_timeout(Some(Duration::from_millis(300)))
        .unwrap();
    let mut b = [0u8; 1];
    let r = c.read(&mut b);
    assert!(
        r.as_ref()
            .is_err_and(|e| e.kind() == std::io::ErrorKind::WouldBlock),
        "{r:?}"
    );
    assert_eq!(drained(&img).len(), 1);
    let mut on_disk = vec![0u8; 512];
    img.read_at(512, &mut on_disk).unwrap();
    assert_ne!(on_disk, vec![2u8; 512]);
    img.release();
    c.set_read_timeout(None).unwrap();
    assert_eq!(reply(&mut c, 2), 0);
    assert_eq!(
        drained(&img),
        vec![DiskWrite {
            offset: 512,
            data: vec![2; 512]
        }]
    );
    disc(c, t);
}

#[test]
fn the_served_disk_reads_inside_the_image_only() {
    let dir = tempfile::tempdir().unwrap();
    let img = image(&dir);
    let d = ServedDisk(img.clone());
    assert_eq!(d.disk_size(), SIZE);
    let mut b = [0u8; 8];
    d.read_at(251, &mut b).unwrap();
    assert_eq!(b[0], 0);
    assert!(d.read_at(SIZE - 4, &mut b).is_err());
    assert!(d.image_reader().unwrap().is_some());
    // An image that is not whole 4 KiB pages is refused.
    let odd = dir.path().join("odd.img");
    std::fs::write(&odd, vec![0u8; 5000]).unwrap();
    let e = Image::open(&odd).unwrap_err();
    assert!(
        matches!(
            e,
            ExportError::Image(DiskImageError::Size {
                size: 5000,
                unit: 4096,
                ..
            })
        ),
        "{e}"
    );
    let e = Image::open(&dir.path().join("missing.img")).unwrap_err();
    assert!(
        e.to_string().starts_with("cannot open the disk image"),
        "{e}"
    );
}

#[test]
fn the_server_on_a_socket_reports_its_client_gone() {
    let dir = tempfile::tempdir().unwrap();
    let img = image(&dir);
    let sock = dir.path().join("nbd.sock");
    // A stale socket file (no one listens) is replaced.
    drop(std::os::unix::net::UnixListener::bind(&sock).unwrap());
    let server = Server::serve(img.clone(), &sock, crate::EXPORT_NAME).unwrap();
    // A second server on the same socket is refused.
    let e = Server::serve(img.clone(), &sock, crate::EXPORT_NAME).unwrap_err();
    assert!(matches!(e, ExportError::SocketInUse(_)), "{e}");
    let not_sock = dir.path().join("plain");
    std::fs::write(&not_sock, b"x").unwrap();
    let e = Server::serve(img.clone(), &not_sock, crate::EXPORT_NAME).unwrap_err();
    assert!(matches!(e, ExportError::NotASocket(_)), "{e}");

    let mut c = UnixStream::connect(&sock).unwrap();
    go(&mut c);
    assert_eq!(write(&mut c, 1, 4096, &[5u8; 4096]), 0);
    assert!(server.health().is_ok());
    assert_eq!(server.attached(), 1);
    drop(c);
    // The connection's thread notices the end; bounded wait.
    let mut lost = None;
    for _ in 0..200 {
        if let Err(e) = server.health() {
            lost = Some(e);
            break;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let e = lost.expect("the server reports its client gone");
    assert!(
        e.to_string()
            .ends_with("lost its client: the client closed the connection without NBD_CMD_DISC"),
        "{e}"
    );
    assert_eq!(drained(&img).len(), 1);
    drop(server);
    assert!(!sock.exists(), "the socket is removed with the server");
}

/// Debian's nbd-client lists the export through the socket (skipped, saying so, where
/// nbd-client is not installed).
#[test]
fn nbd_client_lists_the_export() {
    let dir = tempfile::tempdir().unwrap();
    let img = image(&dir);
    let sock = dir.path().join("nbd.sock");
    let _server = Server::serve(img, &sock, crate::EXPORT_NAME).unwrap();
    let out = match std::process::Command::new(crate::attach::NBD_CLIENT)
        .arg("-l")
        .arg("-u")
        .arg(&sock)
        .output()
    {
        Ok(o) => o,
        Err(e) => {
            eprintln!("SKIP: nbd-client not installed ({e})");
            return;
        }
    };
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{out:?}");
    assert!(text.lines().any(|l| l.trim() == "castor"), "{text}");
}

#[test]
fn a_missing_device_is_named_with_what_to_do() {
    let e = crate::attach::check_free(std::path::Path::new("/nonexistent/nbd7")).unwrap_err();
    assert_eq!(
        e.to_string(),
        "/nonexistent/nbd7 is not a block device: load the kernel's nbd module (modprobe nbd)"
    );
}

/// An idle simulated guest wrapped with a served disk: its pause holds the disk's writes,
/// its resume lets them go, and its health follows the server's.
#[test]
fn a_served_domain_holds_writes_while_paused_and_reports_its_disk_lost() {
    use ha_guest::domain::{Domain, DomainFactory, GuestSpec};
    let dir = tempfile::tempdir().unwrap();
    let img = image(&dir);
    let sock = dir.path().join("nbd.sock");
    let server = Server::serve(img.clone(), &sock, crate::EXPORT_NAME).unwrap();
    let inner = ha_sim::SimFactory::new()
        .create(&GuestSpec::idle())
        .unwrap();
    let mut d = crate::ServedDomain::new(inner, ServedDisk(img.clone()), server, None);
    d.resume().unwrap();
    let mut c = UnixStream::connect(&sock).unwrap();
    go(&mut c);
    assert_eq!(write(&mut c, 1, 0, &[3u8; 512]), 0);
    d.pause().unwrap();
    request(&mut c, proto::CMD_WRITE, 0, 2, 512, 512);
    c.write_all(&[4u8; 512]).unwrap();
    c.set_read_timeout(Some(Duration::from_millis(300)))
        .unwrap();
    assert!(c.read(&mut [0u8; 1]).is_err(), "no reply while paused");
    let mut w = Vec::new();
    d.disk().unwrap().drain_writes(&mut w).unwrap();
    assert_eq!(
        w.len(),
        1,
        "the pause's drain holds the writes before it only"
    );
    d.resume().unwrap();
    c.set_read_timeout(None).unwrap();
    assert_eq!(reply(&mut c, 2), 0);
    d.disk().unwrap().drain_writes(&mut w).unwrap();
    assert_eq!(w[1].offset, 512);
    assert!(d.check_health().is_ok());
    drop(c);
    let mut gone = false;
    for _ in 0..200 {
        if d.check_health().is_err() {
            gone = true;
            break;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    assert!(gone, "the guest's health reports its disk lost");
}
