//! The client side of the handoff, for functions that use warm connections
//! explicitly (the preload library does the same for unmodified programs).

use std::io;
use std::net::{SocketAddr, TcpStream};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};

use super::fdpass::FdLines;
use particle_wire::warm::{WarmRequest, WarmResponse, WarmStats};

#[derive(Debug, thiserror::Error)]
pub enum WarmError {
    #[error("cannot reach the agent's warm socket {path}: {source}")]
    Connect { path: PathBuf, source: io::Error },
    #[error("talking to the agent: {0}")]
    Io(#[from] io::Error),
    #[error("unreadable answer from the agent: {0}")]
    Protocol(String),
    /// The agent said no (not allowed, unknown destination, nothing ready...).
    #[error("the agent refused: {0}")]
    Refused(String),
}

/// What became of a connection given back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PutOutcome {
    /// The agent keeps it for the next caller.
    pub pooled: bool,
    /// Why it did not (the agent closed it).
    pub reason: Option<String>,
}

/// A function's connection to its node agent's warm socket.
#[derive(Debug)]
pub struct WarmClient {
    lines: FdLines,
}

impl WarmClient {
    pub fn connect(path: impl AsRef<Path>) -> Result<Self, WarmError> {
        let path = path.as_ref();
        let stream = UnixStream::connect(path).map_err(|source| WarmError::Connect {
            path: path.to_owned(),
            source,
        })?;
        Ok(Self {
            lines: FdLines::new(stream),
        })
    }

    /// The pooled destinations this function's tenant may ask for.
    pub fn destinations(&mut self) -> Result<Vec<SocketAddr>, WarmError> {
        let (r, _) = self.call(&WarmRequest::Destinations {}, None)?;
        r.destinations
            .unwrap_or_default()
            .iter()
            .map(|d| {
                d.parse()
                    .map_err(|e| WarmError::Protocol(format!("destination {d:?}: {e}")))
            })
            .collect()
    }

    /// An established connection to `dest` from the agent's pool.
    pub fn get(&mut self, dest: SocketAddr) -> Result<TcpStream, WarmError> {
        let (_, fd) = self.call(
            &WarmRequest::Get {
                dest: dest.to_string(),
            },
            None,
        )?;
        Self::stream(fd)
    }

    /// A pooled connection to `dest`, or a fresh one when the agent is absent
    /// or says no; the bool tells which (true: pooled).
    pub fn get_or_connect(
        client: Option<&mut Self>,
        dest: SocketAddr,
    ) -> io::Result<(TcpStream, bool)> {
        if let Some(client) = client {
            if let Ok(stream) = client.get(dest) {
                return Ok((stream, true));
            }
        }
        Ok((TcpStream::connect(dest)?, false))
    }

    /// Gives a connection back. The agent pools it again only if it is clean
    /// (established, nothing unread or unacknowledged, no error).
    pub fn put(&mut self, conn: TcpStream) -> Result<PutOutcome, WarmError> {
        let (r, _) = self.call(&WarmRequest::Put {}, Some(conn.as_fd()))?;
        // The agent has its own copy now; ours goes.
        drop(conn);
        Ok(PutOutcome {
            pooled: r.pooled.unwrap_or(false),
            reason: r.reason,
        })
    }

    /// One end of a function-to-function channel: the functions at both ends
    /// call this with each other's node (its agent's warm address) and the
    /// same `key`, and get the two ends of one pre-established connection.
    pub fn channel(&mut self, peer: SocketAddr, key: &str) -> Result<TcpStream, WarmError> {
        let (_, fd) = self.call(
            &WarmRequest::Channel {
                peer: peer.to_string(),
                key: key.to_string(),
            },
            None,
        )?;
        Self::stream(fd)
    }

    pub fn stats(&mut self) -> Result<WarmStats, WarmError> {
        let (r, _) = self.call(&WarmRequest::Stats {}, None)?;
        r.stats
            .ok_or_else(|| WarmError::Protocol("stats reply without stats".into()))
    }

    fn stream(fd: Option<OwnedFd>) -> Result<TcpStream, WarmError> {
        let fd = fd.ok_or_else(|| WarmError::Protocol("reply without a connection".into()))?;
        let stream = TcpStream::from(fd);
        // The agent's copy may have been non-blocking; a plain client expects blocking.
        stream.set_nonblocking(false)?;
        Ok(stream)
    }

    fn call(
        &mut self,
        request: &WarmRequest,
        fd: Option<BorrowedFd<'_>>,
    ) -> Result<(WarmResponse, Option<OwnedFd>), WarmError> {
        let line = serde_json::to_vec(request).map_err(|e| WarmError::Protocol(e.to_string()))?;
        self.lines.send(&line, fd)?;
        let reply = self.lines.recv()?.ok_or_else(|| {
            WarmError::Io(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "the agent closed the warm socket",
            ))
        })?;
        let response: WarmResponse =
            serde_json::from_slice(&reply.bytes).map_err(|e| WarmError::Protocol(e.to_string()))?;
        if !response.ok {
            return Err(WarmError::Refused(
                response.error.unwrap_or_else(|| "no reason given".into()),
            ));
        }
        Ok((response, reply.fd))
    }
}
