//! Lines with file descriptors attached, over a Unix stream socket.
//!
//! The sender attaches at most one fd to a line, in the same `sendmsg` as the
//! line's first bytes; the receiver hands each line the fds that arrived with
//! its bytes. Extra fds (a confused or hostile peer) are closed, never leaked.

use std::collections::VecDeque;
use std::io::{self, IoSlice, IoSliceMut};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;

use nix::sys::socket::{recvmsg, sendmsg, ControlMessage, ControlMessageOwned, MsgFlags};

use particle_wire::warm::MAX_LINE;

/// One line and the fd that came with it.
#[derive(Debug)]
pub struct Line {
    pub bytes: Vec<u8>,
    pub fd: Option<OwnedFd>,
}

/// A Unix stream speaking lines with fds attached.
#[derive(Debug)]
pub struct FdLines {
    stream: UnixStream,
    buf: Vec<u8>,
    /// Received fds with the offset in `buf` of the bytes they came with.
    fds: VecDeque<(usize, OwnedFd)>,
}

impl FdLines {
    pub fn new(stream: UnixStream) -> Self {
        Self {
            stream,
            buf: Vec::new(),
            fds: VecDeque::new(),
        }
    }

    pub fn stream(&self) -> &UnixStream {
        &self.stream
    }

    /// Sends `line` (a newline is added) with `fd` attached.
    pub fn send(&mut self, line: &[u8], fd: Option<BorrowedFd<'_>>) -> io::Result<()> {
        let mut out = Vec::with_capacity(line.len() + 1);
        out.extend_from_slice(line);
        out.push(b'\n');
        let raw: Vec<RawFd> = fd.iter().map(|f| f.as_raw_fd()).collect();
        let rights = [ControlMessage::ScmRights(&raw)];
        let cmsgs: &[ControlMessage] = if raw.is_empty() { &[] } else { &rights };
        let mut sent = 0;
        while sent < out.len() {
            // The fd rides on the first sendmsg only.
            let c = if sent == 0 { cmsgs } else { &[] };
            match sendmsg::<()>(
                self.stream.as_raw_fd(),
                &[IoSlice::new(&out[sent..])],
                c,
                MsgFlags::MSG_NOSIGNAL,
                None,
            ) {
                Ok(n) => sent += n,
                Err(nix::errno::Errno::EINTR) => {}
                Err(e) => return Err(e.into()),
            }
        }
        Ok(())
    }

    /// The next line (without its newline); `None` at end of stream.
    pub fn recv(&mut self) -> io::Result<Option<Line>> {
        loop {
            if let Some(end) = self.buf.iter().position(|&b| b == b'\n') {
                return Ok(Some(self.take_line(end)));
            }
            if self.buf.len() > MAX_LINE {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("line longer than {MAX_LINE} bytes"),
                ));
            }
            let offset = self.buf.len();
            let mut chunk = [0u8; 1024];
            let mut space = nix::cmsg_space!([RawFd; 4]);
            let (n, fds) = {
                let mut iov = [IoSliceMut::new(&mut chunk)];
                let msg = match recvmsg::<()>(
                    self.stream.as_raw_fd(),
                    &mut iov,
                    Some(&mut space),
                    MsgFlags::MSG_CMSG_CLOEXEC,
                ) {
                    Ok(m) => m,
                    Err(nix::errno::Errno::EINTR) => continue,
                    Err(e) => return Err(e.into()),
                };
                let mut fds = Vec::new();
                // ENOBUFS: fds were cut off (MSG_CTRUNC); the line is unusable.
                for c in msg.cmsgs()? {
                    if let ControlMessageOwned::ScmRights(raw) = c {
                        for fd in raw {
                            // SAFETY: the kernel just installed this fd for us; nobody else owns it.
                            fds.push(unsafe { OwnedFd::from_raw_fd(fd) });
                        }
                    }
                }
                (msg.bytes, fds)
            };
            // A read ends with the bytes that carried its fds (the kernel stops
            // right after them), but may begin with an earlier line's: tag the
            // fds at the last byte read, which is in their own line.
            let at = offset + n.saturating_sub(1);
            self.fds.extend(fds.into_iter().map(|fd| (at, fd)));
            if n == 0 {
                return if self.buf.is_empty() {
                    Ok(None)
                } else {
                    Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "stream ended inside a line",
                    ))
                };
            }
            self.buf.extend_from_slice(&chunk[..n]);
        }
    }

    fn take_line(&mut self, end: usize) -> Line {
        let consumed = end + 1;
        let mut bytes: Vec<u8> = self.buf.drain(..consumed).collect();
        bytes.pop();
        let mut fd = None;
        while self.fds.front().is_some_and(|(at, _)| *at < consumed) {
            if let Some((_, f)) = self.fds.pop_front() {
                // A second fd on one line is not part of the protocol: dropped (closed).
                if fd.is_none() {
                    fd = Some(f);
                }
            }
        }
        for (at, _) in self.fds.iter_mut() {
            *at -= consumed;
        }
        Line { bytes, fd }
    }
}

impl AsFd for FdLines {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.stream.as_fd()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};

    #[test]
    fn a_line_carries_its_fd_and_only_its_fd() {
        let (a, b) = UnixStream::pair().unwrap();
        let (mut a, mut b) = (FdLines::new(a), FdLines::new(b));
        let (mut p, mut q) = UnixStream::pair().unwrap();
        a.send(b"first", Some(p.as_fd())).unwrap();
        a.send(b"second", None).unwrap();
        let first = b.recv().unwrap().unwrap();
        assert_eq!(first.bytes, b"first");
        let got = UnixStream::from(first.fd.unwrap());
        let second = b.recv().unwrap().unwrap();
        assert_eq!(second.bytes, b"second");
        assert!(second.fd.is_none());
        // The received fd is the same socket: bytes written to it reach q.
        (&got).write_all(b"x").unwrap();
        let mut one = [0u8; 1];
        q.read_exact(&mut one).unwrap();
        assert_eq!(&one, b"x");
        p.write_all(b"y").unwrap();
        drop(a);
        assert!(b.recv().unwrap().is_none());
    }
}

/// Bounded fuzzing (property tests, run by `cargo test`) of the line framing
/// every warm-protocol message arrives in.
#[cfg(test)]
mod fuzz {
    use super::*;
    use proptest::prelude::*;
    use proptest::test_runner::{Config, TestRunner};

    fn config(cases: u32) -> Config {
        Config {
            cases,
            // A bug found here becomes a plain test; no files in the tree.
            failure_persistence: None,
            ..Config::default()
        }
    }

    /// The line framing every message arrives in, over a real socket pair:
    /// any bytes; each line comes out whole, in order, with the fd sent on
    /// it and no other; a line longer than the limit is an error, not a
    /// buffer that grows without bound.
    #[test]
    fn lines_arrive_whole_with_their_fds() {
        let line = (
            prop_oneof![
                4 => prop::collection::vec(any::<u8>(), 0..64),
                1 => (MAX_LINE - 8..MAX_LINE + 2048).prop_map(|n| vec![b'x'; n]),
            ]
            .prop_map(|b| b.into_iter().filter(|&c| c != b'\n').collect::<Vec<u8>>()),
            prop::bool::weighted(0.3),
        );
        let lines = prop::collection::vec(line, 0..12);
        let attached = std::fs::File::open("/dev/null").unwrap();
        TestRunner::new(config(500))
            .run(&lines, |lines| {
                let (a, b) = UnixStream::pair().unwrap();
                let sent = lines.clone();
                let fd = attached.try_clone().unwrap();
                let writer = std::thread::spawn(move || {
                    let mut a = FdLines::new(a);
                    for (bytes, with_fd) in &sent {
                        // The reader may stop early (a line too long).
                        if a.send(bytes, with_fd.then(|| fd.as_fd())).is_err() {
                            break;
                        }
                    }
                });
                let mut b = FdLines::new(b);
                let mut got = Vec::new();
                let end = loop {
                    match b.recv() {
                        Ok(Some(line)) => got.push((line.bytes, line.fd.is_some())),
                        other => break other.map(|_| ()),
                    }
                };
                drop(b);
                writer.join().unwrap();
                prop_assert!(got.len() <= lines.len());
                for (i, (bytes, fd)) in got.iter().enumerate() {
                    prop_assert!(*bytes == lines[i].0, "line {i} changed");
                    prop_assert_eq!(*fd, lines[i].1, "line {} fd", i);
                    // The buffer is bounded: one read past the limit at most.
                    prop_assert!(bytes.len() <= MAX_LINE + 1024, "{}-byte line", bytes.len());
                }
                match end {
                    Ok(()) => prop_assert_eq!(got.len(), lines.len()),
                    Err(e) => {
                        // Only a line past the limit is refused.
                        prop_assert!(lines[got.len()].0.len() > MAX_LINE, "{e}");
                    }
                }
                Ok(())
            })
            .unwrap();
    }

    /// Found by `lines_arrive_whole_with_their_fds`: a line without an fd
    /// followed by one with an fd, read in one go, got the fd on the first.
    #[test]
    fn an_fd_is_not_given_to_the_line_before_its_own() {
        let (a, b) = UnixStream::pair().unwrap();
        let (mut a, mut b) = (FdLines::new(a), FdLines::new(b));
        let attached = std::fs::File::open("/dev/null").unwrap();
        a.send(b"plain", None).unwrap();
        a.send(b"with fd", Some(attached.as_fd())).unwrap();
        let first = b.recv().unwrap().unwrap();
        assert_eq!(
            (first.bytes.as_slice(), first.fd.is_some()),
            (&b"plain"[..], false)
        );
        let second = b.recv().unwrap().unwrap();
        assert_eq!(
            (second.bytes.as_slice(), second.fd.is_some()),
            (&b"with fd"[..], true)
        );
    }
}
