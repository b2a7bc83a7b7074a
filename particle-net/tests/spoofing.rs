//! No spoofing on the overlay: an endpoint whose process holds CAP_NET_RAW
//! (a test thread entering its namespace as root has it) sends raw frames
//! with another source address, another MAC, ARP claims for a neighbour's
//! address and a MAC flood; none reaches the neighbours (sniffed on their
//! interfaces), the bridge's FDB does not grow, and the neighbour's TCP
//! exchange with a third endpoint runs on throughout. The same frames sent
//! honestly do arrive, and a process without capabilities pings and talks
//! TCP. For endpoints built in a batch, tenant-free ones bound to a tenant,
//! and pairs plugged into a runtime's namespace (CNI).

mod common;

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use common::frames::{self, RawSocket, BROADCAST, ETH_P_ARP, ETH_P_IP};
use common::scratch;
use ipnetwork::Ipv4Network;
use particle_net::endpoint::{Endpoint, FactoryConfig, ENDPOINT_IFINDEX};
use particle_net::netlink::messages;
use particle_net::overlay::TenantNetwork;
use particle_net::scratch::ScratchNode;
use particle_net::{attach, EndpointFactory, EndpointSpec, IfName, NetNs, NetlinkSocket};

/// Frames of each kind a flood sends.
const FLOOD: u32 = 2000;
/// How long frames get to arrive after the last one is sent.
const SETTLE: Duration = Duration::from_millis(300);

/// One side of the tests: a namespace, its interface, address and MAC.
struct Host<'a> {
    ns: &'a NetNs,
    ifindex: u32,
    ip: Ipv4Addr,
    mac: [u8; 6],
}

fn host(ep: &Endpoint) -> Host<'_> {
    Host {
        ns: ep.netns(),
        ifindex: ENDPOINT_IFINDEX,
        ip: ep.address().ip(),
        mac: ep.mac(),
    }
}

fn raw_socket(h: &Host) -> RawSocket {
    h.ns.run_in(|| RawSocket::open(h.ifindex)).unwrap().unwrap()
}

/// Entries in every FDB of the router namespace.
fn fdb_entries(router: &NetNs) -> usize {
    let mut socket = NetlinkSocket::open_in(router).unwrap();
    socket
        .query("dump fdb", messages::dump_fdb(), true)
        .unwrap()
        .len()
}

/// The frames the attacker sends: (marker, frame, whether it must arrive).
fn frames_from(a: &Host, v: &Host, t: &Host) -> Vec<(u32, Vec<u8>, bool)> {
    let udp = |src_mac, src_ip, dst: &Host, m: u32| {
        let ip = frames::ipv4_udp(src_ip, dst.ip, 9, &frames::marker(m));
        frames::ethernet(dst.mac, src_mac, ETH_P_IP, &ip)
    };
    let arp = |dst, op, sha, sip, tip, m: u32| {
        let mut p = frames::arp(op, sha, sip, [0; 6], tip);
        p.extend_from_slice(&frames::marker(m));
        frames::ethernet(dst, a.mac, ETH_P_ARP, &p)
    };
    let unused = Ipv4Addr::from(u32::from(v.ip) | 0xf0);
    let fake_mac = [0x02, 0xee, 0, 0, 0, 1];
    vec![
        // Honest controls: the same kinds of frame, from its own MAC and address.
        (1, udp(a.mac, a.ip, v, 1), true),
        (2, arp(BROADCAST, 1, a.mac, a.ip, v.ip, 2), true),
        // Another endpoint's source address, and one nobody holds.
        (10, udp(a.mac, t.ip, v, 10), false),
        (11, udp(a.mac, unused, v, 11), false),
        // Its own address from another MAC.
        (12, udp(fake_mac, a.ip, v, 12), false),
        // Gratuitous ARP (request and reply) claiming the neighbour's
        // address, broadcast and straight at the third endpoint.
        (13, arp(BROADCAST, 1, a.mac, v.ip, v.ip, 13), false),
        (14, arp(BROADCAST, 2, a.mac, v.ip, v.ip, 14), false),
        (15, arp(t.mac, 2, a.mac, v.ip, t.ip, 15), false),
        // Its own address announced at another MAC.
        (16, arp(BROADCAST, 2, fake_mac, a.ip, a.ip, 16), false),
    ]
}

/// A flood of frames from random source MACs.
fn mac_flood(a: &Host) -> Vec<Vec<u8>> {
    (0..FLOOD)
        .map(|i| {
            let src = [0x02, 0xef, 0, (i >> 16) as u8, (i >> 8) as u8, i as u8];
            let ip = frames::ipv4_udp(a.ip, Ipv4Addr::BROADCAST, 9, &frames::marker(99));
            frames::ethernet(BROADCAST, src, ETH_P_IP, &ip)
        })
        .collect()
}

/// Runs every attack from `a` while `v` and `t` exchange TCP, and checks
/// that only the honest frames reached them.
fn assert_guarded(router: &NetNs, a: &Host, v: &Host, t: &Host) {
    let fdb_before = fdb_entries(router);
    let (sniff_v, sniff_t, sender) = (raw_socket(v), raw_socket(t), raw_socket(a));
    let frames = frames_from(a, v, t);
    let stop = AtomicBool::new(false);
    let (at_v, at_t, exchanged) = std::thread::scope(|s| {
        let sniffed_v = s.spawn(|| sniff_v.collect_until(&stop));
        let sniffed_t = s.spawn(|| sniff_t.collect_until(&stop));
        let exchanged = tcp_exchange_while(v, t, || {
            for (_, frame, _) in &frames {
                sender.send(frame).unwrap();
            }
            for frame in mac_flood(a) {
                sender.send(&frame).unwrap();
            }
            std::thread::sleep(SETTLE);
        });
        stop.store(true, Ordering::Relaxed);
        (
            sniffed_v.join().unwrap(),
            sniffed_t.join().unwrap(),
            exchanged,
        )
    });
    assert!(
        exchanged > 5,
        "the neighbours' TCP exchange stalled ({exchanged})"
    );
    for (m, _, honest) in &frames {
        let got =
            frames::seen(&at_v, frames::marker(*m)) || frames::seen(&at_t, frames::marker(*m));
        assert_eq!(got, *honest, "frame {m}: arrived {got}, should {honest}");
    }
    assert!(
        !frames::seen(&at_v, frames::marker(99)),
        "the MAC flood got through"
    );
    assert_eq!(fdb_entries(router), fdb_before, "the flood grew the FDB");
}

/// Runs `attack` while `client` exchanges 8-byte echoes with `server` over
/// TCP; every exchange must succeed. Returns how many there were.
fn tcp_exchange_while(client: &Host, server: &Host, attack: impl FnOnce()) -> usize {
    let listener = server
        .ns
        .run_in(|| TcpListener::bind((server.ip, 0)))
        .unwrap()
        .unwrap();
    let addr = listener.local_addr().unwrap();
    let stop = AtomicBool::new(false);
    std::thread::scope(|s| {
        s.spawn(|| {
            let (mut conn, _) = listener.accept().unwrap();
            let mut buf = [0u8; 8];
            while conn.read_exact(&mut buf).is_ok() {
                conn.write_all(&buf).unwrap();
            }
        });
        let exchanges = s.spawn(|| {
            let mut conn = client
                .ns
                .run_in(|| TcpStream::connect(addr))
                .unwrap()
                .unwrap();
            conn.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
            let mut n = 0;
            while !stop.load(Ordering::Relaxed) || n < 10 {
                let out = (n as u64).to_be_bytes();
                conn.write_all(&out).unwrap();
                let mut back = [0u8; 8];
                conn.read_exact(&mut back)
                    .expect("the neighbour's connection broke");
                assert_eq!(back, out, "the neighbour got someone else's bytes");
                n += 1;
                std::thread::sleep(Duration::from_millis(5));
            }
            n
        });
        attack();
        stop.store(true, Ordering::Relaxed);
        exchanges.join().unwrap()
    })
}

fn ping_group_range(ns: &NetNs) -> String {
    ns.run_in(|| std::fs::read_to_string("/proc/sys/net/ipv4/ping_group_range"))
        .unwrap()
        .unwrap()
}

/// The router's ARP entry for `ip`, as `ip neigh` prints it.
fn router_neighbour(router: &NetNs, ip: Ipv4Addr) -> String {
    let out = router
        .command("ip")
        .args(["-4", "neigh", "show", &ip.to_string()])
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

fn mac_string(m: [u8; 6]) -> String {
    m.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

#[test]
fn batch_built_endpoints_cannot_spoof_and_still_talk() {
    let mut t = scratch("10.211.0.0/24");
    let specs = EndpointSpec::allocate(&mut t.node.block, 3);
    let eps: Vec<Endpoint> = t
        .node
        .factory(2)
        .unwrap()
        .create_batch(&specs)
        .into_iter()
        .map(|r| r.unwrap())
        .collect();
    let (a, v, th) = (host(&eps[0]), host(&eps[1]), host(&eps[2]));
    for ep in &eps {
        assert_eq!(ping_group_range(ep.netns()), "0\t2147483647\n");
        let entry = router_neighbour(&t.node.netns, ep.address().ip());
        assert!(
            entry.contains(&mac_string(ep.mac())) && entry.contains("PERMANENT"),
            "{entry}"
        );
    }
    assert_guarded(&t.node.netns, &a, &v, &th);
    unprivileged_ping_and_tcp(&a, &th);
    // The flood and the claims left the router's entry for the victim alone.
    assert!(router_neighbour(&t.node.netns, v.ip).contains(&mac_string(v.mac)));
}

#[test]
fn bound_and_plugged_interfaces_are_locked_too() {
    let mut t = scratch("10.212.0.0/24");
    let prefix = t.run.prefix().clone();
    let node = t.node.hosts(1).unwrap().remove(0);
    let mut node_socket = NetlinkSocket::open_in(node.netns()).unwrap();
    let block: Ipv4Network = "10.213.0.0/24".parse().unwrap();
    let gateway = Ipv4Addr::new(10, 213, 0, 1);
    let net = TenantNetwork::create(
        &mut node_socket,
        &prefix,
        ScratchNode::underlay_of(&node),
        2120,
        block,
    )
    .unwrap();
    let spec = |last| EndpointSpec {
        address: Ipv4Network::new(Ipv4Addr::new(10, 213, 0, last), 24).unwrap(),
        gateway,
    };
    let warm: Vec<Endpoint> = net
        .factory(&prefix, 1)
        .unwrap()
        .create_batch(&[spec(10), spec(11)])
        .into_iter()
        .map(|r| r.unwrap())
        .collect();
    let (v, th) = (host(&warm[0]), host(&warm[1]));
    let mut binder = net.binder().unwrap();

    // A tenant-free endpoint, bound to the tenant.
    let free = EndpointFactory::new(FactoryConfig {
        home: node.netns().try_clone().unwrap(),
        bridge_index: None,
        lock_ports: true,
        prefix: prefix.clone(),
        workers: 1,
    })
    .unwrap();
    let unbound = free.create_unbound(1).remove(0).unwrap();
    let bound = binder.bind(&mut node_socket, unbound, spec(20)).unwrap();
    assert_eq!(ping_group_range(bound.netns()), "0\t2147483647\n");
    assert_guarded(net.netns(), &host(&bound), &v, &th);

    // A pair plugged into a runtime's namespace.
    let runtime = NetNs::create().unwrap();
    let mut there = NetlinkSocket::open_in(&runtime).unwrap();
    let plug = attach::plug_host(&prefix).unwrap();
    let eth0 = IfName::new("eth0").unwrap();
    let iface = binder
        .plug(&runtime, &mut there, &eth0, &plug, &spec(30))
        .unwrap();
    assert_eq!(iface.mac, plug.port.mac);
    let plugged = Host {
        ns: &runtime,
        ifindex: iface.index,
        ip: spec(30).address.ip(),
        mac: iface.mac,
    };
    assert_guarded(net.netns(), &plugged, &v, &th);
    assert!(router_neighbour(net.netns(), plugged.ip).contains("PERMANENT"));
    binder.unplug(&plug.name, plugged.ip).unwrap();
    assert_eq!(
        router_neighbour(net.netns(), plugged.ip),
        "",
        "unplug left its ARP entry"
    );
}

/// Env var naming the peer the probe child pings and connects to.
const PROBE_PEER: &str = "PARTICLE_TEST_PROBE_PEER";

/// From `from`'s namespace, a child process that drops to uid/gid 65534
/// with no capabilities pings `to` (an ICMP datagram socket: what
/// ping_group_range allows) and exchanges TCP with it.
fn unprivileged_ping_and_tcp(from: &Host, to: &Host) {
    let listener = to
        .ns
        .run_in(|| TcpListener::bind((to.ip, 0)))
        .unwrap()
        .unwrap();
    let port = listener.local_addr().unwrap().port();
    let server = std::thread::spawn(move || {
        let (mut conn, _) = listener.accept().unwrap();
        let mut buf = [0u8; 5];
        conn.read_exact(&mut buf).unwrap();
        conn.write_all(&buf).unwrap();
    });
    let out = from
        .ns
        .command(std::env::current_exe().unwrap())
        .args(["--exact", "unprivileged_probe_child", "--test-threads=1"])
        .env(PROBE_PEER, SocketAddr::from((to.ip, port)).to_string())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "the unprivileged probe failed: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    server.join().unwrap();
}

/// The probe itself; does nothing unless started by the test above.
#[test]
fn unprivileged_probe_child() {
    let Ok(peer) = std::env::var(PROBE_PEER) else {
        return;
    };
    let peer: SocketAddr = peer.parse().unwrap();
    let nobody = nix::unistd::Gid::from_raw(65534);
    nix::unistd::setgroups(&[]).unwrap();
    nix::unistd::setgid(nobody).unwrap();
    nix::unistd::setuid(nix::unistd::Uid::from_raw(65534)).unwrap();
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    assert!(
        status.contains("CapEff:\t0000000000000000"),
        "still has capabilities"
    );
    let std::net::IpAddr::V4(ip) = peer.ip() else {
        panic!("not IPv4")
    };
    common::icmp::ping(ip).expect("an unprivileged ping");
    let mut conn = TcpStream::connect_timeout(&peer, Duration::from_secs(3)).unwrap();
    conn.write_all(b"hello").unwrap();
    let mut back = [0u8; 5];
    conn.read_exact(&mut back).unwrap();
    assert_eq!(&back, b"hello");
}

/// `ip`/`tc`/`bridge` output in the router namespace.
fn router_tool(router: &NetNs, tool: &str, args: &[&str]) -> String {
    let out = router.command(tool).args(args).output().unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Whether the port `host` is locked as [`particle_net::guard`] says.
fn port_is_locked(router: &NetNs, host: &str, mac: [u8; 6]) -> bool {
    let link = router_tool(router, "ip", &["-d", "link", "show", host]);
    let filter = router_tool(router, "tc", &["filter", "show", "dev", host, "ingress"]);
    let fdb = router_tool(router, "bridge", &["fdb", "show", "dev", host]);
    link.contains("learning off")
        && link.contains("flood off")
        && link.contains("locked on")
        && filter.contains("bpf")
        && filter.contains("direct-action")
        && fdb.lines().any(|l| {
            l.starts_with(&mac_string(mac)) && l.contains("sticky") && l.ends_with("static")
        })
}

#[test]
fn recycled_endpoints_keep_their_locks_and_destroyed_ones_leave_nothing() {
    use particle_net::{EndpointPool, PoolConfig};
    let t = scratch("10.214.0.0/24");
    // Low watermark 0: claims never wake the refiller, so the recycler
    // has room for the released endpoint and the next claim gets it.
    let config = PoolConfig {
        high_watermark: 3,
        low_watermark: 0,
        batch_size: 3,
    };
    let pool =
        EndpointPool::start(t.node.factory(1).unwrap(), t.node.block.clone(), config).unwrap();
    pool.wait_ready(3, Duration::from_secs(20)).unwrap();
    let mut claimed: Vec<_> = (0..3).map(|_| pool.claim().unwrap()).collect();
    let first = claimed.remove(0);
    let (id, host_name, mac) = (first.id(), first.host_ifname().to_string(), first.mac());
    drop(first);
    common::eventually("the recycle", Duration::from_secs(60), || {
        pool.stats().recycled == 1
    });
    let again = pool.claim().unwrap();
    assert_eq!(
        again.id(),
        id,
        "the only pooled endpoint is the recycled one"
    );
    assert!(port_is_locked(&t.node.netns, &host_name, mac));
    assert_guarded(
        &t.node.netns,
        &host(&again),
        &host(&claimed[0]),
        &host(&claimed[1]),
    );

    // Destroyed: the router forgets it; the port and its rules went with it.
    let address = again.address().ip();
    again.discard();
    common::eventually("the destroy", Duration::from_secs(60), || {
        pool.stats().destroyed == 1
    });
    assert_eq!(router_neighbour(&t.node.netns, address), "");
    drop(claimed);
    drop(pool);
    let mut node = t.node;
    common::eventually("teardown", Duration::from_secs(60), || {
        node.extra_links().unwrap().is_empty()
    });
    let neighbours = router_tool(&node.netns, "ip", &["-4", "neigh", "show"]);
    assert!(!neighbours.contains("PERMANENT"), "{neighbours}");
    let fdb = router_tool(&node.netns, "bridge", &["fdb", "show"]);
    assert!(!fdb.contains("static"), "{fdb}");
}

#[test]
fn a_long_batch_opens_ping_in_every_endpoint_and_mounts_nothing_outside() {
    let mut t = scratch("10.216.0.0/24");
    // procfs mounts only: other processes mount namespaces meanwhile.
    let mounts = || {
        let all = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
        all.lines()
            .filter(|l| l.contains(" - proc "))
            .map(str::to_string)
            .collect::<Vec<_>>()
    };
    let before = mounts();
    // Past the worker's procfs renewal (every 64 writes).
    let specs = EndpointSpec::allocate(&mut t.node.block, 150);
    let eps: Vec<Endpoint> = t
        .node
        .factory(1)
        .unwrap()
        .create_batch(&specs)
        .into_iter()
        .map(|r| r.unwrap())
        .collect();
    for ep in &eps {
        assert_eq!(ping_group_range(ep.netns()), "0\t2147483647\n");
    }
    assert_eq!(
        mounts(),
        before,
        "the worker's procfs showed outside its thread"
    );
}
