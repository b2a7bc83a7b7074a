//! A tenant's share of the node: at most so many endpoints it holds
//! (claimed by its jobs or through the local API) and so many functions
//! reserved or running ([`crate::sandbox::SandboxConfig`]). Checked at
//! reserve before anything is claimed; a reserve over it is a 429 and
//! claims nothing, so the controller releases what other nodes reserved.

use axum::http::StatusCode;
use particle_wire::HttpError;

use super::{lock, NodeJobs, Table};

/// A reserve's functions, counted as its tenant's until the job is in the
/// table ([`Pending::settle`]) or the reserve fails (dropped).
pub(super) struct Pending<'a> {
    jobs: &'a NodeJobs,
    tenant: String,
    n: usize,
}

impl Pending<'_> {
    /// The job is in `table` now and counts there.
    pub fn settle(mut self, table: &mut Table) {
        give_back(table, &self.tenant, self.n);
        self.n = 0;
    }
}

impl Drop for Pending<'_> {
    fn drop(&mut self) {
        if self.n > 0 {
            give_back(&mut lock(&self.jobs.table), &self.tenant, self.n);
        }
    }
}

fn give_back(table: &mut Table, tenant: &str, n: usize) {
    if let Some(p) = table.pending.get_mut(tenant) {
        *p = p.saturating_sub(n);
        if *p == 0 {
            table.pending.remove(tenant);
        }
    }
}

/// Functions of `tenant` reserved or running here.
fn functions_of(table: &Table, tenant: &str) -> usize {
    table
        .jobs
        .values()
        .filter(|j| j.tenant == tenant)
        .flat_map(|j| j.functions.values())
        .filter(|s| s.endpoint.is_some() || s.kill.is_some())
        .count()
}

impl NodeJobs {
    /// Counts `n` more functions (and endpoints) for `tenant`, or refuses
    /// if that would exceed its quota here.
    pub(super) fn admit(&self, tenant: &str, n: usize) -> Result<Pending<'_>, HttpError> {
        let config = self.settings.sandbox.config();
        let mut table = lock(&self.table);
        let pending = table.pending.get(tenant).copied().unwrap_or(0);
        let functions = functions_of(&table, tenant) + pending;
        let endpoints = self.claims.held_by(tenant) + pending;
        let node = &self.settings.node;
        let over = |what: &str, held: usize, max: usize, key: &str| {
            HttpError::new(
                StatusCode::TOO_MANY_REQUESTS,
                format!(
                    "tenant {tenant} over its quota on node {node}: {n} more {what} on top of \
                     the {held} it holds would exceed {max} ({key})"
                ),
            )
        };
        if functions + n > config.max_functions_per_tenant {
            return Err(over(
                "functions",
                functions,
                config.max_functions_per_tenant,
                "max_functions_per_tenant",
            ));
        }
        if endpoints + n > config.max_endpoints_per_tenant {
            return Err(over(
                "endpoints",
                endpoints,
                config.max_endpoints_per_tenant,
                "max_endpoints_per_tenant",
            ));
        }
        *table.pending.entry(tenant.to_string()).or_default() += n;
        Ok(Pending {
            jobs: self,
            tenant: tenant.to_string(),
            n,
        })
    }
}
