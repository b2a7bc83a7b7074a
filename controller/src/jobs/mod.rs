//! Burst launches: placing a job's functions on nodes, the two batched calls
//! per agent (reserve endpoints, then start with every peer's address), and
//! the job's life afterwards (exits reported by agents, waits, cancel, nodes
//! lost).
//!
//! Two calls, not one: a function must know every peer's address when it
//! starts, and an address is known only once its node has claimed the
//! endpoint. Both calls go to all agents at once and cost microseconds per
//! function on the agent; nothing on this path waits for the kernel unless a
//! pool has run dry.
//!
//! The pieces: this file keeps the table of jobs and everything that
//! changes a job once it runs; `launch` is the launch itself, step by step;
//! `placement` picks the nodes and spreads the ranks over them;
//! `agent_calls` are the batched calls to every agent at once.

// The submodules take the API, client and HTTP error types through this
// module's `use` lines (as `super::…`), so that moving those types elsewhere
// changes those lines only.
mod agent_calls;
mod launch;
mod placement;

pub use launch::launch;

use std::collections::{BTreeMap, VecDeque};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::http::StatusCode;
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use crate::store::{Store, StoreError};
use crate::Controller;
use particle_wire::api::{
    FunctionExit, FunctionState, FunctionStatus, Job, JobState, JobSummary, LaunchJob,
    ReserveFunctions, Reserved, StartFunctions, Started,
};
use particle_wire::client::{ApiClient, ClientError, Method};
use particle_wire::HttpError;

/// The largest burst one request may ask for.
pub const MAX_FUNCTIONS: usize = 100_000;
/// Ended jobs kept for status queries.
const RETAINED_JOBS: usize = 256;
/// The port functions listen on unless the job says otherwise.
pub const DEFAULT_FUNCTION_PORT: u16 = 7000;
/// Ended jobs written to the jobs file (all retained ones stay in memory).
const STORED_ENDED_JOBS: usize = 32;

#[derive(Serialize, Deserialize)]
struct JobRecord {
    job: Job,
    /// Wall clock, so a restarted controller still knows the job's age.
    started_unix_ms: u64,
    /// Node → its agent, for cancel and output.
    agents: BTreeMap<String, SocketAddr>,
    /// Node → the agent instance that holds the job's functions there; an
    /// agent registering with another instance has lost them.
    #[serde(default)]
    instances: BTreeMap<String, String>,
}

impl JobRecord {
    fn elapsed(&self) -> Duration {
        Duration::from_millis(unix_ms().saturating_sub(self.started_unix_ms))
    }
}

#[derive(Default, Serialize, Deserialize)]
struct Table {
    next: u64,
    jobs: BTreeMap<String, JobRecord>,
    ended: VecDeque<String>,
}

/// The jobs file beside the controller's state file.
pub fn jobs_store(state_file: &Path) -> Store {
    let mut name = state_file
        .file_name()
        .map(|n| n.to_os_string())
        .unwrap_or_else(|| "state".into());
    name.push(".jobs");
    Store::new(PathBuf::from(state_file).with_file_name(name))
}

/// Every job the controller knows. With a store, running jobs and the most
/// recent ended ones are written to a jobs file (without function output),
/// so a restarted controller still knows them: their functions keep running
/// on the agents, whose exit reports then find the job again.
pub struct Jobs {
    table: Mutex<Table>,
    /// Bumped on every change, for waiters.
    changed: watch::Sender<u64>,
    /// The jobs file and the lock that keeps its writes in change order.
    store: Option<(Store, Mutex<()>)>,
}

impl Default for Jobs {
    fn default() -> Self {
        Self {
            table: Mutex::new(Table::default()),
            changed: watch::channel(0).0,
            store: None,
        }
    }
}

impl Jobs {
    /// Jobs kept in `store` (loaded from it if it exists), or in memory only.
    pub fn new(store: Option<Store>) -> Result<Self, StoreError> {
        let table = match &store {
            Some(s) => s.load::<Table>()?.unwrap_or_default(),
            None => Table::default(),
        };
        if !table.jobs.is_empty() {
            tracing::info!(jobs = table.jobs.len(), "restored jobs");
        }
        Ok(Self {
            table: Mutex::new(table),
            changed: watch::channel(0).0,
            store: store.map(|s| (s, Mutex::new(()))),
        })
    }

    /// What the jobs file holds: running jobs and the latest ended ones,
    /// without the functions' output (agents keep that, bounded).
    fn stored_form(&self) -> serde_json::Value {
        let t = self.lock();
        let keep_ended: Vec<&String> = t.ended.iter().rev().take(STORED_ENDED_JOBS).collect();
        let mut jobs = serde_json::Map::new();
        for (id, r) in &t.jobs {
            if r.job.state != JobState::Running && !keep_ended.contains(&id) {
                continue;
            }
            let mut job = r.job.clone();
            for f in &mut job.functions {
                f.output = None;
            }
            let stored = JobRecord {
                job,
                started_unix_ms: r.started_unix_ms,
                agents: r.agents.clone(),
                instances: r.instances.clone(),
            };
            if let Ok(v) = serde_json::to_value(&stored) {
                jobs.insert(id.clone(), v);
            }
        }
        let ended: Vec<&String> = keep_ended.into_iter().rev().collect();
        serde_json::json!({ "next": t.next, "jobs": jobs, "ended": ended })
    }

    /// An agent (re)registered as `instance`: functions that an earlier
    /// instance on that node was running died with it.
    pub fn agent_registered(&self, node: &str, instance: &str) {
        let mut t = self.lock();
        let mut ended = Vec::new();
        let mut changed = false;
        for r in t.jobs.values_mut() {
            let Some(held_by) = r.instances.get(node) else {
                continue;
            };
            if r.job.state != JobState::Running || held_by == instance {
                continue;
            }
            for f in &mut r.job.functions {
                if f.state == FunctionState::Running && f.node == node {
                    f.state = FunctionState::Lost;
                    f.error = Some(format!(
                        "the agent on node {node} restarted; the function died with it"
                    ));
                    changed = true;
                }
            }
            if settle(r) {
                ended.push(r.job.id.clone());
            }
        }
        retire(&mut t, ended);
        drop(t);
        if changed {
            self.notify();
        }
    }

    fn lock(&self) -> MutexGuard<'_, Table> {
        self.table.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// After every change: writes the jobs file (before anyone is told, so
    /// nothing acknowledged is lost to a crash) and wakes waiters.
    fn notify(&self) {
        if let Some((store, order)) = &self.store {
            let _in_order = order.lock().unwrap_or_else(PoisonError::into_inner);
            if let Err(e) = store.save(&self.stored_form()) {
                // The jobs go on in memory; only a restart would forget them.
                tracing::error!("writing the jobs file: {e}");
            }
        }
        self.changed.send_modify(|v| *v += 1);
    }

    fn new_id(&self) -> String {
        let mut t = self.lock();
        t.next += 1;
        let secs = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        // Unique across controller restarts (the time part) and within one (the counter).
        format!("j{:x}-{}", secs & 0xffff_ffff, t.next)
    }

    pub fn get(&self, id: &str) -> Option<Job> {
        self.lock().jobs.get(id).map(|r| r.job.clone())
    }

    pub fn list(&self) -> Vec<JobSummary> {
        self.lock()
            .jobs
            .values()
            .map(|r| JobSummary {
                id: r.job.id.clone(),
                tenant: r.job.tenant.clone(),
                state: r.job.state,
                functions: r.job.functions.len(),
                exited: r
                    .job
                    .functions
                    .iter()
                    .filter(|f| f.state != FunctionState::Running)
                    .count(),
            })
            .collect()
    }

    /// The agent holding `rank` of job `id`.
    pub fn agent_of(&self, id: &str, rank: usize) -> Option<SocketAddr> {
        let t = self.lock();
        let r = t.jobs.get(id)?;
        let node = &r.job.functions.get(rank)?.node;
        r.agents.get(node).copied()
    }

    /// Waits until job `id` has ended or `timeout` passed; the job as it is then.
    pub async fn wait(&self, id: &str, timeout: Duration) -> Option<Job> {
        let mut changes = self.changed.subscribe();
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let job = self.get(id)?;
            if job.state != JobState::Running {
                return Some(job);
            }
            if tokio::time::timeout_at(deadline, changes.changed())
                .await
                .is_err()
            {
                return Some(job);
            }
        }
    }

    /// Records functions that ended (reported by `node`'s agent).
    pub fn record_exits(&self, node: &str, exits: Vec<FunctionExit>) {
        let mut t = self.lock();
        let mut ended = Vec::new();
        for exit in exits {
            let Some(r) = t.jobs.get_mut(&exit.job) else {
                continue; // a job this controller forgot (restart) or dropped
            };
            let Some(f) = r.job.functions.get_mut(exit.rank) else {
                continue;
            };
            if f.node != node || f.state != FunctionState::Running {
                continue;
            }
            f.state = FunctionState::Exited;
            f.exit_code = exit.exit_code;
            f.error = exit.error;
            f.output = Some(exit.output);
            f.reason = exit.reason;
            if settle(r) {
                ended.push(r.job.id.clone());
            }
        }
        retire(&mut t, ended);
        drop(t);
        self.notify();
    }

    /// Functions on nodes that went away will never report: they are lost.
    pub fn nodes_lost(&self, nodes: &[String]) {
        let mut t = self.lock();
        let mut ended = Vec::new();
        for r in t.jobs.values_mut() {
            if r.job.state != JobState::Running {
                continue;
            }
            for f in &mut r.job.functions {
                if f.state == FunctionState::Running && nodes.contains(&f.node) {
                    f.state = FunctionState::Lost;
                    f.error = Some(format!("node {} went away", f.node));
                }
            }
            if settle(r) {
                ended.push(r.job.id.clone());
            }
        }
        retire(&mut t, ended);
        drop(t);
        self.notify();
    }

    /// Marks what still runs as cancelled; returns the job's agents to tell.
    fn cancel(&self, id: &str) -> Option<(Job, BTreeMap<String, SocketAddr>)> {
        let mut t = self.lock();
        let r = t.jobs.get_mut(id)?;
        if r.job.state == JobState::Running {
            for f in &mut r.job.functions {
                if f.state == FunctionState::Running {
                    f.state = FunctionState::Cancelled;
                }
            }
            r.job.state = JobState::Cancelled;
            r.job.duration_ms = Some(ms(r.elapsed()));
            let id = r.job.id.clone();
            retire(&mut t, vec![id.clone()]);
            let r = t.jobs.get(&id)?;
            let out = (r.job.clone(), r.agents.clone());
            drop(t);
            self.notify();
            return Some(out);
        }
        Some((r.job.clone(), BTreeMap::new()))
    }
}

/// Ends the job if every function has; true if it just ended.
fn settle(r: &mut JobRecord) -> bool {
    if r.job.state != JobState::Running
        || r.job
            .functions
            .iter()
            .any(|f| f.state == FunctionState::Running)
    {
        return false;
    }
    let all_ok = r
        .job
        .functions
        .iter()
        .all(|f| f.state == FunctionState::Exited && f.exit_code == Some(0));
    r.job.state = if all_ok {
        JobState::Succeeded
    } else {
        JobState::Failed
    };
    r.job.duration_ms = Some(ms(r.elapsed()));
    true
}

/// Keeps the most recent ended jobs only.
fn retire(t: &mut Table, ended: Vec<String>) {
    t.ended.extend(ended);
    while t.ended.len() > RETAINED_JOBS {
        if let Some(old) = t.ended.pop_front() {
            t.jobs.remove(&old);
        }
    }
}

fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// The client's mistake: 400.
fn bad(message: impl Into<String>) -> HttpError {
    HttpError::new(StatusCode::BAD_REQUEST, message)
}

/// `DELETE /v1/jobs/{id}`.
pub async fn cancel(c: &Controller, id: &str) -> Result<Job, HttpError> {
    let (job, agents) = c
        .jobs()
        .cancel(id)
        .ok_or_else(|| HttpError::new(StatusCode::NOT_FOUND, format!("unknown job {id:?}")))?;
    let agents: Vec<(String, SocketAddr)> = agents.into_iter().collect();
    agent_calls::release_all(c, id, &agents).await;
    Ok(job)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn running_job(jobs: &Jobs, id: &str, instance: &str) {
        let functions = (0..4)
            .map(|rank| FunctionStatus {
                rank,
                node: format!("n{}", rank % 2),
                address: None,
                state: FunctionState::Running,
                exit_code: None,
                cold: false,
                bound: false,
                error: None,
                output: None,
                reason: None,
            })
            .collect();
        jobs.lock().jobs.insert(
            id.into(),
            JobRecord {
                job: Job {
                    id: id.into(),
                    tenant: "t".into(),
                    state: JobState::Running,
                    functions,
                    warm: 4,
                    bound: 0,
                    cold: 0,
                    launch_ms: 1.0,
                    duration_ms: None,
                },
                started_unix_ms: unix_ms(),
                agents: BTreeMap::new(),
                instances: [("n0", instance), ("n1", instance)]
                    .map(|(n, i)| (n.to_string(), i.to_string()))
                    .into(),
            },
        );
        jobs.notify();
    }

    fn exit(job: &str, rank: usize, code: i32) -> FunctionExit {
        FunctionExit {
            job: job.into(),
            rank,
            exit_code: Some(code),
            error: None,
            output: "out".into(),
            reason: None,
        }
    }

    #[test]
    fn a_restarted_agent_loses_only_its_own_running_functions() {
        let jobs = Jobs::default();
        running_job(&jobs, "j1", "first");
        jobs.agent_registered("n1", "first"); // a re-registration: nothing lost
        assert_eq!(jobs.get("j1").unwrap().state, JobState::Running);
        jobs.record_exits("n0", vec![exit("j1", 0, 0)]);
        jobs.agent_registered("n0", "second"); // n0 restarted
        let job = jobs.get("j1").unwrap();
        let states: Vec<_> = job.functions.iter().map(|f| f.state).collect();
        use FunctionState::*;
        assert_eq!(states, [Exited, Running, Lost, Running]);
        assert!(job.functions[2]
            .error
            .as_deref()
            .unwrap()
            .contains("restarted"));
        jobs.record_exits("n1", vec![exit("j1", 1, 0), exit("j1", 3, 0)]);
        assert_eq!(jobs.get("j1").unwrap().state, JobState::Failed);
    }

    #[test]
    fn jobs_survive_a_restart_without_their_output() {
        let dir = std::env::temp_dir().join(format!("particle-jobs-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let store = || jobs_store(&dir.join("state.json"));
        let jobs = Jobs::new(Some(store())).unwrap();
        running_job(&jobs, "j1", "a");
        jobs.record_exits("n0", vec![exit("j1", 0, 0)]);
        let next = jobs.lock().next;
        drop(jobs);

        let again = Jobs::new(Some(store())).unwrap();
        let job = again.get("j1").expect("the running job is restored");
        assert_eq!(job.state, JobState::Running);
        assert_eq!(job.functions[0].state, FunctionState::Exited);
        assert_eq!(job.functions[0].output, None, "output is not stored");
        assert_eq!(again.lock().next, next, "ids go on where they stopped");
        // Exits reported after the restart find the job and end it.
        again.record_exits("n1", vec![exit("j1", 1, 0), exit("j1", 3, 0)]);
        again.record_exits("n0", vec![exit("j1", 2, 0)]);
        assert_eq!(again.get("j1").unwrap().state, JobState::Succeeded);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
