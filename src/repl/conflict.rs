//! Ordering of overlapping operations.
//!
//! Every write (and every resync read-and-send) takes a ticket for its byte range. Tickets are
//! handed out in call order; a ticket's `wait` returns once every earlier ticket that overlaps
//! it is released. Non-overlapping operations never wait for each other. The primary holds a
//! ticket from before it sends a write to the peer until its local write completes; the peer
//! takes tickets in the order frames arrive. So two overlapping writes reach both disks in the
//! same order, while everything else stays concurrent.

use std::sync::{Arc, Mutex};

use tokio::sync::Semaphore;

struct Entry {
    id: u64,
    start: u64,
    end: u64,
    /// Closed when the ticket is released; waiters see `acquire` fail at once.
    gate: Arc<Semaphore>,
}

#[derive(Default)]
struct Inner {
    next: u64,
    active: Vec<Entry>,
}

/// The set of operations in flight.
#[derive(Default)]
pub struct Conflicts {
    inner: Mutex<Inner>,
}

/// A held range. Dropping it releases the range.
pub struct Ticket {
    owner: Arc<Conflicts>,
    id: u64,
    before: Vec<Arc<Semaphore>>,
}

impl Conflicts {
    pub fn new() -> Arc<Conflicts> {
        Arc::new(Conflicts::default())
    }

    /// Takes a ticket for `[offset, offset + len)` (saturating at the top of the address space).
    /// Registration is immediate, so the order of calls is the order of the operations.
    pub fn register(self: &Arc<Self>, offset: u64, len: u64) -> Ticket {
        let start = offset;
        let end = offset.saturating_add(len.max(1));
        let mut g = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        let before = g
            .active
            .iter()
            .filter(|e| e.start < end && start < e.end)
            .map(|e| Arc::clone(&e.gate))
            .collect();
        let id = g.next;
        g.next += 1;
        g.active.push(Entry {
            id,
            start,
            end,
            gate: Arc::new(Semaphore::new(0)),
        });
        Ticket {
            owner: Arc::clone(self),
            id,
            before,
        }
    }

    /// A ticket over everything: waits for all earlier operations, and all later ones wait
    /// for it (a barrier, used for flushes and the end of a resync).
    pub fn barrier(self: &Arc<Self>) -> Ticket {
        self.register(0, u64::MAX)
    }

    /// Operations in flight.
    pub fn len(&self) -> usize {
        self.inner
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .active
            .len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl Ticket {
    /// Waits until every earlier overlapping ticket is released.
    pub async fn wait(&mut self) {
        for gate in self.before.drain(..) {
            // The semaphore has no permits and is only ever closed: acquire returns when closed.
            let _ = gate.acquire().await;
        }
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        let mut g = self.owner.inner.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(pos) = g.active.iter().position(|e| e.id == self.id) {
            let e = g.active.swap_remove(pos);
            e.gate.close();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    async fn done_soon(t: &mut Ticket) -> bool {
        tokio::time::timeout(Duration::from_millis(50), t.wait())
            .await
            .is_ok()
    }

    #[tokio::test]
    async fn overlapping_waits_disjoint_does_not() {
        let c = Conflicts::new();
        let mut a = c.register(0, 4096);
        let mut b = c.register(4096, 4096);
        let mut d = c.register(100, 10);
        assert!(done_soon(&mut a).await);
        assert!(done_soon(&mut b).await, "disjoint ranges never wait");
        let mut d2 = c.register(105, 1);
        assert!(!done_soon(&mut d).await, "d overlaps a");
        drop(a);
        assert!(done_soon(&mut d).await);
        assert!(!done_soon(&mut d2).await, "overlaps d, which is still held");
        drop(d);
        assert!(done_soon(&mut d2).await);
        let mut bar = c.barrier();
        assert!(!done_soon(&mut bar).await, "b and d2 still held");
        drop(b);
        drop(d2);
        assert!(done_soon(&mut bar).await);
        let mut after = c.register(1 << 40, 1);
        assert!(
            !done_soon(&mut after).await,
            "later operations wait for the barrier"
        );
        drop(bar);
        assert!(done_soon(&mut after).await);
        drop(after);
        assert!(c.is_empty());
    }

    #[tokio::test]
    async fn a_dropped_waiter_does_not_block_others() {
        let c = Conflicts::new();
        let a = c.register(0, 10);
        let waiter = c.register(0, 10);
        let mut third = c.register(5, 1);
        drop(waiter);
        drop(a);
        assert!(done_soon(&mut third).await);
        assert_eq!(c.len(), 1);
    }
}
