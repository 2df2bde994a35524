//! The peer table's writer in the running daemon: [`PeerStore`] (in `sealgate-core`) holds the
//! table and knows its file; this task applies resets, expires marks and writes it out.

use std::sync::Arc;

pub use sealgate_core::peers::*;

/// Flushes the table every [`FLUSH_EVERY`], forever (the writes run off the async threads).
pub async fn flush_loop(store: Arc<PeerStore>) {
    let mut t = tokio::time::interval(FLUSH_EVERY);
    t.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        t.tick().await;
        let me = store.clone();
        match tokio::task::spawn_blocking(move || me.flush()).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::error!(error = %e, "cannot write the peer table"),
            Err(e) => tracing::error!(error = %e, "peer table writer failed"),
        }
    }
}
