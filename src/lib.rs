//! workfarm: farm calls out to a pool of child processes and get the answers back.
#![doc = include_str!("../README.md")]
#![deny(unsafe_code)]
#![warn(missing_docs, missing_debug_implementations, unreachable_pub)]

pub mod blocking;
pub mod error;
pub mod event;
mod farm;
mod options;
mod protocol;
#[cfg(feature = "redis")]
pub mod remote;
pub mod serializer;
mod shm;
mod sys;
pub mod worker;

pub use error::{CallError, CreateError, ExitInfo, Refusal, Sidelined};
pub use event::{Event, WorkerId};
pub use farm::{
    kill_all, Broadcast, CallBuilder, CallCounts, CallFuture, CallHandle, CallInfo, CancelHandle,
    Farm, Latency, Load, Map, MapUnordered, NodeStatus, SlotStats, Stats, Status, StderrLine,
    WithInfo, WorkerCounts, WorkerState, WorkerStatus,
};
pub use options::{FarmOptions, PerWorker, StderrMode};
pub use protocol::PROTOCOL_VERSION;
