//! An unmodified program (bash, with its `/dev/tcp` redirection: plain
//! socket + connect + close) accelerated by the preload library: its
//! connections to a pooled destination are the agent's warm connection.

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use particle_net::scratch::ScratchNode;
use particle_net::{AddressBlock, Endpoint, NetNs, Run};

use particle_node_agent::warm_connections::{WarmConfig, WarmDestination, WarmService};

/// Answers each line with `<client port> <connection number>`.
fn line_server(host: &Endpoint, port: u16) -> (SocketAddr, Arc<AtomicUsize>) {
    let addr = SocketAddr::new(host.address().ip().into(), port);
    let listener = host
        .netns()
        .run_in(|| TcpListener::bind(addr))
        .unwrap()
        .unwrap();
    let accepted = Arc::new(AtomicUsize::new(0));
    let count = accepted.clone();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(stream) = stream else { return };
            let n = count.fetch_add(1, Ordering::SeqCst) + 1;
            std::thread::spawn(move || {
                let port = stream.peer_addr().unwrap().port();
                let mut w = stream.try_clone().unwrap();
                for line in BufReader::new(stream).lines() {
                    if line.is_err() || w.write_all(format!("{port} {n}\n").as_bytes()).is_err() {
                        return;
                    }
                }
            });
        }
    });
    (addr, accepted)
}

/// Waits for the server's accept loop to count `n` connections (a handshake
/// completes in the kernel before accept() returns).
fn settle(accepted: &AtomicUsize, n: usize) {
    for _ in 0..200 {
        if accepted.load(Ordering::SeqCst) == n {
            return;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    assert_eq!(accepted.load(Ordering::SeqCst), n);
}

/// The library cargo built for these tests, next to the test binary.
fn library() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let dir = exe.parent().unwrap();
    for candidate in [
        dir.join("libparticle_preload.so"),
        dir.join("../libparticle_preload.so"),
    ] {
        if candidate.exists() {
            return candidate;
        }
    }
    panic!("libparticle_preload.so not found near {}", exe.display());
}

/// bash opens a connection, sends a line, prints the answer, closes.
const PROGRAM: &str = r#"exec 3<>"/dev/tcp/$1/$2" || exit 3
echo hello >&3
read -r answer <&3
echo "$answer"
exec 3<&-"#;

/// The same, but a forked subshell closes its inherited copy of the connection first.
const FORKING_PROGRAM: &str = r#"exec 3<>"/dev/tcp/$1/$2" || exit 3
( exec 3<&- )
echo hello >&3
read -r answer <&3
echo "$answer"
exec 3<&-"#;

/// Runs the program in `ns`; returns (client port, connection number) as the server saw them.
fn program(ns: &NetNs, dest: SocketAddr, env: &[(&str, &str)]) -> (u16, usize) {
    script(PROGRAM, ns, dest, env)
}

fn script(text: &str, ns: &NetNs, dest: SocketAddr, env: &[(&str, &str)]) -> (u16, usize) {
    let out = ns
        .command("bash")
        .args([
            "-c",
            text,
            "bash",
            &dest.ip().to_string(),
            &dest.port().to_string(),
        ])
        .envs(env.iter().copied())
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    let mut words = text.split_whitespace();
    match (words.next().map(str::parse), words.next().map(str::parse)) {
        (Some(Ok(port)), Some(Ok(n))) => (port, n),
        _ => panic!(
            "program failed: {out:?}\nstderr: {}",
            String::from_utf8_lossy(&out.stderr)
        ),
    }
}

#[test]
fn an_unmodified_program_gets_the_warm_connection_through_the_preload_library() {
    assert!(
        nix::unistd::geteuid().is_root(),
        "this test creates network namespaces and needs root; run the suite as root (see README)"
    );
    let run = Run::start().unwrap();
    let mut fabric =
        ScratchNode::new(run.prefix(), AddressBlock::parse("10.220.3.0/24").unwrap()).unwrap();
    let hosts = fabric.hosts(3).unwrap();
    let (dest, accepted) = line_server(&hosts[1], 18130);
    // The function's namespace: an endpoint on the same network, so the
    // program can also reach the server on its own.
    let function = hosts[2].netns();
    let socket = PathBuf::from(format!("/run/particle/test-{}-preload.sock", run.prefix()));
    let mut config = WarmConfig::new(socket.clone());
    config.destinations = vec![WarmDestination {
        addr: dest,
        tenants: vec!["a".into()],
    }];
    config.pool_size = 1;
    let tenants: HashMap<u64, String> = [(function.inode().unwrap(), "a".to_string())].into();
    let warm = WarmService::start(
        config,
        hosts[0].netns(),
        Arc::new(move |ino| tenants.get(&ino).cloned()),
    )
    .unwrap();
    assert!(warm.wait_ready(Duration::from_secs(10)));
    let warm_port = warm.idle_ports(dest)[0];
    settle(&accepted, 1);

    let lib = library();
    let lib = lib.to_str().unwrap();
    let sock = socket.to_str().unwrap();
    let preload = [
        ("LD_PRELOAD", lib),
        ("PARTICLE_WARM_SOCKET", sock),
        ("PARTICLE_PRELOAD_DEBUG", "1"),
    ];

    // Without the library: a new connection (and handshake) per run.
    let plain: Vec<_> = (0..2).map(|_| program(function, dest, &[])).collect();
    assert_ne!(plain[0].0, plain[1].0);
    settle(&accepted, 3);

    // With it: every run talks over the agent's connection, made beforehand.
    for _ in 0..3 {
        assert_eq!(program(function, dest, &preload), (warm_port, 1));
    }
    assert_eq!(
        accepted.load(Ordering::SeqCst),
        3,
        "a run connected by itself"
    );
    let s = warm.stats();
    assert_eq!((s.handed_out, s.returned_clean, s.lent), (3, 3, 0), "{s:?}");

    // A forked subshell that closes its inherited fd 3 leaves the parent's
    // connection alone. (bash keeps the connection on another fd by then, so
    // this does not reach the library's fork guard: that one is untested.)
    assert_eq!(
        script(FORKING_PROGRAM, function, dest, &preload),
        (warm_port, 1)
    );
    let s = warm.stats();
    assert_eq!(
        (s.handed_out, s.returned_clean, s.lent, s.refused),
        (4, 4, 0, 0),
        "{s:?}"
    );

    // The do-nothing mode intercepts but never asks the agent.
    let passthrough = [
        ("LD_PRELOAD", lib),
        ("PARTICLE_WARM_SOCKET", sock),
        ("PARTICLE_PRELOAD_MODE", "passthrough"),
    ];
    let (port, _) = program(function, dest, &passthrough);
    assert_ne!(port, warm_port);
    assert_eq!(warm.stats().handed_out, 4);

    // No agent: the real connect, and the program does not notice.
    let absent = [
        ("LD_PRELOAD", lib),
        ("PARTICLE_WARM_SOCKET", "/nonexistent/warm.sock"),
    ];
    let (port, _) = program(function, dest, &absent);
    assert_ne!(port, warm_port);

    // A destination that is not pooled is left alone.
    let (other, other_accepted) = line_server(&hosts[1], 18131);
    program(function, other, &preload);
    settle(&other_accepted, 1);
    assert_eq!(warm.stats().handed_out, 4);
    drop(warm);
    assert!(!Path::new(&socket).exists());
}
