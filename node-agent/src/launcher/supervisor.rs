//! The supervisor side of the built-in launcher: what the agent's forked
//! child does for the function outside its namespaces (writes, waits,
//! cleans up). Raw system calls and stack buffers only: it runs between
//! fork and exec of a multi-threaded process.

use std::ffi::CString;

use nix::libc;

/// Writes `data` to the file at the NUL-terminated `path`; the errno on failure.
pub(super) fn write_file(path: &[u8], data: &[u8]) -> Result<(), i32> {
    // SAFETY: `path` ends with NUL; plain open/write/close.
    unsafe {
        let fd = libc::open(path.as_ptr().cast(), libc::O_WRONLY | libc::O_CLOEXEC);
        if fd < 0 {
            return Err(*libc::__errno_location());
        }
        let n = libc::write(fd, data.as_ptr().cast(), data.len());
        let err = *libc::__errno_location();
        libc::close(fd);
        if n != data.len() as isize {
            return Err(if n < 0 { err } else { libc::EIO });
        }
    }
    Ok(())
}

/// `n` in decimal into `buf`; its length.
pub(super) fn decimal(buf: &mut [u8; 12], mut n: u32) -> usize {
    let mut tmp = [0u8; 12];
    let mut len = 0;
    loop {
        tmp[len] = b'0' + (n % 10) as u8;
        len += 1;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    for i in 0..len {
        buf[i] = tmp[len - 1 - i];
    }
    len
}

/// `/proc/PID/FILE` with a NUL into `buf`; its length without the NUL.
pub(super) fn proc_path(buf: &mut [u8; 48], pid: libc::pid_t, file: &[u8]) -> usize {
    let mut digits = [0u8; 12];
    let n = decimal(&mut digits, pid as u32);
    let mut len = 0;
    for part in [&b"/proc/"[..], &digits[..n], b"/", file, b"\0"] {
        buf[len..len + part.len()].copy_from_slice(part);
        len += part.len();
    }
    len - 1
}

/// The supervisor: lets go of the agent's descriptors (among them the pipe
/// through which the agent learns whether exec succeeded), waits for the
/// function and exits with its status. Never returns. If the agent dies
/// first (crash, SIGKILL), it kills the function and exits: a parent-death
/// signal cannot do this, since it fires when the agent's *thread* that
/// forked us ends, and tokio ends idle blocking threads. Then it removes the
/// function's cgroup (and the agent's, if it was the last), which the dead
/// agent no longer can.
pub(super) fn supervise(pid: libc::pid_t, agent: libc::pid_t, cgroups: &[CString]) -> ! {
    // SAFETY: raw syscalls only; `_exit` skips atexit handlers and destructors.
    unsafe {
        libc::syscall(libc::SYS_close_range, 3u32, u32::MAX, 0u32);
        let agent_fd = libc::syscall(libc::SYS_pidfd_open, agent, 0u32) as libc::c_int;
        let function_fd = libc::syscall(libc::SYS_pidfd_open, pid, 0u32) as libc::c_int;
        // Re-parented already (the agent died before we looked): give up.
        let mut orphaned = agent_fd < 0 || libc::getppid() != agent;
        if orphaned {
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
                    orphaned = true;
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
        if orphaned {
            for dir in cgroups {
                libc::rmdir(dir.as_ptr());
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_and_numbers_without_allocation() {
        let mut buf = [0u8; 12];
        for n in [0u32, 7, 10, 4_194_304, u32::MAX] {
            let len = decimal(&mut buf, n);
            assert_eq!(&buf[..len], n.to_string().as_bytes());
        }
        let mut path = [0u8; 48];
        let len = proc_path(&mut path, 4_194_304, b"uid_map");
        assert_eq!(&path[..len], b"/proc/4194304/uid_map");
        assert_eq!(path[len], 0);
    }
}
