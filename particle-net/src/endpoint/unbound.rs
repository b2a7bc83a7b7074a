//! Endpoints of the tenant-free pool: built without an address, bound to a
//! tenant when claimed.

use super::workers::address_requests;
use super::{Endpoint, EndpointError, EndpointSpec};
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
    /// `home` is a socket in into `target` (the tenant's router), attaches it
    /// to `bridge` there and up through `target_socket`, and gives the inside
    /// its address and route. Three round trips. On failure the endpoint is
    /// destroyed with everything it had.
    pub fn bind(
        mut self,
        home: &mut NetlinkSocket,
        target: &NetNs,
        target_socket: &mut NetlinkSocket,
        bridge: u32,
        spec: EndpointSpec,
    ) -> Result<Endpoint, EndpointError> {
        let name = &self.host_ifname;
        home.execute_all(&[Request::change(
            format!("move {name} to the tenant"),
            messages::move_to_netns(name, std::os::fd::AsRawFd::as_raw_fd(target)),
        )])?;
        target_socket.execute_all(&[Request::change(
            format!("attach {name} to the tenant bridge"),
            messages::attach_up(name, bridge),
        )])?;
        self.socket.execute_all(&address_requests(&spec))?;
        Ok(Endpoint {
            id: self.id,
            netns: self.netns,
            host_ifname: self.host_ifname,
            spec,
        })
    }
}
