//! An endpoint's neighbour (ARP) entries: listing them, and forgetting the
//! ones a released endpoint must not pass on to its next user.

use std::net::Ipv4Addr;

use netlink_packet_route::neighbour::NeighbourState;
use netlink_packet_route::RouteNetlinkMessage;

use super::EndpointError;
use crate::netlink::{messages, NetlinkError, NetlinkSocket, Request};
use crate::netns::NetNs;

/// Forgets every neighbour (ARP) entry a namespace learnt (an endpoint's,
/// by its namespace alone: the pool sweeps idle endpoints without taking
/// them). The permanent entry for its gateway is ours and stays.
pub fn forget_neighbours_in(netns: &NetNs) -> Result<(), EndpointError> {
    let mut socket = NetlinkSocket::open_in(netns)?;
    forget_arp_entries(&mut socket, ArpEntry::learnt)?;
    Ok(())
}

/// One IPv4 neighbour entry as the kernel reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ArpEntry {
    pub index: u32,
    pub ip: Ipv4Addr,
    pub state: NeighbourState,
}

impl ArpEntry {
    /// A multicast or broadcast mapping the kernel computes (NOARP) and
    /// collects on its own timers.
    pub fn computed(&self) -> bool {
        self.state == NeighbourState::Noarp
    }

    /// Learnt from traffic, as opposed to set by us (permanent) or computed
    /// by the kernel.
    pub fn learnt(&self) -> bool {
        !self.computed() && self.state != NeighbourState::Permanent
    }
}

/// The IPv4 neighbour entries of the socket's namespace, every state.
pub fn list_arp_entries(socket: &mut NetlinkSocket) -> Result<Vec<ArpEntry>, NetlinkError> {
    use netlink_packet_route::neighbour::{NeighbourAddress, NeighbourAttribute};
    Ok(socket
        .query("list neighbours", messages::dump_ipv4_neighbours(), true)?
        .into_iter()
        .filter_map(|m| match m {
            RouteNetlinkMessage::NewNeighbour(n) => n.attributes.iter().find_map(|a| match a {
                NeighbourAttribute::Destination(NeighbourAddress::Inet(ip)) => Some(ArpEntry {
                    index: n.header.ifindex,
                    ip: *ip,
                    state: n.header.state,
                }),
                _ => None,
            }),
            _ => None,
        })
        .collect())
}

/// Deletes the ARP entries of the socket's namespace that `forget` picks;
/// how many went. One that expired meanwhile is gone already: fine.
pub fn forget_arp_entries(
    socket: &mut NetlinkSocket,
    forget: impl Fn(&ArpEntry) -> bool,
) -> Result<usize, NetlinkError> {
    let doomed: Vec<Request> = list_arp_entries(socket)?
        .into_iter()
        .filter(|e| forget(e))
        .map(|e| {
            Request::change(
                format!("forget the ARP entry of {}", e.ip),
                messages::delete_neighbour(e.index, e.ip),
            )
        })
        .collect();
    if doomed.is_empty() {
        return Ok(0);
    }
    let mut forgotten = 0;
    for outcome in socket.execute(&doomed)? {
        match outcome {
            Ok(_) => forgotten += 1,
            Err(e) if e.errno() == Some(nix::libc::ENOENT) => {}
            Err(e) => return Err(NetlinkError::Request(e)),
        }
    }
    Ok(forgotten)
}
