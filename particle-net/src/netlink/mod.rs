//! Batched netlink on netlink-packet-route.
//!
//! [`NetlinkSocket`] is a synchronous rtnetlink socket bound to the namespace it
//! was opened in. It puts many requests into one datagram, matches every
//! acknowledgement to its request by sequence number, and reports each failed
//! request with what it was, without losing the others (the kernel goes on with
//! the rest of a datagram after a failure). [`messages`] builds the requests.

pub mod guard_messages;
pub mod messages;
mod socket;

pub use socket::{
    encode_into, NetlinkError, NetlinkSocket, Request, RequestError, MAX_PER_DATAGRAM,
};
