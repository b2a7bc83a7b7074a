//! Lending an endpoint's interface to a namespace the endpoint does not own:
//! a container runtime's (CNI's `CNI_NETNS`).
//!
//! The endpoint was built warm: its `eth0` is one end of a veth pair whose
//! other end already sits on the tenant's bridge. Attaching moves that `eth0`
//! into the runtime's namespace under the name the runtime asked for (one
//! request: the kernel renames on the move), then sets it up with its address
//! and default route there in one datagram. Moving a link drops its addresses
//! and routes, so they are applied again on each side. Detaching moves it back
//! into the endpoint's own namespace as `eth0` with index 2 again (so the
//! pool's cleanliness check and in-namespace requests still hold) and restores
//! its address and route, after which the endpoint can go back to the pool.
//!
//! Moving a link between namespaces is the kernel's slow path: it waits for
//! an RCU barrier, 10-40 ms here (measured with `ip link set ... netns`),
//! more than building a veth pair. So there is a second way, [`TenantBinder::plug`]:
//! a veth pair made at attach time, one end on the tenant's (warm) bridge in
//! its router namespace and the peer created straight inside the runtime's
//! namespace under the runtime's name, no move at all; the address comes from
//! the tenant's warm block. docs/bench-cni.md has the numbers of both.
//!
//! Either way the host end's bridge port is locked to the interface's MAC
//! and address ([`crate::guard`]) in the tenant's router, which the
//! runtime cannot reach: a container keeping `CAP_NET_RAW`/`CAP_NET_ADMIN`
//! (Podman's and Kubernetes' default) cannot spoof from it. A moved
//! interface keeps the endpoint's port and its rules; a plugged pair gets
//! them in the request that creates it. The runtime's namespace itself is
//! the runtime's: its sysctls (`ping_group_range` among them, which
//! endpoints built by Particle open to every group) are left as it set them.

use std::net::Ipv4Addr;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicU64, Ordering};

use netlink_packet_route::link::{LinkAttribute, LinkMessage};
use netlink_packet_route::RouteNetlinkMessage;

use crate::endpoint::{Endpoint, EndpointSpec, ENDPOINT_IFINDEX, ENDPOINT_IFNAME};
use crate::guard::{self, PortIdentity};
use crate::names::{IfName, NameError, RunPrefix};
use crate::netlink::{messages, NetlinkError, NetlinkSocket, Request};
use crate::netns::{NetNs, NetNsError};
use crate::overlay::TenantBinder;

#[derive(Debug, thiserror::Error)]
pub enum AttachError {
    #[error(transparent)]
    Namespace(#[from] NetNsError),
    #[error(transparent)]
    Netlink(#[from] NetlinkError),
    #[error("no interface {0:?} in the namespace")]
    NoSuchInterface(String),
    #[error("interface {name}: {problem}")]
    Mismatch { name: String, problem: String },
    #[error(transparent)]
    Name(#[from] NameError),
}

/// The interface as the runtime's namespace has it after an attach.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AttachedInterface {
    pub name: IfName,
    pub index: u32,
    pub mac: [u8; 6],
}

impl AttachedInterface {
    /// `aa:bb:cc:dd:ee:ff`, as CNI results carry it.
    pub fn mac_string(&self) -> String {
        let m = self.mac;
        format!(
            "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
            m[0], m[1], m[2], m[3], m[4], m[5]
        )
    }
}

/// Sockets in two namespaces, opened on one short-lived thread (a socket stays
/// bound to the namespace it was opened in).
fn sockets_in(a: &NetNs, b: &NetNs) -> Result<(NetlinkSocket, NetlinkSocket), AttachError> {
    std::thread::scope(|s| {
        s.spawn(|| -> Result<_, AttachError> {
            a.enter_current_thread()?;
            let in_a = NetlinkSocket::open()?;
            b.enter_current_thread()?;
            let in_b = NetlinkSocket::open()?;
            Ok((in_a, in_b))
        })
        .join()
        .map_err(|_| AttachError::Namespace(NetNsError::ThreadPanicked))?
    })
}

/// Moves `endpoint`'s `eth0` into `target` as `ifname`, up, with the
/// endpoint's address and a default route via its gateway: one round trip to
/// rename, one to move, one to look the link up there, one datagram to
/// configure it. On failure nothing is left in `target` (a half-configured
/// interface is deleted there, which destroys its veth pair), and the
/// endpoint must be discarded, not reused.
pub fn attach(
    endpoint: &Endpoint,
    target: &NetNs,
    ifname: &IfName,
) -> Result<AttachedInterface, AttachError> {
    let (mut inside, mut there) = sockets_in(endpoint.netns(), target)?;
    // Renamed before the move, where no name can clash (a link can only be
    // renamed while down): a move that carries a new name moves the link
    // under its old one first and fails the rename after, leaving a stray
    // link in the runtime's namespace. This way a clash leaves it behind.
    inside.execute_all(&[
        Request::change(
            format!("set {ENDPOINT_IFNAME} down"),
            messages::set_down(ENDPOINT_IFINDEX),
        ),
        Request::change(
            format!("rename {ENDPOINT_IFNAME} to {ifname}"),
            rename_link(ENDPOINT_IFINDEX, ifname),
        ),
    ])?;
    inside.execute_all(&[Request::change(
        format!("move {ifname} into the runtime's namespace"),
        move_link(ENDPOINT_IFINDEX, target.as_raw_fd(), None),
    )])?;
    let configured = lookup(&mut there, ifname).and_then(|(index, mac)| {
        there.execute_all(&configure_requests(&spec_of(endpoint), index))?;
        Ok(AttachedInterface {
            name: ifname.clone(),
            index,
            mac,
        })
    });
    if configured.is_err() {
        let _ = there.execute_all(&[Request::change(
            format!("delete half-attached {ifname}"),
            messages::delete_link(ifname.as_str()),
        )]);
    }
    configured
}

/// Moves the interface `ifname` from `target` back into `endpoint`'s
/// namespace as `eth0` (index 2), up, with its address and default route: the
/// endpoint is then as it was built. If this fails the endpoint must be
/// discarded.
///
/// The link must still be the one attached (same MAC): a namespace path the
/// runtime reused must not give away someone else's interface.
pub fn detach(
    endpoint: &Endpoint,
    target: &NetNs,
    attached: &AttachedInterface,
) -> Result<(), AttachError> {
    let ifname = &attached.name;
    let (mut inside, mut there) = sockets_in(endpoint.netns(), target)?;
    let (index, mac) = lookup(&mut there, ifname)?;
    if mac != attached.mac {
        return Err(AttachError::Mismatch {
            name: ifname.to_string(),
            problem: format!(
                "is another link (MAC changed from {})",
                attached.mac_string()
            ),
        });
    }
    // Moved under its runtime name (nothing but `lo` can clash in the
    // endpoint), renamed there, where it arrives down.
    there.execute_all(&[Request::change(
        format!("move {ifname} back into its endpoint"),
        move_link(index, endpoint.netns().as_raw_fd(), Some(ENDPOINT_IFINDEX)),
    )])?;
    let eth0 = IfName::new(ENDPOINT_IFNAME).map_err(|e| AttachError::Mismatch {
        name: ENDPOINT_IFNAME.into(),
        problem: e.to_string(),
    })?;
    inside.execute_all(&[Request::change(
        format!("rename {ifname} to {ENDPOINT_IFNAME}"),
        rename_link(ENDPOINT_IFINDEX, &eth0),
    )])?;
    inside.execute_all(&configure_requests(&spec_of(endpoint), ENDPOINT_IFINDEX))?;
    Ok(())
}

/// Checks that `target` holds `ifname`, up, with `endpoint`'s address and a
/// default route via its gateway (CNI's CHECK).
pub fn verify(
    endpoint: &Endpoint,
    target: &NetNs,
    attached: &AttachedInterface,
) -> Result<(), AttachError> {
    verify_spec(&spec_of(endpoint), target, attached)
}

/// [`verify`] for an interface made with `spec`'s address and gateway.
pub fn verify_spec(
    spec: &EndpointSpec,
    target: &NetNs,
    attached: &AttachedInterface,
) -> Result<(), AttachError> {
    let ifname = &attached.name;
    let mut there = NetlinkSocket::open_in(target)?;
    let (_, mac) = lookup(&mut there, ifname)?;
    if mac != attached.mac {
        return Err(AttachError::Mismatch {
            name: ifname.to_string(),
            problem: format!(
                "is another link (MAC changed from {})",
                attached.mac_string()
            ),
        });
    }
    let links = crate::endpoint::list_links(&mut there)?;
    let link = links
        .iter()
        .find(|l| l.name == ifname.as_str())
        .ok_or_else(|| AttachError::NoSuchInterface(ifname.to_string()))?;
    let mismatch = |problem: String| AttachError::Mismatch {
        name: ifname.to_string(),
        problem,
    };
    if !link.up {
        return Err(mismatch("is down".into()));
    }
    let addresses = crate::endpoint::list_ipv4_addresses(&mut there)?;
    if !addresses.contains(&(link.index, spec.address)) {
        return Err(mismatch(format!("lacks address {}", spec.address)));
    }
    if !has_default_route(&mut there, spec.gateway, link.index)? {
        return Err(mismatch(format!("no default route via {}", spec.gateway)));
    }
    Ok(())
}

fn has_default_route(
    socket: &mut NetlinkSocket,
    gateway: Ipv4Addr,
    oif: u32,
) -> Result<bool, NetlinkError> {
    use netlink_packet_route::route::{RouteAddress, RouteAttribute, RouteHeader};
    let routes = socket.query("list routes", messages::dump_ipv4_routes(), true)?;
    Ok(routes.iter().any(|m| match m {
        RouteNetlinkMessage::NewRoute(r) => {
            r.header.table == RouteHeader::RT_TABLE_MAIN
                && r.header.destination_prefix_length == 0
                && r.attributes.contains(&RouteAttribute::Oif(oif))
                && r.attributes
                    .contains(&RouteAttribute::Gateway(RouteAddress::Inet(gateway)))
        }
        _ => false,
    }))
}

/// Index and MAC of the link named `name` in the socket's namespace.
fn lookup(socket: &mut NetlinkSocket, name: &IfName) -> Result<(u32, [u8; 6]), AttachError> {
    let replies = match socket.query(&format!("look up {name}"), messages::get_link(name), false) {
        Ok(r) => r,
        Err(NetlinkError::Request(e)) if e.errno() == Some(nix::libc::ENODEV) => {
            return Err(AttachError::NoSuchInterface(name.to_string()))
        }
        Err(e) => return Err(e.into()),
    };
    replies
        .into_iter()
        .find_map(|m| match m {
            RouteNetlinkMessage::NewLink(l) => {
                let mac = l.attributes.iter().find_map(|a| match a {
                    LinkAttribute::Address(mac) => <[u8; 6]>::try_from(mac.as_slice()).ok(),
                    _ => None,
                })?;
                Some((l.header.index, mac))
            }
            _ => None,
        })
        .ok_or_else(|| AttachError::NoSuchInterface(name.to_string()))
}

/// Moves link `index` into the namespace `netns`, optionally with a chosen
/// index there (IFLA_NEW_IFINDEX).
fn move_link(index: u32, netns: std::os::fd::RawFd, new_index: Option<u32>) -> RouteNetlinkMessage {
    let mut msg = LinkMessage::default();
    msg.header.index = index;
    msg.attributes = vec![LinkAttribute::NetNsFd(netns)];
    if let Some(i) = new_index {
        msg.attributes.push(LinkAttribute::NewIfIndex(i as i32));
    }
    RouteNetlinkMessage::SetLink(msg)
}

/// Renames link `index` (it must be down).
fn rename_link(index: u32, name: &IfName) -> RouteNetlinkMessage {
    let mut msg = LinkMessage::default();
    msg.header.index = index;
    msg.attributes = vec![LinkAttribute::IfName(name.to_string())];
    RouteNetlinkMessage::SetLink(msg)
}

fn spec_of(endpoint: &Endpoint) -> EndpointSpec {
    EndpointSpec {
        address: endpoint.address(),
        gateway: endpoint.gateway(),
    }
}

/// Up, address, default route, gateway ARP entry: one datagram.
fn configure_requests(spec: &EndpointSpec, index: u32) -> Vec<Request> {
    let mut requests = vec![Request::change(
        "set the interface up",
        messages::set_up(index),
    )];
    requests.extend(spec.requests_on(index));
    requests
}

/// Host ends of plugged pairs: `<prefix>k<n>`, unique in the process.
static NEXT_PLUG: AtomicU64 = AtomicU64::new(0);

/// The host end of a pair [`TenantBinder::plug`] makes: its name, and the
/// index and MAC its port is locked to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PlugHost {
    pub name: IfName,
    pub port: PortIdentity,
}

/// A fresh host end for [`TenantBinder::plug`].
pub fn plug_host(prefix: &RunPrefix) -> Result<PlugHost, NameError> {
    let n = NEXT_PLUG.fetch_add(1, Ordering::Relaxed);
    Ok(PlugHost {
        name: prefix.ifname('k', n)?,
        port: PortIdentity::plug(n),
    })
}

impl TenantBinder {
    /// Makes a veth pair for a runtime's namespace: `host` up on the
    /// tenant's bridge in its router namespace, locked to the peer's MAC and
    /// `spec`'s address, the peer created straight in `target` as `ifname`
    /// (one datagram, no namespace move), then up with `spec`'s address and
    /// default route there in one datagram, and the router's ARP entry for
    /// it. On failure nothing is left (the pair and the entry are deleted).
    /// `there` is a socket in `target`, opened by the caller (it takes a
    /// thread, so callers open it before taking whatever lock guards the
    /// binder).
    pub fn plug(
        &mut self,
        target: &NetNs,
        there: &mut NetlinkSocket,
        ifname: &IfName,
        host: &PlugHost,
        spec: &EndpointSpec,
    ) -> Result<AttachedInterface, AttachError> {
        let (_, router, bridge) = self.parts();
        let ip = spec.address.ip();
        let mut create = vec![Request::create(
            format!(
                "create veth {} with {ifname} in the runtime's namespace",
                host.name
            ),
            messages::veth_pair(&messages::VethPair {
                host: &host.name,
                host_index: host.port.host_index,
                master: Some(bridge),
                peer: ifname,
                peer_ns: target.as_raw_fd(),
                peer_index: 0,
                peer_mac: Some(host.port.mac),
            }),
        )];
        create.extend(guard::lock_requests(&host.port, ip));
        let configured = router
            .execute_all(&create)
            .map_err(AttachError::from)
            .and_then(|()| lookup(there, ifname))
            .and_then(|(index, mac)| {
                there.execute_all(&configure_requests(spec, index))?;
                router.execute_all(&[guard::router_neighbour(bridge, ip, host.port.mac)])?;
                Ok(AttachedInterface {
                    name: ifname.clone(),
                    index,
                    mac,
                })
            });
        if configured.is_err() {
            let _ = remove_plugged(router, bridge, &host.name, ip);
        }
        configured
    }

    /// Deletes a pair made by [`Self::plug`] (by its host end; the peer
    /// goes with it, and the port's rules with the port) and the router's
    /// ARP entry for `address`. What is already gone (the runtime's
    /// namespace died with the pair) is fine.
    pub fn unplug(&mut self, host: &IfName, address: Ipv4Addr) -> Result<(), AttachError> {
        let (_, router, bridge) = self.parts();
        remove_plugged(router, bridge, host, address)
    }
}

fn remove_plugged(
    router: &mut NetlinkSocket,
    bridge: u32,
    host: &IfName,
    address: Ipv4Addr,
) -> Result<(), AttachError> {
    let outcomes = router.execute(&[
        Request::change(
            format!("delete {host}"),
            messages::delete_link(host.as_str()),
        ),
        Request::change(
            format!("delete the ARP entry of {address}"),
            messages::delete_neighbour(bridge, address),
        ),
    ])?;
    for outcome in outcomes {
        match outcome {
            Err(e) if !matches!(e.errno(), Some(nix::libc::ENODEV | nix::libc::ENOENT)) => {
                return Err(NetlinkError::from(e).into())
            }
            _ => {}
        }
    }
    Ok(())
}
