//! Broker-wide counters: [`Stats`] (published under `$SYS`, `/metrics`
//! and the admin API), PUBLISH counts by QoS ([`QosCounters`]), refused
//! CONNECTs ([`AuthFailures`] by [`AuthFailure`]), the sampling of the
//! publish-to-deliver latency ([`Stats::latency_stamp`]), and what the
//! limits refused ([`Overload`], with its throttled log line). Owns the
//! `stats` and `overload` fields.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use parking_lot::Mutex;

use crate::stamp::Stamp;

/// Broker-wide counters, published under `$SYS` (see `sys.rs` for what
/// each topic means).
#[derive(Debug, Default)]
pub struct Stats {
    /// Connections attached to a session (CONNECT accepted).
    pub clients_connected: AtomicU64,
    /// The most sessions (connected or not) there have been at once.
    pub clients_maximum: AtomicU64,
    /// Disconnected sessions removed at the end of their expiry interval.
    pub clients_expired: AtomicU64,
    /// MQTT packets of any type received from / sent to clients.
    pub messages_received: AtomicU64,
    pub messages_sent: AtomicU64,
    /// PUBLISH packets received from / sent to clients.
    pub publish_received: AtomicU64,
    pub publish_sent: AtomicU64,
    /// Bytes on the wire (every packet, headers included; inside TLS).
    pub bytes_received: AtomicU64,
    pub bytes_sent: AtomicU64,
    /// Messages not delivered: a full queue, or too big for the client.
    pub messages_dropped: AtomicU64,
    pub subscriptions: AtomicU64,
    /// Connections parked (quiet, without a task) right now.
    pub clients_parked: AtomicU64,
    /// PUBLISH packets and their payload bytes by QoS, from / to clients:
    /// the by-QoS split of `publish_received` / `publish_sent` (added with
    /// them, once per batch, see `protocol.rs` `SentCount`), sharded.
    pub by_qos: QosCounters,
    /// Part of `messages_dropped`: too big for the receiving client.
    pub dropped_too_large: AtomicU64,
    /// CONNECTs refused by the security layer, by reason ([`AuthFailures`]).
    pub auth_failures: AuthFailures,
    /// Publish-to-deliver latency of the sampled messages
    /// ([`Stats::latency_stamp`]): from the read of the PUBLISH to the
    /// encoding of each live delivery into a subscriber's write buffer.
    pub deliver_latency: crate::histogram::Histogram<16>,
}

/// One PUBLISH in this many (per worker thread) is stamped for the
/// publish-to-deliver latency histogram: observing every delivery would put
/// three shared atomics on the hot path of each.
pub const LATENCY_SAMPLE_EVERY: u32 = 64;

/// Which way a message went, for [`QosCounters`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    /// From clients.
    Received,
    /// To clients.
    Sent,
}

/// One shard of [`QosCounters`]: `[received, sent]` × `[count, bytes]` ×
/// QoS, on cache lines of its own.
#[derive(Debug, Default)]
#[repr(align(128))]
struct QosShard([[[AtomicU64; 3]; 2]; 2]);

/// PUBLISH counts and payload bytes by QoS and direction, in shards picked
/// per thread: the worker threads add to different cache lines, so that
/// the split by QoS adds no contended atomic to a batch (only
/// `/metrics` and `/api/v1/stats` sum the shards).
#[derive(Debug, Default)]
pub struct QosCounters {
    shards: [QosShard; QosCounters::SHARDS],
}

impl QosCounters {
    const SHARDS: usize = 16;

    fn shard(&self) -> &QosShard {
        static NEXT: AtomicU64 = AtomicU64::new(0);
        thread_local! {
            static INDEX: usize = NEXT.fetch_add(1, Ordering::Relaxed) as usize % QosCounters::SHARDS;
        }
        let i = INDEX.with(|i| *i);
        &self.shards[i % Self::SHARDS]
    }

    /// Add `counts[qos]` messages of `bytes[qos]` payload bytes.
    pub fn add(&self, dir: Direction, counts: &[u64; 3], bytes: &[u64; 3]) {
        let s = &self.shard().0[dir as usize];
        for q in 0..3 {
            if counts[q] > 0 {
                s[0][q].fetch_add(counts[q], Ordering::Relaxed);
                s[1][q].fetch_add(bytes[q], Ordering::Relaxed);
            }
        }
    }

    /// `(messages, payload bytes)` by QoS, summed over the shards.
    pub fn totals(&self, dir: Direction) -> ([u64; 3], [u64; 3]) {
        let (mut n, mut b) = ([0; 3], [0; 3]);
        for s in &self.shards {
            let d = &s.0[dir as usize];
            for q in 0..3 {
                n[q] += d[0][q].load(Ordering::Relaxed);
                b[q] += d[1][q].load(Ordering::Relaxed);
            }
        }
        (n, b)
    }
}

/// Why a CONNECT was refused, as the bounded `reason` label of
/// `millet_auth_failures_total` (never a client id or user name).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuthFailure {
    /// A provider refused the credentials presented (password file,
    /// signature, or the HTTP hook's `deny`), a password was given:
    /// CONNACK 0x86 (3.x: 4).
    BadCredentials,
    /// Refused without a password, or no provider accepted the client:
    /// CONNACK 0x87 (3.x: 5).
    NotAuthorized,
    /// A ban matched (client id, user name or address): 0x8A.
    Banned,
    /// `max_connections_per_user` reached: 0x97.
    Quota,
    /// The authentication chain did not answer within `connect_timeout`.
    Timeout,
    /// A JWT whose `exp` (plus leeway) has passed.
    JwtExpired,
    /// A JWT that does not verify (signature, algorithm, issuer,
    /// audience, `nbf`, no `exp` when required, bound to another identity).
    JwtInvalid,
    /// The HTTP hook failed (unreachable, timeout, bad answer) under
    /// `on_error = "deny"`.
    HookError,
    /// The v5 enhanced authentication (SCRAM) exchange failed.
    ScramFailed,
    /// Anything else (an unknown authentication method...).
    Other,
}

impl AuthFailure {
    /// Every reason, in exposition order.
    pub const ALL: [AuthFailure; 10] = [
        AuthFailure::BadCredentials,
        AuthFailure::NotAuthorized,
        AuthFailure::Banned,
        AuthFailure::Quota,
        AuthFailure::Timeout,
        AuthFailure::JwtExpired,
        AuthFailure::JwtInvalid,
        AuthFailure::HookError,
        AuthFailure::ScramFailed,
        AuthFailure::Other,
    ];

    /// The label value.
    pub fn label(self) -> &'static str {
        match self {
            AuthFailure::BadCredentials => "bad_credentials",
            AuthFailure::NotAuthorized => "not_authorized",
            AuthFailure::Banned => "banned",
            AuthFailure::Quota => "quota",
            AuthFailure::Timeout => "timeout",
            AuthFailure::JwtExpired => "jwt_expired",
            AuthFailure::JwtInvalid => "jwt_invalid",
            AuthFailure::HookError => "hook_error",
            AuthFailure::ScramFailed => "scram_failed",
            AuthFailure::Other => "other",
        }
    }
}

/// CONNECTs refused by the authentication chain, bans, per-user limits
/// and the AUTH exchange, by [`AuthFailure`] (for `/metrics`; the total is
/// `$SYS/broker/clients/auth_failed`). Refusals are rare: a plain atomic
/// per refusal.
#[derive(Debug, Default)]
pub struct AuthFailures([AtomicU64; AuthFailure::ALL.len()]);

impl AuthFailures {
    /// Count a refused CONNECT.
    pub fn count(&self, why: AuthFailure) {
        self.0[why as usize].fetch_add(1, Ordering::Relaxed);
    }

    /// `(label, count)` for every reason.
    pub fn by_reason(&self) -> [(&'static str, u64); AuthFailure::ALL.len()] {
        AuthFailure::ALL.map(|r| (r.label(), self.0[r as usize].load(Ordering::Relaxed)))
    }

    /// All refusals.
    pub fn total(&self) -> u64 {
        self.0.iter().map(|a| a.load(Ordering::Relaxed)).sum()
    }
}

impl Stats {
    /// `Some(now)` for one call in [`LATENCY_SAMPLE_EVERY`] on this thread,
    /// for [`crate::session::Message::routed_at`] (no clock read: `now` is the caller's).
    pub fn latency_stamp(&self, now: Instant) -> Option<Stamp> {
        thread_local! {
            static SEEN: std::cell::Cell<u32> = const { std::cell::Cell::new(0) };
        }
        SEEN.with(|n| {
            let v = n.get().wrapping_add(1);
            n.set(v);
            (v % LATENCY_SAMPLE_EVERY == 0).then(|| Stamp::from(now))
        })
    }

    /// `n` bytes read from a client's connection.
    pub fn count_bytes_received(&self, n: usize) {
        self.bytes_received.fetch_add(n as u64, Ordering::Relaxed);
    }

    /// `n` bytes written to a client's connection.
    pub fn count_bytes_sent(&self, n: usize) {
        self.bytes_sent.fetch_add(n as u64, Ordering::Relaxed);
    }
}

/// Counts of what the memory and size limits refused, since start.
#[derive(Debug, Default)]
pub struct Overload {
    /// New sessions refused: over the memory high watermark / at `max_sessions`.
    pub sessions_refused_memory: AtomicU64,
    pub sessions_refused_max: AtomicU64,
    /// QoS 0 deliveries dropped above the memory high watermark.
    pub qos0_dropped_memory: AtomicU64,
    /// QoS 1/2 PUBLISH refused at the memory budget (v5 0x97; 3.x: disconnected).
    pub publish_refused_memory: AtomicU64,
    /// New retained topics not stored (`max_retained_*`, or the budget).
    pub retained_refused: AtomicU64,
    /// The counts at the last log line, and when it was.
    logged: Mutex<([u64; 5], Option<Instant>)>,
}

impl Overload {
    const LOG_INTERVAL: Duration = Duration::from_secs(60);

    fn counts(&self) -> [u64; 5] {
        let g = |a: &AtomicU64| a.load(Ordering::Relaxed);
        [
            g(&self.sessions_refused_memory),
            g(&self.sessions_refused_max),
            g(&self.qos0_dropped_memory),
            g(&self.publish_refused_memory),
            g(&self.retained_refused),
        ]
    }

    /// One line a minute at most, with what was refused since the last one.
    pub(super) fn log(&self, now: Instant, used: u64, budget: u64) {
        let mut g = self.logged.lock();
        if g.1
            .is_some_and(|t| now.saturating_duration_since(t) < Self::LOG_INTERVAL)
        {
            return;
        }
        let c = self.counts();
        if c == g.0 {
            return;
        }
        let d: Vec<u64> = c.iter().zip(g.0.iter()).map(|(a, b)| a - b).collect();
        *g = (c, Some(now));
        drop(g);
        tracing::warn!(
            memory_used = used,
            memory_budget = budget,
            sessions_refused_memory = d[0],
            sessions_refused_max_sessions = d[1],
            qos0_dropped_memory = d[2],
            publish_refused_memory = d[3],
            retained_refused = d[4],
            "overload protection: refused since the last such line (at most one a minute)"
        );
    }
}
