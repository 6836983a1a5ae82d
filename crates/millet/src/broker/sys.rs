//! `$SYS` topics, published as retained messages every `sys_interval` seconds
//! (like Mosquitto's `$SYS/broker/...` tree).

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use millet_codec::{PublishProperties, QoS};

use super::Broker;
use crate::session::Message;

pub(super) fn publish_sys(broker: &Broker, now: Instant) {
    let s = &broker.stats;
    let load = |a: &std::sync::atomic::AtomicU64| a.load(Ordering::Relaxed).to_string();
    let items: [(&str, String); 11] = [
        (
            "$SYS/broker/version",
            format!("millet {}", env!("CARGO_PKG_VERSION")),
        ),
        (
            "$SYS/broker/uptime",
            format!("{} seconds", broker.uptime(now).as_secs()),
        ),
        ("$SYS/broker/clients/connected", load(&s.clients_connected)),
        ("$SYS/broker/clients/total", load(&s.clients_total)),
        ("$SYS/broker/messages/received", load(&s.messages_received)),
        ("$SYS/broker/messages/sent", load(&s.messages_sent)),
        ("$SYS/broker/messages/dropped", load(&s.messages_dropped)),
        ("$SYS/broker/bytes/received", load(&s.bytes_received)),
        ("$SYS/broker/bytes/sent", load(&s.bytes_sent)),
        ("$SYS/broker/subscriptions/count", load(&s.subscriptions)),
        (
            "$SYS/broker/retained messages/count",
            broker.retained_count().to_string(),
        ),
    ];
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
            store_id: Default::default(),
        };
        broker.publish(Arc::new(msg), None, now);
    }
}
