//! Bad input gets a clear error and leaves no half-built state.

mod common;

use std::time::Duration;

use common::{eventually, scratch};
use particle_net::bridge::Bridge;
use particle_net::{EndpointFactory, EndpointSpec, IfName, NameError, NetlinkError};

#[test]
fn a_planted_name_clash_fails_one_endpoint_and_spares_the_rest() {
    let mut t = scratch("10.205.0.0/24");
    let factory = t.node.factory(1).unwrap();
    // The factory numbers endpoints from 0: plant a link where #1's host end goes.
    let clash = EndpointFactory::host_ifname(factory.prefix(), 1).unwrap();
    Bridge::create(&mut t.node.socket, &clash, None).unwrap();

    let specs = EndpointSpec::allocate(&mut t.node.block, 3);
    let results = factory.create_batch(&specs);
    assert!(results[0].is_ok());
    assert!(results[2].is_ok());
    let err = results[1].as_ref().unwrap_err().to_string();
    assert!(
        err.contains(clash.as_str()) && err.contains("exists"),
        "{err}"
    );

    let mut links = t.node.extra_links().unwrap();
    links.sort();
    let mut expected = vec![
        clash.to_string(),
        results[0].as_ref().unwrap().host_ifname().to_string(),
        results[2].as_ref().unwrap().host_ifname().to_string(),
    ];
    expected.sort();
    assert_eq!(links, expected, "the failed endpoint left nothing behind");
}

#[test]
fn an_unreachable_gateway_fails_inside_and_leaves_nothing() {
    let mut t = scratch("10.206.0.0/24");
    let factory = t.node.factory(1).unwrap();
    let spec = EndpointSpec {
        address: t.node.block.allocate().unwrap(),
        gateway: "192.0.2.1".parse().unwrap(), // not on the endpoint's subnet
    };
    let err = factory
        .create_batch(&[spec])
        .remove(0)
        .unwrap_err()
        .to_string();
    assert!(err.contains("default route via 192.0.2.1"), "{err}");
    eventually(
        "the half-built endpoint is gone",
        Duration::from_secs(5),
        || t.node.extra_links().unwrap().is_empty(),
    );
}

#[test]
fn over_long_names_are_refused_before_the_kernel_sees_them() {
    common::require_root();
    let err = IfName::new("particle-bridge-0").unwrap_err();
    assert!(matches!(err, NameError::TooLong { len: 17, .. }), "{err}");
    assert!(err.to_string().contains("at most 15"), "{err}");
}

#[test]
fn a_duplicate_bridge_is_refused_and_the_first_survives() {
    let mut t = scratch("10.207.0.0/24");
    let name = t.node.bridge.name.clone();
    let err = Bridge::create(&mut t.node.socket, &name, None).unwrap_err();
    assert!(
        matches!(&err, NetlinkError::Request(r) if r.errno() == Some(nix::libc::EEXIST)),
        "{err}"
    );
    let again = Bridge::lookup(&mut t.node.socket, &name).unwrap();
    assert_eq!(again.index, t.node.bridge.index);
}
