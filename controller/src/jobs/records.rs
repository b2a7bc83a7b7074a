//! How jobs are kept in the store: small records, each written once or
//! appended, never the whole table and never every function on a change.
//!
//! Per job `ID`, under `jobs/ID/`:
//! - `h`: the header (tenant, state, counts, times, agents); rewritten when
//!   the job's own fields change (started, ended, cancelled);
//! - `f/NNNNN`: its functions as registered at launch (node, address,
//!   warm/cold), [`CHUNK`] per record, written once;
//! - `d/NNNNNNNN`: a delta per change (exits reported in one batch, a
//!   node's functions lost): exit code 0 with no error is just a rank.
//!
//! And `next`: the last job number handed out (written before the id is
//! used, so two leaders in a row never hand out the same one). Output is
//! never stored (agents keep it, bounded).

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, SocketAddr};

use serde::{Deserialize, Serialize};

use super::{settle, FunctionState, FunctionStatus, Job, JobRecord, JobState};
use crate::store::Record;

/// Functions per `f/` record (about 100 kB of JSON).
pub(super) const CHUNK: usize = 4096;

#[derive(Serialize, Deserialize)]
struct Header {
    tenant: String,
    state: JobState,
    functions: usize,
    warm: usize,
    bound: usize,
    cold: usize,
    launch_ms: f64,
    duration_ms: Option<f64>,
    started_unix_ms: u64,
    /// In placement order: a function's `n` indexes this.
    agents: Vec<(String, SocketAddr)>,
    instances: BTreeMap<String, String>,
}

fn is_false(b: &bool) -> bool {
    !*b
}

/// A function as registered (before its start).
#[derive(Serialize, Deserialize)]
struct StoredFunction {
    n: usize,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    a: Option<Ipv4Addr>,
    #[serde(default, skip_serializing_if = "is_false")]
    cold: bool,
    #[serde(default, skip_serializing_if = "is_false")]
    bound: bool,
    /// Set only when it never ran (no endpoint).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    e: Option<String>,
}

/// What became of one function.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub(super) struct Change {
    pub rank: usize,
    pub state: FunctionState,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub code: Option<i32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

impl Change {
    pub(super) fn apply(&self, f: &mut FunctionStatus) {
        f.state = self.state;
        f.exit_code = self.code;
        f.error = self.error.clone();
        f.reason = self.reason.clone();
    }
}

/// A batch of changes: clean exits as bare ranks, the rest in full.
#[derive(Serialize, Deserialize, Default)]
struct Delta {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    ok: Vec<usize>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    other: Vec<Change>,
}

fn encode<T: Serialize>(value: &T) -> Vec<u8> {
    // Plain data (strings, numbers, maps with string keys): cannot fail.
    serde_json::to_vec(value).unwrap_or_default()
}

pub(super) fn job_prefix(id: &str) -> String {
    format!("jobs/{id}/")
}

pub(super) fn next_record(next: u64) -> Record {
    ("next".into(), encode(&next))
}

pub(super) fn header_record(r: &JobRecord) -> Record {
    let header = Header {
        tenant: r.job.tenant.clone(),
        state: r.job.state,
        functions: r.job.functions.len(),
        warm: r.job.warm,
        bound: r.job.bound,
        cold: r.job.cold,
        launch_ms: r.job.launch_ms,
        duration_ms: r.job.duration_ms,
        started_unix_ms: r.started_unix_ms,
        agents: r.agents.iter().map(|(n, a)| (n.clone(), *a)).collect(),
        instances: r.instances.clone(),
    };
    (format!("jobs/{}/h", r.job.id), encode(&header))
}

/// The functions' records, then the header (a reader seeing the header sees them all).
pub(super) fn launch_records(r: &JobRecord) -> Vec<Record> {
    let index: BTreeMap<&str, usize> = (r.agents.iter().enumerate())
        .map(|(i, (node, _))| (node.as_str(), i))
        .collect();
    let mut records: Vec<Record> = r
        .job
        .functions
        .chunks(CHUNK)
        .enumerate()
        .map(|(i, chunk)| {
            let stored: Vec<StoredFunction> = chunk
                .iter()
                .map(|f| StoredFunction {
                    n: index.get(f.node.as_str()).copied().unwrap_or(usize::MAX),
                    a: f.address,
                    cold: f.cold,
                    bound: f.bound,
                    e: (f.state != FunctionState::Running)
                        .then(|| f.error.clone())
                        .flatten(),
                })
                .collect();
            (format!("jobs/{}/f/{i:05}", r.job.id), encode(&stored))
        })
        .collect();
    records.push(header_record(r));
    records
}

/// Every record of a job in any state (as [`load`] reads it back): its
/// functions as launched, one delta with what became of them, its header.
pub(super) fn all_records(r: &JobRecord) -> Vec<Record> {
    let mut launched = JobRecord {
        job: r.job.clone(),
        started_unix_ms: r.started_unix_ms,
        agents: r.agents.clone(),
        instances: r.instances.clone(),
        seq: 0,
    };
    let mut changes = Vec::new();
    for f in &mut launched.job.functions {
        let as_launched = f.state == FunctionState::Running
            || (f.state == FunctionState::Failed && f.error.is_some() && f.exit_code.is_none());
        if as_launched {
            continue;
        }
        changes.push(Change {
            rank: f.rank,
            state: f.state,
            code: f.exit_code,
            error: f.error.take(),
            reason: f.reason.take(),
        });
        f.state = FunctionState::Running;
    }
    let mut records = launch_records(&launched);
    records.pop(); // the header, as launched
    if !changes.is_empty() {
        records.push(delta_record(&r.job.id, 0, &changes));
    }
    records.push(header_record(r));
    records
}

pub(super) fn delta_record(id: &str, seq: u64, changes: &[Change]) -> Record {
    let mut delta = Delta::default();
    for c in changes {
        let clean = c.state == FunctionState::Exited
            && c.code == Some(0)
            && c.error.is_none()
            && c.reason.is_none();
        if clean {
            delta.ok.push(c.rank);
        } else {
            delta.other.push(c.clone());
        }
    }
    (format!("jobs/{id}/d/{seq:08}"), encode(&delta))
}

/// Rebuilds the jobs from their records (sorted by key); the `next` value.
pub(super) fn load(records: Vec<Record>) -> (Vec<JobRecord>, u64) {
    let mut next = 0;
    let mut by_job: BTreeMap<String, Vec<(String, Vec<u8>)>> = BTreeMap::new();
    for (key, value) in records {
        if key == "next" {
            next = serde_json::from_slice(&value).unwrap_or(0);
        } else if let Some(rest) = key.strip_prefix("jobs/") {
            if let Some((id, part)) = rest.split_once('/') {
                by_job
                    .entry(id.to_string())
                    .or_default()
                    .push((part.to_string(), value));
            }
        }
    }
    let mut jobs: Vec<JobRecord> = by_job
        .into_iter()
        .filter_map(|(id, parts)| match rebuild(&id, parts) {
            Ok(r) => Some(r),
            Err(e) => {
                tracing::warn!("stored job {id} skipped: {e}");
                None
            }
        })
        .collect();
    jobs.sort_by_key(|r| r.started_unix_ms);
    (jobs, next)
}

fn rebuild(id: &str, parts: Vec<(String, Vec<u8>)>) -> Result<JobRecord, String> {
    let header = parts
        .iter()
        .find(|(p, _)| p == "h")
        .ok_or("no header (its launch never finished)")?;
    let header: Header = serde_json::from_slice(&header.1).map_err(|e| e.to_string())?;
    let mut functions = Vec::with_capacity(header.functions);
    let mut seq = 0;
    let mut deltas = Vec::new();
    for (part, value) in &parts {
        if part.starts_with("f/") {
            let chunk: Vec<StoredFunction> =
                serde_json::from_slice(value).map_err(|e| e.to_string())?;
            for f in chunk {
                let node = header
                    .agents
                    .get(f.n)
                    .map(|(n, _)| n.clone())
                    .ok_or("a function on no node")?;
                functions.push(FunctionStatus {
                    rank: functions.len(),
                    node,
                    address: f.a,
                    state: if f.e.is_some() {
                        FunctionState::Failed
                    } else {
                        FunctionState::Running
                    },
                    exit_code: None,
                    cold: f.cold,
                    bound: f.bound,
                    error: f.e,
                    output: None,
                    reason: None,
                });
            }
        } else if let Some(n) = part.strip_prefix("d/") {
            seq = seq.max(n.parse::<u64>().unwrap_or(0) + 1);
            deltas.push(serde_json::from_slice::<Delta>(value).map_err(|e| e.to_string())?);
        }
    }
    if functions.len() != header.functions {
        return Err(format!(
            "{} of its {} functions stored",
            functions.len(),
            header.functions
        ));
    }
    for delta in deltas {
        let clean = delta.ok.into_iter().map(|rank| Change {
            rank,
            state: FunctionState::Exited,
            code: Some(0),
            error: None,
            reason: None,
        });
        for change in clean.chain(delta.other) {
            if let Some(f) = functions
                .get_mut(change.rank)
                .filter(|f| f.state == FunctionState::Running)
            {
                change.apply(f);
            }
        }
    }
    if header.state == JobState::Cancelled {
        for f in functions
            .iter_mut()
            .filter(|f| f.state == FunctionState::Running)
        {
            f.state = FunctionState::Cancelled;
        }
    }
    let mut record = JobRecord {
        job: Job {
            id: id.to_string(),
            tenant: header.tenant,
            state: header.state,
            functions,
            warm: header.warm,
            bound: header.bound,
            cold: header.cold,
            launch_ms: header.launch_ms,
            duration_ms: header.duration_ms,
        },
        started_unix_ms: header.started_unix_ms,
        agents: header.agents.into_iter().collect(),
        instances: header.instances,
        seq,
    };
    // Its last exits may have been stored before its header said it ended.
    settle(&mut record);
    Ok(record)
}
