//! Starting a function in its endpoint as a sandboxed container.
//!
//! Built in (the default): the function joins the endpoint's network
//! namespace and gets its own user, PID, mount, UTS and IPC namespaces. Root
//! inside is its tenant's unprivileged host uid range
//! ([`crate::sandbox::IdRange`]); its root file system is a read-only image
//! made for functions ([`crate::sandbox`]), with a private size-limited
//! `/tmp`, a minimal `/dev` and its own `/proc`, and nothing of the node; it
//! runs in its own cgroup (pids, memory, CPU) and with no capabilities at
//! all and `no_new_privs` (see [`container`]). The agent's child is a small
//! supervisor that sets the function's uid map and cgroup, waits for it (PID
//! 1 of its namespace) and exits with its status; killing the supervisor
//! kills the function and with it everything in its PID namespace, so a
//! cancel leaves no stray process.
//!
//! OCI: the same function started through a real OCI runtime (`runc`, from
//! Debian's package) with a generated bundle whose network namespace is the
//! endpoint's, on the same image, user namespace and limits
//! ([`oci`]). `crun` 1.8 refuses this machine's hybrid cgroup layout
//! ("cgroups in hybrid mode not supported"), so runc is the default.

mod container;
mod oci;
mod supervisor;

use std::ffi::CString;
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;

use serde::{Deserialize, Serialize};
use tokio::process::{Child, Command};

use particle_wire::function_env::JobPeers;

use crate::sandbox::IdRange;

/// The environment a function starts with, besides its job's.
pub const BASE_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

#[derive(Debug, thiserror::Error)]
pub enum LaunchError {
    #[error("the command is empty")]
    EmptyCommand,
    #[error("command {0:?} not found or not executable in the function's root file system")]
    NotFound(String),
    #[error("argument, environment or path holds a NUL byte")]
    Nul,
    #[error("the function's root file system {path}: {source}")]
    Root {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("starting {command:?}: {source}")]
    Spawn {
        command: String,
        #[source]
        source: io::Error,
    },
    #[error("writing the OCI bundle {path}: {source}")]
    Bundle {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

/// How functions are started.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Runtime {
    /// Namespaces set up by the agent itself (fastest).
    #[default]
    Builtin,
    /// A real OCI runtime binary (runc or crun).
    Oci { binary: PathBuf },
}

/// The function's sandbox, as the launcher applies it (see [`crate::sandbox`]).
#[derive(Debug, Clone, Copy)]
pub struct Isolation<'a> {
    /// Its root file system, mounted read-only.
    pub root: &'a Path,
    /// Root inside is `ids.host_base` outside.
    pub ids: IdRange,
    /// Size of its private `/tmp`.
    pub tmp_bytes: u64,
    /// The `cgroup.procs` files it is put in before it runs (one per
    /// hierarchy; empty: none).
    pub cgroup_procs: &'a [PathBuf],
    /// Its limits, for runtimes that make the cgroup themselves (OCI).
    pub limits: crate::sandbox::Limits,
    /// Node files it sees at the same path (where the root has a mount
    /// point for them).
    pub binds: &'a [PathBuf],
    /// A node directory it may write, at the same path.
    pub writable: Option<&'a Path>,
}

/// One function to start.
#[derive(Debug)]
pub struct FunctionSpec<'a> {
    pub argv: &'a [String],
    pub env: &'a [(String, String)],
    /// The endpoint's namespace; `None` runs it in the agent's own network
    /// namespace (no network of its own: the benchmarks' floor).
    pub netns: Option<BorrowedFd<'a>>,
    /// Hostname, and the container id an OCI runtime gets (unique per node).
    pub name: &'a str,
    /// Where OCI bundles go (one directory per function, removed by the caller).
    pub bundle_dir: &'a Path,
    pub isolation: Isolation<'a>,
    /// The job's peer file ([`PeersFile`]), shown read-only at
    /// [`particle_wire::function_env::PEERS_FILE_PATH`]; `None` when the
    /// peers fit the environment.
    pub peers_file: Option<&'a Path>,
}

/// A job's peer list as a file on the node, for jobs too large for the
/// variable ([`JobPeers::file`]): one per job and node, readable by every
/// tenant's ids (functions see it read-only; the directory holding it must
/// be searchable), removed when dropped.
#[derive(Debug)]
pub struct PeersFile {
    path: PathBuf,
}

impl PeersFile {
    /// Writes `peers` as file `name` in `dir` if they need a file.
    pub fn write(dir: &Path, name: &str, peers: &JobPeers) -> io::Result<Option<Self>> {
        use std::io::Write;
        use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
        let Some(text) = peers.file() else {
            return Ok(None);
        };
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o711)
            .create(dir)?;
        let path = dir.join(name);
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o444)
            .open(&path)?;
        file.write_all(text.as_bytes())?;
        Ok(Some(Self { path }))
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for PeersFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Looks `program` up inside `root` the way `execvp` will once the
/// function's root is `root` (symlinks resolved inside it, never on the
/// node), so that a bad command is an error before anything is claimed.
pub fn resolve(root: &Path, program: &str) -> Result<PathBuf, LaunchError> {
    if program.is_empty() {
        return Err(LaunchError::EmptyCommand);
    }
    let root_dir = open_root(root)?;
    if program.contains('/') {
        return executable_in(&root_dir, program)
            .then(|| PathBuf::from(program))
            .ok_or_else(|| LaunchError::NotFound(program.into()));
    }
    BASE_PATH
        .split(':')
        .map(|dir| format!("{dir}/{program}"))
        .find(|p| executable_in(&root_dir, p))
        .map(PathBuf::from)
        .ok_or_else(|| LaunchError::NotFound(program.into()))
}

fn open_root(root: &Path) -> Result<OwnedFd, LaunchError> {
    let path = CString::new(root.as_os_str().as_bytes()).map_err(|_| LaunchError::Nul)?;
    // SAFETY: a plain open of a NUL-terminated path; the fd is owned below.
    let fd = unsafe {
        nix::libc::open(
            path.as_ptr(),
            nix::libc::O_PATH | nix::libc::O_DIRECTORY | nix::libc::O_CLOEXEC,
        )
    };
    if fd < 0 {
        return Err(LaunchError::Root {
            path: root.to_owned(),
            source: io::Error::last_os_error(),
        });
    }
    // SAFETY: fd was just opened and is owned by nothing else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Whether `path` names an executable regular file when resolved with
/// `root_dir` as `/` (openat2 RESOLVE_IN_ROOT: `..` and absolute symlinks
/// stay inside it).
fn executable_in(root_dir: &OwnedFd, path: &str) -> bool {
    use nix::fcntl::{openat2, OFlag, OpenHow, ResolveFlag};
    let how = OpenHow::new()
        .flags(OFlag::O_PATH | OFlag::O_CLOEXEC)
        .resolve(ResolveFlag::RESOLVE_IN_ROOT);
    let Ok(fd) = openat2(root_dir, path, how) else {
        return false;
    };
    match nix::sys::stat::fstat(&fd) {
        Ok(st) => {
            let mode = st.st_mode as nix::libc::mode_t;
            mode & nix::libc::S_IFMT == nix::libc::S_IFREG && mode & 0o111 != 0
        }
        Err(_) => false,
    }
}

/// Starts the function; stdout and stderr are piped to the caller.
pub fn spawn(spec: &FunctionSpec<'_>, runtime: &Runtime) -> Result<Child, LaunchError> {
    let program = spec.argv.first().ok_or(LaunchError::EmptyCommand)?;
    let mut cmd = match runtime {
        Runtime::Builtin => builtin(spec, program)?,
        Runtime::Oci { binary } => oci::command(spec, binary)?,
    };
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    cmd.spawn().map_err(|source| LaunchError::Spawn {
        command: program.clone(),
        source,
    })
}

/// The environment every function starts with, then its job's.
fn base_env() -> [(&'static str, &'static str); 2] {
    // HOME is the one writable place: tools that write there keep working.
    [("PATH", BASE_PATH), ("HOME", "/tmp")]
}

fn builtin(spec: &FunctionSpec<'_>, program: &str) -> Result<Command, LaunchError> {
    let mut cmd = Command::new(program);
    cmd.args(&spec.argv[1..])
        .env_clear()
        .envs(base_env())
        .envs(spec.env.iter().map(|(k, v)| (k, v)))
        .current_dir("/");
    // Everything the child needs is prepared here: between fork and exec only
    // async-signal-safe calls are allowed (no allocation).
    let netns = spec.netns.map(|fd| fd.as_raw_fd());
    let prepared = container::Prepared::new(spec, netns)?;
    // SAFETY: the closure only makes raw system calls on values prepared above.
    unsafe {
        cmd.pre_exec(move || prepared.enter());
    }
    Ok(cmd)
}
