//! A minimal function that uses warm connections through the client API, for
//! tests and for trying an agent by hand. Prints one JSON object.
//!
//! ```text
//! particle-warm-fn SOCKET get DEST LINE [--read-bytes N]   # send LINE, read N bytes of reply (default: one line), give back
//! particle-warm-fn SOCKET channel PEER KEY SEND            # open the channel, send SEND + "\n", read one line back
//! particle-warm-fn SOCKET destinations
//! particle-warm-fn SOCKET redial DEST TARGET               # a hostile function: get DEST, disconnect, dial TARGET
//! ```

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::ExitCode;

use particle_net::warm::WarmClient;
use serde_json::json;

/// Reads up to and including the first newline, one byte at a time, so
/// whatever follows stays in the socket.
fn read_line_exact(s: &mut TcpStream) -> std::io::Result<String> {
    let mut out = Vec::new();
    let mut b = [0u8; 1];
    loop {
        if s.read(&mut b)? == 0 || b[0] == b'\n' {
            return Ok(String::from_utf8_lossy(&out).into_owned());
        }
        out.push(b[0]);
    }
}

fn run(args: &[String]) -> Result<serde_json::Value, String> {
    let err = |e: &dyn std::fmt::Display| e.to_string();
    let [socket, op, rest @ ..] = args else {
        return Err("usage: particle-warm-fn SOCKET get|channel|destinations ...".into());
    };
    let mut client = WarmClient::connect(socket).map_err(|e| err(&e))?;
    match (op.as_str(), rest) {
        ("destinations", []) => {
            let d = client.destinations().map_err(|e| err(&e))?;
            Ok(json!({ "destinations": d.iter().map(|a| a.to_string()).collect::<Vec<_>>() }))
        }
        ("get", [dest, line, more @ ..]) => {
            let dest: SocketAddr = dest.parse().map_err(|e| err(&e))?;
            let mut s = client.get(dest).map_err(|e| err(&e))?;
            let local_port = s.local_addr().map_err(|e| err(&e))?.port();
            s.write_all(format!("{line}\n").as_bytes())
                .map_err(|e| err(&e))?;
            let reply = match more {
                [flag, n] if flag == "--read-bytes" => {
                    let n: usize = n.parse().map_err(|e| err(&e))?;
                    let mut buf = vec![0u8; n];
                    s.read_exact(&mut buf).map_err(|e| err(&e))?;
                    String::from_utf8_lossy(&buf).into_owned()
                }
                [] => read_line_exact(&mut s).map_err(|e| err(&e))?,
                _ => return Err("get DEST LINE [--read-bytes N]".into()),
            };
            // Let a reply still on its way land before the agent looks.
            std::thread::sleep(std::time::Duration::from_millis(50));
            let put = client.put(s).map_err(|e| err(&e))?;
            Ok(json!({
                "local_port": local_port,
                "reply": reply,
                "pooled": put.pooled,
                "reason": put.reason,
            }))
        }
        ("channel", [peer, key, send]) => {
            let peer: SocketAddr = peer.parse().map_err(|e| err(&e))?;
            let mut s = client.channel(peer, key).map_err(|e| err(&e))?;
            let local_port = s.local_addr().map_err(|e| err(&e))?.port();
            s.write_all(format!("{send}\n").as_bytes())
                .map_err(|e| err(&e))?;
            let got = read_line_exact(&mut s).map_err(|e| err(&e))?;
            Ok(json!({ "local_port": local_port, "got": got }))
        }
        ("redial", [dest, target]) => {
            let dest: SocketAddr = dest.parse().map_err(|e| err(&e))?;
            let target: SocketAddr = target.parse().map_err(|e| err(&e))?;
            let s = client.get(dest).map_err(|e| err(&e))?;
            Ok(json!({ "redial": redial(&s, target) }))
        }
        _ => Err(format!("unknown operation {op:?} or wrong arguments")),
    }
}

/// Disconnects a lent socket (`connect(AF_UNSPEC)`) and dials `target`
/// with it: what a hostile function tries to get out of its overlay.
fn redial(s: &TcpStream, target: SocketAddr) -> String {
    use nix::libc;
    use std::os::fd::AsRawFd;
    let unspec = libc::sockaddr {
        sa_family: libc::AF_UNSPEC as libc::sa_family_t,
        sa_data: [0; 14],
    };
    // SAFETY: a valid sockaddr of the size given.
    let rc = unsafe {
        libc::connect(
            s.as_raw_fd(),
            &unspec,
            std::mem::size_of::<libc::sockaddr>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        return format!("disconnect failed: {}", std::io::Error::last_os_error());
    }
    let target = nix::sys::socket::SockaddrStorage::from(target);
    match nix::sys::socket::connect(s.as_raw_fd(), &target) {
        Ok(()) => "connected".into(),
        Err(e) => format!("failed: {e}"),
    }
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match run(&args) {
        Ok(v) => {
            println!("{v}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            println!("{}", json!({ "error": e }));
            ExitCode::FAILURE
        }
    }
}
