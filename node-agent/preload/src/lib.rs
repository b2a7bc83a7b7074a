//! `LD_PRELOAD=libparticle_preload.so PROGRAM`: a `connect()` to a destination
//! the node agent pools becomes a warm, already-established connection handed
//! over by the agent (SCM_RIGHTS), and `close()` of it gives it back. Anything
//! else, an absent agent or a refusal falls through to the real call.
//!
//! Environment:
//! - `PARTICLE_WARM_SOCKET`: the agent's warm socket (default `/run/particle/warm.sock`).
//! - `PARTICLE_PRELOAD_MODE`: `reuse` (default); `passthrough` intercepts and
//!   does the same bookkeeping but never asks the agent (the benchmark's
//!   "do-nothing" layer); `off` calls through immediately.
//! - `PARTICLE_PRELOAD_DEBUG=1`: one line on stderr per decision.
//!
//! Nothing here may panic across the C boundary: every entry point catches
//! panics and falls back to the real call. The library's own descriptors are
//! opened and closed through the real functions, never through the wrappers.

use std::ffi::{c_int, c_void, CStr};
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Mutex, OnceLock, PoisonError};

use libc::{sockaddr, socklen_t};

type ConnectFn = unsafe extern "C" fn(c_int, *const sockaddr, socklen_t) -> c_int;
type CloseFn = unsafe extern "C" fn(c_int) -> c_int;

const DEFAULT_SOCKET: &str = "/run/particle/warm.sock";
const MAX_LINE: usize = 64 * 1024;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    Reuse,
    Passthrough,
    Off,
}

struct Config {
    mode: Mode,
    socket: Vec<u8>,
    debug: bool,
}

fn config() -> &'static Config {
    static CONFIG: OnceLock<Config> = OnceLock::new();
    CONFIG.get_or_init(|| {
        let var = |k: &str| std::env::var(k).ok();
        Config {
            mode: match var("PARTICLE_PRELOAD_MODE").as_deref() {
                Some("passthrough") => Mode::Passthrough,
                Some("off") => Mode::Off,
                _ => Mode::Reuse,
            },
            socket: var("PARTICLE_WARM_SOCKET")
                .unwrap_or_else(|| DEFAULT_SOCKET.into())
                .into_bytes(),
            debug: var("PARTICLE_PRELOAD_DEBUG").is_some_and(|v| v == "1"),
        }
    })
}

macro_rules! debug {
    ($($arg:tt)*) => {
        if config().debug {
            eprintln!("particle-preload[{}]: {}", std::process::id(), format!($($arg)*));
        }
    };
}

fn next_symbol(name: &CStr, cache: &AtomicUsize) -> usize {
    let cached = cache.load(Ordering::Relaxed);
    if cached != 0 {
        return cached;
    }
    // SAFETY: dlsym with RTLD_NEXT and a NUL-terminated name.
    let f = unsafe { libc::dlsym(libc::RTLD_NEXT, name.as_ptr()) } as usize;
    cache.store(f, Ordering::Relaxed);
    f
}

unsafe fn real_connect(fd: c_int, addr: *const sockaddr, len: socklen_t) -> c_int {
    static CACHE: AtomicUsize = AtomicUsize::new(0);
    match next_symbol(c"connect", &CACHE) {
        0 => {
            *libc::__errno_location() = libc::ENOSYS;
            -1
        }
        // SAFETY: dlsym found libc's connect, whose type this is.
        f => std::mem::transmute::<usize, ConnectFn>(f)(fd, addr, len),
    }
}

unsafe fn real_close(fd: c_int) -> c_int {
    static CACHE: AtomicUsize = AtomicUsize::new(0);
    match next_symbol(c"close", &CACHE) {
        0 => libc::syscall(libc::SYS_close, fd as libc::c_long) as c_int,
        // SAFETY: dlsym found libc's close, whose type this is.
        f => std::mem::transmute::<usize, CloseFn>(f)(fd),
    }
}

/// Descriptors holding a connection the agent lent, with the process that
/// got it: a forked child closing its inherited copy must not give back a
/// connection its parent still uses.
static POOLED: Mutex<Vec<(c_int, u32)>> = Mutex::new(Vec::new());
/// How many; lets close() of everything else skip the lock.
static POOLED_COUNT: AtomicUsize = AtomicUsize::new(0);

fn pooled_insert(fd: c_int) {
    let mut p = POOLED.lock().unwrap_or_else(PoisonError::into_inner);
    if !p.iter().any(|&(x, _)| x == fd) {
        p.push((fd, std::process::id()));
        POOLED_COUNT.store(p.len(), Ordering::Relaxed);
    }
}

/// Whether `fd` held a lent connection of this very process (forgetting it).
fn pooled_remove(fd: c_int) -> bool {
    if POOLED_COUNT.load(Ordering::Relaxed) == 0 {
        return false;
    }
    let mut p = POOLED.lock().unwrap_or_else(PoisonError::into_inner);
    let found = p
        .iter()
        .position(|&(x, _)| x == fd)
        .map(|i| p.swap_remove(i));
    POOLED_COUNT.store(p.len(), Ordering::Relaxed);
    found.is_some_and(|(_, pid)| pid == std::process::id())
}

/// The connection to the agent and what it said about destinations.
struct Agent {
    fd: c_int,
    pid: u32,
    /// Destinations this process's tenant may get, fetched once.
    destinations: Vec<SocketAddr>,
}

enum AgentState {
    Unknown,
    Absent,
    Present(Agent),
}

static AGENT: Mutex<AgentState> = Mutex::new(AgentState::Unknown);

unsafe fn sockaddr_to_std(addr: *const sockaddr, len: socklen_t) -> Option<SocketAddr> {
    if addr.is_null() {
        return None;
    }
    match (*addr).sa_family as c_int {
        libc::AF_INET if len as usize >= std::mem::size_of::<libc::sockaddr_in>() => {
            let a = &*(addr as *const libc::sockaddr_in);
            Some(SocketAddr::V4(SocketAddrV4::new(
                Ipv4Addr::from(u32::from_be(a.sin_addr.s_addr)),
                u16::from_be(a.sin_port),
            )))
        }
        libc::AF_INET6 if len as usize >= std::mem::size_of::<libc::sockaddr_in6>() => {
            let a = &*(addr as *const libc::sockaddr_in6);
            Some(SocketAddr::V6(SocketAddrV6::new(
                Ipv6Addr::from(a.sin6_addr.s6_addr),
                u16::from_be(a.sin6_port),
                a.sin6_flowinfo,
                a.sin6_scope_id,
            )))
        }
        _ => None,
    }
}

fn is_stream_socket(fd: c_int) -> bool {
    let mut ty: c_int = 0;
    let mut len = std::mem::size_of::<c_int>() as socklen_t;
    // SAFETY: SO_TYPE writes one int.
    let rc = unsafe {
        libc::getsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_TYPE,
            (&mut ty as *mut c_int).cast(),
            &mut len,
        )
    };
    rc == 0 && ty == libc::SOCK_STREAM
}

/// Sends `line` + newline with `fd` attached (if any).
fn send_line(sock: c_int, line: &[u8], fd: Option<c_int>) -> bool {
    let mut out = Vec::with_capacity(line.len() + 1);
    out.extend_from_slice(line);
    out.push(b'\n');
    let mut sent = 0usize;
    while sent < out.len() {
        let mut iov = libc::iovec {
            iov_base: out[sent..].as_mut_ptr().cast(),
            iov_len: out.len() - sent,
        };
        // Room for one fd, aligned as cmsghdr wants.
        let mut control = [0u64; 4];
        // SAFETY: msghdr is plain data; zeroed is a valid empty header.
        let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        if let (0, Some(fd)) = (sent, fd) {
            // SAFETY: CMSG_* on a buffer big enough for one int (checked below).
            unsafe {
                let space = libc::CMSG_SPACE(std::mem::size_of::<c_int>() as u32) as usize;
                if space > std::mem::size_of_val(&control) {
                    return false;
                }
                msg.msg_control = control.as_mut_ptr().cast();
                msg.msg_controllen = space;
                let c = libc::CMSG_FIRSTHDR(&msg);
                (*c).cmsg_level = libc::SOL_SOCKET;
                (*c).cmsg_type = libc::SCM_RIGHTS;
                (*c).cmsg_len = libc::CMSG_LEN(std::mem::size_of::<c_int>() as u32) as usize;
                std::ptr::write_unaligned(libc::CMSG_DATA(c).cast::<c_int>(), fd);
            }
        }
        // SAFETY: msg points at live buffers for the duration of the call.
        let n = unsafe { libc::sendmsg(sock, &msg, libc::MSG_NOSIGNAL) };
        if n < 0 {
            if std::io::Error::last_os_error().kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return false;
        }
        sent += n as usize;
    }
    true
}

/// Reads one reply line; returns it and the fd that came with it (if any).
fn recv_line(sock: c_int) -> Option<(Vec<u8>, Option<c_int>)> {
    let mut line = Vec::new();
    let mut got_fd: Option<c_int> = None;
    loop {
        let mut byte_buf = [0u8; 512];
        let mut iov = libc::iovec {
            iov_base: byte_buf.as_mut_ptr().cast(),
            iov_len: byte_buf.len(),
        };
        // Peek first (without ancillary data: a peek would install copies of
        // the fds) so no byte past this line is consumed.
        // SAFETY: live buffer.
        let n = unsafe {
            libc::recv(
                sock,
                byte_buf.as_mut_ptr().cast(),
                byte_buf.len(),
                libc::MSG_PEEK,
            )
        };
        if n <= 0 {
            if n < 0 && std::io::Error::last_os_error().kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            close_fd(got_fd);
            return None;
        }
        let n = n as usize;
        let take = byte_buf[..n]
            .iter()
            .position(|&b| b == b'\n')
            .map_or(n, |i| i + 1);
        // Now consume exactly `take` bytes, with the fds that came with them.
        iov.iov_len = take;
        let mut control = [0u64; 8];
        // SAFETY: msghdr is plain data; zeroed is a valid empty header.
        let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        msg.msg_control = control.as_mut_ptr().cast();
        msg.msg_controllen = std::mem::size_of_val(&control);
        // SAFETY: live buffers.
        let m = unsafe { libc::recvmsg(sock, &mut msg, libc::MSG_CMSG_CLOEXEC) };
        if m <= 0 {
            close_fd(got_fd);
            return None;
        }
        // SAFETY: walking the control buffer the kernel filled.
        unsafe {
            let mut c = libc::CMSG_FIRSTHDR(&msg);
            while !c.is_null() {
                if (*c).cmsg_level == libc::SOL_SOCKET && (*c).cmsg_type == libc::SCM_RIGHTS {
                    let data = libc::CMSG_DATA(c).cast::<c_int>();
                    let count =
                        ((*c).cmsg_len - libc::CMSG_LEN(0) as usize) / std::mem::size_of::<c_int>();
                    for i in 0..count {
                        let fd = std::ptr::read_unaligned(data.add(i));
                        if got_fd.is_none() {
                            got_fd = Some(fd);
                        } else {
                            real_close(fd);
                        }
                    }
                }
                c = libc::CMSG_NXTHDR(&msg, c);
            }
        }
        line.extend_from_slice(&byte_buf[..m as usize]);
        if line.last() == Some(&b'\n') {
            line.pop();
            return Some((line, got_fd));
        }
        if line.len() > MAX_LINE {
            close_fd(got_fd);
            return None;
        }
    }
}

fn close_fd(fd: Option<c_int>) {
    if let Some(fd) = fd {
        // SAFETY: an fd this library received and owns.
        unsafe { real_close(fd) };
    }
}

fn reply_ok(line: &[u8]) -> bool {
    line.windows(9).any(|w| w == b"\"ok\":true")
}

/// The strings of the `"destinations":[...]` array, parsed as addresses.
fn parse_destinations(line: &[u8]) -> Vec<SocketAddr> {
    let text = String::from_utf8_lossy(line);
    let Some(start) = text.find("\"destinations\":[") else {
        return Vec::new();
    };
    let rest = &text[start + "\"destinations\":[".len()..];
    // Quoted strings until the closing bracket outside quotes (IPv6 has brackets inside).
    let mut out = Vec::new();
    let mut chars = rest.chars();
    while let Some(c) = chars.next() {
        match c {
            '"' => {
                let s: String = chars.by_ref().take_while(|&c| c != '"').collect();
                if let Ok(a) = s.parse() {
                    out.push(a);
                }
            }
            ']' => break,
            _ => {}
        }
    }
    out
}

fn open_agent() -> Option<Agent> {
    let path = &config().socket;
    // SAFETY: plain socket calls on a descriptor this function owns.
    unsafe {
        let fd = libc::socket(libc::AF_UNIX, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0);
        if fd < 0 {
            return None;
        }
        let mut addr: libc::sockaddr_un = std::mem::zeroed();
        addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
        if path.len() >= addr.sun_path.len() {
            real_close(fd);
            return None;
        }
        for (i, b) in path.iter().enumerate() {
            addr.sun_path[i] = *b as libc::c_char;
        }
        let len = std::mem::size_of::<libc::sa_family_t>() + path.len() + 1;
        if real_connect(
            fd,
            (&addr as *const libc::sockaddr_un).cast(),
            len as socklen_t,
        ) != 0
        {
            real_close(fd);
            return None;
        }
        // A hung agent must not hang the program: give up after 2 s.
        let tv = libc::timeval {
            tv_sec: 2,
            tv_usec: 0,
        };
        for opt in [libc::SO_RCVTIMEO, libc::SO_SNDTIMEO] {
            libc::setsockopt(
                fd,
                libc::SOL_SOCKET,
                opt,
                (&tv as *const libc::timeval).cast::<c_void>(),
                std::mem::size_of::<libc::timeval>() as socklen_t,
            );
        }
        if !send_line(fd, br#"{"op":"destinations"}"#, None) {
            real_close(fd);
            return None;
        }
        let destinations = match recv_line(fd) {
            Some((line, extra)) => {
                close_fd(extra);
                if reply_ok(&line) {
                    parse_destinations(&line)
                } else {
                    Vec::new()
                }
            }
            None => {
                real_close(fd);
                return None;
            }
        };
        Some(Agent {
            fd,
            pid: std::process::id(),
            destinations,
        })
    }
}

/// The agent, connected on first use (and again after a fork).
fn with_agent<T>(f: impl FnOnce(&mut Agent) -> Option<T>) -> Option<T> {
    let mut state = AGENT.lock().unwrap_or_else(PoisonError::into_inner);
    if let AgentState::Present(a) = &*state {
        if a.pid != std::process::id() {
            // A forked child shares the parent's agent socket: use its own.
            *state = AgentState::Unknown;
        }
    }
    if let AgentState::Unknown = &*state {
        *state = match open_agent() {
            Some(a) => {
                debug!(
                    "agent at {} pools {:?}",
                    String::from_utf8_lossy(&config().socket),
                    a.destinations
                );
                AgentState::Present(a)
            }
            None => {
                debug!(
                    "no agent at {}: plain connections",
                    String::from_utf8_lossy(&config().socket)
                );
                AgentState::Absent
            }
        };
    }
    match &mut *state {
        AgentState::Present(a) => {
            let r = f(a);
            if r.is_none() && a.fd < 0 {
                *state = AgentState::Absent;
            }
            r
        }
        _ => None,
    }
}

/// Asks for a warm connection to `dest`; `Some(fd)` of the received socket.
fn get_warm(dest: SocketAddr) -> Option<c_int> {
    with_agent(|a| {
        if !a.destinations.contains(&dest) {
            return None;
        }
        let req = format!(r#"{{"op":"get","dest":"{dest}"}}"#);
        if !send_line(a.fd, req.as_bytes(), None) {
            drop_agent(a);
            return None;
        }
        match recv_line(a.fd) {
            Some((line, Some(fd))) if reply_ok(&line) => Some(fd),
            Some((line, fd)) => {
                close_fd(fd);
                debug!("agent refused {dest}: {}", String::from_utf8_lossy(&line));
                None
            }
            None => {
                drop_agent(a);
                None
            }
        }
    })
}

fn drop_agent(a: &mut Agent) {
    // SAFETY: the library's own agent socket.
    unsafe { real_close(a.fd) };
    a.fd = -1;
}

/// Gives `fd` back to the agent (it dups it; the caller then closes ours).
fn put_warm(fd: c_int) {
    let _ = with_agent(|a| {
        if !send_line(a.fd, br#"{"op":"put"}"#, Some(fd)) {
            drop_agent(a);
            return None;
        }
        match recv_line(a.fd) {
            Some((line, extra)) => {
                close_fd(extra);
                debug!("gave back fd {fd}: {}", String::from_utf8_lossy(&line));
                Some(())
            }
            None => {
                drop_agent(a);
                None
            }
        }
    });
}

/// Another descriptor of this process on the same socket as `fd` (the
/// program dup'ed it), found through /proc/self/fd.
fn other_fd_on_same_socket(fd: c_int) -> Option<c_int> {
    let target = std::fs::read_link(format!("/proc/self/fd/{fd}")).ok()?;
    for entry in std::fs::read_dir("/proc/self/fd").ok()?.flatten() {
        let Some(other) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<c_int>().ok())
        else {
            continue;
        };
        if other != fd && std::fs::read_link(entry.path()).ok().as_ref() == Some(&target) {
            return Some(other);
        }
    }
    None
}

unsafe fn connect_impl(fd: c_int, addr: *const sockaddr, len: socklen_t) -> c_int {
    let mode = config().mode;
    if mode == Mode::Off {
        return real_connect(fd, addr, len);
    }
    let Some(dest) = sockaddr_to_std(addr, len) else {
        return real_connect(fd, addr, len);
    };
    if !is_stream_socket(fd) {
        return real_connect(fd, addr, len);
    }
    if mode == Mode::Passthrough {
        // The same lookups as reuse, minus the agent: the cost of interposing.
        let pooled = POOLED
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .iter()
            .any(|&(x, _)| x == fd);
        debug!("passthrough connect fd {fd} to {dest} (pooled: {pooled})");
        return real_connect(fd, addr, len);
    }
    let Some(warm) = get_warm(dest) else {
        return real_connect(fd, addr, len);
    };
    // Keep what the program set on its socket: blocking mode and close-on-exec.
    let flags = libc::fcntl(fd, libc::F_GETFL);
    let fd_flags = libc::fcntl(fd, libc::F_GETFD);
    if flags >= 0 {
        libc::fcntl(warm, libc::F_SETFL, flags);
    }
    let cloexec = if fd_flags >= 0 && fd_flags & libc::FD_CLOEXEC != 0 {
        libc::O_CLOEXEC
    } else {
        0
    };
    // dup3 puts the warm connection where the program's socket was (closing that one).
    if libc::dup3(warm, fd, cloexec) < 0 {
        put_warm(warm);
        real_close(warm);
        return real_connect(fd, addr, len);
    }
    real_close(warm);
    pooled_insert(fd);
    debug!("fd {fd} to {dest}: warm connection");
    0
}

unsafe fn close_impl(fd: c_int) -> c_int {
    if !pooled_remove(fd) {
        return real_close(fd);
    }
    if let Some(other) = other_fd_on_same_socket(fd) {
        // The program still holds the connection elsewhere: it goes back when that closes.
        pooled_insert(other);
        return real_close(fd);
    }
    put_warm(fd);
    real_close(fd)
}

/// # Safety
/// The C `connect(2)` contract.
#[no_mangle]
pub unsafe extern "C" fn connect(fd: c_int, addr: *const sockaddr, len: socklen_t) -> c_int {
    match catch_unwind(AssertUnwindSafe(|| connect_impl(fd, addr, len))) {
        Ok(rc) => rc,
        Err(_) => real_connect(fd, addr, len),
    }
}

/// # Safety
/// The C `close(2)` contract.
#[no_mangle]
pub unsafe extern "C" fn close(fd: c_int) -> c_int {
    match catch_unwind(AssertUnwindSafe(|| close_impl(fd))) {
        Ok(rc) => rc,
        Err(_) => real_close(fd),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replies_parse() {
        assert!(reply_ok(br#"{"ok":true,"local_port":4}"#));
        assert!(!reply_ok(br#"{"ok":false,"error":"no"}"#));
        assert_eq!(
            parse_destinations(br#"{"ok":true,"destinations":["10.0.0.1:80","[::1]:9"]}"#),
            vec![
                "10.0.0.1:80".parse::<SocketAddr>().unwrap(),
                "[::1]:9".parse().unwrap()
            ]
        );
        assert!(parse_destinations(br#"{"ok":true,"destinations":[]}"#).is_empty());
    }
}
