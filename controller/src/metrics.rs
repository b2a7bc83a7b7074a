//! Prometheus metrics served on `/metrics`.
//!
//! Gauges describing the state are refreshed from the model at scrape time,
//! so they can never drift from it (and series of removed nodes disappear).

use std::sync::atomic::AtomicU64;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

use crate::state::ControllerState;

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct StatusLabels {
    status: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct PoolLabels {
    node: String,
    tenant: String,
}

type U64Gauge = Gauge<u64, AtomicU64>;

#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    nodes: U64Gauge,
    tenants: U64Gauge,
    version: U64Gauge,
    requests: Family<StatusLabels, Counter>,
    pool_ready: Family<PoolLabels, U64Gauge>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::default();
        let nodes = U64Gauge::default();
        let tenants = U64Gauge::default();
        let version = U64Gauge::default();
        let requests = Family::<StatusLabels, Counter>::default();
        let pool_ready = Family::<PoolLabels, U64Gauge>::default();
        registry.register(
            "particle_controller_nodes",
            "Registered, live nodes",
            nodes.clone(),
        );
        registry.register("particle_controller_tenants", "Tenants", tenants.clone());
        registry.register(
            "particle_controller_overlay_version",
            "Current overlay version",
            version.clone(),
        );
        // The encoder appends `_total` to counters.
        registry.register(
            "particle_controller_requests",
            "HTTP requests by response status",
            requests.clone(),
        );
        registry.register(
            "particle_controller_pool_ready",
            "Ready endpoints per node and tenant, from the last heartbeat",
            pool_ready.clone(),
        );
        Self {
            registry,
            nodes,
            tenants,
            version,
            requests,
            pool_ready,
        }
    }

    pub fn count_request(&self, status: u16) {
        self.requests
            .get_or_create(&StatusLabels {
                status: status.to_string(),
            })
            .inc();
    }

    /// Refreshes the state gauges and renders the OpenMetrics text.
    pub fn render(&self, state: &ControllerState) -> Result<String, std::fmt::Error> {
        self.nodes.set(state.node_count() as u64);
        self.tenants.set(state.tenant_count() as u64);
        self.version.set(state.version());
        self.pool_ready.clear();
        for (node, tenant, ready) in state.pool_levels() {
            self.pool_ready
                .get_or_create(&PoolLabels { node, tenant })
                .set(ready as u64);
        }
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry)?;
        Ok(out)
    }
}
