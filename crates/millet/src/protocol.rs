//! One connection's MQTT state machine (EMQX calls it the "channel").
//!
//! Sans-IO: the driver feeds it decoded packets ([`Connection::handle_packet`]),
//! decode errors ([`Connection::handle_decode_error`]) and timer expiries
//! ([`Connection::handle_timeout`]), each with `now`; it asks for bytes to
//! write ([`Connection::poll_transmit`]), the next deadline
//! ([`Connection::poll_timeout`]) and whether to close ([`Connection::poll_close`]).
//! When the socket is gone the driver calls [`Connection::handle_closed`] once.
//!
//! Call order per wake-up: `handle_*` for every input, then `poll_transmit`
//! (which also drains the session queue), then `poll_close`, then
//! `poll_timeout` to re-arm the timer.
//!
//! Owns: protocol version, keep-alive, topic aliases both ways, the client's
//! receive maximum and maximum packet size, the pending AUTH exchange, and the
//! control packets waiting to be written. Session state (in-flight, queue,
//! QoS 2 ids, subscriptions) lives in [`crate::session`]; routing in
//! [`crate::broker`].

use std::collections::VecDeque;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::BytesMut;
use bytestring::ByteString;
use millet_codec::{
    encode, encoded_len, topic, Auth, AuthProperties, ConnAck, ConnAckProperties, Connect,
    DecodeError, Disconnect, DisconnectProperties, Packet, Protocol, PubResp, Publish,
    PublishProperties, QoS, ReasonCode, SubAck, Subscribe, UnsubAck, Unsubscribe,
};

use crate::alias::{InAliases, OutAlias, OutAliases};
use crate::auth::{AuthExchange, AuthStep};
use crate::broker::{Attached, Broker, SubscribeOutcome};
use crate::engine::{
    AckStatus, AttachRequest, Completion, Request, SubscribeRequest, Ticket, UnsubscribeRequest,
};
use crate::security::acl::{Access, Rule};
use crate::security::quota::{ClientLimiter, ExceededAction, QuotaDecision};
use crate::security::V3DenyAction;
use crate::session::{ConnWaker, Delivery, InflightState, Message, SessionCell, Subscription};

pub mod error;
use error::Notice;
pub use error::ProtocolError;

/// The driver's decision on a CONNECT (authentication chain, bans, per-user
/// connection limit), given to [`Connection::set_connect_verdict`] before the
/// CONNECT itself. Without one the client is accepted as it presents itself
/// (anonymous; the state-machine tests rely on this).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ConnectVerdict {
    /// `SUCCESS` to accept; otherwise the (v5) CONNACK reason code, mapped
    /// for 3.x clients: 0x86 bad user name or password (3.x: 4), 0x87 not
    /// authorized (5), 0x8A banned (5), 0x97 quota exceeded (5).
    pub reason: ReasonCode,
    /// The effective username (possibly the client certificate's identity),
    /// for the ACL's `username` and `%u`.
    pub username: Option<String>,
    /// A replacement client id (the client certificate's identity with
    /// `tls.identity_as = "client_id"`).
    pub client_id: Option<String>,
    /// Per-client ACL rules (JWT claims, HTTP hook), consulted first.
    pub acl: Vec<Rule>,
    /// The credentials expire this long after the CONNECT (a JWT's `exp`):
    /// the connection is then closed with DISCONNECT 0x87 (v5).
    pub valid_for: Option<Duration>,
}

impl ConnectVerdict {
    /// Refuse the CONNECT with `reason`.
    pub fn refuse(reason: ReasonCode) -> ConnectVerdict {
        ConnectVerdict {
            reason,
            ..Default::default()
        }
    }
}

/// Why and how the connection ends.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Close {
    /// Reason code sent in a server DISCONNECT (v5 only), if any.
    pub reason: ReasonCode,
    /// Whether the will is published [MQTT-3.1.2-8] (false after a normal DISCONNECT).
    pub publish_will: bool,
    /// For the log (and the Reason String of a server DISCONNECT).
    pub why: ProtocolError,
}

/// The timers a connection can have (exactly one is armed at a time).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Timer {
    /// CONNECT (or the AUTH exchange) must complete by then.
    Connect(Instant),
    /// No packet from the client by then: keep-alive expired [MQTT-3.1.2-22].
    KeepAlive(Instant),
}

impl Timer {
    pub fn deadline(self) -> Instant {
        match self {
            Timer::Connect(t) | Timer::KeepAlive(t) => t,
        }
    }
}

enum State {
    AwaitConnect,
    /// CONNECT received with an authentication method; AUTH exchange running.
    Authenticating(Box<PendingConnect>),
    /// CONNECT accepted; the engine attaches the session ([`Waiting`]).
    Attaching,
    Connected(Box<Active>),
    Closed,
}

/// Packets a connection holds, in order, while it waits for the engine;
/// one more closes it (0x97). The driver stops reading meanwhile
/// ([`Connection::accepts_packets`]), so only a driver that feeds packets
/// regardless (a test) comes near it.
pub const MAX_HELD_PACKETS: usize = 64;

/// An engine call the connection waits for (see [`crate::engine`]).
struct Waiting {
    /// The request, until the driver takes it ([`Connection::poll_request`]).
    request: Option<Request>,
    /// What the answer completes.
    then: Then,
    /// Packets received meanwhile, handled in order after the answer.
    held: VecDeque<Packet>,
}

enum Then {
    /// CONNACK and the connected state.
    Attach(Box<PendingAttach>),
    /// SUBACK: a code per filter.
    Subscribe { packet_id: u16, codes: Vec<SubCode> },
    /// UNSUBACK.
    Unsubscribe { packet_id: u16 },
}

/// One filter's SUBACK code, while the engine subscribes.
enum SubCode {
    /// Decided by the protocol (not authorized).
    Known(ReasonCode),
    /// Asked of the engine, for this QoS (granted as asked).
    Asked(QoS),
}

/// An accepted CONNECT, while the engine attaches its session.
struct PendingAttach {
    connect: Box<Connect>,
    client_id: ByteString,
    props: ConnAckProperties,
    auth_data: Option<bytes::Bytes>,
    keep_alive: u16,
    expiry: u32,
    grant: ConnectVerdict,
}

struct PendingConnect {
    connect: Box<Connect>,
    exchange: Box<dyn AuthExchange>,
}

struct Active {
    client_id: ByteString,
    cell: Arc<SessionCell>,
    epoch: u64,
    keep_alive: Option<Duration>,
    alias_in: InAliases,
    alias_in_max: u16,
    alias_out: OutAliases,
    /// Outgoing QoS 1/2 window: min(client receive maximum, server max_inflight).
    send_window: usize,
    /// Resend the in-flight window (DUP) before anything else.
    resend: bool,
    /// Session expiry granted at CONNECT (a DISCONNECT may not raise it from 0).
    session_expiry: u32,
    auth_method: Option<ByteString>,
    reauth: Option<Box<dyn AuthExchange>>,
    /// Effective username, for the ACL.
    username: Option<ByteString>,
    /// Per-client ACL rules from the authentication provider.
    acl: Vec<Rule>,
    /// Incoming message / byte rate limit (`[security.quota]`).
    limiter: Option<Box<ClientLimiter>>,
    /// When the credentials expire (a JWT's `exp`): closed then.
    auth_deadline: Option<Instant>,
    /// A bridge (protocol level 0x83 / 0x84): its subscriptions get No Local
    /// and Retain As Published.
    bridge: bool,
}

/// Credentials valid longer than this (a JWT `exp` far in the future) are
/// treated as valid this long: the deadline stays representable.
const MAX_CREDENTIAL_VALIDITY: Duration = Duration::from_secs(100 * 365 * 24 * 3600);

/// Longest a publisher is held back by a congested session before it is
/// read again (breaks cycles of connections that hold each other back).
const MAX_BACKPRESSURE_PAUSE: Duration = Duration::from_secs(1);

/// Queued messages encoded by one [`Connection::poll_transmit`] call, in
/// bytes: the rest waits for the next call (the connection wakes itself), so
/// a long queue (a replay of 100,000 retained messages) is written in slices
/// between which the task yields to the others on its thread.
const TRANSMIT_SLICE: usize = 256 * 1024;

pub struct Connection {
    broker: Arc<Broker>,
    state: State,
    protocol: Option<Protocol>,
    /// Control packets (acks, CONNACK, SUBACK, ...) waiting to be written.
    out: VecDeque<Packet>,
    close: Option<Close>,
    timer: Option<Timer>,
    last_recv: Instant,
    /// Session expiry set by the client's v5 DISCONNECT.
    disconnect_expiry: Option<u32>,
    waker: Arc<ConnWaker>,
    /// CONNACK 0x00 has been queued: errors from now on are DISCONNECTs.
    accepted: bool,
    /// A session this client publishes to is congested: stop reading from
    /// the client until every congested session drained to half its
    /// threshold (back-pressure through TCP), or until this deadline, which
    /// breaks a cycle of publishers that hold each other back.
    paused_until: Option<Instant>,
    /// Verdict on the CONNECT, from the driver (see [`ConnectVerdict`]).
    verdict: Option<Box<ConnectVerdict>>,
    /// Rate limit in back-pressure mode: not read from until then.
    throttle_until: Option<Instant>,
    /// PUBACK / PUBREC held until the store sequence they depend on is
    /// durable; released in order [MQTT-4.6.0-2].
    pending_acks: VecDeque<(Ticket, Packet)>,
    /// Largest packet the client accepts (its v5 Maximum Packet Size).
    peer_max_packet: usize,
    /// A packet too big for the client has been discarded and logged.
    warned_oversize: bool,
    /// Packets received since the counts were last added to `$SYS`.
    received: SentCount,
    /// The session this connection is attached to, and its epoch: kept apart
    /// from `state` (which is moved out while a packet is handled) so that
    /// [`Connection::handle_closed`] detaches the session even when handling
    /// a packet panicked.
    attached: Option<(Arc<SessionCell>, u64)>,
    /// See [`Connection::ack_blocked_since`].
    ack_blocked_since: Option<Instant>,
    /// The engine call waited for, if any.
    waiting: Option<Box<Waiting>>,
}

impl Connection {
    pub fn new(broker: Arc<Broker>, now: Instant) -> Connection {
        let timeout = Duration::from_secs(broker.config.limits.connect_timeout.max(1));
        Connection {
            broker,
            state: State::AwaitConnect,
            protocol: None,
            out: VecDeque::new(),
            close: None,
            timer: Some(Timer::Connect(now + timeout)),
            last_recv: now,
            disconnect_expiry: None,
            waker: Arc::new(ConnWaker::default()),
            accepted: false,
            paused_until: None,
            pending_acks: VecDeque::new(),
            verdict: None,
            throttle_until: None,
            peer_max_packet: usize::MAX,
            warned_oversize: false,
            received: SentCount::default(),
            attached: None,
            ack_blocked_since: None,
            waiting: None,
        }
    }

    // ---- getters -------------------------------------------------------

    /// The negotiated protocol (None before CONNECT), for the decoder.
    pub fn protocol(&self) -> Option<Protocol> {
        self.protocol
    }

    /// Largest packet accepted from the client, for the decoder: until the
    /// CONNECT is accepted, at most `limits.max_connect_packet_size`, so an
    /// unauthenticated client cannot make us buffer a large packet.
    pub fn max_packet_size(&self) -> usize {
        let l = &self.broker.config.limits;
        if self.accepted {
            l.max_packet_size as usize
        } else {
            l.max_packet_size.min(l.max_connect_packet_size) as usize
        }
    }

    /// True while the driver must not read from the client (back-pressure).
    /// Cleared by the next wake-up of [`Connection::waker`].
    pub fn is_paused(&self) -> bool {
        (self.paused_until.is_some() && self.waker.is_blocked()) || self.throttle_until.is_some()
    }

    /// Before parking: the session gives back the capacity of its empty
    /// queues (see [`crate::session::Session::release_idle_memory`]).
    pub fn release_session_memory(&self) {
        if let State::Connected(a) = &self.state {
            let mut st = a.cell.state.lock();
            st.session.release_idle_memory();
            if st.blocked.is_empty() && st.blocked.capacity() > 0 {
                st.blocked = Vec::new();
            }
        }
    }

    /// Connected with nothing in progress: not closing, nothing waiting to
    /// be written or acknowledged, no pause, throttle, re-authentication or
    /// credential deadline: the only deadline left is the keep-alive
    /// ([`Connection::poll_timeout`]). The driver may then park the
    /// connection until the client sends, the session has news or that
    /// deadline comes.
    pub fn is_idle(&self) -> bool {
        let quiet_state = match &self.state {
            State::Connected(a) => a.auth_deadline.is_none() && a.reauth.is_none(),
            _ => false,
        };
        quiet_state
            && self.close.is_none()
            && self.out.is_empty()
            && self.pending_acks.is_empty()
            && self.paused_until.is_none()
            && self.throttle_until.is_none()
            && self.ack_blocked_since.is_none()
            && self.waiting.is_none()
            && !matches!(self.timer, Some(Timer::Connect(_)))
    }

    /// False while the connection waits for the engine: the driver then
    /// leaves the client's bytes unread (they are handled, in order, once
    /// the answer came; see [`Connection::handle_completion`]).
    pub fn accepts_packets(&self) -> bool {
        self.waiting.is_none()
    }

    /// A request for the engine, to be handed to it once
    /// ([`crate::engine::submit`]); its answer comes back through
    /// [`Connection::handle_completion`].
    pub fn poll_request(&mut self) -> Option<Request> {
        self.waiting.as_mut().and_then(|w| w.request.take())
    }

    /// True until a CONNECT was handled: the driver authenticates the next
    /// CONNECT and calls [`Connection::set_connect_verdict`] first.
    pub fn is_awaiting_connect(&self) -> bool {
        matches!(self.state, State::AwaitConnect) && self.close.is_none()
    }

    /// Give back the buffers of packets already written, before the
    /// connection waits: an idle connection should hold no allocation it
    /// does not need (one costs a few hundred bytes; a fleet has millions).
    pub fn release_idle_memory(&mut self) {
        if self.out.is_empty() && self.out.capacity() > 0 {
            self.out = VecDeque::new();
        }
        if self.pending_acks.is_empty() && self.pending_acks.capacity() > 0 {
            self.pending_acks = VecDeque::new();
        }
    }

    /// The verdict on the CONNECT about to be handled.
    pub fn set_connect_verdict(&mut self, v: ConnectVerdict) {
        self.verdict = Some(Box::new(v));
    }

    /// The driver found the client consuming nothing for
    /// [`crate::session::WRITE_BLOCK_GRACE`] (`true`; see
    /// [`Connection::ack_blocked_since`] and the driver's write stall), or
    /// consuming again (`false`). A stalled session no longer holds its
    /// publishers back, and the ones it holds are released.
    pub fn set_consumer_stalled(&mut self, stalled: bool) {
        let State::Connected(a) = &self.state else {
            return;
        };
        let mut st = a.cell.state.lock();
        st.session.set_consumer_stalled(stalled);
        if stalled {
            st.release_blocked();
        }
    }

    /// Since when the client's in-flight window has been full with
    /// messages waiting behind it (it is not acknowledging), as of the last
    /// [`Connection::poll_transmit`].
    pub fn ack_blocked_since(&self) -> Option<Instant> {
        self.ack_blocked_since
    }

    /// The keep alive in force (None before CONNECT or when 0).
    pub fn keep_alive(&self) -> Option<Duration> {
        match &self.state {
            State::Connected(a) => a.keep_alive,
            _ => None,
        }
    }

    /// What the driver waits on for deliveries and kicks.
    pub fn waker(&self) -> &Arc<ConnWaker> {
        &self.waker
    }

    /// The session this connection is attached to and its epoch (for the
    /// admin API's connection details).
    pub fn attached(&self) -> Option<(&Arc<SessionCell>, u64)> {
        self.attached.as_ref().map(|(c, e)| (c, *e))
    }

    pub fn client_id(&self) -> Option<&str> {
        match &self.state {
            State::Connected(a) => Some(&a.client_id),
            _ => None,
        }
    }

    // ---- inputs --------------------------------------------------------

    /// A packet arrived from the client.
    pub fn handle_packet(&mut self, packet: Packet, now: Instant) {
        // Counted here, added to the shared counters once per batch
        // (`poll_transmit`, `handle_closed`): a shared atomic per packet
        // cost about 7% of QoS 0 fan-in.
        self.received.packets += 1;
        if let Packet::Publish(p) = &packet {
            self.received.count_publish(p);
        }
        if self.close.is_some() {
            return;
        }
        self.last_recv = now;
        self.rearm_keepalive(now);
        if let Some(w) = self.waiting.as_mut() {
            if w.held.len() >= MAX_HELD_PACKETS {
                return self.fail(ProtocolError::HeldPacketsExceeded);
            }
            w.held.push_back(packet);
            return;
        }
        self.dispatch(packet, now);
    }

    /// Handle `packet` in the current state (nothing is being waited for).
    fn dispatch(&mut self, packet: Packet, now: Instant) {
        match std::mem::replace(&mut self.state, State::Closed) {
            State::AwaitConnect => match packet {
                Packet::Connect(c) => self.handle_connect(c),
                other => {
                    // [MQTT-3.1.0-1]: the first packet must be CONNECT.
                    self.fail(ProtocolError::PacketBeforeConnect(other.name()));
                }
            },
            State::Authenticating(pending) => match packet {
                Packet::Auth(a) => self.handle_auth_during_connect(pending, a),
                other => {
                    self.fail(ProtocolError::PacketDuringAuth(other.name()));
                }
            },
            State::Connected(mut active) => {
                self.handle_connected(&mut active, packet, now);
                self.state = State::Connected(active);
            }
            State::Attaching => {
                // Not reached: packets are held while attaching.
                self.state = State::Attaching;
                self.fail(ProtocolError::EngineMismatch);
            }
            State::Closed => {}
        }
    }

    /// The engine answered the request taken with
    /// [`Connection::poll_request`]. The packets held meanwhile are handled
    /// now, in order (until one makes the connection wait again).
    pub fn handle_completion(&mut self, completion: Completion, now: Instant) {
        let Some(w) = self.waiting.take() else {
            tracing::error!(?completion, "engine answer with no request outstanding");
            return self.fail(ProtocolError::EngineMismatch);
        };
        let Waiting { then, held, .. } = *w;
        match (then, completion) {
            (Then::Attach(p), Completion::Attached(a)) => {
                if self.close.is_some() || !matches!(self.state, State::Attaching) {
                    // Closed meanwhile (connect timeout, shutdown): the
                    // session is detached with the connection.
                    self.attached = Some((a.cell, a.epoch));
                    return;
                }
                self.handle_attached(p, a, now);
            }
            (Then::Subscribe { packet_id, codes }, Completion::Subscribed(outcomes)) => {
                self.subscribed(packet_id, codes, outcomes);
            }
            (Then::Unsubscribe { packet_id }, Completion::Unsubscribed(existed)) => {
                let codes = existed
                    .into_iter()
                    .map(|e| {
                        if e {
                            ReasonCode::SUCCESS
                        } else {
                            ReasonCode::NO_SUBSCRIPTION_EXISTED
                        }
                    })
                    .collect();
                self.out.push_back(Packet::UnsubAck(UnsubAck {
                    packet_id,
                    properties: Default::default(),
                    reason_codes: codes,
                }));
            }
            (_, completion) => {
                if let Completion::Attached(a) = completion {
                    self.attached = Some((a.cell, a.epoch));
                }
                tracing::error!("engine answer does not match the request");
                return self.fail(ProtocolError::EngineMismatch);
            }
        }
        let mut held = held;
        while self.waiting.is_none() && self.close.is_none() {
            let Some(p) = held.pop_front() else { break };
            self.dispatch(p, now);
        }
        if let Some(w) = self.waiting.as_mut() {
            // Waiting again: what is left stays held, ahead of anything newer.
            held.append(&mut w.held);
            w.held = held;
        }
    }

    /// Wait for the engine: `request` goes to the driver, `then` says what
    /// the answer completes.
    fn wait_for(&mut self, request: Request, then: Then) {
        self.waiting = Some(Box::new(Waiting {
            request: Some(request),
            then,
            held: VecDeque::new(),
        }));
    }

    /// The decoder rejected the client's bytes.
    pub fn handle_decode_error(&mut self, err: &DecodeError) {
        if self.close.is_some() {
            return;
        }
        match (&self.state, err) {
            (State::AwaitConnect, DecodeError::UnsupportedProtocol) => {
                // [MQTT-3.1.2-2]: CONNACK 0x01 / 0x84, then close.
                self.out.push_back(Packet::ConnAck(ConnAck {
                    reason_code: ReasonCode::UNSUPPORTED_PROTOCOL_VERSION,
                    ..Default::default()
                }));
                self.protocol.get_or_insert(Protocol::V3_1_1);
                self.set_close(ProtocolError::UnsupportedProtocolVersion);
            }
            (State::AwaitConnect, _) => {
                self.fail(ProtocolError::BadConnect(Box::new(err.clone())));
            }
            _ => self.fail(ProtocolError::Decode(Box::new(err.clone()))),
        }
    }

    /// The timer returned by [`Connection::poll_timeout`] fired.
    pub fn handle_timeout(&mut self, now: Instant) {
        if self.throttle_until.is_some_and(|t| now >= t) {
            self.throttle_until = None;
        }
        let expired = matches!(&self.state, State::Connected(a)
            if a.auth_deadline.is_some_and(|t| now >= t));
        if expired {
            tracing::info!("credentials expired (JWT exp); closing");
            self.fail(ProtocolError::CredentialsExpired);
        }
        if self.paused_until.is_some_and(|t| now >= t) {
            if self.waker.is_blocked() {
                tracing::debug!(
                    "publisher held back for {MAX_BACKPRESSURE_PAUSE:?}; reading again"
                );
            }
            self.paused_until = None;
        }
        let Some(t) = self.timer else { return };
        if now < t.deadline() {
            return;
        }
        self.timer = None;
        match t {
            Timer::Connect(_) => self.fail(ProtocolError::ConnectTimeout),
            Timer::KeepAlive(_) => self.fail(ProtocolError::KeepAliveTimeout),
        }
    }

    /// The server is shutting down: v5 clients get DISCONNECT 0x8B. The will
    /// is not published (the session would outlive us in a durable store).
    pub fn handle_shutdown(&mut self) {
        if self.close.is_some() {
            return;
        }
        if self.protocol == Some(Protocol::V5) && self.accepted {
            // With a server reference configured the drain redirects clients
            // (0x9C + reference) instead of only announcing the shutdown.
            let (reason_code, server_reference) = match &self.broker.config.server_reference {
                Some(r) => (
                    ReasonCode::USE_ANOTHER_SERVER,
                    Some(ByteString::from(r.as_str())),
                ),
                None => (ReasonCode::SERVER_SHUTTING_DOWN, None),
            };
            self.out.push_back(Packet::Disconnect(Disconnect {
                reason_code,
                properties: DisconnectProperties {
                    server_reference,
                    reason_string: Some(ProtocolError::ServerShuttingDown.reason_string().into()),
                    ..Default::default()
                },
            }));
        }
        self.set_close(ProtocolError::ServerShuttingDown);
    }

    /// The server closes this connection for `why` (a ban added at run
    /// time): v5 gets a DISCONNECT with its reason code; the will is
    /// published as [`ProtocolError::publishes_will`] says (for a ban, as
    /// for any server-initiated close [MQTT-3.1.2-8]).
    pub fn handle_kick(&mut self, why: ProtocolError) {
        self.fail(why);
    }

    /// The network connection is gone (or was closed by us). Tells the broker,
    /// which publishes the will if due and starts the session expiry.
    /// Idempotent, and safe after a panic in another `handle_*` call.
    pub fn handle_closed(&mut self, now: Instant) {
        self.received.add_received_to(&self.broker.stats);
        let publish_will = self.close.as_ref().is_none_or(|c| c.publish_will);
        self.state = State::Closed;
        if let Some((cell, epoch)) = self.attached.take() {
            self.broker
                .disconnect(&cell, epoch, publish_will, self.disconnect_expiry, now);
        }
    }

    // ---- outputs -------------------------------------------------------

    /// Encode everything ready to send into `buf`: control packets first, then
    /// the in-flight window on resume, then queued messages within the
    /// client's receive maximum.
    pub fn poll_transmit(&mut self, now: Instant, buf: &mut BytesMut) {
        self.received.add_received_to(&self.broker.stats);
        let Some(protocol) = self.protocol else {
            return;
        };
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
        sent.add_to(&self.broker.stats);
        if self.close.is_some() {
            return;
        }
        let State::Connected(active) = &mut self.state else {
            return;
        };
        let stats = &self.broker.stats;
        let mut sent = SentCount::default();
        let cell = active.cell.clone();
        self.waker.clear();
        if !self.waker.is_blocked() {
            self.paused_until = None; // every congested session drained
        }
        let mut st = cell.state.lock();
        let session = &mut st.session;
        // Store records mirroring queue → in-flight moves, submitted once at the end.
        let mut writes = self.broker.session_writes(session);
        // QoS 2 PUBLISH held until its in-flight record is durable (and, to
        // keep the order and topic aliases right, everything behind it).
        let mut held: Vec<Packet> = Vec::new();
        // What the held packets wait for.
        let mut hold = Ticket::NONE;
        let max_packet = self.peer_max_packet;
        if active.resend {
            active.resend = false;
            // A resent PUBLISH or PUBREL describes in-flight state the store
            // may not hold yet (moved there just before the client went
            // away): the client must not complete it before that is durable,
            // or a crash would bring the message back from the queue under a
            // new packet id. Resends wait for everything submitted so far.
            if writes.records() {
                let last = self.broker.last_ticket();
                if self.broker.ticket_status(last) == AckStatus::Pending {
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
                        writes.inflight_done(session, pid);
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
            let window_full = session.inflight_len() >= active.send_window;
            let Some(d) = session.pop_queued(now) else {
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
            writes.queue_entry_sent(session, &d);
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
            let hold = writes.holds_deliveries()
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
            if let Some(pid) = pid {
                writes.inflight_added(session, pid, &d);
                session.push_inflight(pid, d);
            }
        }
        self.ack_blocked_since = if ack_blocked {
            Some(self.ack_blocked_since.unwrap_or(now))
        } else {
            None
        };
        let ticket = writes.submit().max(hold);
        if !held.is_empty() {
            self.broker.ticket_wait(ticket, &self.waker);
            self.pending_acks
                .extend(held.into_iter().map(|packet| (ticket, packet)));
        }
        if !st.blocked.is_empty()
            && st.session.queue_len() <= self.broker.config.limits.backpressure_queued / 2
            && st.session.queued_bytes() <= self.broker.config.limits.max_queued_bytes / 4
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
            self.broker.replay_retained(&cell, r, now);
        }
    }

    /// The earliest deadline at which [`Connection::handle_timeout`] must be called.
    pub fn poll_timeout(&self) -> Option<Instant> {
        let auth = match &self.state {
            State::Connected(a) if self.close.is_none() => a.auth_deadline,
            _ => None,
        };
        [
            self.timer.map(Timer::deadline),
            self.throttle_until,
            self.paused_until,
            auth,
        ]
        .into_iter()
        .flatten()
        .min()
    }

    /// `Some` once the connection must close (after writing what
    /// `poll_transmit` produced).
    pub fn poll_close(&self) -> Option<&Close> {
        self.close.as_ref()
    }

    // ---- internals -----------------------------------------------------

    fn rearm_keepalive(&mut self, now: Instant) {
        if let State::Connected(a) = &self.state {
            self.timer = a.keep_alive.map(|k| Timer::KeepAlive(now + k + k / 2));
        }
    }

    /// Decide the close (the first decision stands), with the reason code
    /// and will behaviour of `why`; the client is told nothing here.
    fn set_close(&mut self, why: ProtocolError) {
        if self.close.is_none() {
            self.close = Some(Close {
                reason: why.reason_code_for(self.protocol),
                publish_will: why.publishes_will(),
                why,
            });
        }
    }

    /// Close for `why`, telling the client as [`ProtocolError::notice`]
    /// says: a DISCONNECT (v5, once accepted; 3.x: a plain close), a
    /// CONNACK refusing the CONNECT, or nothing.
    fn fail(&mut self, why: ProtocolError) {
        match why.notice() {
            Notice::Disconnect => {
                if self.close.is_some() {
                    return;
                }
                if self.protocol == Some(Protocol::V5) && self.accepted {
                    self.out
                        .push_back(server_disconnect(why.reason_code(), &why.reason_string()));
                }
                self.set_close(why);
            }
            Notice::ConnAck => {
                let mut properties = ConnAckProperties::default();
                if let ProtocolError::Redirected { reference, .. } = &why {
                    properties.server_reference = Some(ByteString::from(&**reference));
                }
                self.out.push_back(Packet::ConnAck(ConnAck {
                    session_present: false,
                    reason_code: why.reason_code_for(self.protocol),
                    properties,
                }));
                self.set_close(why);
                self.state = State::Closed;
            }
            Notice::Nothing => self.set_close(why),
        }
    }

    fn check_kick(&mut self) {
        let State::Connected(a) = &self.state else {
            return;
        };
        let kick = {
            let mut st = a.cell.state.lock();
            if st.conn_epoch != a.epoch {
                Some(ReasonCode::SESSION_TAKEN_OVER) // [MQTT-3.1.4-3]
            } else {
                st.kick.take()
            }
        };
        if let Some(reason) = kick {
            // Already closing (e.g. a malformed packet in the same wake-up):
            // its own DISCONNECT, if any, is the last packet [MQTT-3.14.4-1].
            // Taken over: the broker detached us. If the session ended, it
            // left our will for `handle_closed` to publish, unless the
            // client's own normal DISCONNECT, possibly still unread, turns
            // up first (see `handle_packet_while_closing`).
            self.fail(if reason == ReasonCode::SESSION_TAKEN_OVER {
                ProtocolError::SessionTakenOver
            } else {
                ProtocolError::Kicked(reason)
            });
        }
    }

    /// Whether the driver should decode what the client still sends after
    /// the close was decided and hand it to
    /// [`Connection::handle_packet_while_closing`] before
    /// [`Connection::handle_closed`]: after a takeover, the old client's
    /// normal DISCONNECT may still be in flight, and it decides on the will.
    pub fn wants_packets_while_closing(&self) -> bool {
        self.attached.is_some()
            && self
                .close
                .as_ref()
                .is_some_and(|c| c.reason == ReasonCode::SESSION_TAKEN_OVER && c.publish_will)
    }

    /// A packet read after the close was decided (see
    /// [`Connection::wants_packets_while_closing`]): only a DISCONNECT counts;
    /// reason 0x00 deletes the will [MQTT-3.1.2-10], [MQTT-3.14.4-3].
    pub fn handle_packet_while_closing(&mut self, packet: &Packet) {
        if let (Packet::Disconnect(d), Some(c)) = (packet, self.close.as_mut()) {
            if c.reason == ReasonCode::SESSION_TAKEN_OVER {
                c.publish_will = d.reason_code != ReasonCode::NORMAL_DISCONNECTION;
            }
        }
    }

    /// The ACL's answer (everything is allowed without a security layer).
    fn acl_allows(
        &self,
        client_id: &str,
        username: Option<&str>,
        extra: &[Rule],
        access: Access,
        topic: &str,
    ) -> bool {
        self.broker
            .security()
            .is_none_or(|s| s.acl.check(client_id, username, extra, access, topic))
    }

    /// A control packet does not fit the client's Maximum Packet Size even
    /// without its optional properties: it is not sent [MQTT-3.1.2-24]. A
    /// client that cannot receive its CONNACK cannot use the connection.
    fn discard_oversized(&mut self, p: &Packet) {
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

    fn handle_connect(&mut self, mut c: Box<Connect>) {
        self.protocol = Some(c.protocol);
        if c.protocol.is_v5() {
            // Applies to every packet from now on, CONNACK included [MQTT-3.1.2-24].
            self.peer_max_packet = c
                .properties
                .maximum_packet_size
                .map_or(usize::MAX, |m| m as usize);
        }
        let mut verdict = self.verdict.take().unwrap_or_else(|| {
            Box::new(ConnectVerdict {
                username: c.username.as_deref().map(str::to_string),
                ..Default::default()
            })
        });
        if let Some(id) = verdict.client_id.take() {
            c.client_id = ByteString::from(id);
        }
        if let Some(reference) = &self.broker.config.server_reference {
            // Server redirection [MQTT-4.11]: v5 learns where to go; 3.x
            // only hears "server unavailable".
            let why = ProtocolError::Redirected {
                reference: reference.as_str().into(),
                moved: self.broker.config.server_moved,
            };
            return self.fail(why);
        }
        let limits = &self.broker.config.limits;
        if self.broker.stats.clients_connected.load(Ordering::Relaxed) as usize
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
                || w.topic.split('/').count() > limits.max_topic_levels
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
            if !self.acl_allows(
                &c.client_id,
                verdict.username.as_deref(),
                &verdict.acl,
                Access::Publish,
                &w.topic,
            ) {
                tracing::info!(client_id = %c.client_id, topic = %w.topic, "will topic not authorized");
                return self.fail(ProtocolError::WillTopicNotAuthorized);
            }
        }
        self.verdict = Some(verdict);
        if let Some(method) = &c.properties.authentication_method {
            let client_id = c.client_id.to_string();
            let exchange = self
                .broker
                .authenticator()
                .and_then(|a| a.start(method, &client_id));
            let Some(mut exchange) = exchange else {
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

    fn auth_step(&mut self, pending: Box<PendingConnect>, step: AuthStep) {
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
            AuthStep::Failure => self.fail(ProtocolError::AuthenticationFailed),
        }
    }

    fn handle_auth_during_connect(&mut self, mut pending: Box<PendingConnect>, a: Auth) {
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

    fn accept(&mut self, c: Box<Connect>, auth_data: Option<bytes::Bytes>) {
        let grant = *self.verdict.take().unwrap_or_default();
        let limits = self.broker.config.limits.clone();
        let v5 = c.protocol.is_v5();
        let mut props = ConnAckProperties::default();
        let client_id: ByteString = if c.client_id.is_empty() {
            let id = self.broker.assign_client_id();
            if v5 {
                props.assigned_client_identifier = Some(id.clone()); // [MQTT-3.2.2-16]
            }
            id
        } else {
            // Copied: a slice would pin the whole read chunk for the life of the session.
            ByteString::from(&*c.client_id)
        };
        if let Err(refusal) = self.broker.admit_session(&client_id) {
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
            client_id: client_id.clone(),
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
                client_id,
                props,
                auth_data,
                keep_alive,
                expiry,
                grant,
            })),
        );
    }

    /// The engine attached the session: CONNACK, and the connected state.
    fn handle_attached(&mut self, p: Box<PendingAttach>, attached: Attached, now: Instant) {
        let PendingAttach {
            connect: c,
            client_id,
            mut props,
            auth_data,
            keep_alive,
            expiry,
            grant,
        } = *p;
        let limits = self.broker.config.limits.clone();
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
            client_id,
            cell: attached.cell.clone(),
            epoch: attached.epoch,
            keep_alive: (keep_alive > 0).then(|| Duration::from_secs(u64::from(keep_alive))),
            alias_in: InAliases::default(),
            alias_in_max: if v5 { limits.topic_alias_max } else { 0 },
            alias_out: OutAliases::new(if v5 {
                c.properties.topic_alias_maximum.unwrap_or(0)
            } else {
                0
            }),
            send_window: usize::from(client_receive_max.min(limits.max_inflight)),
            resend: attached.session_present,
            session_expiry: expiry,
            auth_method: c.properties.authentication_method.clone(),
            reauth: None,
            username: grant.username.map(ByteString::from),
            acl: grant.acl,
            // Checked: a validly signed token may carry any `exp`.
            auth_deadline: grant
                .valid_for
                .and_then(|d| now.checked_add(d.min(MAX_CREDENTIAL_VALIDITY))),
            limiter: self
                .broker
                .security()
                .map(|s| ClientLimiter::new(&s.config.quota, now))
                .filter(ClientLimiter::is_limited)
                .map(Box::new),
            bridge: c.bridge,
        };
        tracing::debug!(client_id = %active.client_id, protocol = ?c.protocol, session_present = attached.session_present, "client connected");
        self.state = State::Connected(Box::new(active));
        self.rearm_keepalive(now);
        if !self.timer.is_some_and(|t| matches!(t, Timer::KeepAlive(_))) {
            self.timer = None;
        }
    }

    fn handle_connected(&mut self, a: &mut Active, packet: Packet, now: Instant) {
        let v5 = self.protocol == Some(Protocol::V5);
        match packet {
            Packet::Publish(p) => self.handle_publish(a, p, now),
            Packet::PubAck(r) => {
                let mut st = a.cell.state.lock();
                if st.session.handle_puback(r.packet_id) {
                    let mut w = self.broker.session_writes(&st.session);
                    w.inflight_done(&st.session, r.packet_id);
                    w.submit();
                } else {
                    tracing::debug!(packet_id = r.packet_id, "PUBACK for unknown packet id");
                }
            }
            Packet::PubRec(r) => {
                let (known, ticket) = {
                    let mut st = a.cell.state.lock();
                    let known = st
                        .session
                        .handle_pubrec(r.packet_id, r.reason_code.is_error());
                    let ticket = if known {
                        self.persist_pubrec(&mut st.session, r.packet_id, r.reason_code.is_error())
                    } else {
                        Ticket::NONE
                    };
                    (known, ticket)
                };
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
                let known = {
                    let mut st = a.cell.state.lock();
                    let known = st.session.awaiting_rel.remove(&r.packet_id);
                    if known {
                        let mut w = self.broker.session_writes(&st.session);
                        w.awaiting_rel_done(&st.session, r.packet_id);
                        w.submit();
                    }
                    known
                };
                let reason = if known || !v5 {
                    ReasonCode::SUCCESS
                } else {
                    ReasonCode::PACKET_IDENTIFIER_NOT_FOUND
                };
                self.out
                    .push_back(Packet::PubComp(PubResp::with_reason(r.packet_id, reason)));
            }
            Packet::PubComp(r) => {
                let mut st = a.cell.state.lock();
                if st.session.handle_pubcomp(r.packet_id) {
                    let mut w = self.broker.session_writes(&st.session);
                    w.inflight_done(&st.session, r.packet_id);
                    w.submit();
                }
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
                        Some(e.min(self.broker.config.limits.max_session_expiry));
                }
                // The will is published unless the reason is 0x00 [MQTT-3.14.4-3].
                self.set_close(ProtocolError::ClientDisconnect(d.reason_code));
            }
            Packet::Auth(x) => self.handle_reauth(a, x),
            Packet::Connect(_) => self.fail(ProtocolError::SecondConnect), // [MQTT-3.1.0-2]
            other => self.fail(ProtocolError::UnexpectedPacket(other.name())),
        }
    }

    fn handle_publish(&mut self, a: &mut Active, mut p: Publish, now: Instant) {
        let v5 = self.protocol == Some(Protocol::V5);
        let limits = &self.broker.config.limits;
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
            || p.topic.split('/').count() > limits.max_topic_levels
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
        if self.broker.injected_panic(&p.topic) {
            // Test hook (never set outside tests): a connection task that
            // panics must still detach its session.
            panic!("injected panic on PUBLISH to {}", p.topic);
        }
        if let Some(limiter) = a.limiter.as_mut() {
            let size = p.payload.len() + p.topic.len();
            if let QuotaDecision::Exceeded { retry_after } = limiter.check_publish(size, now) {
                let backpressure = self
                    .broker
                    .security()
                    .is_some_and(|s| s.config.quota.on_exceeded == ExceededAction::Backpressure);
                if !backpressure {
                    tracing::info!(client_id = %a.client_id, "message rate quota exceeded; disconnecting");
                    return self.fail(ProtocolError::MessageRateTooHigh);
                }
                // Accept this one, then stop reading until the bucket refills.
                self.throttle_until = Some(now + retry_after);
            }
        }
        if !self.acl_allows(
            &a.client_id,
            a.username.as_deref(),
            &a.acl,
            Access::Publish,
            &p.topic,
        ) {
            return self.publish_denied(a, &p);
        }
        let qos = p.qos;
        let pid = p.packet_id.unwrap_or(0);
        let mut rel_ticket = Ticket::NONE;
        let receive_maximum = usize::from(limits.receive_maximum);
        if qos != QoS::AtMostOnce && !self.admit_publish(a, &p) {
            return;
        }
        if qos == QoS::ExactlyOnce {
            let mut st = a.cell.state.lock();
            if st.session.awaiting_rel.contains(&pid) {
                // A resend of a message we already have: acknowledge, don't
                // deliver twice [MQTT-4.3.3-10].
                drop(st);
                self.queue_ack(Ticket::NONE, Packet::PubRec(PubResp::new(pid)));
                return;
            }
            if st.session.awaiting_rel.len() >= receive_maximum {
                drop(st);
                return self.fail(ProtocolError::ReceiveMaximumExceeded);
            }
            st.session.awaiting_rel.insert(pid);
            let mut w = self.broker.session_writes(&st.session);
            w.awaiting_rel_added(&st.session, pid);
            rel_ticket = w.submit();
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
            publisher_client_id: a.client_id.clone(),
            store_id: Default::default(),
        };
        let routed = self.broker.publish(Arc::new(msg), Some(&self.waker), now);
        if routed.congested && self.paused_until.is_none() {
            self.paused_until = Some(now + MAX_BACKPRESSURE_PAUSE);
        }
        let rc = if routed.sessions == 0 && v5 {
            ReasonCode::NO_MATCHING_SUBSCRIBERS
        } else {
            ReasonCode::SUCCESS
        };
        // Acknowledged only once durable (group commit) [issue: durable by default].
        let ticket = routed.ticket.max(rel_ticket);
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
    fn admit_publish(&mut self, a: &Active, p: &Publish) -> bool {
        let v5 = self.protocol == Some(Protocol::V5);
        let deleting = p.retain && p.payload.is_empty();
        if p.qos == QoS::ExactlyOnce
            && a.cell
                .state
                .lock()
                .session
                .awaiting_rel
                .contains(&p.packet_id.unwrap_or(0))
        {
            return true; // a resend: acknowledged again below
        }
        let full = !deleting && self.broker.memory_pressure() == crate::budget::Pressure::Full;
        if full {
            self.broker
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
                .broker
                .retained_admits(&p.topic, (p.topic.len() + p.payload.len()) as u64)
        {
            self.broker
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
    fn refuse_publish(&mut self, p: &Publish) {
        let pid = p.packet_id.unwrap_or(0);
        let rc = ReasonCode::QUOTA_EXCEEDED;
        let ack = match p.qos {
            QoS::ExactlyOnce => Packet::PubRec(PubResp::with_reason(pid, rc)),
            _ => Packet::PubAck(PubResp::with_reason(pid, rc)),
        };
        self.queue_ack(Ticket::NONE, ack);
    }

    /// PUBREC received: the stored entry moves to "awaiting PUBCOMP" (or is
    /// dropped when the PUBREC carried an error). Returns the ticket the
    /// PUBREL must wait for.
    fn persist_pubrec(
        &self,
        session: &mut crate::session::Session,
        packet_id: u16,
        is_error: bool,
    ) -> Ticket {
        let mut w = self.broker.session_writes(session);
        if is_error {
            w.inflight_done(session, packet_id);
            w.submit();
            return Ticket::NONE;
        }
        w.inflight_released(session, packet_id);
        w.submit()
    }

    /// Queue a PUBACK / PUBREC that may go out once `ticket` is done
    /// (none: nothing to wait for, but stay behind earlier held acks).
    fn queue_ack(&mut self, ticket: Ticket, ack: Packet) {
        if ticket.is_none() && self.pending_acks.is_empty() {
            self.out.push_back(ack);
            return;
        }
        self.pending_acks.push_back((ticket, ack));
        if self.broker.acks_early() {
            // Decided now (refused only while the store is failing).
            self.release_acks();
        } else {
            self.broker.ticket_wait(ticket, &self.waker);
        }
    }

    /// Move held acknowledgements whose writes completed to `out`; a failed
    /// write turns the ack into a refusal (v5 0x97 quota exceeded on a full
    /// disk, 0x80 otherwise; 3.x has no negative ack, so the connection is
    /// closed and the client will resend).
    fn release_acks(&mut self) {
        while let Some((ticket, _)) = self.pending_acks.front() {
            let status = self.broker.ticket_status(*ticket);
            if status == AckStatus::Pending {
                break;
            }
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
    fn publish_refused(&mut self, a: &Active, p: &Publish, rc: ReasonCode) {
        tracing::debug!(client_id = %a.client_id, topic = %p.topic, reason = %rc, "PUBLISH to a reserved topic refused");
        self.ack_unrouted(p, rc);
    }

    /// Acknowledge a PUBLISH that is not routed: v5 PUBACK / PUBREC with
    /// `v5_rc`, 3.x with success (no negative ack there); QoS 0: nothing.
    /// An error PUBREC ends the v5 exchange; a 3.x client's PUBREL for an id
    /// we don't hold is still answered with PUBCOMP.
    fn ack_unrouted(&mut self, p: &Publish, v5_rc: ReasonCode) {
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
    fn publish_denied(&mut self, a: &Active, p: &Publish) {
        let v5 = self.protocol == Some(Protocol::V5);
        tracing::debug!(client_id = %a.client_id, topic = %p.topic, "PUBLISH not authorized");
        let disconnect = !v5
            && self
                .broker
                .security()
                .is_some_and(|s| s.config.acl.v3_deny_action == V3DenyAction::Disconnect);
        if disconnect {
            let topic = (*p.topic).into();
            return self.fail(ProtocolError::PublishNotAuthorized { topic });
        }
        self.ack_unrouted(p, ReasonCode::NOT_AUTHORIZED);
    }

    fn handle_subscribe(&mut self, a: &mut Active, s: Subscribe) {
        let mut codes = Vec::with_capacity(s.filters.len());
        let mut asked = Vec::with_capacity(s.filters.len());
        for (filter, options) in &s.filters {
            let mut options = *options;
            if !self.acl_allows(
                &a.client_id,
                a.username.as_deref(),
                &a.acl,
                Access::Subscribe,
                filter,
            ) {
                // 0x87; the 3.x encoder turns any failure into 0x80.
                tracing::debug!(client_id = %a.client_id, %filter, "SUBSCRIBE not authorized");
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
            codes.push(SubCode::Asked(options.qos));
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
    fn subscribed_now(&mut self, then: Then) {
        if let Then::Subscribe { packet_id, codes } = then {
            self.subscribed(packet_id, codes, Vec::new());
        }
    }

    /// The engine's outcomes for a SUBSCRIBE: SUBACK [MQTT-3.8.4-1].
    fn subscribed(&mut self, packet_id: u16, codes: Vec<SubCode>, outcomes: Vec<SubscribeOutcome>) {
        let mut outcomes = outcomes.into_iter();
        let mut reason_codes = Vec::with_capacity(codes.len());
        for code in codes {
            let rc = match code {
                SubCode::Known(rc) => rc,
                SubCode::Asked(qos) => match outcomes.next() {
                    Some(SubscribeOutcome::Granted { .. }) => ReasonCode(qos as u8),
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

    fn handle_unsubscribe(&mut self, a: &mut Active, u: Unsubscribe) {
        let request = Request::Unsubscribe(UnsubscribeRequest {
            cell: a.cell.clone(),
            filters: u.filters,
        });
        self.wait_for(
            request,
            Then::Unsubscribe {
                packet_id: u.packet_id,
            },
        );
    }

    /// Re-authentication (v5 AUTH 0x19 after CONNACK), section 4.12.1.
    fn handle_reauth(&mut self, a: &mut Active, x: Auth) {
        if a.auth_method.is_none() || x.properties.authentication_method != a.auth_method {
            // [MQTT-4.12.0-7] / [MQTT-4.12.1-1]
            return self.fail(ProtocolError::AuthMethodMismatch);
        }
        if x.reason_code == ReasonCode::REAUTHENTICATE {
            // The connection's identity (the ACL's username) is fixed at
            // CONNECT: re-authenticating as someone else is refused rather
            // than silently keeping the old user's rights.
            if a.auth_method.as_deref() == Some(crate::security::scram::SCRAM_SHA_256) {
                let user = x
                    .properties
                    .authentication_data
                    .as_deref()
                    .and_then(crate::security::scram::client_first_username);
                if user.as_deref() != a.username.as_deref() {
                    return self.fail(ProtocolError::ReauthDifferentUser);
                }
            }
            let method = a.auth_method.clone().unwrap_or_default();
            a.reauth = self
                .broker
                .authenticator()
                .and_then(|au| au.start(&method, &a.client_id));
        } else if x.reason_code != ReasonCode::CONTINUE_AUTHENTICATION || a.reauth.is_none() {
            return self.fail(ProtocolError::UnexpectedAuthReasonCode);
        }
        let Some(ex) = a.reauth.as_mut() else {
            return self.fail(ProtocolError::ReauthRefused);
        };
        match ex.step(x.properties.authentication_data.as_deref()) {
            AuthStep::Continue(data) => self.out.push_back(Packet::Auth(Auth {
                reason_code: ReasonCode::CONTINUE_AUTHENTICATION,
                properties: AuthProperties {
                    authentication_method: a.auth_method.clone(),
                    authentication_data: Some(data),
                    ..Default::default()
                },
            })),
            AuthStep::Success(data) => {
                a.reauth = None;
                self.out.push_back(Packet::Auth(Auth {
                    reason_code: ReasonCode::SUCCESS,
                    properties: AuthProperties {
                        authentication_method: a.auth_method.clone(),
                        authentication_data: data,
                        ..Default::default()
                    },
                }));
            }
            AuthStep::Failure => {
                a.reauth = None;
                self.fail(ProtocolError::ReauthFailed);
            }
        }
    }
}

impl Active {
    /// Build the PUBLISH for a delivery: QoS as downgraded, message expiry
    /// decremented [MQTT-3.3.2-6], subscription identifiers, outbound alias.
    fn publish_packet(
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

/// A DISCONNECT from the server, with a Reason String: besides helping
/// whoever reads it, the property makes the reason code readable to clients
/// that only parse it when properties follow (paho-mqtt 2.1 reads the reason
/// code of a DISCONNECT only when its remaining length is over 2; rumqttc
/// cannot decode the short form either). It is left out when the client's
/// Maximum Packet Size is too small (see `fit_control_packet`).
fn server_disconnect(reason: ReasonCode, why: &str) -> Packet {
    Packet::Disconnect(Disconnect {
        reason_code: reason,
        properties: DisconnectProperties {
            reason_string: Some(ByteString::from(why)),
            ..Default::default()
        },
    })
}

/// Topics no client may publish to, with the v5 reason code of the refusal:
/// `$SYS/...` belongs to the broker (0x87 not authorized, as Mosquitto does;
/// except `$SYS/broker/connection/{name}/state`, where a Mosquitto bridge
/// publishes its own status, which Mosquitto allows too), and `$share/...` is
/// a subscription syntax, not a topic name (0x90 topic name invalid).
pub fn reserved_topic(topic: &str) -> Option<ReasonCode> {
    if topic.starts_with(topic::SHARE_PREFIX) {
        return Some(ReasonCode::TOPIC_NAME_INVALID);
    }
    if topic == "$SYS" || topic.starts_with("$SYS/") {
        let bridge_state = topic
            .strip_prefix("$SYS/broker/connection/")
            .and_then(|rest| rest.strip_suffix("/state"))
            .is_some_and(|name| !name.is_empty() && !name.contains('/'));
        if !bridge_state {
            return Some(ReasonCode::NOT_AUTHORIZED);
        }
    }
    None
}

/// Packets encoded by one [`Connection::poll_transmit`], added to the
/// broker's `$SYS` counters once (not per packet: they are shared by every
/// connection).
#[derive(Default)]
struct SentCount {
    packets: u64,
    publishes: u64,
    /// PUBLISH packets and payload bytes by QoS (for `/metrics`).
    by_qos: [u64; 3],
    payload_by_qos: [u64; 3],
}

impl SentCount {
    fn encode(
        &mut self,
        p: &Packet,
        protocol: Protocol,
        buf: &mut BytesMut,
    ) -> Result<(), millet_codec::EncodeError> {
        encode(p, protocol, buf)?;
        self.packets += 1;
        if let Packet::Publish(p) = p {
            self.count_publish(p);
        }
        Ok(())
    }

    fn count_publish(&mut self, p: &millet_codec::Publish) {
        let q = p.qos as usize;
        self.publishes += 1;
        if let (Some(n), Some(b)) = (self.by_qos.get_mut(q), self.payload_by_qos.get_mut(q)) {
            *n += 1;
            *b += p.payload.len() as u64;
        }
    }

    fn add_to(&mut self, stats: &crate::broker::Stats) {
        if self.packets > 0 {
            stats
                .messages_sent
                .fetch_add(self.packets, Ordering::Relaxed);
        }
        if self.publishes > 0 {
            stats
                .publish_sent
                .fetch_add(self.publishes, Ordering::Relaxed);
            stats.by_qos.add(
                crate::broker::Direction::Sent,
                &self.by_qos,
                &self.payload_by_qos,
            );
        }
        *self = SentCount::default();
    }

    /// Packets received from the client (the same counts, other counters).
    fn add_received_to(&mut self, stats: &crate::broker::Stats) {
        if self.packets > 0 {
            stats
                .messages_received
                .fetch_add(self.packets, Ordering::Relaxed);
        }
        if self.publishes > 0 {
            stats
                .publish_received
                .fetch_add(self.publishes, Ordering::Relaxed);
            stats.by_qos.add(
                crate::broker::Direction::Received,
                &self.by_qos,
                &self.payload_by_qos,
            );
        }
        *self = SentCount::default();
    }
}

/// A copy of the will that shares no memory with the read buffer (it may be
/// kept for the whole session).
fn detach_will(w: &millet_codec::LastWill) -> millet_codec::LastWill {
    let mut w = w.clone();
    w.topic = ByteString::from(&*w.topic);
    w.payload = bytes::Bytes::copy_from_slice(&w.payload);
    w
}

/// Whether `p` fits in `max` bytes, after dropping the optional properties
/// MQTT 5 tells a server to leave out rather than exceed the client's
/// Maximum Packet Size (see [`Packet::strip_optional_properties`]).
fn fit_control_packet(p: &mut Packet, protocol: Protocol, max: usize) -> bool {
    let fits = |p: &Packet| encoded_len(p, protocol).is_ok_and(|n| n <= max);
    fits(p) || (p.strip_optional_properties() && fits(p))
}
