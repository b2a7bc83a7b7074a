//! Warm endpoints lent to container runtimes (the CNI plugin's ADD/DEL):
//! a claimed endpoint's interface is moved into the namespace the runtime
//! made, and moved back and returned to the pool on detach.
//!
//! Attachments are keyed by container id + interface name, as CNI keys them.
//! They live in this process only. If the agent dies, its tenant routers die
//! with it (they are held by fd), and with them the host ends of every veth
//! pair: the interfaces lent to containers disappear from their namespaces.
//! A restarted agent knows no attachment: DEL of one succeeds (nothing to
//! undo), CHECK fails, so the runtime recreates the sandbox and ADD attaches
//! a fresh endpoint.

use std::collections::{HashMap, HashSet};
use std::sync::{Mutex, MutexGuard, PoisonError};

use particle_net::attach::{self, AttachError, AttachedInterface};
use particle_net::{IfName, NetNs, PooledEndpoint};
use serde::{Deserialize, Serialize};

/// What the runtime is told of an attachment (the CNI result's substance).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Attachment {
    pub container_id: String,
    pub ifname: String,
    /// The CNI network it was made for (GC is per network).
    pub network: String,
    pub tenant: String,
    /// The runtime's namespace path the interface went into.
    pub netns: String,
    /// Address with prefix length, e.g. `10.1.0.5/24`.
    pub address: String,
    pub gateway: String,
    pub mac: String,
    /// The endpoint lent out.
    pub endpoint_id: u64,
}

/// An attachment the runtime says should exist (CNI GC's valid list).
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct AttachmentKey {
    pub container_id: String,
    pub ifname: String,
}

#[derive(Debug, thiserror::Error)]
pub enum AttachmentError {
    #[error("container {container_id} interface {ifname}: an attach or detach is in progress; try again")]
    Busy {
        container_id: String,
        ifname: String,
    },
    #[error(
        "container {container_id} interface {ifname} is attached to tenant {tenant}, not {wanted}"
    )]
    OtherTenant {
        container_id: String,
        ifname: String,
        tenant: String,
        wanted: String,
    },
    #[error("no attachment for container {container_id} interface {ifname}")]
    Unknown {
        container_id: String,
        ifname: String,
    },
    #[error("bad interface name: {0}")]
    IfName(String),
    #[error("network namespace {path}: {reason}")]
    Netns { path: String, reason: String },
    #[error(transparent)]
    Attach(#[from] AttachError),
}

struct Attached {
    info: Attachment,
    iface: AttachedInterface,
    endpoint: PooledEndpoint,
}

enum Slot {
    /// An attach or detach is under way; its kernel work runs unlocked.
    Pending,
    Attached(Box<Attached>),
}

/// The node's attachments.
#[derive(Default)]
pub struct Attachments {
    slots: Mutex<HashMap<AttachmentKey, Slot>>,
}

fn key(container_id: &str, ifname: &str) -> AttachmentKey {
    AttachmentKey {
        container_id: container_id.to_string(),
        ifname: ifname.to_string(),
    }
}

fn open_netns(path: &str) -> Result<NetNs, AttachmentError> {
    NetNs::open(path).map_err(|e| AttachmentError::Netns {
        path: path.to_string(),
        reason: e.to_string(),
    })
}

impl Attachments {
    fn slots(&self) -> MutexGuard<'_, HashMap<AttachmentKey, Slot>> {
        self.slots.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Attachments in place.
    pub fn len(&self) -> usize {
        self.slots()
            .values()
            .filter(|s| matches!(s, Slot::Attached(_)))
            .count()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Lends an endpoint from `claim` to the namespace at `netns` as `ifname`.
    /// The same container and interface again (a runtime retrying ADD) gets
    /// the attachment it already has. A failed attach destroys the endpoint.
    pub fn attach(
        &self,
        network: &str,
        tenant: &str,
        container_id: &str,
        ifname: &str,
        netns: &str,
        claim: impl FnOnce() -> Result<PooledEndpoint, String>,
    ) -> Result<Result<Attachment, String>, AttachmentError> {
        let k = key(container_id, ifname);
        let name = IfName::new(ifname).map_err(|e| AttachmentError::IfName(e.to_string()))?;
        {
            let mut slots = self.slots();
            match slots.get(&k) {
                Some(Slot::Attached(a)) if a.info.tenant == tenant => {
                    return Ok(Ok(a.info.clone()))
                }
                Some(Slot::Attached(a)) => {
                    return Err(AttachmentError::OtherTenant {
                        container_id: k.container_id,
                        ifname: k.ifname,
                        tenant: a.info.tenant.clone(),
                        wanted: tenant.to_string(),
                    })
                }
                Some(Slot::Pending) => {
                    return Err(AttachmentError::Busy {
                        container_id: k.container_id,
                        ifname: k.ifname,
                    })
                }
                None => {
                    slots.insert(k.clone(), Slot::Pending);
                }
            }
        }
        let done = self.attach_unlocked(network, tenant, &k, &name, netns, claim);
        let mut slots = self.slots();
        match done {
            Ok(Ok(attached)) => {
                let info = attached.info.clone();
                slots.insert(k, Slot::Attached(Box::new(attached)));
                Ok(Ok(info))
            }
            Ok(Err(e)) => {
                slots.remove(&k);
                Ok(Err(e))
            }
            Err(e) => {
                slots.remove(&k);
                Err(e)
            }
        }
    }

    /// The kernel work of an attach, with no lock held. The inner `Err` is
    /// a failed claim (no endpoint to give), the outer a failed attach.
    fn attach_unlocked(
        &self,
        network: &str,
        tenant: &str,
        k: &AttachmentKey,
        name: &IfName,
        netns: &str,
        claim: impl FnOnce() -> Result<PooledEndpoint, String>,
    ) -> Result<Result<Attached, String>, AttachmentError> {
        let target = open_netns(netns)?;
        let endpoint = match claim() {
            Ok(ep) => ep,
            Err(e) => return Ok(Err(e)),
        };
        match attach::attach(&endpoint, &target, name) {
            Ok(iface) => Ok(Ok(Attached {
                info: Attachment {
                    container_id: k.container_id.clone(),
                    ifname: k.ifname.clone(),
                    network: network.to_string(),
                    tenant: tenant.to_string(),
                    netns: netns.to_string(),
                    address: endpoint.address().to_string(),
                    gateway: endpoint.gateway().to_string(),
                    mac: iface.mac_string(),
                    endpoint_id: endpoint.id(),
                },
                iface,
                endpoint,
            })),
            Err(e) => {
                endpoint.discard();
                Err(e.into())
            }
        }
    }

    /// Takes the interface back and returns the endpoint to its pool (the
    /// recycler checks it), or destroys the endpoint if the interface cannot
    /// be taken back (its namespace is gone, and the veth pair with it).
    /// Unknown attachments succeed: DEL must be idempotent. Returns whether
    /// there was one.
    pub fn detach(&self, container_id: &str, ifname: &str) -> Result<bool, AttachmentError> {
        let k = key(container_id, ifname);
        let attached = {
            let mut slots = self.slots();
            match slots.remove(&k) {
                None => return Ok(false),
                Some(Slot::Pending) => {
                    slots.insert(k.clone(), Slot::Pending);
                    return Err(AttachmentError::Busy {
                        container_id: k.container_id,
                        ifname: k.ifname,
                    });
                }
                Some(Slot::Attached(a)) => a,
            }
        };
        let back = open_netns(&attached.info.netns).and_then(|target| {
            attach::detach(&attached.endpoint, &target, &attached.iface).map_err(Into::into)
        });
        match back {
            // Dropping hands it to the pool's recycler, off this path.
            Ok(()) => drop(attached),
            Err(e) => {
                tracing::info!(
                    container = container_id,
                    ifname,
                    "interface not taken back ({e}); destroying its endpoint"
                );
                attached.endpoint.discard();
            }
        }
        Ok(true)
    }

    /// Checks that the attachment is in place as made (CNI's CHECK).
    pub fn check(&self, container_id: &str, ifname: &str) -> Result<Attachment, AttachmentError> {
        let k = key(container_id, ifname);
        let slots = self.slots();
        match slots.get(&k) {
            Some(Slot::Attached(a)) => {
                let target = open_netns(&a.info.netns)?;
                attach::verify(&a.endpoint, &target, &a.iface)?;
                Ok(a.info.clone())
            }
            Some(Slot::Pending) => Err(AttachmentError::Busy {
                container_id: k.container_id,
                ifname: k.ifname,
            }),
            None => Err(AttachmentError::Unknown {
                container_id: k.container_id,
                ifname: k.ifname,
            }),
        }
    }

    /// Detaches every attachment of `network` not in `valid` (CNI's GC).
    /// Returns those detached; one that fails does not stop the others.
    pub fn collect(&self, network: &str, valid: &[AttachmentKey]) -> Vec<AttachmentKey> {
        let valid: HashSet<&AttachmentKey> = valid.iter().collect();
        let stale: Vec<AttachmentKey> = self
            .slots()
            .iter()
            .filter(|(k, s)| {
                matches!(s, Slot::Attached(a) if a.info.network == network) && !valid.contains(k)
            })
            .map(|(k, _)| k.clone())
            .collect();
        stale
            .into_iter()
            .filter(|k| match self.detach(&k.container_id, &k.ifname) {
                Ok(found) => found,
                Err(e) => {
                    tracing::warn!("gc: {e}");
                    false
                }
            })
            .collect()
    }
}
