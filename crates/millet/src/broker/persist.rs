//! The embedded engine's durability: the broker's side of [`crate::store`].
//!
//! Owns the store handle, the conversion between in-memory state and store
//! records, the wall clock ↔ `Instant` mapping (records hold unix
//! milliseconds; the broker runs on `Instant`s), and the bookkeeping that lets
//! a connection hold back a PUBACK / PUBREC until the store has made the
//! message durable (group commit: many publishers share one fsync). The
//! `impl Broker` at the end holds the broker's accessors for the store and
//! its durability tickets. Restoring from the store at start-up is in
//! `recovery.rs`.

use std::collections::VecDeque;
use std::ops::RangeInclusive;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytestring::ByteString;
use millet_codec::QoS;
use parking_lot::Mutex;

use crate::config::{DurabilityConfig, StoreConfig};
use crate::session::{ConnWaker, Delivery, Message, Session, SessionId, Will};
use crate::store::{
    self, Durability, InflightEntry, InflightState as StoredState, MessageProperties,
    MessageRecord, Op, QueueEntry, Recovered, SessionRecord, Store, StoreError, StoreOptions,
    SubscriptionRecord, WillRecord,
};

/// Whether an acknowledgement held for a [`Ticket`] may go out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AckStatus {
    Pending,
    Durable,
    /// The write failed; `out_of_space` tells disk full / quota from other errors.
    Failed {
        out_of_space: bool,
    },
}

/// Connections waiting for sequences to become durable.
#[derive(Default)]
struct Waiters {
    waiting: Vec<(u64, Arc<ConnWaker>)>,
    /// Recently failed ranges (bounded), consulted when releasing acks.
    failed: VecDeque<(RangeInclusive<u64>, bool)>,
    /// When the last "store write failed" line was logged, and the failed
    /// writes since.
    failed_logged: Option<Instant>,
    failed_unlogged: u64,
}

/// At most one "store write failed" line per interval.
const FAILED_LOG_INTERVAL: Duration = Duration::from_secs(60);

pub struct Persistence {
    store: Store,
    waiters: Arc<Mutex<Waiters>>,
    base_instant: Instant,
    base_unix_ms: u64,
    pub persist_qos0: bool,
    /// Interval policy: a PUBACK / PUBREC goes out once the write is handed
    /// to the store's writer (which logs within `linger` and fsyncs every
    /// interval), not after it; see the README's durability table.
    early_ack: bool,
}

impl Persistence {
    /// Open the store in `dir` per `cfg`. `now` anchors the clock mapping.
    pub fn open(
        dir: &std::path::Path,
        cfg: &StoreConfig,
        now: Instant,
    ) -> Result<Option<(Persistence, Recovered)>, StoreError> {
        let durability = match cfg.durability {
            DurabilityConfig::None => return Ok(None),
            DurabilityConfig::Sync => Durability::Sync,
            DurabilityConfig::Interval => {
                Durability::Interval(Duration::from_millis(cfg.interval_ms.max(1)))
            }
        };
        let options = StoreOptions {
            durability,
            max_bytes: cfg.max_bytes,
            quarantine_corrupt: cfg.quarantine_corrupt,
            checkpoint_bytes: cfg.checkpoint_bytes,
            checkpoint_interval: Duration::from_millis(cfg.checkpoint_ms),
            // Interval acknowledges before the write (see `early_ack`): let
            // rounds fill up, and absorb the messages acknowledged within.
            linger: match durability {
                Durability::Interval(d) => (d / 4).min(Duration::from_millis(5)),
                // Sync: a short pause after each fsync lets the next round
                // gather what arrives meanwhile. A fleet's publishes come
                // one at a time, spread out; without it every message paid
                // an fsync of its own (measured: 18,000 devices at one
                // QoS 1 message per 10 s cost 3× Mosquitto's CPU, nearly
                // all in fsync). It bounds fsyncs to about 500 a second at
                // the price of at most 2 ms more before the PUBACK.
                Durability::Sync => Duration::from_millis(cfg.sync_linger_ms),
            },
        };
        let (store, recovered) = Store::open_with(&dir.join("store"), options)?;
        let waiters: Arc<Mutex<Waiters>> = Arc::default();
        let w = waiters.clone();
        store.on_durable(move |durable| {
            let mut g = w.lock();
            g.waiting.retain(|(seq, waker)| {
                if *seq <= durable {
                    waker.wake();
                    false
                } else {
                    true
                }
            });
        });
        let w = waiters.clone();
        store.on_failed(move |range, err| {
            let mut g = w.lock();
            // Throttled: a failing store fails every write group.
            g.failed_unlogged += 1;
            let now = Instant::now();
            if g.failed_logged.is_none_or(|t| now.duration_since(t) >= FAILED_LOG_INTERVAL) {
                tracing::error!(error = %err, first = range.start(), last = range.end(),
                    failed_writes = g.failed_unlogged,
                    "store write failed: the affected QoS 1/2 publishes are refused, not acknowledged (logged at most once a minute, with the count of failed writes since the last line)");
                g.failed_logged = Some(now);
                g.failed_unlogged = 0;
            }
            if g.failed.len() >= 64 {
                g.failed.pop_front();
            }
            g.failed.push_back((range, err.is_out_of_space()));
        });
        Ok(Some((
            Persistence {
                store,
                waiters,
                base_instant: now,
                base_unix_ms: store::unix_now_ms(),
                persist_qos0: cfg.persist_qos0,
                early_ack: matches!(durability, Durability::Interval(_)),
            },
            recovered,
        )))
    }

    /// The store itself (statistics, latency, health for the admin API).
    pub fn store(&self) -> &crate::store::Store {
        &self.store
    }

    pub fn submit(&self, ops: Vec<Op>) -> u64 {
        if ops.is_empty() {
            return 0;
        }
        self.store.submit(ops)
    }

    /// [`Persistence::submit`] for ops that queue a message for a
    /// connected client (see [`crate::store::Store::submit_awaiting_ack`]).
    pub fn submit_awaiting_ack(&self, ops: Vec<Op>) -> u64 {
        if ops.is_empty() {
            return 0;
        }
        self.store.submit_awaiting_ack(ops)
    }

    /// The next place in the store's commit order, filled later (see
    /// [`crate::store::Store::reserve`]).
    pub fn reserve(&self) -> crate::store::Reservation<'_> {
        self.store.reserve()
    }

    /// The last sequence submitted to the store so far (see
    /// [`crate::store::Store::submitted_seq`]).
    pub fn submitted_seq(&self) -> u64 {
        self.store.submitted_seq()
    }

    /// See [`crate::store::Store::pause_writes`] (tests only).
    #[doc(hidden)]
    pub fn pause_writes(&self, paused: bool) {
        self.store.pause_writes(paused);
    }

    /// Block until `seq` is durable or failed, at most `timeout` (tests and
    /// tools; the broker itself never blocks on the store).
    pub fn wait_durable(&self, seq: u64, timeout: Duration) -> Result<(), StoreError> {
        self.store.wait_durable(seq, timeout)
    }

    /// Acknowledgements go out before the write (interval policy).
    pub fn acks_early(&self) -> bool {
        self.early_ack
    }

    /// Ask for `waker` to be woken once `seq` is durable (or failed).
    pub fn wait(&self, seq: u64, waker: &Arc<ConnWaker>) {
        if self.early_ack {
            waker.wake();
            return;
        }
        let mut g = self.waiters.lock();
        if self.store.durable_seq() >= seq {
            waker.wake();
            return;
        }
        g.waiting.push((seq, waker.clone()));
    }

    pub fn status(&self, seq: u64) -> AckStatus {
        if seq == 0 {
            return AckStatus::Durable;
        }
        if self.early_ack {
            // Interval: acknowledged once handed to the writer, unless the
            // writer is refusing work (then refused at once: v5 0x97 on a
            // full disk).
            return match self.store.failing() {
                Some(out_of_space) => AckStatus::Failed { out_of_space },
                None => AckStatus::Durable,
            };
        }
        if self.store.durable_seq() < seq {
            return AckStatus::Pending;
        }
        let g = self.waiters.lock();
        match g.failed.iter().find(|(r, _)| r.contains(&seq)) {
            Some((_, out_of_space)) => AckStatus::Failed {
                out_of_space: *out_of_space,
            },
            None => AckStatus::Durable,
        }
    }

    /// Background cleanup of expired sessions and messages in the store.
    pub fn sweep(&self) {
        self.store.sweep(store::unix_now_ms());
    }

    pub fn unix_ms(&self, t: Instant) -> u64 {
        match t.checked_duration_since(self.base_instant) {
            Some(d) => self.base_unix_ms.saturating_add(d.as_millis() as u64),
            None => self
                .base_unix_ms
                .saturating_sub(self.base_instant.duration_since(t).as_millis() as u64),
        }
    }

    pub fn instant(&self, unix_ms: u64, now: Instant) -> Instant {
        let now_ms = self.unix_ms(now);
        if unix_ms >= now_ms {
            now + Duration::from_millis(unix_ms - now_ms)
        } else {
            now.checked_sub(Duration::from_millis(now_ms - unix_ms))
                .unwrap_or(now)
        }
    }

    /// The store id of `msg`, adding a `PutMessage` to `ops` the first time
    /// (and whenever `force` is set: a new reference made in a later batch,
    /// when the earlier references may all be gone).
    pub fn message_id(&self, msg: &Message, ops: &mut Vec<Op>, force: bool) -> u64 {
        let mut fresh = false;
        let id = *msg.engine_id.get_or_init(|| {
            fresh = true;
            self.store.alloc_message_id()
        });
        if fresh || force {
            ops.push(Op::PutMessage {
                id,
                message: Box::new(self.message_record(msg)),
            });
        }
        id
    }

    pub fn message_record(&self, m: &Message) -> MessageRecord {
        message_record(m, m.expires_at.map(|t| self.unix_ms(t)))
    }

    pub fn message_from_record(&self, id: u64, r: &MessageRecord, now: Instant) -> Message {
        let now_ms = self.unix_ms(now);
        let msg = Message {
            topic: r.topic.clone(),
            payload: r.payload.clone(),
            qos: qos(r.qos),
            retain: r.retain,
            properties: r.properties.to_publish(now_ms),
            expires_at: r.properties.expires_at_ms.map(|ms| self.instant(ms, now)),
            publisher: None,
            publisher_client_id: r.publisher.clone().unwrap_or_default(),
            engine_id: Default::default(),
            routed_at: None,
        };
        let _ = msg.engine_id.set(id);
        msg
    }

    /// A queue entry for `d`, referencing its message (stored if needed).
    pub fn queue_op(
        &self,
        client_id: &ByteString,
        d: &Delivery,
        ops: &mut Vec<Op>,
        force_message: bool,
    ) -> Op {
        let message_id = self.message_id(&d.msg, ops, force_message);
        Op::PutQueueEntry {
            client_id: client_id.clone(),
            seq: d.seq,
            entry: QueueEntry {
                message_id,
                qos: d.qos as u8,
                retain: d.retain,
                subscription_ids: d.subscription_ids.to_vec(),
                share: d.share.as_ref().map(|s| s.to_string()),
            },
        }
    }

    pub fn inflight_op(
        &self,
        client_id: &ByteString,
        packet_id: u16,
        d: &Delivery,
        await_comp: bool,
        order: u64,
    ) -> Op {
        Op::PutInflight {
            client_id: client_id.clone(),
            packet_id,
            entry: InflightEntry {
                message_id: d.msg.engine_id.get().copied().unwrap_or(0),
                qos: d.qos as u8,
                retain: d.retain,
                subscription_ids: d.subscription_ids.to_vec(),
                state: if await_comp {
                    StoredState::AwaitComp
                } else {
                    StoredState::AwaitAck
                },
                order,
            },
        }
    }

    /// The session record: metadata, subscriptions, will and expiry.
    pub fn session_record(
        &self,
        client_id: &str,
        s: &Session,
        will_at: Option<Instant>,
    ) -> SessionRecord {
        SessionRecord {
            client_id: client_id.to_string(),
            expiry_interval: s.expiry_interval,
            expires_at_ms: s.expires_at.map(|t| self.unix_ms(t.instant())),
            subscriptions: s
                .subscriptions
                .iter()
                .map(|(f, sub)| SubscriptionRecord::new(f, &sub.options, sub.identifier))
                .collect(),
            will: s.will.as_ref().map(|w| WillRecord::from(&w.will)),
            will_at_ms: will_at.map(|t| self.unix_ms(t)),
        }
    }

    /// Rebuild a will from its record.
    pub fn will_from_record(r: &WillRecord, client_id: &ByteString, session: SessionId) -> Will {
        Will::new(r.to_last_will(), client_id.clone(), session)
    }

    pub fn shutdown(self) {
        self.store.shutdown();
    }
}

/// The record of `m` (sharing its buffers), expiring at `expires_at_ms`
/// (Unix milliseconds): the store's, and the cluster's wire form.
pub fn message_record(m: &Message, expires_at_ms: Option<u64>) -> MessageRecord {
    MessageRecord {
        topic: m.topic.clone(),
        payload: m.payload.clone(),
        qos: m.qos as u8,
        retain: m.retain,
        properties: MessageProperties::from_publish(&m.properties, expires_at_ms),
        publisher: Some(m.publisher_client_id.clone()),
    }
}

/// QoS of a stored entry.
pub fn qos(q: u8) -> QoS {
    QoS::from_u8(q).unwrap_or_default()
}

/// The store records one turn of a connection writes for its session (a
/// message moved from the queue to the in-flight window, an acknowledged
/// one forgotten, a QoS 2 id remembered...), in the protocol's terms:
/// submitted together by [`SessionWrites::submit`], which returns the
/// ticket to wait on. For a session that is not persisted (or a broker
/// without a store) every method does nothing and the ticket is
/// [`Ticket::NONE`].
pub struct SessionWrites<'a> {
    persist: Option<&'a Persistence>,
    /// The session's client id (its cell's), which names its records.
    client_id: &'a ByteString,
    ops: Vec<Op>,
}

impl<'a> SessionWrites<'a> {
    pub(crate) fn new(
        persist: Option<&'a Persistence>,
        client_id: &'a ByteString,
        session: &Session,
    ) -> SessionWrites<'a> {
        SessionWrites {
            persist: persist.filter(|_| session.persisted),
            client_id,
            ops: Vec::new(),
        }
    }

    /// Whether the session's state is durable here (writes are recorded).
    pub fn records(&self) -> bool {
        self.persist.is_some()
    }

    /// Outgoing QoS 2 messages (and what follows them) are held until their
    /// in-flight record is durable (`sync` policy; `interval` acknowledges
    /// before the write).
    pub fn holds_deliveries(&self) -> bool {
        self.persist.is_some_and(|p| !p.acks_early())
    }

    /// An outgoing message is complete (PUBACK, PUBCOMP, or discarded).
    pub fn inflight_done(&mut self, packet_id: u16) {
        if self.persist.is_some() {
            self.ops.push(Op::DeleteInflight {
                client_id: self.client_id.clone(),
                packet_id,
            });
        }
    }

    /// `d`, taken from the queue, entered the in-flight window as `packet_id`.
    pub fn inflight_added(&mut self, session: &mut Session, packet_id: u16, d: &Delivery) {
        if let Some(p) = self.persist {
            // Recorded with its queue entry's removal
            // ([`SessionWrites::queue_entry_sent`]), in one batch: the
            // message keeps a reference throughout.
            p.message_id(&d.msg, &mut self.ops, d.seq == 0);
            let order = session.take_seq();
            self.ops
                .push(p.inflight_op(self.client_id, packet_id, d, false, order));
        }
    }

    /// `d` left the queue (sent, or discarded as too large).
    pub fn queue_entry_sent(&mut self, d: &Delivery) {
        if let (Some(_), true) = (self.persist, d.seq != 0) {
            self.ops.push(Op::DeleteQueueEntry {
                client_id: self.client_id.clone(),
                seq: d.seq,
            });
        }
    }

    /// PUBREC received for `packet_id`: its record moves to "awaiting
    /// PUBCOMP".
    pub fn inflight_released(&mut self, session: &mut Session, packet_id: u16) {
        let Some(p) = self.persist else { return };
        let order = session.take_seq();
        if let Some(i) = session.inflight_get(packet_id) {
            let op = p.inflight_op(self.client_id, packet_id, &i.delivery, true, order);
            self.ops.push(op);
        }
    }

    /// An incoming QoS 2 message `packet_id` is awaiting its PUBREL.
    pub fn awaiting_rel_added(&mut self, packet_id: u16) {
        if self.persist.is_some() {
            self.ops.push(Op::PutAwaitingRel {
                client_id: self.client_id.clone(),
                packet_id,
            });
        }
    }

    /// PUBREL received: the incoming QoS 2 id is forgotten.
    pub fn awaiting_rel_done(&mut self, packet_id: u16) {
        if self.persist.is_some() {
            self.ops.push(Op::DeleteAwaitingRel {
                client_id: self.client_id.clone(),
                packet_id,
            });
        }
    }

    /// Submit what was recorded; the ticket completes once it is durable.
    pub fn submit(self) -> Ticket {
        match self.persist {
            Some(p) => Ticket(p.submit(self.ops)),
            None => Ticket::NONE,
        }
    }
}

/// A promise of durability from the engine: done once what it covers is
/// safe. Tickets of one engine are ordered: a later ticket done implies the
/// earlier ones are (so a connection waits on the largest it holds).
/// The embedded engine's tickets are store sequence numbers, but nothing
/// outside `persist` looks inside them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord)]
pub struct Ticket(pub(crate) u64);

impl Ticket {
    /// Nothing to wait for.
    pub const NONE: Ticket = Ticket(0);

    pub fn is_none(self) -> bool {
        self.0 == 0
    }
}

impl super::Broker {
    /// The store, if any.
    pub fn persistence(&self) -> Option<&Persistence> {
        self.persist.as_ref()
    }

    /// The store records a connection writes for `session` in one turn.
    pub fn session_writes<'a>(
        &'a self,
        client_id: &'a ByteString,
        session: &Session,
    ) -> SessionWrites<'a> {
        SessionWrites::new(self.persist.as_ref(), client_id, session)
    }

    /// Whether what `ticket` covers is durable yet (or failed).
    pub fn ticket_status(&self, ticket: Ticket) -> AckStatus {
        match &self.persist {
            Some(p) => p.status(ticket.0),
            None => AckStatus::Durable,
        }
    }

    /// Wake `waker` once `ticket` is done (at once if it is).
    pub fn ticket_wait(&self, ticket: Ticket, waker: &Arc<ConnWaker>) {
        if let (Some(p), false) = (&self.persist, ticket.is_none()) {
            p.wait(ticket.0, waker);
        }
    }

    /// A ticket covering everything submitted so far.
    pub fn last_ticket(&self) -> Ticket {
        Ticket(self.persist.as_ref().map_or(0, |p| p.submitted_seq()))
    }

    /// Acknowledgements go out when the write is submitted, not when it is
    /// durable (`interval` policy), or nothing is stored at all.
    pub fn acks_early(&self) -> bool {
        self.persist.as_ref().is_none_or(|p| p.acks_early())
    }
}
