//! The agent's Prometheus `/metrics`: per tenant pool levels and what the
//! pool did (claims, builds, recycles, destructions, errors), and the local
//! API's requests and errors. Read from the pools at scrape time.

use std::sync::atomic::AtomicU64;
use std::sync::Arc;

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

use particle_net::PoolStats;

use crate::api::local::LocalApi;
use crate::node_state::OverlayView;

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct TenantLabels {
    tenant: String,
}

type U64Gauge = Gauge<u64, AtomicU64>;

type PoolMetric = (&'static str, &'static str, fn(&PoolStats) -> u64);

/// Per tenant, from its pool's counters ("cumulative" ones only grow).
const POOL_METRICS: [PoolMetric; 8] = [
    ("particle_agent_pool_ready", "Warm endpoints ready", |s| {
        s.ready as u64
    }),
    (
        "particle_agent_pool_building",
        "Endpoints being built",
        |s| s.building as u64,
    ),
    (
        "particle_agent_pool_claims",
        "Claims served (cumulative)",
        |s| s.claimed,
    ),
    (
        "particle_agent_pool_empty_claims",
        "Claims that found the pool empty (cumulative)",
        |s| s.empty_claims,
    ),
    (
        "particle_agent_pool_created",
        "Endpoints built by refills (cumulative; its rate is the refill rate)",
        |s| s.created,
    ),
    (
        "particle_agent_pool_recycled",
        "Endpoints returned clean and reused (cumulative)",
        |s| s.recycled,
    ),
    (
        "particle_agent_pool_destroyed",
        "Endpoints destroyed (cumulative)",
        |s| s.destroyed,
    ),
    (
        "particle_agent_pool_build_errors",
        "Endpoint builds that failed (cumulative)",
        |s| s.build_errors,
    ),
];

/// Renders the agent's metrics in the OpenMetrics text format.
pub fn render(local: &LocalApi, overlay: &OverlayView) -> Result<String, std::fmt::Error> {
    let mut registry = Registry::default();
    let claims = local.claims();
    let pool_stats = claims.pool_stats();
    let per_tenant = |registry: &mut Registry, name: &str, help: &str| {
        let family = Family::<TenantLabels, U64Gauge>::default();
        registry.register(name, help, family.clone());
        family
    };
    for (name, help, value) in POOL_METRICS {
        let family = per_tenant(&mut registry, name, help);
        for (tenant, stats) in &pool_stats {
            family
                .get_or_create(&TenantLabels {
                    tenant: tenant.clone(),
                })
                .set(value(stats));
        }
    }
    let routes = per_tenant(
        &mut registry,
        "particle_agent_overlay_routes",
        "Routes to other nodes' blocks (one per remote node)",
    );
    let neighbours = per_tenant(
        &mut registry,
        "particle_agent_overlay_neighbours",
        "Permanent neighbour entries of remote VTEPs",
    );
    let fdb = per_tenant(
        &mut registry,
        "particle_agent_overlay_fdb",
        "VXLAN FDB entries of remote VTEPs",
    );
    for (tenant, c) in overlay.counts() {
        let l = TenantLabels { tenant };
        routes.get_or_create(&l).set(c.routes as u64);
        neighbours.get_or_create(&l).set(c.neighbours as u64);
        fdb.get_or_create(&l).set(c.fdb as u64);
    }
    if let Some((level, bound)) = claims.free_stats() {
        let g = U64Gauge::default();
        g.set(level as u64);
        registry.register(
            "particle_agent_free_pool_ready",
            "Tenant-free endpoints ready",
            g,
        );
        let g = U64Gauge::default();
        g.set(bound);
        registry.register(
            "particle_agent_free_pool_bound",
            "Tenant-free endpoints bound to a tenant that ran dry (cumulative)",
            g,
        );
    }
    let (requests, request_errors) = local.request_counts();
    let gauge = |registry: &mut Registry, name: &str, help: &str, value: u64| {
        let g = U64Gauge::default();
        g.set(value);
        registry.register(name, help, g);
    };
    gauge(
        &mut registry,
        "particle_agent_local_requests",
        "Local API requests (cumulative)",
        requests,
    );
    gauge(
        &mut registry,
        "particle_agent_local_errors",
        "Local API requests answered with an error (cumulative)",
        request_errors,
    );
    let mut out = String::new();
    prometheus_client::encoding::text::encode(&mut out, &registry)?;
    Ok(out)
}

async fn metrics(State(sources): State<MetricsSources>) -> impl IntoResponse {
    match render(&sources.local, &sources.overlay) {
        Ok(text) => (
            StatusCode::OK,
            [(
                header::CONTENT_TYPE,
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
            )],
            text,
        )
            .into_response(),
        Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, e.to_string()).into_response(),
    }
}

/// What `/metrics` reads: the local API (pools, claims, its counters) and
/// the overlay entries as last read from the kernel.
#[derive(Clone)]
pub struct MetricsSources {
    pub local: Arc<LocalApi>,
    pub overlay: Arc<OverlayView>,
}

/// Serves `/metrics` (bearer token required: it names tenants and their
/// pools), and `api` beside it, on `listener`.
pub async fn serve(
    listener: tokio::net::TcpListener,
    sources: MetricsSources,
    token: &str,
    api: Router,
) -> std::io::Result<()> {
    let token: Arc<str> = token.into();
    let app = Router::new()
        .route("/metrics", get(metrics))
        .route_layer(axum::middleware::from_fn_with_state(
            token,
            particle_wire::require_bearer,
        ))
        .with_state(sources)
        .merge(api);
    let limits = particle_wire::http_server::ServeLimits::default();
    particle_wire::http_server::serve(listener, app, limits, std::future::pending()).await
}
