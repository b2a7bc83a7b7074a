//! The agent daemon: registers with the controller, follows its overlay state
//! (long poll), heartbeats its pool levels, and serves the local API.

use std::path::PathBuf;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use particle_net::NetNs;
use particle_wire::api::{Heartbeat, NodeOverlay, RegisterNode};

use crate::api::controller;
use crate::api::local::{self, LocalApi};
use crate::api::metrics::MetricsSources;
use crate::claims::Claims;
use crate::jobs::{report_exits, LaunchSettings, NodeJobs};
use crate::node_state::{NodeConfig, NodeState, OverlayView};
use crate::sandbox::{Sandbox, SandboxConfig};
use crate::warm_connections::{WarmConfig, WarmService};
use particle_wire::client::{ApiClient, ClientError};

#[derive(Debug, Clone)]
pub struct AgentConfig {
    /// The node's name at the controller.
    pub node_name: String,
    pub node: NodeConfig,
    /// Where the local API listens.
    pub socket_path: PathBuf,
    pub heartbeat_every: Duration,
    /// The OCI runtime jobs may ask for (runc); `None`: built-in launcher only.
    pub oci_runtime: Option<PathBuf>,
    /// Functions' images, limits and tenants' quotas.
    pub sandbox: SandboxConfig,
}

/// Where the agent serves what it serves.
pub struct Listeners {
    /// The agent's HTTP port: `/metrics` (Prometheus) and the controller's
    /// calls to launch functions; `None`: neither (this node cannot launch).
    pub metrics: Option<tokio::net::TcpListener>,
}

/// Runs the agent until the controller client fails for good or the local API
/// listener dies. `node` is the node's namespace.
pub async fn run(
    config: AgentConfig,
    node: NetNs,
    client: ApiClient,
    listeners: Listeners,
) -> std::io::Result<()> {
    run_with_warm(config, node, client, listeners, None).await
}

/// [`run`], also serving warm connections ([`crate::warm_connections`]) with `warm`;
/// callers' tenants are those of the endpoints claimed through the local API.
pub async fn run_with_warm(
    config: AgentConfig,
    node: NetNs,
    client: ApiClient,
    listeners: Listeners,
    warm: Option<WarmConfig>,
) -> std::io::Result<()> {
    // Pools and callers hold descriptors; the agent's own caps, not the
    // kernel's limit, must be what a flood meets.
    if let Err(e) = particle_net::limits::raise_open_files() {
        tracing::warn!("raising the open-file limit: {e}");
    }
    let state = NodeState::new(config.node.clone(), &node).map_err(std::io::Error::other)?;
    let claims = Arc::new(Claims::new(state.free_pool()));
    let local_api =
        Arc::new(LocalApi::new(claims.clone()).with_run_prefix(config.node.prefix.clone()));
    let overlay_view = Arc::new(OverlayView::default());
    let mut sandbox_config = config.sandbox.clone();
    // Functions reach the warm-connection socket at its own path.
    sandbox_config
        .binds
        .extend(warm.as_ref().map(|w| w.socket_path.clone()));
    // Stops (closing its connections) when the agent stops.
    let _warm = match warm {
        Some(mut w) => {
            w.peer_token = client.token().to_string();
            let claims = claims.clone();
            let tenant_of = Arc::new(move |inode| claims.tenant_of_netns(inode));
            Some(WarmService::start(w, &node, tenant_of).map_err(std::io::Error::other)?)
        }
        None => None,
    };
    let listener = local::bind(&config.socket_path)?;
    let state = Arc::new(Mutex::new(state));
    let api_port = match &listeners.metrics {
        Some(l) => Some(l.local_addr()?.port()),
        None => None,
    };
    let instance = agent_instance();
    let register = RegisterNode {
        node: config.node_name.clone(),
        underlay_ip: config.node.underlay.address,
        api_port,
        instance: Some(instance.clone()),
    };
    let bundle_dir = config
        .socket_path
        .with_file_name(format!("{}-bundles", config.node_name));
    // Assembled once, here, beside the socket; removed when the agent stops.
    let run_dir = bundle_dir
        .parent()
        .map(std::path::Path::to_path_buf)
        .unwrap_or_else(std::env::temp_dir);
    let label = config.node.prefix.label(&config.node_name);
    // Blocks the start a moment (links, a few copies, `ldd`): nothing runs yet.
    let sandbox =
        Sandbox::start(sandbox_config, &run_dir, &label).map_err(std::io::Error::other)?;
    let (jobs, exit_reports) = NodeJobs::new(
        claims.clone(),
        LaunchSettings {
            node: config.node_name.clone(),
            oci_runtime: config.oci_runtime.clone(),
            bundle_dir,
            peers_dir: config
                .socket_path
                .with_file_name(format!("{}-peers", config.node_name)),
            instance,
            sandbox: Arc::new(sandbox),
        },
    );
    let token = client.token().to_string();
    let api = controller::router(jobs.clone(), &token);
    let reporter = tokio::spawn(report_exits(
        client.clone(),
        config.node_name.clone(),
        exit_reports,
    ));

    let heartbeats = {
        let (client, claims, register) = (client.clone(), claims.clone(), register.clone());
        let (state, overlay_view) = (state.clone(), overlay_view.clone());
        let every = config.heartbeat_every;
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(every).await;
                // The overlay entries as the kernel has them now, for /metrics;
                // skipped while an apply holds the state, so the heartbeat never
                // waits behind it.
                let reading = state.clone();
                let counts = tokio::task::spawn_blocking(move || {
                    reading.try_lock().ok().map(|mut s| s.overlay_counts())
                })
                .await;
                if let Ok(Some(counts)) = counts {
                    overlay_view.set(counts);
                }
                let beat = Heartbeat {
                    pools: claims.pool_levels(),
                };
                match client.heartbeat(&register.node, &beat).await {
                    Ok(true) => {}
                    // The controller forgot us (restart, or we were too slow): join again.
                    Ok(false) => {
                        if let Err(e) = client.register(&register).await {
                            tracing::warn!("re-registering: {e}");
                        }
                    }
                    Err(e) => tracing::warn!("heartbeat: {e}"),
                }
            }
        })
    };
    let follower = {
        let (claims, state, view) = (claims.clone(), state.clone(), overlay_view.clone());
        tokio::spawn(async move { follow(client, register, state, claims, view).await })
    };
    // Stopping the agent (or dropping this future) stops its background tasks,
    // and with them the node's tenant networks and pools.
    let mut tasks = vec![heartbeats, follower, reporter];
    if let Some(listener) = listeners.metrics {
        let sources = MetricsSources {
            local: local_api.clone(),
            overlay: overlay_view.clone(),
        };
        tasks.push(tokio::spawn(async move {
            if let Err(e) = crate::api::metrics::serve(listener, sources, &token, api).await {
                tracing::error!("agent HTTP listener: {e}");
            }
        }));
    }
    let _running = Running {
        tasks,
        socket_path: config.socket_path.clone(),
    };
    local::serve(listener, local_api).await
}

/// What a running agent leaves behind when it stops: nothing.
struct Running {
    tasks: Vec<tokio::task::JoinHandle<()>>,
    socket_path: PathBuf,
}

impl Drop for Running {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
        let _ = std::fs::remove_file(&self.socket_path);
    }
}

/// Registers, then applies every newer overlay state the controller sends.
async fn follow(
    client: ApiClient,
    register: RegisterNode,
    state: Arc<Mutex<NodeState>>,
    claims: Arc<Claims>,
    overlay_view: Arc<OverlayView>,
) {
    let mut backoff = Duration::from_millis(100);
    let mut overlay: Option<NodeOverlay> = None;
    loop {
        let next = match &overlay {
            None => client.register(&register).await,
            Some(o) => client.overlay(&register.node, o.version).await,
        };
        match next {
            Ok(o) => {
                backoff = Duration::from_millis(100);
                let state = state.clone();
                let applied = o.clone();
                // Building namespaces and links blocks: keep it off the runtime.
                let pools = tokio::task::spawn_blocking(move || {
                    let mut state = state.lock().unwrap_or_else(PoisonError::into_inner);
                    for e in state.apply(&applied) {
                        tracing::warn!("applying overlay v{}: {e}", applied.version);
                    }
                    (state.claims(), state.overlay_counts())
                })
                .await;
                match pools {
                    Ok((pools, counts)) => {
                        claims.set_pools(pools);
                        overlay_view.set(counts);
                    }
                    Err(e) => tracing::error!("overlay apply task: {e}"),
                }
                overlay = Some(o);
            }
            Err(e) => {
                if matches!(&e, ClientError::Status { status, .. } if status.as_u16() == 404) {
                    overlay = None; // unknown node: register again
                }
                tracing::warn!("controller: {e}");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(2));
            }
        }
    }
}

/// Unique per agent start (pid and start time): the controller tells a
/// restarted agent, which lost its functions, from one that only re-registers.
fn agent_instance() -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    format!("{:x}-{nanos:x}", std::process::id())
}
