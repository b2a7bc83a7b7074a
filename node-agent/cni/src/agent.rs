//! The agent's local API as the plugin speaks it: one JSON object per line
//! over the agent's Unix socket, in the wire types the agent serves
//! (`particle_wire::local`). Kept to std and serde so the plugin stays a
//! small, fast-starting binary.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

pub use particle_wire::local::{Attachment, AttachmentKey};
use particle_wire::local::{LocalRequest, LocalResponse};

#[derive(Debug)]
pub enum AgentError {
    /// No agent listening (no socket file, or nobody accepting).
    NotRunning { socket: PathBuf, reason: String },
    /// The conversation broke (timeout, closed, garbled).
    Io { socket: PathBuf, reason: String },
    /// The agent answered with an error.
    Refused(String),
}

impl std::fmt::Display for AgentError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::NotRunning { socket, reason } => {
                write!(f, "no Particle agent at {}: {reason}", socket.display())
            }
            Self::Io { socket, reason } => {
                write!(f, "talking to the agent at {}: {reason}", socket.display())
            }
            Self::Refused(e) => write!(f, "the agent refused: {e}"),
        }
    }
}

impl std::error::Error for AgentError {}

pub struct AgentClient {
    socket: PathBuf,
    timeout: Duration,
}

impl AgentClient {
    pub fn new(socket: &Path, timeout: Duration) -> Self {
        Self {
            socket: socket.to_owned(),
            timeout,
        }
    }

    /// One request, one answer; an `{"ok":false}` answer is `Refused`.
    fn call(&self, request: &LocalRequest) -> Result<LocalResponse, AgentError> {
        let io = |reason: String| AgentError::Io {
            socket: self.socket.clone(),
            reason,
        };
        let stream = UnixStream::connect(&self.socket).map_err(|e| AgentError::NotRunning {
            socket: self.socket.clone(),
            reason: e.to_string(),
        })?;
        let timeouts = stream
            .set_read_timeout(Some(self.timeout))
            .and_then(|()| stream.set_write_timeout(Some(self.timeout)));
        timeouts.map_err(|e| io(e.to_string()))?;
        let mut line = serde_json::to_vec(request).map_err(|e| io(e.to_string()))?;
        line.push(b'\n');
        (&stream).write_all(&line).map_err(|e| io(e.to_string()))?;
        let mut answer = String::new();
        BufReader::new(&stream)
            .read_line(&mut answer)
            .map_err(|e| io(e.to_string()))?;
        match serde_json::from_str(&answer) {
            Ok(LocalResponse::Error { error, .. }) => Err(AgentError::Refused(error)),
            Ok(response) => Ok(response),
            Err(e) => Err(io(format!("unreadable answer {answer:?}: {e}"))),
        }
    }

    /// The answer was not the one the request calls for.
    fn unexpected(&self, answer: LocalResponse) -> AgentError {
        AgentError::Io {
            socket: self.socket.clone(),
            reason: format!("unexpected answer {answer:?}"),
        }
    }

    pub fn attach(
        &self,
        config: &crate::config::PluginConfig,
        container_id: &str,
        ifname: &str,
        netns: &str,
    ) -> Result<Attachment, AgentError> {
        let request = LocalRequest::Attach {
            network: config.network.clone(),
            tenant: config.tenant.clone(),
            container_id: container_id.to_string(),
            ifname: ifname.to_string(),
            netns: netns.to_string(),
            mode: config.attach_mode,
        };
        match self.call(&request)? {
            LocalResponse::Attached { attachment, .. } => Ok(attachment),
            other => Err(self.unexpected(other)),
        }
    }

    /// Whether the agent had the attachment.
    pub fn detach(&self, container_id: &str, ifname: &str) -> Result<bool, AgentError> {
        let request = LocalRequest::Detach {
            container_id: container_id.to_string(),
            ifname: ifname.to_string(),
        };
        match self.call(&request)? {
            LocalResponse::Detached { found, .. } => Ok(found),
            other => Err(self.unexpected(other)),
        }
    }

    pub fn check(&self, container_id: &str, ifname: &str) -> Result<Attachment, AgentError> {
        let request = LocalRequest::Check {
            container_id: container_id.to_string(),
            ifname: ifname.to_string(),
        };
        match self.call(&request)? {
            LocalResponse::Attached { attachment, .. } => Ok(attachment),
            other => Err(self.unexpected(other)),
        }
    }

    /// The tenants the agent has warm pools for.
    pub fn tenants(&self) -> Result<Vec<String>, AgentError> {
        match self.call(&LocalRequest::Status {})? {
            LocalResponse::Status { pools, .. } => Ok(pools.into_keys().collect()),
            other => Err(self.unexpected(other)),
        }
    }

    pub fn gc(
        &self,
        network: &str,
        valid: &[AttachmentKey],
    ) -> Result<Vec<AttachmentKey>, AgentError> {
        let request = LocalRequest::Gc {
            network: network.to_string(),
            valid: valid.to_vec(),
        };
        match self.call(&request)? {
            LocalResponse::Collected { detached, .. } => Ok(detached),
            other => Err(self.unexpected(other)),
        }
    }
}
