//! CONNECT and authentication: the checks on a CONNECT, the enhanced
//! AUTH exchange (at CONNECT and re-authentication), and accepting it: the
//! attach request to the engine, then CONNACK and the connected state.
//!
//! Owns nothing of its own: it moves a connection from `AwaitConnect`
//! through `Authenticating` and `Attaching` to `Connected`.

use super::*;

impl Connection {
    /// A CONNECT: the hooks are asked for their verdict first
    /// ([`Request::Authenticate`]), then [`Connection::handle_verified_connect`].
    pub(super) fn handle_connect(&mut self, c: Box<Connect>) {
        self.protocol = Some(c.protocol);
        if c.protocol.is_v5() {
            // Applies to every packet from now on, CONNACK included [MQTT-3.1.2-24].
            self.peer_max_packet = c
                .properties
                .maximum_packet_size
                .map_or(usize::MAX, |m| m as usize);
        }
        let request = AuthenticateRequest {
            // Copies: the request may outlive the read buffer.
            client_id: ByteString::from(&*c.client_id),
            username: c.username.as_deref().map(ByteString::from),
            password: c.password.as_deref().map(bytes::Bytes::copy_from_slice),
            level: c.protocol.level(),
            clean_start: c.clean_start,
            keep_alive: c.keep_alive,
            authentication_method: c.properties.authentication_method.clone(),
            authentication_data: c.properties.authentication_data.clone(),
        };
        self.state = State::Verifying;
        self.wait_for(Request::Authenticate(Box::new(request)), Then::Verdict(c));
    }

    /// The CONNECT with the hooks' verdict: the protocol's own checks, the
    /// verdict applied, then the AUTH exchange or acceptance.
    pub(super) fn handle_verified_connect(&mut self, mut c: Box<Connect>) {
        let mut verdict = self.verdict.take().unwrap_or_else(|| {
            Box::new(ConnectVerdict {
                username: c.username.as_deref().map(str::to_string),
                ..Default::default()
            })
        });
        if let Some(id) = verdict.client_id.take() {
            c.client_id = ByteString::from(id);
        }
        if let Some(reference) = &self.shared.node.config.server_reference {
            // Server redirection [MQTT-4.11]: v5 learns where to go; 3.x
            // only hears "server unavailable".
            let why = ProtocolError::Redirected {
                reference: reference.as_str().into(),
                moved: self.shared.node.config.server_moved,
            };
            return self.fail(why);
        }
        let limits = &self.shared.node.config.limits;
        if self
            .shared
            .node
            .stats
            .clients_connected
            .load(Ordering::Relaxed) as usize
            >= limits.max_connections
        {
            return self.fail(ProtocolError::MaxConnections);
        }
        if c.client_id.is_empty()
            && (!c.clean_start || c.protocol == Protocol::V3_1)
            && !c.protocol.is_v5()
        {
            // [MQTT-3.1.3-8]: zero-length id requires clean session in 3.1.1.
            return self.fail(ProtocolError::EmptyClientId);
        }
        if let Some(w) = &c.will {
            if !topic::valid_topic_name(&w.topic)
                || w.topic.len() > limits.max_topic_length
                || millet_codec::topic::topic_levels(&w.topic) > limits.max_topic_levels
            {
                return self.fail(ProtocolError::WillTopicInvalid);
            }
            if let Some(code) = reserved_topic(&w.topic) {
                // The will would be a publish to $SYS or $share/: refused
                // like that publish (0x87 / 0x90; 3.x: 5).
                let topic = (*w.topic).into();
                return self.fail(ProtocolError::WillTopicReserved { topic, code });
            }
        }
        if verdict.reason != ReasonCode::SUCCESS {
            return self.fail(ProtocolError::ConnectRefused(verdict.reason));
        }
        if let Some(w) = &c.will {
            // A will the client could not publish itself is refused with the
            // CONNECT (0x87 / 3.x 5) rather than silently dropped later.
            let username = verdict.username.as_deref();
            match self.authorize_now(
                &c.client_id,
                username,
                &verdict.acl,
                Access::Publish,
                &w.topic,
            ) {
                Authorization::Allow => {}
                Authorization::Deny => return self.will_not_authorized(&c),
                Authorization::Ask => {
                    let request = AuthorizeRequest {
                        // Copies: the request may outlive the read buffer.
                        client_id: ByteString::from(&*c.client_id),
                        username: username.map(ByteString::from),
                        rules: verdict.acl.clone(),
                        access: Access::Publish,
                        topics: vec![ByteString::from(&*w.topic)],
                    };
                    self.verdict = Some(verdict);
                    self.state = State::Verifying;
                    return self.wait_for(Request::Authorize(Box::new(request)), Then::Will(c));
                }
            }
        }
        self.verdict = Some(verdict);
        self.connect_authorized(c);
    }

    /// The hooks refused the will's topic: so is the CONNECT.
    pub(super) fn will_not_authorized(&mut self, c: &Connect) {
        if let Some(w) = &c.will {
            tracing::info!(client_id = %c.client_id, topic = %w.topic, "will topic not authorized");
        }
        self.fail(ProtocolError::WillTopicNotAuthorized)
    }

    /// The CONNECT passed every check (its will authorized): the AUTH
    /// exchange, or acceptance.
    pub(super) fn connect_authorized(&mut self, c: Box<Connect>) {
        if let Some(method) = &c.properties.authentication_method {
            let client_id = c.client_id.to_string();
            let exchange = self
                .shared
                .node
                .authenticator()
                .and_then(|a| a.start(method, &client_id));
            let Some(mut exchange) = exchange else {
                self.shared
                    .node
                    .stats
                    .auth_failures
                    .count(crate::broker::AuthFailure::Other);
                let method = (**method).into();
                return self.fail(ProtocolError::BadAuthenticationMethod(method));
            };
            let step = exchange.step(c.properties.authentication_data.as_deref());
            return self.auth_step(
                Box::new(PendingConnect {
                    connect: c,
                    exchange,
                }),
                step,
            );
        }
        self.accept(c, None);
    }

    pub(super) fn auth_step(&mut self, pending: Box<PendingConnect>, step: AuthStep) {
        match step {
            AuthStep::Continue(data) => {
                self.out.push_back(Packet::Auth(Auth {
                    reason_code: ReasonCode::CONTINUE_AUTHENTICATION,
                    properties: AuthProperties {
                        authentication_method: pending
                            .connect
                            .properties
                            .authentication_method
                            .clone(),
                        authentication_data: Some(data),
                        ..Default::default()
                    },
                }));
                self.state = State::Authenticating(pending);
            }
            AuthStep::Success(data) => self.accept(pending.connect, data),
            AuthStep::Failure => {
                self.shared
                    .node
                    .stats
                    .auth_failures
                    .count(crate::broker::AuthFailure::ScramFailed);
                self.fail(ProtocolError::AuthenticationFailed)
            }
        }
    }

    pub(super) fn handle_auth_during_connect(&mut self, mut pending: Box<PendingConnect>, a: Auth) {
        if a.reason_code != ReasonCode::CONTINUE_AUTHENTICATION
            || a.properties.authentication_method
                != pending.connect.properties.authentication_method
        {
            // [MQTT-4.12.0-4]: wrong method or reason is a protocol error.
            self.state = State::Authenticating(pending);
            return self.fail(ProtocolError::InvalidAuthDuringConnect);
        }
        let step = pending
            .exchange
            .step(a.properties.authentication_data.as_deref());
        self.auth_step(pending, step);
    }

    pub(super) fn accept(&mut self, c: Box<Connect>, auth_data: Option<bytes::Bytes>) {
        let grant = *self.verdict.take().unwrap_or_default();
        let limits = self.shared.node.config.limits.clone();
        let v5 = c.protocol.is_v5();
        let mut props = ConnAckProperties::default();
        let client_id: ByteString = if c.client_id.is_empty() {
            let id = self.shared.engine.assign_client_id();
            if v5 {
                props.assigned_client_identifier = Some(id.clone()); // [MQTT-3.2.2-16]
            }
            id
        } else {
            // Copied: a slice would pin the whole read chunk for the life of the session.
            ByteString::from(&*c.client_id)
        };
        if let Err(refusal) = self.shared.engine.admit_session(&client_id) {
            // A new session would take memory the broker does not have, or
            // one more than `max_sessions`: 0x97 (3.x: 3, server unavailable).
            let why = error::session_refusal_text(refusal);
            tracing::debug!(%client_id, why, "new session refused");
            return self.fail(ProtocolError::SessionRefused(refusal));
        }
        let mut keep_alive = c.keep_alive;
        if v5
            && (keep_alive > limits.max_keepalive || (keep_alive == 0 && limits.min_keepalive > 0))
        {
            keep_alive = if keep_alive == 0 {
                limits.min_keepalive
            } else {
                limits.max_keepalive
            };
            props.server_keep_alive = Some(keep_alive); // [MQTT-3.2.2-21]
        }
        let mut expiry = if v5 {
            c.properties.session_expiry_interval.unwrap_or(0)
        } else if c.clean_start {
            0
        } else {
            u32::MAX
        };
        if expiry > limits.max_session_expiry {
            expiry = limits.max_session_expiry;
            if v5 {
                props.session_expiry_interval = Some(expiry);
            }
        }
        let request = AttachRequest {
            client_id,
            clean_start: c.clean_start,
            expiry_interval: expiry,
            will: c.will.as_ref().map(detach_will),
            waker: self.waker.clone(),
        };
        self.state = State::Attaching;
        self.wait_for(
            Request::Attach(Box::new(request)),
            Then::Attach(Box::new(PendingAttach {
                connect: c,
                props,
                auth_data,
                keep_alive,
                expiry,
                grant,
            })),
        );
    }

    /// The engine attached the session: CONNACK, and the connected state.
    pub(super) fn handle_attached(
        &mut self,
        p: Box<PendingAttach>,
        attached: Attached,
        now: Instant,
    ) {
        let PendingAttach {
            connect: c,
            mut props,
            auth_data,
            keep_alive,
            expiry,
            grant,
        } = *p;
        let limits = self.shared.node.config.limits.clone();
        let v5 = c.protocol.is_v5();
        if v5 {
            props.receive_maximum = Some(limits.receive_maximum);
            props.retain_available = Some(true);
            props.maximum_packet_size = Some(limits.max_packet_size);
            props.topic_alias_maximum = Some(limits.topic_alias_max);
            props.wildcard_subscription_available = Some(true);
            props.subscription_identifiers_available = Some(true);
            props.shared_subscription_available = Some(true);
            if auth_data.is_some() || c.properties.authentication_method.is_some() {
                props.authentication_method = c.properties.authentication_method.clone();
                props.authentication_data = auth_data;
            }
        }
        self.accepted = true;
        self.attached = Some((attached.cell.clone(), attached.epoch));
        self.out.push_back(Packet::ConnAck(ConnAck {
            session_present: attached.session_present,
            reason_code: ReasonCode::SUCCESS,
            properties: props,
        }));
        let client_receive_max = c.properties.receive_maximum.unwrap_or(u16::MAX);
        let active = Active {
            cell: attached.cell.clone(),
            epoch: attached.epoch,
            keep_alive,
            alias_in: InAliases::default(),
            alias_in_max: if v5 { limits.topic_alias_max } else { 0 },
            alias_out: OutAliases::new(if v5 {
                c.properties.topic_alias_maximum.unwrap_or(0)
            } else {
                0
            }),
            send_window: client_receive_max.min(limits.max_inflight),
            resend: attached.session_present,
            session_expiry: expiry,
            auth: c.properties.authentication_method.clone().map(|method| {
                Box::new(Reauth {
                    method,
                    exchange: None,
                })
            }),
            identity: Active::new_identity(grant.username.map(ByteString::from), grant.acl),
            _hold: grant.hold,
            limiter: self
                .shared
                .node
                .security()
                .map(|s| ClientLimiter::new(&s.config.quota, now))
                .filter(ClientLimiter::is_limited)
                .map(Box::new),
            bridge: c.bridge,
        };
        tracing::debug!(client_id = %active.client_id(), protocol = ?c.protocol, session_present = attached.session_present, "client connected");
        self.shared.tell(|| Event::Connected {
            client_id: active.client_id(),
            username: active.username().map(|u| &**u),
            session_present: attached.session_present,
        });
        self.state = State::Connected(Box::new(active));
        self.timers.set(Timer::Connect, None);
        self.rearm_keepalive(Stamp::from(now));
        // Checked: a validly signed token may carry any `exp`.
        let expires = grant
            .valid_for
            .and_then(|d| now.checked_add(d.min(MAX_CREDENTIAL_VALIDITY)));
        self.timers.set(Timer::Credentials, expires);
    }

    /// Re-authentication (v5 AUTH 0x19 after CONNACK), section 4.12.1.
    pub(super) fn handle_reauth(&mut self, a: &mut Active, x: Auth) {
        let Some(auth) = a
            .auth
            .as_mut()
            .filter(|r| x.properties.authentication_method.as_ref() == Some(&r.method))
        else {
            // [MQTT-4.12.0-7] / [MQTT-4.12.1-1]
            return self.fail(ProtocolError::AuthMethodMismatch);
        };
        if x.reason_code == ReasonCode::REAUTHENTICATE {
            // The connection's identity (the ACL's username) is fixed at
            // CONNECT: re-authenticating as someone else is refused rather
            // than silently keeping the old user's rights.
            if &*auth.method == crate::security::scram::SCRAM_SHA_256 {
                let user = x
                    .properties
                    .authentication_data
                    .as_deref()
                    .and_then(crate::security::scram::client_first_username);
                let known = a.identity.as_ref().and_then(|i| i.username.as_deref());
                if user.as_deref() != known {
                    return self.fail(ProtocolError::ReauthDifferentUser);
                }
            }
            auth.exchange = self
                .shared
                .node
                .authenticator()
                .and_then(|au| au.start(&auth.method, &a.cell.client_id));
        } else if x.reason_code != ReasonCode::CONTINUE_AUTHENTICATION || auth.exchange.is_none() {
            return self.fail(ProtocolError::UnexpectedAuthReasonCode);
        }
        let Some(ex) = auth.exchange.as_mut() else {
            return self.fail(ProtocolError::ReauthRefused);
        };
        match ex.step(x.properties.authentication_data.as_deref()) {
            AuthStep::Continue(data) => self.out.push_back(Packet::Auth(Auth {
                reason_code: ReasonCode::CONTINUE_AUTHENTICATION,
                properties: AuthProperties {
                    authentication_method: Some(auth.method.clone()),
                    authentication_data: Some(data),
                    ..Default::default()
                },
            })),
            AuthStep::Success(data) => {
                auth.exchange = None;
                self.out.push_back(Packet::Auth(Auth {
                    reason_code: ReasonCode::SUCCESS,
                    properties: AuthProperties {
                        authentication_method: Some(auth.method.clone()),
                        authentication_data: data,
                        ..Default::default()
                    },
                }));
            }
            AuthStep::Failure => {
                auth.exchange = None;
                self.fail(ProtocolError::ReauthFailed);
            }
        }
    }
}

/// A copy of the will that shares no memory with the read buffer (it may be
/// kept for the whole session).
pub(super) fn detach_will(w: &millet_codec::LastWill) -> millet_codec::LastWill {
    let mut w = w.clone();
    w.topic = ByteString::from(&*w.topic);
    w.payload = bytes::Bytes::copy_from_slice(&w.payload);
    w
}
