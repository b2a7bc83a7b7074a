//! Tenant-free endpoints: built with no tenant and no address, bound to a
//! tenant on claim (host end moved into the tenant's router and attached,
//! address and route set inside), then as good as any tenant endpoint.

mod common;

use std::net::Ipv4Addr;
use std::time::Duration;

use ipnetwork::Ipv4Network;
use particle_net::endpoint::{list_links, FactoryConfig};
use particle_net::overlay::TenantNetwork;
use particle_net::scratch::ScratchNode;
use particle_net::{EndpointFactory, EndpointSpec, NetlinkSocket};

fn spec(host: u8, gateway: Ipv4Addr) -> EndpointSpec {
    EndpointSpec {
        address: Ipv4Network::new(Ipv4Addr::new(10, 90, 0, host), 24).unwrap(),
        gateway,
    }
}

#[test]
fn unbound_endpoints_bind_to_a_tenant_on_claim() {
    let mut t = common::scratch("10.251.0.0/24");
    let prefix = t.run.prefix().clone();
    let node = t.node.hosts(1).unwrap().remove(0);
    let mut node_socket = NetlinkSocket::open_in(node.netns()).unwrap();
    let block: Ipv4Network = "10.90.0.0/24".parse().unwrap();
    let gateway = Ipv4Addr::new(10, 90, 0, 1);
    let net = TenantNetwork::create(
        &mut node_socket,
        &prefix,
        ScratchNode::underlay_of(&node),
        900,
        block,
    )
    .unwrap();
    let warm = net
        .factory(&prefix, 1)
        .unwrap()
        .create_batch(&[spec(10, gateway)])
        .remove(0)
        .unwrap();

    let free = EndpointFactory::new(FactoryConfig {
        home: node.netns().try_clone().unwrap(),
        bridge_index: None,
        lock_ports: true,
        prefix: prefix.clone(),
        workers: 1,
    })
    .unwrap();
    let mut unbound: Vec<_> = free
        .create_unbound(2)
        .into_iter()
        .map(|r| r.unwrap())
        .collect();
    let names: Vec<String> = unbound
        .iter()
        .map(|u| u.host_ifname().to_string())
        .collect();
    let node_links: Vec<_> = list_links(&mut node_socket)
        .unwrap()
        .into_iter()
        .map(|l| l.name)
        .collect();
    assert!(
        names.iter().all(|n| node_links.contains(n)),
        "{node_links:?}"
    );

    // Bound: host end now on the tenant's bridge, endpoint clean and reachable.
    let mut binder = net.binder().unwrap();
    let bound = binder
        .bind(&mut node_socket, unbound.remove(0), spec(20, gateway))
        .unwrap();
    assert!(bound.is_clean().unwrap());
    let mut tenant_socket = NetlinkSocket::open_in(net.netns()).unwrap();
    let host = list_links(&mut tenant_socket)
        .unwrap()
        .into_iter()
        .find(|l| l.name == names[0])
        .expect("host end moved into the tenant router");
    assert_eq!(host.master, Some(net.bridge().index));
    assert!(host.up);
    let ping = bound
        .netns()
        .command("ping")
        .args(["-c", "1", "-W", "2", &warm.address().ip().to_string()])
        .output()
        .unwrap();
    assert!(ping.status.success(), "{ping:?}");

    // A bind that fails destroys the endpoint: nothing half-bound remains.
    let err = binder
        .bind(
            &mut node_socket,
            unbound.remove(0),
            spec(21, "192.0.2.1".parse().unwrap()),
        )
        .unwrap_err();
    assert!(
        err.to_string().contains("default route via 192.0.2.1"),
        "{err}"
    );
    common::eventually(
        "the failed endpoint is gone",
        Duration::from_secs(5),
        || {
            !list_links(&mut tenant_socket)
                .unwrap()
                .iter()
                .any(|l| l.name == names[1])
        },
    );
}
