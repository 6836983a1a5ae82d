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

/// Upper bounds of the publish-to-deliver latency buckets, seconds: 50 µs
/// to 5 s.
pub const LATENCY_BOUNDS: [f64; 16] = [
    0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
    2.5, 5.0,
];

/// A histogram with `N` bucket bounds (14: [`BOUNDS`], the default).
#[derive(Debug)]
pub struct Histogram<const N: usize = 14> {
    bounds: &'static [f64; N],
    /// Per bucket (not cumulative).
    buckets: [AtomicU64; N],
    /// Above the last bound (`+Inf` only).
    over: AtomicU64,
    count: AtomicU64,
    sum_ns: AtomicU64,
}

impl Default for Histogram<14> {
    fn default() -> Self {
        Histogram::with_bounds(&BOUNDS)
    }
}

impl Default for Histogram<16> {
    fn default() -> Self {
        Histogram::with_bounds(&LATENCY_BOUNDS)
    }
}

/// A copy of a histogram's counts.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Snapshot {
    /// The bucket bounds, seconds.
    pub bounds: &'static [f64],
    /// Cumulative counts per bound of [`BOUNDS`], then `+Inf`.
    pub cumulative: Vec<u64>,
    pub count: u64,
    pub sum_secs: f64,
}

impl<const N: usize> Histogram<N> {
    /// An empty histogram over `bounds` (ascending, seconds).
    pub fn with_bounds(bounds: &'static [f64; N]) -> Self {
        Histogram {
            bounds,
            buckets: std::array::from_fn(|_| AtomicU64::new(0)),
            over: AtomicU64::new(0),
            count: AtomicU64::new(0),
            sum_ns: AtomicU64::new(0),
        }
    }

    pub fn observe(&self, d: Duration) {
        let secs = d.as_secs_f64();
        match self.bounds.iter().position(|b| secs <= *b) {
            Some(i) => self.buckets[i].fetch_add(1, Ordering::Relaxed),
            None => self.over.fetch_add(1, Ordering::Relaxed),
        };
        self.count.fetch_add(1, Ordering::Relaxed);
        let ns = u64::try_from(d.as_nanos()).unwrap_or(u64::MAX);
        self.sum_ns.fetch_add(ns, Ordering::Relaxed);
    }

    pub fn snapshot(&self) -> Snapshot {
        let mut acc = 0;
        let cumulative = self
            .buckets
            .iter()
            .chain(std::iter::once(&self.over))
            .map(|b| {
                acc += b.load(Ordering::Relaxed);
                acc
            })
            .collect();
        Snapshot {
            bounds: self.bounds,
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
        let h: Histogram = Histogram::default();
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

    #[test]
    fn latency_buckets_run_from_50_us_to_5_s() {
        let h: Histogram<16> = Histogram::default();
        h.observe(Duration::from_micros(40)); // le 0.00005
        h.observe(Duration::from_secs(5)); // le 5 (inclusive)
        h.observe(Duration::from_secs(6)); // +Inf only
        let s = h.snapshot();
        assert_eq!(s.bounds, &LATENCY_BOUNDS[..]);
        assert_eq!(s.cumulative.len(), LATENCY_BOUNDS.len() + 1);
        assert_eq!(s.cumulative[0], 1);
        assert_eq!(s.cumulative[LATENCY_BOUNDS.len() - 1], 2, "le 5");
        assert_eq!(s.cumulative[LATENCY_BOUNDS.len()], 3, "+Inf");
    }
}
