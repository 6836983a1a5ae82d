//! Plain-TCP connections served by per-worker event loops instead of a
//! tokio task and a tokio socket registration each.
//!
//! A fleet of quiet devices pays per connection for what waits on its
//! behalf. Under tokio that is a task (a 128-byte-aligned cell around the
//! connection's future: 384 bytes) and the socket's `ScheduledIo` (256
//! bytes, cache-padded), 0.6 KiB of a 2.2 KiB idle connection. Here a
//! connection is one entry in a [`Reactor`]'s slab: its socket is in the
//! reactor's own epoll set (the kernel holds the registration), its waker
//! is one small [`Slot`], and the connection's future exists only while it
//! has something to do; a quiet connection parks as its `Conn` box alone,
//! and parking and resuming cost no system call (the socket stays
//! registered).
//!
//! The connection logic is the same [`drive`](super::drive) future as for
//! TLS and WebSocket connections; only its transport ([`ReactorTcp`]) and
//! who polls it differ. A reactor is itself a tokio task (one per worker
//! thread): its epoll descriptor is registered with tokio (an epoll set is
//! readable while it has events), and wake-ups from other threads
//! (deliveries, engine answers, timers) queue the connection's key in the
//! reactor's inbox. A round polls every connection that has something to
//! do, once; then, if more work waits, it yields to the runtime (otherwise
//! it waits, which also lets them run), so that accept loops, the store and
//! TLS connections keep their turn; a busy connection still yields after
//! [`BUSY_SLICE`](super::BUSY_SLICE) within its own poll. The epoll set is
//! read (a system call) only when tokio has seen it readable, not on every
//! round: a fleet of quiet devices wakes the loop a few thousand times a
//! second.

use std::cell::RefCell;
use std::future::Future;
use std::io::{ErrorKind, Read, Write};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll, Wake, Waker};
use std::time::{Duration, Instant};

use bytes::BytesMut;
use mio::{Events, Interest, Token};
use tokio::io::unix::AsyncFd;
use tokio::sync::mpsc;

use super::{
    drive, new_conn, not_now, Conn, Dormant, LiveConns, Parked, PeerInfo, Transport, READ_MAX,
};
use crate::session::ConnWaker;
use crate::stamp::Stamp;

/// Events taken from the epoll set per system call.
const EVENTS: usize = 1024;

/// Rounds a reactor runs back to back while more work waits, before it
/// yields to the other tasks of its worker (and at most
/// [`BUSY_SLICE`](super::BUSY_SLICE) of them).
const ROUNDS_PER_TURN: u32 = 8;

/// The reactors of one server; new connections go to them in turn.
pub(super) struct Reactors {
    inboxes: Vec<Arc<Inbox>>,
    next: AtomicUsize,
}

impl Reactors {
    /// Start `n` reactors (at least one) as tasks of the current runtime.
    pub(super) fn start(n: usize, live: Arc<LiveConns>) -> std::io::Result<Reactors> {
        let mut inboxes = Vec::new();
        for _ in 0..n.max(1) {
            let inbox = Arc::new(Inbox::default());
            let poll = register(mio::Poll::new()?)?;
            let reactor = Reactor {
                poll,
                events: Events::with_capacity(EVENTS),
                slots: slab::Slab::new(),
                inbox: inbox.clone(),
                live: live.clone(),
            };
            // Unconstrained: tokio's per-task budget is meant for one
            // connection, not for hundreds polled in one round (the
            // reactor yields after every round instead).
            tokio::spawn(tokio::task::unconstrained(reactor.run()));
            live.reactors.lock().push(inbox.clone());
            inboxes.push(inbox);
        }
        Ok(Reactors {
            inboxes,
            next: AtomicUsize::new(0),
        })
    }

    /// Wake every reactor (at shutdown: one without connections ends).
    pub(super) fn wake_all(&self) {
        for i in &self.inboxes {
            i.notify.notify_one();
        }
    }

    /// Serve an accepted connection (non-blocking, not registered with tokio).
    pub(super) fn serve(
        &self,
        sock: std::net::TcpStream,
        info: Box<PeerInfo>,
        done: mpsc::Sender<()>,
    ) {
        let i = self.next.fetch_add(1, Ordering::Relaxed) % self.inboxes.len();
        let inbox = &self.inboxes[i];
        inbox.incoming.lock().push(Incoming {
            sock: mio::net::TcpStream::from_std(sock),
            info,
            done,
        });
        inbox.notify.notify_one();
    }
}

/// The reactor's epoll set, registered with tokio (readable while it has
/// events).
#[allow(unsafe_code)]
fn register(poll: mio::Poll) -> std::io::Result<AsyncFd<mio::Poll>> {
    // SAFETY: `register_with_interest` requires that the descriptor
    // `poll.as_raw_fd()` returns stays open, refers to the same epoll set
    // and is the one returned on every call, for as long as the `AsyncFd`
    // lives. `mio::Poll` owns that descriptor, returns it unchanged and
    // closes it only when dropped; the `AsyncFd` owns the `Poll` (dropping
    // it deregisters before the `Poll` drops), and this module never
    // replaces the `Poll` behind `get_mut`.
    unsafe { AsyncFd::register_with_interest(poll, tokio::io::Interest::READABLE) }
        .map_err(|e| e.into_parts().1)
}

/// What other threads hand a reactor.
#[derive(Default)]
pub(super) struct Inbox {
    incoming: parking_lot::Mutex<Vec<Incoming>>,
    /// Keys of connections woken (each queued once until it is polled).
    woken: parking_lot::Mutex<Vec<usize>>,
    notify: tokio::sync::Notify,
    /// [`ConnWaker`] signals for every connection of the reactor, not yet
    /// passed on ([`LiveConns::signal_all`]).
    signals: std::sync::atomic::AtomicU8,
    /// The parked connections' keep-alive deadlines are to be checked
    /// ([`LiveConns::sweep`]).
    sweep: AtomicBool,
}

impl Inbox {
    /// Connections woken, new connections, or signals waiting.
    fn has_work(&self) -> bool {
        !self.woken.lock().is_empty()
            || !self.incoming.lock().is_empty()
            || self.signals.load(Ordering::Acquire) != 0
            || self.sweep.load(Ordering::Acquire)
    }

    /// Pass `signal` on to every connection of the reactor.
    pub(super) fn signal_all(&self, signal: u8) {
        self.signals.fetch_or(signal, Ordering::AcqRel);
        self.notify.notify_one();
    }

    /// Wake the parked connections whose keep-alive deadline has passed.
    pub(super) fn sweep_due(&self) {
        self.sweep.store(true, Ordering::Release);
        self.notify.notify_one();
    }
}

struct Incoming {
    sock: mio::net::TcpStream,
    info: Box<PeerInfo>,
    done: mpsc::Sender<()>,
}

/// One connection's waker and socket readiness, shared by the reactor and
/// the connection's transport.
pub(super) struct Slot {
    /// Its slab key (a reactor holds fewer than 2^32 connections: the
    /// process's descriptors run out first). 32 bits keep the slot's
    /// allocation at 32 bytes.
    key: u32,
    inbox: Arc<Inbox>,
    /// In the reactor's list of connections to poll.
    queued: AtomicBool,
    /// The socket may have bytes to read (an event said so, and no read
    /// has since found it drained).
    readable: AtomicBool,
    /// The peer closed its side, or the socket failed: reads are tried
    /// whatever `readable` says, until they report it.
    closed: AtomicBool,
}

impl Slot {
    /// Queue for the reactor's next round; `true` if it was not queued.
    fn enqueue(&self) -> bool {
        !self.queued.swap(true, Ordering::AcqRel)
    }
}

impl Wake for Slot {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        if self.enqueue() {
            self.inbox.woken.lock().push(self.key as usize);
            self.inbox.notify.notify_one();
        }
    }
}

type DriveFuture = Pin<Box<dyn Future<Output = Option<Box<Conn<ReactorTcp>>>> + Send>>;

enum State {
    Running(DriveFuture),
    /// Quiet: the connection's state alone, no future.
    Parked(Box<Conn<ReactorTcp>>),
    /// Quiet, and of that state only what outlives the quiet spell (the
    /// usual parked connection).
    Dormant(Box<Dormant<ReactorTcp>>),
    /// Only while the reactor polls it.
    Polling,
}

/// One connection in the slab (the waker is made from `slot` per poll:
/// an atomic increment rather than 16 bytes in every entry).
struct Entry {
    slot: Arc<Slot>,
    state: State,
    /// The connection's own waker, for signals to every connection (the
    /// reactor lists its connections: see [`LiveConns`]).
    signals: Arc<ConnWaker>,
}

/// The size of a slab entry, for the size guard (`server::size_report`).
#[cfg(test)]
pub(super) fn entry_size() -> usize {
    std::mem::size_of::<Entry>()
}

struct Reactor {
    poll: AsyncFd<mio::Poll>,
    events: Events,
    slots: slab::Slab<Entry>,
    inbox: Arc<Inbox>,
    live: Arc<LiveConns>,
}

impl Reactor {
    async fn run(mut self) {
        let mut ready: Vec<usize> = Vec::new();
        // Whether the epoll set may hold events: it is read (a system call)
        // only then, not on every round. Tokio says when it became readable
        // (the readiness is cleared before the set is read, so an event that
        // comes after that makes it readable again).
        let mut events_due = true;
        // Rounds run back to back since the last yield or wait, and when
        // the first of them ended (the clock is read only when one follows).
        let mut rounds = 0u32;
        let mut turn_start: Option<Instant> = None;
        loop {
            let incoming = std::mem::take(&mut *self.inbox.incoming.lock());
            for i in incoming {
                if let Some(key) = self.add(i) {
                    ready.push(key);
                }
            }
            if events_due || self.readable_now() {
                events_due = false;
                self.take_events(&mut ready);
            }
            self.take_broadcasts(&mut ready);
            ready.append(&mut self.inbox.woken.lock());
            if ready.is_empty() {
                if self.slots.is_empty() && self.live.is_shutting_down() {
                    return;
                }
                tokio::select! {
                    r = self.poll.readable() => match r {
                        Ok(mut guard) => {
                            guard.clear_ready();
                            events_due = true;
                        }
                        Err(e) => {
                            tracing::error!(error = %e, "connection event loop: waiting for events failed");
                            tokio::time::sleep(Duration::from_millis(10)).await;
                            events_due = true;
                        }
                    },
                    _ = self.inbox.notify.notified() => {}
                }
                continue;
            }
            for key in ready.drain(..) {
                self.run_slot(key);
            }
            // More work already (typically what this round's connections
            // woke: a device's publish wakes its subscriber's connection):
            // up to ROUNDS_PER_TURN rounds run back to back, then the other
            // tasks of this worker (accept loops, TLS connections) get their
            // turn. None: the next iteration waits (which lets them run).
            // Each yield makes tokio read its own epoll set once more (a
            // system call), so not yielding after every round saves one a
            // message in a fleet.
            if self.inbox.has_work() {
                rounds += 1;
                let since = *turn_start.get_or_insert_with(Instant::now);
                if rounds >= ROUNDS_PER_TURN || since.elapsed() >= super::BUSY_SLICE {
                    tokio::task::yield_now().await;
                    rounds = 0;
                    turn_start = None;
                }
            } else {
                rounds = 0;
                turn_start = None;
            }
        }
    }

    /// Whether tokio saw the epoll set become readable since it was last
    /// read (no system call); the readiness is cleared when it did.
    fn readable_now(&self) -> bool {
        let mut cx = Context::from_waker(Waker::noop());
        match self.poll.poll_read_ready(&mut cx) {
            Poll::Ready(Ok(mut guard)) => {
                guard.clear_ready();
                true
            }
            Poll::Ready(Err(_)) => true,
            Poll::Pending => false,
        }
    }

    /// Register a new connection and create its future; its key, to be
    /// polled this round.
    fn add(&mut self, mut i: Incoming) -> Option<usize> {
        let entry = self.slots.vacant_entry();
        let key = entry.key();
        let Ok(key32) = u32::try_from(key) else {
            tracing::warn!(peer = %i.info.addr, "too many connections in one event loop: closed");
            return None;
        };
        if let Err(e) = self.poll.get_ref().registry().register(
            &mut i.sock,
            Token(key),
            Interest::READABLE | Interest::WRITABLE,
        ) {
            tracing::warn!(peer = %i.info.addr, error = %e, "cannot register the connection: closed");
            return None;
        }
        let slot = Arc::new(Slot {
            key: key32,
            inbox: self.inbox.clone(),
            queued: AtomicBool::new(true),
            readable: AtomicBool::new(false),
            closed: AtomicBool::new(false),
        });
        let stream = ReactorTcp {
            sock: i.sock,
            slot: slot.clone(),
        };
        let c = new_conn(stream, i.info, self.live.clone(), i.done);
        let signals = c.conn.waker().clone();
        if self.live.is_shutting_down() {
            signals.signal(ConnWaker::SHUTDOWN);
        }
        let fut: DriveFuture = Box::pin(drive(c));
        tracing::trace!(
            future = std::mem::size_of_val(&*fut),
            state = std::mem::size_of::<Conn<ReactorTcp>>(),
            "event-loop connection future and state sizes (bytes)"
        );
        entry.insert(Entry {
            slot,
            state: State::Running(fut),
            signals,
        });
        Some(key)
    }

    /// Pass on signals meant for every connection, and queue the parked
    /// connections whose keep-alive deadline has passed (they resume, find
    /// it expired and close): what [`LiveConns`] does for the connections
    /// it lists.
    fn take_broadcasts(&mut self, ready: &mut Vec<usize>) {
        let signals = self.inbox.signals.swap(0, Ordering::AcqRel);
        if signals != 0 {
            // Each signal wakes its connection: queued in the inbox.
            for (_, e) in self.slots.iter() {
                e.signals.signal(signals);
            }
        }
        if self.inbox.sweep.swap(false, Ordering::AcqRel) {
            let now = Instant::now();
            for (key, e) in self.slots.iter() {
                let keepalive_at = match &e.state {
                    State::Dormant(d) => d.keepalive_at(),
                    State::Parked(c) => c.conn.poll_timeout(),
                    State::Running(_) | State::Polling => None,
                };
                if keepalive_at.is_some_and(|t| t <= now) && e.slot.enqueue() {
                    ready.push(key);
                }
            }
        }
    }

    /// Read the epoll set without waiting: mark what is readable and queue
    /// every connection with an event.
    fn take_events(&mut self, ready: &mut Vec<usize>) {
        loop {
            if let Err(e) = self
                .poll
                .get_mut()
                .poll(&mut self.events, Some(Duration::ZERO))
            {
                if e.kind() == ErrorKind::Interrupted {
                    continue;
                }
                tracing::error!(error = %e, "connection event loop: reading events failed");
                return;
            }
            let mut n = 0;
            for ev in self.events.iter() {
                n += 1;
                let Some(e) = self.slots.get(ev.token().0) else {
                    continue; // closed meanwhile
                };
                if ev.is_read_closed() || ev.is_error() {
                    e.slot.closed.store(true, Ordering::Release);
                }
                if ev.is_readable() {
                    e.slot.readable.store(true, Ordering::Release);
                }
                if e.slot.enqueue() {
                    ready.push(ev.token().0);
                }
            }
            if n < EVENTS {
                return;
            }
        }
    }

    /// Poll one connection (resuming it if parked).
    fn run_slot(&mut self, key: usize) {
        let Some(e) = self.slots.get_mut(key) else {
            return;
        };
        e.slot.queued.store(false, Ordering::Release);
        let mut fut = match std::mem::replace(&mut e.state, State::Polling) {
            State::Running(f) => f,
            State::Parked(mut c) => {
                c.unpark();
                Box::pin(drive(c))
            }
            State::Dormant(d) => {
                let mut c = (*d).wake();
                c.unpark();
                Box::pin(drive(c))
            }
            State::Polling => return,
        };
        let waker = Waker::from(e.slot.clone());
        let mut cx = Context::from_waker(&waker);
        match fut.as_mut().poll(&mut cx) {
            Poll::Pending => e.state = State::Running(fut),
            Poll::Ready(Some(c)) => {
                e.state = match c.into_dormant() {
                    Ok(d) => State::Dormant(d),
                    Err(c) => State::Parked(c),
                }
            }
            // Done: the connection (and with it the socket, which leaves
            // the epoll set as it closes) is gone.
            Poll::Ready(None) => {
                drop(fut);
                self.slots.remove(key);
            }
        }
    }
}

/// A yield inside a reactor's connection: polled again in the next round.
#[derive(Default)]
pub(super) struct YieldTurn(bool);

impl Future for YieldTurn {
    type Output = ();

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        if self.0 {
            return Poll::Ready(());
        }
        self.0 = true;
        cx.waker().wake_by_ref();
        Poll::Pending
    }
}

thread_local! {
    /// The worker's read buffer: a connection reads into it and keeps only
    /// what arrived (see [`ReactorTcp::poll_read_into`]).
    static SCRATCH: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
}

/// A plain-TCP socket in a reactor's epoll set (edge-triggered, reads and
/// writes): a read or write that would block returns `Pending`, and the
/// reactor polls the connection again at its next event or wake-up.
pub(super) struct ReactorTcp {
    sock: mio::net::TcpStream,
    slot: Arc<Slot>,
}

impl ReactorTcp {
    /// Something may be waiting to be read (or the peer closed).
    fn has_input(&self) -> bool {
        self.slot.readable.load(Ordering::Acquire) || self.slot.closed.load(Ordering::Acquire)
    }

    fn read_into(&self, scratch: &mut [u8], buf: &mut BytesMut) -> Poll<std::io::Result<usize>> {
        loop {
            match (&self.sock).read(scratch) {
                Ok(n) => {
                    // A short read drained the socket: the next event says
                    // when more comes (no read that would fail first).
                    if n < scratch.len() {
                        self.slot.readable.store(false, Ordering::Release);
                    }
                    buf.extend_from_slice(&scratch[..n]);
                    return Poll::Ready(Ok(n));
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => {
                    self.slot.readable.store(false, Ordering::Release);
                    return Poll::Pending;
                }
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => return Poll::Ready(Err(e)),
            }
        }
    }
}

impl Transport for ReactorTcp {
    const PARKS: bool = true;
    const IN_REACTOR: bool = true;

    /// Read into the worker's buffer and copy what came into `buf`: the
    /// connection allocates only for the bytes it got (and keeps them only
    /// while a packet is incomplete), not `hint` bytes per read. The copy
    /// is small next to handling what was read (measured: BENCHMARKS.md).
    fn poll_read_into(
        &mut self,
        _cx: &mut Context<'_>,
        buf: &mut BytesMut,
        hint: usize,
    ) -> Poll<std::io::Result<usize>> {
        if !self.has_input() {
            return Poll::Pending;
        }
        let want = hint.clamp(1, READ_MAX);
        SCRATCH.with(|s| match s.try_borrow_mut() {
            Ok(mut s) => {
                if s.len() < READ_MAX {
                    s.resize(READ_MAX, 0);
                }
                self.read_into(&mut s[..want], buf)
            }
            // Not reached (nothing reads while reading); a buffer of its
            // own rather than a panic.
            Err(_) => self.read_into(&mut vec![0; want], buf),
        })
    }

    fn park(mut c: Box<Conn<Self>>, keepalive_at: Option<Instant>) -> Parked<Self> {
        // A parked connection holds no buffer: the empty write buffer, the
        // protocol's packet queues and the session's empty queues go.
        c.wbuf = BytesMut::new();
        c.conn.release_idle_memory();
        c.conn.release_session_memory();
        // The slot is the waker the connection's wake-ups already go to;
        // registered again, then tested: no wake-up is lost.
        let waker = Waker::from(c.stream.slot.clone());
        let mut cx = Context::from_waker(&waker);
        if c.stream.has_input() || c.conn.waker().poll_woken(&mut cx).is_ready() {
            return Parked::NotNow(not_now(c));
        }
        c.live.park_until(keepalive_at);
        c.last_active = Stamp::from(Instant::now());
        c.conn
            .node()
            .stats
            .clients_parked
            .fetch_add(1, Ordering::Relaxed);
        Parked::Kept(c)
    }
}

impl tokio::io::AsyncWrite for ReactorTcp {
    fn poll_write(
        self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        loop {
            match (&self.sock).write(buf) {
                Ok(n) => return Poll::Ready(Ok(n)),
                // The writable edge that follows polls the connection.
                Err(e) if e.kind() == ErrorKind::WouldBlock => return Poll::Pending,
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => return Poll::Ready(Err(e)),
            }
        }
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(self.sock.shutdown(std::net::Shutdown::Write))
    }
}
