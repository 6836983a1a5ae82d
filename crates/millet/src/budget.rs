//! Broker-wide memory accounting (`limits.memory_budget`).
//!
//! Every session charges the bytes (topic + payload) of the messages in its
//! queue and in-flight window to the broker's [`Meter`]. Each session counts
//! its own bytes exactly, under its lock; the broker-wide sum is kept per
//! thread and folded into one shared atomic only when a thread's share has
//! moved by [`Meter::BATCH`] bytes, so the hot path (millions of deliveries a
//! second) costs a thread-local add, not a contended atomic per message.
//! The shared figure is therefore off by at most `BATCH` bytes per thread.

use std::cell::RefCell;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;

/// The broker-wide count of bytes held by sessions.
#[derive(Debug, Default)]
pub struct Meter {
    used: AtomicI64,
}

thread_local! {
    /// This thread's not yet folded change, and the meter it belongs to.
    static PENDING: RefCell<Option<(Arc<Meter>, i64)>> = const { RefCell::new(None) };
}

impl Meter {
    /// A thread folds its change into the shared count once it is this big.
    pub const BATCH: i64 = 32 * 1024;

    /// Add `delta` bytes (negative: released).
    pub fn charge(self: &Arc<Self>, delta: i64) {
        if delta == 0 {
            return;
        }
        let folded = PENDING.try_with(|p| {
            let mut p = p.borrow_mut();
            match &mut *p {
                Some((m, n)) if Arc::ptr_eq(m, self) => {
                    *n += delta;
                    if n.abs() >= Self::BATCH {
                        m.used.fetch_add(std::mem::take(n), Ordering::Relaxed);
                    }
                }
                other => {
                    // Another meter (tests run several brokers per thread).
                    if let Some((m, n)) = other.take() {
                        m.used.fetch_add(n, Ordering::Relaxed);
                    }
                    if delta.abs() >= Self::BATCH {
                        self.used.fetch_add(delta, Ordering::Relaxed);
                        *other = Some((self.clone(), 0));
                    } else {
                        *other = Some((self.clone(), delta));
                    }
                }
            }
        });
        if folded.is_err() {
            // The thread is exiting (its locals are gone): count directly.
            self.used.fetch_add(delta, Ordering::Relaxed);
        }
    }

    /// Bytes held broker-wide (within `BATCH` per thread).
    pub fn used(&self) -> u64 {
        self.used.load(Ordering::Relaxed).max(0) as u64
    }

    /// Fold this thread's pending change now (tests, shutdown).
    pub fn flush_local() {
        let _ = PENDING.try_with(|p| {
            if let Some((m, n)) = &mut *p.borrow_mut() {
                m.used.fetch_add(std::mem::take(n), Ordering::Relaxed);
            }
        });
    }
}

/// How close the broker is to its memory budget.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Pressure {
    Normal,
    /// At or above [`HIGH_WATERMARK_PERCENT`] of the budget: new sessions
    /// are refused and QoS 0 deliveries dropped.
    High,
    /// At or above the budget: QoS 1/2 PUBLISH refused too.
    Full,
}

/// Share of `memory_budget` where overload protection starts, percent.
pub const HIGH_WATERMARK_PERCENT: u64 = 90;

impl Pressure {
    pub fn of(used: u64, budget: u64) -> Pressure {
        if budget == 0 {
            Pressure::Normal
        } else if used >= budget {
            Pressure::Full
        } else if u128::from(used) * 100 >= u128::from(budget) * u128::from(HIGH_WATERMARK_PERCENT)
        {
            Pressure::High
        } else {
            Pressure::Normal
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn batched_per_thread_and_exact_after_flush() {
        let m = Arc::new(Meter::default());
        m.charge(100);
        assert_eq!(m.used(), 0, "small changes stay with the thread");
        m.charge(Meter::BATCH);
        assert_eq!(m.used(), (Meter::BATCH + 100) as u64);
        m.charge(-50);
        let other = Arc::new(Meter::default());
        other.charge(7); // switching meters folds the first one's share
        assert_eq!(m.used(), (Meter::BATCH + 50) as u64);
        Meter::flush_local();
        assert_eq!(other.used(), 7);
        assert_eq!(Pressure::of(89, 100), Pressure::Normal);
        assert_eq!(Pressure::of(90, 100), Pressure::High);
        assert_eq!(Pressure::of(100, 100), Pressure::Full);
        assert_eq!(Pressure::of(u64::MAX, 0), Pressure::Normal);
        assert_eq!(
            Pressure::of(0, 50),
            Pressure::Normal,
            "a tiny budget is not always high"
        );
        assert_eq!(Pressure::of(u64::MAX - 1, u64::MAX), Pressure::High);
    }
}
