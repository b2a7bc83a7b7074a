//! What a hostile tenant tries against the agent of its node, for the attack
//! tests (run inside real functions) and for trying an agent by hand. Prints
//! one line per attempt: `attack NAME VERDICT`.
//!
//! ```text
//! particle-hostile local-child SOCKET     # connect in a child that exits, then ask from the parent
//! particle-hostile local SOCKET REQUEST   # ask straight (a claim of another tenant's endpoints, say)
//! particle-hostile flood SOCKET N SECS    # hold N connections to SOCKET for SECS seconds
//! ```

use std::io::{BufRead, BufReader, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::process::ExitCode;
use std::time::Duration;

use nix::sys::socket::{connect, socket, AddressFamily, SockFlag, SockType, UnixAddr};

/// Sends one request line on `stream` and reads the answer line.
fn ask(stream: &UnixStream, request: &str) -> String {
    let mut line = request.to_string();
    line.push('\n');
    // A refusal may already be waiting even when the write fails: read it.
    let written = (&mut &*stream).write_all(line.as_bytes());
    let _ = stream.set_read_timeout(Some(Duration::from_secs(5)));
    let mut answer = String::new();
    match BufReader::new(stream).read_line(&mut answer) {
        Ok(0) => match written {
            Err(e) => format!("write failed: {e}"),
            Ok(()) => "closed".into(),
        },
        Ok(_) => answer.trim().to_string(),
        Err(e) => format!("read failed: {e}"),
    }
}

/// The race that passed the old caller check: the socket is connected by a
/// child that exits at once, so the pid the kernel recorded is gone when the
/// agent looks; the parent then talks on the socket.
fn local_child(path: &str) -> Result<String, String> {
    let fd: OwnedFd = socket(
        AddressFamily::Unix,
        SockType::Stream,
        SockFlag::SOCK_CLOEXEC,
        None,
    )
    .map_err(|e| e.to_string())?;
    let addr = UnixAddr::new(path).map_err(|e| e.to_string())?;
    // SAFETY: the child calls only connect and _exit (async-signal-safe).
    match unsafe { nix::unistd::fork() }.map_err(|e| e.to_string())? {
        nix::unistd::ForkResult::Child => {
            let ok = connect(fd.as_raw_fd(), &addr).is_ok();
            // SAFETY: ends the forked child without running destructors.
            unsafe { nix::libc::_exit(i32::from(!ok)) }
        }
        nix::unistd::ForkResult::Parent { child } => {
            nix::sys::wait::waitpid(child, None).map_err(|e| e.to_string())?;
        }
    }
    // SAFETY: the descriptor is ours; ownership moves into the stream.
    let stream = unsafe { UnixStream::from_raw_fd(std::os::fd::IntoRawFd::into_raw_fd(fd)) };
    Ok(ask(&stream, r#"{"op":"status"}"#))
}

fn flood(path: &str, n: usize, secs: u64) -> String {
    let mut held = Vec::with_capacity(n);
    let mut failed = 0;
    for _ in 0..n {
        match UnixStream::connect(path) {
            Ok(s) => held.push(s),
            Err(_) => failed += 1,
        }
    }
    std::thread::sleep(Duration::from_secs(secs));
    format!("held={} failed={failed}", held.len())
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let verdict = match args.iter().map(String::as_str).collect::<Vec<_>>()[..] {
        ["local-child", path] => local_child(path).map(|a| ("local-child", a)),
        ["local", path, request] => UnixStream::connect(path)
            .map(|s| ("local", ask(&s, request)))
            .map_err(|e| e.to_string()),
        ["flood", path, n, secs] => match (n.parse(), secs.parse()) {
            (Ok(n), Ok(secs)) => Ok(("flood", flood(path, n, secs))),
            _ => Err("flood SOCKET N SECS".into()),
        },
        _ => Err("usage: particle-hostile local-child|local|flood ...".into()),
    };
    match verdict {
        Ok((name, v)) => {
            println!("attack {name} {v}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            println!("attack error {e}");
            ExitCode::FAILURE
        }
    }
}
