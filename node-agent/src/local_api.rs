//! The agent's local API for functions and runtimes on the node: a Unix
//! socket (mode 0600: only root on the node may claim endpoints) speaking one
//! JSON object per line.
//!
//! `{"op":"claim","tenant":"a"}` → `{"ok":true,"endpoint":{...}}`: a warm
//! endpoint whose namespace is at `netns` (a path into the agent's fds, valid
//! while the endpoint is claimed). `{"op":"release","id":7}` returns it;
//! `{"op":"status"}` reports the pools. Every error is `{"ok":false,"error":"..."}`.

use std::collections::{BTreeMap, HashMap};
use std::os::fd::AsRawFd;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError, RwLock};

use particle_controller::api::PoolLevel;
use particle_net::overlay::OverlayCounts;
use particle_net::{PoolStats, PooledEndpoint};

use crate::free_pool::{FreePool, TenantClaim};
use crate::node_state::claim_from;
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};

/// Longest request line accepted; anything longer is hostile or broken.
const MAX_LINE: usize = 4096;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case", deny_unknown_fields)]
pub enum LocalRequest {
    Claim { tenant: String },
    Release { id: u64 },
    Status,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClaimedEndpoint {
    pub id: u64,
    pub tenant: String,
    pub address: String,
    pub gateway: String,
    pub netns: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum LocalResponse {
    Claimed {
        ok: bool,
        endpoint: ClaimedEndpoint,
    },
    Status {
        ok: bool,
        pools: BTreeMap<String, PoolLevel>,
    },
    Done {
        ok: bool,
    },
    Error {
        ok: bool,
        error: String,
    },
}

impl LocalResponse {
    fn error(message: impl Into<String>) -> Self {
        Self::Error {
            ok: false,
            error: message.into(),
        }
    }
}

/// An endpoint claimed for a burst, and whether it was built for it (cold).
pub type BurstEndpoint = (PooledEndpoint, bool);

/// The claim path's view of the node: a snapshot of the pools, replaced after
/// every overlay change, and the endpoints claimed through this API.
#[derive(Default)]
pub struct Claims {
    pools: RwLock<BTreeMap<String, TenantClaim>>,
    free: Option<Arc<FreePool>>,
    overlay: RwLock<BTreeMap<String, OverlayCounts>>,
    claimed: Mutex<HashMap<u64, PooledEndpoint>>,
    requests: AtomicU64,
    errors: AtomicU64,
}

impl Claims {
    pub fn new(free: Option<Arc<FreePool>>) -> Self {
        Self {
            free,
            ..Self::default()
        }
    }

    /// The tenant-free pool's level and how many it bound, if there is one.
    pub fn free_stats(&self) -> Option<(usize, u64)> {
        self.free.as_ref().map(|f| (f.level(), f.bound()))
    }

    /// Records the overlay entries per tenant, as of the last state applied.
    pub fn set_overlay_counts(&self, counts: BTreeMap<String, OverlayCounts>) {
        *self.overlay.write().unwrap_or_else(PoisonError::into_inner) = counts;
    }

    pub fn overlay_counts(&self) -> BTreeMap<String, OverlayCounts> {
        self.overlay
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    pub fn set_pools(&self, pools: BTreeMap<String, TenantClaim>) {
        *self.pools.write().unwrap_or_else(PoisonError::into_inner) = pools;
    }

    /// Every pool's counters.
    pub fn pool_stats(&self) -> BTreeMap<String, PoolStats> {
        self.pools
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .iter()
            .map(|(name, claim)| (name.clone(), claim.pool.stats()))
            .collect()
    }

    /// Every pool's level, as status answers and heartbeats report it.
    pub fn pool_levels(&self) -> BTreeMap<String, PoolLevel> {
        self.pool_stats()
            .into_iter()
            .map(|(name, s)| (name, pool_level(&s)))
            .collect()
    }

    /// Requests handled and how many of them were errors.
    pub fn request_counts(&self) -> (u64, u64) {
        (
            self.requests.load(Ordering::Relaxed),
            self.errors.load(Ordering::Relaxed),
        )
    }

    /// Claims `n` endpoints of `tenant` for a burst: warm ones first, then
    /// tenant-free ones bound to it, then the rest built right now in one
    /// batch. Each entry is the endpoint and whether it was built cold, or
    /// why there is none.
    pub fn claim_many(
        &self,
        tenant: &str,
        n: usize,
    ) -> Result<Vec<Result<BurstEndpoint, String>>, String> {
        let claim = self
            .pools
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .get(tenant)
            .cloned()
            .ok_or_else(|| format!("tenant {tenant:?} has no network on this node"))?;
        let mut out = Vec::with_capacity(n);
        while out.len() < n {
            match claim.pool.claim() {
                Ok(ep) => out.push(Ok((ep, false))),
                Err(_) => break,
            }
        }
        if let Some(free) = &self.free {
            while out.len() < n {
                match free.claim_for(&claim) {
                    Ok(ep) => out.push(Ok((ep, false))),
                    Err(_) => break,
                }
            }
        }
        let cold = n - out.len();
        if cold > 0 {
            out.extend(
                claim
                    .pool
                    .claim_cold(cold)
                    .into_iter()
                    .map(|r| r.map(|ep| (ep, true)).map_err(|e| e.to_string())),
            );
        }
        Ok(out)
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
        match request {
            LocalRequest::Claim { tenant } => {
                let claim = self
                    .pools
                    .read()
                    .unwrap_or_else(PoisonError::into_inner)
                    .get(&tenant)
                    .cloned();
                let Some(claim) = claim else {
                    return LocalResponse::error(format!(
                        "tenant {tenant:?} has no network on this node"
                    ));
                };
                match claim_from(&claim, self.free.as_deref()) {
                    Ok(ep) => {
                        let endpoint = ClaimedEndpoint {
                            id: ep.id(),
                            tenant,
                            address: ep.address().to_string(),
                            gateway: ep.gateway().to_string(),
                            netns: format!(
                                "/proc/{}/fd/{}",
                                std::process::id(),
                                ep.netns().as_raw_fd()
                            ),
                        };
                        self.claimed
                            .lock()
                            .unwrap_or_else(PoisonError::into_inner)
                            .insert(ep.id(), ep);
                        LocalResponse::Claimed { ok: true, endpoint }
                    }
                    Err(e) => LocalResponse::error(e),
                }
            }
            LocalRequest::Release { id } => {
                let ep = self
                    .claimed
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .remove(&id);
                match ep {
                    // Dropping hands it to the pool's recycler, off this path.
                    Some(ep) => {
                        drop(ep);
                        LocalResponse::Done { ok: true }
                    }
                    None => LocalResponse::error(format!("no claimed endpoint {id}")),
                }
            }
            LocalRequest::Status => LocalResponse::Status {
                ok: true,
                pools: self.pool_levels(),
            },
        }
    }
}

/// What the controller is told of a pool.
pub fn pool_level(s: &PoolStats) -> PoolLevel {
    PoolLevel {
        ready: s.ready,
        claimed: s.claimed,
        build_errors: s.build_errors,
    }
}

/// Parses one request line; a clear error for anything malformed.
pub fn parse_request(line: &str) -> Result<LocalRequest, String> {
    serde_json::from_str(line).map_err(|e| format!("malformed request: {e}"))
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

/// Serves the local API until the listener fails.
pub async fn serve(listener: UnixListener, claims: Arc<Claims>) -> std::io::Result<()> {
    loop {
        let (stream, _) = listener.accept().await?;
        let claims = claims.clone();
        tokio::spawn(async move {
            if let Err(e) = connection(stream, &claims).await {
                tracing::debug!("local API connection: {e}");
            }
        });
    }
}

async fn connection(stream: UnixStream, claims: &Claims) -> std::io::Result<()> {
    let (read, mut write) = stream.into_split();
    let mut lines = BufReader::new(read);
    let mut line = String::new();
    loop {
        line.clear();
        let n = (&mut lines)
            .take(MAX_LINE as u64 + 1)
            .read_line(&mut line)
            .await?;
        if n == 0 {
            return Ok(());
        }
        let response = if n > MAX_LINE {
            LocalResponse::error(format!("request longer than {MAX_LINE} bytes"))
        } else {
            match parse_request(line.trim()) {
                Ok(request) => claims.handle(request),
                Err(e) => LocalResponse::error(e),
            }
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

    #[test]
    fn requests_parse_strictly() {
        assert_eq!(
            parse_request(r#"{"op":"claim","tenant":"a"}"#),
            Ok(LocalRequest::Claim { tenant: "a".into() })
        );
        assert_eq!(
            parse_request(r#"{"op":"release","id":7}"#),
            Ok(LocalRequest::Release { id: 7 })
        );
        assert_eq!(
            parse_request(r#"{"op":"status"}"#),
            Ok(LocalRequest::Status)
        );
        for bad in [
            "",
            "{",
            r#"{"op":"destroy"}"#,
            r#"{"op":"claim"}"#,
            r#"{"op":"claim","tenant":"a","x":1}"#,
            r#"{"op":"release","id":-1}"#,
        ] {
            let err = parse_request(bad).unwrap_err();
            assert!(err.starts_with("malformed request"), "{bad}: {err}");
        }
    }

    #[test]
    fn unknown_tenants_and_ids_are_clear_errors() {
        let claims = Claims::default();
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
            claims.handle(LocalRequest::Status),
            LocalResponse::Status {
                ok: true,
                pools: BTreeMap::new()
            }
        );
    }
}
