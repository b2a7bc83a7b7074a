//! A node applying the controller's overlay state, on two namespaced nodes.

mod common;

use std::time::Duration;

use particle_net::scratch::ScratchNode;
use particle_net::{Endpoint, NetlinkSocket, PoolConfig};
use particle_node_agent::{NodeConfig, NodeState};
use particle_wire::api::{NodeOverlay, RemoteNode, TenantOverlay};

const WAIT: Duration = Duration::from_secs(20);

fn tenant(name: &str, vni: u32, second: u8, me: usize, hosts: &[Endpoint]) -> TenantOverlay {
    let block = |i: usize| format!("10.{second}.{i}.0/24");
    TenantOverlay {
        name: name.into(),
        vni,
        subnet: format!("10.{second}.0.0/16"),
        local_block: block(me),
        warm_per_node: None,
        remotes: hosts
            .iter()
            .enumerate()
            .filter(|(i, _)| *i != me)
            .map(|(i, h)| RemoteNode {
                node: format!("n{i}"),
                underlay_ip: h.address().ip(),
                block: block(i),
            })
            .collect(),
    }
}

fn links_in(host: &Endpoint) -> usize {
    let mut socket = NetlinkSocket::open_in(host.netns()).unwrap();
    particle_net::endpoint::list_links(&mut socket)
        .unwrap()
        .len()
}

#[test]
fn nodes_apply_overlay_state_and_serve_warm_endpoints() {
    let (run, mut fabric) = common::fabric("10.254.0.0/24");
    let hosts = fabric.hosts(2).unwrap();
    let baseline_links = links_in(&hosts[0]);

    let pool = PoolConfig {
        high_watermark: 4,
        low_watermark: 2,
        batch_size: 4,
    };
    let mut nodes: Vec<NodeState> = hosts
        .iter()
        .map(|h| {
            let config = NodeConfig {
                prefix: run.prefix().clone(),
                underlay: ScratchNode::underlay_of(h),
                pool,
                workers: 1,
                free_pool: Some(PoolConfig {
                    high_watermark: 3,
                    low_watermark: 1,
                    batch_size: 3,
                }),
            };
            NodeState::new(config, h.netns()).unwrap()
        })
        .collect();
    let state = |me: usize, version: u64, with_b: bool| NodeOverlay {
        version,
        node: format!("n{me}"),
        tenants: [
            Some(tenant("a", 300, 3, me, &hosts)),
            with_b.then(|| tenant("b", 400, 4, me, &hosts)),
        ]
        .into_iter()
        .flatten()
        .collect(),
    };
    for (me, node) in nodes.iter_mut().enumerate() {
        assert!(node.apply(&state(me, 1, true)).is_empty());
        assert_eq!(node.version(), 1);
        for t in ["a", "b"] {
            node.pool(t).unwrap().wait_ready(4, WAIT).unwrap();
        }
    }

    // Warm endpoints of the same tenant on two nodes reach each other.
    let a0 = nodes[0].claim("a").unwrap();
    let a1 = nodes[1].claim("a").unwrap();
    let b1 = nodes[1].claim("b").unwrap();
    let ping_once = |from: &Endpoint, to: std::net::Ipv4Addr| {
        from.netns()
            .command("ping")
            .args(["-c", "1", "-W", "1", &to.to_string()])
            .output()
            .unwrap()
            .status
            .success()
    };
    // Reachability gets a few tries: right after a burst the kernel is busy
    // tearing namespaces down and a single echo can miss its second.
    let ping = |from: &Endpoint, to: std::net::Ipv4Addr| (0..3).any(|_| ping_once(from, to));
    assert!(ping(&a0, a1.address().ip()));
    assert!(
        !ping_once(&a0, b1.address().ip()),
        "tenant a reached tenant b"
    );
    assert!(nodes[0].claim("nobody").is_err());
    assert_eq!(nodes[1].pool_levels()["a"].claims_total, 1);

    // Tenant a's warm pool on node 0 runs dry (and its refill is slower than
    // the claims): the tenant-free pool binds endpoints to tenant a instead.
    let free = nodes[0].free_pool().unwrap();
    free.wait_ready(3, WAIT).unwrap();
    let mut burst = Vec::new();
    while free.bound() < 2 {
        burst.push(nodes[0].claim("a").unwrap());
        assert!(burst.len() < 200, "never fell back to the tenant-free pool");
    }
    let last = burst.last().unwrap();
    assert!(last.is_clean().unwrap());
    assert!(
        ping(last, a1.address().ip()),
        "a bound endpoint reaches across nodes"
    );
    assert!(!ping_once(last, b1.address().ip()));
    drop((burst, free));

    // A tenant that asks for no warm endpoints costs nothing until used:
    // none are built, and a claim binds a tenant-free one.
    let mut with_c = state(0, 2, true);
    let mut c = tenant("c", 500, 5, 0, &hosts);
    c.warm_per_node = Some(0);
    with_c.tenants.push(c);
    assert!(nodes[0].apply(&with_c).is_empty());
    std::thread::sleep(Duration::from_millis(300));
    let stats = nodes[0].pool("c").unwrap().stats();
    assert_eq!((stats.ready, stats.created), (0, 0), "{stats:?}");
    let free = nodes[0].free_pool().unwrap();
    free.wait_ready(1, WAIT).unwrap();
    let c0 = nodes[0].claim("c").unwrap();
    assert_eq!(nodes[0].pool("c").unwrap().stats().created, 0);
    drop((c0, free));

    // Tenant b goes: its network and pool go with it, on both nodes.
    drop(b1);
    for (me, node) in nodes.iter_mut().enumerate() {
        assert!(node.apply(&state(me, 3, false)).is_empty());
        assert_eq!(node.tenants().collect::<Vec<_>>(), ["a"]);
    }
    assert!(ping(&a0, a1.address().ip()), "tenant a is untouched");

    // A broken entry fails that tenant only, with a clear error.
    let mut broken = state(0, 4, true);
    broken.tenants[1].local_block = "10.4.0.7/24".into();
    let errors = nodes[0].apply(&broken);
    assert_eq!(errors.len(), 1);
    assert!(errors[0].to_string().contains("tenant b"), "{}", errors[0]);
    assert!(ping(&a0, a1.address().ip()));

    // Everything the agent built dies with it: the node holds what it had.
    drop((a0, a1, nodes));
    let start = std::time::Instant::now();
    while links_in(&hosts[0]) != baseline_links {
        assert!(start.elapsed() < WAIT, "node links not back to baseline");
        std::thread::sleep(Duration::from_millis(20));
    }
}
