//! A fixed-bucket latency histogram on atomics, rendered by `/metrics`
//! ([`crate::admin`]) in the Prometheus text format. Observing is one
//! relaxed add per bucket found plus two for the count and sum: meant for
//! per-round or sampled events (a store commit), not per message.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// Upper bounds of the buckets, seconds (Prometheus `le`), 0.1 ms to 10 s.
pub const BOUNDS: [f64; 14] = [
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 10.0,
];

#[derive(Debug, Default)]
pub struct Histogram {
    /// Per bucket (not cumulative); the last one is `+Inf`.
    buckets: [AtomicU64; BOUNDS.len() + 1],
    count: AtomicU64,
    sum_ns: AtomicU64,
}

/// A copy of a histogram's counts.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Snapshot {
    /// Cumulative counts per bound of [`BOUNDS`], then `+Inf`.
    pub cumulative: Vec<u64>,
    pub count: u64,
    pub sum_secs: f64,
}

impl Histogram {
    pub fn observe(&self, d: Duration) {
        let secs = d.as_secs_f64();
        let i = BOUNDS
            .iter()
            .position(|b| secs <= *b)
            .unwrap_or(BOUNDS.len());
        if let Some(b) = self.buckets.get(i) {
            b.fetch_add(1, Ordering::Relaxed);
        }
        self.count.fetch_add(1, Ordering::Relaxed);
        let ns = u64::try_from(d.as_nanos()).unwrap_or(u64::MAX);
        self.sum_ns.fetch_add(ns, Ordering::Relaxed);
    }

    pub fn snapshot(&self) -> Snapshot {
        let mut acc = 0;
        let cumulative = self
            .buckets
            .iter()
            .map(|b| {
                acc += b.load(Ordering::Relaxed);
                acc
            })
            .collect();
        Snapshot {
            cumulative,
            count: self.count.load(Ordering::Relaxed),
            sum_secs: self.sum_ns.load(Ordering::Relaxed) as f64 / 1e9,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_are_cumulative_and_inclusive() {
        let h = Histogram::default();
        h.observe(Duration::from_micros(100)); // le 0.0001 (inclusive)
        h.observe(Duration::from_millis(3)); // le 0.005
        h.observe(Duration::from_secs(20)); // +Inf only
        let s = h.snapshot();
        assert_eq!(s.count, 3);
        assert_eq!(s.cumulative.len(), BOUNDS.len() + 1);
        assert_eq!(s.cumulative[0], 1);
        assert_eq!(s.cumulative[4], 1, "le 0.0025");
        assert_eq!(s.cumulative[5], 2, "le 0.005");
        assert_eq!(s.cumulative[BOUNDS.len() - 1], 2, "le 10");
        assert_eq!(s.cumulative[BOUNDS.len()], 3, "+Inf");
        assert!((s.sum_secs - 20.0031).abs() < 1e-9);
    }
}
