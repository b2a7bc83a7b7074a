//! The relay on 127.0.0.1 to the controller on the underlay: the machine's
//! own namespace is never wired to the underlay, so users reach the
//! controller through it. With several controllers it relays to the one
//! that leads (asked every [`LEADER_POLL`]), so users outside the
//! cluster's namespaces need one address.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use particle_net::NetNs;

/// Connections relayed at once; more are closed at accept (the controller's
/// own caps and header timeout shed what a flood keeps open).
const MAX_RELAYED: usize = 1024;
/// How often the relay asks who leads.
const LEADER_POLL: Duration = Duration::from_millis(200);

/// Keeps `leader` at the index of the controller that says it leads.
async fn follow_leader(
    fabric: Arc<NetNs>,
    targets: Vec<SocketAddr>,
    token: String,
    leader: Arc<AtomicUsize>,
) {
    let Ok(ns) = fabric.try_clone() else {
        return;
    };
    let dial = ns.tcp_dialer();
    loop {
        for (i, target) in targets.iter().enumerate() {
            let api = particle_wire::client::ApiClient::new(*target, token.clone(), dial.clone());
            let asked = tokio::time::timeout(
                LEADER_POLL,
                api.call::<(), serde_json::Value>(
                    particle_wire::client::Method::GET,
                    "/leader",
                    None,
                ),
            )
            .await;
            if let Ok(Ok(answer)) = asked {
                if answer["is_leader"] == true {
                    leader.store(i, Ordering::Relaxed);
                    break;
                }
            }
        }
        tokio::time::sleep(LEADER_POLL).await;
    }
}

/// Relays until dropped. An accept that fails (out of descriptors under a
/// flood) is retried: the relay never stops listening.
pub(crate) async fn relay_loop(
    listener: tokio::net::TcpListener,
    fabric: Arc<NetNs>,
    targets: Vec<SocketAddr>,
    token: String,
) {
    let leader = Arc::new(AtomicUsize::new(0));
    let _follow = (targets.len() > 1).then(|| {
        let task = tokio::spawn(follow_leader(
            fabric.clone(),
            targets.clone(),
            token,
            leader.clone(),
        ));
        AbortOnDrop(task)
    });
    let caps = particle_wire::caps::ConnectionCaps::new(MAX_RELAYED, MAX_RELAYED);
    loop {
        let mut inbound = match listener.accept().await {
            Ok((inbound, _)) => inbound,
            Err(e) => {
                tracing::warn!("relay accept: {e}");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                continue;
            }
        };
        let Some(permit) = caps.enter(()) else {
            continue; // over the cap: closed at once
        };
        let fabric = fabric.clone();
        // The leader first, then the others (a dead leader refuses at once).
        let first = leader.load(Ordering::Relaxed) % targets.len();
        let order: Vec<SocketAddr> = (first..first + targets.len())
            .map(|i| targets[i % targets.len()])
            .collect();
        tokio::spawn(async move {
            let _permit = permit;
            let dialed = tokio::task::spawn_blocking(move || {
                fabric.run_in(|| {
                    order
                        .iter()
                        .find_map(|t| std::net::TcpStream::connect(t).ok())
                        .ok_or_else(|| std::io::Error::other("no controller answers"))
                })
            })
            .await;
            let Ok(Ok(Ok(outbound))) = dialed else {
                return;
            };
            if outbound.set_nonblocking(true).is_err() {
                return;
            }
            if let Ok(mut outbound) = tokio::net::TcpStream::from_std(outbound) {
                let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
            }
        });
    }
}

struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}
