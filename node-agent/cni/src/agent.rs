//! The agent's local API as the plugin speaks it: one JSON object per line
//! over the agent's Unix socket (see `particle_node_agent::local_api`). Kept
//! to std and serde so the plugin stays a small, fast-starting binary.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

/// An attachment as the agent reports it.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct Attachment {
    pub container_id: String,
    pub ifname: String,
    pub tenant: String,
    pub netns: String,
    pub address: String,
    pub gateway: String,
    pub mac: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct AttachmentKey {
    pub container_id: String,
    pub ifname: String,
}

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
    fn call(&self, request: &Value) -> Result<Value, AgentError> {
        let io = |reason: std::io::Error| AgentError::Io {
            socket: self.socket.clone(),
            reason: reason.to_string(),
        };
        let stream = UnixStream::connect(&self.socket).map_err(|e| AgentError::NotRunning {
            socket: self.socket.clone(),
            reason: e.to_string(),
        })?;
        stream.set_read_timeout(Some(self.timeout)).map_err(io)?;
        stream.set_write_timeout(Some(self.timeout)).map_err(io)?;
        let mut line = request.to_string();
        line.push('\n');
        (&stream).write_all(line.as_bytes()).map_err(io)?;
        let mut answer = String::new();
        BufReader::new(&stream).read_line(&mut answer).map_err(io)?;
        let answer: Value = serde_json::from_str(&answer).map_err(|e| AgentError::Io {
            socket: self.socket.clone(),
            reason: format!("unreadable answer {answer:?}: {e}"),
        })?;
        if answer.get("ok") == Some(&Value::Bool(true)) {
            Ok(answer)
        } else {
            Err(AgentError::Refused(
                answer
                    .get("error")
                    .and_then(Value::as_str)
                    .unwrap_or("no reason given")
                    .to_string(),
            ))
        }
    }

    fn field<T: serde::de::DeserializeOwned>(
        &self,
        answer: Value,
        key: &str,
    ) -> Result<T, AgentError> {
        let value = answer.get(key).cloned().unwrap_or(Value::Null);
        serde_json::from_value(value).map_err(|e| AgentError::Io {
            socket: self.socket.clone(),
            reason: format!("answer without a valid {key:?}: {e}"),
        })
    }

    pub fn attach(
        &self,
        config: &crate::config::PluginConfig,
        container_id: &str,
        ifname: &str,
        netns: &str,
    ) -> Result<Attachment, AgentError> {
        let answer = self.call(&json!({
            "op": "attach", "network": config.network, "tenant": config.tenant,
            "container_id": container_id, "ifname": ifname, "netns": netns,
            "mode": config.attach_mode,
        }))?;
        self.field(answer, "attachment")
    }

    /// Whether the agent had the attachment.
    pub fn detach(&self, container_id: &str, ifname: &str) -> Result<bool, AgentError> {
        let answer = self.call(&json!({
            "op": "detach", "container_id": container_id, "ifname": ifname,
        }))?;
        self.field(answer, "found")
    }

    pub fn check(&self, container_id: &str, ifname: &str) -> Result<Attachment, AgentError> {
        let answer = self.call(&json!({
            "op": "check", "container_id": container_id, "ifname": ifname,
        }))?;
        self.field(answer, "attachment")
    }

    /// The tenants the agent has warm pools for.
    pub fn tenants(&self) -> Result<Vec<String>, AgentError> {
        let answer = self.call(&json!({ "op": "status" }))?;
        let pools: serde_json::Map<String, Value> = self.field(answer, "pools")?;
        Ok(pools.keys().cloned().collect())
    }

    pub fn gc(
        &self,
        network: &str,
        valid: &[AttachmentKey],
    ) -> Result<Vec<AttachmentKey>, AgentError> {
        let answer = self.call(&json!({ "op": "gc", "network": network, "valid": valid }))?;
        let detached: Vec<Value> = self.field(answer, "detached")?;
        Ok(detached
            .into_iter()
            .filter_map(|v| {
                Some(AttachmentKey {
                    container_id: v.get("container_id")?.as_str()?.to_string(),
                    ifname: v.get("ifname")?.as_str()?.to_string(),
                })
            })
            .collect())
    }
}
