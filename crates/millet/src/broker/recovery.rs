//! Recovery at start-up: opening the embedded store ([`Broker::open`]) and
//! rebuilding the in-memory state from what it recovered — sessions with
//! their queues, in-flight windows and QoS 2 ids, subscriptions (into the
//! index), delayed wills and retained messages. Runs once, before any
//! connection; owns no state of its own.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytestring::ByteString;
use millet_codec::topic;
use smallvec::SmallVec;

use super::retained::message_bytes;
use super::route::IndexEntry;
use super::wills::DelayedWill;
use super::{persist, Broker};
use crate::config::Config;
use crate::session::{Delivery, Message, Session, SessionCell, Subscription};
use crate::stamp::Stamp;

impl Broker {
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
        let mut registry = super::registry::Registry::default();
        let mut wills = Vec::new();
        let idx = self.index.get_mut();
        for rs in &rec.sessions {
            let client_id = ByteString::from(rs.session.client_id.as_str());
            let id = self.next_session_id.fetch_add(1, Ordering::Relaxed);
            let mut s = Session::with_limits(self.queue_limits.clone());
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
                    .push(std::cmp::Reverse((t.instant(), client_id.clone())));
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
            let cell = SessionCell::new(id, client_id.clone(), s);
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
                self.node
                    .stats
                    .subscriptions
                    .fetch_add(1, Ordering::Relaxed);
            }
            registry.insert(cell);
            n_sessions += 1;
        }
        let retained = self.retained.get_mut();
        for (topic_name, id) in &rec.retained {
            if let Some(m) = message(*id) {
                if !m.is_expired(now) {
                    if !topic_name.starts_with("$SYS/") {
                        self.retained_count.fetch_add(1, Ordering::Relaxed);
                        self.node
                            .retained_bytes
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
}
