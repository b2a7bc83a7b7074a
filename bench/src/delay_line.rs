//! A userspace delay line between two interfaces: every Ethernet frame that
//! arrives on one leaves by the other `delay` later. It stands in for `tc
//! netem`, which this kernel does not have (CONFIG_NET_SCH_NETEM is not set).
//!
//! One AF_PACKET socket per interface, in the namespace that holds both
//! (the simulated underlay); per direction a receiving thread stamps each
//! frame and a sending thread holds it until its time. Sockets use
//! `PACKET_VNET_HDR`, so segmentation-offloaded frames and partial checksums
//! cross intact (the virtio header carries what the kernel needs), and
//! `PACKET_IGNORE_OUTGOING`, so a socket never reads back what it sent.
//! Frames leave through the interface's qdisc, so `tbf` on an interface
//! shapes that direction.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use nix::libc;
use particle_net::NetNs;

/// Largest frame read: a 64 KiB GSO frame, its virtio header and then some.
const FRAME_BUF: usize = 256 * 1024;
/// `PACKET_IGNORE_OUTGOING` (linux/if_packet.h, since 4.20).
const PACKET_IGNORE_OUTGOING: libc::c_int = 23;

/// A running delay line; dropping it stops the threads.
pub struct DelayLine {
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
    forwarded: Arc<AtomicU64>,
    send_errors: Arc<AtomicU64>,
}

fn check(rc: libc::c_int, what: &str) -> io::Result<()> {
    if rc < 0 {
        let e = io::Error::last_os_error();
        return Err(io::Error::new(e.kind(), format!("{what}: {e}")));
    }
    Ok(())
}

fn setsockopt_int(
    fd: &OwnedFd,
    level: libc::c_int,
    opt: libc::c_int,
    v: libc::c_int,
    what: &str,
) -> io::Result<()> {
    // SAFETY: an int option on a socket we own.
    let rc = unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            level,
            opt,
            (&v as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    check(rc, what)
}

/// A packet socket bound to `ifname`, opened in the calling thread's namespace.
fn packet_socket(ifname: &str) -> io::Result<OwnedFd> {
    let proto = (libc::ETH_P_ALL as u16).to_be();
    // SAFETY: plain socket creation; the fd is owned right away.
    let fd = unsafe {
        libc::socket(
            libc::AF_PACKET,
            libc::SOCK_RAW | libc::SOCK_CLOEXEC,
            proto as libc::c_int,
        )
    };
    check(fd, "AF_PACKET socket")?;
    // SAFETY: fd is a fresh descriptor nobody else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    let name = std::ffi::CString::new(ifname).map_err(io::Error::other)?;
    // SAFETY: NUL-terminated name.
    let index = unsafe { libc::if_nametoindex(name.as_ptr()) };
    if index == 0 {
        return Err(io::Error::new(
            io::ErrorKind::NotFound,
            format!("no interface {ifname}"),
        ));
    }
    setsockopt_int(
        &fd,
        libc::SOL_PACKET,
        libc::PACKET_VNET_HDR,
        1,
        "PACKET_VNET_HDR",
    )?;
    setsockopt_int(
        &fd,
        libc::SOL_PACKET,
        PACKET_IGNORE_OUTGOING,
        1,
        "PACKET_IGNORE_OUTGOING",
    )?;
    setsockopt_int(
        &fd,
        libc::SOL_SOCKET,
        libc::SO_RCVBUFFORCE,
        16 << 20,
        "SO_RCVBUFFORCE",
    )?;
    setsockopt_int(
        &fd,
        libc::SOL_SOCKET,
        libc::SO_SNDBUFFORCE,
        16 << 20,
        "SO_SNDBUFFORCE",
    )?;
    // A receive timeout lets the threads notice a stop.
    let tv = libc::timeval {
        tv_sec: 0,
        tv_usec: 100_000,
    };
    // SAFETY: a timeval option on our socket.
    let rc = unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVTIMEO,
            (&tv as *const libc::timeval).cast(),
            std::mem::size_of::<libc::timeval>() as libc::socklen_t,
        )
    };
    check(rc, "SO_RCVTIMEO")?;
    // SAFETY: sockaddr_ll is plain data.
    let mut sll: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
    sll.sll_family = libc::AF_PACKET as u16;
    sll.sll_protocol = proto;
    sll.sll_ifindex = index as i32;
    // SAFETY: a valid sockaddr_ll and its size.
    let rc = unsafe {
        libc::bind(
            fd.as_raw_fd(),
            (&sll as *const libc::sockaddr_ll).cast(),
            std::mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t,
        )
    };
    check(rc, "binding the packet socket")?;
    Ok(fd)
}

/// Runs the calling thread under SCHED_FIFO: the delay line stands in for a
/// wire, and other processes' work on a shared machine should not add to its
/// delay. Best effort (threads block in recv or sleep, so they cannot hog a
/// core); without it the line still works, with more jitter.
fn realtime() {
    let param = libc::sched_param { sched_priority: 10 };
    // SAFETY: changes the calling thread's policy only.
    if unsafe { libc::sched_setscheduler(0, libc::SCHED_FIFO, &param) } != 0 {
        tracing::debug!(
            "delay line stays SCHED_OTHER: {}",
            io::Error::last_os_error()
        );
    }
}

impl DelayLine {
    /// Forwards frames between `a` and `b` (interfaces in `ns`), each way
    /// holding every frame for `delay`.
    pub fn start(ns: &NetNs, a: &str, b: &str, delay: Duration) -> Result<Self> {
        let (sa, sb) = ns
            .run_in(|| -> io::Result<(OwnedFd, OwnedFd)> {
                Ok((packet_socket(a)?, packet_socket(b)?))
            })?
            .context("opening the delay line's packet sockets")?;
        let (sa, sb) = (Arc::new(sa), Arc::new(sb));
        let mut line = Self {
            stop: Arc::new(AtomicBool::new(false)),
            threads: Vec::new(),
            forwarded: Arc::new(AtomicU64::new(0)),
            send_errors: Arc::new(AtomicU64::new(0)),
        };
        for (from, to) in [(sa.clone(), sb.clone()), (sb, sa)] {
            let (tx, rx) = mpsc::channel::<(Instant, Vec<u8>)>();
            let stop = line.stop.clone();
            line.threads
                .push(
                    std::thread::Builder::new()
                        .name("delay-rx".into())
                        .spawn(move || {
                            realtime();
                            let mut buf = vec![0u8; FRAME_BUF];
                            while !stop.load(Ordering::Relaxed) {
                                // SAFETY: reading into our buffer.
                                let n = unsafe {
                                    libc::recv(
                                        from.as_raw_fd(),
                                        buf.as_mut_ptr().cast(),
                                        buf.len(),
                                        0,
                                    )
                                };
                                if n <= 0 {
                                    continue; // timeout (stop check) or a transient error
                                }
                                let due = Instant::now() + delay;
                                if tx.send((due, buf[..n as usize].to_vec())).is_err() {
                                    return;
                                }
                            }
                        })?,
                );
            let (stop, forwarded, errors) = (
                line.stop.clone(),
                line.forwarded.clone(),
                line.send_errors.clone(),
            );
            line.threads
                .push(
                    std::thread::Builder::new()
                        .name("delay-tx".into())
                        .spawn(move || {
                            // The default 50 µs timer slack would be a tenth of a 0.5 ms delay.
                            // SAFETY: prctl on the calling thread only.
                            unsafe { libc::prctl(libc::PR_SET_TIMERSLACK, 1 as libc::c_ulong) };
                            realtime();
                            while !stop.load(Ordering::Relaxed) {
                                let Ok((due, frame)) = rx.recv_timeout(Duration::from_millis(100))
                                else {
                                    continue;
                                };
                                let now = Instant::now();
                                if due > now {
                                    std::thread::sleep(due - now);
                                }
                                // SAFETY: sending our buffer on the bound socket.
                                let n = unsafe {
                                    libc::send(
                                        to.as_raw_fd(),
                                        frame.as_ptr().cast(),
                                        frame.len(),
                                        0,
                                    )
                                };
                                if n < 0 {
                                    errors.fetch_add(1, Ordering::Relaxed);
                                } else {
                                    forwarded.fetch_add(1, Ordering::Relaxed);
                                }
                            }
                        })?,
                );
        }
        Ok(line)
    }

    /// Frames forwarded and frames the kernel refused to send.
    pub fn counts(&self) -> (u64, u64) {
        (
            self.forwarded.load(Ordering::Relaxed),
            self.send_errors.load(Ordering::Relaxed),
        )
    }
}

impl Drop for DelayLine {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}
