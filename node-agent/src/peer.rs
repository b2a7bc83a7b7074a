//! Who is at the other end of a Unix socket, read from the kernel and never
//! from a request. Unix sockets are not namespaced, so anything that can
//! reach the file can connect; the agent decides what to serve from the
//! peer's credentials and network namespace.
//!
//! The pid in `SO_PEERCRED` is the connecting process's at connect time: it
//! may have exited since (a child that connects and exits), and its pid may
//! even name another process by now. So the process is pinned with a pidfd
//! taken from the socket itself (`SO_PEERPIDFD`, Linux ≥ 6.5; else
//! `pidfd_open` at once), its namespace read through `/proc`, and the pidfd
//! checked afterwards: a peer that is gone is an error, never a guess.

use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::fs::MetadataExt;

use nix::libc;
use nix::sys::socket::{getsockopt, sockopt::PeerCredentials};

/// `SO_PEERPIDFD` (asm-generic value; the libc crate does not export it for this target).
const SO_PEERPIDFD: libc::c_int = 77;

/// The process at the other end, as the kernel knows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Peer {
    /// Its uid as seen from the agent's user namespace (a function in a user
    /// namespace of its own shows its unprivileged host uid).
    pub uid: u32,
    pub pid: i32,
    /// Its network namespace (nsfs inode).
    pub netns: u64,
}

/// Identifies the peer of `socket`, or says why it cannot be.
pub fn identify(socket: &impl AsFd) -> Result<Peer, String> {
    let cred =
        getsockopt(socket, PeerCredentials).map_err(|e| format!("no peer credentials: {e}"))?;
    let pid = cred.pid();
    if pid <= 0 {
        return Err("no peer pid".into());
    }
    let pidfd = peer_pidfd(socket, pid).map_err(|e| format!("pid {pid}: {e}"))?;
    let netns = std::fs::metadata(format!("/proc/{pid}/ns/net")).map(|m| m.ino());
    if !process_alive(&pidfd) {
        return Err(format!("pid {pid} exited before it was identified"));
    }
    let netns = netns.map_err(|e| format!("pid {pid}'s network namespace: {e}"))?;
    Ok(Peer {
        uid: cred.uid(),
        pid,
        netns,
    })
}

/// A pidfd of the process that connected `socket`.
fn peer_pidfd(socket: &impl AsFd, pid: i32) -> std::io::Result<OwnedFd> {
    let mut fd: libc::c_int = -1;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: getsockopt writes at most `len` bytes into `fd`.
    let rc = unsafe {
        libc::getsockopt(
            socket.as_fd().as_raw_fd(),
            libc::SOL_SOCKET,
            SO_PEERPIDFD,
            (&mut fd as *mut libc::c_int).cast(),
            &mut len,
        )
    };
    if rc == 0 && fd >= 0 {
        // SAFETY: the kernel just gave us this descriptor; nobody else owns it.
        return Ok(unsafe { OwnedFd::from_raw_fd(fd) });
    }
    let e = std::io::Error::last_os_error();
    if e.raw_os_error() != Some(libc::ENOPROTOOPT) {
        return Err(e);
    }
    // SAFETY: pidfd_open takes a pid and flags and returns a new fd or -1.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    let fd = libc::c_int::try_from(fd).map_err(std::io::Error::other)?;
    // SAFETY: as above, a fresh descriptor of ours.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Whether the process behind `pidfd` still runs (signal 0 checks, sends nothing).
fn process_alive(pidfd: &OwnedFd) -> bool {
    // SAFETY: pidfd_send_signal with signal 0 and no info only checks.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_pidfd_send_signal,
            pidfd.as_raw_fd(),
            0,
            std::ptr::null::<libc::siginfo_t>(),
            0,
        )
    };
    rc == 0
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixStream;

    #[test]
    fn a_live_peer_is_identified() {
        let (a, _b) = UnixStream::pair().unwrap();
        let p = identify(&a).unwrap();
        assert_eq!(p.pid, std::process::id() as i32);
        let own = std::fs::metadata("/proc/self/ns/net").unwrap().ino();
        assert_eq!(p.netns, own);
    }

    /// The attack that passed the old check: connect in a child that exits
    /// at once, then talk on the socket from the parent. The pid the socket
    /// names is gone (or someone else's): refused, not trusted.
    #[test]
    fn a_peer_that_connected_in_a_child_that_exited_is_refused() {
        let dir = std::env::temp_dir().join(format!("particle-peer-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("s.sock");
        let listener = std::os::unix::net::UnixListener::bind(&path).unwrap();
        let client = nix::sys::socket::socket(
            nix::sys::socket::AddressFamily::Unix,
            nix::sys::socket::SockType::Stream,
            nix::sys::socket::SockFlag::SOCK_CLOEXEC,
            None,
        )
        .unwrap();
        let addr = nix::sys::socket::UnixAddr::new(&path).unwrap();
        // SAFETY: the child only calls connect and _exit (async-signal-safe).
        match unsafe { nix::unistd::fork() }.unwrap() {
            nix::unistd::ForkResult::Child => {
                let ok = nix::sys::socket::connect(client.as_raw_fd(), &addr).is_ok();
                // SAFETY: leaves the forked child without running destructors.
                unsafe { libc::_exit(i32::from(!ok)) }
            }
            nix::unistd::ForkResult::Parent { child } => {
                let status = nix::sys::wait::waitpid(child, None).unwrap();
                assert_eq!(status, nix::sys::wait::WaitStatus::Exited(child, 0));
            }
        }
        let (server, _) = listener.accept().unwrap();
        let verdict = identify(&server);
        let _ = std::fs::remove_dir_all(&dir);
        assert!(verdict.is_err(), "{verdict:?}");
        drop(client);
    }
}
