//! The IO driver: TCP and TLS listeners, the connections' drivers, the
//! broker ticker, and graceful drain on SIGINT / SIGTERM. It also runs the
//! security layer's IO: ban and connection-rate checks at accept, TLS
//! handshakes, the (async) authentication chain before a CONNECT reaches the
//! state machine, and reloads on SIGHUP / file change.
//!
//! Each connection is one [`drive`] future over its [`Conn`] state. Plain
//! TCP connections (PROXY protocol included) run in per-worker event loops
//! ([`reactor`]: one epoll set and slab per worker, no tokio task or socket
//! registration per connection); TLS and WebSocket connections run as one
//! tokio task each (and so does plain TCP with `limits.tcp_reactor = false`).
//! A quiet connection parks: in a reactor it becomes a [`Dormant`] record
//! in the slab, elsewhere its task ends and a [`Parking`] waker keeps it.
//!
//! The driver only moves bytes, wake-ups and timers in and out of
//! [`crate::protocol::Connection`]; it makes no protocol decisions. It waits
//! for readability without holding a read buffer, so an idle connection keeps
//! no per-connection buffers.

use std::io::ErrorKind;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::BytesMut;
use millet_codec::{decode, ReasonCode};
use tokio::io::{AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch};

use crate::broker::{AuthFailure, Broker};
use crate::config::Config;
use crate::engine::{AuthenticateRequest, Call, Completion, Engine, Request};
use crate::protocol::{ConnectVerdict, Connection, Held, ProtocolError, Shared};
use crate::security::quota::{ConnectionPermit, ConnectionRateLimiter};
use crate::security::tls::ReloadableTls;
use crate::security::{AuthResult, ConnectRequest, Security};
use crate::session::ConnWaker;
use crate::stamp::Stamp;

mod reactor;

/// Read sizes adapt between these bounds: a read that fills the buffer
/// doubles the next one, one that doesn't halves it. Idle and lightly loaded
/// connections (the fleet's common case) read small, so connection bursts and
/// retained pieces of the read buffer stay small; busy publishers read big.
const READ_MIN: usize = 512;
const READ_MAX: usize = 64 * 1024;
/// Write buffers above this capacity are released after each flush.
const KEEP_WRITE_CAPACITY: usize = 8 * 1024;
/// Longest a connection task runs before it lets other tasks run: checked
/// every 16 packets while it handles a read batch, and after every event it
/// got without waiting (a client sending big packets back to back reads one
/// per event, so the packet count alone would never trip).
const BUSY_SLICE: Duration = Duration::from_millis(2);
/// While this much waits to be written, a connection neither reads from its
/// client nor takes more messages from its session.
const WRITE_HIGH: usize = 64 * 1024;

/// Everything in `wbuf` went out: keep a small buffer, release a big one.
fn wbuf_done(wbuf: &mut BytesMut) {
    if wbuf.capacity() > KEEP_WRITE_CAPACITY {
        *wbuf = BytesMut::new();
    } else {
        wbuf.clear();
    }
}
/// Lingering close: after a server-initiated close the client gets this long
/// and this many bytes to stop sending before the socket is closed.
const LINGER_TIME: Duration = Duration::from_secs(2);
const LINGER_BYTES: usize = 1024 * 1024;

/// Every connection's waker, so that the server can tell them all
/// something (shutdown, a new ban) without each task holding a receiver
/// and a future to wait on it: an idle connection's task stays small. Also
/// the keep-alive deadlines of parked connections (see [`park`]), which
/// have no timer of their own: [`LiveConns::sweep`] wakes those that are due.
/// And the engine the connections call (one per server, not per connection).
///
/// Connections in a reactor are not listed here: their reactor's slab
/// lists them already, so each reactor passes signals on to its own and
/// sweeps its own parked ones (told through its inbox, `reactors`).
struct LiveConns {
    conns: parking_lot::Mutex<slab::Slab<LiveEntry>>,
    reactors: parking_lot::Mutex<Vec<Arc<reactor::Inbox>>>,
    shutting_down: std::sync::atomic::AtomicBool,
    /// The broker and the engine, as every connection's protocol sees them.
    shared: Arc<Shared>,
}

struct LiveEntry {
    waker: Arc<ConnWaker>,
    /// Set while parked with a keep-alive deadline.
    parked_until: Option<Instant>,
}

impl LiveConns {
    fn new(shared: Arc<Shared>) -> LiveConns {
        LiveConns {
            conns: Default::default(),
            reactors: Default::default(),
            shutting_down: Default::default(),
            shared,
        }
    }

    /// Register a connection; signalled at once if shutdown has begun.
    fn register(self: &Arc<Self>, waker: &Arc<ConnWaker>) -> LiveConn {
        let key = self.conns.lock().insert(LiveEntry {
            waker: waker.clone(),
            parked_until: None,
        });
        if self
            .shutting_down
            .load(std::sync::atomic::Ordering::Acquire)
        {
            waker.signal(ConnWaker::SHUTDOWN);
        }
        LiveConn {
            conns: self.clone(),
            key,
        }
    }

    /// A connection in a reactor: its reactor lists it (see above).
    fn unlisted(self: &Arc<Self>) -> LiveConn {
        LiveConn {
            conns: self.clone(),
            key: LiveConn::UNLISTED,
        }
    }

    fn signal_all(&self, signal: u8) {
        for (_, e) in self.conns.lock().iter() {
            e.waker.signal(signal);
        }
        for r in self.reactors.lock().iter() {
            r.signal_all(signal);
        }
    }

    fn is_shutting_down(&self) -> bool {
        self.shutting_down
            .load(std::sync::atomic::Ordering::Acquire)
    }

    fn shutdown(&self) {
        self.shutting_down
            .store(true, std::sync::atomic::Ordering::Release);
        self.signal_all(ConnWaker::SHUTDOWN);
    }

    /// Wake the parked connections whose keep-alive deadline has come (they
    /// resume, find it expired and close). A pass over every connection:
    /// a few nanoseconds each, every [`SWEEP_EVERY`].
    fn sweep(&self, now: Instant) {
        let mut due = Vec::new();
        for (_, e) in self.conns.lock().iter_mut() {
            if e.parked_until.is_some_and(|t| t <= now) {
                e.parked_until = None;
                due.push(e.waker.clone());
            }
        }
        for w in due {
            w.signal(0);
        }
        for r in self.reactors.lock().iter() {
            r.sweep_due();
        }
    }
}

/// A connection's place in [`LiveConns`], given back on drop.
struct LiveConn {
    conns: Arc<LiveConns>,
    key: usize,
}

impl LiveConn {
    /// The key of a connection that its reactor lists.
    const UNLISTED: usize = usize::MAX;

    /// Parking with this keep-alive deadline (`None`: no keep-alive).
    fn park_until(&self, deadline: Option<Stamp>) {
        if self.key == LiveConn::UNLISTED {
            return; // its reactor sweeps it
        }
        if let Some(e) = self.conns.conns.lock().get_mut(self.key) {
            e.parked_until = deadline.map(Stamp::instant);
        }
    }
}

impl Drop for LiveConn {
    fn drop(&mut self) {
        if self.key == LiveConn::UNLISTED {
            return;
        }
        self.conns.conns.lock().try_remove(self.key);
    }
}

/// A running server: its bound addresses, and a handle to stop it.
pub struct Server {
    pub addrs: Vec<SocketAddr>,
    pub broker: Arc<Broker>,
    /// The admin API's address, if it runs ([`crate::admin`]).
    pub admin_addr: Option<SocketAddr>,
    admin: Option<crate::admin::AdminServer>,
    /// MQTT listeners bound and not draining (the admin API's `/readyz`).
    ready: Arc<std::sync::atomic::AtomicBool>,
    live: Arc<LiveConns>,
    reactors: Option<Arc<reactor::Reactors>>,
    /// Cluster mode's link to the other nodes (left at shutdown).
    link: Option<Arc<crate::engine::nats::NatsLink>>,
    shutdown: watch::Sender<bool>,
    done: mpsc::Receiver<()>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Server {
    /// Bind every listener and start serving.
    pub async fn start(config: Config) -> anyhow::Result<Server> {
        let security = build_security(&config)?;
        // The embedded store: opened (and recovered) before any listener.
        let broker = Broker::open(config.clone(), Instant::now())
            .map_err(|e| anyhow::anyhow!("cannot open the store: {e}"))?;
        let broker = Arc::new(with_security(broker, security));
        Self::start_with(broker).await
    }

    pub async fn start_with(broker: Arc<Broker>) -> anyhow::Result<Server> {
        let (shutdown, shutdown_rx) = watch::channel(false);
        let (done_tx, done) = mpsc::channel::<()>(1);
        let mut addrs = Vec::new();
        let mut tasks = Vec::new();
        let security = broker.node.security().cloned();
        let tls = security.as_ref().and_then(|s| s.tls.clone());
        if !broker.node.config.tls_listen.is_empty() && tls.is_none() {
            anyhow::bail!("tls_listen needs [security.tls]");
        }
        if !broker.node.config.wss_listen.is_empty() && tls.is_none() {
            anyhow::bail!("wss_listen needs [security.tls]");
        }
        let preauth = PreAuthBudget::new(broker.node.config.limits.preauth_memory);
        let link = match broker.node.config.engine.kind {
            crate::config::EngineKind::Nats => {
                Some(crate::engine::nats::NatsLink::start(&broker).await?)
            }
            crate::config::EngineKind::Embedded => None,
        };
        let live = Arc::new(LiveConns::new(Shared::with_hooks(
            broker.node.clone(),
            crate::engine::from_config(&broker, link.clone()),
            crate::hooks::from_config(&broker)?,
        )));
        // The admin API first: `/readyz` says "not ready" until every MQTT
        // listener is bound.
        let ready = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let admin = crate::admin::start(broker.clone(), ready.clone()).await?;
        let ws = Arc::new(crate::ws::WsSettings::from_config(&broker.node.config));
        // (Not aborted at shutdown like `tasks`: a reactor ends once its
        // connections have closed.)
        let reactors = if broker.node.config.limits.tcp_reactor {
            let workers = tokio::runtime::Handle::current().metrics().num_workers();
            Some(Arc::new(reactor::Reactors::start(workers, live.clone())?))
        } else {
            None
        };
        let c = &broker.node.config;
        let plain = c.listen.iter().map(|a| (*a, None, None));
        let secure = c.tls_listen.iter().map(|a| (*a, tls.clone(), None));
        let web = c.ws_listen.iter().map(|a| (*a, None, Some(ws.clone())));
        let web_tls = c.wss_listen.iter();
        let web_tls = web_tls.map(|a| (*a, tls.clone(), Some(ws.clone())));
        for (addr, tls, ws) in plain.chain(secure).chain(web).chain(web_tls) {
            let listener = match bind(addr) {
                Ok(l) => l,
                // A busy built-in default leaves WebSocket off (like the admin API).
                Err(e) if ws.is_some() && broker.node.config.is_default_ws_listen(addr) => {
                    tracing::warn!(%addr, error = %e, "cannot listen for MQTT over WebSocket on the default address: WebSocket listener off (set ws_listen / wss_listen, or --no-ws)");
                    continue;
                }
                Err(e) => anyhow::bail!("cannot listen on {addr}: {e}"),
            };
            let local = listener.local_addr()?;
            if ws.is_some() {
                let scheme = if tls.is_some() { "wss" } else { "ws" };
                tracing::info!(addr = %local, path = %broker.node.config.ws_path, "listening for MQTT over WebSocket ({scheme})");
            } else if tls.is_some() {
                tracing::info!(addr = %local, "listening for MQTT over TLS");
            } else {
                tracing::info!(addr = %local, "listening for MQTT over TCP");
            }
            addrs.push(local);
            let rate = match &security {
                Some(s) => s.connection_rate_limiter(),
                None => ConnectionRateLimiter::new(0.0, 0.0, Instant::now()),
            };
            let ctx = Arc::new(ListenerCtx {
                configured: addr,
                tls,
                ws,
                proxy_protocol: broker.node.config.proxy_protocol_listeners.contains(&addr),
                rate,
                tls_log: PerAddressThrottle::default(),
                preauth: preauth.clone(),
                live: live.clone(),
                reactors: reactors.clone(),
            });
            tasks.push(tokio::spawn(accept_loop(
                listener,
                ctx,
                broker.clone(),
                shutdown_rx.clone(),
                done_tx.clone(),
            )));
        }
        if let Some(s) = &security {
            let all: Vec<SocketAddr> = broker
                .node
                .config
                .listen
                .iter()
                .chain(&broker.node.config.tls_listen)
                .chain(&broker.node.config.ws_listen)
                .chain(&broker.node.config.wss_listen)
                .copied()
                .collect();
            s.log_posture(&all);
            tasks.extend(spawn_reloaders(s.clone()));
            // A ban added at run time: every connection checks itself.
            let mut added = s.bans.watch_added();
            let live = live.clone();
            tasks.push(tokio::spawn(async move {
                while added.changed().await.is_ok() {
                    live.signal_all(ConnWaker::BANS);
                }
            }));
        }
        tasks.push(tokio::spawn(ticker(live.clone(), shutdown_rx.clone())));
        drop(done_tx);
        ready.store(true, std::sync::atomic::Ordering::Release);
        Ok(Server {
            addrs,
            broker,
            admin_addr: admin.as_ref().map(|a| a.addr),
            admin,
            ready,
            live,
            reactors,
            link,
            shutdown,
            done,
            tasks,
        })
    }

    /// Stop accepting, send DISCONNECT 0x8B to v5 clients, flush, and wait
    /// (at most `grace`) for every connection to finish.
    pub async fn shutdown(mut self, grace: std::time::Duration) {
        self.ready
            .store(false, std::sync::atomic::Ordering::Release);
        let _ = self.shutdown.send(true);
        self.live.shutdown();
        if let Some(r) = &self.reactors {
            r.wake_all();
        }
        for t in &self.tasks {
            t.abort();
        }
        // Connection tasks hold `done` senders; recv() returns None when all are gone.
        let _ = tokio::time::timeout(grace, self.done.recv()).await;
        if let Some(link) = self.link.take() {
            link.leave().await;
        }
        // The admin API answers (`/readyz`: 503) while connections drain.
        if let Some(a) = self.admin.take() {
            a.shutdown(Duration::from_secs(1)).await;
        }
    }
}

/// Build the security layer from `config.security` (files are read here).
pub fn build_security(config: &Config) -> anyhow::Result<Arc<Security>> {
    Ok(Arc::new(Security::from_config(config.security.clone())?))
}

/// Install `security` in `broker`, with its SCRAM authenticator (v5 AUTH)
/// when `[security.auth.scram]` is configured.
pub fn with_security(broker: Broker, security: Arc<Security>) -> Broker {
    let broker = match &security.scram {
        Some(s) => broker.with_authenticator(s.clone()),
        None => broker,
    };
    broker.with_security(security)
}

/// Reload the security files on SIGHUP and when they change (polled), and
/// drop expired bans.
fn spawn_reloaders(security: Arc<Security>) -> Vec<tokio::task::JoinHandle<()>> {
    let mut tasks = Vec::new();
    #[cfg(unix)]
    match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()) {
        Ok(mut hup) => {
            let s = security.clone();
            tasks.push(tokio::spawn(async move {
                while hup.recv().await.is_some() {
                    for e in s.reload() {
                        tracing::error!("security reload failed, previous state kept: {e}");
                    }
                }
            }));
        }
        Err(e) => tracing::warn!(error = %e, "cannot handle SIGHUP; reload on file change only"),
    }
    tasks.push(tokio::spawn(async move {
        let mut every = tokio::time::interval(SECURITY_WATCH_INTERVAL);
        every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            every.tick().await;
            for e in security.reload_if_changed().unwrap_or_default() {
                tracing::error!("security reload failed, previous state kept: {e}");
            }
            security.bans.prune(Instant::now());
        }
    }));
    tasks
}

/// How often the security files are checked for changes.
const SECURITY_WATCH_INTERVAL: Duration = Duration::from_secs(1);

/// One listener's shared state.
struct ListenerCtx {
    /// The address as configured: the posture and `auth.anonymous_listeners`
    /// refer to it.
    configured: SocketAddr,
    /// `Some` on a TLS listener.
    tls: Option<Arc<ReloadableTls>>,
    /// `Some` on a WebSocket listener (over TLS with `tls`).
    ws: Option<Arc<crate::ws::WsSettings>>,
    /// Connections start with a PROXY protocol header ([`crate::proxy`]).
    proxy_protocol: bool,
    rate: ConnectionRateLimiter,
    /// Throttles the info line for certificate failures.
    tls_log: PerAddressThrottle,
    preauth: Arc<PreAuthBudget>,
    live: Arc<LiveConns>,
    /// Plain-TCP connections' event loops (`limits.tcp_reactor`).
    reactors: Option<Arc<reactor::Reactors>>,
}

/// Lets one event per address and kind through per
/// [`PerAddressThrottle::PERIOD`] (bounded: forgets everything when it holds
/// too many). Per kind, so an operator who first tries without a
/// certificate and then with a wrong one sees both reasons.
#[derive(Default)]
struct PerAddressThrottle(
    parking_lot::Mutex<std::collections::HashMap<(std::net::IpAddr, String), Instant>>,
);

impl PerAddressThrottle {
    const PERIOD: Duration = Duration::from_secs(60);
    const MAX_ADDRESSES: usize = 4096;

    fn allow(&self, ip: std::net::IpAddr, kind: &str, now: Instant) -> bool {
        let mut m = self.0.lock();
        if m.len() >= Self::MAX_ADDRESSES {
            m.retain(|_, t| now.duration_since(*t) < Self::PERIOD);
            if m.len() >= Self::MAX_ADDRESSES {
                m.clear();
            }
        }
        let key = (ip, kind.to_string());
        match m.get(&key) {
            Some(t) if now.duration_since(*t) < Self::PERIOD => false,
            _ => {
                m.insert(key, now);
                true
            }
        }
    }
}

/// A TLS handshake error caused by a certificate (the client's, or the
/// client refusing ours), in words; `None` for other failures (a client
/// that went away, a port scan, a protocol mismatch).
fn certificate_problem(e: &std::io::Error) -> Option<String> {
    let err = e.get_ref()?.downcast_ref::<rustls::Error>()?;
    let text = err.to_string();
    let hint = if text.contains("UnsupportedCertVersion") {
        ": the client certificate is X.509 v1; client certificates must be v3 (see the README's TLS recipe)"
    } else {
        ""
    };
    match err {
        rustls::Error::InvalidCertificate(_) | rustls::Error::NoCertificatesPresented => {
            Some(format!("client certificate refused: {text}{hint}"))
        }
        rustls::Error::AlertReceived(a)
            if matches!(
                a,
                rustls::AlertDescription::BadCertificate
                    | rustls::AlertDescription::UnknownCA
                    | rustls::AlertDescription::CertificateExpired
                    | rustls::AlertDescription::CertificateUnknown
                    | rustls::AlertDescription::UnsupportedCertificate
                    | rustls::AlertDescription::CertificateRevoked
            ) =>
        {
            Some(format!("the client refused the server certificate ({a:?})"))
        }
        _ => None,
    }
}

/// What the driver knows about a connection, for authentication.
struct PeerInfo {
    addr: SocketAddr,
    listener: SocketAddr,
    /// Identity (CN / SAN) of a verified client certificate.
    tls_identity: Option<String>,
    /// This connection's share of the memory budget of connections that
    /// have not completed CONNECT (released when the info goes, at CONNECT
    /// accepted or close).
    preauth: PreAuthCharge,
    /// `tcp`, `tls`, `ws` or `wss`, for the connect log line.
    transport: &'static str,
    /// The proxy's own address when a PROXY protocol header supplied
    /// `addr`.
    proxy: Option<SocketAddr>,
}

impl ListenerCtx {
    /// The listener's transport, as the connect log line names it.
    fn transport(&self) -> &'static str {
        match (self.ws.is_some(), self.tls.is_some()) {
            (false, false) => "tcp",
            (false, true) => "tls",
            (true, false) => "ws",
            (true, true) => "wss",
        }
    }
}

/// Read-buffer bytes held by connections that have not completed CONNECT,
/// against `limits.preauth_memory` (shared by all listeners).
struct PreAuthBudget {
    held: std::sync::atomic::AtomicUsize,
    limit: usize,
    /// Connections closed for the budget since the last log line.
    refused: std::sync::atomic::AtomicU64,
    last_log: parking_lot::Mutex<Option<Instant>>,
}

impl PreAuthBudget {
    fn new(limit: usize) -> Arc<PreAuthBudget> {
        Arc::new(PreAuthBudget {
            held: Default::default(),
            limit,
            refused: Default::default(),
            last_log: parking_lot::Mutex::new(None),
        })
    }

    /// Count a refusal; log at most once every 10 s with the count.
    fn refuse(&self, peer: SocketAddr, now: Instant) {
        use std::sync::atomic::Ordering;
        self.refused.fetch_add(1, Ordering::Relaxed);
        let mut last = self.last_log.lock();
        if last.is_none_or(|t| now.duration_since(t) >= Duration::from_secs(10)) {
            *last = Some(now);
            let n = self.refused.swap(0, Ordering::Relaxed);
            tracing::warn!(%peer, closed = n, limit = self.limit,
                "connections that have not completed CONNECT hold limits.preauth_memory bytes: closing new ones (count since the last line)");
        }
    }
}

/// Read-buffer bytes a connection may hold before CONNECT without drawing on
/// the [`PreAuthBudget`]: an ordinary CONNECT never touches the budget, so
/// connections hogging it cannot lock out well-behaved clients.
const PREAUTH_FREE: usize = 4096;

/// One connection's share of the [`PreAuthBudget`]; released on drop.
struct PreAuthCharge {
    budget: Arc<PreAuthBudget>,
    charged: usize,
}

impl PreAuthCharge {
    fn new(budget: Arc<PreAuthBudget>) -> PreAuthCharge {
        PreAuthCharge { budget, charged: 0 }
    }

    /// Hold `bytes` now instead of what was charged before; false (and
    /// nothing charged) if that would exceed the budget.
    fn set(&mut self, bytes: usize) -> bool {
        use std::sync::atomic::Ordering;
        if bytes <= self.charged {
            self.budget
                .held
                .fetch_sub(self.charged - bytes, Ordering::Relaxed);
            self.charged = bytes;
            return true;
        }
        let more = bytes - self.charged;
        let before = self.budget.held.fetch_add(more, Ordering::Relaxed);
        if before + more > self.budget.limit {
            self.budget.held.fetch_sub(more, Ordering::Relaxed);
            return false;
        }
        self.charged = bytes;
        true
    }
}

impl Drop for PreAuthCharge {
    fn drop(&mut self) {
        self.set(0);
    }
}

/// Listen with a deep backlog (capped by the kernel's somaxconn): fleets
/// reconnect in bursts, and a full SYN queue costs a client a 1 s retransmit.
fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let socket = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(LISTEN_BACKLOG)
}

/// Accept backlog requested from the kernel.
const LISTEN_BACKLOG: u32 = 8192;

async fn accept_loop(
    listener: TcpListener,
    ctx: Arc<ListenerCtx>,
    broker: Arc<Broker>,
    mut shutdown: watch::Receiver<bool>,
    done: mpsc::Sender<()>,
) {
    loop {
        tokio::select! {
            r = listener.accept() => match r {
                Ok((stream, peer)) => {
                    let now = Instant::now();
                    if let Some(sec) = broker.node.security() {
                        if let Some(ban) = sec.bans.ip_banned(peer.ip(), now) {
                            tracing::debug!(%peer, %ban, "banned address: connection closed");
                            continue;
                        }
                    }
                    if !ctx.rate.allow(now) {
                        tracing::debug!(%peer, listener = %ctx.configured, "connection rate limit: connection closed");
                        continue;
                    }
                    let _ = stream.set_nodelay(true);
                    if ctx.proxy_protocol {
                        tokio::spawn(accept_proxied(stream, peer, ctx.clone(), broker.clone(), done.clone()));
                        continue;
                    }
                    let broker = broker.clone();
                    let live = ctx.live.clone();
                    let done = done.clone();
                    let info = PeerInfo { addr: peer, listener: ctx.configured, tls_identity: None, preauth: PreAuthCharge::new(ctx.preauth.clone()), transport: ctx.transport(), proxy: None };
                    if let Some(ws) = &ctx.ws {
                        tokio::spawn(accept_ws(stream, ctx.clone(), ws.clone(), info, broker, live, done));
                        continue;
                    }
                    if let (None, Some(reactors)) = (&ctx.tls, &ctx.reactors) {
                        // Out of tokio's hands: the reactor's epoll set holds it.
                        match stream.into_std() {
                            Ok(sock) => reactors.serve(sock, Box::new(info), done),
                            Err(e) => tracing::debug!(%peer, error = %e, "connection lost at accept"),
                        }
                        continue;
                    }
                    let Some(tls) = &ctx.tls else {
                        let fut = serve(stream, Box::new(info), live, done);
                        tracing::trace!(
                            task = std::mem::size_of_val(&fut),
                            state = std::mem::size_of::<Conn<TcpStream>>(),
                            connection = std::mem::size_of::<Connection>(),
                            "connection task and state sizes (bytes)"
                        );
                        tokio::spawn(fut);
                        continue;
                    };
                    tokio::spawn(accept_tls(stream, tls.clone(), ctx.clone(), info, broker, live, done));
                }
                Err(e) => {
                    // EMFILE and friends: back off briefly instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                }
            },
            _ = shutdown.changed() => return,
        }
    }
}

/// A TLS listener's connection: the handshake within the connect timeout,
/// then served.
async fn accept_tls(
    stream: TcpStream,
    tls: Arc<ReloadableTls>,
    ctx: Arc<ListenerCtx>,
    mut info: PeerInfo,
    broker: Arc<Broker>,
    live: Arc<LiveConns>,
    done: mpsc::Sender<()>,
) {
    let peer = info.addr;
    let acceptor = tls.acceptor();
    let limit = Duration::from_secs(broker.node.config.limits.connect_timeout.max(1));
    match tokio::time::timeout(limit, acceptor.accept(stream)).await {
        Ok(Ok(s)) => {
            info.tls_identity = crate::security::tls::peer_identity(s.get_ref().1);
            serve(s, Box::new(info), live, done).await;
        }
        Ok(Err(e)) => match certificate_problem(&e) {
            Some(why) if ctx.tls_log.allow(peer.ip(), &why, Instant::now()) => {
                tracing::info!(%peer, "TLS handshake failed: {why} (logged once a minute per address)");
            }
            _ => tracing::debug!(%peer, error = %e, "TLS handshake failed"),
        },
        Err(_) => tracing::debug!(%peer, "TLS handshake timed out"),
    }
}

/// A connection on a PROXY-protocol listener: the header first (within the
/// connect timeout; without one the connection is closed, with one log
/// line a minute per address), then the client's address from it is the
/// peer for bans, logs and everything else, and the connection goes on as
/// on any listener (TLS, WebSocket, MQTT).
async fn accept_proxied(
    mut stream: TcpStream,
    proxy: SocketAddr,
    ctx: Arc<ListenerCtx>,
    broker: Arc<Broker>,
    done: mpsc::Sender<()>,
) {
    let limit = Duration::from_secs(broker.node.config.limits.connect_timeout.max(1));
    let peer = match tokio::time::timeout(limit, crate::proxy::read_header(&mut stream, proxy))
        .await
    {
        Ok(Ok(peer)) => peer,
        Ok(Err(crate::proxy::ProxyError::Closed)) => {
            tracing::debug!(peer = %proxy, "closed before its PROXY protocol header");
            return;
        }
        Ok(Err(e)) => {
            if ctx
                .tls_log
                .allow(proxy.ip(), "proxy header", Instant::now())
            {
                tracing::info!(peer = %proxy, listener = %ctx.configured, "{e}: connection closed (PROXY protocol listener; logged once a minute per address)");
            }
            return;
        }
        Err(_) => {
            if ctx
                .tls_log
                .allow(proxy.ip(), "proxy header", Instant::now())
            {
                tracing::info!(peer = %proxy, listener = %ctx.configured, "no PROXY protocol header within the connect timeout: connection closed (logged once a minute per address)");
            }
            return;
        }
    };
    tracing::debug!(%peer, proxy = %proxy, "PROXY protocol header");
    if let Some(sec) = broker.node.security() {
        if let Some(ban) = sec.bans.ip_banned(peer.ip(), Instant::now()) {
            tracing::debug!(%peer, %proxy, %ban, "banned address: connection closed");
            return;
        }
    }
    let live = ctx.live.clone();
    let info = PeerInfo {
        addr: peer,
        listener: ctx.configured,
        tls_identity: None,
        preauth: PreAuthCharge::new(ctx.preauth.clone()),
        transport: ctx.transport(),
        // v2 LOCAL and v1 UNKNOWN headers carry no address: the proxy's own
        // is the peer then.
        proxy: (peer != proxy).then_some(proxy),
    };
    if let Some(ws) = &ctx.ws {
        accept_ws(stream, ctx.clone(), ws.clone(), info, broker, live, done).await;
    } else if let Some(tls) = &ctx.tls {
        accept_tls(stream, tls.clone(), ctx.clone(), info, broker, live, done).await;
    } else if let Some(reactors) = &ctx.reactors {
        match stream.into_std() {
            Ok(sock) => reactors.serve(sock, Box::new(info), done),
            Err(e) => tracing::debug!(%peer, error = %e, "connection lost after its PROXY header"),
        }
    } else {
        serve(stream, Box::new(info), live, done).await;
    }
}

/// A WebSocket listener's connection: TLS (wss), then the HTTP upgrade,
/// together within the connect timeout and charged to the pre-auth memory
/// budget; then served like any other connection.
async fn accept_ws(
    stream: TcpStream,
    ctx: Arc<ListenerCtx>,
    ws: Arc<crate::ws::WsSettings>,
    mut info: PeerInfo,
    broker: Arc<Broker>,
    live: Arc<LiveConns>,
    done: mpsc::Sender<()>,
) {
    let peer = info.addr;
    let mut charge = PreAuthCharge {
        budget: ctx.preauth.clone(),
        charged: 0,
    };
    if !charge.set(crate::ws::HANDSHAKE_MAX_BYTES.saturating_sub(PREAUTH_FREE)) {
        ctx.preauth.refuse(peer, Instant::now());
        return;
    }
    let limit = Duration::from_secs(broker.node.config.limits.connect_timeout.max(1));
    let deadline = tokio::time::Instant::now() + limit;
    let Some(tls) = &ctx.tls else {
        return upgrade_and_serve(stream, deadline, &ws, charge, info, live, done).await;
    };
    let s = match tokio::time::timeout_at(deadline, tls.acceptor().accept(stream)).await {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => {
            match certificate_problem(&e) {
                Some(why) if ctx.tls_log.allow(peer.ip(), &why, Instant::now()) => {
                    tracing::info!(%peer, "TLS handshake failed: {why} (logged once a minute per address)");
                }
                _ => tracing::debug!(%peer, error = %e, "TLS handshake failed"),
            }
            return;
        }
        Err(_) => {
            tracing::debug!(%peer, "TLS handshake timed out");
            return;
        }
    };
    info.tls_identity = crate::security::tls::peer_identity(s.get_ref().1);
    upgrade_and_serve(s, deadline, &ws, charge, info, live, done).await;
}

/// The HTTP upgrade of a ws / wss connection by `deadline`, then serve it;
/// the pre-auth `charge` for the handshake ends with the upgrade.
async fn upgrade_and_serve<S>(
    stream: S,
    deadline: tokio::time::Instant,
    ws: &crate::ws::WsSettings,
    charge: PreAuthCharge,
    info: PeerInfo,
    live: Arc<LiveConns>,
    done: mpsc::Sender<()>,
) where
    S: tokio::io::AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let peer = info.addr;
    match tokio::time::timeout_at(deadline, crate::ws::accept(stream, ws, peer)).await {
        Ok(Some(s)) => {
            drop(charge);
            serve(s, Box::new(info), live, done).await;
        }
        Ok(None) => {}
        Err(_) => tracing::debug!(%peer, "WebSocket upgrade timed out"),
    }
}

/// How often the node's clock ticks.
const TICK: Duration = Duration::from_millis(250);

/// The node's clock: the engine's deadlines (wills, expiry, `$SYS`) and
/// the parked connections' keep-alive sweep.
async fn ticker(live: Arc<LiveConns>, mut shutdown: watch::Receiver<bool>) {
    let mut every = tokio::time::interval(TICK);
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut swept = Instant::now();
    loop {
        tokio::select! {
            _ = every.tick() => {
                let now = Instant::now();
                live.shared.engine.handle_timeout(now);
                // Every other tick: a tick runs a little after its time, so
                // an exact comparison would skip one now and then and sweep
                // after 750 ms.
                if now.duration_since(swept) + TICK / 2 >= SWEEP_EVERY {
                    live.sweep(now);
                    swept = now;
                }
            }
            _ = shutdown.changed() => return,
        }
    }
}

/// A byte stream a connection task reads and writes: TCP or TLS over TCP.
trait Transport: AsyncWrite + Unpin + Send {
    /// Read what is available into `buf`, reserving about `hint` bytes
    /// (TCP: only once the socket is readable, so waiting holds no buffer).
    /// `Ok(0)`: end of stream.
    fn poll_read_into(
        &mut self,
        cx: &mut Context<'_>,
        buf: &mut BytesMut,
        hint: usize,
    ) -> Poll<std::io::Result<usize>>;

    /// Whether a quiet connection on this transport may be parked (see
    /// [`park`]): its readiness can be waited for without its task.
    const PARKS: bool = false;

    /// For parking: `Pending` (and `cx` registered for readability) if
    /// nothing is there to read. Transports that do not park say `Ready`.
    fn poll_park(&mut self, _cx: &mut Context<'_>) -> Poll<()> {
        Poll::Ready(())
    }

    /// The CONNECT was accepted: limits on unauthenticated clients end
    /// (WebSocket: see [`crate::ws::Capped`]).
    fn connect_accepted(&mut self) {}

    /// Polled by a [`reactor`] rather than run as a tokio task: its yields
    /// wake it at once (the reactor polls it again next round).
    const IN_REACTOR: bool = false;

    /// Park a quiet connection (see [`park`]; a reactor's connections
    /// park in their reactor).
    fn park(c: Box<Conn<Self>>, keepalive_at: Option<Stamp>, now: Instant) -> Parked<Self>
    where
        Self: Sized + 'static,
    {
        match park(c, keepalive_at, now) {
            Ok(()) => Parked::Gone,
            Err(c) => Parked::NotNow(c),
        }
    }
}

/// What became of a connection asked to park.
enum Parked<S> {
    /// Parked with its waker ([`Parking`]); the task ends.
    Gone,
    /// Parked: its reactor keeps it (the future ends with it).
    Kept(Box<Conn<S>>),
    /// Something is waiting: the connection goes on.
    NotNow(Box<Conn<S>>),
}

impl Transport for TcpStream {
    const PARKS: bool = true;

    fn poll_park(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        self.poll_read_ready(cx).map(|_| ())
    }

    fn poll_read_into(
        &mut self,
        cx: &mut Context<'_>,
        buf: &mut BytesMut,
        hint: usize,
    ) -> Poll<std::io::Result<usize>> {
        // Wait for readiness before reserving: an idle connection holds no
        // read buffer.
        std::task::ready!(self.poll_read_ready(cx))?;
        buf.reserve(hint);
        // Through `AsyncRead::poll_read`, not `try_read_buf`: a read that
        // fills less than it was offered clears tokio's readiness (the
        // socket is drained, epoll will say when more comes), so the next
        // wait does not begin with a read that fails with EAGAIN. That was
        // one wasted syscall per message in a fleet of quiet devices (half
        // of all reads).
        let r = tokio_util::io::poll_read_buf(Pin::new(self), cx, buf);
        if r.is_pending() && buf.is_empty() {
            *buf = BytesMut::new();
        }
        r
    }
}

impl Transport for tokio_rustls::server::TlsStream<TcpStream> {
    fn poll_read_into(
        &mut self,
        cx: &mut Context<'_>,
        buf: &mut BytesMut,
        hint: usize,
    ) -> Poll<std::io::Result<usize>> {
        buf.reserve(hint);
        let r = tokio_util::io::poll_read_buf(Pin::new(self), cx, buf);
        if r.is_pending() && buf.is_empty() {
            *buf = BytesMut::new();
        }
        r
    }
}

impl<S> Transport for crate::ws::WsStream<S>
where
    S: tokio::io::AsyncRead + AsyncWrite + Unpin + Send,
{
    fn poll_read_into(
        &mut self,
        cx: &mut Context<'_>,
        buf: &mut BytesMut,
        hint: usize,
    ) -> Poll<std::io::Result<usize>> {
        let r = self.poll_read_bytes(cx, buf, hint);
        if r.is_pending() && buf.is_empty() {
            *buf = BytesMut::new();
        }
        r
    }

    fn connect_accepted(&mut self) {
        crate::ws::WsStream::connect_accepted(self);
    }
}

/// Read until the transport has nothing more (or `READ_MAX` is buffered),
/// adapting `read_size`: `Ready(Ok(0))` only at end of stream.
fn poll_read_some<S: Transport>(
    stream: &mut S,
    cx: &mut Context<'_>,
    rbuf: &mut BytesMut,
    read_size: &mut usize,
) -> Poll<std::io::Result<usize>> {
    let mut total = 0;
    loop {
        match stream.poll_read_into(cx, rbuf, *read_size) {
            Poll::Ready(Ok(0)) => return Poll::Ready(Ok(total)),
            Poll::Ready(Ok(n)) => {
                total += n;
                if n < *read_size {
                    *read_size = (*read_size / 2).max(READ_MIN);
                    return Poll::Ready(Ok(total));
                }
                *read_size = (*read_size * 2).min(READ_MAX);
                if rbuf.len() >= READ_MAX {
                    return Poll::Ready(Ok(total));
                }
            }
            Poll::Ready(Err(e)) if total == 0 => return Poll::Ready(Err(e)),
            Poll::Pending if total == 0 => return Poll::Pending,
            Poll::Ready(Err(_)) | Poll::Pending => return Poll::Ready(Ok(total)),
        }
    }
}

/// Decide on a CONNECT: bans (client id, username, address), the
/// authentication chain (or, for an enhanced-authentication CONNECT, the
/// AUTH exchange that follows), bans on the effective names, and the
/// per-username connection limit (the permit is held by the connection).
async fn connect_verdict(
    sec: &Security,
    c: &AuthenticateRequest,
    peer: &VerdictPeer,
    limit: Duration,
) -> Result<(ConnectVerdict, Option<ConnectionPermit>), (ReasonCode, AuthFailure)> {
    let now = Instant::now();
    let banned = |client_id: &str, username: Option<&str>| {
        let ban = sec
            .bans
            .check(client_id, username, Some(peer.addr.ip()), now);
        if let Some(b) = &ban {
            tracing::info!(peer = %peer.addr, client_id, username = username.unwrap_or(""), ban = %b, "banned client refused");
        }
        ban.is_some()
    };
    if banned(&c.client_id, c.username.as_deref()) {
        return Err((ReasonCode::BANNED, AuthFailure::Banned));
    }
    let mut v = ConnectVerdict::default();
    if c.authentication_method.is_some() {
        // The AUTH exchange authenticates (an unknown method gets 0x8C);
        // the SCRAM user becomes the ACL's username.
        v.username = c
            .authentication_data
            .as_deref()
            .and_then(crate::security::scram::client_first_username);
    } else {
        let req = ConnectRequest {
            client_id: c.client_id.to_string(),
            username: c.username.as_deref().map(str::to_string),
            password: c.password.as_deref().map(<[u8]>::to_vec),
            peer: peer.addr,
            protocol: c.level,
            tls_identity: peer.tls_identity.clone(),
        };
        let (req, result) = match tokio::time::timeout(limit, sec.authenticate(req, peer.listener))
            .await
        {
            Ok(r) => r,
            Err(_) => {
                tracing::warn!(peer = %peer.addr, client_id = %c.client_id, "authentication timed out");
                return Err((ReasonCode::NOT_AUTHORIZED, AuthFailure::Timeout));
            }
        };
        match result {
            AuthResult::Deny(why) => {
                let (rc, plain) = if c.password.is_some() {
                    (
                        ReasonCode::BAD_USER_NAME_OR_PASSWORD,
                        AuthFailure::BadCredentials,
                    )
                } else {
                    (ReasonCode::NOT_AUTHORIZED, AuthFailure::NotAuthorized)
                };
                return Err((rc, why.unwrap_or(plain)));
            }
            AuthResult::Allow { acl, valid_until } => {
                v.acl = acl;
                // A JWT's `exp`, as a time from now (the protocol closes the
                // connection then).
                v.valid_for = valid_until.map(|exp| {
                    let now = std::time::SystemTime::now()
                        .duration_since(std::time::UNIX_EPOCH)
                        .map_or(0, |d| d.as_secs());
                    Duration::from_secs(exp.saturating_sub(now))
                });
                if req.client_id != *c.client_id {
                    v.client_id = Some(req.client_id);
                }
                v.username = req.username;
            }
        }
        let client_id = v.client_id.as_deref().unwrap_or(&c.client_id);
        if banned(client_id, v.username.as_deref()) {
            return Err((ReasonCode::BANNED, AuthFailure::Banned));
        }
    }
    let mut permit = None;
    if let Some(user) = &v.username {
        match sec.user_connections.try_acquire(user) {
            Some(p) => permit = Some(p),
            None => {
                tracing::info!(peer = %peer.addr, username = %user, "max_connections_per_user reached");
                return Err((ReasonCode::QUOTA_EXCEEDED, AuthFailure::Quota));
            }
        }
    }
    Ok((v, permit))
}

/// The socket is gone, or the connection is done with it: tell the state
/// machine ([`Connection::handle_closed`]) and hand its session's detach
/// to the engine now (a takeover or the will must not wait for the
/// lingering close). Idempotent; an attach answered after a first call is
/// detached by the next.
fn close(conn: &mut Connection, engine: &dyn Engine) {
    let now = Instant::now();
    conn.handle_closed(now);
    while let Some(r) = conn.poll_request() {
        if let Request::Detach(d) = r {
            engine.detach(&d.cell, d.epoch, d.publish_will, d.expiry_override, now);
        }
    }
}

/// A connection's state machine, closed (and its session detached) when
/// dropped, however the connection ends: returns early, panics, is dropped
/// while parked or at runtime shutdown. A field type of its own rather than
/// `Conn`'s `Drop`, so that a connection can be taken apart when it goes
/// dormant ([`Dormant`]).
struct Machine(Connection);

impl std::ops::Deref for Machine {
    type Target = Connection;
    fn deref(&self) -> &Connection {
        &self.0
    }
}

impl std::ops::DerefMut for Machine {
    fn deref_mut(&mut self) -> &mut Connection {
        &mut self.0
    }
}

impl Drop for Machine {
    fn drop(&mut self) {
        let engine = self.0.engine_handle();
        close(&mut self.0, &*engine);
    }
}

/// A connection parked in its reactor: what outlives a quiet spell, about
/// two thirds of a [`Conn`]. Going dormant drops the fields that are at
/// rest while parked (buffers, the handshake's details, a pending engine
/// call, stall tracking); waking sets them to those rest values.
struct Dormant<S> {
    stream: S,
    conn: Machine,
    peer: SocketAddr,
    /// Its reactor lists it: no key in [`LiveConns`] to keep.
    live: Arc<LiveConns>,
    last_active: Stamp,
    _done: mpsc::Sender<()>,
}

impl<S> Conn<S> {
    /// A connection's state with everything but its parts at rest: no
    /// buffers, nothing pending, not connected yet.
    fn at_rest(
        stream: S,
        conn: Machine,
        peer: SocketAddr,
        info: Option<Box<PeerInfo>>,
        live: LiveConn,
        last_active: Stamp,
        done: mpsc::Sender<()>,
    ) -> Box<Conn<S>> {
        Box::new(Conn {
            stream,
            conn,
            peer,
            info,
            rbuf: BytesMut::new(),
            wbuf: BytesMut::new(),
            read_size: READ_MIN as u32,
            eof: false,
            write_failed: false,
            shutting_down: false,
            connected: false,
            over_budget: false,
            told_stalled: false,
            hello: None,
            live,
            stalled_since: None,
            last_active,
            quiet: false,
            parking: None,
            pending: None,
            _done: done,
        })
    }
}

impl<S> Conn<S> {
    /// This parked connection as a [`Dormant`] record; itself when a field
    /// that a dormant record does not keep is not at rest (not the case for
    /// a connection that [`Plan::idle`] let park).
    fn into_dormant(self: Box<Self>) -> Result<Box<Dormant<S>>, Box<Self>> {
        let at_rest = self.info.is_none()
            && self.rbuf.is_empty()
            && self.wbuf.capacity() == 0
            && !self.eof
            && !self.write_failed
            && !self.shutting_down
            && self.connected
            && !self.over_budget
            && !self.told_stalled
            && self.hello.is_none()
            && self.parking.is_none()
            && self.pending.is_none()
            && self.live.key == LiveConn::UNLISTED;
        if !at_rest {
            return Err(self);
        }
        let c = *self;
        Ok(Box::new(Dormant {
            stream: c.stream,
            conn: c.conn,
            peer: c.peer,
            live: c.live.conns.clone(),
            last_active: c.last_active,
            _done: c._done,
        }))
    }
}

impl<S> Dormant<S> {
    /// Back to a full [`Conn`], its other fields at their rest values.
    fn wake(self) -> Box<Conn<S>> {
        let live = self.live.unlisted();
        let (peer, active) = (self.peer, self.last_active);
        let mut c = Conn::at_rest(self.stream, self.conn, peer, None, live, active, self._done);
        c.connected = true;
        c
    }
}

/// How long a write may make no progress before the client is taken for
/// gone: 1.5 × its keep alive (the silence the spec tolerates from a client,
/// [MQTT-3.1.2-22]), at most `limits.write_timeout`; the latter alone for a
/// client without keep alive. A blocked write would otherwise hold the
/// connection, its session and its publishers' back-pressure forever.
fn write_stall_limit(keep_alive: Option<Duration>, write_timeout: u64) -> Duration {
    let cap = Duration::from_secs(write_timeout.max(1));
    keep_alive.map_or(cap, |k| (k + k / 2).min(cap))
}

enum WriteFailure {
    Io,
    Stalled,
}

/// Write all of `wbuf` (consuming what went out) and flush, failing when
/// no byte goes out for `stall` (what is left stays in `wbuf`). `write` is cancel-safe, so a timed-out attempt wrote
/// nothing and the stream stays consistent.
async fn write_out<S: Transport>(
    stream: &mut S,
    wbuf: &mut BytesMut,
    stall: Duration,
) -> Result<(), WriteFailure> {
    use bytes::Buf;
    while !wbuf.is_empty() {
        // Without a timer first: the common case is a socket with room, and
        // arming a timer per write would cost every busy connection.
        let r = match poll_once(stream.write(wbuf)).await {
            Some(r) => r,
            // Boxed: the timer is only needed by a write that would wait.
            None => match Box::pin(tokio::time::timeout(stall, stream.write(wbuf))).await {
                Ok(r) => r,
                Err(_) => return Err(WriteFailure::Stalled),
            },
        };
        match r {
            Ok(0) | Err(_) => return Err(WriteFailure::Io),
            Ok(n) => wbuf.advance(n),
        }
    }
    let r = match poll_once(stream.flush()).await {
        Some(r) => r,
        None => match Box::pin(tokio::time::timeout(stall, stream.flush())).await {
            Ok(r) => r,
            Err(_) => return Err(WriteFailure::Stalled),
        },
    };
    r.map_err(|_| WriteFailure::Io)
}

/// Write and flush as much of `wbuf` as the transport takes now (consuming
/// what went out): `Ready(Ok)` once all of it is written and flushed,
/// `Pending` if the transport would block first (`cx` is then registered).
fn poll_write_now<S: Transport>(
    stream: &mut S,
    wbuf: &mut BytesMut,
    cx: &mut Context<'_>,
) -> Poll<std::io::Result<()>> {
    use bytes::Buf;
    while !wbuf.is_empty() {
        match std::task::ready!(Pin::new(&mut *stream).poll_write(cx, wbuf)) {
            Ok(0) => return Poll::Ready(Err(ErrorKind::WriteZero.into())),
            Ok(n) => wbuf.advance(n),
            Err(e) => return Poll::Ready(Err(e)),
        }
    }
    Pin::new(&mut *stream).poll_flush(cx)
}

/// Poll `f` once: `Some(output)` if it is ready now, `None` if it would
/// wait. Dropping a pending `write` / `flush` is fine: both are
/// cancel-safe.
async fn poll_once<F: std::future::Future>(f: F) -> Option<F::Output> {
    let mut f = std::pin::pin!(f);
    std::future::poll_fn(|cx| match f.as_mut().poll(cx) {
        Poll::Ready(v) => Poll::Ready(Some(v)),
        Poll::Pending => Poll::Ready(None),
    })
    .await
}

/// What a CONNECT said, for the "New client connected" log line.
struct Hello {
    level: u8,
    clean_start: bool,
    keep_alive: u16,
    /// The effective username (the verdict's, else the CONNECT's).
    username: Option<String>,
}

impl Hello {
    fn from_request(c: &AuthenticateRequest) -> Hello {
        Hello {
            level: c.level,
            clean_start: c.clean_start,
            keep_alive: c.keep_alive,
            username: c.username.as_deref().map(str::to_string),
        }
    }

    /// Mosquitto's shape: `p5, c1, k60, u'alice'` (p: protocol level).
    fn summary(&self) -> String {
        let mut s = format!(
            "p{}, c{}, k{}",
            self.level,
            u8::from(self.clean_start),
            self.keep_alive
        );
        if let Some(u) = &self.username {
            s.push_str(&format!(", u'{u}'"));
        }
        s
    }
}

/// The first bytes of a connection that cannot start an MQTT CONNECT but
/// are recognisably another protocol: what to call it in the log.
fn sniff_non_mqtt(first: &[u8]) -> Option<&'static str> {
    const HTTP: [&[u8]; 9] = [
        b"GET ",
        b"POST ",
        b"PUT ",
        b"HEAD ",
        b"DELETE ",
        b"OPTIONS ",
        b"PATCH ",
        b"CONNECT ",
        b"TRACE ",
    ];
    if first.first() == Some(&0x10) {
        return None; // CONNECT
    }
    if HTTP.iter().any(|m| first.starts_with(m)) {
        Some("an HTTP request on the MQTT port (MQTT over WebSocket is not enabled here)")
    } else if first.starts_with(&[0x16, 0x03]) {
        Some("a TLS handshake on a plain MQTT port (use the TLS listener)")
    } else if first.starts_with(b"PROXY ") || first.starts_with(b"\r\n\r\n\0\r\nQUIT\n") {
        Some("a PROXY protocol header (not enabled on this listener)")
    } else if first.starts_with(b"SSH-") {
        Some("an SSH client")
    } else {
        None
    }
}

/// What ended a connection task's wait.
/// One poll of what a connection waits for (see `drive`, step 4).
fn poll_event<S: Transport>(
    c: &mut Conn<S>,
    read: bool,
    full: bool,
    timer: Option<Pin<&mut tokio::time::Sleep>>,
    coarse_at: Option<Stamp>,
    cx: &mut Context<'_>,
) -> Poll<Event> {
    let Conn {
        stream,
        wbuf,
        rbuf,
        read_size,
        conn,
        pending,
        ..
    } = c;
    let waker = conn.waker();
    if !wbuf.is_empty() {
        let before = wbuf.len();
        let r = poll_write_now(stream, wbuf, cx);
        if before != wbuf.len() || r.is_ready() {
            return Poll::Ready(Event::Wrote(before - wbuf.len(), r));
        }
    }
    if read {
        // (Kept as u32 in the connection's box: READ_MAX fits.)
        let mut size = *read_size as usize;
        let r = poll_read_some(stream, cx, rbuf, &mut size);
        *read_size = u32::try_from(size).unwrap_or(u32::MAX);
        if let Poll::Ready(r) = r {
            return Poll::Ready(Event::Read(r));
        }
    }
    // With full output, deliveries are left for later (they would only
    // wake the task for nothing); signals still count.
    let woken = if full {
        waker.poll_signalled(cx)
    } else {
        waker.poll_woken(cx)
    };
    // An engine answer is looked for after registering: its wake-up may
    // have been consumed by `poll_transmit`.
    if woken.is_ready() || pending.as_ref().is_some_and(|p| p.is_answered()) {
        return Poll::Ready(Event::Woken);
    }
    if timer.is_some_and(|t| std::future::Future::poll(t, cx).is_ready()) {
        return Poll::Ready(Event::Timer);
    }
    // A deadline left to the reactor's sweep: due once a sweep has passed
    // it (the sweep queued this connection then).
    if let Some(at) = coarse_at {
        if reactor::swept_past(at) {
            return Poll::Ready(Event::Timer);
        }
        reactor::sweep_at(at);
    }
    Poll::Pending
}

/// What a connection waits for, worked out before each wait (and again
/// when its timer fires) rather than kept across it. In stamps: planning
/// converts nothing to or from `Instant`.
struct Plan {
    /// The protocol's next deadline (keep-alive, connect, ...).
    keepalive_at: Option<Stamp>,
    /// A write waiting this long without progress ends the connection.
    stall_at: Option<Stamp>,
    /// Since when the client has consumed nothing (see [`Conn::consuming_nothing`]).
    consuming_nothing: Option<Stamp>,
    /// When the session is to be told that its client consumes nothing.
    block_at: Option<Stamp>,
    /// Nothing in progress: the connection may park.
    idle: bool,
    /// When it parks, if nothing happens first.
    park_at: Option<Stamp>,
}

impl Plan {
    /// The deadlines as (timer, sweep): in a reactor, those that may be
    /// up to SWEEP_EVERY late are left to its sweep (a keep-alive at least
    /// PARK_HORIZON away, parking when `park_after` is no shorter than the
    /// sweep's period); the rest need a timer. Elsewhere all need a timer.
    fn split(
        &self,
        now: Stamp,
        in_reactor: bool,
        park_after: Duration,
    ) -> (Option<Stamp>, Option<Stamp>) {
        if !in_reactor {
            return (self.deadline(), None);
        }
        let (mut fine, mut coarse) = (None, None);
        let mut put = |at: Option<Stamp>, far: bool| {
            let slot = if far { &mut coarse } else { &mut fine };
            if let Some(t) = at {
                *slot = Some(slot.map_or(t, |s: Stamp| s.min(t)));
            }
        };
        put(
            self.keepalive_at,
            self.keepalive_at.is_some_and(|k| k >= now + PARK_HORIZON),
        );
        put(self.park_at, park_after >= SWEEP_EVERY);
        put(self.stall_at, false);
        put(self.block_at, false);
        (fine, coarse)
    }

    fn deadline(&self) -> Option<Stamp> {
        [
            self.keepalive_at,
            self.stall_at,
            self.block_at,
            self.park_at,
        ]
        .into_iter()
        .flatten()
        .min()
    }
}

impl<S: Transport> Conn<S> {
    fn park_after(&self) -> Duration {
        Duration::from_millis(self.conn.node().config.limits.park_after_ms)
    }

    /// Since when the client has consumed nothing: writes stuck, or its
    /// in-flight window full.
    fn consuming_nothing(&self) -> Option<Stamp> {
        match (self.stalled_since, self.conn.ack_blocked_since()) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    fn plan(&self, now: Stamp) -> Plan {
        let park_after = self.park_after();
        let stall_at = self.stalled_since.map(|t| {
            t + write_stall_limit(
                self.conn.keep_alive(),
                self.conn.node().config.limits.write_timeout,
            )
        });
        let keepalive_at = self.conn.poll_deadline();
        let consuming_nothing = self.consuming_nothing();
        let idle = S::PARKS
            && !park_after.is_zero()
            && self.connected
            && !self.shutting_down
            && self.rbuf.is_empty()
            && self.wbuf.is_empty()
            && consuming_nothing.is_none()
            && !self.told_stalled
            && self.conn.is_idle()
            // A keep-alive due soon is left to the task's own timer (the
            // sweep that wakes parked connections is coarse).
            && keepalive_at.is_none_or(|k| k > now + (park_after + PARK_HORIZON));
        Plan {
            keepalive_at,
            stall_at,
            consuming_nothing,
            block_at: consuming_nothing
                .filter(|_| !self.told_stalled)
                .map(|t| t + crate::session::WRITE_BLOCK_GRACE),
            idle,
            park_at: idle.then(|| self.last_active + park_after),
        }
    }
}

enum Event {
    Read(std::io::Result<usize>),
    /// Bytes written, and whether all of `wbuf` is now out (or failed).
    Wrote(usize, Poll<std::io::Result<()>>),
    Woken,
    Timer,
}

/// One connection's state between waits. Boxed once at accept: the task's
/// future holds only this box and its timer, and a parked connection (see
/// [`park`]) is this box alone, with no task.
struct Conn<S> {
    stream: S,
    /// The state machine; closed, and its session detached, when dropped
    /// (see [`Machine`]).
    conn: Machine,
    peer: SocketAddr,
    /// What is only needed until CONNECT is handled.
    info: Option<Box<PeerInfo>>,
    rbuf: BytesMut,
    wbuf: BytesMut,
    read_size: u32,
    eof: bool,
    write_failed: bool,
    shutting_down: bool,
    /// The "New client connected" line was logged.
    connected: bool,
    over_budget: bool,
    /// The session was told that its client consumes nothing (writes
    /// stuck or its in-flight window full for WRITE_BLOCK_GRACE): it
    /// then holds no publisher back.
    told_stalled: bool,
    /// What the CONNECT said, for the connection log line (until it is
    /// logged; then the session's `ConnInfo` has it).
    hello: Option<Box<Hello>>,
    live: LiveConn,
    /// Since when a write has been waiting without progress.
    stalled_since: Option<Stamp>,
    /// The last read, write or wake-up: parking starts `park_after` later.
    /// While parked: when it parked.
    last_active: Stamp,
    /// Resumed after being parked at least `park_after`: a quiet client,
    /// parked again as soon as it is idle.
    quiet: bool,
    /// Created at the first park and kept: the waker of a parked connection.
    parking: Option<Arc<Parking>>,
    /// The engine call the protocol waits for, when it answers later.
    pending: Option<crate::engine::Pending>,
    /// Dropped when the connection ends; [`Server::shutdown`] waits for all.
    _done: mpsc::Sender<()>,
}

/// Serve one connection until it closes (or, in a reactor, parks: see
/// [`drive`]).
fn serve<S: Transport + 'static>(
    stream: S,
    info: Box<PeerInfo>,
    live: Arc<LiveConns>,
    done: mpsc::Sender<()>,
) -> impl std::future::Future<Output = Option<Box<Conn<S>>>> + Send {
    drive(
        new_conn(stream, info, live, done, Arc::default()),
        Instant::now(),
    )
}

/// A new connection's state. Listed in `live` unless it runs in a reactor
/// (which lists its own).
fn new_conn<S: Transport + 'static>(
    stream: S,
    info: Box<PeerInfo>,
    live: Arc<LiveConns>,
    done: mpsc::Sender<()>,
    waker: Arc<ConnWaker>,
) -> Box<Conn<S>> {
    let now = Instant::now();
    let conn = Machine(Connection::with_waker(live.shared.clone(), now, waker));
    let live = if S::IN_REACTOR {
        live.unlisted()
    } else {
        live.register(conn.waker())
    };
    let (peer, active) = (info.addr, Stamp::from(now));
    Conn::at_rest(stream, conn, peer, Some(info), live, active, done)
}

/// Run a connection (new, or resumed from parking) until it closes or parks.
/// `Some`: parked in its reactor ([`Parked::Kept`]), which keeps it.
/// `now`: the clock's reading when it was (re)started.
async fn drive<S: Transport + 'static>(mut c: Box<Conn<S>>, now: Instant) -> Option<Box<Conn<S>>> {
    // The keep-alive / connect / retry timer: one timer entry, moved as the
    // deadline moves (not a new one per wait).
    // The clock is read once per turn (after each wait or yield): what the
    // turn does shares that `now` (and, through `Stamp`'s per-thread cache,
    // its conversion). A turn lasts at most BUSY_SLICE, so no deadline
    // planned from it is early by more than that. Reading the clock at each
    // use cost ~25 reads and ~20 conversions per message (callgrind, fleet).
    let mut now = now;
    // Made at the first deadline that needs it: in a reactor, a connection
    // whose deadlines are all far away (its keep-alive) leaves them to the
    // reactor's sweep and never registers a timer (see `coarse_at`).
    let mut timer: Option<Pin<Box<tokio::time::Sleep>>> = None;
    let mut timer_at: Option<Stamp> = None;
    // Nothing handled yet since the task (re)started: a resumed connection
    // first handles what woke it before it may park again.
    let mut fresh = true;
    // When this turn on the worker began: the last wait that was not ready
    // at once, or the last yield.
    let mut slice_start = now;
    loop {
        // 1. Decode and handle every complete packet received so far.
        if c.conn.is_awaiting_connect() && c.hello.is_none() {
            if let Some(what) = sniff_non_mqtt(&c.rbuf) {
                let listener = c
                    .info
                    .as_ref()
                    .map(|i| i.listener.to_string())
                    .unwrap_or_default();
                tracing::info!(peer = %c.peer, listener, "not MQTT: {what}; connection closed");
                break;
            }
        }
        // Fairness: a client whose packets are expensive (a publish to
        // thousands of sessions) must not hold the worker thread for the
        // whole read batch. Every few packets the time is checked; past
        // BUSY_SLICE the task yields, so that the other tasks queued on
        // this worker (and its I/O) run before it goes on. The slice
        // spans events that came without a wait (see the end of the loop).
        let mut handled = 0u32;
        take_answer(&mut c, now);
        // Taken over (or kicked) since the last turn: closed before the
        // packets read meanwhile are handled (they were sent to a
        // connection that is no longer the client's).
        if c.conn.waker().has_signal(ConnWaker::KICK) {
            c.conn.check_kick_now();
        }
        loop {
            // The clock is read again every 16 packets, not per packet: the
            // packets in between share `now` (and its conversion to a
            // `Stamp`).
            let must_yield = {
                let mut must_yield = false;
                while c.conn.poll_close().is_none()
                    && !c.rbuf.is_empty()
                    && c.conn.accepts_packets()
                {
                    handled += 1;
                    if handled.is_multiple_of(16) {
                        now = Instant::now();
                        if now.saturating_duration_since(slice_start) >= BUSY_SLICE {
                            must_yield = true;
                            break;
                        }
                    }
                    // The decode result is not kept across the await below (it
                    // would be stored in every task).
                    let c = &mut *c;
                    let p = match decode(&mut c.rbuf, c.conn.protocol(), c.conn.max_packet_size()) {
                        Ok(Some(p)) => p,
                        Ok(None) => break,
                        Err(e) => {
                            tracing::info!(peer = %c.peer, client_id = c.conn.client_id().unwrap_or(""), error = %e,
                            reason = %e.reason_code(), "malformed packet; closing");
                            c.conn.handle_decode_error(&e);
                            continue;
                        }
                    };
                    c.conn.handle_packet(p, now);
                    submit_requests(c);
                }
                must_yield
            };
            if !must_yield {
                break;
            }
            yield_turn::<S>().await;
            now = Instant::now();
            slice_start = now;
        }
        if c.rbuf.is_empty() {
            // Idle: hold no read buffer. Even at zero capacity, a buffer
            // that packets were split from still refers to (and keeps) the
            // chunk they came in.
            c.rbuf = BytesMut::new();
        }
        // 2. Write what the state machine produced, as far as the
        // socket takes it now. A write that would wait does not stop
        // the connection: the wait below goes on reading (PINGREQ, acks),
        // running the keep-alive and other timers and taking wake-ups
        // (kicks, shutdown) while the rest goes out, until `wbuf` reaches
        // WRITE_HIGH; then reading pauses too (TCP back-pressure on the
        // client) and new messages stay in the session queue, under its
        // limits. No progress for `stall`: the client is gone.
        let signals = c.conn.waker().take_signals();
        if c.wbuf.len() < WRITE_HIGH || signals & ConnWaker::KICK != 0 {
            let c = &mut *c;
            c.conn.poll_transmit(now, &mut c.wbuf);
        }
        if !c.wbuf.is_empty() {
            fresh = false;
            let before = c.wbuf.len();
            let at_once = {
                let Conn { stream, wbuf, .. } = &mut *c;
                std::future::poll_fn(|cx| Poll::Ready(poll_write_now(stream, wbuf, cx))).await
            };
            c.conn.node().stats.count_bytes_sent(before - c.wbuf.len());
            match at_once {
                Poll::Ready(Ok(())) => {
                    c.stalled_since = None;
                    wbuf_done(&mut c.wbuf);
                }
                Poll::Ready(Err(_)) => {
                    c.write_failed = true;
                    break;
                }
                Poll::Pending if before != c.wbuf.len() || c.stalled_since.is_none() => {
                    c.stalled_since = Some(Stamp::from(now));
                }
                Poll::Pending => {}
            }
        }
        if c.told_stalled && c.consuming_nothing().is_none() {
            c.conn.set_consumer_stalled(false);
            c.told_stalled = false;
        }
        if let Some(close) = c.conn.poll_close() {
            let why = close.why.to_string();
            let reason = close.reason;
            // What is still unwritten (the DISCONNECT or CONNACK saying
            // why) gets the rest of the stall time, at most LINGER_TIME
            // when the client has already stopped reading.
            if !c.wbuf.is_empty() {
                let stall = write_stall_limit(
                    c.conn.keep_alive(),
                    c.conn.node().config.limits.write_timeout,
                );
                let limit = if c.stalled_since.is_some() {
                    stall.min(LINGER_TIME)
                } else {
                    stall
                };
                let before = c.wbuf.len();
                let Conn { stream, wbuf, .. } = &mut *c;
                if Box::pin(write_out(stream, wbuf, limit)).await.is_err() {
                    c.write_failed = true;
                }
                c.conn.node().stats.count_bytes_sent(before - c.wbuf.len());
            }
            if c.connected {
                tracing::info!(peer = %c.peer, %reason, "Client {} disconnected: {why}", c.conn.client_id().unwrap_or(""));
            } else {
                tracing::debug!(peer = %c.peer, %reason, %why, "closing connection");
            }
            break;
        }
        if c.eof {
            if c.connected {
                tracing::info!(peer = %c.peer, "Client {} disconnected: connection closed by the client without DISCONNECT", c.conn.client_id().unwrap_or(""));
            } else {
                tracing::debug!(peer = %c.peer, "connection closed by peer");
            }
            break;
        }
        // 3. Signals from the server: shutdown, and bans added while
        // connected, which close the connection (0x8A).
        if signals & ConnWaker::SHUTDOWN != 0 && !c.shutting_down {
            c.shutting_down = true;
            c.conn.handle_shutdown();
            continue;
        }
        if signals & ConnWaker::BANS != 0 && c.connected {
            if let (Some(sec), Some(id)) = (c.conn.node().security(), c.conn.client_id()) {
                // The effective username, as the admin API shows it (the
                // CONNECT's details are not kept in the connection).
                let user = c
                    .conn
                    .attached()
                    .and_then(|(cell, _)| crate::broker::admin::conn_username(cell));
                let user = user.as_deref();
                if let Some(ban) = sec.bans.check(id, user, Some(c.peer.ip()), Instant::now()) {
                    tracing::info!(peer = %c.peer, client_id = id, username = user.unwrap_or(""), %ban, "banned at run time: disconnecting");
                    c.conn.handle_kick(ProtocolError::Banned(Box::new(ban)));
                    continue;
                }
            }
        }
        // 4. Wait for input, write progress, a wake-up (delivery, kick,
        // signal) or the timer (the protocol's deadlines, the write stall
        // limit while a write waits, and when to park). Polled by hand
        // rather than with `select!`: no per-branch future is stored, so
        // the waiting task stays small.
        // The deadlines that may be late by up to SWEEP_EVERY are left to
        // the reactor's sweep, as parked connections' keep-alive is (see
        // `Plan::split`). Registering, moving and dropping a tokio timer at
        // every wake-up was ~1,000 instructions per message in the fleet
        // (callgrind).
        let coarse_at = {
            let stamp = Stamp::from(now);
            let plan = c.plan(stamp);
            if plan.idle && c.quiet && !fresh {
                // Resumed after a long quiet (a device's message, a command to
                // it) and done: park again at once, without waiting
                // `park_after` for a timer to say so.
                match S::park(c, plan.keepalive_at, now) {
                    Parked::Gone => return None,
                    Parked::Kept(c) => return Some(c),
                    Parked::NotNow(back) => c = back,
                }
                continue;
            }
            let (deadline, coarse_at) = plan.split(stamp, S::IN_REACTOR, c.park_after());
            if deadline != timer_at {
                if let Some(d) = deadline {
                    let d = tokio::time::Instant::from_std(d.instant());
                    match timer.as_mut() {
                        Some(t) => t.as_mut().reset(d),
                        None => timer = Some(Box::pin(tokio::time::sleep_until(d))),
                    }
                }
                timer_at = deadline;
            }
            coarse_at
        };
        c.conn.release_idle_memory();
        let full = c.wbuf.len() >= WRITE_HIGH;
        // While the protocol waits for the engine the client's bytes stay
        // unread (TCP holds them back): they are handled after the answer.
        let read = !c.conn.is_paused() && !full && c.conn.accepts_packets();
        let event = {
            // The closure holds one reference and three flags: what it
            // captures is stored in every waiting task.
            let conn = &mut *c;
            let mut timer = timer.as_mut().filter(|_| timer_at.is_some());
            let mut waited = false;
            std::future::poll_fn(move |cx| {
                let timer = timer.as_mut().map(|t| t.as_mut());
                let r = poll_event(conn, read, full, timer, coarse_at, cx);
                waited |= r.is_pending();
                r.map(|e| (e, waited))
            })
            .await
        };
        let (event, waited) = event;
        now = Instant::now();
        // A client that keeps its socket full (big packets back to back)
        // gets every event at once: without this it would yield only when
        // tokio's per-task budget runs out, after megabytes.
        if waited {
            slice_start = now;
        } else if now.saturating_duration_since(slice_start) >= BUSY_SLICE {
            yield_turn::<S>().await;
            now = Instant::now();
            slice_start = now;
        }
        fresh = false;
        match event {
            Event::Read(r) => {
                c.last_active = Stamp::from(now);
                if let Ok(n) = &r {
                    c.conn.node().stats.count_bytes_received(*n);
                }
                if !matches!(r, Ok(n) if n > 0) {
                    c.eof = true;
                }
            }
            Event::Wrote(n, r) => {
                c.last_active = Stamp::from(now);
                c.conn.node().stats.count_bytes_sent(n);
                match r {
                    Poll::Ready(Err(_)) => {
                        c.write_failed = true;
                        break;
                    }
                    Poll::Ready(Ok(())) => {
                        c.stalled_since = None;
                        wbuf_done(&mut c.wbuf);
                    }
                    Poll::Pending => c.stalled_since = Some(Stamp::from(now)),
                }
            }
            Event::Woken => c.last_active = Stamp::from(now),
            Event::Timer => {
                timer_at = None;
                // Planned again (not kept across the wait: the task stays small).
                let stamp = Stamp::from(now);
                let plan = c.plan(stamp);
                if plan.park_at.is_some_and(|t| t <= stamp) {
                    // Quiet for `park_after` with nothing in progress (any
                    // other event would have come first): give up the task.
                    match S::park(c, plan.keepalive_at, now) {
                        Parked::Gone => return None,
                        Parked::Kept(c) => return Some(c),
                        Parked::NotNow(back) => c = back,
                    }
                    continue;
                }
                if !c.told_stalled
                    && plan
                        .consuming_nothing
                        .is_some_and(|t| stamp >= t + crate::session::WRITE_BLOCK_GRACE)
                {
                    c.conn.set_consumer_stalled(true);
                    c.told_stalled = true;
                }
                if plan.stall_at.is_some_and(|t| t <= stamp) {
                    let stall = write_stall_limit(
                        c.conn.keep_alive(),
                        c.conn.node().config.limits.write_timeout,
                    );
                    tracing::info!(peer = %c.peer, "Client {} disconnected: stopped reading (no write progress for {:?})",
                        c.conn.client_id().unwrap_or(""), stall);
                    c.write_failed = true;
                    break;
                }
                c.conn.handle_timeout(now);
            }
        }
        if !c.connected {
            let held = c.rbuf.capacity().saturating_sub(PREAUTH_FREE);
            let peer = c.peer;
            let refused = c.info.as_mut().and_then(|i| {
                let charge = &mut i.preauth;
                (!charge.set(held)).then(|| charge.budget.clone())
            });
            if let Some(budget) = refused {
                budget.refuse(peer, Instant::now());
                c.over_budget = true;
                break;
            }
        }
    }
    if c.told_stalled {
        // The next connection to this session starts afresh.
        c.conn.set_consumer_stalled(false);
    }
    if c.eof || c.write_failed || c.over_budget {
        close(&mut c.conn, &*c.live.conns.shared.engine);
        let _ = Box::pin(tokio::time::timeout(
            Duration::from_secs(1),
            c.stream.shutdown(),
        ))
        .await;
        return None;
    }
    // We decided to close (DISCONNECT sent, CONNACK refused, takeover,
    // shutdown...): linger so that the client can read why. After a takeover
    // the client's own DISCONNECT may still be unread and decides on the will;
    // otherwise the session is detached before lingering.
    let Conn {
        stream,
        rbuf,
        conn,
        live,
        ..
    } = &mut *c;
    let engine = &*live.conns.shared.engine;
    if conn.wants_packets_while_closing() {
        Box::pin(lingering_close(stream, rbuf, Some(conn))).await;
    } else {
        close(conn, engine);
        Box::pin(lingering_close(stream, rbuf, None)).await;
    }
    close(conn, engine);
    None
}

/// Let the worker's other tasks (or the reactor's other connections) run.
async fn yield_turn<S: Transport>() {
    if S::IN_REACTOR {
        reactor::YieldTurn::default().await;
    } else {
        tokio::task::yield_now().await;
    }
}

/// Hand the protocol's requests to the engine; answers given at once are
/// handled at once (the embedded engine: no wake-up, no allocation).
#[inline]
fn submit_requests<S: Transport>(c: &mut Conn<S>) {
    // Most packets (PUBLISH, acks, PINGREQ) leave nothing to submit.
    if c.connected && (c.pending.is_some() || !c.conn.has_request()) {
        return;
    }
    submit_pending_requests(c);
}

fn submit_pending_requests<S: Transport>(c: &mut Conn<S>) {
    while c.pending.is_none() {
        let Some(request) = c.conn.poll_request() else {
            break;
        };
        let call = match request {
            Request::Authenticate(r) => {
                c.hello = Some(Box::new(Hello::from_request(&r)));
                authenticate(c, r)
            }
            request => {
                let shared = c.live.conns.shared.clone();
                crate::engine::submit(
                    &*shared.engine,
                    &*shared.hooks,
                    request,
                    c.conn.waker(),
                    Instant::now(),
                )
            }
        };
        match call {
            Call::Ready(done) => handle_answer(c, done, Instant::now()),
            Call::Later(pending) => c.pending = Some(pending),
        }
    }
    if !c.connected {
        note_connected(c);
    }
}

/// The CONNECT was accepted and the session attached: the pre-auth charge
/// ends, the admin API learns the connection's details, one log line.
fn note_connected<S: Transport>(c: &mut Conn<S>) {
    let peer = c.peer;
    if let (Some(id), Some(h)) = (c.conn.client_id(), &c.hello) {
        let (transport, proxy) = c
            .info
            .as_deref()
            .map_or(("tcp", None), |i| (i.transport, i.proxy));
        c.connected = true;
        c.stream.connect_accepted();
        c.info = None; // and with it the pre-auth charge
        if let Some((cell, epoch)) = c.conn.attached() {
            crate::broker::admin::set_conn_info(
                cell,
                epoch,
                crate::broker::admin::ConnInfo::new(
                    peer,
                    h.username.clone(),
                    h.level,
                    h.keep_alive,
                    h.clean_start,
                ),
            );
        }
        match proxy {
            None => tracing::info!(
                "New client connected from {peer} as {id} ({}) over {transport}",
                h.summary()
            ),
            Some(proxy) => tracing::info!(
                "New client connected from {peer} as {id} ({}) over {transport}, address from the PROXY protocol header (proxy {proxy})",
                h.summary()
            ),
        }
    }
    if c.connected {
        // Logged, and in the session's `ConnInfo`: not kept twice.
        c.hello = None;
    }
}

/// An engine answer that came later (it woke the task): handled, and the
/// requests it led to submitted.
fn take_answer<S: Transport>(c: &mut Conn<S>, now: Instant) {
    if let Some(done) = c.pending.as_ref().and_then(|p| p.take()) {
        c.pending = None;
        handle_answer(c, done, now);
        submit_requests(c);
    }
}

fn handle_answer<S>(c: &mut Conn<S>, done: Completion, now: Instant) {
    if let (Completion::Verdict(v), Some(h)) = (&done, c.hello.as_mut()) {
        h.username = v.username.clone();
    }
    c.conn.handle_completion(done, now);
}

/// The authentication hooks (`[security]`: bans, the authentication chain,
/// per-user connection limits) decide on a CONNECT. A chain that answers
/// at once (password file, signatures) is answered in this turn; one that
/// waits (an HTTP hook, a JWKS fetch) runs as its own task, so the
/// connection's task stays small and its worker free, and answers later.
fn authenticate<S>(c: &mut Conn<S>, r: Box<AuthenticateRequest>) -> Call {
    let (Some(sec), Some(info)) = (c.conn.node().security().cloned(), c.info.as_deref()) else {
        return Call::Ready(Completion::Verdict(Box::new(r.as_presented())));
    };
    let peer = VerdictPeer {
        addr: info.addr,
        listener: info.listener,
        tls_identity: info.tls_identity.clone(),
    };
    let node = c.conn.node().clone();
    let limit = Duration::from_secs(node.config.limits.connect_timeout.max(1));
    let mut verdict = Box::pin(async move {
        let v = match connect_verdict(&sec, &r, &peer, limit).await {
            Ok((mut v, permit)) => {
                if let Some(p) = permit {
                    v.hold = Held::new(p);
                }
                v
            }
            Err((rc, why)) => {
                node.stats.auth_failures.count(why);
                ConnectVerdict::refuse(rc)
            }
        };
        Completion::Verdict(Box::new(v))
    });
    let mut cx = Context::from_waker(std::task::Waker::noop());
    if let Poll::Ready(done) = std::future::Future::poll(verdict.as_mut(), &mut cx) {
        return Call::Ready(done);
    }
    let (reply, pending) = crate::engine::Reply::new(c.conn.waker());
    tokio::spawn(async move {
        let done = verdict.await;
        // A connection gone meanwhile: the verdict (and its permit) is dropped.
        let _ = reply.complete(done);
    });
    Call::Later(pending)
}

/// Who is connecting, for the hooks.
struct VerdictPeer {
    addr: SocketAddr,
    listener: SocketAddr,
    /// Identity (CN / SAN) of a verified client certificate.
    tls_identity: Option<String>,
}

/// A park that found something waiting: the connection goes on, active now,
/// and parks by the timer next time.
fn not_now<S>(mut c: Box<Conn<S>>, now: Instant) -> Box<Conn<S>> {
    c.quiet = false;
    c.last_active = Stamp::from(now);
    c
}

/// A parked connection's keep-alive must be at least this far away: the
/// sweep that wakes parked connections whose keep-alive expired runs every
/// [`SWEEP_EVERY`], so it may be that late.
const PARK_HORIZON: Duration = Duration::from_secs(2);
/// How often parked connections' keep-alive deadlines are checked.
const SWEEP_EVERY: Duration = Duration::from_millis(500);

/// The waker of a parked connection. A quiet connection gives up its task
/// (about 1 KiB: the future and tokio's task cell) and becomes a
/// [`Conn`] box held here; the socket's readiness, its session's
/// [`ConnWaker`] (deliveries, kicks, signals) and the keep-alive sweep
/// ([`LiveConns::sweep`]) all wake this, which spawns the task again.
struct Parking {
    state: parking_lot::Mutex<ParkState>,
    runtime: tokio::runtime::Handle,
}

enum ParkState {
    /// The task runs; `woken`: a wake-up came since [`park`] began.
    Running {
        woken: bool,
    },
    Parked(Box<dyn Resume>),
}

/// A parked connection, resumed by spawning its task again.
trait Resume: Send {
    fn resume(self: Box<Self>, runtime: &tokio::runtime::Handle);
}

impl<S> Conn<S> {
    /// Leaving parking: quiet if it was parked at least `park_after`.
    fn unpark(&mut self, now: Instant) {
        let park_after = Duration::from_millis(self.conn.node().config.limits.park_after_ms);
        let now = Stamp::from(now);
        self.quiet = now.saturating_since(self.last_active) >= park_after;
        self.last_active = now;
        self.conn
            .node()
            .stats
            .clients_parked
            .fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
    }
}

impl<S: Transport + 'static> Resume for Conn<S> {
    fn resume(mut self: Box<Self>, runtime: &tokio::runtime::Handle) {
        let now = Instant::now();
        self.unpark(now);
        // A runtime that is shutting down drops the future: the
        // connection's `Drop` then detaches its session.
        runtime.spawn(drive(self, now));
    }
}

impl std::task::Wake for Parking {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        let parked = {
            let mut st = self.state.lock();
            match std::mem::replace(&mut *st, ParkState::Running { woken: true }) {
                ParkState::Parked(p) => {
                    *st = ParkState::Running { woken: false };
                    Some(p)
                }
                ParkState::Running { .. } => None,
            }
        };
        if let Some(p) = parked {
            p.resume(&self.runtime);
        }
    }
}

/// Park `c`: register [`Parking`] as the waker of its socket and its
/// [`ConnWaker`], put its keep-alive deadline in the sweep, and leave it
/// there; the caller's task then ends. `Err(c)` (the caller goes on) if
/// something is already waiting: bytes to read, a wake-up, a signal; `c`
/// then parks by the timer again (`quiet` cleared, active now), and a
/// wake-up consumed here is handled by the caller's next round (it
/// transmits whatever the session has).
///
/// No wake-up is lost: `Running { woken: false }` is set before the
/// wakers are registered, each registration is followed by a check of
/// what it waits for, and the box is stored only if no wake-up came in
/// between (under the same lock the waker takes it with).
fn park<S: Transport + 'static>(
    mut c: Box<Conn<S>>,
    keepalive_at: Option<Stamp>,
    now: Instant,
) -> Result<(), Box<Conn<S>>> {
    let parking = c
        .parking
        .get_or_insert_with(|| {
            Arc::new(Parking {
                state: parking_lot::Mutex::new(ParkState::Running { woken: false }),
                runtime: tokio::runtime::Handle::current(),
            })
        })
        .clone();
    // A parked connection holds no buffer: the empty write buffer, the
    // protocol's packet queues and the session's empty queues go.
    c.wbuf = BytesMut::new();
    c.conn.release_idle_memory();
    c.conn.release_session_memory();
    *parking.state.lock() = ParkState::Running { woken: false };
    let waker = std::task::Waker::from(parking.clone());
    let mut cx = Context::from_waker(&waker);
    if c.stream.poll_park(&mut cx).is_ready() || c.conn.waker().poll_woken(&mut cx).is_ready() {
        return Err(not_now(c, now));
    }
    c.live.park_until(keepalive_at);
    c.last_active = Stamp::from(now);
    let mut st = parking.state.lock();
    if matches!(*st, ParkState::Running { woken: true }) {
        *st = ParkState::Running { woken: false };
        drop(st);
        return Err(not_now(c, now));
    }
    // Counted before it can be resumed (which takes this lock).
    c.conn
        .node()
        .stats
        .clients_parked
        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    *st = ParkState::Parked(c);
    Ok(())
}

/// Close without making the kernel reset the connection (which it does when
/// a socket is closed with unread bytes, and which makes the client's next
/// write fail before it read our last DISCONNECT or CONNACK): the write half
/// is shut down (everything written is flushed, then FIN; TLS: close_notify),
/// then what the client still sends is read and discarded until it closes,
/// for at most [`LINGER_TIME`] and [`LINGER_BYTES`]. With `conn`, complete
/// packets are decoded and handed to
/// [`Connection::handle_packet_while_closing`] instead of discarded.
async fn lingering_close<S: Transport>(
    stream: &mut S,
    rbuf: &mut BytesMut,
    mut conn: Option<&mut Connection>,
) {
    let deadline = tokio::time::Instant::now() + LINGER_TIME;
    let shut = tokio::time::timeout_at(deadline, stream.shutdown()).await;
    // A failed shutdown (the client already reset the connection, e.g. in
    // answer to the DISCONNECT just written) ends the lingering, except
    // that what the socket still holds is read when the state machine
    // wants it: a normal DISCONNECT sent before the client closed decides
    // on its will [MQTT-3.1.2-10] (the data is read before the reset).
    if !matches!(shut, Ok(Ok(()))) && conn.is_none() {
        return;
    }
    let mut read = 0usize;
    let mut read_size = READ_MIN;
    loop {
        if let Some(c) = conn.as_deref_mut() {
            loop {
                match decode(rbuf, c.protocol(), c.max_packet_size()) {
                    Ok(Some(p)) => c.handle_packet_while_closing(&p),
                    Ok(None) => break,
                    Err(_) => {
                        conn = None;
                        break;
                    }
                }
            }
        }
        if conn.is_none() {
            rbuf.clear();
        }
        if read >= LINGER_BYTES {
            return;
        }
        let r = tokio::time::timeout_at(
            deadline,
            std::future::poll_fn(|cx| poll_read_some(stream, cx, rbuf, &mut read_size)),
        )
        .await;
        match r {
            Ok(Ok(n)) if n > 0 => read += n,
            _ => return, // end of stream, error, or time is up
        }
    }
}

#[cfg(test)]
mod size_report {
    /// What every connection and session holds: a guard against growing
    /// them by accident (each byte here is paid per device; see
    /// BENCHMARKS.md, "Where idle-connection memory goes"). Raise a bound
    /// only for a reason worth that cost.
    #[test]
    fn per_connection_state_stays_small() {
        use std::mem::size_of;
        let sizes = [
            (
                "Conn<TcpStream>",
                size_of::<super::Conn<tokio::net::TcpStream>>(),
                424,
            ),
            (
                "Conn<ReactorTcp>",
                size_of::<super::Conn<super::reactor::ReactorTcp>>(),
                408,
            ),
            (
                "Dormant<ReactorTcp>",
                size_of::<super::Dormant<super::reactor::ReactorTcp>>(),
                280,
            ),
            ("Slot", size_of::<super::reactor::Slot>(), 24),
            ("reactor Entry", super::reactor::entry_size(), 40),
            ("Connection", size_of::<crate::protocol::Connection>(), 200),
            ("SessionCell", size_of::<crate::session::SessionCell>(), 328),
            ("Option<Will>", size_of::<Option<crate::session::Will>>(), 8),
            ("ConnWaker", size_of::<crate::session::ConnWaker>(), 32),
            ("Parking", size_of::<super::Parking>(), 40),
            ("ConnInfo", size_of::<crate::broker::admin::ConnInfo>(), 64),
            ("Active", crate::protocol::active_size(), 88),
        ];
        for (name, size, bound) in sizes {
            eprintln!("{name}: {size} bytes (bound {bound})");
        }
        for (name, size, bound) in sizes {
            assert!(size <= bound, "{name} is {size} bytes, more than {bound}");
        }
    }
}
