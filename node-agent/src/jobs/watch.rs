//! One running function from start to exit report, and the reports' way to
//! the controller.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use particle_net::PooledEndpoint;
use particle_wire::api::{FunctionExit, FunctionExits};
use particle_wire::client::{ApiClient, Method};
use tokio::io::{AsyncRead, AsyncReadExt};
use tokio::sync::{mpsc, oneshot};

use super::{lock, Output, MAX_OUTPUT, REPORTED_OUTPUT};
use crate::claims::Claims;
use crate::sandbox::FunctionBox;

/// One running function, from start to exit report.
pub(super) struct FunctionWatch {
    pub job: String,
    pub rank: usize,
    pub output: Arc<Mutex<Output>>,
    pub bundle: Option<PathBuf>,
    /// Its cgroup (built-in launcher): why it ended, removed after.
    pub sandbox: FunctionBox,
}

impl FunctionWatch {
    pub async fn run(
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
        let reason = self.sandbox.verdict();
        self.sandbox.remove().await;
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
            reason,
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
