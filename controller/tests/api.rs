//! Drives the real server over loopback with a minimal HTTP/1.1 client.

mod common;

use std::time::{Duration, Instant};

use common::*;
use particle_wire::api::{ApiError, Node, NodeOverlay, Tenant};

#[tokio::test]
async fn tenant_crud() {
    let s = start(Opts::default()).await;
    assert!(tenants(s.addr).await.is_empty());
    let t = create_tenant(s.addr, "red", 100, "10.1.0.0/16").await;
    assert_eq!(t.block_prefix, 24);
    assert!(t.blocks.is_empty());
    let r = call(
        s.addr,
        "POST",
        "/v1/tenants",
        r#"{"name":"blue","vni":101,"subnet":"10.2.0.0/16","block_prefix":26}"#,
    )
    .await;
    assert_eq!(r.status, 201);
    assert_eq!(r.json::<Tenant>().block_prefix, 26);

    let list = tenants(s.addr).await;
    let names: Vec<_> = list.iter().map(|t| t.name.as_str()).collect();
    assert_eq!(names, ["blue", "red"]);
    let r = call(s.addr, "GET", "/v1/tenants/red", "").await;
    assert_eq!(r.status, 200);
    assert_eq!(r.json::<Tenant>(), t);

    let r = call(s.addr, "DELETE", "/v1/tenants/red", "").await;
    assert_eq!(r.status, 204);
    call(s.addr, "GET", "/v1/tenants/red", "")
        .await
        .expect_error(404);
    assert_eq!(tenants(s.addr).await.len(), 1);
    // The freed VNI and subnet can be used again.
    create_tenant(s.addr, "green", 100, "10.1.0.0/16").await;

    let r = raw(s.addr, "GET", "/healthz", None, "").await;
    assert_eq!((r.status, r.body.as_str()), (200, "ok"));
}

#[tokio::test]
async fn blocks_are_assigned_both_ways_and_overlays_list_other_nodes() {
    let s = start(Opts::default()).await;
    let o1 = register(s.addr, "n1", "192.168.1.1").await;
    assert!(o1.tenants.is_empty());
    // Tenant creation gives the existing node a block.
    let t = create_tenant(s.addr, "red", 100, "10.1.0.0/16").await;
    assert_eq!(t.blocks["n1"], "10.1.0.0/24");
    // Registration gives the new node a block of the existing tenant.
    let o2 = register(s.addr, "n2", "192.168.1.2").await;
    assert_eq!(o2.tenants.len(), 1);
    assert_eq!(o2.tenants[0].vni, 100);
    assert_eq!(o2.tenants[0].local_block, "10.1.1.0/24");
    let remotes: Vec<_> = o2.tenants[0]
        .remotes
        .iter()
        .map(|r| (r.node.as_str(), r.underlay_ip.to_string(), r.block.as_str()))
        .collect();
    assert_eq!(remotes, [("n1", "192.168.1.1".to_string(), "10.1.0.0/24")]);
    register(s.addr, "n3", "192.168.1.3").await;

    let o1: NodeOverlay = overlay(s.addr, "n1", 0).await.json();
    assert_eq!(o1.node, "n1");
    assert_eq!(o1.tenants[0].local_block, "10.1.0.0/24");
    let others: Vec<_> = o1.tenants[0]
        .remotes
        .iter()
        .map(|r| r.node.as_str())
        .collect();
    assert_eq!(others, ["n2", "n3"]);

    let t: Tenant = call(s.addr, "GET", "/v1/tenants/red", "").await.json();
    assert_eq!(t.blocks.len(), 3);
    let nodes: Vec<Node> = call(s.addr, "GET", "/v1/nodes", "").await.json();
    assert_eq!(nodes.len(), 3);

    // Re-registering the same node is idempotent: same block, no new version.
    let v = version(s.addr).await;
    let again = register(s.addr, "n2", "192.168.1.2").await;
    assert_eq!(again.tenants[0].local_block, "10.1.1.0/24");
    assert_eq!(again.version, v);
    // Another name on the same underlay ip is a conflict.
    call(
        s.addr,
        "POST",
        "/v1/agents/register",
        r#"{"node":"n9","underlay_ip":"192.168.1.2"}"#,
    )
    .await
    .expect_error(409);
    assert_eq!(version(s.addr).await, v);

    // Heartbeats feed the pool metric.
    assert_eq!(heartbeat(s.addr, "n1").await.status, 204);
    // Metrics name tenants and their pools: not for strangers.
    assert_eq!(raw(s.addr, "GET", "/metrics", None, "").await.status, 401);
    let metrics = raw(s.addr, "GET", "/metrics", Some(TOKEN), "").await;
    assert_eq!(metrics.status, 200);
    for needle in [
        "particle_controller_nodes 3",
        "particle_controller_tenants 1",
        "particle_controller_requests_total{status=\"200\"}",
        "particle_controller_pool_ready{node=\"n1\",tenant=\"red\"} 5",
    ] {
        assert!(
            metrics.body.contains(needle),
            "{needle} in\n{}",
            metrics.body
        );
    }
}

#[tokio::test]
async fn long_poll_answers_at_once_when_behind_and_waits_for_a_change() {
    let s = start(Opts::default()).await;
    register(s.addr, "n1", "192.168.1.1").await;
    let v = version(s.addr).await;
    assert!(v > 0);

    // Behind: immediate.
    let t0 = Instant::now();
    let o: NodeOverlay = overlay(s.addr, "n1", v - 1).await.json();
    assert_eq!(o.version, v);
    assert!(t0.elapsed() < Duration::from_millis(500));

    // Current: waits until something changes.
    let addr = s.addr;
    let poll = tokio::spawn(async move {
        let t0 = Instant::now();
        let r = overlay(addr, "n1", v).await;
        (r, t0.elapsed())
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!poll.is_finished(), "long poll answered without a change");
    create_tenant(s.addr, "red", 100, "10.1.0.0/16").await;
    let (r, waited) = tokio::time::timeout(Duration::from_secs(1), poll)
        .await
        .unwrap()
        .unwrap();
    let o: NodeOverlay = r.json();
    assert!(o.version > v);
    assert_eq!(o.tenants[0].name, "red");
    assert!(waited >= Duration::from_millis(300), "{waited:?}");

    // Unknown node: 404.
    overlay(s.addr, "ghost", 0).await.expect_error(404);
}

#[tokio::test]
async fn long_poll_gives_up_after_the_configured_max() {
    let s = start(Opts {
        long_poll_max: Duration::from_millis(300),
        ..Opts::default()
    })
    .await;
    register(s.addr, "n1", "192.168.1.1").await;
    let v = version(s.addr).await;
    let t0 = Instant::now();
    let o: NodeOverlay = overlay(s.addr, "n1", v).await.json();
    let waited = t0.elapsed();
    assert_eq!(o.version, v);
    assert!(
        waited >= Duration::from_millis(300) && waited < Duration::from_secs(1),
        "{waited:?}"
    );
}

#[tokio::test]
async fn a_silent_node_leaves_the_others_overlay_within_the_timeout() {
    let timeout = Duration::from_millis(300);
    let s = start(Opts {
        heartbeat_timeout: timeout,
        ..Opts::default()
    })
    .await;
    create_tenant(s.addr, "red", 100, "10.1.0.0/16").await;
    register(s.addr, "alive", "192.168.1.1").await;
    register(s.addr, "silent", "192.168.1.2").await;
    let o: NodeOverlay = overlay(s.addr, "alive", 0).await.json();
    assert_eq!(o.tenants[0].remotes.len(), 1);

    let t0 = Instant::now();
    let bound = timeout + Duration::from_millis(500);
    let removed_after = loop {
        assert_eq!(heartbeat(s.addr, "alive").await.status, 204);
        let o: NodeOverlay = overlay(s.addr, "alive", 0).await.json();
        if o.tenants[0].remotes.is_empty() {
            break t0.elapsed();
        }
        assert!(
            t0.elapsed() < bound + Duration::from_millis(400),
            "silent node still listed"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(removed_after >= timeout, "{removed_after:?}");
    // Its heartbeats are now refused: it must register again.
    heartbeat(s.addr, "silent").await.expect_error(404);
    let nodes: Vec<Node> = call(s.addr, "GET", "/v1/nodes", "").await.json();
    assert_eq!(nodes.len(), 1);
    let t: Tenant = call(s.addr, "GET", "/v1/tenants/red", "").await.json();
    assert_eq!(t.blocks.keys().collect::<Vec<_>>(), ["alive"]);
}

#[tokio::test]
async fn state_survives_a_restart() {
    let file = temp_state_file("restart");
    let opts = || Opts {
        state_file: Some(file.clone()),
        ..Opts::default()
    };
    let s = start(opts()).await;
    register(s.addr, "n1", "192.168.1.1").await;
    register(s.addr, "n2", "192.168.1.2").await;
    create_tenant(s.addr, "red", 100, "10.1.0.0/16").await;
    create_tenant(s.addr, "blue", 200, "10.2.0.0/16").await;
    let before = tenants(s.addr).await;
    let v = version(s.addr).await;
    let overlay_before: NodeOverlay = overlay(s.addr, "n2", 0).await.json();
    drop(s);
    tokio::time::sleep(Duration::from_millis(50)).await;

    let s = start(opts()).await;
    assert_eq!(tenants(s.addr).await, before);
    assert_eq!(version(s.addr).await, v);
    let overlay_after: NodeOverlay = overlay(s.addr, "n2", 0).await.json();
    assert_eq!(overlay_after, overlay_before);
    // Restored nodes are live (grace period) and keep their blocks.
    assert_eq!(heartbeat(s.addr, "n1").await.status, 204);
    // A new node gets a block not held by a restored one.
    let o3 = register(s.addr, "n3", "192.168.1.3").await;
    let red = o3.tenants.iter().find(|t| t.name == "red").unwrap();
    assert_eq!(red.local_block, "10.1.2.0/24");
    let _ = std::fs::remove_dir_all(file.parent().unwrap());
}

#[tokio::test]
async fn bad_requests_get_4xx_with_error_body_and_change_nothing() {
    let file = temp_state_file("bad");
    let s = start(Opts {
        state_file: Some(file.clone()),
        ..Opts::default()
    })
    .await;
    register(s.addr, "n1", "192.168.1.1").await;
    create_tenant(s.addr, "red", 100, "10.1.0.0/16").await;
    let v = version(s.addr).await;
    let before = tenants(s.addr).await;
    let stored = std::fs::read(&file).unwrap();

    let post_tenant = |body: &'static str| call(s.addr, "POST", "/v1/tenants", body);
    let cases: Vec<(&str, Resp, u16)> = vec![
        (
            "malformed json",
            post_tenant(r#"{"name": "x", "#).await,
            400,
        ),
        (
            "unknown field",
            post_tenant(r#"{"name":"blue","vni":5,"subnet":"10.2.0.0/16","colour":"b"}"#).await,
            400,
        ),
        (
            "missing field",
            post_tenant(r#"{"name":"blue","vni":5}"#).await,
            400,
        ),
        (
            "missing token",
            raw(
                s.addr,
                "POST",
                "/v1/tenants",
                None,
                r#"{"name":"blue","vni":5,"subnet":"10.2.0.0/16"}"#,
            )
            .await,
            401,
        ),
        (
            "wrong token",
            raw(
                s.addr,
                "POST",
                "/v1/tenants",
                Some("nope"),
                r#"{"name":"blue","vni":5,"subnet":"10.2.0.0/16"}"#,
            )
            .await,
            401,
        ),
        (
            "wrong token on a read",
            raw(s.addr, "GET", "/v1/tenants", Some("nope"), "").await,
            401,
        ),
        (
            "unknown tenant get",
            call(s.addr, "GET", "/v1/tenants/nope", "").await,
            404,
        ),
        (
            "unknown tenant delete",
            call(s.addr, "DELETE", "/v1/tenants/nope", "").await,
            404,
        ),
        (
            "tenant exists",
            post_tenant(r#"{"name":"red","vni":7,"subnet":"10.7.0.0/16"}"#).await,
            409,
        ),
        (
            "vni in use",
            post_tenant(r#"{"name":"blue","vni":100,"subnet":"10.2.0.0/16"}"#).await,
            409,
        ),
        (
            "vni 0",
            post_tenant(r#"{"name":"blue","vni":0,"subnet":"10.2.0.0/16"}"#).await,
            400,
        ),
        (
            "vni too big",
            post_tenant(r#"{"name":"blue","vni":16777216,"subnet":"10.2.0.0/16"}"#).await,
            400,
        ),
        (
            "subnet overlap",
            post_tenant(r#"{"name":"blue","vni":5,"subnet":"10.1.128.0/17"}"#).await,
            409,
        ),
        (
            "unparsable subnet",
            post_tenant(r#"{"name":"blue","vni":5,"subnet":"ten.two/16"}"#).await,
            400,
        ),
        (
            "host bits",
            post_tenant(r#"{"name":"blue","vni":5,"subnet":"10.2.0.1/16"}"#).await,
            400,
        ),
        (
            "bad block prefix",
            post_tenant(r#"{"name":"blue","vni":5,"subnet":"10.2.0.0/16","block_prefix":31}"#)
                .await,
            400,
        ),
        (
            "bad tenant name",
            post_tenant(r#"{"name":"Blue_1","vni":5,"subnet":"10.2.0.0/16"}"#).await,
            400,
        ),
        (
            "bad node name",
            call(
                s.addr,
                "POST",
                "/v1/agents/register",
                r#"{"node":"N 1","underlay_ip":"192.168.1.9"}"#,
            )
            .await,
            400,
        ),
        (
            "bad underlay ip",
            call(
                s.addr,
                "POST",
                "/v1/agents/register",
                r#"{"node":"n9","underlay_ip":"not-an-ip"}"#,
            )
            .await,
            400,
        ),
        (
            "heartbeat for unknown node",
            heartbeat(s.addr, "ghost").await,
            404,
        ),
        (
            "malformed heartbeat",
            call(s.addr, "POST", "/v1/agents/n1/heartbeat", "{pools").await,
            400,
        ),
        (
            "bad since",
            call(s.addr, "GET", "/v1/agents/n1/overlay?since=abc", "").await,
            400,
        ),
        (
            "unknown route",
            call(s.addr, "GET", "/v1/nothing", "").await,
            404,
        ),
        (
            "unknown top-level route",
            raw(s.addr, "GET", "/nothing", None, "").await,
            404,
        ),
        (
            "wrong method",
            call(s.addr, "PUT", "/v1/tenants", "").await,
            405,
        ),
    ];
    for (what, resp, status) in &cases {
        assert_eq!(resp.status, *status, "{what}: {}", resp.body);
        let e: ApiError = serde_json::from_str(&resp.body)
            .unwrap_or_else(|e| panic!("{what}: body {:?} is not an ApiError: {e}", resp.body));
        assert!(!e.error.is_empty(), "{what}");
    }
    assert_eq!(version(s.addr).await, v);
    assert_eq!(tenants(s.addr).await, before);
    assert_eq!(std::fs::read(&file).unwrap(), stored, "store rewritten");
    let nodes: Vec<Node> = call(s.addr, "GET", "/v1/nodes", "").await.json();
    assert_eq!(nodes.len(), 1);
    let metrics = raw(s.addr, "GET", "/metrics", Some(TOKEN), "").await.body;
    assert!(metrics.contains("particle_controller_requests_total{status=\"401\"} 3"));
    let _ = std::fs::remove_dir_all(file.parent().unwrap());
}

/// Inputs a hostile or careless caller sends: each is refused with a 4xx
/// that says why, and nothing changes.
#[tokio::test]
async fn special_ranges_the_underlay_and_quotas_are_refused() {
    let quotas = particle_controller::state::Quotas {
        max_tenants: 2,
        max_warm_per_node: 64,
    };
    let s = start(Opts {
        quotas,
        ..Opts::default()
    })
    .await;
    register(s.addr, "n1", "10.200.0.5").await;
    let create = |name: &str, vni: u32, subnet: &str| {
        format!(r#"{{"name":"{name}","vni":{vni},"subnet":"{subnet}"}}"#)
    };
    for (subnet, why) in [
        ("127.0.0.0/16", "loopback"),
        ("169.254.0.0/16", "link-local"),
        ("224.0.0.0/16", "multicast"),
        ("0.0.0.0/8", "this network"),
        ("240.0.0.0/8", "reserved"),
        ("10.200.0.0/16", "underlay address 10.200.0.5"),
    ] {
        let e = call(s.addr, "POST", "/v1/tenants", &create("a", 7, subnet))
            .await
            .expect_error(400);
        assert!(e.contains(why), "{subnet}: {e}");
    }
    // A warm target past the limit, whether at creation or later.
    let e = call(
        s.addr,
        "POST",
        "/v1/tenants",
        r#"{"name":"a","vni":7,"subnet":"10.1.0.0/16","warm_per_node":18446744073709551615}"#,
    )
    .await
    .expect_error(403);
    assert!(e.contains("limit of 64"), "{e}");
    assert!(tenants(s.addr).await.is_empty());
    create_tenant(s.addr, "a", 7, "10.1.0.0/16").await;
    let e = call(
        s.addr,
        "PUT",
        "/v1/tenants/a/warm",
        r#"{"per_node":18446744073709551615}"#,
    )
    .await
    .expect_error(403);
    assert!(e.contains("limit"), "{e}");
    // A node whose underlay address is inside a tenant's subnet.
    let e = call(
        s.addr,
        "POST",
        "/v1/agents/register",
        r#"{"node":"n2","underlay_ip":"10.1.9.9"}"#,
    )
    .await
    .expect_error(409);
    assert!(e.contains("inside tenant"), "{e}");
    // The tenant quota: a third is refused until one is deleted.
    create_tenant(s.addr, "b", 8, "10.2.0.0/16").await;
    let e = call(
        s.addr,
        "POST",
        "/v1/tenants",
        &create("c", 9, "10.3.0.0/16"),
    )
    .await
    .expect_error(403);
    assert!(e.contains("at most 2 tenants"), "{e}");
    assert_eq!(
        call(s.addr, "DELETE", "/v1/tenants/b", "").await.status,
        204
    );
    create_tenant(s.addr, "c", 9, "10.3.0.0/16").await;
}
