//! Plain-TCP connections served by event-loop threads (one per tokio
//! worker) instead of a tokio task and a tokio socket registration each.
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
//! who polls it differ. A reactor is a thread of its own (one per tokio
//! worker thread) that runs in the runtime's context: its connections'
//! timers are the runtime's, and what they spawn runs on the runtime. It
//! blocks in its own epoll set, which holds its sockets and an eventfd
//! ([`mio::Waker`]) through which other threads wake it (deliveries from
//! other threads, engine and store answers, timers): a wake-up queues the
//! connection's key in the reactor's inbox, and costs a system call only
//! when the reactor is waiting. A round polls every connection that has
//! something to do, once; when the round woke more (a device's publish
//! wakes its subscriber's connection), the next round follows at once, and
//! every [`ROUNDS_PER_TURN`] rounds or [`BUSY_SLICE`](super::BUSY_SLICE)
//! the epoll set is read without waiting, so that sockets keep their turn;
//! a busy connection still yields after `BUSY_SLICE` within its own poll.
//! A fleet of quiet devices costs one `epoll_wait` per wake-up, where a
//! reactor nested in tokio's epoll set (until session 15) cost two: tokio's
//! and its own.

use std::cell::{Cell, RefCell};
use std::future::Future;
use std::io::{ErrorKind, Read, Write};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll, Wake, Waker};
use std::time::{Duration, Instant};

use bytes::BytesMut;
use mio::{Events, Interest, Token};
use tokio::sync::mpsc;

use super::{
    drive, new_conn, not_now, Conn, Dormant, LiveConns, Parked, PeerInfo, Transport, READ_MAX,
};
use crate::session::ConnWaker;
use crate::stamp::Stamp;

/// Events taken from the epoll set per system call.
const EVENTS: usize = 1024;

/// The token of the inbox's waker in the epoll set (slab keys stay below
/// 2^32).
const WAKE: Token = Token(usize::MAX);

/// Rounds a reactor runs back to back while more work waits, before it
/// looks at its epoll set again (and at most
/// [`BUSY_SLICE`](super::BUSY_SLICE) of them).
const ROUNDS_PER_TURN: u32 = 8;

/// The reactors of one server; new connections go to them in turn.
pub(super) struct Reactors {
    inboxes: Vec<Arc<Inbox>>,
    next: AtomicUsize,
}

impl Reactors {
    /// Start `n` reactors (at least one), each on a thread of its own that
    /// runs within the current runtime's context (its connections use the
    /// runtime's timers and spawn onto it).
    pub(super) fn start(n: usize, live: Arc<LiveConns>) -> std::io::Result<Reactors> {
        let runtime = tokio::runtime::Handle::current();
        let mut inboxes = Vec::new();
        for i in 0..n.max(1) {
            let poll = mio::Poll::new()?;
            let waker = mio::Waker::new(poll.registry(), WAKE)?;
            let inbox = Arc::new(Inbox::new(waker));
            let reactor = Reactor {
                poll,
                events: Events::with_capacity(EVENTS),
                slots: slab::Slab::new(),
                inbox: inbox.clone(),
                live: live.clone(),
            };
            let rt = runtime.clone();
            let thread = std::thread::Builder::new()
                .name(format!("millet-reactor-{i}"))
                .spawn(move || {
                    let _context = rt.enter();
                    reactor.run();
                })?;
            // Tells the reactor when the runtime goes (its tasks are
            // dropped before its timers stop), and waits for it: the
            // reactor drops its connections without polling them again,
            // and with them what they hold of the broker, so that the last
            // holder closes the store before the process exits.
            runtime.spawn(
                RuntimeGone {
                    inbox: inbox.clone(),
                    thread: Some(thread),
                }
                .wait(),
            );
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
            i.notify();
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
        inbox.notify();
    }
}

/// Held by a task of the runtime that never ends: dropped when the runtime
/// shuts down (tokio waits for its worker threads, and so for this drop).
struct RuntimeGone {
    inbox: Arc<Inbox>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl RuntimeGone {
    async fn wait(self) {
        std::future::pending::<()>().await;
    }
}

impl Drop for RuntimeGone {
    fn drop(&mut self) {
        self.inbox.stop.store(true, Ordering::Release);
        self.inbox.notify();
        if let Some(t) = self.thread.take() {
            // The reactor ends at its next look at the inbox (it never
            // waits on the runtime).
            if t.join().is_err() {
                tracing::error!("connection event loop: its thread panicked");
            }
        }
    }
}

/// What other threads hand a reactor.
pub(super) struct Inbox {
    incoming: parking_lot::Mutex<Vec<Incoming>>,
    /// Keys of connections woken (each queued once until it is polled).
    woken: parking_lot::Mutex<Vec<usize>>,
    /// Interrupts the reactor's wait in its epoll set (an eventfd).
    waker: mio::Waker,
    /// The reactor waits in its epoll set (or is about to): the next
    /// [`Inbox::notify`] must wake it. While it runs, a notify costs no
    /// system call (it looks at its inbox before it waits).
    sleeping: AtomicBool,
    /// [`ConnWaker`] signals for every connection of the reactor, not yet
    /// passed on ([`LiveConns::signal_all`]).
    signals: std::sync::atomic::AtomicU8,
    /// The parked connections' keep-alive deadlines are to be checked
    /// ([`LiveConns::sweep`]).
    sweep: AtomicBool,
    /// The runtime is gone: drop every connection and end.
    stop: AtomicBool,
    /// A failed wake-up was logged (once).
    wake_failed: AtomicBool,
}

impl Inbox {
    fn new(waker: mio::Waker) -> Inbox {
        Inbox {
            incoming: Default::default(),
            woken: Default::default(),
            waker,
            sleeping: AtomicBool::new(false),
            signals: Default::default(),
            sweep: AtomicBool::new(false),
            stop: AtomicBool::new(false),
            wake_failed: AtomicBool::new(false),
        }
    }

    /// Make sure the reactor looks at its inbox: wake it if it waits.
    /// Called after what it is to see was queued. The reactor sets
    /// `sleeping` before its last look at the inbox and its wait, both
    /// sides with sequentially consistent operations: either this swap sees
    /// `sleeping` set and wakes it, or that last look sees what was queued.
    fn notify(&self) {
        if self.sleeping.swap(false, Ordering::SeqCst) {
            if let Err(e) = self.waker.wake() {
                if !self.wake_failed.swap(true, Ordering::Relaxed) {
                    tracing::error!(error = %e, "connection event loop: cannot wake it");
                }
            }
        }
    }

    /// Connections woken, new connections, signals, or the end.
    fn has_work(&self) -> bool {
        !self.woken.lock().is_empty()
            || !self.incoming.lock().is_empty()
            || self.signals.load(Ordering::Acquire) != 0
            || self.sweep.load(Ordering::Acquire)
            || self.stop.load(Ordering::Acquire)
    }

    /// Pass `signal` on to every connection of the reactor.
    pub(super) fn signal_all(&self, signal: u8) {
        self.signals.fetch_or(signal, Ordering::AcqRel);
        self.notify();
    }

    /// Wake the parked connections whose keep-alive deadline has passed.
    pub(super) fn sweep_due(&self) {
        self.sweep.store(true, Ordering::Release);
        self.notify();
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
    /// allocation at 40 bytes (a 48-byte malloc chunk).
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
    /// The connection's own waker, for signals to every connection (the
    /// reactor lists its connections: see [`LiveConns`]). Here rather than
    /// in the slab entry: the slot's allocation stays in the same 48-byte
    /// malloc chunk, and the entry keeps room for the keep-alive deadline.
    signals: Arc<ConnWaker>,
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
            self.inbox.notify();
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
    /// For the sweep ([`Reactor::take_broadcasts`]), which so reads the
    /// slab alone: while parked or dormant, its keep-alive deadline; while
    /// running, the far deadline its task left to the sweep rather than to
    /// a tokio timer ([`sweep_at`]). Read through the state's box instead,
    /// every sweep touched each parked connection's memory: 6% of the event
    /// loop's time in an 18,000-device fleet (session 23's profile).
    keepalive_at: Option<Stamp>,
}

/// The size of a slab entry, for the size guard (`server::size_report`).
#[cfg(test)]
pub(super) fn entry_size() -> usize {
    std::mem::size_of::<Entry>()
}

struct Reactor {
    poll: mio::Poll,
    events: Events,
    slots: slab::Slab<Entry>,
    inbox: Arc<Inbox>,
    live: Arc<LiveConns>,
}

impl Reactor {
    fn run(mut self) {
        let mut ready: Vec<usize> = Vec::new();
        // Rounds run back to back since the last look at the epoll set, and
        // when the first of them ended (the clock is read only when one
        // follows).
        let mut rounds = 0u32;
        let mut turn_start: Option<Instant> = None;
        loop {
            if self.inbox.stop.load(Ordering::Acquire) {
                // The runtime is gone: its timers with it. The connections
                // are dropped unpolled (their sockets close).
                return;
            }
            let incoming = std::mem::take(&mut *self.inbox.incoming.lock());
            for i in incoming {
                if let Some(key) = self.add(i) {
                    ready.push(key);
                }
            }
            self.take_broadcasts(&mut ready);
            ready.append(&mut self.inbox.woken.lock());
            if ready.is_empty() {
                if self.slots.is_empty() && self.live.is_shutting_down() {
                    return;
                }
                self.wait(&mut ready);
                rounds = 0;
                turn_start = None;
                continue;
            }
            for key in ready.drain(..) {
                self.run_slot(key);
            }
            // More work already (typically what this round's connections
            // woke: a device's publish wakes its subscriber's connection):
            // the next round runs at once, without a look at the epoll set
            // (a system call) for up to ROUNDS_PER_TURN rounds or
            // BUSY_SLICE, so that sockets with input still get their turn.
            if self.inbox.has_work() {
                rounds += 1;
                let since = *turn_start.get_or_insert_with(Instant::now);
                if rounds >= ROUNDS_PER_TURN || since.elapsed() >= super::BUSY_SLICE {
                    self.take_events(&mut ready, Some(Duration::ZERO));
                    rounds = 0;
                    turn_start = None;
                }
            } else {
                rounds = 0;
                turn_start = None;
            }
        }
    }

    /// Nothing to do: wait in the epoll set for socket events or a wake-up
    /// (see [`Inbox::notify`] for why none is lost).
    fn wait(&mut self, ready: &mut Vec<usize>) {
        self.inbox.sleeping.store(true, Ordering::SeqCst);
        if self.inbox.has_work() {
            self.inbox.sleeping.store(false, Ordering::SeqCst);
            return;
        }
        self.take_events(ready, None);
        self.inbox.sleeping.store(false, Ordering::SeqCst);
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
        if let Err(e) = self.poll.registry().register(
            &mut i.sock,
            Token(key),
            Interest::READABLE | Interest::WRITABLE,
        ) {
            tracing::warn!(peer = %i.info.addr, error = %e, "cannot register the connection: closed");
            return None;
        }
        let signals: Arc<ConnWaker> = Arc::default();
        let slot = Arc::new(Slot {
            key: key32,
            inbox: self.inbox.clone(),
            queued: AtomicBool::new(true),
            readable: AtomicBool::new(false),
            closed: AtomicBool::new(false),
            signals: signals.clone(),
        });
        let stream = ReactorTcp {
            sock: i.sock,
            slot: slot.clone(),
        };
        let c = new_conn(stream, i.info, self.live.clone(), i.done, signals.clone());
        if self.live.is_shutting_down() {
            signals.signal(ConnWaker::SHUTDOWN);
        }
        let fut: DriveFuture = Box::pin(drive(c, Instant::now()));
        tracing::trace!(
            future = std::mem::size_of_val(&*fut),
            state = std::mem::size_of::<Conn<ReactorTcp>>(),
            "event-loop connection future and state sizes (bytes)"
        );
        entry.insert(Entry {
            slot,
            state: State::Running(fut),
            keepalive_at: None,
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
                e.slot.signals.signal(signals);
            }
        }
        if self.inbox.sweep.swap(false, Ordering::AcqRel) {
            let now = Instant::now();
            let now = Stamp::from(now);
            SWEPT.set(Some(now));
            for (key, e) in self.slots.iter() {
                if e.keepalive_at.is_some_and(|t| t <= now) && e.slot.enqueue() {
                    ready.push(key);
                }
            }
        }
    }

    /// Read the epoll set, waiting at most `timeout` (`None`: until an
    /// event or a wake-up): mark what is readable and queue every
    /// connection with an event.
    fn take_events(&mut self, ready: &mut Vec<usize>, mut timeout: Option<Duration>) {
        loop {
            if let Err(e) = self.poll.poll(&mut self.events, timeout) {
                if e.kind() == ErrorKind::Interrupted {
                    continue;
                }
                tracing::error!(error = %e, "connection event loop: reading events failed");
                // Not a busy loop if it keeps failing.
                std::thread::sleep(Duration::from_millis(10));
                return;
            }
            let mut n = 0;
            for ev in self.events.iter() {
                n += 1;
                if ev.token() == WAKE {
                    continue; // the inbox is read next
                }
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
            timeout = Some(Duration::ZERO);
        }
    }

    /// Poll one connection (resuming it if parked).
    fn run_slot(&mut self, key: usize) {
        let Some(e) = self.slots.get_mut(key) else {
            return;
        };
        e.slot.queued.store(false, Ordering::Release);
        e.keepalive_at = None;
        let mut fut = match std::mem::replace(&mut e.state, State::Polling) {
            State::Running(f) => f,
            State::Parked(mut c) => {
                let now = Instant::now();
                c.unpark(now);
                Box::pin(drive(c, now))
            }
            State::Dormant(d) => {
                let mut c = (*d).wake();
                let now = Instant::now();
                c.unpark(now);
                Box::pin(drive(c, now))
            }
            State::Polling => return,
        };
        let waker = Waker::from(e.slot.clone());
        let mut cx = Context::from_waker(&waker);
        WANTS.set(None);
        // A panic stays with its connection (dropped below) rather than
        // ending the loop and every other connection with it. None is
        // expected; the one known case is a poll that races the runtime's
        // shutdown (its timers panic when polled after it).
        let polled =
            std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| fut.as_mut().poll(&mut cx)));
        let polled = match polled {
            Ok(p) => p,
            Err(_) => {
                if !self.inbox.stop.load(Ordering::Acquire) {
                    tracing::error!("connection event loop: a connection panicked; closed");
                }
                Poll::Ready(None)
            }
        };
        match polled {
            Poll::Pending => {
                e.keepalive_at = WANTS.take();
                e.state = State::Running(fut);
            }
            Poll::Ready(Some(c)) => {
                e.keepalive_at = c.conn.poll_deadline();
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
    /// When this reactor's sweep last ran.
    static SWEPT: Cell<Option<Stamp>> = const { Cell::new(None) };
    /// The deadline the connection being polled leaves to the sweep.
    static WANTS: Cell<Option<Stamp>> = const { Cell::new(None) };
}

/// For a connection's task in a reactor, waiting: wake it through the
/// sweep once `at` has passed (checked every SWEEP_EVERY, as a parked
/// connection's keep-alive is), instead of through a timer of its own.
pub(super) fn sweep_at(at: Stamp) {
    WANTS.set(Some(at));
}

/// Whether this reactor's last sweep found `at` passed (and so queued the
/// connection that left it, see [`sweep_at`]).
pub(super) fn swept_past(at: Stamp) -> bool {
    SWEPT.get().is_some_and(|s| at <= s)
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

    fn park(mut c: Box<Conn<Self>>, keepalive_at: Option<Stamp>, now: Instant) -> Parked<Self> {
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
            return Parked::NotNow(not_now(c, now));
        }
        c.live.park_until(keepalive_at);
        c.last_active = Stamp::from(now);
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
