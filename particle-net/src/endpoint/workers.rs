//! The factory's worker threads. Each lives in the factory's home namespace
//! and builds its share of a batch in the steps the module describes:
//! namespaces, then veth pairs with their ports locked ([`crate::guard`]),
//! then the router's ARP entries, then the inside of each endpoint.

use std::sync::mpsc::{Receiver, Sender};
use std::time::Instant;

use super::factory::{BuildPriority, EndpointFactory};
use super::{EndpointError, EndpointSpec, ENDPOINT_IFINDEX, ENDPOINT_IFNAME};
use crate::guard::{self, PortIdentity};
use crate::names::{IfName, RunPrefix};
use crate::netlink::{messages, NetlinkError, NetlinkSocket, Request, RequestError};
use crate::netns::NetNs;
use crate::sysctl::SysctlWriter;

/// Lets every group ping without privileges (ICMP echo sockets): the
/// kernel default (`1 0`, nobody) stops a function without capabilities
/// from pinging. Per network namespace, so set in each endpoint's.
const PING_GROUP_RANGE: &str = "net/ipv4/ping_group_range";
const PING_GROUPS_ALL: &[u8] = b"0 2147483647";

/// The bridge host ends go on, and whether their ports are locked.
#[derive(Debug, Clone, Copy)]
pub(super) struct HostBridge {
    pub(super) index: u32,
    pub(super) lock: bool,
}

/// One endpoint's build, as a worker reports it.
pub(super) type BuildOutcome = Result<Built, EndpointError>;

/// A worker's share of a batch: ids with their specs (`None`: tenant-free),
/// and where the results go, tagged with the share's slot in the batch.
pub(super) struct Job {
    pub(super) items: Vec<(u64, Option<EndpointSpec>)>,
    pub(super) reply: Sender<(usize, Vec<BuildOutcome>)>,
    pub(super) slot: usize,
    pub(super) priority: BuildPriority,
}

/// What a worker hands back: an endpoint with its address, or (for the
/// tenant-free pool) one still without, with a socket kept inside for binding.
pub(super) struct Built {
    pub(super) id: u64,
    pub(super) netns: NetNs,
    pub(super) host_ifname: IfName,
    pub(super) port: PortIdentity,
    pub(super) spec: Option<EndpointSpec>,
    pub(super) socket: NetlinkSocket,
}

/// `n` failures saying why the worker could not build.
pub(super) fn gone<T>(n: usize, why: &str) -> Vec<Result<T, EndpointError>> {
    (0..n)
        .map(|_| Err(EndpointError::WorkerGone(why.to_string())))
        .collect()
}

/// A worker thread's life: enter the home namespace, then build each job
/// that arrives at its priority, until the factory hangs up.
pub(super) fn worker_main(
    home: NetNs,
    bridge: Option<HostBridge>,
    prefix: RunPrefix,
    jobs: Receiver<Job>,
) {
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
    let mut sysctl = SysctlWriter::for_this_thread();
    let mut nice = 0;
    for job in jobs {
        if job.priority.nice() != nice {
            match crate::limits::set_current_thread_nice(job.priority.nice()) {
                Ok(()) => nice = job.priority.nice(),
                Err(e) => tracing::debug!("endpoint worker priority: {e}"),
            }
        }
        let (results, home_lost) = build(&home, &mut host, &mut sysctl, bridge, &prefix, job.items);
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
    port: PortIdentity,
    netns: NetNs,
    socket: NetlinkSocket,
}

/// Builds a worker's share of a batch. Returns the results and whether the
/// thread failed to get back into its home namespace.
fn build(
    home: &NetNs,
    host: &mut NetlinkSocket,
    sysctl: &mut SysctlWriter,
    bridge: Option<HostBridge>,
    prefix: &RunPrefix,
    items: Vec<(u64, Option<EndpointSpec>)>,
) -> (Vec<BuildOutcome>, bool) {
    let started = Instant::now();
    let (mut results, staged, home_lost) = stage_namespaces(home, sysctl, prefix, items);
    let namespaces_done = started.elapsed();
    let pairs = create_veth_pairs(host, bridge, &staged);
    let pairs_done = started.elapsed();
    configure_insides(staged, pairs, &mut results);
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

/// Step 1: a namespace per item, each with a socket opened inside it.
/// Returns a result slot per item (filled for those that failed already,
/// empty for those staged), the staged ones with their slots, and whether
/// the thread lost its home namespace (the items after that are not tried).
fn stage_namespaces(
    home: &NetNs,
    sysctl: &mut SysctlWriter,
    prefix: &RunPrefix,
    items: Vec<(u64, Option<EndpointSpec>)>,
) -> (Vec<Option<BuildOutcome>>, Vec<(usize, Staged)>, bool) {
    let mut results = Vec::with_capacity(items.len());
    let mut staged = Vec::with_capacity(items.len());
    let mut home_lost = false;
    for (i, (id, spec)) in items.into_iter().enumerate() {
        if home_lost {
            results.push(Some(Err(EndpointError::WorkerGone(
                "worker lost its home namespace".into(),
            ))));
            continue;
        }
        match stage(home, sysctl, prefix, id, spec, &mut home_lost) {
            Ok(s) => {
                results.push(None);
                staged.push((i, s));
            }
            Err(e) => results.push(Some(Err(e))),
        }
    }
    (results, staged, home_lost)
}

/// One endpoint's namespace, made by moving this thread into a new one just
/// long enough to open a socket there. Sets `home_lost` if the thread could
/// not move back.
fn stage(
    home: &NetNs,
    sysctl: &mut SysctlWriter,
    prefix: &RunPrefix,
    id: u64,
    spec: Option<EndpointSpec>,
    home_lost: &mut bool,
) -> Result<Staged, EndpointError> {
    let host_ifname = EndpointFactory::host_ifname(prefix, id)?;
    let netns = NetNs::unshare_current_thread()?.into_managed();
    // Both while this thread is inside: the socket stays bound to the
    // namespace, and /proc/sys/net is the namespace of the thread opening it.
    let socket = NetlinkSocket::open();
    let opened = sysctl.write(PING_GROUP_RANGE, PING_GROUPS_ALL);
    // Back home before anything else, even if the socket failed.
    if let Err(e) = home.enter_current_thread() {
        *home_lost = true;
        return Err(e.into());
    }
    opened.map_err(EndpointError::Sysctl)?;
    Ok(Staged {
        id,
        spec,
        host_ifname,
        port: PortIdentity::endpoint(id),
        netns,
        socket: socket?,
    })
}

/// Step 2: the veth pairs, each followed by the requests locking its port
/// if it goes on a bridge, many per datagram, on the home socket; then the
/// router's ARP entries for the endpoints built so far. One outcome per
/// staged endpoint (its first failure); if the socket itself fails, they
/// all fail.
fn create_veth_pairs(
    host: &mut NetlinkSocket,
    bridge: Option<HostBridge>,
    staged: &[(usize, Staged)],
) -> Vec<Result<(), RequestError>> {
    let peer = IfName::new(ENDPOINT_IFNAME).expect("constant name is valid");
    let per_endpoint: Vec<Vec<Request>> = staged
        .iter()
        .map(|(_, s)| {
            let mut requests = vec![veth_pair_request(s, bridge, &peer)];
            if let (Some(HostBridge { lock: true, .. }), Some(spec)) = (bridge, s.spec) {
                requests.extend(guard::lock_requests(&s.port, spec.address.ip()));
            }
            requests
        })
        .collect();
    let mut outcomes = execute_grouped(host, &per_endpoint, "create veth");
    if let Some(HostBridge { index, lock: true }) = bridge {
        add_router_neighbours(host, index, staged, &mut outcomes);
    }
    outcomes
}

/// The router's permanent ARP entries, a step of its own so that only
/// endpoints whose port is locked get one (nothing to undo for the others).
fn add_router_neighbours(
    host: &mut NetlinkSocket,
    bridge: u32,
    staged: &[(usize, Staged)],
    outcomes: &mut [Result<(), RequestError>],
) {
    let wanted: Vec<(usize, Vec<Request>)> = staged
        .iter()
        .zip(outcomes.iter())
        .enumerate()
        .filter_map(|(i, ((_, s), outcome))| {
            let spec = s.spec.filter(|_| outcome.is_ok())?;
            let ip = spec.address.ip();
            Some((i, vec![guard::router_neighbour(bridge, ip, s.port.mac)]))
        })
        .collect();
    let groups: Vec<Vec<Request>> = wanted.iter().map(|(_, r)| r.clone()).collect();
    let results = execute_grouped(host, &groups, "router ARP entry");
    for ((i, _), result) in wanted.into_iter().zip(results) {
        outcomes[i] = result;
    }
}

/// Runs groups of requests in order on one socket (datagrams may span
/// groups) and returns, per group, its first failure.
fn execute_grouped(
    socket: &mut NetlinkSocket,
    groups: &[Vec<Request>],
    what: &str,
) -> Vec<Result<(), RequestError>> {
    let flat: Vec<Request> = groups.iter().flatten().cloned().collect();
    let mut outcomes = match socket.execute(&flat) {
        Ok(o) => o.into_iter(),
        Err(e) => {
            let why = e.to_string();
            return groups
                .iter()
                .map(|_| {
                    Err(RequestError {
                        what: what.into(),
                        source: std::io::Error::other(why.clone()),
                    })
                })
                .collect();
        }
    };
    groups
        .iter()
        .map(|g| {
            let mine: Vec<_> = outcomes.by_ref().take(g.len()).collect();
            mine.into_iter().find(Result::is_err).unwrap_or(Ok(()))
        })
        .collect()
}

/// The request creating a staged endpoint's pair: the host end in the home
/// namespace (on `bridge`, if any, with the index its port rules name), the
/// peer as `eth0` inside the endpoint with the MAC they name.
fn veth_pair_request(s: &Staged, bridge: Option<HostBridge>, peer: &IfName) -> Request {
    // Only an endpoint with an address goes on a bridge; a tenant-free one
    // is attached (and locked) when bound.
    let bridge = bridge.filter(|_| s.spec.is_some());
    let master = bridge.map(|b| b.index);
    Request::create(
        match s.spec {
            Some(spec) => format!(
                "create veth {} for endpoint {}",
                s.host_ifname, spec.address
            ),
            None => format!("create veth {} for a tenant-free endpoint", s.host_ifname),
        },
        messages::veth_pair(&messages::VethPair {
            host: &s.host_ifname,
            // A tenant-free endpoint's host end waits in the node's
            // namespace, whose indexes are not ours to pick; it gets its
            // index when it moves to a router.
            host_index: match bridge {
                Some(HostBridge { lock: true, .. }) => s.port.host_index,
                _ => 0,
            },
            master,
            peer,
            peer_ns: std::os::fd::AsRawFd::as_raw_fd(&s.netns),
            peer_index: ENDPOINT_IFINDEX,
            peer_mac: Some(s.port.mac),
        }),
    )
}

/// Step 3: inside each endpoint whose pair exists, one datagram of four
/// requests. Fills the staged endpoints' result slots.
fn configure_insides(
    staged: Vec<(usize, Staged)>,
    pairs: Vec<Result<(), RequestError>>,
    results: &mut [Option<BuildOutcome>],
) {
    for ((i, mut s), pair) in staged.into_iter().zip(pairs) {
        let configured = pair
            .map_err(EndpointError::from)
            .and_then(|()| configure_inside(&mut s).map_err(EndpointError::from));
        results[i] = Some(configured.map(|()| Built {
            id: s.id,
            netns: s.netns,
            host_ifname: s.host_ifname,
            port: s.port,
            spec: s.spec,
            socket: s.socket,
        }));
        // On error `s.netns` drops here: the kernel removes what was built.
    }
}

fn configure_inside(s: &mut Staged) -> Result<(), NetlinkError> {
    let mut requests = vec![
        Request::change("set lo up", messages::set_up(messages::LOOPBACK_INDEX)),
        Request::change("set eth0 up", messages::set_up(ENDPOINT_IFINDEX)),
    ];
    if let Some(spec) = &s.spec {
        requests.extend(spec.requests_on(ENDPOINT_IFINDEX));
    }
    s.socket.execute_all(&requests)
}
