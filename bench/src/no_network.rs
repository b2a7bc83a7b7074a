//! The floor of the startup and pipeline benchmarks: the same functions with
//! no network of their own, started the way a Particle agent starts them
//! (`particle_node_agent::launcher`: container namespaces, dropped
//! privileges, a supervisor per function) in the same sandbox
//! (`particle_node_agent::sandbox`: the agent's function image, a user
//! namespace, a cgroup with the default limits, one sandbox per node as
//! each agent has its own), by one launcher per node working in parallel,
//! as the agents do, with the peers handed over as they do. All of them join one scratch namespace and
//! talk over its loopback, so nothing binds a port on the machine. What a
//! networked system takes beyond this is what its network costs.

use std::os::fd::AsFd;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use particle_net::scratch::ScratchNode;
use particle_net::{AddressBlock, Run};
use particle_node_agent::launcher::{self, FunctionSpec, PeersFile, Runtime};
use particle_node_agent::sandbox::{FunctionBox, Sandbox, SandboxConfig};
use particle_wire::function_env::{FunctionEnv, JobPeers};
use particle_workloads::local::FunctionOutput;
use particle_workloads::ring::now_ns;

/// Starts `argv` once per environment, the functions of node `n` (rank
/// `r % nodes == n`, as [`particle_workloads::local::local_envs`] places
/// them) by that node's launcher thread, and waits for all of them until
/// `timeout` (those still running then are killed and have no status);
/// they may write `output_dir` (as a job's `output_dir`).
/// `block` is the scratch namespace's (unused) underlay block. Returns when
/// the launch began (wall-clock ns, after the scratch namespace and the
/// runtime are set up: those are not the floor's) and the outputs by rank.
pub fn run(
    envs: &[FunctionEnv],
    argv: &[String],
    nodes: usize,
    block: &str,
    timeout: Duration,
    output_dir: Option<&Path>,
) -> Result<(u128, Vec<FunctionOutput>)> {
    let run = Run::start()?;
    let scratch = ScratchNode::new(run.prefix(), AddressBlock::parse(block)?)
        .context("creating the scratch namespace")?;
    // Made before the clock starts, as an agent makes it at its start.
    let dir = crate::jobs::ScratchDir::new(&run.prefix().label("floor"))
        .context("the floor's sandbox directory")?;
    let nodes = nodes.max(1);
    // One per node, as each agent has its own: one cgroup parent for every
    // function would be one share of the CPU against everything else the
    // machine runs, where the agents' functions have one share per node.
    let sandboxes = (0..nodes)
        .map(|node| {
            let label = run.prefix().label(&format!("floor{node}"));
            let node_dir = dir.dir().join(&label);
            std::fs::create_dir_all(&node_dir)?;
            Sandbox::start(SandboxConfig::default(), &node_dir, &label)
                .context("assembling the floor's sandbox")
        })
        .collect::<Result<Vec<_>>>()?;
    // The floor hands peers over as the agents do (a file for large jobs).
    let peers = JobPeers::new(envs.first().map(|e| &e.peers[..]).unwrap_or_default());
    let peers_file = PeersFile::write(&dir.dir().join("peers"), "floor", &peers)
        .context("writing the floor's peer file")?;
    let (peers, peers_file) = (&peers, peers_file.as_ref().map(PeersFile::path));
    let limits = sandboxes[0].limits(&Default::default())?;
    let sandboxes = &sandboxes;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the tokio runtime")?;
    let netns = scratch.netns.as_fd();
    let submitted = now_ns();
    let deadline = Instant::now() + timeout;
    // The agents spawn from a synchronous call inside their runtime (the
    // children are reaped by it); so do these launchers.
    let started: Vec<Vec<(usize, tokio::process::Child, FunctionBox)>> = std::thread::scope(|s| {
        let launchers: Vec<_> = (0..nodes)
            .map(|node| {
                let handle = runtime.handle().clone();
                s.spawn(move || -> Result<Vec<_>> {
                    let _inside = handle.enter();
                    let mut children = Vec::new();
                    for env in envs.iter().filter(|e| e.rank % nodes == node) {
                        let vars = env.vars_with(peers);
                        let name = format!("floor-{}", env.rank);
                        let sandbox = &sandboxes[node];
                        let root = sandbox.default_root().to_owned();
                        let boxed = sandbox
                            .prepare(&name, "floor", root, limits)?
                            .with_writable(output_dir.map(Path::to_path_buf));
                        let spec = FunctionSpec {
                            argv,
                            env: &vars,
                            netns: Some(netns),
                            name: &name,
                            // Only OCI functions have a bundle.
                            bundle_dir: Path::new("/nonexistent"),
                            isolation: boxed.isolation(),
                            peers_file,
                        };
                        let child = launcher::spawn(&spec, &Runtime::Builtin)
                            .with_context(|| format!("starting function {}", env.rank))?;
                        children.push((env.rank, child, boxed));
                    }
                    Ok(children)
                })
            })
            .collect();
        launchers
            .into_iter()
            .map(|l| {
                l.join()
                    .unwrap_or_else(|_| Err(anyhow::anyhow!("a launcher thread panicked")))
            })
            .collect::<Result<_>>()
    })?;
    let mut outputs = runtime.block_on(async {
        let mut waiting = tokio::task::JoinSet::new();
        for (rank, child, boxed) in started.into_iter().flatten() {
            waiting.spawn(async move {
                let left = deadline.saturating_duration_since(Instant::now());
                // A function past the deadline is dropped, which kills it
                // (kill_on_drop) and with it its PID namespace.
                let (status, stdout, stderr) =
                    match tokio::time::timeout(left, child.wait_with_output()).await {
                        Ok(Ok(out)) => (Some(out.status), out.stdout, out.stderr),
                        Ok(Err(e)) => (None, Vec::new(), format!("waiting for it: {e}").into()),
                        Err(_) => (None, Vec::new(), b"killed at the deadline".to_vec()),
                    };
                boxed.remove().await;
                FunctionOutput {
                    rank,
                    status,
                    stdout: String::from_utf8_lossy(&stdout).into_owned(),
                    stderr: String::from_utf8_lossy(&stderr).into_owned(),
                }
            });
        }
        let mut outputs = Vec::with_capacity(envs.len());
        while let Some(done) = waiting.join_next().await {
            outputs.push(done.context("a waiting task panicked")?);
        }
        anyhow::Ok(outputs)
    })?;
    outputs.sort_by_key(|o| o.rank);
    Ok((submitted, outputs))
}
