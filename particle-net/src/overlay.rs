//! The per-tenant VXLAN overlay on one node.
//!
//! Each tenant gets, on each node, a namespace of its own (the tenant's
//! router): its bridge (the gateway of the node's block, where the tenant's
//! endpoints attach) and its VXLAN device live there. A namespace rather than
//! a VRF because it isolates by construction: a tenant's router has no route,
//! ARP entry or socket of any other tenant, so a guessed address of another
//! tenant is simply unreachable; and VRF is not built into every kernel (not
//! into this project's). The VXLAN device is created in the node's namespace,
//! where the underlay is, and then moved into the tenant's: its UDP socket
//! stays in the node's namespace, shared by all tenants and told apart by VNI.
//!
//! No learning, no multicast: a remote node's block is reached with one route,
//! one permanent ARP entry and one FDB entry (the flannel scheme), so endpoints
//! made on one node change nothing anywhere else. A VTEP's MAC is derived from
//! its underlay address, so every node knows every other's without asking.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::os::fd::AsRawFd;

use ipnetwork::Ipv4Network;
use netlink_packet_route::AddressFamily;

use crate::bridge::{delete_link, Bridge};
use crate::endpoint::{Endpoint, EndpointFactory, EndpointSpec, FactoryConfig, UnboundEndpoint};
use crate::ipam::AddressBlock;
use crate::names::{IfName, NameError, RunPrefix};
use crate::netlink::{messages, NetlinkError, NetlinkSocket, Request};
use crate::netns::{NetNs, NetNsError};

/// The IANA VXLAN port.
pub const VXLAN_PORT: u16 = 4789;
/// The largest 24-bit VXLAN network identifier.
pub const MAX_VNI: u32 = (1 << 24) - 1;

#[derive(Debug, thiserror::Error)]
pub enum OverlayError {
    #[error(transparent)]
    Netlink(#[from] NetlinkError),
    #[error(transparent)]
    Namespace(#[from] NetNsError),
    #[error(transparent)]
    Name(#[from] NameError),
    #[error(transparent)]
    Endpoint(#[from] crate::endpoint::EndpointError),
    #[error(transparent)]
    Ipam(#[from] crate::ipam::IpamError),
    #[error("VNI {0} is outside 1..={MAX_VNI}")]
    BadVni(u32),
    #[error("cannot enable forwarding in the tenant namespace: {0}")]
    Forwarding(std::io::Error),
}

/// Where a node meets the underlay: the interface (in the node's namespace)
/// and its address.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Underlay {
    pub index: u32,
    pub address: Ipv4Addr,
}

/// Another node's share of a tenant: its VTEP and its block.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct RemoteBlock {
    pub underlay: Ipv4Addr,
    pub block: Ipv4Network,
}

/// The VTEP MAC of the node at `underlay`: locally administered, unique per node.
pub fn vtep_mac(underlay: Ipv4Addr) -> [u8; 6] {
    let o = underlay.octets();
    [0x02, 0x50, o[0], o[1], o[2], o[3]]
}

/// One tenant's overlay on one node.
#[derive(Debug)]
pub struct TenantNetwork {
    vni: u32,
    block: Ipv4Network,
    netns: NetNs,
    socket: NetlinkSocket,
    bridge: Bridge,
    vxlan: IfName,
    vxlan_index: u32,
    remotes: BTreeMap<Ipv4Addr, Ipv4Network>,
}

impl TenantNetwork {
    /// Builds the tenant's router namespace, bridge and VXLAN device on the
    /// node whose namespace `node` is a socket in. All or nothing: on failure
    /// the namespace (and whatever was moved into it) goes with the error.
    pub fn create(
        node: &mut NetlinkSocket,
        prefix: &RunPrefix,
        underlay: Underlay,
        vni: u32,
        block: Ipv4Network,
    ) -> Result<Self, OverlayError> {
        if vni == 0 || vni > MAX_VNI {
            return Err(OverlayError::BadVni(vni));
        }
        let (netns, inside) = NetNs::create_with(|| {
            // Per-namespace sysctl: the router forwards between bridge and VXLAN.
            std::fs::write("/proc/sys/net/ipv4/ip_forward", "1")
                .map_err(OverlayError::Forwarding)?;
            Ok::<_, OverlayError>(NetlinkSocket::open()?)
        })?;
        let netns = netns.into_managed();
        let mut socket = inside?;
        let gateway = AddressBlock::new(block)?.gateway_cidr();
        let bridge = Bridge::create(
            &mut socket,
            &prefix.ifname('b', u64::from(vni))?,
            Some(gateway),
        )?;

        let vxlan = prefix.ifname('x', u64::from(vni))?;
        node.execute_all(&[Request::create(
            format!("create vxlan {vxlan} (VNI {vni})"),
            messages::vxlan(
                &vxlan,
                vni,
                underlay.address,
                underlay.index,
                VXLAN_PORT,
                vtep_mac(underlay.address),
            ),
        )])?;
        if let Err(e) = node.execute_all(&[Request::change(
            format!("move {vxlan} into the tenant namespace"),
            messages::move_to_netns(&vxlan, netns.as_raw_fd()),
        )]) {
            let _ = delete_link(node, vxlan.as_str());
            return Err(e.into());
        }
        let vxlan_index = Bridge::lookup(&mut socket, &vxlan)?.index;
        socket.execute_all(&[
            // The block's network address names this node's VTEP inside the overlay.
            Request::create(
                format!("add {}/32 to {vxlan}", block.network()),
                messages::add_ipv4_address(vxlan_index, block.network(), 32),
            ),
            Request::change(format!("set {vxlan} up"), messages::set_up(vxlan_index)),
        ])?;
        Ok(Self {
            vni,
            block,
            netns,
            socket,
            bridge,
            vxlan,
            vxlan_index,
            remotes: BTreeMap::new(),
        })
    }

    pub fn vni(&self) -> u32 {
        self.vni
    }

    pub fn block(&self) -> Ipv4Network {
        self.block
    }

    pub fn netns(&self) -> &NetNs {
        &self.netns
    }

    pub fn netns_mut(&mut self) -> &mut NetNs {
        &mut self.netns
    }

    pub fn bridge(&self) -> &Bridge {
        &self.bridge
    }

    pub fn vxlan(&self) -> &IfName {
        &self.vxlan
    }

    /// What binding a tenant-free endpoint to this tenant needs: the router
    /// namespace, a socket of its own in it, and the bridge.
    pub fn binder(&self) -> Result<TenantBinder, OverlayError> {
        Ok(TenantBinder {
            netns: self.netns.try_clone()?,
            socket: NetlinkSocket::open_in(&self.netns)?,
            bridge: self.bridge.index,
        })
    }

    /// A factory that builds this tenant's endpoints on this node.
    pub fn factory(
        &self,
        prefix: &RunPrefix,
        workers: usize,
    ) -> Result<EndpointFactory, OverlayError> {
        Ok(EndpointFactory::new(FactoryConfig {
            home: self.netns.try_clone()?,
            bridge_index: Some(self.bridge.index),
            lock_ports: true,
            prefix: prefix.clone(),
            workers,
        })?)
    }

    /// Makes the remote entries match `desired`: adds what is new, replaces
    /// what moved, removes what is gone. Three entries per remote node.
    pub fn apply_remotes(&mut self, desired: &[RemoteBlock]) -> Result<(), OverlayError> {
        let wanted: BTreeMap<Ipv4Addr, Ipv4Network> =
            desired.iter().map(|r| (r.underlay, r.block)).collect();
        let mut requests = Vec::new();
        for (underlay, block) in &self.remotes {
            if wanted.get(underlay) != Some(block) {
                requests.extend(self.remote_entries(*underlay, *block, false));
            }
        }
        for (underlay, block) in &wanted {
            if self.remotes.get(underlay) != Some(block) {
                requests.extend(self.remote_entries(*underlay, *block, true));
            }
        }
        let outcomes = self.socket.execute(&requests)?;
        self.remotes = wanted;
        // Deleting what is already gone is fine; anything else is an error.
        for outcome in outcomes {
            match outcome {
                Err(e)
                    if e.errno() == Some(nix::libc::ENOENT)
                        || e.errno() == Some(nix::libc::ESRCH) => {}
                Err(e) => return Err(NetlinkError::from(e).into()),
                Ok(()) => {}
            }
        }
        Ok(())
    }

    fn remote_entries(&self, underlay: Ipv4Addr, block: Ipv4Network, add: bool) -> Vec<Request> {
        let vtep = block.network();
        let mac = vtep_mac(underlay);
        let i = self.vxlan_index;
        if add {
            vec![
                Request::replace(
                    format!("route {block} via {vtep}"),
                    messages::onlink_route(block, vtep, i),
                ),
                Request::replace(
                    format!("neighbour {vtep} at VTEP {underlay}"),
                    messages::permanent_neighbour(i, vtep, mac),
                ),
                Request::append(
                    format!("fdb entry for VTEP {underlay}"),
                    messages::vxlan_fdb(i, mac, underlay),
                ),
            ]
        } else {
            vec![
                Request::change(
                    format!("delete route {block}"),
                    messages::delete_route(block),
                ),
                Request::change(
                    format!("delete neighbour {vtep}"),
                    messages::delete_neighbour(i, vtep),
                ),
                Request::change(
                    format!("delete fdb entry for VTEP {underlay}"),
                    messages::delete_vxlan_fdb(i, mac, underlay),
                ),
            ]
        }
    }

    /// The overlay state this node holds for the tenant, as the kernel reports it.
    pub fn state_counts(&mut self) -> Result<OverlayCounts, OverlayError> {
        let routes = self
            .socket
            .query("list routes", messages::dump_ipv4_routes(), true)?
            .into_iter()
            .filter(|m| matches!(m, netlink_packet_route::RouteNetlinkMessage::NewRoute(r)
                if r.header.table == netlink_packet_route::route::RouteHeader::RT_TABLE_MAIN
                    && r.attributes.iter().any(|a| matches!(a, netlink_packet_route::route::RouteAttribute::Oif(o) if *o == self.vxlan_index))))
            .count();
        let count_neigh = |socket: &mut NetlinkSocket, family| -> Result<usize, OverlayError> {
            Ok(socket
                .query("list neighbours", messages::dump_neighbours(family), true)?
                .into_iter()
                .filter(|m| matches!(m, netlink_packet_route::RouteNetlinkMessage::NewNeighbour(n)
                    if n.header.ifindex == self.vxlan_index
                        && n.header.state == netlink_packet_route::neighbour::NeighbourState::Permanent))
                .count())
        };
        let neighbours = count_neigh(&mut self.socket, AddressFamily::Inet)?;
        let fdb = count_neigh(&mut self.socket, AddressFamily::Bridge)?;
        Ok(OverlayCounts {
            routes,
            neighbours,
            fdb,
        })
    }
}

/// Binds tenant-free endpoints to one tenant on one node.
#[derive(Debug)]
pub struct TenantBinder {
    netns: NetNs,
    socket: NetlinkSocket,
    bridge: u32,
}

impl TenantBinder {
    /// The tenant router's namespace, a socket in it and its bridge's index
    /// (for [`crate::attach`]).
    pub(crate) fn parts(&mut self) -> (&NetNs, &mut NetlinkSocket, u32) {
        (&self.netns, &mut self.socket, self.bridge)
    }

    /// See [`UnboundEndpoint::bind`]; `home` is a socket in the namespace
    /// the endpoint was built in (the node's).
    pub fn bind(
        &mut self,
        home: &mut NetlinkSocket,
        endpoint: UnboundEndpoint,
        spec: EndpointSpec,
    ) -> Result<Endpoint, OverlayError> {
        Ok(endpoint.bind(home, &self.netns, &mut self.socket, self.bridge, spec)?)
    }
}

/// Overlay entries on a tenant's VXLAN device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OverlayCounts {
    pub routes: usize,
    pub neighbours: usize,
    pub fdb: usize,
}
