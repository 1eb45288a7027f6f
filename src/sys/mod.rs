//! The only platform code and the only `unsafe` in the crate: process groups, signals and
//! the worker's private frame descriptor.

#[cfg(unix)]
mod unix;
#[cfg(unix)]
pub(crate) use unix::*;

#[cfg(not(unix))]
compile_error!("workfarm supports Unix only for now");
