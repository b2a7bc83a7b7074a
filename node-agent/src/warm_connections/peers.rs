//! Agent-to-agent warm connections and function-to-function channels.
//!
//! Each agent keeps connections to other agents' warm listeners. Until one
//! is handed to a function, the two agents speak frames on it (probes that
//! keep the congestion window open; a bind that names the channel) and read
//! exactly one frame at a time, so nothing after the bind is consumed.
//!
//! A channel is opened by the functions at both ends asking their agents for
//! `(other node, key)`. The agent with the lower listen address takes one of
//! its idle connections to the other, sends the bind (the key and its
//! function's tenant) and hands its end over; the other agent, on reading the
//! bind, parks the connection until its own function asks for the same key
//! with the same tenant, and hands that end over. No handshake on the way.

use std::collections::HashMap;
use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Condvar, Mutex, PoisonError};
use std::time::{Duration, Instant};

use particle_wire::warm::{
    frame_header, parse_frame_header, ChannelBind, FRAME_BIND, FRAME_HEADER, FRAME_HELLO,
    FRAME_MAX, FRAME_PROBE, FRAME_PROBE_ACK,
};

use super::Shared;

/// Channel ends that arrived from another agent, waiting for their function.
#[derive(Default)]
pub(crate) struct Parked {
    ends: Mutex<HashMap<(String, String), (TcpStream, Instant)>>,
    arrived: Condvar,
}

impl Parked {
    fn park(&self, tenant: String, key: String, stream: TcpStream) {
        let mut ends = self.ends.lock().unwrap_or_else(PoisonError::into_inner);
        // A second bind for a key still waiting replaces it: the old end closes.
        ends.insert((tenant, key), (stream, Instant::now()));
        self.arrived.notify_all();
    }

    fn take(
        &self,
        tenant: &str,
        key: &str,
        timeout: Duration,
        stop: &dyn Fn() -> bool,
    ) -> Option<TcpStream> {
        let deadline = Instant::now() + timeout;
        let id = (tenant.to_string(), key.to_string());
        let mut ends = self.ends.lock().unwrap_or_else(PoisonError::into_inner);
        loop {
            if let Some((s, _)) = ends.remove(&id) {
                return Some(s);
            }
            let now = Instant::now();
            if now >= deadline || stop() {
                return None;
            }
            ends = self
                .arrived
                .wait_timeout(ends, deadline - now)
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        }
    }

    /// Closes ends nobody asked for within `age`.
    pub(crate) fn expire(&self, age: Duration) {
        self.ends
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .retain(|_, (_, at)| at.elapsed() < age);
    }

    pub(crate) fn wake_all(&self) {
        self.arrived.notify_all();
    }

    pub(crate) fn clear(&self) {
        self.ends
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clear();
    }
}

fn read_frame_header(stream: &mut TcpStream) -> io::Result<(u8, usize)> {
    let mut h = [0u8; FRAME_HEADER];
    stream.read_exact(&mut h)?;
    let (kind, len) = parse_frame_header(h);
    if len > FRAME_MAX {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("frame of {len} bytes"),
        ));
    }
    Ok((kind, len))
}

/// A keep-warm probe: `bytes` of data out, an acknowledgement back, so the
/// window is used and the connection proven alive. Nothing is left in flight.
pub(crate) fn probe(stream: &TcpStream, bytes: usize) -> io::Result<()> {
    let mut s = stream;
    let mut out = Vec::with_capacity(FRAME_HEADER + bytes);
    out.extend_from_slice(&frame_header(FRAME_PROBE, bytes));
    out.resize(FRAME_HEADER + bytes, 0);
    s.write_all(&out)?;
    stream.set_read_timeout(Some(Duration::from_secs(2)))?;
    let mut h = [0u8; FRAME_HEADER];
    let read = s.read_exact(&mut h);
    stream.set_read_timeout(None)?;
    read?;
    match parse_frame_header(h) {
        (FRAME_PROBE_ACK, 0) => Ok(()),
        other => Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("unexpected frame {other:?} answering a probe"),
        )),
    }
}

/// Opens an agent-to-agent connection: the hello with the cluster's token.
pub(crate) fn hello(stream: &TcpStream, token: &str) -> io::Result<()> {
    let mut frame = frame_header(FRAME_HELLO, token.len()).to_vec();
    frame.extend_from_slice(token.as_bytes());
    (&mut &*stream).write_all(&frame)
}

/// Incoming agent connections served at once, in all and per address.
const MAX_PEER_CONNECTIONS: usize = 4096;
const MAX_PER_PEER: usize = 512;
/// How long a new connection has to say hello.
const HELLO_TIMEOUT: Duration = Duration::from_secs(5);

/// Accepts other agents' warm connections until the service stops.
pub(crate) fn accept_loop(s: &Arc<Shared>, listener: TcpListener) {
    let caps = particle_wire::caps::ConnectionCaps::new(MAX_PEER_CONNECTIONS, MAX_PER_PEER);
    for stream in listener.incoming() {
        if s.stop.load(Ordering::Relaxed) {
            return;
        }
        let Ok(stream) = stream else {
            std::thread::sleep(Duration::from_millis(20)); // out of descriptors, say
            continue;
        };
        let Some(permit) = stream.peer_addr().ok().and_then(|a| caps.enter(a.ip())) else {
            continue; // over a cap: closed at once
        };
        let s = s.clone();
        let spawned = std::thread::Builder::new()
            .name("warm-peer".into())
            .spawn(move || {
                let _permit = permit;
                incoming(&s, stream)
            });
        if let Err(e) = spawned {
            tracing::warn!("warm peer thread: {e}");
        }
    }
}

/// Serves probes on one incoming agent connection until it is bound to a
/// channel (then parked) or closed.
fn incoming(s: &Shared, mut stream: TcpStream) {
    let tracked = s.track(&stream);
    let result = (|| -> io::Result<Option<ChannelBind>> {
        check_hello(&mut stream, &s.config.peer_token)?;
        loop {
            let (kind, len) = read_frame_header(&mut stream)?;
            let mut payload = vec![0u8; len];
            stream.read_exact(&mut payload)?;
            match kind {
                FRAME_PROBE => stream.write_all(&frame_header(FRAME_PROBE_ACK, 0))?,
                FRAME_BIND => {
                    let bind: ChannelBind = serde_json::from_slice(&payload)
                        .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
                    return Ok(Some(bind));
                }
                other => {
                    return Err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        format!("unknown frame kind {other}"),
                    ))
                }
            }
        }
    })();
    s.untrack(tracked);
    match result {
        Ok(Some(bind)) => s.channels.park(bind.tenant, bind.key, stream),
        Ok(None) => {}
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => {}
        Err(e) => tracing::debug!("warm peer connection: {e}"),
    }
}

/// Reads the hello an agent opens with; anything else, a wrong token or
/// silence past [`HELLO_TIMEOUT`] is an error (and the connection closed).
fn check_hello(stream: &mut TcpStream, token: &str) -> io::Result<()> {
    stream.set_read_timeout(Some(HELLO_TIMEOUT))?;
    let (kind, len) = read_frame_header(stream)?;
    if kind != FRAME_HELLO || len > FRAME_MAX {
        return Err(io::Error::new(
            io::ErrorKind::PermissionDenied,
            "a warm peer connection must open with the agents' hello",
        ));
    }
    let mut given = vec![0u8; len];
    stream.read_exact(&mut given)?;
    stream.set_read_timeout(None)?;
    if !particle_wire::same_secret(&given, token.as_bytes()) {
        return Err(io::Error::new(
            io::ErrorKind::PermissionDenied,
            "a warm peer connection with a wrong token",
        ));
    }
    Ok(())
}

/// One end of the channel `key` between this node and `peer`, for a function
/// of `tenant`.
pub(crate) fn open_channel(
    s: &Arc<Shared>,
    tenant: &str,
    peer: &str,
    key: &str,
) -> Result<TcpStream, String> {
    let peer: SocketAddr = peer.parse().map_err(|e| format!("peer {peer:?}: {e}"))?;
    let me = s
        .config
        .listen
        .ok_or("this agent does not serve channels (no warm listen address)")?;
    if peer == me {
        return Err("a channel needs two nodes; the peer is this node".into());
    }
    if key.is_empty() || key.len() > 256 {
        return Err("a channel key is 1 to 256 bytes".into());
    }
    if me < peer {
        s.add_peer(peer);
        let wait = s.config.connect_timeout + Duration::from_secs(1);
        let c = s
            .wait_idle(peer, wait)
            .ok_or_else(|| format!("no warm connection to agent {peer} ready"))?;
        let bind = serde_json::to_vec(&ChannelBind {
            tenant: tenant.into(),
            key: key.into(),
        })
        .map_err(|e| e.to_string())?;
        let mut frame = frame_header(FRAME_BIND, bind.len()).to_vec();
        frame.extend_from_slice(&bind);
        (&c.stream)
            .write_all(&frame)
            .map_err(|e| format!("binding a connection to {peer}: {e}"))?;
        Ok(c.stream)
    } else {
        let stop = || s.stop.load(Ordering::Relaxed);
        s.channels
            .take(tenant, key, s.config.channel_timeout, &stop)
            .ok_or_else(|| {
                format!(
                    "channel {key:?} from {peer} did not arrive within {:?}",
                    s.config.channel_timeout
                )
            })
    }
}
