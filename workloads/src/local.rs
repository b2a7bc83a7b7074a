//! Runs a job's functions as plain local processes on loopback, one port
//! each: no per-function network at all. The tests use it to check the
//! workloads themselves; it is also the floor a networked launch is compared
//! with.

use std::io::{self, Read};
use std::path::Path;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use particle_wire::function_env::FunctionEnv;

#[derive(Debug)]
pub struct FunctionOutput {
    pub rank: usize,
    /// `None` when it was killed at the deadline.
    pub status: Option<ExitStatus>,
    pub stdout: String,
    pub stderr: String,
}

impl FunctionOutput {
    pub fn succeeded(&self) -> bool {
        self.status.is_some_and(|s| s.success())
    }
}

/// A running function; killed if dropped before it exits.
struct Running {
    rank: usize,
    child: Child,
    stdout: Option<JoinHandle<String>>,
    stderr: Option<JoinHandle<String>>,
}

impl Drop for Running {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

fn drain(mut r: impl Read + Send + 'static) -> JoinHandle<String> {
    std::thread::spawn(move || {
        let mut s = String::new();
        let _ = r.read_to_string(&mut s);
        s
    })
}

/// The environment of every function of a local job: rank `r` listens on
/// `127.0.0.1:(base_port + r)` and is said to run on node `n{r % nodes}`
/// (as a round-robin launcher would place it).
pub fn local_envs(job: &str, size: usize, base_port: u16, nodes: usize) -> Vec<FunctionEnv> {
    let peers: std::sync::Arc<[String]> = (0..size)
        .map(|r| format!("127.0.0.1:{}", base_port as usize + r))
        .collect();
    (0..size)
        .map(|rank| FunctionEnv {
            job: job.to_string(),
            rank,
            size,
            node: format!("n{}", rank % nodes.max(1)),
            address: None,
            peers: peers.clone(),
        })
        .collect()
}

/// Starts `program args` once per environment, waits for all of them until
/// `timeout` (killing what is left then), and returns their outputs by rank.
pub fn run_local(
    program: &Path,
    args: &[String],
    envs: &[FunctionEnv],
    timeout: Duration,
) -> io::Result<Vec<FunctionOutput>> {
    run_with(envs, timeout, |_| {
        let mut cmd = Command::new(program);
        cmd.args(args);
        cmd
    })
}

/// Like [`run_local`], with the command of each function made by `command`
/// (e.g. to start it in another network namespace); its environment and
/// stdio are set here.
pub fn run_with(
    envs: &[FunctionEnv],
    timeout: Duration,
    command: impl Fn(&FunctionEnv) -> Command,
) -> io::Result<Vec<FunctionOutput>> {
    let deadline = Instant::now() + timeout;
    let mut running = Vec::with_capacity(envs.len());
    for env in envs {
        let mut child = command(env)
            .envs(env.vars())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()?;
        let stdout = child.stdout.take().map(drain);
        let stderr = child.stderr.take().map(drain);
        running.push(Running {
            rank: env.rank,
            child,
            stdout,
            stderr,
        });
    }
    let mut statuses: Vec<Option<ExitStatus>> = vec![None; running.len()];
    while Instant::now() < deadline && statuses.iter().any(Option::is_none) {
        for (i, r) in running.iter_mut().enumerate() {
            if statuses[i].is_none() {
                statuses[i] = r.child.try_wait()?;
            }
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    let mut outputs = Vec::with_capacity(running.len());
    for (mut r, status) in running.into_iter().zip(statuses) {
        if status.is_none() {
            let _ = r.child.kill();
            let _ = r.child.wait();
        }
        let join =
            |h: Option<JoinHandle<String>>| h.and_then(|h| h.join().ok()).unwrap_or_default();
        outputs.push(FunctionOutput {
            rank: r.rank,
            status,
            stdout: join(r.stdout.take()),
            stderr: join(r.stderr.take()),
        });
    }
    Ok(outputs)
}
