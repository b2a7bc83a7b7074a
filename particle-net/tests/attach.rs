//! A warm endpoint's interface lent to a namespace it does not own (a
//! container runtime's), used there, and taken back: checked from the
//! kernel's side on both sides.

mod common;

use common::scratch;
use particle_net::attach::{self, AttachError};
use particle_net::endpoint::{list_ipv4_addresses, list_links};
use particle_net::{EndpointSpec, IfName, NetNs, NetlinkSocket};

fn link_names(ns: &NetNs) -> Vec<String> {
    let mut socket = NetlinkSocket::open_in(ns).unwrap();
    list_links(&mut socket)
        .unwrap()
        .into_iter()
        .map(|l| l.name)
        .collect()
}

fn pings(ns: &NetNs, to: std::net::Ipv4Addr) -> bool {
    ns.command("ping")
        .args(["-c1", "-W2", &to.to_string()])
        .output()
        .unwrap()
        .status
        .success()
}

#[test]
fn an_interface_moves_into_a_runtime_namespace_and_back() {
    let mut t = scratch("10.225.1.0/24");
    let factory = t.node.factory(1).unwrap();
    let specs = EndpointSpec::allocate(&mut t.node.block, 2);
    let mut built = factory.create_batch(&specs).into_iter();
    let (a, b) = (
        built.next().unwrap().unwrap(),
        built.next().unwrap().unwrap(),
    );
    // The runtime's namespace: made elsewhere, only `lo` in it.
    let runtime = NetNs::create().unwrap();
    let net1 = IfName::new("net1").unwrap();

    let attached = attach::attach(&a, &runtime, &net1).unwrap();
    assert_eq!(attached.name, net1);
    assert_eq!(attached.mac_string().len(), 17);
    assert_eq!(link_names(&runtime), ["lo", "net1"]);
    assert_eq!(link_names(a.netns()), ["lo"], "eth0 left the endpoint");
    let mut there = NetlinkSocket::open_in(&runtime).unwrap();
    assert!(list_ipv4_addresses(&mut there)
        .unwrap()
        .contains(&(attached.index, a.address())));
    attach::verify(&a, &runtime, &attached).unwrap();
    // Up, addressed and routed: the gateway (the node's bridge) and the other
    // endpoint answer from the runtime's namespace.
    assert!(pings(&runtime, a.gateway()));
    assert!(pings(&runtime, b.address().ip()));

    // The same name again in the same namespace is refused, and the
    // runtime's namespace is left as it was.
    let clash = attach::attach(&b, &runtime, &net1).unwrap_err();
    assert!(clash.to_string().contains("File exists"), "{clash}");
    assert_eq!(link_names(&runtime), ["lo", "net1"]);
    assert_eq!(
        link_names(b.netns()),
        ["lo", "net1"],
        "still in its endpoint"
    );

    attach::detach(&a, &runtime, &attached).unwrap();
    assert_eq!(link_names(&runtime), ["lo"]);
    assert!(
        a.is_clean().unwrap(),
        "detached endpoint is as built: {:?}",
        a.inspect()
    );
    assert!(pings(a.netns(), a.gateway()), "and works again");

    // Gone twice: a clear error, nothing changes.
    assert!(matches!(
        attach::detach(&a, &runtime, &attached),
        Err(AttachError::NoSuchInterface(_))
    ));
    assert!(matches!(
        attach::verify(&a, &runtime, &attached),
        Err(AttachError::NoSuchInterface(_))
    ));
}

#[test]
fn an_interface_lent_to_a_namespace_that_dies_goes_with_it() {
    let mut t = scratch("10.225.2.0/24");
    let factory = t.node.factory(1).unwrap();
    let specs = EndpointSpec::allocate(&mut t.node.block, 1);
    let ep = factory.create_batch(&specs).pop().unwrap().unwrap();
    let runtime = NetNs::create().unwrap();
    let eth0 = IfName::new("eth0").unwrap();
    attach::attach(&ep, &runtime, &eth0).unwrap();
    assert_eq!(t.node.extra_links().unwrap().len(), 1, "the host end");
    drop(runtime);
    // The veth pair dies with the runtime's namespace, host end included.
    common::eventually(
        "host end removed",
        std::time::Duration::from_secs(5),
        || t.node.extra_links().unwrap().is_empty(),
    );
    assert!(!ep.is_clean().unwrap(), "the endpoint has no eth0 any more");
}

#[test]
fn a_pair_plugged_into_a_runtime_namespace_reaches_the_tenant_and_unplugs_clean() {
    use ipnetwork::Ipv4Network;
    use particle_net::overlay::TenantNetwork;
    use particle_net::scratch::ScratchNode;
    use std::net::Ipv4Addr;

    let mut t = scratch("10.225.3.0/24");
    let prefix = t.run.prefix().clone();
    let host = t.node.hosts(1).unwrap().pop().unwrap();
    let mut node_socket = NetlinkSocket::open_in(host.netns()).unwrap();
    let block: Ipv4Network = "10.225.64.0/24".parse().unwrap();
    let net = TenantNetwork::create(
        &mut node_socket,
        &prefix,
        ScratchNode::underlay_of(&host),
        2250,
        block,
    )
    .unwrap();
    let mut binder = net.binder().unwrap();
    let gateway = Ipv4Addr::new(10, 225, 64, 1);
    let spec = |last: u8| EndpointSpec {
        address: Ipv4Network::new(Ipv4Addr::new(10, 225, 64, last), 24).unwrap(),
        gateway,
    };
    let (ns1, ns2) = (NetNs::create().unwrap(), NetNs::create().unwrap());
    let eth0 = IfName::new("eth0").unwrap();
    let (h1, h2) = (
        attach::plug_host(&prefix).unwrap(),
        attach::plug_host(&prefix).unwrap(),
    );
    let mut in1 = NetlinkSocket::open_in(&ns1).unwrap();
    let mut in2 = NetlinkSocket::open_in(&ns2).unwrap();
    let a = binder.plug(&ns1, &mut in1, &eth0, &h1, &spec(10)).unwrap();
    let _b = binder.plug(&ns2, &mut in2, &eth0, &h2, &spec(11)).unwrap();
    assert_eq!(link_names(&ns1), ["lo", "eth0"]);
    attach::verify_spec(&spec(10), &ns1, &a).unwrap();
    assert!(pings(&ns1, gateway), "the tenant bridge answers");
    assert!(
        pings(&ns1, Ipv4Addr::new(10, 225, 64, 11)),
        "and the other container"
    );

    // A name clash in the runtime's namespace creates nothing.
    let h3 = attach::plug_host(&prefix).unwrap();
    assert!(binder.plug(&ns1, &mut in1, &eth0, &h3, &spec(12)).is_err());
    assert_eq!(link_names(&ns1), ["lo", "eth0"]);

    binder.unplug(&h1.name, spec(10).address.ip()).unwrap();
    assert_eq!(link_names(&ns1), ["lo"], "the peer went with the host end");
    binder.unplug(&h1.name, spec(10).address.ip()).unwrap(); // already gone: fine
    assert!(matches!(
        attach::verify_spec(&spec(10), &ns1, &a),
        Err(AttachError::NoSuchInterface(_))
    ));
}
