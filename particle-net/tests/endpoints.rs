//! Endpoints built by the batched factory, checked from the kernel's side.

mod common;

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::time::Duration;

use common::{eventually, scratch};
use particle_net::endpoint::{ENDPOINT_IFINDEX, ENDPOINT_IFNAME};
use particle_net::EndpointSpec;

fn bridge_mac(node: &particle_net::scratch::ScratchNode) -> String {
    let out = node
        .netns
        .command("ip")
        .args(["-br", "link", "show", node.bridge.name.as_str()])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    text.split_whitespace()
        .nth(2)
        .unwrap_or_default()
        .to_string()
}

#[test]
fn endpoints_are_built_attached_and_reach_each_other() {
    let mut t = scratch("10.200.0.0/24");
    let factory = t.node.factory(2).unwrap();
    let specs = EndpointSpec::allocate(&mut t.node.block, 5);
    let mac_before = bridge_mac(&t.node);
    let endpoints: Vec<_> = factory
        .create_batch(&specs)
        .into_iter()
        .map(|r| r.expect("endpoint"))
        .collect();

    // Inside: lo and eth0 up, the address, the default route.
    for (ep, spec) in endpoints.iter().zip(&specs) {
        assert_eq!(ep.address(), spec.address);
        let state = ep.inspect().unwrap();
        let names: Vec<_> = state
            .links
            .iter()
            .map(|l| (l.name.as_str(), l.up))
            .collect();
        assert_eq!(names, [("lo", true), (ENDPOINT_IFNAME, true)]);
        assert!(state.ipv4.contains(&(ENDPOINT_IFINDEX, spec.address)));
        assert!(ep.is_clean().unwrap());
        let routes = ep
            .netns()
            .command("ip")
            .args(["-4", "route", "show", "default"])
            .output()
            .unwrap();
        let routes = String::from_utf8_lossy(&routes.stdout);
        assert!(
            routes.contains(&format!("default via {} dev eth0", spec.gateway)),
            "{routes}"
        );
    }

    // Outside: every host end up and attached to the bridge.
    let links = particle_net::endpoint::list_links(&mut t.node.socket).unwrap();
    for ep in &endpoints {
        let host = links
            .iter()
            .find(|l| l.name == ep.host_ifname().as_str())
            .expect("host end");
        assert!(host.up);
        assert_eq!(host.master, Some(t.node.bridge.index));
    }

    // A ping and a TCP exchange from one endpoint to another through the bridge.
    let (a, b) = (&endpoints[0], &endpoints[4]);
    let ping = a
        .netns()
        .command("ping")
        .args(["-c", "1", "-W", "2", &b.address().ip().to_string()])
        .output()
        .expect("ping is installed (scripts/install-deps)");
    assert!(ping.status.success(), "{ping:?}");

    let listener = b
        .netns()
        .run_in(|| TcpListener::bind((b.address().ip(), 7000)))
        .unwrap()
        .unwrap();
    let server = std::thread::spawn(move || {
        let (mut s, peer) = listener.accept().unwrap();
        let mut buf = [0u8; 5];
        s.read_exact(&mut buf).unwrap();
        s.write_all(b"pong!").unwrap();
        (buf, peer.ip())
    });
    let target = (b.address().ip(), 7000);
    let mut client = a
        .netns()
        .run_in(|| TcpStream::connect(target))
        .unwrap()
        .unwrap();
    client.write_all(b"ping!").unwrap();
    let mut reply = [0u8; 5];
    client.read_exact(&mut reply).unwrap();
    let (got, peer) = server.join().unwrap();
    assert_eq!(&got, b"ping!");
    assert_eq!(&reply, b"pong!");
    assert_eq!(peer, std::net::IpAddr::V4(a.address().ip()));

    // Teardown: dropping the endpoints (and the sockets opened inside them)
    // removes every host end.
    drop(client);
    drop(endpoints);
    eventually("host ends removed", Duration::from_secs(5), || {
        t.node.extra_links().unwrap().is_empty()
    });
    // The gateway's MAC does not follow its ports: endpoints' ARP entries for
    // it stay right while other endpoints come and go.
    assert_eq!(bridge_mac(&t.node), mac_before);
}

/// Every IPv4 neighbour entry of a namespace but the kernel's computed ones.
fn neighbour_entries(netns: &particle_net::NetNs) -> Vec<particle_net::endpoint::ArpEntry> {
    let mut socket = particle_net::NetlinkSocket::open_in(netns).unwrap();
    particle_net::endpoint::list_arp_entries(&mut socket)
        .unwrap()
        .into_iter()
        .filter(|e| !e.computed())
        .collect()
}

/// The kernel's neighbour table is one for all namespaces (`gc_thresh3`):
/// a burst must not fill it. An endpoint is built with a permanent entry
/// for its gateway (the bridge, whose MAC follows from its address) and the
/// router with one for the endpoint, so traffic through the gateway learns
/// nothing on either side.
#[test]
fn endpoints_and_their_router_never_learn_each_other_by_arp() {
    let mut t = scratch("10.200.2.0/24");
    let factory = t.node.factory(1).unwrap();
    let specs = EndpointSpec::allocate(&mut t.node.block, 3);
    let endpoints: Vec<_> = factory
        .create_batch(&specs)
        .into_iter()
        .map(|r| r.expect("endpoint"))
        .collect();
    let gateway = specs[0].gateway;
    let gateway_mac = particle_net::bridge::gateway_mac(gateway);
    let mac_text = gateway_mac
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":");
    assert_eq!(
        bridge_mac(&t.node),
        mac_text,
        "the bridge has its gateway's MAC"
    );

    // The node (the router here) listens on the gateway address.
    let listener = t
        .node
        .netns
        .run_in(|| TcpListener::bind((gateway, 0)))
        .unwrap()
        .unwrap();
    let port = listener.local_addr().unwrap().port();
    let server = std::thread::spawn(move || {
        for _ in 0..3 {
            let (mut s, _) = listener.accept().unwrap();
            let mut b = [0u8; 4];
            s.read_exact(&mut b).unwrap();
            s.write_all(&b).unwrap();
        }
    });
    for ep in &endpoints {
        let mut c = ep
            .netns()
            .run_in(|| TcpStream::connect((gateway, port)))
            .unwrap()
            .unwrap();
        c.write_all(b"ping").unwrap();
        let mut b = [0u8; 4];
        c.read_exact(&mut b).unwrap();
        assert_eq!(&b, b"ping");
    }
    server.join().unwrap();

    for ep in &endpoints {
        let inside = neighbour_entries(ep.netns());
        assert_eq!(inside.len(), 1, "only the gateway's entry: {inside:?}");
        assert_eq!(inside[0].ip, gateway);
        assert!(
            !inside[0].learnt(),
            "the gateway's entry is permanent: {inside:?}"
        );
        // A pooled endpoint's sweep keeps it.
        ep.forget_neighbours().unwrap();
        assert_eq!(neighbour_entries(ep.netns()), inside);
    }
    let router = neighbour_entries(&t.node.netns);
    assert!(
        router.iter().all(|e| !e.learnt()),
        "the router learnt: {router:?}"
    );
    for ep in &endpoints {
        assert!(
            router.iter().any(|e| e.ip == ep.address().ip()),
            "{router:?}"
        );
    }
}
