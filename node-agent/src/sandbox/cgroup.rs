//! One cgroup per function, under a parent this agent owns, on cgroup v1
//! (a hierarchy per controller: pids, memory, cpu; this project's machines
//! are v1 hybrid) and v2 (one unified tree).
//!
//! The parent is `<label>` (the agent's run prefix and node) under the
//! agent's own cgroup in each hierarchy, so functions stay inside whatever
//! limits the agent itself runs under. It is made at start (a leftover of
//! the same label, or of a dead run of Particle's, is removed first) and
//! removed on stop.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use super::Limits;

const ROOT: &str = "/sys/fs/cgroup";

#[derive(Debug, thiserror::Error)]
pub enum CgroupError {
    #[error("no cgroup hierarchy with the {0} controller (is /sys/fs/cgroup mounted?)")]
    Missing(&'static str),
    #[error("cgroup {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> CgroupError + '_ {
    move |source| CgroupError::Io {
        path: path.to_owned(),
        source,
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Version {
    V1,
    V2,
}

/// The agent's parent cgroup(s).
#[derive(Debug)]
pub struct CgroupTree {
    version: Version,
    /// v1: (controller, parent dir) for pids, memory, cpu; v2: one entry.
    parents: Placed,
}

/// Where this process sits in each hierarchy: (controllers, mount point
/// joined with its own path).
/// (controller, directory) pairs.
type Placed = Vec<(&'static str, PathBuf)>;

fn own_cgroups() -> Result<(Version, Placed), CgroupError> {
    let mountinfo = fs::read_to_string("/proc/self/mountinfo")
        .map_err(io_err(Path::new("/proc/self/mountinfo")))?;
    let membership =
        fs::read_to_string("/proc/self/cgroup").map_err(io_err(Path::new("/proc/self/cgroup")))?;
    let own = |hierarchy: &str| -> Option<String> {
        membership.lines().find_map(|l| {
            let mut parts = l.splitn(3, ':');
            let (_, ctrls, path) = (parts.next()?, parts.next()?, parts.next()?);
            let matches = if hierarchy.is_empty() {
                ctrls.is_empty()
            } else {
                ctrls.split(',').any(|c| c == hierarchy)
            };
            matches.then(|| path.to_string())
        })
    };
    let mut v1 = Vec::new();
    let mut v2 = None;
    for line in mountinfo.lines() {
        let Some((left, right)) = line.split_once(" - ") else {
            continue;
        };
        let fields: Vec<&str> = left.split(' ').collect();
        let rfields: Vec<&str> = right.split(' ').collect();
        let (Some(root), Some(point), Some(fstype)) =
            (fields.get(3), fields.get(4), rfields.first())
        else {
            continue;
        };
        // A hierarchy mounted from inside (a container) shows only part of it.
        let place = |path: String| {
            let inner = path
                .strip_prefix(*root)
                .unwrap_or(&path)
                .trim_start_matches('/');
            Path::new(point).join(inner)
        };
        match *fstype {
            "cgroup" => {
                let opts = rfields.get(2).copied().unwrap_or_default();
                for ctrl in ["pids", "memory", "cpu"] {
                    let seen = v1.iter().any(|(c, _)| *c == ctrl);
                    if !seen && opts.split(',').any(|o| o == ctrl) {
                        if let Some(path) = own(ctrl) {
                            v1.push((ctrl, place(path)));
                        }
                    }
                }
            }
            "cgroup2" => {
                let has_controllers = fs::read_to_string(
                    Path::new(point).join("cgroup.controllers"),
                )
                .is_ok_and(|c| {
                    ["pids", "memory", "cpu"]
                        .iter()
                        .all(|w| c.split_whitespace().any(|x| x == *w))
                });
                if has_controllers {
                    v2 = own("").map(place);
                }
            }
            _ => {}
        }
    }
    if !v1.is_empty() {
        for ctrl in ["pids", "memory", "cpu"] {
            if !v1.iter().any(|(c, _)| *c == ctrl) {
                return Err(CgroupError::Missing(ctrl));
            }
        }
        return Ok((Version::V1, v1));
    }
    match v2 {
        Some(p) => Ok((Version::V2, vec![("unified", p)])),
        None => Err(CgroupError::Missing("pids, memory and cpu")),
    }
}

/// Removes `dir` and the cgroups below it (a cgroup dir holds only files
/// the kernel makes, which `rmdir` takes with it).
fn remove_tree(dir: &Path) -> io::Result<()> {
    if let Ok(entries) = fs::read_dir(dir) {
        for e in entries.flatten() {
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                remove_tree(&e.path())?;
            }
        }
    }
    match fs::remove_dir(dir) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

/// Leftovers under `base`: this label's, or those of a Particle run that
/// is not live (its lock unheld, or gone: the garbage collector removes a
/// dead run's lock). Only empty cgroups can go (`rmdir` refuses one with a
/// process), so a live run's that looks dead would stay anyway.
fn collect_leftovers(base: &Path, label: &str) {
    let Ok(entries) = fs::read_dir(base) else {
        return;
    };
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let dead = particle_net::RunPrefix::of_name(&name)
            .is_some_and(|p| !p.lock_path().exists() || !p.is_live());
        if name == label || dead {
            if let Err(err) = remove_tree(&e.path()) {
                tracing::warn!("removing leftover cgroup {}: {err}", e.path().display());
            }
        }
    }
}

fn write(path: &Path, value: &str) -> Result<(), CgroupError> {
    fs::write(path, value).map_err(io_err(path))
}

impl CgroupTree {
    /// Makes the parent `label` in every hierarchy.
    pub fn create(label: &str) -> Result<Self, CgroupError> {
        let (version, own) = own_cgroups()?;
        let mut parents = Vec::new();
        for (ctrl, base) in own {
            let base = match version {
                Version::V1 => base,
                Version::V2 => v2_base(&base)?,
            };
            collect_leftovers(&base, label);
            let parent = base.join(label);
            fs::create_dir_all(&parent).map_err(io_err(&parent))?;
            if version == Version::V2 {
                write(&parent.join("cgroup.subtree_control"), "+pids +memory +cpu")?;
            }
            parents.push((ctrl, parent));
        }
        Ok(Self { version, parents })
    }

    pub fn version(&self) -> Version {
        self.version
    }

    /// Function `name`'s cgroup with `limits` set.
    pub fn function(&self, name: &str, limits: &Limits) -> Result<FunctionCgroup, CgroupError> {
        let mut cg = FunctionCgroup {
            version: self.version,
            dirs: Vec::new(),
            procs: Vec::new(),
        };
        for (ctrl, parent) in &self.parents {
            let dir = parent.join(name);
            match fs::create_dir(&dir) {
                Ok(()) => {}
                // A dead function's of the same name (it cannot be running).
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
                Err(e) => return Err(io_err(&dir)(e)),
            }
            cg.procs.push(dir.join("cgroup.procs"));
            cg.dirs.push(dir.clone());
            set_limits(self.version, ctrl, &dir, limits)?;
        }
        Ok(cg)
    }
}

impl Drop for CgroupTree {
    fn drop(&mut self) {
        for (_, parent) in &self.parents {
            if let Err(e) = remove_tree(parent) {
                tracing::warn!("removing cgroup {}: {e}", parent.display());
            }
        }
    }
}

/// v2: the agent's own cgroup can hold children with controllers only if
/// it holds no process ("no internal processes"); else the hierarchy's root
/// (exempt from that rule) is used.
fn v2_base(own: &Path) -> Result<PathBuf, CgroupError> {
    let busy = fs::read_to_string(own.join("cgroup.procs")).map_or(true, |p| !p.trim().is_empty());
    let base = if own == Path::new(ROOT) || !busy {
        own.to_owned()
    } else {
        PathBuf::from(ROOT)
    };
    write(&base.join("cgroup.subtree_control"), "+pids +memory +cpu")?;
    Ok(base)
}

fn set_limits(version: Version, ctrl: &str, dir: &Path, l: &Limits) -> Result<(), CgroupError> {
    let memory = l.memory_bytes.to_string();
    match (version, ctrl) {
        (Version::V1, "pids") => write(&dir.join("pids.max"), &l.pids.to_string()),
        (Version::V1, "memory") => {
            write(&dir.join("memory.limit_in_bytes"), &memory)?;
            // With swap accounting, swap counts too: no escape into swap.
            let memsw = dir.join("memory.memsw.limit_in_bytes");
            if memsw.exists() {
                write(&memsw, &memory)?;
            }
            Ok(())
        }
        (Version::V1, _) => write(&dir.join("cpu.shares"), &l.cpu_shares().to_string()),
        (Version::V2, _) => {
            write(&dir.join("pids.max"), &l.pids.to_string())?;
            write(&dir.join("memory.max"), &memory)?;
            let swap = dir.join("memory.swap.max");
            if swap.exists() {
                write(&swap, "0")?;
            }
            write(&dir.join("cpu.weight"), &l.cpu_weight.to_string())
        }
    }
}

/// One function's cgroup (one directory per hierarchy).
#[derive(Debug)]
pub struct FunctionCgroup {
    version: Version,
    dirs: Vec<PathBuf>,
    procs: Vec<PathBuf>,
}

/// The value of `key` in a flat-keyed cgroup file (`key value` lines).
fn counter(file: &Path, key: &str) -> u64 {
    fs::read_to_string(file)
        .ok()
        .and_then(|text| {
            text.lines().find_map(|l| {
                let (k, v) = l.split_once(' ')?;
                (k == key).then(|| v.trim().parse().ok()).flatten()
            })
        })
        .unwrap_or(0)
}

impl FunctionCgroup {
    /// The files the launcher writes the function's pid to.
    pub fn procs(&self) -> &[PathBuf] {
        &self.procs
    }

    fn dir_of(&self, file: &str) -> Option<&PathBuf> {
        self.dirs.iter().find(|d| d.join(file).exists())
    }

    /// Times the kernel's OOM killer killed in it.
    pub fn oom_kills(&self) -> u64 {
        let file = match self.version {
            Version::V1 => "memory.oom_control",
            Version::V2 => "memory.events",
        };
        self.dir_of(file)
            .map_or(0, |d| counter(&d.join(file), "oom_kill"))
    }

    /// Forks refused at its pids limit.
    pub fn pids_refused(&self) -> u64 {
        self.dir_of("pids.events")
            .map_or(0, |d| counter(&d.join("pids.events"), "max"))
    }

    /// Removes it; fails (busy) while a process is still in it.
    pub fn remove(&self) -> io::Result<()> {
        for dir in &self.dirs {
            match fs::remove_dir(dir) {
                Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
                _ => {}
            }
        }
        Ok(())
    }
}

impl Drop for FunctionCgroup {
    fn drop(&mut self) {
        // Best effort (an error path); the watcher removes it with retries.
        let _ = self.remove();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counters_from_flat_keyed_files() {
        let dir = std::env::temp_dir().join(format!("particle-cg-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        let f = dir.join("memory.oom_control");
        fs::write(&f, "oom_kill_disable 0\nunder_oom 0\noom_kill 3\n").unwrap();
        assert_eq!(counter(&f, "oom_kill"), 3);
        assert_eq!(counter(&f, "missing"), 0);
        assert_eq!(counter(&dir.join("absent"), "oom_kill"), 0);
        fs::remove_dir_all(&dir).unwrap();
    }
}
