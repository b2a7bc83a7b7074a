//! The agent's local API server: the Unix socket that runtimes on the node
//! (the CNI plugin), operators and `particle local` call. The protocol is
//! `particle_wire::local`; claims go through [`crate::claims`], lending to
//! runtimes through [`crate::attachments`].
//!
//! The socket is mode 0600 (root on the node only) and is the node's, never a
//! function's. Callers are identified fail-closed ([`identify`]): the peer's
//! credentials must say root, the process must still be the one that
//! connected (a pidfd, so a pid that exited or was reused cannot pass), and
//! its network namespace must not be a claimed endpoint's; anything that
//! cannot be read is refused. Connections are bounded in number, per caller
//! and in idle time, so a flood cannot exhaust the agent's descriptors.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use particle_net::RunPrefix;
use particle_wire::caps::ConnectionCaps;
use particle_wire::local::{parse_request, LocalRequest, LocalResponse, MAX_LINE};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};

use crate::attachments::{AttachRequest, Attachments};
use crate::claims::Claims;
use crate::peer;

/// What the local socket serves: the node's claims and the endpoints lent to
/// runtimes, with its request counters.
#[derive(Default)]
pub struct LocalApi {
    claims: Arc<Claims>,
    attachments: Attachments,
    requests: AtomicU64,
    errors: AtomicU64,
}

impl LocalApi {
    pub fn new(claims: Arc<Claims>) -> Self {
        Self {
            claims,
            ..Self::default()
        }
    }

    /// Names what runtimes are lent with the run's prefix (without one,
    /// only `move` attaches work).
    pub fn with_run_prefix(mut self, prefix: RunPrefix) -> Self {
        self.attachments = Attachments::new(prefix);
        self
    }

    pub fn claims(&self) -> &Claims {
        &self.claims
    }

    /// Endpoints lent to container runtimes.
    pub fn attachments(&self) -> &Attachments {
        &self.attachments
    }

    /// Requests handled and how many of them were errors.
    pub fn request_counts(&self) -> (u64, u64) {
        (
            self.requests.load(Ordering::Relaxed),
            self.errors.load(Ordering::Relaxed),
        )
    }

    pub fn handle(&self, request: LocalRequest) -> LocalResponse {
        self.requests.fetch_add(1, Ordering::Relaxed);
        let response = self.answer(request);
        if matches!(response, LocalResponse::Error { .. }) {
            self.errors.fetch_add(1, Ordering::Relaxed);
        }
        response
    }

    fn answer(&self, request: LocalRequest) -> LocalResponse {
        let answered = match request {
            LocalRequest::Attach {
                network,
                tenant,
                container_id,
                ifname,
                netns,
                mode,
            } => {
                let request = AttachRequest {
                    network: &network,
                    tenant: &tenant,
                    container_id: &container_id,
                    ifname: &ifname,
                    netns: &netns,
                    mode,
                };
                self.attachments
                    .attach(
                        &request,
                        self.claims.tenant(&tenant),
                        self.claims.free_pool(),
                    )
                    .map(|attachment| LocalResponse::Attached {
                        ok: true,
                        attachment,
                    })
                    .map_err(|e| e.to_string())
            }
            LocalRequest::Detach {
                container_id,
                ifname,
            } => self
                .attachments
                .detach(&container_id, &ifname)
                .map(|found| LocalResponse::Detached { ok: true, found })
                .map_err(|e| e.to_string()),
            LocalRequest::Check {
                container_id,
                ifname,
            } => self
                .attachments
                .check(&container_id, &ifname)
                .map(|attachment| LocalResponse::Attached {
                    ok: true,
                    attachment,
                })
                .map_err(|e| e.to_string()),
            LocalRequest::Gc { network, valid } => Ok(LocalResponse::Collected {
                ok: true,
                detached: self.attachments.collect(&network, &valid),
            }),
            LocalRequest::Claim { tenant } => self
                .claims
                .lend(&tenant)
                .map(|endpoint| LocalResponse::Claimed { ok: true, endpoint }),
            LocalRequest::Release { id } => self
                .claims
                .give_back(id)
                .map(|()| LocalResponse::Done { ok: true }),
            LocalRequest::Status {} => Ok(LocalResponse::Status {
                ok: true,
                pools: self.claims.pool_levels(),
            }),
        };
        answered.unwrap_or_else(LocalResponse::error)
    }
}

/// Binds the socket (replacing a stale one), mode 0600.
pub fn bind(path: &Path) -> std::io::Result<UnixListener> {
    match std::fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let listener = UnixListener::bind(path)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    Ok(listener)
}

/// Connections served at once; more are answered with an error and closed.
pub const MAX_CONNECTIONS: usize = 256;
/// Connections one caller process may hold at once.
pub const MAX_PER_CALLER: usize = 16;
/// A connection that sends no request for this long is closed.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(30);

/// Serves the local API until the task is dropped. The API is the node's
/// (runtimes, the CNI plugin, operators), never a function's, whatever the
/// socket file's permissions let through: see [`identify`]. An accept that
/// fails (out of descriptors, say) is retried, never fatal.
pub async fn serve(listener: UnixListener, api: Arc<LocalApi>) -> std::io::Result<()> {
    let caps = Arc::new(ConnectionCaps::new(MAX_CONNECTIONS, MAX_PER_CALLER));
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(e) => {
                tracing::warn!("local API accept: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let (api, caps) = (api.clone(), caps.clone());
        tokio::spawn(async move {
            let result = match identify(&stream, api.claims()) {
                Caller::Node { pid } => match caps.enter(pid) {
                    Some(_slot) => connection(stream, api).await,
                    None => refuse(stream, "too many connections to the agent's local API").await,
                },
                Caller::Function { tenant } => {
                    tracing::warn!(tenant, "a function called the agent's local API: refused");
                    refuse(stream, "the agent's local API does not serve functions").await
                }
                Caller::Unknown { reason } => {
                    tracing::warn!("local API caller refused: {reason}");
                    refuse(stream, &format!("caller not identified: {reason}")).await
                }
            };
            if let Err(e) = result {
                tracing::debug!("local API connection: {e}");
            }
        });
    }
}

/// Who is at the other end of a connection.
#[derive(Debug, PartialEq, Eq)]
pub enum Caller {
    /// Root on the node, outside every endpoint: served.
    Node { pid: i32 },
    /// A process in a claimed endpoint of `tenant`: refused.
    Function { tenant: String },
    /// Anything that could not be established: refused (fail closed).
    Unknown { reason: String },
}

/// Identifies the caller, failing closed (see [`crate::peer`]): root on the
/// node outside every claimed endpoint is served, anything else is not.
pub fn identify(stream: &UnixStream, claims: &Claims) -> Caller {
    match peer::identify(stream) {
        Err(reason) => Caller::Unknown { reason },
        Ok(p) if p.uid != 0 => Caller::Unknown {
            reason: format!("uid {} is not root on the node", p.uid),
        },
        Ok(p) => match claims.tenant_of_netns(p.netns) {
            Some(tenant) => Caller::Function { tenant },
            None => Caller::Node { pid: p.pid },
        },
    }
}

async fn refuse(mut stream: UnixStream, why: &str) -> std::io::Result<()> {
    let response = LocalResponse::error(why);
    let mut out = serde_json::to_vec(&response).map_err(std::io::Error::other)?;
    out.push(b'\n');
    stream.write_all(&out).await
}

async fn connection(stream: UnixStream, api: Arc<LocalApi>) -> std::io::Result<()> {
    let (read, mut write) = stream.into_split();
    let mut lines = BufReader::new(read);
    let mut line = Vec::new();
    loop {
        line.clear();
        let mut limited = (&mut lines).take(MAX_LINE as u64 + 1);
        let read = limited.read_until(b'\n', &mut line);
        let Ok(n) = tokio::time::timeout(IDLE_TIMEOUT, read).await else {
            return Ok(()); // idle too long: its descriptor is worth more to others
        };
        let n = n?;
        if n == 0 {
            return Ok(());
        }
        let response = match std::str::from_utf8(&line) {
            _ if n > MAX_LINE => {
                LocalResponse::error(format!("request longer than {MAX_LINE} bytes"))
            }
            Err(e) => LocalResponse::error(format!("the request is not UTF-8: {e}")),
            Ok(text) => match parse_request(text.trim()) {
                Ok(request) if request.blocks() => {
                    let api = api.clone();
                    tokio::task::spawn_blocking(move || api.handle(request))
                        .await
                        .unwrap_or_else(|e| LocalResponse::error(format!("request failed: {e}")))
                }
                Ok(request) => api.handle(request),
                Err(e) => LocalResponse::error(e),
            },
        };
        let mut out = serde_json::to_vec(&response).map_err(std::io::Error::other)?;
        out.push(b'\n');
        write.write_all(&out).await?;
        if n > MAX_LINE {
            return Ok(()); // the rest of the over-long line is not worth reading
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use particle_wire::local::AttachMode;
    use std::collections::BTreeMap;

    #[test]
    fn runtime_requests_for_unknown_attachments() {
        let claims = LocalApi::default();
        // DEL of what was never attached succeeds (the CNI spec requires it).
        assert_eq!(
            claims.handle(LocalRequest::Detach {
                container_id: "c".into(),
                ifname: "eth0".into()
            }),
            LocalResponse::Detached {
                ok: true,
                found: false
            }
        );
        let r = claims.handle(LocalRequest::Check {
            container_id: "c".into(),
            ifname: "eth0".into(),
        });
        assert!(
            matches!(&r, LocalResponse::Error { error, .. } if error.contains("no attachment")),
            "{r:?}"
        );
        // An unknown tenant is refused before any endpoint is touched.
        let r = claims.handle(LocalRequest::Attach {
            network: "n".into(),
            tenant: "zz".into(),
            container_id: "c".into(),
            ifname: "eth0".into(),
            netns: "/proc/self/ns/net".into(),
            mode: AttachMode::Move,
        });
        assert!(
            matches!(&r, LocalResponse::Error { error, .. } if error.contains("\"zz\"")),
            "{r:?}"
        );
        assert!(claims.attachments().is_empty());
    }

    #[test]
    fn unknown_tenants_and_ids_are_clear_errors() {
        let claims = LocalApi::default();
        let r = claims.handle(LocalRequest::Claim {
            tenant: "zz".into(),
        });
        assert!(
            matches!(&r, LocalResponse::Error { error, .. } if error.contains("\"zz\"")),
            "{r:?}"
        );
        let r = claims.handle(LocalRequest::Release { id: 3 });
        assert!(
            matches!(&r, LocalResponse::Error { error, .. } if error.contains("no claimed endpoint 3")),
            "{r:?}"
        );
        assert_eq!(
            claims.handle(LocalRequest::Status {}),
            LocalResponse::Status {
                ok: true,
                pools: BTreeMap::new()
            }
        );
    }
}
