//! `conn` mode: open N idle connections at a given rate, hold them with
//! keep-alive pings, and measure the broker's memory per connection.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Result;
use serde::Serialize;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::watch;
use tokio::time::sleep_until;

use crate::mqtt::{self, Version};
use crate::stats::{self, LatencyHist, LatencySummary};

/// A TLS client configuration (opaque in debug output).
#[derive(Clone)]
pub struct Tls(pub tokio_rustls::TlsConnector);

impl std::fmt::Debug for Tls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Tls")
    }
}

#[derive(Clone, Debug, Serialize)]
pub struct ConnCfg {
    #[serde(skip)]
    pub addr: SocketAddr,
    pub connections: u64,
    /// Connections per second (0 = as fast as possible).
    pub rate: f64,
    pub hold_s: f64,
    pub keepalive: u16,
    pub source_ips: u32,
    #[serde(skip)]
    pub version: Version,
    pub mqtt_version: u8,
    pub connect_timeout_s: f64,
    pub broker_pid: Option<u32>,
    #[serde(skip)]
    pub client_prefix: String,
    #[serde(skip)]
    pub nonce: u32,
    /// CA file when connecting over TLS.
    pub tls_ca: Option<String>,
    /// TLS server name (SNI and certificate check).
    pub tls_server_name: String,
    #[serde(skip)]
    pub tls: Option<Tls>,
}

#[derive(Debug, Default, Serialize)]
pub struct ConnResult {
    pub tool: &'static str,
    pub label: Option<String>,
    pub case: Option<String>,
    pub command: String,
    pub broker: String,
    pub config: Option<ConnCfg>,
    pub connected: u64,
    pub failed: u64,
    /// Connections lost while holding (broker closed, ping timeout).
    pub dropped: u64,
    pub pings: u64,
    pub connect_time_s: f64,
    /// Successful connections per second during the connect phase.
    pub connect_rate: f64,
    pub connect_latency: Option<LatencySummary>,
    pub broker_rss_kib_before: Option<u64>,
    pub broker_rss_kib_connected: Option<u64>,
    pub broker_rss_kib_end: Option<u64>,
    pub broker_rss_kib_per_conn: Option<f64>,
    pub tool_rss_kib_before: Option<u64>,
    pub tool_rss_kib_connected: Option<u64>,
    pub tool_rss_kib_per_conn: Option<f64>,
    pub nofile_limit: Option<u64>,
    pub errors: Vec<String>,
    pub wall_time_s: f64,
}

#[derive(Default)]
struct ConnStats {
    connected: AtomicU64,
    failed: AtomicU64,
    dropped: AtomicU64,
    pings: AtomicU64,
    last_connect_ns: AtomicU64,
    errors: Mutex<Vec<String>>,
}

impl ConnStats {
    fn error(&self, e: String) {
        if let Ok(mut v) = self.errors.lock() {
            if v.len() < 20 {
                v.push(e);
            }
        }
    }
}

/// Reads VmRSS of a process (KiB) from an already open /proc/PID/status, so
/// that sampling still works when all file descriptors are in use.
pub struct RssProbe {
    file: std::fs::File,
}

impl RssProbe {
    pub fn open(pid: u32) -> Option<Self> {
        std::fs::File::open(format!("/proc/{pid}/status"))
            .ok()
            .map(|file| RssProbe { file })
    }

    pub fn open_self() -> Option<Self> {
        Self::open(std::process::id())
    }

    pub fn read(&mut self) -> Option<u64> {
        use std::io::{Read, Seek, SeekFrom};
        self.file.seek(SeekFrom::Start(0)).ok()?;
        let mut s = String::with_capacity(2048);
        self.file.read_to_string(&mut s).ok()?;
        s.lines()
            .find(|l| l.starts_with("VmRSS:"))?
            .split_whitespace()
            .nth(1)?
            .parse()
            .ok()
    }
}

/// CPU time (user + system, seconds) consumed so far by a process.
pub fn cpu_seconds(pid: u32) -> Option<f64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name (which may contain spaces) start at state.
    let rest = &s[s.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    let utime: f64 = f.get(11)?.parse().ok()?;
    let stime: f64 = f.get(12)?.parse().ok()?;
    // USER_HZ is 100 on Linux.
    Some((utime + stime) / 100.0)
}

/// VmRSS of a process in KiB.
pub fn rss_kib(pid: u32) -> Option<u64> {
    RssProbe::open(pid)?.read()
}

const PINGREQ: [u8; 2] = [0xC0, 0x00];
const DISCONNECT: [u8; 2] = [0xE0, 0x00];

/// One idle connection: connect, then ping every keep-alive period until released.
async fn hold_one(
    i: u64,
    cfg: Arc<ConnCfg>,
    st: Arc<ConnStats>,
    lat: Arc<LatencyHist>,
    release: watch::Receiver<bool>,
) {
    // With one source address the kernel picks the port at connect() time
    // (unique per 4-tuple, so ports still in TIME_WAIT towards another broker
    // are reused); `bind(ip:0)` would search for a port free of every socket,
    // TIME_WAIT included, and slows down badly once tens of thousands are
    // taken (see bench/HISTORY.md, the 10k case inside compare.sh). With
    // several, mqtt::tcp_connect picks the ports itself.
    let src = (cfg.source_ips > 1).then(|| {
        IpAddr::V4(Ipv4Addr::new(
            127,
            0,
            0,
            1 + (i % u64::from(cfg.source_ips.clamp(1, 254))) as u8,
        ))
    });
    let opts = mqtt::ConnectOpts {
        topic_alias_max: None,
        version: cfg.version,
        keep_alive: cfg.keepalive,
        clean: true,
        session_expiry: 0,
    };
    let id = format!("{}-{:08x}-c{i}", cfg.client_prefix, cfg.nonce);
    let t = stats::now_ns();
    let timeout = Duration::from_secs_f64(cfg.connect_timeout_s);
    let from = src
        .map(|s| s.to_string())
        .unwrap_or_else(|| "default".into());
    if let Some(tls) = &cfg.tls {
        let r = mqtt::mqtt_connect_tls(
            cfg.addr,
            src,
            (&tls.0, &cfg.tls_server_name),
            &opts,
            &id,
            timeout,
            16,
        )
        .await
        .map(|c| c.stream);
        hold_or_count(r, i, t, &from, &cfg, &st, &lat, release).await;
    } else {
        let r = mqtt::mqtt_connect(cfg.addr, src, &opts, &id, timeout, 16)
            .await
            .map(|c| c.stream);
        hold_or_count(r, i, t, &from, &cfg, &st, &lat, release).await;
    }
}

/// A connection attempt's outcome: held until released, or counted as failed.
#[allow(clippy::too_many_arguments)]
async fn hold_or_count<S: AsyncRead + AsyncWrite + Unpin>(
    r: anyhow::Result<S>,
    i: u64,
    t: u64,
    from: &str,
    cfg: &ConnCfg,
    st: &ConnStats,
    lat: &LatencyHist,
    release: watch::Receiver<bool>,
) {
    match r {
        Ok(stream) => {
            connected(i, t, st, lat);
            hold_loop(i, stream, cfg, st, release).await;
        }
        Err(e) => {
            st.failed.fetch_add(1, Ordering::Relaxed);
            st.error(format!("conn {i} from {from}: {e:#}"));
        }
    }
}

fn connected(i: u64, t: u64, st: &ConnStats, lat: &LatencyHist) {
    let done = stats::now_ns();
    let mut lat_sample = vec![done.saturating_sub(t)];
    lat.flush(i as usize, &mut lat_sample);
    st.connected.fetch_add(1, Ordering::Relaxed);
    st.last_connect_ns.fetch_max(done, Ordering::Relaxed);
}

async fn hold_loop<S: AsyncRead + AsyncWrite + Unpin>(
    i: u64,
    mut stream: S,
    cfg: &ConnCfg,
    st: &ConnStats,
    mut release: watch::Receiver<bool>,
) {
    // Ping at 3/4 of the keep-alive period.
    let every = Duration::from_millis(u64::from(cfg.keepalive.max(1)) * 750);
    let mut buf = [0u8; 8];
    let mut awaiting_pong = false;
    let mut next_ping = tokio::time::Instant::now() + every;
    for _ in 0..10_000_000u32 {
        if *release.borrow() {
            break;
        }
        tokio::select! {
            _ = release.changed() => break,
            r = stream.read(&mut buf) => match r {
                Ok(n) if n > 0 => {
                    // PINGRESP (0xD0 0x00); anything else is ignored.
                    awaiting_pong = false;
                }
                _ => {
                    st.dropped.fetch_add(1, Ordering::Relaxed);
                    st.error(format!("conn {i}: closed by broker while idle"));
                    return;
                }
            },
            _ = sleep_until(next_ping) => {
                if awaiting_pong {
                    st.dropped.fetch_add(1, Ordering::Relaxed);
                    st.error(format!("conn {i}: no PINGRESP"));
                    return;
                }
                if stream.write_all(&PINGREQ).await.is_err() {
                    st.dropped.fetch_add(1, Ordering::Relaxed);
                    return;
                }
                st.pings.fetch_add(1, Ordering::Relaxed);
                awaiting_pong = true;
                next_ping += every;
            }
        }
    }
    let _ = tokio::time::timeout(Duration::from_secs(2), stream.write_all(&DISCONNECT)).await;
}

pub async fn run(cfg: ConnCfg) -> Result<ConnResult> {
    let _ = stats::base();
    let wall = Instant::now();
    let cfg = Arc::new(cfg);
    let st = Arc::new(ConnStats::default());
    let lat = Arc::new(LatencyHist::default());
    let mut res = ConnResult {
        tool: "millet-bench",
        broker: cfg.addr.to_string(),
        config: Some((*cfg).clone()),
        ..Default::default()
    };
    // Every connection needs a file descriptor.
    let limit = rlimit::increase_nofile_limit(u64::MAX).ok();
    res.nofile_limit = limit;
    if let Some(l) = limit {
        if l < cfg.connections + 64 {
            eprintln!(
                "warning: open-files limit {l} is below {} connections (+64); expect failures",
                cfg.connections
            );
        }
    }
    let mut broker_probe = cfg.broker_pid.and_then(RssProbe::open);
    let mut self_probe = RssProbe::open_self();
    let mut rss = || broker_probe.as_mut().and_then(RssProbe::read);
    let mut self_rss = || self_probe.as_mut().and_then(RssProbe::read);
    res.broker_rss_kib_before = rss();
    res.tool_rss_kib_before = self_rss();

    let (release_tx, release_rx) = watch::channel(false);
    let start = Instant::now();
    let start_ns = stats::now_ns();
    let n = cfg.connections;
    let mut handles = Vec::with_capacity(n as usize);
    let mut last_print = Instant::now();
    for i in 0..n {
        if cfg.rate > 0.0 {
            let due = start + Duration::from_secs_f64(i as f64 / cfg.rate);
            if due > Instant::now() {
                sleep_until(due.into()).await;
            }
        } else if i % 256 == 255 {
            tokio::task::yield_now().await;
        }
        handles.push(tokio::spawn(hold_one(
            i,
            cfg.clone(),
            st.clone(),
            lat.clone(),
            release_rx.clone(),
        )));
        if last_print.elapsed() >= Duration::from_secs(1) {
            last_print = Instant::now();
            eprintln!(
                "[{:>4}s] started {} connected {} failed {}",
                start.elapsed().as_secs(),
                i + 1,
                st.connected.load(Ordering::Relaxed),
                st.failed.load(Ordering::Relaxed)
            );
        }
    }
    // Wait for the connect phase to finish (bounded by the connect timeout).
    let deadline = Instant::now() + Duration::from_secs_f64(cfg.connect_timeout_s + 2.0);
    while Instant::now() < deadline {
        let done = st.connected.load(Ordering::Relaxed) + st.failed.load(Ordering::Relaxed);
        if done >= n {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let connected = st.connected.load(Ordering::Relaxed);
    let last_ns = st.last_connect_ns.load(Ordering::Relaxed).max(start_ns);
    res.connect_time_s = (last_ns - start_ns) as f64 / 1e9;
    res.connect_rate = connected as f64 / res.connect_time_s.max(1e-3);
    eprintln!(
        "connect phase: {connected}/{n} connected, {} failed in {:.2}s ({:.0} conn/s)",
        st.failed.load(Ordering::Relaxed),
        res.connect_time_s,
        res.connect_rate
    );

    // Hold: let the broker settle, sample memory, keep pinging.
    let hold = Duration::from_secs_f64(cfg.hold_s);
    let hold_start = Instant::now();
    let settle = hold.min(Duration::from_secs(2));
    tokio::time::sleep(settle).await;
    res.broker_rss_kib_connected = rss();
    res.tool_rss_kib_connected = self_rss();
    let mut tick = Instant::now();
    while hold_start.elapsed() < hold {
        let left = hold.saturating_sub(hold_start.elapsed());
        tokio::time::sleep(left.min(Duration::from_secs(1))).await;
        if tick.elapsed() >= Duration::from_secs(5) {
            tick = Instant::now();
            eprintln!(
                "[hold {:>4}s] open {} dropped {} pings {}",
                hold_start.elapsed().as_secs(),
                connected - st.dropped.load(Ordering::Relaxed),
                st.dropped.load(Ordering::Relaxed),
                st.pings.load(Ordering::Relaxed)
            );
        }
    }
    res.broker_rss_kib_end = rss();
    let _ = release_tx.send(true);
    let end_deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    for h in handles {
        tokio::select! {
            _ = h => {}
            _ = sleep_until(end_deadline) => {
                res.errors.push("connections did not close in time".into());
                break;
            }
        }
    }
    res.connected = connected;
    res.failed = st.failed.load(Ordering::Relaxed);
    res.dropped = st.dropped.load(Ordering::Relaxed);
    res.pings = st.pings.load(Ordering::Relaxed);
    res.connect_latency = stats::summarize(&lat.merged());
    if let (Some(b), Some(a)) = (res.broker_rss_kib_before, res.broker_rss_kib_connected) {
        if connected > 0 {
            res.broker_rss_kib_per_conn = Some((a as f64 - b as f64) / connected as f64);
        }
    }
    if let (Some(b), Some(a)) = (res.tool_rss_kib_before, res.tool_rss_kib_connected) {
        if connected > 0 {
            res.tool_rss_kib_per_conn = Some((a as f64 - b as f64) / connected as f64);
        }
    }
    if let Ok(e) = st.errors.lock() {
        res.errors.extend(e.iter().cloned());
    }
    res.wall_time_s = wall.elapsed().as_secs_f64();
    Ok(res)
}
