//! What the agent reads from the kernel about a warm connection: whether it
//! is clean enough to hand to the next function, and who is asking for one.

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd};
use std::os::unix::fs::MetadataExt;

use nix::libc;

/// Why a connection may not be pooled again.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Dirty {
    #[error("socket error: {0}")]
    Error(String),
    #[error("not established (TCP state {0})")]
    State(u8),
    #[error("{0} bytes left unread")]
    Unread(usize),
    #[error("{0} bytes sent but not yet acknowledged")]
    Unacked(usize),
    #[error("the peer closed the connection")]
    PeerClosed,
    #[error("cannot inspect the socket: {0}")]
    Inspect(String),
}

/// `TCP_ESTABLISHED` in `tcp_info.tcpi_state`.
const TCP_ESTABLISHED: u8 = 1;

/// The kernel's view of a TCP socket.
pub fn tcp_info(fd: BorrowedFd<'_>) -> io::Result<libc::tcp_info> {
    // SAFETY: tcp_info is plain old data; the kernel fills at most `len` bytes.
    let mut info: libc::tcp_info = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::tcp_info>() as libc::socklen_t;
    // SAFETY: valid fd, pointer and length for the duration of the call.
    let rc = unsafe {
        libc::getsockopt(
            fd.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_INFO,
            (&mut info as *mut libc::tcp_info).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(info)
}

fn ioctl_int(fd: BorrowedFd<'_>, request: libc::Ioctl) -> io::Result<usize> {
    let mut n: libc::c_int = 0;
    // SAFETY: FIONREAD / SIOCOUTQ write one int.
    if unsafe { libc::ioctl(fd.as_raw_fd(), request, &mut n) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(usize::try_from(n).unwrap_or(0))
}

/// Whether `fd` can go to the next function: established, no error, nothing
/// unread (anything left would reach the next user as the answer to its
/// request), nothing of ours still in flight, the peer still there.
pub fn check_clean(fd: BorrowedFd<'_>) -> Result<(), Dirty> {
    let inspect = |e: io::Error| Dirty::Inspect(e.to_string());
    let err = nix::sys::socket::getsockopt(&fd, nix::sys::socket::sockopt::SocketError)
        .map_err(|e| inspect(e.into()))?;
    if err != 0 {
        return Err(Dirty::Error(io::Error::from_raw_os_error(err).to_string()));
    }
    let info = tcp_info(fd).map_err(inspect)?;
    if info.tcpi_state != TCP_ESTABLISHED {
        return Err(Dirty::State(info.tcpi_state));
    }
    let unread = ioctl_int(fd, libc::FIONREAD).map_err(inspect)?;
    if unread > 0 {
        return Err(Dirty::Unread(unread));
    }
    let unacked = ioctl_int(fd, libc::TIOCOUTQ).map_err(inspect)?;
    if unacked > 0 {
        return Err(Dirty::Unacked(unacked));
    }
    let mut byte = [0u8; 1];
    // SAFETY: one-byte buffer; MSG_PEEK consumes nothing.
    let n = unsafe {
        libc::recv(
            fd.as_raw_fd(),
            byte.as_mut_ptr().cast(),
            1,
            libc::MSG_PEEK | libc::MSG_DONTWAIT,
        )
    };
    match n {
        0 => Err(Dirty::PeerClosed),
        1 => Err(Dirty::Unread(1)),
        _ => match io::Error::last_os_error().kind() {
            io::ErrorKind::WouldBlock => Ok(()),
            _ => Err(Dirty::Error(io::Error::last_os_error().to_string())),
        },
    }
}

/// The socket's inode: what tells a connection the agent lent from any other
/// socket a caller might send back.
pub fn socket_inode(fd: BorrowedFd<'_>) -> io::Result<u64> {
    let fd = fd.try_clone_to_owned()?;
    Ok(std::fs::File::from(fd).metadata()?.ino())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::net::{TcpListener, TcpStream};
    use std::os::fd::AsFd;

    /// A connected pair on loopback (this agent's test port range).
    fn pair(port: u16) -> (TcpStream, TcpStream) {
        let l = TcpListener::bind(("127.0.0.1", port)).unwrap();
        let c = TcpStream::connect(("127.0.0.1", port)).unwrap();
        let (s, _) = l.accept().unwrap();
        (c, s)
    }

    fn settle() {
        std::thread::sleep(std::time::Duration::from_millis(50));
    }

    #[test]
    fn clean_unread_and_closed_connections_are_told_apart() {
        let (c, mut s) = pair(18160);
        assert_eq!(check_clean(c.as_fd()), Ok(()));
        s.write_all(b"left over").unwrap();
        settle();
        assert_eq!(check_clean(c.as_fd()), Err(Dirty::Unread(9)));

        let (c, s) = pair(18161);
        drop(s);
        settle();
        // The peer's FIN moves us to CLOSE_WAIT.
        assert!(matches!(check_clean(c.as_fd()), Err(Dirty::State(_))));

        let (c, s) = pair(18162);
        let ino = socket_inode(c.as_fd()).unwrap();
        assert_ne!(ino, socket_inode(s.as_fd()).unwrap());
        assert_eq!(ino, socket_inode(c.try_clone().unwrap().as_fd()).unwrap());
    }
}
