//! The engine seam: what a connection asks of shared, durable state, answered
//! now or later.
//!
//! The protocol ([`crate::protocol`]) never calls these itself. It states a
//! [`Request`] ([`crate::protocol::Connection::poll_request`]; a
//! [`Request::Authenticate`] goes to the driver's authentication chain and
//! a [`Request::Authorize`] to the hooks ([`crate::hooks`]) rather than to
//! the engine) and waits for its [`Completion`] in an
//! explicit pending state, holding the client's
//! further packets in order; the driver ([`crate::server`], or a test)
//! hands the request to the engine with [`submit`] and feeds the answer back
//! with [`crate::protocol::Connection::handle_completion`]. A call answers
//! either at once ([`Call::Ready`], the embedded engine: no allocation, no
//! wake-up) or later ([`Call::Later`]: a [`Pending`] the driver keeps; the
//! engine fills it and wakes the connection).
//!
//! Engines:
//! - the **embedded** engine is [`crate::broker::Broker`] itself: in-process
//!   routing plus the redb store behind its write-ahead log
//!   ([`crate::broker::persist`]); every call answers at once.
//! - [`delaying::Delaying`] wraps an engine and answers every call after a
//!   seeded random delay: the proof, run in CI, that the protocol waits
//!   correctly for an engine across a network (`[engine] test_delay_ms`).
//! - [`nats::Clustered`]: cluster mode (issue 13, partly built: see
//!   docs/CLUSTER.md), the broker as one node of a cluster joined through
//!   NATS: routing and shared subscriptions across nodes, takeover by an
//!   owner entry in JetStream KV (its attach answers later), QoS 1/2
//!   refused while NATS is unreachable.
//!
//! Publishing is an engine call that answers at once ([`Engine::publish`]):
//! routing to the sessions is local in every engine (a networked one routes
//! to its own node's sessions and forwards the rest), and what may come
//! later is durability. That is a [`Ticket`]: a publish, or the session
//! records a connection writes ([`Engine::session_writes`]), give one, and
//! the acknowledgement waits until the engine says it is done
//! ([`Engine::ticket_status`], [`Engine::ticket_wait`]). What is not (yet)
//! behind this seam: the session's delivery queue (shared with the broker
//! under the session lock). docs/DESIGN.md ("The engine seam") lists what
//! moves next.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytestring::ByteString;
use millet_codec::LastWill;

use crate::broker::{Attached, Routed, SessionRefusal, SubscribeOutcome};
pub use crate::hooks::AuthorizeRequest;
use crate::hooks::Hooks;
use crate::protocol::ConnectVerdict;
use crate::session::{ConnWaker, DeferredReplay, Message, Session, SessionCell, Subscription};

pub mod delaying;
mod embedded;
pub mod nats;
pub mod subject;

/// Durability: a publish (or a session change) is acknowledged once its
/// [`Ticket`] is done ([`AckStatus`]). The embedded engine's tickets are
/// store sequence numbers, opaque outside `broker::persist`.
pub use crate::broker::persist::{AckStatus, SessionWrites, Ticket};

/// Something the protocol needs before it can go on: a verdict on a
/// CONNECT from the authentication hooks, or an engine call; or, once
/// closed, the detach of its session ([`Request::Detach`], nothing waits
/// for it).
#[derive(Debug)]
pub enum Request {
    /// For the authentication hooks (the driver's `[security]` chain):
    /// answered [`Completion::Verdict`]. [`submit`], with no hooks, accepts
    /// the client as it presents itself.
    Authenticate(Box<AuthenticateRequest>),
    /// For the hooks ([`crate::hooks::Hooks::authorize`]): authorizations
    /// they could not answer in place. Answered [`Completion::Authorized`].
    Authorize(Box<AuthorizeRequest>),
    Attach(Box<AttachRequest>),
    Subscribe(SubscribeRequest),
    Unsubscribe(UnsubscribeRequest),
    /// The connection closed ([`crate::protocol::Connection::handle_closed`]):
    /// [`Engine::detach`]. Answered [`Completion::Detached`], which the
    /// protocol ignores; a driver may as well drop it.
    Detach(DetachRequest),
}

/// The session a closed connection was attached to, and how it closed.
#[derive(Debug)]
pub struct DetachRequest {
    pub cell: Arc<SessionCell>,
    /// The connection's epoch (a connection taken over changes nothing).
    pub epoch: u64,
    /// Publish the will (at once or after its delay): not after a normal
    /// DISCONNECT [MQTT-3.1.2-10].
    pub publish_will: bool,
    /// The session expiry a v5 DISCONNECT set.
    pub expiry_override: Option<u32>,
}

/// What a CONNECT presents, for authentication (and the connection log).
#[derive(Debug, Clone)]
pub struct AuthenticateRequest {
    pub client_id: ByteString,
    pub username: Option<ByteString>,
    pub password: Option<bytes::Bytes>,
    /// Protocol level (3, 4, 5; a bridge's 0x80 flag not included).
    pub level: u8,
    pub clean_start: bool,
    pub keep_alive: u16,
    /// An enhanced-authentication method (v5): the AUTH exchange then
    /// authenticates; the hooks still check bans and quotas.
    pub authentication_method: Option<ByteString>,
    pub authentication_data: Option<bytes::Bytes>,
}

impl AuthenticateRequest {
    /// The verdict when no hook is configured: accepted as presented.
    pub fn as_presented(&self) -> ConnectVerdict {
        ConnectVerdict {
            username: self.username.as_deref().map(str::to_string),
            ..Default::default()
        }
    }
}

/// Attach a connection to the session of `client_id` (CONNECT accepted).
#[derive(Debug)]
pub struct AttachRequest {
    pub client_id: ByteString,
    /// Discard any existing session [MQTT-3.1.2-4].
    pub clean_start: bool,
    /// Session expiry, seconds (`u32::MAX`: never).
    pub expiry_interval: u32,
    pub will: Option<LastWill>,
    /// Wakes the connection: deliveries, kicks, takeover.
    pub waker: Arc<ConnWaker>,
}

/// Add subscriptions (already authorized and vetted by the protocol), in
/// order, and queue the retained messages each one asks for.
#[derive(Debug)]
pub struct SubscribeRequest {
    pub cell: Arc<SessionCell>,
    pub filters: Vec<(ByteString, Subscription)>,
}

/// Remove subscriptions, in order.
#[derive(Debug)]
pub struct UnsubscribeRequest {
    pub cell: Arc<SessionCell>,
    pub filters: Vec<ByteString>,
}

/// The answer to a [`Request`], variant for variant.
pub enum Completion {
    Verdict(Box<ConnectVerdict>),
    /// One verdict per topic of the [`AuthorizeRequest`], in order.
    Authorized(Vec<bool>),
    Attached(Attached),
    /// An [`AttachRequest`] refused after all (cluster mode: NATS became
    /// unreachable while the client id was being taken over): CONNACK
    /// with the refusal's reason code, no session.
    Refused(SessionRefusal),
    /// One outcome per requested filter, in order.
    Subscribed(Vec<SubscribeOutcome>),
    /// Per requested filter: whether the subscription existed.
    Unsubscribed(Vec<bool>),
    /// The session was detached (nothing waits for this).
    Detached,
}

impl std::fmt::Debug for Completion {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Completion::Verdict(v) => f.debug_tuple("Verdict").field(&v.reason).finish(),
            Completion::Authorized(v) => f.debug_tuple("Authorized").field(v).finish(),
            Completion::Attached(a) => f
                .debug_struct("Attached")
                .field("epoch", &a.epoch)
                .field("session_present", &a.session_present)
                .finish(),
            Completion::Subscribed(o) => f.debug_tuple("Subscribed").field(o).finish(),
            Completion::Unsubscribed(o) => f.debug_tuple("Unsubscribed").field(o).finish(),
            Completion::Refused(r) => f.debug_tuple("Refused").field(r).finish(),
            Completion::Detached => f.write_str("Detached"),
        }
    }
}

/// How an engine call answers.
#[derive(Debug)]
pub enum Call {
    /// Answered already.
    Ready(Completion),
    /// Answered later: the engine fills the [`Pending`] and wakes the
    /// connection ([`ConnWaker::ENGINE`]).
    Later(Pending),
}

/// What the client said about a packet id of its session
/// ([`Engine::acknowledge`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SessionAck {
    /// PUBACK of a QoS 1 delivery.
    PubAck(u16),
    /// PUBREC of a QoS 2 delivery; `refused`: an error reason code, which
    /// ends the delivery there.
    PubRec { packet_id: u16, refused: bool },
    /// PUBCOMP of a QoS 2 delivery.
    PubComp(u16),
    /// PUBREL of a QoS 2 message the client sent.
    PubRel(u16),
}

/// The answer to [`Engine::acknowledge`].
#[derive(Debug, Clone, Copy)]
pub struct Acknowledged {
    /// The packet id was in the session (v5 answers 0x92 otherwise).
    pub known: bool,
    /// The record's ticket; what answers the acknowledgement waits for it.
    pub ticket: Ticket,
}

/// The answer to [`Engine::qos2_arrived`].
#[derive(Debug, Clone, Copy)]
pub enum Qos2Arrival {
    /// New: remembered until its PUBREL; the PUBREC waits for the ticket.
    New(Ticket),
    /// Already awaiting its PUBREL: acknowledged again, not routed again.
    Resent,
    /// Beyond the receive maximum the server announced.
    Full,
}

/// What an engine promises, call by call.
///
/// Every call may answer later ([`Call::Later`]); the protocol sends nothing
/// that depends on the answer (CONNACK, SUBACK, UNSUBACK, and nothing of the
/// client's later packets is handled) until it comes. A connection has at
/// most one call outstanding, so calls of one connection are answered in
/// the order they were made. A call whose connection went away before the
/// answer ([`Pending`] dropped) must leave no trace: an engine that did the
/// work anyway undoes it ([`Engine::detach`] for an attach).
pub trait Engine: Send + Sync + 'static {
    /// Attach to the session of `req.client_id`: create it, resume it or
    /// discard it per `clean_start` [MQTT-3.1.2-4..6]. A connection already
    /// attached anywhere is told to close with 0x8E (its waker gets
    /// [`ConnWaker::KICK`]) before this one is answered: there are never two
    /// live connections for one client id [MQTT-3.1.4-3]. Answers
    /// [`Completion::Attached`]; never refuses (admission is checked before).
    fn attach(&self, req: AttachRequest, reply_to: &Arc<ConnWaker>, now: Instant) -> Call;

    /// Add `req.filters` to the session, each with its outcome (refused:
    /// invalid filter 0x8F, too many subscriptions 0x97, No Local on a
    /// shared subscription 0x82), and queue the retained messages that
    /// each granted one asks for (its Retain Handling) in the session,
    /// where the connection finds them after the answer. Once answered,
    /// every later publish matching a granted filter reaches the session.
    /// Answers [`Completion::Subscribed`].
    fn subscribe(&self, req: SubscribeRequest, reply_to: &Arc<ConnWaker>, now: Instant) -> Call;

    /// Remove `req.filters` from the session; once answered, no later
    /// publish matches them. Answers [`Completion::Unsubscribed`].
    fn unsubscribe(&self, req: UnsubscribeRequest, reply_to: &Arc<ConnWaker>, now: Instant)
        -> Call;

    /// The connection `epoch` attached to `cell` closed (fire and forget;
    /// [`Request::Detach`], handed over as soon as the connection closed):
    /// the will is published if `publish_will` (at once or after its
    /// delay), and the session's expiry starts (`expiry_override`: from a
    /// v5 DISCONNECT). A connection already taken over changes nothing.
    fn detach(
        &self,
        cell: &Arc<SessionCell>,
        epoch: u64,
        publish_will: bool,
        expiry_override: Option<u32>,
        now: Instant,
    );

    /// Route `msg` (authorized and vetted by the protocol) to every
    /// session with a matching subscription, in the order publishes are
    /// made, and keep it as the retained message of its topic if it asks
    /// to be. Answers at once: the sessions reached, whether one of them is
    /// congested (the publisher should pause: `publisher` is woken when it
    /// drains), and the [`Ticket`] the acknowledgement waits for (none:
    /// nothing had to be made durable). May refuse to retain beyond the
    /// retained caps (the message is still routed).
    fn publish(
        &self,
        msg: Arc<Message>,
        publisher: Option<&Arc<ConnWaker>>,
        now: Instant,
    ) -> Routed;

    /// Where `ticket` stands: pending, durable (a crash after this loses
    /// nothing it covers), or failed (the write will never be durable: the
    /// acknowledgement becomes a refusal). [`Ticket::NONE`] is durable.
    fn ticket_status(&self, ticket: Ticket) -> AckStatus;

    /// Wake `waker` once `ticket` is no longer pending (at once if it is
    /// not): the connection then asks [`Engine::ticket_status`].
    fn ticket_wait(&self, ticket: Ticket, waker: &Arc<ConnWaker>);

    /// A ticket that is done once both `a` and `b` are (a QoS 2 publish
    /// waits for its id's record and for its message). Tickets of one
    /// store are sequence numbers, so the later one covers both; an engine
    /// with tickets of its own kinds combines them.
    fn join_tickets(&self, a: Ticket, b: Ticket) -> Ticket {
        a.max(b)
    }

    /// A ticket covering everything submitted so far (a resend of
    /// in-flight state waits for it).
    fn last_ticket(&self) -> Ticket;

    /// The records one turn of a connection writes for `session` (a
    /// message moved from the queue to the in-flight window, an
    /// acknowledged one forgotten, a QoS 2 id remembered or released), in
    /// the protocol's terms, submitted together
    /// ([`SessionWrites::submit`]): the [`Ticket`] it gives says when they
    /// are durable, and the acknowledgements and deliveries that depend on
    /// them wait for it. Records of one session are applied in the order
    /// they are submitted. A session the engine does not keep durably (a
    /// clean one, or no store) records nothing: the ticket is
    /// [`Ticket::NONE`].
    fn session_writes<'a>(
        &'a self,
        client_id: &'a ByteString,
        session: &Session,
    ) -> SessionWrites<'a>;

    /// Apply what the client said about a packet id of `cell`'s session
    /// (its acknowledgement of a delivery, or its PUBREL of a QoS 2
    /// message it sent) and record it: whether the id was known there, and
    /// the [`Ticket`] of the record (a PUBREL answering a PUBREC waits for
    /// it: "awaiting PUBCOMP" must survive a crash before the client may
    /// forget the id; a PUBCOMP answering a PUBREL too: the client may
    /// reuse the id for a new message once it has the PUBCOMP, which a
    /// crash that brought back "awaiting PUBREL" would take for a resend
    /// and not deliver). Answers at once. The default keeps the session in
    /// the cell and records through [`Engine::session_writes`]; the session
    /// lock is taken here, never by the protocol.
    fn acknowledge(&self, cell: &SessionCell, ack: SessionAck) -> Acknowledged {
        let mut st = cell.state.lock();
        let s = &mut st.session;
        let (known, ticket) = match ack {
            SessionAck::PubAck(id) | SessionAck::PubComp(id) => {
                let known = match ack {
                    SessionAck::PubAck(_) => s.handle_puback(id),
                    _ => s.handle_pubcomp(id),
                };
                if known {
                    let mut w = self.session_writes(&cell.client_id, s);
                    w.inflight_done(id);
                    w.submit();
                }
                (known, Ticket::NONE)
            }
            SessionAck::PubRec { packet_id, refused } => {
                let known = s.handle_pubrec(packet_id, refused);
                let mut ticket = Ticket::NONE;
                if known {
                    let mut w = self.session_writes(&cell.client_id, s);
                    if refused {
                        w.inflight_done(packet_id);
                        w.submit();
                    } else {
                        w.inflight_released(s, packet_id);
                        ticket = w.submit();
                    }
                }
                (known, ticket)
            }
            SessionAck::PubRel(id) => {
                let known = s.awaiting_rel.remove(&id);
                let mut ticket = Ticket::NONE;
                if known {
                    let mut w = self.session_writes(&cell.client_id, s);
                    w.awaiting_rel_done(id);
                    ticket = w.submit();
                }
                (known, ticket)
            }
        };
        Acknowledged { known, ticket }
    }

    /// A QoS 2 PUBLISH with `packet_id` arrived in `cell`'s session: a
    /// resend of one awaiting its PUBREL ([`Qos2Arrival::Resent`]: not
    /// routed again [MQTT-4.3.3-10]), one beyond `receive_maximum`
    /// ([`Qos2Arrival::Full`]), or a new one, remembered and recorded
    /// ([`Qos2Arrival::New`] with the record's ticket: its PUBREC waits for
    /// it). Answers at once; the default keeps the ids in the cell's
    /// session and records through [`Engine::session_writes`].
    fn qos2_arrived(
        &self,
        cell: &SessionCell,
        packet_id: u16,
        receive_maximum: usize,
    ) -> Qos2Arrival {
        let mut st = cell.state.lock();
        let s = &mut st.session;
        if s.awaiting_rel.contains(&packet_id) {
            return Qos2Arrival::Resent;
        }
        if s.awaiting_rel.len() >= receive_maximum {
            return Qos2Arrival::Full;
        }
        s.awaiting_rel.insert(packet_id);
        let mut w = self.session_writes(&cell.client_id, s);
        w.awaiting_rel_added(packet_id);
        Qos2Arrival::New(w.submit())
    }

    /// QoS 2 PUBLISHes (`sent`: packet id, message) were just put in
    /// flight in the session of `client_id` (the caller holds its lock). An
    /// engine that records the outgoing QoS 2 window somewhere else too (a
    /// cluster node: for the node that rebuilds the session if this one
    /// dies) starts that write here; with [`Engine::holds_qos2`], those
    /// PUBLISHes, and what follows them, go out once the ticket is done.
    /// The default records nothing.
    fn qos2_sent(&self, client_id: &ByteString, sent: &[(u16, Arc<Message>)]) -> Ticket {
        let _ = (client_id, sent);
        Ticket::NONE
    }

    /// Whether QoS 2 PUBLISHes to `session` wait for [`Engine::qos2_sent`].
    fn holds_qos2(&self, session: &Session) -> bool {
        let _ = session;
        false
    }

    /// Whether `packet_id` of `cell`'s session is a QoS 2 message awaiting
    /// its PUBREL (a resend is acknowledged again, whatever the limits).
    fn qos2_awaiting(&self, cell: &SessionCell, packet_id: u16) -> bool {
        cell.state.lock().session.awaiting_rel.contains(&packet_id)
    }

    /// The engine's own deadlines: wills whose delay ran out, sessions
    /// whose expiry came, expired retained messages (and, for the embedded
    /// engine, `$SYS` publication and its store's housekeeping). The node's
    /// ticker calls it every 250 ms; it must not block (a networked engine
    /// starts its work and returns).
    fn handle_timeout(&self, now: Instant);

    /// A client id for a client that connected without one
    /// [MQTT-3.1.3-6]: unique among the engine's sessions (across the
    /// cluster for a networked engine). Answers at once.
    fn assign_client_id(&self) -> ByteString;

    /// Whether the session of `client_id` may be attached now: an existing
    /// one always is; a new one is refused beyond `limits.max_sessions`
    /// ([`SessionRefusal::MaxSessions`]) or while memory is at its high
    /// watermark ([`SessionRefusal::Memory`]). Answers at once, from what
    /// the engine knows here (a networked engine: its node's view); the
    /// protocol refuses the CONNECT with 0x97 (3.x: 3).
    fn admit_session(&self, client_id: &str) -> Result<(), SessionRefusal>;

    /// Whether a new retained message of `bytes` (topic + payload) on
    /// `topic` would be stored: replacing or deleting one always is; a new
    /// one within the retained limits and the memory budget. Answers at
    /// once, from what the engine knows here; the protocol refuses a v5
    /// PUBLISH it would not store with 0x97 rather than drop it silently.
    fn retained_admits(&self, topic: &str, bytes: u64) -> bool;

    /// Queue in `cell`'s session the retained messages matching `replay`
    /// (a re-SUBSCRIBE coalesced while an earlier replay was being sent),
    /// as [`Engine::subscribe`] does for a new one. Fire and forget: the
    /// session's waker is signalled when they are queued.
    fn replay_retained(&self, cell: &Arc<SessionCell>, replay: &DeferredReplay, now: Instant);

    /// Acknowledgements go out when a write is submitted rather than when
    /// it is durable (an operator's choice: `[store] sync = "interval"`,
    /// or no store at all): [`Engine::ticket_status`] decides at once.
    fn acks_early(&self) -> bool;
}

/// Hand `req` to the right call of `engine` or `hooks`.
/// An [`Request::Authenticate`] (for which there is no engine call) is
/// answered as presented: the driver gives it to its authentication chain
/// instead.
pub fn submit(
    engine: &dyn Engine,
    hooks: &dyn Hooks,
    req: Request,
    reply_to: &Arc<ConnWaker>,
    now: Instant,
) -> Call {
    match req {
        Request::Authenticate(r) => Call::Ready(Completion::Verdict(Box::new(r.as_presented()))),
        Request::Authorize(r) => hooks.authorize(*r, reply_to, now),
        Request::Attach(r) => engine.attach(*r, reply_to, now),
        Request::Subscribe(r) => engine.subscribe(r, reply_to, now),
        Request::Unsubscribe(r) => engine.unsubscribe(r, reply_to, now),
        Request::Detach(r) => {
            engine.detach(&r.cell, r.epoch, r.publish_will, r.expiry_override, now);
            Call::Ready(Completion::Detached)
        }
    }
}

/// The slot a later answer is put in: kept by the driver ([`Pending`]),
/// filled by the engine ([`Reply::complete`]).
#[derive(Debug)]
pub struct Reply {
    slot: parking_lot::Mutex<Slot>,
    done: parking_lot::Condvar,
    waker: Arc<ConnWaker>,
}

#[derive(Debug, Default)]
struct Slot {
    answer: Option<Completion>,
    /// The [`Pending`] was dropped: nobody will take the answer.
    abandoned: bool,
}

impl Reply {
    /// A slot for one answer, and the [`Pending`] the driver keeps.
    pub fn new(waker: &Arc<ConnWaker>) -> (Arc<Reply>, Pending) {
        let reply = Arc::new(Reply {
            slot: parking_lot::Mutex::new(Slot::default()),
            done: parking_lot::Condvar::new(),
            waker: waker.clone(),
        });
        (reply.clone(), Pending(reply))
    }

    /// Whether the connection went away (its [`Pending`] was dropped).
    pub fn is_abandoned(&self) -> bool {
        self.slot.lock().abandoned
    }

    /// Give the answer and wake the connection. `Err` gives it back when
    /// the connection went away meanwhile: the caller undoes its effect.
    pub fn complete(&self, c: Completion) -> Result<(), Completion> {
        let mut slot = self.slot.lock();
        if slot.abandoned {
            return Err(c);
        }
        slot.answer = Some(c);
        drop(slot);
        self.done.notify_all();
        self.waker.signal(ConnWaker::ENGINE);
        Ok(())
    }
}

/// An engine call that answers later, as kept by the driver. Dropping it
/// abandons the call (the engine then undoes its effect).
#[derive(Debug)]
pub struct Pending(Arc<Reply>);

impl Pending {
    /// The answer, once given.
    pub fn take(&self) -> Option<Completion> {
        self.0.slot.lock().answer.take()
    }

    /// Whether the answer is there (to take).
    pub fn is_answered(&self) -> bool {
        self.0.slot.lock().answer.is_some()
    }

    /// Block the calling thread until the answer comes (at most `timeout`):
    /// for tests that drive a connection without a runtime.
    pub fn wait(&self, timeout: Duration) -> Option<Completion> {
        let deadline = Instant::now() + timeout;
        let mut slot = self.0.slot.lock();
        while slot.answer.is_none() {
            if self.0.done.wait_until(&mut slot, deadline).timed_out() {
                break;
            }
        }
        slot.answer.take()
    }
}

impl Drop for Pending {
    fn drop(&mut self) {
        self.0.slot.lock().abandoned = true;
    }
}

/// Build the engine a server runs on from its configuration: the broker
/// itself (embedded), wrapped in the test delay when
/// `[engine] test_delay_ms` is set; in cluster mode (`link`, started
/// with [`nats::NatsLink::start`]) the broker as a cluster node.
pub fn from_config(
    broker: &Arc<crate::broker::Broker>,
    link: Option<Arc<nats::NatsLink>>,
) -> Arc<dyn Engine> {
    if let Some(link) = link {
        return Arc::new(nats::Clustered::new(broker.clone(), link));
    }
    let cfg = &broker.node.config.engine;
    if cfg.test_delay_ms == 0 {
        return broker.clone();
    }
    tracing::warn!(
        max_delay_ms = cfg.test_delay_ms,
        seed = cfg.test_delay_seed,
        "engine calls answered after a random delay (engine.test_delay_ms): a test setting"
    );
    Arc::new(delaying::Delaying::new(
        broker.clone(),
        Duration::from_millis(cfg.test_delay_ms),
        cfg.test_delay_seed,
    ))
}
