//! The warm pool against the real kernel: refill, claim, recycle, destroy.

mod common;

use std::time::Duration;

use common::{eventually, scratch};
use particle_net::{EndpointPool, PoolConfig, PoolError};

// Generous: refills and recycling run at nice 19, behind everything else.
const WAIT: Duration = Duration::from_secs(60);

/// A pool on `t`'s node with one build worker.
fn one_worker_pool(t: &common::TestNode, high: usize, low: usize, batch: usize) -> EndpointPool {
    let config = PoolConfig {
        high_watermark: high,
        low_watermark: low,
        batch_size: batch,
    };
    EndpointPool::start(t.node.factory(1).unwrap(), t.node.block.clone(), config).unwrap()
}

#[test]
fn pool_fills_claims_refills_and_recycles_clean_endpoints() {
    let mut t = scratch("10.201.0.0/24");
    let config = PoolConfig {
        high_watermark: 8,
        low_watermark: 4,
        batch_size: 3,
    };
    let block = t.node.block.clone();
    let pool = EndpointPool::start(t.node.factory(2).unwrap(), block, config).unwrap();
    pool.wait_ready(8, WAIT).unwrap();
    assert_eq!(pool.level(), 8);
    assert_eq!(t.node.extra_links().unwrap().len(), 8, "one host end each");

    // Claims below the low watermark wake the refiller, which tops up.
    let claimed: Vec<_> = (0..5).map(|_| pool.claim().unwrap()).collect();
    pool.wait_ready(8, WAIT).unwrap();
    assert_eq!(pool.stats().created, 13);
    let addresses: std::collections::BTreeSet<_> = claimed.iter().map(|e| e.address()).collect();
    assert_eq!(addresses.len(), 5, "every claim has its own address");

    // A clean endpoint released while the pool is below high goes back; one
    // released into a full pool is destroyed.
    let mut claimed = claimed;
    eventually("the refiller rests", WAIT, || !pool.stats().refilling);
    let extra = pool.claim().unwrap(); // leaves 7 ready: room for one
    drop(claimed.remove(0));
    eventually("one recycled", WAIT, || pool.stats().recycled == 1);
    assert_eq!(pool.level(), 8);
    assert_eq!(pool.stats().destroyed, 0);
    drop(extra);
    eventually("one destroyed", WAIT, || pool.stats().destroyed == 1);
    assert_eq!(pool.stats().recycled, 1);
    assert_eq!(pool.addresses_in_use(), 8 + claimed.len());
    drop(claimed);

    drop(pool);
    eventually("all host ends gone", WAIT, || {
        t.node.extra_links().unwrap().is_empty()
    });
}

#[test]
fn dirty_or_discarded_endpoints_are_destroyed_not_reused() {
    let mut t = scratch("10.202.0.0/24");
    let pool = one_worker_pool(&t, 4, 0, 4);
    pool.wait_ready(4, WAIT).unwrap();

    // A function left a bridge behind in its namespace: not clean.
    let dirty = pool.claim().unwrap();
    let added = dirty
        .netns()
        .command("ip")
        .args(["link", "add", "leftover0", "type", "bridge"])
        .status()
        .unwrap();
    assert!(added.success());
    assert!(!dirty.is_clean().unwrap());
    let dirty_host = dirty.host_ifname().to_string();
    drop(dirty);
    // A function that crashed: discarded even though clean.
    let crashed = pool.claim().unwrap();
    let crashed_host = crashed.host_ifname().to_string();
    crashed.discard();

    eventually("both destroyed", WAIT, || pool.stats().destroyed == 2);
    assert_eq!(pool.stats().recycled, 0);
    eventually("their host ends gone", WAIT, || {
        let links = t.node.extra_links().unwrap();
        !links.contains(&dirty_host) && !links.contains(&crashed_host)
    });
    // The refiller may still be topping up behind the claims; once it rests,
    // every address in use is a ready endpoint's: the destroyed ones are free.
    eventually("destroyed endpoints' addresses are free", WAIT, || {
        pool.addresses_in_use() == pool.level()
    });
}

#[test]
fn claim_from_an_empty_pool_is_a_clear_error() {
    let t = scratch("10.203.0.0/29");
    // A /29 has 5 endpoint addresses: the pool cannot reach its high watermark.
    let pool = one_worker_pool(&t, 8, 8, 8);
    let err = pool.wait_ready(8, Duration::from_secs(3)).unwrap_err();
    assert!(err.to_string().contains("exhausted"), "{err}");
    let held: Vec<_> = (0..5).map(|_| pool.claim().unwrap()).collect();
    let err = pool.claim().unwrap_err();
    assert!(matches!(err, PoolError::Empty { .. }), "{err}");
    assert!(err.to_string().contains("no warm endpoint"), "{err}");
    assert_eq!(pool.stats().empty_claims, 1);
    assert_eq!(held.len(), 5);
}

#[test]
fn bad_pool_configs_are_refused() {
    let t = scratch("10.204.0.0/24");
    for (high, low, batch) in [(4, 5, 1), (4, 1, 0)] {
        let config = PoolConfig {
            high_watermark: high,
            low_watermark: low,
            batch_size: batch,
        };
        let err = EndpointPool::start(t.node.factory(1).unwrap(), t.node.block.clone(), config)
            .unwrap_err();
        assert!(matches!(err, PoolError::Config(_)), "{err}");
    }
    // A pool that keeps none warm is fine: it builds nothing until asked.
    let none = PoolConfig {
        high_watermark: 0,
        low_watermark: 0,
        batch_size: 1,
    };
    let pool = EndpointPool::start(t.node.factory(1).unwrap(), t.node.block.clone(), none).unwrap();
    std::thread::sleep(std::time::Duration::from_millis(200));
    assert_eq!((pool.stats().ready, pool.stats().created), (0, 0));
    assert!(matches!(pool.claim(), Err(PoolError::Empty { .. })));
    let cold = pool.claim_cold(1);
    assert!(cold[0].is_ok(), "{:?}", cold[0].as_ref().err());
}

#[test]
fn a_kernel_refusal_in_a_refill_batch_is_reported_and_the_rest_of_the_pool_is_fine() {
    let mut t = scratch("10.209.0.0/24");
    let factory = t.node.factory(1).unwrap();
    // The kernel refuses the batch's third endpoint: its host-end name is
    // already taken by a link planted here.
    let clash = particle_net::EndpointFactory::host_ifname(factory.prefix(), 2).unwrap();
    particle_net::bridge::Bridge::create(&mut t.node.socket, &clash, None).unwrap();
    let config = PoolConfig {
        high_watermark: 6,
        low_watermark: 2,
        batch_size: 6,
    };
    let block = t.node.block.clone();
    let pool = EndpointPool::start(factory, block, config).unwrap();
    // The refiller reports the failure and makes up for it in a later batch.
    pool.wait_ready(6, WAIT).unwrap();
    let stats = pool.stats();
    assert_eq!(stats.build_errors, 1, "{stats:?}");
    let error = stats.last_error.clone().unwrap_or_default();
    assert!(error.contains(clash.as_str()), "{error}");
    assert_eq!(stats.created, 6, "{stats:?}");

    // Every endpoint in the pool is whole and claimable; the failed one left
    // nothing but the planted link.
    let claimed: Vec<_> = (0..6).map(|_| pool.claim().unwrap()).collect();
    let mut links = t.node.extra_links().unwrap();
    links.sort();
    let mut expected: Vec<String> = claimed
        .iter()
        .map(|e| e.host_ifname().to_string())
        .chain([clash.to_string()])
        .collect();
    expected.sort();
    assert_eq!(links, expected);
    drop(claimed);
    drop(pool);
}

/// `ip neigh` entries of a namespace, one line each.
fn arp_entries(netns: &particle_net::NetNs) -> String {
    let out = netns
        .command("ip")
        .args(["-4", "neigh", "show", "nud", "all"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn plant_arp_entry(netns: &particle_net::NetNs, ip: &str, dev: &str, nud: &str) {
    let planted = netns
        .command("ip")
        .args(["neigh", "replace", ip, "lladdr", "02:00:00:00:00:01"])
        .args(["dev", dev, "nud", nud])
        .status()
        .unwrap();
    assert!(planted.success(), "planting {ip} {nud} on {dev}");
}

#[test]
fn a_resting_pool_sweeps_the_arp_state_nobody_uses() {
    let t = scratch("10.205.0.0/24");
    // Three, so that one stays ready after two claims: no refill is under
    // way to take the room the returned endpoint needs to be recycled.
    let pool = one_worker_pool(&t, 3, 0, 3);
    pool.wait_ready(3, WAIT).unwrap();
    // One endpoint in use, one back in the pool (its namespace kept to look in).
    let claimed = pool.claim().unwrap();
    let pooled = pool.claim().unwrap();
    let pooled_ip = pooled.address().ip().to_string();
    let pooled_ns = pooled.netns().try_clone().unwrap();
    drop(pooled);
    eventually("recycled", WAIT, || pool.stats().recycled == 1);
    // What in-flight packets leave after a release: the recycled endpoint
    // learns a peer (planted first: the sweep after its recycling must find
    // it), the bridge the addresses of a pooled endpoint and of one long
    // gone; the claimed endpoint's entry is in use.
    plant_arp_entry(&pooled_ns, "10.205.0.77", "eth0", "stale");
    let bridge = t.node.bridge.name.to_string();
    let claimed_ip = claimed.address().ip().to_string();
    plant_arp_entry(&t.node.netns, &pooled_ip, &bridge, "stale");
    plant_arp_entry(&t.node.netns, "10.205.0.200", &bridge, "stale");
    plant_arp_entry(&t.node.netns, &claimed_ip, &bridge, "stale");
    plant_arp_entry(&t.node.netns, "10.205.0.201", &bridge, "permanent");

    eventually("the sweep ran", Duration::from_secs(30), || {
        let home = arp_entries(&t.node.netns);
        !home.contains(&format!("{pooled_ip} "))
            && !home.contains("10.205.0.200 ")
            && !arp_entries(&pooled_ns).contains("10.205.0.77 ")
    });
    // Its permanent entry for the gateway is all it keeps.
    let kept = arp_entries(&pooled_ns);
    assert_eq!(kept.lines().count(), 1, "{kept}");
    assert!(
        kept.starts_with("10.205.0.1 ") && kept.contains("PERMANENT"),
        "{kept}"
    );
    let home = arp_entries(&t.node.netns);
    assert!(home.contains(&format!("{claimed_ip} ")), "in use: {home}");
    assert!(home.contains("10.205.0.201 "), "ours (permanent): {home}");
    drop(claimed);
}
