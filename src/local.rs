//! `particle local`: one request to a node agent's local API.

use std::io::{BufRead, Write};
use std::path::PathBuf;

use anyhow::{Context, Result};

#[derive(clap::Args)]
pub struct LocalArgs {
    #[arg(long, default_value = "/run/particle/agent.sock")]
    socket: PathBuf,
    /// The request: one JSON object.
    request: String,
}

/// Sends the request and prints the answer; fails if the agent refused it.
pub fn run(args: &LocalArgs) -> Result<()> {
    let mut stream = std::os::unix::net::UnixStream::connect(&args.socket)
        .with_context(|| format!("connecting to {}", args.socket.display()))?;
    writeln!(stream, "{}", args.request.trim())?;
    let mut answer = String::new();
    std::io::BufReader::new(stream).read_line(&mut answer)?;
    print!("{answer}");
    anyhow::ensure!(
        !answer.contains(r#""ok":false"#),
        "the agent refused the request"
    );
    Ok(())
}
