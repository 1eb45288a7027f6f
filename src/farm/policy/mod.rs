//! The farm's policies, one per file. Each is a small piece of state (or none) that answers
//! a question with a verdict; the dispatcher applies the verdicts and does the I/O, so each
//! policy is tested here on its own, with tables and no processes.
//!
//! - [`pipeline`]: how many calls wait inside a worker, and when they are taken back.
//! - [`retry`]: a call's attempt failed or its worker went: re-queue charged, free, or settle.
//! - [`startup`]: did a worker fail to start; how long to back off; when to fail fast.
//! - [`recycle`]: ttl, idle time and memory: retire a worker now, or keep it.
//! - [`refusal`]: a worker refused a call: its slot's back-off; wait for a slot, or fail.
//! - [`quarantine`]: a slot whose workers keep crashing is sidelined for a while.
//! - [`elastic`]: how many workers the pool wants: grow while calls wait, shrink when idle.
//! - [`timers`]: every deadline, each owned by a call or a worker and removed with it.

pub(crate) mod elastic;
pub(crate) mod pipeline;
pub(crate) mod quarantine;
pub(crate) mod recycle;
pub(crate) mod refusal;
pub(crate) mod retry;
pub(crate) mod startup;
pub(crate) mod timers;
