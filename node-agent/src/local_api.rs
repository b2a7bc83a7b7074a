//! The agent's local API for functions and runtimes on the node: a Unix
//! socket (mode 0600: only root on the node may claim endpoints) speaking one
//! JSON object per line.
//!
//! `{"op":"claim","tenant":"a"}` → `{"ok":true,"endpoint":{...}}`: a warm
//! endpoint whose namespace is at `netns` (a path into the agent's fds, valid
//! while the endpoint is claimed). `{"op":"release","id":7}` returns it;
//! `{"op":"status"}` reports the pools. Every error is `{"ok":false,"error":"..."}`.
//!
//! For container runtimes (the CNI plugin, see [`crate::attachments`]):
//! `{"op":"attach","network":"n","tenant":"a","container_id":"c","ifname":"eth0","netns":"/run/netns/x"}`
//! → `{"ok":true,"attachment":{...}}`: a warm endpoint's interface moved into
//! that namespace, addressed and routed; `{"op":"detach","container_id":"c","ifname":"eth0"}`
//! → `{"ok":true,"found":bool}` (unknown ones succeed); `{"op":"check",...}` →
//! the attachment if it is intact; `{"op":"gc","network":"n","valid":[{"container_id":"c","ifname":"eth0"}]}`
//! → `{"ok":true,"detached":[...]}`, every other attachment of that network detached.

use std::collections::{BTreeMap, HashMap};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError, RwLock};

use particle_controller::api::PoolLevel;
use particle_net::overlay::OverlayCounts;
use particle_net::{PoolStats, PooledEndpoint, RunPrefix};

use crate::attachments::{AttachMode, AttachRequest, Attachment, AttachmentKey, Attachments};
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
    Claim {
        tenant: String,
    },
    Release {
        id: u64,
    },
    // An empty struct variant, not a unit one: serde's deny_unknown_fields
    // ignores unit variants of a tagged enum (`{"op":"status","x":1}` passed).
    Status {},
    Attach {
        network: String,
        tenant: String,
        container_id: String,
        ifname: String,
        netns: String,
        /// `plug` (default) or `move`; see [`crate::attachments`].
        #[serde(default)]
        mode: AttachMode,
    },
    Detach {
        container_id: String,
        ifname: String,
    },
    Check {
        container_id: String,
        ifname: String,
    },
    Gc {
        network: String,
        valid: Vec<AttachmentKey>,
    },
}

impl LocalRequest {
    /// Whether answering it touches the kernel (and so must not run on the
    /// async executor).
    fn blocks(&self) -> bool {
        matches!(
            self,
            Self::Attach { .. } | Self::Detach { .. } | Self::Check { .. } | Self::Gc { .. }
        )
    }
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
    Attached {
        ok: bool,
        attachment: Attachment,
    },
    Detached {
        ok: bool,
        found: bool,
    },
    Collected {
        ok: bool,
        detached: Vec<AttachmentKey>,
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
    /// Claimed endpoints' namespaces (nsfs inode) -> (endpoint id, tenant):
    /// how the warm-connection service tells a caller's tenant.
    claimed_netns: Mutex<HashMap<u64, (u64, String)>>,
    attachments: Attachments,
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

    /// Names what runtimes are lent with the run's prefix (without one,
    /// only `move` attaches work).
    pub fn with_run_prefix(mut self, prefix: RunPrefix) -> Self {
        self.attachments = Attachments::new(prefix);
        self
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

    /// Records a claimed endpoint's namespace as its tenant's, for the
    /// warm-connection service's tenant check.
    pub fn remember_netns(&self, ep: &PooledEndpoint, tenant: &str) {
        if let Ok(inode) = ep.netns().inode() {
            self.claimed_netns
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .insert(inode, (ep.id(), tenant.to_string()));
        }
    }

    /// Forgets a namespace recorded with [`Self::remember_netns`] (its endpoint is going back).
    pub fn forget_netns(&self, ep: &PooledEndpoint) {
        let id = ep.id();
        self.claimed_netns
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .retain(|_, (claimed, _)| *claimed != id);
    }

    /// The tenant of the claimed endpoint whose namespace has this inode.
    pub fn tenant_of_netns(&self, inode: u64) -> Option<String> {
        self.claimed_netns
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(&inode)
            .map(|(_, tenant)| tenant.clone())
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

    /// Waits up to `within` for `tenant`'s network to exist on this node: a
    /// tenant created a moment ago reaches the agent by the next overlay
    /// update, and a launch may come right behind it.
    pub fn wait_for_tenant(&self, tenant: &str, within: std::time::Duration) -> bool {
        let deadline = std::time::Instant::now() + within;
        loop {
            let known = self
                .pools
                .read()
                .unwrap_or_else(PoisonError::into_inner)
                .contains_key(tenant);
            if known || std::time::Instant::now() >= deadline {
                return known;
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
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

    /// Endpoints lent to container runtimes.
    pub fn attachments(&self) -> &Attachments {
        &self.attachments
    }

    fn claim_endpoint(&self, tenant: &str) -> Result<PooledEndpoint, String> {
        let claim = self
            .pools
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .get(tenant)
            .cloned();
        let Some(claim) = claim else {
            return Err(format!("tenant {tenant:?} has no network on this node"));
        };
        claim_from(&claim, self.free.as_deref())
    }

    fn answer(&self, request: LocalRequest) -> LocalResponse {
        match request {
            LocalRequest::Attach {
                network,
                tenant,
                container_id,
                ifname,
                netns,
                mode,
            } => {
                let claim = self
                    .pools
                    .read()
                    .unwrap_or_else(PoisonError::into_inner)
                    .get(&tenant)
                    .cloned()
                    .ok_or_else(|| format!("tenant {tenant:?} has no network on this node"));
                let request = AttachRequest {
                    network: &network,
                    tenant: &tenant,
                    container_id: &container_id,
                    ifname: &ifname,
                    netns: &netns,
                    mode,
                };
                match self
                    .attachments
                    .attach(&request, claim, self.free.as_deref())
                {
                    Ok(attachment) => LocalResponse::Attached {
                        ok: true,
                        attachment,
                    },
                    Err(e) => LocalResponse::error(e.to_string()),
                }
            }
            LocalRequest::Detach {
                container_id,
                ifname,
            } => match self.attachments.detach(&container_id, &ifname) {
                Ok(found) => LocalResponse::Detached { ok: true, found },
                Err(e) => LocalResponse::error(e.to_string()),
            },
            LocalRequest::Check {
                container_id,
                ifname,
            } => match self.attachments.check(&container_id, &ifname) {
                Ok(attachment) => LocalResponse::Attached {
                    ok: true,
                    attachment,
                },
                Err(e) => LocalResponse::error(e.to_string()),
            },
            LocalRequest::Gc { network, valid } => LocalResponse::Collected {
                ok: true,
                detached: self.attachments.collect(&network, &valid),
            },
            LocalRequest::Claim { tenant } => match self.claim_endpoint(&tenant) {
                Ok(ep) => {
                    self.remember_netns(&ep, &tenant);
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
            },
            LocalRequest::Release { id } => {
                let ep = self
                    .claimed
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .remove(&id);
                self.claimed_netns
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .retain(|_, (claimed, _)| *claimed != id);
                match ep {
                    // Dropping hands it to the pool's recycler, off this path.
                    Some(ep) => {
                        drop(ep);
                        LocalResponse::Done { ok: true }
                    }
                    None => LocalResponse::error(format!("no claimed endpoint {id}")),
                }
            }
            LocalRequest::Status {} => LocalResponse::Status {
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

/// Serves the local API until the listener fails. The API is the node's
/// (runtimes, the CNI plugin, operators), never a function's: a caller whose
/// network namespace is a claimed endpoint's is answered with an error and
/// cut off, whatever the socket file's permissions let through.
pub async fn serve(listener: UnixListener, claims: Arc<Claims>) -> std::io::Result<()> {
    loop {
        let (stream, _) = listener.accept().await?;
        let claims = claims.clone();
        tokio::spawn(async move {
            let result = match function_caller(&stream, &claims) {
                Some(tenant) => refuse(stream, &tenant).await,
                None => connection(stream, claims).await,
            };
            if let Err(e) = result {
                tracing::debug!("local API connection: {e}");
            }
        });
    }
}

/// The tenant whose function is at the other end, if it is one.
fn function_caller(stream: &UnixStream, claims: &Claims) -> Option<String> {
    let cred = stream.peer_cred().ok()?;
    let inode = std::fs::metadata(format!("/proc/{}/ns/net", cred.pid()?))
        .ok()?
        .ino();
    claims.tenant_of_netns(inode)
}

async fn refuse(mut stream: UnixStream, tenant: &str) -> std::io::Result<()> {
    tracing::warn!(tenant, "a function called the agent's local API: refused");
    let response = LocalResponse::error("the agent's local API does not serve functions");
    let mut out = serde_json::to_vec(&response).map_err(std::io::Error::other)?;
    out.push(b'\n');
    stream.write_all(&out).await
}

async fn connection(stream: UnixStream, claims: Arc<Claims>) -> std::io::Result<()> {
    let (read, mut write) = stream.into_split();
    let mut lines = BufReader::new(read);
    let mut line = Vec::new();
    loop {
        line.clear();
        let n = (&mut lines)
            .take(MAX_LINE as u64 + 1)
            .read_until(b'\n', &mut line)
            .await?;
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
                    let claims = claims.clone();
                    tokio::task::spawn_blocking(move || claims.handle(request))
                        .await
                        .unwrap_or_else(|e| LocalResponse::error(format!("request failed: {e}")))
                }
                Ok(request) => claims.handle(request),
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
            Ok(LocalRequest::Status {})
        );
        for bad in [
            "",
            "{",
            r#"{"op":"destroy"}"#,
            r#"{"op":"claim"}"#,
            r#"{"op":"claim","tenant":"a","x":1}"#,
            r#"{"op":"status","tenant":"a"}"#,
            r#"{"op":"release","id":-1}"#,
        ] {
            let err = parse_request(bad).unwrap_err();
            assert!(err.starts_with("malformed request"), "{bad}: {err}");
        }
    }

    #[test]
    fn runtime_requests_parse_strictly() {
        assert_eq!(
            parse_request(
                r#"{"op":"attach","network":"n","tenant":"a","container_id":"c","ifname":"eth0","netns":"/run/netns/x"}"#
            ),
            Ok(LocalRequest::Attach {
                network: "n".into(),
                tenant: "a".into(),
                container_id: "c".into(),
                ifname: "eth0".into(),
                netns: "/run/netns/x".into(),
                mode: AttachMode::Plug,
            })
        );
        assert_eq!(
            parse_request(
                r#"{"op":"gc","network":"n","valid":[{"container_id":"c","ifname":"eth0"}]}"#
            ),
            Ok(LocalRequest::Gc {
                network: "n".into(),
                valid: vec![AttachmentKey {
                    container_id: "c".into(),
                    ifname: "eth0".into()
                }],
            })
        );
        for bad in [
            r#"{"op":"attach","tenant":"a","container_id":"c","ifname":"eth0"}"#,
            r#"{"op":"detach","container_id":"c"}"#,
            r#"{"op":"gc","network":"n"}"#,
        ] {
            assert!(parse_request(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn runtime_requests_for_unknown_attachments() {
        let claims = Claims::default();
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
            claims.handle(LocalRequest::Status {}),
            LocalResponse::Status {
                ok: true,
                pools: BTreeMap::new()
            }
        );
    }
}

/// Bounded fuzzing (property tests, run by `cargo test`) of the request
/// parser and of the connection loop over a real socket.
#[cfg(test)]
mod fuzz {
    use super::*;
    use proptest::prelude::*;
    use proptest::test_runner::{Config, TestCaseError, TestRunner};
    use serde_json::Value;

    fn config(cases: u32) -> Config {
        Config {
            cases,
            // A bug found here becomes a plain test; no files in the tree.
            failure_persistence: None,
            ..Config::default()
        }
    }

    /// Any characters, control characters, quotes and newlines included.
    fn text() -> BoxedStrategy<String> {
        prop_oneof![
            3 => "[a-z0-9/_-]{0,10}",
            1 => prop::collection::vec(any::<char>(), 0..10).prop_map(String::from_iter),
        ]
        .boxed()
    }

    fn key() -> BoxedStrategy<AttachmentKey> {
        (text(), text())
            .prop_map(|(container_id, ifname)| AttachmentKey {
                container_id,
                ifname,
            })
            .boxed()
    }

    fn request() -> BoxedStrategy<LocalRequest> {
        prop_oneof![
            text().prop_map(|tenant| LocalRequest::Claim { tenant }),
            any::<u64>().prop_map(|id| LocalRequest::Release { id }),
            Just(LocalRequest::Status {}),
            (text(), text(), text(), text(), text(), any::<bool>()).prop_map(
                |(network, tenant, container_id, ifname, netns, plug)| LocalRequest::Attach {
                    network,
                    tenant,
                    container_id,
                    ifname,
                    netns,
                    mode: if plug {
                        AttachMode::Plug
                    } else {
                        AttachMode::Move
                    },
                }
            ),
            (text(), text()).prop_map(|(container_id, ifname)| LocalRequest::Detach {
                container_id,
                ifname
            }),
            (text(), text()).prop_map(|(container_id, ifname)| LocalRequest::Check {
                container_id,
                ifname
            }),
            (text(), prop::collection::vec(key(), 0..3))
                .prop_map(|(network, valid)| LocalRequest::Gc { network, valid }),
        ]
        .boxed()
    }

    fn json_value() -> BoxedStrategy<Value> {
        let leaf = prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::from),
            any::<i64>().prop_map(Value::from),
            any::<u64>().prop_map(Value::from),
            any::<f64>().prop_map(Value::from),
            text().prop_map(Value::from),
        ];
        leaf.prop_recursive(3, 16, 4, |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
                prop::collection::btree_map(text(), inner, 0..4)
                    .prop_map(|m| Value::Object(m.into_iter().collect())),
            ]
        })
        .boxed()
    }

    /// A request object with an `op` and fields of the right names, each
    /// maybe missing or of any type.
    fn near_request() -> BoxedStrategy<Value> {
        let op = prop::sample::select(vec![
            "claim", "release", "status", "attach", "detach", "check", "gc", "destroy", "",
        ]);
        let field = prop::sample::select(vec![
            "tenant",
            "id",
            "network",
            "container_id",
            "ifname",
            "netns",
            "mode",
            "valid",
            "op",
            "extra",
        ]);
        let value = prop_oneof![
            2 => text().prop_map(Value::from),
            1 => any::<u64>().prop_map(Value::from),
            1 => prop::sample::select(vec!["plug", "move", "teleport"]).prop_map(Value::from),
            1 => prop::collection::vec(key(), 0..2).prop_map(|v| serde_json::json!(v)),
            1 => json_value(),
        ];
        (op, prop::collection::btree_map(field, value, 0..6))
            .prop_map(|(op, fields)| {
                let mut m: serde_json::Map<String, Value> = fields
                    .into_iter()
                    .map(|(k, v)| (k.to_string(), v))
                    .collect();
                m.entry("op").or_insert_with(|| Value::from(op));
                Value::Object(m)
            })
            .boxed()
    }

    /// Arbitrary text never panics the parser: a request or a "malformed
    /// request" error.
    #[test]
    fn any_text_parses_or_is_refused() {
        let text = prop_oneof![
            ".{0,64}",
            prop::collection::vec(any::<char>(), 0..64).prop_map(String::from_iter),
            json_value().prop_map(|v| v.to_string()),
        ];
        TestRunner::new(config(2000))
            .run(&text, |line| {
                if let Err(e) = parse_request(&line) {
                    prop_assert!(e.starts_with("malformed request"), "{line:?}: {e}");
                }
                Ok(())
            })
            .unwrap();
    }

    /// What the parser accepts it represents exactly: every field given is
    /// known and comes back unchanged when the request is serialised.
    #[test]
    fn accepted_requests_keep_every_field() {
        let values = prop_oneof![near_request(), json_value()];
        TestRunner::new(config(3000))
            .run(&values, |v| {
                let Ok(req) = parse_request(&v.to_string()) else {
                    return Ok(());
                };
                let back = serde_json::to_value(&req).unwrap();
                let (Value::Object(given), Value::Object(back)) = (&v, &back) else {
                    return Err(TestCaseError::fail(format!("{v} parsed as {req:?}")));
                };
                for (k, given) in given {
                    // Entries of `valid` may carry keys that are ignored.
                    if k == "valid" {
                        prop_assert_eq!(
                            given.as_array().map(Vec::len),
                            back[k].as_array().map(Vec::len)
                        );
                    } else {
                        prop_assert_eq!(Some(given), back.get(k), "{} in {}", k, v);
                    }
                }
                Ok(())
            })
            .unwrap();
    }

    /// Serialising a request gives one line that parses back to it.
    #[test]
    fn requests_round_trip_on_one_line() {
        TestRunner::new(config(2000))
            .run(&request(), |req| {
                let line = serde_json::to_string(&req).unwrap();
                prop_assert!(!line.contains('\n'), "{line:?}");
                prop_assert_eq!(parse_request(&line), Ok(req));
                Ok(())
            })
            .unwrap();
    }

    /// One line a client may send.
    #[derive(Debug, Clone)]
    enum Sent {
        Request(LocalRequest),
        Text(String),
        Bytes(Vec<u8>),
        /// A line of this many bytes before its newline, maybe too long.
        Long(usize),
    }

    impl Sent {
        fn bytes(&self) -> Vec<u8> {
            let mut b = match self {
                Self::Request(r) => serde_json::to_vec(r).unwrap(),
                Self::Text(t) => t.clone().into_bytes(),
                Self::Bytes(b) => b
                    .iter()
                    .map(|&b| if b == b'\n' { b' ' } else { b })
                    .collect(),
                Self::Long(n) => {
                    // A valid request padded with spaces: only its length is wrong.
                    let mut b = br#"{"op":"status"}"#.to_vec();
                    b.resize((*n).max(b.len()), b' ');
                    b
                }
            };
            b.push(b'\n');
            b
        }
    }

    fn sent() -> BoxedStrategy<Sent> {
        prop_oneof![
            4 => request().prop_map(Sent::Request),
            2 => near_request().prop_map(|v| Sent::Text(v.to_string())),
            1 => ".{0,40}".prop_map(Sent::Text),
            1 => prop::collection::vec(any::<u8>(), 0..40).prop_map(Sent::Bytes),
            1 => prop_oneof![MAX_LINE - 3..MAX_LINE + 3, 0..3 * MAX_LINE].prop_map(Sent::Long),
        ]
        .boxed()
    }

    /// The replies the connection loop owes for `lines`, from a fresh model:
    /// one per line, in order (a line that is not UTF-8 gets an error), up
    /// to the first line that is too long (an error, then closed). True if
    /// it closes before the last line.
    fn expected_replies(lines: &[Vec<u8>]) -> (Vec<Value>, bool) {
        let model = Claims::default();
        let mut out = Vec::new();
        for line in lines {
            // The loop reads at most MAX_LINE + 1 bytes of a line.
            let read = &line[..line.len().min(MAX_LINE + 1)];
            if read.len() > MAX_LINE {
                out.push(
                    serde_json::to_value(LocalResponse::error(format!(
                        "request longer than {MAX_LINE} bytes"
                    )))
                    .unwrap(),
                );
                return (out, true);
            }
            let text = match std::str::from_utf8(read) {
                Ok(text) => text,
                Err(e) => {
                    let reply = LocalResponse::error(format!("the request is not UTF-8: {e}"));
                    out.push(serde_json::to_value(reply).unwrap());
                    continue;
                }
            };
            let reply = match parse_request(text.trim()) {
                Ok(req) => model.handle(req),
                Err(e) => LocalResponse::error(e),
            };
            out.push(serde_json::to_value(reply).unwrap());
        }
        (out, false)
    }

    /// What the agent answers to `input`, and whether the connection was reset.
    async fn exchange(path: &Path, input: Vec<u8>) -> (Vec<u8>, bool) {
        let stream = UnixStream::connect(path).await.unwrap();
        let (mut read, mut write) = stream.into_split();
        // Written while replies are read: a long input must not deadlock on
        // full socket buffers.
        let writer = tokio::spawn(async move {
            // The agent may close early (a line too long).
            let _ = write.write_all(&input).await;
            let _ = write.shutdown().await;
        });
        let mut replies = Vec::new();
        // A Unix stream closed with input unread resets the other end after
        // the data sent before: what was read is what the agent answered.
        let reset = match read.read_to_end(&mut replies).await {
            Ok(_) => false,
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => true,
            Err(e) => panic!("reading replies: {e}"),
        };
        writer.await.unwrap();
        (replies, reset)
    }

    /// End to end over the real socket: arbitrary lines (invalid UTF-8, too
    /// long, many) get exactly the replies owed, never a panic, and a new
    /// connection's `status` still works afterwards.
    #[test]
    fn the_socket_answers_every_line_or_closes() {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let dir =
            std::env::temp_dir().join(format!("particle-local-api-fuzz-{}", std::process::id()));
        let path = dir.join("agent.sock");
        // Bound inside the runtime (a tokio listener needs its reactor).
        let listener = rt.block_on(async { bind(&path).unwrap() });
        let server = rt.spawn(serve(listener, Arc::new(Claims::default())));
        let lines = prop::collection::vec(sent(), 0..24);
        let result = TestRunner::new(config(300)).run(&lines, |lines| {
            let lines: Vec<Vec<u8>> = lines.iter().map(Sent::bytes).collect();
            let (expected, closes_early) = expected_replies(&lines);
            rt.block_on(async {
                let (replies, reset) = exchange(&path, lines.concat()).await;
                prop_assert!(!reset || closes_early, "reset though every line was read");
                prop_assert!(replies.is_empty() || replies.ends_with(b"\n"));
                let replies: Vec<Value> = replies
                    .split(|&b| b == b'\n')
                    .filter(|l| !l.is_empty())
                    .map(|l| serde_json::from_slice(l).unwrap())
                    .collect();
                prop_assert_eq!(replies, expected);
                let (status, _) = exchange(&path, b"{\"op\":\"status\"}\n".to_vec()).await;
                prop_assert_eq!(
                    serde_json::from_slice::<Value>(&status).unwrap(),
                    serde_json::json!({"ok": true, "pools": {}})
                );
                Ok(())
            })
        });
        server.abort();
        let _ = std::fs::remove_dir_all(&dir);
        result.unwrap();
    }
}
