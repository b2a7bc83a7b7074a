//! A cluster's tenants and nodes through the controller's API: create a
//! tenant, set its warm target, wait for the pools to be warm, wait for the
//! nodes to register. Async, for callers that drive the launch API too.

use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use particle_wire::api::{CreateTenant, Node, Tenant, WarmTarget};
use particle_wire::client::{ApiClient, Method};

/// Creates `tenant`.
pub async fn create(api: &ApiClient, tenant: &CreateTenant) -> Result<Tenant> {
    api.call(Method::POST, "/v1/tenants", Some(tenant))
        .await
        .with_context(|| format!("creating tenant {}", tenant.name))
}

/// Sets `tenant`'s warm target: `per_node` endpoints ready on every node.
pub async fn set_warm(api: &ApiClient, tenant: &str, per_node: usize) -> Result<Tenant> {
    let body = WarmTarget {
        per_node: Some(per_node),
    };
    api.call(
        Method::PUT,
        &format!("/v1/tenants/{tenant}/warm"),
        Some(&body),
    )
    .await
    .with_context(|| format!("setting the warm target of {tenant}"))
}

/// Creates `tenant` on `subnet` (per-node blocks of the controller's
/// default size), sets its warm target to `per_node` and waits until every
/// node has that many endpoints ready; returns how long that took.
pub async fn prepare(
    api: &ApiClient,
    tenant: &str,
    vni: u32,
    subnet: &str,
    per_node: usize,
) -> Result<Duration> {
    let body = CreateTenant {
        name: tenant.into(),
        vni,
        subnet: subnet.into(),
        block_prefix: None,
        warm_per_node: Some(per_node),
    };
    create(api, &body).await?;
    set_warm(api, tenant, per_node).await?;
    warm_up(api, tenant, per_node).await
}

/// Waits until every node that can launch has `per_node` endpoints of
/// `tenant` ready, as the controller (and so placement) sees them.
pub async fn warm_up(api: &ApiClient, tenant: &str, per_node: usize) -> Result<Duration> {
    let start = Instant::now();
    loop {
        let nodes: Vec<Node> = api.call::<(), _>(Method::GET, "/v1/nodes", None).await?;
        let ready: Vec<usize> = nodes
            .iter()
            .filter(|n| n.api_port.is_some())
            .map(|n| n.pools.get(tenant).map_or(0, |p| p.ready))
            .collect();
        if !ready.is_empty() && ready.iter().all(|r| *r >= per_node) {
            return Ok(start.elapsed());
        }
        if start.elapsed() > Duration::from_secs(300) {
            bail!("pools not warm after 300 s: {ready:?} of {per_node} per node");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Waits until `nodes` nodes have registered.
pub async fn wait_for_nodes(api: &ApiClient, nodes: usize, timeout: Duration) -> Result<()> {
    let start = Instant::now();
    loop {
        let listed: Result<Vec<Node>, _> = api.call::<(), _>(Method::GET, "/v1/nodes", None).await;
        match listed {
            Ok(n) if n.len() == nodes => return Ok(()),
            _ if start.elapsed() > timeout => {
                bail!("only {listed:?} of {nodes} nodes registered after {timeout:?}; see the logs")
            }
            _ => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
}
