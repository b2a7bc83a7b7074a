//! The agent's side of a burst: endpoints reserved for a job's ranks, the
//! functions started in them, their output kept, their exits reported to the
//! controller in batches, and their endpoints handed back to the pool (the
//! recycler checks and reuses them) as each function ends. Each function
//! runs in its sandbox ([`crate::sandbox`]); a tenant's share of the node
//! is checked at reserve, before anything is claimed ([`quota`]).

mod quota;
mod watch;

pub use watch::report_exits;

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::net::Ipv4Addr;
use std::os::fd::AsFd;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use axum::http::StatusCode;
use particle_net::PooledEndpoint;
use particle_wire::api::{
    FunctionExit, ReserveFunctions, Reserved, ReservedEndpoint, RuntimeKind, StartFailure,
    StartFunctions, Started,
};
use particle_wire::function_env::{FunctionEnv, JobPeers};
use particle_wire::HttpError;
use tokio::sync::{mpsc, oneshot};

use crate::claims::{Claims, Origin};
use crate::launcher::{self, FunctionSpec, PeersFile, Runtime};
use crate::sandbox::{Limits, Sandbox};
use watch::FunctionWatch;

/// Output kept per function; beyond it the rest is dropped (and said so).
const MAX_OUTPUT: usize = 1 << 20;
/// Output sent with an exit report (its end).
const REPORTED_OUTPUT: usize = 16 << 10;
/// Ended jobs whose output stays readable.
const RETAINED_JOBS: usize = 64;

/// How long a reserve waits for a tenant the controller knows to reach this node.
const NEW_TENANT_WAIT: std::time::Duration = std::time::Duration::from_secs(10);

/// How this node starts functions.
#[derive(Clone)]
pub struct LaunchSettings {
    pub node: String,
    /// The OCI runtime for jobs that ask for one (runc); `None`: refuse them.
    pub oci_runtime: Option<PathBuf>,
    /// Where OCI bundles are written.
    pub bundle_dir: PathBuf,
    /// Where large jobs' peer files are written (searchable by functions).
    pub peers_dir: PathBuf,
    /// This agent run's identity ([`particle_wire::api::RegisterNode::instance`]).
    pub instance: String,
    /// Images, limits, id ranges and quotas of its functions.
    pub sandbox: Arc<Sandbox>,
}

#[derive(Default)]
struct Output {
    bytes: Vec<u8>,
    truncated: bool,
}

struct Slot {
    /// Held from reserve to start; the function's task owns it afterwards.
    endpoint: Option<PooledEndpoint>,
    address: Ipv4Addr,
    output: Arc<Mutex<Output>>,
    kill: Option<oneshot::Sender<()>>,
}

/// What every function of one start call shares.
struct Launch<'a> {
    job: &'a str,
    req: &'a StartFunctions,
    runtime: &'a Runtime,
    peers: &'a JobPeers,
    peers_file: Option<Arc<PeersFile>>,
}

struct NodeJob {
    tenant: String,
    /// Its functions' root and limits, settled at reserve.
    root: PathBuf,
    limits: Limits,
    output_dir: Option<PathBuf>,
    functions: BTreeMap<usize, Slot>,
    started: bool,
    running: usize,
    /// The job's peer list, when too long for the environment.
    peers_file: Option<Arc<PeersFile>>,
}

#[derive(Default)]
struct Table {
    jobs: HashMap<String, NodeJob>,
    ended: VecDeque<String>,
    /// Functions of reserves in flight, by tenant (counted by the quota).
    pending: HashMap<String, usize>,
}

/// Every job with functions on this node.
pub struct NodeJobs {
    claims: Arc<Claims>,
    settings: LaunchSettings,
    table: Mutex<Table>,
    exits: mpsc::UnboundedSender<FunctionExit>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

fn error(status: StatusCode, message: impl Into<String>) -> HttpError {
    HttpError::new(status, message)
}

impl NodeJobs {
    /// The table, and the receiving end of its exit reports (see [`report_exits`]).
    pub fn new(
        claims: Arc<Claims>,
        settings: LaunchSettings,
    ) -> (Arc<Self>, mpsc::UnboundedReceiver<FunctionExit>) {
        let (exits, reports) = mpsc::unbounded_channel();
        let jobs = Arc::new(Self {
            claims,
            settings,
            table: Mutex::new(Table::default()),
            exits,
        });
        (jobs, reports)
    }

    /// Functions running on this node.
    pub fn running(&self) -> usize {
        lock(&self.table).jobs.values().map(|j| j.running).sum()
    }

    fn runtime(&self, kind: RuntimeKind) -> Result<Runtime, HttpError> {
        match kind {
            RuntimeKind::Builtin => Ok(Runtime::Builtin),
            RuntimeKind::Oci => self
                .settings
                .oci_runtime
                .clone()
                .map(|binary| Runtime::Oci { binary })
                .ok_or_else(|| {
                    error(
                        StatusCode::BAD_REQUEST,
                        format!("node {} has no OCI runtime configured", self.settings.node),
                    )
                }),
        }
    }

    /// Claims an endpoint per rank (blocks only to build cold endpoints).
    pub fn reserve(&self, job: &str, req: ReserveFunctions) -> Result<Reserved, HttpError> {
        self.runtime(req.runtime)?;
        let node = &self.settings.node;
        let bad = |e: &dyn std::fmt::Display| {
            error(StatusCode::BAD_REQUEST, format!("on node {node}: {e}"))
        };
        let sandbox = &self.settings.sandbox;
        let root = sandbox
            .root_for(&req.tenant, req.image.as_deref())
            .map_err(|e| bad(&e))?;
        let limits = sandbox.limits(&req.limits).map_err(|e| bad(&e))?;
        let output_dir = match &req.output_dir {
            Some(d) => Some(sandbox.output_dir(&root, d).map_err(|e| bad(&e))?),
            None => None,
        };
        launcher::resolve(&root, &req.program).map_err(|e| bad(&e))?;
        if lock(&self.table).jobs.contains_key(job) {
            return Err(error(
                StatusCode::CONFLICT,
                format!("job {job} is already reserved here"),
            ));
        }
        // Counted as the tenant's from here; given back whatever happens.
        let pending = self.admit(&req.tenant, req.ranks.len())?;
        let clock = std::time::Instant::now();
        // The controller knows the tenant; this node may still be building it.
        self.claims.wait_for_tenant(&req.tenant, NEW_TENANT_WAIT);
        let claimed = self
            .claims
            .claim_burst(&req.tenant, req.ranks.len())
            .map_err(|e| error(StatusCode::BAD_REQUEST, e))?;
        tracing::debug!(
            job,
            n = req.ranks.len(),
            ms = clock.elapsed().as_secs_f64() * 1e3,
            "reserved"
        );
        let mut endpoints = Vec::with_capacity(req.ranks.len());
        let mut functions = BTreeMap::new();
        for (rank, result) in req.ranks.iter().zip(claimed) {
            match result {
                Ok((ep, origin)) => {
                    // Its function may ask the agent for warm connections.
                    self.claims.remember_netns(&ep, &req.tenant);
                    let address = ep.address().ip();
                    endpoints.push(ReservedEndpoint {
                        rank: *rank,
                        address: Some(address),
                        cold: origin == Origin::Cold,
                        bound: origin == Origin::Bound,
                        error: None,
                    });
                    functions.insert(
                        *rank,
                        Slot {
                            endpoint: Some(ep),
                            address,
                            output: Arc::default(),
                            kill: None,
                        },
                    );
                }
                Err(e) => endpoints.push(ReservedEndpoint {
                    rank: *rank,
                    address: None,
                    cold: true,
                    bound: false,
                    error: Some(e),
                }),
            }
        }
        let mut table = lock(&self.table);
        pending.settle(&mut table);
        table.jobs.insert(
            job.to_string(),
            NodeJob {
                tenant: req.tenant.clone(),
                root,
                limits,
                output_dir,
                functions,
                started: false,
                running: 0,
                peers_file: None,
            },
        );
        Ok(Reserved {
            endpoints,
            instance: Some(self.settings.instance.clone()),
        })
    }

    /// Starts every reserved function of `job`; must run inside the tokio
    /// runtime (the children are reaped by it).
    pub fn start(self: &Arc<Self>, job: &str, req: StartFunctions) -> Result<Started, HttpError> {
        let runtime = self.runtime(req.runtime)?;
        // Once per job, not per function: 10,000 peers are 200 KB.
        let peers = JobPeers::new(&req.peers);
        let peers_file = PeersFile::write(&self.settings.peers_dir, &format!("job-{job}"), &peers)
            .map_err(|e| {
                error(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    format!("writing job {job}'s peer file: {e}"),
                )
            })?;
        let mut table = lock(&self.table);
        let node_job = table.jobs.get_mut(job).ok_or_else(|| {
            error(
                StatusCode::NOT_FOUND,
                format!("job {job} was not reserved here"),
            )
        })?;
        if node_job.started {
            return Err(error(
                StatusCode::CONFLICT,
                format!("job {job} was already started"),
            ));
        }
        node_job.started = true;
        // runc mounts it after `spawn` returns: kept until the job retires.
        node_job.peers_file = peers_file.map(Arc::new);
        let clock = std::time::Instant::now();
        let launch = Launch {
            job,
            req: &req,
            runtime: &runtime,
            peers: &peers,
            peers_file: node_job.peers_file.clone(),
        };
        let (mut started, mut failed) = (Vec::new(), Vec::new());
        let ranks: Vec<usize> = node_job.functions.keys().copied().collect();
        for rank in ranks {
            match self.start_one(&launch, node_job, rank) {
                Ok(true) => started.push(rank),
                Ok(false) => {}
                Err(error) => failed.push(StartFailure { rank, error }),
            }
        }
        tracing::debug!(
            job,
            n = started.len(),
            ms = clock.elapsed().as_secs_f64() * 1e3,
            "started"
        );
        if node_job.running == 0 {
            Self::retire(&mut table, job);
        }
        Ok(Started { started, failed })
    }

    /// Starts function `rank` of `node_job` in its reserved endpoint:
    /// `Ok(false)` if it has none (its reserve failed).
    fn start_one(
        self: &Arc<Self>,
        launch: &Launch<'_>,
        node_job: &mut NodeJob,
        rank: usize,
    ) -> Result<bool, String> {
        let Some(slot) = node_job.functions.get_mut(&rank) else {
            return Ok(false);
        };
        let Some(endpoint) = slot.endpoint.take() else {
            return Ok(false);
        };
        let job = launch.job;
        let contract = FunctionEnv {
            job: job.to_string(),
            rank,
            size: launch.req.size,
            node: self.settings.node.clone(),
            address: Some(slot.address.to_string()),
            peers: Arc::from([]),
        };
        let mut env = contract.vars_with(launch.peers);
        env.extend(
            launch
                .req
                .command
                .env
                .iter()
                .map(|(k, v)| (k.clone(), v.clone())),
        );
        let name = format!("{job}-{rank}");
        let sandbox = self
            .settings
            .sandbox
            .prepare(
                &name,
                &node_job.tenant,
                node_job.root.clone(),
                node_job.limits,
            )
            .map_err(|e| e.to_string())?
            .with_writable(node_job.output_dir.clone());
        let spec = FunctionSpec {
            argv: &launch.req.command.argv,
            env: &env,
            netns: Some(endpoint.netns().as_fd()),
            name: &name,
            bundle_dir: &self.settings.bundle_dir,
            isolation: sandbox.isolation(),
            peers_file: launch.peers_file.as_deref().map(PeersFile::path),
        };
        let child = launcher::spawn(&spec, launch.runtime).map_err(|e| e.to_string())?;
        let (kill, killed) = oneshot::channel();
        slot.kill = Some(kill);
        node_job.running += 1;
        let jobs = self.clone();
        let claims = self.claims.clone();
        let watch = FunctionWatch {
            job: job.to_string(),
            rank,
            output: slot.output.clone(),
            bundle: matches!(launch.runtime, Runtime::Oci { .. })
                .then(|| self.settings.bundle_dir.join(&name)),
            sandbox,
        };
        tokio::spawn(async move {
            let exit = watch.run(child, killed, endpoint, &claims).await;
            jobs.ended(exit);
        });
        Ok(true)
    }

    /// A function ended: count it, report it.
    fn ended(&self, exit: FunctionExit) {
        let mut table = lock(&self.table);
        if let Some(j) = table.jobs.get_mut(&exit.job) {
            j.running = j.running.saturating_sub(1);
            if let Some(slot) = j.functions.get_mut(&exit.rank) {
                slot.kill = None;
            }
            if j.running == 0 {
                let job = exit.job.clone();
                Self::retire(&mut table, &job);
            }
        }
        drop(table);
        let _ = self.exits.send(exit);
    }

    fn retire(table: &mut Table, job: &str) {
        if let Some(j) = table.jobs.get_mut(job) {
            j.peers_file = None;
        }
        table.ended.push_back(job.to_string());
        while table.ended.len() > RETAINED_JOBS {
            if let Some(old) = table.ended.pop_front() {
                table.jobs.remove(&old);
            }
        }
    }

    /// Kills what runs of `job` and returns its unstarted endpoints. Idempotent.
    pub fn cancel(&self, job: &str) -> usize {
        let mut table = lock(&self.table);
        let Some(j) = table.jobs.get_mut(job) else {
            return 0;
        };
        let mut killed = 0;
        for slot in j.functions.values_mut() {
            // Dropping an unstarted endpoint returns it to the pool.
            slot.endpoint = None;
            if let Some(kill) = slot.kill.take() {
                let _ = kill.send(());
                killed += 1;
            }
        }
        if !j.started {
            j.started = true;
            Self::retire(&mut table, job);
        }
        killed
    }

    /// What function `rank` of `job` printed, from byte `offset`.
    pub fn output(&self, job: &str, rank: usize, offset: usize) -> Result<Vec<u8>, HttpError> {
        let table = lock(&self.table);
        let slot = table
            .jobs
            .get(job)
            .and_then(|j| j.functions.get(&rank))
            .ok_or_else(|| {
                error(
                    StatusCode::NOT_FOUND,
                    format!("no function {rank} of job {job} on this node"),
                )
            })?;
        let out = lock(&slot.output);
        Ok(out.bytes.get(offset..).unwrap_or_default().to_vec())
    }
}
