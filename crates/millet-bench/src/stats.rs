//! Counters, bitsets and latency histograms shared by the client tasks.

use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::Instant;

use hdrhistogram::Histogram;

/// Highest sequence number tracked in bitsets (guards against garbage payloads).
pub const MAX_TRACKED_SEQ: u64 = 1 << 31;

static BASE: OnceLock<Instant> = OnceLock::new();

/// The process-wide monotonic time base for payload timestamps.
pub fn base() -> Instant {
    *BASE.get_or_init(Instant::now)
}

/// Nanoseconds since the process time base.
#[inline]
pub fn now_ns() -> u64 {
    base().elapsed().as_nanos() as u64
}

/// Growable bitset indexed by sequence number.
#[derive(Clone, Debug, Default)]
pub struct Bitset {
    words: Vec<u64>,
}

impl Bitset {
    /// Set bit `i`; returns true if it was already set.
    #[inline]
    pub fn test_and_set(&mut self, i: u64) -> bool {
        let w = (i / 64) as usize;
        if w >= self.words.len() {
            let new_len = (w + 1).max(self.words.len() * 2).max(16);
            self.words.resize(new_len, 0);
        }
        let m = 1u64 << (i % 64);
        let was = self.words[w] & m != 0;
        self.words[w] |= m;
        was
    }

    pub fn count(&self) -> u64 {
        self.words.iter().map(|w| u64::from(w.count_ones())).sum()
    }

    pub fn union_with(&mut self, other: &Bitset) {
        if other.words.len() > self.words.len() {
            self.words.resize(other.words.len(), 0);
        }
        for (a, b) in self.words.iter_mut().zip(&other.words) {
            *a |= *b;
        }
    }

    /// Number of bits set in `self` and not in `other`.
    pub fn count_and_not(&self, other: &Bitset) -> u64 {
        self.words
            .iter()
            .enumerate()
            .map(|(i, w)| {
                let o = other.words.get(i).copied().unwrap_or(0);
                u64::from((w & !o).count_ones())
            })
            .sum()
    }
}

/// Cheap hasher for small integer keys (publisher indexes).
#[derive(Default)]
pub struct IntHasher(u64);

impl Hasher for IntHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.0 = (self.0.rotate_left(8) ^ u64::from(*b)).wrapping_mul(0x9E37_79B9_7F4A_7C15);
        }
    }
    fn write_u32(&mut self, i: u32) {
        self.0 = u64::from(i).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    }
    fn write_u64(&mut self, i: u64) {
        self.0 = i.wrapping_mul(0x9E37_79B9_7F4A_7C15);
    }
}

pub type IntMap<K, V> = HashMap<K, V, BuildHasherDefault<IntHasher>>;

/// What one subscriber saw from one publisher.
#[derive(Clone, Debug, Default)]
pub struct PerPub {
    pub seen: Bitset,
    pub received: u64,
    pub duplicates: u64,
    pub reordered: u64,
    pub max_seq: Option<u64>,
}

impl PerPub {
    #[inline]
    pub fn record(&mut self, seq: u64) {
        self.received += 1;
        if self.seen.test_and_set(seq) {
            self.duplicates += 1;
            return;
        }
        match self.max_seq {
            Some(m) if seq < m => self.reordered += 1,
            _ => self.max_seq = Some(seq),
        }
    }
}

/// Live counters, read by the progress reporter.
#[derive(Default)]
pub struct Counters {
    pub sent: AtomicU64,
    pub acked: AtomicU64,
    pub received: AtomicU64,
    /// Received messages that carry this run's id (counted towards `expected`).
    pub received_own: AtomicU64,
}

impl Counters {
    pub fn get(&self) -> (u64, u64, u64) {
        (
            self.sent.load(Ordering::Relaxed),
            self.acked.load(Ordering::Relaxed),
            self.received.load(Ordering::Relaxed),
        )
    }
}

/// Number of shards for the latency histogram (subscriber i uses shard i % N).
const SHARDS: usize = 16;
/// Highest latency recorded: one hour in ns (larger values are clamped).
const MAX_LAT_NS: u64 = 3_600_000_000_000;

#[allow(clippy::expect_used)]
pub fn new_histogram() -> Histogram<u64> {
    // invariant: 1 ns .. 1 h with 3 significant digits are constant, valid
    // bounds (low >= 1, high >= 2 * low, sigfig <= 5), so this cannot fail.
    Histogram::new_with_bounds(1, MAX_LAT_NS, 3).expect("valid histogram bounds")
}

/// Sharded latency histogram: tasks buffer samples locally and flush batches.
pub struct LatencyHist {
    shards: Vec<Mutex<Histogram<u64>>>,
}

impl Default for LatencyHist {
    fn default() -> Self {
        LatencyHist {
            shards: (0..SHARDS).map(|_| Mutex::new(new_histogram())).collect(),
        }
    }
}

impl LatencyHist {
    pub fn flush(&self, shard: usize, samples: &mut Vec<u64>) {
        if samples.is_empty() {
            return;
        }
        let mut h = match self.shards[shard % SHARDS].lock() {
            Ok(h) => h,
            Err(p) => p.into_inner(),
        };
        for &s in samples.iter() {
            h.saturating_record(s.clamp(1, MAX_LAT_NS));
        }
        samples.clear();
    }

    pub fn merged(&self) -> Histogram<u64> {
        let mut all = new_histogram();
        for s in &self.shards {
            let h = match s.lock() {
                Ok(h) => h,
                Err(p) => p.into_inner(),
            };
            let _ = all.add(&*h);
        }
        all
    }
}

/// Latency summary in microseconds.
#[derive(Clone, Debug, Default, serde::Serialize, serde::Deserialize)]
pub struct LatencySummary {
    pub count: u64,
    pub mean_us: f64,
    pub p50_us: f64,
    pub p90_us: f64,
    pub p99_us: f64,
    pub p999_us: f64,
    pub max_us: f64,
}

pub fn summarize(h: &Histogram<u64>) -> Option<LatencySummary> {
    if h.is_empty() {
        return None;
    }
    let us = |v: u64| v as f64 / 1000.0;
    Some(LatencySummary {
        count: h.len(),
        mean_us: h.mean() / 1000.0,
        p50_us: us(h.value_at_quantile(0.50)),
        p90_us: us(h.value_at_quantile(0.90)),
        p99_us: us(h.value_at_quantile(0.99)),
        p999_us: us(h.value_at_quantile(0.999)),
        max_us: us(h.max()),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bitset_ops() {
        let mut a = Bitset::default();
        assert!(!a.test_and_set(3));
        assert!(a.test_and_set(3));
        assert!(!a.test_and_set(1000));
        assert_eq!(a.count(), 2);
        let mut b = Bitset::default();
        b.test_and_set(3);
        assert_eq!(a.count_and_not(&b), 1);
        b.union_with(&a);
        assert_eq!(b.count(), 2);
    }

    #[test]
    fn perpub_dups_and_reorder() {
        let mut p = PerPub::default();
        for s in [0, 1, 3, 2, 2, 4] {
            p.record(s);
        }
        assert_eq!(p.received, 6);
        assert_eq!(p.duplicates, 1);
        assert_eq!(p.reordered, 1);
        assert_eq!(p.seen.count(), 5);
    }

    #[test]
    fn latency_summary() {
        let l = LatencyHist::default();
        let mut v: Vec<u64> = (1..=1000).map(|i| i * 1000).collect();
        l.flush(3, &mut v);
        let s = summarize(&l.merged());
        assert!(s.is_some());
        if let Some(s) = s {
            assert_eq!(s.count, 1000);
            assert!((s.p50_us - 500.0).abs() < 1.0);
            assert!((s.max_us - 1000.0).abs() < 1.0);
        }
    }
}
