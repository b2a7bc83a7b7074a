//! The startup probe: every function listens on its port, reaches the
//! function `offset` ranks on (on another node when functions are spread
//! round-robin), sends `bytes` and reads them echoed back, and serves the one
//! function that reaches it the same way. It prints when it started and when
//! it had reached its peer (wall-clock nanoseconds, comparable across the
//! functions of one machine), which is what `particle bench startup` times.

use std::io::{self, Read, Write};
use std::net::{TcpListener, TcpStream, ToSocketAddrs};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use particle_wire::function_env::FunctionEnv;

#[derive(Debug, Clone)]
pub struct RingOptions {
    /// How far along the ring the peer is.
    pub offset: usize,
    /// Bytes sent each way.
    pub bytes: usize,
    /// Give up (and fail) after this long.
    pub timeout: Duration,
}

impl Default for RingOptions {
    fn default() -> Self {
        Self {
            offset: 1,
            bytes: 1024,
            timeout: Duration::from_secs(60),
        }
    }
}

/// What a function prints, one `key=value` line each.
pub const STARTED: &str = "started_ns";
pub const REACHED: &str = "reached_ns";

pub fn now_ns() -> u128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0)
}

/// Runs one function of the ring; returns when it has reached its peer and
/// served the function that reaches it.
pub fn run(env: &FunctionEnv, opts: &RingOptions, out: &mut impl Write) -> io::Result<()> {
    writeln!(out, "{STARTED}={}", now_ns())?;
    let listener = TcpListener::bind(("0.0.0.0", env.listen_port().map_err(io::Error::other)?))?;
    let deadline = Instant::now() + opts.timeout;
    let bytes = opts.bytes;
    let server = std::thread::spawn(move || -> io::Result<()> {
        let (mut stream, _) = listener.accept()?;
        stream.set_read_timeout(Some(deadline.saturating_duration_since(Instant::now())))?;
        let mut buf = vec![0u8; bytes];
        stream.read_exact(&mut buf)?;
        stream.write_all(&buf)
    });

    let peer = env.peer_rank(opts.offset);
    let mut stream = connect_until(&env.peers[peer], deadline)?;
    stream.set_read_timeout(Some(deadline.saturating_duration_since(Instant::now())))?;
    let message: Vec<u8> = (0..bytes).map(|i| (i % 251) as u8).collect();
    stream.write_all(&message)?;
    let mut echoed = vec![0u8; bytes];
    stream.read_exact(&mut echoed)?;
    if echoed != message {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "the peer echoed something else",
        ));
    }
    writeln!(out, "{REACHED}={} peer={peer}", now_ns())?;
    out.flush()?;
    server
        .join()
        .map_err(|_| io::Error::other("the serving thread panicked"))?
}

/// Connects, retrying while the peer is not up yet (refused, unreachable,
/// no answer), with a short backoff, until `deadline`.
pub fn connect_until(target: &str, deadline: Instant) -> io::Result<TcpStream> {
    let mut backoff = Duration::from_millis(1);
    loop {
        let attempt = target.to_socket_addrs().and_then(|mut addrs| {
            let addr = addrs
                .next()
                .ok_or_else(|| io::Error::new(io::ErrorKind::NotFound, "no address"))?;
            TcpStream::connect_timeout(&addr, Duration::from_millis(500))
        });
        match attempt {
            Ok(s) => return Ok(s),
            Err(e) if Instant::now() + backoff >= deadline => {
                return Err(io::Error::new(
                    e.kind(),
                    format!("reaching {target}: {e} (gave up)"),
                ))
            }
            Err(_) => {
                std::thread::sleep(backoff);
                backoff = (backoff * 2).min(Duration::from_millis(20));
            }
        }
    }
}

/// Reads `key=value` probe lines back (for the benchmarks).
pub fn parse_probe(output: &str, key: &str) -> Option<u128> {
    output.lines().find_map(|line| {
        line.split_whitespace()
            .next()?
            .strip_prefix(key)?
            .strip_prefix('=')?
            .parse()
            .ok()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_ring_on_loopback_exchanges_and_reports() {
        let size = 3;
        let base = 17790u16; // the ring unit test's ports
        let peers: std::sync::Arc<[String]> = (0..size)
            .map(|r| format!("127.0.0.1:{}", base + r as u16))
            .collect();
        let handles: Vec<_> = (0..size)
            .map(|rank| {
                let env = FunctionEnv {
                    job: "t".into(),
                    rank,
                    size,
                    node: "n".into(),
                    address: None,
                    peers: peers.clone(),
                };
                std::thread::spawn(move || {
                    let mut out = Vec::new();
                    run(&env, &RingOptions::default(), &mut out).map(|()| out)
                })
            })
            .collect();
        for h in handles {
            let out = String::from_utf8(h.join().unwrap().unwrap()).unwrap();
            let started = parse_probe(&out, STARTED).unwrap();
            let reached = parse_probe(&out, REACHED).unwrap();
            assert!(reached >= started, "{out}");
        }
    }

    #[test]
    fn an_absent_peer_fails_after_the_deadline() {
        let err =
            connect_until("127.0.0.1:1", Instant::now() + Duration::from_millis(30)).unwrap_err();
        assert!(err.to_string().contains("gave up"), "{err}");
    }
}
