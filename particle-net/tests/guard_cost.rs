//! What locking a port costs the kernel per endpoint: veth pairs on a
//! bridge alone, then their ports locked and the router's ARP entries
//! added, in alternating rounds of one run, next to a whole endpoint build.
//! A measurement, not a check (ignored by default):
//! `cargo test -p particle-net --release --test guard_cost -- --ignored --nocapture`.

mod common;

use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};

use particle_net::guard::{self, PortIdentity};
use particle_net::netlink::{messages, Request};
use particle_net::{EndpointSpec, IfName, NetNs, NetlinkSocket};

const PAIRS: u64 = 200;
const ROUNDS: u64 = 3;

/// A made-up address per port for its rules.
fn address(i: usize) -> std::net::Ipv4Addr {
    std::net::Ipv4Addr::new(10, 215, 1 + (i / 250) as u8, (i % 250) as u8 + 2)
}

fn per_endpoint(d: Duration, n: u64) -> f64 {
    d.as_secs_f64() * 1e6 / n as f64
}

#[test]
#[ignore]
fn guard_cost_per_endpoint() {
    let mut t = common::scratch("10.215.0.0/24");
    let prefix = t.run.prefix().clone();
    let bridge = t.node.bridge.index;
    let mut socket = NetlinkSocket::open_in(&t.node.netns).unwrap();
    for round in 0..ROUNDS {
        // The peers all go into one throwaway namespace: dropping it
        // removes every pair at once (deleting links one by one is slow).
        let peers = NetNs::create().unwrap();
        let first = 1_000_000 + round * PAIRS;
        let ports: Vec<(IfName, PortIdentity)> = (first..first + PAIRS)
            .map(|n| (prefix.ifname('g', n).unwrap(), PortIdentity::endpoint(n)))
            .collect();
        let veths: Vec<Request> = ports
            .iter()
            .enumerate()
            .map(|(i, (name, port))| {
                let peer = IfName::new(format!("p{i}")).unwrap();
                Request::create(
                    "veth",
                    messages::veth_pair(&messages::VethPair {
                        host: name,
                        host_index: port.host_index,
                        master: Some(bridge),
                        peer: &peer,
                        peer_ns: peers.as_raw_fd(),
                        peer_index: 0,
                        peer_mac: Some(port.mac),
                    }),
                )
            })
            .collect();
        let start = Instant::now();
        socket.execute_all(&veths).unwrap();
        let veth = start.elapsed();
        // Each step over all ports, timed on its own: [port flags, FDB
        // entry, clsact, filter] and the router's ARP entry.
        let mut steps = [Duration::ZERO; 5];
        for (step, spent) in steps.iter_mut().enumerate() {
            let requests: Vec<Request> = ports
                .iter()
                .enumerate()
                .map(|(i, (_, port))| {
                    let ip = address(i);
                    match step {
                        4 => guard::router_neighbour(bridge, ip, port.mac),
                        s => guard::lock_requests(port, ip)[s].clone(),
                    }
                })
                .collect();
            let start = Instant::now();
            socket.execute_all(&requests).unwrap();
            *spent = start.elapsed();
        }
        let us: Vec<String> = steps
            .iter()
            .map(|d| format!("{:.0}", per_endpoint(*d, PAIRS)))
            .collect();
        println!(
            "round {round}: veth pair on the bridge {:.0} µs; lock {:.0} µs \
             (flags, fdb, clsact, filter, ARP entry: {} µs) per endpoint",
            per_endpoint(veth, PAIRS),
            per_endpoint(steps.iter().sum(), PAIRS),
            us.join(", ")
        );
        // The router's ARP entries outlive the ports: remove them.
        let forget: Vec<Request> = (0..PAIRS as usize)
            .map(|i| Request::change("forget", messages::delete_neighbour(bridge, address(i))))
            .collect();
        socket.execute_all(&forget).unwrap();
        drop(peers);
        common::eventually("pairs gone", Duration::from_secs(30), || {
            t.node.extra_links().unwrap().is_empty()
        });
    }
    let specs = EndpointSpec::allocate(&mut t.node.block, PAIRS as usize);
    let factory = t.node.factory(1).unwrap();
    let start = Instant::now();
    let built = factory.create_batch(&specs);
    let whole = start.elapsed();
    assert!(built.iter().all(Result::is_ok));
    println!(
        "a whole endpoint (one worker, lock included): {:.0} µs",
        per_endpoint(whole, PAIRS)
    );
}
