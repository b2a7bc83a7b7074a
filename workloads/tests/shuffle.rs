//! The all-to-all exchange as real processes on loopback.

use std::path::Path;
use std::time::Duration;

use particle_workloads::local::{local_envs, run_local};
use particle_workloads::shuffle::{block, checksum};
use particle_workloads::timeline::{fields, parse_phases};

/// This test's loopback ports: 18310..18318.
const BASE_PORT: u16 = 18310;

#[test]
fn eight_functions_exchange_all_to_all_with_checksums() {
    let size = 8;
    let bytes = 256 * 1024;
    let seed = 42;
    let args: Vec<String> = [
        "shuffle",
        "--bytes",
        "262144",
        "--seed",
        "42",
        "--timeout-s",
        "60",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let envs = local_envs("shuffle-test", size, BASE_PORT, 2);
    let outputs = run_local(
        Path::new(env!("CARGO_BIN_EXE_particle-fn")),
        &args,
        &envs,
        Duration::from_secs(90),
    )
    .unwrap();
    for o in &outputs {
        assert!(
            o.succeeded(),
            "rank {}: {:?}\n{}{}",
            o.rank,
            o.status,
            o.stdout,
            o.stderr
        );
        let line = o
            .stdout
            .lines()
            .find(|l| l.starts_with("shuffle "))
            .unwrap_or_else(|| panic!("rank {} printed no summary:\n{}", o.rank, o.stdout));
        let f: std::collections::HashMap<&str, &str> = fields(line).collect();
        // What every other rank must have sent this one.
        let want = (0..size)
            .filter(|&from| from != o.rank)
            .fold(0u64, |x, from| {
                x ^ checksum(&block(seed, from, o.rank, bytes))
            });
        assert_eq!(f["received"], "7", "{line}");
        assert_eq!(f["bytes"], (7 * bytes).to_string(), "{line}");
        assert_eq!(f["checksum"], format!("{want:016x}"), "{line}");
        assert_eq!(f["nodes"], "2", "{line}");
        let phases = parse_phases(&o.stdout);
        assert_eq!(phases.len(), 1);
        assert!(phases[0].end_ns > phases[0].start_ns);
    }
}

#[test]
fn a_missing_function_fails_the_others_at_their_deadline() {
    // Rank 2 of 3 never starts: the others must fail, not hang or pass.
    let args: Vec<String> = ["shuffle", "--bytes", "100", "--timeout-s", "2"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    let envs = local_envs("shuffle-missing", 3, BASE_PORT + 8, 1);
    let outputs = run_local(
        Path::new(env!("CARGO_BIN_EXE_particle-fn")),
        &args,
        &envs[..2],
        Duration::from_secs(30),
    )
    .unwrap();
    for o in &outputs {
        assert!(o.status.is_some(), "rank {} hung past its timeout", o.rank);
        assert!(!o.succeeded(), "rank {} passed without rank 2", o.rank);
        assert!(o.stderr.contains("particle-fn:"), "{}", o.stderr);
    }
}
