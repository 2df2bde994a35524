//! Connections per next-hop address: at most `queue.max_connections_per_hop` open at once,
//! busy or parked, each holding a [`HopSlot`] that gives its place back when dropped.
//!
//! A delivery that finds every slot of its next hop taken waits ([`HopSlots::freed`]) for a
//! connection to be parked (it then reuses it) or closed (it then opens its own). A burst of
//! messages toward one next hop is so carried by a few reused connections instead of a TLS
//! handshake per message, and a next hop is never hit with more connections than the admin
//! allowed.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use tokio::sync::Notify;

/// The open-connection counts of every next-hop address.
#[derive(Debug, Default)]
pub(super) struct HopSlots {
    open: Mutex<HashMap<SocketAddr, usize>>,
    /// Signalled when a slot is given back or a connection is parked.
    freed: Notify,
}

/// One open connection's place among its next hop's slots; given back on drop.
#[derive(Debug)]
pub(super) struct HopSlot {
    slots: Arc<HopSlots>,
    addr: SocketAddr,
}

impl HopSlots {
    /// A slot for a new connection to `addr`, if fewer than `limit` are open.
    pub(super) fn try_take(self: &Arc<Self>, addr: SocketAddr, limit: usize) -> Option<HopSlot> {
        let mut open = self.open.lock().ok()?;
        let n = open.entry(addr).or_insert(0);
        if *n >= limit {
            return None;
        }
        *n += 1;
        Some(HopSlot {
            slots: self.clone(),
            addr,
        })
    }

    /// Connections open to `addr` now.
    #[cfg(test)]
    pub(super) fn open(&self, addr: SocketAddr) -> usize {
        self.open
            .lock()
            .map(|m| m.get(&addr).copied().unwrap_or(0))
            .unwrap_or(0)
    }

    /// Wakes every delivery waiting for a slot or a parked connection.
    pub(super) fn wake(&self) {
        self.freed.notify_waiters();
    }

    /// The waiter's side of [`HopSlots::wake`]: create it (and `enable` it) *before* looking at
    /// the pool and the counts, so that no wake-up between the look and the wait is lost.
    pub(super) fn freed(&self) -> tokio::sync::futures::Notified<'_> {
        self.freed.notified()
    }
}

impl Drop for HopSlot {
    fn drop(&mut self) {
        if let Ok(mut open) = self.slots.open.lock()
            && let Some(n) = open.get_mut(&self.addr)
        {
            *n = n.saturating_sub(1);
            if *n == 0 {
                open.remove(&self.addr);
            }
        }
        self.slots.wake();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn addr(port: u16) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], port))
    }

    #[test]
    fn slots_are_bounded_per_address_and_given_back_on_drop() {
        let slots = Arc::new(HopSlots::default());
        let a: Vec<_> = (0..3).filter_map(|_| slots.try_take(addr(1), 3)).collect();
        assert_eq!(a.len(), 3);
        assert!(slots.try_take(addr(1), 3).is_none(), "a fourth is refused");
        let other = slots.try_take(addr(2), 3);
        assert!(other.is_some(), "another address has its own slots");
        assert_eq!(slots.open(addr(1)), 3);
        drop(a);
        assert_eq!(slots.open(addr(1)), 0);
        assert!(slots.try_take(addr(1), 3).is_some());
        drop(other);
        assert!(
            slots.open.lock().unwrap().get(&addr(2)).is_none(),
            "no entry left behind"
        );
    }

    #[tokio::test]
    async fn a_waiter_is_woken_when_a_slot_is_given_back() {
        let slots = Arc::new(HopSlots::default());
        let held = slots.try_take(addr(1), 1).unwrap();
        let waiter = {
            let slots = slots.clone();
            tokio::spawn(async move {
                loop {
                    let freed = slots.freed();
                    tokio::pin!(freed);
                    freed.as_mut().enable();
                    if let Some(s) = slots.try_take(addr(1), 1) {
                        return s;
                    }
                    freed.await;
                }
            })
        };
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(!waiter.is_finished(), "it waits while the slot is held");
        drop(held);
        let got = tokio::time::timeout(Duration::from_secs(5), waiter)
            .await
            .expect("woken")
            .unwrap();
        assert_eq!(got.addr, addr(1));
        assert_eq!(slots.open(addr(1)), 1);
    }
}
