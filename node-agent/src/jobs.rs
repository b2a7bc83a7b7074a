//! The agent's side of a burst: endpoints reserved for a job's ranks, the
//! functions started in them, their output kept, their exits reported to the
//! controller in batches, and their endpoints handed back to the pool (the
//! recycler checks and reuses them) as each function ends.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::net::Ipv4Addr;
use std::os::fd::AsFd;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use axum::http::StatusCode;
use particle_net::PooledEndpoint;
use particle_wire::api::{
    FunctionExit, FunctionExits, ReserveFunctions, Reserved, ReservedEndpoint, RuntimeKind,
    StartFailure, StartFunctions, Started,
};
use particle_wire::function_env::FunctionEnv;
use particle_wire::HttpError;
use tokio::io::{AsyncRead, AsyncReadExt};
use tokio::sync::{mpsc, oneshot};

use crate::claims::{Claims, Origin};
use crate::launcher::{self, FunctionSpec, Runtime};
use particle_wire::client::{ApiClient, Method};

/// Output kept per function; beyond it the rest is dropped (and said so).
const MAX_OUTPUT: usize = 1 << 20;
/// Output sent with an exit report (its end).
const REPORTED_OUTPUT: usize = 16 << 10;
/// Ended jobs whose output stays readable.
const RETAINED_JOBS: usize = 64;

/// How long a reserve waits for a tenant the controller knows to reach this node.
const NEW_TENANT_WAIT: std::time::Duration = std::time::Duration::from_secs(10);

/// How this node starts functions.
#[derive(Debug, Clone)]
pub struct LaunchSettings {
    pub node: String,
    /// The OCI runtime for jobs that ask for one (runc); `None`: refuse them.
    pub oci_runtime: Option<PathBuf>,
    /// Where OCI bundles are written.
    pub bundle_dir: PathBuf,
    /// This agent run's identity ([`particle_wire::api::RegisterNode::instance`]).
    pub instance: String,
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

struct NodeJob {
    functions: BTreeMap<usize, Slot>,
    started: bool,
    running: usize,
}

#[derive(Default)]
struct Table {
    jobs: HashMap<String, NodeJob>,
    ended: VecDeque<String>,
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
        launcher::resolve(&req.program).map_err(|e| {
            error(
                StatusCode::BAD_REQUEST,
                format!("on node {}: {e}", self.settings.node),
            )
        })?;
        if lock(&self.table).jobs.contains_key(job) {
            return Err(error(
                StatusCode::CONFLICT,
                format!("job {job} is already reserved here"),
            ));
        }
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
        lock(&self.table).jobs.insert(
            job.to_string(),
            NodeJob {
                functions,
                started: false,
                running: 0,
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
        let clock = std::time::Instant::now();
        let mut extra: Vec<(String, String)> = req.command.env.clone().into_iter().collect();
        let (mut started, mut failed) = (Vec::new(), Vec::new());
        for (&rank, slot) in node_job.functions.iter_mut() {
            let Some(endpoint) = slot.endpoint.take() else {
                continue;
            };
            let contract = FunctionEnv {
                job: job.to_string(),
                rank,
                size: req.size,
                node: self.settings.node.clone(),
                address: Some(slot.address.to_string()),
                peers: req.peers.clone(),
            };
            let mut env = contract.vars();
            env.append(&mut extra.clone());
            let name = format!("{job}-{rank}");
            let spec = FunctionSpec {
                argv: &req.command.argv,
                env: &env,
                netns: Some(endpoint.netns().as_fd()),
                name: &name,
                bundle_dir: &self.settings.bundle_dir,
            };
            match launcher::spawn(&spec, &runtime) {
                Ok(child) => {
                    let (kill, killed) = oneshot::channel();
                    slot.kill = Some(kill);
                    node_job.running += 1;
                    started.push(rank);
                    let jobs = self.clone();
                    let claims = self.claims.clone();
                    let watch = FunctionWatch {
                        job: job.to_string(),
                        rank,
                        output: slot.output.clone(),
                        bundle: matches!(runtime, Runtime::Oci { .. })
                            .then(|| self.settings.bundle_dir.join(&name)),
                    };
                    tokio::spawn(async move {
                        let exit = watch.run(child, killed, endpoint, &claims).await;
                        jobs.ended(exit);
                    });
                }
                Err(e) => failed.push(StartFailure {
                    rank,
                    error: e.to_string(),
                }),
            }
        }
        tracing::debug!(
            job,
            n = started.len(),
            ms = clock.elapsed().as_secs_f64() * 1e3,
            "started"
        );
        extra.clear();
        if node_job.running == 0 {
            Self::retire(&mut table, job);
        }
        Ok(Started { started, failed })
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

/// One running function, from start to exit report.
struct FunctionWatch {
    job: String,
    rank: usize,
    output: Arc<Mutex<Output>>,
    bundle: Option<PathBuf>,
}

impl FunctionWatch {
    async fn run(
        self,
        mut child: tokio::process::Child,
        killed: oneshot::Receiver<()>,
        endpoint: PooledEndpoint,
        claims: &Claims,
    ) -> FunctionExit {
        let stdout = child.stdout.take();
        let stderr = child.stderr.take();
        let collect =
            async { tokio::join!(capture(stdout, &self.output), capture(stderr, &self.output)) };
        let status = tokio::select! {
            (status, _) = async { tokio::join!(child.wait(), collect) } => status.map_err(|e| e.to_string()),
            _ = killed => {
                let _ = child.kill().await;
                Err("cancelled".to_string())
            }
        };
        // The function is gone (and its PID namespace with it): the endpoint
        // goes back to the pool, whose recycler checks it before reuse.
        claims.forget_netns(&endpoint);
        drop(endpoint);
        if let Some(bundle) = &self.bundle {
            let _ = std::fs::remove_dir_all(bundle);
        }
        let out = lock(&self.output);
        let tail_from = out.bytes.len().saturating_sub(REPORTED_OUTPUT);
        let mut output = String::from_utf8_lossy(&out.bytes[tail_from..]).into_owned();
        if out.truncated {
            output.push_str("\n[output truncated by the agent]\n");
        }
        let (exit_code, error) = match status {
            Ok(s) => (s.code(), None),
            Err(e) => (None, Some(e)),
        };
        FunctionExit {
            job: self.job,
            rank: self.rank,
            exit_code,
            error,
            output,
        }
    }
}

/// Appends a pipe's bytes to the function's output, up to [`MAX_OUTPUT`].
async fn capture(pipe: Option<impl AsyncRead + Unpin>, output: &Mutex<Output>) {
    let Some(mut pipe) = pipe else { return };
    let mut buf = [0u8; 4096];
    loop {
        match pipe.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => {
                let mut out = lock(output);
                let room = MAX_OUTPUT.saturating_sub(out.bytes.len());
                out.bytes.extend_from_slice(&buf[..n.min(room)]);
                if n > room {
                    out.truncated = true;
                }
            }
        }
    }
}

/// Sends exit reports to the controller in batches (whatever arrived while
/// the previous batch was in flight), retrying until it answers.
pub async fn report_exits(
    client: ApiClient,
    node: String,
    mut reports: mpsc::UnboundedReceiver<FunctionExit>,
) {
    let path = format!("/v1/agents/{node}/exits");
    while let Some(first) = reports.recv().await {
        let mut batch = FunctionExits { exits: vec![first] };
        // Let a burst's exits gather into one request.
        tokio::time::sleep(Duration::from_millis(10)).await;
        while let Ok(more) = reports.try_recv() {
            batch.exits.push(more);
        }
        let mut backoff = Duration::from_millis(100);
        while let Err(e) = client.send(Method::POST, &path, Some(&batch)).await {
            tracing::warn!("reporting {} exits: {e}", batch.exits.len());
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(Duration::from_secs(2));
            while let Ok(more) = reports.try_recv() {
                batch.exits.push(more);
            }
        }
    }
}
