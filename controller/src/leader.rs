//! With etcd, which of several controllers serves: an election on one key.
//!
//! `PREFIX/leader` holds the leader's advertised address on a lease of
//! [`LEASE_TTL_S`] seconds that the leader renews every [`RENEW_EVERY`].
//! The others read the key every [`POLL_EVERY`]; when it is gone (the
//! leader died, or stopped renewing), each campaigns: a new lease, then a
//! transaction "create the key if it does not exist" (compare its create
//! revision with 0). The winner's create revision fences every write it
//! makes ([`crate::store::etcd`]), so a leader that lost its key cannot
//! change anything even before it notices; it then loads state and jobs from
//! etcd and serves. Takeover after a leader dies: at most the TTL plus a poll
//! (about 3.5 s), plus the load.
//!
//! A fenced write refused while leading (another controller wrote: only a
//! split brain does that) makes the leader give its key up: the next
//! winner reloads what etcd holds.
//!
//! etcd unreachable: the leader keeps serving what needs no write (long
//! polls, heartbeats, reads) and refuses writes (503); once it has not
//! renewed for a whole TTL it follows nobody (every request 503) until etcd
//! answers again: if its key and lease survived, it leads again at once.

use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::json;

use crate::store::etcd::{compare_create, put, EtcdClient, Kv};
use crate::store::StoreError;
use crate::Controller;

/// The leader's lease, seconds: how long a dead leader keeps its key.
pub const LEASE_TTL_S: i64 = 3;
/// How often the leader renews its lease.
pub const RENEW_EVERY: Duration = Duration::from_millis(500);
/// How often a follower looks at the key.
pub const POLL_EVERY: Duration = Duration::from_millis(250);

/// The lease this controller holds and the key's create revision it won.
#[derive(Clone, Copy)]
struct Held {
    lease: i64,
    rev: i64,
}

/// The election, on a thread and runtime of its own (a controller's
/// handlers block on store writes; a busy or stalled runtime must not delay
/// the renewals), until the returned guard is dropped.
pub fn spawn(c: Controller, etcd: Arc<EtcdClient>) -> std::io::Result<Election> {
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    std::thread::Builder::new()
        .name("election".into())
        .spawn(move || {
            runtime.block_on(async move {
                tokio::select! {
                    () = run(c, etcd) => {}
                    _ = stopped => {}
                }
            });
        })?;
    Ok(Election { _stop: stop })
}

/// Stops the election when dropped.
pub struct Election {
    _stop: tokio::sync::oneshot::Sender<()>,
}

/// Runs the election until dropped.
pub async fn run(c: Controller, etcd: Arc<EtcdClient>) {
    let me = c.advertise().to_string();
    let key = etcd.key("leader");
    let mut held: Option<Held> = None;
    loop {
        match etcd.range(&key, false).await {
            Err(e) => {
                tracing::warn!("election: {e}");
                c.follow(None);
            }
            Ok(found) => match found.into_iter().next() {
                None => held = campaign(&c, &etcd, &me).await,
                // Ours still (etcd was away and came back): lead again.
                Some(kv)
                    if held.is_some_and(|h| h.lease == kv.lease && h.rev == kv.create_revision) =>
                {
                    if let Some(h) = held {
                        held = lead(&c, &etcd, h).await;
                    }
                }
                Some(kv) => {
                    held = None;
                    c.follow(Some(String::from_utf8_lossy(&kv.value).into_owned()));
                }
            },
        }
        tokio::time::sleep(POLL_EVERY).await;
    }
}

/// Tries to take the key; leads if it did. What it still holds after.
async fn campaign(c: &Controller, etcd: &EtcdClient, me: &str) -> Option<Held> {
    let lease = match etcd.lease_grant(LEASE_TTL_S).await {
        Ok(l) => l,
        Err(e) => {
            tracing::warn!("campaign: {e}");
            return None;
        }
    };
    let key = etcd.key("leader");
    let range = json!({ "request_range": { "key": b64(&key) } });
    let won = etcd
        .txn(
            vec![compare_create(&key, 0)],
            vec![put(&key, me.as_bytes(), lease), range.clone()],
            vec![range],
        )
        .await;
    let first_kv = |answer: &serde_json::Value, i: usize| -> Option<Kv> {
        let kvs = answer["responses"][i]["response_range"].clone();
        crate::store::etcd::kvs_of(&kvs).ok()?.into_iter().next()
    };
    match won {
        Ok((true, answer)) => match first_kv(&answer, 1) {
            Some(kv) => {
                lead(
                    c,
                    etcd,
                    Held {
                        lease,
                        rev: kv.create_revision,
                    },
                )
                .await
            }
            None => None,
        },
        Ok((false, answer)) => {
            let _ = etcd.lease_revoke(lease).await;
            let leader =
                first_kv(&answer, 0).map(|kv| String::from_utf8_lossy(&kv.value).into_owned());
            c.follow(leader);
            None
        }
        Err(e) => {
            tracing::warn!("campaign: {e}");
            None
        }
    }
}

fn b64(key: &[u8]) -> String {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.encode(key)
}

/// Leads while the lease lives. `Some` if it stopped only because etcd did
/// not answer for a TTL (the lease may have survived), `None` if it is lost.
async fn lead(c: &Controller, etcd: &EtcdClient, held: Held) -> Option<Held> {
    if let Err(e) = c.become_leader(held.rev) {
        tracing::error!("taking over: {e}");
        c.follow(None);
        let _ = etcd.lease_revoke(held.lease).await;
        return None;
    }
    let mut renewed = Instant::now();
    loop {
        tokio::time::sleep(RENEW_EVERY).await;
        match etcd.lease_keepalive(held.lease).await {
            Ok(ttl) if ttl > 0 => renewed = Instant::now(),
            Ok(_) => {
                tracing::warn!("the leader's lease expired");
                c.follow(None);
                return None;
            }
            Err(e) => {
                tracing::warn!("renewing the leader's lease: {e}");
                if renewed.elapsed() > Duration::from_secs(LEASE_TTL_S as u64) {
                    c.follow(None);
                    return Some(held);
                }
            }
        }
        let refused = c.etcd().is_some_and(|store| store.take_refused());
        if refused || matches!(check_key(etcd, held).await, Err(StoreError::NotLeader)) {
            // Someone else wrote or leads: give the key up; whoever wins next
            // (perhaps this one) starts from what etcd holds.
            tracing::warn!("a write was fenced off or the key is gone: stepping down");
            c.follow(None);
            let _ = etcd.lease_revoke(held.lease).await;
            return None;
        }
    }
}

/// Whether the key is still the one this controller won (unanswered: assume so).
async fn check_key(etcd: &EtcdClient, held: Held) -> Result<(), StoreError> {
    match etcd.range(&etcd.key("leader"), false).await {
        Ok(found) => match found.first() {
            Some(kv) if kv.create_revision == held.rev => Ok(()),
            _ => Err(StoreError::NotLeader),
        },
        Err(_) => Ok(()),
    }
}
