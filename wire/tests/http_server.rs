//! The bounded HTTP server against floods, over real loopback sockets:
//! idle and slow (slowloris) connections are closed after the header
//! timeout and give their places back, one flooding address cannot take
//! another's place, and an oversized body gets its 413.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use axum::routing::{get, post};
use axum::Router;
use particle_wire::http_server::{serve, ServeLimits};

const HEADER_TIMEOUT: Duration = Duration::from_millis(400);

fn limits() -> ServeLimits {
    ServeLimits {
        max_connections: 60,
        max_per_address: 20,
        header_timeout: HEADER_TIMEOUT,
        max_body: 1 << 20,
        ..ServeLimits::default()
    }
}

/// A server on 127.0.0.1 in a runtime of its own.
fn start() -> (tokio::runtime::Runtime, SocketAddr) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let listener = rt
        .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
        .unwrap();
    let addr = listener.local_addr().unwrap();
    let app = Router::new().route("/ok", get(|| async { "ok" })).route(
        "/echo",
        post(|body: axum::body::Bytes| async move { body.len().to_string() }),
    );
    rt.spawn(serve(listener, app, limits(), std::future::pending()));
    (rt, addr)
}

/// A connection from `source` (any 127/8 address: loopback routes them all).
fn connect_from(source: [u8; 4], addr: SocketAddr) -> TcpStream {
    let socket = socket2_free_bind(source);
    let s = socket.connect_to(addr);
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s
}

/// Binds a client socket to `source` before connecting (std cannot).
struct Bound(std::os::fd::OwnedFd);

fn socket2_free_bind(source: [u8; 4]) -> Bound {
    use nix::sys::socket::{bind, socket, AddressFamily, SockFlag, SockType, SockaddrIn};
    let fd = socket(
        AddressFamily::Inet,
        SockType::Stream,
        SockFlag::SOCK_CLOEXEC,
        None,
    )
    .unwrap();
    let [a, b, c, d] = source;
    bind(
        std::os::fd::AsRawFd::as_raw_fd(&fd),
        &SockaddrIn::new(a, b, c, d, 0),
    )
    .unwrap();
    Bound(fd)
}

impl Bound {
    fn connect_to(self, addr: SocketAddr) -> TcpStream {
        use nix::sys::socket::{connect, SockaddrIn};
        let SocketAddr::V4(v4) = addr else {
            panic!("{addr}")
        };
        connect(
            std::os::fd::AsRawFd::as_raw_fd(&self.0),
            &SockaddrIn::from(v4),
        )
        .unwrap();
        TcpStream::from(self.0)
    }
}

fn get_ok(source: [u8; 4], addr: SocketAddr) -> Result<String, String> {
    let mut s = connect_from(source, addr);
    s.write_all(b"GET /ok HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .map_err(|e| e.to_string())?;
    let mut out = String::new();
    s.read_to_string(&mut out).map_err(|e| e.to_string())?;
    if out.is_empty() {
        return Err("closed without an answer".into());
    }
    Ok(out)
}

/// Whether the server closed `s` (EOF or reset) within `within`.
fn closed_within(s: &mut TcpStream, within: Duration) -> bool {
    s.set_read_timeout(Some(within)).unwrap();
    let mut b = [0u8; 64];
    match s.read(&mut b) {
        Ok(0) => true,
        Ok(_) => false,
        Err(e) => matches!(
            e.kind(),
            std::io::ErrorKind::ConnectionReset | std::io::ErrorKind::BrokenPipe
        ),
    }
}

#[test]
fn floods_are_capped_per_address_and_slow_clients_are_cut_off() {
    let (_rt, addr) = start();
    // An attacker at 127.0.0.1 opens its whole share, half of them slowloris
    // (headers begun, never finished), half idle.
    let mut flood: Vec<TcpStream> = (0..20)
        .map(|i| {
            let mut s = connect_from([127, 0, 0, 1], addr);
            if i % 2 == 0 {
                s.write_all(b"GET /ok HTTP/1.1\r\nHost: x\r\n").unwrap();
            }
            s
        })
        .collect();
    std::thread::sleep(Duration::from_millis(50));
    // One more from the same address is closed at once; another address is served.
    let mut extra = connect_from([127, 0, 0, 1], addr);
    assert!(closed_within(&mut extra, Duration::from_millis(300)));
    let answer = get_ok([127, 0, 0, 2], addr).unwrap();
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    // Within the header timeout (and some slack) every flooding connection is closed...
    let started = Instant::now();
    for s in &mut flood {
        let left = (HEADER_TIMEOUT * 5).saturating_sub(started.elapsed());
        assert!(
            closed_within(s, left.max(Duration::from_millis(1))),
            "still open"
        );
    }
    // ...and its places are given back.
    std::thread::sleep(Duration::from_millis(50));
    let answer = get_ok([127, 0, 0, 1], addr).unwrap();
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
}

#[test]
fn an_oversized_body_gets_its_413_not_a_reset() {
    let (_rt, addr) = start();
    let mut s = connect_from([127, 0, 0, 3], addr);
    let body = vec![b'x'; 100 << 20];
    let head = format!(
        "POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\n\r\n",
        body.len()
    );
    s.write_all(head.as_bytes()).unwrap();
    s.write_all(&body).unwrap();
    let mut out = String::new();
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    s.read_to_string(&mut out).unwrap();
    assert!(out.starts_with("HTTP/1.1 413"), "{out}");
    assert!(out.contains("larger than"), "{out}");
    // A body within the limit is served as usual.
    let mut s = connect_from([127, 0, 0, 3], addr);
    s.write_all(
        b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nConnection: close\r\n\r\nhello",
    )
    .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    assert!(
        out.starts_with("HTTP/1.1 200") && out.ends_with('5'),
        "{out}"
    );
}
