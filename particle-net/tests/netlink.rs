//! The batched executor: many requests across datagrams, one failure in the
//! middle reported with what it was, every other request done.

mod common;

use std::net::Ipv4Addr;

use particle_net::endpoint::list_ipv4_addresses;
use particle_net::netlink::{messages, Request, MAX_PER_DATAGRAM};

#[test]
fn a_failed_request_is_reported_and_the_rest_of_the_batch_runs() {
    let mut t = common::scratch("10.210.0.0/16");
    let bridge = t.node.bridge.index;
    let count = MAX_PER_DATAGRAM * 2 + 10; // three datagrams
    let address = |i: usize| Ipv4Addr::new(10, 211, (i / 200) as u8, (i % 200 + 1) as u8);
    let mut requests: Vec<_> = (0..count)
        .map(|i| {
            Request::create(
                format!("address #{i}"),
                messages::add_ipv4_address(bridge, address(i), 32),
            )
        })
        .collect();
    // A duplicate of #5 in the middle of the second datagram.
    let clash = MAX_PER_DATAGRAM + 7;
    requests[clash] = Request::create(
        "the duplicate",
        messages::add_ipv4_address(bridge, address(5), 32),
    );

    let outcomes = t.node.socket.execute(&requests).unwrap();
    assert_eq!(outcomes.len(), count);
    for (i, outcome) in outcomes.iter().enumerate() {
        if i == clash {
            let err = outcome.as_ref().unwrap_err();
            assert_eq!(err.what, "the duplicate");
            assert_eq!(err.errno(), Some(nix::libc::EEXIST), "{err}");
        } else {
            assert!(outcome.is_ok(), "#{i}: {outcome:?}");
        }
    }
    let on_bridge = list_ipv4_addresses(&mut t.node.socket)
        .unwrap()
        .into_iter()
        .filter(|(index, net)| *index == bridge && net.prefix() == 32)
        .count();
    assert_eq!(on_bridge, count - 1);
}
