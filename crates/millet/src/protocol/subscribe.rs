//! SUBSCRIBE and UNSUBSCRIBE: authorization and the protocol's own checks
//! here, then a request to the engine; SUBACK / UNSUBACK once it answered.

use super::*;

impl Connection {
    pub(super) fn handle_subscribe(&mut self, a: &mut Active, s: Subscribe) {
        let mut verdicts = Vec::with_capacity(s.filters.len());
        let mut ask = Vec::new();
        for (filter, _) in &s.filters {
            let v = self.authorize_now(
                a.client_id(),
                a.username().map(|u| &**u),
                a.acl(),
                Access::Subscribe,
                filter,
            );
            if v == Authorization::Ask {
                ask.push(filter.clone());
            }
            verdicts.push(v);
        }
        if ask.is_empty() {
            return self.subscribe_authorized(a, s, &verdicts);
        }
        let request = AuthorizeRequest {
            client_id: a.client_id().clone(),
            username: a.username().cloned(),
            rules: a.acl().to_vec(),
            access: Access::Subscribe,
            topics: ask,
        };
        self.wait_for(
            Request::Authorize(Box::new(request)),
            Then::SubscribeAuthorized {
                subscribe: Box::new(s),
                verdicts,
            },
        );
    }

    /// A SUBSCRIBE whose filters the hooks answered for (`verdicts`, one
    /// per filter, none [`Authorization::Ask`]): the protocol's checks, then
    /// the engine.
    pub(super) fn subscribe_authorized(
        &mut self,
        a: &mut Active,
        s: Subscribe,
        verdicts: &[Authorization],
    ) {
        let mut codes = Vec::with_capacity(s.filters.len());
        let mut asked = Vec::with_capacity(s.filters.len());
        for ((filter, options), verdict) in s.filters.iter().zip(verdicts) {
            let mut options = *options;
            if *verdict != Authorization::Allow {
                // 0x87; the 3.x encoder turns any failure into 0x80.
                tracing::debug!(client_id = %a.client_id(), %filter, "SUBSCRIBE not authorized");
                codes.push(SubCode::Known(ReasonCode::NOT_AUTHORIZED));
                continue;
            }
            let share_group = match topic::parse_shared(filter) {
                Ok(Some(sf)) => Some(ByteString::from(sf.group)),
                _ => None,
            };
            if share_group.is_some() && options.no_local {
                // [MQTT-3.8.3-4]: a protocol error, before anything is subscribed.
                return self.fail(ProtocolError::NoLocalOnSharedSubscription);
            }
            if a.bridge && share_group.is_none() {
                // Bridge semantics (as Mosquitto and EMQX give a 0x83 / 0x84
                // client): what the bridge publishes is not sent back to it,
                // and retained messages keep their retain flag, so the other
                // broker can store them too.
                options.no_local = true;
                options.retain_as_published = true;
            }
            let sub = Subscription {
                options,
                identifier: s.subscription_identifier,
                share_group,
            };
            codes.push(SubCode::Asked(options.qos, filter.clone()));
            asked.push((filter.clone(), sub));
        }
        let then = Then::Subscribe {
            packet_id: s.packet_id,
            codes,
        };
        if asked.is_empty() {
            return self.subscribed_now(then);
        }
        let request = Request::Subscribe(SubscribeRequest {
            cell: a.cell.clone(),
            filters: asked,
        });
        self.wait_for(request, then);
    }

    /// A SUBSCRIBE refused for every filter: SUBACK without the engine.
    pub(super) fn subscribed_now(&mut self, then: Then) {
        if let Then::Subscribe { packet_id, codes } = then {
            self.subscribed(packet_id, codes, Vec::new());
        }
    }

    /// The engine's outcomes for a SUBSCRIBE: SUBACK [MQTT-3.8.4-1].
    pub(super) fn subscribed(
        &mut self,
        packet_id: u16,
        codes: Vec<SubCode>,
        outcomes: Vec<SubscribeOutcome>,
    ) {
        let mut outcomes = outcomes.into_iter();
        let mut reason_codes = Vec::with_capacity(codes.len());
        for code in codes {
            let rc = match code {
                SubCode::Known(rc) => rc,
                SubCode::Asked(qos, filter) => match outcomes.next() {
                    Some(SubscribeOutcome::Granted { .. }) => {
                        if let Some(client_id) = self.client_id() {
                            self.shared.tell(|| Event::Subscribed {
                                client_id,
                                filter: &filter,
                                qos,
                            });
                        }
                        ReasonCode(qos as u8)
                    }
                    Some(SubscribeOutcome::Refused(ReasonCode::PROTOCOL_ERROR)) => {
                        return self.fail(ProtocolError::NoLocalOnSharedSubscription);
                    }
                    Some(SubscribeOutcome::Refused(rc)) => rc,
                    None => {
                        tracing::error!("engine answered fewer outcomes than filters");
                        return self.fail(ProtocolError::EngineMismatch);
                    }
                },
            };
            reason_codes.push(rc);
        }
        self.out.push_back(Packet::SubAck(SubAck {
            packet_id,
            properties: Default::default(),
            reason_codes,
        }));
    }

    pub(super) fn handle_unsubscribe(&mut self, a: &mut Active, u: Unsubscribe) {
        // Kept for the hooks' events only when they observe (no copy otherwise).
        let filters = if self.shared.observes {
            u.filters.clone()
        } else {
            Vec::new()
        };
        let request = Request::Unsubscribe(UnsubscribeRequest {
            cell: a.cell.clone(),
            filters: u.filters,
        });
        self.wait_for(
            request,
            Then::Unsubscribe {
                packet_id: u.packet_id,
                filters,
            },
        );
    }
}
