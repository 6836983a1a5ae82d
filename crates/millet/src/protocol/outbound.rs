//! What goes to the client: control packets, the in-flight window resent on
//! resume, and queued messages within the client's receive maximum and
//! maximum packet size, with outbound topic aliases; the store records of
//! queue → in-flight moves ([`crate::engine::Engine::session_writes`]).
//!
//! Owns `Connection::out` (control packets waiting) and the per-call
//! packet counts for `$SYS`.

use super::*;

/// Queued messages encoded by one [`Connection::poll_transmit`] call, in
/// bytes: the rest waits for the next call (the connection wakes itself), so
/// a long queue (a replay of 100,000 retained messages) is written in slices
/// between which the task yields to the others on its thread.
pub(super) const TRANSMIT_SLICE: usize = 256 * 1024;

impl Connection {
    /// Encode everything ready to send into `buf`: control packets first, then
    /// the in-flight window on resume, then queued messages within the
    /// client's receive maximum.
    pub fn poll_transmit(&mut self, now: Instant, buf: &mut BytesMut) {
        self.received.add_received_to(&self.shared.node.stats);
        if self.keepalive_stale {
            self.rearm_keepalive(self.last_recv);
        }
        let Some(protocol) = self.protocol else {
            return;
        };
        // The pending wake-up is consumed before anything it may stand for
        // is looked at (a kick, an acknowledgement's ticket, deliveries): a
        // wake-up arriving meanwhile stays pending, and the connection
        // comes back. Consumed later, it would be lost with what it
        // announced (a PUBACK held until the next unrelated wake-up).
        self.waker.clear();
        self.check_kick();
        if !self.pending_acks.is_empty() {
            self.release_acks();
        }
        let mut sent = SentCount::default();
        while let Some(mut p) = self.out.pop_front() {
            if self.peer_max_packet != usize::MAX
                && !fit_control_packet(&mut p, protocol, self.peer_max_packet)
            {
                self.discard_oversized(&p);
                continue;
            }
            if let Err(e) = sent.encode(&p, protocol, buf) {
                tracing::warn!(error = %e, packet = p.name(), "cannot encode packet; dropped");
            }
        }
        sent.add_to(&self.shared.node.stats);
        if self.close.is_some() {
            return;
        }
        if self
            .waiting
            .as_ref()
            .is_some_and(|w| matches!(w.then, Then::Subscribe { .. }))
        {
            // A SUBSCRIBE the engine has not answered yet may already have
            // queued the retained messages it replays: they wait for its
            // SUBACK, which clients (and Mosquitto, EMQX) put first. The
            // answer wakes the connection, and the next call drains.
            return;
        }
        let State::Connected(active) = &mut self.state else {
            return;
        };
        let stats = &self.shared.node.stats;
        let mut sent = SentCount::default();
        let cell = active.cell.clone();
        if !self.waker.is_blocked() {
            self.timers.set(Timer::Pause, None); // every congested session drained
        }
        let mut st = cell.state.lock();
        if !active.resend
            && !st.session.has_pending()
            && st.blocked.is_empty()
            && !st.session.has_deferred_replays()
        {
            // Nothing to send, release or replay: most calls in a fleet of
            // quiet devices (a wake-up for an acknowledgement, a PINGREQ).
            // What the rest would do comes to this.
            drop(st);
            self.ack_blocked_since = None;
            return;
        }
        let session = &mut st.session;
        // Store records mirroring queue → in-flight moves, submitted once at the end.
        let mut writes = self.shared.engine.session_writes(&cell.client_id, session);
        // QoS 2 PUBLISH held until its in-flight record is durable (and, to
        // keep the order and topic aliases right, everything behind it).
        let mut held: Vec<Packet> = Vec::new();
        // What the held packets wait for.
        let mut hold = Ticket::NONE;
        // The engine records QoS 2 deliveries of its own (a cluster node):
        // they wait for it as for the store.
        let holds_qos2 = self.shared.engine.holds_qos2(session);
        let mut sent_qos2: Vec<(u16, Arc<Message>)> = Vec::new();
        let max_packet = self.peer_max_packet;
        if active.resend {
            active.resend = false;
            // A resent PUBLISH or PUBREL describes in-flight state the store
            // may not hold yet (moved there just before the client went
            // away): the client must not complete it before that is durable,
            // or a crash would bring the message back from the queue under a
            // new packet id. Resends wait for everything submitted so far.
            if writes.records() {
                let last = self.shared.engine.last_ticket();
                if self.shared.engine.ticket_status(last) == AckStatus::Pending {
                    hold = last;
                }
            }
            // [MQTT-4.4.0-1]: resend unacknowledged PUBLISH (DUP) and PUBREL in order.
            let resend: Vec<(u16, InflightState, Delivery)> = session
                .inflight()
                .map(|(p, i)| (p, i.state, i.delivery.clone()))
                .collect();
            for (pid, state, d) in resend {
                let packet = match state {
                    InflightState::AwaitAck => {
                        Packet::Publish(active.publish_packet(&d, Some(pid), true, now, protocol))
                    }
                    InflightState::AwaitComp => Packet::PubRel(PubResp::new(pid)),
                };
                if max_packet != usize::MAX
                    && !encoded_len(&packet, protocol).is_ok_and(|n| n <= max_packet)
                {
                    // The client lowered its Maximum Packet Size since: the
                    // message is discarded as if delivered [MQTT-3.1.2-25].
                    if let Packet::Publish(p) = &packet {
                        if let (Some(alias), false) = (p.properties.topic_alias, p.topic.is_empty())
                        {
                            active.alias_out.forget(&p.topic, alias);
                        }
                    }
                    if session.forget_inflight(pid) {
                        writes.inflight_done(pid);
                    }
                    stats.messages_dropped.fetch_add(1, Ordering::Relaxed);
                    stats.dropped_too_large.fetch_add(1, Ordering::Relaxed);
                    continue;
                }
                if !hold.is_none() {
                    held.push(packet);
                } else {
                    let _ = sent.encode(&packet, protocol, buf);
                }
            }
        }
        // The window is full with messages waiting, and none could be sent:
        // the client is not acknowledging (a saturated but healthy client
        // frees some room between two calls, and something goes out).
        let mut ack_blocked = false;
        let mut moved = false;
        // `now` as a Stamp, converted at most once for the batch.
        let mut stamp = None;
        // Deliveries held from an earlier call keep new ones behind them
        // (order, topic aliases). Acknowledgements of the client's own
        // publishes waiting for the store do not: a PUBLISH to the client
        // may overtake a PUBACK to it, only PUBACKs keep their order among
        // themselves [MQTT-4.6.0-2]. (Holding behind them delayed a
        // backend's telemetry by half the store's gathering time whenever
        // it also published.)
        let delivery_held = self
            .pending_acks
            .iter()
            .any(|(_, p)| matches!(p, Packet::Publish(_) | Packet::PubRel(_)));
        loop {
            if buf.len() >= TRANSMIT_SLICE {
                if session.has_pending() {
                    self.waker.wake();
                }
                break;
            }
            let window_full = session.inflight_len() >= usize::from(active.send_window);
            let Some(d) =
                session.pop_queued_at(now, *stamp.get_or_insert_with(|| Stamp::from(now)))
            else {
                break;
            };
            if d.qos != QoS::AtMostOnce && window_full {
                session.unpop(d);
                ack_blocked = !moved;
                break;
            }
            moved = true;
            let pid = if d.qos == QoS::AtMostOnce {
                None
            } else {
                match session.alloc_packet_id() {
                    Some(p) => Some(p),
                    None => {
                        session.unpop(d);
                        break;
                    }
                }
            };
            writes.queue_entry_sent(&d);
            let publish = active.publish_packet(&d, pid, false, now, protocol);
            let packet = Packet::Publish(publish);
            let fits = max_packet == usize::MAX
                || encoded_len(&packet, protocol).is_ok_and(|n| n <= max_packet);
            if !fits {
                // [MQTT-3.1.2-25]: a message too big for the client is
                // discarded as if it had been sent; a topic alias assigned
                // for it must be forgotten.
                if let Packet::Publish(p) = &packet {
                    if let (Some(alias), false) = (p.properties.topic_alias, p.topic.is_empty()) {
                        active.alias_out.forget(&p.topic, alias);
                    }
                }
                stats.messages_dropped.fetch_add(1, Ordering::Relaxed);
                stats.dropped_too_large.fetch_add(1, Ordering::Relaxed);
                continue;
            }
            // A QoS 2 PUBLISH the client completes (PUBREC, PUBREL, PUBCOMP)
            // before its in-flight record is durable would, after a crash, be
            // sent again from the queue under a new packet id: delivered twice.
            let hold = (writes.holds_deliveries() || holds_qos2)
                && (d.qos == QoS::ExactlyOnce || !held.is_empty() || delivery_held);
            if hold {
                held.push(packet);
            } else if sent.encode(&packet, protocol, buf).is_err() {
                // Never sent: neither is the alias mapping it carried.
                if let Packet::Publish(p) = &packet {
                    if let (Some(alias), false) = (p.properties.topic_alias, p.topic.is_empty()) {
                        active.alias_out.forget(&p.topic, alias);
                    }
                }
                continue;
            }
            if let (Some(t), false) = (d.msg.routed_at, hold) {
                stats
                    .deliver_latency
                    .observe(now.saturating_duration_since(t.instant()));
            }
            self.shared.tell(|| Event::Delivered {
                client_id: active.client_id(),
                msg: &d.msg,
                qos: d.qos,
            });
            if let Some(pid) = pid {
                if holds_qos2 && d.qos == QoS::ExactlyOnce {
                    sent_qos2.push((pid, d.msg.clone()));
                }
                writes.inflight_added(session, pid, &d);
                session.push_inflight(pid, d);
            }
        }
        self.ack_blocked_since = if ack_blocked {
            Some(self.ack_blocked_since.unwrap_or_else(|| Stamp::from(now)))
        } else {
            None
        };
        let mut ticket = writes.submit().max(hold);
        if !sent_qos2.is_empty() {
            let own = self.shared.engine.qos2_sent(&cell.client_id, &sent_qos2);
            ticket = self.shared.engine.join_tickets(ticket, own);
        }
        if !held.is_empty() {
            self.shared.engine.ticket_wait(ticket, &self.waker);
            self.pending_acks
                .extend(held.into_iter().map(|packet| (ticket, packet)));
        }
        if !st.blocked.is_empty()
            && st.session.queue_len() <= self.shared.node.config.limits.backpressure_queued / 2
            && st.session.queued_bytes() <= self.shared.node.config.limits.max_queued_bytes / 4
        {
            st.release_blocked();
        }
        // Re-SUBSCRIBEs coalesced while a replay was under way: their
        // replay, now that it has left the queue.
        let due = if st.session.has_deferred_replays() {
            st.session.take_due_replays()
        } else {
            Vec::new()
        };
        drop(st);
        sent.add_to(stats);
        for r in &due {
            self.shared.engine.replay_retained(&cell, r, now);
        }
    }

    /// A control packet does not fit the client's Maximum Packet Size even
    /// without its optional properties: it is not sent [MQTT-3.1.2-24]. A
    /// client that cannot receive its CONNACK cannot use the connection.
    pub(super) fn discard_oversized(&mut self, p: &Packet) {
        if !self.warned_oversize {
            self.warned_oversize = true;
            tracing::warn!(
                packet = p.name(),
                client_maximum_packet_size = self.peer_max_packet,
                "packet too big for the client's maximum packet size; discarded (logged once per connection)"
            );
        }
        if let Packet::ConnAck(_) = p {
            self.set_close(ProtocolError::ConnAckTooLarge {
                max: self.peer_max_packet,
            });
            // Nothing may follow a CONNACK the client never got.
            self.out.clear();
        }
    }
}

impl Active {
    /// Build the PUBLISH for a delivery: QoS as downgraded, message expiry
    /// decremented [MQTT-3.3.2-6], subscription identifiers, outbound alias.
    pub(super) fn publish_packet(
        &mut self,
        d: &Delivery,
        pid: Option<u16>,
        dup: bool,
        now: Instant,
        protocol: Protocol,
    ) -> Publish {
        let m = &d.msg;
        let mut topic = m.topic.clone();
        let properties = if protocol.is_v5() {
            let mut props = PublishProperties {
                payload_format_indicator: m.properties.payload_format_indicator,
                message_expiry_interval: m.expires_at.map(|t| {
                    let left = t.saturating_duration_since(now);
                    (left.as_secs() + u64::from(left.subsec_nanos() > 0)).min(u64::from(u32::MAX))
                        as u32
                }),
                topic_alias: None,
                response_topic: m.properties.response_topic.clone(),
                correlation_data: m.properties.correlation_data.clone(),
                user_properties: m.properties.user_properties.clone(),
                subscription_identifiers: d.subscription_ids.to_vec(),
                content_type: m.properties.content_type.clone(),
            };
            // A resend (DUP) carries the full topic and no alias.
            if !dup {
                match self.alias_out.assign(&topic) {
                    OutAlias::None => {}
                    OutAlias::Known(alias) => {
                        props.topic_alias = Some(alias);
                        topic = ByteString::new();
                    }
                    OutAlias::New(alias) => props.topic_alias = Some(alias),
                }
            }
            props
        } else {
            PublishProperties::default()
        };
        Publish {
            dup,
            qos: d.qos,
            retain: d.retain,
            topic,
            packet_id: pid,
            properties,
            payload: m.payload.clone(),
        }
    }
}

/// Packets encoded by one [`Connection::poll_transmit`] (or received in
/// one turn), added to the broker's `$SYS` counters once (not per packet:
/// they are shared by every connection). 32-bit counts (32 bytes, one is
/// kept in every connection): a turn handles at most a few packets' worth
/// of bytes, and the counts saturate rather than wrap.
#[derive(Default)]
pub(super) struct SentCount {
    packets: u32,
    publishes: u32,
    /// PUBLISH packets and payload bytes by QoS (for `/metrics`).
    by_qos: [u32; 3],
    payload_by_qos: [u32; 3],
}

impl SentCount {
    pub(super) fn encode(
        &mut self,
        p: &Packet,
        protocol: Protocol,
        buf: &mut BytesMut,
    ) -> Result<(), millet_codec::EncodeError> {
        encode(p, protocol, buf)?;
        self.count_packet();
        if let Packet::Publish(p) = p {
            self.count_publish(p);
        }
        Ok(())
    }

    pub(super) fn count_packet(&mut self) {
        self.packets = self.packets.saturating_add(1);
    }

    pub(super) fn count_publish(&mut self, p: &millet_codec::Publish) {
        let q = p.qos as usize;
        self.publishes = self.publishes.saturating_add(1);
        if let (Some(n), Some(b)) = (self.by_qos.get_mut(q), self.payload_by_qos.get_mut(q)) {
            *n = n.saturating_add(1);
            *b = b.saturating_add(u32::try_from(p.payload.len()).unwrap_or(u32::MAX));
        }
    }

    fn wide(a: [u32; 3]) -> [u64; 3] {
        a.map(u64::from)
    }

    pub(super) fn add_to(&mut self, stats: &crate::broker::Stats) {
        if self.packets > 0 {
            stats
                .messages_sent
                .fetch_add(u64::from(self.packets), Ordering::Relaxed);
        }
        if self.publishes > 0 {
            stats
                .publish_sent
                .fetch_add(u64::from(self.publishes), Ordering::Relaxed);
            stats.by_qos.add(
                crate::broker::Direction::Sent,
                &Self::wide(self.by_qos),
                &Self::wide(self.payload_by_qos),
            );
        }
        *self = SentCount::default();
    }

    /// Packets received from the client (the same counts, other counters).
    pub(super) fn add_received_to(&mut self, stats: &crate::broker::Stats) {
        if self.packets > 0 {
            stats
                .messages_received
                .fetch_add(u64::from(self.packets), Ordering::Relaxed);
        }
        if self.publishes > 0 {
            stats
                .publish_received
                .fetch_add(u64::from(self.publishes), Ordering::Relaxed);
            stats.by_qos.add(
                crate::broker::Direction::Received,
                &Self::wide(self.by_qos),
                &Self::wide(self.payload_by_qos),
            );
        }
        *self = SentCount::default();
    }
}

/// Whether `p` fits in `max` bytes, after dropping the optional properties
/// MQTT 5 tells a server to leave out rather than exceed the client's
/// Maximum Packet Size (see [`Packet::strip_optional_properties`]).
pub(super) fn fit_control_packet(p: &mut Packet, protocol: Protocol, max: usize) -> bool {
    let fits = |p: &Packet| encoded_len(p, protocol).is_ok_and(|n| n <= max);
    fits(p) || (p.strip_optional_properties() && fits(p))
}
