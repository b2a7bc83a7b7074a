//! Warm connections for real: an agent's warm pool in a simulated host, a
//! server on another, functions as separate processes in their own network
//! namespaces asking over the Unix socket (their tenant found from the
//! kernel, SO_PEERCRED -> /proc/PID/ns/net).

mod common;

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use particle_net::warm::{WarmClient, WarmError};
use particle_net::{Endpoint, NetNs, Run};
use particle_node_agent::warm_connections::{TenantOf, WarmConfig, WarmDestination, WarmService};
use serde_json::Value;

const WAIT: Duration = Duration::from_secs(10);

/// A line server on a simulated host: answers each line with
/// `<client port> <connection number> <line>`; `twice` gets two lines back,
/// `bye` gets its answer and then the connection closes.
struct LineServer {
    addr: SocketAddr,
    accepted: Arc<AtomicUsize>,
}

fn line_server(host: &Endpoint, port: u16) -> LineServer {
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
                    let Ok(line) = line else { return };
                    let answer = format!("{port} {n} {line}\n");
                    let out = match line.as_str() {
                        "twice" => format!("{answer}{answer}"),
                        _ => answer,
                    };
                    if w.write_all(out.as_bytes()).is_err() || line == "bye" {
                        return;
                    }
                }
            });
        }
    });
    LineServer { addr, accepted }
}

fn socket_path(run: &Run, name: &str) -> PathBuf {
    PathBuf::from(format!("/run/particle/test-{}-{name}.sock", run.prefix()))
}

/// Tenants by namespace, as `local_api::Claims` knows them in the daemon.
fn tenants(map: &[(&NetNs, &str)]) -> TenantOf {
    let map: HashMap<u64, String> = map
        .iter()
        .map(|(ns, t)| (ns.inode().unwrap(), t.to_string()))
        .collect();
    Arc::new(move |ino| map.get(&ino).cloned())
}

/// Runs the client-API function in `ns`, as its own process.
fn function(ns: &NetNs, socket: &std::path::Path, args: &[&str]) -> Value {
    let out = ns
        .command(env!("CARGO_BIN_EXE_particle-warm-fn"))
        .arg(socket)
        .args(args)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    serde_json::from_str(text.trim()).unwrap_or_else(|e| panic!("{e}: {text:?} {out:?}"))
}

fn port_of(v: &Value) -> u64 {
    v["local_port"]
        .as_u64()
        .unwrap_or_else(|| panic!("no connection: {v}"))
}

#[test]
fn functions_share_one_warm_connection_and_dirty_ones_are_closed() {
    let (run, mut fabric) = common::fabric("10.220.1.0/24");
    let hosts = fabric.hosts(2).unwrap();
    let server = line_server(&hosts[1], 18101);
    let fn_a = NetNs::create().unwrap();
    let fn_b = NetNs::create().unwrap();
    let socket = socket_path(&run, "warm");
    let mut config = WarmConfig::new(socket.clone());
    config.destinations = vec![WarmDestination {
        addr: server.addr,
        tenants: vec!["a".into()],
    }];
    config.pool_size = 1;
    config.max_idle = 1;
    let warm = WarmService::start(
        config,
        hosts[0].netns(),
        tenants(&[(&fn_a, "a"), (&fn_b, "b")]),
    )
    .unwrap();
    assert!(warm.wait_ready(WAIT), "{:?}", warm.stats());
    let dest = server.addr.to_string();

    // Two functions one after the other get the same connection, established
    // (they exchange data on it), and the server saw one connection only.
    let first = function(&fn_a, &socket, &["get", &dest, "hello"]);
    let port = port_of(&first);
    assert_eq!(first["reply"], format!("{port} 1 hello"), "{first}");
    assert_eq!(first["pooled"], true, "{first}");
    let second = function(&fn_a, &socket, &["get", &dest, "again"]);
    assert_eq!(port_of(&second), port, "{second}");
    assert_eq!(second["reply"], format!("{port} 1 again"), "{second}");
    // Every connection the server saw was the agent's: one, made beforehand.
    assert_eq!(server.accepted.load(Ordering::SeqCst), 1);
    assert_eq!(warm.stats().connects, 1);
    let s = warm.stats();
    assert_eq!(
        (s.handed_out, s.reused, s.returned_clean),
        (2, 1, 2),
        "{s:?}"
    );

    // A function that leaves a reply unread: the agent closes that connection
    // and the next function gets a new one.
    let dirty = function(&fn_a, &socket, &["get", &dest, "twice"]);
    assert_eq!(port_of(&dirty), port);
    assert_eq!(dirty["pooled"], false, "{dirty}");
    assert!(
        dirty["reason"].as_str().unwrap().contains("unread"),
        "{dirty}"
    );
    assert!(warm.wait_ready(WAIT));
    let fresh = function(&fn_a, &socket, &["get", &dest, "hi"]);
    let fresh_port = port_of(&fresh);
    assert_ne!(fresh_port, port, "a dirty connection was handed out again");
    assert_eq!(fresh["reply"], format!("{fresh_port} 2 hi"), "{fresh}");

    // The server hangs up after answering: not established any more, closed.
    let closed = function(&fn_a, &socket, &["get", &dest, "bye"]);
    assert_eq!(closed["pooled"], false, "{closed}");
    let reason = closed["reason"].as_str().unwrap();
    assert!(
        reason.contains("not established") || reason.contains("peer closed"),
        "{closed}"
    );
    let s = warm.stats();
    assert_eq!(s.returned_dirty, 2, "{s:?}");

    // Tenant b may not use the destination; a process that is no function at
    // all (this test, in the machine's namespace) gets nothing either.
    let refused = function(&fn_b, &socket, &["get", &dest, "x"]);
    assert!(
        refused["error"]
            .as_str()
            .unwrap()
            .contains("tenant \"b\" may not use"),
        "{refused}"
    );
    let listed = function(&fn_b, &socket, &["destinations"]);
    assert_eq!(listed["destinations"], serde_json::json!([]));
    let listed = function(&fn_a, &socket, &["destinations"]);
    assert_eq!(listed["destinations"], serde_json::json!([dest]));
    let mut outsider = WarmClient::connect(&socket).unwrap();
    match outsider.get(server.addr) {
        Err(WarmError::Refused(e)) => assert!(e.contains("not in an endpoint"), "{e}"),
        other => panic!("{other:?}"),
    }
    // Nobody can slip a socket of its own into the pool.
    let own = hosts[0]
        .netns()
        .run_in(|| TcpStream::connect(server.addr))
        .unwrap()
        .unwrap();
    match outsider.put(own) {
        Err(WarmError::Refused(e)) => {
            assert!(e.contains("not a connection this agent lent"), "{e}")
        }
        other => panic!("{other:?}"),
    }

    // Stopping the service closes its connections and removes its socket.
    drop(warm);
    assert!(!socket.exists());
}

#[test]
fn functions_on_two_nodes_get_the_ends_of_one_warm_channel() {
    let (run, mut fabric) = common::fabric("10.220.2.0/24");
    let hosts = fabric.hosts(2).unwrap();
    let f1 = NetNs::create().unwrap();
    let f2 = NetNs::create().unwrap();
    let f3 = NetNs::create().unwrap();
    let listen: Vec<SocketAddr> = hosts
        .iter()
        .map(|h| SocketAddr::new(h.address().ip().into(), 18120))
        .collect();
    let sockets = [socket_path(&run, "chan0"), socket_path(&run, "chan1")];
    let start = |i: usize, tenants: TenantOf| {
        let mut config = WarmConfig::new(sockets[i].clone());
        config.listen = Some(listen[i]);
        config.peers = vec![listen[1 - i]];
        config.pool_size = 2;
        config.max_idle = 2;
        config.channel_timeout = Duration::from_secs(2);
        config.probe_every = Some(Duration::from_millis(200));
        config.probe_bytes = 32 * 1024;
        config.slow_start_after_idle_off = true;
        WarmService::start(config, hosts[i].netns(), tenants).unwrap()
    };
    let a = start(0, tenants(&[(&f1, "a")]));
    let b = start(1, tenants(&[(&f2, "a"), (&f3, "b")]));
    assert!(a.wait_ready(WAIT) && b.wait_ready(WAIT));
    // Probes keep the idle agent-to-agent connections in use.
    std::thread::sleep(Duration::from_millis(600));
    assert!(a.stats().probes > 0, "{:?}", a.stats());
    // The agent owns its node's namespace: slow start after idle is off there.
    let sysctl = hosts[0]
        .netns()
        .run_in(|| std::fs::read_to_string("/proc/sys/net/ipv4/tcp_slow_start_after_idle"))
        .unwrap()
        .unwrap();
    assert_eq!(sysctl.trim(), "0");

    let premade = a.idle_ports(listen[1]);
    let (lo, hi) = (listen[0].to_string(), listen[1].to_string());
    let s1 = sockets[0].clone();
    let one = std::thread::spawn(move || function(&f1, &s1, &["channel", &hi, "job1/0-1", "ping"]));
    let two = function(&f2, &sockets[1], &["channel", &lo, "job1/0-1", "pong"]);
    let one = one.join().unwrap();
    assert_eq!(one["got"], "pong", "{one}");
    assert_eq!(two["got"], "ping", "{two}");
    // The channel ran on a connection the agents had made before: no handshake.
    assert!(
        premade.contains(&(port_of(&one) as u16)),
        "{one} {premade:?}"
    );
    assert!(a.stats().channels >= 1 && b.stats().channels >= 1);

    // A function of another tenant cannot pick up tenant a's channel end.
    let s1 = sockets[0].clone();
    let f1 = NetNs::create().unwrap();
    let a2 = {
        drop(a);
        start(0, tenants(&[(&f1, "a")]))
    };
    assert!(a2.wait_ready(WAIT));
    let hi = listen[1].to_string();
    let one = std::thread::spawn(move || function(&f1, &s1, &["channel", &hi, "job2", "x"]));
    let intruder = function(
        &f3,
        &sockets[1],
        &["channel", &listen[0].to_string(), "job2", "y"],
    );
    assert!(
        intruder["error"]
            .as_str()
            .unwrap()
            .contains("did not arrive"),
        "{intruder}"
    );
    // The rightful end's peer never shows up: its read ends when the agents stop.
    drop(b);
    drop(a2);
    let _ = one.join();
}

/// A hostile function with a lent connection: it disconnects the socket and
/// dials somewhere else the node can reach (here another server on the
/// underlay, standing in for the controller). The first SYN is reset: lent
/// sockets reach only pooled destinations. Before pinning, it connected.
#[test]
fn a_lent_connection_cannot_be_redialled_elsewhere() {
    let (run, mut fabric) = common::fabric("10.220.3.0/24");
    let hosts = fabric.hosts(2).unwrap();
    let server = line_server(&hosts[1], 18301);
    let elsewhere = line_server(&hosts[1], 18302);
    let fn_a = NetNs::create().unwrap();
    let socket = socket_path(&run, "redial");
    let mut config = WarmConfig::new(socket.clone());
    config.destinations = vec![WarmDestination {
        addr: server.addr,
        tenants: vec!["a".into()],
    }];
    config.pool_size = 1;
    config.max_idle = 1;
    let warm = WarmService::start(config, hosts[0].netns(), tenants(&[(&fn_a, "a")])).unwrap();
    assert!(warm.wait_ready(WAIT), "{:?}", warm.stats());
    let out = function(
        &fn_a,
        &socket,
        &[
            "redial",
            &server.addr.to_string(),
            &elsewhere.addr.to_string(),
        ],
    );
    let verdict = out["redial"].as_str().unwrap_or_default();
    assert!(verdict.starts_with("failed"), "{out}");
    assert_eq!(elsewhere.accepted.load(Ordering::SeqCst), 0);
    // The node itself still reaches it: only the lent sockets are pinned.
    let own = hosts[0]
        .netns()
        .run_in(|| TcpStream::connect(elsewhere.addr))
        .unwrap();
    assert!(own.is_ok(), "{own:?}");
    drop(warm);
    // Its rules go with it.
    let rules = hosts[0]
        .netns()
        .command("iptables")
        .arg("-S")
        .output()
        .unwrap();
    let rules = String::from_utf8_lossy(&rules.stdout);
    assert!(!rules.contains("PT-WARM"), "{rules}");
}

/// Something that dials an agent's warm port without the agents' hello (a
/// function with a re-dialled socket, a stranger) is cut off before it can
/// bind itself into any channel.
#[test]
fn a_warm_peer_connection_without_the_hello_is_closed() {
    use std::io::Read;
    let (run, mut fabric) = common::fabric("10.220.4.0/24");
    let hosts = fabric.hosts(2).unwrap();
    let listen = SocketAddr::new(hosts[0].address().ip().into(), 18401);
    let mut config = WarmConfig::new(socket_path(&run, "hello"));
    config.listen = Some(listen);
    config.peer_token = "the-cluster-token".into();
    let _warm = WarmService::start(config, hosts[0].netns(), tenants(&[])).unwrap();
    let bind = br#"{"tenant":"b","key":"job1/0-1"}"#;
    let mut frame =
        particle_wire::warm::frame_header(particle_wire::warm::FRAME_BIND, bind.len()).to_vec();
    frame.extend_from_slice(bind);
    for first in [frame.clone(), {
        let mut wrong =
            particle_wire::warm::frame_header(particle_wire::warm::FRAME_HELLO, 5).to_vec();
        wrong.extend_from_slice(b"guess");
        wrong
    }] {
        let mut s = hosts[1]
            .netns()
            .run_in(|| TcpStream::connect(listen))
            .unwrap()
            .unwrap();
        s.write_all(&first).unwrap();
        let _ = s.write_all(&frame);
        s.set_read_timeout(Some(WAIT)).unwrap();
        let mut b = [0u8; 1];
        let closed = matches!(s.read(&mut b), Ok(0) | Err(_));
        assert!(closed, "the agent kept a connection that did not say hello");
    }
}
