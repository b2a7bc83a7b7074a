//! The etcd store: state and records in an etcd cluster several controllers
//! share, spoken to through etcd's v3 JSON gateway (`/v3/kv/range`,
//! `/v3/kv/txn`, `/v3/lease/...`; keys and values base64) with the
//! project's own HTTP client.
//!
//! Why the gateway and not the gRPC client crate (`etcd-client`): that
//! crate generates its code with `tonic-build` at build time, which needs
//! `protoc`, a system package a fresh Debian with a Rust toolchain lacks;
//! the gateway is part of etcd since 3.3 (3.4 here), needs no new stack, and
//! the controller makes a handful of calls per change.
//!
//! Keys, under the prefix (`/particle` unless `--store etcd://.../PREFIX`):
//! `cluster` (the cluster id, written once: a controller of another cluster
//! refuses to start), `leader` (the leader's address, on its lease; see
//! [`crate::leader`]), `state` (the snapshot), `r/...` (records). Every
//! write is a transaction that compares `leader`'s create revision with the
//! one this controller won: a controller that lost its lease (a pause, a
//! partition) can no longer write anything, even before it notices. State
//! writes also compare `state`'s mod revision with the one last read or
//! written: two controllers can never both commit an allocation.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use serde_json::{json, Value};

use super::{Backend, Record, StoreError};
use crate::state::Snapshot;
use particle_wire::client::{ApiClient, ClientError, Method};

/// One attempt at one endpoint (a hung member costs this once: the next
/// calls start from the endpoint that answered).
const ATTEMPT_TIMEOUT: Duration = Duration::from_millis(1000);
/// All attempts of one call, across endpoints.
const CALL_TIMEOUT: Duration = Duration::from_secs(4);
/// etcd refuses requests over 1.5 MiB by default: records are written in
/// transactions of at most this much and [`MAX_TXN_OPS`] operations.
const MAX_TXN_BYTES: usize = 1 << 20;
const MAX_TXN_OPS: usize = 100;

fn b64(s: &[u8]) -> String {
    B64.encode(s)
}

/// The end of the range of keys starting with `prefix` (its last byte + 1).
fn range_end(prefix: &[u8]) -> Vec<u8> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    vec![0]
}

/// int64s come as JSON strings from the gateway, and zero fields are omitted.
fn int(v: &Value) -> i64 {
    match v {
        Value::String(s) => s.parse().unwrap_or(0),
        Value::Number(n) => n.as_i64().unwrap_or(0),
        _ => 0,
    }
}

/// One key-value of a range answer.
#[derive(Debug, Clone)]
pub struct Kv {
    pub key: Vec<u8>,
    pub value: Vec<u8>,
    pub create_revision: i64,
    pub mod_revision: i64,
    pub lease: i64,
}

/// The key-values of a range answer.
pub fn kvs_of(range: &Value) -> Result<Vec<Kv>, StoreError> {
    let Some(list) = range["kvs"].as_array() else {
        return Ok(Vec::new());
    };
    list.iter()
        .map(|kv| {
            let decode = |f: &str| {
                B64.decode(kv[f].as_str().unwrap_or(""))
                    .map_err(|e| StoreError::Etcd(format!("bad base64 in {f}: {e}")))
            };
            Ok(Kv {
                key: decode("key")?,
                value: decode("value")?,
                create_revision: int(&kv["create_revision"]),
                mod_revision: int(&kv["mod_revision"]),
                lease: int(&kv["lease"]),
            })
        })
        .collect()
}

/// The etcd cluster's client side: its endpoints (tried in turn) and our prefix.
pub struct EtcdClient {
    endpoints: Vec<SocketAddr>,
    prefix: String,
    /// The endpoint that answered last: tried first.
    preferred: std::sync::atomic::AtomicUsize,
}

impl EtcdClient {
    pub fn new(endpoints: Vec<SocketAddr>, prefix: &str) -> Self {
        Self {
            endpoints,
            prefix: prefix.trim_end_matches('/').to_string(),
            preferred: Default::default(),
        }
    }

    pub fn endpoints(&self) -> String {
        let list: Vec<String> = self.endpoints.iter().map(|e| e.to_string()).collect();
        list.join(",")
    }

    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// Our key for `name` (`PREFIX/name`).
    pub fn key(&self, name: &str) -> Vec<u8> {
        format!("{}/{name}", self.prefix).into_bytes()
    }

    /// One gateway call, to the first endpoint that answers.
    pub async fn post(&self, path: &str, body: &Value) -> Result<Value, StoreError> {
        let deadline = tokio::time::Instant::now() + CALL_TIMEOUT;
        let mut last = String::from("no endpoint");
        let n = self.endpoints.len();
        let first = self.preferred.load(std::sync::atomic::Ordering::Relaxed);
        for round in 0.. {
            for i in (first..first + n).map(|i| i % n) {
                let endpoint = &self.endpoints[i];
                let now = tokio::time::Instant::now();
                if now >= deadline {
                    return Err(StoreError::Unavailable(format!(
                        "etcd at {}: {last}",
                        self.endpoints()
                    )));
                }
                let api = ApiClient::direct(*endpoint, String::new());
                let wait = ATTEMPT_TIMEOUT.min(deadline - now);
                match tokio::time::timeout(
                    wait,
                    api.call::<Value, Value>(Method::POST, path, Some(body)),
                )
                .await
                {
                    Ok(Ok(v)) => {
                        self.preferred
                            .store(i, std::sync::atomic::Ordering::Relaxed);
                        return Ok(v);
                    }
                    // A request etcd understood and refused is final.
                    Ok(Err(ClientError::Status { status, message }))
                        if status.is_client_error() =>
                    {
                        return Err(StoreError::Etcd(format!("{path}: {status}: {message}")))
                    }
                    Ok(Err(e)) => last = format!("{endpoint}: {e}"),
                    Err(_) => last = format!("{endpoint}: no answer within {wait:?}"),
                }
            }
            if round > 0 {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
        unreachable!("the loop returns at its deadline")
    }

    /// The keys `key` names (one, or every key under it with `prefix`).
    pub async fn range(&self, key: &[u8], prefix: bool) -> Result<Vec<Kv>, StoreError> {
        let mut body = json!({ "key": b64(key) });
        if prefix {
            body["range_end"] = json!(b64(&range_end(key)));
        }
        kvs_of(&self.post("/v3/kv/range", &body).await?)
    }

    /// A transaction; whether its compares held, and its answer.
    pub async fn txn(
        &self,
        compare: Vec<Value>,
        success: Vec<Value>,
        failure: Vec<Value>,
    ) -> Result<(bool, Value), StoreError> {
        let body = json!({ "compare": compare, "success": success, "failure": failure });
        let answer = self.post("/v3/kv/txn", &body).await?;
        Ok((answer["succeeded"].as_bool().unwrap_or(false), answer))
    }

    pub async fn lease_grant(&self, ttl_s: i64) -> Result<i64, StoreError> {
        let answer = self
            .post("/v3/lease/grant", &json!({ "TTL": ttl_s }))
            .await?;
        match int(&answer["ID"]) {
            0 => Err(StoreError::Etcd(format!("lease grant: {answer}"))),
            id => Ok(id),
        }
    }

    /// Renews `lease`; its remaining TTL, 0 if it has expired.
    pub async fn lease_keepalive(&self, lease: i64) -> Result<i64, StoreError> {
        let answer = self
            .post("/v3/lease/keepalive", &json!({ "ID": lease.to_string() }))
            .await?;
        Ok(int(&answer["result"]["TTL"]))
    }

    pub async fn lease_revoke(&self, lease: i64) -> Result<(), StoreError> {
        self.post("/v3/lease/revoke", &json!({ "ID": lease.to_string() }))
            .await
            .map(drop)
    }

    /// Records this cluster's id under the prefix, or checks it is ours.
    pub async fn claim_cluster(&self, cluster_id: &str) -> Result<(), StoreError> {
        let key = self.key("cluster");
        let (created, answer) = self
            .txn(
                vec![compare_create(&key, 0)],
                vec![put(&key, cluster_id.as_bytes(), 0)],
                vec![json!({ "request_range": { "key": b64(&key) } })],
            )
            .await?;
        if created {
            tracing::info!(cluster_id, prefix = %self.prefix, "cluster id recorded in etcd");
            return Ok(());
        }
        let found = kvs_of(&answer["responses"][0]["response_range"])?
            .first()
            .map(|kv| String::from_utf8_lossy(&kv.value).into_owned())
            .unwrap_or_default();
        if found == cluster_id {
            Ok(())
        } else {
            Err(StoreError::ForeignCluster {
                endpoints: self.endpoints(),
                prefix: self.prefix.clone(),
                found,
                ours: cluster_id.to_string(),
            })
        }
    }
}

/// `create_revision(key) == rev` (0: the key does not exist).
pub fn compare_create(key: &[u8], rev: i64) -> Value {
    json!({ "key": b64(key), "result": "EQUAL", "target": "CREATE", "create_revision": rev.to_string() })
}

fn compare_mod(key: &[u8], rev: i64) -> Value {
    json!({ "key": b64(key), "result": "EQUAL", "target": "MOD", "mod_revision": rev.to_string() })
}

/// A put (on `lease` unless 0).
pub fn put(key: &[u8], value: &[u8], lease: i64) -> Value {
    let mut p = json!({ "key": b64(key), "value": b64(value) });
    if lease != 0 {
        p["lease"] = json!(lease.to_string());
    }
    json!({ "request_put": p })
}

fn delete_prefix(key: &[u8]) -> Value {
    json!({ "request_delete_range": { "key": b64(key), "range_end": b64(&range_end(key)) } })
}

/// A runtime of its own on which the blocking [`Backend`] calls run their
/// requests (they are made from inside the controller's runtime, which must
/// not block on itself).
struct Bridge(Option<tokio::runtime::Runtime>);

impl Bridge {
    fn new() -> std::io::Result<Self> {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("etcd-client")
            .enable_all()
            .build()?;
        Ok(Self(Some(rt)))
    }

    fn block<T: Send + 'static>(
        &self,
        fut: impl std::future::Future<Output = Result<T, StoreError>> + Send + 'static,
    ) -> Result<T, StoreError> {
        let rt = self
            .0
            .as_ref()
            .ok_or_else(|| StoreError::Unavailable("shutting down".into()))?;
        let (tx, rx) = std::sync::mpsc::sync_channel(1);
        rt.spawn(async move {
            let _ = tx.send(fut.await);
        });
        rx.recv()
            .map_err(|_| StoreError::Unavailable("the etcd client stopped".into()))?
    }
}

impl Drop for Bridge {
    fn drop(&mut self) {
        // Dropping a runtime inside another one's context would panic.
        if let Some(rt) = self.0.take() {
            rt.shutdown_background();
        }
    }
}

/// The etcd [`Backend`].
pub struct EtcdStore {
    client: Arc<EtcdClient>,
    bridge: Bridge,
    /// The create revision of the `leader` key this controller won; `None`
    /// while it follows (every write is refused).
    fence: Mutex<Option<i64>>,
    /// `state`'s mod revision as last read or written.
    state_rev: Mutex<i64>,
    /// A fenced write was refused while this controller believed it led:
    /// another one wrote (or leads); [`crate::leader`] steps down.
    refused: std::sync::atomic::AtomicBool,
}

impl EtcdStore {
    /// Connects (waiting up to `wait` for etcd to answer) and checks the
    /// cluster id.
    pub fn connect(
        client: Arc<EtcdClient>,
        cluster_id: &str,
        wait: Duration,
    ) -> Result<Self, StoreError> {
        let store = Self {
            client,
            bridge: Bridge::new().map_err(|e| StoreError::Unavailable(e.to_string()))?,
            fence: Mutex::new(None),
            state_rev: Mutex::new(0),
            refused: Default::default(),
        };
        let deadline = std::time::Instant::now() + wait;
        loop {
            let (client, id) = (store.client.clone(), cluster_id.to_string());
            match store
                .bridge
                .block(async move { client.claim_cluster(&id).await })
            {
                Err(StoreError::Unavailable(e)) if std::time::Instant::now() < deadline => {
                    tracing::warn!("waiting for etcd: {e}");
                    std::thread::sleep(Duration::from_millis(500));
                }
                other => return other.map(|()| store),
            }
        }
    }

    pub fn client(&self) -> &Arc<EtcdClient> {
        &self.client
    }

    /// Sets (after winning the election) or clears (after losing it) the
    /// revision every write is fenced on.
    pub fn set_fence(&self, leader_rev: Option<i64>) {
        *self.fence.lock().unwrap_or_else(PoisonError::into_inner) = leader_rev;
        self.refused
            .store(false, std::sync::atomic::Ordering::Relaxed);
    }

    /// Whether a write was refused since the last call (and forgets it).
    pub fn take_refused(&self) -> bool {
        self.refused
            .swap(false, std::sync::atomic::Ordering::Relaxed)
    }

    fn fence(&self) -> Result<Value, StoreError> {
        let rev = (*self.fence.lock().unwrap_or_else(PoisonError::into_inner))
            .ok_or(StoreError::NotLeader)?;
        Ok(compare_create(&self.client.key("leader"), rev))
    }

    fn txn_blocking(&self, compare: Vec<Value>, success: Vec<Value>) -> Result<Value, StoreError> {
        let client = self.client.clone();
        let (ok, answer) = self
            .bridge
            .block(async move { client.txn(compare, success, Vec::new()).await })?;
        if ok {
            Ok(answer)
        } else {
            self.refused
                .store(true, std::sync::atomic::Ordering::Relaxed);
            Err(StoreError::NotLeader)
        }
    }
}

impl Backend for EtcdStore {
    fn describe(&self) -> String {
        format!("etcd://{}{}", self.client.endpoints(), self.client.prefix())
    }

    fn load_state(&self) -> Result<Option<Snapshot>, StoreError> {
        let client = self.client.clone();
        let key = client.key("state");
        let found = self
            .bridge
            .block(async move { client.range(&key, false).await })?;
        let Some(kv) = found.into_iter().next() else {
            *self
                .state_rev
                .lock()
                .unwrap_or_else(PoisonError::into_inner) = 0;
            return Ok(None);
        };
        *self
            .state_rev
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = kv.mod_revision;
        serde_json::from_slice(&kv.value).map(Some).map_err(|e| {
            StoreError::Etcd(format!(
                "{}/state is not a valid state: {e}",
                self.client.prefix()
            ))
        })
    }

    fn save_state(&self, snapshot: &Snapshot) -> Result<(), StoreError> {
        let value = serde_json::to_vec(snapshot).map_err(StoreError::Encode)?;
        let key = self.client.key("state");
        let mut rev = self
            .state_rev
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let answer = self.txn_blocking(
            vec![self.fence()?, compare_mod(&key, *rev)],
            vec![put(&key, &value, 0)],
        )?;
        *rev = int(&answer["header"]["revision"]);
        Ok(())
    }

    fn records(&self, prefix: &str) -> Result<Vec<Record>, StoreError> {
        let client = self.client.clone();
        let key = client.key(&format!("r/{prefix}"));
        let strip = client.key("r/").len();
        let found = self
            .bridge
            .block(async move { client.range(&key, true).await })?;
        Ok(found
            .into_iter()
            .map(|kv| {
                (
                    String::from_utf8_lossy(&kv.key[strip..]).into_owned(),
                    kv.value,
                )
            })
            .collect())
    }

    fn write_records(&self, delete: &[String], puts: Vec<Record>) -> Result<(), StoreError> {
        let mut ops: Vec<Value> = delete
            .iter()
            .map(|p| delete_prefix(&self.client.key(&format!("r/{p}"))))
            .collect();
        let mut bytes = 0;
        for (k, v) in puts {
            let op = put(&self.client.key(&format!("r/{k}")), &v, 0);
            let size = v.len() * 4 / 3 + k.len() + 64;
            if !ops.is_empty() && (ops.len() >= MAX_TXN_OPS || bytes + size > MAX_TXN_BYTES) {
                self.txn_blocking(vec![self.fence()?], std::mem::take(&mut ops))?;
                bytes = 0;
            }
            ops.push(op);
            bytes += size;
        }
        if !ops.is_empty() {
            self.txn_blocking(vec![self.fence()?], ops)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefix_ranges_end_past_every_key_of_the_prefix() {
        assert_eq!(range_end(b"/p/r/"), b"/p/r0");
        assert_eq!(range_end(b"a\xff"), b"b");
        assert_eq!(range_end(b"\xff"), b"\0");
    }

    #[test]
    fn gateway_integers_come_as_strings_or_not_at_all() {
        assert_eq!(int(&json!("42")), 42);
        assert_eq!(int(&json!(7)), 7);
        assert_eq!(int(&Value::Null), 0);
    }
}
