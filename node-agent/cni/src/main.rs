//! The `particle-cni` binary: runtimes run it with `CNI_COMMAND` and friends
//! in the environment and the network configuration on stdin.

use rscni_plugin::cni::Plugin;

fn main() {
    let plugin = Plugin::default().msg(concat!(
        "particle-cni ",
        env!("CARGO_PKG_VERSION"),
        ": warm endpoints of the Particle node agent"
    ));
    // The error JSON is on stdout already; the exit status says it failed.
    if plugin.run(&particle_cni::ParticleCni).is_err() {
        std::process::exit(1);
    }
}
