//! Farms across machines, through Redis Streams (feature `redis`).
//!
//! A **node** ([`Node`], or the `workfarm-node` binary) is a local [`Farm`](crate::Farm)
//! of the user's unchanged worker binary plus a puller: it claims calls from the farm's
//! stream while it has room, holds a lease on each (renewed by an owner-checking script),
//! and posts each result to its caller's stream. A **caller** ([`Farm::connect`]) is the
//! same `Farm` type, whose calls go to the stream instead of to child processes.
//!
//! Delivery is at least once: a call whose node dies (or stops renewing its lease) is
//! claimed by another node once the lease runs out; a node frozen past its lease may run
//! a call twice, and the caller settles each call once. See the README for every promise.
//!
//! [`Farm::connect`]: crate::Farm::connect

mod caller;
mod conn;
mod keys;
mod node;
mod wire;

pub use caller::RemoteOptions;
pub use node::{Node, NodeOptions};
