//! Garbage collection of what crashed runs left behind.
//!
//! Namespaces held only by fd die with their process, and their veth pairs with
//! them, so a crash leaves only what has a life of its own: bind-mounted
//! namespaces under `/run/netns` and links (bridges, host ends of pairs whose
//! namespace is mounted) in a namespace that outlives the run. An object is
//! collected when its name carries a run prefix whose lock file exists but is
//! no longer locked (see [`crate::names`]): the run is known to be Particle's
//! and known to be dead. Live runs and unknown names are never touched.

use std::collections::BTreeSet;
use std::fs;
use std::path::{Path, PathBuf};

use crate::bridge::delete_link;
use crate::endpoint::list_links;
use crate::names::{RunPrefix, RUN_DIR};
use crate::netlink::{NetlinkError, NetlinkSocket};
use crate::netns::{unmount_path, NETNS_RUN_DIR};

/// What a collection removed, and what it could not.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct GcReport {
    pub namespaces: Vec<String>,
    pub links: Vec<String>,
    pub runs: Vec<String>,
    pub errors: Vec<String>,
}

impl GcReport {
    pub fn removed(&self) -> usize {
        self.namespaces.len() + self.links.len()
    }

    fn merge(&mut self, other: GcReport) {
        self.namespaces.extend(other.namespaces);
        self.links.extend(other.links);
        self.runs.extend(other.runs);
        self.errors.extend(other.errors);
    }
}

fn dead_run(name: &str) -> Option<RunPrefix> {
    RunPrefix::of_name(name).filter(|p| p.lock_path().exists() && !p.is_live())
}

/// Unmounts and removes dead runs' named namespaces under `/run/netns`.
pub fn collect_mounted_namespaces() -> GcReport {
    collect_mounted_namespaces_in(Path::new(NETNS_RUN_DIR))
}

fn collect_mounted_namespaces_in(dir: &Path) -> GcReport {
    let mut report = GcReport::default();
    let Ok(entries) = fs::read_dir(dir) else {
        return report;
    };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if dead_run(&name).is_none() {
            continue;
        }
        match unmount_path(&entry.path()) {
            Ok(()) => report.namespaces.push(name),
            Err(e) => report.errors.push(e.to_string()),
        }
    }
    report
}

/// Deletes dead runs' links in the socket's namespace.
pub fn collect_links(socket: &mut NetlinkSocket) -> GcReport {
    let mut report = GcReport::default();
    let links = match list_links(socket) {
        Ok(l) => l,
        Err(e) => {
            report.errors.push(format!("listing links: {e}"));
            return report;
        }
    };
    for link in links {
        if dead_run(&link.name).is_none() {
            continue;
        }
        match delete_link(socket, &link.name) {
            Ok(()) => report.links.push(link.name),
            // Gone already: its namespace or its peer went first.
            Err(NetlinkError::Request(e)) if e.errno() == Some(nix::libc::ENODEV) => {}
            Err(e) => report.errors.push(e.to_string()),
        }
    }
    report
}

/// Namespaces of dead runs mounted under `/run/netns` before the directory
/// became a mount of its own (see `make_run_dir_a_mount_point`), and so
/// hidden beneath it: the directory's mount is moved aside for a moment (its
/// own entries go with it and come back), the hidden mounts are removed, and
/// it is moved back.
pub fn collect_hidden_namespaces() -> GcReport {
    let mut report = GcReport::default();
    let Ok(mounts) = fs::read_to_string("/proc/thread-self/mountinfo") else {
        return report;
    };
    let mounts: Vec<Vec<&str>> = mounts.lines().map(|l| l.split(' ').collect()).collect();
    // Fields: id, parent id, major:minor, root, mount point, ...
    // The top-most mount there, if the directory was bound over itself twice.
    let Some(dir) = mounts
        .iter()
        .rev()
        .find(|m| m.get(4) == Some(&NETNS_RUN_DIR))
    else {
        return report; // nothing can be hidden beneath a mount that is not there
    };
    let below = format!("{NETNS_RUN_DIR}/");
    let hidden: Vec<String> = mounts
        .iter()
        .filter(|m| m.get(1) != dir.first() && m.get(4).is_some_and(|p| p.starts_with(&below)))
        .filter_map(|m| m.get(4)?.strip_prefix(&below).map(str::to_string))
        .filter(|name| dead_run(name).is_some())
        .collect();
    if hidden.is_empty() {
        return report;
    }
    let aside = Path::new(RUN_DIR).join(format!("netns-aside-{}", std::process::id()));
    let moved = fs::create_dir_all(&aside)
        .map_err(|e| e.to_string())
        .and_then(|()| move_mount(Path::new(NETNS_RUN_DIR), &aside));
    if let Err(e) = moved {
        report
            .errors
            .push(format!("moving {NETNS_RUN_DIR} aside: {e}"));
        let _ = fs::remove_dir(&aside);
        return report;
    }
    for name in hidden {
        // A recursive bind of the directory may hold a copy of the hidden
        // mount on the same file: that copy goes too, or the file stays busy.
        let _ = nix::mount::umount2(&aside.join(&name), nix::mount::MntFlags::MNT_DETACH);
        match unmount_path(&Path::new(NETNS_RUN_DIR).join(&name)) {
            Ok(()) => report.namespaces.push(name),
            Err(e) => report.errors.push(e.to_string()),
        }
    }
    if let Err(e) = move_mount(&aside, Path::new(NETNS_RUN_DIR)) {
        report.errors.push(format!(
            "moving {NETNS_RUN_DIR} back from {}: {e}",
            aside.display()
        ));
        return report;
    }
    let _ = fs::remove_dir(&aside);
    report
}

fn move_mount(from: &Path, to: &Path) -> Result<(), String> {
    nix::mount::mount(
        Some(from),
        to,
        None::<&str>,
        nix::mount::MsFlags::MS_MOVE,
        None::<&str>,
    )
    .map_err(|e| e.to_string())
}

/// Removes the lock files of dead runs once their objects are gone; a run
/// whose objects could not all be removed keeps its lock, so the next
/// collection still knows them for a dead run's and tries again.
pub fn collect_run_locks() -> GcReport {
    collect_run_locks_except(&[])
}

fn collect_run_locks_except(failed: &[String]) -> GcReport {
    let mut report = GcReport::default();
    let Ok(entries) = fs::read_dir(RUN_DIR) else {
        return report;
    };
    let dead: BTreeSet<PathBuf> = entries
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            let prefix = name.strip_suffix(".lock")?;
            if failed.iter().any(|f| f.contains(prefix)) {
                return None;
            }
            dead_run(prefix).map(|_| e.path())
        })
        .collect();
    for path in dead {
        match fs::remove_file(&path) {
            Ok(()) => report.runs.push(
                path.file_stem()
                    .unwrap_or_default()
                    .to_string_lossy()
                    .into(),
            ),
            Err(e) => report.errors.push(format!("{}: {e}", path.display())),
        }
    }
    report
}

/// Collects everything: mounted namespaces, links in the socket's namespace
/// (if given), then the dead runs' lock files.
pub fn collect(socket: Option<&mut NetlinkSocket>) -> GcReport {
    // Hidden ones first: their files look like plain entries to the next pass.
    let mut report = collect_hidden_namespaces();
    report.merge(collect_mounted_namespaces());
    if let Some(socket) = socket {
        report.merge(collect_links(socket));
    }
    let locks = collect_run_locks_except(&report.errors);
    report.merge(locks);
    report
}
