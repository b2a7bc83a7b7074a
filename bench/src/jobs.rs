//! Jobs on a local cluster through the burst launch API, as a user submits
//! them: launch, wait for the end, collect every function's run.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use particle_wire::api::{Job, JobState, LaunchJob};
use particle_wire::client::{ApiClient, Method};
use particle_workloads::ring::now_ns;

use crate::pipeline::FunctionRun;

/// A directory of a run under the node's `/tmp`, removed when dropped,
/// however the run ends. [`Self::staging`] makes one sandboxed functions may
/// write (a job's `output_dir`): they run as their tenant's unprivileged uid
/// on a read-only image, so what they produce is staged there and copied out.
pub struct ScratchDir(PathBuf);

impl ScratchDir {
    /// `/tmp/NAME`, made now.
    pub fn new(name: &str) -> Result<Self> {
        let dir = std::env::temp_dir().join(name);
        std::fs::create_dir_all(&dir).with_context(|| format!("making {}", dir.display()))?;
        Ok(Self(dir))
    }

    /// A staging directory for `tag`, open to every tenant's uid.
    pub fn staging(tag: &str) -> Result<Self> {
        use std::os::unix::fs::PermissionsExt;
        let staging = Self::new(&format!("particle-{tag}-{}", std::process::id()))?;
        // Sticky and open to all: every tenant's uid may write, none another's files.
        std::fs::set_permissions(&staging.0, std::fs::Permissions::from_mode(0o1777))
            .with_context(|| format!("opening {} to functions", staging.0.display()))?;
        Ok(staging)
    }

    pub fn dir(&self) -> &Path {
        &self.0
    }

    /// Where `output` is staged: the same file name in this directory.
    pub fn stage(&self, output: &Path) -> Result<PathBuf> {
        let name = output.file_name().context("the output names no file")?;
        Ok(self.0.join(name))
    }
}

impl Drop for ScratchDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Launches `functions` copies of `argv` on `tenant` through the launch API
/// and waits for the job to end; fails unless every function exited 0.
/// Returns when it was submitted (wall ns), the job, and every function's run.
/// Functions may write `output_dir` (see [`ScratchDir::staging`]).
pub async fn launch_job(
    api: &ApiClient,
    tenant: &str,
    argv: Vec<String>,
    functions: usize,
    timeout: Duration,
    output_dir: Option<&Path>,
) -> Result<(u128, Job, Vec<FunctionRun>)> {
    let request = LaunchJob {
        output_dir: output_dir.map(|d| d.display().to_string()),
        ..LaunchJob::of(tenant, functions, argv)
    };
    let submitted = now_ns();
    let job: Job = api
        .call(Method::POST, "/v1/jobs", Some(&request))
        .await
        .context("launching the job")?;
    let deadline = Instant::now() + timeout + Duration::from_secs(30);
    let job = loop {
        let path = format!("/v1/jobs/{}?wait_s=5&output=true", job.id);
        let job: Job = api.call::<(), _>(Method::GET, &path, None).await?;
        if job.state != JobState::Running {
            break job;
        }
        if Instant::now() > deadline {
            let _: Result<Job, _> = api
                .call::<(), _>(Method::DELETE, &format!("/v1/jobs/{}", job.id), None)
                .await;
            bail!("job {} did not end in time; cancelled", job.id);
        }
    };
    if job.state != JobState::Succeeded {
        let failed: Vec<String> = job
            .functions
            .iter()
            .filter(|f| f.exit_code != Some(0))
            .take(3)
            .map(|f| {
                format!(
                    "rank {} on {}: {:?} {}\n{}",
                    f.rank,
                    f.node,
                    f.exit_code,
                    f.error.clone().unwrap_or_default(),
                    f.output.clone().unwrap_or_default()
                )
            })
            .collect();
        bail!(
            "job {} ended {:?}:\n{}",
            job.id,
            job.state,
            failed.join("\n")
        );
    }
    let runs = job
        .functions
        .iter()
        .map(|f| FunctionRun {
            rank: f.rank,
            node: f.node.clone(),
            stdout: f.output.clone().unwrap_or_default(),
        })
        .collect();
    Ok((submitted, job, runs))
}
