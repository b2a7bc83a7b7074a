//! `particle bench failover`: how long a cluster of controllers on etcd
//! goes without a leader when the leader is SIGKILLed mid-job, and whether
//! any job is lost. A local cluster with three controllers on a
//! three-member etcd ([`particle_cluster::Ha`]); each round launches a
//! burst (sleeping functions), kills the leading controller while the
//! burst runs, and times how long until another controller accepts a new
//! job (a write fenced in etcd, through the same client users have, which
//! follows the leader). The killed controller is started again (it comes
//! back a follower). A job is lost if it does not end `succeeded`.

use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use particle_cluster::{tenants, Ha, LocalCluster, Options};
use particle_wire::api::{CreateTenant, Job, JobState, LaunchJob};
use particle_wire::client::{ApiClient, Method};
use serde::Serialize;

#[derive(clap::Args, Debug, Clone)]
pub struct FailoverArgs {
    /// Nodes (namespaced hosts).
    #[arg(long, default_value_t = 3)]
    pub nodes: usize,
    /// Leaders killed (one per burst); the median is reported.
    #[arg(long, default_value_t = 5)]
    pub kills: usize,
    /// Functions per burst.
    #[arg(long, default_value_t = 300)]
    pub functions: usize,
    /// How long each burst's functions run (s): the kill lands while they do.
    #[arg(long, default_value_t = 8)]
    pub sleep_s: u64,
    /// One JSON object instead of the table.
    #[arg(long)]
    pub json: bool,
}

#[derive(Serialize, Debug)]
pub struct FailoverReport {
    pub nodes: usize,
    pub controllers: usize,
    pub etcd_members: usize,
    pub functions: usize,
    /// Per kill: from the SIGKILL to a new job accepted by another controller.
    pub takeover_s: Vec<f64>,
    pub takeover_s_p50: f64,
    pub takeover_s_max: f64,
    /// Bursts launched (one per kill) plus the probe jobs launched after each takeover.
    pub jobs: usize,
    /// Of those, jobs that did not end `succeeded`.
    pub jobs_lost: usize,
    pub lease_ttl_s: i64,
}

const TENANT: &str = "failover";

fn launch_request(functions: usize, argv: &[&str]) -> LaunchJob {
    LaunchJob::of(
        TENANT,
        functions,
        argv.iter().map(|a| a.to_string()).collect(),
    )
}

/// The leading controller's pid, asking each one.
async fn leader_pid(cluster: &LocalCluster, token: &str) -> Result<i32> {
    let dial = cluster.fabric().netns.try_clone()?.tcp_dialer();
    for (addr, pid) in cluster.controller_pids() {
        let api = ApiClient::new(addr, token.to_string(), dial.clone());
        let answer: Result<serde_json::Value, _> =
            api.call::<(), _>(Method::GET, "/leader", None).await;
        if answer.is_ok_and(|a| a["is_leader"] == true) {
            return Ok(pid);
        }
    }
    bail!("no controller leads")
}

/// Waits for job `id` to end; whether it succeeded.
async fn succeeded(api: &ApiClient, id: &str, within: Duration) -> bool {
    let deadline = Instant::now() + within;
    while Instant::now() < deadline {
        let job: Result<Job, _> = api
            .call::<(), _>(Method::GET, &format!("/v1/jobs/{id}?wait_s=5"), None)
            .await;
        match job {
            Ok(job) if job.state != JobState::Running => return job.state == JobState::Succeeded,
            _ => tokio::time::sleep(Duration::from_millis(200)).await,
        }
    }
    false
}

pub fn run(args: &FailoverArgs) -> Result<FailoverReport> {
    anyhow::ensure!(
        nix::unistd::geteuid().is_root(),
        "the benchmark builds network namespaces: run it as root"
    );
    anyhow::ensure!(
        args.kills >= 1 && args.functions >= 1,
        "need a kill and a function"
    );
    let controllers = 3;
    let mut cluster = LocalCluster::start(&Options {
        ha: Some(Ha { controllers }),
        ..Options::processes(args.nodes, "10.238.0.0/24", 7761, 16, 8)
    })?;
    let api = cluster.api()?;
    let token = api.token().to_string();
    let runtime = tokio::runtime::Runtime::new()?;
    runtime.block_on(tenants::create(
        &api,
        &CreateTenant {
            name: TENANT.into(),
            vni: 4242,
            subnet: "10.120.0.0/16".into(),
            block_prefix: Some(21),
            warm_per_node: Some(16),
        },
    ))?;
    let sleep = args.sleep_s.to_string();
    let burst = launch_request(args.functions, &["/bin/sleep", &sleep]);
    let probe = launch_request(1, &["/bin/true"]);
    let (mut takeovers, mut ids) = (Vec::new(), Vec::new());
    for kill in 0..args.kills {
        let job: Job = runtime
            .block_on(api.call(Method::POST, "/v1/jobs", Some(&burst)))
            .with_context(|| format!("launching burst {kill}"))?;
        ids.push(job.id);
        let pid = runtime.block_on(leader_pid(&cluster, &token))?;
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid),
            nix::sys::signal::Signal::SIGKILL,
        )?;
        let killed = Instant::now();
        let accepted: Job = loop {
            match runtime.block_on(api.call(Method::POST, "/v1/jobs", Some(&probe))) {
                Ok(job) => break job,
                Err(e) if killed.elapsed() < Duration::from_secs(60) => {
                    tracing::debug!("no leader yet: {e}")
                }
                Err(e) => return Err(e).context("no controller took over within 60 s"),
            }
        };
        takeovers.push(killed.elapsed().as_secs_f64());
        ids.push(accepted.id);
        // Back as a follower, as systemd would start it again.
        cluster.restart_dead()?;
        // Let the burst end before the next kill.
        let wait = Duration::from_secs(args.sleep_s + 60);
        if let Some(id) = ids.get(ids.len() - 2) {
            runtime.block_on(succeeded(&api, id, wait));
        }
    }
    let mut jobs_lost = 0;
    for id in &ids {
        if !runtime.block_on(succeeded(&api, id, Duration::from_secs(30))) {
            jobs_lost += 1;
        }
    }
    let mut sorted = takeovers.clone();
    sorted.sort_by(f64::total_cmp);
    Ok(FailoverReport {
        nodes: args.nodes,
        controllers,
        etcd_members: particle_cluster::ETCD_MEMBERS,
        functions: args.functions,
        takeover_s_p50: sorted[sorted.len() / 2],
        takeover_s_max: sorted[sorted.len() - 1],
        takeover_s: takeovers,
        jobs: ids.len(),
        jobs_lost,
        lease_ttl_s: particle_controller::leader::LEASE_TTL_S,
    })
}

pub fn render(r: &FailoverReport) -> String {
    let each: Vec<String> = r.takeover_s.iter().map(|t| format!("{t:.2}")).collect();
    format!(
        "failover: {} controllers on {} etcd members, {} nodes, bursts of {}\n  \
         takeover (SIGKILL of the leader -> a job accepted by the next), s: {}\n  \
         median {:.2} s, max {:.2} s (lease TTL {} s)\n  jobs {}, lost {}\n",
        r.controllers,
        r.etcd_members,
        r.nodes,
        r.functions,
        each.join(" "),
        r.takeover_s_p50,
        r.takeover_s_max,
        r.lease_ttl_s,
        r.jobs,
        r.jobs_lost
    )
}
