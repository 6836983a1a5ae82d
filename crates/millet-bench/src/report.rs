//! `report`: turn the JSON results written by `bench/compare.sh` into
//! BENCHMARKS.md (tables, commands) and a PNG bar chart (plotters, bitmap
//! backend, bundled DejaVu font: no system font dependency).
//!
//! Result files are named `<pass>__<case>__<broker>.json` (one JSON object);
//! a file holding `{"unavailable": "reason"}` marks a cell as n/a.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use clap::Args;
use plotters::prelude::*;
use serde_json::Value;

#[derive(Args, Debug, Clone)]
pub struct ReportArgs {
    /// Directory with the JSON results (and meta.json).
    #[arg(long, default_value = "bench/results")]
    pub results: PathBuf,
    /// Markdown file to write.
    #[arg(long, default_value = "BENCHMARKS.md")]
    pub out: PathBuf,
    /// PNG chart to write.
    #[arg(long, default_value = "bench/results.png")]
    pub chart: PathBuf,
    /// Path of the chart as referenced from the markdown file.
    #[arg(long, default_value = "bench/results.png")]
    pub chart_link: String,
    /// Print only this section's markdown to stdout (fleet, idle, scale)
    /// instead of writing the files.
    #[arg(long)]
    pub section: Option<String>,
}

pub const BROKERS: [&str; 2] = ["millet", "mosquitto"];

/// How a metric compares.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Better {
    Higher,
    Lower,
    /// Shown for context only (no ratio).
    Info,
}

struct Metric {
    name: &'static str,
    /// Dotted path into the result JSON.
    path: &'static str,
    better: Better,
    unit: &'static str,
}

struct Case {
    id: &'static str,
    title: &'static str,
    metrics: &'static [Metric],
}

const fn m(name: &'static str, path: &'static str, better: Better, unit: &'static str) -> Metric {
    Metric {
        name,
        path,
        better,
        unit,
    }
}

use Better::{Higher, Info, Lower};

const CASES: &[Case] = &[
    Case {
        id: "qos0-fanin",
        title: "QoS 0 fan-in (4 publishers, one `bench/#` subscriber, 64 B, unlimited rate)",
        metrics: &[
            m("received", "recv_rate", Higher, "msg/s"),
            m("loss", "loss_pct", Lower, "%"),
            m(
                "latency p99 (queueing, unlimited rate)",
                "latency.p99_us",
                Lower,
                "µs",
            ),
            m("broker CPU", "broker_cpu_s", Lower, "s"),
            m("millet-bench CPU", "tool_cpu_s", Info, "s"),
        ],
    },
    Case {
        id: "qos1-single",
        title: "QoS 1, one publisher, one subscriber (window 32, 64 B)",
        metrics: &[
            m("acknowledged", "ack_rate", Higher, "msg/s"),
            m("received", "recv_rate", Higher, "msg/s"),
            m("PUBLISH→PUBACK p99", "ack_latency.p99_us", Lower, "µs"),
            m("end-to-end p99", "latency.p99_us", Lower, "µs"),
            m("lost", "lost", Lower, "msgs"),
            m("broker CPU", "broker_cpu_s", Lower, "s"),
            m("millet-bench CPU", "tool_cpu_s", Info, "s"),
        ],
    },
    Case {
        id: "qos1-overload",
        title: "QoS 1 fan-in overload (4 publishers, window 32 each, one `bench/#` subscriber)",
        metrics: &[
            m("acknowledged", "ack_rate", Higher, "msg/s"),
            m("received", "recv_rate", Higher, "msg/s"),
            m("acknowledged but lost", "acked_lost", Lower, "msgs"),
            m("loss", "loss_pct", Lower, "%"),
            m("duplicates", "duplicates", Lower, "msgs"),
        ],
    },
    Case {
        id: "qos0-fanout",
        title: "QoS 0 fan-out (1 publisher, many subscribers on one topic)",
        metrics: &[
            m("deliveries", "recv_rate", Higher, "msg/s"),
            m("loss", "loss_pct", Lower, "%"),
            m("latency p99 (queueing)", "latency.p99_us", Lower, "µs"),
            m("broker CPU", "broker_cpu_s", Lower, "s"),
            m("millet-bench CPU", "tool_cpu_s", Info, "s"),
        ],
    },
    Case {
        id: "lat-qos0-1k",
        title: "Latency at 1k msg/s, QoS 0 (1 publisher, 1 subscriber)",
        metrics: &[
            m("p50", "latency.p50_us", Lower, "µs"),
            m("p90", "latency.p90_us", Lower, "µs"),
            m("p99", "latency.p99_us", Lower, "µs"),
            m("p99.9", "latency.p999_us", Lower, "µs"),
            m("max", "latency.max_us", Lower, "µs"),
            m("loss", "loss_pct", Lower, "%"),
        ],
    },
    Case {
        id: "lat-qos1-1k",
        title: "Latency at 1k msg/s, QoS 1 (1 publisher, 1 subscriber)",
        metrics: &[
            m("p50", "latency.p50_us", Lower, "µs"),
            m("p99", "latency.p99_us", Lower, "µs"),
            m("p99.9", "latency.p999_us", Lower, "µs"),
            m("PUBLISH→PUBACK p99", "ack_latency.p99_us", Lower, "µs"),
            m("loss", "loss_pct", Lower, "%"),
        ],
    },
    Case {
        id: "conn-10k",
        title: "Idle connections held with keep-alive pings ({n} connections)",
        metrics: &[
            m("connected", "connected", Higher, "conns"),
            m("failed", "failed", Lower, "conns"),
            m("connect rate achieved", "connect_rate", Higher, "conn/s"),
            m("connect p99", "connect_latency.p99_us", Lower, "µs"),
            m(
                "broker RSS per connection",
                "broker_rss_kib_per_conn",
                Lower,
                "KiB",
            ),
            m(
                "broker RSS with all connected",
                "broker_rss_kib_connected",
                Lower,
                "KiB",
            ),
        ],
    },
    Case {
        id: "conn-50k",
        title: "Idle connections held with keep-alive pings ({n} connections)",
        metrics: &[
            m("connected", "connected", Higher, "conns"),
            m("failed", "failed", Lower, "conns"),
            m("connect rate achieved", "connect_rate", Higher, "conn/s"),
            m("connect p99", "connect_latency.p99_us", Lower, "µs"),
            m(
                "broker RSS per connection",
                "broker_rss_kib_per_conn",
                Lower,
                "KiB",
            ),
            m(
                "broker RSS with all connected",
                "broker_rss_kib_connected",
                Lower,
                "KiB",
            ),
        ],
    },
    Case {
        id: "qos0-fanin-ws",
        title: "QoS 0 fan-in over WebSocket (4 publishers, one `bench/#` subscriber, all on `ws://…/mqtt`, 64 B, unlimited rate)",
        metrics: &[
            m("received", "recv_rate", Higher, "msg/s"),
            m("loss", "loss_pct", Lower, "%"),
            m(
                "latency p99 (queueing, unlimited rate)",
                "latency.p99_us",
                Lower,
                "µs",
            ),
            m("broker CPU", "broker_cpu_s", Lower, "s"),
            m("millet-bench CPU", "tool_cpu_s", Info, "s"),
        ],
    },
    Case {
        id: "lat-qos1-1k-ws",
        title: "QoS 1 at 1,000 msg/s over WebSocket (one publisher, one subscriber, 64 B)",
        metrics: &[
            m("PUBLISH→PUBACK p99", "ack_latency.p99_us", Lower, "µs"),
            m("end-to-end p50", "latency.p50_us", Lower, "µs"),
            m("end-to-end p99", "latency.p99_us", Lower, "µs"),
            m("broker CPU", "broker_cpu_s", Lower, "s"),
        ],
    },
    Case {
        id: "idle-tcp",
        title: "Idle plain-TCP connections ({n} connections)",
        metrics: IDLE_METRICS,
    },
    Case {
        id: "idle-tls",
        title: "Idle TLS connections ({n} connections, same CA and server certificate for both brokers)",
        metrics: IDLE_METRICS,
    },
    Case {
        id: "conn-19k",
        title: "Scale on one box: {n} idle connections (the \"100k\" scenario at this machine's open-files limit)",
        metrics: &[
            m("connected", "connected", Higher, "conns"),
            m("failed", "failed", Lower, "conns"),
            m("dropped while held", "dropped", Lower, "conns"),
            m("connect rate achieved", "connect_rate", Higher, "conn/s"),
            m("CONNACK p50", "connect_latency.p50_us", Lower, "µs"),
            m("CONNACK p99", "connect_latency.p99_us", Lower, "µs"),
            m(
                "broker RSS per connection",
                "broker_rss_kib_per_conn",
                Lower,
                "KiB",
            ),
            m(
                "broker RSS with all connected",
                "broker_rss_kib_connected",
                Lower,
                "KiB",
            ),
            m("open-files limit", "nofile_limit", Info, "fds"),
        ],
    },
];

const IDLE_METRICS: &[Metric] = &[
    m(
        "broker RSS per idle connection",
        "broker_rss_kib_per_conn",
        Lower,
        "KiB",
    ),
    m("connected", "connected", Higher, "conns"),
    m("failed", "failed", Lower, "conns"),
    m("connect rate achieved", "connect_rate", Higher, "conn/s"),
    m("connect p99", "connect_latency.p99_us", Lower, "µs"),
];

const PASSES: &[(&str, &str)] = &[
    (
        "default",
        "Unpinned (scheduler decides; broker and tool share both cores)",
    ),
    (
        "pinned",
        "Pinned (`taskset`: broker on CPU 0, millet-bench on CPU 1, `--threads 1`)",
    ),
    (
        "idle",
        "Idle memory per connection: plain TCP and TLS (`bench/compare.sh --only idle`)",
    ),
    (
        "scale",
        "Scale on one box (`bench/compare.sh --only scale`)",
    ),
    (
        "ws",
        "MQTT over WebSocket (`bench/compare.sh --only ws`; Mosquitto: `listener PORT` + `protocol websockets`)",
    ),
];

/// The cluster pass (`bench/cluster.sh`): one column per deployment, one
/// table row per (case, metric).
const CLUSTER_PASS: &str = "cluster";
const CLUSTER_BROKERS: [(&str, &str); 5] = [
    ("mosquitto", "Mosquitto"),
    ("millet", "Millet (embedded)"),
    ("cluster-1", "cluster, 1 node"),
    ("cluster-2", "cluster, 2 nodes"),
    ("cluster-3", "cluster, 3 nodes"),
];
const CLUSTER_CASES: &[(&str, &[Metric])] = &[
    (
        "qos0-fanin",
        &[
            m("QoS 0 fan-in received", "recv_rate", Higher, "msg/s"),
            m("QoS 0 fan-in end-to-end p99", "latency.p99_us", Lower, "µs"),
        ],
    ),
    (
        "qos1",
        &[
            m("QoS 1 acknowledged", "ack_rate", Higher, "msg/s"),
            m(
                "QoS 1 PUBLISH→PUBACK p99",
                "ack_latency.p99_us",
                Lower,
                "µs",
            ),
        ],
    ),
    (
        "lat-qos1-1k",
        &[
            m(
                "QoS 1 at 1,000 msg/s: PUBLISH→PUBACK p50",
                "ack_latency.p50_us",
                Lower,
                "µs",
            ),
            m(
                "QoS 1 at 1,000 msg/s: PUBLISH→PUBACK p99",
                "ack_latency.p99_us",
                Lower,
                "µs",
            ),
            m(
                "QoS 1 at 1,000 msg/s: end-to-end p99",
                "latency.p99_us",
                Lower,
                "µs",
            ),
        ],
    ),
    (
        "conn",
        &[
            m("connect rate", "connect_rate", Higher, "conn/s"),
            m("connect p99", "connect_latency.p99_us", Lower, "µs"),
        ],
    ),
    // `millet-bench resume`: the session made on node 1, the messages
    // published on node 2, the session resumed on the last node.
    (
        "resume",
        &[
            m("resume 10k queued: CONNACK", "connack_ms", Lower, "ms"),
            m("resume 10k queued: all delivered", "resume_ms", Lower, "ms"),
            m("resume 10k queued: drain", "msgs_per_s", Higher, "msg/s"),
        ],
    ),
];

/// The fleet pass (`bench/fleet.sh`): one column per broker configuration.
const FLEET_PASS: &str = "fleet";
const FLEET_CASE: &str = "fleet";
const FLEET_BROKERS: [(&str, &str); 3] = [
    ("millet", "Millet (default: `sync` store)"),
    ("mosquitto-persist", "Mosquitto `persistence true`"),
    ("mosquitto", "Mosquitto (memory)"),
];
const FLEET_EXTRA: [(&str, &str); 2] = [
    ("millet-interval", "Millet `--durability interval`"),
    ("millet-none", "Millet `--durability none`"),
];
const FLEET_METRICS: &[Metric] = &[
    m("devices connected", "connected", Higher, "devices"),
    m(
        "broker CPU over the window",
        "broker_cpu_pct",
        Lower,
        "% of a core",
    ),
    m(
        "broker RSS at the end of the window",
        "broker_rss_kib",
        Lower,
        "KiB",
    ),
    m(
        "broker RSS per device",
        "broker_rss_kib_per_device",
        Lower,
        "KiB",
    ),
    m(
        "telemetry device→backend p50",
        "telemetry.latency.p50_us",
        Lower,
        "µs",
    ),
    m(
        "telemetry device→backend p99",
        "telemetry.latency.p99_us",
        Lower,
        "µs",
    ),
    m(
        "command backend→device p50",
        "commands.latency.p50_us",
        Lower,
        "µs",
    ),
    m(
        "command backend→device p99",
        "commands.latency.p99_us",
        Lower,
        "µs",
    ),
    m(
        "telemetry PUBACK p99",
        "telemetry.puback_latency.p99_us",
        Lower,
        "µs",
    ),
    m(
        "command PUBACK p99",
        "commands.puback_latency.p99_us",
        Lower,
        "µs",
    ),
    m(
        "telemetry sent in the window",
        "telemetry.sent",
        Info,
        "msgs",
    ),
    m("telemetry received", "telemetry.received", Info, "msgs"),
    m("telemetry lost", "telemetry.lost", Lower, "msgs"),
    m("commands sent in the window", "commands.sent", Info, "msgs"),
    m("commands received", "commands.received", Info, "msgs"),
    m("commands lost", "commands.lost", Lower, "msgs"),
    m("connect rate", "connect_rate", Higher, "conn/s"),
    m("millet-bench CPU", "tool_cpu_pct", Info, "% of a core"),
];

/// The durability pass (`bench/compare.sh`): one case, one column per
/// broker configuration instead of Millet vs Mosquitto.
const DURABILITY_PASS: &str = "durability";
const DURABILITY_CASE: &str = "qos1-persistent";
const DURABILITY_BROKERS: [(&str, &str); 4] = [
    ("millet-sync", "Millet `sync`"),
    ("millet-interval", "Millet `interval`"),
    ("millet-none", "Millet `none` (memory)"),
    ("mosquitto-persist", "Mosquitto `persistence true`"),
];
const DURABILITY_METRICS: &[Metric] = &[
    m("acknowledged", "ack_rate", Higher, "msg/s"),
    m("received", "recv_rate", Higher, "msg/s"),
    m("PUBLISH→PUBACK p50", "ack_latency.p50_us", Lower, "µs"),
    m("PUBLISH→PUBACK p99", "ack_latency.p99_us", Lower, "µs"),
    m("end-to-end p99", "latency.p99_us", Lower, "µs"),
    m("acknowledged but lost", "acked_lost", Lower, "msgs"),
    m("duplicates", "duplicates", Lower, "msgs"),
    m("broker CPU", "broker_cpu_s", Lower, "s"),
];
/// Targets of the durable store: `sync` acknowledges at least this many
/// QoS 1 msg/s, and `interval` stays within this fraction of in-memory.
const SYNC_TARGET: f64 = 20_000.0;
const INTERVAL_TARGET: f64 = 0.7;

/// The runs of one (pass, case, broker).
#[derive(Default)]
struct Runs {
    ok: Vec<Value>,
    /// Reasons of runs without a result (broker did not start, crashed, ...).
    failed: Vec<String>,
}

/// (pass, case, broker) -> runs.
type Results = BTreeMap<(String, String, String), Runs>;

fn load(dir: &Path) -> Result<(Results, Value)> {
    let mut out = Results::new();
    let mut meta = Value::Null;
    let mut extra: Vec<String> = Vec::new();
    let rd = std::fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))?;
    let mut paths: Vec<PathBuf> = rd.flatten().map(|e| e.path()).collect();
    paths.sort();
    for p in paths {
        let Some(name) = p.file_name().and_then(|n| n.to_str()) else {
            continue;
        };
        let Some(stem) = name.strip_suffix(".json") else {
            continue;
        };
        let text = std::fs::read_to_string(&p).unwrap_or_default();
        let v: Value = serde_json::from_str(text.trim()).unwrap_or(Value::Null);
        if stem == "meta" {
            meta = v;
            continue;
        }
        if let Some(pass) = stem.strip_prefix("meta-") {
            // A pass run on its own (`compare.sh --only PASS`): its notes,
            // dated, join the main ones.
            let date = v.get("date").and_then(Value::as_str).unwrap_or("?");
            for n in v
                .get("notes")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
                .filter_map(Value::as_str)
            {
                extra.push(format!("[{pass} pass, run {date}] {n}"));
            }
            continue;
        }
        // <pass>__<case>__<broker>[__r<N>]
        let parts: Vec<&str> = stem.split("__").collect();
        if parts.len() != 3 && parts.len() != 4 {
            continue;
        }
        let key = (
            parts[0].to_string(),
            parts[1].to_string(),
            parts[2].to_string(),
        );
        let val = if let Some(r) = v.get("unavailable").and_then(Value::as_str) {
            Err(r.to_string())
        } else if v.is_null() {
            Err("no result (the run produced no JSON)".to_string())
        } else {
            Ok(v)
        };
        let entry = out.entry(key).or_default();
        match val {
            Ok(v) => entry.ok.push(v),
            Err(r) => entry.failed.push(r),
        }
    }
    if !extra.is_empty() {
        if !meta.is_object() {
            meta = Value::Object(serde_json::Map::new());
        }
        if let Some(obj) = meta.as_object_mut() {
            let notes = obj
                .entry("notes")
                .or_insert_with(|| Value::Array(Vec::new()));
            if let Some(a) = notes.as_array_mut() {
                // Drop the main run's notes that a pass run repeats.
                a.retain(|n| {
                    n.as_str()
                        .is_none_or(|n| !extra.iter().any(|e| e.ends_with(n)))
                });
                a.extend(extra.into_iter().map(Value::String));
            }
        }
    }
    Ok((out, meta))
}

fn get_path<'a>(v: &'a Value, path: &str) -> Option<&'a Value> {
    let mut cur = v;
    for k in path.split('.') {
        cur = cur.get(k)?;
    }
    if cur.is_null() {
        None
    } else {
        Some(cur)
    }
}

/// Median over the runs of one (pass, case, broker).
fn metric(results: &Results, pass: &str, case: &str, broker: &str, path: &str) -> Option<f64> {
    let runs = &results
        .get(&(pass.to_string(), case.to_string(), broker.to_string()))?
        .ok;
    let mut vals: Vec<f64> = runs
        .iter()
        .filter_map(|v| get_path(v, path)?.as_f64())
        .collect();
    if vals.is_empty() {
        return None;
    }
    vals.sort_by(|a, b| a.total_cmp(b));
    let n = vals.len();
    Some(if n % 2 == 1 {
        vals[n / 2]
    } else {
        (vals[n / 2 - 1] + vals[n / 2]) / 2.0
    })
}

fn runs_of(results: &Results, pass: &str, case: &str, broker: &str) -> usize {
    results
        .get(&(pass.to_string(), case.to_string(), broker.to_string()))
        .map(|r| r.ok.len())
        .unwrap_or(0)
}

fn fmt_num(v: f64) -> String {
    let a = v.abs();
    if a >= 1000.0 {
        let s = format!("{:.0}", v);
        // thousands separators
        let (sign, digits) = s.strip_prefix('-').map(|d| ("-", d)).unwrap_or(("", &s));
        let mut out = String::new();
        for (i, c) in digits.chars().enumerate() {
            if i > 0 && (digits.len() - i) % 3 == 0 {
                out.push(',');
            }
            out.push(c);
        }
        format!("{sign}{out}")
    } else if a >= 100.0 {
        format!("{v:.0}")
    } else if a >= 10.0 {
        format!("{v:.1}")
    } else if v == 0.0 {
        "0".into()
    } else {
        format!("{v:.2}")
    }
}

fn cell(results: &Results, pass: &str, case: &str, broker: &str, path: &str) -> String {
    match results.get(&(pass.to_string(), case.to_string(), broker.to_string())) {
        Some(r) if !r.ok.is_empty() => match metric(results, pass, case, broker, path) {
            Some(x) => fmt_num(x),
            None => "–".into(),
        },
        _ => "n/a".into(),
    }
}

fn meta_str(meta: &Value, k: &str) -> String {
    match meta.get(k) {
        Some(Value::String(s)) => s.clone(),
        Some(Value::Null) | None => "unknown".into(),
        Some(v) => v.to_string(),
    }
}

pub fn report(a: &ReportArgs) -> Result<()> {
    let (results, meta) = load(&a.results)?;
    if let Some(sec) = &a.section {
        let mut md = String::new();
        match sec.as_str() {
            "fleet" => fleet_section(&mut md, &results, &a.results),
            "cluster" => cluster_section(&mut md, &results, &a.results),
            other => {
                match PASSES.iter().find(|(p, _)| *p == other) {
                    Some((p, t)) => pass_section(&mut md, &results, p, t),
                    None => {
                        anyhow::bail!("unknown section {other:?} (fleet, cluster, idle, scale, default, pinned)")
                    }
                }
            }
        }
        print!("{md}");
        return Ok(());
    }
    let mut md = String::new();
    let w = &mut md;
    let _ = writeln!(w, "# Benchmarks: Millet vs Mosquitto\n");
    let _ = writeln!(
        w,
        "Generated by `bench/compare.sh{}` with `millet-bench` (crates/millet-bench) on {}. \
         Both brokers run on this same machine, one at a time, each freshly started for every \
         case, against the same load generator on the loopback interface. Raw results: \
         `bench/results/*.json`.\n",
        if meta_str(&meta, "mode") == "quick" {
            " --quick"
        } else {
            ""
        },
        meta_str(&meta, "date")
    );
    let _ = writeln!(w, "## Machine\n");
    let _ = writeln!(w, "| | |\n|---|---|");
    for (k, label) in [
        ("nproc", "CPUs (nproc)"),
        ("cpu", "CPU model"),
        ("kernel", "Kernel"),
        ("mem", "Memory"),
        ("nofile", "Open-files limit (hard)"),
        ("loadavg", "Load average at start"),
    ] {
        let _ = writeln!(w, "| {label} | {} |", meta_str(&meta, k));
    }
    let _ = writeln!(
        w,
        "\nThe machine is shared (other work may run at the same time): treat small \
         differences as noise and compare ratios rather than absolute numbers.\n"
    );
    let _ = writeln!(w, "## Brokers\n");
    let _ = writeln!(
        w,
        "- **Mosquitto** {}: `{}` with config `{}`. Its `max_queued_messages` is left at the \
         default ({}): a subscriber's queue beyond in-flight is capped there, so QoS 1/2 \
         messages above it are dropped even after PUBACK to the publisher.",
        meta_str(&meta, "mosquitto_version"),
        meta_str(&meta, "mosquitto_cmd"),
        meta_str(&meta, "mosquitto_conf"),
        meta_str(&meta, "mosquitto_max_queued")
    );
    let _ = writeln!(
        w,
        "- **Millet** ({}): `{}`\n",
        meta_str(&meta, "millet_status"),
        meta_str(&meta, "millet_cmd")
    );
    let _ = writeln!(
        w,
        "Ratio = Millet / Mosquitto. For \"higher is better\" metrics a ratio above 1 favours \
         Millet; for \"lower is better\" metrics a ratio below 1 favours Millet. \
         n/a = no result (broker failed to start or crashed, or the case was skipped).\n"
    );

    for (pass, pass_title) in PASSES {
        pass_section(w, &results, pass, pass_title);
    }

    durability_section(w, &results, &meta);
    fleet_section(w, &results, &a.results);
    cluster_section(w, &results, &a.results);
    // The overload section (`millet-bench overload-report --splice`) is
    // produced by bench/overload.sh: carried over as it is.
    if let Some(sec) = std::fs::read_to_string(&a.out)
        .ok()
        .and_then(|t| crate::overload::extract(&t))
    {
        let _ = writeln!(w, "{sec}");
    }

    let _ = writeln!(w, "## Chart\n");
    let _ = writeln!(w, "![throughput and latency]({})\n", a.chart_link);

    let _ = writeln!(w, "## Commands\n");
    let _ = writeln!(w, "Brokers:\n");
    let _ = writeln!(w, "```sh");
    let _ = writeln!(w, "{}", meta_str(&meta, "mosquitto_cmd"));
    let _ = writeln!(w, "{}", meta_str(&meta, "millet_cmd"));
    let _ = writeln!(w, "```\n");
    let _ = writeln!(
        w,
        "Load (as run against Mosquitto, `$PID` = the broker's pid; Millet's differ only in port and label; pinned runs are prefixed with `taskset -c 1`, the broker with `taskset -c 0`):\n"
    );
    let _ = writeln!(w, "```sh");
    for (pass, _) in PASSES {
        for case in CASES {
            let key = (
                pass.to_string(),
                case.id.to_string(),
                "mosquitto".to_string(),
            );
            let alt = (pass.to_string(), case.id.to_string(), "millet".to_string());
            let cmd = results
                .get(&key)
                .and_then(|r| r.ok.first())
                .or_else(|| results.get(&alt).and_then(|r| r.ok.first()))
                .and_then(|v| v.get("command"))
                .and_then(Value::as_str);
            if let Some(c) = cmd {
                let c = c.split_once("millet-bench ").map(|x| x.1).unwrap_or(c);
                let c = tidy_command(c);
                let _ = writeln!(w, "# {pass} / {}\nmillet-bench {c}", case.id);
            }
        }
    }
    let cmd = DURABILITY_BROKERS
        .iter()
        .filter_map(|(b, _)| {
            results.get(&(
                DURABILITY_PASS.to_string(),
                DURABILITY_CASE.to_string(),
                b.to_string(),
            ))
        })
        .flat_map(|r| r.ok.iter())
        .find_map(|v| v.get("command").and_then(Value::as_str));
    if let Some(c) = cmd {
        let c = c.split_once("millet-bench ").map(|x| x.1).unwrap_or(c);
        let _ = writeln!(
            w,
            "# {DURABILITY_PASS} / {DURABILITY_CASE} (every configuration)\nmillet-bench {}",
            tidy_command(c)
        );
    }
    let _ = writeln!(w, "```\n");
    if let Some(notes) = meta.get("notes").and_then(Value::as_array) {
        if !notes.is_empty() {
            let _ = writeln!(w, "## Notes\n");
            for n in notes.iter().filter_map(Value::as_str) {
                let _ = writeln!(w, "- {n}");
            }
            let _ = writeln!(w);
        }
    }
    // Hand-kept history of optimizations (before / after, with commands),
    // carried into every regenerated report.
    let history = a
        .out
        .parent()
        .map(|d| d.join("bench").join("HISTORY.md"))
        .and_then(|p| std::fs::read_to_string(p).ok());
    if let Some(h) = history {
        let _ = writeln!(w, "{}", h.trim_end());
        let _ = writeln!(w);
    }
    std::fs::write(&a.out, md).with_context(|| format!("writing {}", a.out.display()))?;
    eprintln!("wrote {}", a.out.display());
    chart(&results, &a.chart)?;
    eprintln!("wrote {}", a.chart.display());
    Ok(())
}

/// One Millet-vs-Mosquitto pass: a table per case present in the results.
fn pass_section(w: &mut String, results: &Results, pass: &str, pass_title: &str) {
    let any = results.keys().any(|(p, _, _)| p == pass);
    if !any {
        return;
    }
    let _ = writeln!(w, "## {pass_title}\n");
    for case in CASES {
        let has = results.keys().any(|(p, c, _)| p == pass && c == case.id);
        if !has {
            continue;
        }
        let n = BROKERS
            .iter()
            .filter_map(|b| results.get(&(pass.to_string(), case.id.to_string(), b.to_string())))
            .flat_map(|r| r.ok.iter())
            .find_map(|v| get_path(v, "config.connections").and_then(Value::as_u64))
            .map(|n| n.to_string())
            .unwrap_or_else(|| case.id.trim_start_matches("conn-").to_string());
        let _ = writeln!(w, "### {}\n", case.title.replace("{n}", &n));
        let _ = writeln!(
            w,
            "| metric | Millet | Mosquitto | Millet/Mosquitto | better |\n|---|---:|---:|---:|---|"
        );
        for mt in case.metrics {
            let mil = metric(results, pass, case.id, "millet", mt.path);
            let mos = metric(results, pass, case.id, "mosquitto", mt.path);
            let ratio = match (mil, mos) {
                _ if mt.better == Info => "".into(),
                (Some(a), Some(b)) if b != 0.0 => format!("{:.2}", a / b),
                (Some(0.0), Some(_)) => "=".into(),
                _ => "n/a".into(),
            };
            let _ = writeln!(
                w,
                "| {} ({}) | {} | {} | {} | {} |",
                mt.name,
                mt.unit,
                cell(results, pass, case.id, "millet", mt.path),
                cell(results, pass, case.id, "mosquitto", mt.path),
                ratio,
                match mt.better {
                    Higher => "higher",
                    Lower => "lower",
                    Info => "(context)",
                }
            );
        }
        let nruns = BROKERS
            .iter()
            .map(|b| runs_of(results, pass, case.id, b))
            .max()
            .unwrap_or(0);
        if nruns > 1 {
            let _ = writeln!(w, "\nMedian of {nruns} runs (fresh broker each run).");
        }
        run_notes(w, results, pass, case.id, &BROKERS);
        let _ = writeln!(w);
    }
}

/// Reasons for n/a cells, and errors reported by the load tool.
fn run_notes(w: &mut String, results: &Results, pass: &str, case: &str, brokers: &[&str]) {
    for b in brokers {
        let Some(runs) = results.get(&(pass.to_string(), case.to_string(), b.to_string())) else {
            continue;
        };
        if let Some(r) = runs.failed.first() {
            let what = if runs.ok.is_empty() {
                "n/a".to_string()
            } else {
                format!(
                    "{} of {} runs failed",
                    runs.failed.len(),
                    runs.failed.len() + runs.ok.len()
                )
            };
            let _ = writeln!(w, "\n{b}: {what} — {r}");
        }
        let errs: Vec<&str> = runs
            .ok
            .iter()
            .filter_map(|v| v.get("errors").and_then(Value::as_array))
            .flatten()
            .filter_map(Value::as_str)
            .collect();
        if !errs.is_empty() {
            let first: Vec<String> = errs.iter().take(2).map(|s| format!("`{s}`")).collect();
            let _ = writeln!(
                w,
                "\n{b}: {} error(s) reported by millet-bench, e.g. {}",
                errs.len(),
                first.join(", ")
            );
        }
    }
}

/// The durability pass: QoS 1 to a persistent session under each durability
/// setting of Millet and under Mosquitto's periodic snapshots, with the
/// targets of the durable store.
fn durability_section(w: &mut String, results: &Results, meta: &Value) {
    let (pass, case) = (DURABILITY_PASS, DURABILITY_CASE);
    if !results.keys().any(|(p, c, _)| p == pass && c == case) {
        return;
    }
    let _ = writeln!(w, "## Durability: QoS 1 to a persistent session\n");
    let _ = writeln!(
        w,
        "millet-bench scenario `qos1-persistent`: 4 publishers (window 32 each, 64 B) on \
         `bench/%i`, one online subscriber with a persistent session (`clean_session=false`) \
         on `bench/#`, so every message is queued for a session that outlives a restart. \
         Millet runs with `--durability sync` (fsync before PUBACK, group commit), `interval` \
         (acknowledged after the commit, fsync every 100 ms) and `none` (in memory; \
         `{}`). Mosquitto runs with `{}`: it acknowledges from memory and writes a snapshot \
         every second, so it can lose acknowledged messages on a crash.\n",
        meta_str(meta, "millet_durability_cmd"),
        meta_str(meta, "mosquitto_persist_conf"),
    );
    let _ = write!(w, "| metric |");
    for (_, title) in DURABILITY_BROKERS {
        let _ = write!(w, " {title} |");
    }
    let _ = writeln!(w, " better |\n|---|---:|---:|---:|---:|---|");
    let brokers: Vec<&str> = DURABILITY_BROKERS.iter().map(|(b, _)| *b).collect();
    metric_rows(w, results, pass, case, &brokers, DURABILITY_METRICS);
    let nruns = brokers
        .iter()
        .map(|b| runs_of(results, pass, case, b))
        .max()
        .unwrap_or(0);
    if nruns > 1 {
        let _ = writeln!(w, "\nMedian of {nruns} runs (fresh broker each run).");
    }
    run_notes(w, results, pass, case, &brokers);
    let acked = |b: &str| metric(results, pass, case, b, "ack_rate");
    let _ = writeln!(w, "\nTargets:\n");
    match acked("millet-sync") {
        Some(v) => {
            let _ = writeln!(
                w,
                "- `sync` ≥ {} acknowledged QoS 1 msg/s: **{}** ({} msg/s).",
                fmt_num(SYNC_TARGET),
                if v >= SYNC_TARGET { "met" } else { "not met" },
                fmt_num(v)
            );
        }
        None => {
            let _ = writeln!(
                w,
                "- `sync` ≥ {} acknowledged QoS 1 msg/s: n/a.",
                fmt_num(SYNC_TARGET)
            );
        }
    }
    match (acked("millet-interval"), acked("millet-none")) {
        (Some(i), Some(n)) if n > 0.0 => {
            let _ = writeln!(
                w,
                "- `interval` within {:.0}% of in-memory: **{}** ({} vs {} msg/s, {:.0}%).",
                (1.0 - INTERVAL_TARGET) * 100.0,
                if i >= INTERVAL_TARGET * n {
                    "met"
                } else {
                    "not met"
                },
                fmt_num(i),
                fmt_num(n),
                i / n * 100.0
            );
        }
        _ => {
            let _ = writeln!(w, "- `interval` within 30% of in-memory: n/a.");
        }
    }
    let _ = writeln!(w);
}

/// The cluster pass (`bench/cluster.sh`): Millet's cluster mode on a
/// three-server NATS cluster, with 1, 2 and 3 nodes, next to the embedded
/// engine and Mosquitto, all on this one machine.
fn cluster_section(w: &mut String, results: &Results, dir: &Path) {
    let pass = CLUSTER_PASS;
    if !results.keys().any(|(p, _, _)| p == pass) {
        return;
    }
    let _ = writeln!(w, "## Cluster mode (`bench/cluster.sh`)\n");
    let _ = writeln!(
        w,
        "Millet nodes joined through a three-server NATS cluster (JetStream, R3), \
         every process on this 2-core machine: the figures show what crossing nodes \
         costs (a NATS hop, and for QoS 1 the JetStream store before the PUBACK), \
         not how a cluster scales. With 2 nodes the publishers are on node 1 and the \
         subscribers on node 2; with 3 nodes publisher i is on node i and subscriber i \
         on node i+1. Connections are made to node 1.\n"
    );
    if results.keys().any(|(p, c, _)| p == pass && c == "resume") {
        let _ = writeln!(
            w,
            "Resume (`millet-bench resume`): a subscriber with a persistent session \
             (QoS 1 on `bench/resume/#`) goes offline, 10,000 QoS 1 messages of 64 B are \
             published and acknowledged, then it reconnects with the same client id; timed \
             from just before its TCP connect to the CONNACK (session present) and to the \
             last queued message, each acknowledged as it arrives. In a cluster the session \
             is made on node 1, the messages published on node 2 and the session resumed \
             on the last node (1 node: all on node 1, 2 nodes: resumed on node 2).\n"
        );
    }
    if let Ok(p) = std::fs::read_to_string(dir.join("cluster-params.txt")) {
        let _ = writeln!(w, "Commands of this run:\n\n```\n{}\n```\n", p.trim_end());
    }
    let _ = write!(w, "| metric |");
    for (_, title) in CLUSTER_BROKERS {
        let _ = write!(w, " {title} |");
    }
    let _ = writeln!(w, " better |\n|---|---:|---:|---:|---:|---:|---|");
    let brokers: Vec<&str> = CLUSTER_BROKERS.iter().map(|(b, _)| *b).collect();
    for (case, metrics) in CLUSTER_CASES {
        // A case added after a results dir was made (`resume`): no rows.
        if !results.keys().any(|(p, c, _)| p == pass && c == case) {
            continue;
        }
        metric_rows(w, results, pass, case, &brokers, metrics);
    }
    for (case, _) in CLUSTER_CASES {
        run_notes(w, results, pass, case, &brokers);
    }
    let _ = writeln!(w);
    notes_file(w, dir, "cluster-notes.md");
}

/// The fleet pass (`bench/fleet.sh`): Millet against Mosquitto with and
/// without persistence, with Millet/Mosquitto ratios.
fn fleet_section(w: &mut String, results: &Results, dir: &Path) {
    let (pass, case) = (FLEET_PASS, FLEET_CASE);
    if !results.keys().any(|(p, c, _)| p == pass && c == case) {
        return;
    }
    let _ = writeln!(w, "## Device fleet (`bench/fleet.sh`)\n");
    let _ = writeln!(
        w,
        "millet-bench `fleet`: N devices, each with a persistent session (MQTT 3.1.1, \
         `clean_session=false`), subscribed to `devices/{{i}}/cmd` at QoS 1 and publishing one \
         QoS 1 message (64 B) to `devices/{{i}}/telemetry` every 10 s, spread evenly over the \
         period; one backend client subscribed to `devices/+/telemetry` (QoS 1) sends a QoS 1 \
         command to 1% of the devices each second. Devices connect at 2,000/s, then a warm-up, \
         then the measured window: broker CPU from `/proc/PID/stat` (user + system) over the \
         window, VmRSS at its end, latencies of messages sent inside it. Broker pinned to \
         CPU 0 and millet-bench to CPU 1 unless stated otherwise below.\n"
    );
    if let Ok(p) = std::fs::read_to_string(dir.join("fleet-params.txt")) {
        let _ = writeln!(w, "Parameters of this run:\n\n```\n{}\n```\n", p.trim_end());
    }
    // Millet with another durability, when the run has it.
    let columns: Vec<(&str, &str)> = FLEET_BROKERS
        .iter()
        .copied()
        .chain(FLEET_EXTRA.iter().copied().filter(|(b, _)| {
            results.contains_key(&(pass.to_string(), case.to_string(), b.to_string()))
        }))
        .collect();
    let _ = write!(w, "| metric |");
    for (_, title) in &columns {
        let _ = write!(w, " {title} |");
    }
    let _ = writeln!(
        w,
        " Millet / Mosquitto persist | Millet / Mosquitto memory | better |\n|---|{}---:|---:|---|",
        "---:|".repeat(columns.len())
    );
    for mt in FLEET_METRICS {
        let _ = write!(w, "| {} ({}) |", mt.name, mt.unit);
        for (b, _) in &columns {
            let _ = write!(w, " {} |", cell(results, pass, case, b, mt.path));
        }
        let mil = metric(results, pass, case, "millet", mt.path);
        for other in ["mosquitto-persist", "mosquitto"] {
            let r = match (mil, metric(results, pass, case, other, mt.path)) {
                _ if mt.better == Info => String::new(),
                (Some(a), Some(b)) if b != 0.0 => format!("{:.2}", a / b),
                (Some(0.0), Some(_)) => "=".into(),
                _ => "n/a".into(),
            };
            let _ = write!(w, " {r} |");
        }
        let better = match mt.better {
            Higher => "higher",
            Lower => "lower",
            Info => "(context)",
        };
        let _ = writeln!(w, " {better} |");
    }
    let brokers: Vec<&str> = columns.iter().map(|(b, _)| *b).collect();
    let nruns = brokers
        .iter()
        .map(|b| runs_of(results, pass, case, b))
        .max()
        .unwrap_or(0);
    if nruns > 1 {
        let _ = writeln!(w, "\nMedian of {nruns} runs (fresh broker each run).");
    }
    run_notes(w, results, pass, case, &brokers);
    let _ = writeln!(w);
    notes_file(w, dir, "fleet-notes.md");
}

/// One table row per metric of `case`: its value for each broker, and
/// which way is better.
fn metric_rows(
    w: &mut String,
    results: &Results,
    pass: &str,
    case: &str,
    brokers: &[&str],
    metrics: &[Metric],
) {
    for mt in metrics {
        let _ = write!(w, "| {} ({}) |", mt.name, mt.unit);
        for b in brokers {
            let _ = write!(w, " {} |", cell(results, pass, case, b, mt.path));
        }
        let better = if mt.better == Higher {
            "higher"
        } else {
            "lower"
        };
        let _ = writeln!(w, " {better} |");
    }
}

/// The hand-written reading of a pass's results (`bench/results/NAME`),
/// kept with them so that a new report carries it.
fn notes_file(w: &mut String, dir: &Path, name: &str) {
    if let Ok(t) = std::fs::read_to_string(dir.join(name)) {
        let _ = writeln!(w, "{}\n", t.trim_end());
    }
}

/// Panels of the chart: (title, case, metric path).
const PANELS: &[(&str, &str, &str)] = &[
    ("QoS0 fan-in: received msg/s", "qos0-fanin", "recv_rate"),
    ("QoS1 1 pub: acked msg/s", "qos1-single", "ack_rate"),
    (
        "QoS1 fan-in overload: acked msg/s",
        "qos1-overload",
        "ack_rate",
    ),
    ("QoS0 fan-out: deliveries/s", "qos0-fanout", "recv_rate"),
    (
        "1k msg/s QoS0: p50 latency (µs)",
        "lat-qos0-1k",
        "latency.p50_us",
    ),
    (
        "1k msg/s QoS0: p99 latency (µs)",
        "lat-qos0-1k",
        "latency.p99_us",
    ),
    (
        "1k msg/s QoS1: p99 latency (µs)",
        "lat-qos1-1k",
        "latency.p99_us",
    ),
    (
        "idle conns: broker KiB/conn",
        "conn-10k",
        "broker_rss_kib_per_conn",
    ),
];

static CHART_BROKERS: [&str; 2] = ["Mosquitto", "Millet"];

fn chart(results: &Results, out: &Path) -> Result<()> {
    register_font();
    if let Some(dir) = out.parent() {
        if !dir.as_os_str().is_empty() {
            std::fs::create_dir_all(dir)?;
        }
    }
    let root = BitMapBackend::new(out, (1600, 860)).into_drawing_area();
    let err = |e: &dyn std::fmt::Display| anyhow::anyhow!("chart: {e}");
    root.fill(&WHITE).map_err(|e| err(&e))?;
    let root = root
        .titled(
            "Millet vs Mosquitto (unpinned pass; higher is better for msg/s, lower for latency and memory)",
            ("sans-serif", 22),
        )
        .map_err(|e| err(&e))?;
    let panels = root.split_evenly((2, 4));
    let names: &'static [&str; 2] = &CHART_BROKERS;
    let colors = [RGBColor(90, 110, 200), RGBColor(230, 140, 40)];
    for (area, (title, case, path)) in panels.iter().zip(PANELS) {
        let vals = [
            metric(results, "default", case, "mosquitto", path),
            metric(results, "default", case, "millet", path),
        ];
        let max = vals.iter().flatten().copied().fold(0.0f64, f64::max);
        let top = if max > 0.0 { max * 1.2 } else { 1.0 };
        let mut ch = ChartBuilder::on(area)
            .caption(*title, ("sans-serif", 17))
            .margin(10)
            .x_label_area_size(28)
            .y_label_area_size(62)
            .build_cartesian_2d(names[..].into_segmented(), 0f64..top)
            .map_err(|e| err(&e))?;
        ch.configure_mesh()
            .disable_x_mesh()
            .x_label_formatter(&|v| match v {
                SegmentValue::Exact(s) | SegmentValue::CenterOf(s) => s.to_string(),
                SegmentValue::Last => String::new(),
            })
            .y_labels(6)
            .y_label_formatter(&|v| short(*v))
            .label_style(("sans-serif", 13))
            .draw()
            .map_err(|e| err(&e))?;
        for (i, name) in names.iter().enumerate() {
            let color = colors[i];
            match vals[i] {
                Some(v) => {
                    let mut bar = Rectangle::new(
                        [
                            (SegmentValue::Exact(name), 0.0),
                            (
                                if i + 1 < names.len() {
                                    SegmentValue::Exact(&names[i + 1])
                                } else {
                                    SegmentValue::Last
                                },
                                v,
                            ),
                        ],
                        color.filled(),
                    );
                    bar.set_margin(0, 0, 25, 25);
                    ch.draw_series(std::iter::once(bar)).map_err(|e| err(&e))?;
                    ch.draw_series(std::iter::once(Text::new(
                        short(v),
                        (SegmentValue::CenterOf(name), v + top * 0.03),
                        ("sans-serif", 14).into_font().color(&BLACK),
                    )))
                    .map_err(|e| err(&e))?;
                }
                None => {
                    ch.draw_series(std::iter::once(Text::new(
                        "n/a".to_string(),
                        (SegmentValue::CenterOf(name), top * 0.05),
                        ("sans-serif", 16).into_font().color(&RED),
                    )))
                    .map_err(|e| err(&e))?;
                }
            }
        }
    }
    root.present().map_err(|e| err(&e))?;
    Ok(())
}

/// Drop the per-run `--json-out FILE` and show the broker pid as `$PID`.
fn tidy_command(c: &str) -> String {
    let mut out: Vec<&str> = Vec::new();
    let mut it = c.split_whitespace();
    while let Some(w) = it.next() {
        match w {
            "--json-out" => {
                it.next();
            }
            "--tls" => {
                it.next();
                out.push("--tls");
                out.push("ca.pem");
            }
            "--broker-pid" => {
                it.next();
                out.push("--broker-pid");
                out.push("$PID");
            }
            _ => out.push(w),
        }
    }
    out.join(" ")
}

fn short(v: f64) -> String {
    let a = v.abs();
    if a >= 1e6 {
        format!("{:.2}M", v / 1e6)
    } else if a >= 1e4 {
        format!("{:.0}k", v / 1e3)
    } else if a >= 1e3 {
        format!("{:.1}k", v / 1e3)
    } else if a >= 10.0 {
        format!("{v:.0}")
    } else {
        format!("{v:.2}")
    }
}

fn register_font() {
    // Bundled font: no fontconfig / system fonts needed.
    let _ = plotters::style::register_font(
        "sans-serif",
        plotters::style::FontStyle::Normal,
        dejavu::sans::regular(),
    );
}
