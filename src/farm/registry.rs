//! Every farm of the process, for [`kill_all`](crate::kill_all). Holds weak references only,
//! so it never keeps a farm alive.

use super::Core;
use std::sync::{Arc, Mutex, Weak};

static FARMS: Mutex<Vec<Weak<Core>>> = Mutex::new(Vec::new());

pub(crate) fn register(core: &Arc<Core>) {
    let mut farms = FARMS.lock().unwrap_or_else(|e| e.into_inner());
    farms.retain(|f| f.strong_count() > 0);
    farms.push(Arc::downgrade(core));
}

/// Kills every farm of this process (workestrator's module-level `kill()`): each fails its
/// queued and in-flight calls with [`CallError::ShutDown`](crate::CallError::ShutDown) and
/// stops its workers. Returns when every worker has exited.
pub async fn kill_all() {
    let farms: Vec<Arc<Core>> = {
        let farms = FARMS.lock().unwrap_or_else(|e| e.into_inner());
        farms.iter().filter_map(Weak::upgrade).collect()
    };
    for farm in farms {
        farm.kill().await;
    }
}
