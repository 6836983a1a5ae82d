//! `pub`, `sub`, `run` and scenario modes: P publishers and S subscribers.

use std::collections::HashMap;
use std::io::ErrorKind;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Result};
use bytes::{Buf, Bytes, BytesMut};
use serde::Serialize;
use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;
use tokio::sync::{mpsc, watch, Semaphore};
use tokio::time::sleep_until;

use crate::mqtt::{self, In, PubTemplate, Version};
use crate::stats::{self, Bitset, Counters, IntMap, LatencyHist, LatencySummary, PerPub};

/// Write buffer high-water mark: stop encoding PUBLISH once this much is pending.
const HIGH_WATER: usize = 64 * 1024;
/// Flush latency samples to the shared histogram in batches of this size.
const LAT_BATCH: usize = 256;

/// Everything a run needs, resolved from the command line and scenario preset.
#[derive(Clone, Debug, Serialize)]
pub struct RunCfg {
    #[serde(skip)]
    pub addr: SocketAddr,
    /// Where publisher i connects: `pub_addrs[i % len]` (a cluster's
    /// nodes; `[addr]` by default).
    pub pub_addrs: Vec<SocketAddr>,
    /// Where subscriber i connects, likewise.
    pub sub_addrs: Vec<SocketAddr>,
    /// `tcp` or `ws` (MQTT over WebSocket, `ws_path`).
    #[serde(default)]
    pub transport: String,
    #[serde(skip)]
    pub ws_path: String,
    pub mode: String,
    pub scenario: Option<String>,
    #[serde(skip)]
    pub version: Version,
    pub mqtt_version: u8,
    pub publishers: usize,
    pub subscribers: usize,
    pub pub_topic: String,
    pub sub_topic: String,
    pub qos: u8,
    pub sub_qos: u8,
    pub payload_size: usize,
    /// Messages per second per publisher; 0 = unlimited.
    pub rate: f64,
    /// Messages per publisher.
    pub count: Option<u64>,
    pub duration_s: Option<f64>,
    pub inflight: usize,
    pub clean_session: bool,
    pub retain: bool,
    pub keepalive: u16,
    pub drain_s: f64,
    pub drain_max_s: f64,
    pub connect_timeout_s: f64,
    pub connect_concurrency: usize,
    pub max_time_s: f64,
    #[serde(skip)]
    pub client_prefix: String,
    #[serde(skip)]
    pub nonce: u32,
    /// Only count messages carrying this run's id (false in `sub` mode).
    #[serde(skip)]
    pub check_own: bool,
    /// retained-storm: number of retained messages.
    pub retained: Option<u64>,
    /// Subscribers go offline at this time (s after start) ...
    pub sub_offline_at_s: Option<f64>,
    /// ... for this long, then resume their (persistent) session.
    pub sub_offline_for_s: f64,
    /// Every message to its own topic (`<topic>/<seq>`), as the retained
    /// storm does (alias-topics scenario).
    pub distinct_topics: bool,
    /// v5 subscribers announce this Topic Alias Maximum (alias-topics).
    pub sub_topic_alias_max: Option<u16>,
}

impl RunCfg {
    /// Connect one client over the run's transport (TCP, or WebSocket with
    /// `--transport ws`).
    async fn connect(
        &self,
        opts: &mqtt::ConnectOpts,
        client_id: &str,
        rbuf_cap: usize,
    ) -> Result<mqtt::Connected> {
        self.connect_to(self.addr, opts, client_id, rbuf_cap).await
    }

    /// Publisher `idx`'s address.
    fn pub_addr(&self, idx: usize) -> SocketAddr {
        self.pub_addrs
            .get(idx % self.pub_addrs.len().max(1))
            .copied()
            .unwrap_or(self.addr)
    }

    /// Subscriber `idx`'s address.
    fn sub_addr(&self, idx: usize) -> SocketAddr {
        self.sub_addrs
            .get(idx % self.sub_addrs.len().max(1))
            .copied()
            .unwrap_or(self.addr)
    }

    /// [`RunCfg::connect`] to `addr`.
    async fn connect_to(
        &self,
        addr: SocketAddr,
        opts: &mqtt::ConnectOpts,
        client_id: &str,
        rbuf_cap: usize,
    ) -> Result<mqtt::Connected> {
        match self.transport.as_str() {
            "ws" => {
                mqtt::mqtt_connect_ws(
                    addr,
                    &self.ws_path,
                    opts,
                    client_id,
                    self.connect_timeout(),
                    rbuf_cap,
                )
                .await
            }
            _ => {
                mqtt::mqtt_connect(
                    addr,
                    None,
                    opts,
                    client_id,
                    self.connect_timeout(),
                    rbuf_cap,
                )
                .await
            }
        }
    }

    fn connect_opts(&self, clean: bool) -> mqtt::ConnectOpts {
        mqtt::ConnectOpts {
            topic_alias_max: None,
            version: self.version,
            keep_alive: self.keepalive,
            clean,
            session_expiry: 600,
        }
    }
    fn connect_timeout(&self) -> Duration {
        Duration::from_secs_f64(self.connect_timeout_s)
    }
    fn drain(&self) -> Duration {
        Duration::from_secs_f64(self.drain_s)
    }
    fn max_time(&self) -> Duration {
        Duration::from_secs_f64(self.max_time_s)
    }
    fn ping_every(&self) -> Duration {
        Duration::from_secs(u64::from(self.keepalive.max(2)) / 2)
    }
}

pub fn subst(template: &str, i: usize) -> String {
    template.replace("%i", &i.to_string())
}

/// Shared state of a run.
pub struct Ctx {
    pub cfg: RunCfg,
    pub counters: Counters,
    pub lat: LatencyHist,
    pub ack_lat: LatencyHist,
    pub connect_sem: Semaphore,
}

/// What woke a client loop up.
enum Ev {
    Read,
    Writable,
    Timer,
    Stop,
    Error(anyhow::Error),
}

/// One MQTT connection driven with non-blocking reads and writes.
struct Link {
    stream: TcpStream,
    /// `--transport ws`: frames around the MQTT bytes.
    ws: Option<Box<mqtt::WsFraming>>,
    rbuf: BytesMut,
    wbuf: BytesMut,
    ver: Version,
    rbuf_cap: usize,
    last_tx: Instant,
}

impl Link {
    fn new(c: mqtt::Connected, ver: Version, rbuf_cap: usize) -> Self {
        Link {
            stream: c.stream,
            ws: c.ws,
            rbuf: c.rbuf,
            wbuf: BytesMut::with_capacity(HIGH_WATER + 4096),
            ver,
            rbuf_cap,
            last_tx: Instant::now(),
        }
    }

    /// Bytes waiting to be written, framed or not.
    fn queued(&self) -> usize {
        self.wbuf.len() + self.ws.as_ref().map_or(0, |w| w.out.len())
    }

    /// Bytes waiting to be written (over WebSocket: framed or not yet).
    fn has_output(&self) -> bool {
        !self.wbuf.is_empty() || self.ws.as_ref().is_some_and(|w| !w.out.is_empty())
    }

    /// Write as much of `wbuf` as the socket takes without blocking (over
    /// WebSocket: framed first, a frame per packet).
    fn try_flush(&mut self) -> Result<()> {
        let out = match &mut self.ws {
            Some(ws) => {
                if !self.wbuf.is_empty() {
                    ws.frame_packets(&mut self.wbuf);
                }
                &mut ws.out
            }
            None => &mut self.wbuf,
        };
        while !out.is_empty() {
            match self.stream.try_write(out) {
                Ok(0) => bail!("socket write returned 0"),
                Ok(n) => {
                    out.advance(n);
                    self.last_tx = Instant::now();
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                Err(e) => return Err(e.into()),
            }
        }
        Ok(())
    }

    /// Wait for incoming bytes (read into `rbuf`), writability (when output
    /// is pending), the timer, or the stop signal.
    ///
    /// Reads go through `AsyncRead`, which clears readiness after a partial
    /// read: one `read` syscall per wake-up instead of two.
    async fn wait(&mut self, wake: Instant, stop: Option<&mut watch::Receiver<bool>>) -> Ev {
        if self.rbuf.capacity() - self.rbuf.len() < self.rbuf_cap / 4 {
            self.rbuf.reserve(self.rbuf_cap);
        }
        let pending = self.has_output();
        let into = match &mut self.ws {
            Some(ws) => {
                if ws.raw.capacity() - ws.raw.len() < self.rbuf_cap / 4 {
                    ws.raw.reserve(self.rbuf_cap);
                }
                &mut ws.raw
            }
            None => &mut self.rbuf,
        };
        let (mut rd, wr) = self.stream.split();
        let stop_fut = async {
            match stop {
                Some(s) => {
                    let _ = s.changed().await;
                }
                None => std::future::pending::<()>().await,
            }
        };
        let ev = tokio::select! {
            biased;
            _ = stop_fut => Ev::Stop,
            r = rd.read_buf(into) => match r {
                Ok(0) => Ev::Error(anyhow!("connection closed by broker")),
                Ok(_) => Ev::Read,
                Err(e) => Ev::Error(e.into()),
            },
            r = wr.writable(), if pending => match r {
                Ok(()) => Ev::Writable,
                Err(e) => Ev::Error(e.into()),
            },
            _ = sleep_until(wake.into()) => Ev::Timer,
        };
        if let (Ev::Read, Some(ws)) = (&ev, &mut self.ws) {
            if let Err(e) = ws.deframe(&mut self.rbuf) {
                return Ev::Error(e);
            }
            if !ws.out.is_empty() {
                // a pong: out with whatever else is waiting
                if let Err(e) = self.try_flush() {
                    return Ev::Error(e);
                }
            }
        }
        ev
    }

    /// Flush everything (bounded by `timeout`), used at shutdown.
    async fn flush_all(&mut self, timeout: Duration) -> Result<()> {
        let deadline = tokio::time::Instant::now() + timeout;
        while self.has_output() {
            tokio::select! {
                r = self.stream.writable() => { r?; self.try_flush()?; }
                _ = sleep_until(deadline) => bail!("flush timed out"),
            }
        }
        Ok(())
    }

    async fn disconnect(&mut self) {
        if mqtt::encode_disconnect(self.ver, &mut self.wbuf).is_ok() {
            let _ = self.flush_all(Duration::from_secs(2)).await;
        }
    }
}

fn tnow() -> tokio::time::Instant {
    tokio::time::Instant::now()
}

// ---------------------------------------------------------------- publisher

#[derive(Debug, Default)]
pub struct PubResult {
    pub idx: usize,
    pub connected: bool,
    pub error: Option<String>,
    pub sent: u64,
    pub acked: u64,
    pub rejected: u64,
    pub unacked: u64,
    /// Sequence numbers acknowledged by the broker (QoS > 0).
    pub acked_set: Bitset,
    pub first_send_ns: Option<u64>,
    pub last_send_ns: Option<u64>,
    pub last_ack_ns: Option<u64>,
}

/// How a publisher builds its messages.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PubKind {
    /// Same topic for every message, pre-encoded template.
    Stream,
    /// One topic per message (`<topic>/<seq>`): retained storm, alias-topics.
    PerMessageTopic,
}

pub async fn publisher(
    ctx: Arc<Ctx>,
    idx: usize,
    kind: PubKind,
    count: Option<u64>,
    ready: mpsc::UnboundedSender<(usize, Result<(), String>)>,
    mut start: watch::Receiver<Option<Instant>>,
) -> PubResult {
    let mut res = PubResult {
        idx,
        ..Default::default()
    };
    let cfg = &ctx.cfg;
    let client_id = format!("{}-{:08x}-p{idx}", cfg.client_prefix, cfg.nonce);
    let connected = {
        let _permit = ctx.connect_sem.acquire().await;
        cfg.connect_to(cfg.pub_addr(idx), &cfg.connect_opts(true), &client_id, 4096)
            .await
    };
    let mut link = match connected {
        Ok(c) => Link::new(c, cfg.version, 4096),
        Err(e) => {
            let msg = format!("publisher {idx}: {e:#}");
            let _ = ready.send((idx, Err(msg.clone())));
            res.error = Some(msg);
            return res;
        }
    };
    res.connected = true;
    let _ = ready.send((idx, Ok(())));
    // Wait for the start signal (bounded: the sender always fires or drops).
    let t0 = loop {
        if let Some(t) = *start.borrow_and_update() {
            break t;
        }
        if start.changed().await.is_err() {
            res.error = Some("run aborted before start".into());
            return res;
        }
    };
    if let Err(e) = publish_loop(&ctx, idx, kind, count, &mut link, t0, &mut res).await {
        res.error = Some(format!("publisher {idx}: {e:#}"));
    }
    link.disconnect().await;
    res
}

#[allow(clippy::too_many_arguments)]
async fn publish_loop(
    ctx: &Ctx,
    idx: usize,
    kind: PubKind,
    count: Option<u64>,
    link: &mut Link,
    t0: Instant,
    res: &mut PubResult,
) -> Result<()> {
    let cfg = &ctx.cfg;
    let topic = subst(&cfg.pub_topic, idx);
    let tmpl = PubTemplate::new(cfg.version, &topic, cfg.qos, cfg.retain, cfg.payload_size)?;
    let pub_id = (u64::from(cfg.nonce) << 32) | idx as u64;
    let window = cfg.inflight.clamp(1, 65_000);
    let limit = count.unwrap_or(u64::MAX);
    let end_at = t0
        + cfg
            .duration_s
            .map(Duration::from_secs_f64)
            .unwrap_or(cfg.max_time())
            .min(cfg.max_time());
    let rate = cfg.rate;
    let qos = cfg.qos;
    let ping_every = cfg.ping_every();

    let mut seq: u64 = 0;
    let mut next_pkid: u16 = 0;
    // pkid -> (seq, send ts)
    let mut inflight: IntMap<u16, (u64, u64)> = IntMap::default();
    inflight.reserve(window);
    let mut sending_done = false;
    let mut drain_deadline = Instant::now();
    let mut drain_cap = Instant::now();
    let mut ack_samples: Vec<u64> = Vec::with_capacity(LAT_BATCH);
    let mut padding = Vec::new();
    if kind == PubKind::PerMessageTopic {
        padding.resize(
            cfg.payload_size.max(mqtt::HEADER_LEN) - mqtt::HEADER_LEN,
            0u8,
        );
    }

    loop {
        let now = Instant::now();
        if !sending_done && (seq >= limit || now >= end_at) {
            sending_done = true;
            drain_deadline = now + cfg.drain();
            drain_cap = now + Duration::from_secs_f64(cfg.drain_max_s.max(cfg.drain_s));
        }
        // How many messages may go out right now?
        let mut allowed: u64 = 0;
        if !sending_done && link.queued() < HIGH_WATER {
            allowed = limit - seq;
            if qos > 0 {
                allowed = allowed.min(window.saturating_sub(inflight.len()) as u64);
            }
            if rate > 0.0 {
                let due = (now.duration_since(t0).as_secs_f64() * rate) as u64 + 1;
                allowed = allowed.min(due.saturating_sub(seq));
            }
            let room = (HIGH_WATER - link.queued()) / tmpl.frame_len().max(1) + 1;
            allowed = allowed.min(room as u64);
        }
        if allowed > 0 {
            let ts = stats::now_ns();
            if res.first_send_ns.is_none() {
                res.first_send_ns = Some(ts);
            }
            for _ in 0..allowed {
                let mut pkid = 0u16;
                if qos > 0 {
                    // Next free packet id (the window is far below 65535).
                    loop {
                        next_pkid = next_pkid.wrapping_add(1);
                        if next_pkid != 0 && !inflight.contains_key(&next_pkid) {
                            break;
                        }
                    }
                    pkid = next_pkid;
                    inflight.insert(pkid, (seq, ts));
                }
                match kind {
                    PubKind::Stream => tmpl.write(&mut link.wbuf, pkid, pub_id, seq, ts),
                    PubKind::PerMessageTopic => {
                        let mut p = Vec::with_capacity(mqtt::HEADER_LEN + padding.len());
                        p.extend_from_slice(&pub_id.to_be_bytes());
                        p.extend_from_slice(&seq.to_be_bytes());
                        p.extend_from_slice(&ts.to_be_bytes());
                        p.extend_from_slice(&padding);
                        mqtt::encode_publish(
                            cfg.version,
                            &format!("{topic}/{seq}"),
                            qos,
                            cfg.retained.is_some() || cfg.retain,
                            pkid,
                            Bytes::from(p),
                            &mut link.wbuf,
                        )?;
                    }
                }
                seq += 1;
            }
            res.sent += allowed;
            res.last_send_ns = Some(ts);
            ctx.counters.sent.fetch_add(allowed, Ordering::Relaxed);
            if seq >= limit {
                sending_done = true;
                drain_deadline = Instant::now() + cfg.drain();
                drain_cap =
                    Instant::now() + Duration::from_secs_f64(cfg.drain_max_s.max(cfg.drain_s));
            }
        }
        if link.has_output() {
            link.try_flush()?;
        }
        if sending_done && !link.has_output() && (inflight.is_empty() || now >= drain_deadline) {
            break;
        }
        // More can be produced immediately: keep going, but stay cooperative.
        let window_ok = qos == 0 || inflight.len() < window;
        let rate_ok = rate <= 0.0
            || ((Instant::now().duration_since(t0).as_secs_f64() * rate) as u64 + 1) > seq;
        if !sending_done && window_ok && rate_ok && link.queued() < HIGH_WATER && seq < limit {
            tokio::task::coop::consume_budget().await;
            continue;
        }
        // Otherwise wait for the socket or a timer.
        let mut wake = link.last_tx + ping_every;
        if sending_done {
            wake = wake.min(drain_deadline);
        } else {
            wake = wake.min(end_at);
            if rate > 0.0 && window_ok {
                wake = wake.min(t0 + Duration::from_secs_f64(seq as f64 / rate));
            }
        }
        match link.wait(wake, None).await {
            Ev::Error(e) => return Err(e),
            Ev::Stop => break,
            Ev::Writable => link.try_flush()?,
            Ev::Read => {
                {
                    let now_ns = stats::now_ns();
                    let acked_before = res.acked;
                    while let Some(pkt) = mqtt::read_packet(link.ver, &mut link.rbuf)? {
                        let done = match pkt {
                            In::PubAck { pkid, ok } if qos == 1 => Some((pkid, ok)),
                            In::PubComp(pkid) if qos == 2 => Some((pkid, true)),
                            _ => None,
                        };
                        if let Some((pkid, ok)) = done {
                            if let Some((s, ts)) = inflight.remove(&pkid) {
                                if ok {
                                    res.acked += 1;
                                    res.acked_set.test_and_set(s);
                                    ack_samples.push(now_ns.saturating_sub(ts));
                                } else {
                                    res.rejected += 1;
                                }
                                res.last_ack_ns = Some(now_ns);
                            }
                            continue;
                        }
                        match pkt {
                            In::PubRec { pkid, ok } if qos == 2 => {
                                if ok {
                                    mqtt::encode_pubrel(link.ver, pkid, &mut link.wbuf)?;
                                } else if inflight.remove(&pkid).is_some() {
                                    res.rejected += 1;
                                }
                            }
                            In::Disconnect => bail!("broker sent DISCONNECT"),
                            _ => {}
                        }
                    }
                    if res.acked > acked_before {
                        ctx.counters
                            .acked
                            .fetch_add(res.acked - acked_before, Ordering::Relaxed);
                        if sending_done {
                            // Acks still coming: extend the drain (bounded by the cap).
                            drain_deadline = (Instant::now() + cfg.drain()).min(drain_cap);
                        }
                    }
                    if ack_samples.len() >= LAT_BATCH {
                        ctx.ack_lat.flush(idx, &mut ack_samples);
                    }
                }
            }
            Ev::Timer => {
                if link.last_tx + ping_every <= Instant::now() {
                    mqtt::encode_pingreq(link.ver, &mut link.wbuf)?;
                }
            }
        }
    }
    ctx.ack_lat.flush(idx, &mut ack_samples);
    res.unacked = inflight.len() as u64;
    Ok(())
}

// --------------------------------------------------------------- subscriber

#[derive(Debug, Default)]
pub struct SubResult {
    pub idx: usize,
    pub subscribed: bool,
    pub error: Option<String>,
    pub received: u64,
    pub foreign: u64,
    pub per_pub: IntMap<u32, PerPub>,
    pub last_recv_ns: Option<u64>,
    pub subscribe_sent_ns: u64,
    /// retained-storm: when the subscriber had all `target` messages.
    pub complete_ns: Option<u64>,
    pub reconnects: u64,
}

#[derive(Clone, Copy, Debug)]
pub struct SubOpts {
    pub record_latency: bool,
    /// Unique own messages after which the subscriber reports completion.
    pub target: Option<u64>,
}

pub async fn subscriber(
    ctx: Arc<Ctx>,
    idx: usize,
    opts: SubOpts,
    ready: mpsc::UnboundedSender<(usize, Result<(), String>)>,
    mut stop: watch::Receiver<bool>,
    t_start: watch::Receiver<Option<Instant>>,
) -> SubResult {
    let mut res = SubResult {
        idx,
        ..Default::default()
    };
    let cfg = &ctx.cfg;
    let client_id = format!("{}-{:08x}-s{idx}", cfg.client_prefix, cfg.nonce);
    let filter = subst(&cfg.sub_topic, idx);
    let mut ready = Some(ready);
    let r = subscribe_loop(
        &ctx, idx, opts, &client_id, &filter, &mut ready, &mut stop, &t_start, &mut res,
    )
    .await;
    if let Err(e) = r {
        let msg = format!("subscriber {idx}: {e:#}");
        if let Some(tx) = ready.take() {
            let _ = tx.send((idx, Err(msg.clone())));
        }
        res.error = Some(msg);
    }
    if !cfg.clean_session {
        // Remove the persistent session we created.
        let _permit = ctx.connect_sem.acquire().await;
        if let Ok(c) = cfg
            .connect_to(cfg.sub_addr(idx), &cfg.connect_opts(true), &client_id, 256)
            .await
        {
            let mut l = Link::new(c, cfg.version, 256);
            l.disconnect().await;
        }
    }
    res
}

#[allow(clippy::too_many_arguments)]
async fn subscribe_loop(
    ctx: &Ctx,
    idx: usize,
    opts: SubOpts,
    client_id: &str,
    filter: &str,
    ready: &mut Option<mpsc::UnboundedSender<(usize, Result<(), String>)>>,
    stop: &mut watch::Receiver<bool>,
    t_start: &watch::Receiver<Option<Instant>>,
    res: &mut SubResult,
) -> Result<()> {
    let cfg = &ctx.cfg;
    let rbuf_cap = if cfg.subscribers > 200 {
        16 * 1024
    } else {
        64 * 1024
    };
    let connect = || async {
        let _permit = ctx.connect_sem.acquire().await;
        cfg.connect_to(
            cfg.sub_addr(idx),
            &mqtt::ConnectOpts {
                topic_alias_max: cfg.sub_topic_alias_max,
                ..cfg.connect_opts(cfg.clean_session)
            },
            client_id,
            rbuf_cap,
        )
        .await
    };
    let c = connect().await?;
    let mut link = Link::new(c, cfg.version, rbuf_cap);
    mqtt::encode_subscribe(cfg.version, 1, filter, cfg.sub_qos, &mut link.wbuf)?;
    res.subscribe_sent_ns = stats::now_ns();
    link.try_flush()?;
    let suback_deadline = Instant::now() + cfg.connect_timeout();
    let ping_every = cfg.ping_every();
    let mut lat: Vec<u64> = Vec::with_capacity(LAT_BATCH);
    let own = cfg.nonce;
    let mut unique_own: u64 = 0;
    let mut offline_done = cfg.sub_offline_at_s.is_none();

    loop {
        let mut wake = link.last_tx + ping_every;
        if ready.is_some() {
            wake = wake.min(suback_deadline);
        }
        let offline_at = match (*t_start.borrow(), cfg.sub_offline_at_s) {
            (Some(t0), Some(at)) if !offline_done => {
                let t = t0 + Duration::from_secs_f64(at);
                wake = wake.min(t);
                Some(t)
            }
            _ => None,
        };
        match link.wait(wake, Some(&mut *stop)).await {
            Ev::Stop => break,
            Ev::Error(e) => return Err(e),
            Ev::Writable => link.try_flush()?,
            Ev::Read => {
                {
                    let now_ns = stats::now_ns();
                    let mut n: u64 = 0;
                    let mut n_own: u64 = 0;
                    while let Some(pkt) = mqtt::read_packet(link.ver, &mut link.rbuf)? {
                        match pkt {
                            In::Publish {
                                qos, pkid, payload, ..
                            } => {
                                n += 1;
                                match qos {
                                    1 => mqtt::encode_puback(link.ver, pkid, &mut link.wbuf)?,
                                    2 => mqtt::encode_pubrec(link.ver, pkid, &mut link.wbuf)?,
                                    _ => {}
                                }
                                let Some(h) = mqtt::parse_header(&payload) else {
                                    res.foreign += 1;
                                    continue;
                                };
                                if cfg.check_own && (h.pub_id >> 32) as u32 != own {
                                    res.foreign += 1;
                                    continue;
                                }
                                if h.seq >= stats::MAX_TRACKED_SEQ {
                                    res.foreign += 1;
                                    continue;
                                }
                                n_own += 1;
                                let pp = res.per_pub.entry(h.pub_id as u32).or_default();
                                let dups = pp.duplicates;
                                pp.record(h.seq);
                                if pp.duplicates == dups {
                                    unique_own += 1;
                                }
                                if opts.record_latency {
                                    lat.push(now_ns.saturating_sub(h.ts_ns));
                                }
                            }
                            In::PubRel(pkid) => {
                                mqtt::encode_pubcomp(link.ver, pkid, &mut link.wbuf)?
                            }
                            In::SubAck { ok, .. } => {
                                if !ok {
                                    bail!("SUBSCRIBE to {filter} refused");
                                }
                                res.subscribed = true;
                                if let Some(tx) = ready.take() {
                                    let _ = tx.send((idx, Ok(())));
                                }
                            }
                            In::Disconnect => bail!("broker sent DISCONNECT"),
                            _ => {}
                        }
                    }
                    if n > 0 {
                        res.received += n;
                        res.last_recv_ns = Some(now_ns);
                        ctx.counters.received.fetch_add(n, Ordering::Relaxed);
                        ctx.counters
                            .received_own
                            .fetch_add(n_own, Ordering::Relaxed);
                        if let Some(t) = opts.target {
                            if res.complete_ns.is_none() && unique_own >= t {
                                res.complete_ns = Some(now_ns);
                            }
                        }
                    }
                    if lat.len() >= LAT_BATCH {
                        ctx.lat.flush(idx, &mut lat);
                    }
                }
                link.try_flush()?;
            }
            Ev::Timer => {
                let now = Instant::now();
                if ready.is_some() && now >= suback_deadline {
                    bail!("no SUBACK within {:?}", cfg.connect_timeout());
                }
                if offline_at.is_some_and(|t| now >= t) {
                    // Go offline, then resume the session (persistent-session test).
                    offline_done = true;
                    link.disconnect().await;
                    drop(link);
                    tokio::time::sleep(Duration::from_secs_f64(cfg.sub_offline_for_s)).await;
                    let c = connect().await?;
                    let resumed = c.session_present;
                    link = Link::new(c, cfg.version, rbuf_cap);
                    res.reconnects += 1;
                    if !resumed {
                        mqtt::encode_subscribe(
                            cfg.version,
                            2,
                            filter,
                            cfg.sub_qos,
                            &mut link.wbuf,
                        )?;
                    }
                    link.try_flush()?;
                    continue;
                }
                if link.last_tx + ping_every <= now {
                    mqtt::encode_pingreq(link.ver, &mut link.wbuf)?;
                    link.try_flush()?;
                }
            }
        }
    }
    ctx.lat.flush(idx, &mut lat);
    link.disconnect().await;
    Ok(())
}

// ------------------------------------------------------------------ results

#[derive(Debug, Default, Serialize)]
pub struct RunResult {
    pub tool: &'static str,
    pub label: Option<String>,
    pub case: Option<String>,
    pub command: String,
    pub broker: String,
    pub config: Option<RunCfg>,
    pub publishers_connected: usize,
    pub subscribers_ready: usize,
    pub connect_errors: usize,
    pub errors: Vec<String>,
    /// Publishing phase: first send to last send (s).
    pub publish_time_s: f64,
    pub sent: u64,
    pub acked: Option<u64>,
    pub rejected: u64,
    pub unacked: u64,
    pub received: u64,
    pub received_own: u64,
    pub foreign: u64,
    pub expected: Option<u64>,
    pub unique: u64,
    pub lost: Option<u64>,
    pub loss_pct: Option<f64>,
    pub acked_lost: Option<u64>,
    pub duplicates: u64,
    pub reordered: u64,
    pub send_rate: f64,
    pub ack_rate: Option<f64>,
    /// Received messages per second (first send to last receive).
    pub recv_rate: f64,
    pub latency: Option<LatencySummary>,
    pub ack_latency: Option<LatencySummary>,
    pub retained_storm: Option<StormResult>,
    pub sub_reconnects: u64,
    pub broker_rss_kib_before: Option<u64>,
    pub broker_rss_kib_after: Option<u64>,
    /// CPU seconds used by this tool during the run.
    pub tool_cpu_s: Option<f64>,
    /// CPU seconds used by the broker during the run (needs --broker-pid).
    pub broker_cpu_s: Option<f64>,
    pub wall_time_s: f64,
}

#[derive(Debug, Default, Serialize)]
pub struct StormResult {
    pub retained_published: u64,
    pub publish_time_s: f64,
    pub subscribers_complete: usize,
    pub first_complete_s: Option<f64>,
    pub last_complete_s: Option<f64>,
    /// Retained messages delivered per second over all subscribers.
    pub delivery_rate: f64,
}

fn progress_task(ctx: Arc<Ctx>, mut stop: watch::Receiver<bool>) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let start = Instant::now();
        let (mut ps, mut pa, mut pr) = (0u64, 0u64, 0u64);
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        tick.tick().await;
        // Bounded by the run's own bound; stops when the run ends.
        for _ in 0..1_000_000u32 {
            tokio::select! {
                _ = tick.tick() => {}
                _ = stop.changed() => break,
            }
            let (s, a, r) = ctx.counters.get();
            let qos_part = if ctx.cfg.qos > 0 {
                format!(" acked {a} ({}/s)", a - pa)
            } else {
                String::new()
            };
            eprintln!(
                "[{:>4}s] sent {s} ({}/s){qos_part} recv {r} ({}/s)",
                start.elapsed().as_secs(),
                s - ps,
                r - pr
            );
            (ps, pa, pr) = (s, a, r);
        }
    })
}

type ReadyMsg = (usize, Result<(), String>);

/// Wait for `n` readiness messages (bounded by `timeout`); returns (ok, errors).
async fn wait_ready(
    rx: &mut mpsc::UnboundedReceiver<ReadyMsg>,
    n: usize,
    timeout: Duration,
) -> (usize, Vec<String>) {
    let deadline = tnow() + timeout;
    let mut ok = 0;
    let mut errs = Vec::new();
    while ok + errs.len() < n {
        tokio::select! {
            m = rx.recv() => match m {
                Some((_, Ok(()))) => ok += 1,
                Some((_, Err(e))) => errs.push(e),
                None => break,
            },
            _ = sleep_until(deadline) => {
                errs.push(format!("{} clients not ready after {timeout:?}", n - ok - errs.len()));
                break;
            }
        }
    }
    (ok, errs)
}

/// Run the benchmark described by `cfg`.
pub async fn run(cfg: RunCfg) -> Result<RunResult> {
    let _ = stats::base();
    let wall = Instant::now();
    let ctx = Arc::new(Ctx {
        connect_sem: Semaphore::new(cfg.connect_concurrency.max(1)),
        cfg,
        counters: Counters::default(),
        lat: LatencyHist::default(),
        ack_lat: LatencyHist::default(),
    });
    let cfg = &ctx.cfg;
    let mut result = RunResult {
        tool: "millet-bench",
        broker: cfg.addr.to_string(),
        config: Some(cfg.clone()),
        ..Default::default()
    };
    let (stop_tx, stop_rx) = watch::channel(false);
    let progress = progress_task(ctx.clone(), stop_rx.clone());
    let (start_tx, start_rx) = watch::channel::<Option<Instant>>(None);
    let storm = cfg.retained.is_some();

    // Subscribers first (retained storm: after publishing).
    let (sub_ready_tx, mut sub_ready_rx) = mpsc::unbounded_channel();
    let mut sub_handles = Vec::new();
    let spawn_subs = |target: Option<u64>,
                      handles: &mut Vec<tokio::task::JoinHandle<SubResult>>| {
        for i in 0..cfg.subscribers {
            let opts = SubOpts {
                // Timestamps are only comparable within this process.
                record_latency: !storm && cfg.check_own,
                target,
            };
            handles.push(tokio::spawn(subscriber(
                ctx.clone(),
                i,
                opts,
                sub_ready_tx.clone(),
                stop_rx.clone(),
                start_rx.clone(),
            )));
        }
    };
    let ready_timeout = cfg.connect_timeout() + Duration::from_secs(5);
    if !storm {
        spawn_subs(None, &mut sub_handles);
        let (ok, errs) = wait_ready(&mut sub_ready_rx, cfg.subscribers, ready_timeout).await;
        result.subscribers_ready = ok;
        result.connect_errors += errs.len();
        result.errors.extend(errs.into_iter().take(20));
        if cfg.subscribers > 0 {
            eprintln!("{ok}/{} subscribers ready", cfg.subscribers);
        }
    }

    // Publishers.
    let (pub_ready_tx, mut pub_ready_rx) = mpsc::unbounded_channel();
    let mut pub_handles = Vec::new();
    let (kind, per_pub_count) = match cfg.retained {
        Some(m) => {
            let p = cfg.publishers.max(1) as u64;
            (PubKind::PerMessageTopic, Some(m.div_ceil(p)))
        }
        None if cfg.distinct_topics => (PubKind::PerMessageTopic, cfg.count),
        None => (PubKind::Stream, cfg.count),
    };
    for i in 0..cfg.publishers {
        pub_handles.push(tokio::spawn(publisher(
            ctx.clone(),
            i,
            kind,
            per_pub_count,
            pub_ready_tx.clone(),
            start_rx.clone(),
        )));
    }
    let (ok, errs) = wait_ready(&mut pub_ready_rx, cfg.publishers, ready_timeout).await;
    result.publishers_connected = ok;
    result.connect_errors += errs.len();
    result.errors.extend(errs.into_iter().take(20));
    if cfg.publishers > 0 {
        eprintln!("{ok}/{} publishers connected", cfg.publishers);
    }

    let t0 = Instant::now();
    let t0_ns = stats::now_ns();
    let _ = start_tx.send(Some(t0));
    let hard_deadline = tnow() + cfg.max_time() + cfg.drain() + Duration::from_secs(10);
    let mut pubs = Vec::new();
    for h in pub_handles {
        tokio::select! {
            r = h => match r {
                Ok(p) => pubs.push(p),
                Err(e) => result.errors.push(format!("publisher task: {e}")),
            },
            _ = sleep_until(hard_deadline) => {
                result.errors.push("publishers did not finish in time".into());
                break;
            }
        }
    }
    let pub_end = Instant::now();

    let mut storm_res = None;
    if let Some(m) = cfg.retained {
        // Phase 2 of the retained storm: subscribers arrive now.
        let published: u64 = pubs
            .iter()
            .map(|p| p.acked.max(if cfg.qos == 0 { p.sent } else { 0 }))
            .sum();
        let t_sub = stats::now_ns();
        spawn_subs(Some(published.min(m)), &mut sub_handles);
        let (ok, errs) = wait_ready(&mut sub_ready_rx, cfg.subscribers, ready_timeout).await;
        result.subscribers_ready = ok;
        result.connect_errors += errs.len();
        result.errors.extend(errs.into_iter().take(20));
        storm_res = Some((t_sub, published, pub_end.duration_since(t0).as_secs_f64()));
    }

    // Expected deliveries: per subscriber group, every message of matching publishers.
    let mut groups: HashMap<String, Vec<usize>> = HashMap::new();
    for i in 0..cfg.subscribers {
        let f = subst(&cfg.sub_topic, i);
        let key = match mqtt::split_shared(&f) {
            (Some(g), rest) => format!("$share/{g}/{rest}"),
            (None, _) => format!("{i}\u{0}{f}"),
        };
        groups.entry(key).or_default().push(i);
    }
    let pub_topics: Vec<String> = (0..cfg.publishers)
        .map(|i| subst(&cfg.pub_topic, i))
        .collect();
    let matches = |filter: &str, p: usize| -> bool {
        let f = mqtt::split_shared(filter).1;
        match kind {
            PubKind::Stream => mqtt::topic_matches(f, &pub_topics[p]),
            PubKind::PerMessageTopic => mqtt::topic_matches(f, &format!("{}/0", pub_topics[p])),
        }
    };
    let expected: u64 = if cfg.check_own && cfg.subscribers > 0 {
        groups
            .values()
            .map(|members| {
                let f = subst(&cfg.sub_topic, members[0]);
                pubs.iter()
                    .filter(|p| matches(&f, p.idx))
                    .map(|p| {
                        if storm {
                            p.acked.max(if cfg.qos == 0 { p.sent } else { 0 })
                        } else {
                            p.sent
                        }
                    })
                    .sum::<u64>()
            })
            .sum()
    } else {
        0
    };
    let storm_total = expected; // every subscriber gets all retained messages

    // Drain: wait until everything expected arrived, or nothing arrived for
    // the drain timeout (bounded by --drain-max).
    let drain_cap = tnow() + Duration::from_secs_f64(cfg.drain_max_s.max(cfg.drain_s));
    if cfg.subscribers > 0 {
        let mut last_count = ctx.counters.received.load(Ordering::Relaxed);
        let mut last_change = tnow();
        for _ in 0..1_000_000u32 {
            let now = tnow();
            if now >= drain_cap {
                break;
            }
            if cfg.check_own {
                if ctx.counters.received_own.load(Ordering::Relaxed) >= expected {
                    break;
                }
                let c = ctx.counters.received.load(Ordering::Relaxed);
                if c != last_count {
                    last_count = c;
                    last_change = now;
                } else if now.duration_since(last_change) >= cfg.drain() {
                    break;
                }
            } else {
                // `sub` mode: run for the configured duration from start.
                let d = cfg
                    .duration_s
                    .map(Duration::from_secs_f64)
                    .unwrap_or(cfg.max_time());
                if t0.elapsed() >= d {
                    break;
                }
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
    let _ = stop_tx.send(true);
    let mut subs = Vec::new();
    let sub_deadline = tnow() + Duration::from_secs(15);
    for h in sub_handles {
        tokio::select! {
            r = h => match r {
                Ok(s) => subs.push(s),
                Err(e) => result.errors.push(format!("subscriber task: {e}")),
            },
            _ = sleep_until(sub_deadline) => {
                result.errors.push("subscribers did not stop in time".into());
                break;
            }
        }
    }
    let _ = progress.await;

    // ---- aggregate
    for p in &pubs {
        if let Some(e) = &p.error {
            if result.errors.len() < 50 {
                result.errors.push(e.clone());
            }
        }
    }
    for s in &subs {
        if let Some(e) = &s.error {
            if result.errors.len() < 50 {
                result.errors.push(e.clone());
            }
        }
    }
    result.sent = pubs.iter().map(|p| p.sent).sum();
    let first = pubs
        .iter()
        .filter_map(|p| p.first_send_ns)
        .min()
        .unwrap_or(t0_ns);
    let last_send = pubs
        .iter()
        .filter_map(|p| p.last_send_ns)
        .max()
        .unwrap_or(first);
    let pub_time = (last_send.saturating_sub(first)) as f64 / 1e9;
    result.publish_time_s = pub_time;
    let secs = |ns: u64| (ns as f64 / 1e9).max(1e-6);
    if cfg.publishers > 0 {
        result.send_rate = result.sent as f64 / secs(last_send.saturating_sub(first)).max(1e-3);
    }
    if cfg.qos > 0 {
        let acked: u64 = pubs.iter().map(|p| p.acked).sum();
        result.acked = Some(acked);
        let last_ack = pubs
            .iter()
            .filter_map(|p| p.last_ack_ns)
            .max()
            .unwrap_or(first);
        result.ack_rate = Some(acked as f64 / secs(last_ack.saturating_sub(first)).max(1e-3));
        result.rejected = pubs.iter().map(|p| p.rejected).sum();
        result.unacked = pubs.iter().map(|p| p.unacked).sum();
    }
    result.received = subs.iter().map(|s| s.received).sum();
    result.foreign = subs.iter().map(|s| s.foreign).sum();
    result.received_own = result.received - result.foreign;
    result.duplicates = subs
        .iter()
        .flat_map(|s| s.per_pub.values())
        .map(|p| p.duplicates)
        .sum();
    result.reordered = subs
        .iter()
        .flat_map(|s| s.per_pub.values())
        .map(|p| p.reordered)
        .sum();
    result.sub_reconnects = subs.iter().map(|s| s.reconnects).sum();
    let last_recv = subs.iter().filter_map(|s| s.last_recv_ns).max();
    if let Some(lr) = last_recv {
        let from = if storm {
            storm_res.as_ref().map(|s| s.0).unwrap_or(first)
        } else {
            first
        };
        result.recv_rate = result.received_own as f64 / secs(lr.saturating_sub(from)).max(1e-3);
    }

    // Unique per group = union of the members' seen sets, per publisher.
    let by_idx: HashMap<usize, &SubResult> = subs.iter().map(|s| (s.idx, s)).collect();
    let mut unique = 0u64;
    let mut acked_lost = 0u64;
    for members in groups.values() {
        let mut union: IntMap<u32, Bitset> = IntMap::default();
        for m in members {
            if let Some(s) = by_idx.get(m) {
                for (p, pp) in &s.per_pub {
                    union.entry(*p).or_default().union_with(&pp.seen);
                }
            }
        }
        unique += union.values().map(|b| b.count()).sum::<u64>();
        if cfg.qos > 0 && cfg.check_own {
            let f = subst(&cfg.sub_topic, members[0]);
            let empty = Bitset::default();
            for p in pubs.iter().filter(|p| matches(&f, p.idx)) {
                let got = union.get(&(p.idx as u32)).unwrap_or(&empty);
                acked_lost += p.acked_set.count_and_not(got);
            }
        }
    }
    result.unique = unique;
    if cfg.check_own && cfg.subscribers > 0 && cfg.publishers > 0 {
        result.expected = Some(expected);
        let lost = expected.saturating_sub(unique);
        result.lost = Some(lost);
        result.loss_pct = Some(if expected > 0 {
            lost as f64 * 100.0 / expected as f64
        } else {
            0.0
        });
        if cfg.qos > 0 {
            result.acked_lost = Some(acked_lost);
        }
    }
    if !storm {
        result.latency = stats::summarize(&ctx.lat.merged());
    }
    result.ack_latency = stats::summarize(&ctx.ack_lat.merged());
    if let Some((t_sub, published, ptime)) = storm_res {
        let completes: Vec<u64> = subs.iter().filter_map(|s| s.complete_ns).collect();
        let first_c = completes
            .iter()
            .min()
            .map(|c| (c.saturating_sub(t_sub)) as f64 / 1e9);
        let last_c = completes
            .iter()
            .max()
            .map(|c| (c.saturating_sub(t_sub)) as f64 / 1e9);
        let delivered = result.unique.min(storm_total);
        let span = last_recv
            .map(|l| secs(l.saturating_sub(t_sub)))
            .unwrap_or(1.0);
        result.retained_storm = Some(StormResult {
            retained_published: published,
            publish_time_s: ptime,
            subscribers_complete: completes.len(),
            first_complete_s: first_c,
            last_complete_s: last_c,
            delivery_rate: delivered as f64 / span,
        });
        if cfg.publishers > 0 {
            cleanup_retained(&ctx, published).await;
        }
    }
    result.wall_time_s = wall.elapsed().as_secs_f64();
    Ok(result)
}

/// Clear the retained messages of a storm (empty retained payloads).
async fn cleanup_retained(ctx: &Ctx, per_pub_hint: u64) {
    let cfg = &ctx.cfg;
    let per_pub = cfg
        .retained
        .map(|m| m.div_ceil(cfg.publishers.max(1) as u64))
        .unwrap_or(per_pub_hint);
    let fut = async {
        let c = cfg
            .connect(
                &cfg.connect_opts(true),
                &format!("{}-{:08x}-cleanup", cfg.client_prefix, cfg.nonce),
                4096,
            )
            .await?;
        let mut link = Link::new(c, cfg.version, 4096);
        for p in 0..cfg.publishers {
            let topic = subst(&cfg.pub_topic, p);
            for s in 0..per_pub {
                mqtt::encode_publish(
                    cfg.version,
                    &format!("{topic}/{s}"),
                    0,
                    true,
                    0,
                    Bytes::new(),
                    &mut link.wbuf,
                )?;
                if link.queued() > HIGH_WATER {
                    link.flush_all(Duration::from_secs(10)).await?;
                }
            }
        }
        // A PINGRESP proves the broker processed everything sent before it.
        mqtt::encode_pingreq(link.ver, &mut link.wbuf)?;
        link.flush_all(Duration::from_secs(10)).await?;
        loop {
            if let Ev::Error(e) = link
                .wait(Instant::now() + Duration::from_secs(10), None)
                .await
            {
                return Err(e);
            }
            let mut pong = false;
            while let Some(p) = mqtt::read_packet(link.ver, &mut link.rbuf)? {
                pong |= matches!(p, In::PingResp);
            }
            if pong {
                break;
            }
        }
        link.disconnect().await;
        Ok::<(), anyhow::Error>(())
    };
    match tokio::time::timeout(Duration::from_secs(30), fut).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => eprintln!("retained cleanup failed: {e:#}"),
        Err(_) => eprintln!("retained cleanup timed out"),
    }
}

pub fn validate(cfg: &RunCfg) -> Result<()> {
    if cfg.qos > 2 || cfg.sub_qos > 2 {
        return Err(anyhow!("QoS must be 0, 1 or 2"));
    }
    if cfg.publishers == 0 && cfg.subscribers == 0 {
        bail!("nothing to do: 0 publishers and 0 subscribers");
    }
    if cfg.count.is_none()
        && cfg.duration_s.is_none()
        && cfg.retained.is_none()
        && cfg.publishers > 0
    {
        bail!("give --count or --duration");
    }
    Ok(())
}
