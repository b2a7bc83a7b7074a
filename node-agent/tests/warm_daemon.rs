//! Warm connections served by the agent daemon itself: a function's tenant is
//! the tenant of the endpoint it was claimed into through the local API, and
//! nothing else; a released endpoint's namespace loses it.

mod common;

use std::io::{BufRead, BufReader, Write};
use std::net::{IpAddr, SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use particle_controller::ControllerConfig;
use particle_net::scratch::ScratchNode;
use particle_net::{NetNs, PoolConfig};
use particle_node_agent::daemon::{self, AgentConfig};
use particle_node_agent::warm_connections::{WarmConfig, WarmDestination};
use particle_node_agent::NodeConfig;
use particle_wire::api::{CreateTenant, Tenant};
use particle_wire::client::{ApiClient, Dial};
use particle_wire::local::LocalResponse;
use serde_json::Value;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt};

const TOKEN: &str = "test-token";
const WAIT: Duration = Duration::from_secs(20);

fn dial_from(ns: &NetNs) -> Dial {
    let ns = Arc::new(ns.try_clone().unwrap());
    Arc::new(move |addr| {
        ns.run_in(|| std::net::TcpStream::connect(addr))
            .map_err(std::io::Error::other)?
    })
}

async fn local(socket: &Path, request: &str) -> Option<LocalResponse> {
    let stream = tokio::net::UnixStream::connect(socket).await.ok()?;
    let (read, mut write) = stream.into_split();
    write
        .write_all(format!("{request}\n").as_bytes())
        .await
        .ok()?;
    let mut line = String::new();
    tokio::io::BufReader::new(read)
        .read_line(&mut line)
        .await
        .ok()?;
    serde_json::from_str(&line).ok()
}

async fn claim(socket: &Path, tenant: &str) -> (u64, String) {
    let deadline = Instant::now() + WAIT;
    loop {
        match local(socket, &format!(r#"{{"op":"claim","tenant":"{tenant}"}}"#)).await {
            Some(LocalResponse::Claimed { endpoint, .. }) => return (endpoint.id, endpoint.netns),
            other => {
                assert!(Instant::now() < deadline, "claim {tenant}: {other:?}");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

fn function(ns_path: &str, socket: &Path, args: &[&str]) -> Value {
    let ns = NetNs::open(ns_path).unwrap();
    let out = ns
        .command(env!("CARGO_BIN_EXE_particle-warm-fn"))
        .arg(socket)
        .args(args)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    serde_json::from_str(text.trim()).unwrap_or_else(|e| panic!("{e}: {text:?} {out:?}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_daemon_hands_warm_connections_to_its_claimed_endpoints_by_tenant() {
    let (run, mut fabric) = common::fabric("10.220.4.0/24");
    let hosts = fabric.hosts(2).unwrap();

    // A service on the second host that echoes lines.
    let dest = SocketAddr::new(IpAddr::V4(hosts[1].address().ip()), 18140);
    let listener = hosts[1]
        .netns()
        .run_in(|| TcpListener::bind(dest))
        .unwrap()
        .unwrap();
    std::thread::spawn(move || {
        for s in listener.incoming() {
            let Ok(s) = s else { return };
            std::thread::spawn(move || {
                let mut w = s.try_clone().unwrap();
                for line in BufReader::new(s).lines() {
                    let Ok(line) = line else { return };
                    if w.write_all(format!("{line}\n").as_bytes()).is_err() {
                        return;
                    }
                }
            });
        }
    });

    let addr = SocketAddr::new(IpAddr::V4(fabric.block.gateway()), 7700);
    let listener = fabric
        .netns
        .run_in(|| std::net::TcpListener::bind(addr))
        .unwrap()
        .unwrap();
    listener.set_nonblocking(true).unwrap();
    let controller = tokio::spawn(particle_controller::serve(
        ControllerConfig {
            listen: addr,
            token: TOKEN.into(),
            store: None,
            cluster_id: "particle".into(),
            advertise: None,
            heartbeat_timeout: Duration::from_secs(5),
            long_poll_max: Duration::from_secs(5),
            quotas: Default::default(),
        },
        tokio::net::TcpListener::from_std(listener).unwrap(),
    ));
    let user = ApiClient::new(addr, TOKEN.into(), dial_from(&fabric.netns));
    for (name, vni, subnet) in [("a", 700, "10.70.0.0/16"), ("b", 800, "10.80.0.0/16")] {
        let body = CreateTenant {
            name: name.into(),
            vni,
            subnet: subnet.into(),
            block_prefix: None,
            warm_per_node: None,
        };
        let _: Tenant = user
            .call(hyper::Method::POST, "/v1/tenants", Some(&body))
            .await
            .unwrap();
    }

    let socket = PathBuf::from(format!("/run/particle/test-{}-wd.sock", run.prefix()));
    let warm_socket = PathBuf::from(format!("/run/particle/test-{}-wd-warm.sock", run.prefix()));
    let host = &hosts[0];
    let config = AgentConfig {
        node_name: "n0".into(),
        node: NodeConfig {
            prefix: run.prefix().clone(),
            underlay: ScratchNode::underlay_of(host),
            pool: PoolConfig {
                high_watermark: 2,
                low_watermark: 1,
                batch_size: 2,
            },
            workers: 1,
            free_pool: None,
        },
        socket_path: socket.clone(),
        heartbeat_every: Duration::from_millis(200),
        oci_runtime: None,
        sandbox: Default::default(),
    };
    let mut warm = WarmConfig::new(warm_socket.clone());
    warm.destinations = vec![WarmDestination {
        addr: dest,
        tenants: vec!["a".into()],
    }];
    warm.pool_size = 1;
    let agent = tokio::spawn(daemon::run_with_warm(
        config,
        host.netns().try_clone().unwrap(),
        ApiClient::new(addr, TOKEN.into(), dial_from(host.netns())),
        daemon::Listeners { metrics: None },
        Some(warm),
    ));

    let (a_id, a_ns) = claim(&socket, "a").await;
    let (_, b_ns) = claim(&socket, "b").await;
    let dest_s = dest.to_string();
    let deadline = Instant::now() + WAIT;
    let first = loop {
        // The pool may still be connecting.
        let v = function(&a_ns, &warm_socket, &["get", &dest_s, "one"]);
        if v.get("local_port").is_some() || Instant::now() > deadline {
            break v;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(first["reply"], "one", "{first}");
    let second = function(&a_ns, &warm_socket, &["get", &dest_s, "two"]);
    assert_eq!(second["local_port"], first["local_port"], "{second}");
    let refused = function(&b_ns, &warm_socket, &["get", &dest_s, "x"]);
    assert!(
        refused["error"]
            .as_str()
            .unwrap()
            .contains("tenant \"b\" may not use"),
        "{refused}"
    );

    // Released: the namespace (still open here) is no endpoint of any tenant now.
    let ns_kept = NetNs::open(&a_ns).unwrap();
    let kept_path = format!(
        "/proc/{}/fd/{}",
        std::process::id(),
        std::os::fd::AsRawFd::as_raw_fd(&ns_kept)
    );
    assert!(matches!(
        local(&socket, &format!(r#"{{"op":"release","id":{a_id}}}"#)).await,
        Some(LocalResponse::Done { ok: true })
    ));
    let after = function(&kept_path, &warm_socket, &["get", &dest_s, "x"]);
    assert!(
        after["error"]
            .as_str()
            .unwrap()
            .contains("not in an endpoint"),
        "{after}"
    );

    agent.abort();
    let _ = agent.await;
    controller.abort();
    // The agent's warm service went with it.
    let deadline = Instant::now() + WAIT;
    while warm_socket.exists() && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(!warm_socket.exists());
}
