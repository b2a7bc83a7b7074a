//! What a Docker engine can change on the machine, seen from the machine's own
//! namespace: links, firewall, forwarding and bridge-netfilter sysctls, mounts,
//! cgroups, and the few paths dockerd writes whatever its `--data-root` and
//! `--exec-root` say. Captured before and after a baseline runs, compared, and
//! used to put back what changed.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::process::Command;

use particle_net::RunPrefix;

/// Sysctls dockerd sets (in its own namespace when it runs in one; these are
/// the machine's copies) plus the key quotas it raises machine-wide.
pub const WATCHED_SYSCTLS: &[&str] = &[
    "net/ipv4/ip_forward",
    "net/ipv4/conf/all/forwarding",
    "net/ipv6/conf/all/forwarding",
    "net/ipv6/conf/default/forwarding",
    "net/bridge/bridge-nf-call-iptables",
    "net/bridge/bridge-nf-call-ip6tables",
    "net/bridge/bridge-nf-call-arptables",
    "kernel/keys/root_maxkeys",
    "kernel/keys/root_maxbytes",
];

/// Paths dockerd 20.10 and its containerd use outside their configured roots:
/// the trust key, libnetwork's load-balancer sandbox files, the plugin socket
/// directory and containerd's shim socket directory.
pub const DOCKER_GLOBAL_PATHS: &[&str] = &[
    "/etc/docker",
    "/etc/docker/key.json",
    "/var/lib/docker",
    "/var/lib/docker/network",
    "/var/lib/docker/network/files",
    "/run/docker",
    "/run/docker/plugins",
    "/run/containerd",
    "/run/containerd/s",
];

/// Directories whose entries are compared one by one (they may exist before).
const DOCKER_GLOBAL_DIRS: &[&str] = &["/var/lib/docker/network/files", "/run/containerd/s"];

const CGROUP_ROOT: &str = "/sys/fs/cgroup";

/// A snapshot of the machine's own network and engine state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostState {
    /// `ip -o link` lines.
    pub links: Vec<String>,
    /// `iptables-save` / `ip6tables-save` without comments and counters.
    pub iptables: String,
    pub ip6tables: String,
    /// `nft list ruleset`, when nft is installed.
    pub nft: Option<String>,
    /// [`WATCHED_SYSCTLS`] that exist here, path → value.
    pub sysctls: BTreeMap<String, String>,
    /// `/proc/self/mounts` lines that a Docker engine could own (its roots
    /// here are under `/run/<prefix>/docker-swarm`).
    pub mounts: Vec<String>,
    /// cgroup directories named `docker` or [`docker_cgroup_label`]`(prefix, _)`.
    pub cgroups: BTreeSet<PathBuf>,
    /// Which [`DOCKER_GLOBAL_PATHS`] (and entries of their watched dirs) exist.
    pub docker_paths: BTreeSet<PathBuf>,
    /// Raw `iptables-save` / `ip6tables-save` output, to restore from.
    raw_iptables: String,
    raw_ip6tables: String,
}

impl HostState {
    /// Captures the state; `prefix` selects this run's mounts and cgroups.
    pub fn capture(prefix: &RunPrefix) -> Self {
        let raw_iptables = tool_output("iptables-save", &[]);
        let raw_ip6tables = tool_output("ip6tables-save", &[]);
        let nft = which("nft").map(|_| tool_output("nft", &["list", "ruleset"]));
        Self {
            links: tool_output("ip", &["-o", "link", "show"])
                .lines()
                .map(str::to_string)
                .collect(),
            iptables: normalize_iptables(&raw_iptables),
            ip6tables: normalize_iptables(&raw_ip6tables),
            nft,
            sysctls: WATCHED_SYSCTLS
                .iter()
                .filter_map(|k| {
                    let v = fs::read_to_string(Path::new("/proc/sys").join(k)).ok()?;
                    Some((k.to_string(), v.trim().to_string()))
                })
                .collect(),
            mounts: fs::read_to_string("/proc/self/mounts")
                .unwrap_or_default()
                .lines()
                .filter(|l| l.contains("docker") || l.contains("containerd"))
                .map(str::to_string)
                .collect(),
            cgroups: cgroup_dirs(|name| {
                name == "docker" || name.starts_with(&docker_cgroup_label(prefix, ""))
            }),
            docker_paths: docker_paths(),
            raw_iptables,
            raw_ip6tables,
        }
    }

    /// What differs from `after`, one line each (empty when identical).
    pub fn differences(&self, after: &HostState) -> Vec<String> {
        let mut out = Vec::new();
        list_diff(&mut out, "link", &self.links, &after.links);
        if self.iptables != after.iptables {
            out.push(format!(
                "iptables changed:\n--- before\n{}\n--- after\n{}",
                self.iptables, after.iptables
            ));
        }
        if self.ip6tables != after.ip6tables {
            out.push(format!(
                "ip6tables changed:\n--- before\n{}\n--- after\n{}",
                self.ip6tables, after.ip6tables
            ));
        }
        if self.nft != after.nft {
            out.push("nft ruleset changed".into());
        }
        for (k, v) in &self.sysctls {
            match after.sysctls.get(k) {
                Some(w) if w == v => {}
                w => out.push(format!("sysctl {k}: {v} -> {w:?}")),
            }
        }
        list_diff(&mut out, "mount", &self.mounts, &after.mounts);
        set_diff(&mut out, "cgroup", &self.cgroups, &after.cgroups);
        set_diff(&mut out, "path", &self.docker_paths, &after.docker_paths);
        out
    }

    /// Puts back what changed between `self` (before) and `now`: sysctl
    /// values, the firewall, and cgroups and Docker's global paths that did
    /// not exist before. Returns what it could not put back.
    pub fn restore(&self, now: &HostState) -> Vec<String> {
        let mut problems = Vec::new();
        for (k, v) in &self.sysctls {
            if now.sysctls.get(k) != Some(v) {
                if let Err(e) = fs::write(Path::new("/proc/sys").join(k), v) {
                    problems.push(format!("restoring sysctl {k}={v}: {e}"));
                }
            }
        }
        // Only a ruleset Docker changed (its chains are there) is put back:
        // any other change is someone else's, and reverting it would harm.
        for (tool, before, now) in [
            ("iptables-restore", &self.raw_iptables, &now.raw_iptables),
            ("ip6tables-restore", &self.raw_ip6tables, &now.raw_ip6tables),
        ] {
            if normalize_iptables(before) == normalize_iptables(now) {
                continue;
            }
            if now.contains(":DOCKER") {
                problems.extend(iptables_restore(tool, before).err());
            } else {
                problems.push(format!(
                    "the machine's {} changed, not by Docker; left as it is",
                    tool.trim_end_matches("-restore")
                ));
            }
        }
        // Deepest first, so a directory is empty of our cgroups when its turn comes.
        let mut new_cgroups: Vec<&PathBuf> = now.cgroups.difference(&self.cgroups).collect();
        new_cgroups.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
        for dir in new_cgroups {
            if let Err(e) = remove_cgroup(dir) {
                problems.push(format!("removing cgroup {}: {e}", dir.display()));
            }
        }
        problems.extend(restore_docker_paths(&self.docker_paths, &now.docker_paths));
        if self.nft != now.nft {
            problems.push("the nft ruleset changed; not restored automatically".into());
        }
        if self.links != now.links {
            problems.push(format!(
                "the machine's links changed; not restored automatically: {:?}",
                now.links
            ));
        }
        problems
    }
}

/// The name of the cgroup parent of host `host`'s containers (relative, so
/// below the daemon's own cgroup in each hierarchy).
pub fn docker_cgroup_label(prefix: &RunPrefix, host: &str) -> String {
    prefix.label(&format!("docker-h{host}"))
}

/// Removes Docker's global paths (and entries of its watched directories)
/// that exist `now` but not `before`, deepest first.
pub fn restore_docker_paths(before: &BTreeSet<PathBuf>, now: &BTreeSet<PathBuf>) -> Vec<String> {
    let mut problems = Vec::new();
    let mut new_paths: Vec<&PathBuf> = now.difference(before).collect();
    new_paths.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
    for path in new_paths {
        let removed = match fs::symlink_metadata(path) {
            Ok(m) if m.is_dir() => fs::remove_dir_all(path),
            Ok(_) => fs::remove_file(path),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(e),
        };
        if let Err(e) = removed {
            problems.push(format!("removing {}: {e}", path.display()));
        }
    }
    problems
}

/// Which Docker global paths exist now.
pub fn current_docker_paths() -> BTreeSet<PathBuf> {
    docker_paths()
}

fn list_diff(out: &mut Vec<String>, what: &str, before: &[String], after: &[String]) {
    let b: BTreeSet<&String> = before.iter().collect();
    let a: BTreeSet<&String> = after.iter().collect();
    for gone in b.difference(&a) {
        out.push(format!("{what} gone: {gone}"));
    }
    for new in a.difference(&b) {
        out.push(format!("{what} new: {new}"));
    }
}

fn set_diff(out: &mut Vec<String>, what: &str, b: &BTreeSet<PathBuf>, a: &BTreeSet<PathBuf>) {
    for gone in b.difference(a) {
        out.push(format!("{what} gone: {}", gone.display()));
    }
    for new in a.difference(b) {
        out.push(format!("{what} new: {}", new.display()));
    }
}

/// The output of a tool, or a marker when it cannot run (compared like any
/// other output, so a tool that vanishes mid-run shows up as a change).
fn tool_output(tool: &str, args: &[&str]) -> String {
    match Command::new(tool).args(args).output() {
        Ok(o) if o.status.success() => String::from_utf8_lossy(&o.stdout).into_owned(),
        Ok(o) => format!(
            "<{tool} failed: {}>",
            String::from_utf8_lossy(&o.stderr).trim()
        ),
        Err(e) => format!("<{tool} unavailable: {e}>"),
    }
}

/// Drops comments (they carry a timestamp) and packet counters.
fn normalize_iptables(save: &str) -> String {
    save.lines()
        .filter(|l| !l.starts_with('#'))
        .map(|l| match (l.starts_with(':'), l.rfind(" [")) {
            (true, Some(i)) => &l[..i],
            _ => l,
        })
        .collect::<Vec<_>>()
        .join("\n")
}

fn iptables_restore(tool: &str, saved: &str) -> Result<(), String> {
    use std::io::Write;
    if saved.starts_with('<') {
        return Err(format!("{tool}: nothing saved to restore from ({saved})"));
    }
    let mut child = Command::new(tool)
        .stdin(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .map_err(|e| format!("{tool}: {e}"))?;
    if let Some(mut stdin) = child.stdin.take() {
        stdin
            .write_all(saved.as_bytes())
            .map_err(|e| format!("{tool}: {e}"))?;
    }
    let out = child
        .wait_with_output()
        .map_err(|e| format!("{tool}: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "{tool}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

pub(crate) fn which(tool: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|d| d.join(tool))
        .find(|p| p.is_file())
}

fn docker_paths() -> BTreeSet<PathBuf> {
    let mut found: BTreeSet<PathBuf> = DOCKER_GLOBAL_PATHS
        .iter()
        .map(PathBuf::from)
        .filter(|p| p.symlink_metadata().is_ok())
        .collect();
    for dir in DOCKER_GLOBAL_DIRS {
        if let Ok(entries) = fs::read_dir(dir) {
            found.extend(entries.flatten().map(|e| e.path()));
        }
    }
    found
}

/// The directories where a cgroup named `name` can be for a process in our
/// cgroups: under each hierarchy's root and under our own cgroup there (a
/// relative `--cgroup-parent` lands below the daemon's own cgroup).
pub(crate) fn cgroup_bases() -> BTreeSet<PathBuf> {
    let own: BTreeSet<String> = fs::read_to_string("/proc/self/cgroup")
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.splitn(3, ':').nth(2))
        .map(|p| p.trim_start_matches('/').to_string())
        .collect();
    let mut hierarchies = vec![PathBuf::from(CGROUP_ROOT)];
    if let Ok(entries) = fs::read_dir(CGROUP_ROOT) {
        hierarchies.extend(
            entries
                .flatten()
                .map(|e| e.path())
                .filter(|p| p.join("cgroup.procs").exists()),
        );
    }
    let mut bases = BTreeSet::new();
    for h in hierarchies {
        for p in &own {
            let base = h.join(p);
            if base.is_dir() {
                bases.insert(base);
            }
        }
        bases.insert(h);
    }
    bases
}

/// cgroup directories directly under [`cgroup_bases`] whose name matches.
pub(crate) fn cgroup_dirs(matches: impl Fn(&str) -> bool) -> BTreeSet<PathBuf> {
    let mut found = BTreeSet::new();
    for base in cgroup_bases() {
        if let Ok(entries) = fs::read_dir(&base) {
            for e in entries.flatten() {
                let name = e.file_name();
                if e.path().is_dir() && matches(&name.to_string_lossy()) {
                    found.insert(e.path());
                }
            }
        }
    }
    found
}

/// Removes a cgroup and the (empty) cgroups below it; cgroupfs directories go
/// with `rmdir`, never by deleting their files.
pub(crate) fn remove_cgroup(dir: &Path) -> io::Result<()> {
    if let Ok(entries) = fs::read_dir(dir) {
        for e in entries.flatten() {
            if e.file_type().map(|t| t.is_dir()).unwrap_or(false) {
                remove_cgroup(&e.path())?;
            }
        }
    }
    match fs::remove_dir(dir) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        r => r,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn iptables_comparison_ignores_timestamps_and_counters() {
        let a = "# Generated by iptables-save v1.8.9 on Mon\n*filter\n:INPUT ACCEPT [10:200]\n-A INPUT -j ACCEPT\nCOMMIT\n";
        let b = "# Generated by iptables-save v1.8.9 on Tue\n*filter\n:INPUT ACCEPT [0:0]\n-A INPUT -j ACCEPT\nCOMMIT\n";
        assert_eq!(normalize_iptables(a), normalize_iptables(b));
        let c = "*filter\n:INPUT DROP [0:0]\n-A INPUT -j ACCEPT\nCOMMIT\n";
        assert_ne!(normalize_iptables(a), normalize_iptables(c));
    }
}
