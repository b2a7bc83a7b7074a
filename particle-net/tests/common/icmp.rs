//! An unprivileged ping: an ICMP datagram socket (`SOCK_DGRAM`,
//! `IPPROTO_ICMP`), which the kernel allows to groups in the namespace's
//! `net.ipv4.ping_group_range`, no capability needed.

use std::net::Ipv4Addr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

use nix::libc;

/// Sends one echo request to `to` and waits up to 2 s for the reply.
pub fn ping(to: Ipv4Addr) -> std::io::Result<()> {
    let last = std::io::Error::last_os_error;
    // SAFETY: plain system calls on a fresh fd we own, with valid buffers.
    unsafe {
        let fd = libc::socket(libc::AF_INET, libc::SOCK_DGRAM, libc::IPPROTO_ICMP);
        if fd < 0 {
            return Err(last());
        }
        let fd = OwnedFd::from_raw_fd(fd);
        let timeout = libc::timeval {
            tv_sec: 2,
            tv_usec: 0,
        };
        libc::setsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVTIMEO,
            std::ptr::addr_of!(timeout).cast(),
            std::mem::size_of::<libc::timeval>() as u32,
        );
        let mut addr: libc::sockaddr_in = std::mem::zeroed();
        addr.sin_family = libc::AF_INET as u16;
        addr.sin_addr.s_addr = u32::from(to).to_be();
        // Echo request, code 0; the kernel fills in the id and checksum.
        let request = [8u8, 0, 0, 0, 0, 0, 0, 1, b'p', b't'];
        let sent = libc::sendto(
            fd.as_raw_fd(),
            request.as_ptr().cast(),
            request.len(),
            0,
            std::ptr::addr_of!(addr).cast(),
            std::mem::size_of::<libc::sockaddr_in>() as u32,
        );
        if sent < 0 {
            return Err(last());
        }
        let mut reply = [0u8; 64];
        let n = libc::recv(fd.as_raw_fd(), reply.as_mut_ptr().cast(), reply.len(), 0);
        if n < 0 {
            return Err(last());
        }
        match reply[0] {
            0 => Ok(()),
            other => Err(std::io::Error::other(format!("ICMP type {other} back"))),
        }
    }
}
