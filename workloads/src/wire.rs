//! How a job's functions talk: one framed message per TCP connection, which
//! the receiver acknowledges with one byte once it has read it whole, so a
//! sender knows its data arrived before it moves on (or exits).
//!
//! Frame: `PTW1`, kind (u8), sender rank (u32), sender node (u16 length +
//! bytes), payload (u64 length + bytes), all big-endian.

use std::collections::VecDeque;
use std::io::{self, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::ring::connect_until;

const MAGIC: &[u8; 4] = b"PTW1";
const ACK: u8 = 0x06;
/// A bogus length must not make the receiver allocate without bound.
pub const MAX_PAYLOAD: u64 = 1 << 30;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Message {
    pub kind: u8,
    /// The sender's rank.
    pub from: usize,
    /// The node the sender runs on (`PARTICLE_NODE`), so a receiver can tell
    /// whether the exchange crossed nodes.
    pub node: String,
    pub payload: Vec<u8>,
}

fn invalid(what: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, what)
}

pub fn write_message(w: &mut impl Write, m: &Message) -> io::Result<()> {
    let from = u32::try_from(m.from).map_err(|_| invalid(format!("rank {} too large", m.from)))?;
    let node_len = u16::try_from(m.node.len()).map_err(|_| invalid("node name too long".into()))?;
    let mut header = Vec::with_capacity(19 + m.node.len());
    header.extend_from_slice(MAGIC);
    header.push(m.kind);
    header.extend_from_slice(&from.to_be_bytes());
    header.extend_from_slice(&node_len.to_be_bytes());
    header.extend_from_slice(m.node.as_bytes());
    header.extend_from_slice(&(m.payload.len() as u64).to_be_bytes());
    w.write_all(&header)?;
    w.write_all(&m.payload)?;
    w.flush()
}

pub fn read_message(r: &mut impl Read) -> io::Result<Message> {
    let mut fixed = [0u8; 11];
    r.read_exact(&mut fixed)?;
    if &fixed[..4] != MAGIC {
        return Err(invalid("not a particle workload message".into()));
    }
    let kind = fixed[4];
    let from = u32::from_be_bytes([fixed[5], fixed[6], fixed[7], fixed[8]]) as usize;
    let node_len = u16::from_be_bytes([fixed[9], fixed[10]]) as usize;
    let mut node = vec![0u8; node_len];
    r.read_exact(&mut node)?;
    let node = String::from_utf8(node).map_err(|_| invalid("node name is not UTF-8".into()))?;
    let mut len = [0u8; 8];
    r.read_exact(&mut len)?;
    let len = u64::from_be_bytes(len);
    if len > MAX_PAYLOAD {
        return Err(invalid(format!("payload of {len} bytes is over the limit")));
    }
    let mut payload = vec![0u8; len as usize];
    r.read_exact(&mut payload)?;
    Ok(Message {
        kind,
        from,
        node,
        payload,
    })
}

/// Sends `m` to `target` (retrying the connection until `deadline` while the
/// peer is not up yet) and waits for the receiver's acknowledgement.
pub fn send(target: &str, m: &Message, deadline: Instant) -> io::Result<()> {
    let mut stream = connect_until(target, deadline)?;
    stream.set_nodelay(true)?;
    stream.set_read_timeout(Some(remaining(deadline)?))?;
    stream.set_write_timeout(Some(remaining(deadline)?))?;
    write_message(&mut stream, m).map_err(|e| context(e, target))?;
    let mut ack = [0u8; 1];
    stream
        .read_exact(&mut ack)
        .map_err(|e| context(e, target))?;
    if ack[0] != ACK {
        return Err(invalid(format!(
            "{target} answered {:#x}, not an ack",
            ack[0]
        )));
    }
    Ok(())
}

fn context(e: io::Error, target: &str) -> io::Error {
    io::Error::new(e.kind(), format!("sending to {target}: {e}"))
}

fn remaining(deadline: Instant) -> io::Result<Duration> {
    let left = deadline.saturating_duration_since(Instant::now());
    if left.is_zero() {
        return Err(io::Error::new(io::ErrorKind::TimedOut, "deadline passed"));
    }
    Ok(left)
}

/// A function's listener: every message any peer sends it, in arrival order,
/// with the ones a caller is not asking for yet kept aside.
pub struct Inbox {
    rx: Receiver<io::Result<Message>>,
    kept: VecDeque<Message>,
    port: u16,
    stop: Arc<AtomicBool>,
}

impl Inbox {
    /// Listens on `port` (all addresses); each connection is read on its own
    /// thread so that a slow sender holds up nobody else.
    pub fn listen(port: u16) -> io::Result<Self> {
        let listener = TcpListener::bind(("0.0.0.0", port))?;
        let port = listener.local_addr()?.port();
        let (tx, rx) = mpsc::channel();
        let stop = Arc::new(AtomicBool::new(false));
        let stopping = stop.clone();
        std::thread::spawn(move || accept_loop(listener, tx, stopping));
        Ok(Self {
            rx,
            kept: VecDeque::new(),
            port,
            stop,
        })
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// The next message of `kind`, waiting until `deadline`.
    pub fn recv(&mut self, kind: u8, deadline: Instant) -> io::Result<Message> {
        if let Some(i) = self.kept.iter().position(|m| m.kind == kind) {
            if let Some(m) = self.kept.remove(i) {
                return Ok(m);
            }
        }
        loop {
            match self.rx.recv_timeout(remaining(deadline)?) {
                Ok(Ok(m)) if m.kind == kind => return Ok(m),
                Ok(Ok(m)) => self.kept.push_back(m),
                Ok(Err(e)) => return Err(e),
                Err(RecvTimeoutError::Timeout) => {
                    return Err(io::Error::new(
                        io::ErrorKind::TimedOut,
                        format!("no message of kind {kind} arrived in time"),
                    ))
                }
                Err(RecvTimeoutError::Disconnected) => {
                    return Err(io::Error::other("the listener stopped"))
                }
            }
        }
    }
}

impl Drop for Inbox {
    fn drop(&mut self) {
        // accept() blocks; a connection of our own wakes it up to see the flag.
        self.stop.store(true, Ordering::SeqCst);
        let _ = TcpStream::connect_timeout(
            &([127, 0, 0, 1], self.port).into(),
            Duration::from_millis(200),
        );
    }
}

fn accept_loop(listener: TcpListener, tx: Sender<io::Result<Message>>, stop: Arc<AtomicBool>) {
    for conn in listener.incoming() {
        if stop.load(Ordering::SeqCst) {
            return;
        }
        match conn {
            Ok(stream) => {
                let tx = tx.clone();
                std::thread::spawn(move || {
                    // A peer that connects and goes away without a message
                    // (a connect probe) is not an error of the job.
                    match receive_one(stream) {
                        Ok(Some(m)) => {
                            let _ = tx.send(Ok(m));
                        }
                        Ok(None) => {}
                        Err(e) => {
                            let _ = tx.send(Err(e));
                        }
                    }
                });
            }
            // Transient accept failures (a peer resetting early, fd
            // pressure) must not stop the function from listening.
            Err(_) => std::thread::sleep(Duration::from_millis(1)),
        }
    }
}

fn receive_one(mut stream: TcpStream) -> io::Result<Option<Message>> {
    let mut first = [0u8; 1];
    if stream.read(&mut first)? == 0 {
        return Ok(None);
    }
    let m = read_message(&mut (&first[..]).chain(&mut stream))?;
    stream.write_all(&[ACK])?;
    let _ = stream.shutdown(Shutdown::Write);
    Ok(Some(m))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_round_trip_and_bad_frames_are_rejected() {
        let m = Message {
            kind: 3,
            from: 7,
            node: "n1".into(),
            payload: (0..1000u32).map(|i| i as u8).collect(),
        };
        let mut buf = Vec::new();
        write_message(&mut buf, &m).unwrap();
        assert_eq!(read_message(&mut buf.as_slice()).unwrap(), m);

        let mut bad = buf.clone();
        bad[0] = b'X';
        assert!(read_message(&mut bad.as_slice()).is_err());
        // Truncated payload.
        assert!(read_message(&mut &buf[..buf.len() - 1]).is_err());
        // A length over the limit is refused before allocating.
        let mut huge = buf[..13].to_vec(); // up to the payload length
        huge.extend_from_slice(&(MAX_PAYLOAD + 1).to_be_bytes());
        assert!(read_message(&mut huge.as_slice())
            .unwrap_err()
            .to_string()
            .contains("over the limit"));
    }

    #[test]
    fn an_inbox_receives_by_kind_and_acknowledges() {
        let port = 18390; // this unit test's port
        let mut inbox = Inbox::listen(port).unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        let target = format!("127.0.0.1:{port}");
        for (kind, from) in [(1u8, 1usize), (2, 2), (1, 3)] {
            let m = Message {
                kind,
                from,
                node: format!("n{from}"),
                payload: vec![kind; 10],
            };
            send(&target, &m, deadline).unwrap();
        }
        let two = inbox.recv(2, deadline).unwrap();
        assert_eq!((two.from, two.node.as_str()), (2, "n2"));
        let mut ones: Vec<usize> = (0..2)
            .map(|_| inbox.recv(1, deadline).unwrap().from)
            .collect();
        ones.sort();
        assert_eq!(ones, [1, 3]);
        let nothing = inbox.recv(9, Instant::now() + Duration::from_millis(50));
        assert_eq!(nothing.unwrap_err().kind(), io::ErrorKind::TimedOut);
    }
}
