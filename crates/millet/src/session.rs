//! Session state: what outlives a connection (MQTT 5 section 4.1).
//!
//! This module owns, per client id: the subscriptions, the bounded queue of
//! messages waiting for the client, the outgoing in-flight window (QoS 1/2
//! awaiting PUBACK / PUBREC / PUBCOMP), the incoming QoS 2 packet ids awaiting
//! PUBREL, the will, and the expiry. It is plain data: no IO, no clock (every
//! time-dependent call takes `now`). The broker shares each session between the
//! publishers that enqueue into it and the one connection that drains it, behind
//! a mutex in [`SessionCell`].

use std::collections::{HashSet, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::stamp::Stamp;
use bytes::Bytes;
use bytestring::ByteString;
use millet_codec::{LastWill, PublishProperties, QoS, SubscriptionOptions};
use smallvec::SmallVec;

/// Broker-wide unique id of a session (never reused within a process).
pub type SessionId = u64;

/// A message as routed: shared by every subscriber that receives it.
#[derive(Debug)]
pub struct Message {
    pub topic: ByteString,
    pub payload: Bytes,
    pub qos: QoS,
    pub retain: bool,
    /// Forwarded properties (topic alias and subscription identifiers removed).
    pub properties: PublishProperties,
    /// When the message expires (from the message expiry interval).
    pub expires_at: Option<Instant>,
    /// The publishing session, for No Local.
    pub publisher: Option<SessionId>,
    /// The publisher's client id (hash strategy of shared subscriptions).
    pub publisher_client_id: ByteString,
    /// The engine's id for the message once it keeps it durably (the
    /// embedded engine: its store record; a JetStream engine: the stream
    /// sequence). Set and read by the engine only; the protocol leaves it
    /// empty.
    pub engine_id: std::sync::OnceLock<u64>,
    /// When the broker read it, on one message in
    /// [`crate::broker::LATENCY_SAMPLE_EVERY`] (`None` on the others and on
    /// copies kept for later: retained, queued offline): its live deliveries
    /// feed `millet_deliver_latency_seconds`.
    pub routed_at: Option<Stamp>,
}

impl Message {
    /// A copy sharing no memory with the connection's read buffer (topic,
    /// payload and properties), for messages kept long (retained, queued):
    /// a slice would pin the whole read chunk it arrived in.
    pub fn detached(&self) -> Message {
        let p = &self.properties;
        let copy = |s: &ByteString| ByteString::from(&**s);
        Message {
            topic: ByteString::from(&*self.topic),
            payload: Bytes::copy_from_slice(&self.payload),
            qos: self.qos,
            retain: self.retain,
            properties: PublishProperties {
                response_topic: p.response_topic.as_ref().map(copy),
                correlation_data: p.correlation_data.as_deref().map(Bytes::copy_from_slice),
                user_properties: p
                    .user_properties
                    .iter()
                    .map(|(k, v)| (copy(k), copy(v)))
                    .collect(),
                content_type: p.content_type.as_ref().map(copy),
                subscription_identifiers: p.subscription_identifiers.clone(),
                ..*p
            },
            expires_at: self.expires_at,
            publisher: self.publisher,
            // Owned already (copied at CONNECT).
            publisher_client_id: self.publisher_client_id.clone(),
            engine_id: Default::default(),
            routed_at: None,
        }
    }

    pub fn is_expired(&self, now: Instant) -> bool {
        self.expires_at.is_some_and(|t| t <= now)
    }
}

/// One message on its way to one session.
#[derive(Debug, Clone)]
pub struct Delivery {
    pub msg: Arc<Message>,
    /// QoS after downgrade to the subscription's maximum.
    pub qos: QoS,
    /// Retain flag as it will be sent.
    pub retain: bool,
    pub subscription_ids: SmallVec<[u32; 1]>,
    /// The `$share/g/f` filter this came through, if shared (for redelivery to
    /// another member when this session ends).
    pub share: Option<ByteString>,
    /// The engine's position of this delivery in the session's durable
    /// queue (0: not kept durably). Engine bookkeeping, like the session's
    /// `persisted` and `next_seq`: the protocol never reads it.
    pub seq: u64,
    /// A retained message replayed on SUBSCRIBE: it shares the retained
    /// store's copy, so it is charged to neither the session's bytes nor the
    /// memory budget (the store is), and it uses the replay room.
    pub replay: bool,
}

/// What a queued or in-flight delivery costs besides its topic and payload:
/// its queue slot (arrival number and `Delivery`) and a share of the
/// message's allocation. Without it, millions of small messages fanned out
/// to offline sessions held 1.3 GB of RSS under a 1 GiB budget.
pub const DELIVERY_OVERHEAD: usize = std::mem::size_of::<(u64, Delivery)>() + 16;

impl Delivery {
    /// Bytes this delivery holds, as charged to the session and the budget:
    /// topic + payload + [`DELIVERY_OVERHEAD`] (a payload shared by several
    /// sessions is charged to each: a conservative approximation), nothing
    /// for a retained replay.
    pub fn charge(&self) -> usize {
        if self.replay {
            0
        } else {
            self.msg.topic.len() + self.msg.payload.len() + DELIVERY_OVERHEAD
        }
    }
}

/// A session's subscriptions by filter. A device has one or a few: a vector
/// allocated to its exact size (one subscription: one ~80-byte allocation)
/// instead of a hash map (~340 bytes for one entry), paid per device in a
/// fleet. Lookups are linear; SUBSCRIBE and UNSUBSCRIBE are the only
/// callers, and `max_subscriptions` bounds the length.
#[derive(Debug, Default)]
pub struct Subscriptions(Vec<(ByteString, Subscription)>);

impl Subscriptions {
    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub fn contains_key(&self, filter: &str) -> bool {
        self.0.iter().any(|(f, _)| &**f == filter)
    }

    pub fn get(&self, filter: &str) -> Option<&Subscription> {
        self.0.iter().find(|(f, _)| &**f == filter).map(|(_, s)| s)
    }

    /// Insert or replace; the previous subscription of that filter.
    pub fn insert(&mut self, filter: ByteString, sub: Subscription) -> Option<Subscription> {
        if let Some((_, s)) = self.0.iter_mut().find(|(f, _)| *f == filter) {
            return Some(std::mem::replace(s, sub));
        }
        self.0.reserve_exact(1);
        self.0.push((filter, sub));
        None
    }

    pub fn remove(&mut self, filter: &str) -> Option<Subscription> {
        let i = self.0.iter().position(|(f, _)| &**f == filter)?;
        let (_, s) = self.0.swap_remove(i);
        if self.0.is_empty() {
            self.0 = Vec::new();
        }
        Some(s)
    }

    pub fn iter(&self) -> impl Iterator<Item = (&ByteString, &Subscription)> {
        self.0.iter().map(|(f, s)| (f, s))
    }

    pub fn drain(&mut self) -> impl Iterator<Item = (ByteString, Subscription)> {
        std::mem::take(&mut self.0).into_iter()
    }
}

/// A subscription as the session records it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Subscription {
    pub options: SubscriptionOptions,
    pub identifier: Option<u32>,
    /// `Some(group)` for `$share/{group}/{filter}` subscriptions.
    pub share_group: Option<ByteString>,
}

// The in-flight window's deque comes from a per-thread pool.
crate::lazy::recycled!((u16, Inflight));

/// An outgoing QoS 1/2 message not yet fully acknowledged.
#[derive(Debug, Clone)]
pub struct Inflight {
    pub delivery: Delivery,
    pub state: InflightState,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InflightState {
    /// PUBLISH sent (or to be resent), waiting for PUBACK (QoS 1) or PUBREC (QoS 2).
    AwaitAck,
    /// PUBREL sent, waiting for PUBCOMP.
    AwaitComp,
}

/// What happened to a message offered to a session.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Enqueued {
    Queued,
    /// The queue was full; the new message was dropped.
    Dropped,
    /// The queue was full; the oldest queued QoS 0 messages (one for the
    /// message count, maybe more for the byte limit) were dropped to make
    /// room. `seqs`: their store positions (0: not persisted), for the
    /// caller to delete them from the store.
    DisplacedQos0 {
        seqs: SmallVec<[u64; 2]>,
    },
}

/// The session queue: QoS 0 and QoS 1/2 deliveries in two FIFOs, each entry
/// tagged with its arrival number. Popping takes the lower number of the two
/// heads, so the delivery order is the arrival order across QoS levels (and
/// per publisher [MQTT-4.6.0]); a full queue drops its oldest QoS 0 entry in
/// O(1) (the head of `q0`) instead of searching for it.
///
/// Boxed, and only while it holds something: most sessions (an idle
/// device's) have nothing queued, and keep 8 bytes instead of 64.
#[derive(Debug, Default)]
struct Queue(Option<Box<Lanes>>);

#[derive(Debug, Default)]
struct Lanes {
    q0: VecDeque<(u64, Delivery)>,
    q12: VecDeque<(u64, Delivery)>,
    /// Arrival number of the next push.
    next: u64,
    /// Bytes ([`Delivery::charge`]) of the entries in `q0`.
    bytes0: usize,
}

impl Queue {
    fn len(&self) -> usize {
        self.0.as_ref().map_or(0, |l| l.q0.len() + l.q12.len())
    }

    fn lanes(&mut self) -> &mut Lanes {
        self.0.get_or_insert_with(Box::default)
    }

    fn push_back(&mut self, d: Delivery) {
        self.lanes().push_back(d);
    }

    fn push_front(&mut self, d: Delivery) {
        self.lanes().push_front(d);
    }

    fn pop_front(&mut self) -> Option<Delivery> {
        self.0.as_mut()?.pop_front()
    }

    fn pop_front_q0(&mut self) -> Option<(u64, Delivery)> {
        self.0.as_mut()?.pop_front_q0()
    }

    fn has_q0(&self) -> bool {
        self.0.as_ref().is_some_and(|l| !l.q0.is_empty())
    }

    /// The QoS 1/2 entries, in no particular order.
    fn iter_q12(&self) -> impl Iterator<Item = &Delivery> {
        self.0.iter().flat_map(|l| l.q12.iter().map(|(_, d)| d))
    }

    fn q12_len(&self) -> usize {
        self.0.as_ref().map_or(0, |l| l.q12.len())
    }

    /// Bytes of the QoS 0 entries.
    fn bytes0(&self) -> usize {
        self.0.as_ref().map_or(0, |l| l.bytes0)
    }

    /// Empty: give the lanes back.
    fn release_if_empty(&mut self) {
        if self.len() == 0 {
            self.0 = None;
        }
    }

    /// Drop the entries expired at `now`; the bytes they held.
    fn retain_unexpired(&mut self, now: Instant) -> usize {
        let Some(l) = self.0.as_mut() else {
            return 0;
        };
        /// Drop one lane's expired entries; the bytes they held.
        fn drop_expired(lane: &mut VecDeque<(u64, Delivery)>, now: Instant) -> usize {
            let mut freed = 0;
            lane.retain(|(_, d)| {
                let expired = d.msg.is_expired(now);
                if expired {
                    freed += d.charge();
                }
                !expired
            });
            freed
        }
        let freed0 = drop_expired(&mut l.q0, now);
        l.bytes0 -= freed0;
        freed0 + drop_expired(&mut l.q12, now)
    }
}

impl Lanes {
    fn push_back(&mut self, d: Delivery) {
        let n = self.next;
        self.next += 1;
        if d.qos == QoS::AtMostOnce {
            self.bytes0 += d.charge();
            self.q0.push_back((n, d));
        } else {
            self.q12.push_back((n, d));
        }
    }

    /// Whether the next delivery is the head of `q0` (else of `q12`).
    fn head_is_q0(&self) -> Option<bool> {
        match (self.q0.front(), self.q12.front()) {
            (Some((a, _)), Some((b, _))) => Some((a.wrapping_sub(*b) as i64) < 0),
            (Some(_), None) => Some(true),
            (None, Some(_)) => Some(false),
            (None, None) => None,
        }
    }

    fn pop_front(&mut self) -> Option<Delivery> {
        let q = if self.head_is_q0()? {
            &mut self.q0
        } else {
            &mut self.q12
        };
        let d = q.pop_front().map(|(_, d)| d)?;
        if d.qos == QoS::AtMostOnce {
            self.bytes0 -= d.charge();
        }
        Some(d)
    }

    fn pop_front_q0(&mut self) -> Option<(u64, Delivery)> {
        let e = self.q0.pop_front()?;
        self.bytes0 -= e.1.charge();
        Some(e)
    }

    /// Put `d` before every queued delivery.
    fn push_front(&mut self, d: Delivery) {
        // Arrival numbers only order entries: one below the current head
        // (numbers start at 0 and wrap, the comparison is on the wrapped
        // difference, so this cannot misorder within 2^63 entries).
        let head = [self.q0.front(), self.q12.front()]
            .into_iter()
            .flatten()
            .map(|(n, _)| *n)
            .min_by_key(|n| n.wrapping_sub(self.next) as i64)
            .unwrap_or(self.next);
        let n = head.wrapping_sub(1);
        if d.qos == QoS::AtMostOnce {
            self.bytes0 += d.charge();
            self.q0.push_front((n, d));
        } else {
            self.q12.push_front((n, d));
        }
    }
}

/// Throttle for the "queue full" log line of one session: at most one line
/// per [`DropLog::INTERVAL`], with the number of drops since the last one.
#[derive(Debug, Default)]
pub struct DropLog {
    /// Drops since the last line.
    pub count: u64,
    last: Option<Stamp>,
}

impl DropLog {
    pub const INTERVAL: std::time::Duration = std::time::Duration::from_secs(60);

    /// If a line is due at `now`, the number of drops it reports (and the
    /// count restarts); `None` while throttled or with nothing to report.
    pub fn due(&mut self, now: Instant) -> Option<u64> {
        if self.count == 0
            || self
                .last
                .is_some_and(|t| now.duration_since(t.instant()) < Self::INTERVAL)
        {
            return None;
        }
        self.last = Some(Stamp::from(now));
        Some(std::mem::take(&mut self.count))
    }

    /// [`DropLog::due`], reading the clock only for the first drop after a
    /// line and every 256th: a full queue drops at the publish rate, times
    /// the sessions it fans out to.
    pub fn due_with(&mut self, now: impl FnOnce() -> Instant) -> Option<u64> {
        if self.count == 0
            || (self.last.is_some() && !self.count.is_multiple_of(256) && self.count != 1)
        {
            return None;
        }
        self.due(now())
    }
}

/// A set of packet ids (a session's incoming QoS 2 ids awaiting PUBREL):
/// 8 bytes while none was ever added, where an empty `HashSet` is 48 in
/// every session.
#[derive(Debug, Default)]
// Boxed on purpose: `None` costs 8 bytes where an empty set costs 48.
#[allow(clippy::box_collection)]
pub struct PacketIds(Option<Box<HashSet<u16>>>);

impl PacketIds {
    pub fn contains(&self, id: &u16) -> bool {
        self.0.as_ref().is_some_and(|s| s.contains(id))
    }

    /// Whether `id` was not in the set yet.
    pub fn insert(&mut self, id: u16) -> bool {
        self.0.get_or_insert_with(Default::default).insert(id)
    }

    /// Whether `id` was in the set.
    pub fn remove(&mut self, id: &u16) -> bool {
        self.0.as_mut().is_some_and(|s| s.remove(id))
    }

    pub fn len(&self) -> usize {
        self.0.as_ref().map_or(0, |s| s.len())
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Every id, in increasing order.
    pub fn sorted(&self) -> Vec<u16> {
        let mut ids: Vec<u16> = self.0.iter().flat_map(|s| s.iter().copied()).collect();
        ids.sort_unstable();
        ids
    }

    /// Take every id out (in no particular order).
    pub fn take(&mut self) -> Vec<u16> {
        self.0
            .take()
            .map_or_else(Vec::new, |s| s.into_iter().collect())
    }
}

impl Extend<u16> for PacketIds {
    fn extend<I: IntoIterator<Item = u16>>(&mut self, iter: I) {
        let mut iter = iter.into_iter().peekable();
        if iter.peek().is_some() {
            self.0.get_or_insert_with(Default::default).extend(iter);
        }
    }
}

/// The will of the session's current (or last) connection. One box: most
/// sessions have no will, and `Option<Will>` costs them 8 bytes.
#[derive(Debug, Clone)]
pub struct Will(Box<WillParts>);

#[derive(Debug, Clone)]
pub struct WillParts {
    pub will: LastWill,
    pub client_id: ByteString,
    pub session: SessionId,
}

impl Will {
    pub fn new(will: LastWill, client_id: ByteString, session: SessionId) -> Will {
        Will(Box::new(WillParts {
            will,
            client_id,
            session,
        }))
    }

    pub fn into_parts(self) -> Box<WillParts> {
        self.0
    }
}

impl std::ops::Deref for Will {
    type Target = WillParts;
    fn deref(&self) -> &WillParts {
        &self.0
    }
}

impl std::ops::DerefMut for Will {
    fn deref_mut(&mut self) -> &mut WillParts {
        &mut self.0
    }
}

#[derive(Debug)]
pub struct Session {
    /// Filter (including the `$share/g/` prefix) → subscription.
    pub subscriptions: Subscriptions,
    queue: Queue,
    /// The queue's limits and the meter its bytes are charged to.
    limits: Arc<QueueLimits>,
    /// Insertion-ordered outgoing window, keyed by packet id.
    inflight: crate::lazy::LazyDeque<(u16, Inflight)>,
    /// Incoming QoS 2 packet ids: PUBREC sent, PUBREL not yet received.
    pub awaiting_rel: PacketIds,
    next_packet_id: u16,
    /// Session expiry interval in seconds (v3 clean session 0 = u32::MAX).
    pub expiry_interval: u32,
    /// Set while no connection is attached.
    pub expires_at: Option<Stamp>,
    pub will: Option<Will>,
    /// Messages dropped because the queue was full.
    pub dropped: u64,
    /// The engine keeps this session durably (it is persistent and the
    /// engine has a store): its queue, in-flight and QoS 2 ids are mirrored
    /// there. This, `next_seq` and `Delivery::seq` are the
    /// engine's bookkeeping ([`crate::engine::Engine::session_writes`]
    /// reads them); the protocol never touches them.
    pub persisted: bool,
    /// Next queue entry / in-flight order number for the engine's records.
    pub next_seq: u64,
    /// Drops not yet logged, and when the last drop line was logged.
    pub drop_log: DropLog,
    /// When a queued message last left the queue for the wire, and the
    /// time before that (restored by [`Session::unpop`]).
    last_drain: Option<Stamp>,
    prev_drain: Option<Stamp>,
    /// Queue room beyond `max_queued` granted to retained replays
    /// ([`Session::grant_replay_room`]), and whether the last pop used it.
    replay_room: usize,
    popped_room: bool,
    /// See [`Session::set_consumer_stalled`].
    consumer_stalled: bool,
    /// Bytes ([`Delivery::charge`]) in the queue and in the in-flight
    /// window, mirrored into `meter`; the queue's are limited to `max_queued_bytes`.
    queued_bytes: usize,
    inflight_bytes: usize,
    /// Filters whose retained replay is under way (see [`Session::replay_started`]),
    /// and re-SUBSCRIBEs to them coalesced into one replay after it.
    replays: Option<Box<Replays>>,
}

/// Retained replays under way and re-SUBSCRIBEs waiting for them; boxed,
/// as most sessions have none.
#[derive(Debug, Default)]
struct Replays {
    replaying: Vec<ByteString>,
    deferred: Vec<DeferredReplay>,
}

/// A re-SUBSCRIBE's retained replay, run once the replay before it is sent.
#[derive(Debug, Clone)]
pub struct DeferredReplay {
    pub filter: ByteString,
    pub options: SubscriptionOptions,
    pub identifier: Option<u32>,
}

/// A session's queue limits and the memory meter its bytes are charged to:
/// the node's, one allocation that all its sessions share (8 bytes a
/// session, where the three fields took 24).
#[derive(Debug)]
pub struct QueueLimits {
    pub max_queued: usize,
    pub max_queued_bytes: usize,
    pub meter: Arc<crate::budget::Meter>,
}

impl Drop for Session {
    fn drop(&mut self) {
        self.limits
            .meter
            .charge(-((self.queued_bytes + self.inflight_bytes) as i64));
    }
}

impl Session {
    /// The attached connection reports that its client has consumed
    /// nothing for [`WRITE_BLOCK_GRACE`] (writes stuck, or its in-flight
    /// window full with messages waiting), or consumes again: a stalled
    /// reader is not draining, whatever `last_drain` says.
    pub fn set_consumer_stalled(&mut self, stalled: bool) {
        self.consumer_stalled = stalled;
    }

    /// Give back the capacity of empty queues and windows: a parked
    /// connection's session keeps no buffer it does not use (a device that
    /// received one message would otherwise keep a few hundred bytes of
    /// queue and in-flight window for good).
    pub fn release_idle_memory(&mut self) {
        self.queue.release_if_empty();
        self.inflight.release();
        if self.awaiting_rel.is_empty() {
            self.awaiting_rel = PacketIds::default();
        }
    }

    /// A session limited to `max_queued` messages, with a meter of its own.
    pub fn new(max_queued: usize) -> Self {
        Session::with_limits(Arc::new(QueueLimits {
            max_queued,
            max_queued_bytes: usize::MAX,
            meter: Arc::default(),
        }))
    }

    /// A session under `limits` (the node's).
    pub fn with_limits(limits: Arc<QueueLimits>) -> Self {
        Session {
            subscriptions: Subscriptions::default(),
            queue: Queue::default(),
            limits,
            inflight: crate::lazy::LazyDeque::new(),
            awaiting_rel: PacketIds::default(),
            next_packet_id: 1,
            expiry_interval: 0,
            expires_at: None,
            will: None,
            dropped: 0,
            drop_log: DropLog::default(),
            persisted: false,
            next_seq: 1,
            last_drain: None,
            prev_drain: None,
            replay_room: 0,
            popped_room: false,
            consumer_stalled: false,
            queued_bytes: 0,
            inflight_bytes: 0,
            replays: None,
        }
    }

    /// Limit the queue to `max_queued_bytes` and charge the bytes held to
    /// `meter` (the broker's; a new session has a meter of its own).
    pub fn set_memory_limits(&mut self, max_queued_bytes: usize, meter: Arc<crate::budget::Meter>) {
        let held = (self.queued_bytes + self.inflight_bytes) as i64;
        self.limits.meter.charge(-held);
        meter.charge(held);
        self.limits = Arc::new(QueueLimits {
            max_queued: self.limits.max_queued,
            max_queued_bytes,
            meter,
        });
    }

    /// Bytes queued ([`Delivery::charge`]), not counting the in-flight window.
    pub fn queued_bytes(&self) -> usize {
        self.queued_bytes
    }

    fn add_queued(&mut self, n: usize) {
        self.queued_bytes += n;
        self.limits.meter.charge(n as i64);
    }

    fn sub_queued(&mut self, n: usize) {
        self.queued_bytes -= n;
        self.limits.meter.charge(-(n as i64));
    }

    fn sub_inflight(&mut self, n: usize) {
        self.inflight_bytes -= n;
        self.limits.meter.charge(-(n as i64));
    }

    /// A SUBSCRIBE wants the retained messages of `filter` replayed. Returns
    /// true if the caller is to replay them now; false if a replay of that
    /// filter is still under way, in which case this one is coalesced into
    /// a single replay run after it ([`Session::take_due_replays`]). So a
    /// client repeating SUBSCRIBE costs one scan of the retained store per
    /// replay it actually receives, not one per packet, and still gets every
    /// retained message after its last SUBSCRIBE [MQTT-3.3.1-9].
    /// After a replay was queued: with no replay room in use (nothing
    /// matched, or it fit in the queue) nothing is under way, and the
    /// bookkeeping is released (an idle session keeps no allocation).
    pub fn replay_settled(&mut self) {
        if self.replay_room == 0 && !self.has_deferred_replays() {
            self.replays = None;
        }
    }

    pub fn replay_started(&mut self, filter: &ByteString, replay: DeferredReplay) -> bool {
        let room = self.replay_room;
        let r = self.replays.get_or_insert_with(Default::default);
        if room == 0 && r.deferred.is_empty() {
            r.replaying.clear();
        }
        if room > 0 && r.replaying.iter().any(|f| f == filter) {
            match r.deferred.iter_mut().find(|d| d.filter == *filter) {
                Some(d) => *d = replay,
                None => r.deferred.push(replay),
            }
            return false;
        }
        if !r.replaying.iter().any(|f| f == filter) {
            r.replaying.push(ByteString::from(&**filter));
        }
        true
    }

    /// Coalesced replays due now: the replays before them have left the queue.
    pub fn take_due_replays(&mut self) -> Vec<DeferredReplay> {
        if self.replay_room > 0 {
            return Vec::new();
        }
        self.replays.take().map(|r| r.deferred).unwrap_or_default()
    }

    /// Whether coalesced replays wait (cheap check for the connection).
    pub fn has_deferred_replays(&self) -> bool {
        self.replays
            .as_ref()
            .is_some_and(|r| !r.deferred.is_empty())
    }

    /// Is the attached reader draining this queue: did a message leave it
    /// within `grace` (or has none been queued for it yet)? Back-pressure
    /// holds publishers only for a draining reader; one that stopped
    /// reading or acknowledging is not waited for: its queue fills and drops
    /// by policy until its keep alive or write deadline ends it.
    pub fn is_draining(&self, now: Instant, grace: Duration) -> bool {
        self.last_drain
            .is_none_or(|t| now.saturating_duration_since(t.instant()) < grace)
            && !self.consumer_stalled
    }

    /// Whether a message of `qos` offered now would be kept (queued, possibly
    /// displacing an older QoS 0 message) rather than dropped. O(1); lets the
    /// broker skip the store work for a message about to be dropped.
    pub fn admits(&self, d: &Delivery) -> bool {
        self.fits(d.charge()) || (d.qos != QoS::AtMostOnce && self.queue.has_q0())
    }

    /// Room for one more message of `charge` bytes (a replay, 0 bytes, only
    /// needs room in the count).
    fn fits(&self, charge: usize) -> bool {
        self.queue.len() < self.capacity()
            && (charge == 0
                || self.queued_bytes.saturating_add(charge) <= self.limits.max_queued_bytes)
    }

    /// `max_queued`, plus the room granted to retained replays not yet sent.
    fn capacity(&self) -> usize {
        self.limits.max_queued.saturating_add(self.replay_room)
    }

    /// A SUBSCRIBE is about to queue `n` retained messages: they get room
    /// of their own (up to `limit` in all), so a replay is delivered in
    /// full, paced by the client's flow control, instead of being cut at
    /// `max_queued`; the room shrinks as messages leave the queue.
    pub fn grant_replay_room(&mut self, n: usize, limit: usize) {
        self.replay_room = self.replay_room.saturating_add(n).min(limit);
    }

    /// Offer a message to the session's queue. When the queue is full, the
    /// oldest queued QoS 0 message is dropped first; if there is none, the new
    /// message is dropped. O(1). Drops are counted in [`Session::dropped`];
    /// the caller logs them through [`Session::drop_log`] (throttled).
    pub fn enqueue(&mut self, d: Delivery) -> Enqueued {
        let charge = d.charge();
        if self.fits(charge) {
            self.queue.push_back(d);
            self.add_queued(charge);
            return Enqueued::Queued;
        }
        self.dropped += 1;
        self.drop_log.count += 1;
        if d.qos == QoS::AtMostOnce {
            return Enqueued::Dropped;
        }
        // QoS 1/2: displace the oldest QoS 0 messages until it fits (one
        // for the count; for the byte limit maybe several), if dropping
        // every QoS 0 message would make room at all (checked first, so
        // each message is displaced at most once: amortized O(1)).
        let rest_bytes = self.queued_bytes - self.queue.bytes0();
        if !self.queue.has_q0()
            || self.queue.q12_len() >= self.capacity()
            || (charge > 0 && rest_bytes.saturating_add(charge) > self.limits.max_queued_bytes)
        {
            return Enqueued::Dropped;
        }
        let mut seqs = SmallVec::new();
        let mut freed = 0;
        while self.queue.len() >= self.capacity()
            || (charge > 0
                && (self.queued_bytes - freed).saturating_add(charge)
                    > self.limits.max_queued_bytes)
        {
            let Some((_, old)) = self.queue.pop_front_q0() else {
                break; // not reached: checked above
            };
            freed += old.charge();
            seqs.push(old.seq);
        }
        self.sub_queued(freed);
        self.queue.push_back(d);
        self.add_queued(charge);
        Enqueued::DisplacedQos0 { seqs }
    }

    pub fn queue_len(&self) -> usize {
        self.queue.len()
    }

    pub fn inflight_len(&self) -> usize {
        self.inflight.len()
    }

    pub fn has_pending(&self) -> bool {
        self.queue.len() > 0
    }

    /// Take the next queued delivery (arrival order across QoS levels),
    /// skipping expired messages.
    pub fn pop_queued(&mut self, now: Instant) -> Option<Delivery> {
        self.pop_queued_at(now, Stamp::from(now))
    }

    /// [`Session::pop_queued`] with `now` also as a [`Stamp`] (converted
    /// once for a whole batch by the caller).
    pub fn pop_queued_at(&mut self, now: Instant, stamp: Stamp) -> Option<Delivery> {
        while let Some(d) = self.queue.pop_front() {
            self.sub_queued(d.charge());
            if !d.msg.is_expired(now) {
                self.prev_drain = self.last_drain;
                self.last_drain = Some(stamp);
                self.popped_room = self.replay_room > 0;
                if self.popped_room {
                    self.replay_room -= 1;
                }
                return Some(d);
            }
        }
        None
    }

    /// Put a delivery back at the head of the queue (it could not be sent
    /// yet: that was no progress).
    pub fn unpop(&mut self, d: Delivery) {
        self.last_drain = self.prev_drain;
        if self.popped_room {
            self.popped_room = false;
            self.replay_room += 1;
        }
        self.add_queued(d.charge());
        self.queue.push_front(d);
    }

    /// Allocate a packet identifier not used by the in-flight window.
    pub fn alloc_packet_id(&mut self) -> Option<u16> {
        for _ in 0..=u16::MAX {
            let id = self.next_packet_id;
            self.next_packet_id = self.next_packet_id.checked_add(1).unwrap_or(1);
            if id != 0 && !self.inflight.iter().any(|(p, _)| *p == id) {
                return Some(id);
            }
        }
        None
    }

    pub fn push_inflight(&mut self, packet_id: u16, delivery: Delivery) {
        self.push_inflight_state(packet_id, delivery, InflightState::AwaitAck);
    }

    pub fn push_inflight_state(
        &mut self,
        packet_id: u16,
        delivery: Delivery,
        state: InflightState,
    ) {
        let charge = delivery.charge();
        self.inflight_bytes += charge;
        self.limits.meter.charge(charge as i64);
        self.inflight
            .push_back((packet_id, Inflight { delivery, state }));
    }

    /// The in-flight entry for `packet_id`.
    pub fn inflight_get(&self, packet_id: u16) -> Option<&Inflight> {
        self.inflight
            .iter()
            .find(|(p, _)| *p == packet_id)
            .map(|(_, i)| i)
    }

    /// The next outgoing packet id: it moves with every QoS 1/2 message
    /// sent (cluster mode's checkpoint compares it).
    pub fn packet_id_cursor(&self) -> u16 {
        self.next_packet_id
    }

    /// Take the next store sequence number.
    pub fn take_seq(&mut self) -> u64 {
        let s = self.next_seq;
        self.next_seq += 1;
        s
    }

    fn remove_inflight(&mut self, pos: usize) {
        if let Some((_, i)) = self.inflight.remove(pos) {
            self.sub_inflight(i.delivery.charge());
        }
    }

    fn inflight_pos(&self, packet_id: u16) -> Option<usize> {
        self.inflight.iter().position(|(p, _)| *p == packet_id)
    }

    /// PUBACK received: returns true if it matched a QoS 1 message in flight.
    pub fn handle_puback(&mut self, packet_id: u16) -> bool {
        let at = |s: &Self, pos| s.inflight.get(pos).map(|(_, i)| (i.delivery.qos, i.state));
        match self.inflight_pos(packet_id) {
            Some(pos) if at(self, pos) == Some((QoS::AtLeastOnce, InflightState::AwaitAck)) => {
                self.remove_inflight(pos);
                true
            }
            _ => false,
        }
    }

    /// PUBREC received: returns true if a QoS 2 message moved to "awaiting PUBCOMP".
    /// With an error reason code the message is done [MQTT-4.3.3-?]: removed.
    pub fn handle_pubrec(&mut self, packet_id: u16, is_error: bool) -> bool {
        match self.inflight_pos(packet_id) {
            Some(pos)
                if self
                    .inflight
                    .get(pos)
                    .is_some_and(|(_, i)| i.delivery.qos == QoS::ExactlyOnce) =>
            {
                if is_error {
                    self.remove_inflight(pos);
                } else if let Some((_, i)) = self.inflight.get_mut(pos) {
                    i.state = InflightState::AwaitComp;
                }
                true
            }
            _ => false,
        }
    }

    /// PUBCOMP received.
    pub fn handle_pubcomp(&mut self, packet_id: u16) -> bool {
        match self.inflight_pos(packet_id) {
            Some(pos)
                if self
                    .inflight
                    .get(pos)
                    .is_some_and(|(_, i)| i.state == InflightState::AwaitComp) =>
            {
                self.remove_inflight(pos);
                true
            }
            _ => false,
        }
    }

    /// The in-flight window in send order, for resending on session resume.
    /// The QoS 1/2 messages the session holds: in flight, and queued (in no
    /// particular order).
    pub fn held_messages(&self) -> impl Iterator<Item = &Arc<Message>> {
        self.inflight
            .iter()
            .map(|(_, i)| &i.delivery.msg)
            .chain(self.queue.iter_q12().map(|d| &d.msg))
    }

    pub fn inflight(&self) -> impl Iterator<Item = (u16, &Inflight)> {
        self.inflight.iter().map(|(p, i)| (*p, i))
    }

    /// Forget an in-flight message whatever its state (it can never be sent:
    /// too big for the client [MQTT-3.1.2-25]). Returns true if it was there.
    pub fn forget_inflight(&mut self, packet_id: u16) -> bool {
        match self.inflight_pos(packet_id) {
            Some(pos) => {
                self.remove_inflight(pos);
                true
            }
            None => false,
        }
    }

    /// Remove every in-flight and queued message (for shared-subscription
    /// redelivery when the session ends): returns them.
    pub fn drain_all(&mut self) -> Vec<Delivery> {
        self.sub_inflight(self.inflight_bytes);
        self.sub_queued(self.queued_bytes);
        let mut out: Vec<Delivery> = self
            .inflight
            .take()
            .into_iter()
            .filter(|(_, i)| i.state == InflightState::AwaitAck)
            .map(|(_, i)| i.delivery)
            .collect();
        while let Some(d) = self.queue.pop_front() {
            out.push(d);
        }
        out
    }

    /// Take the whole in-flight window (both states, in send order) and
    /// the queue, for a session moving to another node of a cluster.
    pub fn take_pending(&mut self) -> (Vec<(u16, Inflight)>, Vec<Delivery>) {
        self.sub_inflight(self.inflight_bytes);
        self.sub_queued(self.queued_bytes);
        let inflight = self.inflight.take().into_iter().collect();
        let mut queue = Vec::with_capacity(self.queue.len());
        while let Some(d) = self.queue.pop_front() {
            queue.push(d);
        }
        (inflight, queue)
    }

    /// Forget messages that have expired while queued.
    pub fn expire_queued(&mut self, now: Instant) {
        let freed = self.queue.retain_unexpired(now);
        self.sub_queued(freed);
    }
}

/// Wakes one connection task when its session has work (messages queued,
/// kicked) or the server has news for it (shutdown, a new ban). One per
/// connection, so a takeover can wake the old connection without the new
/// one stealing the wake-up. The connection polls it directly
/// ([`ConnWaker::poll_woken`]): waiting holds no future state, which keeps
/// an idle connection small.
#[derive(Debug, Default)]
pub struct ConnWaker {
    waker: atomic_waker::AtomicWaker,
    /// True while a wake-up is pending: avoids a wake per message under load.
    pending: AtomicBool,
    /// [`ConnWaker::SHUTDOWN`] / [`ConnWaker::BANS`] not yet taken.
    signals: std::sync::atomic::AtomicU8,
    /// Number of congested sessions this connection (as a publisher) is
    /// waiting for (see [`SessionStateGuarded::blocked`]).
    blocked_on: std::sync::atomic::AtomicU32,
}

impl ConnWaker {
    /// The server is shutting down.
    pub const SHUTDOWN: u8 = 1;
    /// A ban was added: the connection checks whether it is now banned.
    pub const BANS: u8 = 2;
    /// The session was taken over or the connection kicked: it must look
    /// (even while its client is not reading and its output is full).
    pub const KICK: u8 = 4;
    /// An engine call answered later ([`crate::engine::Call::Later`]).
    pub const ENGINE: u8 = 8;

    pub fn wake(&self) {
        if !self.pending.swap(true, Ordering::AcqRel) {
            self.waker.wake();
        }
    }

    /// Raise `signal` and wake the connection.
    pub fn signal(&self, signal: u8) {
        self.signals.fetch_or(signal, Ordering::AcqRel);
        self.pending.store(true, Ordering::Release);
        self.waker.wake();
    }

    /// Whether `signal` is raised (not taken: [`ConnWaker::take_signals`]
    /// still sees it).
    pub fn has_signal(&self, signal: u8) -> bool {
        self.signals.load(Ordering::Acquire) & signal != 0
    }

    /// The signals raised since the last call.
    pub fn take_signals(&self) -> u8 {
        if self.signals.load(Ordering::Acquire) == 0 {
            return 0;
        }
        self.signals.swap(0, Ordering::AcqRel)
    }

    /// A congested session registered this publisher.
    pub fn block(&self) {
        self.blocked_on.fetch_add(1, Ordering::AcqRel);
    }

    /// A congested session drained (or went away): one fewer to wait for.
    pub fn unblock(&self) {
        let _ = self
            .blocked_on
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| n.checked_sub(1));
        self.wake();
    }

    /// Some congested session still holds this publisher back.
    pub fn is_blocked(&self) -> bool {
        self.blocked_on.load(Ordering::Acquire) > 0
    }

    /// A wake-up is pending (for tests and diagnostics).
    pub fn is_pending(&self) -> bool {
        self.pending.load(Ordering::Acquire)
    }

    /// Called by the connection before it drains the session; returns
    /// whether a wake-up was pending.
    pub fn clear(&self) -> bool {
        self.pending.swap(false, Ordering::AcqRel)
    }

    /// Ready (and the pending wake-up consumed) once [`ConnWaker::wake`] or
    /// [`ConnWaker::signal`] was called; otherwise the task in `cx` is woken
    /// by the next one. Register first, then test: no wake-up is lost.
    pub fn poll_woken(&self, cx: &mut std::task::Context<'_>) -> std::task::Poll<()> {
        self.waker.register(cx.waker());
        if self.clear() {
            std::task::Poll::Ready(())
        } else {
            std::task::Poll::Pending
        }
    }

    /// Ready once a signal is raised (deliveries alone do not count): for a
    /// connection that takes no more messages for now. The pending wake-up
    /// is left set, so further deliveries do not wake the task again.
    pub fn poll_signalled(&self, cx: &mut std::task::Context<'_>) -> std::task::Poll<()> {
        self.waker.register(cx.waker());
        if self.signals.load(Ordering::Acquire) != 0 {
            std::task::Poll::Ready(())
        } else {
            std::task::Poll::Pending
        }
    }

    /// Resolves after the next `wake` (or at once if one is pending).
    pub async fn notified(&self) {
        std::future::poll_fn(|cx| self.poll_woken(cx)).await
    }
}

/// How long a reader may consume nothing (its writes make no progress, or
/// its in-flight window stays full) before back-pressure stops holding its
/// publishers: a reader that is slow but reading makes some progress far
/// more often; one that stopped reading or acknowledging makes none.
pub const WRITE_BLOCK_GRACE: Duration = Duration::from_millis(20);

/// Publishers paused on a session (see [`SessionStateGuarded::blocked`]):
/// boxed, and absent while none is (almost always), so that every session
/// pays 8 bytes for it rather than a vector's 24.
#[derive(Debug, Default)]
#[allow(clippy::box_collection)] // the point: 8 bytes inline, not a Vec's 24
pub struct Blocked(Option<Box<Vec<Arc<ConnWaker>>>>);

impl Blocked {
    pub fn is_empty(&self) -> bool {
        self.0.as_ref().is_none_or(|v| v.is_empty())
    }

    /// Add `w` unless it is there already; whether it was added.
    pub fn add(&mut self, w: &Arc<ConnWaker>) -> bool {
        let v = self.0.get_or_insert_with(Default::default);
        if v.iter().any(|b| Arc::ptr_eq(b, w)) {
            return false;
        }
        v.push(w.clone());
        true
    }
}

/// A session shared between the broker and the connection serving it.
#[derive(Debug)]
pub struct SessionCell {
    pub id: SessionId,
    /// The session's client id, readable without the lock (the registry
    /// hashes it, the connection logs it, store records name it). Its one
    /// copy: a second handle would cost a shared header.
    pub client_id: ByteString,
    pub state: parking_lot::Mutex<SessionStateGuarded>,
}

/// Session plus the identity of the connection attached to it.
#[derive(Debug)]
pub struct SessionStateGuarded {
    pub session: Session,
    /// Epoch of the attached connection; 0 when none is attached. A
    /// connection whose epoch no longer matches has been taken over.
    pub conn_epoch: u64,
    /// Wakes the attached connection.
    pub waker: Option<Arc<ConnWaker>>,
    /// Set when the attached connection must close (admin kick, shutdown),
    /// with the v5 reason code to send.
    pub kick: Option<millet_codec::ReasonCode>,
    /// The will of a connection that was taken over while its session ended
    /// (it had expiry 0, or the new connection started clean), with that
    /// connection's epoch. That connection decides when it closes: published
    /// unless the last thing it read was a normal DISCONNECT, which may still
    /// have been on its way when the new CONNECT arrived [MQTT-3.1.2-10].
    pub takeover_will: Option<(u64, Will)>,
    /// Publishers paused because this session's queue is over the
    /// back-pressure threshold; woken when it drains or goes offline.
    pub blocked: Blocked,
    /// What the admin API shows of the attached connection (peer,
    /// username, protocol); `None` when none is attached.
    pub conn_info: Option<crate::broker::admin::ConnInfo>,
}

impl SessionStateGuarded {
    pub fn wake(&self) {
        if let Some(w) = &self.waker {
            w.wake();
        }
    }

    /// Tell the attached connection to look at `conn_epoch` / `kick`.
    pub fn signal_kick(&self) {
        if let Some(w) = &self.waker {
            w.signal(ConnWaker::KICK);
        }
    }

    /// Wake every publisher paused on this session.
    pub fn release_blocked(&mut self) {
        for w in self.blocked.0.take().into_iter().flat_map(|b| *b) {
            w.unblock();
        }
    }
}

impl Drop for SessionStateGuarded {
    /// A session that goes away must not leave its publishers paused.
    fn drop(&mut self) {
        self.release_blocked();
    }
}

impl SessionCell {
    pub fn new(id: SessionId, client_id: ByteString, session: Session) -> Arc<Self> {
        Arc::new(SessionCell {
            id,
            client_id,
            state: parking_lot::Mutex::new(SessionStateGuarded {
                session,
                conn_epoch: 0,
                waker: None,
                kick: None,
                takeover_will: None,
                blocked: Blocked::default(),
                conn_info: None,
            }),
        })
    }

    /// Before its connection parks: the session gives back the capacity of
    /// its empty queues ([`Session::release_idle_memory`]).
    pub fn release_idle_memory(&self) {
        self.state.lock().session.release_idle_memory();
    }

    /// The attached client consumes nothing (`true`) or consumes again: a
    /// stalled session no longer holds its publishers back, and the ones it
    /// holds are released ([`Session::set_consumer_stalled`]).
    pub fn set_consumer_stalled(&self, stalled: bool) {
        let mut st = self.state.lock();
        st.session.set_consumer_stalled(stalled);
        if stalled {
            st.release_blocked();
        }
    }

    /// Why the connection of `epoch` must close, if it must: the session
    /// was taken over by a newer connection (0x8E [MQTT-3.1.4-3]), or a
    /// kick was left for it (admin, shutdown, ban), taken once.
    pub fn take_kick(&self, epoch: u64) -> Option<millet_codec::ReasonCode> {
        let mut st = self.state.lock();
        if st.conn_epoch != epoch {
            Some(millet_codec::ReasonCode::SESSION_TAKEN_OVER)
        } else {
            st.kick.take()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retained_replay_room_lets_a_replay_past_max_queued_and_shrinks_as_it_drains() {
        let mut s = Session::new(2);
        let d = |i: u8| Delivery {
            msg: Arc::new(Message {
                topic: format!("t/{i}").into(),
                payload: bytes::Bytes::new(),
                qos: QoS::AtMostOnce,
                retain: true,
                properties: Default::default(),
                expires_at: None,
                publisher: None,
                publisher_client_id: "p".into(),
                engine_id: Default::default(),
                routed_at: None,
            }),
            qos: QoS::AtMostOnce,
            retain: true,
            subscription_ids: Default::default(),
            share: None,
            seq: 0,
            replay: false,
        };
        s.grant_replay_room(3, 100);
        for i in 0..5 {
            assert_eq!(s.enqueue(d(i)), Enqueued::Queued, "message {i}");
        }
        assert_eq!(s.enqueue(d(5)), Enqueued::Dropped); // 2 + 3, no more
        let now = Instant::now();
        let first = s.pop_queued(now).unwrap();
        s.unpop(first); // not sent: the room is not used up
        assert_eq!(s.queue_len(), 5);
        for _ in 0..5 {
            s.pop_queued(now).unwrap();
        }
        // the room is gone with the replay: back to max_queued
        for i in 0..2 {
            assert_eq!(s.enqueue(d(i)), Enqueued::Queued);
        }
        assert_eq!(s.enqueue(d(9)), Enqueued::Dropped);
        // and never beyond the limit
        s.grant_replay_room(1_000, 10);
        assert_eq!(s.capacity(), 12);
    }

    fn msg(qos: QoS) -> Delivery {
        Delivery {
            msg: Arc::new(Message {
                topic: "t".into(),
                payload: Bytes::from_static(b"x"),
                qos,
                retain: false,
                properties: PublishProperties::default(),
                expires_at: None,
                publisher: None,
                publisher_client_id: "p".into(),
                engine_id: Default::default(),
                routed_at: None,
            }),
            qos,
            retain: false,
            subscription_ids: SmallVec::new(),
            share: None,
            seq: 0,
            replay: false,
        }
    }

    #[test]
    fn full_queue_drops_qos0_first() {
        let mut s = Session::new(2);
        assert_eq!(s.enqueue(msg(QoS::AtMostOnce)), Enqueued::Queued);
        assert_eq!(s.enqueue(msg(QoS::AtLeastOnce)), Enqueued::Queued);
        assert_eq!(
            s.enqueue(msg(QoS::AtLeastOnce)),
            Enqueued::DisplacedQos0 {
                seqs: smallvec::smallvec![0]
            }
        );
        assert_eq!(s.enqueue(msg(QoS::AtLeastOnce)), Enqueued::Dropped);
        assert_eq!(s.enqueue(msg(QoS::AtMostOnce)), Enqueued::Dropped);
        assert_eq!(s.queue_len(), 2);
        assert_eq!(s.dropped, 3);
    }

    fn tagged(qos: QoS, tag: &'static str) -> Delivery {
        let mut d = msg(qos);
        d.msg = Arc::new(Message {
            topic: tag.into(),
            ..d.msg.detached()
        });
        d
    }

    fn drain(s: &mut Session) -> Vec<String> {
        let now = Instant::now();
        std::iter::from_fn(|| s.pop_queued(now))
            .map(|d| d.msg.topic.to_string())
            .collect()
    }

    #[test]
    fn full_queue_of_qos1_drops_new_messages_and_keeps_order() {
        let mut s = Session::new(3);
        for t in ["a", "b", "c"] {
            assert_eq!(s.enqueue(tagged(QoS::AtLeastOnce, t)), Enqueued::Queued);
        }
        assert!(!s.admits(&msg(QoS::AtLeastOnce)) && !s.admits(&msg(QoS::AtMostOnce)));
        assert_eq!(s.enqueue(tagged(QoS::AtLeastOnce, "d")), Enqueued::Dropped);
        assert_eq!(s.enqueue(tagged(QoS::ExactlyOnce, "e")), Enqueued::Dropped);
        assert_eq!(s.enqueue(tagged(QoS::AtMostOnce, "f")), Enqueued::Dropped);
        assert_eq!(s.dropped, 3);
        assert_eq!(drain(&mut s), ["a", "b", "c"]);
    }

    #[test]
    fn mixed_full_queue_displaces_oldest_qos0_and_keeps_arrival_order() {
        let mut s = Session::new(5);
        for (seq, (q, t)) in (10..).zip([
            (QoS::AtLeastOnce, "a"),
            (QoS::AtMostOnce, "b"),
            (QoS::ExactlyOnce, "c"),
            (QoS::AtMostOnce, "d"),
            (QoS::AtLeastOnce, "e"),
        ]) {
            let mut d = tagged(q, t);
            d.seq = seq;
            assert_eq!(s.enqueue(d), Enqueued::Queued);
        }
        assert!(s.admits(&msg(QoS::AtLeastOnce)) && !s.admits(&msg(QoS::AtMostOnce)));
        // QoS 0 offered to a full queue is dropped; QoS 1/2 displaces the
        // oldest QoS 0 ("b", store position 11), then the next ("d", 13).
        assert_eq!(s.enqueue(tagged(QoS::AtMostOnce, "x")), Enqueued::Dropped);
        assert_eq!(
            s.enqueue(tagged(QoS::AtLeastOnce, "f")),
            Enqueued::DisplacedQos0 {
                seqs: smallvec::smallvec![11]
            }
        );
        assert_eq!(
            s.enqueue(tagged(QoS::ExactlyOnce, "g")),
            Enqueued::DisplacedQos0 {
                seqs: smallvec::smallvec![13]
            }
        );
        assert_eq!(s.enqueue(tagged(QoS::AtLeastOnce, "h")), Enqueued::Dropped);
        assert_eq!(s.dropped, 4);
        assert_eq!(s.queue_len(), 5);
        // A popped delivery put back goes first again.
        let first = s.pop_queued(Instant::now()).unwrap();
        assert_eq!(&*first.msg.topic, "a");
        s.unpop(first);
        assert_eq!(drain(&mut s), ["a", "c", "e", "f", "g"]);
    }

    #[test]
    fn interleaved_qos_levels_pop_in_arrival_order() {
        let mut s = Session::new(100);
        let qs = [QoS::AtMostOnce, QoS::AtLeastOnce, QoS::ExactlyOnce];
        let names: Vec<&'static str> = (0..30)
            .map(|i| &*Box::leak(format!("{i:02}").into_boxed_str()))
            .collect();
        for (i, n) in names.iter().enumerate() {
            s.enqueue(tagged(qs[(i * 7 / 3) % 3], n));
        }
        // Pop some, put one back, add more: order stays arrival order.
        let now = Instant::now();
        let a = s.pop_queued(now).unwrap();
        let b = s.pop_queued(now).unwrap();
        s.unpop(b);
        assert_eq!(&*a.msg.topic, "00");
        let got = drain(&mut s);
        assert_eq!(got, names[1..].to_vec());
        assert!(!s.has_pending());
        // drain_all merges both queues in arrival order too.
        for n in &names[..6] {
            s.enqueue(tagged(qs[n.len() % 3], n));
        }
        s.enqueue(tagged(QoS::AtMostOnce, "z"));
        let all: Vec<String> = s
            .drain_all()
            .iter()
            .map(|d| d.msg.topic.to_string())
            .collect();
        assert_eq!(all, ["00", "01", "02", "03", "04", "05", "z"]);
    }

    /// A full queue decides in O(1): 100,000 offers to a full queue of
    /// 100,000 QoS 1 messages took minutes with the linear search for a
    /// QoS 0 message to displace (issue 11 item 2).
    #[test]
    fn full_queue_decides_in_constant_time() {
        let n = 100_000;
        let mut s = Session::new(n);
        let d = msg(QoS::AtLeastOnce);
        for _ in 0..n {
            s.enqueue(d.clone());
        }
        let t = Instant::now();
        for _ in 0..n {
            assert_eq!(s.enqueue(d.clone()), Enqueued::Dropped);
        }
        // Half QoS 0 at the tail: each displacement finds it at once.
        let mut s = Session::new(n);
        for i in 0..n {
            s.enqueue(msg(if i < n / 2 {
                QoS::AtLeastOnce
            } else {
                QoS::AtMostOnce
            }));
        }
        for _ in 0..n / 2 {
            assert!(matches!(
                s.enqueue(d.clone()),
                Enqueued::DisplacedQos0 { .. }
            ));
        }
        let elapsed = t.elapsed();
        assert!(
            elapsed < std::time::Duration::from_secs(2),
            "150,000 offers to a full queue took {elapsed:?}"
        );
    }

    fn sized(qos: QoS, n: usize) -> Delivery {
        let mut d = msg(qos);
        d.msg = Arc::new(Message {
            // + the 1-byte topic "t" and the fixed overhead: charged n bytes
            payload: Bytes::from(vec![0u8; n - 1 - DELIVERY_OVERHEAD]),
            ..d.msg.detached()
        });
        d
    }

    #[test]
    fn queue_is_bounded_in_bytes_and_charges_the_meter() {
        let meter = Arc::new(crate::budget::Meter::default());
        let mut s = Session::new(100);
        s.set_memory_limits(1000, meter.clone());
        assert_eq!(s.enqueue(sized(QoS::AtMostOnce, 300)), Enqueued::Queued);
        assert_eq!(s.enqueue(sized(QoS::AtMostOnce, 300)), Enqueued::Queued);
        assert_eq!(s.enqueue(sized(QoS::AtLeastOnce, 300)), Enqueued::Queued);
        assert_eq!(s.queued_bytes(), 900);
        // QoS 0 that does not fit is dropped; QoS 1 displaces as many QoS 0 as needed.
        assert_eq!(s.enqueue(sized(QoS::AtMostOnce, 200)), Enqueued::Dropped);
        assert_eq!(
            s.enqueue(sized(QoS::AtLeastOnce, 600)),
            Enqueued::DisplacedQos0 {
                seqs: smallvec::smallvec![0, 0]
            }
        );
        assert_eq!(s.queued_bytes(), 900);
        // Nothing left to displace: dropped, the queue unchanged.
        assert_eq!(s.enqueue(sized(QoS::AtLeastOnce, 200)), Enqueued::Dropped);
        // Bigger than the whole limit: dropped at once.
        assert_eq!(s.enqueue(sized(QoS::ExactlyOnce, 5000)), Enqueued::Dropped);
        assert_eq!(s.dropped, 3 + 1);
        crate::budget::Meter::flush_local();
        assert_eq!(meter.used(), 900);
        // Queue -> in flight keeps the charge; the ack releases it.
        let now = Instant::now();
        let d = s.pop_queued(now).unwrap();
        s.push_inflight(1, d);
        crate::budget::Meter::flush_local();
        assert_eq!((s.queued_bytes(), meter.used()), (600, 900));
        assert!(s.handle_puback(1));
        crate::budget::Meter::flush_local();
        assert_eq!(meter.used(), 600);
        // A retained replay is charged nothing (it shares the retained copy).
        let mut r = sized(QoS::AtMostOnce, 900);
        r.replay = true;
        s.grant_replay_room(1, 10);
        assert_eq!(s.enqueue(r), Enqueued::Queued);
        assert_eq!(s.queued_bytes(), 600);
        // What the session still holds is released with it.
        drop(s);
        crate::budget::Meter::flush_local();
        assert_eq!(meter.used(), 0);
    }

    #[test]
    fn repeated_subscribes_coalesce_while_a_replay_is_under_way() {
        let mut s = Session::new(10);
        let f: ByteString = "a/+".into();
        let r = |id| DeferredReplay {
            filter: "a/+".into(),
            options: SubscriptionOptions::default(),
            identifier: Some(id),
        };
        assert!(s.replay_started(&f, r(1)));
        s.grant_replay_room(2, 100);
        for i in 0..2 {
            let mut d = tagged(QoS::AtMostOnce, "x");
            d.replay = true;
            d.seq = i;
            s.enqueue(d);
        }
        // Repeats while those two are queued: coalesced, the last one's options kept.
        for id in 2..100 {
            assert!(!s.replay_started(&f, r(id)));
        }
        // Another filter replays at once.
        assert!(s.replay_started(&"b/#".into(), r(7)));
        assert!(
            s.take_due_replays().is_empty(),
            "not due before the replay is sent"
        );
        let now = Instant::now();
        s.pop_queued(now).unwrap();
        assert!(s.take_due_replays().is_empty());
        s.pop_queued(now).unwrap();
        let due = s.take_due_replays();
        assert_eq!(due.len(), 1);
        assert_eq!((&*due[0].filter, due[0].identifier), ("a/+", Some(99)));
        assert!(!s.has_deferred_replays());
    }

    #[test]
    fn drop_log_is_throttled_with_counts() {
        let mut l = DropLog::default();
        let t0 = Instant::now();
        assert_eq!(l.due(t0), None, "nothing to report");
        l.count = 3;
        assert_eq!(l.due(t0), Some(3));
        l.count += 5;
        assert_eq!(l.due(t0 + std::time::Duration::from_secs(59)), None);
        l.count += 1;
        assert_eq!(l.due(t0 + DropLog::INTERVAL), Some(6));
        assert_eq!(l.due(t0 + DropLog::INTERVAL * 3), None);
        // The clock is read for the first drop after a line, then every 256th.
        let mut l = DropLog::default();
        let reads = std::cell::Cell::new(0);
        let clock = |t: Instant| {
            reads.set(reads.get() + 1);
            t
        };
        l.count = 1;
        assert_eq!(l.due_with(|| clock(t0)), Some(1));
        let half = t0 + DropLog::INTERVAL / 2;
        for _ in 0..300 {
            l.count += 1;
            assert_eq!(l.due_with(|| clock(half)), None, "within the minute");
        }
        assert_eq!(reads.get(), 3, "first drop, then the 256th");
        for _ in 300..512 {
            l.count += 1;
            let want = (l.count == 512).then_some(512);
            assert_eq!(l.due_with(|| clock(t0 + DropLog::INTERVAL)), want);
        }
        assert_eq!(reads.get(), 4);
    }

    #[test]
    fn packet_ids_skip_inflight_and_zero() {
        let mut s = Session::new(10);
        s.next_packet_id = u16::MAX;
        let a = s.alloc_packet_id();
        assert_eq!(a, Some(u16::MAX));
        s.push_inflight(u16::MAX, msg(QoS::AtLeastOnce));
        assert_eq!(s.alloc_packet_id(), Some(1));
        s.push_inflight(2, msg(QoS::AtLeastOnce));
        assert_eq!(s.alloc_packet_id(), Some(3));
    }

    #[test]
    fn qos2_outgoing_flow() {
        let mut s = Session::new(10);
        s.push_inflight(7, msg(QoS::ExactlyOnce));
        assert!(!s.handle_puback(7), "PUBACK does not complete QoS 2");
        assert!(!s.handle_pubcomp(7), "PUBCOMP before PUBREC is ignored");
        assert!(s.handle_pubrec(7, false));
        assert_eq!(s.inflight_len(), 1);
        assert!(s.handle_pubcomp(7));
        assert_eq!(s.inflight_len(), 0);
    }
}
