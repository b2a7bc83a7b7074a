//! Network namespace handles.
//!
//! A namespace is held by a file descriptor; it lives as long as that fd (or a
//! process inside it) does, and the kernel tears it down with everything in it
//! when the last reference goes, which is how endpoints are destroyed in bulk.
//! A bind mount under `/run/netns/` is made only when a consumer needs a path
//! (the `ip` tool, an OCI runtime): mounts cost extra and survive a crash.
//!
//! Creating and entering namespaces happens on dedicated OS threads: `unshare`
//! and `setns` change the calling thread only.

use std::fs::{self, File};
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use nix::mount::{mount, umount2, MntFlags, MsFlags};
use nix::sched::{setns, unshare, CloneFlags};

/// Where `ip netns` and OCI runtimes look for named namespaces.
pub const NETNS_RUN_DIR: &str = "/run/netns";

#[derive(Debug, thiserror::Error)]
pub enum NetNsError {
    #[error("cannot create a network namespace: {0}")]
    Create(#[source] io::Error),
    #[error("cannot open network namespace {path}: {source}")]
    Open { path: PathBuf, source: io::Error },
    #[error("cannot enter network namespace: {0}")]
    Enter(#[source] io::Error),
    #[error("cannot bind-mount network namespace at {path}: {source}")]
    Mount { path: PathBuf, source: io::Error },
    #[error("cannot remove network namespace mount {path}: {source}")]
    Unmount { path: PathBuf, source: io::Error },
    #[error("cannot duplicate namespace fd: {0}")]
    Dup(#[source] io::Error),
    #[error("namespace worker thread panicked")]
    ThreadPanicked,
    #[error("{path} is not a network namespace")]
    NotNetNs { path: PathBuf },
    #[error("{path} is a namespace of this process's own (the node's, an endpoint's or a router's), not the caller's")]
    Ours { path: PathBuf },
}

/// A network namespace, held by fd and optionally bind-mounted at a path.
#[derive(Debug)]
pub struct NetNs {
    fd: OwnedFd,
    mount: Option<PathBuf>,
    /// Its inode, if this process manages it ([`Self::into_managed`]).
    managed: Option<u64>,
}

/// `NS_GET_NSTYPE` from linux/nsfs.h: `_IO(0xb7, 0x3)`.
const NS_GET_NSTYPE: nix::libc::Ioctl = 0xb703;

/// Namespaces this process manages (endpoints, tenant routers, nodes), by
/// nsfs inode, with how many handles hold each: what a caller may never
/// name as its own (see [`NetNs::open_foreign`]).
static MANAGED: std::sync::LazyLock<std::sync::Mutex<std::collections::HashMap<u64, usize>>> =
    std::sync::LazyLock::new(Default::default);

fn managed() -> std::sync::MutexGuard<'static, std::collections::HashMap<u64, usize>> {
    MANAGED
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Whether the namespace with this nsfs inode is one this process manages.
pub fn is_managed(inode: u64) -> bool {
    managed().contains_key(&inode)
}

/// Opens a TCP connection from inside a namespace.
pub type TcpDialer =
    std::sync::Arc<dyn Fn(std::net::SocketAddr) -> io::Result<std::net::TcpStream> + Send + Sync>;

impl NetNs {
    /// The namespace the calling thread is in.
    pub fn current() -> Result<Self, NetNsError> {
        Self::open("/proc/thread-self/ns/net")
    }

    /// Opens a namespace by path (`/run/netns/NAME`, `/proc/PID/ns/net`).
    pub fn open(path: impl AsRef<Path>) -> Result<Self, NetNsError> {
        let path = path.as_ref();
        let file = File::open(path).map_err(|source| NetNsError::Open {
            path: path.to_owned(),
            source,
        })?;
        Ok(Self {
            fd: file.into(),
            mount: None,
            managed: None,
        })
    }

    /// Creates a fresh namespace, held by fd only.
    pub fn create() -> Result<Self, NetNsError> {
        Ok(Self::create_with(|| ())?.0)
    }

    /// Creates a fresh namespace and runs `inside` in it before returning,
    /// e.g. to open a netlink socket that stays bound to the new namespace.
    /// Runs on a short-lived thread so no caller thread changes namespace.
    pub fn create_with<T: Send>(
        inside: impl FnOnce() -> T + Send,
    ) -> Result<(Self, T), NetNsError> {
        std::thread::scope(|s| {
            s.spawn(|| {
                let ns = Self::unshare_current_thread()?;
                Ok((ns, inside()))
            })
            .join()
            .map_err(|_| NetNsError::ThreadPanicked)?
        })
    }

    /// Moves the calling thread into a new namespace and returns a handle to it.
    /// Only for threads that own their namespace (see [`crate::endpoint`]'s
    /// workers); the caller must `enter` its home namespace again afterwards.
    pub(crate) fn unshare_current_thread() -> Result<Self, NetNsError> {
        unshare(CloneFlags::CLONE_NEWNET).map_err(|e| NetNsError::Create(e.into()))?;
        // /proc/self would name the thread-group leader's namespace, not ours.
        Self::current()
    }

    /// Moves the calling thread into this namespace.
    pub(crate) fn enter_current_thread(&self) -> Result<(), NetNsError> {
        setns(&self.fd, CloneFlags::CLONE_NEWNET).map_err(|e| NetNsError::Enter(e.into()))
    }

    /// Opens a network namespace a caller names (a container runtime's), and
    /// refuses one that is not a network namespace, this process's own, or
    /// one it manages ([`Self::into_managed`]: every endpoint, tenant router
    /// and node). A path like `/proc/<agent>/fd/N` must never lend a caller
    /// another tenant's router or endpoint.
    pub fn open_foreign(path: impl AsRef<Path>) -> Result<Self, NetNsError> {
        let path = path.as_ref();
        let ns = Self::open(path)?;
        let open_err = |source| NetNsError::Open {
            path: path.to_owned(),
            source,
        };
        // SAFETY: NS_GET_NSTYPE takes no argument and returns the type.
        let kind = unsafe { nix::libc::ioctl(ns.fd.as_raw_fd(), NS_GET_NSTYPE) };
        if kind != nix::libc::CLONE_NEWNET {
            return Err(NetNsError::NotNetNs {
                path: path.to_owned(),
            });
        }
        let inode = ns.inode().map_err(open_err)?;
        let own = fs::metadata("/proc/self/ns/net").map_err(open_err)?;
        if is_managed(inode) || std::os::unix::fs::MetadataExt::ino(&own) == inode {
            return Err(NetNsError::Ours {
                path: path.to_owned(),
            });
        }
        Ok(ns)
    }

    /// Runs `f` inside this namespace on a short-lived thread. Sockets opened in
    /// `f` stay bound to this namespace after it returns.
    pub fn run_in<T: Send>(&self, f: impl FnOnce() -> T + Send) -> Result<T, NetNsError> {
        std::thread::scope(|s| {
            s.spawn(|| {
                self.enter_current_thread()?;
                Ok(f())
            })
            .join()
            .map_err(|_| NetNsError::ThreadPanicked)?
        })
    }

    /// A TCP dialer that connects from inside this namespace (a simulated
    /// host's), whatever namespace the caller is in: what an API client
    /// (`particle_wire::client::Dial`) takes to reach a namespaced server.
    pub fn tcp_dialer(self) -> TcpDialer {
        let ns = std::sync::Arc::new(self);
        std::sync::Arc::new(move |addr| {
            ns.run_in(|| std::net::TcpStream::connect(addr))
                .map_err(io::Error::other)?
        })
    }

    /// A command that will run inside this namespace (it enters between fork and exec).
    pub fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut cmd = Command::new(program);
        let fd = self.fd.as_raw_fd();
        // SAFETY: between fork and exec only async-signal-safe calls are allowed;
        // setns is a plain system call and allocates nothing.
        unsafe {
            cmd.pre_exec(move || {
                let ns = BorrowedFd::borrow_raw(fd);
                setns(ns, CloneFlags::CLONE_NEWNET).map_err(io::Error::from)
            });
        }
        cmd
    }

    /// Bind-mounts this namespace at `/run/netns/NAME` so tools that need a path
    /// can find it; the mount is removed again when the handle is dropped.
    pub fn mount_as(&mut self, name: &str) -> Result<&Path, NetNsError> {
        let path = Path::new(NETNS_RUN_DIR).join(name);
        let mount_err = |source| NetNsError::Mount {
            path: path.clone(),
            source,
        };
        if let Some(existing) = &self.mount {
            return Err(mount_err(io::Error::new(
                io::ErrorKind::AlreadyExists,
                format!("already mounted at {}", existing.display()),
            )));
        }
        fs::create_dir_all(NETNS_RUN_DIR).map_err(mount_err)?;
        make_run_dir_a_mount_point().map_err(mount_err)?;
        // create_new: never mount over a namespace someone else named so.
        fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&path)
            .map_err(mount_err)?;
        let source = format!("/proc/self/fd/{}", self.fd.as_raw_fd());
        if let Err(e) = mount(
            Some(source.as_str()),
            &path,
            None::<&str>,
            MsFlags::MS_BIND,
            None::<&str>,
        ) {
            let _ = fs::remove_file(&path);
            return Err(mount_err(e.into()));
        }
        Ok(self.mount.insert(path))
    }

    /// The bind-mount path, if the namespace has one.
    pub fn path(&self) -> Option<&Path> {
        self.mount.as_deref()
    }

    /// A second handle to the same namespace (never mounted).
    pub fn try_clone(&self) -> Result<Self, NetNsError> {
        let fd = self.fd.try_clone().map_err(NetNsError::Dup)?;
        if let Some(inode) = self.managed {
            *managed().entry(inode).or_insert(0) += 1;
        }
        Ok(Self {
            fd,
            mount: None,
            managed: self.managed,
        })
    }

    /// Marks this namespace as one this process manages: no caller may name
    /// it as its own while a handle to it lives.
    pub fn into_managed(mut self) -> Self {
        if self.managed.is_none() {
            if let Ok(inode) = self.inode() {
                *managed().entry(inode).or_insert(0) += 1;
                self.managed = Some(inode);
            }
        }
        self
    }

    /// The namespace's identity (its nsfs inode), to tell namespaces apart.
    pub fn inode(&self) -> io::Result<u64> {
        use std::os::unix::fs::MetadataExt;
        Ok(File::from(self.fd.try_clone()?).metadata()?.ino())
    }

    /// Drops this handle, reporting a failure to remove its mount.
    pub fn destroy(mut self) -> Result<(), NetNsError> {
        self.unmount()
    }

    fn unmount(&mut self) -> Result<(), NetNsError> {
        if let Some(path) = self.mount.take() {
            unmount_path(&path)?;
        }
        Ok(())
    }
}

/// Removes a namespace bind mount and its mount point file.
/// Makes `/run/netns` a shared mount of its own, as `ip netns add` does the
/// first time: a namespace mounted there before that would be hidden when
/// `ip` later bind-mounts the directory over itself, and could then be
/// neither seen nor removed by path.
fn make_run_dir_a_mount_point() -> io::Result<()> {
    let shared = || {
        mount(
            None::<&str>,
            NETNS_RUN_DIR,
            None::<&str>,
            MsFlags::MS_SHARED | MsFlags::MS_REC,
            None::<&str>,
        )
    };
    match shared() {
        Ok(()) => Ok(()),
        // Not a mount point yet: bind it over itself, then share it.
        Err(nix::errno::Errno::EINVAL) => {
            mount(
                Some(NETNS_RUN_DIR),
                NETNS_RUN_DIR,
                None::<&str>,
                MsFlags::MS_BIND | MsFlags::MS_REC,
                None::<&str>,
            )?;
            Ok(shared()?)
        }
        Err(e) => Err(e.into()),
    }
}

pub fn unmount_path(path: &Path) -> Result<(), NetNsError> {
    let err = |source| NetNsError::Unmount {
        path: path.to_owned(),
        source,
    };
    match umount2(path, MntFlags::MNT_DETACH) {
        // EINVAL: not a mount point any more (a half-made mount); the file goes anyway.
        Ok(()) | Err(nix::errno::Errno::EINVAL) => {}
        Err(e) => return Err(err(e.into())),
    }
    match fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(err(e)),
    }
}

impl AsFd for NetNs {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

impl AsRawFd for NetNs {
    fn as_raw_fd(&self) -> std::os::fd::RawFd {
        self.fd.as_raw_fd()
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        if let Some(inode) = self.managed {
            let mut held = managed();
            if let Some(n) = held.get_mut(&inode) {
                *n -= 1;
                if *n == 0 {
                    held.remove(&inode);
                }
            }
        }
        if let Err(e) = self.unmount() {
            tracing::warn!("{e}");
        }
    }
}
