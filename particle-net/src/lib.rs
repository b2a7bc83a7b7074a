//! Particle's endpoint engine.
//!
//! An *endpoint* is a network namespace with a veth interface (`eth0` inside),
//! an address, a default route and its host side attached to a bridge. This crate
//! creates them in batches at the kernel's speed ([`endpoint::EndpointFactory`]),
//! keeps a warm pool of them that hands one out in microseconds
//! ([`pool::EndpointPool`]), allocates their addresses ([`ipam`]) and removes
//! whatever a crashed run left behind ([`gc`]).
//!
//! Everything that touches a namespace runs on a dedicated OS thread: a netlink
//! socket stays bound to the namespace it was opened in, and a tokio worker that
//! switched namespaces could carry the switch into unrelated tasks.

pub mod attach;
pub mod bridge;
pub mod endpoint;
pub mod gc;
pub mod guard;
pub mod ipam;
pub mod limits;
pub mod names;
pub mod netlink;
pub mod netns;
pub mod overlay;
pub mod pool;
pub mod proc_stat;
pub mod scratch;
mod sysctl;
pub mod warm;

pub use endpoint::{Endpoint, EndpointError, EndpointFactory, EndpointSpec, UnboundEndpoint};
pub use ipam::{AddressBlock, IpamError, TenantSubnet};
pub use names::{IfName, NameError, Run, RunPrefix};
pub use netlink::{NetlinkError, NetlinkSocket, Request, RequestError};
pub use netns::{NetNs, NetNsError};

pub use pool::{EndpointPool, PoolConfig, PoolError, PoolStats, PooledEndpoint};
