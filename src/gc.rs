//! `particle gc`: removes what crashed runs left behind.

use anyhow::{Context, Result};

pub fn run() -> Result<()> {
    let mut socket = particle_net::NetlinkSocket::open().context("netlink socket")?;
    let report = particle_net::gc::collect(Some(&mut socket));
    println!(
        "removed {} namespaces, {} links, {} dead runs",
        report.namespaces.len(),
        report.links.len(),
        report.runs.len()
    );
    for e in &report.errors {
        eprintln!("error: {e}");
    }
    if !report.errors.is_empty() {
        anyhow::bail!("{} objects could not be removed", report.errors.len());
    }
    Ok(())
}
