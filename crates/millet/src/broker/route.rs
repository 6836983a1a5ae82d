//! Routing: the subscription index (filter → sessions), subscribe and
//! unsubscribe, and publishes routed through the index into the sessions'
//! queues, with back-pressure on publishers and the broker-wide cap on
//! "queue full" lines. Owns `index` and `drop_lines`.
//!
//! A session's `state` lock is never held while taking `index`, because
//! publishers hold `index` (read) while they take session locks.

use std::cell::RefCell;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytestring::ByteString;
use millet_codec::{topic, QoS, ReasonCode};
use smallvec::SmallVec;

use super::index::{self, SubscriptionIndex};
use super::retained::message_bytes;
use super::{persist, Broker};
use crate::session::{
    ConnWaker, Delivery, Enqueued, Message, Session, SessionCell, SessionId, Subscription,
};
use crate::store::Op;

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

/// What [`Broker::deliver_with_pressure`] did with a delivery.
#[derive(Default)]
struct Offered {
    /// The session is congested and the publisher was parked on it.
    congested: bool,
    /// A queue entry was stored for a session with a connection attached,
    /// which will put it in flight and acknowledge it within moments: the
    /// store holds the submit back to absorb the whole exchange (see
    /// [`crate::store::SYNC_ABSORB_WINDOW`]).
    awaits_ack: bool,
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
    /// Sent to the other nodes of a cluster too, which may have
    /// subscribers this node does not know of (no v5 0x10 then).
    pub forwarded: bool,
}

/// Which subscriptions a message is routed to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope<'a> {
    /// Every matching subscription (one node).
    All,
    /// The plain (not shared) ones: in a cluster, shared subscriptions get
    /// their messages through the cluster ([`super::ClusterLink`]).
    Plain,
    /// The members of one shared subscription, by its full `$share/g/f`
    /// filter: the cluster chose this node for one of its messages.
    Shared(&'a str),
    /// A message from another node, in the copy NATS sent for this plain
    /// filter: the sessions for which it is the least of their plain
    /// filters matching the topic. A node holding overlapping filters
    /// gets one copy per filter; each session takes its messages of a
    /// topic always from the same copy, so it gets each once and in order.
    Via(&'a str),
}

impl Scope<'_> {
    fn admits(&self, share: Option<&ByteString>) -> bool {
        match (self, share) {
            (Scope::All, _) => true,
            (Scope::Plain | Scope::Via(_), s) => s.is_none(),
            (Scope::Shared(f), Some(s)) => **s == **f,
            (Scope::Shared(_), None) => false,
        }
    }
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

/// The per-session "queue full" lines of the current minute, broker-wide:
/// at most [`DropLines::MAX`] a minute; the rest are summed into one line.
#[derive(Default)]
pub(super) struct DropLines {
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
        // A cluster keeps its retained messages in its engine (see
        // `engine::nats`); only this node's own `$SYS` ones are kept here.
        let link = self.cluster().filter(|_| !msg.topic.starts_with("$SYS/"));
        let store_retained = msg.retain
            && (msg.payload.is_empty() || self.retained_admits(&msg.topic, message_bytes(&msg)));
        if msg.retain && !store_retained {
            self.node
                .overload
                .retained_refused
                .fetch_add(1, Ordering::Relaxed);
        }
        if store_retained && link.is_none() {
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
        let (scope, forwarded) = match link {
            Some(link) => (Scope::Plain, link.forward(&msg, store_retained)),
            None => (Scope::All, persist::Ticket::NONE),
        };
        let mut routed = self.route(&msg, publisher, scope);
        routed.forwarded = link.is_some();
        let here = routed.ticket.max(persist::Ticket(retained_seq));
        routed.ticket = match link {
            Some(link) => link.join_tickets(forwarded, here),
            None => here,
        };
        routed
    }

    /// Route a message another node of the cluster published (see
    /// [`super::ClusterLink`]) to this node's subscriptions in `scope`:
    /// not forwarded again, and not kept as retained here.
    pub fn route_from_cluster(&self, msg: Arc<Message>, scope: Scope<'_>) -> Routed {
        self.route(&msg, None, scope)
    }

    fn route(
        &self,
        msg: &Arc<Message>,
        publisher: Option<&Arc<ConnWaker>>,
        scope: Scope<'_>,
    ) -> Routed {
        let mut matches = MATCHES.with(|m| std::mem::take(&mut *m.borrow_mut()));
        self.index
            .read()
            .matches(&msg.topic, &msg.publisher_client_id, &mut matches);
        let mut routed = Routed::default();
        let mut ops = Vec::new();
        // The ops' place in the store's order, taken under the lock of the
        // first session that needs one (see `deliver_with_pressure`).
        let mut slot = None;
        // Some of `ops` queue the message for a connected client.
        let mut awaits_ack = false;
        // Read once per message (two shared loads), not per subscriber.
        let shed_qos0 = self.node.memory_pressure() >= crate::budget::Pressure::High;
        // The message detached from the publisher's read buffer, made once
        // when the first session has to keep it (see `deliver_with_pressure`).
        let mut kept: Option<Arc<Message>> = None;
        // Overlapping subscriptions of one session are merged into one delivery
        // with the highest QoS and every subscription identifier [MQTT-3.3.4-2..5].
        for run in index::group_by_key(&mut matches) {
            let mut best: Option<Delivery> = None;
            for m in run {
                let e = &m.value;
                if !scope.admits(e.share.as_ref()) {
                    continue;
                }
                if e.options.no_local && e.share.is_none() && msg.publisher == Some(m.key) {
                    continue; // [MQTT-3.8.3-3]
                }
                merge_match(&mut best, msg, &e.options, e.identifier, e.share.as_ref());
            }
            if let (Scope::Via(via), Some(first), true) = (scope, run.first(), best.is_some()) {
                if !takes_via(&first.value.cell, &msg.topic, via) {
                    continue;
                }
            }
            if let (Some(d), Some(first)) = (best, run.first()) {
                let offered = self.deliver_with_pressure(
                    &first.value.cell,
                    d,
                    publisher,
                    &mut ops,
                    &mut slot,
                    false,
                    Some(&mut kept),
                    shed_qos0,
                );
                routed.congested |= offered.congested;
                awaits_ack |= offered.awaits_ack;
                routed.sessions += 1;
            }
        }
        matches.clear();
        MATCHES.with(|m| *m.borrow_mut() = matches);
        // Every op was pushed under a session's lock that took the slot.
        debug_assert!(slot.is_some() || ops.is_empty());
        routed.ticket = persist::Ticket(slot.map_or(0, |r| r.fill(ops, awaits_ack)));
        routed
    }

    /// Queue a delivery on a session and wake its connection.
    pub fn deliver(&self, cell: &SessionCell, d: Delivery) {
        let mut ops = Vec::new();
        let shed_qos0 = !d.replay && self.node.memory_pressure() >= crate::budget::Pressure::High;
        let mut slot = None;
        let offered =
            self.deliver_with_pressure(cell, d, None, &mut ops, &mut slot, true, None, shed_qos0);
        debug_assert!(slot.is_some() || ops.is_empty());
        if let Some(r) = slot {
            r.fill(ops, offered.awaits_ack);
        }
    }

    /// Store the session record (metadata, subscriptions, will) if persisted.
    fn persist_session(&self, client_id: &str, s: &Session) {
        if let (Some(p), true) = (&self.persist, s.persisted) {
            let rec = p.session_record(client_id, s, None);
            p.submit(vec![Op::PutSession(Box::new(rec))]);
        }
    }

    /// Queue a delivery; returns whether the session is congested and
    /// `publisher` was parked on it, and whether a store op was added for a
    /// connected client (see [`Offered`]).
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
    fn deliver_with_pressure<'s>(
        &'s self,
        cell: &SessionCell,
        mut d: Delivery,
        publisher: Option<&Arc<ConnWaker>>,
        ops: &mut Vec<Op>,
        slot: &mut Option<crate::store::Reservation<'s>>,
        force_message: bool,
        detached: Option<&mut Option<Arc<Message>>>,
        shed_qos0: bool,
    ) -> Offered {
        let threshold = self.node.config.limits.backpressure_queued;
        // In bytes too: half of `max_queued_bytes`, so that an online
        // reader of large messages holds publishers back before its queue
        // drops by the byte limit.
        let bytes_threshold = self.node.config.limits.max_queued_bytes / 2;
        let (r, offered) = {
            let mut st = cell.state.lock();
            if d.qos == QoS::AtMostOnce && !d.replay {
                if shed_qos0 {
                    drop(st);
                    self.node
                        .overload
                        .qos0_dropped_memory
                        .fetch_add(1, Ordering::Relaxed);
                    self.node
                        .stats
                        .messages_dropped
                        .fetch_add(1, Ordering::Relaxed);
                    return Offered::default();
                }
                if st.conn_epoch == 0 && !self.node.config.limits.queue_qos0_offline {
                    return Offered::default(); // like Mosquitto's queue_qos0_messages false
                }
            }
            if let Some(kept) = detached {
                if st.conn_epoch == 0 && st.session.admits(&d) {
                    d.msg = kept
                        .get_or_insert_with(|| {
                            let m = d.msg.detached();
                            if let Some(&id) = d.msg.engine_id.get() {
                                let _ = m.engine_id.set(id); // stored once, whichever is used
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
                    Some(p.queue_op(&cell.client_id, &d, ops, force_message))
                }
                _ => None,
            };
            let r = st.session.enqueue(d);
            let mut awaits_ack = false;
            if let Some(op) = op {
                if r != Enqueued::Dropped {
                    ops.push(op);
                    awaits_ack = st.conn_epoch != 0;
                }
            }
            if let Enqueued::DisplacedQos0 { seqs } = &r {
                for &seq in seqs {
                    if seq != 0 && self.persist.is_some() {
                        ops.push(Op::DeleteQueueEntry {
                            client_id: cell.client_id.clone(),
                            seq,
                        });
                    }
                }
            }
            // The ops' place in the store's order is taken before the
            // session's connection can take the message from its queue (it
            // needs this lock): the entry's removal, which that connection
            // submits, must not be applied before the entry itself, or a
            // crash would bring a delivered message back under a new packet
            // id (a QoS 2 message delivered twice).
            if let (None, false, Some(p)) = (&slot, ops.is_empty(), &self.persist) {
                *slot = Some(p.reserve());
            }
            if r != Enqueued::Queued {
                if let Some(n) = st.session.drop_log.due_with(Instant::now) {
                    self.log_queue_full(&cell.client_id, n);
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
                    if st.blocked.add(w) {
                        w.block();
                    }
                    true
                }
                _ => false,
            };
            (
                r,
                Offered {
                    congested,
                    awaits_ack,
                },
            )
        };
        if r != Enqueued::Queued {
            self.node
                .stats
                .messages_dropped
                .fetch_add(1, Ordering::Relaxed);
        }
        offered
    }

    /// A session's throttled "queue full" line (at most one a minute per
    /// session, [`crate::session::DropLog`]), itself capped broker-wide: at
    /// most `DropLines::MAX` such lines a minute, the others summed into one
    /// line when the next minute's first one is due.
    pub(super) fn log_queue_full(&self, client_id: &str, dropped: u64) {
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
            tracing::warn!(%client_id, max_queued = self.node.config.limits.max_queued,
                max_queued_bytes = self.node.config.limits.max_queued_bytes, dropped,
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
        let limits = &self.node.config.limits;
        if filter.len() > limits.max_topic_length
            || millet_codec::topic::topic_levels(filter) > limits.max_topic_levels
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
            self.persist_session(&cell.client_id, &st.session);
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
            let first = match &shared {
                Some(sf) => {
                    idx.insert_shared(sf.group, sf.filter, cell.id, entry)
                        .is_none()
                        && idx.shared_members(sf.group, sf.filter).nth(1).is_none()
                }
                None => {
                    idx.insert(filter, cell.id, entry).is_none()
                        && idx.filter_subscribers(filter) == 1
                }
            };
            // (Under the index lock: the cluster sees the changes of one
            // filter in the order they were made.)
            if let (true, Some(link)) = (first, self.cluster()) {
                match &shared {
                    Some(sf) => link.interest_added(sf.filter, Some(sf.group)),
                    None => link.interest_added(filter, None),
                }
            }
        }
        if is_new {
            self.node
                .stats
                .subscriptions
                .fetch_add(1, Ordering::Relaxed);
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
            self.persist_session(&cell.client_id, &st.session);
            sub
        };
        remove_from_index(
            &mut self.index.write(),
            filter,
            &sub,
            cell.id,
            self.cluster(),
        );
        self.node
            .stats
            .subscriptions
            .fetch_sub(1, Ordering::Relaxed);
        true
    }
}

/// One more subscription of a session matching `msg`: merged into the
/// session's one delivery of it, with the highest QoS, the retain flag if
/// any asks for it, and every subscription identifier [MQTT-3.3.4-2..5].
#[inline]
pub(super) fn merge_match(
    best: &mut Option<Delivery>,
    msg: &Arc<Message>,
    options: &millet_codec::SubscriptionOptions,
    identifier: Option<u32>,
    share: Option<&ByteString>,
) {
    let qos = msg.qos.min(options.qos);
    let retain = options.retain_as_published && msg.retain;
    match best {
        None => {
            let mut ids = SmallVec::new();
            ids.extend(identifier);
            *best = Some(Delivery {
                msg: msg.clone(),
                qos,
                retain,
                subscription_ids: ids,
                share: share.cloned(),
                seq: 0,
                replay: false,
            });
        }
        Some(d) => {
            d.qos = d.qos.max(qos);
            d.retain |= retain;
            d.subscription_ids.extend(identifier);
        }
    }
}

/// Whether `cell`'s session takes a message on `topic` from the copy sent
/// for `via` ([`Scope::Via`]).
fn takes_via(cell: &SessionCell, topic: &str, via: &str) -> bool {
    let st = cell.state.lock();
    let least = st
        .session
        .subscriptions
        .iter()
        .filter(|(f, sub)| sub.share_group.is_none() && topic::topic_matches(f, topic))
        .map(|(f, _)| &**f)
        .min();
    least == Some(via)
}

/// Remove one session's subscription from the index; the cluster, if any,
/// is told when it was the node's last one to that filter.
pub(super) fn remove_from_index(
    idx: &mut SubscriptionIndex<SessionId, IndexEntry>,
    filter: &str,
    sub: &Subscription,
    id: SessionId,
    cluster: Option<&Arc<dyn super::ClusterLink>>,
) {
    match (&sub.share_group, topic::parse_shared(filter)) {
        (Some(_), Ok(Some(sf))) => {
            let removed = idx.remove_shared(sf.group, sf.filter, id).is_some();
            if let (true, Some(link)) = (removed, cluster) {
                if idx.shared_members(sf.group, sf.filter).next().is_none() {
                    link.interest_removed(sf.filter, Some(sf.group));
                }
            }
        }
        _ => {
            let removed = idx.remove(filter, id).is_some();
            if let (true, Some(link)) = (removed, cluster) {
                if idx.filter_subscribers(filter) == 0 {
                    link.interest_removed(filter, None);
                }
            }
        }
    }
}
