//! The broker's side of the admin API ([`crate::admin`]): narrow queries and
//! commands on clients, subscriptions and retained messages. Nothing here
//! runs per packet; each call takes the registry lock only to copy the
//! session cells it needs, then each session's lock briefly.

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use bytestring::ByteString;
use millet_codec::{topic, PublishProperties, QoS, ReasonCode, SubscriptionOptions};
use serde::Serialize;

use super::{Broker, Routed, SubscribeOutcome};
use crate::session::{DeferredReplay, Message, SessionCell, Subscription};
use crate::store::Op;

/// What the admin API shows of a live connection, set once when its
/// CONNECT is accepted (see `server.rs`). Held in the session, not behind
/// a pointer of its own: an idle connection pays no allocation for it.
#[derive(Debug, Clone)]
pub struct ConnInfo {
    pub peer: SocketAddr,
    pub username: Option<Box<str>>,
    /// Protocol level: 3 (3.1), 4 (3.1.1), 5.
    pub protocol: u8,
    pub keep_alive: u16,
    pub clean_start: bool,
    /// Unix time, milliseconds.
    pub connected_at_ms: u64,
}

impl ConnInfo {
    pub fn new(
        peer: SocketAddr,
        username: Option<String>,
        protocol: u8,
        keep_alive: u16,
        clean_start: bool,
    ) -> ConnInfo {
        ConnInfo {
            peer,
            username: username.map(String::into_boxed_str),
            protocol,
            keep_alive,
            clean_start,
            connected_at_ms: unix_ms(SystemTime::now()),
        }
    }
}

fn unix_ms(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

/// Record `info` for the connection `epoch` of `cell`, unless another
/// connection took the session over in the meantime.
pub fn set_conn_info(cell: &SessionCell, epoch: u64, info: ConnInfo) {
    let mut st = cell.state.lock();
    if st.conn_epoch == epoch {
        st.conn_info = Some(info);
    }
}

/// The username of the connection attached to `cell`, if it has one.
pub fn conn_username(cell: &SessionCell) -> Option<String> {
    cell.state
        .lock()
        .conn_info
        .as_ref()?
        .username
        .as_deref()
        .map(String::from)
}

/// One client (session) as the API lists it.
#[derive(Debug, Clone, Serialize)]
pub struct ClientSummary {
    pub client_id: String,
    pub connected: bool,
    /// Connection details: absent while no connection is attached.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub username: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub peer: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub protocol: Option<u8>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub keep_alive: Option<u16>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub clean_start: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub connected_at_ms: Option<u64>,
    /// Seconds (4294967295: never).
    pub session_expiry_interval: u32,
    pub subscriptions: usize,
    /// Messages waiting in the session's queue.
    pub queued: usize,
    /// Outgoing QoS 1/2 messages awaiting acknowledgement.
    pub inflight: usize,
    /// Messages dropped because the queue was full.
    pub dropped: u64,
}

/// One subscription as the API lists it.
#[derive(Debug, Clone, Serialize)]
pub struct SubscriptionInfo {
    pub client_id: String,
    pub filter: String,
    pub qos: u8,
    pub no_local: bool,
    pub retain_as_published: bool,
    pub retain_handling: u8,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub subscription_identifier: Option<u32>,
}

/// One retained message as the API lists it.
#[derive(Debug, Clone, Serialize)]
pub struct RetainedInfo {
    pub topic: String,
    pub qos: u8,
    /// The payload as UTF-8 when it is, else absent (see `payload_base64`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub payload: Option<String>,
    pub payload_base64: String,
    pub payload_bytes: usize,
    /// Seconds left before it expires (message expiry interval), if any.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub expires_in: Option<u64>,
}

/// What [`Broker::admin_kick`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kicked {
    /// The connection was told to close (v5: DISCONNECT 0x98).
    Connection,
    /// No connection was attached: the offline session was discarded.
    Session,
    NotFound,
}

/// Why an admin publish was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PublishRefused {
    /// Not a valid topic name (empty, wildcards, too long or deep).
    InvalidTopic,
    /// `$SYS/...` and other `$` topics belong to the broker.
    ReservedTopic,
    /// The retained store is full (a new retained topic).
    RetainedFull,
}

fn summary(client_id: &str, cell: &SessionCell) -> ClientSummary {
    let st = cell.state.lock();
    let s = &st.session;
    let info = st.conn_info.clone().filter(|_| st.conn_epoch != 0);
    ClientSummary {
        client_id: client_id.to_string(),
        connected: st.conn_epoch != 0,
        username: info
            .as_ref()
            .and_then(|i| i.username.as_deref().map(String::from)),
        peer: info.as_ref().map(|i| i.peer.to_string()),
        protocol: info.as_ref().map(|i| i.protocol),
        keep_alive: info.as_ref().map(|i| i.keep_alive),
        clean_start: info.as_ref().map(|i| i.clean_start),
        connected_at_ms: info.as_ref().map(|i| i.connected_at_ms),
        session_expiry_interval: s.expiry_interval,
        subscriptions: s.subscriptions.len(),
        queued: s.queue_len(),
        inflight: s.inflight_len(),
        dropped: s.dropped,
    }
}

fn subscription_info(client_id: &str, filter: &str, sub: &Subscription) -> SubscriptionInfo {
    SubscriptionInfo {
        client_id: client_id.to_string(),
        filter: filter.to_string(),
        qos: sub.options.qos as u8,
        no_local: sub.options.no_local,
        retain_as_published: sub.options.retain_as_published,
        retain_handling: sub.options.retain_handling,
        subscription_identifier: sub.identifier,
    }
}

/// Queue depths over all sessions, for `/metrics`.
#[derive(Debug, Clone, Default)]
pub struct QueueDepths {
    pub queued: u64,
    pub inflight: u64,
    pub max_queued: u64,
    /// Sessions per queue-depth bucket: cumulative counts for the upper
    /// bounds of [`QUEUE_DEPTH_BOUNDS`], then all sessions.
    pub cumulative: Vec<u64>,
    pub sessions: u64,
}

/// Bucket bounds of the per-session queue depth histogram.
pub const QUEUE_DEPTH_BOUNDS: [u64; 7] = [0, 10, 100, 1000, 10_000, 100_000, 1_000_000];

impl Broker {
    /// The sessions whose client id starts with `prefix` and sorts after
    /// `after`, sorted by client id (the registry lock is held only to copy
    /// them).
    fn cells_sorted(
        &self,
        prefix: &str,
        after: Option<&str>,
    ) -> Vec<(ByteString, Arc<SessionCell>)> {
        let mut v: Vec<(ByteString, Arc<SessionCell>)> = self
            .registry
            .lock()
            .values()
            .filter(|c| c.client_id.starts_with(prefix) && after.is_none_or(|a| &*c.client_id > a))
            .map(|c| (c.client_id.clone(), c.clone()))
            .collect();
        v.sort_unstable_by(|a, b| a.0.cmp(&b.0));
        v
    }

    /// Clients (sessions, connected or not) by client id, filtered by id
    /// prefix and username, at most `limit` after `after`. The second value
    /// is the cursor of the next page, if there is one.
    pub fn admin_clients(
        &self,
        prefix: &str,
        username: Option<&str>,
        connected: Option<bool>,
        after: Option<&str>,
        limit: usize,
    ) -> (Vec<ClientSummary>, Option<String>) {
        let mut out = Vec::new();
        for (id, cell) in self.cells_sorted(prefix, after) {
            let s = summary(&id, &cell);
            if username.is_some_and(|u| s.username.as_deref() != Some(u))
                || connected.is_some_and(|c| c != s.connected)
            {
                continue;
            }
            if out.len() == limit {
                let next = out.last().map(|c: &ClientSummary| c.client_id.clone());
                return (out, next);
            }
            out.push(s);
        }
        (out, None)
    }

    /// One client, if it has a session.
    pub fn admin_client(&self, client_id: &str) -> Option<(ClientSummary, Vec<SubscriptionInfo>)> {
        let cell = self.registry.lock().get(client_id).cloned()?;
        let s = summary(client_id, &cell);
        let subs = {
            let st = cell.state.lock();
            let mut v: Vec<SubscriptionInfo> = st
                .session
                .subscriptions
                .iter()
                .map(|(f, sub)| subscription_info(client_id, f, sub))
                .collect();
            v.sort_by(|a, b| a.filter.cmp(&b.filter));
            v
        };
        Some((s, subs))
    }

    /// Close the client's connection with `reason` (v5 DISCONNECT; 3.x: the
    /// connection is closed); its session stays as its expiry says. A
    /// session with no connection is discarded (as if it expired).
    /// Another node of the cluster took `client_id` over: the connection
    /// attached here is detached at once (as a local takeover does: its
    /// will follows the usual rules) and told to close with 0x8E. Returns
    /// its epoch and waker, `None` when no connection was attached.
    pub fn taken_over_elsewhere(
        &self,
        client_id: &str,
        now: Instant,
    ) -> Option<(u64, Option<Arc<crate::session::ConnWaker>>)> {
        let cell = self.registry.lock().get(client_id).cloned()?;
        let (epoch, waker) = {
            let mut st = cell.state.lock();
            if st.conn_epoch == 0 {
                return None;
            }
            st.kick = Some(ReasonCode::SESSION_TAKEN_OVER);
            (st.conn_epoch, st.waker.clone())
        };
        self.disconnect(&cell, epoch, true, None, now);
        if let Some(w) = &waker {
            w.signal(crate::session::ConnWaker::KICK);
        }
        Some((epoch, waker))
    }

    pub fn admin_kick(&self, client_id: &str, reason: ReasonCode, now: Instant) -> Kicked {
        let mut reg = self.registry.lock();
        let Some(cell) = reg.get(client_id).cloned() else {
            return Kicked::NotFound;
        };
        {
            let mut st = cell.state.lock();
            if st.conn_epoch != 0 {
                st.kick = Some(reason);
                st.signal_kick();
                return Kicked::Connection;
            }
        }
        reg.remove(client_id);
        drop(reg);
        self.end_session(&cell, now);
        // A will waiting for its delay goes out now: the session ended.
        if let Some(w) = self.take_delayed_will(cell.id) {
            self.publish_will(w, now);
        }
        Kicked::Session
    }

    /// Subscriptions, sorted by client id then filter, optionally of one
    /// client; at most `limit`. `None` when that client has no session.
    pub fn admin_subscriptions(
        &self,
        client_id: Option<&str>,
        limit: usize,
    ) -> Option<Vec<SubscriptionInfo>> {
        let cells = match client_id {
            Some(id) => {
                let cell = self.registry.lock().get(id).cloned()?;
                vec![(ByteString::from(id), cell)]
            }
            None => self.cells_sorted("", None),
        };
        let mut out = Vec::new();
        for (id, cell) in cells {
            let st = cell.state.lock();
            let mut v: Vec<SubscriptionInfo> = st
                .session
                .subscriptions
                .iter()
                .map(|(f, sub)| subscription_info(&id, f, sub))
                .collect();
            drop(st);
            v.sort_by(|a, b| a.filter.cmp(&b.filter));
            out.extend(v);
            if out.len() >= limit {
                out.truncate(limit);
                break;
            }
        }
        Some(out)
    }

    /// Subscribe `client_id` to `filter` on its behalf, with the retained
    /// messages replayed as a SUBSCRIBE would (retain handling 0, or 1 for
    /// a new subscription). `None`: the client has no session.
    pub fn admin_subscribe(
        &self,
        client_id: &str,
        filter: &str,
        options: SubscriptionOptions,
        now: Instant,
    ) -> Option<SubscribeOutcome> {
        let cell = self.registry.lock().get(client_id).cloned()?;
        let filter = ByteString::from(filter);
        let share_group = match topic::parse_shared(&filter) {
            Ok(Some(sf)) => Some(ByteString::from(sf.group)),
            _ => None,
        };
        let shared = share_group.is_some();
        let sub = Subscription {
            options,
            identifier: None,
            share_group,
        };
        let outcome = self.subscribe(&cell, &filter, sub);
        if let SubscribeOutcome::Granted { is_new } = outcome {
            let send = !shared
                && (options.retain_handling == 0 || (options.retain_handling == 1 && is_new));
            if send {
                let replay = DeferredReplay {
                    filter: filter.clone(),
                    options,
                    identifier: None,
                };
                let due = cell
                    .state
                    .lock()
                    .session
                    .replay_started(&filter, replay.clone());
                if due {
                    self.replay_retained(&cell, &replay, now);
                    cell.state.lock().session.replay_settled();
                }
            }
        }
        Some(outcome)
    }

    /// Remove a subscription on the client's behalf: `None` without a
    /// session, else whether it existed.
    pub fn admin_unsubscribe(&self, client_id: &str, filter: &str) -> Option<bool> {
        let cell = self.registry.lock().get(client_id).cloned()?;
        Some(self.unsubscribe(&cell, &ByteString::from(filter)))
    }

    /// Publish a message as the broker (no publishing session: nobody's No
    /// Local applies). Returns how it was routed; the caller may wait for
    /// `ticket` to be durable.
    pub fn admin_publish(
        &self,
        topic_name: &str,
        payload: Bytes,
        qos: QoS,
        retain: bool,
        message_expiry: Option<u32>,
        now: Instant,
    ) -> Result<Routed, PublishRefused> {
        let l = &self.node.config.limits;
        if !topic::valid_topic_name(topic_name)
            || topic_name.len() > l.max_topic_length
            || millet_codec::topic::topic_levels(topic_name) > l.max_topic_levels
        {
            return Err(PublishRefused::InvalidTopic);
        }
        if topic_name.starts_with('$') {
            return Err(PublishRefused::ReservedTopic);
        }
        let bytes = (topic_name.len() + payload.len()) as u64;
        if retain && !payload.is_empty() && !self.retained_admits(topic_name, bytes) {
            return Err(PublishRefused::RetainedFull);
        }
        let properties = PublishProperties {
            message_expiry_interval: message_expiry,
            ..Default::default()
        };
        let msg = Message {
            topic: ByteString::from(topic_name),
            payload,
            qos,
            retain,
            properties,
            expires_at: message_expiry.map(|s| now + Duration::from_secs(u64::from(s))),
            publisher: None,
            publisher_client_id: ByteString::from_static("$admin"),
            engine_id: Default::default(),
            routed_at: None,
        };
        Ok(self.publish(Arc::new(msg), None, now))
    }

    /// Retained messages whose topic matches `filter` (`#`: all but the
    /// broker's `$SYS` topics), sorted by topic, at most `limit` after
    /// `after`; the second value is the next page's cursor.
    pub fn admin_retained(
        &self,
        filter: &str,
        after: Option<&str>,
        limit: usize,
        now: Instant,
    ) -> (Vec<RetainedInfo>, Option<String>) {
        let mut found: Vec<(String, Arc<Message>)> = Vec::new();
        self.retained.read().for_each_matching(filter, |t, m| {
            if after.is_none_or(|a| t > a) && !m.is_expired(now) {
                found.push((t.to_string(), m.clone()));
            }
        });
        found.sort_unstable_by(|a, b| a.0.cmp(&b.0));
        let more = found.len() > limit;
        found.truncate(limit);
        let next = if more {
            found.last().map(|(t, _)| t.clone())
        } else {
            None
        };
        let out = found
            .into_iter()
            .map(|(topic, m)| {
                use base64::Engine as _;
                RetainedInfo {
                    topic,
                    qos: m.qos as u8,
                    payload: std::str::from_utf8(&m.payload).ok().map(str::to_string),
                    payload_base64: base64::engine::general_purpose::STANDARD.encode(&m.payload),
                    payload_bytes: m.payload.len(),
                    expires_in: m
                        .expires_at
                        .map(|t| t.saturating_duration_since(now).as_secs()),
                }
            })
            .collect();
        (out, next)
    }

    /// Delete the retained message on `topic` (subscribers are not sent
    /// anything); whether there was one.
    pub fn admin_delete_retained(&self, topic_name: &str) -> bool {
        let mut r = self.retained.write();
        let Some(old) = r.remove(topic_name) else {
            return false;
        };
        self.retained_changed(topic_name, None, Some(&old));
        if let Some(p) = &self.persist {
            p.submit(vec![Op::DeleteRetained {
                topic: topic_name.to_string(),
            }]);
        }
        true
    }

    /// Queue depths over every session (one lock per session: O(sessions)
    /// per scrape, nothing per message).
    pub fn queue_depths(&self) -> QueueDepths {
        let cells: Vec<Arc<SessionCell>> = self.registry.lock().values().cloned().collect();
        let mut d = QueueDepths {
            cumulative: vec![0; QUEUE_DEPTH_BOUNDS.len()],
            ..Default::default()
        };
        for cell in cells {
            let (q, f) = {
                let st = cell.state.lock();
                (
                    st.session.queue_len() as u64,
                    st.session.inflight_len() as u64,
                )
            };
            d.sessions += 1;
            d.queued += q;
            d.inflight += f;
            d.max_queued = d.max_queued.max(q);
            for (c, b) in d.cumulative.iter_mut().zip(QUEUE_DEPTH_BOUNDS) {
                if q <= b {
                    *c += 1;
                }
            }
        }
        d
    }

    /// Bytes of retained messages ($SYS not counted).
    pub fn retained_bytes(&self) -> u64 {
        self.node.retained_bytes.load(Ordering::Relaxed)
    }

    /// The store's state for `/readyz` and `/api/v1/stats`: `"none"`
    /// (memory only), `"ok"`, `"full"` (writes refused for lack of space:
    /// still serving) or `"failing"` (I/O errors: not ready).
    pub fn store_state(&self) -> &'static str {
        match self.persist.as_ref().map(|p| p.store().failing()) {
            None => "none",
            Some(None) => "ok",
            Some(Some(true)) => "full",
            Some(Some(false)) => "failing",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;
    use crate::session::ConnWaker;

    fn broker() -> Broker {
        let config = Config {
            sys_interval: 0,
            ..Config::default()
        };
        Broker::new(config, Instant::now())
    }

    fn connect(b: &Broker, id: &str, expiry: u32) -> (super::super::Attached, Arc<ConnWaker>) {
        let w = Arc::new(ConnWaker::default());
        let a = b.connect(
            &ByteString::from(id),
            false,
            expiry,
            None,
            w.clone(),
            Instant::now(),
        );
        (a, w)
    }

    #[test]
    fn qos_counters_sum_their_shards() {
        use super::super::{Direction, QosCounters};
        let c = Arc::new(QosCounters::default());
        let threads: Vec<_> = (0..20)
            .map(|_| {
                let c = c.clone();
                std::thread::spawn(move || {
                    for _ in 0..100 {
                        c.add(Direction::Sent, &[1, 0, 2], &[10, 0, 20]);
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        c.add(Direction::Received, &[0, 5, 0], &[0, 50, 0]);
        assert_eq!(
            c.totals(Direction::Sent),
            ([2000, 0, 4000], [20000, 0, 40000])
        );
        assert_eq!(c.totals(Direction::Received), ([0, 5, 0], [0, 50, 0]));
    }

    #[test]
    fn clients_page_by_id_and_filter() {
        let b = broker();
        let mut keep = Vec::new();
        for id in ["dev-2", "dev-1", "other", "dev-3"] {
            keep.push(connect(&b, id, 60));
        }
        let (a, e) = (keep[3].0.cell.clone(), keep[3].0.epoch);
        set_conn_info(
            &a,
            e,
            ConnInfo::new(
                "127.0.0.1:1".parse().unwrap(),
                Some("u".into()),
                5,
                30,
                true,
            ),
        );
        let (page, next) = b.admin_clients("dev-", None, None, None, 2);
        let ids: Vec<&str> = page.iter().map(|c| c.client_id.as_str()).collect();
        assert_eq!(
            (ids, next.as_deref()),
            (vec!["dev-1", "dev-2"], Some("dev-2"))
        );
        let (page, next) = b.admin_clients("dev-", None, None, Some("dev-2"), 2);
        assert_eq!(page.len(), 1);
        assert_eq!((page[0].client_id.as_str(), next), ("dev-3", None));
        assert_eq!(page[0].username.as_deref(), Some("u"));
        assert_eq!(page[0].protocol, Some(5));
        let (page, _) = b.admin_clients("", Some("u"), None, None, 10);
        assert_eq!(page.len(), 1);
        b.disconnect(
            &keep[0].0.cell,
            keep[0].0.epoch,
            false,
            None,
            Instant::now(),
        );
        let (page, _) = b.admin_clients("", None, Some(false), None, 10);
        assert_eq!(page.len(), 1);
        assert!(!page[0].connected && page[0].username.is_none());
    }

    #[test]
    fn kick_signals_a_live_connection_and_discards_an_offline_session() {
        let b = broker();
        let (a, w) = connect(&b, "live", 60);
        assert_eq!(
            b.admin_kick("live", ReasonCode::ADMINISTRATIVE_ACTION, Instant::now()),
            Kicked::Connection
        );
        assert_eq!(
            a.cell.state.lock().kick,
            Some(ReasonCode::ADMINISTRATIVE_ACTION)
        );
        assert_ne!(w.take_signals() & ConnWaker::KICK, 0);
        b.disconnect(&a.cell, a.epoch, false, None, Instant::now());
        assert_eq!(
            b.session_count(),
            1,
            "a persistent session outlives the kick"
        );
        assert_eq!(
            b.admin_kick("live", ReasonCode::ADMINISTRATIVE_ACTION, Instant::now()),
            Kicked::Session
        );
        assert_eq!(b.session_count(), 0);
        assert_eq!(
            b.admin_kick("live", ReasonCode::ADMINISTRATIVE_ACTION, Instant::now()),
            Kicked::NotFound
        );
    }

    #[test]
    fn subscribe_on_behalf_replays_retained_and_retained_pages_and_deletes() {
        let b = broker();
        let now = Instant::now();
        for t in ["s/1", "s/2", "s/3"] {
            b.admin_publish(
                t,
                Bytes::from_static(b"v"),
                QoS::AtLeastOnce,
                true,
                None,
                now,
            )
            .unwrap();
        }
        assert_eq!(b.retained_count_without_sys(), 3);
        let (page, next) = b.admin_retained("s/#", None, 2, now);
        assert_eq!(page.len(), 2);
        assert_eq!(next.as_deref(), Some("s/2"));
        assert_eq!(page[0].payload.as_deref(), Some("v"));
        assert!(b.admin_delete_retained("s/2"));
        assert!(!b.admin_delete_retained("s/2"));
        assert_eq!(b.retained_count_without_sys(), 2);
        let (a, _w) = connect(&b, "c", 60);
        let opts = SubscriptionOptions {
            qos: QoS::AtLeastOnce,
            ..Default::default()
        };
        let r = b.admin_subscribe("c", "s/+", opts, now);
        assert_eq!(r, Some(SubscribeOutcome::Granted { is_new: true }));
        assert_eq!(
            a.cell.state.lock().session.queue_len(),
            2,
            "retained replayed"
        );
        assert_eq!(b.node.stats.subscriptions.load(Ordering::Relaxed), 1);
        let subs = b.admin_subscriptions(Some("c"), 10).unwrap();
        assert_eq!((subs[0].filter.as_str(), subs[0].qos), ("s/+", 1));
        let routed = b
            .admin_publish(
                "s/9",
                Bytes::from_static(b"x"),
                QoS::AtMostOnce,
                false,
                None,
                now,
            )
            .unwrap();
        assert_eq!(routed.sessions, 1);
        assert_eq!(b.queue_depths().queued, 3);
        assert_eq!(b.admin_unsubscribe("c", "s/+"), Some(true));
        assert_eq!(b.admin_unsubscribe("c", "s/+"), Some(false));
        assert_eq!(b.admin_unsubscribe("nobody", "s/+"), None);
        assert_eq!(b.admin_subscribe("nobody", "s/+", opts, now), None);
        assert_eq!(
            b.admin_publish("s/+", Bytes::new(), QoS::AtMostOnce, false, None, now)
                .err(),
            Some(PublishRefused::InvalidTopic)
        );
        assert_eq!(
            b.admin_publish("$SYS/x", Bytes::new(), QoS::AtMostOnce, false, None, now)
                .err(),
            Some(PublishRefused::ReservedTopic)
        );
    }
}
