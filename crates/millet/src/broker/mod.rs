//! The broker: routing and everything shared between connections.
//!
//! Owns the subscription index (filter → sessions), the retained messages, the
//! client registry (client id → session; one live connection per client id,
//! takeover), delayed wills, and broker statistics. No IO and no clock: time
//! comes in as `now`, and the server's ticker calls [`Broker::handle_timeout`].
//!
//! Lock order (never acquire against it): `registry` → a session's `state`.
//! A session's `state` lock is never held while taking `index` or `retained`,
//! because publishers hold `index` (read) while they take session locks.

pub mod admin;
pub mod index;
pub mod persist;
pub mod retained;
mod sys;
pub(crate) use sys::rss_bytes;
#[cfg(test)]
mod topic_tree_tests;

use std::cell::RefCell;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytestring::ByteString;
use millet_codec::{topic, LastWill, QoS, ReasonCode};
use parking_lot::{Mutex, RwLock};
use smallvec::SmallVec;

use crate::auth::Authenticator;
use crate::config::{Config, ShareStrategyConfig};
use crate::session::{
    ConnWaker, Delivery, Enqueued, Message, Session, SessionCell, SessionId, Subscription, Will,
    WillParts,
};
use crate::stamp::Stamp;
use crate::store::Op;
use index::{ShareStrategy, SubscriptionIndex};
use retained::RetainedStore;

/// The value stored for each subscription in the index.
/// Back-pressure waits only for a reader that took a message off its
/// queue within this long ([`crate::session::Session::is_draining`]): one
/// that stopped reading or acknowledging does not hold publishers back.
const DRAIN_GRACE: std::time::Duration = std::time::Duration::from_millis(500);

#[derive(Debug, Clone)]
pub struct IndexEntry {
    pub cell: Arc<SessionCell>,
    pub options: millet_codec::SubscriptionOptions,
    pub identifier: Option<u32>,
    /// The full `$share/g/f` filter for shared subscriptions.
    pub share: Option<ByteString>,
}

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
    /// ([`Broker::latency_stamp`]): from the read of the PUBLISH to the
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

impl Broker {
    /// `Some(now)` for one call in [`LATENCY_SAMPLE_EVERY`] on this thread,
    /// for [`Message::routed_at`] (no clock read: `now` is the caller's).
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
}

impl Stats {
    /// `n` bytes read from a client's connection.
    pub fn count_bytes_received(&self, n: usize) {
        self.bytes_received.fetch_add(n as u64, Ordering::Relaxed);
    }

    /// `n` bytes written to a client's connection.
    pub fn count_bytes_sent(&self, n: usize) {
        self.bytes_sent.fetch_add(n as u64, Ordering::Relaxed);
    }
}

/// What [`Broker::publish`] did with a message.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Routed {
    /// Sessions the message was offered to.
    pub sessions: usize,
    /// A receiving session is congested: the publisher should pause.
    pub congested: bool,
    /// What the acknowledgement must wait for (none: nothing stored).
    pub ticket: persist::Ticket,
}

/// Result of attaching a connection to a session.
pub struct Attached {
    pub cell: Arc<SessionCell>,
    pub epoch: u64,
    pub session_present: bool,
}

/// Why a subscription was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SubscribeOutcome {
    /// Granted; `true` if the subscription did not exist before.
    Granted {
        is_new: bool,
    },
    Refused(ReasonCode),
}

struct DelayedWill {
    at: Instant,
    will: Will,
}

pub struct Broker {
    pub config: Config,
    index: RwLock<SubscriptionIndex<SessionId, IndexEntry>>,
    retained: RwLock<RetainedStore<Arc<Message>>>,
    registry: Mutex<HashMap<ByteString, Arc<SessionCell>>>,
    delayed_wills: Mutex<Vec<DelayedWill>>,
    /// When offline sessions expire, soonest first: the ticker looks at the
    /// due ones only, instead of every session every tick. Entries are
    /// checked against the session when due (a session that reconnected
    /// or changed its expiry since is skipped: lazy deletion).
    expiries: Mutex<std::collections::BinaryHeap<std::cmp::Reverse<(Instant, ByteString)>>>,
    next_session_id: AtomicU64,
    next_epoch: AtomicU64,
    pub stats: Stats,
    started: Instant,
    sys: Mutex<sys::SysState>,
    authenticator: Option<Arc<dyn Authenticator>>,
    /// Authorization, quotas and bans ([`crate::security`]); `None`: allow all.
    security: Option<Arc<crate::security::Security>>,
    /// The embedded store; `None` runs in memory only.
    persist: Option<persist::Persistence>,
    last_sweep: Mutex<Option<Instant>>,
    /// Test hook, see [`Broker::panic_on_publish_to`].
    panic_topic: std::sync::OnceLock<Box<str>>,
    /// Broker-wide cap on the per-session "queue full" lines.
    drop_lines: Mutex<DropLines>,
    /// Bytes held by session queues and in-flight windows (`memory_budget`).
    meter: Arc<crate::budget::Meter>,
    /// Retained messages and their bytes (topic + payload), `$SYS` topics
    /// not included; changed only under the `retained` write lock.
    retained_count: AtomicU64,
    retained_bytes: AtomicU64,
    /// What the limits refused (logged at a throttled rate, in `$SYS`).
    pub overload: Overload,
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
    fn log(&self, now: Instant, used: u64, budget: u64) {
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

/// Why a new session is refused ([`Broker::admit_session`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SessionRefusal {
    MaxSessions,
    Memory,
}

/// Bytes a message holds as counted by the limits: topic + payload.
fn message_bytes(m: &Message) -> u64 {
    (m.topic.len() + m.payload.len()) as u64
}

/// The per-session "queue full" lines of the current minute, broker-wide:
/// at most [`DropLines::MAX`] a minute; the rest are summed into one line.
#[derive(Default)]
struct DropLines {
    since: Option<Instant>,
    lines: u32,
    suppressed_sessions: u64,
    suppressed_messages: u64,
}

impl DropLines {
    const MAX: u32 = 10;
}

thread_local! {
    static MATCHES: RefCell<Vec<index::Match<SessionId, IndexEntry>>> = const { RefCell::new(Vec::new()) };
}

impl Broker {
    pub fn new(config: Config, now: Instant) -> Broker {
        let strategy = match config.shared_strategy {
            ShareStrategyConfig::RoundRobin => ShareStrategy::RoundRobin,
            ShareStrategyConfig::Random => ShareStrategy::Random,
            ShareStrategyConfig::HashClientId => ShareStrategy::HashClientId,
        };
        Broker {
            config,
            index: RwLock::new(SubscriptionIndex::new(strategy)),
            retained: RwLock::new(RetainedStore::new()),
            registry: Mutex::new(HashMap::new()),
            delayed_wills: Mutex::new(Vec::new()),
            expiries: Mutex::default(),
            next_session_id: AtomicU64::new(1),
            next_epoch: AtomicU64::new(1),
            stats: Stats::default(),
            started: now,
            sys: Mutex::new(sys::SysState::default()),
            authenticator: None,
            security: None,
            persist: None,
            last_sweep: Mutex::new(None),
            panic_topic: std::sync::OnceLock::new(),
            drop_lines: Mutex::default(),
            meter: Arc::default(),
            retained_count: AtomicU64::new(0),
            retained_bytes: AtomicU64::new(0),
            overload: Overload::default(),
        }
    }

    /// A new session with this broker's queue limits and memory meter.
    fn new_session(&self, id: SessionId, client_id: ByteString) -> Session {
        let l = &self.config.limits;
        let mut s = Session::new(id, client_id, l.max_queued);
        s.set_memory_limits(l.max_queued_bytes, self.meter.clone());
        s
    }

    /// Bytes held in session queues, in-flight windows and the retained
    /// store, as counted against `limits.memory_budget`.
    pub fn memory_used(&self) -> u64 {
        self.meter
            .used()
            .saturating_add(self.retained_bytes.load(Ordering::Relaxed))
    }

    /// Where the broker stands against its memory budget.
    pub fn memory_pressure(&self) -> crate::budget::Pressure {
        crate::budget::Pressure::of(self.memory_used(), self.config.limits.memory_budget)
    }

    /// May `client_id` get a session? A session that exists (resumed, or
    /// discarded by a clean start) always may; a new one not at
    /// `max_sessions`, nor above the memory high watermark (counted).
    /// A client id for a client that sent none [MQTT-3.1.3-6]: random, so
    /// that it is unique across restarts and (with an engine shared by
    /// several nodes) across nodes.
    pub fn assign_client_id(&self) -> ByteString {
        format!("millet-{:016x}", rand::random::<u64>()).into()
    }

    pub fn admit_session(&self, client_id: &str) -> Result<(), SessionRefusal> {
        let reg = self.registry.lock();
        if reg.contains_key(client_id) {
            return Ok(());
        }
        let o = &self.overload;
        if reg.len() >= self.config.limits.max_sessions {
            o.sessions_refused_max.fetch_add(1, Ordering::Relaxed);
            return Err(SessionRefusal::MaxSessions);
        }
        drop(reg);
        if self.memory_pressure() >= crate::budget::Pressure::High {
            o.sessions_refused_memory.fetch_add(1, Ordering::Relaxed);
            return Err(SessionRefusal::Memory);
        }
        Ok(())
    }

    /// Would a retained message of `bytes` on `topic` be stored? Replacing
    /// or deleting one always is; a new topic within `max_retained_messages`
    /// and `max_retained_bytes`, and below the memory budget. `$SYS` topics
    /// (the broker's own) are not limited.
    pub fn retained_admits(&self, topic: &str, bytes: u64) -> bool {
        if topic.starts_with("$SYS/") {
            return true;
        }
        let l = &self.config.limits;
        let full = self.retained_count.load(Ordering::Relaxed) >= l.max_retained_messages as u64
            || self
                .retained_bytes
                .load(Ordering::Relaxed)
                .saturating_add(bytes)
                > l.max_retained_bytes
            || self.memory_pressure() == crate::budget::Pressure::Full;
        !full || self.retained.read().get(topic).is_some()
    }

    /// Count a change of the retained store (`$SYS` topics not counted).
    fn retained_changed(&self, topic: &str, added: Option<&Message>, removed: Option<&Message>) {
        if topic.starts_with("$SYS/") {
            return;
        }
        let (c, b) = (&self.retained_count, &self.retained_bytes);
        if let Some(m) = added {
            c.fetch_add(1, Ordering::Relaxed);
            b.fetch_add(message_bytes(m), Ordering::Relaxed);
        }
        if let Some(m) = removed {
            c.fetch_sub(1, Ordering::Relaxed);
            b.fetch_sub(message_bytes(m), Ordering::Relaxed);
        }
    }

    /// A broker on the embedded store configured in `config.store`, with
    /// everything the store holds restored (sessions, queues, in-flight
    /// windows, QoS 2 ids, delayed wills, retained messages).
    pub fn open(config: Config, now: Instant) -> Result<Broker, crate::store::StoreError> {
        let opened = persist::Persistence::open(&config.data_dir, &config.store, now)?;
        let mut broker = Broker::new(config, now);
        if let Some((p, recovered)) = opened {
            broker.persist = Some(p);
            broker.restore(recovered, now);
        }
        Ok(broker)
    }

    /// The store, if any.
    pub fn persistence(&self) -> Option<&persist::Persistence> {
        self.persist.as_ref()
    }

    /// The store records a connection writes for `session` in one turn.
    pub fn session_writes(&self, session: &Session) -> persist::SessionWrites<'_> {
        persist::SessionWrites::new(self.persist.as_ref(), session)
    }

    /// Whether what `ticket` covers is durable yet (or failed).
    pub fn ticket_status(&self, ticket: persist::Ticket) -> persist::AckStatus {
        match &self.persist {
            Some(p) => p.status(ticket.0),
            None => persist::AckStatus::Durable,
        }
    }

    /// Wake `waker` once `ticket` is done (at once if it is).
    pub fn ticket_wait(&self, ticket: persist::Ticket, waker: &Arc<ConnWaker>) {
        if let (Some(p), false) = (&self.persist, ticket.is_none()) {
            p.wait(ticket.0, waker);
        }
    }

    /// A ticket covering everything submitted so far.
    pub fn last_ticket(&self) -> persist::Ticket {
        persist::Ticket(self.persist.as_ref().map_or(0, |p| p.submitted_seq()))
    }

    /// Acknowledgements go out when the write is submitted, not when it is
    /// durable (`interval` policy), or nothing is stored at all.
    pub fn acks_early(&self) -> bool {
        self.persist.as_ref().is_none_or(|p| p.acks_early())
    }

    /// Rebuild the in-memory state from what the store recovered.
    fn restore(&mut self, rec: crate::store::Recovered, now: Instant) {
        let Some(p) = &self.persist else { return };
        let now_ms = p.unix_ms(now);
        let mut messages: HashMap<u64, Arc<Message>> = HashMap::new();
        let mut message = |id: u64| -> Option<Arc<Message>> {
            if let Some(m) = messages.get(&id) {
                return Some(m.clone());
            }
            let r = rec.messages.get(&id)?;
            let m = Arc::new(p.message_from_record(id, r, now));
            messages.insert(id, m.clone());
            Some(m)
        };
        let (mut n_sessions, mut n_queued, mut n_inflight) = (0usize, 0usize, 0usize);
        let mut registry = HashMap::new();
        let mut wills = Vec::new();
        let (max_queued, max_queued_bytes) = (
            self.config.limits.max_queued,
            self.config.limits.max_queued_bytes,
        );
        let meter = self.meter.clone();
        let idx = self.index.get_mut();
        for rs in &rec.sessions {
            let client_id = ByteString::from(rs.session.client_id.as_str());
            let id = self.next_session_id.fetch_add(1, Ordering::Relaxed);
            let mut s = Session::new(id, client_id.clone(), max_queued);
            s.set_memory_limits(max_queued_bytes, meter.clone());
            s.persisted = true;
            s.expiry_interval = rs.session.expiry_interval;
            // Connected at the crash: the session's clock starts now.
            let expires_ms = rs.session.expires_at_ms.or_else(|| {
                (rs.session.expiry_interval != u32::MAX)
                    .then(|| now_ms.saturating_add(u64::from(rs.session.expiry_interval) * 1000))
            });
            s.expires_at = expires_ms.map(|ms| Stamp::from(p.instant(ms, now)));
            if let Some(t) = s.expires_at {
                self.expiries
                    .lock()
                    .push(std::cmp::Reverse((t.instant(), s.client_id.clone())));
            }
            let cell_subs: Vec<(ByteString, Subscription)> = rs
                .session
                .subscriptions
                .iter()
                .map(|r| {
                    let filter = ByteString::from(r.filter.as_str());
                    let share_group = match topic::parse_shared(&filter) {
                        Ok(Some(sf)) => Some(ByteString::from(sf.group)),
                        _ => None,
                    };
                    (
                        filter,
                        Subscription {
                            options: r.options(),
                            identifier: r.identifier,
                            share_group,
                        },
                    )
                })
                .collect();
            for (seq, e) in &rs.queue {
                let Some(msg) = message(e.message_id) else {
                    continue;
                };
                let mut ids = SmallVec::new();
                ids.extend(e.subscription_ids.iter().copied());
                s.enqueue(Delivery {
                    msg,
                    qos: persist::qos(e.qos),
                    retain: e.retain,
                    subscription_ids: ids,
                    share: e.share.as_deref().map(ByteString::from),
                    seq: *seq,
                    replay: false,
                });
                s.next_seq = s.next_seq.max(seq + 1);
                n_queued += 1;
            }
            for (pid, e) in &rs.inflight {
                let Some(msg) = message(e.message_id) else {
                    continue;
                };
                let mut ids = SmallVec::new();
                ids.extend(e.subscription_ids.iter().copied());
                let d = Delivery {
                    msg,
                    qos: persist::qos(e.qos),
                    retain: e.retain,
                    subscription_ids: ids,
                    share: None,
                    seq: 0,
                    replay: false,
                };
                let state = match e.state {
                    crate::store::InflightState::AwaitAck => {
                        crate::session::InflightState::AwaitAck
                    }
                    crate::store::InflightState::AwaitComp => {
                        crate::session::InflightState::AwaitComp
                    }
                };
                s.push_inflight_state(*pid, d, state);
                s.next_seq = s.next_seq.max(e.order + 1);
                n_inflight += 1;
            }
            s.awaiting_rel.extend(rs.awaiting_rel.iter().copied());
            if let Some(w) = &rs.session.will {
                // A will pending at the crash (or of a connection the crash
                // cut) is published after its delay from now, or at its
                // recorded time.
                let at = match rs.session.will_at_ms {
                    Some(ms) => p.instant(ms, now),
                    None => now + Duration::from_secs(u64::from(w.delay_interval.unwrap_or(0))),
                };
                wills.push(DelayedWill {
                    at,
                    will: persist::Persistence::will_from_record(w, &client_id, id),
                });
            }
            let cell = SessionCell::new(s);
            for (filter, sub) in cell_subs {
                let entry = IndexEntry {
                    cell: cell.clone(),
                    options: sub.options,
                    identifier: sub.identifier,
                    share: sub.share_group.as_ref().map(|_| filter.clone()),
                };
                match topic::parse_shared(&filter) {
                    Ok(Some(sf)) => {
                        idx.insert_shared(sf.group, sf.filter, id, entry);
                    }
                    _ => {
                        idx.insert(&filter, id, entry);
                    }
                }
                cell.state.lock().session.subscriptions.insert(filter, sub);
                self.stats.subscriptions.fetch_add(1, Ordering::Relaxed);
            }
            registry.insert(client_id, cell);
            n_sessions += 1;
        }
        let retained = self.retained.get_mut();
        for (topic_name, id) in &rec.retained {
            if let Some(m) = message(*id) {
                if !m.is_expired(now) {
                    if !topic_name.starts_with("$SYS/") {
                        self.retained_count.fetch_add(1, Ordering::Relaxed);
                        self.retained_bytes
                            .fetch_add(message_bytes(&m), Ordering::Relaxed);
                    }
                    retained.set(topic_name, m);
                }
            }
        }
        *self.registry.get_mut() = registry;
        self.delayed_wills.get_mut().extend(wills);
        tracing::info!(
            sessions = n_sessions,
            queued = n_queued,
            inflight = n_inflight,
            retained = rec.retained.len(),
            dropped_records = rec.dropped,
            "recovered state from the store"
        );
    }

    /// Test hook: the connection task that handles a PUBLISH to `topic`
    /// panics (to test that a panicking connection task still detaches its
    /// session). Only tests call it; peers and configuration cannot set it.
    #[doc(hidden)]
    pub fn panic_on_publish_to(&self, topic: &str) {
        let _ = self.panic_topic.set(topic.into());
    }

    /// Whether a PUBLISH to `topic` must panic (see [`Broker::panic_on_publish_to`]).
    pub(crate) fn injected_panic(&self, topic: &str) -> bool {
        self.panic_topic.get().is_some_and(|t| **t == *topic)
    }

    /// Install the security layer (ACL, quotas, bans) consulted by connections.
    pub fn with_security(mut self, s: Arc<crate::security::Security>) -> Broker {
        self.security = Some(s);
        self
    }

    pub fn security(&self) -> Option<&Arc<crate::security::Security>> {
        self.security.as_ref()
    }

    /// Install the enhanced-authentication provider (MQTT 5 AUTH).
    pub fn with_authenticator(mut self, a: Arc<dyn Authenticator>) -> Broker {
        self.authenticator = Some(a);
        self
    }

    pub fn authenticator(&self) -> Option<&Arc<dyn Authenticator>> {
        self.authenticator.as_ref()
    }

    pub fn uptime(&self, now: Instant) -> Duration {
        now.saturating_duration_since(self.started)
    }

    /// Attach a new connection to the session of `client_id`, creating it,
    /// resuming it or discarding it per `clean_start` [MQTT-3.1.2-4..6]. A
    /// connection already attached is told to close with 0x8E [MQTT-3.1.4-3].
    pub fn connect(
        &self,
        client_id: &ByteString,
        clean_start: bool,
        expiry_interval: u32,
        will: Option<LastWill>,
        waker: Arc<ConnWaker>,
        now: Instant,
    ) -> Attached {
        let epoch = self.next_epoch.fetch_add(1, Ordering::Relaxed);
        let mut wills_now: Vec<Will> = Vec::new();
        let mut ended: Option<Arc<SessionCell>> = None;
        let attached = {
            let mut reg = self.registry.lock();
            let existing = reg.get(client_id).cloned();
            let mut resumed = None;
            if let Some(cell) = existing {
                let mut st = cell.state.lock();
                // A session with expiry 0 ends when its connection closes,
                // and a takeover closes it: nothing to resume.
                let clean_start =
                    clean_start || (st.conn_epoch != 0 && st.session.expiry_interval == 0);
                // The will of the previous connection: it goes out only if the
                // session ends here; a resumed session cancels it, like a
                // reconnection within the will delay [MQTT-3.1.2-8],
                // [MQTT-3.1.3-9] (Mosquitto behaves the same since its issue
                // 1273). A live old connection gets it back to decide on when
                // it closes (see `SessionStateGuarded::takeover_will`).
                let old_will = st.session.will.take();
                if st.conn_epoch != 0 {
                    // Takeover: the old connection sees its epoch replaced and
                    // closes with 0x8E.
                    if let (true, Some(w)) = (clean_start, old_will) {
                        st.takeover_will = Some((st.conn_epoch, w));
                    }
                    st.conn_epoch = 0;
                    st.signal_kick();
                    st.waker = None;
                    st.conn_info = None;
                    self.stats.clients_connected.fetch_sub(1, Ordering::Relaxed);
                } else if let (true, Some(w)) = (clean_start, old_will) {
                    wills_now.push(w);
                }
                // A will waiting for its delay: the session ends before the
                // delay passes (published now), or the reconnection cancels it.
                let delayed = self.take_delayed_will(cell.id);
                if clean_start {
                    wills_now.extend(delayed);
                }
                if clean_start {
                    drop(st);
                    reg.remove(client_id);
                    ended = Some(cell);
                } else {
                    st.conn_epoch = epoch;
                    st.waker = Some(waker.clone());
                    st.kick = None;
                    st.conn_info = None;
                    st.session.expires_at = None;
                    st.session.expiry_interval = expiry_interval;
                    drop(st);
                    resumed = Some(cell);
                }
            }
            match resumed {
                Some(cell) => Attached {
                    cell,
                    epoch,
                    session_present: true,
                },
                None => {
                    let id = self.next_session_id.fetch_add(1, Ordering::Relaxed);
                    let mut s = self.new_session(id, client_id.clone());
                    s.expiry_interval = expiry_interval;
                    let cell = SessionCell::new(s);
                    {
                        let mut st = cell.state.lock();
                        st.conn_epoch = epoch;
                        st.waker = Some(waker.clone());
                    }
                    reg.insert(client_id.clone(), cell.clone());
                    self.stats
                        .clients_maximum
                        .fetch_max(reg.len() as u64, Ordering::Relaxed);
                    Attached {
                        cell,
                        epoch,
                        session_present: false,
                    }
                }
            }
        };
        {
            let mut st = attached.cell.state.lock();
            st.session.will = will.map(|will| Will::new(will, client_id.clone(), attached.cell.id));
            if let Some(p) = &self.persist {
                if expiry_interval > 0 {
                    st.session.persisted = true;
                    p.submit(vec![Op::PutSession(Box::new(
                        p.session_record(&st.session, None),
                    ))]);
                }
            }
        }
        if let Some(cell) = ended {
            self.end_session(&cell, now);
        }
        for w in wills_now {
            self.publish_will(w, now);
        }
        self.stats.clients_connected.fetch_add(1, Ordering::Relaxed);
        attached
    }

    /// The connection `epoch` of `cell` has closed. `publish_will` is false
    /// after a normal DISCONNECT [MQTT-3.1.2-10]. `expiry_override` is the
    /// session expiry from a v5 DISCONNECT.
    pub fn disconnect(
        &self,
        cell: &Arc<SessionCell>,
        epoch: u64,
        publish_will: bool,
        expiry_override: Option<u32>,
        now: Instant,
    ) {
        let mut will_now = None;
        let end = {
            let reg = self.registry.lock();
            let mut st = cell.state.lock();
            if st.conn_epoch != epoch {
                // Taken over. If the session ended with the takeover, our will
                // was left for us to decide on [MQTT-3.1.2-10].
                let will = match st.takeover_will.take() {
                    Some((e, w)) if e == epoch => Some(w),
                    other => {
                        st.takeover_will = other;
                        None
                    }
                };
                drop(st);
                drop(reg);
                if let (true, Some(w)) = (publish_will, will) {
                    self.publish_will(w, now);
                }
                return;
            }
            st.conn_epoch = 0;
            st.kick = None;
            st.waker = None;
            st.conn_info = None;
            st.release_blocked();
            self.stats.clients_connected.fetch_sub(1, Ordering::Relaxed);
            if let Some(e) = expiry_override {
                st.session.expiry_interval = e;
            }
            let expiry = st.session.expiry_interval;
            let will = st.session.will.take();
            let mut delayed: Option<(crate::store::WillRecord, Instant)> = None;
            if let (true, Some(w)) = (publish_will, will) {
                let delay = w
                    .will
                    .properties
                    .will_delay_interval
                    .unwrap_or(0)
                    .min(expiry);
                if delay == 0 {
                    will_now = Some(w);
                } else {
                    let at = now + Duration::from_secs(u64::from(delay));
                    delayed = Some((crate::store::WillRecord::from(&w.will), at));
                    self.delayed_wills.lock().push(DelayedWill { at, will: w });
                }
            }
            if expiry == 0 {
                true
            } else {
                st.session.expires_at = (expiry != u32::MAX)
                    .then(|| Stamp::from(now + Duration::from_secs(u64::from(expiry))));
                if let Some(t) = st.session.expires_at {
                    self.expiries.lock().push(std::cmp::Reverse((
                        t.instant(),
                        st.session.client_id.clone(),
                    )));
                }
                if let (Some(p), true) = (&self.persist, st.session.persisted) {
                    let mut rec = p.session_record(&st.session, delayed.as_ref().map(|d| d.1));
                    rec.will = delayed.map(|d| d.0);
                    p.submit(vec![Op::PutSession(Box::new(rec))]);
                }
                drop(st);
                drop(reg);
                false
            }
        };
        if end {
            let client_id = cell.state.lock().session.client_id.clone();
            {
                let mut reg = self.registry.lock();
                if reg.get(&client_id).is_some_and(|c| Arc::ptr_eq(c, cell)) {
                    reg.remove(&client_id);
                }
            }
            self.end_session(cell, now);
        }
        if let Some(w) = will_now {
            self.publish_will(w, now);
        }
    }

    /// Forget a session: its subscriptions leave the index, and QoS 1/2
    /// messages it received through shared subscriptions but did not
    /// acknowledge go to another member of their group.
    fn end_session(&self, cell: &Arc<SessionCell>, now: Instant) {
        let (subs, pending) = {
            let mut st = cell.state.lock();
            let subs: Vec<(ByteString, Subscription)> = st.session.subscriptions.drain().collect();
            let pending = st.session.drain_all();
            if let (Some(p), true) = (&self.persist, st.session.persisted) {
                st.session.persisted = false;
                p.submit(vec![Op::DeleteSession {
                    client_id: st.session.store_key.clone(),
                }]);
            }
            (subs, pending)
        };
        {
            let mut idx = self.index.write();
            for (filter, sub) in &subs {
                remove_from_index(&mut idx, filter, sub, cell.id);
            }
        }
        self.stats
            .subscriptions
            .fetch_sub(subs.len() as u64, Ordering::Relaxed);
        for d in pending {
            let Some(share) = d.share.clone() else {
                continue;
            };
            if d.qos == QoS::AtMostOnce || d.msg.is_expired(now) {
                continue;
            }
            let Ok(Some(sf)) = topic::parse_shared(&share) else {
                continue;
            };
            let member = self
                .index
                .read()
                .pick_shared_member(sf.group, sf.filter, cell.id);
            if let Some((_, entry)) = member {
                self.deliver(&entry.cell, d);
            }
        }
    }

    /// Remove the delayed will of `session`, if any.
    fn take_delayed_will(&self, session: SessionId) -> Option<Will> {
        let mut dw = self.delayed_wills.lock();
        let i = dw.iter().position(|d| d.will.session == session)?;
        Some(dw.swap_remove(i).will)
    }

    fn publish_will(&self, w: Will, now: Instant) {
        let WillParts {
            will,
            client_id: will_client_id,
            session: will_session,
        } = *w.into_parts();
        let mut properties = millet_codec::PublishProperties {
            payload_format_indicator: will.properties.payload_format_indicator,
            message_expiry_interval: will.properties.message_expiry_interval,
            response_topic: will.properties.response_topic,
            correlation_data: will.properties.correlation_data,
            user_properties: will.properties.user_properties,
            content_type: will.properties.content_type,
            ..Default::default()
        };
        let expires_at = properties
            .message_expiry_interval
            .map(|s| now + Duration::from_secs(u64::from(s)));
        properties.topic_alias = None;
        let msg = Message {
            topic: will.topic,
            payload: will.payload,
            qos: will.qos,
            retain: will.retain,
            properties,
            expires_at,
            publisher: Some(will_session),
            publisher_client_id: will_client_id,
            store_id: Default::default(),
            routed_at: None,
        };
        tracing::debug!(topic = %msg.topic, "publishing will");
        self.publish(Arc::new(msg), None, now);
    }

    /// Route a message to every matching subscription; store or clear it as
    /// retained if its retain flag is set. Returns the number of sessions it
    /// was offered to.
    ///
    /// Back-pressure: when `publisher` is given and a receiving session that
    /// is online has more than `limits.backpressure_queued` messages waiting,
    /// the publisher's waker is parked on that session and `congested` is set
    /// in the result; the publisher should stop reading until woken (the
    /// subscriber wakes it once its queue drained to half the threshold).
    pub fn publish(
        &self,
        msg: Arc<Message>,
        publisher: Option<&Arc<ConnWaker>>,
        _now: Instant,
    ) -> Routed {
        let mut retained_seq = 0;
        // `$SYS` is regenerated every interval: not worth a disk write.
        let persist = self
            .persist
            .as_ref()
            .filter(|_| !msg.topic.starts_with("$SYS/"));
        let store_retained = msg.retain
            && (msg.payload.is_empty() || self.retained_admits(&msg.topic, message_bytes(&msg)));
        if msg.retain && !store_retained {
            self.overload
                .retained_refused
                .fetch_add(1, Ordering::Relaxed);
        }
        if store_retained {
            let mut r = self.retained.write();
            if msg.payload.is_empty() {
                let old = r.remove(&msg.topic); // [MQTT-3.3.1-10]
                self.retained_changed(&msg.topic, None, old.as_deref());
                if let Some(p) = persist {
                    retained_seq = p.submit(vec![Op::DeleteRetained {
                        topic: msg.topic.to_string(),
                    }]);
                }
            } else {
                let kept = Arc::new(msg.detached());
                if let Some(p) = persist {
                    let mut ops = Vec::with_capacity(2);
                    let message_id = p.message_id(&kept, &mut ops, true);
                    ops.push(Op::PutRetained {
                        topic: msg.topic.to_string(),
                        message_id,
                    });
                    retained_seq = p.submit(ops);
                }
                let old = r.set(&msg.topic, kept.clone()); // [MQTT-3.3.1-5]
                self.retained_changed(&msg.topic, Some(&kept), old.as_deref());
            }
        }
        let mut routed = self.route(&msg, publisher);
        routed.ticket = routed.ticket.max(persist::Ticket(retained_seq));
        routed
    }

    fn route(&self, msg: &Arc<Message>, publisher: Option<&Arc<ConnWaker>>) -> Routed {
        let mut matches = MATCHES.with(|m| std::mem::take(&mut *m.borrow_mut()));
        self.index
            .read()
            .matches(&msg.topic, &msg.publisher_client_id, &mut matches);
        let mut routed = Routed::default();
        let mut ops = Vec::new();
        // Read once per message (two shared loads), not per subscriber.
        let shed_qos0 = self.memory_pressure() >= crate::budget::Pressure::High;
        // The message detached from the publisher's read buffer, made once
        // when the first session has to keep it (see `deliver_with_pressure`).
        let mut kept: Option<Arc<Message>> = None;
        // Overlapping subscriptions of one session are merged into one delivery
        // with the highest QoS and every subscription identifier [MQTT-3.3.4-2..5].
        for run in index::group_by_key(&mut matches) {
            let mut best: Option<Delivery> = None;
            for m in run {
                let e = &m.value;
                if e.options.no_local && e.share.is_none() && msg.publisher == Some(m.key) {
                    continue; // [MQTT-3.8.3-3]
                }
                let qos = msg.qos.min(e.options.qos);
                let retain = e.options.retain_as_published && msg.retain;
                match &mut best {
                    None => {
                        let mut ids = SmallVec::new();
                        ids.extend(e.identifier);
                        best = Some(Delivery {
                            msg: msg.clone(),
                            qos,
                            retain,
                            subscription_ids: ids,
                            share: e.share.clone(),
                            seq: 0,
                            replay: false,
                        });
                    }
                    Some(d) => {
                        d.qos = d.qos.max(qos);
                        d.retain |= retain;
                        d.subscription_ids.extend(e.identifier);
                    }
                }
            }
            if let (Some(d), Some(first)) = (best, run.first()) {
                routed.congested |= self.deliver_with_pressure(
                    &first.value.cell,
                    d,
                    publisher,
                    &mut ops,
                    false,
                    Some(&mut kept),
                    shed_qos0,
                );
                routed.sessions += 1;
            }
        }
        matches.clear();
        MATCHES.with(|m| *m.borrow_mut() = matches);
        if let Some(p) = &self.persist {
            routed.ticket = persist::Ticket(p.submit(ops));
        }
        routed
    }

    /// Queue a delivery on a session and wake its connection.
    pub fn deliver(&self, cell: &SessionCell, d: Delivery) {
        let mut ops = Vec::new();
        let shed_qos0 = !d.replay && self.memory_pressure() >= crate::budget::Pressure::High;
        self.deliver_with_pressure(cell, d, None, &mut ops, true, None, shed_qos0);
        if let Some(p) = &self.persist {
            p.submit(ops);
        }
    }

    /// Store the session record (metadata, subscriptions, will) if persisted.
    fn persist_session(&self, s: &Session) {
        if let (Some(p), true) = (&self.persist, s.persisted) {
            p.submit(vec![Op::PutSession(Box::new(p.session_record(s, None)))]);
        }
    }

    /// Queue a delivery; returns true if the session is congested and
    /// `publisher` was parked on it.
    ///
    /// QoS 0 is not queued for a session with no connection attached
    /// (unless `limits.queue_qos0_offline`), nor at all while `shed_qos0`
    /// (memory above the high watermark; counted as dropped).
    ///
    /// `detached`: for a message fresh from a publisher (its topic, payload
    /// and properties are slices of the read buffer it arrived in), the
    /// copy detached from that buffer, made on first need and shared by the
    /// sessions of this publish. A session with no connection attached,
    /// which may keep the message for as long as it lives, gets the copy;
    /// an online session keeps the slice, written and released as it drains.
    /// (Copying for every session, or once its queue is backlogged, cost
    /// 15-26% of the saturated fan-in rate, where queues sit at the
    /// back-pressure threshold; see docs/DESIGN.md.)
    #[allow(clippy::too_many_arguments)] // one private hot-path helper, three callers
    fn deliver_with_pressure(
        &self,
        cell: &SessionCell,
        mut d: Delivery,
        publisher: Option<&Arc<ConnWaker>>,
        ops: &mut Vec<Op>,
        force_message: bool,
        detached: Option<&mut Option<Arc<Message>>>,
        shed_qos0: bool,
    ) -> bool {
        let threshold = self.config.limits.backpressure_queued;
        // In bytes too: half of `max_queued_bytes`, so that an online
        // reader of large messages holds publishers back before its queue
        // drops by the byte limit.
        let bytes_threshold = self.config.limits.max_queued_bytes / 2;
        let (r, congested) = {
            let mut st = cell.state.lock();
            if d.qos == QoS::AtMostOnce && !d.replay {
                if shed_qos0 {
                    drop(st);
                    self.overload
                        .qos0_dropped_memory
                        .fetch_add(1, Ordering::Relaxed);
                    self.stats.messages_dropped.fetch_add(1, Ordering::Relaxed);
                    return false;
                }
                if st.conn_epoch == 0 && !self.config.limits.queue_qos0_offline {
                    return false; // like Mosquitto's queue_qos0_messages false
                }
            }
            if let Some(kept) = detached {
                if st.conn_epoch == 0 && st.session.admits(&d) {
                    d.msg = kept
                        .get_or_insert_with(|| {
                            let m = d.msg.detached();
                            if let Some(&id) = d.msg.store_id.get() {
                                let _ = m.store_id.set(id); // stored once, whichever is used
                            }
                            Arc::new(m)
                        })
                        .clone();
                }
            }
            // A message about to be dropped costs no store work.
            let op = match &self.persist {
                Some(p)
                    if st.session.persisted
                        && (d.qos != QoS::AtMostOnce || p.persist_qos0)
                        && st.session.admits(&d) =>
                {
                    d.seq = st.session.take_seq();
                    Some(p.queue_op(&st.session.store_key, &d, ops, force_message))
                }
                _ => None,
            };
            let r = st.session.enqueue(d);
            if let Some(op) = op {
                if r != Enqueued::Dropped {
                    ops.push(op);
                }
            }
            if let Enqueued::DisplacedQos0 { seqs } = &r {
                for &seq in seqs {
                    if seq != 0 && self.persist.is_some() {
                        ops.push(Op::DeleteQueueEntry {
                            client_id: st.session.store_key.clone(),
                            seq,
                        });
                    }
                }
            }
            if r != Enqueued::Queued {
                if let Some(n) = st.session.drop_log.due_with(Instant::now) {
                    self.log_queue_full(&st.session.client_id, n);
                }
            }
            st.wake();
            // A publisher is never held back by its own session: it must
            // keep reading the acknowledgements that drain it.
            let congested = match publisher {
                Some(w)
                    if st.conn_epoch != 0
                        && (st.session.queue_len() >= threshold
                            || st.session.queued_bytes() >= bytes_threshold)
                        && st.session.is_draining(Instant::now(), DRAIN_GRACE)
                        && !st.waker.as_ref().is_some_and(|own| Arc::ptr_eq(own, w)) =>
                {
                    if !st.blocked.iter().any(|b| Arc::ptr_eq(b, w)) {
                        st.blocked.push(w.clone());
                        w.block();
                    }
                    true
                }
                _ => false,
            };
            (r, congested)
        };
        if r != Enqueued::Queued {
            self.stats.messages_dropped.fetch_add(1, Ordering::Relaxed);
        }
        congested
    }

    /// A session's throttled "queue full" line (at most one a minute per
    /// session, [`crate::session::DropLog`]), itself capped broker-wide: at
    /// most `DropLines::MAX` such lines a minute, the others summed into one
    /// line when the next minute's first one is due.
    fn log_queue_full(&self, client_id: &str, dropped: u64) {
        let now = Instant::now();
        let mut g = self.drop_lines.lock();
        if g.since
            .is_none_or(|t| now.duration_since(t) >= Duration::from_secs(60))
        {
            if g.suppressed_sessions > 0 {
                tracing::warn!(
                    sessions = g.suppressed_sessions,
                    dropped = g.suppressed_messages,
                    "session queues full: more sessions dropped messages in the last minute (their lines left out: at most {} a minute)",
                    DropLines::MAX
                );
            }
            *g = DropLines {
                since: Some(now),
                ..Default::default()
            };
        }
        if g.lines < DropLines::MAX {
            g.lines += 1;
            drop(g);
            tracing::warn!(%client_id, max_queued = self.config.limits.max_queued,
                max_queued_bytes = self.config.limits.max_queued_bytes, dropped,
                "session queue full: messages dropped (QoS 0 first) since this session's last such line (at most one a minute per session)");
        } else {
            g.suppressed_sessions += 1;
            g.suppressed_messages += dropped;
        }
    }

    /// Add a subscription for `cell`. `filter` is as the client sent it.
    pub fn subscribe(
        &self,
        cell: &Arc<SessionCell>,
        filter: &ByteString,
        sub: Subscription,
    ) -> SubscribeOutcome {
        let limits = &self.config.limits;
        if filter.len() > limits.max_topic_length
            || filter.split('/').count() > limits.max_topic_levels
        {
            return SubscribeOutcome::Refused(ReasonCode::TOPIC_FILTER_INVALID);
        }
        let shared = match topic::parse_shared(filter) {
            Ok(s) => s,
            Err(_) => return SubscribeOutcome::Refused(ReasonCode::TOPIC_FILTER_INVALID),
        };
        if shared.is_none() && !topic::valid_topic_filter(filter) {
            return SubscribeOutcome::Refused(ReasonCode::TOPIC_FILTER_INVALID);
        }
        if shared.is_some() && sub.options.no_local {
            // [MQTT-3.8.3-4]: a protocol error; the caller turns this into a DISCONNECT.
            return SubscribeOutcome::Refused(ReasonCode::PROTOCOL_ERROR);
        }
        let is_new = {
            let mut st = cell.state.lock();
            let exists = st.session.subscriptions.contains_key(filter);
            if !exists && st.session.subscriptions.len() >= limits.max_subscriptions {
                return SubscribeOutcome::Refused(ReasonCode::QUOTA_EXCEEDED);
            }
            // Copied: the filter is a slice of the read chunk.
            st.session
                .subscriptions
                .insert(ByteString::from(&**filter), sub.clone());
            self.persist_session(&st.session);
            !exists
        };
        let entry = IndexEntry {
            cell: cell.clone(),
            options: sub.options,
            identifier: sub.identifier,
            share: shared.as_ref().map(|_| ByteString::from(&**filter)),
        };
        {
            let mut idx = self.index.write();
            match &shared {
                Some(sf) => {
                    idx.insert_shared(sf.group, sf.filter, cell.id, entry);
                }
                None => {
                    idx.insert(filter, cell.id, entry);
                }
            }
        }
        if is_new {
            self.stats.subscriptions.fetch_add(1, Ordering::Relaxed);
        }
        SubscribeOutcome::Granted { is_new }
    }

    /// Remove a subscription; returns whether it existed.
    pub fn unsubscribe(&self, cell: &Arc<SessionCell>, filter: &ByteString) -> bool {
        let sub = {
            let mut st = cell.state.lock();
            let Some(sub) = st.session.subscriptions.remove(filter) else {
                return false;
            };
            self.persist_session(&st.session);
            sub
        };
        remove_from_index(&mut self.index.write(), filter, &sub, cell.id);
        self.stats.subscriptions.fetch_sub(1, Ordering::Relaxed);
        true
    }

    /// Queue the retained messages matching a subscription's filter
    /// [MQTT-3.3.1-9]: they get queue room of their own
    /// ([`Session::grant_replay_room`]) and are charged to neither the
    /// session's bytes nor the memory budget (they share the retained copy).
    pub fn replay_retained(
        &self,
        cell: &Arc<SessionCell>,
        r: &crate::session::DeferredReplay,
        now: Instant,
    ) {
        let retained = self.retained_matching(&r.filter, now);
        let delivery = |m: Arc<Message>| {
            let mut ids = SmallVec::new();
            ids.extend(r.identifier);
            Delivery {
                qos: m.qos.min(r.options.qos),
                msg: m,
                retain: true, // [MQTT-3.3.1-8]
                subscription_ids: ids,
                share: None,
                seq: 0,
                replay: true,
            }
        };
        let mut st = cell.state.lock();
        st.session
            .grant_replay_room(retained.len(), self.config.limits.max_retained_replay);
        if st.session.persisted && self.persist.is_some() {
            // QoS 1/2 replays are stored with the queue: the general path.
            drop(st);
            for m in retained {
                self.deliver(cell, delivery(m));
            }
            return;
        }
        // In memory only: queued under one lock (100,000 retained messages
        // took 100,000 lock round trips and wake-ups).
        let mut dropped = 0;
        for m in retained {
            if st.session.enqueue(delivery(m)) != Enqueued::Queued {
                dropped += 1;
            }
        }
        if dropped > 0 {
            if let Some(n) = st.session.drop_log.due_with(Instant::now) {
                self.log_queue_full(&st.session.client_id, n);
            }
        }
        st.wake();
        drop(st);
        self.stats
            .messages_dropped
            .fetch_add(dropped, Ordering::Relaxed);
    }

    /// Retained messages matching `filter`, for delivery on subscribe.
    pub fn retained_matching(&self, filter: &str, now: Instant) -> Vec<Arc<Message>> {
        let mut out = Vec::new();
        self.retained.read().for_each_matching(filter, |_, m| {
            if !m.is_expired(now) {
                out.push(m.clone());
            }
        });
        out
    }

    pub fn retained_count(&self) -> usize {
        self.retained.read().len()
    }

    /// Retained messages, not counting the broker's own `$SYS` topics.
    pub fn retained_count_without_sys(&self) -> usize {
        self.retained_count.load(Ordering::Relaxed) as usize
    }

    /// Sessions in the registry: connected ones, and disconnected ones
    /// that have not expired.
    pub fn session_count(&self) -> usize {
        self.registry.lock().len()
    }

    /// Time-driven work: delayed wills, session expiry, retained expiry,
    /// `$SYS` publication. Call it about once a second.
    pub fn handle_timeout(&self, now: Instant) {
        let due: Vec<Will> = {
            let mut dw = self.delayed_wills.lock();
            let mut due = Vec::new();
            dw.retain(|d| {
                if d.at <= now {
                    due.push(d.will.clone());
                    false
                } else {
                    true
                }
            });
            due
        };
        for w in due {
            self.publish_will(w, now);
        }
        let due: Vec<ByteString> = {
            let mut q = self.expiries.lock();
            let mut due = Vec::new();
            while q.peek().is_some_and(|e| e.0 .0 <= now) {
                if let Some(std::cmp::Reverse((_, id))) = q.pop() {
                    due.push(id);
                }
            }
            due
        };
        let expired: Vec<Arc<SessionCell>> = if due.is_empty() {
            Vec::new()
        } else {
            let mut reg = self.registry.lock();
            let ids: Vec<&ByteString> = due
                .iter()
                .filter(|id| {
                    reg.get(*id).is_some_and(|c| {
                        let st = c.state.lock();
                        st.conn_epoch == 0
                            && st.session.expires_at.is_some_and(|t| t.instant() <= now)
                    })
                })
                .collect();
            ids.into_iter().filter_map(|k| reg.remove(k)).collect()
        };
        self.stats
            .clients_expired
            .fetch_add(expired.len() as u64, Ordering::Relaxed);
        for cell in expired {
            tracing::debug!(session = cell.id, "session expired");
            self.end_session(&cell, now);
        }
        {
            let mut gone = (0, 0, false);
            let mut r = self.retained.write();
            r.for_each(|t, m| {
                if m.is_expired(now) {
                    gone.2 = true;
                    if !t.starts_with("$SYS/") {
                        gone.0 += 1;
                        gone.1 += message_bytes(m);
                    }
                }
            });
            if gone.2 {
                r.retain_where(|m| !m.is_expired(now));
                self.retained_count.fetch_sub(gone.0, Ordering::Relaxed);
                self.retained_bytes.fetch_sub(gone.1, Ordering::Relaxed);
            }
        }
        self.overload
            .log(now, self.memory_used(), self.config.limits.memory_budget);
        if let Some(p) = &self.persist {
            let mut last = self.last_sweep.lock();
            if last.is_none_or(|t| now.saturating_duration_since(t) >= Duration::from_secs(30)) {
                *last = Some(now);
                p.sweep();
            }
        }
        sys::tick(self, now);
    }

    /// Every session's cell, for shutdown.
    pub fn all_sessions(&self) -> Vec<Arc<SessionCell>> {
        self.registry.lock().values().cloned().collect()
    }
}

fn remove_from_index(
    idx: &mut SubscriptionIndex<SessionId, IndexEntry>,
    filter: &str,
    sub: &Subscription,
    id: SessionId,
) {
    match (&sub.share_group, topic::parse_shared(filter)) {
        (Some(_), Ok(Some(sf))) => {
            idx.remove_shared(sf.group, sf.filter, id);
        }
        _ => {
            idx.remove(filter, id);
        }
    }
}
