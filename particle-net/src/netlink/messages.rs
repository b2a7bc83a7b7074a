//! Builders for the few rtnetlink messages Particle sends.

use std::net::Ipv4Addr;
use std::os::fd::RawFd;

use ipnetwork::Ipv4Network;
use netlink_packet_route::address::{AddressAttribute, AddressMessage, AddressScope};
use netlink_packet_route::link::{
    InfoData, InfoKind, InfoVeth, InfoVxlan, LinkAttribute, LinkFlags, LinkInfo, LinkMessage,
};
use netlink_packet_route::neighbour::{
    NeighbourAddress, NeighbourAttribute, NeighbourFlags, NeighbourMessage, NeighbourState,
};
use netlink_packet_route::route::{
    RouteAddress, RouteAttribute, RouteFlags, RouteHeader, RouteMessage, RouteProtocol, RouteScope,
    RouteType,
};
use netlink_packet_route::{AddressFamily, RouteNetlinkMessage};

use crate::names::IfName;

/// The loopback device's index in every namespace.
pub const LOOPBACK_INDEX: u32 = 1;

/// A veth pair to create with [`veth_pair`].
#[derive(Debug, Clone, Copy)]
pub struct VethPair<'a> {
    /// The end in the socket's namespace, up, attached to `master` if any.
    pub host: &'a IfName,
    /// The host end's ifindex; 0 lets the kernel choose.
    pub host_index: u32,
    pub master: Option<u32>,
    /// The peer, created straight inside the namespace `peer_ns`.
    pub peer: &'a IfName,
    pub peer_ns: RawFd,
    /// The peer's ifindex there; 0 lets the kernel choose.
    pub peer_index: u32,
    /// The peer's MAC; `None` lets the kernel make a random one.
    pub peer_mac: Option<[u8; 6]>,
}

/// A veth pair in one request instead of create + move + rename. The peer
/// cannot be set up here (the kernel answers ENOTCONN); bring it up from inside.
pub fn veth_pair(pair: &VethPair) -> RouteNetlinkMessage {
    let mut peer_msg = LinkMessage::default();
    peer_msg.header.index = pair.peer_index;
    peer_msg.attributes = vec![
        LinkAttribute::IfName(pair.peer.to_string()),
        LinkAttribute::NetNsFd(pair.peer_ns),
    ];
    if let Some(mac) = pair.peer_mac {
        peer_msg
            .attributes
            .push(LinkAttribute::Address(mac.to_vec()));
    }

    let mut msg = LinkMessage::default();
    msg.header.index = pair.host_index;
    msg.header.flags = LinkFlags::Up;
    msg.header.change_mask = LinkFlags::Up;
    msg.attributes = vec![
        LinkAttribute::IfName(pair.host.to_string()),
        LinkAttribute::LinkInfo(vec![
            LinkInfo::Kind(InfoKind::Veth),
            LinkInfo::Data(InfoData::Veth(InfoVeth::Peer(peer_msg))),
        ]),
    ];
    if let Some(master) = pair.master {
        msg.attributes.push(LinkAttribute::Controller(master));
    }
    RouteNetlinkMessage::NewLink(msg)
}

/// A bridge, up, with a fixed MAC. Without one the kernel gives the bridge
/// the lowest MAC of its ports and changes it as ports come and go, and every
/// endpoint's ARP entry for its gateway goes stale when an endpoint is
/// destroyed: under churn the gateway becomes unreachable for the ARP timeout.
pub fn bridge(name: &IfName, mac: [u8; 6]) -> RouteNetlinkMessage {
    let mut msg = LinkMessage::default();
    msg.header.flags = LinkFlags::Up;
    msg.header.change_mask = LinkFlags::Up;
    msg.attributes = vec![
        LinkAttribute::IfName(name.to_string()),
        LinkAttribute::Address(mac.to_vec()),
        LinkAttribute::LinkInfo(vec![LinkInfo::Kind(InfoKind::Bridge)]),
    ];
    RouteNetlinkMessage::NewLink(msg)
}

/// A VXLAN device without learning or multicast: every remote VTEP comes
/// from a static FDB entry. `mac` is set so peers can be told it in advance.
pub fn vxlan(
    name: &IfName,
    vni: u32,
    local: Ipv4Addr,
    underlay_index: u32,
    port: u16,
    mac: [u8; 6],
) -> RouteNetlinkMessage {
    let mut msg = LinkMessage::default();
    msg.attributes = vec![
        LinkAttribute::IfName(name.to_string()),
        LinkAttribute::Address(mac.to_vec()),
        LinkAttribute::LinkInfo(vec![
            LinkInfo::Kind(InfoKind::Vxlan),
            LinkInfo::Data(InfoData::Vxlan(vec![
                InfoVxlan::Id(vni),
                InfoVxlan::Local(local),
                InfoVxlan::Link(underlay_index),
                InfoVxlan::Port(port),
                InfoVxlan::Learning(false),
            ])),
        ]),
    ];
    RouteNetlinkMessage::NewLink(msg)
}

/// Moves a link (by name) into the namespace held by `netns`.
pub fn move_to_netns(name: &IfName, netns: RawFd) -> RouteNetlinkMessage {
    move_to_netns_as(name, netns, 0)
}

/// [`move_to_netns`], giving the link the ifindex `index` there (0: any).
pub fn move_to_netns_as(name: &IfName, netns: RawFd, index: u32) -> RouteNetlinkMessage {
    let mut msg = LinkMessage::default();
    msg.attributes = vec![
        LinkAttribute::IfName(name.to_string()),
        LinkAttribute::NetNsFd(netns),
    ];
    if index != 0 {
        msg.attributes.push(LinkAttribute::NewIfIndex(index as i32));
    }
    RouteNetlinkMessage::SetLink(msg)
}

/// A route to `destination` via `gateway` on link `oif`, even though the
/// gateway is on no local subnet (the VXLAN device's peers never are).
pub fn onlink_route(destination: Ipv4Network, gateway: Ipv4Addr, oif: u32) -> RouteNetlinkMessage {
    static_route(Some(destination), gateway, oif, RouteFlags::Onlink)
}

/// A static route in the main table; `None` is the default route.
fn static_route(
    destination: Option<Ipv4Network>,
    gateway: Ipv4Addr,
    oif: u32,
    flags: RouteFlags,
) -> RouteNetlinkMessage {
    let mut msg = RouteMessage::default();
    msg.header.address_family = AddressFamily::Inet;
    msg.header.table = RouteHeader::RT_TABLE_MAIN;
    msg.header.protocol = RouteProtocol::Static;
    msg.header.scope = RouteScope::Universe;
    msg.header.kind = RouteType::Unicast;
    msg.header.flags = flags;
    if let Some(d) = destination {
        msg.header.destination_prefix_length = d.prefix();
        msg.attributes
            .push(RouteAttribute::Destination(RouteAddress::Inet(d.network())));
    }
    msg.attributes.extend([
        RouteAttribute::Gateway(RouteAddress::Inet(gateway)),
        RouteAttribute::Oif(oif),
    ]);
    RouteNetlinkMessage::NewRoute(msg)
}

/// Deletes the route to `destination` from the main table.
pub fn delete_route(destination: Ipv4Network) -> RouteNetlinkMessage {
    let mut msg = RouteMessage::default();
    msg.header.address_family = AddressFamily::Inet;
    msg.header.destination_prefix_length = destination.prefix();
    msg.header.table = RouteHeader::RT_TABLE_MAIN;
    msg.header.scope = RouteScope::NoWhere;
    msg.attributes = vec![RouteAttribute::Destination(RouteAddress::Inet(
        destination.network(),
    ))];
    RouteNetlinkMessage::DelRoute(msg)
}

/// A permanent ARP entry: `ip` is at `mac` on link `index`.
pub fn permanent_neighbour(index: u32, ip: Ipv4Addr, mac: [u8; 6]) -> RouteNetlinkMessage {
    let mut msg = NeighbourMessage::default();
    msg.header.family = AddressFamily::Inet;
    msg.header.ifindex = index;
    msg.header.state = NeighbourState::Permanent;
    msg.attributes = vec![
        NeighbourAttribute::Destination(NeighbourAddress::Inet(ip)),
        NeighbourAttribute::LinkLayerAddress(mac.to_vec()),
    ];
    RouteNetlinkMessage::NewNeighbour(msg)
}

/// Deletes the ARP entry for `ip` on link `index`.
pub fn delete_neighbour(index: u32, ip: Ipv4Addr) -> RouteNetlinkMessage {
    let mut msg = NeighbourMessage::default();
    msg.header.family = AddressFamily::Inet;
    msg.header.ifindex = index;
    msg.attributes = vec![NeighbourAttribute::Destination(NeighbourAddress::Inet(ip))];
    RouteNetlinkMessage::DelNeighbour(msg)
}

/// A VXLAN FDB entry (`bridge fdb append MAC dev VXLAN dst REMOTE self
/// permanent`): frames for `mac` go to the VTEP at `remote`.
pub fn vxlan_fdb(index: u32, mac: [u8; 6], remote: Ipv4Addr) -> RouteNetlinkMessage {
    let mut msg = NeighbourMessage::default();
    msg.header.family = AddressFamily::Bridge;
    msg.header.ifindex = index;
    msg.header.state = NeighbourState::Permanent;
    msg.header.flags = NeighbourFlags::Own;
    msg.attributes = vec![
        NeighbourAttribute::LinkLayerAddress(mac.to_vec()),
        NeighbourAttribute::Destination(NeighbourAddress::Inet(remote)),
    ];
    RouteNetlinkMessage::NewNeighbour(msg)
}

/// Deletes a VXLAN FDB entry.
pub fn delete_vxlan_fdb(index: u32, mac: [u8; 6], remote: Ipv4Addr) -> RouteNetlinkMessage {
    match vxlan_fdb(index, mac, remote) {
        RouteNetlinkMessage::NewNeighbour(m) => RouteNetlinkMessage::DelNeighbour(m),
        other => other,
    }
}

/// Dumps a family's neighbour table (`Inet` for ARP, `Bridge` for the FDB).
pub fn dump_neighbours(family: AddressFamily) -> RouteNetlinkMessage {
    let mut msg = NeighbourMessage::default();
    msg.header.family = family;
    RouteNetlinkMessage::GetNeighbour(msg)
}

/// Dumps the IPv4 neighbour (ARP) table, entries in every state.
pub fn dump_ipv4_neighbours() -> RouteNetlinkMessage {
    dump_neighbours(AddressFamily::Inet)
}

/// Dumps every bridge forwarding database (`bridge fdb show`: bridges'
/// entries and each link's own unicast and multicast address lists).
pub fn dump_fdb() -> RouteNetlinkMessage {
    dump_neighbours(AddressFamily::Bridge)
}

/// Sets the link with this index up.
pub fn set_up(index: u32) -> RouteNetlinkMessage {
    let mut msg = LinkMessage::default();
    msg.header.index = index;
    msg.header.flags = LinkFlags::Up;
    msg.header.change_mask = LinkFlags::Up;
    RouteNetlinkMessage::SetLink(msg)
}

/// Sets the link with this index down.
pub fn set_down(index: u32) -> RouteNetlinkMessage {
    let mut msg = LinkMessage::default();
    msg.header.index = index;
    msg.header.change_mask = LinkFlags::Up;
    RouteNetlinkMessage::SetLink(msg)
}

/// Attaches a link (by name) to a bridge and sets it up.
pub fn attach_up(name: &IfName, master: u32) -> RouteNetlinkMessage {
    let mut msg = LinkMessage::default();
    msg.header.flags = LinkFlags::Up;
    msg.header.change_mask = LinkFlags::Up;
    msg.attributes = vec![
        LinkAttribute::IfName(name.to_string()),
        LinkAttribute::Controller(master),
    ];
    RouteNetlinkMessage::SetLink(msg)
}

/// Deletes a link by name.
pub fn delete_link(name: &str) -> RouteNetlinkMessage {
    let mut msg = LinkMessage::default();
    msg.attributes = vec![LinkAttribute::IfName(name.to_string())];
    RouteNetlinkMessage::DelLink(msg)
}

/// Looks a link up by name (non-dump GET).
pub fn get_link(name: &IfName) -> RouteNetlinkMessage {
    let mut msg = LinkMessage::default();
    msg.attributes = vec![LinkAttribute::IfName(name.to_string())];
    RouteNetlinkMessage::GetLink(msg)
}

/// Dumps all links.
pub fn dump_links() -> RouteNetlinkMessage {
    RouteNetlinkMessage::GetLink(LinkMessage::default())
}

/// Dumps all IPv4 addresses.
pub fn dump_ipv4_addresses() -> RouteNetlinkMessage {
    let mut msg = AddressMessage::default();
    msg.header.family = AddressFamily::Inet;
    RouteNetlinkMessage::GetAddress(msg)
}

/// Dumps the IPv4 routes of every table (local and main included: the
/// kernel does not filter by table here; callers check `header.table`).
pub fn dump_ipv4_routes() -> RouteNetlinkMessage {
    let mut msg = RouteMessage::default();
    msg.header.address_family = AddressFamily::Inet;
    RouteNetlinkMessage::GetRoute(msg)
}

/// An IPv4 address on the link with this index.
pub fn add_ipv4_address(index: u32, address: Ipv4Addr, prefix_len: u8) -> RouteNetlinkMessage {
    let mut msg = AddressMessage::default();
    msg.header.family = AddressFamily::Inet;
    msg.header.prefix_len = prefix_len;
    msg.header.scope = AddressScope::Universe;
    msg.header.index = index;
    msg.attributes = vec![
        AddressAttribute::Local(address.into()),
        AddressAttribute::Address(address.into()),
    ];
    if let Some(broadcast) = broadcast_of(address, prefix_len) {
        msg.attributes.push(AddressAttribute::Broadcast(broadcast));
    }
    RouteNetlinkMessage::NewAddress(msg)
}

/// The default IPv4 route via `gateway` out of the link with this index.
pub fn default_route(gateway: Ipv4Addr, oif: u32) -> RouteNetlinkMessage {
    static_route(None, gateway, oif, RouteFlags::empty())
}

fn broadcast_of(address: Ipv4Addr, prefix_len: u8) -> Option<Ipv4Addr> {
    (prefix_len < 31).then(|| {
        let host_mask = u32::MAX.checked_shr(u32::from(prefix_len)).unwrap_or(0);
        Ipv4Addr::from(u32::from(address) | host_mask)
    })
}

/// The name of a link in a dump reply.
pub fn link_name(msg: &LinkMessage) -> Option<&str> {
    msg.attributes.iter().find_map(|a| match a {
        LinkAttribute::IfName(n) => Some(n.as_str()),
        _ => None,
    })
}

/// The bridge (or other controller) a link is attached to.
pub fn link_master(msg: &LinkMessage) -> Option<u32> {
    msg.attributes.iter().find_map(|a| match a {
        LinkAttribute::Controller(i) => Some(*i),
        _ => None,
    })
}

/// A link's MAC in a dump reply, if it is an Ethernet one.
pub fn link_mac(msg: &LinkMessage) -> Option<[u8; 6]> {
    msg.attributes.iter().find_map(|a| match a {
        LinkAttribute::Address(mac) => <[u8; 6]>::try_from(mac.as_slice()).ok(),
        _ => None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn broadcast_follows_the_prefix() {
        let a = Ipv4Addr::new(10, 1, 2, 3);
        assert_eq!(broadcast_of(a, 24), Some(Ipv4Addr::new(10, 1, 2, 255)));
        assert_eq!(broadcast_of(a, 0), Some(Ipv4Addr::BROADCAST));
        assert_eq!(broadcast_of(a, 31), None);
    }
}
