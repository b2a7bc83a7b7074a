//! Endpoints of the tenant-free pool: built without an address, bound to a
//! tenant when claimed.

use super::{Endpoint, EndpointError, EndpointSpec};
use crate::guard::{self, PortIdentity};
use crate::names::IfName;
use crate::netlink::{messages, NetlinkSocket, Request};
use crate::netns::NetNs;

/// An endpoint of the tenant-free pool: namespace, `lo` and `eth0` up, the
/// host end unattached in the node's namespace, no address yet. Dropping it
/// destroys it.
#[derive(Debug)]
pub struct UnboundEndpoint {
    // Visible to the factory, which builds these.
    pub(super) id: u64,
    pub(super) netns: NetNs,
    pub(super) host_ifname: IfName,
    /// `eth0`'s MAC (set at build) and the index the host end takes in the
    /// router it is bound to.
    pub(super) port: PortIdentity,
    /// A socket inside, so binding needs no thread to enter the namespace.
    pub(super) socket: NetlinkSocket,
}

impl UnboundEndpoint {
    pub fn id(&self) -> u64 {
        self.id
    }

    pub fn host_ifname(&self) -> &IfName {
        &self.host_ifname
    }

    /// Binds the endpoint to a tenant: moves its host end from the namespace
    /// `home` is a socket in into `target` (the tenant's router) under its
    /// port's index, attaches it to `bridge` there, up and locked to the
    /// endpoint's MAC and address ([`crate::guard`]) through
    /// `target_socket`, gives the inside its address, route and gateway
    /// ARP entry, and the router its ARP entry. Four round trips. On failure the endpoint is
    /// destroyed with everything it had (the rules go with its port).
    pub fn bind(
        mut self,
        home: &mut NetlinkSocket,
        target: &NetNs,
        target_socket: &mut NetlinkSocket,
        bridge: u32,
        spec: EndpointSpec,
    ) -> Result<Endpoint, EndpointError> {
        let name = &self.host_ifname;
        let ip = spec.address.ip();
        home.execute_all(&[Request::change(
            format!("move {name} to the tenant"),
            messages::move_to_netns_as(
                name,
                std::os::fd::AsRawFd::as_raw_fd(target),
                self.port.host_index,
            ),
        )])?;
        let mut attach = vec![Request::change(
            format!("attach {name} to the tenant bridge"),
            messages::attach_up(name, bridge),
        )];
        attach.extend(guard::lock_requests(&self.port, ip));
        target_socket.execute_all(&attach)?;
        self.socket
            .execute_all(&spec.requests_on(super::ENDPOINT_IFINDEX))?;
        target_socket.execute_all(&[guard::router_neighbour(bridge, ip, self.port.mac)])?;
        Ok(Endpoint {
            id: self.id,
            netns: self.netns,
            host_ifname: self.host_ifname,
            port: self.port,
            spec,
        })
    }
}
