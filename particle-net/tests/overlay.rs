//! The per-tenant VXLAN overlay across three namespaced nodes: same-tenant
//! endpoints on different nodes reach each other, different tenants cannot,
//! and a node's overlay state grows with nodes, not endpoints.

mod common;

use std::io::{Read, Write};
use std::net::{Ipv4Addr, TcpListener, TcpStream};
use std::time::Duration;

use ipnetwork::Ipv4Network;
use particle_net::overlay::{OverlayCounts, RemoteBlock, TenantNetwork};
use particle_net::scratch::ScratchNode;
use particle_net::{Endpoint, EndpointSpec, NetlinkSocket, RunPrefix};

struct Tenant {
    vni: u32,
    subnet: u8, // 10.<subnet>.<node>.0/24
}

const TENANTS: [Tenant; 2] = [
    Tenant {
        vni: 100,
        subnet: 1,
    },
    Tenant {
        vni: 200,
        subnet: 2,
    },
];

fn block(tenant: &Tenant, node: usize) -> Ipv4Network {
    Ipv4Network::new(Ipv4Addr::new(10, tenant.subnet, node as u8, 0), 24).unwrap()
}

fn endpoints(net: &TenantNetwork, prefix: &RunPrefix, first_host: u8, n: usize) -> Vec<Endpoint> {
    let b = net.block();
    let specs: Vec<_> = (0..n)
        .map(|i| EndpointSpec {
            address: Ipv4Network::new(
                Ipv4Addr::from(u32::from(b.network()) + u32::from(first_host) + i as u32),
                b.prefix(),
            )
            .unwrap(),
            gateway: Ipv4Addr::from(u32::from(b.network()) + 1),
        })
        .collect();
    net.factory(prefix, 1)
        .unwrap()
        .create_batch(&specs)
        .into_iter()
        .map(|r| r.unwrap())
        .collect()
}

fn pings(from: &Endpoint, to: Ipv4Addr) -> bool {
    from.netns()
        .command("ping")
        .args(["-c", "1", "-W", "1", &to.to_string()])
        .output()
        .expect("ping is installed (scripts/install-deps)")
        .status
        .success()
}

#[test]
fn tenants_reach_across_nodes_and_never_each_other() {
    let mut t = common::scratch("10.255.0.0/24");
    let prefix = t.run.prefix().clone();

    // Three nodes: namespaces on the fabric bridge, each with eth0 as its underlay.
    let nodes = t.node.hosts(3).unwrap();
    let underlays: Vec<_> = nodes.iter().map(ScratchNode::underlay_of).collect();

    // Every tenant on every node, then each told about the others' blocks.
    let mut nets: Vec<Vec<TenantNetwork>> = nodes
        .iter()
        .zip(&underlays)
        .enumerate()
        .map(|(i, (node, underlay))| {
            let mut socket = NetlinkSocket::open_in(node.netns()).unwrap();
            TENANTS
                .iter()
                .map(|tenant| {
                    TenantNetwork::create(
                        &mut socket,
                        &prefix,
                        *underlay,
                        tenant.vni,
                        block(tenant, i),
                    )
                    .unwrap()
                })
                .collect()
        })
        .collect();
    let remotes_of = |node: usize, tenant: &Tenant, nodes: &[usize]| -> Vec<RemoteBlock> {
        nodes
            .iter()
            .filter(|&&j| j != node)
            .map(|&j| RemoteBlock {
                underlay: underlays[j].address,
                block: block(tenant, j),
            })
            .collect()
    };
    for (i, node_nets) in nets.iter_mut().enumerate() {
        for (net, tenant) in node_nets.iter_mut().zip(&TENANTS) {
            net.apply_remotes(&remotes_of(i, tenant, &[0, 1, 2]))
                .unwrap();
            // Applying the same state twice changes nothing and fails nothing.
            net.apply_remotes(&remotes_of(i, tenant, &[0, 1, 2]))
                .unwrap();
        }
    }

    // Two endpoints per tenant per node.
    let eps: Vec<Vec<Vec<Endpoint>>> = nets
        .iter()
        .map(|node_nets| {
            node_nets
                .iter()
                .map(|n| endpoints(n, &prefix, 10, 2))
                .collect()
        })
        .collect();
    let addr = |node: usize, tenant: usize| eps[node][tenant][0].address().ip();

    // Same tenant, other nodes: ICMP both ways, and a TCP exchange.
    for (tenant, (on0, on2)) in eps[0].iter().zip(&eps[2]).enumerate() {
        assert!(pings(&on0[0], addr(1, tenant)), "tenant {tenant} 0->1");
        assert!(pings(&on2[1], addr(0, tenant)), "tenant {tenant} 2->0");
    }
    let server_ep = &eps[2][0][0];
    let target = (server_ep.address().ip(), 7100);
    let listener = server_ep
        .netns()
        .run_in(|| TcpListener::bind(target))
        .unwrap()
        .unwrap();
    let server = std::thread::spawn(move || {
        let (mut s, peer) = listener.accept().unwrap();
        let mut buf = vec![0u8; 64 * 1024];
        s.read_exact(&mut buf).unwrap();
        s.write_all(&buf[..16]).unwrap();
        peer.ip()
    });
    let mut client = eps[0][0][1]
        .netns()
        .run_in(|| TcpStream::connect(target))
        .unwrap()
        .unwrap();
    client
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    client.write_all(&vec![7u8; 64 * 1024]).unwrap();
    let mut reply = [0u8; 16];
    client.read_exact(&mut reply).unwrap();
    assert_eq!(reply, [7u8; 16]);
    assert_eq!(
        server.join().unwrap(),
        std::net::IpAddr::V4(eps[0][0][1].address().ip())
    );
    drop(client);

    // Other tenant: unreachable on another node and on the same node, also
    // the other tenant's gateway.
    assert!(
        !pings(&eps[0][0][0], addr(1, 1)),
        "tenant A reached tenant B across nodes"
    );
    assert!(
        !pings(&eps[0][0][0], addr(0, 1)),
        "tenant A reached tenant B on its node"
    );
    assert!(
        !pings(&eps[0][1][0], addr(2, 0)),
        "tenant B reached tenant A"
    );
    let b_gateway = Ipv4Addr::from(u32::from(block(&TENANTS[1], 0).network()) + 1);
    assert!(
        !pings(&eps[0][0][0], b_gateway),
        "tenant A reached tenant B's gateway"
    );

    // Overlay state: one route, neighbour and FDB entry per remote node...
    let two = OverlayCounts {
        routes: 2,
        neighbours: 2,
        fdb: 2,
    };
    for node_nets in nets.iter_mut() {
        for net in node_nets.iter_mut() {
            assert_eq!(net.state_counts().unwrap(), two);
        }
    }
    // ...and 20 more endpoints on node 1 change nothing anywhere.
    let more = endpoints(&nets[1][0], &prefix, 100, 20);
    assert!(pings(&more[19], addr(0, 0)));
    for node_nets in nets.iter_mut() {
        for net in node_nets.iter_mut() {
            assert_eq!(net.state_counts().unwrap(), two);
        }
    }

    // Node 2 leaves: the others drop its entries and cannot reach it.
    for (i, node_nets) in nets.iter_mut().enumerate().take(2) {
        for (net, tenant) in node_nets.iter_mut().zip(&TENANTS) {
            net.apply_remotes(&remotes_of(i, tenant, &[0, 1])).unwrap();
            assert_eq!(
                net.state_counts().unwrap(),
                OverlayCounts {
                    routes: 1,
                    neighbours: 1,
                    fdb: 1
                }
            );
        }
    }
    assert!(!pings(&eps[0][0][0], addr(2, 0)));
    assert!(pings(&eps[0][0][0], addr(1, 0)));

    // Teardown leaves nothing on the fabric.
    drop((more, eps, nets, nodes));
    common::eventually("fabric empty", Duration::from_secs(10), || {
        t.node.extra_links().unwrap().is_empty()
    });
}
