//! `$SYS` topics, published as retained messages every `sys_interval` seconds,
//! under Mosquitto's names and with Mosquitto's meanings (`man mosquitto`,
//! "BROKER STATUS"), plus `memory/rss` and `store/bytes`:
//!
//! | topic (`$SYS/broker/...`) | value |
//! | --- | --- |
//! | `version`, `uptime` | `millet X.Y.Z`, `N seconds` |
//! | `clients/connected` | connected clients |
//! | `clients/disconnected` | persistent sessions whose client is offline |
//! | `clients/total` | sessions: connected + disconnected |
//! | `clients/maximum` | the most sessions there have been at once |
//! | `clients/expired` | disconnected sessions removed at expiry |
//! | `clients/parked` | connected clients parked: quiet, holding no task (Millet's own) |
//! | `messages/received`, `messages/sent` | MQTT packets of any type |
//! | `publish/messages/received`, `publish/messages/sent` | PUBLISH packets |
//! | `publish/messages/dropped`, `messages/dropped` | messages not delivered (queue full, too big) |
//! | `bytes/received`, `bytes/sent` | wire bytes, every packet with its header |
//! | `subscriptions/count` | subscriptions of all sessions |
//! | `retained messages/count` | retained messages, `$SYS` topics not included |
//! | `memory/rss` | resident set size of the process, bytes (Linux) |
//! | `memory/used`, `memory/budget` | bytes held in queues, in-flight windows and retained messages, against `limits.memory_budget` |
//! | `overload/sessions/refused`, `overload/qos0/dropped`, `overload/publish/refused`, `overload/retained/refused` | what `max_sessions`, `memory_budget` and the retained caps refused |
//! | `store/bytes` | size of the files in `DATA_DIR/store`, bytes |
//! | `load/{messages,publish,bytes}/{received,sent}/{1min,5min,15min}`, `load/publish/dropped/...` | per-minute rates, exponentially damped over 1, 5 and 15 minutes |

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use millet_codec::{PublishProperties, QoS};

use super::Broker;
use crate::session::Message;

/// The counters with load averages: topic part under `load/`, counter.
const LOADS: [&str; 7] = [
    "messages/received",
    "messages/sent",
    "publish/received",
    "publish/sent",
    "publish/dropped",
    "bytes/received",
    "bytes/sent",
];

fn load_counters(broker: &Broker) -> [u64; LOADS.len()] {
    let s = &broker.node.stats;
    let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
    [
        get(&s.messages_received),
        get(&s.messages_sent),
        get(&s.publish_received),
        get(&s.publish_sent),
        get(&s.messages_dropped),
        get(&s.bytes_received),
        get(&s.bytes_sent),
    ]
}

/// Averaging windows of the load topics, in seconds.
const WINDOWS: [(&str, f64); 3] = [("1min", 60.0), ("5min", 300.0), ("15min", 900.0)];

/// Load averages as Mosquitto computes them: at each update, the rate over
/// the time since the previous one, per minute, is folded into each average
/// with weight `1 - exp(-dt / window)`. They start at 0.
#[derive(Debug, Clone)]
pub(super) struct LoadAverages<const N: usize> {
    last: Option<(Instant, [u64; N])>,
    /// `avg[counter][window]`, per minute.
    avg: [[f64; 3]; N],
}

impl<const N: usize> Default for LoadAverages<N> {
    fn default() -> Self {
        LoadAverages {
            last: None,
            avg: [[0.0; 3]; N],
        }
    }
}

impl<const N: usize> LoadAverages<N> {
    /// Fold in the counters' values at `now`.
    pub(super) fn update(&mut self, now: Instant, counters: [u64; N]) {
        if let Some((then, before)) = self.last {
            let dt = now.saturating_duration_since(then).as_secs_f64();
            if dt <= 0.0 {
                return;
            }
            for ((avg, now_count), before) in self.avg.iter_mut().zip(counters).zip(before) {
                let rate = now_count.saturating_sub(before) as f64 * 60.0 / dt;
                for (a, (_, window)) in avg.iter_mut().zip(WINDOWS) {
                    *a = rate + (-dt / window).exp() * (*a - rate);
                }
            }
        }
        self.last = Some((now, counters));
    }

    /// Counter `i`'s average over window `w` (index into [`WINDOWS`]).
    pub(super) fn get(&self, i: usize, w: usize) -> f64 {
        self.avg
            .get(i)
            .and_then(|a| a.get(w))
            .copied()
            .unwrap_or(0.0)
    }
}

/// What the `$SYS` publisher keeps between ticks.
#[derive(Debug, Default)]
pub(super) struct SysState {
    last: Option<Instant>,
    load: LoadAverages<{ LOADS.len() }>,
}

/// Publish the `$SYS` tree if `sys_interval` has passed since the last time.
pub(super) fn tick(broker: &Broker, now: Instant) {
    let interval = broker.node.config.sys_interval;
    if interval == 0 {
        return;
    }
    let load = {
        let mut st = broker.sys.lock();
        if st
            .last
            .is_some_and(|t| now.saturating_duration_since(t) < Duration::from_secs(interval))
        {
            return;
        }
        st.last = Some(now);
        st.load.update(now, load_counters(broker));
        st.load.clone()
    };
    publish_sys(broker, &load, now);
}

/// Resident set size of this process in bytes (Linux `/proc`).
pub(crate) fn rss_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kb: u64 = line
        .trim_start_matches("VmRSS:")
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()?;
    Some(kb * 1024)
}

/// Total size of the files in the store's directory (0 without a store).
fn store_bytes(broker: &Broker) -> u64 {
    if broker.persistence().is_none() {
        return 0;
    }
    let Ok(dir) = std::fs::read_dir(broker.node.config.data_dir.join("store")) else {
        return 0;
    };
    dir.filter_map(|e| e.ok()?.metadata().ok())
        .filter(|m| m.is_file())
        .map(|m| m.len())
        .sum()
}

fn publish_sys(broker: &Broker, load: &LoadAverages<{ LOADS.len() }>, now: Instant) {
    let s = &broker.node.stats;
    let o = &broker.node.overload;
    let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
    let connected = get(&s.clients_connected);
    let total = broker.session_count() as u64;
    let dropped = get(&s.messages_dropped);
    let mut items: Vec<(String, String)> = [
        ("version", format!("millet {}", env!("CARGO_PKG_VERSION"))),
        (
            "uptime",
            format!("{} seconds", broker.uptime(now).as_secs()),
        ),
        ("clients/connected", connected.to_string()),
        (
            "clients/disconnected",
            total.saturating_sub(connected).to_string(),
        ),
        ("clients/total", total.to_string()),
        (
            "clients/maximum",
            get(&s.clients_maximum).max(total).to_string(),
        ),
        ("clients/expired", get(&s.clients_expired).to_string()),
        ("clients/parked", get(&s.clients_parked).to_string()),
        ("clients/auth_failed", s.auth_failures.total().to_string()),
        ("messages/received", get(&s.messages_received).to_string()),
        ("messages/sent", get(&s.messages_sent).to_string()),
        ("messages/dropped", dropped.to_string()),
        (
            "publish/messages/received",
            get(&s.publish_received).to_string(),
        ),
        ("publish/messages/sent", get(&s.publish_sent).to_string()),
        ("publish/messages/dropped", dropped.to_string()),
        ("bytes/received", get(&s.bytes_received).to_string()),
        ("bytes/sent", get(&s.bytes_sent).to_string()),
        ("subscriptions/count", get(&s.subscriptions).to_string()),
        (
            "retained messages/count",
            broker.retained_count_without_sys().to_string(),
        ),
        ("store/bytes", store_bytes(broker).to_string()),
        ("memory/used", broker.node.memory_used().to_string()),
        (
            "memory/budget",
            broker.node.config.limits.memory_budget.to_string(),
        ),
        (
            "overload/sessions/refused",
            (get(&o.sessions_refused_memory) + get(&o.sessions_refused_max)).to_string(),
        ),
        (
            "overload/qos0/dropped",
            get(&o.qos0_dropped_memory).to_string(),
        ),
        (
            "overload/publish/refused",
            get(&o.publish_refused_memory).to_string(),
        ),
        (
            "overload/retained/refused",
            get(&o.retained_refused).to_string(),
        ),
    ]
    .into_iter()
    .map(|(t, v)| (format!("$SYS/broker/{t}"), v))
    .collect();
    if let Some(rss) = rss_bytes() {
        items.push(("$SYS/broker/memory/rss".into(), rss.to_string()));
    }
    for (i, name) in LOADS.iter().enumerate() {
        for (w, (window, _)) in WINDOWS.iter().enumerate() {
            items.push((
                format!("$SYS/broker/load/{name}/{window}"),
                format!("{:.2}", load.get(i, w)),
            ));
        }
    }
    for (topic, value) in items {
        let msg = Message {
            topic: topic.into(),
            payload: Bytes::from(value),
            qos: QoS::AtMostOnce,
            retain: true,
            properties: PublishProperties::default(),
            expires_at: None,
            publisher: None,
            publisher_client_id: "$SYS".into(),
            engine_id: Default::default(),
            routed_at: None,
        };
        broker.publish(Arc::new(msg), None, now);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn close(a: f64, b: f64) -> bool {
        (a - b).abs() < 1e-9 * b.abs().max(1.0)
    }

    #[test]
    fn load_averages_follow_mosquitto() {
        let t0 = Instant::now();
        let mut l = LoadAverages::<2>::default();
        l.update(t0, [0, 100]);
        assert_eq!(l.get(0, 0), 0.0, "start at 0");
        assert_eq!(l.get(1, 2), 0.0, "the first sample is only a baseline");
        // 10 s later: counter 0 grew by 50 (300 per minute), counter 1 not.
        let t1 = t0 + Duration::from_secs(10);
        l.update(t1, [50, 100]);
        for (w, window) in [60.0, 300.0, 900.0].into_iter().enumerate() {
            let expected = 300.0 * (1.0 - (-10.0f64 / window).exp());
            assert!(close(l.get(0, w), expected), "{w}: {}", l.get(0, w));
            assert_eq!(l.get(1, w), 0.0);
        }
        // the 1-minute average reacts fastest
        assert!(l.get(0, 0) > l.get(0, 1) && l.get(0, 1) > l.get(0, 2));
        // no time passed: nothing changes (no division by zero)
        let before = l.get(0, 0);
        l.update(t1, [1000, 100]);
        assert_eq!(l.get(0, 0), before);
        // a steady rate: every average converges to it (here 120 per minute)
        let mut t = t1;
        let mut n = 50;
        for _ in 0..2000 {
            t += Duration::from_secs(10);
            n += 20;
            l.update(t, [n, 100]);
        }
        for w in 0..3 {
            assert!((l.get(0, w) - 120.0).abs() < 0.01, "{w}: {}", l.get(0, w));
        }
        // then silence: each average decays by exp(-dt / window), the
        // 1-minute one fastest
        let steady: Vec<f64> = (0..3).map(|w| l.get(0, w)).collect();
        t += Duration::from_secs(60);
        l.update(t, [n, 100]);
        for (w, window) in [60.0, 300.0, 900.0].into_iter().enumerate() {
            assert!(close(l.get(0, w), steady[w] * (-60.0f64 / window).exp()));
        }
        assert!(l.get(0, 0) < l.get(0, 1) && l.get(0, 1) < l.get(0, 2));
        // a counter that went backwards (cannot happen) counts as 0
        t += Duration::from_secs(60);
        l.update(t, [0, 0]);
        assert!(l.get(0, 0) >= 0.0 && l.get(1, 0) == 0.0);
    }

    #[test]
    fn rss_is_read() {
        if cfg!(target_os = "linux") {
            assert!(rss_bytes().is_some_and(|b| b > 0));
        }
    }
}
