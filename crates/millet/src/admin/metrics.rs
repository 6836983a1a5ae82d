//! `GET /metrics`: the Prometheus text exposition format (0.0.4), rendered
//! by hand at scrape time from the counters the broker already keeps for
//! `$SYS` ([`crate::broker::Stats`], [`crate::broker::Overload`]), so both
//! always agree.
//!
//! Why not the `metrics` / `prometheus` crates: their counters are a
//! registry lookup or an extra atomic on the path that counts, and Millet
//! already counts everything it exposes once per batch of packets (not
//! per packet: a shared atomic per packet cost about 7% of QoS 0 fan-in,
//! see `protocol.rs`). Rendering those at scrape time costs the hot path
//! nothing. The by-QoS split is counted per connection like the `$SYS`
//! packet counts and added once per batch to per-thread shards
//! ([`crate::broker::QosCounters`]: no contended cache line). The only new
//! observations are a store-round latency histogram (once per group
//! commit, not per message) and the queue depths, read from every session
//! at scrape time. No label carries a client id.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};

use crate::broker::admin::QUEUE_DEPTH_BOUNDS;
use crate::broker::{Broker, Direction};
use crate::histogram::Snapshot;

struct Out(String);

impl Out {
    fn head(&mut self, name: &str, kind: &str, help: &str) {
        let _ = writeln!(self.0, "# HELP {name} {help}");
        let _ = writeln!(self.0, "# TYPE {name} {kind}");
    }

    fn one(&mut self, name: &str, kind: &str, help: &str, v: u64) {
        self.head(name, kind, help);
        let _ = writeln!(self.0, "{name} {v}");
    }

    fn labelled(&mut self, name: &str, kind: &str, help: &str, label: &str, vs: &[(&str, u64)]) {
        self.head(name, kind, help);
        for (l, v) in vs {
            let _ = writeln!(self.0, "{name}{{{label}=\"{l}\"}} {v}");
        }
    }

    fn histogram(&mut self, name: &str, help: &str, s: &Snapshot) {
        self.head(name, "histogram", help);
        for (b, c) in s.bounds.iter().zip(&s.cumulative) {
            let _ = writeln!(self.0, "{name}_bucket{{le=\"{b}\"}} {c}");
        }
        let _ = writeln!(self.0, "{name}_bucket{{le=\"+Inf\"}} {}", s.count);
        let _ = writeln!(self.0, "{name}_sum {}", s.sum_secs);
        let _ = writeln!(self.0, "{name}_count {}", s.count);
    }
}

fn g(a: &AtomicU64) -> u64 {
    a.load(Ordering::Relaxed)
}

fn by_qos(a: [u64; 3]) -> [(&'static str, u64); 3] {
    [("0", a[0]), ("1", a[1]), ("2", a[2])]
}

/// The whole exposition.
pub fn render(broker: &Broker, now: std::time::Instant) -> String {
    let s = &broker.node.stats;
    let o = &broker.node.overload;
    let mut m = Out(String::with_capacity(8192));
    let connected = g(&s.clients_connected);
    let (received, received_bytes) = s.by_qos.totals(Direction::Received);
    let (sent, sent_bytes) = s.by_qos.totals(Direction::Sent);
    let sessions = broker.session_count() as u64;
    m.one(
        "millet_uptime_seconds",
        "gauge",
        "Seconds since the broker started.",
        broker.uptime(now).as_secs(),
    );
    m.one(
        "millet_connections",
        "gauge",
        "Clients connected now ($SYS clients/connected).",
        connected,
    );
    m.one(
        "millet_connections_parked",
        "gauge",
        "Connections parked (quiet, without a task) right now ($SYS clients/parked).",
        g(&s.clients_parked),
    );
    m.one(
        "millet_sessions",
        "gauge",
        "Sessions, connected or not ($SYS clients/total).",
        sessions,
    );
    m.one(
        "millet_sessions_maximum",
        "gauge",
        "The most sessions there have been at once ($SYS clients/maximum).",
        g(&s.clients_maximum).max(sessions),
    );
    m.one(
        "millet_sessions_expired_total",
        "counter",
        "Disconnected sessions removed at the end of their expiry interval.",
        g(&s.clients_expired),
    );
    m.one(
        "millet_subscriptions",
        "gauge",
        "Subscriptions of all sessions ($SYS subscriptions/count).",
        g(&s.subscriptions),
    );
    m.one(
        "millet_retained_messages",
        "gauge",
        "Retained messages, $SYS topics not counted.",
        broker.retained_count_without_sys() as u64,
    );
    m.one(
        "millet_retained_bytes",
        "gauge",
        "Bytes (topic + payload) of retained messages.",
        broker.retained_bytes(),
    );
    m.one(
        "millet_packets_received_total",
        "counter",
        "MQTT packets of any type received ($SYS messages/received).",
        g(&s.messages_received),
    );
    m.one(
        "millet_packets_sent_total",
        "counter",
        "MQTT packets of any type sent ($SYS messages/sent).",
        g(&s.messages_sent),
    );
    m.labelled(
        "millet_messages_received_total",
        "counter",
        "PUBLISH packets received from clients, by QoS.",
        "qos",
        &by_qos(received),
    );
    m.labelled(
        "millet_messages_sent_total",
        "counter",
        "PUBLISH packets sent to clients, by QoS.",
        "qos",
        &by_qos(sent),
    );
    m.labelled(
        "millet_payload_bytes_received_total",
        "counter",
        "Payload bytes of PUBLISH packets received, by QoS.",
        "qos",
        &by_qos(received_bytes),
    );
    m.labelled(
        "millet_payload_bytes_sent_total",
        "counter",
        "Payload bytes of PUBLISH packets sent, by QoS.",
        "qos",
        &by_qos(sent_bytes),
    );
    m.one(
        "millet_bytes_received_total",
        "counter",
        "Bytes on the wire from clients, every packet ($SYS bytes/received).",
        g(&s.bytes_received),
    );
    m.one(
        "millet_bytes_sent_total",
        "counter",
        "Bytes on the wire to clients, every packet ($SYS bytes/sent).",
        g(&s.bytes_sent),
    );
    let dropped = g(&s.messages_dropped);
    let memory = g(&o.qos0_dropped_memory);
    let too_large = g(&s.dropped_too_large);
    m.labelled(
        "millet_messages_dropped_total",
        "counter",
        "Messages not delivered, by reason; the sum is $SYS messages/dropped.",
        "reason",
        &[
            (
                "queue_full",
                dropped.saturating_sub(memory).saturating_sub(too_large),
            ),
            ("memory", memory),
            ("too_large", too_large),
        ],
    );
    m.labelled(
        "millet_refused_total",
        "counter",
        "What the limits refused ($SYS overload/...).",
        "what",
        &[
            ("session_max_sessions", g(&o.sessions_refused_max)),
            ("session_memory", g(&o.sessions_refused_memory)),
            ("publish_memory", g(&o.publish_refused_memory)),
            ("retained", g(&o.retained_refused)),
        ],
    );
    m.labelled(
        "millet_auth_failures_total",
        "counter",
        "CONNECTs refused by authentication, bans, per-user limits and the AUTH exchange, by reason; the sum is $SYS clients/auth_failed.",
        "reason",
        &s.auth_failures.by_reason(),
    );
    m.histogram(
        "millet_deliver_latency_seconds",
        &format!("Publish-to-deliver latency: from reading a PUBLISH to encoding a live delivery of it for a subscriber. Sampled: one PUBLISH in {} per worker thread is timed, every live delivery of it observed (retained and offline-queued copies are not).", crate::broker::LATENCY_SAMPLE_EVERY),
        &s.deliver_latency.snapshot(),
    );
    let q = broker.queue_depths();
    m.one(
        "millet_queued_messages",
        "gauge",
        "Messages waiting in session queues, all sessions.",
        q.queued,
    );
    m.one(
        "millet_inflight_messages",
        "gauge",
        "Outgoing QoS 1/2 messages awaiting acknowledgement, all sessions.",
        q.inflight,
    );
    m.one(
        "millet_queue_depth_max",
        "gauge",
        "The longest session queue, messages.",
        q.max_queued,
    );
    m.head(
        "millet_session_queue_depth",
        "histogram",
        "Sessions by the number of messages in their queue (at scrape time).",
    );
    for (b, c) in QUEUE_DEPTH_BOUNDS.iter().zip(&q.cumulative) {
        let _ = writeln!(m.0, "millet_session_queue_depth_bucket{{le=\"{b}\"}} {c}");
    }
    let _ = writeln!(
        m.0,
        "millet_session_queue_depth_bucket{{le=\"+Inf\"}} {}",
        q.sessions
    );
    let _ = writeln!(m.0, "millet_session_queue_depth_sum {}", q.queued);
    let _ = writeln!(m.0, "millet_session_queue_depth_count {}", q.sessions);
    m.one(
        "millet_memory_used_bytes",
        "gauge",
        "Bytes of queued, in-flight and retained messages ($SYS memory/used).",
        broker.node.memory_used(),
    );
    m.one(
        "millet_memory_budget_bytes",
        "gauge",
        "limits.memory_budget (0: no limit).",
        broker.node.config.limits.memory_budget,
    );
    if let Some(rss) = crate::broker::rss_bytes() {
        m.one(
            "millet_process_resident_memory_bytes",
            "gauge",
            "Resident set size of the process.",
            rss,
        );
    }
    if let Some(p) = broker.persistence() {
        let st = p.store();
        let stats = st.stats();
        m.one(
            "millet_store_commits_total",
            "counter",
            "Group commits (log appends) of the store.",
            stats.commits,
        );
        m.one(
            "millet_store_fsyncs_total",
            "counter",
            "fsyncs of the store's log.",
            stats.fsyncs,
        );
        m.one(
            "millet_store_failed_writes_total",
            "counter",
            "Store submits that failed (disk full, I/O errors).",
            stats.failed_submits,
        );
        m.one(
            "millet_store_pending_writes",
            "gauge",
            "Submits waiting for the store's writer.",
            st.pending() as u64,
        );
        m.histogram(
            "millet_store_write_seconds",
            "Store log rounds: append, plus fsync under durability sync (one per group commit).",
            &st.log_write_latency(),
        );
    }
    m.0
}
