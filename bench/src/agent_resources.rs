//! An outside-in census of what a running node-agent process holds, read by
//! pid from `/proc` and from netlink dumps of every network namespace it
//! references. The churn soak reads it before and after the churn: every
//! counter that is back where it started is not leaking.
//!
//! What is counted, and where it comes from:
//!
//! - the process tree: the agent and its descendants, found by walking the
//!   `ppid` field of `/proc/*/stat` down from the agent;
//! - the network namespaces that tree references: each thread's
//!   `/proc/PID/task/TID/ns/net` (a worker thread may sit in a namespace of
//!   its own) and every fd whose link reads `net:[INODE]`, told apart by
//!   inode. Each is opened through that same `/proc` path (the kernel hands
//!   back an nsfs fd like the one from `/proc/PID/ns/net`) and dumped with
//!   [`particle_net::NetlinkSocket`];
//! - the agent's own fds, threads and resident memory.
//!
//! Not seen: a namespace kept alive only by a socket whose namespace fd was
//! closed (the socket still shows in `fds`), and bind mounts under
//! `/run/netns` (the garbage collector's business, not a process's).
//!
//! The kernel counts more than anyone asked for, so compare a census with
//! another census, never with what the agent thinks it made: a fresh
//! namespace has one link (`lo`, down) and nothing else, but `lo` up brings
//! 127.0.0.1 and three local-table routes; an IPv4 address brings a local
//! route, and with its link up a prefix and a broadcast route too; every
//! link's multicast list shows up in the FDB dump (`33:33:00:00:00:01` for
//! every link from its creation, even with IPv6 disabled;
//! `01:00:5e:00:00:01` once it is up; more with IPv6 on); a bridge lists its
//! own MAC and each port's, and learns entries from traffic that age out
//! after 300 s.
//! Neighbour entries count every state but NOARP: those are multicast and
//! broadcast mappings the kernel computes when a link sends to such an
//! address (e.g. a bridge's IGMP report to 224.0.0.22) and collects on its
//! own timers; they hold nothing of ours, and counting them made a census
//! depend on when the kernel last sent a report.
//!
//! Processes and fds come and go while this reads them: one that vanishes
//! half-way is skipped, not an error. Only the agent itself must be running.
//! Reading one's own pid counts the fd the reader holds on `/proc/self/fd`.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use nix::errno::Errno;
use particle_net::endpoint::list_arp_entries;
use particle_net::netlink::messages;
use particle_net::{NetNs, NetNsError, NetlinkError, NetlinkSocket};
use serde::Serialize;

/// What one agent process holds, read from outside (by pid). Namespace
/// counters are summed over [`Self::namespaces`]; process counters are the
/// agent's own unless they say otherwise.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct AgentResources {
    /// Distinct network namespaces referenced by the agent and its live
    /// descendants: their threads' own namespaces plus every namespace fd.
    pub namespaces: usize,
    /// Links (all kinds, up or down).
    pub links: usize,
    /// IPv4 addresses.
    pub addresses: usize,
    /// IPv4 routes, all tables (local and main included).
    pub routes: usize,
    /// IPv4 neighbour (ARP) entries, all states but NOARP (see above).
    pub neighbours: usize,
    /// Bridge FDB entries (the `AF_BRIDGE` neighbour dump, as `bridge fdb
    /// show` lists them, links' multicast lists included).
    pub fdb: usize,
    /// Open fds of the agent process.
    pub fds: usize,
    /// Threads of the agent process.
    pub threads: usize,
    /// The agent and its live descendants.
    pub processes: usize,
    /// Descendants that exited and were never reaped (an agent that forgets
    /// to `wait` leaks these).
    pub zombies: usize,
    /// Resident memory of the agent process (`VmRSS`). It moves with the
    /// allocator: bound its growth rather than expect it back exactly.
    pub rss_kib: u64,
}

/// Kernel objects in one network namespace.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct NamespaceCounts {
    pub links: usize,
    pub addresses: usize,
    pub routes: usize,
    pub neighbours: usize,
    pub fdb: usize,
}

#[derive(Debug, thiserror::Error)]
pub enum ResourcesError {
    #[error("process {pid} is not running")]
    NotRunning { pid: i32 },
    #[error("cannot read {path}: {source}")]
    Proc {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{path}: no {field} in {text:?}")]
    Malformed {
        path: PathBuf,
        field: &'static str,
        text: String,
    },
    #[error("cannot open network namespace net:[{inode}]: {source}")]
    OpenNamespace {
        inode: u64,
        #[source]
        source: NetNsError,
    },
    #[error("counting objects in network namespace net:[{inode}]: {source}")]
    Count {
        inode: u64,
        #[source]
        source: NetlinkError,
    },
}

impl AgentResources {
    /// Takes the census of the process `pid` and its descendants.
    pub fn read(pid: i32) -> Result<Self, ResourcesError> {
        let proc_dir = PathBuf::from(format!("/proc/{pid}"));
        let gone = |e: io::Error, path: PathBuf| {
            if vanished(&e) {
                ResourcesError::NotRunning { pid }
            } else {
                ResourcesError::Proc { path, source: e }
            }
        };

        let status_path = proc_dir.join("status");
        let text = fs::read_to_string(&status_path).map_err(|e| gone(e, status_path.clone()))?;
        let status = match parse_status(&text) {
            Ok(status) => status,
            // A zombie has no memory, so no VmRSS line: it is not running.
            Err(_) if status_state(&text) == Some('Z') => {
                return Err(ResourcesError::NotRunning { pid })
            }
            Err(field) => {
                return Err(ResourcesError::Malformed {
                    path: status_path,
                    field,
                    text,
                })
            }
        };

        let fd_dir = proc_dir.join("fd");
        let fds = fs::read_dir(&fd_dir)
            .map_err(|e| gone(e, fd_dir.clone()))?
            .filter(|entry| entry.is_ok())
            .count();

        let tree = process_tree(pid)?;
        let mut live = vec![pid];
        live.extend(tree.iter().filter(|p| !p.zombie).map(|p| p.pid));
        let zombies = tree.iter().filter(|p| p.zombie).count();

        let mut counts = NamespaceCounts::default();
        let namespaces = namespace_paths(&live)?;
        let mut opened = 0;
        for (inode, paths) in &namespaces {
            let Some(ns) = open_namespace(*inode, paths)? else {
                continue; // every holder went away while we looked
            };
            let found = NamespaceCounts::count(&ns).map_err(|source| ResourcesError::Count {
                inode: *inode,
                source,
            })?;
            counts.add(&found);
            opened += 1;
        }

        Ok(Self {
            namespaces: opened,
            links: counts.links,
            addresses: counts.addresses,
            routes: counts.routes,
            neighbours: counts.neighbours,
            fdb: counts.fdb,
            fds,
            threads: status.threads,
            processes: live.len(),
            zombies,
            rss_kib: status.rss_kib,
        })
    }

    /// Every counter by its field name, in declaration order.
    pub fn counters(&self) -> [(&'static str, i64); 11] {
        let n = |v: usize| i64::try_from(v).unwrap_or(i64::MAX);
        [
            ("namespaces", n(self.namespaces)),
            ("links", n(self.links)),
            ("addresses", n(self.addresses)),
            ("routes", n(self.routes)),
            ("neighbours", n(self.neighbours)),
            ("fdb", n(self.fdb)),
            ("fds", n(self.fds)),
            ("threads", n(self.threads)),
            ("processes", n(self.processes)),
            ("zombies", n(self.zombies)),
            ("rss_kib", i64::try_from(self.rss_kib).unwrap_or(i64::MAX)),
        ]
    }

    /// Counter name -> `later - self`, for every counter (the soak's JSON
    /// `leaked`: all zeros but `rss_kib` when nothing leaks).
    pub fn delta(&self, later: &Self) -> BTreeMap<String, i64> {
        self.counters()
            .into_iter()
            .zip(later.counters())
            .map(|((name, before), (_, after))| (name.to_string(), after.saturating_sub(before)))
            .collect()
    }
}

impl NamespaceCounts {
    /// Dumps the namespace's tables through a netlink socket opened in it.
    pub fn count(ns: &NetNs) -> Result<Self, NetlinkError> {
        let mut socket = NetlinkSocket::open_in(ns)?;
        let neighbours = list_arp_entries(&mut socket)?
            .iter()
            .filter(|e| !e.computed())
            .count();
        // Every reply of a dump is one object; the end marker is not returned.
        let mut count = |what, request| socket.query(what, request, true).map(|r| r.len());
        Ok(Self {
            links: count("list links", messages::dump_links())?,
            addresses: count("list addresses", messages::dump_ipv4_addresses())?,
            routes: count("list routes", messages::dump_ipv4_routes())?,
            neighbours,
            fdb: count("list FDB", messages::dump_fdb())?,
        })
    }

    fn add(&mut self, other: &Self) {
        self.links += other.links;
        self.addresses += other.addresses;
        self.routes += other.routes;
        self.neighbours += other.neighbours;
        self.fdb += other.fdb;
    }
}

/// The process, or the fd, went away between listing and reading it.
fn vanished(e: &io::Error) -> bool {
    matches!(e.raw_os_error(), Some(c) if c == Errno::ENOENT as i32 || c == Errno::ESRCH as i32)
}

/// What the census needs from `/proc/PID/status`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Status {
    rss_kib: u64,
    threads: usize,
}

/// Parses `/proc/PID/status`; the error names the missing field.
fn parse_status(text: &str) -> Result<Status, &'static str> {
    let field = |name: &'static str| -> Result<u64, &'static str> {
        text.lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(':'))
            .and_then(|v| v.split_whitespace().next()?.parse().ok())
            .ok_or(name)
    };
    Ok(Status {
        rss_kib: field("VmRSS")?,
        threads: usize::try_from(field("Threads")?).map_err(|_| "Threads")?,
    })
}

/// The state letter of `/proc/PID/status` (`Z` for a zombie).
fn status_state(text: &str) -> Option<char> {
    text.lines()
        .find_map(|l| l.strip_prefix("State:"))?
        .trim_start()
        .chars()
        .next()
}

/// One line of `/proc/PID/stat`, as far as the tree walk needs it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct StatLine {
    pid: i32,
    ppid: i32,
    zombie: bool,
}

/// Parses `PID (COMM) STATE PPID ...` (`particle_net::proc_stat`).
fn parse_stat(text: &str) -> Option<StatLine> {
    particle_net::proc_stat::ProcStat::parse(text).map(|s| StatLine {
        pid: s.pid,
        ppid: s.ppid,
        zombie: s.is_zombie(),
    })
}

/// The descendants of `root` (not `root` itself), zombies included.
fn process_tree(root: i32) -> Result<Vec<StatLine>, ResourcesError> {
    let proc_root = Path::new("/proc");
    let entries = fs::read_dir(proc_root).map_err(|source| ResourcesError::Proc {
        path: proc_root.to_owned(),
        source,
    })?;
    let mut children: HashMap<i32, Vec<StatLine>> = HashMap::new();
    for entry in entries.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<i32>().ok())
        else {
            continue; // not a process directory
        };
        let path = entry.path().join("stat");
        let text = match fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) if vanished(&e) => continue,
            Err(source) => return Err(ResourcesError::Proc { path, source }),
        };
        let line = parse_stat(&text).filter(|l| l.pid == pid).ok_or_else(|| {
            ResourcesError::Malformed {
                path,
                field: "pid, state and ppid",
                text: text.clone(),
            }
        })?;
        children.entry(line.ppid).or_default().push(line);
    }

    let mut tree = Vec::new();
    let mut seen = HashSet::from([root]);
    let mut queue = vec![root];
    while let Some(parent) = queue.pop() {
        for child in children.remove(&parent).unwrap_or_default() {
            // A recycled pid could otherwise loop the walk.
            if seen.insert(child.pid) {
                queue.push(child.pid);
                tree.push(child);
            }
        }
    }
    Ok(tree)
}

/// The inode in a namespace link's text, `net:[4026531840]`.
fn net_inode(link: &Path) -> Option<u64> {
    link.to_str()?
        .strip_prefix("net:[")?
        .strip_suffix(']')?
        .parse()
        .ok()
}

/// Network namespaces referenced by `pids` (their threads' own and their
/// fds), by inode, each with the `/proc` paths it can be opened through.
fn namespace_paths(pids: &[i32]) -> Result<BTreeMap<u64, Vec<PathBuf>>, ResourcesError> {
    let mut found: BTreeMap<u64, Vec<PathBuf>> = BTreeMap::new();
    for pid in pids {
        let proc_dir = PathBuf::from(format!("/proc/{pid}"));
        let tasks = list_dir(&proc_dir.join("task"))?
            .into_iter()
            .map(|task| task.join("ns/net"));
        let fds = list_dir(&proc_dir.join("fd"))?;
        for path in tasks.chain(fds) {
            let link = match fs::read_link(&path) {
                Ok(l) => l,
                Err(e) if vanished(&e) => continue,
                Err(source) => return Err(ResourcesError::Proc { path, source }),
            };
            if let Some(inode) = net_inode(&link) {
                found.entry(inode).or_default().push(path);
            }
        }
    }
    Ok(found)
}

/// The entries of a `/proc` directory; empty if its process went away.
fn list_dir(dir: &Path) -> Result<Vec<PathBuf>, ResourcesError> {
    match fs::read_dir(dir) {
        Ok(entries) => Ok(entries.flatten().map(|e| e.path()).collect()),
        Err(e) if vanished(&e) => Ok(Vec::new()),
        Err(source) => Err(ResourcesError::Proc {
            path: dir.to_owned(),
            source,
        }),
    }
}

/// Opens namespace `inode` through the first of `paths` that still leads to
/// it; `None` if none does (its holders closed it or exited meanwhile).
fn open_namespace(inode: u64, paths: &[PathBuf]) -> Result<Option<NetNs>, ResourcesError> {
    for path in paths {
        let ns = match NetNs::open(path) {
            Ok(ns) => ns,
            Err(NetNsError::Open { source, .. }) if vanished(&source) => continue,
            Err(source) => return Err(ResourcesError::OpenNamespace { inode, source }),
        };
        // The fd number may have been closed and reused for another file
        // between the readlink and the open.
        match ns.inode() {
            Ok(i) if i == inode => return Ok(Some(ns)),
            Ok(_) => continue,
            Err(e) => {
                return Err(ResourcesError::OpenNamespace {
                    inode,
                    source: NetNsError::Open {
                        path: path.clone(),
                        source: e,
                    },
                })
            }
        }
    }
    Ok(None)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_lines_parse_past_odd_command_names() {
        assert_eq!(
            parse_stat("4242 (my (odd) proc) S 17 4242 4242 0 -1 4194560 ..."),
            Some(StatLine {
                pid: 4242,
                ppid: 17,
                zombie: false
            })
        );
        assert_eq!(
            parse_stat("7 (sh) Z 6 7 7 0"),
            Some(StatLine {
                pid: 7,
                ppid: 6,
                zombie: true
            })
        );
        assert_eq!(parse_stat("7 (sh"), None);
        assert_eq!(parse_stat("x (sh) S 1"), None);
    }

    #[test]
    fn status_gives_rss_and_threads() {
        let text = "Name:\tparticle\nState:\tS (sleeping)\nVmRSS:\t   12345 kB\nThreads:\t7\n";
        assert_eq!(
            parse_status(text),
            Ok(Status {
                rss_kib: 12345,
                threads: 7
            })
        );
        assert_eq!(status_state(text), Some('S'));
        let zombie = "Name:\tsh\nState:\tZ (zombie)\nThreads:\t1\n";
        assert_eq!(parse_status(zombie), Err("VmRSS"));
        assert_eq!(status_state(zombie), Some('Z'));
    }

    #[test]
    fn only_network_namespace_links_count() {
        assert_eq!(net_inode(Path::new("net:[4026531840]")), Some(4026531840));
        assert_eq!(net_inode(Path::new("mnt:[4026531841]")), None);
        assert_eq!(net_inode(Path::new("socket:[99]")), None);
        assert_eq!(net_inode(Path::new("/run/netns/net:[1]")), None);
    }

    #[test]
    fn delta_names_every_field_as_serialized() {
        let before = AgentResources {
            links: 3,
            fds: 10,
            rss_kib: 1000,
            ..Default::default()
        };
        let after = AgentResources {
            links: 5,
            fds: 9,
            rss_kib: 1500,
            ..Default::default()
        };
        let delta = before.delta(&after);
        let serde_json::Value::Object(fields) = serde_json::to_value(&before).expect("serializes")
        else {
            panic!("not a JSON object");
        };
        assert_eq!(
            delta.keys().collect::<HashSet<_>>(),
            fields.keys().collect::<HashSet<_>>(),
            "delta and the JSON fields drifted apart"
        );
        assert_eq!(delta["links"], 2);
        assert_eq!(delta["fds"], -1);
        assert_eq!(delta["rss_kib"], 500);
        assert_eq!(delta.values().filter(|v| **v != 0).count(), 3);
    }

    #[test]
    fn a_missing_process_is_not_running() {
        // pid_max is at most 2^22, so this pid never exists.
        let pid = i32::MAX;
        assert!(matches!(
            AgentResources::read(pid),
            Err(ResourcesError::NotRunning { pid: p }) if p == pid
        ));
    }
}
