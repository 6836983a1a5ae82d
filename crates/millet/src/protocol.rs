//! One connection's MQTT state machine (EMQX calls it the "channel").
//!
//! Sans-IO: the driver feeds it decoded packets ([`Connection::handle_packet`]),
//! decode errors ([`Connection::handle_decode_error`]) and timer expiries
//! ([`Connection::handle_timeout`]), each with `now`; it asks for bytes to
//! write ([`Connection::poll_transmit`]), the next deadline
//! ([`Connection::poll_timeout`]) and whether to close ([`Connection::poll_close`]).
//! When the socket is gone the driver calls [`Connection::handle_closed`]
//! and hands the [`Request::Detach`] it then yields to the engine.
//!
//! What may cross a network is asked of the engine ([`crate::engine`]): the
//! driver takes the request with [`Connection::poll_request`], and the
//! answer comes back through [`Connection::handle_completion`]; meanwhile the
//! connection takes no packet ([`Connection::accepts_packets`]).
//!
//! Call order per wake-up: `handle_*` for every input (submitting requests
//! as they come), then `poll_transmit` (which also drains the session
//! queue), then `poll_close`, then `poll_timeout` to re-arm the timer.
//!
//! Owns: protocol version, the state (awaiting CONNECT, authenticating,
//! attaching, connected, closed), every deadline ([`Timer`]), the engine
//! call waited for and the packets held meanwhile, topic aliases both ways,
//! the client's receive maximum and maximum packet size, the pending AUTH
//! exchange. Session state (in-flight, queue, QoS 2 ids, subscriptions)
//! lives in [`crate::session`]; routing in [`crate::broker`].
//!
//! Files, by what they handle: `connect.rs` (CONNECT, AUTH, attaching),
//! `inbound.rs` (PUBLISH from the client and acknowledgements),
//! `subscribe.rs` (SUBSCRIBE, UNSUBSCRIBE), `outbound.rs` (what is written
//! to the client), `error.rs` (every way a connection ends, and its reason
//! code); this file: the state, the inputs and the timers.

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
use crate::broker::{Attached, SubscribeOutcome};
use crate::engine::{
    AckStatus, Acknowledged, AttachRequest, AuthenticateRequest, Completion, DetachRequest,
    Qos2Arrival, Request, SessionAck, SubscribeRequest, Ticket, UnsubscribeRequest,
};
use crate::hooks::{Authorization, AuthorizeRequest, Client, Event, Hooks};
use crate::node::Node;
use crate::security::acl::{Access, Rule};
use crate::security::quota::{ClientLimiter, ExceededAction, QuotaDecision};
use crate::security::V3DenyAction;
use crate::session::{ConnWaker, Delivery, InflightState, Message, SessionCell, Subscription};
use crate::stamp::Stamp;

// The connection's packet queues come from a per-thread pool.
crate::lazy::recycled!(Packet);
crate::lazy::recycled!((Ticket, Packet));

mod connect;
pub mod error;
mod inbound;
mod outbound;
use outbound::SentCount;
mod subscribe;
use error::Notice;
pub use error::ProtocolError;

/// The authentication hooks' decision on a CONNECT (chain, bans, per-user
/// connection limit): the answer to [`Request::Authenticate`]
/// ([`Completion::Verdict`]). Without hooks the client is accepted as it
/// presents itself ([`crate::engine::AuthenticateRequest::as_presented`]).
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
    /// Held for the life of the connection (a per-user connection slot).
    pub hold: Held,
}

/// Something the hooks hold for the life of a connection (released when
/// the connection's state is dropped), opaque to the protocol. A thin
/// pointer: every connected client's state carries one, mostly empty.
#[derive(Clone, Default)]
pub struct Held(Option<Arc<Box<dyn std::any::Any + Send + Sync>>>);

impl Held {
    pub fn new<T: std::any::Any + Send + Sync>(t: T) -> Held {
        Held(Some(Arc::new(Box::new(t))))
    }
}

impl std::fmt::Debug for Held {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(if self.0.is_some() {
            "Held(..)"
        } else {
            "Held(none)"
        })
    }
}

impl PartialEq for Held {
    fn eq(&self, other: &Held) -> bool {
        match (&self.0, &other.0) {
            (Some(a), Some(b)) => Arc::ptr_eq(a, b),
            (None, None) => true,
            _ => false,
        }
    }
}

impl Eq for Held {}

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

/// Every deadline a connection can have, each armed or not in [`Timers`];
/// [`Connection::poll_timeout`] is the earliest armed one and
/// [`Connection::handle_timeout`] acts on those due.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Timer {
    /// CONNECT (the AUTH exchange, the engine's attach) must complete by
    /// then (`limits.connect_timeout`). Never armed with `KeepAlive`.
    Connect = 0,
    /// No packet from the client by then: keep-alive expired [MQTT-3.1.2-22].
    KeepAlive = 1,
    /// Held back by a congested session (back-pressure) at most until then.
    Pause = 2,
    /// Over its message rate quota (back-pressure mode): not read until then.
    Throttle = 3,
    /// The credentials expire then (a JWT's `exp`): closed with 0x87.
    Credentials = 4,
}

/// The armed deadlines, one slot per [`Timer`].
#[derive(Debug, Default)]
struct Timers([Option<Stamp>; 5]);

impl Timers {
    fn is_armed(&self, t: Timer) -> bool {
        self.0[t as usize].is_some()
    }

    fn set(&mut self, t: Timer, at: Option<Instant>) {
        self.0[t as usize] = at.map(Stamp::from);
    }

    /// Disarm `t` if it is due at `now`; whether it was.
    fn take_due(&mut self, t: Timer, now: Instant) -> bool {
        let due = self.0[t as usize].is_some_and(|d| Stamp::from(now) >= d);
        if due {
            self.0[t as usize] = None;
        }
        due
    }

    /// The earliest armed deadline.
    fn next(&self) -> Option<Stamp> {
        self.0.iter().flatten().min().copied()
    }
}

enum State {
    AwaitConnect,
    /// CONNECT received; the hooks decide on it ([`Waiting`]).
    Verifying,
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
    /// The rest of the CONNECT's handling.
    Verdict(Box<Connect>),
    /// The CONNECT, once the hooks authorized its will's topic.
    Will(Box<Connect>),
    /// The PUBLISH, once the hooks authorized its topic.
    Publish(Box<Publish>),
    /// The SUBSCRIBE, once the hooks answered for the filters they asked
    /// about (one [`Authorization::Ask`] each, in order).
    SubscribeAuthorized {
        subscribe: Box<Subscribe>,
        verdicts: Vec<Authorization>,
    },
    /// CONNACK and the connected state.
    Attach(Box<PendingAttach>),
    /// SUBACK: a code per filter.
    Subscribe { packet_id: u16, codes: Vec<SubCode> },
    /// UNSUBACK (the filters kept only for the hooks' events).
    Unsubscribe {
        packet_id: u16,
        filters: Vec<ByteString>,
    },
}

/// One filter's SUBACK code, while the engine subscribes.
enum SubCode {
    /// Decided by the protocol (not authorized).
    Known(ReasonCode),
    /// Asked of the engine, for this QoS (granted as asked).
    Asked(QoS, ByteString),
}

/// An accepted CONNECT, while the engine attaches its session.
struct PendingAttach {
    connect: Box<Connect>,
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
    cell: Arc<SessionCell>,
    epoch: u64,
    /// Keep alive in force, seconds (0: none).
    keep_alive: u16,
    alias_in: InAliases,
    alias_in_max: u16,
    alias_out: OutAliases,
    /// Outgoing QoS 1/2 window: min(client receive maximum, server max_inflight).
    send_window: u16,
    /// Resend the in-flight window (DUP) before anything else.
    resend: bool,
    /// Session expiry granted at CONNECT (a DISCONNECT may not raise it from 0).
    session_expiry: u32,
    /// Enhanced authentication (v5): its method, and a re-authentication
    /// under way. Boxed: most connections have none.
    auth: Option<Box<Reauth>>,
    /// Effective username and per-client ACL rules, for the ACL. Boxed,
    /// and only when there is either: 8 bytes for an anonymous client.
    identity: Option<Box<Identity>>,
    /// What the hooks hold while the connection lives.
    _hold: Held,
    /// Incoming message / byte rate limit (`[security.quota]`).
    limiter: Option<Box<ClientLimiter>>,
    /// A bridge (protocol level 0x83 / 0x84): its subscriptions get No Local
    /// and Retain As Published.
    bridge: bool,
}

/// Who the client is to the ACL (see [`Active::identity`]).
struct Identity {
    username: Option<ByteString>,
    /// Per-client ACL rules from the authentication provider.
    acl: Vec<Rule>,
}

/// A v5 connection's authentication method and its re-authentication.
struct Reauth {
    method: ByteString,
    exchange: Option<Box<dyn AuthExchange>>,
}

impl Active {
    /// The session's client id (assigned, if the client sent none).
    fn client_id(&self) -> &ByteString {
        &self.cell.client_id
    }

    fn new_identity(username: Option<ByteString>, acl: Vec<Rule>) -> Option<Box<Identity>> {
        (username.is_some() || !acl.is_empty()).then(|| Box::new(Identity { username, acl }))
    }

    fn username(&self) -> Option<&ByteString> {
        self.identity.as_ref().and_then(|i| i.username.as_ref())
    }

    fn acl(&self) -> &[Rule] {
        self.identity.as_ref().map_or(&[], |i| &i.acl)
    }

    fn keep_alive(&self) -> Option<Duration> {
        (self.keep_alive > 0).then(|| Duration::from_secs(u64::from(self.keep_alive)))
    }
}

/// Credentials valid longer than this (a JWT `exp` far in the future) are
/// treated as valid this long: the deadline stays representable.
const MAX_CREDENTIAL_VALIDITY: Duration = Duration::from_secs(100 * 365 * 24 * 3600);

/// Longest a publisher is held back by a congested session before it is
/// read again (breaks cycles of connections that hold each other back).
const MAX_BACKPRESSURE_PAUSE: Duration = Duration::from_secs(1);

/// What every connection of a server reaches: its node (configuration,
/// counters, security settings, the memory meter: [`Node`]), the engine
/// its sessions, subscriptions, publishes and durability go through, and
/// the hooks that authorize and observe ([`crate::hooks`]). One per
/// server, shared. The protocol never reaches the broker itself.
pub struct Shared {
    pub node: Arc<Node>,
    pub engine: Arc<dyn crate::engine::Engine>,
    pub hooks: Arc<dyn Hooks>,
    /// `hooks.observes()`, asked once: no event is built otherwise.
    observes: bool,
}

impl Shared {
    pub fn with_hooks(
        node: Arc<Node>,
        engine: Arc<dyn crate::engine::Engine>,
        hooks: Arc<dyn Hooks>,
    ) -> Arc<Shared> {
        let observes = hooks.observes();
        Arc::new(Shared {
            node,
            engine,
            hooks,
            observes,
        })
    }

    /// Tell the hooks `event`, if they observe (built only then).
    #[inline]
    pub(crate) fn tell<'a>(&self, event: impl FnOnce() -> Event<'a>) {
        if self.observes {
            self.hooks.event(&event());
        }
    }
}

pub struct Connection {
    /// One pointer for both (see [`Shared`]): a connection's state stays small.
    shared: Arc<Shared>,
    state: State,
    protocol: Option<Protocol>,
    /// Control packets (acks, CONNACK, SUBACK, ...) waiting to be written.
    out: crate::lazy::LazyDeque<Packet>,
    /// Boxed: set once, when the connection ends (8 bytes until then).
    close: Option<Box<Close>>,
    /// Every deadline (see [`Timer`]).
    timers: Timers,
    /// Session expiry set by the client's v5 DISCONNECT.
    disconnect_expiry: Option<u32>,
    waker: Arc<ConnWaker>,
    /// CONNACK 0x00 has been queued: errors from now on are DISCONNECTs.
    accepted: bool,
    /// A packet was received (the last at `last_recv`) since the
    /// keep-alive deadline was last set.
    keepalive_stale: bool,
    /// Closed ([`Connection::handle_closed`]): the session attached, if
    /// any, is to be detached ([`Connection::poll_request`]).
    detach_due: bool,
    last_recv: Stamp,
    /// Verdict on the CONNECT, from the driver (see [`ConnectVerdict`]).
    verdict: Option<Box<ConnectVerdict>>,
    /// PUBACK / PUBREC held until the store sequence they depend on is
    /// durable; released in order [MQTT-4.6.0-2].
    pending_acks: crate::lazy::LazyDeque<(Ticket, Packet)>,
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
    ack_blocked_since: Option<Stamp>,
    /// The engine call waited for, if any.
    waiting: Option<Box<Waiting>>,
}

impl Connection {
    pub fn new(shared: Arc<Shared>, now: Instant) -> Connection {
        Connection::with_waker(shared, now, Arc::default())
    }

    /// [`Connection::new`] with its waker made beforehand (the event loop
    /// keeps it beside the connection's socket).
    pub fn with_waker(shared: Arc<Shared>, now: Instant, waker: Arc<ConnWaker>) -> Connection {
        let timeout = Duration::from_secs(shared.node.config.limits.connect_timeout.max(1));
        Connection {
            shared,
            state: State::AwaitConnect,
            protocol: None,
            out: crate::lazy::LazyDeque::new(),
            close: None,
            timers: {
                let mut t = Timers::default();
                t.set(Timer::Connect, Some(now + timeout));
                t
            },
            disconnect_expiry: None,
            waker,
            accepted: false,
            keepalive_stale: false,
            detach_due: false,
            last_recv: Stamp::from(now),
            pending_acks: crate::lazy::LazyDeque::new(),
            verdict: None,
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
        let l = &self.shared.node.config.limits;
        if self.accepted {
            l.max_packet_size as usize
        } else {
            l.max_packet_size.min(l.max_connect_packet_size) as usize
        }
    }

    /// True while the driver must not read from the client (back-pressure).
    /// Cleared by the next wake-up of [`Connection::waker`].
    pub fn is_paused(&self) -> bool {
        // A session this client publishes to is congested: not read until
        // every congested session drained to half its threshold
        // (back-pressure through TCP), or until `Timer::Pause`, which breaks
        // a cycle of publishers that hold each other back.
        (self.timers.is_armed(Timer::Pause) && self.waker.is_blocked())
            || self.timers.is_armed(Timer::Throttle)
    }

    /// Before parking: the session gives back the capacity of its empty
    /// queues (see [`crate::session::Session::release_idle_memory`]).
    pub fn release_session_memory(&self) {
        if let State::Connected(a) = &self.state {
            a.cell.release_idle_memory();
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
            State::Connected(a) => a.auth.as_ref().is_none_or(|r| r.exchange.is_none()),
            _ => false,
        };
        quiet_state
            && self.close.is_none()
            && self.out.is_empty()
            && self.pending_acks.is_empty()
            && self.ack_blocked_since.is_none()
            && self.waiting.is_none()
            // Only the keep-alive may be armed.
            && [Timer::Connect, Timer::Pause, Timer::Throttle, Timer::Credentials]
                .iter()
                .all(|t| !self.timers.is_armed(*t))
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
    /// Whether [`Connection::poll_request`] has something (a cheap check
    /// the driver makes after every packet).
    #[inline]
    pub fn has_request(&self) -> bool {
        self.detach_due || self.waiting.as_ref().is_some_and(|w| w.request.is_some())
    }

    pub fn poll_request(&mut self) -> Option<Request> {
        if let Some(r) = self.waiting.as_mut().and_then(|w| w.request.take()) {
            return Some(r);
        }
        if !self.detach_due {
            return None;
        }
        let (cell, epoch) = self.attached.take()?;
        Some(Request::Detach(DetachRequest {
            cell,
            epoch,
            publish_will: self.close.as_ref().is_none_or(|c| c.publish_will),
            expiry_override: self.disconnect_expiry,
        }))
    }

    /// True until a CONNECT arrived.
    pub fn is_awaiting_connect(&self) -> bool {
        matches!(self.state, State::AwaitConnect) && self.close.is_none()
    }

    /// Give back the buffers of packets already written, before the
    /// connection waits: an idle connection should hold no allocation it
    /// does not need (one costs a few hundred bytes; a fleet has millions).
    pub fn release_idle_memory(&mut self) {
        self.out.release();
        self.pending_acks.release();
    }

    /// The driver found the client consuming nothing for
    /// [`crate::session::WRITE_BLOCK_GRACE`] (`true`; see
    /// [`Connection::ack_blocked_since`] and the driver's write stall), or
    /// consuming again (`false`). A stalled session no longer holds its
    /// publishers back, and the ones it holds are released.
    pub fn set_consumer_stalled(&mut self, stalled: bool) {
        if let State::Connected(a) = &self.state {
            a.cell.set_consumer_stalled(stalled);
        }
    }

    /// Since when the client's in-flight window has been full with
    /// messages waiting behind it (it is not acknowledging), as of the last
    /// [`Connection::poll_transmit`].
    pub fn ack_blocked_since(&self) -> Option<Stamp> {
        self.ack_blocked_since
    }

    /// The keep alive in force (None before CONNECT or when 0).
    pub fn keep_alive(&self) -> Option<Duration> {
        match &self.state {
            State::Connected(a) => a.keep_alive(),
            _ => None,
        }
    }

    /// The node this connection belongs to: configuration, counters,
    /// security settings.
    pub fn node(&self) -> &Arc<Node> {
        &self.shared.node
    }

    /// The engine this connection's publishes go to.
    pub fn engine(&self) -> &dyn crate::engine::Engine {
        &*self.shared.engine
    }

    /// The engine, as a handle of its own (for a call that also needs the
    /// connection mutably).
    pub fn engine_handle(&self) -> Arc<dyn crate::engine::Engine> {
        self.shared.engine.clone()
    }

    /// The hooks that answer [`Request::Authorize`].
    pub fn hooks(&self) -> &dyn Hooks {
        &*self.shared.hooks
    }

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
            State::Connected(a) => Some(a.client_id()),
            _ => None,
        }
    }

    // ---- inputs --------------------------------------------------------

    /// A packet arrived from the client.
    pub fn handle_packet(&mut self, packet: Packet, now: Instant) {
        // Counted here, added to the shared counters once per batch
        // (`poll_transmit`, `handle_closed`): a shared atomic per packet
        // cost about 7% of QoS 0 fan-in.
        self.received.count_packet();
        if let Packet::Publish(p) = &packet {
            self.received.count_publish(p);
        }
        if self.close.is_some() {
            return;
        }
        // Re-armed once per turn (poll_transmit / handle_timeout), not per
        // packet: converting the deadline costs more than handling a PING.
        self.keepalive_stale = true;
        self.last_recv = Stamp::from(now);
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
            State::Attaching | State::Verifying => {
                // Not reached: packets are held while waiting.
                self.state = State::Closed;
                self.fail(ProtocolError::EngineMismatch);
            }
            State::Closed => {}
        }
    }

    /// The engine answered the request taken with
    /// [`Connection::poll_request`]. The packets held meanwhile are handled
    /// now, in order (until one makes the connection wait again).
    pub fn handle_completion(&mut self, completion: Completion, now: Instant) {
        if matches!(completion, Completion::Detached) {
            return; // nothing waits for a detach
        }
        let Some(w) = self.waiting.take() else {
            tracing::error!(?completion, "engine answer with no request outstanding");
            return self.fail(ProtocolError::EngineMismatch);
        };
        let Waiting { then, held, .. } = *w;
        match (then, completion) {
            (Then::Verdict(c), Completion::Verdict(v)) => {
                if self.close.is_some() || !matches!(self.state, State::Verifying) {
                    return;
                }
                self.state = State::AwaitConnect;
                self.verdict = Some(v);
                self.handle_verified_connect(c);
            }
            (Then::Attach(p), Completion::Attached(a)) => {
                if self.close.is_some() || !matches!(self.state, State::Attaching) {
                    // Closed meanwhile (connect timeout, shutdown): the
                    // session is detached with the connection.
                    self.attached = Some((a.cell, a.epoch));
                    return;
                }
                self.handle_attached(p, a, now);
            }
            (Then::Attach(_), Completion::Refused(refusal)) => {
                if self.close.is_some() || !matches!(self.state, State::Attaching) {
                    return;
                }
                let why = error::session_refusal_text(refusal);
                tracing::debug!(why, "session refused while attaching");
                self.fail(ProtocolError::SessionRefused(refusal));
            }
            (Then::Will(c), Completion::Authorized(v)) => {
                if self.close.is_some() || !matches!(self.state, State::Verifying) {
                    return;
                }
                self.state = State::AwaitConnect;
                match v.as_slice() {
                    [true] => self.connect_authorized(c),
                    [false] => self.will_not_authorized(&c),
                    _ => return self.hooks_mismatch(),
                }
            }
            (Then::Publish(p), Completion::Authorized(v)) => {
                let allowed = match v.as_slice() {
                    [allowed] => *allowed,
                    _ => return self.hooks_mismatch(),
                };
                self.with_active(|conn, a| {
                    if allowed {
                        conn.publish_authorized(a, *p, now);
                    } else {
                        conn.publish_denied(a, &p);
                    }
                });
            }
            (
                Then::SubscribeAuthorized {
                    subscribe,
                    mut verdicts,
                },
                Completion::Authorized(v),
            ) => {
                let mut answers = v.into_iter();
                for verdict in verdicts.iter_mut().filter(|v| **v == Authorization::Ask) {
                    match answers.next() {
                        Some(allowed) => *verdict = allowed.into(),
                        None => return self.hooks_mismatch(),
                    }
                }
                if answers.next().is_some() {
                    return self.hooks_mismatch();
                }
                self.with_active(|conn, a| conn.subscribe_authorized(a, *subscribe, &verdicts));
            }
            (Then::Subscribe { packet_id, codes }, Completion::Subscribed(outcomes)) => {
                self.subscribed(packet_id, codes, outcomes);
            }
            (Then::Unsubscribe { packet_id, filters }, Completion::Unsubscribed(existed)) => {
                if let Some(client_id) = self.client_id() {
                    for (filter, existed) in filters.iter().zip(&existed) {
                        self.shared.tell(|| Event::Unsubscribed {
                            client_id,
                            filter,
                            existed: *existed,
                        });
                    }
                }
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

    /// The hooks answered an authorization with the wrong number of
    /// verdicts.
    fn hooks_mismatch(&mut self) {
        tracing::error!("hooks answered a different number of authorizations than asked");
        self.fail(ProtocolError::EngineMismatch);
    }

    /// Run `f` on the connected state (taken out of `self.state` meanwhile,
    /// as [`Connection::dispatch`] does); nothing when not connected (closed
    /// while waiting).
    fn with_active(&mut self, f: impl FnOnce(&mut Connection, &mut Active)) {
        if self.close.is_some() {
            return;
        }
        match std::mem::replace(&mut self.state, State::Closed) {
            State::Connected(mut active) => {
                f(self, &mut active);
                self.state = State::Connected(active);
            }
            other => self.state = other,
        }
    }

    /// Wait for the engine (or the hooks): `request` goes to the driver,
    /// `then` says what the answer completes.
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
        if self.keepalive_stale {
            self.rearm_keepalive(self.last_recv);
        }
        self.timers.take_due(Timer::Throttle, now);
        if self.timers.take_due(Timer::Credentials, now) && self.close.is_none() {
            tracing::info!("credentials expired (JWT exp); closing");
            self.fail(ProtocolError::CredentialsExpired);
        }
        if self.timers.take_due(Timer::Pause, now) && self.waker.is_blocked() {
            tracing::debug!("publisher held back for {MAX_BACKPRESSURE_PAUSE:?}; reading again");
        }
        if self.timers.take_due(Timer::Connect, now) {
            self.fail(ProtocolError::ConnectTimeout);
        }
        if self.timers.take_due(Timer::KeepAlive, now) {
            self.fail(ProtocolError::KeepAliveTimeout);
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
            let (reason_code, server_reference) = match &self.shared.node.config.server_reference {
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
    ///
    /// The session is detached through the engine: the next
    /// [`Connection::poll_request`] gives the [`Request::Detach`] (also
    /// after a later call, when an attach answered meanwhile).
    pub fn handle_closed(&mut self, _now: Instant) {
        self.received.add_received_to(&self.shared.node.stats);
        if let State::Connected(a) = &self.state {
            self.shared.tell(|| Event::Disconnected {
                client_id: a.client_id(),
                close: self.close.as_deref(),
            });
        }
        self.state = State::Closed;
        // A request not yet handed to the engine is not made.
        if let Some(w) = self.waiting.as_mut() {
            w.request = None;
        }
        self.detach_due = true;
    }

    // ---- outputs -------------------------------------------------------

    /// The earliest deadline at which [`Connection::handle_timeout`] must be called.
    /// After packets were handled and before the next `poll_transmit`,
    /// the keep-alive deadline may still be the earlier one: a timeout then
    /// only re-arms it.
    pub fn poll_timeout(&self) -> Option<Instant> {
        self.timers.next().map(Stamp::instant)
    }

    /// [`Connection::poll_timeout`] as a [`Stamp`] (what the driver
    /// compares and stores, without converting).
    pub fn poll_deadline(&self) -> Option<Stamp> {
        self.timers.next()
    }

    /// `Some` once the connection must close (after writing what
    /// `poll_transmit` produced).
    pub fn poll_close(&self) -> Option<&Close> {
        self.close.as_deref()
    }

    // ---- internals -----------------------------------------------------

    fn rearm_keepalive(&mut self, last_recv: Stamp) {
        self.keepalive_stale = false;
        if let State::Connected(a) = &self.state {
            let at = a.keep_alive().map(|k| last_recv + (k + k / 2));
            self.timers.0[Timer::KeepAlive as usize] = at;
        }
    }

    /// Decide the close (the first decision stands), with the reason code
    /// and will behaviour of `why`; the client is told nothing here.
    fn set_close(&mut self, why: ProtocolError) {
        if self.close.is_none() {
            self.close = Some(Box::new(Close {
                reason: why.reason_code_for(self.protocol),
                publish_will: why.publishes_will(),
                why,
            }));
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

    /// Act on a takeover or kick signalled to this connection before
    /// handling what the client sent after it (the driver calls this when
    /// the KICK signal is up, ahead of the read packets): a connection
    /// taken over must not answer a PINGREQ the client sent after the new
    /// connection was attached [MQTT-3.1.4-3].
    pub fn check_kick_now(&mut self) {
        self.check_kick();
    }

    fn check_kick(&mut self) {
        let State::Connected(a) = &self.state else {
            return;
        };
        if let Some(reason) = a.cell.take_kick(a.epoch) {
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

    /// The hooks' answer in place, or [`Authorization::Ask`] (see
    /// [`crate::hooks`]).
    fn authorize_now(
        &self,
        client_id: &str,
        username: Option<&str>,
        rules: &[Rule],
        access: Access,
        topic: &str,
    ) -> Authorization {
        let client = Client {
            client_id,
            username,
            rules,
        };
        self.shared.hooks.authorize_now(&client, access, topic)
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

/// Size of the connected state (for the size guard in `server.rs`).
#[cfg(test)]
pub(crate) fn active_size() -> usize {
    std::mem::size_of::<Active>()
}
