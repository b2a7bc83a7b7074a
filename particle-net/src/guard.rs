//! Anti-spoofing: each endpoint's port on its tenant's bridge accepts only
//! what the endpoint may send, enforced in the tenant's router namespace,
//! where nothing inside an endpoint (or a container runtime's namespace) can
//! reach it, whatever capabilities it holds.
//!
//! On the host end of the endpoint's veth pair (a port of the bridge):
//!
//! - bridge port flags: no learning, no unknown-unicast flooding, locked
//!   (the bridge forwards a frame only if its source MAC has an FDB entry on
//!   that port), plus a static, sticky FDB entry for the endpoint's MAC.
//!   A spoofed source MAC is dropped; a MAC flood adds nothing to the FDB.
//! - a `clsact` qdisc with one classic-BPF filter on ingress (traffic from
//!   the endpoint): IPv4 from the endpoint's MAC and address, and ARP whose
//!   sender MAC and address are the endpoint's; everything else (another
//!   source address, an ARP claim for a neighbour's address, VLAN tags,
//!   IPv6, other ethertypes) is dropped. The overlay carries IPv4 only.
//!
//! A separate step gives the router a permanent ARP entry for the endpoint
//! ([`router_neighbour`]): the router never has to ask, so no endpoint can
//! answer for another, and a burst starts without ARP on the router side.
//!
//! All of it is plain netlink, batched with the requests that build the
//! endpoint, so it costs the build path a few requests per endpoint and the
//! claim path nothing. It lives on the port, so a recycled endpoint keeps it
//! and the kernel removes it with the port; only the router's ARP entry
//! must be deleted when an endpoint is destroyed.
//!
//! The port needs a known ifindex for the tc requests and a known MAC for
//! the rules, both fixed at build: [`PortIdentity`] derives them from the
//! endpoint's id, so no lookup round trip is needed.

use std::net::Ipv4Addr;

use crate::netlink::guard_messages::{self, SockFilter};
use crate::netlink::{messages, Request};

/// Host-end ifindexes of endpoints start here, and those of plugged pairs
/// (CNI) at [`PLUG_INDEX_BASE`]: far above the small indexes the kernel
/// hands out in a router namespace (bridge, VXLAN device), so they never clash.
pub const ENDPOINT_INDEX_BASE: u32 = 1 << 24;
pub const PLUG_INDEX_BASE: u32 = 1 << 30;
/// Ids wrap within this span, keeping every index below 2^31 (ifindex is an int).
const INDEX_SPAN: u64 = 1 << 29;

/// The first two MAC bytes: locally administered unicast, one value per
/// kind so an endpoint and a plugged pair never share a MAC.
const ENDPOINT_MAC_PREFIX: [u8; 2] = [0x02, 0x70];
const PLUG_MAC_PREFIX: [u8; 2] = [0x02, 0x71];

/// The filter's priority on the port's ingress.
const FILTER_PRIORITY: u16 = 1;

/// What a port is known by before it exists: the host end's ifindex in the
/// router namespace and the MAC of the endpoint's interface.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PortIdentity {
    pub host_index: u32,
    pub mac: [u8; 6],
}

impl PortIdentity {
    /// The identity of the endpoint with this id (ids are unique per run
    /// prefix in the process, so within any router namespace of the run).
    pub fn endpoint(id: u64) -> Self {
        Self::derive(ENDPOINT_INDEX_BASE, ENDPOINT_MAC_PREFIX, id)
    }

    /// The identity of the `n`th pair plugged for a container runtime.
    pub fn plug(n: u64) -> Self {
        Self::derive(PLUG_INDEX_BASE, PLUG_MAC_PREFIX, n)
    }

    fn derive(base: u32, prefix: [u8; 2], n: u64) -> Self {
        // Both fit: INDEX_SPAN < 2^32 and the MAC keeps n's low 32 bits.
        let offset = u32::try_from(n % INDEX_SPAN).unwrap_or(0);
        let low = (n as u32).to_be_bytes();
        Self {
            host_index: base + offset,
            mac: [prefix[0], prefix[1], low[0], low[1], low[2], low[3]],
        }
    }
}

/// The requests that lock the port `port.host_index` (already on the
/// bridge, in the socket's namespace) to `port.mac` and `address`.
/// Run them in order on one socket, after the request that creates or
/// attaches the port.
pub fn lock_requests(port: &PortIdentity, address: Ipv4Addr) -> [Request; 4] {
    let i = port.host_index;
    [
        Request::change(
            format!("lock bridge port {i}"),
            guard_messages::lock_bridge_port(i),
        ),
        Request::create(
            format!("static fdb entry for port {i}"),
            guard_messages::static_fdb(i, port.mac),
        ),
        Request::create(
            format!("clsact qdisc on port {i}"),
            guard_messages::clsact(i),
        ),
        Request::create(
            format!("source filter for {address} on port {i}"),
            guard_messages::ingress_bpf(i, FILTER_PRIORITY, &source_filter(port.mac, address)),
        ),
    ]
}

/// The router's permanent ARP entry for the endpoint (on the bridge
/// `bridge`): replaces whatever entry the address had.
pub fn router_neighbour(bridge: u32, address: Ipv4Addr, mac: [u8; 6]) -> Request {
    Request::replace(
        format!("permanent ARP entry for {address}"),
        messages::permanent_neighbour(bridge, address, mac),
    )
}

// Classic BPF opcodes (linux/filter.h).
const LD_W_ABS: u16 = 0x20;
const LD_H_ABS: u16 = 0x28;
const JEQ_K: u16 = 0x15;
const RET_K: u16 = 0x06;
/// SKF_AD_OFF + SKF_AD_VLAN_TAG_PRESENT: loads 1 if the frame has a VLAN
/// tag the driver took out of the data (veth does), which a load from the
/// frame cannot see.
const VLAN_TAG_PRESENT: u32 = 0xffff_f000 + 48;
const TC_ACT_OK: u32 = 0;
const TC_ACT_SHOT: u32 = 2;
const ETH_P_IP: u32 = 0x0800;
const ETH_P_ARP: u32 = 0x0806;
/// ARP bytes 14..18: hardware type Ethernet (1), protocol IPv4.
const ARP_ETHER_IPV4: u32 = 0x0001_0800;
/// ARP bytes 18..20: hardware address length 6, protocol address length 4.
const ARP_LENGTHS: u32 = 0x0604;

/// The classic-BPF program (frame offsets from the Ethernet header, where
/// a tc filter on ingress sees them) accepting only the endpoint's own
/// IPv4 and ARP, as the module describes.
pub fn source_filter(mac: [u8; 6], address: Ipv4Addr) -> Vec<SockFilter> {
    let mac_high = u32::from_be_bytes([mac[0], mac[1], mac[2], mac[3]]);
    let mac_low = u32::from(u16::from_be_bytes([mac[4], mac[5]]));
    let ip = u32::from(address);
    let mut p = Program::default();
    p.load(LD_W_ABS, VLAN_TAG_PRESENT);
    p.require(0);
    p.load(LD_W_ABS, 6);
    p.require(mac_high);
    p.load(LD_H_ABS, 10);
    p.require(mac_low);
    p.load(LD_H_ABS, 12);
    let ipv4 = p.jump_if(ETH_P_IP);
    p.require(ETH_P_ARP);
    p.load(LD_W_ABS, 14);
    p.require(ARP_ETHER_IPV4);
    p.load(LD_H_ABS, 18);
    p.require(ARP_LENGTHS);
    // Sender hardware address, then sender protocol address.
    p.load(LD_W_ABS, 22);
    p.require(mac_high);
    p.load(LD_H_ABS, 26);
    p.require(mac_low);
    p.load(LD_W_ABS, 28);
    p.require(ip);
    p.accept();
    p.land(ipv4);
    p.load(LD_W_ABS, 26);
    p.require(ip);
    p.accept();
    p.finish()
}

/// A straight-line classic-BPF program whose checks all fail to one final
/// drop; jump offsets are filled in as their targets become known.
#[derive(Default)]
struct Program {
    code: Vec<SockFilter>,
    /// Checks whose "not equal" jumps to the final drop.
    requires: Vec<usize>,
}

impl Program {
    fn push(&mut self, code: u16, k: u32) -> usize {
        self.code.push(SockFilter {
            code,
            jt: 0,
            jf: 0,
            k,
        });
        self.code.len() - 1
    }

    fn load(&mut self, code: u16, k: u32) {
        self.push(code, k);
    }

    /// Goes on if the accumulator equals `k`, drops otherwise.
    fn require(&mut self, k: u32) {
        let at = self.push(JEQ_K, k);
        self.requires.push(at);
    }

    /// Jumps to the [`Self::land`]ing point if the accumulator equals `k`.
    fn jump_if(&mut self, k: u32) -> usize {
        self.push(JEQ_K, k)
    }

    fn land(&mut self, from: usize) {
        self.code[from].jt = offset(from, self.code.len());
    }

    fn accept(&mut self) {
        self.push(RET_K, TC_ACT_OK);
    }

    fn finish(mut self) -> Vec<SockFilter> {
        let drop_at = self.push(RET_K, TC_ACT_SHOT);
        for at in self.requires {
            self.code[at].jf = offset(at, drop_at);
        }
        self.code
    }
}

/// A forward jump from `from` to `to` (classic BPF counts from the next
/// instruction). Our programs are ~25 instructions, far below the 255 a
/// jump can skip.
fn offset(from: usize, to: usize) -> u8 {
    debug_assert!(to > from && to - from <= 256);
    u8::try_from(to - from - 1).unwrap_or(u8::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identities_are_distinct_and_in_range() {
        let (a, b, p) = (
            PortIdentity::endpoint(0),
            PortIdentity::endpoint(1),
            PortIdentity::plug(0),
        );
        assert_ne!(a.mac, b.mac);
        assert_ne!(a.mac, p.mac);
        assert_ne!(a.host_index, p.host_index);
        let last = PortIdentity::endpoint(u64::MAX);
        assert!(last.host_index < PLUG_INDEX_BASE);
        assert!(PortIdentity::plug(u64::MAX).host_index <= i32::MAX as u32);
        // Locally administered unicast.
        assert_eq!(a.mac[0] & 0x03, 0x02);
    }

    #[test]
    fn every_failed_check_drops_and_jumps_stay_inside() {
        let prog = source_filter([2, 0x70, 0, 0, 0, 7], Ipv4Addr::new(10, 1, 2, 3));
        let last = prog.len() - 1;
        assert_eq!((prog[last].code, prog[last].k), (RET_K, TC_ACT_SHOT));
        for (i, ins) in prog.iter().enumerate() {
            if ins.code == JEQ_K {
                assert!(i + 1 + usize::from(ins.jt) <= last);
                let miss = i + 1 + usize::from(ins.jf);
                assert!(miss <= last);
            }
        }
        // Both accepting returns come right after a check of the address.
        let accepts: Vec<usize> = (0..prog.len())
            .filter(|&i| prog[i].code == RET_K && prog[i].k == TC_ACT_OK)
            .collect();
        assert_eq!(accepts.len(), 2);
        for a in accepts {
            assert_eq!(prog[a - 1].k, u32::from(Ipv4Addr::new(10, 1, 2, 3)));
        }
    }
}
