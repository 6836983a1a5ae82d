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

use std::collections::BinaryHeap;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use rand::{RngExt, SeedableRng};

use super::{AttachRequest, Call, Completion, Engine, Reply, SubscribeRequest, UnsubscribeRequest};
use crate::session::{ConnWaker, SessionCell};

/// See the module documentation.
pub struct Delaying {
    inner: Arc<dyn Engine>,
    max: Duration,
    rng: parking_lot::Mutex<rand::rngs::StdRng>,
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
        }
    }

    fn delay(&self) -> Duration {
        let max = u64::try_from(self.max.as_micros()).unwrap_or(u64::MAX);
        Duration::from_micros(self.rng.lock().random_range(0..=max))
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
