//! The relay on 127.0.0.1 to the controller on the underlay: the machine's
//! own namespace is never wired to the underlay, so users reach the
//! controller through it.

use std::net::SocketAddr;
use std::sync::Arc;

use particle_net::NetNs;

/// Connections relayed at once; more are closed at accept (the controller's
/// own caps and header timeout shed what a flood keeps open).
const MAX_RELAYED: usize = 1024;

/// Relays until dropped. An accept that fails (out of descriptors under a
/// flood) is retried: the relay never stops listening.
pub(crate) async fn relay_loop(
    listener: tokio::net::TcpListener,
    fabric: Arc<NetNs>,
    target: SocketAddr,
) {
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
        tokio::spawn(async move {
            let _permit = permit;
            let dialed = tokio::task::spawn_blocking(move || {
                fabric.run_in(|| std::net::TcpStream::connect(target))
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
