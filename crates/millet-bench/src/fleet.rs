//! `fleet` mode: a device fleet with a backend, from one process.
//!
//! N devices each connect (persistent sessions by default), subscribe to
//! `devices/{i}/cmd` at QoS 1 and publish one QoS 1 message every
//! `--interval` to `devices/{i}/telemetry`, the fleet's publishes spread evenly
//! over the interval (device i at offset i/N of it). One backend client
//! subscribes to `devices/+/telemetry` (QoS 1) and sends a QoS 1 command to
//! `--cmd-pct` % of the devices each second, also spread evenly. After the
//! connect phase and a warm-up, a measured window: broker CPU and RSS, latency
//! both ways, PUBACK latency, sent / received / lost.
//!
//! One small task per device (a few hundred bytes plus its socket): at the
//! default shape (18,000 devices, one message per 10 s) the tool handles
//! about 2,000 messages per second, a small fraction of one core.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{anyhow, Result};
use bytes::{Bytes, BytesMut};
use serde::Serialize;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::watch;
use tokio::time::sleep_until;

use crate::conn::{cpu_seconds, RssProbe};
use crate::mqtt::{self, In, Version};
use crate::stats::{self, LatencyHist, LatencySummary};

#[derive(Clone, Debug, Serialize)]
pub struct FleetCfg {
    #[serde(skip)]
    pub addr: SocketAddr,
    pub devices: u64,
    #[serde(skip)]
    pub version: Version,
    pub mqtt_version: u8,
    /// false: persistent sessions (the default, as a real fleet with QoS 1
    /// commands would use).
    pub clean_session: bool,
    /// v5 session expiry for persistent sessions (seconds).
    pub session_expiry: u32,
    /// Seconds between two telemetry messages of one device.
    pub interval_s: f64,
    /// Percent of the devices that get a command each second.
    pub cmd_pct: f64,
    pub payload_size: usize,
    /// Device connections per second.
    pub connect_rate: f64,
    pub warmup_s: f64,
    pub window_s: f64,
    /// After the window: wait this long at most for messages still in flight.
    pub drain_s: f64,
    pub keepalive: u16,
    pub source_ips: u32,
    pub connect_timeout_s: f64,
    pub broker_pid: Option<u32>,
    #[serde(skip)]
    pub client_prefix: String,
    #[serde(skip)]
    pub nonce: u32,
}

/// One direction of traffic, counted over the measured window (messages
/// whose send timestamp falls inside it).
#[derive(Debug, Default, Serialize)]
pub struct Flow {
    pub sent: u64,
    pub acked: u64,
    pub received: u64,
    pub duplicates: u64,
    /// sent - received (unique), after the drain.
    pub lost: u64,
    pub rate: f64,
    /// Publish → delivery to the other side.
    pub latency: Option<LatencySummary>,
    /// PUBLISH → PUBACK at the sender.
    pub puback_latency: Option<LatencySummary>,
}

#[derive(Debug, Default, Serialize)]
pub struct FleetResult {
    pub tool: &'static str,
    pub mode: &'static str,
    pub label: Option<String>,
    pub case: Option<String>,
    pub command: String,
    pub broker: String,
    pub config: Option<FleetCfg>,
    pub connected: u64,
    pub failed: u64,
    /// Device connections lost after connecting.
    pub dropped: u64,
    pub connect_time_s: f64,
    pub connect_rate: f64,
    pub connect_latency: Option<LatencySummary>,
    pub window_s: f64,
    pub broker_cpu_s: Option<f64>,
    /// Broker CPU over the window, percent of one core.
    pub broker_cpu_pct: Option<f64>,
    pub tool_cpu_s: Option<f64>,
    pub tool_cpu_pct: Option<f64>,
    pub broker_rss_kib_before: Option<u64>,
    /// VmRSS at the end of the window.
    pub broker_rss_kib: Option<u64>,
    /// (RSS at the end of the window - RSS before connecting) / devices.
    pub broker_rss_kib_per_device: Option<f64>,
    pub tool_rss_kib: Option<u64>,
    pub telemetry: Flow,
    pub commands: Flow,
    pub nofile_limit: Option<u64>,
    pub errors: Vec<String>,
    pub wall_time_s: f64,
}

const CONNECTING: u8 = 0;
const RUNNING: u8 = 1;
const STOPPED: u8 = 2;

#[derive(Default)]
struct Counts {
    connected: AtomicU64,
    failed: AtomicU64,
    dropped: AtomicU64,
    last_connect_ns: AtomicU64,
    tele_sent: AtomicU64,
    tele_acked: AtomicU64,
    tele_recv: AtomicU64,
    tele_dup: AtomicU64,
    cmd_sent: AtomicU64,
    cmd_acked: AtomicU64,
    cmd_recv: AtomicU64,
    cmd_dup: AtomicU64,
    /// All telemetry messages sent (window or not), for progress.
    tele_total: AtomicU64,
}

struct Fleet {
    cfg: FleetCfg,
    phase: AtomicU8,
    win_start: AtomicU64,
    win_end: AtomicU64,
    c: Counts,
    connect_lat: LatencyHist,
    tele_lat: LatencyHist,
    tele_ack_lat: LatencyHist,
    cmd_lat: LatencyHist,
    cmd_ack_lat: LatencyHist,
    errors: Mutex<Vec<String>>,
    /// Start of the telemetry schedule (device i publishes at
    /// base + (i/N + k) * interval).
    base: tokio::time::Instant,
}

impl Fleet {
    #[inline]
    fn in_window(&self, ts: u64) -> bool {
        ts >= self.win_start.load(Ordering::Relaxed) && ts < self.win_end.load(Ordering::Relaxed)
    }

    fn error(&self, e: String) {
        if let Ok(mut v) = self.errors.lock() {
            if v.len() < 20 {
                v.push(e);
            }
        }
    }

    fn opts(&self) -> mqtt::ConnectOpts {
        mqtt::ConnectOpts {
            version: self.cfg.version,
            keep_alive: self.cfg.keepalive,
            clean: self.cfg.clean_session,
            session_expiry: self.cfg.session_expiry,
            topic_alias_max: None,
        }
    }

    fn source(&self, i: u64) -> Option<IpAddr> {
        // One address: let connect() pick the port (see conn.rs).
        (self.cfg.source_ips > 1).then(|| {
            IpAddr::V4(Ipv4Addr::new(
                127,
                0,
                0,
                1 + (i % u64::from(self.cfg.source_ips.clamp(1, 254))) as u8,
            ))
        })
    }
}

fn next_pkid(p: &mut u16) -> u16 {
    *p = if *p == u16::MAX { 1 } else { *p + 1 };
    *p
}

fn ensure_room(buf: &mut BytesMut) {
    if buf.capacity() - buf.len() < 64 {
        buf.reserve(256);
    }
}

/// One device: connect, subscribe to its command topic, publish telemetry on
/// its slot of the schedule, acknowledge commands.
async fn device(i: u64, f: Arc<Fleet>, mut quit: watch::Receiver<bool>) {
    let id = format!("{}-{:08x}-d{i}", f.cfg.client_prefix, f.cfg.nonce);
    let t0 = stats::now_ns();
    let timeout = Duration::from_secs_f64(f.cfg.connect_timeout_s);
    let c = match mqtt::mqtt_connect(f.cfg.addr, f.source(i), &f.opts(), &id, timeout, 128).await {
        Ok(c) => c,
        Err(e) => {
            f.c.failed.fetch_add(1, Ordering::Relaxed);
            f.error(format!("device {i}: {e:#}"));
            return;
        }
    };
    drop(id);
    let done = stats::now_ns();
    f.connect_lat
        .flush(i as usize, &mut vec![done.saturating_sub(t0)]);
    f.c.last_connect_ns.fetch_max(done, Ordering::Relaxed);
    let (mut stream, mut rbuf) = (c.stream, c.rbuf);
    let ver = f.cfg.version;
    let mut out = BytesMut::with_capacity(128);
    let sub = format!("devices/{i}/cmd");
    if mqtt::encode_subscribe(ver, 1, &sub, 1, &mut out).is_err()
        || stream.write_all(&out).await.is_err()
    {
        f.c.failed.fetch_add(1, Ordering::Relaxed);
        return;
    }
    out.clear();
    drop(sub);
    let tmpl = match mqtt::PubTemplate::new(
        ver,
        &format!("devices/{i}/telemetry"),
        1,
        false,
        f.cfg.payload_size,
    ) {
        Ok(t) => t,
        Err(e) => {
            f.error(format!("device {i}: {e:#}"));
            return;
        }
    };
    let mut subscribed = false;
    let n = f.cfg.devices.max(1);
    let interval = Duration::from_secs_f64(f.cfg.interval_s.max(0.001));
    let offset = interval.mul_f64(i as f64 / n as f64);
    let mut next = f.base + offset;
    let now = tokio::time::Instant::now();
    while next < now {
        next += interval;
    }
    let mut pkid = 1u16;
    let mut seq = 0u64;
    // (pkid, send time) of unacknowledged telemetry.
    let mut inflight: Vec<(u16, u64)> = Vec::new();
    let mut last_cmd: Option<u64> = None;
    let mut lat: Vec<u64> = Vec::new();
    let mut ack_lat: Vec<u64> = Vec::new();
    let far = Duration::from_secs(86_400);
    'run: loop {
        ensure_room(&mut rbuf);
        tokio::select! {
            _ = quit.changed() => break 'run,
            r = stream.read_buf(&mut rbuf) => {
                if !matches!(r, Ok(n) if n > 0) {
                    f.c.dropped.fetch_add(1, Ordering::Relaxed);
                    f.error(format!("device {i}: connection closed"));
                    break 'run;
                }
                loop {
                    let pkt = match mqtt::read_packet(ver, &mut rbuf) {
                        Ok(Some(p)) => p,
                        Ok(None) => break,
                        Err(e) => {
                            f.c.dropped.fetch_add(1, Ordering::Relaxed);
                            f.error(format!("device {i}: {e:#}"));
                            break 'run;
                        }
                    };
                    match pkt {
                        In::SubAck { ok } => {
                            if !ok {
                                f.error(format!("device {i}: subscription refused"));
                            }
                            if !subscribed {
                                subscribed = true;
                                f.c.connected.fetch_add(1, Ordering::Relaxed);
                            }
                        }
                        In::Publish { qos, pkid: p, payload } => {
                            if qos > 0 && mqtt::encode_puback(ver, p, &mut out).is_err() {
                                break 'run;
                            }
                            if let Some(h) = mqtt::parse_header(&payload) {
                                if last_cmd.is_some_and(|l| h.seq <= l) {
                                    if f.in_window(h.ts_ns) {
                                        f.c.cmd_dup.fetch_add(1, Ordering::Relaxed);
                                    }
                                } else {
                                    last_cmd = Some(h.seq);
                                    if f.in_window(h.ts_ns) {
                                        f.c.cmd_recv.fetch_add(1, Ordering::Relaxed);
                                        lat.push(stats::now_ns().saturating_sub(h.ts_ns));
                                    }
                                }
                            }
                        }
                        In::PubAck { pkid: p, .. } => {
                            if let Some(k) = inflight.iter().position(|&(q, _)| q == p) {
                                let (_, ts) = inflight.swap_remove(k);
                                if f.in_window(ts) {
                                    f.c.tele_acked.fetch_add(1, Ordering::Relaxed);
                                    ack_lat.push(stats::now_ns().saturating_sub(ts));
                                }
                            }
                        }
                        In::Disconnect => {
                            f.c.dropped.fetch_add(1, Ordering::Relaxed);
                            f.error(format!("device {i}: DISCONNECT from the broker"));
                            break 'run;
                        }
                        _ => {}
                    }
                }
                if !out.is_empty() {
                    if stream.write_all(&out).await.is_err() {
                        break 'run;
                    }
                    out.clear();
                }
                if lat.len() >= 16 {
                    f.cmd_lat.flush(i as usize, &mut lat);
                }
                if ack_lat.len() >= 16 {
                    f.tele_ack_lat.flush(i as usize, &mut ack_lat);
                }
            }
            _ = sleep_until(next) => {
                if f.phase.load(Ordering::Relaxed) >= STOPPED {
                    next += far;
                    continue;
                }
                next += interval;
                if !subscribed {
                    continue;
                }
                let ts = stats::now_ns();
                seq += 1;
                let p = next_pkid(&mut pkid);
                tmpl.write(&mut out, p, i, seq, ts);
                if inflight.len() < 1024 {
                    inflight.push((p, ts));
                }
                f.c.tele_total.fetch_add(1, Ordering::Relaxed);
                if f.in_window(ts) {
                    f.c.tele_sent.fetch_add(1, Ordering::Relaxed);
                }
                if stream.write_all(&out).await.is_err() {
                    break 'run;
                }
                out.clear();
            }
        }
    }
    f.cmd_lat.flush(i as usize, &mut lat);
    f.tele_ack_lat.flush(i as usize, &mut ack_lat);
    let mut d = BytesMut::new();
    if mqtt::encode_disconnect(ver, &mut d).is_ok() {
        let _ = tokio::time::timeout(Duration::from_secs(2), stream.write_all(&d)).await;
    }
}

/// The backend: receives all telemetry, sends the commands.
async fn backend(
    f: Arc<Fleet>,
    mut quit: watch::Receiver<bool>,
    ready: tokio::sync::oneshot::Sender<Result<()>>,
) {
    let id = format!("{}-{:08x}-backend", f.cfg.client_prefix, f.cfg.nonce);
    let timeout = Duration::from_secs_f64(f.cfg.connect_timeout_s);
    let ver = f.cfg.version;
    let setup = async {
        let c = mqtt::mqtt_connect(f.cfg.addr, None, &f.opts(), &id, timeout, 64 * 1024).await?;
        let (mut stream, mut rbuf) = (c.stream, c.rbuf);
        let mut out = BytesMut::new();
        mqtt::encode_subscribe(ver, 1, "devices/+/telemetry", 1, &mut out)?;
        stream.write_all(&out).await?;
        let wait = async {
            loop {
                if let Some(p) = mqtt::read_packet(ver, &mut rbuf)? {
                    match p {
                        In::SubAck { ok: true } => return Ok::<(), anyhow::Error>(()),
                        In::SubAck { ok: false } => return Err(anyhow!("subscription refused")),
                        _ => continue,
                    }
                }
                if stream.read_buf(&mut rbuf).await? == 0 {
                    return Err(anyhow!("closed before SUBACK"));
                }
            }
        };
        tokio::time::timeout(timeout, wait)
            .await
            .map_err(|_| anyhow!("no SUBACK"))??;
        Ok::<(TcpStream, BytesMut), anyhow::Error>((stream, rbuf))
    };
    let (stream, mut rbuf) = match setup.await {
        Ok(s) => {
            let _ = ready.send(Ok(()));
            s
        }
        Err(e) => {
            let _ = ready.send(Err(e.context("backend")));
            return;
        }
    };
    let (mut rd, mut wr) = stream.into_split();
    let n = f.cfg.devices.max(1);
    let per_s = n as f64 * f.cfg.cmd_pct / 100.0;
    let far = Duration::from_secs(86_400);
    let every = if per_s > 0.0 {
        Duration::from_secs_f64(1.0 / per_s)
    } else {
        far
    };
    let mut next = tokio::time::Instant::now() + every;
    // Send time per packet id (0 = free).
    let mut inflight = vec![0u64; 65_536];
    let mut pkid = 0u16;
    let mut seq = 0u64;
    let mut target = 0u64;
    let mut last_tele: Vec<u64> = vec![0; n as usize];
    let mut lat = Vec::with_capacity(256);
    let mut ack_lat = Vec::with_capacity(64);
    let mut out = BytesMut::with_capacity(64 * 1024);
    let mut payload = vec![0u8; f.cfg.payload_size.max(mqtt::HEADER_LEN)];
    'run: loop {
        if rbuf.capacity() - rbuf.len() < 4096 {
            rbuf.reserve(64 * 1024);
        }
        tokio::select! {
            _ = quit.changed() => break 'run,
            r = rd.read_buf(&mut rbuf) => {
                if !matches!(r, Ok(n) if n > 0) {
                    f.error("backend: connection closed".into());
                    break 'run;
                }
                loop {
                    let pkt = match mqtt::read_packet(ver, &mut rbuf) {
                        Ok(Some(p)) => p,
                        Ok(None) => break,
                        Err(e) => {
                            f.error(format!("backend: {e:#}"));
                            break 'run;
                        }
                    };
                    match pkt {
                        In::Publish { qos, pkid: p, payload } => {
                            if qos > 0 && mqtt::encode_puback(ver, p, &mut out).is_err() {
                                break 'run;
                            }
                            let Some(h) = mqtt::parse_header(&payload) else { continue };
                            let Some(last) = last_tele.get_mut(h.pub_id as usize) else { continue };
                            let w = f.in_window(h.ts_ns);
                            if h.seq <= *last {
                                if w {
                                    f.c.tele_dup.fetch_add(1, Ordering::Relaxed);
                                }
                                continue;
                            }
                            *last = h.seq;
                            if w {
                                f.c.tele_recv.fetch_add(1, Ordering::Relaxed);
                                lat.push(stats::now_ns().saturating_sub(h.ts_ns));
                            }
                        }
                        In::PubAck { pkid: p, .. } => {
                            let ts = std::mem::take(&mut inflight[usize::from(p)]);
                            if ts != 0 && f.in_window(ts) {
                                f.c.cmd_acked.fetch_add(1, Ordering::Relaxed);
                                ack_lat.push(stats::now_ns().saturating_sub(ts));
                            }
                        }
                        _ => {}
                    }
                }
                if !out.is_empty() {
                    if wr.write_all(&out).await.is_err() {
                        break 'run;
                    }
                    out.clear();
                }
                if lat.len() >= 256 {
                    f.tele_lat.flush(0, &mut lat);
                }
                if ack_lat.len() >= 64 {
                    f.cmd_ack_lat.flush(0, &mut ack_lat);
                }
            }
            _ = sleep_until(next) => {
                next += every;
                if f.phase.load(Ordering::Relaxed) != RUNNING {
                    continue;
                }
                // Catch up if the timer fell behind, a bounded burst at most.
                let mut k = 0;
                loop {
                    let ts = stats::now_ns();
                    seq += 1;
                    let p = next_pkid(&mut pkid);
                    inflight[usize::from(p)] = ts.max(1);
                    payload[..8].copy_from_slice(&target.to_be_bytes());
                    payload[8..16].copy_from_slice(&seq.to_be_bytes());
                    payload[16..24].copy_from_slice(&ts.to_be_bytes());
                    let topic = format!("devices/{target}/cmd");
                    if mqtt::encode_publish(ver, &topic, 1, false, p, Bytes::copy_from_slice(&payload), &mut out).is_err() {
                        break 'run;
                    }
                    if f.in_window(ts) {
                        f.c.cmd_sent.fetch_add(1, Ordering::Relaxed);
                    }
                    target = (target + 1) % n;
                    k += 1;
                    if k >= 64 || next > tokio::time::Instant::now() {
                        break;
                    }
                    next += every;
                }
                if wr.write_all(&out).await.is_err() {
                    break 'run;
                }
                out.clear();
            }
        }
    }
    f.tele_lat.flush(0, &mut lat);
    f.cmd_ack_lat.flush(0, &mut ack_lat);
    let mut d = BytesMut::new();
    if mqtt::encode_disconnect(ver, &mut d).is_ok() {
        let _ = tokio::time::timeout(Duration::from_secs(2), wr.write_all(&d)).await;
    }
}

fn pct(cpu: Option<f64>, secs: f64) -> Option<f64> {
    cpu.map(|c| c / secs.max(1e-3) * 100.0)
}

pub async fn run(cfg: FleetCfg) -> Result<FleetResult> {
    let _ = stats::base();
    let wall = Instant::now();
    let mut res = FleetResult {
        tool: "millet-bench",
        mode: "fleet",
        broker: cfg.addr.to_string(),
        config: Some(cfg.clone()),
        ..Default::default()
    };
    let limit = rlimit::increase_nofile_limit(u64::MAX).ok();
    res.nofile_limit = limit;
    if let Some(l) = limit {
        if l < cfg.devices + 64 {
            eprintln!(
                "warning: open-files limit {l} is below {} devices (+64); expect failures",
                cfg.devices
            );
        }
    }
    let pid = cfg.broker_pid;
    let mut broker_probe = pid.and_then(RssProbe::open);
    let mut self_probe = RssProbe::open_self();
    res.broker_rss_kib_before = broker_probe.as_mut().and_then(RssProbe::read);

    let n = cfg.devices;
    let f = Arc::new(Fleet {
        cfg,
        phase: AtomicU8::new(CONNECTING),
        win_start: AtomicU64::new(u64::MAX),
        win_end: AtomicU64::new(u64::MAX),
        c: Counts::default(),
        connect_lat: LatencyHist::default(),
        tele_lat: LatencyHist::default(),
        tele_ack_lat: LatencyHist::default(),
        cmd_lat: LatencyHist::default(),
        cmd_ack_lat: LatencyHist::default(),
        errors: Mutex::new(Vec::new()),
        base: tokio::time::Instant::now(),
    });
    let (quit_tx, quit_rx) = watch::channel(false);
    let (ready_tx, ready_rx) = tokio::sync::oneshot::channel();
    let backend_task = tokio::spawn(backend(f.clone(), quit_rx.clone(), ready_tx));
    ready_rx
        .await
        .map_err(|_| anyhow!("backend task ended"))??;

    // Connect phase.
    let start = Instant::now();
    let start_ns = stats::now_ns();
    let rate = f.cfg.connect_rate;
    let mut handles = Vec::with_capacity(n as usize);
    let mut last_print = Instant::now();
    for i in 0..n {
        if rate > 0.0 {
            let due = start + Duration::from_secs_f64(i as f64 / rate);
            if due > Instant::now() {
                sleep_until(due.into()).await;
            }
        } else if i % 256 == 255 {
            tokio::task::yield_now().await;
        }
        handles.push(tokio::spawn(device(i, f.clone(), quit_rx.clone())));
        if last_print.elapsed() >= Duration::from_secs(1) {
            last_print = Instant::now();
            eprintln!(
                "[{:>4}s] started {} connected {} failed {}",
                start.elapsed().as_secs(),
                i + 1,
                f.c.connected.load(Ordering::Relaxed),
                f.c.failed.load(Ordering::Relaxed)
            );
        }
    }
    let deadline = Instant::now() + Duration::from_secs_f64(f.cfg.connect_timeout_s + 2.0);
    while Instant::now() < deadline {
        let done = f.c.connected.load(Ordering::Relaxed) + f.c.failed.load(Ordering::Relaxed);
        if done >= n {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let connected = f.c.connected.load(Ordering::Relaxed);
    let last_ns = f.c.last_connect_ns.load(Ordering::Relaxed).max(start_ns);
    res.connect_time_s = (last_ns - start_ns) as f64 / 1e9;
    res.connect_rate = connected as f64 / res.connect_time_s.max(1e-3);
    eprintln!(
        "connect phase: {connected}/{n} devices subscribed, {} failed in {:.2}s ({:.0} conn/s)",
        f.c.failed.load(Ordering::Relaxed),
        res.connect_time_s,
        res.connect_rate
    );

    // Warm-up: commands start, telemetry is already flowing.
    f.phase.store(RUNNING, Ordering::Relaxed);
    eprintln!("warm-up {:.0}s", f.cfg.warmup_s);
    tokio::time::sleep(Duration::from_secs_f64(f.cfg.warmup_s)).await;

    // Measured window.
    let me = std::process::id();
    let cpu0 = (cpu_seconds(me), pid.and_then(cpu_seconds));
    let w0 = Instant::now();
    f.win_start.store(stats::now_ns(), Ordering::Relaxed);
    f.win_end.store(u64::MAX, Ordering::Relaxed);
    let window = Duration::from_secs_f64(f.cfg.window_s);
    let mut tick = Instant::now();
    while w0.elapsed() < window {
        let left = window.saturating_sub(w0.elapsed());
        tokio::time::sleep(left.min(Duration::from_secs(1))).await;
        if tick.elapsed() >= Duration::from_secs(5) {
            tick = Instant::now();
            eprintln!(
                "[window {:>4}s] telemetry sent {} received {} | commands sent {} received {} | dropped {}",
                w0.elapsed().as_secs(),
                f.c.tele_sent.load(Ordering::Relaxed),
                f.c.tele_recv.load(Ordering::Relaxed),
                f.c.cmd_sent.load(Ordering::Relaxed),
                f.c.cmd_recv.load(Ordering::Relaxed),
                f.c.dropped.load(Ordering::Relaxed),
            );
        }
    }
    f.win_end.store(stats::now_ns(), Ordering::Relaxed);
    let secs = w0.elapsed().as_secs_f64();
    let cpu1 = (cpu_seconds(me), pid.and_then(cpu_seconds));
    res.window_s = secs;
    res.broker_rss_kib = broker_probe.as_mut().and_then(RssProbe::read);
    res.tool_rss_kib = self_probe.as_mut().and_then(RssProbe::read);
    res.tool_cpu_s = cpu0.0.zip(cpu1.0).map(|(a, b)| b - a);
    res.broker_cpu_s = cpu0.1.zip(cpu1.1).map(|(a, b)| b - a);
    res.tool_cpu_pct = pct(res.tool_cpu_s, secs);
    res.broker_cpu_pct = pct(res.broker_cpu_s, secs);
    f.phase.store(STOPPED, Ordering::Relaxed);

    // Drain: wait for what was sent inside the window.
    let d0 = Instant::now();
    let drain = Duration::from_secs_f64(f.cfg.drain_s);
    while d0.elapsed() < drain {
        let c = &f.c;
        let all =
            |a: &AtomicU64, b: &AtomicU64| a.load(Ordering::Relaxed) >= b.load(Ordering::Relaxed);
        if all(&c.tele_recv, &c.tele_sent)
            && all(&c.cmd_recv, &c.cmd_sent)
            && all(&c.tele_acked, &c.tele_sent)
            && all(&c.cmd_acked, &c.cmd_sent)
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let _ = quit_tx.send(true);
    let end_deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    for h in handles.into_iter().chain(std::iter::once(backend_task)) {
        tokio::select! {
            _ = h => {}
            _ = sleep_until(end_deadline) => {
                res.errors.push("devices did not close in time".into());
                break;
            }
        }
    }
    let c = &f.c;
    let ld = |a: &AtomicU64| a.load(Ordering::Relaxed);
    res.connected = connected;
    res.failed = ld(&c.failed);
    res.dropped = ld(&c.dropped);
    res.connect_latency = stats::summarize(&f.connect_lat.merged());
    if let (Some(b), Some(a)) = (res.broker_rss_kib_before, res.broker_rss_kib) {
        if connected > 0 {
            res.broker_rss_kib_per_device = Some((a as f64 - b as f64) / connected as f64);
        }
    }
    let flow = |sent, acked, recv, dup, lat: &LatencyHist, ack: &LatencyHist| Flow {
        sent,
        acked,
        received: recv,
        duplicates: dup,
        lost: sent.saturating_sub(recv),
        rate: recv as f64 / secs.max(1e-3),
        latency: stats::summarize(&lat.merged()),
        puback_latency: stats::summarize(&ack.merged()),
    };
    res.telemetry = flow(
        ld(&c.tele_sent),
        ld(&c.tele_acked),
        ld(&c.tele_recv),
        ld(&c.tele_dup),
        &f.tele_lat,
        &f.tele_ack_lat,
    );
    res.commands = flow(
        ld(&c.cmd_sent),
        ld(&c.cmd_acked),
        ld(&c.cmd_recv),
        ld(&c.cmd_dup),
        &f.cmd_lat,
        &f.cmd_ack_lat,
    );
    if let Ok(e) = f.errors.lock() {
        res.errors.extend(e.iter().cloned());
    }
    res.wall_time_s = wall.elapsed().as_secs_f64();
    Ok(res)
}
