//! `particle-cni`: a CNI plugin (spec 0.3.0–1.1.0) that gives a container a
//! warm endpoint of the node's Particle agent instead of building one.
//!
//! The network configuration names the tenant and the agent's Unix socket:
//!
//! ```json
//! {"cniVersion":"1.0.0","name":"particle","type":"particle-cni",
//!  "tenant":"a","agentSocket":"/run/particle/agent.sock",
//!  "dns":{"nameservers":["10.1.0.1"]}}
//! ```
//!
//! ADD asks the agent to `attach`: it claims a warm endpoint of the tenant and
//! moves its already-attached interface into `CNI_NETNS` as `CNI_IFNAME`, up,
//! with its address and default route. The result carries the interface, the
//! address, the route and the configured DNS. After another plugin (a
//! `prevResult`), its interfaces, addresses and routes are kept and this
//! plugin's appended. DEL asks the agent to `detach` (the endpoint goes back
//! to its pool) and succeeds for attachments the agent does not know. CHECK
//! asks the agent to verify the attachment and checks `prevResult` holds it.
//! STATUS reports whether the agent serves the tenant; GC detaches this
//! network's attachments the runtime no longer lists.

pub mod agent;
pub mod config;
pub mod plugin;

pub use plugin::ParticleCni;
