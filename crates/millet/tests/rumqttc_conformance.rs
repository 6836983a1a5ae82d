//! Black-box conformance tests: a real `millet` process per test, driven by
//! `rumqttc` (an independent client) over loopback TCP, for MQTT 3.1.1 (the
//! `rumqttc` v4 API) and MQTT 5.0 (`rumqttc::v5`). Each test names the
//! normative statement(s) it checks.
//!
//! Every wait is bounded (`common::WAIT`); the only fixed windows are the
//! short ones (`common::QUIET`) that assert that nothing arrives.

mod common;

use std::time::Duration;

use tokio::time::timeout;

use common::v5;
use common::{assert_quiet, Broker, MqttClient, Opts, V4, V5};

/// Generates `#[tokio::test]` wrappers running a generic test body against the
/// v4 (3.1.1) and v5 client APIs.
macro_rules! both_versions {
    ($body:ident, $v4:ident, $v5:ident) => {
        #[tokio::test]
        async fn $v4() {
            $body::<V4>().await
        }
        #[tokio::test]
        async fn $v5() {
            $body::<V5>().await
        }
    };
}

// ------------------------------------------------------------ QoS round trip

/// Every (subscription QoS, publish QoS) pair: the payload (binary, with NUL
/// and 0xFF bytes) and topic arrive intact, and the delivered QoS is the
/// minimum of the two.
// [MQTT-3.8.4-6] (3.1.1) delivered QoS = min(published QoS, granted QoS)
//                (5.0: 3.8.4 / 4.3, same rule)
// QoS 0/1/2 flows end to end (sections 4.3.1-4.3.3)
async fn qos_round_trip<C: MqttClient>() {
    let b = Broker::start();
    let (mut sub, _) = C::connect(&b, Opts::new("rt-sub")).await;
    let (mut publ, _) = C::connect(&b, Opts::new("rt-pub")).await;
    for sub_qos in 0..=2u8 {
        let filter = format!("rt/sub{sub_qos}");
        let granted = sub.subscribe(&filter, sub_qos).await;
        assert_eq!(granted, sub_qos, "granted QoS for {filter}");
    }
    for sub_qos in 0..=2u8 {
        for pub_qos in 0..=2u8 {
            let topic = format!("rt/sub{sub_qos}");
            let payload: Vec<u8> = [0u8, 0xff, sub_qos, pub_qos, b'x', 0, 0x7f]
                .into_iter()
                .chain((0..=255u8).rev())
                .collect();
            publ.publish(&topic, pub_qos, false, &payload).await;
            let m = sub.recv().await;
            assert_eq!(m.topic, topic);
            assert_eq!(m.payload, payload, "payload for {topic} pub qos {pub_qos}");
            assert_eq!(
                m.qos,
                sub_qos.min(pub_qos),
                "delivered QoS for sub {sub_qos} / pub {pub_qos}"
            );
            assert!(!m.retain, "non-retained publish delivered with retain");
        }
    }
    assert_quiet(&mut sub, "after the QoS matrix").await;
}
both_versions!(qos_round_trip, qos_round_trip_v4, qos_round_trip_v5);

// ------------------------------------------------------------ retained

// 3.1.1 numbering (5.0 in parentheses):
// [MQTT-3.3.1-5] a retained message is stored, the latest one per topic (5.0 same)
// [MQTT-3.3.1-6] ...and sent when a new subscription is made (5.0 [MQTT-3.3.1-9])
// [MQTT-3.3.1-8] ...with RETAIN = 1
// [MQTT-3.3.1-9] a message sent to an established subscription has RETAIN = 0
//                (5.0 [MQTT-3.3.1-12], Retain As Published = 0)
// [MQTT-3.3.1-12] a RETAIN = 0 publish does not replace the retained message
//                 (5.0 [MQTT-3.3.1-8])
// [MQTT-3.3.1-10] [MQTT-3.3.1-11] a zero-byte retained message is forwarded,
//                 clears the topic and is not stored (5.0 [MQTT-3.3.1-6]/-7)
async fn retained<C: MqttClient>() {
    let b = Broker::start();
    let (mut publ, _) = C::connect(&b, Opts::new("ret-pub")).await;
    publ.publish("ret/t", 1, true, b"v1").await;

    // Stored and delivered to a later subscriber with RETAIN = 1.
    let (mut s1, _) = C::connect(&b, Opts::new("ret-s1")).await;
    s1.subscribe("ret/t", 1).await;
    let m = s1.recv().await;
    assert_eq!(
        (m.topic.as_str(), m.payload.as_slice()),
        ("ret/t", &b"v1"[..])
    );
    assert!(
        m.retain,
        "retained message to a new subscription must have RETAIN=1"
    );

    // Replaced: the live copy to the existing subscriber has RETAIN = 0.
    publ.publish("ret/t", 1, true, b"v2").await;
    let m = s1.recv().await;
    assert_eq!(m.payload, b"v2");
    assert!(
        !m.retain,
        "live delivery to an existing subscription must have RETAIN=0"
    );

    // A non-retained publish is forwarded but replaces nothing.
    publ.publish("ret/t", 1, false, b"not retained").await;
    let m = s1.recv().await;
    assert_eq!(m.text(), "not retained");
    assert!(!m.retain);

    // A later subscriber sees only the replacement.
    let (mut s2, _) = C::connect(&b, Opts::new("ret-s2")).await;
    s2.subscribe("ret/+", 1).await;
    let m = s2.recv().await;
    assert_eq!(m.payload, b"v2", "retained message was not replaced");
    assert!(m.retain);
    assert_quiet(&mut s2, "only one retained message per topic").await;

    // Cleared by a zero-byte retained publish, which still reaches existing
    // subscribers as a normal message.
    publ.publish("ret/t", 1, true, b"").await;
    let m = s1.recv().await;
    assert!(
        m.payload.is_empty(),
        "zero-byte publish not forwarded: {m:?}"
    );

    // A new subscriber gets no retained message: the first thing it sees is a
    // live (non-retained) publish sent after its SUBACK.
    let (mut s3, _) = C::connect(&b, Opts::new("ret-s3")).await;
    s3.subscribe("ret/#", 1).await;
    publ.publish("ret/t", 1, false, b"live").await;
    let m = s3.recv().await;
    assert_eq!(
        m.text(),
        "live",
        "cleared retained message was still delivered: {m:?}"
    );
    assert!(!m.retain);
}
both_versions!(retained, retained_v4, retained_v5);

// ------------------------------------------------------------ will

// [MQTT-3.1.2-8] the Will Message is published when the network connection
//                is closed without DISCONNECT
// [MQTT-3.1.2-10] the Will Message is removed on receipt of DISCONNECT
//                 (v5: [MQTT-3.1.2-10] / 0x00 Normal disconnection)
async fn will<C: MqttClient>() {
    let b = Broker::start();
    let (mut watcher, _) = C::connect(&b, Opts::new("will-watch")).await;
    watcher.subscribe("will/#", 2).await;

    // Clean DISCONNECT: the will must not be published.
    let (clean, _) = C::connect(
        &b,
        Opts::new("will-clean").will("will/clean", b"should not appear", 1, false),
    )
    .await;
    clean.disconnect().await;

    // Socket dropped without DISCONNECT: the will must be published.
    let (dying, _) = C::connect(
        &b,
        Opts::new("will-dying").will("will/dying", b"gone", 1, false),
    )
    .await;
    dying.kill().await;

    // The clean client's will (had it been sent) would precede this one.
    let m = watcher.recv().await;
    assert_eq!(m.topic, "will/dying", "unexpected message {m:?}");
    assert_eq!(m.payload, b"gone");
    assert_eq!(m.qos, 1);
    assert_quiet(&mut watcher, "will after clean DISCONNECT").await;
}
both_versions!(will, will_v4, will_v5);

// ------------------------------------------------------------ persistent session

// [MQTT-3.1.2-4] clean_session=0 resumes the session (5.0: Clean Start = 0
//                with a Session Expiry Interval, 3.1.2.4 / 3.1.2.11.2)
// [MQTT-3.1.2-5] QoS 1/2 messages matching the subscriptions are stored
//                while the client is disconnected
// [MQTT-3.2.2-2] CONNACK session present = 1 when a session is resumed
// [MQTT-3.2.2-3] ...and 0 when there was no session (5.0: [MQTT-3.2.2-3])
async fn persistent_session<C: MqttClient>() {
    let b = Broker::start();
    let opts = Opts::new("ps-client").persistent(300);
    let (mut c, info) = C::connect(&b, opts.clone()).await;
    assert!(!info.session_present, "no session existed yet");
    c.subscribe("ps/t", 1).await;
    c.subscribe("ps/q2", 2).await;
    c.disconnect().await;

    let (mut publ, _) = C::connect(&b, Opts::new("ps-pub")).await;
    publ.publish("ps/t", 1, false, b"offline-1").await;
    publ.publish("ps/q2", 2, false, b"offline-q2").await;
    publ.publish("ps/t", 1, false, b"offline-2").await;

    let (mut c, info) = C::connect(&b, opts).await;
    assert!(info.session_present, "session was not resumed");
    let mut got = Vec::new();
    for _ in 0..3 {
        let m = c.recv().await;
        got.push((m.topic.clone(), m.text(), m.qos));
    }
    // Order is only guaranteed per topic; compare per topic.
    let on = |t: &str| got.iter().filter(|g| g.0 == t).cloned().collect::<Vec<_>>();
    assert_eq!(
        on("ps/t"),
        [
            ("ps/t".to_string(), "offline-1".to_string(), 1),
            ("ps/t".to_string(), "offline-2".to_string(), 1)
        ],
        "queued QoS 1 messages: {got:?}"
    );
    assert_eq!(
        on("ps/q2"),
        [("ps/q2".to_string(), "offline-q2".to_string(), 2)],
        "queued QoS 2 message: {got:?}"
    );
    // The subscription survived too.
    publ.publish("ps/t", 1, false, b"online").await;
    assert_eq!(c.recv().await.text(), "online");
    assert_quiet(&mut c, "after the resumed session's messages").await;
}
both_versions!(
    persistent_session,
    persistent_session_v4,
    persistent_session_v5
);

// [MQTT-3.1.2-6] (3.1.1) a CleanSession=1 session ends with the connection
//                (v5 3.1.2.11.2: clean start with no Session Expiry
//                Interval, the session ends when the connection closes)
// [MQTT-3.2.2-3] (3.1.1 and 5.0): no session, so CONNACK session
//                present = 0; nothing was queued for it
async fn clean_session_not_kept<C: MqttClient>() {
    let b = Broker::start();
    let (mut c, _) = C::connect(&b, Opts::new("cs-client")).await;
    c.subscribe("cs/t", 1).await;
    c.disconnect().await;
    let (mut publ, _) = C::connect(&b, Opts::new("cs-pub")).await;
    publ.publish("cs/t", 1, false, b"nobody home").await;

    let (mut c, info) = C::connect(&b, Opts::new("cs-client").persistent(300)).await;
    assert!(!info.session_present, "a clean session was kept");
    assert_quiet(&mut c, "message queued for an ended clean session").await;
    // And the subscription is gone.
    publ.publish("cs/t", 1, false, b"still nobody").await;
    assert_quiet(&mut c, "subscription of an ended clean session").await;
}
both_versions!(
    clean_session_not_kept,
    clean_session_not_kept_v4,
    clean_session_not_kept_v5
);

/// 5.0 3.1.2.11.2: Clean Start = 0 but no Session Expiry Interval (= 0): the
/// session ends when the network connection closes, so it is not resumed
/// ([MQTT-3.2.2-3]: session present = 0) and nothing was queued.
#[tokio::test]
async fn v5_session_expiry_zero_not_kept() {
    let b = Broker::start();
    let mut opts = Opts::new("se0-client");
    opts.clean = false;
    opts.session_expiry = None;
    let (mut c, _) = V5::connect(&b, opts).await;
    c.subscribe("se0/t", 1).await;
    c.disconnect().await;
    let (mut publ, _) = V5::connect(&b, Opts::new("se0-pub")).await;
    publ.publish("se0/t", 1, false, b"nobody home").await;

    let (mut c, info) = V5::connect(&b, Opts::new("se0-client").persistent(300)).await;
    assert!(!info.session_present, "session with expiry 0 was kept");
    assert_quiet(&mut c, "message queued for an expired session").await;
}

// ------------------------------------------------------------ takeover

/// [MQTT-3.1.4-2] (3.1.1): a CONNECT with a client id that is already
/// connected makes the server disconnect the existing client; the new
/// connection works.
#[tokio::test]
async fn takeover_v4() {
    let b = Broker::start();
    let (mut first, _) = V4::connect(&b, Opts::new("dup-id")).await;
    let (mut second, _) = V4::connect(&b, Opts::new("dup-id")).await;
    first.wait_closed().await;
    // The new connection is fully usable.
    second.subscribe("dup/t", 1).await;
    let (mut publ, _) = V4::connect(&b, Opts::new("dup-pub")).await;
    publ.publish("dup/t", 1, false, b"hello").await;
    assert_eq!(second.recv().await.text(), "hello");
}

/// [MQTT-3.1.4-3] (5.0): as above, and the old connection is told why with
/// DISCONNECT 0x8E (Session taken over).
///
/// rumqttc 0.25.1 cannot decode a v5 DISCONNECT whose Remaining Length is 1
/// (reason code only, Property Length omitted, which MQTT 5.0 3.14.2.2.1
/// allows and Mosquitto also sends): its decoder waits for a property length
/// that never comes and then reports `ConnectionAborted` at EOF. So this test
/// accepts either outcome from the event loop, and
/// `v5_takeover_disconnect_bytes` checks the 0x8E on the wire.
#[tokio::test]
async fn takeover_v5() {
    let b = Broker::start();
    let (mut first, _) = V5::connect(&b, Opts::new("dup-id")).await;
    let (mut second, _) = V5::connect(&b, Opts::new("dup-id")).await;
    match first.wait_error().await {
        v5::ConnectionError::MqttState(v5::StateError::ServerDisconnect {
            reason_code, ..
        }) => assert_eq!(reason_code, v5::DisconnectReasonCode::SessionTakenOver),
        // See above: rumqttc's decoding bug, not a broker property.
        v5::ConnectionError::MqttState(v5::StateError::ConnectionAborted) => {}
        e => panic!("expected DISCONNECT 0x8E / connection closed, got {e:?}"),
    }
    second.subscribe("dup/t", 1).await;
    let (mut publ, _) = V5::connect(&b, Opts::new("dup-pub")).await;
    publ.publish("dup/t", 1, false, b"hello").await;
    assert_eq!(second.recv().await.text(), "hello");
}

/// [MQTT-3.1.4-3] (5.0): the taken-over connection receives a DISCONNECT
/// with reason code 0x8E (Session taken over) before it is closed. Raw
/// socket, since rumqttc cannot decode the short form (see `takeover_v5`).
#[tokio::test]
async fn v5_takeover_disconnect_bytes() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    // CONNECT: "MQTT", level 5, clean start, keep alive 60, no properties,
    // client id "raw-dup".
    let connect: &[u8] = b"\x10\x14\x00\x04MQTT\x05\x02\x00\x3c\x00\x00\x07raw-dup";
    let b = Broker::start();
    let addr = ("127.0.0.1", b.port);
    let mut first = tokio::net::TcpStream::connect(addr).await.unwrap();
    first.write_all(connect).await.unwrap();
    // CONNACK: type 0x20, then the rest of the packet.
    let mut hdr = [0u8; 2];
    timeout(common::WAIT, first.read_exact(&mut hdr))
        .await
        .expect("CONNACK in time")
        .unwrap();
    assert_eq!(hdr[0], 0x20, "expected CONNACK");
    let mut rest = vec![0u8; hdr[1] as usize];
    timeout(common::WAIT, first.read_exact(&mut rest))
        .await
        .expect("CONNACK in time")
        .unwrap();
    assert_eq!(rest[1], 0x00, "CONNACK reason");

    let (_second, _) = V5::connect(&b, Opts::new("raw-dup")).await;
    let mut tail = Vec::new();
    timeout(common::WAIT, first.read_to_end(&mut tail))
        .await
        .expect("old connection closed in time")
        .unwrap();
    assert!(
        tail.len() >= 3 && tail[0] == 0xE0 && tail[1] >= 1 && tail[2] == 0x8E,
        "expected DISCONNECT 0x8E before close, got {tail:02x?}"
    );
}

// ------------------------------------------------------------ wildcards

// 4.7.1.2 '#' matches the parent level and any number of child levels
// 4.7.1.3 '+' matches exactly one level
// [MQTT-4.7.2-1] filters starting with a wildcard don't match topics starting
//                with '$' ($SYS and others)
async fn wildcards<C: MqttClient>() {
    let b = Broker::start_with(&["--sys-interval", "1"]);
    let (mut hash, _) = C::connect(&b, Opts::new("wc-hash")).await;
    hash.subscribe("#", 0).await;
    let (mut plus, _) = C::connect(&b, Opts::new("wc-plus")).await;
    plus.subscribe("+/x", 0).await;
    plus.subscribe("wc/+/c", 0).await;
    let (mut multi, _) = C::connect(&b, Opts::new("wc-multi")).await;
    multi.subscribe("wc/a/#", 0).await;
    let (mut dollar, _) = C::connect(&b, Opts::new("wc-dollar")).await;
    dollar.subscribe("$dollar/#", 0).await;
    dollar.subscribe("$SYS/#", 0).await;

    let (mut publ, _) = C::connect(&b, Opts::new("wc-pub")).await;
    for t in [
        "$dollar/x",
        "wc/b/c",
        "wc/b/d",
        "wc/b/c/d",
        "wc/a",
        "wc/a/b/c",
        "plain/x",
    ] {
        publ.publish(t, 1, false, t.as_bytes()).await;
    }

    let topics = |ms: Vec<common::Msg>| ms.into_iter().map(|m| m.topic).collect::<Vec<_>>();
    let mut got = Vec::new();
    for _ in 0..6 {
        got.push(hash.recv().await);
    }
    assert_eq!(
        topics(got),
        ["wc/b/c", "wc/b/d", "wc/b/c/d", "wc/a", "wc/a/b/c", "plain/x"],
        "'#' subscriber"
    );
    let got = vec![plus.recv().await, plus.recv().await];
    assert_eq!(topics(got), ["wc/b/c", "plain/x"], "'+' subscriber");
    let got = vec![multi.recv().await, multi.recv().await];
    assert_eq!(topics(got), ["wc/a", "wc/a/b/c"], "'wc/a/#' subscriber");

    // The '$' topics do exist: the explicit subscriber receives both ours and
    // the broker's $SYS tree (retained or published every second).
    let mut saw_dollar = false;
    let mut saw_sys = false;
    while !(saw_dollar && saw_sys) {
        let m = dollar.recv().await;
        saw_dollar |= m.topic == "$dollar/x";
        saw_sys |= m.topic.starts_with("$SYS/");
    }
    // ... yet none of them reached the wildcard subscribers. ($SYS is
    // published every second, so this window covers at least one round.)
    if let Some(m) = hash.try_recv(Duration::from_millis(1200)).await {
        panic!("'#' matched {}", m.topic);
    }
    assert_quiet(&mut plus, "'+/x' subscriber").await;
}
both_versions!(wildcards, wildcards_v4, wildcards_v5);

// ------------------------------------------------------------ shared subscriptions

// [MQTT-4.8.2-*] (5.0 4.8.2) each message matching a shared subscription is
// sent to exactly one member of the group; members of the group share the
// load. (For 3.1.1 shared subscriptions are a common broker extension.)
async fn shared<C: MqttClient>() {
    let b = Broker::start();
    let (mut m1, _) = C::connect(&b, Opts::new("sh-1")).await;
    let (mut m2, _) = C::connect(&b, Opts::new("sh-2")).await;
    assert_eq!(m1.subscribe("$share/g/sh/t", 1).await, 1);
    assert_eq!(m2.subscribe("$share/g/sh/t", 1).await, 1);
    // A plain subscriber of the same topic still gets every message.
    let (mut plain, _) = C::connect(&b, Opts::new("sh-plain")).await;
    plain.subscribe("sh/t", 1).await;

    let (mut publ, _) = C::connect(&b, Opts::new("sh-pub")).await;
    for i in 0..10 {
        publ.publish("sh/t", 1, false, format!("{i}").as_bytes())
            .await;
    }
    for i in 0..10 {
        assert_eq!(plain.recv().await.text(), format!("{i}"));
    }

    let mut seen = [0u32; 10];
    let (mut n1, mut n2) = (0, 0);
    let deadline = tokio::time::Instant::now() + common::WAIT;
    while n1 + n2 < 10 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "only {} of 10",
            n1 + n2
        );
        if let Some(m) = m1.try_recv(Duration::from_millis(50)).await {
            assert_eq!(m.topic, "sh/t");
            seen[m.text().parse::<usize>().unwrap()] += 1;
            n1 += 1;
        }
        if let Some(m) = m2.try_recv(Duration::from_millis(50)).await {
            assert_eq!(m.topic, "sh/t");
            seen[m.text().parse::<usize>().unwrap()] += 1;
            n2 += 1;
        }
    }
    assert_quiet(&mut m1, "member 1 after 10 messages").await;
    assert_quiet(&mut m2, "member 2 after 10 messages").await;
    assert_eq!(seen, [1; 10], "each message exactly once across the group");
    assert!(n1 > 0 && n2 > 0, "load not shared: {n1} / {n2}");
}
both_versions!(shared, shared_v4, shared_v5);

// ------------------------------------------------------------ ordering / volume

// [MQTT-4.6.0-5] (3.1.1 [MQTT-4.6.0-6]) messages on one topic from one
// publisher are delivered in the order they were published (QoS 1)
async fn many_in_order<C: MqttClient>() {
    many_in_order_with::<C>(&[]).await
}

async fn many_in_order_with<C: MqttClient>(broker_args: &[&str]) {
    let b = Broker::start_with(broker_args);
    let (mut sub, _) = C::connect(&b, Opts::new("many-sub")).await;
    sub.subscribe("many/t", 1).await;
    let (mut publ, _) = C::connect(&b, Opts::new("many-pub")).await;
    // Pipelined: all 1000 are handed to the client at once, then all PUBACKs
    // are awaited.
    let payloads = (0..1000).map(|i| format!("{i}").into_bytes()).collect();
    publ.publish_pipelined("many/t", 1, payloads).await;
    for i in 0..1000 {
        let m = sub.recv().await;
        assert_eq!(m.text(), format!("{i}"), "message {i} out of order");
        assert_eq!(m.qos, 1);
    }
    assert_quiet(&mut sub, "after 1000 messages").await;
}
both_versions!(many_in_order, many_in_order_v4, many_in_order_v5);

/// Same, with the broker's outgoing window squeezed to 3 in-flight messages
/// and its receive maximum to 3, so flow control and queueing are exercised on
/// both legs ([MQTT-4.6.0-5], [MQTT-4.9.0-2] / [MQTT-3.3.4-9]).
#[tokio::test]
async fn many_in_order_small_window_v5() {
    many_in_order_with::<V5>(&["--max-inflight", "3", "--receive-maximum", "3"]).await
}

#[tokio::test]
async fn many_in_order_small_window_v4() {
    many_in_order_with::<V4>(&["--max-inflight", "3"]).await
}

// ------------------------------------------------------------ v5 only

/// [MQTT-3.3.2-15] [MQTT-3.3.2-16] Response Topic / Correlation Data,
/// [MQTT-3.3.2-17] [MQTT-3.3.2-18] User Properties (order kept),
/// [MQTT-3.3.2-20] Content Type, [MQTT-3.3.2-4] Payload Format Indicator:
/// all forwarded unaltered.
#[tokio::test]
async fn v5_publish_properties_forwarded() {
    let b = Broker::start();
    let (mut sub, _) = V5::connect(&b, Opts::new("props-sub")).await;
    sub.subscribe("props/t", 1).await;
    let (mut publ, _) = V5::connect(&b, Opts::new("props-pub")).await;
    let props = v5::PublishProperties {
        payload_format_indicator: Some(1),
        response_topic: Some("props/reply".into()),
        correlation_data: Some(bytes::Bytes::from_static(b"\x00corr\xff")),
        user_properties: vec![
            ("k".into(), "v1".into()),
            ("a".into(), "b".into()),
            ("k".into(), "v2".into()),
        ],
        content_type: Some("application/json; charset=utf-8".into()),
        ..Default::default()
    };
    for qos in [0, 1, 2] {
        publ.publish_props("props/t", qos, false, b"{\"x\":1}", props.clone())
            .await;
        let m = sub.recv().await;
        assert_eq!(m.payload, b"{\"x\":1}");
        let got = m.props.expect("properties missing");
        assert_eq!(got.payload_format_indicator, Some(1), "qos {qos}");
        assert_eq!(got.response_topic, props.response_topic, "qos {qos}");
        assert_eq!(got.correlation_data, props.correlation_data, "qos {qos}");
        assert_eq!(got.user_properties, props.user_properties, "qos {qos}");
        assert_eq!(got.content_type, props.content_type, "qos {qos}");
        assert!(got.subscription_identifiers.is_empty());
        assert_eq!(got.message_expiry_interval, None);
    }
}

/// [MQTT-3.3.4-3] the Subscription Identifier of the matching subscription is
/// included in the PUBLISH; a message matched by a subscription without one
/// carries none.
#[tokio::test]
async fn v5_subscription_identifier() {
    let b = Broker::start();
    let (mut sub, _) = V5::connect(&b, Opts::new("sid-sub")).await;
    let rc = sub
        .subscribe_filter(
            v5::Filter::new("sid/with/+", v5::QoS::AtLeastOnce),
            Some(v5::SubscribeProperties {
                id: Some(42),
                user_properties: vec![],
            }),
        )
        .await;
    assert_eq!(rc, v5::SubscribeReasonCode::Success(v5::QoS::AtLeastOnce));
    sub.subscribe("sid/without", 1).await;
    let (mut publ, _) = V5::connect(&b, Opts::new("sid-pub")).await;
    publ.publish("sid/with/x", 1, false, b"1").await;
    publ.publish("sid/without", 1, false, b"2").await;
    let m = sub.recv().await;
    assert_eq!(m.topic, "sid/with/x");
    assert_eq!(m.props.unwrap_or_default().subscription_identifiers, [42]);
    let m = sub.recv().await;
    assert_eq!(m.topic, "sid/without");
    assert!(m
        .props
        .unwrap_or_default()
        .subscription_identifiers
        .is_empty());
}

/// [MQTT-3.8.3-3] No Local: messages are not forwarded to a connection with
/// the publisher's client id.
#[tokio::test]
async fn v5_no_local() {
    let b = Broker::start();
    let (mut me, _) = V5::connect(&b, Opts::new("nl-me")).await;
    let mut f = v5::Filter::new("nl/t", v5::QoS::AtLeastOnce);
    f.nolocal = true;
    me.subscribe_filter(f, None).await;
    let (mut other, _) = V5::connect(&b, Opts::new("nl-other")).await;
    other.subscribe("nl/t", 1).await;

    // Our own message: routed (the other subscriber gets it) before PUBACK.
    me.publish("nl/t", 1, false, b"mine").await;
    assert_eq!(other.recv().await.text(), "mine");
    // Someone else's message still arrives, and it is the first one.
    other.publish("nl/t", 1, false, b"theirs").await;
    let m = me.recv().await;
    assert_eq!(m.text(), "theirs", "No Local subscription got own message");
    assert_quiet(&mut me, "No Local").await;
}

/// [MQTT-3.3.2-5] a message whose expiry interval has passed is not
/// delivered; [MQTT-3.3.2-6] the forwarded Message Expiry Interval is the
/// received value minus the time spent waiting in the server.
#[tokio::test]
async fn v5_message_expiry() {
    let b = Broker::start();
    let opts = Opts::new("exp-sub").persistent(300);
    let (mut sub, _) = V5::connect(&b, opts.clone()).await;
    sub.subscribe("exp/t", 1).await;
    sub.disconnect().await;

    let (mut publ, _) = V5::connect(&b, Opts::new("exp-pub")).await;
    let expiring = |secs| v5::PublishProperties {
        message_expiry_interval: Some(secs),
        ..Default::default()
    };
    publ.publish_props("exp/t", 1, false, b"short", expiring(1))
        .await;
    publ.publish_props("exp/t", 1, false, b"long", expiring(60))
        .await;
    publ.publish("exp/t", 1, false, b"forever").await;
    // Let "short" expire while queued (deliberate passage of time, not a
    // synchronisation sleep).
    // 1.3 s: past the 1 s expiry (the fake-clock tests in state_machine.rs
    // cover the boundaries).
    tokio::time::sleep(Duration::from_millis(1300)).await;

    let (mut sub, info) = V5::connect(&b, opts).await;
    assert!(info.session_present);
    let m = sub.recv().await;
    assert_eq!(m.text(), "long", "expired message was delivered (or lost)");
    let left = m.props.unwrap_or_default().message_expiry_interval;
    assert!(
        matches!(left, Some(1..=59)),
        "expiry interval not decremented by the ~1.3 s spent queued: {left:?}"
    );
    let m = sub.recv().await;
    assert_eq!(m.text(), "forever");
    assert_eq!(m.props.unwrap_or_default().message_expiry_interval, None);
    assert_quiet(&mut sub, "after the queued messages").await;
}

/// [MQTT-3.1.2-24] the server must not send packets larger than the client's
/// Maximum Packet Size; [MQTT-3.1.2-25] it discards such a message and
/// carries on as if it had been sent.
#[tokio::test]
async fn v5_client_maximum_packet_size() {
    let b = Broker::start();
    let (mut sub, _) = V5::connect(&b, Opts::new("mps-sub").max_packet_size(512)).await;
    sub.subscribe("mps/t", 1).await;
    let (mut publ, _) = V5::connect(&b, Opts::new("mps-pub")).await;
    publ.publish("mps/t", 1, false, &[b'L'; 2000]).await;
    publ.publish("mps/t", 1, false, b"small").await;
    // rumqttc fails the connection on an oversized packet, which `recv`
    // reports as a panic; so receiving "small" first proves the big one was
    // dropped.
    let m = sub.recv().await;
    assert_eq!(m.text(), "small");
    assert_quiet(&mut sub, "after the small message").await;
}
