//! What the client sends once connected: PUBLISH (aliases, limits, ACL,
//! quotas, the QoS 2 ids awaiting PUBREL, routing) and the acknowledgements
//! of our deliveries; PUBACK / PUBREC held until their durability ticket is
//! done, released in order [MQTT-4.6.0-2].
//!
//! Owns `Connection::pending_acks`.

use super::*;

impl Connection {
    pub(super) fn handle_connected(&mut self, a: &mut Active, packet: Packet, now: Instant) {
        let v5 = self.protocol == Some(Protocol::V5);
        match packet {
            Packet::Publish(p) => self.handle_publish(a, p, now),
            Packet::PubAck(r) => {
                let ack = SessionAck::PubAck(r.packet_id);
                if !self.shared.engine.acknowledge(&a.cell, ack).known {
                    tracing::debug!(packet_id = r.packet_id, "PUBACK for unknown packet id");
                }
            }
            Packet::PubRec(r) => {
                let ack = SessionAck::PubRec {
                    packet_id: r.packet_id,
                    refused: r.reason_code.is_error(),
                };
                let Acknowledged { known, ticket } = self.shared.engine.acknowledge(&a.cell, ack);
                if !r.reason_code.is_error() {
                    let reason = if known || !v5 {
                        ReasonCode::SUCCESS
                    } else {
                        ReasonCode::PACKET_IDENTIFIER_NOT_FOUND
                    };
                    // PUBREL only once "awaiting PUBCOMP" is durable: the client
                    // forgets the packet id when it answers, so a crash that
                    // brought back "awaiting PUBREC" would make us resend the
                    // PUBLISH and deliver it twice.
                    self.queue_ack(
                        ticket,
                        Packet::PubRel(PubResp::with_reason(r.packet_id, reason)),
                    );
                }
            }
            Packet::PubRel(r) => {
                let ack = SessionAck::PubRel(r.packet_id);
                let Acknowledged { known, ticket } = self.shared.engine.acknowledge(&a.cell, ack);
                let reason = if known || !v5 {
                    ReasonCode::SUCCESS
                } else {
                    ReasonCode::PACKET_IDENTIFIER_NOT_FOUND
                };
                // PUBCOMP only once the release is durable: the client may
                // reuse the packet id for a new message once it has it, and
                // a crash that brought back "awaiting PUBREL" would take
                // that message for a resend and never deliver it.
                self.queue_ack(
                    ticket,
                    Packet::PubComp(PubResp::with_reason(r.packet_id, reason)),
                );
            }
            Packet::PubComp(r) => {
                let ack = SessionAck::PubComp(r.packet_id);
                self.shared.engine.acknowledge(&a.cell, ack);
            }
            Packet::Subscribe(s) => self.handle_subscribe(a, s),
            Packet::Unsubscribe(u) => self.handle_unsubscribe(a, u),
            Packet::PingReq => self.out.push_back(Packet::PingResp),
            Packet::Disconnect(d) => {
                if let Some(e) = d.properties.session_expiry_interval {
                    if a.session_expiry == 0 && e != 0 {
                        // [MQTT-3.14.2-2]
                        return self.fail(ProtocolError::SessionExpiryRaised);
                    }
                    self.disconnect_expiry =
                        Some(e.min(self.shared.node.config.limits.max_session_expiry));
                }
                // The will is published unless the reason is 0x00 [MQTT-3.14.4-3].
                self.set_close(ProtocolError::ClientDisconnect(d.reason_code));
            }
            Packet::Auth(x) => self.handle_reauth(a, x),
            Packet::Connect(_) => self.fail(ProtocolError::SecondConnect), // [MQTT-3.1.0-2]
            other => self.fail(ProtocolError::UnexpectedPacket(other.name())),
        }
    }

    pub(super) fn handle_publish(&mut self, a: &mut Active, mut p: Publish, now: Instant) {
        let v5 = self.protocol == Some(Protocol::V5);
        let limits = &self.shared.node.config.limits;
        if let Some(alias) = p.properties.topic_alias.take() {
            if alias == 0 || alias > a.alias_in_max {
                return self.fail(ProtocolError::TopicAliasInvalid { alias });
            }
            if p.topic.is_empty() {
                match a.alias_in.get(alias) {
                    Some(t) => p.topic = t.clone(),
                    None => return self.fail(ProtocolError::TopicAliasUnknown { alias }),
                }
            } else {
                // Stored as a copy: not a slice pinning the read buffer.
                a.alias_in.set(alias, &p.topic);
            }
        }
        if p.topic.is_empty() || !topic::valid_topic_name(&p.topic) {
            return self.fail(ProtocolError::TopicNameInvalid);
        }
        if !p.properties.subscription_identifiers.is_empty() {
            return self.fail(ProtocolError::PublishWithSubscriptionId);
            // [MQTT-3.3.4-6]
        }
        if p.topic.len() > limits.max_topic_length
            || millet_codec::topic::topic_levels(&p.topic) > limits.max_topic_levels
        {
            if v5 && p.qos != QoS::AtMostOnce {
                let rc = ReasonCode::TOPIC_NAME_INVALID;
                let pid = p.packet_id.unwrap_or(1);
                self.out.push_back(match p.qos {
                    QoS::AtLeastOnce => Packet::PubAck(PubResp::with_reason(pid, rc)),
                    _ => Packet::PubRec(PubResp::with_reason(pid, rc)),
                });
                return;
            }
            return self.fail(ProtocolError::TopicExceedsLimits);
        }
        if let Some(rc) = reserved_topic(&p.topic) {
            return self.publish_refused(a, &p, rc);
        }
        if self.shared.node.injected_panic(&p.topic) {
            // Test hook (never set outside tests): a connection task that
            // panics must still detach its session.
            panic!("injected panic on PUBLISH to {}", p.topic);
        }
        if let Some(limiter) = a.limiter.as_mut() {
            let size = p.payload.len() + p.topic.len();
            if let QuotaDecision::Exceeded { retry_after } = limiter.check_publish(size, now) {
                let backpressure =
                    self.shared.node.security().is_some_and(|s| {
                        s.config.quota.on_exceeded == ExceededAction::Backpressure
                    });
                if !backpressure {
                    tracing::info!(client_id = %a.client_id(), "message rate quota exceeded; disconnecting");
                    return self.fail(ProtocolError::MessageRateTooHigh);
                }
                // Accept this one, then stop reading until the bucket refills.
                self.timers.set(Timer::Throttle, Some(now + retry_after));
            }
        }
        match self.authorize_now(
            a.client_id(),
            a.username().map(|u| &**u),
            a.acl(),
            Access::Publish,
            &p.topic,
        ) {
            Authorization::Allow => self.publish_authorized(a, p, now),
            Authorization::Deny => self.publish_denied(a, &p),
            Authorization::Ask => {
                let request = AuthorizeRequest {
                    client_id: a.client_id().clone(),
                    username: a.username().cloned(),
                    rules: a.acl().to_vec(),
                    access: Access::Publish,
                    topics: vec![p.topic.clone()],
                };
                self.wait_for(
                    Request::Authorize(Box::new(request)),
                    Then::Publish(Box::new(p)),
                );
            }
        }
    }

    /// An authorized PUBLISH: overload checks, the QoS 2 id, routing through
    /// the engine, and its acknowledgement once durable. Inlined: the
    /// `Publish` is not copied again on the way (measured with callgrind).
    #[inline(always)]
    pub(super) fn publish_authorized(&mut self, a: &mut Active, p: Publish, now: Instant) {
        let v5 = self.protocol == Some(Protocol::V5);
        let limits = &self.shared.node.config.limits;
        let qos = p.qos;
        let pid = p.packet_id.unwrap_or(0);
        let mut rel_ticket = Ticket::NONE;
        let receive_maximum = usize::from(limits.receive_maximum);
        if qos != QoS::AtMostOnce && !self.admit_publish(a, &p) {
            return;
        }
        if qos == QoS::ExactlyOnce {
            match self
                .shared
                .engine
                .qos2_arrived(&a.cell, pid, receive_maximum)
            {
                Qos2Arrival::New(ticket) => rel_ticket = ticket,
                Qos2Arrival::Resent => {
                    // A resend of a message we already have: acknowledge,
                    // don't deliver twice [MQTT-4.3.3-10].
                    self.queue_ack(Ticket::NONE, Packet::PubRec(PubResp::new(pid)));
                    return;
                }
                Qos2Arrival::Full => return self.fail(ProtocolError::ReceiveMaximumExceeded),
            }
        }
        let expires_at = p
            .properties
            .message_expiry_interval
            .map(|s| now + Duration::from_secs(u64::from(s)));
        let msg = Message {
            topic: p.topic,
            payload: p.payload,
            qos,
            retain: p.retain,
            properties: p.properties,
            expires_at,
            publisher: Some(a.cell.id),
            publisher_client_id: a.client_id().clone(),
            engine_id: Default::default(),
            routed_at: self.shared.node.stats.latency_stamp(now),
        };
        let msg = Arc::new(msg);
        let told = self.shared.observes.then(|| msg.clone());
        let routed = self.shared.engine.publish(msg, Some(&self.waker), now);
        if let Some(msg) = &told {
            self.shared.hooks.event(&Event::Published {
                client_id: a.client_id(),
                msg,
                sessions: routed.sessions,
            });
        }
        if routed.congested && !self.timers.is_armed(Timer::Pause) {
            self.timers
                .set(Timer::Pause, Some(now + MAX_BACKPRESSURE_PAUSE));
        }
        let rc = if routed.sessions == 0 && !routed.forwarded && v5 {
            ReasonCode::NO_MATCHING_SUBSCRIBERS
        } else {
            ReasonCode::SUCCESS
        };
        // Acknowledged only once durable (group commit) [issue: durable by default].
        let ticket = self.shared.engine.join_tickets(routed.ticket, rel_ticket);
        match qos {
            QoS::AtMostOnce => {}
            QoS::AtLeastOnce => {
                self.queue_ack(ticket, Packet::PubAck(PubResp::with_reason(pid, rc)))
            }
            QoS::ExactlyOnce => {
                self.queue_ack(ticket, Packet::PubRec(PubResp::with_reason(pid, rc)))
            }
        }
    }

    /// Overload protection for an inbound QoS 1/2 PUBLISH (not a resend of
    /// a QoS 2 message we hold): at the memory budget, or a new retained
    /// topic beyond the retained caps (v5 only: 3.x gets the message routed,
    /// not retained), it is refused. v5: PUBACK / PUBREC 0x97. 3.x has no
    /// negative acknowledgement and we never acknowledge a message we drop:
    /// the publisher is disconnected (it resends after reconnecting).
    pub(super) fn admit_publish(&mut self, a: &Active, p: &Publish) -> bool {
        let v5 = self.protocol == Some(Protocol::V5);
        let deleting = p.retain && p.payload.is_empty();
        if p.qos == QoS::ExactlyOnce
            && self
                .shared
                .engine
                .qos2_awaiting(&a.cell, p.packet_id.unwrap_or(0))
        {
            return true; // a resend: acknowledged again below
        }
        let full = !deleting && self.shared.node.memory_pressure() == crate::budget::Pressure::Full;
        if full {
            self.shared
                .node
                .overload
                .publish_refused_memory
                .fetch_add(1, Ordering::Relaxed);
            if !v5 {
                self.fail(ProtocolError::MemoryBudgetReached);
                return false;
            }
            self.refuse_publish(p);
            return false;
        }
        if v5
            && p.retain
            && !deleting
            && !self
                .shared
                .engine
                .retained_admits(&p.topic, (p.topic.len() + p.payload.len()) as u64)
        {
            self.shared
                .node
                .overload
                .retained_refused
                .fetch_add(1, Ordering::Relaxed);
            self.refuse_publish(p);
            return false;
        }
        true
    }

    /// v5 PUBACK / PUBREC 0x97 for a QoS 1/2 PUBLISH, behind the
    /// acknowledgements still held for earlier ones (they go out in order).
    pub(super) fn refuse_publish(&mut self, p: &Publish) {
        let pid = p.packet_id.unwrap_or(0);
        let rc = ReasonCode::QUOTA_EXCEEDED;
        let ack = match p.qos {
            QoS::ExactlyOnce => Packet::PubRec(PubResp::with_reason(pid, rc)),
            _ => Packet::PubAck(PubResp::with_reason(pid, rc)),
        };
        self.queue_ack(Ticket::NONE, ack);
    }

    /// Queue a PUBACK / PUBREC that may go out once `ticket` is done
    /// (none: nothing to wait for, but stay behind earlier held acks).
    pub(super) fn queue_ack(&mut self, ticket: Ticket, ack: Packet) {
        if ticket.is_none() && self.pending_acks.is_empty() {
            self.out.push_back(ack);
            return;
        }
        self.pending_acks.push_back((ticket, ack));
        if self.shared.engine.acks_early() {
            // Decided now (refused only while the store is failing)...
            self.release_acks();
            if self.pending_acks.is_empty() {
                return;
            }
            // ...unless the engine has a part of its own to wait for (the
            // cluster's JetStream store).
        }
        self.shared.engine.ticket_wait(ticket, &self.waker);
    }

    /// Move held acknowledgements whose writes completed to `out`; a failed
    /// write turns the ack into a refusal (v5 0x97 quota exceeded on a full
    /// disk, 0x80 otherwise; 3.x has no negative ack, so the connection is
    /// closed and the client will resend).
    pub(super) fn release_acks(&mut self) {
        // Packets held together share their ticket; an engine may forget a
        // ticket once it told it is done (the cluster's do), so it is asked
        // once per run of equal tickets.
        let mut last: Option<(Ticket, AckStatus)> = None;
        while let Some((ticket, _)) = self.pending_acks.front() {
            let status = match last {
                Some((t, s)) if t == *ticket => s,
                _ => self.shared.engine.ticket_status(*ticket),
            };
            if status == AckStatus::Pending {
                break;
            }
            last = Some((*ticket, status));
            let Some((_, mut ack)) = self.pending_acks.pop_front() else {
                break;
            };
            if let AckStatus::Failed { out_of_space } = status {
                if self.protocol != Some(Protocol::V5) {
                    self.pending_acks.clear();
                    self.fail(ProtocolError::StoreWriteFailed);
                    return;
                }
                let rc = if out_of_space {
                    ReasonCode::QUOTA_EXCEEDED
                } else {
                    ReasonCode::UNSPECIFIED_ERROR
                };
                if let Packet::PubAck(r) | Packet::PubRec(r) = &mut ack {
                    r.reason_code = rc;
                }
            }
            self.out.push_back(ack);
        }
    }

    /// A PUBLISH to a reserved topic (see [`reserved_topic`]): not routed.
    /// v5: PUBACK / PUBREC with `rc` (QoS 0: dropped); 3.x: dropped but
    /// acknowledged, like the ACL's default `v3_deny_action = "drop"`.
    pub(super) fn publish_refused(&mut self, a: &Active, p: &Publish, rc: ReasonCode) {
        tracing::debug!(client_id = %a.client_id(), topic = %p.topic, reason = %rc, "PUBLISH to a reserved topic refused");
        self.ack_unrouted(p, rc);
    }

    /// Acknowledge a PUBLISH that is not routed: v5 PUBACK / PUBREC with
    /// `v5_rc`, 3.x with success (no negative ack there); QoS 0: nothing.
    /// An error PUBREC ends the v5 exchange; a 3.x client's PUBREL for an id
    /// we don't hold is still answered with PUBCOMP.
    pub(super) fn ack_unrouted(&mut self, p: &Publish, v5_rc: ReasonCode) {
        let rc = if self.protocol == Some(Protocol::V5) {
            v5_rc
        } else {
            ReasonCode::SUCCESS
        };
        let pid = p.packet_id.unwrap_or(0);
        match p.qos {
            QoS::AtMostOnce => {}
            QoS::AtLeastOnce => self
                .out
                .push_back(Packet::PubAck(PubResp::with_reason(pid, rc))),
            QoS::ExactlyOnce => self
                .out
                .push_back(Packet::PubRec(PubResp::with_reason(pid, rc))),
        }
    }

    /// A PUBLISH the ACL refuses: not routed. v5: PUBACK / PUBREC 0x87 (QoS
    /// 0: dropped). 3.x: per `acl.v3_deny_action`, dropped but still
    /// acknowledged (so the client does not resend it forever), or closed.
    pub(super) fn publish_denied(&mut self, a: &Active, p: &Publish) {
        let v5 = self.protocol == Some(Protocol::V5);
        tracing::debug!(client_id = %a.client_id(), topic = %p.topic, "PUBLISH not authorized");
        let disconnect = !v5
            && self
                .shared
                .node
                .security()
                .is_some_and(|s| s.config.acl.v3_deny_action == V3DenyAction::Disconnect);
        if disconnect {
            let topic = (*p.topic).into();
            return self.fail(ProtocolError::PublishNotAuthorized { topic });
        }
        self.ack_unrouted(p, ReasonCode::NOT_AUTHORIZED);
    }
}
