//! `overload`: the overload-isolation suite (issue 11).
//!
//! Every scenario runs twice for the same length of time: a baseline phase
//! (ordinary clients and the probe, no attacker) and an attack phase (the same
//! plus the scenario's attacker). Measured in both phases:
//!
//! * the **probe**: its own connection on its own thread and runtime (so the
//!   tool's load does not delay it), a PINGREQ every 100 ms (round trip) and,
//!   50 ms later, a QoS 1 PUBLISH to a topic it subscribes to itself
//!   (publish → deliver). A ping or message still unanswered at the end of a
//!   phase counts with the time it waited, so a stuck broker shows as a huge
//!   p99, not as a missing sample;
//! * the **ordinary clients**: `--devices` QoS 1 devices (own thread and
//!   runtime too), each publishing one message at a time and waiting for the
//!   PUBACK: their acknowledged msg/s and PUBACK latency;
//! * the broker's **RSS** (VmRSS of `--broker-pid`, polled every 50 ms): the
//!   peak of each phase. Above `--rss-abort-mib` the attack stops early (a
//!   safety valve for a shared machine) and the scenario is marked aborted.
//!
//! * the **attacker**: on a runtime of its own whose threads run at
//!   `--attacker-nice` (19 by default). On a real deployment the attacking
//!   client runs on another machine; here it shares this machine's cores with
//!   the devices' client, and at the same priority its own CPU (generating
//!   gigabytes a second) is taken from the devices' thread: the devices then
//!   slow down whatever the broker does, for any broker (measured on 2 cores:
//!   the broker's CPU stays where it was in the baseline while the tool's
//!   grows by half a core). Niced, the attacker's client uses the CPU the
//!   others leave; what it sends still reaches the broker at full priority.
//!
//! Targets (per scenario, attack phase): probe PING and publish → deliver p99
//! under 50 ms, the devices keep at least 80% of their baseline msg/s, the peak
//! RSS within `--rss-budget-mib`.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use bytes::{Bytes, BytesMut};
use clap::Args;
use mqttbytes::v5;
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};

use crate::conn::RssProbe;
use crate::mqtt::{self, ConnectOpts, In, PubTemplate, Version};
use crate::stats::{new_histogram, now_ns, summarize, LatencySummary};

/// Target: probe p99 (PING round trip and publish → deliver), ms.
pub const TARGET_PROBE_P99_MS: f64 = 50.0;
/// Target: ordinary clients' msg/s under attack, percent of baseline.
pub const TARGET_THROUGHPUT_PCT: f64 = 80.0;

pub const BEGIN_MARK: &str = "<!-- overload:begin -->";
pub const END_MARK: &str = "<!-- overload:end -->";

#[derive(Args, Debug, Clone)]
pub struct OverloadArgs {
    /// Scenario(s), comma-separated, or `all`: stalled-subscriber,
    /// offline-queues, cpu-heavy, outbound-aliases, inbound-aliases,
    /// big-offline-qos0, retained-flood, preauth-hog.
    #[arg(long, default_value = "all")]
    pub scenario: String,
    /// Broker PID (RSS from /proc/PID/status).
    #[arg(long)]
    pub broker_pid: Option<u32>,
    /// Small counts and short phases (CI: well under 90 s for all scenarios).
    #[arg(long)]
    pub quick: bool,
    /// RSS budget (target: the attack phase's peak RSS stays within it), MiB.
    #[arg(long, default_value_t = 512)]
    pub rss_budget_mib: u64,
    /// Safety valve: stop the attack once the broker's RSS exceeds this, MiB.
    #[arg(long, default_value_t = 2048)]
    pub rss_abort_mib: u64,
    /// Ordinary QoS 1 devices (one message in flight each).
    #[arg(long, default_value_t = 5)]
    pub devices: usize,
    /// Baseline phase length (default 5s, quick 2s).
    #[arg(long, value_parser = crate::parse_duration)]
    pub baseline: Option<f64>,
    /// Attack phase length (default 10s, quick 4s).
    #[arg(long, value_parser = crate::parse_duration)]
    pub attack: Option<f64>,
    /// Niceness of the attacker's client threads (0: as the others; see
    /// the module doc for why it runs niced).
    #[arg(long, default_value_t = 19)]
    pub attacker_nice: u8,
}

#[derive(Args, Debug, Clone)]
pub struct OverloadReportArgs {
    /// `overload` JSON results (one per broker).
    pub files: Vec<PathBuf>,
    /// Replace the section between the overload markers of this markdown file
    /// (inserted before `## Chart`, else appended, when it has none); without
    /// it the section is printed.
    #[arg(long)]
    pub splice: Option<PathBuf>,
    /// Text put under the section title (e.g. how the brokers were run).
    #[arg(long)]
    pub intro: Option<String>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Sc {
    Stalled,
    OfflineQueues,
    CpuHeavy,
    OutboundAliases,
    InboundAliases,
    BigOffline,
    RetainedFlood,
    PreauthHog,
}

const ALL: [Sc; 8] = [
    Sc::Stalled,
    Sc::OfflineQueues,
    Sc::CpuHeavy,
    Sc::OutboundAliases,
    Sc::InboundAliases,
    Sc::BigOffline,
    Sc::RetainedFlood,
    Sc::PreauthHog,
];

impl Sc {
    fn name(self) -> &'static str {
        match self {
            Sc::Stalled => "stalled-subscriber",
            Sc::OfflineQueues => "offline-queues",
            Sc::CpuHeavy => "cpu-heavy",
            Sc::OutboundAliases => "outbound-aliases",
            Sc::InboundAliases => "inbound-aliases",
            Sc::BigOffline => "big-offline-qos0",
            Sc::RetainedFlood => "retained-flood",
            Sc::PreauthHog => "preauth-hog",
        }
    }

    fn title(self, p: &Params) -> String {
        match self {
            Sc::Stalled => "1. Stalled subscriber on `#` (keep-alive 5 s, never reads)".into(),
            Sc::OfflineQueues => format!(
                "2. QoS 1 flood (window 32) into {} offline persistent sessions",
                p.sessions
            ),
            Sc::CpuHeavy => format!(
                "3. QoS 0 flood, as fast as one connection can, into {} offline sessions",
                p.sessions
            ),
            Sc::OutboundAliases => {
                "4. Distinct topics to a v5 subscriber with Topic Alias Maximum 10".into()
            }
            Sc::InboundAliases => format!(
                "5. {} v5 publishers re-mapping topic aliases, {} KiB payloads",
                p.alias_publishers,
                p.alias_payload / 1024
            ),
            Sc::BigOffline => "6. 500 KB QoS 0 messages to one offline session".into(),
            Sc::RetainedFlood => format!(
                "7. {} retained messages: a new subscriber, and SUBSCRIBE repeated in a loop",
                p.retained
            ),
            Sc::PreauthHog => format!(
                "8. {} connections each sending all but the last byte of a 1 MB CONNECT",
                p.hogs
            ),
        }
    }

    fn parse(list: &str) -> Result<Vec<Sc>> {
        if list.trim() == "all" {
            return Ok(ALL.to_vec());
        }
        list.split(',')
            .map(|s| {
                let s = s.trim();
                ALL.iter()
                    .copied()
                    .find(|sc| sc.name() == s)
                    .ok_or_else(|| anyhow!("unknown overload scenario {s:?}"))
            })
            .collect()
    }
}

/// Counts and lengths of one suite run.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Params {
    pub quick: bool,
    pub baseline_s: f64,
    pub attack_s: f64,
    pub devices: usize,
    pub sessions: usize,
    pub retained: usize,
    pub hogs: usize,
    pub alias_publishers: usize,
    pub alias_payload: usize,
    pub big_payload: usize,
    pub rss_budget_mib: u64,
    pub rss_abort_mib: u64,
    /// Niceness of the attacker's client threads (absent in results from
    /// before it existed: they ran at 0).
    #[serde(default)]
    pub attacker_nice: u8,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct ProbeStats {
    pub connected: bool,
    pub pings_sent: u64,
    /// PINGREQs without PINGRESP at the end of the phase.
    pub pings_lost: u64,
    pub ping: Option<LatencySummary>,
    pub pubs_sent: u64,
    /// Probe messages not delivered back by the end of the phase.
    pub pubs_lost: u64,
    pub pub_deliver: Option<LatencySummary>,
    pub error: Option<String>,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct DeviceStats {
    pub connected: usize,
    pub acked: u64,
    /// Acknowledged messages per second, all devices together.
    pub rate: f64,
    pub puback: Option<LatencySummary>,
    pub errors: Vec<String>,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct PhaseResult {
    pub duration_s: f64,
    pub probe: ProbeStats,
    pub devices: DeviceStats,
    pub rss_peak_kib: Option<u64>,
    pub rss_end_kib: Option<u64>,
    /// Attacker's own numbers (attack phase only).
    pub attacker: BTreeMap<String, serde_json::Value>,
    pub aborted: Option<String>,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct ScenarioResult {
    pub name: String,
    pub title: String,
    pub rss_start_kib: Option<u64>,
    pub baseline: PhaseResult,
    pub attack: PhaseResult,
    pub probe_ping_p99_ms: Option<f64>,
    pub probe_pub_p99_ms: Option<f64>,
    pub throughput_pct: Option<f64>,
    pub rss_peak_mib: Option<f64>,
    pub pass_probe: bool,
    pub pass_throughput: bool,
    /// None when the broker PID was not given.
    pub pass_rss: Option<bool>,
    pub notes: Vec<String>,
    pub error: Option<String>,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct OverloadResult {
    pub kind: String,
    pub label: Option<String>,
    pub broker: String,
    pub command: String,
    pub date_unix: u64,
    pub params: Option<Params>,
    pub scenarios: Vec<ScenarioResult>,
}

// ------------------------------------------------------------------ plumbing

/// Shared stop flag.
#[derive(Clone, Default)]
struct Stop(Arc<AtomicBool>);

impl Stop {
    fn set(&self) {
        self.0.store(true, Ordering::Relaxed);
    }
    fn is_set(&self) -> bool {
        self.0.load(Ordering::Relaxed)
    }
}

/// Run a future on a thread of its own with a current-thread runtime.
fn on_thread<T, F>(name: &str, f: F) -> std::thread::JoinHandle<Result<T>>
where
    T: Send + 'static,
    F: std::future::Future<Output = Result<T>> + Send + 'static,
{
    let name = name.to_string();
    std::thread::Builder::new()
        .name(name.clone())
        .spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            rt.block_on(f)
        })
        .unwrap_or_else(|e| {
            // Could not spawn: report through a thread that returns the error.
            let msg = format!("spawning thread {name}: {e}");
            std::thread::spawn(move || Err(anyhow!(msg)))
        })
}

fn join<T>(h: std::thread::JoinHandle<Result<T>>) -> Result<T> {
    h.join().map_err(|_| anyhow!("thread panicked"))?
}

/// Polls the broker's VmRSS every 50 ms; keeps the peak since the last reset
/// and raises `over` above the abort threshold.
struct RssSampler {
    peak: Arc<AtomicU64>,
    last: Arc<AtomicU64>,
    over: Stop,
    done: Stop,
    handle: Option<std::thread::JoinHandle<()>>,
}

impl RssSampler {
    fn start(pid: Option<u32>, abort_kib: u64) -> Self {
        let peak = Arc::new(AtomicU64::new(0));
        let last = Arc::new(AtomicU64::new(0));
        let over = Stop::default();
        let done = Stop::default();
        let handle = pid.and_then(RssProbe::open).map(|mut probe| {
            let (peak, last, over, done) = (peak.clone(), last.clone(), over.clone(), done.clone());
            std::thread::spawn(move || {
                while !done.is_set() {
                    if let Some(v) = probe.read() {
                        last.store(v, Ordering::Relaxed);
                        peak.fetch_max(v, Ordering::Relaxed);
                        if v > abort_kib {
                            over.set();
                        }
                    }
                    std::thread::sleep(Duration::from_millis(50));
                }
            })
        });
        RssSampler {
            peak,
            last,
            over,
            done,
            handle,
        }
    }

    fn active(&self) -> bool {
        self.handle.is_some()
    }

    fn now(&self) -> Option<u64> {
        let v = self.last.load(Ordering::Relaxed);
        (self.active() && v > 0).then_some(v)
    }

    /// Peak since the last reset; starts a new window.
    fn take_peak(&self) -> Option<u64> {
        let cur = self.last.load(Ordering::Relaxed);
        let v = self.peak.swap(cur, Ordering::Relaxed);
        (self.active() && v > 0).then_some(v)
    }

    fn reset(&self) {
        self.peak
            .store(self.last.load(Ordering::Relaxed), Ordering::Relaxed);
        self.over.0.store(false, Ordering::Relaxed);
    }
}

impl Drop for RssSampler {
    fn drop(&mut self) {
        self.done.set();
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

/// A minimal MQTT connection.
struct Cl {
    s: TcpStream,
    rbuf: BytesMut,
    ver: Version,
    out: BytesMut,
}

struct ConnSpec<'a> {
    addr: SocketAddr,
    ver: Version,
    cid: &'a str,
    keepalive: u16,
    clean: bool,
    alias_max: Option<u16>,
}

impl Cl {
    async fn connect(c: ConnSpec<'_>) -> Result<Cl> {
        let opts = ConnectOpts {
            version: c.ver,
            keep_alive: c.keepalive,
            clean: c.clean,
            session_expiry: 3600,
            topic_alias_max: c.alias_max,
        };
        let conn = mqtt::mqtt_connect(
            c.addr,
            None,
            &opts,
            c.cid,
            Duration::from_secs(15),
            64 * 1024,
        )
        .await
        .with_context(|| format!("connecting {}", c.cid))?;
        Ok(Cl {
            s: conn.stream,
            rbuf: conn.rbuf,
            ver: c.ver,
            out: BytesMut::with_capacity(4096),
        })
    }

    async fn v4(addr: SocketAddr, cid: &str, clean: bool) -> Result<Cl> {
        Cl::connect(ConnSpec {
            addr,
            ver: Version::V4,
            cid,
            keepalive: 60,
            clean,
            alias_max: None,
        })
        .await
    }

    async fn flush(&mut self) -> Result<()> {
        if !self.out.is_empty() {
            self.s.write_all(&self.out).await?;
            self.out.clear();
        }
        Ok(())
    }

    /// Next packet; `None` once `stop` is set.
    async fn next(&mut self, stop: &Stop) -> Result<Option<In>> {
        loop {
            if let Some(p) = mqtt::read_packet(self.ver, &mut self.rbuf)? {
                return Ok(Some(p));
            }
            if stop.is_set() {
                return Ok(None);
            }
            tokio::select! {
                r = self.s.read_buf(&mut self.rbuf) => {
                    if r? == 0 {
                        bail!("connection closed by the broker");
                    }
                }
                _ = tokio::time::sleep(Duration::from_millis(50)) => {}
            }
        }
    }

    /// SUBSCRIBE and wait for the SUBACK (PUBLISHes before it are acknowledged
    /// and dropped).
    async fn subscribe(&mut self, filter: &str, qos: u8, stop: &Stop) -> Result<()> {
        mqtt::encode_subscribe(self.ver, 1, filter, qos, &mut self.out)?;
        self.flush().await?;
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if Instant::now() > deadline {
                bail!("no SUBACK within 30 s");
            }
            match self.next(stop).await? {
                None => bail!("stopped before SUBACK"),
                Some(In::SubAck { ok: true }) => return Ok(()),
                Some(In::SubAck { ok: false }) => bail!("SUBSCRIBE {filter} refused"),
                Some(In::Publish { qos, pkid, .. }) => self.ack(qos, pkid).await?,
                Some(_) => {}
            }
        }
    }

    async fn ack(&mut self, qos: u8, pkid: u16) -> Result<()> {
        match qos {
            1 => mqtt::encode_puback(self.ver, pkid, &mut self.out)?,
            2 => mqtt::encode_pubrec(self.ver, pkid, &mut self.out)?,
            _ => return Ok(()),
        }
        self.flush().await
    }

    async fn disconnect(mut self) {
        if mqtt::encode_disconnect(self.ver, &mut self.out).is_ok() {
            let _ = self.flush().await;
        }
        let _ = self.s.shutdown().await;
    }

    /// A QoS 1 round trip: everything this connection sent before has been
    /// processed by the broker once the PUBACK is back.
    async fn barrier(&mut self, topic: &str) -> Result<()> {
        let stop = Stop::default();
        mqtt::encode_publish(
            self.ver,
            topic,
            1,
            false,
            65535,
            Bytes::from_static(b"barrier"),
            &mut self.out,
        )?;
        self.flush().await?;
        let fut = async {
            loop {
                match self.next(&stop).await? {
                    Some(In::PubAck { pkid: 65535, .. }) => return Ok::<(), anyhow::Error>(()),
                    Some(_) => {}
                    None => bail!("stopped"),
                }
            }
        };
        tokio::time::timeout(Duration::from_secs(120), fut)
            .await
            .map_err(|_| anyhow!("no PUBACK for the barrier within 120 s"))?
    }
}

fn ms(s: &Option<LatencySummary>) -> Option<f64> {
    s.as_ref().map(|l| l.p99_us / 1000.0)
}

// --------------------------------------------------------------------- probe

async fn probe(addr: SocketAddr, cid: String, topic: String, stop: Stop) -> Result<ProbeStats> {
    let mut st = ProbeStats::default();
    let mut cl = match Cl::v4(addr, &cid, true).await {
        Ok(c) => c,
        Err(e) => {
            st.error = Some(format!("{e:#}"));
            return Ok(st);
        }
    };
    if let Err(e) = cl.subscribe(&topic, 1, &stop).await {
        st.error = Some(format!("{e:#}"));
        return Ok(st);
    }
    st.connected = true;
    let tmpl = PubTemplate::new(Version::V4, &topic, 1, false, 32)?;
    let mut ping_h = new_histogram();
    let mut pub_h = new_histogram();
    let mut pings: VecDeque<u64> = VecDeque::new();
    let mut pubs: HashMap<u64, u64> = HashMap::new();
    let mut seq = 0u64;
    let mut tick = tokio::time::interval(Duration::from_millis(50));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut n = 0u64;
    let rec = |h: &mut hdrhistogram::Histogram<u64>, v: u64| {
        h.saturating_record(v.max(1));
    };
    // After the stop: no more sends, up to 1 s for the answers still due.
    let mut grace: Option<Instant> = None;
    let res: Result<()> = async {
        loop {
            if stop.is_set() && grace.is_none() {
                grace = Some(Instant::now() + Duration::from_secs(1));
            }
            if let Some(g) = grace {
                if (pings.is_empty() && pubs.is_empty()) || Instant::now() > g {
                    return Ok(());
                }
            }
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_millis(20)) => {}
                _ = tick.tick(), if grace.is_none() => {
                    let now = now_ns();
                    if n.is_multiple_of(2) {
                        mqtt::encode_pingreq(Version::V4, &mut cl.out)?;
                        pings.push_back(now);
                        st.pings_sent += 1;
                    } else {
                        seq += 1;
                        let pkid = (seq % 65_000 + 1) as u16;
                        tmpl.write(&mut cl.out, pkid, 1, seq, now);
                        pubs.insert(seq, now);
                        st.pubs_sent += 1;
                    }
                    n += 1;
                    cl.flush().await?;
                }
                r = cl.s.read_buf(&mut cl.rbuf) => {
                    if r? == 0 {
                        bail!("probe connection closed by the broker");
                    }
                    while let Some(p) = mqtt::read_packet(Version::V4, &mut cl.rbuf)? {
                        match p {
                            In::PingResp => {
                                if let Some(t) = pings.pop_front() {
                                    rec(&mut ping_h, now_ns().saturating_sub(t));
                                }
                            }
                            In::Publish { qos, pkid, payload } => {
                                if let Some(h) = mqtt::parse_header(&payload) {
                                    if pubs.remove(&h.seq).is_some() {
                                        rec(&mut pub_h, now_ns().saturating_sub(h.ts_ns));
                                    }
                                }
                                if qos == 1 {
                                    mqtt::encode_puback(Version::V4, pkid, &mut cl.out)?;
                                }
                            }
                            _ => {}
                        }
                    }
                    cl.flush().await?;
                }
            }
        }
    }
    .await;
    if let Err(e) = res {
        st.error = Some(format!("{e:#}"));
    }
    // Whatever is still unanswered counts with the time it has waited.
    let end = now_ns();
    st.pings_lost = pings.len() as u64;
    for t in pings {
        rec(&mut ping_h, end.saturating_sub(t));
    }
    st.pubs_lost = pubs.len() as u64;
    for (_, t) in pubs {
        rec(&mut pub_h, end.saturating_sub(t));
    }
    st.ping = summarize(&ping_h);
    st.pub_deliver = summarize(&pub_h);
    if st.error.is_none() {
        cl.disconnect().await;
    }
    Ok(st)
}

// ------------------------------------------------------------------- devices

struct DevOut {
    acked: u64,
    active_s: f64,
    hist: hdrhistogram::Histogram<u64>,
    error: Option<String>,
}

async fn device(addr: SocketAddr, cid: String, topic: String, stop: Stop) -> DevOut {
    let mut o = DevOut {
        acked: 0,
        active_s: 0.0,
        hist: new_histogram(),
        error: None,
    };
    let mut cl = match Cl::v4(addr, &cid, true).await {
        Ok(c) => c,
        Err(e) => {
            o.error = Some(format!("{e:#}"));
            return o;
        }
    };
    let tmpl = match PubTemplate::new(Version::V4, &topic, 1, false, 64) {
        Ok(t) => t,
        Err(e) => {
            o.error = Some(format!("{e:#}"));
            return o;
        }
    };
    let t0 = Instant::now();
    let mut seq = 0u64;
    let r: Result<()> = async {
        while !stop.is_set() {
            seq += 1;
            let pkid = (seq % 65_000 + 1) as u16;
            let sent = now_ns();
            tmpl.write(&mut cl.out, pkid, 2, seq, sent);
            cl.flush().await?;
            loop {
                match cl.next(&stop).await? {
                    None => return Ok(()),
                    Some(In::PubAck { pkid: p, .. }) if p == pkid => {
                        o.acked += 1;
                        o.hist
                            .saturating_record(now_ns().saturating_sub(sent).max(1));
                        break;
                    }
                    Some(_) => {}
                }
            }
        }
        Ok(())
    }
    .await;
    o.active_s = t0.elapsed().as_secs_f64();
    match r {
        Ok(()) => cl.disconnect().await,
        Err(e) => o.error = Some(format!("{e:#}")),
    }
    o
}

async fn devices(
    addr: SocketAddr,
    n: usize,
    prefix: String,
    stop: Stop,
    ready: Arc<AtomicU64>,
) -> Result<DeviceStats> {
    let mut hs = Vec::new();
    for i in 0..n {
        let stop = stop.clone();
        let (cid, topic) = (format!("{prefix}-dev{i}"), format!("{prefix}/dev/{i}"));
        hs.push(tokio::spawn(device(addr, cid, topic, stop)));
    }
    ready.fetch_add(1, Ordering::Relaxed);
    let mut st = DeviceStats::default();
    let mut hist = new_histogram();
    let mut active: f64 = 0.0;
    for h in hs {
        let o = h.await?;
        if o.error.is_none() || o.acked > 0 {
            st.connected += 1;
        }
        st.acked += o.acked;
        active = active.max(o.active_s);
        let _ = hist.add(&o.hist);
        if let Some(e) = o.error {
            st.errors.push(e);
        }
    }
    st.rate = if active > 0.0 {
        st.acked as f64 / active
    } else {
        0.0
    };
    st.puback = summarize(&hist);
    Ok(st)
}

// ----------------------------------------------------------------- attackers

type Attack = BTreeMap<String, serde_json::Value>;

fn put(a: &mut Attack, k: &str, v: impl Into<serde_json::Value>) {
    a.insert(k.to_string(), v.into());
}

/// Scenario 1: subscribe to `#` with keep-alive 5 s, then never read or ping.
async fn attack_stalled(addr: SocketAddr, cid: String, stop: Stop) -> Result<Attack> {
    let mut a = Attack::new();
    let sock = TcpSocket::new_v4()?;
    // A small receive buffer: the stall is felt after kilobytes, not megabytes.
    let _ = sock.set_recv_buffer_size(4096);
    let mut s = sock.connect(addr).await?;
    let mut out = BytesMut::new();
    let opts = ConnectOpts {
        version: Version::V4,
        keep_alive: 5,
        clean: true,
        session_expiry: 0,
        topic_alias_max: None,
    };
    mqtt::encode_connect(&opts, &cid, &mut out)?;
    mqtt::encode_subscribe(Version::V4, 1, "#", 1, &mut out)?;
    s.write_all(&out).await?;
    let t0 = Instant::now();
    while !stop.is_set() {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    put(&mut a, "held_s", t0.elapsed().as_secs_f64());
    // Was it disconnected? Drain for up to 2 s looking for the end of stream.
    let mut buf = vec![0u8; 1 << 16];
    let mut drained = 0u64;
    let closed = tokio::time::timeout(Duration::from_secs(2), async {
        loop {
            match s.read(&mut buf).await {
                Ok(0) | Err(_) => return true,
                Ok(n) => drained += n as u64,
            }
        }
    })
    .await
    .unwrap_or(false);
    put(&mut a, "closed_by_broker", closed);
    put(&mut a, "bytes_buffered", drained);
    Ok(a)
}

/// QoS 1 publisher with a window, until stopped (counts into `sent` / `acked`).
#[allow(clippy::too_many_arguments)]
async fn flood_qos1(
    cl: &mut Cl,
    topic: &str,
    size: usize,
    window: usize,
    stop: &Stop,
    distinct: bool,
    sent: &AtomicU64,
    acked: &AtomicU64,
) -> Result<()> {
    let tmpl = PubTemplate::new(cl.ver, topic, 1, false, size)?;
    let mut inflight = 0usize;
    let payload = Bytes::from(vec![0u8; size]);
    while !stop.is_set() {
        while inflight < window {
            let n = sent.fetch_add(1, Ordering::Relaxed) + 1;
            let pkid = (n % 65_000 + 1) as u16;
            if distinct {
                let t = format!("{topic}/{n}");
                mqtt::encode_publish(cl.ver, &t, 1, false, pkid, payload.clone(), &mut cl.out)?;
            } else {
                tmpl.write(&mut cl.out, pkid, 3, n, now_ns());
            }
            inflight += 1;
        }
        cl.flush().await?;
        match cl.next(stop).await? {
            None => break,
            Some(In::PubAck { .. }) => {
                inflight -= 1;
                acked.fetch_add(1, Ordering::Relaxed);
            }
            Some(_) => {}
        }
    }
    Ok(())
}

/// Connect (again after every disconnection, as a real attacker would) and
/// run `f` until stopped; returns the number of disconnections.
async fn reconnecting<F, Fut>(
    addr: SocketAddr,
    cid: &str,
    stop: &Stop,
    mut f: F,
) -> (u64, Option<String>)
where
    F: FnMut(Cl) -> Fut,
    Fut: std::future::Future<Output = Result<()>>,
{
    let mut drops = 0u64;
    let mut last = None;
    while !stop.is_set() {
        match Cl::v4(addr, cid, true).await {
            Ok(cl) => {
                if let Err(e) = f(cl).await {
                    drops += 1;
                    last = Some(format!("{e:#}"));
                }
            }
            Err(e) => {
                last = Some(format!("{e:#}"));
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
    (drops, last)
}

/// Scenario 2: QoS 1 flood (window 32) to the offline sessions' topic.
async fn attack_qos1_flood(
    addr: SocketAddr,
    cid: String,
    topic: String,
    stop: Stop,
) -> Result<Attack> {
    let mut a = Attack::new();
    let t0 = Instant::now();
    let (sent, acked) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let (drops, last) = reconnecting(addr, &cid, &stop, |mut cl| {
        let (stop, topic, sent, acked) = (stop.clone(), topic.clone(), sent.clone(), acked.clone());
        async move {
            let r = flood_qos1(&mut cl, &topic, 64, 32, &stop, false, &sent, &acked).await;
            if r.is_ok() {
                cl.disconnect().await;
            }
            r
        }
    })
    .await;
    let el = t0.elapsed().as_secs_f64();
    let acked = acked.load(Ordering::Relaxed);
    put(&mut a, "sent", sent.load(Ordering::Relaxed));
    put(&mut a, "acked", acked);
    put(&mut a, "acked_per_s", acked as f64 / el);
    put(&mut a, "disconnected", drops);
    if let Some(e) = last {
        put(&mut a, "last_error", e);
    }
    Ok(a)
}

/// Scenario 3 and 6: QoS 0 as fast as one connection can write.
async fn attack_qos0_flood(
    addr: SocketAddr,
    cid: String,
    topic: String,
    size: usize,
    stop: Stop,
) -> Result<Attack> {
    let mut a = Attack::new();
    let tmpl = PubTemplate::new(Version::V4, &topic, 0, false, size)?;
    let batch = (256 * 1024 / tmpl.frame_len()).clamp(1, 256);
    let t0 = Instant::now();
    let sent = Arc::new(AtomicU64::new(0));
    let (drops, last) = reconnecting(addr, &cid, &stop, |mut cl| {
        let (stop, tmpl, sent) = (stop.clone(), tmpl.clone(), sent.clone());
        async move {
            while !stop.is_set() {
                for _ in 0..batch {
                    let n = sent.fetch_add(1, Ordering::Relaxed) + 1;
                    tmpl.write(&mut cl.out, 0, 4, n, now_ns());
                }
                // The broker may stop reading: keep checking the stop flag.
                let mut pos = 0;
                while pos < cl.out.len() {
                    tokio::select! {
                        r = cl.s.write(&cl.out[pos..]) => pos += r?,
                        _ = tokio::time::sleep(Duration::from_millis(100)) => {
                            if stop.is_set() {
                                // Mid-packet: abandon the connection.
                                return Ok(());
                            }
                        }
                    }
                }
                cl.out.clear();
            }
            cl.disconnect().await;
            Ok(())
        }
    })
    .await;
    let el = t0.elapsed().as_secs_f64();
    let sent = sent.load(Ordering::Relaxed);
    put(&mut a, "sent", sent);
    put(&mut a, "sent_per_s", sent as f64 / el);
    put(&mut a, "mb_per_s", sent as f64 * size as f64 / el / 1e6);
    put(&mut a, "disconnected", drops);
    if let Some(e) = last {
        put(&mut a, "last_error", e);
    }
    Ok(a)
}

/// Scenario 4: a v5 subscriber with Topic Alias Maximum 10 receiving every
/// message on its own topic (the publisher: QoS 1, window 32).
async fn attack_out_alias(addr: SocketAddr, prefix: String, stop: Stop) -> Result<Attack> {
    let mut a = Attack::new();
    let base = format!("{prefix}/alias");
    let mut sub = Cl::connect(ConnSpec {
        addr,
        ver: Version::V5,
        cid: &format!("{prefix}-aliassub"),
        keepalive: 60,
        clean: true,
        alias_max: Some(10),
    })
    .await?;
    sub.subscribe(&format!("{base}/#"), 1, &stop).await?;
    let received = Arc::new(AtomicU64::new(0));
    let (rc, st2) = (received.clone(), stop.clone());
    let reader = tokio::spawn(async move {
        let r: Result<()> = async {
            while let Some(p) = sub.next(&st2).await? {
                if let In::Publish { qos, pkid, .. } = p {
                    rc.fetch_add(1, Ordering::Relaxed);
                    sub.ack(qos, pkid).await?;
                }
            }
            Ok(())
        }
        .await;
        r
    });
    let mut pubc = Cl::v4(addr, &format!("{prefix}-aliaspub"), true).await?;
    let t0 = Instant::now();
    let (sent, acked) = (AtomicU64::new(0), AtomicU64::new(0));
    let r = flood_qos1(&mut pubc, &base, 64, 32, &stop, true, &sent, &acked).await;
    let el = t0.elapsed().as_secs_f64();
    let (sent, acked) = (sent.into_inner(), acked.into_inner());
    match r {
        Ok(()) => pubc.disconnect().await,
        Err(e) => put(&mut a, "publisher_error", format!("{e:#}")),
    }
    let rr = reader.await?;
    let got = received.load(Ordering::Relaxed);
    put(&mut a, "published", sent);
    put(&mut a, "acked", acked);
    put(&mut a, "delivered", got);
    put(&mut a, "delivered_per_s", got as f64 / el);
    if let Err(e) = rr {
        put(&mut a, "subscriber_error", format!("{e:#}"));
    }
    Ok(a)
}

/// Scenario 5: v5 publishers defining and re-mapping topic aliases 1..=10 on
/// large payloads (QoS 1, window 8 each); nobody subscribes.
async fn attack_in_alias(
    addr: SocketAddr,
    prefix: String,
    n: usize,
    size: usize,
    stop: Stop,
) -> Result<Attack> {
    let mut a = Attack::new();
    let mut hs = Vec::new();
    for i in 0..n {
        let stop = stop.clone();
        let prefix = prefix.clone();
        hs.push(tokio::spawn(async move {
            let mut cl = Cl::connect(ConnSpec {
                addr,
                ver: Version::V5,
                cid: &format!("{prefix}-inalias{i}"),
                keepalive: 60,
                clean: true,
                alias_max: None,
            })
            .await?;
            let payload = Bytes::from(vec![7u8; size]);
            let pad = "x".repeat(150);
            let (mut sent, mut acked, mut inflight) = (0u64, 0u64, 0usize);
            while !stop.is_set() {
                while inflight < 8 {
                    sent += 1;
                    let alias = (sent % 10 + 1) as u16;
                    // Every fourth message re-maps the alias to a new topic.
                    let topic = if sent % 4 == 1 {
                        format!("{prefix}/inalias/{i}/{pad}/{sent}")
                    } else {
                        String::new()
                    };
                    let topic = if sent <= 40 && topic.is_empty() {
                        format!("{prefix}/inalias/{i}/{pad}/{sent}")
                    } else {
                        topic
                    };
                    let mut p = v5::Publish::from_bytes(topic, mqtt::qos(1), payload.clone());
                    p.pkid = (sent % 65_000 + 1) as u16;
                    p.properties = Some(v5::PublishProperties {
                        payload_format_indicator: None,
                        message_expiry_interval: None,
                        topic_alias: Some(alias),
                        response_topic: None,
                        correlation_data: None,
                        user_properties: Vec::new(),
                        subscription_identifiers: Vec::new(),
                        content_type: None,
                    });
                    p.write(&mut cl.out).map_err(|e| anyhow!("encode: {e:?}"))?;
                    inflight += 1;
                }
                cl.flush().await?;
                match cl.next(&stop).await? {
                    None => break,
                    Some(In::PubAck { .. }) => {
                        inflight -= 1;
                        acked += 1;
                    }
                    Some(_) => {}
                }
            }
            cl.disconnect().await;
            Ok::<(u64, u64), anyhow::Error>((sent, acked))
        }));
    }
    let t0 = Instant::now();
    let (mut sent, mut acked, mut errs) = (0u64, 0u64, Vec::new());
    for h in hs {
        match h.await? {
            Ok((s, k)) => {
                sent += s;
                acked += k;
            }
            Err(e) => errs.push(format!("{e:#}")),
        }
    }
    let el = t0.elapsed().as_secs_f64();
    put(&mut a, "sent", sent);
    put(&mut a, "acked", acked);
    put(
        &mut a,
        "acked_mb_per_s",
        acked as f64 * size as f64 / el / 1e6,
    );
    if !errs.is_empty() {
        put(&mut a, "errors", errs.len());
        put(&mut a, "first_error", errs[0].clone());
    }
    Ok(a)
}

/// Scenario 7: a new subscriber to the retained tree (counts deliveries) and
/// a client re-sending the same SUBSCRIBE (up to 4 outstanding), reading and
/// discarding whatever arrives.
async fn attack_retained(
    addr: SocketAddr,
    prefix: String,
    expected: usize,
    stop: Stop,
) -> Result<Attack> {
    let mut a = Attack::new();
    let filter = format!("{prefix}/fleet/#");
    // The repeated SUBSCRIBE.
    let (f2, st2, p2) = (filter.clone(), stop.clone(), prefix.clone());
    let looper = tokio::spawn(async move {
        let mut cl = Cl::v4(addr, &format!("{p2}-resub"), true).await?;
        let (mut sent, mut subacks, mut msgs) = (0u64, 0u64, 0u64);
        let r: Result<()> = async {
            while !st2.is_set() {
                while sent - subacks < 4 {
                    sent += 1;
                    mqtt::encode_subscribe(
                        Version::V4,
                        (sent % 65_000 + 1) as u16,
                        &f2,
                        0,
                        &mut cl.out,
                    )?;
                }
                cl.flush().await?;
                match cl.next(&st2).await? {
                    None => break,
                    Some(In::SubAck { .. }) => subacks += 1,
                    Some(In::Publish { qos, pkid, .. }) => {
                        msgs += 1;
                        cl.ack(qos, pkid).await?;
                    }
                    Some(_) => {}
                }
            }
            Ok(())
        }
        .await;
        let e = r.err().map(|e| format!("{e:#}"));
        if e.is_none() {
            cl.disconnect().await;
        }
        Ok::<_, anyhow::Error>((sent, subacks, msgs, e))
    });
    // The new subscriber.
    let t0 = Instant::now();
    let mut sub = Cl::v4(addr, &format!("{prefix}-newsub"), true).await?;
    sub.subscribe(&filter, 1, &stop).await?;
    let mut got = 0u64;
    let mut all_at = None;
    let r: Result<()> = async {
        while let Some(p) = sub.next(&stop).await? {
            if let In::Publish { qos, pkid, .. } = p {
                got += 1;
                sub.ack(qos, pkid).await?;
                if got as usize == expected {
                    all_at = Some(t0.elapsed().as_secs_f64());
                }
            }
        }
        Ok(())
    }
    .await;
    put(&mut a, "new_subscriber_got", got);
    put(&mut a, "expected", expected as u64);
    if let Some(t) = all_at {
        put(&mut a, "all_after_s", t);
    }
    match r {
        Ok(()) => sub.disconnect().await,
        Err(e) => put(&mut a, "new_subscriber_error", format!("{e:#}")),
    }
    match looper.await? {
        Ok((sent, subacks, msgs, e)) => {
            put(&mut a, "resubscribe_sent", sent);
            put(&mut a, "resubscribe_subacks", subacks);
            put(&mut a, "resubscriber_msgs", msgs);
            if let Some(e) = e {
                put(&mut a, "resubscriber_error", e);
            }
        }
        Err(e) => put(&mut a, "resubscriber_error", format!("{e:#}")),
    }
    Ok(a)
}

/// Scenario 8: connections sending all but the last byte of a ~1 MB CONNECT
/// (100 at a time), held until the end of the phase.
async fn attack_preauth(addr: SocketAddr, n: usize, stop: Stop) -> Result<Attack> {
    let mut a = Attack::new();
    const REMAINING: usize = 1_000_000;
    let mut frame = vec![0x10u8];
    let mut x = REMAINING;
    loop {
        let mut b = (x % 128) as u8;
        x /= 128;
        if x > 0 {
            b |= 0x80;
        }
        frame.push(b);
        if x == 0 {
            break;
        }
    }
    frame.resize(frame.len() + REMAINING - 1, 0);
    let frame: Arc<[u8]> = frame.into();
    let sem = Arc::new(tokio::sync::Semaphore::new(100));
    let written = Arc::new(AtomicU64::new(0));
    let refused = Arc::new(AtomicU64::new(0));
    let mut hs = Vec::new();
    for _ in 0..n {
        if stop.is_set() {
            break;
        }
        let permit = sem.clone().acquire_owned().await?;
        let (frame, written, refused, stop) = (
            frame.clone(),
            written.clone(),
            refused.clone(),
            stop.clone(),
        );
        hs.push(tokio::spawn(async move {
            let s = match mqtt::tcp_connect(addr, None).await {
                Ok(s) => s,
                Err(_) => {
                    refused.fetch_add(1, Ordering::Relaxed);
                    drop(permit);
                    return None;
                }
            };
            let mut s = s;
            match tokio::time::timeout(Duration::from_secs(5), s.write_all(&frame)).await {
                Ok(Ok(())) => {
                    written.fetch_add(1, Ordering::Relaxed);
                }
                Ok(Err(_)) => {
                    refused.fetch_add(1, Ordering::Relaxed);
                }
                Err(_) => {}
            }
            drop(permit);
            // Hold the connection until the end of the phase.
            while !stop.is_set() {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            // Closed by the broker meanwhile?
            let mut b = [0u8; 64];
            let closed = matches!(
                tokio::time::timeout(Duration::from_millis(200), s.read(&mut b)).await,
                Ok(Ok(0)) | Ok(Err(_))
            );
            Some((s, closed))
        }));
    }
    let opened = hs.len();
    let mut socks = Vec::new();
    let mut closed = 0u64;
    for h in hs {
        if let Ok(Some((s, c))) = h.await {
            socks.push(s);
            closed += u64::from(c);
        }
    }
    put(&mut a, "connections", opened as u64);
    put(&mut a, "fully_written", written.load(Ordering::Relaxed));
    put(&mut a, "write_failed", refused.load(Ordering::Relaxed));
    put(&mut a, "closed_by_broker", closed);
    drop(socks);
    Ok(a)
}

// ------------------------------------------------------------ setup / teardown

/// Create `n` offline persistent sessions subscribed (QoS 1) to `topic`.
async fn make_sessions(addr: SocketAddr, ids: &[String], topic: &str) -> Result<()> {
    let sem = Arc::new(tokio::sync::Semaphore::new(64));
    let mut hs = Vec::new();
    for cid in ids {
        let permit = sem.clone().acquire_owned().await?;
        let (cid, topic) = (cid.clone(), topic.to_string());
        hs.push(tokio::spawn(async move {
            let mut c = Cl::v4(addr, &cid, false).await?;
            c.subscribe(&topic, 1, &Stop::default()).await?;
            c.disconnect().await;
            drop(permit);
            Ok::<(), anyhow::Error>(())
        }));
    }
    for h in hs {
        h.await??;
    }
    Ok(())
}

/// Remove sessions: connect with clean session and disconnect.
async fn drop_sessions(addr: SocketAddr, ids: &[String]) -> Result<()> {
    let sem = Arc::new(tokio::sync::Semaphore::new(64));
    let mut hs = Vec::new();
    for cid in ids {
        let permit = sem.clone().acquire_owned().await?;
        let cid = cid.clone();
        hs.push(tokio::spawn(async move {
            let c = Cl::v4(addr, &cid, true).await?;
            c.disconnect().await;
            drop(permit);
            Ok::<(), anyhow::Error>(())
        }));
    }
    let mut first = None;
    for h in hs {
        if let Err(e) = h.await? {
            first.get_or_insert(e);
        }
    }
    first.map_or(Ok(()), Err)
}

/// Publish (or, with an empty payload, clear) `n` retained messages.
async fn retained(addr: SocketAddr, prefix: &str, n: usize, clear: bool) -> Result<()> {
    let mut cl = Cl::v4(addr, &format!("{prefix}-retainer"), true).await?;
    let payload = if clear {
        Bytes::new()
    } else {
        Bytes::from(vec![b'r'; 64])
    };
    for i in 0..n {
        let t = format!("{prefix}/fleet/{i}");
        mqtt::encode_publish(Version::V4, &t, 0, true, 0, payload.clone(), &mut cl.out)?;
        if cl.out.len() > 64 * 1024 {
            cl.flush().await?;
        }
    }
    cl.flush().await?;
    cl.barrier(&format!("{prefix}/barrier")).await?;
    cl.disconnect().await;
    Ok(())
}

// ---------------------------------------------------------------------- suite

struct Suite {
    addr: SocketAddr,
    p: Params,
    nonce: u32,
    rss: RssSampler,
    /// Where attackers run (see the module doc: its threads are niced).
    attacker_rt: tokio::runtime::Runtime,
}

impl Suite {
    fn prefix(&self, sc: Sc) -> String {
        format!("ovl/{:08x}/{}", self.nonce, sc.name())
    }

    fn cid(&self, sc: Sc, what: &str) -> String {
        format!("ovl-{:08x}-{}-{what}", self.nonce, sc.name())
    }

    /// One phase: probe + devices (+ attacker) for `secs`.
    fn phase(
        &self,
        sc: Sc,
        tag: &str,
        secs: f64,
        attacker: Option<Box<dyn FnOnce(Stop) -> AttackFut>>,
    ) -> PhaseResult {
        let mut r = PhaseResult::default();
        self.rss.reset();
        let stop = Stop::default();
        let prefix = format!("{}/{tag}", self.prefix(sc));
        let probe_h = on_thread(
            "probe",
            probe(
                self.addr,
                self.cid(sc, &format!("{tag}-probe")),
                format!("{prefix}/probe"),
                stop.clone(),
            ),
        );
        let ready = Arc::new(AtomicU64::new(0));
        let dev_h = on_thread(
            "devices",
            devices(
                self.addr,
                self.p.devices,
                format!("ovl-{:08x}-{}-{tag}", self.nonce, sc.name()),
                stop.clone(),
                ready.clone(),
            ),
        );
        // The devices run for the whole phase; connecting is not measured
        // separately (a few ms against seconds).
        let atk = attacker.map(|f| self.attacker_rt.spawn(f(stop.clone())));
        let t0 = Instant::now();
        while t0.elapsed().as_secs_f64() < secs {
            if self.rss.over.is_set() {
                r.aborted = Some(format!(
                    "broker RSS above the {} MiB safety limit after {:.1} s: attack stopped",
                    self.p.rss_abort_mib,
                    t0.elapsed().as_secs_f64()
                ));
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        r.duration_s = t0.elapsed().as_secs_f64();
        stop.set();
        match join(probe_h) {
            Ok(p) => r.probe = p,
            Err(e) => r.probe.error = Some(format!("{e:#}")),
        }
        match join(dev_h) {
            Ok(d) => r.devices = d,
            Err(e) => r.devices.errors.push(format!("{e:#}")),
        }
        if let Some(h) = atk {
            let res = self
                .attacker_rt
                .block_on(async { tokio::time::timeout(Duration::from_secs(30), h).await });
            match res {
                Ok(Ok(Ok(a))) => r.attacker = a,
                Ok(Ok(Err(e))) => {
                    put(&mut r.attacker, "error", format!("{e:#}"));
                }
                Ok(Err(e)) => put(&mut r.attacker, "error", format!("attacker task: {e}")),
                Err(_) => put(
                    &mut r.attacker,
                    "error",
                    "attacker did not stop within 30 s",
                ),
            }
        }
        r.rss_peak_kib = self.rss.take_peak();
        r.rss_end_kib = self.rss.now();
        r
    }

    fn scenario(&self, rt: &tokio::runtime::Runtime, sc: Sc) -> ScenarioResult {
        let mut res = ScenarioResult {
            name: sc.name().into(),
            title: sc.title(&self.p),
            ..Default::default()
        };
        let addr = self.addr;
        let prefix = self.prefix(sc);
        let p = self.p.clone();
        eprintln!("[overload] {} ...", sc.name());
        // Setup.
        let sessions: Vec<String> = match sc {
            Sc::OfflineQueues | Sc::CpuHeavy => (0..p.sessions)
                .map(|i| self.cid(sc, &format!("off{i}")))
                .collect(),
            Sc::BigOffline => vec![self.cid(sc, "off0")],
            _ => Vec::new(),
        };
        let offline_topic = format!("{prefix}/offline");
        let setup = rt.block_on(async {
            if !sessions.is_empty() {
                make_sessions(addr, &sessions, &offline_topic).await?;
            }
            if sc == Sc::RetainedFlood {
                retained(addr, &prefix, p.retained, false).await?;
            }
            Ok::<(), anyhow::Error>(())
        });
        if let Err(e) = setup {
            res.error = Some(format!("setup: {e:#}"));
            return res;
        }
        res.rss_start_kib = self.rss.now();
        res.baseline = self.phase(sc, "base", p.baseline_s, None);
        let atk: Box<dyn FnOnce(Stop) -> AttackFut> = {
            let (cid, prefix, topic) = (self.cid(sc, "attacker"), prefix.clone(), offline_topic);
            match sc {
                Sc::Stalled => Box::new(move |s| Box::pin(attack_stalled(addr, cid, s))),
                Sc::OfflineQueues => {
                    Box::new(move |s| Box::pin(attack_qos1_flood(addr, cid, topic, s)))
                }
                Sc::CpuHeavy => {
                    Box::new(move |s| Box::pin(attack_qos0_flood(addr, cid, topic, 64, s)))
                }
                Sc::OutboundAliases => {
                    Box::new(move |s| Box::pin(attack_out_alias(addr, prefix, s)))
                }
                Sc::InboundAliases => {
                    let (n, size) = (p.alias_publishers, p.alias_payload);
                    Box::new(move |s| Box::pin(attack_in_alias(addr, prefix, n, size, s)))
                }
                Sc::BigOffline => {
                    let size = p.big_payload;
                    Box::new(move |s| Box::pin(attack_qos0_flood(addr, cid, topic, size, s)))
                }
                Sc::RetainedFlood => {
                    let n = p.retained;
                    Box::new(move |s| Box::pin(attack_retained(addr, prefix, n, s)))
                }
                Sc::PreauthHog => {
                    let n = p.hogs;
                    Box::new(move |s| Box::pin(attack_preauth(addr, n, s)))
                }
            }
        };
        res.attack = self.phase(sc, "attack", p.attack_s, Some(atk));
        // Teardown.
        let td = rt.block_on(async {
            if !sessions.is_empty() {
                drop_sessions(addr, &sessions).await?;
            }
            if sc == Sc::RetainedFlood {
                retained(addr, &prefix, p.retained, true).await?;
            }
            Ok::<(), anyhow::Error>(())
        });
        if let Err(e) = td {
            res.notes.push(format!("teardown: {e:#}"));
        }
        self.judge(&mut res);
        eprintln!(
            "[overload] {}: ping p99 {} ms, pub->deliver p99 {} ms, devices {} ({:.0} -> {:.0} msg/s), RSS peak {} MiB{}",
            sc.name(),
            fmt_opt(res.probe_ping_p99_ms, 1),
            fmt_opt(res.probe_pub_p99_ms, 1),
            res.throughput_pct.map(|v| format!("{v:.0}%")).unwrap_or_else(|| "n/a".into()),
            res.baseline.devices.rate,
            res.attack.devices.rate,
            fmt_opt(res.rss_peak_mib, 0),
            res.attack
                .aborted
                .as_ref()
                .map(|a| format!(" ({a})"))
                .unwrap_or_default()
        );
        // Let the broker settle (queues, sockets in close) before the next one.
        std::thread::sleep(Duration::from_secs(if p.quick { 1 } else { 2 }));
        res
    }

    fn judge(&self, res: &mut ScenarioResult) {
        let a = &res.attack;
        res.probe_ping_p99_ms = ms(&a.probe.ping);
        res.probe_pub_p99_ms = ms(&a.probe.pub_deliver);
        let base = res.baseline.devices.rate;
        res.throughput_pct = (base > 0.0).then(|| 100.0 * a.devices.rate / base);
        res.rss_peak_mib = a.rss_peak_kib.map(|k| k as f64 / 1024.0);
        let under = |v: Option<f64>| v.is_some_and(|v| v < TARGET_PROBE_P99_MS);
        res.pass_probe = a.probe.connected
            && a.probe.error.is_none()
            && under(res.probe_ping_p99_ms)
            && under(res.probe_pub_p99_ms);
        res.pass_throughput = res
            .throughput_pct
            .is_some_and(|v| v >= TARGET_THROUGHPUT_PCT);
        res.pass_rss = res
            .rss_peak_mib
            .map(|v| v <= self.p.rss_budget_mib as f64 && a.aborted.is_none());
        if let Some(e) = &a.probe.error {
            res.notes.push(format!("probe: {e}"));
        }
        if a.probe.pings_lost + a.probe.pubs_lost > 0 {
            res.notes.push(format!(
                "probe: {} pings and {} messages unanswered at the end",
                a.probe.pings_lost, a.probe.pubs_lost
            ));
        }
        if let Some(e) = a.devices.errors.first() {
            res.notes.push(format!(
                "devices: {} error(s), first: {e}",
                a.devices.errors.len()
            ));
        }
        if let Some(x) = &a.aborted {
            res.notes.push(x.clone());
        }
    }
}

type AttackFut = std::pin::Pin<Box<dyn std::future::Future<Output = Result<Attack>> + Send>>;

fn fmt_opt(v: Option<f64>, prec: usize) -> String {
    v.map(|v| format!("{v:.prec$}"))
        .unwrap_or_else(|| "n/a".into())
}

pub fn params(a: &OverloadArgs) -> Params {
    let q = a.quick;
    Params {
        quick: q,
        baseline_s: a.baseline.unwrap_or(if q { 2.0 } else { 5.0 }),
        attack_s: a.attack.unwrap_or(if q { 4.0 } else { 10.0 }),
        devices: a.devices.max(1),
        sessions: if q { 200 } else { 2000 },
        retained: if q { 3000 } else { 30_000 },
        hogs: if q { 200 } else { 3000 },
        alias_publishers: if q { 5 } else { 20 },
        alias_payload: 64 * 1024,
        big_payload: 500 * 1024,
        rss_budget_mib: a.rss_budget_mib,
        rss_abort_mib: a.rss_abort_mib,
        attacker_nice: a.attacker_nice.min(19),
    }
}

/// Lower the calling thread's priority (Linux: the nice value is per
/// thread). Through `renice` on the thread id from `/proc/thread-self`, so
/// that the tool needs no `unsafe` FFI; a failure is reported once per
/// thread and the attacker runs at normal priority.
fn nice_this_thread(nice: u8) {
    if nice == 0 {
        return;
    }
    let tid = std::fs::read_link("/proc/thread-self")
        .ok()
        .and_then(|p| p.file_name().and_then(|f| f.to_str()).map(str::to_owned));
    let ok = tid.is_some_and(|tid| {
        std::process::Command::new("renice")
            .args(["-n", &nice.to_string(), "-p", &tid])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    });
    if !ok {
        eprintln!(
            "[overload] could not renice an attacker thread to {nice}: it runs at normal priority"
        );
    }
}

pub fn run(
    rt: &tokio::runtime::Runtime,
    addr: SocketAddr,
    a: &OverloadArgs,
    nonce: u32,
) -> Result<OverloadResult> {
    let scs = Sc::parse(&a.scenario)?;
    let p = params(a);
    let rss = RssSampler::start(a.broker_pid, p.rss_abort_mib * 1024);
    if a.broker_pid.is_some() && !rss.active() {
        bail!("cannot read /proc/{:?}/status", a.broker_pid);
    }
    std::thread::sleep(Duration::from_millis(120));
    let nice = p.attacker_nice;
    let attacker_rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("attacker")
        .enable_all()
        .on_thread_start(move || nice_this_thread(nice))
        .build()
        .context("attacker runtime")?;
    let suite = Suite {
        addr,
        p: p.clone(),
        nonce,
        rss,
        attacker_rt,
    };
    let mut out = OverloadResult {
        kind: "overload".into(),
        broker: addr.to_string(),
        date_unix: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0),
        params: Some(p),
        ..Default::default()
    };
    for sc in scs {
        out.scenarios.push(suite.scenario(rt, sc));
    }
    Ok(out)
}

// -------------------------------------------------------------------- report

fn attacker_note(s: &ScenarioResult) -> String {
    let a = &s.attack.attacker;
    let f = |k: &str| a.get(k).and_then(serde_json::Value::as_f64);
    let mut parts = Vec::new();
    match s.name.as_str() {
        "stalled-subscriber" => match a.get("closed_by_broker").and_then(|v| v.as_bool()) {
            Some(true) => parts.push("stalled client disconnected".to_string()),
            Some(false) => parts.push("stalled client still connected".to_string()),
            None => {}
        },
        "offline-queues" => {
            if let Some(v) = f("acked_per_s") {
                parts.push(format!("flood acked {v:.0} msg/s"));
            }
        }
        "cpu-heavy" | "big-offline-qos0" => {
            if let (Some(v), Some(mb)) = (f("sent_per_s"), f("mb_per_s")) {
                parts.push(format!("flood sent {v:.0} msg/s ({mb:.1} MB/s)"));
            }
        }
        _ => {}
    }
    match (
        f("disconnected"),
        a.get("last_error").and_then(|v| v.as_str()),
    ) {
        (Some(d), Some(e)) if d > 0.0 => parts.push(format!(
            "attacker disconnected {d:.0}× (reconnects; last: {e})"
        )),
        _ => {}
    }
    match s.name.as_str() {
        "outbound-aliases" => {
            if let (Some(p), Some(d)) = (f("published"), f("delivered")) {
                parts.push(format!(
                    "{d:.0} of {p:.0} delivered to the alias subscriber"
                ));
            }
        }
        "inbound-aliases" => {
            if let Some(v) = f("acked_mb_per_s") {
                parts.push(format!("publishers acked {v:.0} MB/s"));
            }
        }
        "retained-flood" => {
            if let (Some(g), Some(e)) = (f("new_subscriber_got"), f("expected")) {
                let t = f("all_after_s")
                    .map(|t| format!(" in {t:.1} s"))
                    .unwrap_or_default();
                parts.push(format!("new subscriber got {g:.0}/{e:.0}{t}"));
            }
            if let Some(v) = f("resubscribe_subacks") {
                parts.push(format!("{v:.0} repeated SUBSCRIBEs answered"));
            }
        }
        "preauth-hog" => {
            if let (Some(c), Some(k)) = (f("connections"), f("closed_by_broker")) {
                parts.push(format!("{k:.0} of {c:.0} hogs closed by the broker"));
            }
        }
        _ => {}
    }
    if let Some(e) = a.get("error").and_then(|v| v.as_str()) {
        parts.push(format!("attacker error: {e}"));
    }
    if let Some(x) = &s.attack.aborted {
        parts.push(x.clone());
    }
    if s.attack.probe.pings_lost + s.attack.probe.pubs_lost > 0 {
        parts.push(format!(
            "probe: {} pings, {} messages unanswered",
            s.attack.probe.pings_lost, s.attack.probe.pubs_lost
        ));
    }
    if let Some(e) = &s.error {
        parts.push(e.clone());
    }
    parts.join("; ")
}

fn mark(ok: bool) -> &'static str {
    if ok {
        "pass"
    } else {
        "**FAIL**"
    }
}

/// The markdown section (between the markers) for results of several brokers.
pub fn render(results: &[(String, OverloadResult)], intro: Option<&str>) -> String {
    let mut w = String::new();
    let _ = writeln!(w, "{BEGIN_MARK}");
    let _ = writeln!(w, "## Overload isolation (issue 11)\n");
    if let Some(t) = intro {
        let _ = writeln!(w, "{}\n", t.trim());
    }
    let p = results.iter().find_map(|(_, r)| r.params.clone());
    if let Some(p) = &p {
        let _ = writeln!(
            w,
            "`millet-bench overload{}`: every scenario runs a baseline phase ({:.0} s: {} QoS 1 \
             devices publishing one message at a time, plus the probe) and then an attack phase \
             ({:.0} s: the same plus the attacker). The probe is a connection on its own thread \
             sending a PINGREQ every 100 ms and, in between, a QoS 1 message to a topic it \
             subscribes to; unanswered pings and messages count with the time they waited. \
             Targets in the attack phase: probe PING and publish → deliver p99 < {TARGET_PROBE_P99_MS:.0} ms; \
             the devices keep ≥ {TARGET_THROUGHPUT_PCT:.0}% of their baseline msg/s; the broker's \
             peak RSS (VmRSS, polled every 50 ms) ≤ the budget of {} MiB. Above {} MiB the attack \
             is stopped early (safety limit on a shared machine) and counts as over budget.\n",
            if p.quick { " --quick" } else { "" },
            p.baseline_s,
            p.devices,
            p.attack_s,
            p.rss_budget_mib,
            p.rss_abort_mib
        );
        let _ = writeln!(
            w,
            "{}\n",
            if p.attacker_nice > 0 {
                format!(
                    "The attacker's client runs on threads of its own at nice {}: on a real \
                     deployment it is on another machine, and here, at the devices' priority, \
                     its own CPU (generating up to gigabytes a second) would be taken from the \
                     devices' client thread, whatever the broker does. Niced, it uses the CPU \
                     the others leave; what it sends reaches the broker as before.",
                    p.attacker_nice
                )
            } else {
                "The attacker's client runs at the same priority as the devices' client \
                 (`--attacker-nice 0`): on 2 shared cores its own CPU is taken from theirs."
                    .to_string()
            }
        );
    }
    let _ = writeln!(
        w,
        "| Scenario | Broker | Probe PING p99 | Probe pub→deliver p99 | Devices msg/s (base → attack) | Devices PUBACK p99 (base → attack) | Peak RSS (start) | Probe | Throughput | RSS | Attacker / notes |"
    );
    let _ = writeln!(w, "|---|---|---:|---:|---:|---:|---:|---|---|---|---|");
    let mut names: Vec<(String, String)> = Vec::new();
    for (_, r) in results {
        for s in &r.scenarios {
            if !names.iter().any(|(n, _)| n == &s.name) {
                names.push((s.name.clone(), s.title.clone()));
            }
        }
    }
    let order = |n: &str| ALL.iter().position(|s| s.name() == n).unwrap_or(ALL.len());
    names.sort_by_key(|(n, _)| order(n));
    let mut fails: Vec<String> = Vec::new();
    for (name, title) in &names {
        for (broker, r) in results {
            let Some(s) = r.scenarios.iter().find(|s| &s.name == name) else {
                continue;
            };
            let dp = |ph: &PhaseResult| fmt_opt(ms(&ph.devices.puback), 1);
            let rss = match (s.rss_peak_mib, s.rss_start_kib) {
                (Some(pk), Some(st)) => format!("{pk:.0} MiB ({:.0})", st as f64 / 1024.0),
                (Some(pk), None) => format!("{pk:.0} MiB"),
                _ => "n/a".into(),
            };
            let rss_mark = match s.pass_rss {
                Some(ok) => mark(ok),
                None => "n/a",
            };
            let _ = writeln!(
                w,
                "| {title} | {broker} | {} ms | {} ms | {:.0} → {:.0} ({}) | {} → {} ms | {rss} | {} | {} | {rss_mark} | {} |",
                fmt_opt(s.probe_ping_p99_ms, 1),
                fmt_opt(s.probe_pub_p99_ms, 1),
                s.baseline.devices.rate,
                s.attack.devices.rate,
                s.throughput_pct
                    .map(|v| format!("{v:.0}%"))
                    .unwrap_or_else(|| "n/a".into()),
                dp(&s.baseline),
                dp(&s.attack),
                mark(s.pass_probe),
                mark(s.pass_throughput),
                attacker_note(s).replace('|', "/"),
            );
            let mut f = Vec::new();
            if !s.pass_probe {
                f.push("probe p99");
            }
            if !s.pass_throughput {
                f.push("throughput");
            }
            if s.pass_rss == Some(false) {
                f.push("RSS");
            }
            if !f.is_empty() {
                fails.push(format!("{broker} / {name}: {}", f.join(", ")));
            }
        }
    }
    let _ = writeln!(w);
    if !fails.is_empty() {
        let _ = writeln!(w, "Targets missed: {}.\n", fails.join("; "));
    }
    let _ = writeln!(w, "{END_MARK}");
    w
}

/// Replace the marked section of `text` (or insert it before `## Chart`,
/// else at the end).
pub fn splice(text: &str, section: &str) -> String {
    if let (Some(b), Some(e)) = (text.find(BEGIN_MARK), text.find(END_MARK)) {
        if b < e {
            let mut end = e + END_MARK.len();
            if text[end..].starts_with('\n') {
                end += 1;
            }
            return format!("{}{}{}", &text[..b], section, &text[end..]);
        }
    }
    if let Some(i) = text.find("\n## Chart") {
        return format!("{}\n{}{}", &text[..i + 1], section, &text[i..]);
    }
    format!("{}\n\n{}", text.trim_end(), section)
}

/// The marked section of `text`, if any (kept by `report` when it rewrites
/// BENCHMARKS.md).
pub fn extract(text: &str) -> Option<String> {
    let b = text.find(BEGIN_MARK)?;
    let e = text.find(END_MARK)?;
    (b < e).then(|| format!("{}\n", &text[b..e + END_MARK.len()]))
}

pub fn report(a: &OverloadReportArgs) -> Result<()> {
    let mut results = Vec::new();
    for f in &a.files {
        let text =
            std::fs::read_to_string(f).with_context(|| format!("reading {}", f.display()))?;
        let r: OverloadResult = serde_json::from_str(text.trim())
            .with_context(|| format!("parsing {}", f.display()))?;
        let name = r.label.clone().unwrap_or_else(|| f.display().to_string());
        // Several files of one broker (a fresh broker per scenario): merged.
        match results
            .iter_mut()
            .find(|(n, _): &&mut (String, OverloadResult)| *n == name)
        {
            Some((_, prev)) => prev.scenarios.extend(r.scenarios),
            None => results.push((name, r)),
        }
    }
    let section = render(&results, a.intro.as_deref());
    match &a.splice {
        Some(path) => {
            let text = std::fs::read_to_string(path).unwrap_or_default();
            std::fs::write(path, splice(&text, &section))
                .with_context(|| format!("writing {}", path.display()))?;
            eprintln!("wrote {}", path.display());
        }
        None => print!("{section}"),
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splice_replaces_or_inserts() {
        let sec = format!("{BEGIN_MARK}\nX\n{END_MARK}\n");
        let t = "# A\n\n## Chart\n\nimg\n";
        let s1 = splice(t, &sec);
        assert!(s1.contains("X\n"));
        assert!(s1.find("X").unwrap_or(0) < s1.find("## Chart").unwrap_or(0));
        let sec2 = format!("{BEGIN_MARK}\nY\n{END_MARK}\n");
        let s2 = splice(&s1, &sec2);
        assert!(s2.contains("Y\n") && !s2.contains("X\n"));
        assert_eq!(extract(&s2).as_deref(), Some(sec2.as_str()));
    }

    #[test]
    fn scenario_names() -> Result<()> {
        assert_eq!(Sc::parse("all")?.len(), 8);
        assert_eq!(
            Sc::parse("cpu-heavy,preauth-hog")?,
            vec![Sc::CpuHeavy, Sc::PreauthHog]
        );
        assert!(Sc::parse("nope").is_err());
        Ok(())
    }
}
