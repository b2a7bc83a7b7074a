//! The clusters running on this machine (`particle cluster down` stops
//! them, `particle launch` finds their token) and each one's directory.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use particle_net::RunPrefix;

use crate::Mode;

/// Where every cluster's directory lives.
const RUN_DIR: &str = "/run/particle";
/// The name of a process cluster's directory ends so (`particle cluster
/// down` and `particle launch` look for it).
const CLUSTER_SUFFIX: &str = "-cluster";

/// The directory of every process cluster running on this machine (those
/// `particle cluster down` stops and whose token `particle launch` finds),
/// with the prefix of each.
pub fn running() -> Vec<(String, PathBuf)> {
    std::fs::read_dir(RUN_DIR)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|entry| {
            let name = entry.file_name().to_string_lossy().into_owned();
            let prefix = name.strip_suffix(CLUSTER_SUFFIX)?.to_string();
            Some((prefix, entry.path()))
        })
        .collect()
}

/// Which running clusters to stop.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Which {
    /// The one whose controller (and relay) is on this port.
    Port(u16),
    /// The one with this run prefix.
    Prefix(String),
    /// Every one on the machine.
    All,
}

impl Which {
    fn matches(&self, prefix: &str, dir: &Path) -> bool {
        match self {
            Self::All => true,
            Self::Prefix(p) => p == prefix,
            Self::Port(port) => std::fs::read_to_string(dir.join("port"))
                .is_ok_and(|p| p.trim() == port.to_string()),
        }
    }
}

/// Stops the running process clusters `which` names (SIGTERM to the process
/// that holds each, then waits for its directory to go); returns each one's
/// prefix.
pub fn stop(which: &Which) -> Result<Vec<String>> {
    let mut stopped = Vec::new();
    for (prefix, dir) in running() {
        if !which.matches(&prefix, &dir) {
            continue;
        }
        let Some(pid) = cluster_process(&dir) else {
            continue;
        };
        if nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).is_ok() {
            let start = Instant::now();
            while dir.exists() && start.elapsed() < Duration::from_secs(20) {
                std::thread::sleep(Duration::from_millis(50));
            }
            stopped.push(prefix);
        }
    }
    Ok(stopped)
}

/// The process holding the cluster in `dir`, if the pid file names it. The
/// file holds the pid and that process's start time (field 22 of
/// `/proc/PID/stat`), and must be root's and not writable by others: a pid
/// file that was rewritten, or whose process died and whose pid was reused,
/// names nobody, and nobody is signalled.
fn cluster_process(dir: &Path) -> Option<nix::unistd::Pid> {
    use std::os::unix::fs::MetadataExt;
    let pid_file = dir.join("pid");
    let meta = std::fs::symlink_metadata(&pid_file).ok()?;
    if !meta.is_file() || meta.uid() != 0 || meta.mode() & 0o022 != 0 {
        tracing::warn!("{}: not a pid file of root's; ignored", pid_file.display());
        return None;
    }
    let text = std::fs::read_to_string(&pid_file).ok()?;
    let (pid, start) = text.trim().split_once(' ')?;
    let pid: i32 = pid.parse().ok()?;
    if pid <= 0 || process_start(pid)? != start {
        tracing::warn!("{}: its process is gone; ignored", pid_file.display());
        return None;
    }
    Some(nix::unistd::Pid::from_raw(pid))
}

/// A process's start time in clock ticks since boot, as `/proc` gives it.
fn process_start(pid: i32) -> Option<String> {
    let start = particle_net::proc_stat::ProcStat::of(pid)?.start_ticks?;
    Some(start.to_string())
}

/// A cluster's directory (token, logs, sockets), removed when the cluster
/// stops. A process cluster's is named so that [`running`] finds it and holds
/// the pid that [`stop`] signals; an in-process one is nobody else's
/// business.
pub(crate) struct ClusterDir(PathBuf);

impl ClusterDir {
    pub(crate) fn create(prefix: &RunPrefix, mode: Mode, port: u16) -> Result<Self> {
        let label = match mode {
            Mode::Processes => prefix.label(&CLUSTER_SUFFIX[1..]),
            Mode::InProcess => prefix.label("in-process"),
        };
        let dir = Self(Path::new(RUN_DIR).join(label));
        std::fs::create_dir_all(&dir.0)?;
        // Nobody else may list it; its files (token, logs, sockets: 0600)
        // are the cluster's alone. Search stays open: sandboxed functions,
        // unprivileged outside, reach their image here.
        std::fs::set_permissions(&dir.0, std::os::unix::fs::PermissionsExt::from_mode(0o711))?;
        if mode == Mode::Processes {
            let me = std::process::id();
            let start = process_start(me as i32).context("reading this process's start time")?;
            std::fs::write(dir.0.join("pid"), format!("{me} {start}"))?;
            // How `cluster down --port` tells this cluster from the others.
            std::fs::write(dir.0.join("port"), port.to_string())?;
        }
        Ok(dir)
    }

    pub(crate) fn path(&self) -> &Path {
        &self.0
    }

    pub(crate) fn token_file(&self) -> PathBuf {
        self.0.join("token")
    }

    /// A fresh random token, written to [`Self::token_file`] (mode 0600).
    pub(crate) fn new_token(&self) -> Result<String> {
        use std::io::{Read, Write};
        use std::os::unix::fs::OpenOptionsExt;
        let mut bytes = [0u8; 16];
        std::fs::File::open("/dev/urandom")?.read_exact(&mut bytes)?;
        let token: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(self.token_file())?;
        f.write_all(token.as_bytes())?;
        Ok(token)
    }
}

impl Drop for ClusterDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
