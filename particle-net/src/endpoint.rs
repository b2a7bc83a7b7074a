//! Endpoints and the batched factory that builds them.
//!
//! An endpoint is a network namespace holding `lo` and `eth0` (one end of a veth
//! pair), both up, with an address and a default route via the node's bridge;
//! the other end of the pair sits in the node's namespace, attached to that
//! bridge. Building one costs:
//!
//! 1. `unshare(CLONE_NEWNET)` on a worker thread, keeping the namespace by fd,
//!    and opening a netlink socket right there (it stays bound to it);
//! 2. ONE request in the node's namespace creating the pair with its peer
//!    placed straight into the endpoint's namespace as `eth0`, index 2, and the
//!    host end up and attached to the bridge: many such requests per datagram;
//! 3. ONE datagram on the endpoint's socket: `lo` up, `eth0` up, address,
//!    default route.
//!
//! Workers (one per core by default) each take a share of a batch. An endpoint
//! whose build fails is dropped whole: closing its namespace fd makes the kernel
//! remove the namespace with its end of the pair, and the pair with it.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::{Mutex, PoisonError};
use std::thread::JoinHandle;

use ipnetwork::Ipv4Network;
use netlink_packet_route::address::AddressAttribute;
use netlink_packet_route::link::LinkFlags;
use netlink_packet_route::neighbour::NeighbourState;
use netlink_packet_route::RouteNetlinkMessage;

use crate::names::{IfName, NameError, RunPrefix};
use crate::netlink::{messages, NetlinkError, NetlinkSocket, Request, RequestError};
use crate::netns::{NetNs, NetNsError};

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
}

/// A built endpoint. Dropping it destroys it (the kernel removes the namespace,
/// its `eth0` and the host end of the pair).
#[derive(Debug)]
pub struct Endpoint {
    id: u64,
    netns: NetNs,
    host_ifname: IfName,
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

    pub fn gateway(&self) -> Ipv4Addr {
        self.spec.gateway
    }

    /// Reads the endpoint's links and IPv4 addresses back from the kernel.
    pub fn inspect(&self) -> Result<EndpointState, EndpointError> {
        let mut socket = NetlinkSocket::open_in(&self.netns)?;
        EndpointState::read(&mut socket)
    }

    /// Whether the namespace holds exactly what it was built with: `lo` and
    /// `eth0`, up, and only its own IPv4 addresses. A function that added an
    /// interface or an address leaves an endpoint that must not be reused.
    pub fn is_clean(&self) -> Result<bool, EndpointError> {
        let state = self.inspect()?;
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
        Ok(links == [(ENDPOINT_IFNAME, true), ("lo", true)] && addrs == expected_addrs)
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

/// A link as the kernel reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LinkState {
    pub index: u32,
    pub name: String,
    pub up: bool,
    pub master: Option<u32>,
}

/// An endpoint's links and IPv4 addresses (by link index), read from the kernel.
#[derive(Debug, Clone)]
pub struct EndpointState {
    pub links: Vec<LinkState>,
    pub ipv4: Vec<(u32, Ipv4Network)>,
}

impl EndpointState {
    /// Reads the links and IPv4 addresses of the socket's namespace.
    pub fn read(socket: &mut NetlinkSocket) -> Result<Self, EndpointError> {
        Ok(Self {
            links: list_links(socket)?,
            ipv4: list_ipv4_addresses(socket)?,
        })
    }
}

/// Forgets every neighbour (ARP) entry of a namespace (an endpoint's, by
/// its namespace alone: the pool sweeps idle endpoints without taking them).
pub fn forget_neighbours_in(netns: &NetNs) -> Result<(), EndpointError> {
    let mut socket = NetlinkSocket::open_in(netns)?;
    forget_arp_entries(&mut socket, |_| true)?;
    Ok(())
}

/// One IPv4 neighbour entry as the kernel reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ArpEntry {
    pub index: u32,
    pub ip: Ipv4Addr,
    pub state: NeighbourState,
}

impl ArpEntry {
    /// A multicast or broadcast mapping the kernel computes (NOARP) and
    /// collects on its own timers.
    pub fn computed(&self) -> bool {
        self.state == NeighbourState::Noarp
    }

    /// Learnt from traffic, as opposed to set by us (permanent) or computed
    /// by the kernel.
    pub fn learnt(&self) -> bool {
        !self.computed() && self.state != NeighbourState::Permanent
    }
}

/// The IPv4 neighbour entries of the socket's namespace, every state.
pub fn list_arp_entries(socket: &mut NetlinkSocket) -> Result<Vec<ArpEntry>, NetlinkError> {
    use netlink_packet_route::neighbour::{NeighbourAddress, NeighbourAttribute};
    Ok(socket
        .query("list neighbours", messages::dump_ipv4_neighbours(), true)?
        .into_iter()
        .filter_map(|m| match m {
            RouteNetlinkMessage::NewNeighbour(n) => n.attributes.iter().find_map(|a| match a {
                NeighbourAttribute::Destination(NeighbourAddress::Inet(ip)) => Some(ArpEntry {
                    index: n.header.ifindex,
                    ip: *ip,
                    state: n.header.state,
                }),
                _ => None,
            }),
            _ => None,
        })
        .collect())
}

/// Deletes the ARP entries of the socket's namespace that `forget` picks;
/// how many went. One that expired meanwhile is gone already: fine.
pub fn forget_arp_entries(
    socket: &mut NetlinkSocket,
    forget: impl Fn(&ArpEntry) -> bool,
) -> Result<usize, NetlinkError> {
    let doomed: Vec<Request> = list_arp_entries(socket)?
        .into_iter()
        .filter(|e| forget(e))
        .map(|e| {
            Request::change(
                format!("forget the ARP entry of {}", e.ip),
                messages::delete_neighbour(e.index, e.ip),
            )
        })
        .collect();
    if doomed.is_empty() {
        return Ok(0);
    }
    let mut forgotten = 0;
    for outcome in socket.execute(&doomed)? {
        match outcome {
            Ok(_) => forgotten += 1,
            Err(e) if e.errno() == Some(nix::libc::ENOENT) => {}
            Err(e) => return Err(NetlinkError::Request(e)),
        }
    }
    Ok(forgotten)
}

/// All links of the socket's namespace.
pub fn list_links(socket: &mut NetlinkSocket) -> Result<Vec<LinkState>, NetlinkError> {
    let replies = socket.query("list links", messages::dump_links(), true)?;
    Ok(replies
        .into_iter()
        .filter_map(|m| match m {
            RouteNetlinkMessage::NewLink(l) => Some(LinkState {
                index: l.header.index,
                name: messages::link_name(&l).unwrap_or_default().to_string(),
                up: l.header.flags.contains(LinkFlags::Up),
                master: messages::link_master(&l),
            }),
            _ => None,
        })
        .collect())
}

/// All IPv4 addresses of the socket's namespace, by link index.
pub fn list_ipv4_addresses(
    socket: &mut NetlinkSocket,
) -> Result<Vec<(u32, Ipv4Network)>, NetlinkError> {
    let replies = socket.query("list addresses", messages::dump_ipv4_addresses(), true)?;
    Ok(replies
        .into_iter()
        .filter_map(|m| match m {
            RouteNetlinkMessage::NewAddress(a) => {
                let ip = a.attributes.iter().find_map(|attr| match attr {
                    AddressAttribute::Local(std::net::IpAddr::V4(ip)) => Some(*ip),
                    _ => None,
                })?;
                let net = Ipv4Network::new(ip, a.header.prefix_len).ok()?;
                Some((a.header.index, net))
            }
            _ => None,
        })
        .collect())
}

/// Where the factory builds: the namespace the host ends go in, the bridge
/// they attach to, and the run prefix their names carry.
#[derive(Debug)]
pub struct FactoryConfig {
    pub home: NetNs,
    /// Index of the bridge in `home`; `None` leaves host ends unattached.
    pub bridge_index: Option<u32>,
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

struct Job {
    items: Vec<(u64, Option<EndpointSpec>)>,
    reply: Sender<(usize, Vec<Result<Built, EndpointError>>)>,
    slot: usize,
    priority: BuildPriority,
}

/// Whether someone waits for a batch (a claim building the rest of a burst
/// cold) or it stocks a pool for later, behind whatever else runs on the node.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BuildPriority {
    Urgent,
    Background,
}

impl BuildPriority {
    fn nice(self) -> i32 {
        match self {
            Self::Urgent => 0,
            Self::Background => crate::limits::BACKGROUND_NICE,
        }
    }
}

/// What a worker hands back: an endpoint with its address, or (for the
/// tenant-free pool) one still without, with a socket kept inside for binding.
struct Built {
    id: u64,
    netns: NetNs,
    host_ifname: IfName,
    spec: Option<EndpointSpec>,
    socket: NetlinkSocket,
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
            let bridge = config.bridge_index;
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
                    socket: b.socket,
                })
            })
            .collect()
    }

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

/// An endpoint of the tenant-free pool: namespace, `lo` and `eth0` up, the
/// host end unattached in the node's namespace, no address yet. Dropping it
/// destroys it.
#[derive(Debug)]
pub struct UnboundEndpoint {
    id: u64,
    netns: NetNs,
    host_ifname: IfName,
    /// A socket inside, so binding needs no thread to enter the namespace.
    socket: NetlinkSocket,
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

impl Drop for EndpointFactory {
    fn drop(&mut self) {
        for (tx, handle) in self.workers.drain(..) {
            drop(tx);
            let _ = handle.join();
        }
    }
}

fn gone<T>(n: usize, why: &str) -> Vec<Result<T, EndpointError>> {
    (0..n)
        .map(|_| Err(EndpointError::WorkerGone(why.to_string())))
        .collect()
}

fn worker_main(home: NetNs, bridge: Option<u32>, prefix: RunPrefix, jobs: Receiver<Job>) {
    let setup = home
        .enter_current_thread()
        .map_err(EndpointError::from)
        .and_then(|()| NetlinkSocket::open().map_err(EndpointError::from));
    let mut host = match setup {
        Ok(socket) => socket,
        Err(e) => {
            let why = e.to_string();
            for job in jobs {
                let _ = job.reply.send((job.slot, gone(job.items.len(), &why)));
            }
            return;
        }
    };
    let mut nice = 0;
    for job in jobs {
        if job.priority.nice() != nice {
            match crate::limits::set_current_thread_nice(job.priority.nice()) {
                Ok(()) => nice = job.priority.nice(),
                Err(e) => tracing::debug!("endpoint worker priority: {e}"),
            }
        }
        let (results, home_lost) = build(&home, &mut host, bridge, &prefix, job.items);
        let _ = job.reply.send((job.slot, results));
        if home_lost {
            // This thread is stranded in an endpoint's namespace; stop taking work.
            tracing::error!("endpoint worker could not return to its home namespace");
            return;
        }
    }
}

/// A half-built endpoint: its namespace and a socket inside it.
struct Staged {
    id: u64,
    spec: Option<EndpointSpec>,
    host_ifname: IfName,
    netns: NetNs,
    socket: NetlinkSocket,
}

/// Builds a worker's share of a batch. Returns the results and whether the
/// thread failed to get back into its home namespace.
fn build(
    home: &NetNs,
    host: &mut NetlinkSocket,
    bridge: Option<u32>,
    prefix: &RunPrefix,
    items: Vec<(u64, Option<EndpointSpec>)>,
) -> (Vec<Result<Built, EndpointError>>, bool) {
    let mut results: Vec<Option<Result<Built, EndpointError>>> = Vec::with_capacity(items.len());
    let mut staged: Vec<(usize, Staged)> = Vec::with_capacity(items.len());
    let mut home_lost = false;
    let started = std::time::Instant::now();

    // 1. Namespaces, each with a socket opened inside it.
    for (i, (id, spec)) in items.into_iter().enumerate() {
        if home_lost {
            results.push(Some(Err(EndpointError::WorkerGone(
                "worker lost its home namespace".into(),
            ))));
            continue;
        }
        let made = EndpointFactory::host_ifname(prefix, id)
            .map_err(EndpointError::from)
            .and_then(|host_ifname| {
                let netns = NetNs::unshare_current_thread()?;
                let socket = NetlinkSocket::open();
                if let Err(e) = home.enter_current_thread() {
                    home_lost = true;
                    return Err(e.into());
                }
                Ok(Staged {
                    id,
                    spec,
                    host_ifname,
                    netns,
                    socket: socket?,
                })
            });
        match made {
            Ok(s) => {
                results.push(None);
                staged.push((i, s));
            }
            Err(e) => results.push(Some(Err(e))),
        }
    }

    let namespaces_done = started.elapsed();

    // 2. The veth pairs, many per datagram, on the home socket.
    let peer = IfName::new(ENDPOINT_IFNAME).expect("constant name is valid");
    let pairs: Vec<Request> = staged
        .iter()
        .map(|(_, s)| {
            Request::create(
                match s.spec {
                    Some(spec) => format!(
                        "create veth {} for endpoint {}",
                        s.host_ifname, spec.address
                    ),
                    None => format!("create veth {} for a tenant-free endpoint", s.host_ifname),
                },
                messages::veth_pair(
                    &s.host_ifname,
                    bridge,
                    &peer,
                    std::os::fd::AsRawFd::as_raw_fd(&s.netns),
                    ENDPOINT_IFINDEX,
                ),
            )
        })
        .collect();
    let outcomes = match host.execute(&pairs) {
        Ok(o) => o,
        Err(e) => {
            let why = e.to_string();
            (0..pairs.len())
                .map(|_| {
                    Err(RequestError {
                        what: "create veth".into(),
                        source: std::io::Error::other(why.clone()),
                    })
                })
                .collect()
        }
    };

    let pairs_done = started.elapsed();

    // 3. Inside each endpoint: one datagram of four requests.
    for ((i, mut s), outcome) in staged.into_iter().zip(outcomes) {
        let configured = outcome
            .map_err(EndpointError::from)
            .and_then(|()| configure_inside(&mut s).map_err(EndpointError::from));
        results[i] = Some(configured.map(|()| Built {
            id: s.id,
            netns: s.netns,
            host_ifname: s.host_ifname,
            spec: s.spec,
            socket: s.socket,
        }));
        // On error `s.netns` drops here: the kernel removes what was built.
    }
    tracing::debug!(
        endpoints = results.len(),
        namespaces_us = namespaces_done.as_micros() as u64,
        veth_pairs_us = (pairs_done - namespaces_done).as_micros() as u64,
        inside_us = (started.elapsed() - pairs_done).as_micros() as u64,
        "built a share of a batch"
    );
    let results = results
        .into_iter()
        .map(|r| r.unwrap_or_else(|| Err(EndpointError::WorkerGone("no result".into()))))
        .collect();
    (results, home_lost)
}

fn configure_inside(s: &mut Staged) -> Result<(), NetlinkError> {
    let mut requests = vec![
        Request::change("set lo up", messages::set_up(messages::LOOPBACK_INDEX)),
        Request::change("set eth0 up", messages::set_up(ENDPOINT_IFINDEX)),
    ];
    if let Some(spec) = &s.spec {
        requests.extend(address_requests(spec));
    }
    s.socket.execute_all(&requests)
}

/// The inside's address and default route.
fn address_requests(spec: &EndpointSpec) -> [Request; 2] {
    let addr = spec.address;
    [
        Request::create(
            format!("add {addr} to eth0"),
            messages::add_ipv4_address(ENDPOINT_IFINDEX, addr.ip(), addr.prefix()),
        ),
        Request::create(
            format!("add default route via {}", spec.gateway),
            messages::default_route(spec.gateway, ENDPOINT_IFINDEX),
        ),
    ]
}
