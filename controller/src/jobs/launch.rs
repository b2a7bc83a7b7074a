//! `POST /v1/jobs`, step by step: check the request, choose the nodes,
//! reserve endpoints on every agent, register the job, start it everywhere,
//! record how the starts went.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::Instant;

use axum::http::StatusCode;

use super::agent_calls::{release_all, reserve_all, start_all};
use super::placement::{choose_nodes, node_of, ranks_by_node};
use super::records::{self, Change};
use super::{
    bad, ms, settle, unix_ms, ClientError, FunctionState, FunctionStatus, HttpError, Job,
    JobRecord, JobState, Jobs, LaunchJob, Reserved, Started, DEFAULT_FUNCTION_PORT, MAX_FUNCTIONS,
};
use crate::Controller;

/// `POST /v1/jobs`.
pub async fn launch(c: &Controller, req: LaunchJob) -> Result<Job, HttpError> {
    let start = Instant::now();
    let started_unix_ms = unix_ms();
    let program = check_request(&req)?;
    let agents = choose_nodes(c, &req)?;
    let port = req.port.unwrap_or(DEFAULT_FUNCTION_PORT);
    let id = c.jobs().new_id()?;
    let ranks = ranks_by_node(req.functions, agents.len());

    // Agents busy with this launch are alive even if their heartbeats lag.
    let _in_flight = c.in_flight(agents.iter().map(|(n, _)| n.clone()));
    // 1. Reserve endpoints everywhere at once.
    let reserved = reserve_all(c, &id, &req, &program, &agents, &ranks).await;
    // A refusal (bad command, unknown tenant on the node) fails the job
    // before anything runs; an unreachable node only fails its functions.
    if let Some(refusal) = first_refusal(&reserved).or_else(|| short_node(&reserved, &agents)) {
        release_all(c, &id, &agents).await;
        return Err(refusal);
    }
    let (functions, instances) = reserved_functions(reserved, &agents, req.functions);
    let peers = peer_addresses(&functions, port);
    let record = running_record(&id, &req, functions, started_unix_ms, &agents, instances);
    // Registered (and stored) before the start so that early exits find the job.
    if let Err(e) = c.jobs().register(record) {
        release_all(c, &id, &agents).await;
        return Err(e.into());
    }

    // 2. Start everywhere at once, every function knowing every peer.
    let started = start_all(c, &id, &req, &peers, &agents).await;
    let launch_ms = ms(start.elapsed());
    let job = c.jobs().record_starts(&id, launch_ms, started)?;
    tracing::info!(
        job = %job.id,
        functions = job.functions.len(),
        warm = job.warm,
        cold = job.cold,
        launch_ms,
        "job launched"
    );
    Ok(job)
}

/// What the request itself must get right; the program it runs.
fn check_request(req: &LaunchJob) -> Result<String, HttpError> {
    if req.functions == 0 {
        return Err(bad("a job needs at least one function"));
    }
    if req.functions > MAX_FUNCTIONS {
        return Err(bad(format!(
            "{} functions is more than the {MAX_FUNCTIONS} one job may have",
            req.functions
        )));
    }
    match req.command.argv.first() {
        Some(p) if !p.is_empty() => Ok(p.clone()),
        _ => Err(bad("command.argv is empty: a job needs a program to run")),
    }
}

/// The first agent's refusal of the reserve call, if any: a client error
/// (4xx), as opposed to a node that could not be reached.
fn first_refusal(reserved: &[Result<Reserved, HttpError>]) -> Option<HttpError> {
    reserved
        .iter()
        .find_map(|r| r.as_ref().err().filter(|e| e.status.is_client_error()))
        .map(|refusal| HttpError::new(refusal.status, refusal.message.clone()))
}

/// A node that answered but could not give every rank an endpoint (its
/// block ran out, its builds failed): the job would run half, so it is
/// refused and everything released.
fn short_node(
    reserved: &[Result<Reserved, HttpError>],
    agents: &[(String, SocketAddr)],
) -> Option<HttpError> {
    reserved.iter().zip(agents).find_map(|(r, (node, _))| {
        let r = r.as_ref().ok()?;
        let missing: Vec<&str> = (r.endpoints.iter())
            .filter_map(|ep| ep.error.as_deref())
            .collect();
        let first = missing.first()?;
        Some(HttpError::new(
            StatusCode::CONFLICT,
            format!(
                "node {node} could not give {} of its {} functions an endpoint ({first}); nothing was started",
                missing.len(),
                r.endpoints.len()
            ),
        ))
    })
}

/// Every function's status once the agents reserved (`reserved`, one answer
/// per agent): running where its node gave it an address, failed with the
/// reason where not. Also the agent instance holding each node's functions.
fn reserved_functions(
    reserved: Vec<Result<Reserved, HttpError>>,
    agents: &[(String, SocketAddr)],
    functions: usize,
) -> (Vec<FunctionStatus>, BTreeMap<String, String>) {
    let mut functions: Vec<FunctionStatus> = (0..functions)
        .map(|rank| FunctionStatus {
            rank,
            node: agents[node_of(rank, agents.len())].0.clone(),
            address: None,
            state: FunctionState::Failed,
            exit_code: None,
            cold: false,
            bound: false,
            error: Some("no endpoint".into()),
            output: None,
            reason: None,
        })
        .collect();
    let mut instances = BTreeMap::new();
    for (result, (node, _)) in reserved.into_iter().zip(agents) {
        match result {
            Ok(r) => {
                if let Some(instance) = r.instance {
                    instances.insert(node.clone(), instance);
                }
                for ep in r.endpoints {
                    if let Some(f) = functions.get_mut(ep.rank) {
                        f.address = ep.address;
                        f.cold = ep.cold;
                        f.bound = ep.bound;
                        f.error = ep.error;
                        if ep.address.is_some() {
                            f.state = FunctionState::Running;
                        }
                    }
                }
            }
            Err(e) => {
                for f in functions.iter_mut().filter(|f| &f.node == node) {
                    f.error = Some(e.message.clone());
                }
            }
        }
    }
    (functions, instances)
}

/// Every rank's peer address (`PARTICLE_PEERS`), by rank; a function
/// without an endpoint is `0.0.0.0`.
fn peer_addresses(functions: &[FunctionStatus], port: u16) -> Vec<String> {
    functions
        .iter()
        .map(|f| match f.address {
            Some(a) => format!("{a}:{port}"),
            None => format!("0.0.0.0:{port}"),
        })
        .collect()
}

/// The job as it is registered before its start: running, not yet timed.
fn running_record(
    id: &str,
    req: &LaunchJob,
    functions: Vec<FunctionStatus>,
    started_unix_ms: u64,
    agents: &[(String, SocketAddr)],
    instances: BTreeMap<String, String>,
) -> JobRecord {
    let warm = functions
        .iter()
        .filter(|f| f.address.is_some() && !f.cold && !f.bound)
        .count();
    let bound = functions.iter().filter(|f| f.bound).count();
    let cold = functions.iter().filter(|f| f.cold).count();
    JobRecord {
        job: Job {
            id: id.to_string(),
            tenant: req.tenant.clone(),
            state: JobState::Running,
            functions,
            warm,
            bound,
            cold,
            launch_ms: 0.0,
            duration_ms: None,
        },
        started_unix_ms,
        agents: agents.iter().cloned().collect(),
        instances,
        seq: 0,
    }
}

impl Jobs {
    /// Records the launch's time and what the start calls answered (one
    /// answer per node), ends the job if nothing of it runs, and tells
    /// waiters; the job as it is then.
    fn record_starts(
        &self,
        id: &str,
        launch_ms: f64,
        started: Vec<(String, Result<Started, ClientError>)>,
    ) -> Result<Job, HttpError> {
        let mut t = self.lock();
        let Some(record) = t.jobs.get_mut(id) else {
            return Err(HttpError::new(
                StatusCode::GONE,
                "the job was dropped during its launch",
            ));
        };
        record.job.launch_ms = launch_ms;
        let failed: Vec<Change> = (started.into_iter())
            .flat_map(|(node, result)| start_failures(record, &node, result))
            .collect();
        let header = records::header_record(record);
        // The job runs whether or not this is stored: a failure is logged.
        if let Err(e) = self.persist(&[], vec![header]) {
            tracing::error!("job {id}: storing its launch: {e}");
        }
        if let Err(e) = self.change(&mut t, id, failed) {
            tracing::error!("job {id}: storing its failed starts: {e}");
        }
        // Nothing of it may run at all (every node failed its reserve).
        if let Some(r) = t
            .jobs
            .get_mut(id)
            .filter(|r| r.job.state == JobState::Running)
        {
            if settle(r) {
                if let Err(e) = self.persist(&[], vec![records::header_record(r)]) {
                    tracing::error!("job {id}: storing its end: {e}");
                }
                self.retire(&mut t, vec![id.to_string()]);
            }
        }
        let job = t.jobs.get(id).map(|r| r.job.clone());
        drop(t);
        self.notify();
        job.ok_or_else(|| HttpError::new(StatusCode::GONE, "the job was dropped during its launch"))
    }
}

/// The functions `node`'s agent failed to start: those it names, or all
/// it was running if the call itself failed.
fn start_failures(
    record: &JobRecord,
    node: &str,
    result: Result<Started, ClientError>,
) -> Vec<Change> {
    let failed = |rank: usize, error: String| Change {
        rank,
        state: FunctionState::Failed,
        code: None,
        error: Some(error),
        reason: None,
    };
    match result {
        Ok(s) => s
            .failed
            .into_iter()
            .map(|f| failed(f.rank, f.error))
            .collect(),
        Err(e) => (record.job.functions.iter())
            .filter(|f| f.node == node && f.state == FunctionState::Running)
            .map(|f| failed(f.rank, format!("node {node}: {e}")))
            .collect(),
    }
}
