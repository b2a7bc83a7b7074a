//! Reading an endpoint's state back from the kernel: its links and IPv4
//! addresses, as one dump each on a socket in its namespace.

use ipnetwork::Ipv4Network;
use netlink_packet_route::address::AddressAttribute;
use netlink_packet_route::link::LinkFlags;
use netlink_packet_route::RouteNetlinkMessage;

use super::EndpointError;
use crate::netlink::{messages, NetlinkError, NetlinkSocket};

/// A link as the kernel reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LinkState {
    pub index: u32,
    pub name: String,
    pub up: bool,
    pub master: Option<u32>,
    /// The link's MAC, if it has an Ethernet one.
    pub mac: Option<[u8; 6]>,
}

/// An endpoint's links and IPv4 addresses (by link index), read from the kernel.
#[derive(Debug, Clone)]
pub struct EndpointState {
    pub links: Vec<LinkState>,
    pub ipv4: Vec<(u32, Ipv4Network)>,
}

impl EndpointState {
    /// Reads the links and IPv4 addresses of the socket's namespace.
    pub fn read(socket: &mut NetlinkSocket) -> Result<Self, EndpointError> {
        Ok(Self {
            links: list_links(socket)?,
            ipv4: list_ipv4_addresses(socket)?,
        })
    }
}

/// All links of the socket's namespace.
pub fn list_links(socket: &mut NetlinkSocket) -> Result<Vec<LinkState>, NetlinkError> {
    let replies = socket.query("list links", messages::dump_links(), true)?;
    Ok(replies
        .into_iter()
        .filter_map(|m| match m {
            RouteNetlinkMessage::NewLink(l) => Some(LinkState {
                index: l.header.index,
                name: messages::link_name(&l).unwrap_or_default().to_string(),
                up: l.header.flags.contains(LinkFlags::Up),
                master: messages::link_master(&l),
                mac: messages::link_mac(&l),
            }),
            _ => None,
        })
        .collect())
}

/// All IPv4 addresses of the socket's namespace, by link index.
pub fn list_ipv4_addresses(
    socket: &mut NetlinkSocket,
) -> Result<Vec<(u32, Ipv4Network)>, NetlinkError> {
    let replies = socket.query("list addresses", messages::dump_ipv4_addresses(), true)?;
    Ok(replies
        .into_iter()
        .filter_map(|m| match m {
            RouteNetlinkMessage::NewAddress(a) => {
                let ip = a.attributes.iter().find_map(|attr| match attr {
                    AddressAttribute::Local(std::net::IpAddr::V4(ip)) => Some(*ip),
                    _ => None,
                })?;
                let net = Ipv4Network::new(ip, a.header.prefix_len).ok()?;
                Some((a.header.index, net))
            }
            _ => None,
        })
        .collect())
}
