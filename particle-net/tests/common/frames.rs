//! Raw Ethernet frames for the spoofing tests: built by hand and sent or
//! sniffed on an AF_PACKET socket (what a process holding CAP_NET_RAW in
//! an endpoint can do). Every frame carries an 8-byte marker after its
//! payload, so a sniffer can tell exactly which of them got through.

use std::net::Ipv4Addr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use nix::libc;

pub const BROADCAST: [u8; 6] = [0xff; 6];
const ETH_P_ALL: u16 = 0x0003;
pub const ETH_P_IP: u16 = 0x0800;
pub const ETH_P_ARP: u16 = 0x0806;

/// A marker: "PTSP" and a number.
pub fn marker(n: u32) -> [u8; 8] {
    let mut m = *b"PTSP\0\0\0\0";
    m[4..].copy_from_slice(&n.to_be_bytes());
    m
}

pub fn ethernet(dst: [u8; 6], src: [u8; 6], ethertype: u16, payload: &[u8]) -> Vec<u8> {
    let mut f = Vec::with_capacity(14 + payload.len());
    f.extend_from_slice(&dst);
    f.extend_from_slice(&src);
    f.extend_from_slice(&ethertype.to_be_bytes());
    f.extend_from_slice(payload);
    f
}

/// An IPv4 UDP datagram (UDP checksum 0: none, allowed in IPv4).
pub fn ipv4_udp(src: Ipv4Addr, dst: Ipv4Addr, dport: u16, payload: &[u8]) -> Vec<u8> {
    let total = 20 + 8 + payload.len();
    let mut p = Vec::with_capacity(total);
    p.extend_from_slice(&[0x45, 0, 0, 0, 0, 0, 0x40, 0, 64, 17, 0, 0]);
    p[2..4].copy_from_slice(&(total as u16).to_be_bytes());
    p.extend_from_slice(&src.octets());
    p.extend_from_slice(&dst.octets());
    let sum = checksum(&p);
    p[10..12].copy_from_slice(&sum.to_be_bytes());
    p.extend_from_slice(&40000u16.to_be_bytes());
    p.extend_from_slice(&dport.to_be_bytes());
    p.extend_from_slice(&((8 + payload.len()) as u16).to_be_bytes());
    p.extend_from_slice(&[0, 0]);
    p.extend_from_slice(payload);
    p
}

/// An ARP packet (Ethernet/IPv4); `op` 1 request, 2 reply. Trailing bytes
/// (the marker) are ignored by receivers, as Ethernet padding is.
pub fn arp(op: u16, sha: [u8; 6], sip: Ipv4Addr, tha: [u8; 6], tip: Ipv4Addr) -> Vec<u8> {
    let mut p = vec![0, 1, 0x08, 0, 6, 4];
    p.extend_from_slice(&op.to_be_bytes());
    p.extend_from_slice(&sha);
    p.extend_from_slice(&sip.octets());
    p.extend_from_slice(&tha);
    p.extend_from_slice(&tip.octets());
    p
}

fn checksum(bytes: &[u8]) -> u16 {
    let mut sum: u32 = bytes
        .chunks(2)
        .map(|c| u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)])))
        .sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// An AF_PACKET socket on one interface of the namespace it was opened in.
pub struct RawSocket {
    fd: OwnedFd,
}

impl RawSocket {
    /// Opens it on `ifindex` of the calling thread's namespace.
    pub fn open(ifindex: u32) -> std::io::Result<Self> {
        // SAFETY: plain system calls on a fresh fd we own.
        unsafe {
            let fd = libc::socket(
                libc::AF_PACKET,
                libc::SOCK_RAW | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
                i32::from(ETH_P_ALL.to_be()),
            );
            if fd < 0 {
                return Err(std::io::Error::last_os_error());
            }
            let fd = OwnedFd::from_raw_fd(fd);
            let mut addr: libc::sockaddr_ll = std::mem::zeroed();
            addr.sll_family = libc::AF_PACKET as u16;
            addr.sll_protocol = ETH_P_ALL.to_be();
            addr.sll_ifindex = ifindex as i32;
            let rc = libc::bind(
                fd.as_raw_fd(),
                std::ptr::addr_of!(addr).cast(),
                std::mem::size_of::<libc::sockaddr_ll>() as u32,
            );
            if rc < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(Self { fd })
        }
    }

    pub fn send(&self, frame: &[u8]) -> std::io::Result<()> {
        // SAFETY: the buffer is valid for its length.
        let n = unsafe { libc::send(self.fd.as_raw_fd(), frame.as_ptr().cast(), frame.len(), 0) };
        if n < 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(())
    }

    /// The marked frames that arrive until `stop` is set (incoming ones
    /// only, not the socket's own sends). Reads as they come, so a busy
    /// link cannot fill the socket's buffer and drop what is looked for.
    pub fn collect_until(&self, stop: &AtomicBool) -> Vec<Vec<u8>> {
        let mut frames = Vec::new();
        let mut buf = vec![0u8; 65536];
        loop {
            let stopping = stop.load(Ordering::Relaxed);
            // SAFETY: the buffer is valid for its length; addr is ours.
            let mut addr: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
            let mut len = std::mem::size_of::<libc::sockaddr_ll>() as u32;
            let n = unsafe {
                libc::recvfrom(
                    self.fd.as_raw_fd(),
                    buf.as_mut_ptr().cast(),
                    buf.len(),
                    0,
                    std::ptr::addr_of_mut!(addr).cast(),
                    &mut len,
                )
            };
            if n < 0 {
                if stopping {
                    return frames;
                }
                std::thread::sleep(Duration::from_millis(1));
                continue;
            }
            let frame = &buf[..n as usize];
            if addr.sll_pkttype != libc::PACKET_OUTGOING && frame.windows(4).any(|w| w == b"PTSP") {
                frames.push(frame.to_vec());
            }
        }
    }
}

/// Whether any frame carries the marker.
pub fn seen(frames: &[Vec<u8>], m: [u8; 8]) -> bool {
    frames.iter().any(|f| f.windows(8).any(|w| w == m))
}
