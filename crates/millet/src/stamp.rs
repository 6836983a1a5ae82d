//! [`Stamp`]: an instant in 8 bytes, for the deadlines and times that every
//! connection and session keeps.
//!
//! `Instant` is 16 bytes on Linux (seconds and nanoseconds), and so is
//! `Option<Instant>`. A stamp is the same instant as nanoseconds from a
//! process-wide origin, in a `NonZeroU64`, so `Option<Stamp>` is 8 bytes too.
//! The mapping is exact (nanosecond precision, as `Instant` on Linux) and
//! keeps the order, for any instant within 146 years either side of the
//! first use; beyond that it saturates. Per idle connection and session
//! this saves about 100 bytes (see BENCHMARKS.md, "Where idle-connection
//! memory goes").

use std::num::NonZeroU64;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// The origin's value: stamps below it are instants before the origin.
const ORIGIN: u64 = 1 << 62;

static BASE: OnceLock<Instant> = OnceLock::new();

fn base() -> Instant {
    *BASE.get_or_init(Instant::now)
}

/// `d` in nanoseconds, saturating (in 64-bit arithmetic: `as_nanos` is
/// 128-bit, and this runs for every conversion).
fn nanos(d: Duration) -> u64 {
    d.as_secs()
        .saturating_mul(1_000_000_000)
        .saturating_add(u64::from(d.subsec_nanos()))
}

/// An instant in 8 bytes; `Option<Stamp>` is 8 bytes too.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Stamp(NonZeroU64);

impl Stamp {
    pub fn instant(self) -> Instant {
        let b = base();
        let v = self.0.get();
        if v >= ORIGIN {
            b.checked_add(Duration::from_nanos(v - ORIGIN)).unwrap_or(b)
        } else {
            b.checked_sub(Duration::from_nanos(ORIGIN - v)).unwrap_or(b)
        }
    }
}

thread_local! {
    /// The last conversion on this thread: a driver turn hands the same
    /// `now` to every packet it handles, and converting it again cost ~85
    /// instructions per packet (`Instant` subtraction, 128-bit nanoseconds),
    /// about 1% of a QoS 0 PUBLISH's handling (callgrind).
    static LAST: std::cell::Cell<Option<(Instant, Stamp)>> = const { std::cell::Cell::new(None) };
}

impl From<Instant> for Stamp {
    fn from(t: Instant) -> Stamp {
        LAST.with(|last| match last.get() {
            Some((i, s)) if i == t => s,
            _ => {
                let s = Stamp::convert(t);
                last.set(Some((t, s)));
                s
            }
        })
    }
}

impl Stamp {
    fn convert(t: Instant) -> Stamp {
        let b = base();
        let v = match t.checked_duration_since(b) {
            Some(d) => ORIGIN.saturating_add(nanos(d)),
            None => ORIGIN.saturating_sub(nanos(b.saturating_duration_since(t))),
        };
        Stamp(NonZeroU64::new(v).unwrap_or(NonZeroU64::MIN))
    }
}

/// `d` later (saturating): no `Instant` arithmetic, no conversion.
impl std::ops::Add<Duration> for Stamp {
    type Output = Stamp;

    fn add(self, d: Duration) -> Stamp {
        Stamp(self.0.saturating_add(nanos(d)))
    }
}

impl Stamp {
    /// How long after `earlier` this is (zero if it is not after it).
    pub fn saturating_since(self, earlier: Stamp) -> Duration {
        Duration::from_nanos(self.0.get().saturating_sub(earlier.0.get()))
    }
}

impl From<Stamp> for Instant {
    fn from(s: Stamp) -> Instant {
        s.instant()
    }
}

impl std::fmt::Debug for Stamp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.instant().fmt(f)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_exactly_and_keeps_order() {
        let now = Instant::now();
        let times = [
            now.checked_sub(Duration::from_secs(3600)).unwrap_or(now),
            now,
            now + Duration::from_nanos(1),
            now + Duration::from_secs(100 * 365 * 24 * 3600),
        ];
        for w in times.windows(2) {
            assert!(Stamp::from(w[0]) <= Stamp::from(w[1]));
        }
        for t in times {
            assert_eq!(Stamp::from(t).instant(), t);
        }
        assert_eq!(std::mem::size_of::<Option<Stamp>>(), 8);
    }

    #[test]
    fn arithmetic_on_stamps_matches_arithmetic_on_instants() {
        let now = Instant::now();
        let d = Duration::from_millis(1_500);
        let s = Stamp::from(now);
        assert_eq!(s + d, Stamp::from(now + d));
        assert_eq!((s + d).instant(), now + d);
        assert_eq!((s + d).saturating_since(s), d);
        assert_eq!(s.saturating_since(s + d), Duration::ZERO);
        assert!((s + Duration::MAX).saturating_since(s).as_secs() > 100 * 365 * 24 * 3600);
    }
}
