//! Interfaces lent to container runtimes (the CNI plugin's ADD/DEL), two ways:
//!
//! - `plug` (the default): a veth pair made on the tenant's warm bridge with
//!   its peer created straight in the runtime's namespace, addressed from the
//!   tenant's warm block; deleted on detach and the address returned.
//! - `move`: a claimed warm endpoint's interface moved into the runtime's
//!   namespace, moved back and the endpoint returned to its pool on detach.
//!   The kernel makes every namespace move wait for an RCU barrier (10-40 ms
//!   here), which costs more than building the pair, so it is not the default.
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
use particle_net::{EndpointSpec, IfName, NetNs, PooledEndpoint, RunPrefix};

use particle_wire::local::{AttachMode, Attachment, AttachmentKey};

use crate::claims::{take_one, TenantClaim};
use crate::free_pool::FreePool;

/// One attach as the runtime asks for it.
#[derive(Debug, Clone, Copy)]
pub struct AttachRequest<'a> {
    pub network: &'a str,
    pub tenant: &'a str,
    pub container_id: &'a str,
    pub ifname: &'a str,
    pub netns: &'a str,
    pub mode: AttachMode,
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
    #[error("{0}")]
    NoEndpoint(String),
    #[error("network namespace {path}: {reason}")]
    Netns { path: String, reason: String },
    #[error(transparent)]
    Attach(#[from] AttachError),
}

/// What backs an attachment.
enum Lent {
    Moved(PooledEndpoint),
    Plugged {
        tenant: TenantClaim,
        host: IfName,
        spec: EndpointSpec,
    },
}

struct Attached {
    info: Attachment,
    iface: AttachedInterface,
    lent: Lent,
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
    /// Names of plugged pairs carry the run's prefix.
    prefix: Option<RunPrefix>,
}

fn key(container_id: &str, ifname: &str) -> AttachmentKey {
    AttachmentKey {
        container_id: container_id.to_string(),
        ifname: ifname.to_string(),
    }
}

fn open_netns(path: &str) -> Result<NetNs, AttachmentError> {
    NetNs::open_foreign(path).map_err(|e| AttachmentError::Netns {
        path: path.to_string(),
        reason: e.to_string(),
    })
}

impl Attachments {
    pub fn new(prefix: RunPrefix) -> Self {
        Self {
            slots: Mutex::default(),
            prefix: Some(prefix),
        }
    }

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

    /// Lends an interface of `tenant` (its warm pool and bridge) to the
    /// namespace at `req.netns` as `req.ifname`. The same container and
    /// interface again (a runtime retrying ADD) gets the attachment it has.
    /// A failed attach leaves nothing (a moved endpoint is destroyed).
    pub fn attach(
        &self,
        req: &AttachRequest,
        tenant: Result<TenantClaim, String>,
        free: Option<&FreePool>,
    ) -> Result<Attachment, AttachmentError> {
        let k = key(req.container_id, req.ifname);
        let name = IfName::new(req.ifname).map_err(|e| AttachmentError::IfName(e.to_string()))?;
        {
            let mut slots = self.slots();
            match slots.get(&k) {
                Some(Slot::Attached(a)) if a.info.tenant == req.tenant => {
                    return Ok(a.info.clone())
                }
                Some(Slot::Attached(a)) => {
                    return Err(AttachmentError::OtherTenant {
                        container_id: k.container_id,
                        ifname: k.ifname,
                        tenant: a.info.tenant.clone(),
                        wanted: req.tenant.to_string(),
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
        let done = tenant
            .map_err(AttachmentError::NoEndpoint)
            .and_then(|t| self.attach_unlocked(req, &name, t, free));
        let mut slots = self.slots();
        match done {
            Ok(attached) => {
                let info = attached.info.clone();
                slots.insert(k, Slot::Attached(Box::new(attached)));
                Ok(info)
            }
            Err(e) => {
                slots.remove(&k);
                Err(e)
            }
        }
    }

    /// The kernel work of an attach, with no lock of the table held.
    fn attach_unlocked(
        &self,
        req: &AttachRequest,
        name: &IfName,
        tenant: TenantClaim,
        free: Option<&FreePool>,
    ) -> Result<Attached, AttachmentError> {
        let target = open_netns(req.netns)?;
        let (spec, iface, lent) = match req.mode {
            AttachMode::Move => {
                let endpoint = take_one(&tenant, free).map_err(AttachmentError::NoEndpoint)?;
                match attach::attach(&endpoint, &target, name) {
                    Ok(iface) => {
                        let spec = EndpointSpec {
                            address: endpoint.address(),
                            gateway: endpoint.gateway(),
                        };
                        (spec, iface, Lent::Moved(endpoint))
                    }
                    Err(e) => {
                        endpoint.discard();
                        return Err(e.into());
                    }
                }
            }
            AttachMode::Plug => {
                let prefix = self.prefix.as_ref().ok_or_else(|| {
                    AttachmentError::NoEndpoint("this agent has no run prefix to name pairs".into())
                })?;
                let host = attach::plug_host(prefix).map_err(AttachError::from)?;
                let spec = tenant.pool.allocate_spec().ok_or_else(|| {
                    AttachmentError::NoEndpoint(format!(
                        "tenant {}'s address block on this node is full",
                        req.tenant
                    ))
                })?;
                let plugged = particle_net::NetlinkSocket::open_in(&target)
                    .map_err(AttachError::from)
                    .and_then(|mut there| {
                        tenant
                            .binder
                            .lock()
                            .unwrap_or_else(PoisonError::into_inner)
                            .plug(&target, &mut there, name, &host, &spec)
                    });
                match plugged {
                    Ok(iface) => {
                        let host = host.name;
                        (spec, iface, Lent::Plugged { tenant, host, spec })
                    }
                    Err(e) => {
                        tenant.pool.release_spec(spec);
                        return Err(e.into());
                    }
                }
            }
        };
        Ok(Attached {
            info: Attachment {
                container_id: req.container_id.to_string(),
                ifname: req.ifname.to_string(),
                network: req.network.to_string(),
                tenant: req.tenant.to_string(),
                netns: req.netns.to_string(),
                address: spec.address.to_string(),
                gateway: spec.gateway.to_string(),
                mac: iface.mac_string(),
                mode: req.mode,
            },
            iface,
            lent,
        })
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
        let attached = *attached;
        match attached.lent {
            Lent::Moved(endpoint) => {
                let back = open_netns(&attached.info.netns).and_then(|target| {
                    attach::detach(&endpoint, &target, &attached.iface).map_err(Into::into)
                });
                match back {
                    // Dropping hands it to the pool's recycler, off this path.
                    Ok(()) => drop(endpoint),
                    Err(e) => {
                        tracing::info!(
                            container = container_id,
                            ifname,
                            "interface not taken back ({e}); destroying its endpoint"
                        );
                        endpoint.discard();
                    }
                }
            }
            Lent::Plugged { tenant, host, spec } => {
                let unplugged = tenant
                    .binder
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .unplug(&host, spec.address.ip());
                match unplugged {
                    Ok(()) => tenant.pool.release_spec(spec),
                    // The address stays taken rather than risk a duplicate.
                    Err(e) => tracing::warn!("deleting {host}: {e}"),
                }
            }
        }
        Ok(true)
    }

    /// Checks that the attachment is in place as made (CNI's CHECK).
    pub fn check(&self, container_id: &str, ifname: &str) -> Result<Attachment, AttachmentError> {
        let k = key(container_id, ifname);
        let slots = self.slots();
        match slots.get(&k) {
            // Reads the kernel under the table's lock: CHECK is rare and quick.
            Some(Slot::Attached(a)) => {
                let target = open_netns(&a.info.netns)?;
                match &a.lent {
                    Lent::Moved(endpoint) => attach::verify(endpoint, &target, &a.iface)?,
                    Lent::Plugged { spec, .. } => attach::verify_spec(spec, &target, &a.iface)?,
                }
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
