//! Micro-benchmarks of the hot paths that need no root: address allocation,
//! the pool's claim bookkeeping, and encoding a batch of endpoint requests.
//! Run: `cargo bench -p particle-net --bench hot_paths`.

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, BatchSize, Criterion};
use particle_net::netlink::{encode_into, messages, Request};
use particle_net::pool::ReadyQueue;
use particle_net::{AddressBlock, IfName};

fn ipam(c: &mut Criterion) {
    let mut g = c.benchmark_group("ipam");
    g.bench_function("allocate+release in a /16", |b| {
        let mut block = AddressBlock::parse("10.0.0.0/16").expect("block");
        // Half full, so next-fit has to skip taken addresses.
        let _held = block.allocate_many(30_000);
        b.iter(|| {
            let a = block.allocate().expect("free address");
            block.release(black_box(a).ip()).expect("release");
        })
    });
    g.bench_function("allocate 1000 from a fresh /16", |b| {
        b.iter_batched(
            || AddressBlock::parse("10.0.0.0/16").expect("block"),
            |mut block| black_box(block.allocate_many(1000)),
            BatchSize::SmallInput,
        )
    });
    g.finish();
}

fn claim(c: &mut Criterion) {
    c.bench_function("pool claim bookkeeping (take + refill check)", |b| {
        let queue = ReadyQueue::new(256, 1024);
        queue.push_many(0..1024u64);
        b.iter(|| {
            let (item, _refill) = queue.take();
            if let Some(i) = item {
                queue.push_many([black_box(i)]);
            }
        })
    });
}

fn encoding(c: &mut Criterion) {
    let host = IfName::new("ptabcdee1z").expect("name");
    let peer = IfName::new("eth0").expect("name");
    let addr: std::net::Ipv4Addr = "10.0.0.2".parse().expect("ip");
    let gw: std::net::Ipv4Addr = "10.0.0.1".parse().expect("ip");
    let endpoint = [
        Request::create(
            "veth",
            messages::veth_pair(&messages::VethPair {
                host: &host,
                host_index: 0,
                master: Some(3),
                peer: &peer,
                peer_ns: 9,
                peer_index: 2,
                peer_mac: None,
            }),
        ),
        Request::change("lo", messages::set_up(1)),
        Request::change("eth0", messages::set_up(2)),
        Request::create("addr", messages::add_ipv4_address(2, addr, 24)),
        Request::create("route", messages::default_route(gw, 2)),
    ];
    c.bench_function("encode one endpoint's 5 requests", |b| {
        let mut buf = Vec::with_capacity(4096);
        b.iter(|| {
            buf.clear();
            for (seq, r) in endpoint.iter().enumerate() {
                encode_into(&mut buf, r.message.clone(), r.flags, seq as u32);
            }
            black_box(buf.len())
        })
    });
}

criterion_group!(benches, ipam, claim, encoding);
criterion_main!(benches);
