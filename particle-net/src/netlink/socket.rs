use std::io;

use netlink_packet_core::{
    NetlinkBuffer, NetlinkHeader, NetlinkMessage, NetlinkPayload, NLM_F_ACK, NLM_F_APPEND,
    NLM_F_CREATE, NLM_F_DUMP, NLM_F_EXCL, NLM_F_REPLACE, NLM_F_REQUEST,
};
use netlink_packet_route::RouteNetlinkMessage;
use netlink_sys::{protocols::NETLINK_ROUTE, Socket, SocketAddr};

use crate::netns::{NetNs, NetNsError};

/// Requests per datagram. Each acknowledgement is its own skb in our receive
/// buffer; past ~100 per datagram the buffer can overflow (ENOBUFS) and an
/// acknowledgement is lost, so batches are cut into datagrams of this size.
pub const MAX_PER_DATAGRAM: usize = 64;

const RECV_BUFFER_BYTES: usize = 4 << 20;
const SEND_BUFFER_BYTES: usize = 1 << 20;

#[derive(Debug, thiserror::Error)]
pub enum NetlinkError {
    #[error("netlink socket: {0}")]
    Io(#[from] io::Error),
    #[error("cannot open a netlink socket in the namespace: {0}")]
    Namespace(#[from] NetNsError),
    #[error("malformed netlink reply: {0}")]
    Decode(String),
    #[error(transparent)]
    Request(#[from] RequestError),
}

/// One request the kernel refused, with what it was.
#[derive(Debug, thiserror::Error)]
#[error("{what}: {source}")]
pub struct RequestError {
    pub what: String,
    #[source]
    pub source: io::Error,
}

impl RequestError {
    /// The kernel's errno, e.g. `EEXIST` for a name clash.
    pub fn errno(&self) -> Option<i32> {
        self.source.raw_os_error()
    }
}

/// A request and a description of it for error messages.
#[derive(Debug, Clone)]
pub struct Request {
    pub what: String,
    pub message: RouteNetlinkMessage,
    pub flags: u16,
}

impl Request {
    /// Creates an object; fails with EEXIST if it exists.
    pub fn create(what: impl Into<String>, message: RouteNetlinkMessage) -> Self {
        Self {
            what: what.into(),
            message,
            flags: NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | NLM_F_EXCL,
        }
    }

    /// Creates an object or replaces the one that is there: idempotent.
    pub fn replace(what: impl Into<String>, message: RouteNetlinkMessage) -> Self {
        Self {
            what: what.into(),
            message,
            flags: NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | NLM_F_REPLACE,
        }
    }

    /// Appends an entry (a VXLAN FDB destination) next to existing ones.
    pub fn append(what: impl Into<String>, message: RouteNetlinkMessage) -> Self {
        Self {
            what: what.into(),
            message,
            flags: NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | NLM_F_APPEND,
        }
    }

    /// Changes or deletes an existing object.
    pub fn change(what: impl Into<String>, message: RouteNetlinkMessage) -> Self {
        Self {
            what: what.into(),
            message,
            flags: NLM_F_REQUEST | NLM_F_ACK,
        }
    }
}

/// A synchronous rtnetlink socket in one namespace.
#[derive(Debug)]
pub struct NetlinkSocket {
    socket: Socket,
    next_seq: u32,
    recv_buf: Vec<u8>,
    send_buf: Vec<u8>,
}

impl NetlinkSocket {
    /// Opens a socket in the calling thread's namespace.
    pub fn open() -> Result<Self, NetlinkError> {
        let mut socket = Socket::new(NETLINK_ROUTE)?;
        socket.bind_auto()?;
        socket.connect(&SocketAddr::new(0, 0))?;
        socket.set_rx_buf_sz(RECV_BUFFER_BYTES)?;
        set_send_buffer(&socket, SEND_BUFFER_BYTES)?;
        // Errors carry only the failed request's header, not its whole payload.
        socket.set_cap_ack(true)?;
        Ok(Self {
            socket,
            next_seq: 1,
            recv_buf: Vec::with_capacity(RECV_BUFFER_BYTES.min(1 << 16)),
            send_buf: Vec::with_capacity(16 << 10),
        })
    }

    /// Opens a socket bound to `ns`.
    pub fn open_in(ns: &NetNs) -> Result<Self, NetlinkError> {
        ns.run_in(Self::open)?
    }

    /// Runs every request and returns one outcome per request, in order. An
    /// `Err` of the whole call means the socket itself failed.
    pub fn execute(
        &mut self,
        requests: &[Request],
    ) -> Result<Vec<Result<(), RequestError>>, NetlinkError> {
        let mut outcomes = Vec::with_capacity(requests.len());
        for chunk in requests.chunks(MAX_PER_DATAGRAM) {
            self.execute_datagram(chunk, &mut outcomes)?;
        }
        Ok(outcomes)
    }

    /// Runs every request; the first failure, if any, is the error. The
    /// requests after a failed one still run.
    pub fn execute_all(&mut self, requests: &[Request]) -> Result<(), NetlinkError> {
        match self.execute(requests)?.into_iter().find_map(Result::err) {
            Some(e) => Err(e.into()),
            None => Ok(()),
        }
    }

    fn execute_datagram(
        &mut self,
        chunk: &[Request],
        outcomes: &mut Vec<Result<(), RequestError>>,
    ) -> Result<(), NetlinkError> {
        let first_seq = self.next_seq;
        self.send_buf.clear();
        for request in chunk {
            let seq = self.take_seq();
            encode_into(
                &mut self.send_buf,
                request.message.clone(),
                request.flags,
                seq,
            );
        }
        self.socket.send(&self.send_buf, 0)?;

        let mut answers: Vec<Option<Result<(), RequestError>>> =
            chunk.iter().map(|_| None).collect();
        let mut pending = chunk.len();
        while pending > 0 {
            self.receive()?;
            for (seq, payload) in parse_all(&self.recv_buf)? {
                let NetlinkPayload::Error(e) = payload else {
                    continue;
                };
                let i = seq.wrapping_sub(first_seq) as usize;
                let (Some(request), Some(answer)) = (chunk.get(i), answers.get_mut(i)) else {
                    continue;
                };
                if answer.is_none() {
                    pending -= 1;
                }
                *answer = Some(match e.code {
                    None => Ok(()),
                    Some(_) => Err(RequestError {
                        what: request.what.clone(),
                        source: e.to_io(),
                    }),
                });
            }
        }
        outcomes.extend(answers.into_iter().flatten());
        Ok(())
    }

    /// Sends one GET request and returns every reply: all parts of a dump, or
    /// the single answer to a non-dump query.
    pub fn query(
        &mut self,
        what: &str,
        message: RouteNetlinkMessage,
        dump: bool,
    ) -> Result<Vec<RouteNetlinkMessage>, NetlinkError> {
        let seq = self.take_seq();
        let flags = if dump {
            NLM_F_REQUEST | NLM_F_DUMP
        } else {
            NLM_F_REQUEST | NLM_F_ACK
        };
        self.send_buf.clear();
        encode_into(&mut self.send_buf, message, flags, seq);
        self.socket.send(&self.send_buf, 0)?;
        let mut replies = Vec::new();
        loop {
            self.receive()?;
            for (reply_seq, payload) in parse_all(&self.recv_buf)? {
                if reply_seq != seq {
                    continue;
                }
                match payload {
                    NetlinkPayload::InnerMessage(m) => replies.push(m),
                    NetlinkPayload::Done(_) => return Ok(replies),
                    NetlinkPayload::Error(e) => {
                        return match e.code {
                            None => Ok(replies),
                            Some(_) => Err(RequestError {
                                what: what.to_string(),
                                source: e.to_io(),
                            }
                            .into()),
                        }
                    }
                    _ => {}
                }
            }
        }
    }

    fn take_seq(&mut self) -> u32 {
        let seq = self.next_seq;
        self.next_seq = self.next_seq.wrapping_add(1).max(1);
        seq
    }

    fn receive(&mut self) -> Result<(), NetlinkError> {
        self.recv_buf.clear();
        self.socket.recv(&mut self.recv_buf, 0)?;
        Ok(())
    }
}

/// Serializes one message, 4-byte aligned, onto the end of `buf`.
pub fn encode_into(buf: &mut Vec<u8>, message: RouteNetlinkMessage, flags: u16, seq: u32) {
    let mut header = NetlinkHeader::default();
    header.flags = flags;
    header.sequence_number = seq;
    let mut packet = NetlinkMessage::new(header, NetlinkPayload::InnerMessage(message));
    packet.finalize();
    let start = buf.len();
    let len = packet.buffer_len();
    buf.resize(start + align4(len), 0);
    packet.serialize(&mut buf[start..start + len]);
}

/// Splits a datagram into (sequence number, payload) pairs.
fn parse_all(buf: &[u8]) -> Result<Vec<(u32, NetlinkPayload<RouteNetlinkMessage>)>, NetlinkError> {
    let mut out = Vec::new();
    let mut offset = 0;
    while offset < buf.len() {
        let rest = &buf[offset..];
        let len = NetlinkBuffer::new_checked(rest)
            .map_err(|e| NetlinkError::Decode(e.to_string()))?
            .length() as usize;
        if len == 0 || len > rest.len() {
            return Err(NetlinkError::Decode(format!(
                "message length {len} with {} bytes left",
                rest.len()
            )));
        }
        let message = NetlinkMessage::<RouteNetlinkMessage>::deserialize(&rest[..len])
            .map_err(|e| NetlinkError::Decode(e.to_string()))?;
        out.push((message.header.sequence_number, message.payload));
        offset += align4(len);
    }
    Ok(out)
}

fn align4(len: usize) -> usize {
    (len + 3) & !3
}

fn set_send_buffer(socket: &Socket, bytes: usize) -> io::Result<()> {
    use std::os::fd::AsFd;
    nix::sys::socket::setsockopt(&socket.as_fd(), nix::sys::socket::sockopt::SndBuf, &bytes)
        .map_err(io::Error::from)
}
