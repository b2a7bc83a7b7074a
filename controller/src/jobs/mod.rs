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
mod records;

pub use launch::launch;

use std::collections::{BTreeMap, VecDeque};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::http::StatusCode;
use tokio::sync::watch;

use crate::store::{Backend, Record, StoreError};
use crate::Controller;
use particle_wire::api::{
    FunctionExit, FunctionState, FunctionStatus, Job, JobState, JobSummary, LaunchJob,
    ReserveFunctions, Reserved, StartFunctions, Started,
};
use particle_wire::client::{ApiClient, ClientError, Method};
use particle_wire::HttpError;
use records::Change;

/// The largest burst one request may ask for.
pub const MAX_FUNCTIONS: usize = 100_000;
/// Ended jobs kept for status queries.
const RETAINED_JOBS: usize = 256;
/// The port functions listen on unless the job says otherwise.
pub const DEFAULT_FUNCTION_PORT: u16 = 7000;
/// Ended jobs kept in the store (all retained ones stay in memory).
const STORED_ENDED_JOBS: usize = 32;

/// Node → its agent.
type Agents = BTreeMap<String, SocketAddr>;

struct JobRecord {
    job: Job,
    /// Wall clock, so a restarted controller still knows the job's age.
    started_unix_ms: u64,
    /// Node → its agent, for cancel and output.
    agents: Agents,
    /// Node → the agent instance that holds the job's functions there; an
    /// agent registering with another instance has lost them.
    instances: BTreeMap<String, String>,
    /// The next delta record's number.
    seq: u64,
}

impl JobRecord {
    fn elapsed(&self) -> Duration {
        Duration::from_millis(unix_ms().saturating_sub(self.started_unix_ms))
    }
}

#[derive(Default)]
struct Table {
    next: u64,
    jobs: BTreeMap<String, JobRecord>,
    ended: VecDeque<String>,
}

/// Every job the controller knows. With a store, each job is kept as its
/// own records ([`records`]): written at launch, then one small delta per
/// change, so a restarted controller (or the next leader) knows them: their
/// functions keep running on the agents, whose exit reports then find the
/// job again.
pub struct Jobs {
    table: Mutex<Table>,
    /// Bumped on every change, for waiters.
    changed: watch::Sender<u64>,
    store: Option<Arc<dyn Backend>>,
}

impl Default for Jobs {
    fn default() -> Self {
        Self::new(None)
    }
}

/// A store write failed: the client may retry (503) or not (500).
impl From<StoreError> for HttpError {
    fn from(e: StoreError) -> Self {
        let status = if e.is_unavailable() {
            StatusCode::SERVICE_UNAVAILABLE
        } else {
            StatusCode::INTERNAL_SERVER_ERROR
        };
        HttpError::new(status, format!("not stored, nothing changed: {e}"))
    }
}

impl Jobs {
    /// Jobs kept in `store` (call [`Self::reload`] to read it), or in memory only.
    pub fn new(store: Option<Arc<dyn Backend>>) -> Self {
        Self {
            table: Mutex::new(Table::default()),
            changed: watch::channel(0).0,
            store,
        }
    }

    /// Replaces what is in memory with what the store holds (at start, and
    /// when this controller becomes the leader).
    pub fn reload(&self) -> Result<(), StoreError> {
        let Some(store) = &self.store else {
            return Ok(());
        };
        let (jobs, next) = records::load(store.records("")?);
        let mut t = self.lock();
        *t = Table {
            next,
            ..Table::default()
        };
        for r in jobs {
            if r.job.state != JobState::Running {
                t.ended.push_back(r.job.id.clone());
            }
            t.jobs.insert(r.job.id.clone(), r);
        }
        let running = t.jobs.len() - t.ended.len();
        if !t.jobs.is_empty() {
            tracing::info!(jobs = t.jobs.len(), running, "restored jobs");
        }
        drop(t);
        self.changed.send_modify(|v| *v += 1);
        Ok(())
    }

    /// Moves the jobs file earlier versions wrote (`STATE.jobs`: the whole
    /// table in one JSON object, rewritten on every change) into the store,
    /// once: it is renamed `STATE.jobs.imported` after. Whether there was one.
    pub fn import_legacy(&self, file: &std::path::Path) -> Result<bool, StoreError> {
        #[derive(serde::Deserialize)]
        struct Legacy {
            next: u64,
            jobs: BTreeMap<String, LegacyRecord>,
        }
        #[derive(serde::Deserialize)]
        struct LegacyRecord {
            job: Job,
            started_unix_ms: u64,
            agents: Agents,
            #[serde(default)]
            instances: BTreeMap<String, String>,
        }
        let Ok(bytes) = std::fs::read(file) else {
            return Ok(false);
        };
        let legacy: Legacy =
            serde_json::from_slice(&bytes).map_err(|source| StoreError::Parse {
                path: file.to_path_buf(),
                source,
            })?;
        let mut puts = vec![records::next_record(legacy.next)];
        for (_, r) in legacy.jobs {
            puts.extend(records::all_records(&JobRecord {
                job: r.job,
                started_unix_ms: r.started_unix_ms,
                agents: r.agents,
                instances: r.instances,
                seq: 0,
            }));
        }
        self.persist(&[], puts)?;
        let done = file.with_extension("jobs.imported");
        std::fs::rename(file, &done).map_err(|source| StoreError::Write { path: done, source })?;
        tracing::info!(file = %file.display(), "imported the jobs file of an earlier version");
        Ok(true)
    }

    /// Writes to the store (if any), in the order calls are made under the table lock.
    fn persist(&self, delete: &[String], puts: Vec<Record>) -> Result<(), StoreError> {
        match &self.store {
            Some(store) => store.write_records(delete, puts),
            None => Ok(()),
        }
    }

    /// Applies `changes` (to functions still running) of job `id` and
    /// stores them (with its header if it ended); if they cannot be stored,
    /// undoes them. True if the job ended.
    fn change(&self, t: &mut Table, id: &str, changes: Vec<Change>) -> Result<bool, StoreError> {
        let Some(r) = t.jobs.get_mut(id) else {
            return Ok(false);
        };
        let changes: Vec<Change> = (changes.into_iter())
            .filter(|c| {
                (r.job.functions.get(c.rank)).is_some_and(|f| f.state == FunctionState::Running)
            })
            .collect();
        if changes.is_empty() {
            return Ok(false);
        }
        let mut puts = vec![records::delta_record(id, r.seq, &changes)];
        for c in &changes {
            if let Some(f) = r.job.functions.get_mut(c.rank) {
                c.apply(f);
            }
        }
        let ended = settle(r);
        if ended {
            puts.push(records::header_record(r));
        }
        let stored = self.persist(&[], puts);
        if let Err(e) = stored {
            // Undo: the caller answers with the error and the agent reports again.
            for c in &changes {
                if let Some(f) = r.job.functions.get_mut(c.rank) {
                    f.state = FunctionState::Running;
                    f.exit_code = None;
                    f.error = None;
                    f.reason = None;
                }
            }
            if ended {
                r.job.state = JobState::Running;
                r.job.duration_ms = None;
            }
            return Err(e);
        }
        r.seq += 1;
        if ended {
            self.retire(t, vec![id.to_string()]);
        }
        Ok(ended)
    }

    /// An agent (re)registered as `instance`: functions that an earlier
    /// instance on that node was running died with it.
    pub fn agent_registered(&self, node: &str, instance: &str) {
        let mut t = self.lock();
        let lost: Vec<(String, Vec<Change>)> = t
            .jobs
            .values()
            .filter(|r| r.job.state == JobState::Running)
            .filter(|r| {
                r.instances
                    .get(node)
                    .is_some_and(|held_by| held_by != instance)
            })
            .map(|r| {
                let changes = running_on(
                    r,
                    |n| n == node,
                    |_| format!("the agent on node {node} restarted; the function died with it"),
                );
                (r.job.id.clone(), changes)
            })
            .collect();
        self.apply_all(&mut t, lost);
    }

    /// Applies each job's changes, logging what could not be stored.
    fn apply_all(&self, t: &mut Table, changes: Vec<(String, Vec<Change>)>) {
        let mut any = false;
        for (id, c) in changes {
            any |= !c.is_empty();
            if let Err(e) = self.change(t, &id, c) {
                tracing::error!("job {id}: {e}");
            }
        }
        if any {
            self.changed.send_modify(|v| *v += 1);
        }
    }

    fn lock(&self) -> MutexGuard<'_, Table> {
        self.table.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Wakes waiters.
    fn notify(&self) {
        self.changed.send_modify(|v| *v += 1);
    }

    /// A new job id; its number is stored first, so no later controller
    /// (a restart, the next leader) hands it out again.
    fn new_id(&self) -> Result<String, StoreError> {
        let mut t = self.lock();
        let next = t.next + 1;
        self.persist(&[], vec![records::next_record(next)])?;
        t.next = next;
        let secs = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        // Unique across controller restarts (the time part) and within one (the counter).
        Ok(format!("j{:x}-{}", secs & 0xffff_ffff, next))
    }

    /// Registers a job about to start (stored first, so early exits, a
    /// restart or the next leader find it).
    fn register(&self, record: JobRecord) -> Result<(), StoreError> {
        let mut t = self.lock();
        self.persist(&[], records::launch_records(&record))?;
        t.jobs.insert(record.job.id.clone(), record);
        Ok(())
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

    /// Records functions that ended (reported by `node`'s agent). Stored
    /// before it returns: an error means nothing was recorded (the agent
    /// reports again).
    pub fn record_exits(&self, node: &str, exits: Vec<FunctionExit>) -> Result<(), StoreError> {
        let mut t = self.lock();
        // Per job: the changes, and each function's output (kept in memory only).
        type Reported = (Vec<Change>, Vec<(usize, String)>);
        let mut by_job: BTreeMap<String, Reported> = BTreeMap::new();
        for exit in exits {
            let Some(r) = t.jobs.get(&exit.job) else {
                continue; // a job this controller forgot (restart) or dropped
            };
            let Some(f) = r.job.functions.get(exit.rank) else {
                continue;
            };
            if f.node != node || f.state != FunctionState::Running {
                continue;
            }
            let entry = by_job.entry(exit.job.clone()).or_default();
            entry.0.push(Change {
                rank: exit.rank,
                state: FunctionState::Exited,
                code: exit.exit_code,
                error: exit.error,
                reason: exit.reason,
            });
            entry.1.push((exit.rank, exit.output));
        }
        let mut result = Ok(());
        for (id, (changes, outputs)) in by_job {
            match self.change(&mut t, &id, changes) {
                Ok(_) => {
                    if let Some(r) = t.jobs.get_mut(&id) {
                        for (rank, output) in outputs {
                            if let Some(f) = r.job.functions.get_mut(rank) {
                                f.output = Some(output);
                            }
                        }
                    }
                }
                Err(e) => result = Err(e),
            }
        }
        drop(t);
        self.notify();
        result
    }

    /// Functions on nodes that went away will never report: they are lost.
    pub fn nodes_lost(&self, nodes: &[String]) {
        let mut t = self.lock();
        let lost: Vec<(String, Vec<Change>)> = t
            .jobs
            .values()
            .filter(|r| r.job.state == JobState::Running)
            .map(|r| {
                let changes = running_on(
                    r,
                    |n| nodes.iter().any(|x| x == n),
                    |n| format!("node {n} went away"),
                );
                (r.job.id.clone(), changes)
            })
            .collect();
        self.apply_all(&mut t, lost);
    }

    /// Marks what still runs as cancelled; returns the job's agents to tell.
    fn cancel(&self, id: &str) -> Result<Option<(Job, Agents)>, StoreError> {
        let mut t = self.lock();
        let Some(r) = t.jobs.get_mut(id) else {
            return Ok(None);
        };
        if r.job.state != JobState::Running {
            return Ok(Some((r.job.clone(), BTreeMap::new())));
        }
        let duration = ms(r.elapsed());
        r.job.state = JobState::Cancelled;
        r.job.duration_ms = Some(duration);
        let header = records::header_record(r);
        r.job.state = JobState::Running;
        r.job.duration_ms = None;
        self.persist(&[], vec![header])?;
        for f in &mut r.job.functions {
            if f.state == FunctionState::Running {
                f.state = FunctionState::Cancelled;
            }
        }
        r.job.state = JobState::Cancelled;
        r.job.duration_ms = Some(duration);
        let out = (r.job.clone(), r.agents.clone());
        self.retire(&mut t, vec![id.to_string()]);
        drop(t);
        self.notify();
        Ok(Some(out))
    }

    /// Keeps the most recent ended jobs only (fewer of them in the store).
    fn retire(&self, t: &mut Table, ended: Vec<String>) {
        t.ended.extend(ended);
        if t.ended.len() > STORED_ENDED_JOBS {
            let old = t.ended[t.ended.len() - 1 - STORED_ENDED_JOBS].clone();
            if let Err(e) = self.persist(&[records::job_prefix(&old)], Vec::new()) {
                tracing::warn!("dropping job {old} from the store: {e}");
            }
        }
        while t.ended.len() > RETAINED_JOBS {
            if let Some(old) = t.ended.pop_front() {
                t.jobs.remove(&old);
            }
        }
    }
}

/// Each function of `r` still running on a node `on` names, lost with `why`.
fn running_on(
    r: &JobRecord,
    on: impl Fn(&str) -> bool,
    why: impl Fn(&str) -> String,
) -> Vec<Change> {
    r.job
        .functions
        .iter()
        .filter(|f| f.state == FunctionState::Running && on(&f.node))
        .map(|f| Change {
            rank: f.rank,
            state: FunctionState::Lost,
            code: None,
            error: Some(why(&f.node)),
            reason: None,
        })
        .collect()
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
        .cancel(id)?
        .ok_or_else(|| HttpError::new(StatusCode::NOT_FOUND, format!("unknown job {id:?}")))?;
    let agents: Vec<(String, SocketAddr)> = agents.into_iter().collect();
    agent_calls::release_all(c, id, &agents).await;
    Ok(job)
}

#[cfg(test)]
mod tests;
