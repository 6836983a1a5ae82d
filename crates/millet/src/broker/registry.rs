//! The session registry: client id → session cell, one live connection
//! per client id. Attach (create, resume or discard per clean start),
//! takeover, detach, and session expiry. Owns `registry`, `expiries`
//! (the expiry queue), `next_session_id` and `next_epoch`.
//!
//! Lock order: `registry` → a session's `state` (see the module doc of
//! [`crate::broker`]).

use std::borrow::Borrow;
use std::collections::{HashMap, HashSet};
use std::hash::{Hash, Hasher};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytestring::ByteString;
use millet_codec::{topic, LastWill, QoS};

use super::route::remove_from_index;
use super::wills::DelayedWill;
use super::Broker;
use crate::session::{
    ConnWaker, Delivery, Inflight, InflightState, Message, Session, SessionCell, Subscription, Will,
};
use crate::stamp::Stamp;
use crate::store::Op;

/// The sessions by client id. A set of cells hashed by the id each cell
/// holds ([`SessionCell::client_id`]): 8 bytes an entry, where a map keyed
/// by a copy of the id took 40 (a third of an idle connection's budget).
#[derive(Default)]
pub(super) struct Registry(HashSet<ById>);

/// A registry entry: its cell, looked up by the cell's client id.
struct ById(Arc<SessionCell>);

impl Borrow<str> for ById {
    fn borrow(&self) -> &str {
        &self.0.client_id
    }
}

impl Hash for ById {
    fn hash<H: Hasher>(&self, state: &mut H) {
        // As `str` hashes: lookups go by `&str` (see `Borrow`).
        str::hash(&self.0.client_id, state);
    }
}

impl PartialEq for ById {
    fn eq(&self, other: &ById) -> bool {
        *self.0.client_id == *other.0.client_id
    }
}

impl Eq for ById {}

impl Registry {
    pub(super) fn get(&self, client_id: &str) -> Option<&Arc<SessionCell>> {
        self.0.get(client_id).map(|e| &e.0)
    }

    pub(super) fn contains_key(&self, client_id: &str) -> bool {
        self.0.contains(client_id)
    }

    /// Add `cell` under its client id, replacing (and returning) the cell
    /// there was.
    pub(super) fn insert(&mut self, cell: Arc<SessionCell>) -> Option<Arc<SessionCell>> {
        self.0.replace(ById(cell)).map(|e| e.0)
    }

    pub(super) fn remove(&mut self, client_id: &str) -> Option<Arc<SessionCell>> {
        self.0.take(client_id).map(|e| e.0)
    }

    pub(super) fn len(&self) -> usize {
        self.0.len()
    }

    pub(super) fn values(&self) -> impl Iterator<Item = &Arc<SessionCell>> {
        self.0.iter().map(|e| &e.0)
    }
}

/// Result of attaching a connection to a session.
pub struct Attached {
    pub cell: Arc<SessionCell>,
    pub epoch: u64,
    pub session_present: bool,
}

/// A session leaving this node for another node of a cluster
/// ([`Broker::give_up_session`], [`Broker::take_moved_session`]): what a
/// resumed session needs, in the broker's terms. The engine carries it.
#[derive(Debug, Default)]
pub struct MovedSession {
    pub subscriptions: Vec<(ByteString, Subscription)>,
    /// The in-flight window, in send order.
    pub inflight: Vec<(u16, Inflight)>,
    pub queue: Vec<Delivery>,
    /// Incoming QoS 2 ids: PUBREC sent, PUBREL not received yet.
    pub awaiting_rel: Vec<u16>,
    /// Set by a cluster engine: unix ms (the old node's clock) before
    /// which every QoS 1/2 message stored in the cluster's stream was
    /// routed to the session there, and after which none was delivered to
    /// its client. The node it moves to reads back from there what was
    /// published while it moved. `None`: not known.
    pub complete_before_ms: Option<u64>,
}

/// What a cluster node recorded of a session's outgoing QoS 2 messages,
/// for the node that rebuilds the session after its death
/// ([`Broker::catch_up`]): messages are told by [`qos2_digest`].
#[derive(Debug, Default, Clone)]
pub struct Qos2Resume {
    /// In flight: packet id, PUBREC received (PUBREL sent), digest.
    pub inflight: Vec<(u16, bool, u64)>,
    /// Completed (PUBCOMP received) since the catch-up's start.
    pub completed: Vec<u64>,
}

impl Qos2Resume {
    pub fn is_empty(&self) -> bool {
        self.inflight.is_empty() && self.completed.is_empty()
    }
}

/// A message's identity across nodes, without an id of its own: a hash of
/// its topic, payload and publisher (equal messages count one by one).
/// Stable across processes and versions (SHA-256, first 8 bytes).
pub fn qos2_digest(m: &Message) -> u64 {
    use sha2::Digest;
    let mut h = sha2::Sha256::new();
    h.update((m.topic.len() as u64).to_be_bytes());
    h.update(m.topic.as_bytes());
    h.update((m.publisher_client_id.len() as u64).to_be_bytes());
    h.update(m.publisher_client_id.as_bytes());
    h.update(&m.payload);
    let d = h.finalize();
    let mut b = [0u8; 8];
    b.copy_from_slice(&d[..8]);
    u64::from_be_bytes(b)
}

/// Why a new session is refused ([`Broker::admit_session`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SessionRefusal {
    MaxSessions,
    Memory,
    /// Cluster mode with NATS unreachable: who owns the client id cannot
    /// be known, so no connection is attached (CONNACK 0x88 / 3.x 0x03).
    ClusterUnavailable,
}

impl Broker {
    /// A new session with this broker's queue limits and memory meter.
    fn new_session(&self) -> Session {
        Session::with_limits(self.queue_limits.clone())
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
        let o = &self.node.overload;
        if reg.len() >= self.node.config.limits.max_sessions {
            o.sessions_refused_max.fetch_add(1, Ordering::Relaxed);
            return Err(SessionRefusal::MaxSessions);
        }
        drop(reg);
        if self.node.memory_pressure() >= crate::budget::Pressure::High {
            o.sessions_refused_memory.fetch_add(1, Ordering::Relaxed);
            return Err(SessionRefusal::Memory);
        }
        Ok(())
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
                    self.node
                        .stats
                        .clients_connected
                        .fetch_sub(1, Ordering::Relaxed);
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
                    let mut s = self.new_session();
                    s.expiry_interval = expiry_interval;
                    // A copy, not a second handle: the cell holds the one
                    // handle, with no shared header (see `SessionCell::client_id`).
                    let cell = SessionCell::new(id, ByteString::from(&**client_id), s);
                    {
                        let mut st = cell.state.lock();
                        st.conn_epoch = epoch;
                        st.waker = Some(waker.clone());
                    }
                    reg.insert(cell.clone());
                    self.node
                        .stats
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
                    p.submit(vec![Op::PutSession(Box::new(p.session_record(
                        &attached.cell.client_id,
                        &st.session,
                        None,
                    )))]);
                }
            }
        }
        if let Some(cell) = ended {
            self.end_session(&cell, now);
        }
        for w in wills_now {
            self.publish_will(w, now);
        }
        self.node
            .stats
            .clients_connected
            .fetch_add(1, Ordering::Relaxed);
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
            self.node
                .stats
                .clients_connected
                .fetch_sub(1, Ordering::Relaxed);
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
                    self.expiries
                        .lock()
                        .push(std::cmp::Reverse((t.instant(), cell.client_id.clone())));
                }
                if let (Some(p), true) = (&self.persist, st.session.persisted) {
                    let will_at = delayed.as_ref().map(|d| d.1);
                    let mut rec = p.session_record(&cell.client_id, &st.session, will_at);
                    rec.will = delayed.map(|d| d.0);
                    p.submit(vec![Op::PutSession(Box::new(rec))]);
                }
                drop(st);
                drop(reg);
                false
            }
        };
        if end {
            let client_id = cell.client_id.clone();
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
    pub(super) fn end_session(&self, cell: &Arc<SessionCell>, now: Instant) {
        let subs = {
            let mut st = cell.state.lock();
            let subs: Vec<(ByteString, Subscription)> = st.session.subscriptions.drain().collect();
            if let (Some(p), true) = (&self.persist, st.session.persisted) {
                st.session.persisted = false;
                p.submit(vec![Op::DeleteSession {
                    client_id: cell.client_id.clone(),
                }]);
            }
            subs
        };
        // Out of the index before its messages are taken: routing that
        // found the session before still queues there first.
        self.unindex(cell, &subs);
        let pending = cell.state.lock().session.drain_all();
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
            } else if let Some(link) = self.cluster() {
                link.redeliver_shared(sf.group, sf.filter, &d.msg);
            }
        }
        if let Some(link) = self.cluster() {
            link.session_ended(&cell.client_id);
        }
    }

    /// Take a session's subscriptions `subs` out of the index (the cluster
    /// is told of the filters this node no longer has) and the count.
    fn unindex(&self, cell: &SessionCell, subs: &[(ByteString, Subscription)]) {
        {
            let mut idx = self.index.write();
            for (filter, sub) in subs {
                remove_from_index(&mut idx, filter, sub, cell.id, self.cluster());
            }
        }
        self.node
            .stats
            .subscriptions
            .fetch_sub(subs.len() as u64, Ordering::Relaxed);
    }

    /// Whether this node holds a session for `client_id` (connected or not).
    pub fn has_session(&self, client_id: &str) -> bool {
        self.registry.lock().contains_key(client_id)
    }

    /// Another node of the cluster takes `client_id` over: close this
    /// node's connection for it (0x8E) and end its session here. With
    /// `moving` (the new connection resumes the session, clean start 0) the
    /// session is returned, to continue on the other node, and its will
    /// is cancelled as by a reconnection [MQTT-3.1.3-9]; otherwise the
    /// session ends here and its will goes out now.
    ///
    /// Returns the closed connection's epoch and waker, if there was one,
    /// and the moved session.
    #[allow(clippy::type_complexity)]
    pub fn give_up_session(
        &self,
        client_id: &str,
        moving: bool,
        now: Instant,
    ) -> (Option<(u64, Option<Arc<ConnWaker>>)>, Option<MovedSession>) {
        let mut closed = None;
        let cell = self.registry.lock().get(client_id).cloned();
        let Some(cell) = cell else {
            return (None, None);
        };
        {
            let mut st = cell.state.lock();
            if st.conn_epoch != 0 {
                // As a takeover on this node ([`Broker::connect`]): the old
                // connection sees its epoch replaced and closes with 0x8E;
                // if the session ends (expiry 0, or the new connection
                // starts clean) its will is left for it to decide on when
                // it closes [MQTT-3.1.2-10] (a DISCONNECT it sent just
                // before deletes it); a session that moves cancels it.
                let ends = !moving || st.session.expiry_interval == 0;
                let will = st.session.will.take();
                if let (true, Some(w)) = (ends, will) {
                    st.takeover_will = Some((st.conn_epoch, w));
                }
                closed = Some((st.conn_epoch, st.waker.clone()));
                st.conn_epoch = 0;
                st.signal_kick();
                st.waker = None;
                st.conn_info = None;
                st.release_blocked();
                self.node
                    .stats
                    .clients_connected
                    .fetch_sub(1, Ordering::Relaxed);
                if st.session.expiry_interval == 0 {
                    // Ends here, whatever the new connection wants.
                    drop(st);
                    let mut reg = self.registry.lock();
                    if reg.get(client_id).is_some_and(|c| Arc::ptr_eq(c, &cell)) {
                        reg.remove(client_id);
                    }
                    drop(reg);
                    self.end_session(&cell, now);
                    return (closed, None);
                }
            }
        }
        {
            let mut reg = self.registry.lock();
            let same = reg.get(client_id).is_some_and(|c| Arc::ptr_eq(c, &cell));
            // A connection attached here meanwhile keeps it (its own
            // takeover of the client id follows).
            if !same || cell.state.lock().conn_epoch != 0 {
                return (closed, None);
            }
            reg.remove(client_id);
        }
        let delayed = self.take_delayed_will(cell.id);
        if !moving {
            self.end_session(&cell, now);
            if let Some(w) = delayed {
                self.publish_will(w, now);
            }
            return (closed, None);
        }
        // Out of the index first, so that nothing more is queued here.
        let subscriptions: Vec<(ByteString, Subscription)> = {
            let mut st = cell.state.lock();
            if let (Some(p), true) = (&self.persist, st.session.persisted) {
                st.session.persisted = false;
                p.submit(vec![Op::DeleteSession {
                    client_id: cell.client_id.clone(),
                }]);
            }
            st.session.subscriptions.drain().collect()
        };
        self.unindex(&cell, &subscriptions);
        let (inflight, queue, awaiting_rel) = {
            let mut st = cell.state.lock();
            let (inflight, queue) = st.session.take_pending();
            (inflight, queue, st.session.awaiting_rel.take())
        };
        if let Some(link) = self.cluster() {
            link.session_ended(client_id);
        }
        (
            closed,
            Some(MovedSession {
                subscriptions,
                inflight,
                queue,
                awaiting_rel,
                complete_before_ms: None,
            }),
        )
    }

    /// A session moved here from another node of the cluster
    /// ([`Broker::give_up_session`] there): it replaces any session this
    /// node had for `client_id` (older: the other node owned the client id
    /// since), for the connection attaching next to resume.
    pub fn take_moved_session(
        &self,
        client_id: &ByteString,
        moved: MovedSession,
        now: Instant,
    ) -> Option<Arc<SessionCell>> {
        let id = self.next_session_id.fetch_add(1, Ordering::Relaxed);
        let client_id = ByteString::from(&**client_id);
        let mut s = self.new_session();
        // Until the connection attaching next sets its own.
        s.expiry_interval = u32::MAX;
        // This node's store gets the session's queue, in-flight window and
        // QoS 2 ids (the session record is written when the connection
        // attaches).
        let mut ops = Vec::new();
        let p = self.persist.as_ref();
        s.persisted = p.is_some();
        for (pid, i) in moved.inflight {
            let order = s.take_seq();
            if let Some(p) = p {
                p.message_id(&i.delivery.msg, &mut ops, false);
                let op = p.inflight_op(
                    &client_id,
                    pid,
                    &i.delivery,
                    i.state == InflightState::AwaitComp,
                    order,
                );
                ops.push(op);
            }
            s.push_inflight_state(pid, i.delivery, i.state);
        }
        for mut d in moved.queue {
            d.seq = s.take_seq();
            if let Some(p) = p {
                let op = p.queue_op(&client_id, &d, &mut ops, false);
                ops.push(op);
            }
            s.enqueue(d);
        }
        for &packet_id in &moved.awaiting_rel {
            ops.push(Op::PutAwaitingRel {
                client_id: client_id.clone(),
                packet_id,
            });
        }
        s.awaiting_rel.extend(moved.awaiting_rel);
        let record = p.map(|p| p.session_record(&client_id, &s, None));
        let cell = SessionCell::new(id, client_id.clone(), s);
        let old = {
            let mut reg = self.registry.lock();
            if reg
                .get(&client_id)
                .is_some_and(|c| c.state.lock().conn_epoch != 0)
            {
                // A connection of this node attached meanwhile: it keeps
                // its session (a later takeover decides).
                tracing::warn!(client_id = %client_id, "cluster: a moved session arrived while the client id is connected here: dropped");
                return None;
            }
            reg.insert(cell.clone())
        };
        if let Some(old) = old {
            let _ = self.take_delayed_will(old.id);
            // (Its records go before the moved session's are written.)
            self.end_session(&old, now);
        }
        if let (Some(p), Some(record)) = (p, record) {
            let mut all = vec![Op::PutSession(Box::new(record))];
            all.extend(ops);
            p.submit(all);
        }
        for (filter, sub) in moved.subscriptions {
            let _ = self.subscribe(&cell, &filter, sub);
        }
        Some(cell)
    }

    /// Queue on `cell`'s session the messages it missed (a session
    /// recovered from a node that is gone, or moved here from another), as
    /// routing would have: once per message, merged over the session's
    /// plain subscriptions that match (highest QoS, every identifier), No
    /// Local applied.
    ///
    /// A message the session already holds (in flight or queued: moved
    /// with it, or routed to it since it was installed here) is not queued
    /// again: each held message stands for one equal message of `messages`
    /// (same topic, payload, QoS and publisher), so a publisher's identical
    /// messages still count one by one. Returns how many were queued.
    ///
    /// `qos2`: what the node that held the session recorded of its
    /// outgoing QoS 2 messages ([`Qos2Resume`]): a message it had in flight
    /// goes back in flight under its packet id (resent with DUP, or its
    /// PUBREL resent), one it had completed is not queued again; so QoS 2
    /// stays exactly once across that node's death.
    pub fn catch_up(
        &self,
        cell: &Arc<SessionCell>,
        messages: impl Iterator<Item = Arc<Message>>,
        mut qos2: Qos2Resume,
    ) -> usize {
        type Key = (ByteString, bytes::Bytes, u8, ByteString);
        let key = |m: &Message| -> Key {
            (
                m.topic.clone(),
                m.payload.clone(),
                m.qos as u8,
                m.publisher_client_id.clone(),
            )
        };
        let (subs, mut held) = {
            let st = cell.state.lock();
            let subs: Vec<(ByteString, Subscription)> = st
                .session
                .subscriptions
                .iter()
                .filter(|(_, s)| s.share_group.is_none())
                .map(|(f, s)| (f.clone(), s.clone()))
                .collect();
            let mut held: HashMap<Key, usize> = HashMap::new();
            for m in st.session.held_messages() {
                *held.entry(key(m)).or_default() += 1;
            }
            (subs, held)
        };
        let mut queued = 0;
        for msg in messages {
            if let Some(n) = held.get_mut(&key(&msg)).filter(|n| **n > 0) {
                *n -= 1;
                continue;
            }
            let mut best: Option<Delivery> = None;
            for (filter, sub) in &subs {
                if !topic::topic_matches(filter, &msg.topic)
                    || (sub.options.no_local && msg.publisher_client_id == cell.client_id)
                {
                    continue;
                }
                super::route::merge_match(&mut best, &msg, &sub.options, sub.identifier, None);
            }
            if let Some(d) = best {
                if d.qos == QoS::ExactlyOnce && !qos2.is_empty() {
                    let digest = qos2_digest(&msg);
                    if let Some(i) = qos2.completed.iter().position(|&c| c == digest) {
                        qos2.completed.swap_remove(i);
                        continue;
                    }
                    if let Some(i) = qos2.inflight.iter().position(|o| o.2 == digest) {
                        let (pid, released, _) = qos2.inflight.remove(i);
                        let state = if released {
                            InflightState::AwaitComp
                        } else {
                            InflightState::AwaitAck
                        };
                        self.restore_inflight(cell, pid, d, state);
                        continue;
                    }
                }
                self.deliver(cell, d);
                queued += 1;
            }
        }
        for (pid, released, _) in qos2.inflight {
            // Its message was not read back (stored before the catch-up's
            // start: the nodes' clocks disagree by more than its margin).
            // A PUBREL is resent all the same, so the client frees the id;
            // a PUBLISH cannot be.
            if released {
                let d = Delivery {
                    msg: Arc::new(Message {
                        topic: ByteString::new(),
                        payload: bytes::Bytes::new(),
                        qos: QoS::ExactlyOnce,
                        retain: false,
                        properties: Default::default(),
                        expires_at: None,
                        publisher: None,
                        publisher_client_id: ByteString::new(),
                        engine_id: Default::default(),
                        routed_at: None,
                    }),
                    qos: QoS::ExactlyOnce,
                    retain: false,
                    subscription_ids: Default::default(),
                    share: None,
                    seq: 0,
                    replay: false,
                };
                self.restore_inflight(cell, pid, d, InflightState::AwaitComp);
            } else {
                tracing::warn!(client_id = %cell.client_id, packet_id = pid, "cluster: a QoS 2 message in flight on a node that is gone was not found in MILLET_MSGS: not resent");
            }
        }
        queued
    }

    /// Put `d` in `cell`'s in-flight window under `packet_id` in `state`
    /// (and in this node's store), as a moved session's window is.
    fn restore_inflight(
        &self,
        cell: &SessionCell,
        packet_id: u16,
        d: Delivery,
        state: InflightState,
    ) {
        let mut st = cell.state.lock();
        let s = &mut st.session;
        let order = s.take_seq();
        if let Some(p) = self.persist.as_ref().filter(|_| s.persisted) {
            let mut ops = Vec::new();
            p.message_id(&d.msg, &mut ops, false);
            ops.push(p.inflight_op(
                &cell.client_id,
                packet_id,
                &d,
                state == InflightState::AwaitComp,
                order,
            ));
            p.submit(ops);
        }
        s.push_inflight_state(packet_id, d, state);
    }

    /// Sessions in the registry: connected ones, and disconnected ones
    /// that have not expired.
    pub fn session_count(&self) -> usize {
        self.registry.lock().len()
    }

    /// Remove the disconnected sessions whose expiry interval has passed
    /// (part of [`Broker::handle_timeout`]).
    pub(super) fn expire_sessions(&self, now: Instant) {
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
                    reg.get(id).is_some_and(|c| {
                        let st = c.state.lock();
                        st.conn_epoch == 0
                            && st.session.expires_at.is_some_and(|t| t.instant() <= now)
                    })
                })
                .collect();
            ids.into_iter().filter_map(|k| reg.remove(k)).collect()
        };
        self.node
            .stats
            .clients_expired
            .fetch_add(expired.len() as u64, Ordering::Relaxed);
        for cell in expired {
            tracing::debug!(session = cell.id, "session expired");
            self.end_session(&cell, now);
        }
    }

    /// Every session's cell, for shutdown.
    pub fn all_sessions(&self) -> Vec<Arc<SessionCell>> {
        self.registry.lock().values().cloned().collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;
    use crate::session::{Delivery, Message};
    use bytes::Bytes;
    use millet_codec::{PublishProperties, SubscriptionOptions};

    fn message(topic: &str, payload: &'static [u8]) -> Arc<Message> {
        Arc::new(Message {
            topic: topic.into(),
            payload: Bytes::from_static(payload),
            qos: QoS::AtLeastOnce,
            retain: false,
            properties: PublishProperties::default(),
            expires_at: None,
            publisher: None,
            publisher_client_id: "pub".into(),
            engine_id: Default::default(),
            routed_at: None,
        })
    }

    fn delivery(m: &Arc<Message>) -> Delivery {
        Delivery {
            msg: Arc::new(m.detached()), // an equal copy, as one moved over NATS is
            qos: QoS::AtLeastOnce,
            retain: false,
            subscription_ids: Default::default(),
            share: None,
            seq: 0,
            replay: false,
        }
    }

    /// A session moved with two equal messages queued, and a third one
    /// published while it moved: reading back the three (and one more)
    /// queues the third and the other, not the two it holds; equal
    /// messages count one by one.
    #[test]
    fn a_catch_up_queues_what_the_session_does_not_hold_counting_equal_messages() {
        let b = Broker::new(
            Config {
                sys_interval: 0,
                ..Config::default()
            },
            Instant::now(),
        );
        let same = message("t/a", b"same");
        let other = message("t/b", b"other");
        let elsewhere = message("u/c", b"not matched");
        let moved = MovedSession {
            subscriptions: vec![(
                ByteString::from("t/#"),
                Subscription {
                    options: SubscriptionOptions {
                        qos: QoS::AtLeastOnce,
                        ..Default::default()
                    },
                    identifier: None,
                    share_group: None,
                },
            )],
            queue: vec![delivery(&same), delivery(&same)],
            ..Default::default()
        };
        let cell = b
            .take_moved_session(&ByteString::from("c"), moved, Instant::now())
            .expect("installed");
        let read = [&same, &same, &same, &other, &elsewhere];
        let queued = b.catch_up(&cell, read.into_iter().cloned(), Qos2Resume::default());
        assert_eq!(queued, 2, "the third equal message and the other one");
        assert_eq!(cell.state.lock().session.queue_len(), 4);
    }

    /// A session rebuilt after its node died, with what that node recorded
    /// of its QoS 2 deliveries: the read-back message it had completed is
    /// skipped, the one it had released goes back in flight awaiting
    /// PUBCOMP and the one it had sent awaiting PUBREC, each under its
    /// packet id; an equal message after them is new; a released id whose
    /// message was not read back is still in flight (its PUBREL resent).
    #[test]
    fn a_catch_up_restores_a_dead_nodes_qos2_window_and_skips_what_it_completed() {
        let b = Broker::new(
            Config {
                sys_interval: 0,
                ..Config::default()
            },
            Instant::now(),
        );
        let q2 = |topic: &str, payload: &'static [u8]| {
            let mut m = (*message(topic, payload)).detached();
            m.qos = QoS::ExactlyOnce;
            Arc::new(m)
        };
        let (done, released, sent) = (q2("t/a", b"a"), q2("t/b", b"b"), q2("t/c", b"c"));
        let again = q2("t/a", b"a"); // equal to `done`, published after it
        let moved = MovedSession {
            subscriptions: vec![(
                ByteString::from("t/#"),
                Subscription {
                    options: SubscriptionOptions {
                        qos: QoS::ExactlyOnce,
                        ..Default::default()
                    },
                    identifier: None,
                    share_group: None,
                },
            )],
            ..Default::default()
        };
        let cell = b
            .take_moved_session(&ByteString::from("c"), moved, Instant::now())
            .expect("installed");
        let resume = Qos2Resume {
            inflight: vec![
                (7, true, qos2_digest(&released)),
                (9, false, qos2_digest(&sent)),
                (11, true, 0xdead),
            ],
            completed: vec![qos2_digest(&done)],
        };
        let read = [&done, &released, &sent, &again];
        let queued = b.catch_up(&cell, read.into_iter().cloned(), resume);
        assert_eq!(queued, 1, "only the later equal message is new");
        let st = cell.state.lock();
        let window: Vec<(u16, InflightState, &[u8])> = st
            .session
            .inflight()
            .map(|(p, i)| (p, i.state, &i.delivery.msg.payload[..]))
            .collect();
        assert_eq!(
            window,
            vec![
                (7, InflightState::AwaitComp, &b"b"[..]),
                (9, InflightState::AwaitAck, &b"c"[..]),
                (11, InflightState::AwaitComp, &b""[..]),
            ]
        );
        assert_eq!(st.session.queue_len(), 1);
    }
}
