//! The bridge a node's endpoints (of one tenant) hang off.

use std::net::Ipv4Addr;

use ipnetwork::Ipv4Network;
use netlink_packet_route::RouteNetlinkMessage;

use crate::names::IfName;
use crate::netlink::{messages, NetlinkError, NetlinkSocket, Request};

/// The most ports a Linux bridge takes (`BR_MAX_PORTS` is 1024 and port 0
/// is never used); one more is refused with EXFULL. Every endpoint of a
/// tenant on a node is a port of its router's one bridge, so this is the
/// most endpoints a tenant holds on one node.
pub const MAX_PORTS: usize = 1023;

/// A bridge in the socket's namespace.
#[derive(Debug, Clone)]
pub struct Bridge {
    pub name: IfName,
    pub index: u32,
}

impl Bridge {
    /// Creates the bridge, up, with the gateway address on it (and the MAC
    /// that address implies, [`gateway_mac`]; else a random one). On failure
    /// nothing is left: a bridge whose address could not be set is deleted.
    pub fn create(
        socket: &mut NetlinkSocket,
        name: &IfName,
        gateway: Option<Ipv4Network>,
    ) -> Result<Self, NetlinkError> {
        socket.execute_all(&[Request::create(
            format!("create bridge {name}"),
            messages::bridge(
                name,
                match gateway {
                    Some(gw) => gateway_mac(gw.ip()),
                    None => random_mac()?,
                },
            ),
        )])?;
        let built = Self::lookup(socket, name).and_then(|bridge| {
            if let Some(gw) = gateway {
                socket.execute_all(&[Request::create(
                    format!("add {gw} to bridge {name}"),
                    messages::add_ipv4_address(bridge.index, gw.ip(), gw.prefix()),
                )])?;
            }
            Ok(bridge)
        });
        if built.is_err() {
            let _ = delete_link(socket, name.as_str());
        }
        built
    }

    /// Finds an existing link by name.
    pub fn lookup(socket: &mut NetlinkSocket, name: &IfName) -> Result<Self, NetlinkError> {
        let replies = socket.query(&format!("look up {name}"), messages::get_link(name), false)?;
        replies
            .into_iter()
            .find_map(|m| match m {
                RouteNetlinkMessage::NewLink(l) => Some(Self {
                    name: name.clone(),
                    index: l.header.index,
                }),
                _ => None,
            })
            .ok_or_else(|| NetlinkError::Decode(format!("no link message for {name}")))
    }

    pub fn delete(self, socket: &mut NetlinkSocket) -> Result<(), NetlinkError> {
        delete_link(socket, self.name.as_str())
    }
}

/// The MAC of the bridge whose address is `gateway`: locally administered,
/// derived from the address, so an endpoint's permanent ARP entry for its
/// gateway needs nothing but the endpoint's spec. Unique per router: a
/// tenant's blocks on different nodes have different gateways, and other
/// tenants' routers are other broadcast domains.
pub fn gateway_mac(gateway: Ipv4Addr) -> [u8; 6] {
    let o = gateway.octets();
    [0x02, 0x60, o[0], o[1], o[2], o[3]]
}

/// A random, locally administered, unicast MAC.
fn random_mac() -> Result<[u8; 6], NetlinkError> {
    let mut mac = [0u8; 6];
    getrandom::fill(&mut mac)
        .map_err(|e| NetlinkError::Io(std::io::Error::other(e.to_string())))?;
    mac[0] = (mac[0] & 0xfe) | 0x02;
    Ok(mac)
}

pub(crate) fn delete_link(socket: &mut NetlinkSocket, name: &str) -> Result<(), NetlinkError> {
    socket.execute_all(&[Request::change(
        format!("delete link {name}"),
        messages::delete_link(name),
    )])
}
