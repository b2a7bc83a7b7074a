//! `particle controller`: its settings (flags, or keys of `--config`) and
//! the server.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};

use crate::config::{self, required};

/// `particle controller`'s settings, declared once: each field is a flag
/// (`--token-file`) and the key of the `--config` YAML file with `_`
/// (`token_file`). A flag wins over the file, the file over the default
/// (applied by the methods below).
#[derive(clap::Args, Serialize, Deserialize, Debug, Default, Clone, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ControllerSettings {
    /// YAML file with any of the settings below (flags win).
    #[arg(long)]
    #[serde(skip)]
    pub config: Option<PathBuf>,
    /// Address to listen on (agents and users) [default: 127.0.0.1:7700].
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub listen: Option<SocketAddr>,
    /// File holding the bearer token every /v1 request must carry.
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub token_file: Option<PathBuf>,
    /// The embedded store's file (tenants, blocks, nodes; jobs in FILE.jobs.log); omitted: memory only. Same as `--store FILE`.
    #[arg(long, conflicts_with = "store")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub state_file: Option<PathBuf>,
    /// Where state and jobs live: a file path (the embedded store), or `etcd://HOST:PORT[,HOST:PORT...][/PREFIX]` (several controllers share it; one leads).
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub store: Option<String>,
    /// With etcd: this cluster's id; a controller refuses an etcd that holds another cluster's state under its prefix [default: particle].
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cluster_id: Option<String>,
    /// With etcd: the address clients are sent to when this controller leads [default: --listen].
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub advertise: Option<SocketAddr>,
    /// Seconds without a heartbeat after which a node is removed [default: 10; a node busy with a large burst may be late].
    #[arg(long)]
    #[serde(
        default,
        deserialize_with = "config::positive_seconds",
        skip_serializing_if = "Option::is_none"
    )]
    pub heartbeat_timeout: Option<f64>,
    /// Listen inside this network namespace (e.g. a local cluster's underlay).
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub netns: Option<PathBuf>,
}

impl config::Settings for ControllerSettings {
    fn file(&self) -> Option<&Path> {
        self.config.as_deref()
    }

    fn check(&self) -> Result<()> {
        self.token_file()?;
        self.store()?;
        Ok(())
    }
}

impl ControllerSettings {
    pub fn listen(&self) -> SocketAddr {
        self.listen
            .unwrap_or_else(|| SocketAddr::from(([127, 0, 0, 1], 7700)))
    }

    pub fn token_file(&self) -> Result<&Path> {
        required(&self.token_file, "token_file").map(PathBuf::as_path)
    }

    /// The store, from `store` or `state_file` (a file wins neither: they conflict).
    pub fn store(&self) -> Result<Option<particle_controller::store::StoreSpec>> {
        match (&self.store, &self.state_file) {
            (Some(_), Some(_)) => anyhow::bail!("give store or state_file, not both"),
            (Some(s), None) => Ok(Some(s.parse().map_err(|e: String| anyhow::anyhow!(e))?)),
            (None, Some(path)) => Ok(Some(particle_controller::store::StoreSpec::Json(
                path.clone(),
            ))),
            (None, None) => Ok(None),
        }
    }

    /// Seconds.
    pub fn heartbeat_timeout(&self) -> f64 {
        self.heartbeat_timeout.unwrap_or(10.0)
    }
}

/// Serves the controller until it fails.
pub fn run(flags: &ControllerSettings) -> Result<()> {
    let settings = config::resolve(flags)?;
    config::enter_netns(settings.netns.as_deref())?;
    let heartbeat_timeout = settings.heartbeat_timeout();
    anyhow::ensure!(
        heartbeat_timeout.is_finite() && heartbeat_timeout > 0.0,
        "heartbeat_timeout must be a positive number of seconds"
    );
    let config = particle_controller::ControllerConfig {
        listen: settings.listen(),
        token: config::read_token(settings.token_file()?)?,
        store: settings.store()?,
        cluster_id: settings
            .cluster_id
            .clone()
            .unwrap_or_else(|| "particle".into()),
        advertise: settings.advertise,
        heartbeat_timeout: std::time::Duration::from_secs_f64(heartbeat_timeout),
        long_poll_max: particle_controller::DEFAULT_LONG_POLL_MAX,
        quotas: Default::default(),
    };
    let runtime = tokio::runtime::Runtime::new()?;
    runtime.block_on(async {
        let listener = tokio::net::TcpListener::bind(config.listen)
            .await
            .with_context(|| format!("listening on {}", config.listen))?;
        particle_controller::serve(config, listener).await
    })
}
