//! Warm connections: the handoff between a node agent that keeps established,
//! already-ramped TCP connections and the functions that use them.
//!
//! A function talks to the agent over a Unix socket, one JSON object per line
//! ([`particle_wire::warm`]). A connection travels as a file descriptor attached to the
//! line (`SCM_RIGHTS`, [`fdpass`]): the agent's reply to `get` carries the
//! connected socket, a `put` carries it back. [`WarmClient`] is the API a
//! function uses explicitly; the preload library (`node-agent/preload`) speaks
//! the same protocol for unmodified programs.

pub mod client;
pub mod fdpass;

pub use client::{PutOutcome, WarmClient, WarmError};
