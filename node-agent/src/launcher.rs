//! Starting a function in its endpoint as a lightweight container.
//!
//! Built in: the function joins the endpoint's network namespace and gets its
//! own PID, mount, UTS and IPC namespaces, with a fresh `/proc` and the
//! function's name as hostname; the file system is the node's (functions are
//! the tenant's own code, started like a `chroot`-less container). The agent's
//! child is a small supervisor that waits for the function (PID 1 of its
//! namespace) and exits with its status; killing the supervisor kills the
//! function (parent-death signal) and with it everything in its PID
//! namespace, so a cancel leaves no stray process. The function runs with
//! no capabilities at all (see [`drop_privileges`]): it cannot leave its
//! namespaces or touch the network configuration.
//!
//! OCI: the same function started through a real OCI runtime (`runc`, from
//! Debian's package) with a generated bundle whose network namespace is the
//! endpoint's. `crun` 1.8 refuses this machine's hybrid cgroup layout
//! ("cgroups in hybrid mode not supported"), so runc is the default.

use std::ffi::CString;
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd};
use std::path::{Path, PathBuf};
use std::process::Stdio;

use nix::libc;
use serde::{Deserialize, Serialize};
use tokio::process::{Child, Command};

/// The environment a function starts with, besides its job's.
const BASE_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

#[derive(Debug, thiserror::Error)]
pub enum LaunchError {
    #[error("the command is empty")]
    EmptyCommand,
    #[error("command {0:?} not found or not executable")]
    NotFound(String),
    #[error("argument or environment holds a NUL byte")]
    Nul,
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
}

/// Looks `program` up the way `execvp` will, so that a bad command is an
/// error before anything is claimed.
pub fn resolve(program: &str) -> Result<PathBuf, LaunchError> {
    if program.is_empty() {
        return Err(LaunchError::EmptyCommand);
    }
    let executable =
        |p: &Path| nix::unistd::access(p, nix::unistd::AccessFlags::X_OK).is_ok() && p.is_file();
    if program.contains('/') {
        let p = PathBuf::from(program);
        return executable(&p)
            .then_some(p)
            .ok_or_else(|| LaunchError::NotFound(program.into()));
    }
    BASE_PATH
        .split(':')
        .map(|dir| Path::new(dir).join(program))
        .find(|p| executable(p))
        .ok_or_else(|| LaunchError::NotFound(program.into()))
}

/// Starts the function; stdout and stderr are piped to the caller.
pub fn spawn(spec: &FunctionSpec<'_>, runtime: &Runtime) -> Result<Child, LaunchError> {
    let program = spec.argv.first().ok_or(LaunchError::EmptyCommand)?;
    let mut cmd = match runtime {
        Runtime::Builtin => builtin(spec, program)?,
        Runtime::Oci { binary } => oci(spec, binary)?,
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

fn builtin(spec: &FunctionSpec<'_>, program: &str) -> Result<Command, LaunchError> {
    let mut cmd = Command::new(program);
    cmd.args(&spec.argv[1..])
        .env_clear()
        .env("PATH", BASE_PATH)
        .env("HOME", "/")
        .envs(spec.env.iter().map(|(k, v)| (k, v)))
        .current_dir("/");
    // Everything the child needs is prepared here: between fork and exec only
    // async-signal-safe calls are allowed (no allocation).
    let hostname = CString::new(spec.name).map_err(|_| LaunchError::Nul)?;
    let netns = spec.netns.map(|fd| fd.as_raw_fd());
    let last_cap = last_capability();
    let agent = std::process::id() as libc::pid_t;
    // SAFETY: the closure only makes raw system calls on values prepared above.
    unsafe {
        cmd.pre_exec(move || {
            enter_container(netns, &hostname, agent)?;
            drop_privileges(last_cap)
        });
    }
    Ok(cmd)
}

/// The highest capability number this kernel knows.
fn last_capability() -> u32 {
    std::fs::read_to_string("/proc/sys/kernel/cap_last_cap")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        // 40 (CAP_CHECKPOINT_RESTORE) on every kernel since 5.9.
        .unwrap_or(40)
}

/// Runs in the function just before exec: it keeps uid 0 (it may write the
/// node's files its job names) but loses every capability, for good, so it
/// cannot leave its namespaces (setns, unmounting its /proc to reach the
/// node's), reconfigure its network, or reach the node some other way; and
/// exec can never grant them back (empty bounding set, no_new_privs).
fn drop_privileges(last_cap: u32) -> io::Result<()> {
    let check = |r: libc::c_int| {
        if r < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(())
        }
    };
    // SAFETY (whole block): raw syscalls with plain integer arguments and a
    // stack buffer; no allocation.
    unsafe {
        for cap in 0..=last_cap {
            check(libc::prctl(
                libc::PR_CAPBSET_DROP,
                cap as libc::c_ulong,
                0,
                0,
                0,
            ))?;
        }
        check(libc::prctl(
            libc::PR_CAP_AMBIENT,
            libc::PR_CAP_AMBIENT_CLEAR_ALL as libc::c_ulong,
            0,
            0,
            0,
        ))?;
        // capset(2) version 3: two 32-bit words of effective, permitted and
        // inheritable sets, all zero.
        let header = [0x2008_0522u32, 0];
        let data = [0u32; 6];
        check(libc::syscall(libc::SYS_capset, header.as_ptr(), data.as_ptr()) as libc::c_int)?;
        check(libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0))?;
    }
    Ok(())
}

/// Runs in the forked child: joins the endpoint, then forks the function
/// into new PID/mount/UTS/IPC namespaces and stays behind as its supervisor.
fn enter_container(netns: Option<i32>, hostname: &CString, agent: libc::pid_t) -> io::Result<()> {
    let check = |r: libc::c_long| {
        if r < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(r)
        }
    };
    // SAFETY (whole block): raw syscalls on prepared arguments; no allocation.
    unsafe {
        if let Some(fd) = netns {
            check(libc::setns(fd, libc::CLONE_NEWNET).into())?;
        }
        // The raw syscall, not glibc's fork(): no atfork handlers in a child
        // of a multi-threaded process.
        let flags = libc::CLONE_NEWPID
            | libc::CLONE_NEWNS
            | libc::CLONE_NEWUTS
            | libc::CLONE_NEWIPC
            | libc::SIGCHLD;
        let pid = check(libc::syscall(
            libc::SYS_clone,
            flags as libc::c_ulong,
            0usize,
            0usize,
            0usize,
            0usize,
        ))? as libc::pid_t;
        if pid > 0 {
            supervise(pid, agent);
        }
        // The function: PID 1 of its namespace. Dies with its supervisor.
        check(libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL).into())?;
        let root = c"/";
        check(
            libc::mount(
                std::ptr::null(),
                root.as_ptr(),
                std::ptr::null(),
                libc::MS_REC | libc::MS_PRIVATE,
                std::ptr::null(),
            )
            .into(),
        )?;
        let proc_ = c"/proc";
        check(
            libc::mount(
                c"proc".as_ptr(),
                proc_.as_ptr(),
                c"proc".as_ptr(),
                libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
                std::ptr::null(),
            )
            .into(),
        )?;
        check(libc::sethostname(hostname.as_ptr(), hostname.as_bytes().len()).into())?;
    }
    Ok(())
}

/// The supervisor: lets go of the agent's descriptors (among them the pipe
/// through which the agent learns whether exec succeeded), waits for the
/// function and exits with its status. Never returns. If the agent dies
/// first (crash, SIGKILL), it kills the function and exits: a parent-death
/// signal cannot do this, since it fires when the agent's *thread* that
/// forked us ends, and tokio ends idle blocking threads.
fn supervise(pid: libc::pid_t, agent: libc::pid_t) -> ! {
    // SAFETY: raw syscalls only; `_exit` skips atexit handlers and destructors.
    unsafe {
        libc::syscall(libc::SYS_close_range, 3u32, u32::MAX, 0u32);
        let agent_fd = libc::syscall(libc::SYS_pidfd_open, agent, 0u32) as libc::c_int;
        let function_fd = libc::syscall(libc::SYS_pidfd_open, pid, 0u32) as libc::c_int;
        // Re-parented already (the agent died before we looked): give up.
        if agent_fd < 0 || libc::getppid() != agent {
            libc::kill(pid, libc::SIGKILL);
        }
        if agent_fd >= 0 && function_fd >= 0 {
            let mut fds = [
                libc::pollfd {
                    fd: function_fd,
                    events: libc::POLLIN,
                    revents: 0,
                },
                libc::pollfd {
                    fd: agent_fd,
                    events: libc::POLLIN,
                    revents: 0,
                },
            ];
            loop {
                let r = libc::poll(fds.as_mut_ptr(), 2, -1);
                if r < 0 && *libc::__errno_location() == libc::EINTR {
                    continue;
                }
                if fds[1].revents != 0 {
                    libc::kill(pid, libc::SIGKILL); // the agent is gone
                }
                break;
            }
        }
        let mut status = 0;
        loop {
            let r = libc::waitpid(pid, &mut status, 0);
            if r == pid {
                break;
            }
            if r < 0 && *libc::__errno_location() != libc::EINTR {
                libc::_exit(125);
            }
        }
        if libc::WIFEXITED(status) {
            libc::_exit(libc::WEXITSTATUS(status));
        }
        if libc::WIFSIGNALED(status) {
            libc::_exit(128 + libc::WTERMSIG(status));
        }
        libc::_exit(125)
    }
}

/// Directories of the node the OCI container sees (read-only), besides the
/// directory of the program itself.
const OCI_BINDS: &[&str] = &["/usr", "/bin", "/sbin", "/lib", "/lib64", "/etc"];

fn oci(spec: &FunctionSpec<'_>, binary: &Path) -> Result<Command, LaunchError> {
    let bundle = spec.bundle_dir.join(spec.name);
    let bundle_err = |source| LaunchError::Bundle {
        path: bundle.clone(),
        source,
    };
    std::fs::create_dir_all(bundle.join("rootfs")).map_err(bundle_err)?;
    let mut binds: Vec<String> = OCI_BINDS
        .iter()
        .filter(|d| Path::new(d).exists())
        .map(|d| d.to_string())
        .collect();
    if let Some(dir) = Path::new(&spec.argv[0]).parent() {
        let dir = dir.display().to_string();
        if dir.starts_with('/') && !binds.iter().any(|b| dir.starts_with(b.as_str())) {
            binds.push(dir);
        }
    }
    let mut mounts = vec![
        serde_json::json!({"destination": "/proc", "type": "proc", "source": "proc"}),
        serde_json::json!({"destination": "/dev", "type": "tmpfs", "source": "tmpfs",
            "options": ["nosuid", "mode=755", "size=1m"]}),
        serde_json::json!({"destination": "/tmp", "type": "tmpfs", "source": "tmpfs",
            "options": ["nosuid", "nodev", "size=64m"]}),
    ];
    mounts.extend(binds.iter().map(|d| {
        serde_json::json!({"destination": d, "type": "bind", "source": d, "options": ["rbind", "ro"]})
    }));
    let mut namespaces = vec![
        serde_json::json!({"type": "pid"}),
        serde_json::json!({"type": "ipc"}),
        serde_json::json!({"type": "uts"}),
        serde_json::json!({"type": "mount"}),
    ];
    if let Some(fd) = spec.netns {
        namespaces.push(serde_json::json!({"type": "network",
            "path": format!("/proc/{}/fd/{}", std::process::id(), fd.as_raw_fd())}));
    }
    let mut env = vec![format!("PATH={BASE_PATH}"), "HOME=/".to_string()];
    env.extend(spec.env.iter().map(|(k, v)| format!("{k}={v}")));
    let config = serde_json::json!({
        "ociVersion": "1.0.2",
        "process": {"terminal": false, "user": {"uid": 0, "gid": 0},
            "args": spec.argv, "env": env, "cwd": "/"},
        "root": {"path": "rootfs", "readonly": false},
        "hostname": spec.name,
        "mounts": mounts,
        "linux": {"namespaces": namespaces},
    });
    let text = serde_json::to_vec_pretty(&config).map_err(|e| bundle_err(e.into()))?;
    std::fs::write(bundle.join("config.json"), text).map_err(bundle_err)?;
    let mut cmd = Command::new(binary);
    cmd.arg("--root")
        .arg(spec.bundle_dir.join("state"))
        .arg("run")
        .arg("--bundle")
        .arg(&bundle)
        .arg(spec.name);
    Ok(cmd)
}
