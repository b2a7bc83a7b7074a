//! The agent's side of the controller API: the shared client
//! ([`particle_controller::client`]) under the name the agent code uses.

pub use particle_controller::client::{ApiClient as ControllerClient, ClientError, Dial, Method};
