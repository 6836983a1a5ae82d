//! millet-bench: a load generator for MQTT brokers (Millet, Mosquitto, ...).
//!
//! See `millet-bench --help`. Results: live progress and a human summary on
//! stderr, one JSON line on stdout.

mod conn;
mod fleet;
mod mqtt;
mod overload;
mod report;
mod resume;
mod run;
mod stats;

use std::net::{SocketAddr, ToSocketAddrs};
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use clap::{ArgAction, Args, Parser, Subcommand, ValueEnum};

#[derive(Parser, Debug)]
#[command(
    name = "millet-bench",
    about = "Load generator for MQTT brokers (MQTT 3.1.1 and 5.0)",
    long_about = "Load generator for MQTT brokers (MQTT 3.1.1 and 5.0).\n\n\
        Live progress once a second and a human summary go to stderr; the final \
        results are printed as one JSON line on stdout.\n\n\
        Examples:\n  \
        millet-bench --port 1883 run --scenario fan-in --count 50000\n  \
        millet-bench --port 1883 scenario fan-out -s 1000 --count 2000\n  \
        millet-bench --port 1883 run -p 1 -s 1 --qos 1 --rate 1000 --duration 10s\n  \
        millet-bench --port 1883 conn -n 10000 --rate 2000 --hold 10s --broker-pid 1234\n  \
        millet-bench --port 1883 resume --count 10000 --resume-port 1884"
)]
struct Cli {
    /// Broker host (name or IP).
    #[arg(long, global = true, default_value = "127.0.0.1")]
    host: String,
    /// Broker port.
    #[arg(long, global = true, default_value_t = 1883)]
    port: u16,
    /// Tokio worker threads.
    #[arg(long, global = true, default_value_t = 2)]
    threads: usize,
    /// Free-form label stored in the JSON result (e.g. the broker name).
    #[arg(long, global = true)]
    label: Option<String>,
    /// Free-form case name stored in the JSON result.
    #[arg(long = "case", global = true)]
    case_name: Option<String>,
    /// Also write the JSON result to this file.
    #[arg(long, global = true)]
    json_out: Option<PathBuf>,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Open N idle connections at a given rate, hold them, measure broker memory.
    Conn(ConnArgs),
    /// Publishers only (no subscribers): send and acknowledgement rates.
    Pub(RunArgs),
    /// Subscribers only, for --duration (messages from any publisher are counted;
    /// no latency: timestamps are only comparable within one process).
    Sub(RunArgs),
    /// Publishers and subscribers together (the main mode).
    Run(RunArgs),
    /// Run a scenario preset (same as `run --scenario NAME`).
    Scenario {
        name: Scenario,
        #[command(flatten)]
        args: RunArgs,
    },
    /// Device fleet: N devices with persistent sessions publish QoS 1 telemetry
    /// and receive QoS 1 commands from one backend client; broker CPU, RSS per
    /// device and latency both ways over a measured window.
    Fleet(FleetArgs),
    /// Build BENCHMARKS.md tables and a PNG chart from compare.sh results.
    Report(report::ReportArgs),
    /// Overload-isolation suite (issue 11): per attack scenario, a probe's
    /// PING and publish->deliver p99, ordinary QoS 1 devices' msg/s against
    /// their baseline, and the broker's peak RSS.
    Overload(overload::OverloadArgs),
    /// Render `overload` JSON results as a markdown section (or splice it into
    /// BENCHMARKS.md between its markers).
    OverloadReport(overload::OverloadReportArgs),
    /// Resume time of a persistent session with N queued QoS 1 messages:
    /// subscribe (--sub-port), go offline, N messages published
    /// (--pub-port), then reconnect (--resume-port): CONNACK and last
    /// message times, drain msg/s.
    Resume(resume::ResumeArgs),
}

#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
enum Transport {
    Tcp,
    Ws,
}

#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
enum Scenario {
    /// Many publishers, one subscriber on `bench/#`.
    FanIn,
    /// One publisher, many subscribers on the same topic.
    FanOut,
    /// N pairs, each subscriber on its own publisher's topic.
    P2p,
    /// Publishers on `bench/%i`, a `$share/g/bench/#` group of subscribers.
    Shared,
    /// Publish M retained messages, then S subscribers to `#` collect them.
    RetainedStorm,
    /// QoS 1 fan-in with persistent (clean_session=false) subscribers.
    Qos1Persistent,
    /// MQTT 5: one publisher, every message to its own topic, one subscriber
    /// on `bench/alias/#` announcing Topic Alias Maximum 65535 (the broker's
    /// outbound alias assignment under many distinct topics).
    AliasTopics,
}

impl Scenario {
    fn name(self) -> &'static str {
        match self {
            Scenario::FanIn => "fan-in",
            Scenario::FanOut => "fan-out",
            Scenario::P2p => "p2p",
            Scenario::Shared => "shared",
            Scenario::RetainedStorm => "retained-storm",
            Scenario::Qos1Persistent => "qos1-persistent",
            Scenario::AliasTopics => "alias-topics",
        }
    }
}

fn parse_duration(s: &str) -> Result<f64, String> {
    let s = s.trim();
    let (num, mult) = if let Some(v) = s.strip_suffix("ms") {
        (v, 0.001)
    } else if let Some(v) = s.strip_suffix('s') {
        (v, 1.0)
    } else if let Some(v) = s.strip_suffix('m') {
        (v, 60.0)
    } else if let Some(v) = s.strip_suffix('h') {
        (v, 3600.0)
    } else {
        (s, 1.0)
    };
    let v: f64 = num
        .trim()
        .parse()
        .map_err(|_| format!("invalid duration {s:?} (e.g. 10, 10s, 500ms, 2m)"))?;
    if !(0.0..=86_400.0).contains(&(v * mult)) {
        return Err(format!("duration {s:?} out of range"));
    }
    Ok(v * mult)
}

#[derive(Args, Debug, Clone)]
struct RunArgs {
    /// Scenario preset; explicit options below override its defaults.
    #[arg(long)]
    scenario: Option<Scenario>,
    /// Number of publishers.
    #[arg(short = 'p', long)]
    publishers: Option<usize>,
    /// Number of subscribers.
    #[arg(short = 's', long)]
    subscribers: Option<usize>,
    /// Publish topic template (`%i` = publisher index).
    #[arg(short = 't', long)]
    pub_topic: Option<String>,
    /// Subscription filter template (`%i` = subscriber index; `$share/g/...` for shared).
    #[arg(long)]
    sub_topic: Option<String>,
    /// Publish QoS (0, 1, 2).
    #[arg(short = 'q', long)]
    qos: Option<u8>,
    /// Subscription QoS (default: the publish QoS).
    #[arg(long)]
    sub_qos: Option<u8>,
    /// MQTT protocol version: 4 (3.1.1) or 5 (5.0).
    #[arg(long = "version", default_value_t = 4)]
    mqtt_version: u8,
    /// Payload size in bytes (minimum 24: publisher id, sequence, timestamp).
    #[arg(long, default_value_t = 64)]
    size: usize,
    /// Messages per second per publisher (0 = unlimited).
    #[arg(short = 'r', long, default_value_t = 0.0)]
    rate: f64,
    /// Messages per publisher.
    #[arg(short = 'n', long)]
    count: Option<u64>,
    /// Publishing duration (10, 10s, 500ms, 2m); default 10s when no --count.
    #[arg(short = 'd', long, value_parser = parse_duration)]
    duration: Option<f64>,
    /// In-flight window for QoS 1/2 per publisher.
    #[arg(long, default_value_t = 32)]
    inflight: usize,
    /// Clean session (false = persistent sessions for subscribers).
    #[arg(long, default_value_t = true, action = ArgAction::Set)]
    clean: bool,
    /// Shortcut for `--clean false`.
    #[arg(long)]
    persistent: bool,
    /// Publish with the retain flag.
    #[arg(long)]
    retain: bool,
    /// retained-storm: total number of retained messages to publish.
    #[arg(long)]
    retained: Option<u64>,
    /// Every message to its own topic (`<pub-topic>/<seq>`).
    #[arg(long)]
    distinct_topics: bool,
    /// MQTT 5 subscribers announce this Topic Alias Maximum (alias-topics:
    /// 65535; 0 for the same run without aliases).
    #[arg(long)]
    sub_topic_alias_max: Option<u16>,
    /// Keep-alive in seconds.
    #[arg(long, default_value_t = 60)]
    keepalive: u16,
    /// After publishers finish, wait for in-flight messages until nothing
    /// arrived for this long (or everything expected arrived).
    #[arg(long, default_value = "2s", value_parser = parse_duration)]
    drain: f64,
    /// Upper bound of the drain phase.
    #[arg(long, default_value = "60s", value_parser = parse_duration)]
    drain_max: f64,
    /// Timeout for TCP connect + CONNACK (and for SUBACK).
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    connect_timeout: f64,
    /// Maximum concurrent connection handshakes.
    #[arg(long, default_value_t = 256)]
    connect_concurrency: usize,
    /// Hard limit for the publishing phase.
    #[arg(long, default_value = "600s", value_parser = parse_duration)]
    max_time: f64,
    /// Client id prefix (ids are PREFIX-RUNID-p<i> / -s<i>).
    #[arg(long, default_value = "mb")]
    client_prefix: String,
    /// Subscribers disconnect this long after publishing starts ...
    #[arg(long, value_parser = parse_duration)]
    sub_offline_at: Option<f64>,
    /// ... and reconnect (resuming their session) after this long.
    #[arg(long, default_value = "1s", value_parser = parse_duration)]
    sub_offline_for: f64,
    /// Broker PID: report its VmRSS before and after the run.
    #[arg(long)]
    broker_pid: Option<u32>,
    /// How the clients reach the broker: tcp, or ws (MQTT over WebSocket on
    /// --port, sub-protocol `mqtt`, one masked binary frame per packet).
    #[arg(long, value_enum, default_value = "tcp")]
    transport: Transport,
    /// HTTP path of the WebSocket upgrade (--transport ws).
    #[arg(long, default_value = "/mqtt")]
    ws_path: String,
    /// Publishers connect to these ports of --host, in turn (publisher i
    /// to port i mod n; default: --port): the nodes of a cluster.
    #[arg(long, value_delimiter = ',')]
    pub_ports: Vec<u16>,
    /// Subscribers connect to these ports, in turn (default: --port).
    #[arg(long, value_delimiter = ',')]
    sub_ports: Vec<u16>,
}

#[derive(Args, Debug, Clone)]
struct ConnArgs {
    /// Number of connections.
    #[arg(short = 'n', long, default_value_t = 1000)]
    count: u64,
    /// Connections per second (0 = as fast as possible).
    #[arg(short = 'r', long, default_value_t = 1000.0)]
    rate: f64,
    /// How long to hold the connections once connected.
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    hold: f64,
    /// Keep-alive in seconds (a PINGREQ every 3/4 of it).
    #[arg(long, default_value_t = 30)]
    keepalive: u16,
    /// Number of source addresses 127.0.0.1..=127.0.0.K (0 = one per 16k connections).
    #[arg(long, default_value_t = 0)]
    source_ips: u32,
    /// MQTT protocol version: 4 or 5.
    #[arg(long = "version", default_value_t = 4)]
    mqtt_version: u8,
    /// Timeout for TCP connect + CONNACK.
    #[arg(long, default_value = "15s", value_parser = parse_duration)]
    connect_timeout: f64,
    /// Broker PID: report its VmRSS before/after and per connection.
    #[arg(long)]
    broker_pid: Option<u32>,
    /// Client id prefix.
    #[arg(long, default_value = "mb")]
    client_prefix: String,
    /// Connect over TLS, trusting the CA certificate(s) in this PEM file.
    #[arg(long, value_name = "CA_FILE")]
    tls: Option<PathBuf>,
    /// TLS server name to verify (default: localhost).
    #[arg(long, default_value = "localhost")]
    tls_server_name: String,
}

#[derive(Args, Debug, Clone)]
struct FleetArgs {
    /// Number of devices (one connection each; the spec's shape is 100,000,
    /// bounded here by the open-files limit).
    #[arg(short = 'n', long, default_value_t = 18_000)]
    devices: u64,
    /// MQTT protocol version: 4 (3.1.1) or 5.
    #[arg(long = "version", default_value_t = 4)]
    mqtt_version: u8,
    /// Clean sessions. Default false: persistent sessions (v5: session expiry
    /// --session-expiry), as a fleet receiving QoS 1 commands would use.
    #[arg(long, default_value_t = false, action = ArgAction::Set)]
    clean: bool,
    /// v5 session expiry interval for persistent sessions, seconds.
    #[arg(long, default_value_t = 3600)]
    session_expiry: u32,
    /// Telemetry period per device (spread evenly over the fleet).
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    interval: f64,
    /// Percent of the devices that get a QoS 1 command each second.
    #[arg(long, default_value_t = 1.0)]
    cmd_pct: f64,
    /// Payload size in bytes (minimum 24).
    #[arg(long, default_value_t = 64)]
    size: usize,
    /// Device connections per second (0 = as fast as possible).
    #[arg(short = 'r', long, default_value_t = 2000.0)]
    rate: f64,
    /// Warm-up after the connect phase (commands start here).
    #[arg(long, default_value = "15s", value_parser = parse_duration)]
    warmup: f64,
    /// Measured window.
    #[arg(long, default_value = "60s", value_parser = parse_duration)]
    window: f64,
    /// After the window, wait at most this long for messages in flight.
    #[arg(long, default_value = "5s", value_parser = parse_duration)]
    drain: f64,
    /// Keep-alive in seconds.
    #[arg(long, default_value_t = 60)]
    keepalive: u16,
    /// Source addresses 127.0.0.1..=127.0.0.K (0 = one per 16k devices).
    #[arg(long, default_value_t = 0)]
    source_ips: u32,
    /// Timeout for TCP connect + CONNACK.
    #[arg(long, default_value = "15s", value_parser = parse_duration)]
    connect_timeout: f64,
    /// Broker PID: CPU % over the window and VmRSS.
    #[arg(long)]
    broker_pid: Option<u32>,
    /// Client id prefix.
    #[arg(long, default_value = "mb")]
    client_prefix: String,
}

fn print_fleet_summary(r: &fleet::FleetResult) {
    let Some(c) = &r.config else { return };
    eprintln!(
        "== millet-bench fleet against {} | MQTT {} | {} devices ({} sessions) | telemetry every {}s, commands to {}%/s",
        r.broker,
        if c.mqtt_version == 5 { "5.0" } else { "3.1.1" },
        c.devices,
        if c.clean_session { "clean" } else { "persistent" },
        c.interval_s,
        c.cmd_pct
    );
    eprintln!(
        "devices    {} connected, {} failed, {} dropped; {:.0} conn/s over {:.2}s",
        r.connected, r.failed, r.dropped, r.connect_rate, r.connect_time_s
    );
    let opt = |v: Option<f64>, d: usize| {
        v.map(|x| format!("{x:.d$}"))
            .unwrap_or_else(|| "n/a".into())
    };
    eprintln!(
        "window     {:.1}s: broker CPU {}% ({} s), tool CPU {}%",
        r.window_s,
        opt(r.broker_cpu_pct, 1),
        opt(r.broker_cpu_s, 2),
        opt(r.tool_cpu_pct, 1)
    );
    eprintln!(
        "broker RSS {} KiB ({} KiB per device)",
        r.broker_rss_kib
            .map(|v| v.to_string())
            .unwrap_or_else(|| "n/a".into()),
        opt(r.broker_rss_kib_per_device, 2)
    );
    for (name, fl) in [("telemetry", &r.telemetry), ("commands", &r.commands)] {
        let p = |l: &Option<stats::LatencySummary>| {
            l.as_ref()
                .map(|l| {
                    format!(
                        "p50 {:.0} p99 {:.0} max {:.0}",
                        l.p50_us, l.p99_us, l.max_us
                    )
                })
                .unwrap_or_else(|| "n/a".into())
        };
        eprintln!(
            "{name:<10} sent {} acked {} received {} lost {} dup {} | latency us {} | PUBACK us {}",
            fl.sent,
            fl.acked,
            fl.received,
            fl.lost,
            fl.duplicates,
            p(&fl.latency),
            p(&fl.puback_latency)
        );
    }
    for e in r.errors.iter().take(10) {
        eprintln!("error: {e}");
    }
}

fn resolve(host: &str, port: u16) -> Result<SocketAddr> {
    (host, port)
        .to_socket_addrs()
        .with_context(|| format!("resolving {host}:{port}"))?
        .next()
        .ok_or_else(|| anyhow!("{host}:{port} did not resolve"))
}

fn run_nonce() -> u32 {
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0);
    let x = t ^ (u64::from(std::process::id()) << 20);
    (x ^ (x >> 32)) as u32
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Mode {
    Pub,
    Sub,
    Run,
}

fn build_run_cfg(addr: SocketAddr, mode: Mode, a: &RunArgs) -> Result<run::RunCfg> {
    let version = mqtt::Version::from_level(a.mqtt_version)?;
    let sc = a.scenario;
    // Preset defaults: (publishers, subscribers, pub topic, sub topic, qos, clean).
    let (mut p, mut s, pt, st, q, clean) = match sc {
        None => (1, 1, "bench/%i", "bench/#", 0, true),
        Some(Scenario::FanIn) => (4, 1, "bench/%i", "bench/#", 0, true),
        Some(Scenario::FanOut) => (1, 100, "bench/fanout", "bench/fanout", 0, true),
        Some(Scenario::P2p) => {
            let n = a.publishers.or(a.subscribers).unwrap_or(100);
            (n, n, "bench/p2p/%i", "bench/p2p/%i", 0, true)
        }
        Some(Scenario::Shared) => (4, 4, "bench/%i", "$share/g/bench/#", 0, true),
        Some(Scenario::RetainedStorm) => (1, 10, "bench/retained/%i", "#", 1, true),
        Some(Scenario::Qos1Persistent) => (4, 1, "bench/%i", "bench/#", 1, false),
        Some(Scenario::AliasTopics) => (1, 1, "bench/alias/%i", "bench/alias/#", 1, true),
    };
    let alias_topics = sc == Some(Scenario::AliasTopics);
    if alias_topics && a.mqtt_version != 5 {
        bail!("alias-topics is an MQTT 5 scenario: add --version 5");
    }
    match mode {
        Mode::Pub => s = 0,
        Mode::Sub => p = 0,
        Mode::Run => {}
    }
    let publishers = if mode == Mode::Sub {
        0
    } else {
        a.publishers.unwrap_or(p)
    };
    let subscribers = if mode == Mode::Pub {
        0
    } else {
        a.subscribers.unwrap_or(s)
    };
    let qos = a.qos.unwrap_or(q);
    let retained = if sc == Some(Scenario::RetainedStorm) {
        Some(a.retained.or(a.count).unwrap_or(10_000))
    } else {
        if a.retained.is_some() {
            bail!("--retained is for the retained-storm scenario");
        }
        None
    };
    let count = a.count.or(alias_topics.then_some(20_000));
    let mut duration = a.duration;
    if duration.is_none() && count.is_none() && retained.is_none() {
        duration = Some(10.0);
    }
    let ports = |list: &[u16]| -> Vec<SocketAddr> {
        if list.is_empty() {
            vec![addr]
        } else {
            list.iter()
                .map(|&p| SocketAddr::new(addr.ip(), p))
                .collect()
        }
    };
    let cfg = run::RunCfg {
        addr,
        pub_addrs: ports(&a.pub_ports),
        sub_addrs: ports(&a.sub_ports),
        transport: match a.transport {
            Transport::Tcp => "tcp",
            Transport::Ws => "ws",
        }
        .into(),
        ws_path: a.ws_path.clone(),
        mode: match mode {
            Mode::Pub => "pub",
            Mode::Sub => "sub",
            Mode::Run => "run",
        }
        .into(),
        scenario: sc.map(|s| s.name().to_string()),
        version,
        mqtt_version: version.level(),
        publishers,
        subscribers,
        pub_topic: a.pub_topic.clone().unwrap_or_else(|| pt.into()),
        sub_topic: a.sub_topic.clone().unwrap_or_else(|| st.into()),
        qos,
        sub_qos: a.sub_qos.unwrap_or(qos),
        payload_size: a.size.max(mqtt::HEADER_LEN),
        rate: a.rate.max(0.0),
        count: if retained.is_some() { None } else { count },
        duration_s: duration,
        inflight: a.inflight.max(1),
        clean_session: a.clean && !a.persistent && clean,
        retain: a.retain,
        keepalive: a.keepalive,
        drain_s: a.drain,
        drain_max_s: a.drain_max,
        connect_timeout_s: a.connect_timeout,
        connect_concurrency: a.connect_concurrency,
        max_time_s: a.max_time,
        client_prefix: a.client_prefix.clone(),
        nonce: run_nonce(),
        check_own: mode != Mode::Sub,
        retained,
        sub_offline_at_s: a.sub_offline_at,
        sub_offline_for_s: a.sub_offline_for,
        distinct_topics: a.distinct_topics || alias_topics,
        sub_topic_alias_max: a
            .sub_topic_alias_max
            .or(alias_topics.then_some(u16::MAX))
            .filter(|_| version.level() == 5),
    };
    if a.size < mqtt::HEADER_LEN {
        eprintln!(
            "note: payload size raised to {} bytes (benchmark header)",
            mqtt::HEADER_LEN
        );
    }
    run::validate(&cfg)?;
    Ok(cfg)
}

fn fmt_rate(r: f64) -> String {
    if r >= 1e6 {
        format!("{:.2}M", r / 1e6)
    } else if r >= 1e3 {
        format!("{:.1}k", r / 1e3)
    } else {
        format!("{r:.0}")
    }
}

fn print_run_summary(r: &run::RunResult) {
    let Some(c) = &r.config else { return };
    eprintln!(
        "== millet-bench {}{} against {}{} | MQTT {} QoS {} | {} pub x {} sub | {} B{}",
        c.mode,
        c.scenario
            .as_ref()
            .map(|s| format!(" ({s})"))
            .unwrap_or_default(),
        r.broker,
        if c.transport == "ws" {
            format!(" over ws ({})", c.ws_path)
        } else {
            String::new()
        },
        if c.mqtt_version == 5 { "5.0" } else { "3.1.1" },
        c.qos,
        r.publishers_connected,
        r.subscribers_ready,
        c.payload_size,
        if c.rate > 0.0 {
            format!(" | {} msg/s per publisher", fmt_rate(c.rate))
        } else {
            String::new()
        }
    );
    if let Some(s) = &r.retained_storm {
        eprintln!(
            "retained   {} published in {:.2}s; {}/{} subscribers got all, first after {} last after {}; delivery {} msg/s",
            s.retained_published,
            s.publish_time_s,
            s.subscribers_complete,
            c.subscribers,
            s.first_complete_s.map(|v| format!("{v:.3}s")).unwrap_or_else(|| "n/a".into()),
            s.last_complete_s.map(|v| format!("{v:.3}s")).unwrap_or_else(|| "n/a".into()),
            fmt_rate(s.delivery_rate)
        );
    }
    if c.publishers > 0 {
        eprintln!(
            "sent       {:>10} in {:.2}s = {} msg/s",
            r.sent,
            r.publish_time_s,
            fmt_rate(r.send_rate)
        );
    }
    if let (Some(a), Some(ar)) = (r.acked, r.ack_rate) {
        eprintln!(
            "acked      {:>10}          = {} msg/s (rejected {}, unacked {})",
            a,
            fmt_rate(ar),
            r.rejected,
            r.unacked
        );
    }
    if c.subscribers > 0 {
        eprintln!(
            "received   {:>10}          = {} msg/s (foreign {})",
            r.received_own,
            fmt_rate(r.recv_rate),
            r.foreign
        );
    }
    if let (Some(e), Some(l), Some(p)) = (r.expected, r.lost, r.loss_pct) {
        eprintln!(
            "expected   {e:>10}, unique {}, lost {l} ({p:.2}%), duplicates {}, reordered {}{}",
            r.unique,
            r.duplicates,
            r.reordered,
            r.acked_lost
                .map(|a| format!(", acked-but-lost {a}"))
                .unwrap_or_default()
        );
    }
    if let Some(l) = &r.latency {
        eprintln!(
            "latency us p50 {:.0}  p90 {:.0}  p99 {:.0}  p99.9 {:.0}  max {:.0}  (mean {:.0}, n={})",
            l.p50_us, l.p90_us, l.p99_us, l.p999_us, l.max_us, l.mean_us, l.count
        );
    }
    if let Some(l) = &r.ack_latency {
        eprintln!(
            "ack lat us p50 {:.0}  p90 {:.0}  p99 {:.0}  p99.9 {:.0}  max {:.0}",
            l.p50_us, l.p90_us, l.p99_us, l.p999_us, l.max_us
        );
    }
    if let (Some(b), Some(a)) = (r.broker_rss_kib_before, r.broker_rss_kib_after) {
        eprintln!("broker RSS {b} KiB -> {a} KiB");
    }
    match (r.tool_cpu_s, r.broker_cpu_s) {
        (Some(t), Some(b)) => eprintln!(
            "cpu        tool {t:.2}s, broker {b:.2}s (wall {:.2}s)",
            r.wall_time_s
        ),
        (Some(t), None) => eprintln!("cpu        tool {t:.2}s (wall {:.2}s)", r.wall_time_s),
        _ => {}
    }
    for e in r.errors.iter().take(10) {
        eprintln!("error: {e}");
    }
}

fn print_conn_summary(r: &conn::ConnResult) {
    eprintln!(
        "== millet-bench conn against {}: {} connected, {} failed, {} dropped; {:.0} conn/s over {:.2}s",
        r.broker, r.connected, r.failed, r.dropped, r.connect_rate, r.connect_time_s
    );
    if let Some(l) = &r.connect_latency {
        eprintln!(
            "connect latency us p50 {:.0} p99 {:.0} max {:.0}",
            l.p50_us, l.p99_us, l.max_us
        );
    }
    if let (Some(b), Some(a)) = (r.broker_rss_kib_before, r.broker_rss_kib_connected) {
        eprintln!(
            "broker RSS {b} KiB -> {a} KiB ({:.2} KiB/conn)",
            r.broker_rss_kib_per_conn.unwrap_or(0.0)
        );
    }
    if let Some(t) = r.tool_rss_kib_per_conn {
        eprintln!("tool RSS {:.2} KiB/conn", t);
    }
    for e in r.errors.iter().take(10) {
        eprintln!("error: {e}");
    }
}

fn emit<T: serde::Serialize>(value: &T, out: Option<&PathBuf>) -> Result<()> {
    let line = serde_json::to_string(value)?;
    println!("{line}");
    if let Some(p) = out {
        if let Some(dir) = p.parent() {
            if !dir.as_os_str().is_empty() {
                std::fs::create_dir_all(dir)?;
            }
        }
        std::fs::write(p, format!("{line}\n"))
            .with_context(|| format!("writing {}", p.display()))?;
    }
    Ok(())
}

fn main() {
    let cli = Cli::parse();
    let code = match real_main(cli) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("millet-bench: {e:#}");
            2
        }
    };
    std::process::exit(code);
}

fn real_main(cli: Cli) -> Result<i32> {
    let command = std::env::args().collect::<Vec<_>>().join(" ");
    if let Cmd::Report(a) = &cli.cmd {
        report::report(a)?;
        return Ok(0);
    }
    if let Cmd::OverloadReport(a) = &cli.cmd {
        overload::report(a)?;
        return Ok(0);
    }
    let addr = resolve(&cli.host, cli.port)?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(cli.threads.max(1))
        .enable_all()
        .build()?;
    let code = match cli.cmd {
        Cmd::Conn(a) => {
            let cfg = conn::ConnCfg {
                addr,
                connections: a.count,
                rate: a.rate,
                hold_s: a.hold,
                keepalive: a.keepalive,
                source_ips: if a.source_ips == 0 {
                    (a.count.div_ceil(16_000)).clamp(1, 254) as u32
                } else {
                    a.source_ips.min(254)
                },
                version: mqtt::Version::from_level(a.mqtt_version)?,
                mqtt_version: a.mqtt_version,
                connect_timeout_s: a.connect_timeout,
                broker_pid: a.broker_pid,
                client_prefix: a.client_prefix,
                nonce: run_nonce(),
                tls_ca: a.tls.as_ref().map(|p| p.display().to_string()),
                tls_server_name: a.tls_server_name,
                tls: a
                    .tls
                    .as_deref()
                    .map(mqtt::tls_connector)
                    .transpose()?
                    .map(conn::Tls),
            };
            let bound = Duration::from_secs_f64(
                cfg.connections as f64 / cfg.rate.max(1.0)
                    + cfg.hold_s
                    + cfg.connect_timeout_s
                    + 60.0,
            );
            let mut r = rt
                .block_on(async { tokio::time::timeout(bound, conn::run(cfg)).await })
                .map_err(|_| anyhow!("conn run exceeded its time bound"))??;
            r.label = cli.label;
            r.case = cli.case_name;
            r.command = command;
            print_conn_summary(&r);
            emit(&r, cli.json_out.as_ref())?;
            i32::from(r.connected == 0)
        }
        Cmd::Report(_) | Cmd::OverloadReport(_) => 0,
        Cmd::Resume(a) => {
            let cfg = resume::ResumeCfg::new(addr, &a, run_nonce())?;
            let bound = cfg.bound();
            let mut r = rt
                .block_on(async { tokio::time::timeout(bound, resume::run(cfg)).await })
                .map_err(|_| anyhow!("resume run exceeded its time bound"))??;
            r.label = cli.label;
            r.case = cli.case_name;
            r.command = command;
            resume::print_summary(&r);
            emit(&r, cli.json_out.as_ref())?;
            i32::from(!r.ok())
        }
        Cmd::Overload(a) => {
            let mut r = overload::run(&rt, addr, &a, run_nonce())?;
            r.label = cli.label;
            r.command = command;
            emit(&r, cli.json_out.as_ref())?;
            0
        }
        Cmd::Fleet(a) => {
            let cfg = fleet::FleetCfg {
                addr,
                devices: a.devices,
                version: mqtt::Version::from_level(a.mqtt_version)?,
                mqtt_version: a.mqtt_version,
                clean_session: a.clean,
                session_expiry: a.session_expiry,
                interval_s: a.interval,
                cmd_pct: a.cmd_pct.max(0.0),
                payload_size: a.size.max(mqtt::HEADER_LEN),
                connect_rate: a.rate,
                warmup_s: a.warmup,
                window_s: a.window.max(1.0),
                drain_s: a.drain,
                keepalive: a.keepalive,
                source_ips: if a.source_ips == 0 {
                    (a.devices.div_ceil(16_000)).clamp(1, 254) as u32
                } else {
                    a.source_ips.min(254)
                },
                connect_timeout_s: a.connect_timeout,
                broker_pid: a.broker_pid,
                client_prefix: a.client_prefix,
                nonce: run_nonce(),
            };
            let bound = Duration::from_secs_f64(
                cfg.devices as f64 / cfg.connect_rate.max(1.0)
                    + cfg.connect_timeout_s
                    + cfg.warmup_s
                    + cfg.window_s
                    + cfg.drain_s
                    + 90.0,
            );
            let mut r = rt
                .block_on(async { tokio::time::timeout(bound, fleet::run(cfg)).await })
                .map_err(|_| anyhow!("fleet run exceeded its time bound"))??;
            r.label = cli.label;
            r.case = cli.case_name;
            r.command = command;
            print_fleet_summary(&r);
            emit(&r, cli.json_out.as_ref())?;
            i32::from(r.connected == 0)
        }
        cmd @ (Cmd::Pub(_) | Cmd::Sub(_) | Cmd::Run(_) | Cmd::Scenario { .. }) => {
            let (mode, a) = match cmd {
                Cmd::Pub(a) => (Mode::Pub, a),
                Cmd::Sub(a) => (Mode::Sub, a),
                Cmd::Scenario { name, mut args } => {
                    args.scenario = Some(name);
                    (Mode::Run, args)
                }
                Cmd::Run(a) => (Mode::Run, a),
                _ => unreachable!(),
            };
            let cfg = build_run_cfg(addr, mode, &a)?;
            let bound = Duration::from_secs_f64(
                cfg.max_time_s
                    .min(cfg.duration_s.unwrap_or(cfg.max_time_s) + 60.0)
                    + 2.0 * cfg.connect_timeout_s
                    + cfg.drain_max_s
                    + 360.0,
            );
            let pid = a.broker_pid;
            let rss = || pid.and_then(conn::rss_kib);
            let before = rss();
            let me = std::process::id();
            let cpu0 = (conn::cpu_seconds(me), pid.and_then(conn::cpu_seconds));
            let mut r = rt
                .block_on(async { tokio::time::timeout(bound, run::run(cfg)).await })
                .map_err(|_| anyhow!("run exceeded its time bound"))??;
            r.broker_rss_kib_before = before;
            r.broker_rss_kib_after = rss();
            let cpu1 = (conn::cpu_seconds(me), pid.and_then(conn::cpu_seconds));
            r.tool_cpu_s = cpu0.0.zip(cpu1.0).map(|(a, b)| b - a);
            r.broker_cpu_s = cpu0.1.zip(cpu1.1).map(|(a, b)| b - a);
            r.label = cli.label;
            r.case = cli.case_name;
            r.command = command;
            print_run_summary(&r);
            emit(&r, cli.json_out.as_ref())?;
            let ok = (r.publishers_connected > 0 || mode == Mode::Sub)
                && (r.subscribers_ready > 0 || mode == Mode::Pub);
            i32::from(!ok)
        }
    };
    rt.shutdown_timeout(Duration::from_secs(1));
    Ok(code)
}
