//! Endpoints and the batched factory that builds them.
//!
//! An endpoint is a network namespace holding `lo` and `eth0` (one end of a veth
//! pair), both up, with an address and a default route via the node's bridge;
//! the other end of the pair sits in the node's namespace, attached to that
//! bridge. Building one costs:
//!
//! 1. `unshare(CLONE_NEWNET)` on a worker thread, keeping the namespace by fd,
//!    opening a netlink socket right there (it stays bound to it) and opening
//!    its `ping_group_range` to every group;
//! 2. ONE request in the node's namespace creating the pair with its peer
//!    placed straight into the endpoint's namespace as `eth0`, index 2, and the
//!    host end up and attached to the bridge, then the requests locking that
//!    port to the endpoint's MAC and address ([`crate::guard`]): many per
//!    datagram; then the router's permanent ARP entries;
//! 3. ONE datagram on the endpoint's socket: `lo` up, `eth0` up, address,
//!    default route.
//!
//! Workers (one per core by default) each take a share of a batch. An endpoint
//! whose build fails is dropped whole: closing its namespace fd makes the kernel
//! remove the namespace with its end of the pair, and the pair with it.
//!
//! The pieces, one file each:
//!
//! - this file: [`Endpoint`], what it is built from ([`EndpointSpec`]) and
//!   how building fails ([`EndpointError`]);
//! - `factory`: [`EndpointFactory`], which hands batches to the workers;
//! - `workers`: the worker threads and the three build steps above;
//! - `unbound`: [`UnboundEndpoint`], built without an address, bound on claim;
//! - `inspect`: reading an endpoint's links and addresses back from the kernel;
//! - `neighbours`: listing and forgetting ARP entries.

mod factory;
mod inspect;
mod neighbours;
mod unbound;
mod workers;

use std::net::Ipv4Addr;

use ipnetwork::Ipv4Network;

use crate::guard::PortIdentity;
use crate::names::{IfName, NameError};
use crate::netlink::{messages, NetlinkError, NetlinkSocket, Request, RequestError};
use crate::netns::{NetNs, NetNsError};

pub use factory::{BuildPriority, EndpointFactory, FactoryConfig};
pub use inspect::{list_ipv4_addresses, list_links, EndpointState, LinkState};
pub use neighbours::{forget_arp_entries, forget_neighbours_in, list_arp_entries, ArpEntry};
pub use unbound::UnboundEndpoint;

/// The endpoint's interface, as a function sees it.
pub const ENDPOINT_IFNAME: &str = "eth0";
/// `eth0`'s index inside the endpoint (loopback is 1 in every new namespace);
/// fixed so that the in-namespace requests need no lookup.
pub const ENDPOINT_IFINDEX: u32 = 2;

#[derive(Debug, thiserror::Error)]
pub enum EndpointError {
    #[error(transparent)]
    Namespace(#[from] NetNsError),
    #[error(transparent)]
    Netlink(#[from] NetlinkError),
    #[error(transparent)]
    Request(#[from] RequestError),
    #[error(transparent)]
    Name(#[from] NameError),
    #[error("the endpoint factory's worker stopped: {0}")]
    WorkerGone(String),
    #[error("cannot set the endpoint's ping_group_range: {0}")]
    Sysctl(#[source] std::io::Error),
}

/// What an endpoint should look like.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EndpointSpec {
    /// The endpoint's address with the block's prefix length.
    pub address: Ipv4Network,
    pub gateway: Ipv4Addr,
}

impl EndpointSpec {
    /// Specs for up to `n` endpoints with addresses from `block` (fewer if it
    /// runs out), all routed via the block's gateway.
    pub fn allocate(block: &mut crate::ipam::AddressBlock, n: usize) -> Vec<Self> {
        let gateway = block.gateway();
        block
            .allocate_many(n)
            .into_iter()
            .map(|address| Self { address, gateway })
            .collect()
    }

    /// What the inside of an endpoint needs on its interface `index`: the
    /// address, the default route, and a permanent ARP entry for the
    /// gateway (the router's bridge, whose MAC follows from its address:
    /// [`crate::bridge::gateway_mac`]). With it no endpoint ever asks for
    /// its gateway, so a burst of thousands adds nothing to the kernel's
    /// one neighbour table for all namespaces (`gc_thresh3`).
    pub(crate) fn requests_on(&self, index: u32) -> [Request; 3] {
        let addr = self.address;
        [
            Request::create(
                format!("add {addr}"),
                messages::add_ipv4_address(index, addr.ip(), addr.prefix()),
            ),
            Request::create(
                format!("add default route via {}", self.gateway),
                messages::default_route(self.gateway, index),
            ),
            Request::replace(
                format!("permanent ARP entry for the gateway {}", self.gateway),
                messages::permanent_neighbour(
                    index,
                    self.gateway,
                    crate::bridge::gateway_mac(self.gateway),
                ),
            ),
        ]
    }
}

/// A built endpoint. Dropping it destroys it (the kernel removes the namespace,
/// its `eth0` and the host end of the pair).
#[derive(Debug)]
pub struct Endpoint {
    id: u64,
    netns: NetNs,
    host_ifname: IfName,
    /// The host end's index and `eth0`'s MAC, which its port is locked to.
    port: PortIdentity,
    spec: EndpointSpec,
}

impl Endpoint {
    pub fn id(&self) -> u64 {
        self.id
    }

    pub fn netns(&self) -> &NetNs {
        &self.netns
    }

    pub fn netns_mut(&mut self) -> &mut NetNs {
        &mut self.netns
    }

    /// The host end of the veth pair, in the node's namespace.
    pub fn host_ifname(&self) -> &IfName {
        &self.host_ifname
    }

    pub fn address(&self) -> Ipv4Network {
        self.spec.address
    }

    /// `eth0`'s MAC, the only one its bridge port forwards from.
    pub fn mac(&self) -> [u8; 6] {
        self.port.mac
    }

    /// `eth0`'s MAC and, if its port is locked ([`crate::guard`]), the
    /// host end's index in the router it was built in or bound to.
    pub fn port(&self) -> PortIdentity {
        self.port
    }

    pub fn gateway(&self) -> Ipv4Addr {
        self.spec.gateway
    }

    /// Reads the endpoint's links and IPv4 addresses back from the kernel.
    pub fn inspect(&self) -> Result<EndpointState, EndpointError> {
        let mut socket = NetlinkSocket::open_in(&self.netns)?;
        EndpointState::read(&mut socket)
    }

    /// Whether the namespace holds exactly what it was built with: `lo` and
    /// `eth0`, up, `eth0` with its MAC, and only its own IPv4 addresses. A
    /// function that added an interface or an address, or changed the MAC
    /// (its port would drop all it sends), leaves an endpoint that must not
    /// be reused.
    pub fn is_clean(&self) -> Result<bool, EndpointError> {
        let state = self.inspect()?;
        let mac_kept = state
            .links
            .iter()
            .any(|l| l.index == ENDPOINT_IFINDEX && l.mac == Some(self.port.mac));
        let mut links: Vec<_> = state
            .links
            .iter()
            .map(|l| (l.name.as_str(), l.up))
            .collect();
        links.sort();
        let mut addrs: Vec<_> = state
            .ipv4
            .iter()
            .map(|(i, a)| (*i, a.to_string()))
            .collect();
        addrs.sort();
        let mut expected_addrs = vec![
            (messages::LOOPBACK_INDEX, "127.0.0.1/8".to_string()),
            (ENDPOINT_IFINDEX, self.address().to_string()),
        ];
        expected_addrs.sort();
        Ok(mac_kept && links == [(ENDPOINT_IFNAME, true), ("lo", true)] && addrs == expected_addrs)
    }

    /// Forgets every neighbour (ARP) entry the endpoint learnt: the peers
    /// it talked to may be gone and their addresses reused by endpoints with
    /// other MACs, so its next user must start with the empty cache the
    /// first one had. For the pool's recycler, before reuse.
    pub fn forget_neighbours(&self) -> Result<(), EndpointError> {
        forget_neighbours_in(&self.netns)
    }

    /// Destroys the endpoint (same as dropping it, but says so).
    pub fn destroy(self) {}
}
