//! The endpoint factory: splits a batch into one share per worker thread,
//! hands the shares out and puts the results back in order.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::sync::mpsc::{self, Sender};
use std::sync::{Mutex, PoisonError};
use std::thread::JoinHandle;

use super::neighbours::forget_arp_entries;
use super::unbound::UnboundEndpoint;
use super::workers::{gone, worker_main, Built, HostBridge, Job};
use super::{Endpoint, EndpointError, EndpointSpec};
use crate::names::{IfName, NameError, RunPrefix};
use crate::netlink::{messages, NetlinkError, NetlinkSocket, Request};
use crate::netns::NetNs;

/// Where the factory builds: the namespace the host ends go in, the bridge
/// they attach to, and the run prefix their names carry.
#[derive(Debug)]
pub struct FactoryConfig {
    pub home: NetNs,
    /// Index of the bridge in `home`; `None` leaves host ends unattached.
    pub bridge_index: Option<u32>,
    /// Whether host ends' bridge ports are locked to their endpoint's MAC
    /// and address ([`crate::guard`]): yes for anything a tenant's code
    /// runs behind; no for simulated hosts on an underlay, which route
    /// other addresses' packets as real hosts do.
    pub lock_ports: bool,
    pub prefix: RunPrefix,
    /// Worker threads; 0 means one per core.
    pub workers: usize,
}

type BuildResult = Result<Endpoint, EndpointError>;

/// The next endpoint id per run prefix. Host-end names derive from ids, and
/// several factories of one run may build into the same namespace, so ids are
/// counted per prefix across the process, not per factory.
static NEXT_IDS: Mutex<BTreeMap<String, u64>> = Mutex::new(BTreeMap::new());

/// Reserves `n` consecutive ids for `prefix`; returns the first.
fn reserve_ids(prefix: &RunPrefix, n: usize) -> u64 {
    let mut ids = NEXT_IDS.lock().unwrap_or_else(PoisonError::into_inner);
    let next = ids.entry(prefix.as_str().to_string()).or_insert(0);
    let first = *next;
    *next += n as u64;
    first
}

/// Whether someone waits for a batch (a claim building the rest of a burst
/// cold) or it stocks a pool for later, behind whatever else runs on the node.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BuildPriority {
    Urgent,
    Background,
}

impl BuildPriority {
    /// The nice value a worker runs a job of this priority at.
    pub(super) fn nice(self) -> i32 {
        match self {
            Self::Urgent => 0,
            Self::Background => crate::limits::BACKGROUND_NICE,
        }
    }
}

/// Builds endpoints in batches on dedicated worker threads.
pub struct EndpointFactory {
    workers: Vec<(Sender<Job>, JoinHandle<()>)>,
    prefix: RunPrefix,
    /// A socket in the home namespace and the bridge there, for clearing the
    /// traces a released endpoint leaves on the bridge (see
    /// [`Self::forget_neighbour`]); reopened if it ever fails.
    home: NetNs,
    bridge_index: Option<u32>,
    home_socket: Mutex<Option<NetlinkSocket>>,
}

impl std::fmt::Debug for EndpointFactory {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EndpointFactory")
            .field("workers", &self.workers.len())
            .field("prefix", &self.prefix)
            .finish()
    }
}

impl EndpointFactory {
    pub fn new(config: FactoryConfig) -> Result<Self, EndpointError> {
        let count = match config.workers {
            0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
            n => n,
        };
        let mut workers = Vec::with_capacity(count);
        for i in 0..count {
            let home = config.home.try_clone()?;
            let bridge = config.bridge_index.map(|index| HostBridge {
                index,
                lock: config.lock_ports,
            });
            let prefix = config.prefix.clone();
            let (tx, rx) = mpsc::channel();
            let handle = std::thread::Builder::new()
                .name(format!("endpoint-worker-{i}"))
                .spawn(move || worker_main(home, bridge, prefix, rx))
                .map_err(|e| EndpointError::WorkerGone(e.to_string()))?;
            workers.push((tx, handle));
        }
        // Opened now, so that a factory's fds do not change as it works.
        let home_socket = match config.bridge_index {
            Some(_) => Some(NetlinkSocket::open_in(&config.home)?),
            None => None,
        };
        Ok(Self {
            workers,
            prefix: config.prefix,
            home: config.home,
            bridge_index: config.bridge_index,
            home_socket: Mutex::new(home_socket),
        })
    }

    pub fn prefix(&self) -> &RunPrefix {
        &self.prefix
    }

    /// Removes the bridge's ARP entry for `address`, which a released
    /// endpoint leaves behind once traffic was routed to it: the next
    /// endpoint with that address has another MAC, and a stale entry would
    /// send its first packets to the old one until the kernel re-probes
    /// (seconds). Off the claim path (the pool's recycler calls it).
    pub fn forget_neighbour(&self, address: Ipv4Addr) -> Result<(), NetlinkError> {
        let Some(bridge) = self.bridge_index else {
            return Ok(());
        };
        let request = Request::change(
            format!("forget the ARP entry of {address}"),
            messages::delete_neighbour(bridge, address),
        );
        let outcome = self.with_home_socket(|socket| socket.execute(&[request]))?;
        match outcome.into_iter().next() {
            Some(Err(e)) if e.errno() != Some(nix::libc::ENOENT) => Err(NetlinkError::Request(e)),
            _ => Ok(()),
        }
    }

    /// Removes the ARP entries the bridge learnt for addresses `in_use` says
    /// no endpoint is using; how many went. Packets still in flight when an
    /// endpoint was released (a peer's last ACK, a retransmit) teach the
    /// bridge its address again after [`Self::forget_neighbour`], and the
    /// kernel collects nothing while its table is small (below
    /// `gc_thresh1`), so without this sweep such entries would stay.
    pub fn forget_unused_neighbours(
        &self,
        in_use: impl Fn(Ipv4Addr) -> bool,
    ) -> Result<usize, NetlinkError> {
        let Some(bridge) = self.bridge_index else {
            return Ok(0);
        };
        self.with_home_socket(|socket| {
            forget_arp_entries(socket, |e| e.index == bridge && e.learnt() && !in_use(e.ip))
        })
    }

    /// Runs `f` on the socket in the home namespace, opening it if needed;
    /// a failed socket (not a failed request) is reopened next time.
    fn with_home_socket<T>(
        &self,
        f: impl FnOnce(&mut NetlinkSocket) -> Result<T, NetlinkError>,
    ) -> Result<T, NetlinkError> {
        let mut guard = self
            .home_socket
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let socket = match guard.as_mut() {
            Some(s) => s,
            None => guard.insert(NetlinkSocket::open_in(&self.home)?),
        };
        let outcome = f(socket);
        if matches!(&outcome, Err(e) if !matches!(e, NetlinkError::Request(_))) {
            *guard = None;
        }
        outcome
    }

    /// Worker threads building endpoints in parallel.
    pub fn workers(&self) -> usize {
        self.workers.len()
    }

    /// The host-end name the endpoint with this id gets.
    pub fn host_ifname(prefix: &RunPrefix, id: u64) -> Result<IfName, NameError> {
        prefix.ifname('e', id)
    }

    /// Builds one endpoint per spec, spread over the workers; results come back
    /// in the order of `specs`. A failed endpoint leaves nothing behind and does
    /// not affect the others.
    pub fn create_batch(&self, specs: &[EndpointSpec]) -> Vec<BuildResult> {
        self.create_batch_at(specs, BuildPriority::Urgent)
    }

    /// [`Self::create_batch`] at a given priority.
    pub fn create_batch_at(
        &self,
        specs: &[EndpointSpec],
        priority: BuildPriority,
    ) -> Vec<BuildResult> {
        self.run_jobs(specs.iter().copied().map(Some).collect(), priority)
            .into_iter()
            .map(|r| {
                r.and_then(|b| {
                    let spec = b.spec.ok_or_else(|| {
                        EndpointError::WorkerGone("built without its address".into())
                    })?;
                    Ok(Endpoint {
                        id: b.id,
                        netns: b.netns,
                        host_ifname: b.host_ifname,
                        port: b.port,
                        spec,
                    })
                })
            })
            .collect()
    }

    /// Builds `n` endpoints without an address, their host ends unattached in
    /// the factory's namespace: a tenant-free pool, bound on claim. Built
    /// in the background: nobody waits for a tenant-free endpoint.
    pub fn create_unbound(&self, n: usize) -> Vec<Result<UnboundEndpoint, EndpointError>> {
        self.run_jobs(vec![None; n], BuildPriority::Background)
            .into_iter()
            .map(|r| {
                r.map(|b| UnboundEndpoint {
                    id: b.id,
                    netns: b.netns,
                    host_ifname: b.host_ifname,
                    port: b.port,
                    socket: b.socket,
                })
            })
            .collect()
    }

    /// Sends one share of `specs` to each worker and collects the shares back
    /// in the order of `specs`; a share whose worker is gone fails whole.
    fn run_jobs(
        &self,
        specs: Vec<Option<EndpointSpec>>,
        priority: BuildPriority,
    ) -> Vec<Result<Built, EndpointError>> {
        let (reply_tx, reply_rx) = mpsc::channel();
        let share = specs.len().div_ceil(self.workers.len().max(1)).max(1);
        let mut next_id = reserve_ids(&self.prefix, specs.len());
        let mut sent = 0;
        for (slot, chunk) in specs.chunks(share).enumerate() {
            let items = chunk
                .iter()
                .map(|s| {
                    next_id += 1;
                    (next_id - 1, *s)
                })
                .collect();
            let job = Job {
                items,
                reply: reply_tx.clone(),
                slot,
                priority,
            };
            let (worker, _) = &self.workers[slot % self.workers.len()];
            if let Err(mpsc::SendError(job)) = worker.send(job) {
                let _ = reply_tx.send((slot, gone(job.items.len(), "worker exited")));
            }
            sent += 1;
        }
        drop(reply_tx);
        let mut parts: Vec<Option<Vec<Result<Built, EndpointError>>>> =
            (0..sent).map(|_| None).collect();
        for (slot, results) in reply_rx.iter() {
            parts[slot] = Some(results);
        }
        let mut out = Vec::with_capacity(specs.len());
        for (slot, chunk) in specs.chunks(share).enumerate() {
            match parts[slot].take() {
                Some(results) => out.extend(results),
                None => out.extend(gone(chunk.len(), "worker panicked")),
            }
        }
        out
    }
}

impl Drop for EndpointFactory {
    fn drop(&mut self) {
        for (tx, handle) in self.workers.drain(..) {
            drop(tx);
            let _ = handle.join();
        }
    }
}
