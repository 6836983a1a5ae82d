//! An engine wrapper for tests: every call is answered after a seeded random
//! delay between 0 and a maximum, as a networked engine would answer. Runs
//! the protocol through every pending state it has: CI runs the state-machine
//! tests and socket suites on it (`[engine] test_delay_ms`, or
//! `MILLET_ENGINE__TEST_DELAY_MS=20`).
//!
//! The delay comes before the inner engine is called, on one scheduler
//! thread per process: calls due at the same time run in the order they
//! were made, so one connection's calls (at most one outstanding) keep their
//! order. A call whose connection went away meanwhile is not made at all;
//! an answer that finds it gone is undone ([`Engine::detach`]).
//!
//! Publishing answers at once (as every engine's does), but durability comes
//! later: each [`Ticket`] is done only once the inner engine says so *and* a
//! random delay has passed since it was first asked about, so every
//! acknowledgement that waits for durability (PUBACK, PUBREC, PUBCOMP,
//! resends) is held and released as it would be across a network. The
//! delays keep tickets ordered (a later ticket is never done before an
//! earlier one), as [`Engine::ticket_status`] promises.
//!
//! [`DelayingHooks`] does the same for the hooks ([`crate::hooks`]): some
//! authorizations are answered after a delay instead of in place.

use std::collections::{BTreeMap, BinaryHeap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use rand::{RngExt, SeedableRng};

use super::{
    AckStatus, AttachRequest, Call, Completion, Engine, Reply, SessionWrites, SubscribeRequest,
    Ticket, UnsubscribeRequest,
};
use crate::broker::Routed;
use crate::hooks::{Authorization, AuthorizeRequest, Client, Event, Hooks};
use crate::security::acl::Access;
use crate::session::{ConnWaker, Message, Session, SessionCell};

/// See the module documentation.
pub struct Delaying {
    inner: Arc<dyn Engine>,
    max: Duration,
    rng: parking_lot::Mutex<rand::rngs::StdRng>,
    tickets: parking_lot::Mutex<Tickets>,
}

/// When each ticket asked about is released (done, if the inner engine
/// says so too). Release times grow with the tickets; released ones are
/// forgotten, below a watermark.
#[derive(Default)]
struct Tickets {
    release: BTreeMap<Ticket, Instant>,
    /// Every ticket up to this one is released.
    released_upto: Ticket,
}

impl Delaying {
    /// Wrap `inner`, delaying each call by up to `max` (uniform, from a
    /// generator seeded with `seed`: the same seed gives the same delays
    /// for the same sequence of calls).
    pub fn new(inner: Arc<dyn Engine>, max: Duration, seed: u64) -> Delaying {
        Delaying {
            inner,
            max,
            rng: parking_lot::Mutex::new(rand::rngs::StdRng::seed_from_u64(seed)),
            tickets: Default::default(),
        }
    }

    /// When `ticket`'s delay ends (`None`: it has ended). Its first
    /// mention draws the delay, kept between the release times of the
    /// tickets around it so that the order holds.
    fn release_at(&self, ticket: Ticket) -> Option<Instant> {
        if ticket.is_none() {
            return None;
        }
        let now = Instant::now();
        let mut t = self.tickets.lock();
        if ticket <= t.released_upto {
            return None;
        }
        let at = match t.release.get(&ticket) {
            Some(at) => *at,
            None => {
                let mut at = now + self.delay();
                if let Some((_, lower)) = t.release.range(..ticket).next_back() {
                    at = at.max(*lower);
                }
                if let Some((_, higher)) = t.release.range(ticket..).next() {
                    at = at.min(*higher);
                }
                t.release.insert(ticket, at);
                at
            }
        };
        // Forget the released ones (the oldest first: release times grow
        // with the tickets).
        while let Some((&k, &a)) = t.release.first_key_value() {
            if a > now {
                break;
            }
            t.release.pop_first();
            t.released_upto = t.released_upto.max(k);
        }
        (at > now).then_some(at)
    }

    fn delay(&self) -> Duration {
        draw(&self.rng, self.max)
    }

    /// Run `call` on the inner engine after a delay, and answer `reply`.
    /// The inner engine gets the caller's `now` (tests drive a fake clock).
    fn later(
        &self,
        reply_to: &Arc<ConnWaker>,
        now: Instant,
        call: impl FnOnce(&dyn Engine, Instant) -> Call + Send + 'static,
    ) -> Call {
        let (reply, pending) = Reply::new(reply_to);
        let inner = self.inner.clone();
        schedule(
            Instant::now() + self.delay(),
            Box::new(move || {
                if reply.is_abandoned() {
                    return; // the connection is gone: the call is not made
                }
                match call(&*inner, now) {
                    Call::Ready(c) => answer(&*inner, &reply, c, now),
                    Call::Later(p) => {
                        // The inner engine answers later too: wait for it
                        // off the scheduler thread.
                        std::thread::spawn(move || {
                            if let Some(c) = p.wait(Duration::from_secs(3600)) {
                                answer(&*inner, &reply, c, now);
                            }
                        });
                    }
                }
            }),
        );
        Call::Later(pending)
    }
}

/// Give `c` to the connection; if it went away meanwhile, undo what the
/// call did (an attach is detached, as if the connection closed at once).
fn answer(inner: &dyn Engine, reply: &Reply, c: Completion, now: Instant) {
    // (A verdict never comes from an engine; nothing to undo for others.)
    if let Err(Completion::Attached(a)) = reply.complete(c) {
        inner.detach(&a.cell, a.epoch, true, None, now);
    }
}

impl Engine for Delaying {
    fn attach(&self, req: AttachRequest, reply_to: &Arc<ConnWaker>, now: Instant) -> Call {
        let waker = reply_to.clone();
        self.later(reply_to, now, move |e, now| e.attach(req, &waker, now))
    }

    fn subscribe(&self, req: SubscribeRequest, reply_to: &Arc<ConnWaker>, now: Instant) -> Call {
        let waker = reply_to.clone();
        self.later(reply_to, now, move |e, now| e.subscribe(req, &waker, now))
    }

    fn unsubscribe(
        &self,
        req: UnsubscribeRequest,
        reply_to: &Arc<ConnWaker>,
        now: Instant,
    ) -> Call {
        let waker = reply_to.clone();
        self.later(reply_to, now, move |e, now| e.unsubscribe(req, &waker, now))
    }

    fn detach(
        &self,
        cell: &Arc<SessionCell>,
        epoch: u64,
        publish_will: bool,
        expiry_override: Option<u32>,
        now: Instant,
    ) {
        // Fire and forget, and not delayed: a takeover that follows must
        // find the session detached (a networked engine orders the two
        // the same way, by the session's owner entry).
        self.inner
            .detach(cell, epoch, publish_will, expiry_override, now);
    }

    fn publish(
        &self,
        msg: Arc<Message>,
        publisher: Option<&Arc<ConnWaker>>,
        now: Instant,
    ) -> Routed {
        // Routing answers at once in every engine; durability is delayed
        // (the ticket, below).
        self.inner.publish(msg, publisher, now)
    }

    fn ticket_status(&self, ticket: Ticket) -> AckStatus {
        match self.inner.ticket_status(ticket) {
            AckStatus::Pending => AckStatus::Pending,
            done => match self.release_at(ticket) {
                Some(_) => AckStatus::Pending,
                None => done,
            },
        }
    }

    fn ticket_wait(&self, ticket: Ticket, waker: &Arc<ConnWaker>) {
        match self.release_at(ticket) {
            None => self.inner.ticket_wait(ticket, waker),
            Some(at) => {
                // Weak: a wait does not keep the engine (and its store)
                // alive past its owner.
                let inner = Arc::downgrade(&self.inner);
                let waker = waker.clone();
                schedule(
                    at,
                    Box::new(move || {
                        if let Some(inner) = inner.upgrade() {
                            inner.ticket_wait(ticket, &waker);
                        }
                    }),
                );
            }
        }
    }

    fn join_tickets(&self, a: Ticket, b: Ticket) -> Ticket {
        self.inner.join_tickets(a, b)
    }

    fn last_ticket(&self) -> Ticket {
        self.inner.last_ticket()
    }

    fn session_writes<'a>(
        &'a self,
        client_id: &'a bytestring::ByteString,
        session: &Session,
    ) -> SessionWrites<'a> {
        // Written at once; their tickets are delayed (above).
        self.inner.session_writes(client_id, session)
    }

    fn assign_client_id(&self) -> bytestring::ByteString {
        self.inner.assign_client_id()
    }

    fn handle_timeout(&self, now: Instant) {
        // The engine's own work, not a connection's call: not delayed.
        self.inner.handle_timeout(now);
    }

    fn admit_session(&self, client_id: &str) -> Result<(), crate::broker::SessionRefusal> {
        // Answered at once in every engine (from the node's own view).
        self.inner.admit_session(client_id)
    }

    fn retained_admits(&self, topic: &str, bytes: u64) -> bool {
        // Answered at once in every engine (from the node's own view).
        self.inner.retained_admits(topic, bytes)
    }

    fn replay_retained(
        &self,
        cell: &Arc<SessionCell>,
        replay: &crate::session::DeferredReplay,
        now: Instant,
    ) {
        self.inner.replay_retained(cell, replay, now);
    }

    fn acks_early(&self) -> bool {
        // Never: an acknowledgement decided at once would skip the delay
        // (the status above says pending, and nothing would wake the
        // connection to look again).
        false
    }
}

/// A hooks wrapper for tests ([`crate::hooks`]): every SUBSCRIBE filter,
/// will topic and one PUBLISH authorization in [`ASK_EVERY`] are not
/// answered in place but through the protocol's pending path
/// ([`Authorization::Ask`]), by the inner hooks after a seeded random
/// delay, so the socket suites run the protocol's waiting for
/// authorization (held packets, order kept) as an HTTP authorization hook
/// would make it wait. The rest are answered in place, so a long run of
/// publishes is not slowed by a delay each.
pub struct DelayingHooks {
    inner: Arc<dyn Hooks>,
    max: Duration,
    rng: parking_lot::Mutex<rand::rngs::StdRng>,
    asked: AtomicU64,
}

/// One PUBLISH authorization in this many takes the delayed path.
pub const ASK_EVERY: u64 = 64;

impl DelayingHooks {
    pub fn new(inner: Arc<dyn Hooks>, max: Duration, seed: u64) -> DelayingHooks {
        DelayingHooks {
            inner,
            max,
            rng: parking_lot::Mutex::new(rand::rngs::StdRng::seed_from_u64(seed)),
            asked: AtomicU64::new(0),
        }
    }
}

impl Hooks for DelayingHooks {
    fn authorize_now(&self, client: &Client<'_>, access: Access, topic: &str) -> Authorization {
        let n = self.asked.fetch_add(1, Ordering::Relaxed);
        if access == Access::Subscribe || n.is_multiple_of(ASK_EVERY) {
            return Authorization::Ask;
        }
        self.inner.authorize_now(client, access, topic)
    }

    fn authorize(&self, req: AuthorizeRequest, reply_to: &Arc<ConnWaker>, now: Instant) -> Call {
        let (reply, pending) = Reply::new(reply_to);
        let inner = self.inner.clone();
        let waker = reply_to.clone();
        schedule(
            Instant::now() + draw(&self.rng, self.max),
            Box::new(move || {
                if reply.is_abandoned() {
                    return;
                }
                match inner.authorize(req, &waker, now) {
                    Call::Ready(c) => {
                        let _ = reply.complete(c);
                    }
                    Call::Later(p) => {
                        std::thread::spawn(move || {
                            if let Some(c) = p.wait(Duration::from_secs(3600)) {
                                let _ = reply.complete(c);
                            }
                        });
                    }
                }
            }),
        );
        Call::Later(pending)
    }

    fn observes(&self) -> bool {
        self.inner.observes()
    }

    fn event(&self, event: &Event<'_>) {
        self.inner.event(event);
    }
}

/// A delay between 0 and `max`, uniform.
fn draw(rng: &parking_lot::Mutex<rand::rngs::StdRng>, max: Duration) -> Duration {
    let max = u64::try_from(max.as_micros()).unwrap_or(u64::MAX);
    Duration::from_micros(rng.lock().random_range(0..=max))
}

// ---- the scheduler thread ---------------------------------------------------

type Job = Box<dyn FnOnce() + Send>;

struct Due {
    at: Instant,
    order: u64,
    job: Job,
}

impl PartialEq for Due {
    fn eq(&self, other: &Self) -> bool {
        (self.at, self.order) == (other.at, other.order)
    }
}
impl Eq for Due {}
impl PartialOrd for Due {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Due {
    /// Reversed: the max-heap pops the earliest (then the first made).
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        (other.at, other.order).cmp(&(self.at, self.order))
    }
}

#[derive(Default)]
struct Queue {
    heap: BinaryHeap<Due>,
    next_order: u64,
}

struct Scheduler {
    queue: parking_lot::Mutex<Queue>,
    changed: parking_lot::Condvar,
}

fn scheduler() -> &'static Scheduler {
    static SCHEDULER: OnceLock<&'static Scheduler> = OnceLock::new();
    SCHEDULER.get_or_init(|| {
        let s: &'static Scheduler = Box::leak(Box::new(Scheduler {
            queue: parking_lot::Mutex::new(Queue::default()),
            changed: parking_lot::Condvar::new(),
        }));
        let spawned = std::thread::Builder::new()
            .name("millet-engine-delay".into())
            .spawn(move || run(s));
        if let Err(e) = spawned {
            tracing::error!(error = %e, "cannot start the engine delay thread");
        }
        s
    })
}

fn schedule(at: Instant, job: Job) {
    let s = scheduler();
    let mut q = s.queue.lock();
    let order = q.next_order;
    q.next_order += 1;
    q.heap.push(Due { at, order, job });
    drop(q);
    s.changed.notify_one();
}

fn run(s: &Scheduler) {
    let mut q = s.queue.lock();
    loop {
        let now = Instant::now();
        match q.heap.peek().map(|d| d.at) {
            Some(at) if at <= now => {
                if let Some(due) = q.heap.pop() {
                    drop(q);
                    (due.job)();
                    q = s.queue.lock();
                }
            }
            Some(at) => {
                s.changed.wait_until(&mut q, at);
            }
            None => s.changed.wait(&mut q),
        }
    }
}
