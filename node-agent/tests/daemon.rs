//! Controller and agents together over a namespaced underlay: three nodes
//! register, two tenants get networks and warm pools everywhere, endpoints
//! claimed through the agents' local API reach their own tenant across nodes
//! and never the other; a node that stops heartbeating leaves the others'
//! overlay state, and an agent started again rejoins.

mod common;

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use particle_controller::ControllerConfig;
use particle_net::scratch::ScratchNode;
use particle_net::{Endpoint, NetNs, PoolConfig, Run};
use particle_node_agent::daemon::{self, AgentConfig};
use particle_node_agent::NodeConfig;
use particle_wire::api::{CreateTenant, Node, NodeOverlay, Tenant};
use particle_wire::client::{ApiClient, Dial};
use particle_wire::local::{ClaimedEndpoint, LocalResponse};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};

const TOKEN: &str = "test-token";
const WAIT: Duration = Duration::from_secs(20);

fn dial_from(ns: &NetNs) -> Dial {
    ns.try_clone().unwrap().tcp_dialer()
}

/// One request to an agent's local API; `None` while the agent is not listening yet.
async fn local(socket: &Path, request: &str) -> Option<LocalResponse> {
    let stream = tokio::net::UnixStream::connect(socket).await.ok()?;
    let (read, mut write) = stream.into_split();
    write
        .write_all(format!("{request}\n").as_bytes())
        .await
        .unwrap();
    let mut line = String::new();
    BufReader::new(read).read_line(&mut line).await.unwrap();
    Some(serde_json::from_str(&line).unwrap())
}

async fn claim(socket: &Path, tenant: &str) -> ClaimedEndpoint {
    let deadline = Instant::now() + WAIT;
    loop {
        match local(socket, &format!(r#"{{"op":"claim","tenant":"{tenant}"}}"#)).await {
            Some(LocalResponse::Claimed { endpoint, .. }) => return endpoint,
            other => {
                assert!(Instant::now() < deadline, "claim {tenant}: {other:?}");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

async fn claim_many(socket: &Path, tenant: &str, n: usize) -> Vec<ClaimedEndpoint> {
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        out.push(claim(socket, tenant).await);
    }
    out
}

fn ping(from: &ClaimedEndpoint, to: &ClaimedEndpoint) -> bool {
    let ns = NetNs::open(&from.netns).unwrap();
    let ip = to.address.split('/').next().unwrap();
    ns.command("ping")
        .args(["-c", "1", "-W", "1", ip])
        .output()
        .unwrap()
        .status
        .success()
}

struct Agent {
    task: tokio::task::JoinHandle<std::io::Result<()>>,
    socket: PathBuf,
    metrics: SocketAddr,
}

fn start_agent(run: &Run, host: &Endpoint, i: usize, controller: SocketAddr) -> Agent {
    let socket = PathBuf::from(format!("/run/particle/test-{}-n{i}.sock", run.prefix()));
    let config = AgentConfig {
        node_name: format!("n{i}"),
        node: NodeConfig {
            prefix: run.prefix().clone(),
            underlay: ScratchNode::underlay_of(host),
            pool: PoolConfig {
                high_watermark: 4,
                low_watermark: 2,
                batch_size: 4,
            },
            workers: 1,
            free_pool: None,
        },
        socket_path: socket.clone(),
        heartbeat_every: Duration::from_millis(100),
        oci_runtime: None,
        sandbox: Default::default(),
    };
    let client = ApiClient::new(controller, TOKEN.into(), dial_from(host.netns()));
    let metrics_addr = SocketAddr::new(IpAddr::V4(host.address().ip()), 9101);
    let metrics = host
        .netns()
        .run_in(|| std::net::TcpListener::bind(metrics_addr))
        .unwrap()
        .unwrap();
    metrics.set_nonblocking(true).unwrap();
    let listeners = daemon::Listeners {
        metrics: Some(tokio::net::TcpListener::from_std(metrics).unwrap()),
    };
    Agent {
        task: tokio::spawn(daemon::run(
            config,
            host.netns().try_clone().unwrap(),
            client,
            listeners,
        )),
        socket,
        metrics: metrics_addr,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn controller_and_agents_build_an_isolated_multi_node_overlay() {
    let (run, mut fabric) = common::fabric("10.253.0.0/24");
    let hosts = fabric.hosts(3).unwrap();

    // The controller listens on the fabric bridge's address, inside the fabric.
    let addr = SocketAddr::new(IpAddr::V4(fabric.block.gateway()), 7700);
    let listener = fabric
        .netns
        .run_in(|| std::net::TcpListener::bind(addr))
        .unwrap()
        .unwrap();
    listener.set_nonblocking(true).unwrap();
    let config = ControllerConfig {
        listen: addr,
        token: TOKEN.into(),
        store: None,
        cluster_id: "particle".into(),
        advertise: None,
        heartbeat_timeout: Duration::from_millis(800),
        long_poll_max: Duration::from_secs(5),
        quotas: Default::default(),
    };
    let controller = tokio::spawn(particle_controller::serve(
        config,
        tokio::net::TcpListener::from_std(listener).unwrap(),
    ));
    let user = ApiClient::new(addr, TOKEN.into(), dial_from(&fabric.netns));

    for (name, vni, subnet) in [("a", 500, "10.50.0.0/16"), ("b", 600, "10.60.0.0/16")] {
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
    let mut agents: Vec<Agent> = hosts
        .iter()
        .enumerate()
        .map(|(i, h)| start_agent(&run, h, i, addr))
        .collect();

    let a0 = claim(&agents[0].socket, "a").await;
    let a2 = claim(&agents[2].socket, "a").await;
    let b1 = claim(&agents[1].socket, "b").await;
    let b2 = claim(&agents[2].socket, "b").await;
    assert!(ping(&a0, &a2), "tenant a across nodes");
    assert!(ping(&b1, &b2), "tenant b across nodes");
    assert!(!ping(&a0, &b1), "tenant a reached tenant b");
    assert!(!ping(&b2, &a2), "tenant b reached tenant a on its own node");

    // A TCP exchange across nodes, between endpoints claimed from two agents.
    {
        let server_ns = NetNs::open(&a2.netns).unwrap();
        let ip: std::net::Ipv4Addr = a2.address.split('/').next().unwrap().parse().unwrap();
        let listener = server_ns
            .run_in(|| std::net::TcpListener::bind((ip, 7200)))
            .unwrap()
            .unwrap();
        let server = std::thread::spawn(move || {
            use std::io::{Read, Write};
            let (mut s, _) = listener.accept().unwrap();
            let mut buf = [0u8; 32];
            s.read_exact(&mut buf).unwrap();
            s.write_all(&buf).unwrap();
        });
        let client_ns = NetNs::open(&a0.netns).unwrap();
        let mut c = client_ns
            .run_in(|| std::net::TcpStream::connect((ip, 7200)))
            .unwrap()
            .unwrap();
        use std::io::{Read, Write};
        c.write_all(&[9u8; 32]).unwrap();
        let mut back = [0u8; 32];
        c.read_exact(&mut back).unwrap();
        assert_eq!(back, [9u8; 32]);
        server.join().unwrap();
    }

    // Overlay state grows with nodes, not endpoints: 12 more endpoints on n1
    // leave every node with one route, neighbour and FDB entry per other node.
    let more: Vec<_> = claim_many(&agents[1].socket, "a", 12).await;
    for (i, agent) in agents.iter().enumerate() {
        let scrape = ApiClient::new(agent.metrics, TOKEN.into(), dial_from(hosts[i].netns()));
        let deadline = Instant::now() + WAIT;
        loop {
            let text = scrape
                .send::<()>(hyper::Method::GET, "/metrics", None)
                .await
                .unwrap();
            let text = String::from_utf8_lossy(&text).into_owned();
            let two = ["routes", "neighbours", "fdb"].iter().all(|k| {
                ["a", "b"].iter().all(|t| {
                    text.contains(&format!("particle_agent_overlay_{k}{{tenant=\"{t}\"}} 2"))
                })
            });
            if two {
                break;
            }
            assert!(Instant::now() < deadline, "node {i}: {text}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    assert_eq!(more.len(), 12);

    // Each agent reports its pools to Prometheus and in its heartbeats.
    let scrape = ApiClient::new(agents[1].metrics, TOKEN.into(), dial_from(hosts[1].netns()));
    let text = scrape
        .send::<()>(hyper::Method::GET, "/metrics", None)
        .await
        .unwrap();
    let text = String::from_utf8_lossy(&text);
    assert!(
        text.contains(r#"particle_agent_pool_claims{tenant="b"} 1"#),
        "{text}"
    );
    assert!(
        text.contains(r#"particle_agent_pool_ready{tenant="a"}"#),
        "{text}"
    );
    let deadline = Instant::now() + WAIT;
    loop {
        let nodes: Vec<Node> = user
            .call::<(), _>(hyper::Method::GET, "/v1/nodes", None)
            .await
            .unwrap();
        let n1 = nodes.iter().find(|n| n.name == "n1").unwrap();
        if n1.pools.get("b").is_some_and(|p| p.claims_total == 1) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no heartbeat with n1's pools: {nodes:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // Node 2's agent stops: within the heartbeat timeout the others drop it.
    agents[2].task.abort();
    let deadline = Instant::now() + WAIT;
    loop {
        let o: NodeOverlay = user
            .call::<(), _>(hyper::Method::GET, "/v1/agents/n0/overlay?since=0", None)
            .await
            .unwrap();
        if o.tenants
            .iter()
            .all(|t| t.remotes.iter().all(|r| r.node != "n2"))
        {
            break;
        }
        assert!(Instant::now() < deadline, "n2 still in n0's overlay: {o:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let nodes: Vec<Node> = user
        .call::<(), _>(hyper::Method::GET, "/v1/nodes", None)
        .await
        .unwrap();
    assert_eq!(nodes.len(), 2, "{nodes:?}");

    // Started again, it rejoins and its tenant reaches across once more.
    agents[2] = start_agent(&run, &hosts[2], 2, addr);
    let a2 = claim(&agents[2].socket, "a").await;
    let deadline = Instant::now() + WAIT;
    while !ping(&a0, &a2) {
        assert!(Instant::now() < deadline, "restarted node 2 unreachable");
    }

    for agent in agents {
        agent.task.abort();
        let _ = agent.task.await;
        assert!(!agent.socket.exists(), "a stopped agent removes its socket");
    }
    controller.abort();
}
