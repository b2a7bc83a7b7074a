//! What runs between fork and exec in the built-in launcher: raw system
//! calls only, on values prepared beforehand ([`Prepared`]).
//!
//! The order matters:
//! 1. The supervisor (the agent's forked child, still root of the node with
//!    every capability) joins the endpoint's network namespace. It must do
//!    so *before* any user namespace exists: `setns` needs `CAP_SYS_ADMIN`
//!    over the user namespace that owns the network namespace (the node's),
//!    which a process inside a new user namespace never has.
//! 2. It clones the function with new user, PID, mount, UTS and IPC
//!    namespaces at once; those namespaces belong to the new user
//!    namespace, the network namespace stays the node's, so the function
//!    holds no power over its network even before it drops its capabilities.
//! 3. The supervisor, outside, writes the function's uid and gid maps (only
//!    a writer with `CAP_SETUID` in the parent user namespace may map a
//!    range that is not its own) and puts it in its cgroup, then releases it
//!    over a pipe. Nothing of the tenant runs before that.
//! 4. The function becomes uid/gid 0 of its namespace (its tenant's host
//!    range; without this it would still be the node's uid 0 for file
//!    access) with no supplementary groups (the node's gid 0 would pass
//!    group checks), builds its root from the image, pivots into it, and
//!    drops every capability for good.

use std::ffi::CString;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

use nix::libc;

use particle_wire::function_env::PEERS_FILE_PATH;

use super::supervisor::{decimal, proc_path, supervise, write_file};
use super::{FunctionSpec, LaunchError};

/// Device nodes of the node bind-mounted into the function's `/dev`.
const DEVICES: &[&str] = &["null", "zero", "full", "random", "urandom"];
/// `/dev` links every program expects.
const DEV_LINKS: &[(&str, &str)] = &[
    ("/proc/self/fd", "fd"),
    ("/proc/self/fd/0", "stdin"),
    ("/proc/self/fd/1", "stdout"),
    ("/proc/self/fd/2", "stderr"),
];

/// Everything the child needs, allocated before the fork.
pub(super) struct Prepared {
    netns: Option<i32>,
    hostname: CString,
    agent: libc::pid_t,
    last_cap: u32,
    root: CString,
    proc_: CString,
    tmp: CString,
    tmp_options: CString,
    dev: CString,
    /// (the node's device, its mount point in the function's `/dev`).
    devices: Vec<(CString, CString)>,
    /// (the node's file, its mount point in the root), if the root has one.
    binds: Vec<(CString, CString)>,
    /// (the node's directory, the directories to make in the function's
    /// /tmp for it, its mount point).
    writable: Option<(CString, Vec<CString>, CString)>,
    /// (the job's peer file on the node, its mount point in the function's
    /// /tmp, the flags of its read-only remount).
    peers: Option<(CString, CString, libc::c_ulong)>,
    /// (target, link) in the function's `/dev`.
    dev_links: Vec<(CString, CString)>,
    /// Flags of the read-only remount of the root: the source mount's
    /// locked flags (atime, nosuid, ...) must be kept in a user namespace.
    root_flags: libc::c_ulong,
    /// `0 BASE COUNT`, for uid_map and gid_map.
    id_map: Vec<u8>,
    cgroup_procs: Vec<CString>,
    /// The function's cgroup and its parent, removed by the supervisor if
    /// the agent dies (else the agent reads and removes them).
    cgroup_dirs: Vec<CString>,
}

fn cstring(path: &Path) -> Result<CString, LaunchError> {
    CString::new(path.as_os_str().as_bytes()).map_err(|_| LaunchError::Nul)
}

impl Prepared {
    pub(super) fn new(spec: &FunctionSpec<'_>, netns: Option<i32>) -> Result<Self, LaunchError> {
        let iso = &spec.isolation;
        let root = iso.root;
        let dev = root.join("dev");
        let devices = DEVICES
            .iter()
            .map(|d| Ok((cstring(&Path::new("/dev").join(d))?, cstring(&dev.join(d))?)))
            .collect::<Result<_, LaunchError>>()?;
        let dev_links = DEV_LINKS
            .iter()
            .map(|(target, link)| Ok((cstring(Path::new(target))?, cstring(&dev.join(link))?)))
            .collect::<Result<_, LaunchError>>()?;
        let root_err = |source| LaunchError::Root {
            path: root.to_owned(),
            source,
        };
        let st = nix::sys::statvfs::statvfs(root).map_err(|e| root_err(e.into()))?;
        let binds = iso
            .binds
            .iter()
            .map(|b| (b, root.join(b.strip_prefix("/").unwrap_or(b))))
            .filter(|(_, point)| point.is_file())
            .map(|(b, point)| Ok((cstring(b)?, cstring(&point)?)))
            .collect::<Result<_, LaunchError>>()?;
        let writable = match iso.writable {
            Some(dir) => Some(writable_mount(root, dir)?),
            None => None,
        };
        let peers = match spec.peers_file {
            Some(file) => {
                let st = nix::sys::statvfs::statvfs(file).map_err(|e| root_err(e.into()))?;
                let point = root.join(PEERS_FILE_PATH.trim_start_matches('/'));
                Some((cstring(file)?, cstring(&point)?, locked_flags(st.flags())))
            }
            None => None,
        };
        Ok(Self {
            netns,
            binds,
            writable,
            peers,
            hostname: CString::new(spec.name).map_err(|_| LaunchError::Nul)?,
            agent: std::process::id() as libc::pid_t,
            last_cap: last_capability(),
            root: cstring(root)?,
            proc_: cstring(&root.join("proc"))?,
            tmp: cstring(&root.join("tmp"))?,
            tmp_options: CString::new(format!("size={},mode=1777", iso.tmp_bytes.max(4096)))
                .map_err(|_| LaunchError::Nul)?,
            dev: cstring(&dev)?,
            devices,
            dev_links,
            root_flags: locked_flags(st.flags()),
            id_map: format!("0 {} {}\n", iso.ids.host_base, iso.ids.count).into_bytes(),
            cgroup_procs: iso
                .cgroup_procs
                .iter()
                .map(|p| cstring(p))
                .collect::<Result<_, _>>()?,
            cgroup_dirs: iso
                .cgroup_procs
                .iter()
                .filter_map(|p| p.parent())
                .flat_map(|d| [Some(d), d.parent()])
                .flatten()
                .map(cstring)
                .collect::<Result<_, _>>()?,
        })
    }

    /// Runs in the forked child (the supervisor-to-be); returns in the
    /// function, just before exec.
    pub(super) fn enter(&self) -> io::Result<()> {
        // SAFETY (whole block): raw syscalls on prepared arguments; no allocation.
        unsafe {
            if let Some(fd) = self.netns {
                check(libc::setns(fd, libc::CLONE_NEWNET).into())?;
            }
            let mut sync = [0 as libc::c_int; 2];
            check(libc::pipe2(sync.as_mut_ptr(), libc::O_CLOEXEC).into())?;
            // The raw syscall, not glibc's fork(): no atfork handlers in a child
            // of a multi-threaded process.
            let flags = libc::CLONE_NEWUSER
                | libc::CLONE_NEWPID
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
                libc::close(sync[0]);
                let code = self.admit(pid);
                libc::write(sync[1], (&code as *const i32).cast(), 4);
                libc::close(sync[1]);
                supervise(pid, self.agent, &self.cgroup_dirs);
            }
            // The function: PID 1 of its namespace. Dies with its supervisor.
            check(libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL).into())?;
            libc::close(sync[1]);
            let mut code = 0i32;
            let n = libc::read(sync[0], (&mut code as *mut i32).cast(), 4);
            libc::close(sync[0]);
            if n != 4 {
                return Err(io::Error::from_raw_os_error(libc::ECHILD));
            }
            if code != 0 {
                return Err(io::Error::from_raw_os_error(code));
            }
            become_root_inside()?;
            // Changing credentials cleared the parent-death signal.
            check(libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL).into())?;
            self.build_root()?;
            check(
                libc::sethostname(self.hostname.as_ptr(), self.hostname.as_bytes().len()).into(),
            )?;
        }
        drop_privileges(self.last_cap)
    }

    /// In the supervisor: maps the function's ids and puts it in its
    /// cgroup. 0, or the errno of the first failure.
    fn admit(&self, pid: libc::pid_t) -> i32 {
        let mut path = [0u8; 48];
        for file in [&b"uid_map"[..], &b"gid_map"[..]] {
            let len = proc_path(&mut path, pid, file);
            if let Err(e) = write_file(&path[..len], &self.id_map) {
                return e;
            }
        }
        let mut digits = [0u8; 12];
        let n = decimal(&mut digits, pid as u32);
        for procs in &self.cgroup_procs {
            if let Err(e) = write_file(procs.as_bytes_with_nul(), &digits[..n]) {
                return e;
            }
        }
        0
    }

    /// In the function: its root from the image, then `pivot_root` into it.
    unsafe fn build_root(&self) -> io::Result<()> {
        let none = std::ptr::null::<libc::c_char>();
        let mount = mount_at;
        check(
            libc::mount(
                none,
                c"/".as_ptr(),
                none,
                libc::MS_REC | libc::MS_PRIVATE,
                none.cast(),
            )
            .into(),
        )?;
        mount(self.root.as_ptr(), &self.root, none, libc::MS_BIND, none)?;
        mount(
            none,
            &self.root,
            none,
            libc::MS_REMOUNT | libc::MS_BIND | self.root_flags,
            none,
        )?;
        for (file, point) in &self.binds {
            mount(file.as_ptr(), point, none, libc::MS_BIND, none)?;
        }
        let (nosuid, nodev, noexec) = (libc::MS_NOSUID, libc::MS_NODEV, libc::MS_NOEXEC);
        // Mounted before the node's /proc leaves the namespace: the kernel
        // lets a user namespace mount proc only where one is fully visible.
        mount(
            c"proc".as_ptr(),
            &self.proc_,
            c"proc".as_ptr(),
            nosuid | nodev | noexec,
            none,
        )?;
        let tmpfs = c"tmpfs".as_ptr();
        mount(
            tmpfs,
            &self.tmp,
            tmpfs,
            nosuid | nodev,
            self.tmp_options.as_ptr(),
        )?;
        if let Some((dir, make, point)) = &self.writable {
            for d in make {
                if libc::mkdir(d.as_ptr(), 0o755) < 0 && *libc::__errno_location() != libc::EEXIST {
                    return Err(io::Error::last_os_error());
                }
            }
            mount(dir.as_ptr(), point, none, libc::MS_BIND, none)?;
        }
        if let Some((file, point, flags)) = &self.peers {
            let fd = check(
                libc::open(
                    point.as_ptr(),
                    libc::O_CREAT | libc::O_WRONLY | libc::O_CLOEXEC,
                    0o444,
                )
                .into(),
            )?;
            libc::close(fd as libc::c_int);
            mount(file.as_ptr(), point, none, libc::MS_BIND, none)?;
            mount(
                none,
                point,
                none,
                libc::MS_REMOUNT | libc::MS_BIND | flags,
                none,
            )?;
        }
        self.build_dev()?;
        check(libc::chdir(self.root.as_ptr()).into())?;
        // pivot_root(".", "."): the old root ends up on top of the new one
        // and is detached at once; nothing of the node stays reachable.
        let dot = c".".as_ptr();
        check(libc::syscall(libc::SYS_pivot_root, dot, dot))?;
        check(libc::umount2(dot, libc::MNT_DETACH).into())?;
        check(libc::chdir(c"/".as_ptr()).into())?;
        Ok(())
    }

    /// In the function: a small tmpfs `/dev` with the node's harmless
    /// devices bound in and the usual links, then read-only.
    unsafe fn build_dev(&self) -> io::Result<()> {
        let none = std::ptr::null::<libc::c_char>();
        let mount = mount_at;
        let (nosuid, noexec) = (libc::MS_NOSUID, libc::MS_NOEXEC);
        let tmpfs = c"tmpfs".as_ptr();
        let dev_options = c"size=64k,nr_inodes=64,mode=755".as_ptr();
        mount(tmpfs, &self.dev, tmpfs, nosuid | noexec, dev_options)?;
        for (device, target) in &self.devices {
            let fd = check(
                libc::open(
                    target.as_ptr(),
                    libc::O_CREAT | libc::O_WRONLY | libc::O_CLOEXEC,
                    0o666,
                )
                .into(),
            )?;
            libc::close(fd as libc::c_int);
            mount(device.as_ptr(), target, none, libc::MS_BIND, none)?;
        }
        for (target, link) in &self.dev_links {
            check(libc::symlink(target.as_ptr(), link.as_ptr()).into())?;
        }
        mount(
            none,
            &self.dev,
            none,
            libc::MS_REMOUNT | libc::MS_RDONLY | nosuid | noexec,
            none,
        )?;
        Ok(())
    }
}

/// The node's `dir`, the directories below `/tmp` to make for it (outermost
/// first; none outside `/tmp`, where the image has it), and its mount point.
fn writable_mount(
    root: &Path,
    dir: &Path,
) -> Result<(CString, Vec<CString>, CString), LaunchError> {
    let point = root.join(dir.strip_prefix("/").unwrap_or(dir));
    let mut make = Vec::new();
    if dir.starts_with("/tmp") {
        let mut p = point.as_path();
        while p != root.join("tmp") {
            make.push(cstring(p)?);
            match p.parent() {
                Some(parent) => p = parent,
                None => break,
            }
        }
        make.reverse();
    }
    Ok((cstring(dir)?, make, cstring(&point)?))
}

fn check(r: libc::c_long) -> io::Result<libc::c_long> {
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

/// The flags a bind remount of a mount with statvfs flags `f` must keep
/// (a user namespace may not clear them), plus read-only, nosuid, nodev.
fn locked_flags(f: nix::sys::statvfs::FsFlags) -> libc::c_ulong {
    use nix::sys::statvfs::FsFlags;
    let mut flags = libc::MS_RDONLY | libc::MS_NOSUID | libc::MS_NODEV;
    for (st, ms) in [
        (FsFlags::ST_NOEXEC, libc::MS_NOEXEC),
        (FsFlags::ST_NOATIME, libc::MS_NOATIME),
        (FsFlags::ST_NODIRATIME, libc::MS_NODIRATIME),
        (FsFlags::ST_RELATIME, libc::MS_RELATIME),
    ] {
        if f.contains(st) {
            flags |= ms;
        }
    }
    flags
}

/// The function becomes uid and gid 0 of its user namespace, with no
/// supplementary groups. Raw syscalls: glibc's wrappers would try to reach
/// threads this process does not have.
unsafe fn become_root_inside() -> io::Result<()> {
    check(libc::syscall(
        libc::SYS_setgroups,
        0usize,
        std::ptr::null::<libc::gid_t>(),
    ))?;
    check(libc::syscall(libc::SYS_setresgid, 0u32, 0u32, 0u32))?;
    check(libc::syscall(libc::SYS_setresuid, 0u32, 0u32, 0u32))?;
    Ok(())
}

/// The highest capability number this kernel knows.
fn last_capability() -> u32 {
    std::fs::read_to_string("/proc/sys/kernel/cap_last_cap")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        // 40 (CAP_CHECKPOINT_RESTORE) on every kernel since 5.9.
        .unwrap_or(40)
}

/// Runs in the function just before exec: it loses every capability (those
/// it holds over its own namespaces), for good, so it cannot undo its
/// mounts, leave its namespaces or change its identity; and exec can never
/// grant them back (empty bounding set, no_new_privs).
fn drop_privileges(last_cap: u32) -> io::Result<()> {
    // SAFETY (whole block): raw syscalls with plain integer arguments and a
    // stack buffer; no allocation.
    unsafe {
        for cap in 0..=last_cap {
            check(libc::prctl(libc::PR_CAPBSET_DROP, cap as libc::c_ulong, 0, 0, 0).into())?;
        }
        check(
            libc::prctl(
                libc::PR_CAP_AMBIENT,
                libc::PR_CAP_AMBIENT_CLEAR_ALL as libc::c_ulong,
                0,
                0,
                0,
            )
            .into(),
        )?;
        // capset(2) version 3: two 32-bit words of effective, permitted and
        // inheritable sets, all zero.
        let header = [0x2008_0522u32, 0];
        let data = [0u32; 6];
        check(libc::syscall(
            libc::SYS_capset,
            header.as_ptr(),
            data.as_ptr(),
        ))?;
        check(libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0).into())?;
    }
    Ok(())
}

/// `mount(2)` onto `dst`, as a result (no allocation: safe between fork and exec).
unsafe fn mount_at(
    src: *const libc::c_char,
    dst: &CString,
    fstype: *const libc::c_char,
    flags: libc::c_ulong,
    data: *const libc::c_char,
) -> io::Result<i64> {
    check(libc::mount(src, dst.as_ptr(), fstype, flags, data.cast()).into())
}
