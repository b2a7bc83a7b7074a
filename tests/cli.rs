//! The `particle` binary end to end: the endpoint benchmark's JSON and its
//! promise that nothing is left behind.

mod common;

use std::process::Command;

fn particle() -> Command {
    Command::new(env!("CARGO_BIN_EXE_particle"))
}

#[test]
fn bench_endpoints_reports_every_method_and_leaks_nothing() {
    common::require_root();
    let out = particle()
        .args(["bench", "endpoints", "--count", "12", "--json"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["count"], 12);
    for key in [
        "ip_cmd_per_s",
        "ip_batch_per_s",
        "particle_per_s",
        "claim_p50_us",
        "claim_p99_us",
    ] {
        let v = report[key]
            .as_f64()
            .unwrap_or_else(|| panic!("{key} missing"));
        assert!(v > 0.0, "{key} = {v}");
    }
    assert_eq!(report["leaked"], 0, "{report}");
    assert_eq!(report["claim_misses"], 0, "{report}");
    // Each warm endpoint is one namespace with lo and eth0 inside and its
    // host end on the bridge; the census sees them all.
    let per = &report["pool_footprint"]["objects"];
    assert_eq!(per["namespaces"], 1.0, "{report}");
    assert_eq!(per["links"], 3.0, "{report}");
    assert!(
        report["pool_footprint"]["kernel_kib"].as_f64().is_some(),
        "{report}"
    );
}

#[test]
fn bad_arguments_are_refused() {
    let out = particle()
        .args(["bench", "endpoints", "--count", "0"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--count must be at least 1"));
    let out = particle()
        .args(["bench", "endpoints", "--count", "many"])
        .output()
        .unwrap();
    assert!(!out.status.success());
}
