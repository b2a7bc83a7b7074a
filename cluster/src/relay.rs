//! The relay on 127.0.0.1 to the controller on the underlay: the machine's
//! own namespace is never wired to the underlay, so users reach the
//! controller through it.

use std::net::SocketAddr;
use std::sync::Arc;

use particle_net::NetNs;

pub(crate) async fn relay_loop(
    listener: tokio::net::TcpListener,
    fabric: Arc<NetNs>,
    target: SocketAddr,
) {
    while let Ok((mut inbound, _)) = listener.accept().await {
        let fabric = fabric.clone();
        tokio::spawn(async move {
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
