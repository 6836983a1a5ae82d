//! Protocol state machine tests: real broker, real connections, no sockets,
//! on a fake clock (every call takes an explicit `now`).

#![allow(clippy::field_reassign_with_default)]

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::BytesMut;
use millet::broker::Broker;
use millet::config::Config;
use millet::engine::{submit, Call, Engine};
use millet::hooks::Hooks;
use millet::protocol::{Connection, Shared};
use millet_codec::*;

struct Client {
    conn: Connection,
    /// The engine the connection's requests go to (see `engine_for`).
    engine: Arc<dyn Engine>,
    /// The hooks' verdict on the CONNECT (None: accepted as presented).
    verdict: Option<millet::protocol::ConnectVerdict>,
    proto: Protocol,
    wire: BytesMut,
    /// Packets received along with the CONNACK.
    backlog: Vec<Packet>,
}

fn broker_with(f: impl FnOnce(&mut Config)) -> (Arc<Broker>, Instant) {
    let mut cfg = Config::default();
    cfg.sys_interval = 0;
    f(&mut cfg);
    let now = Instant::now();
    (Arc::new(Broker::new(cfg, now)), now)
}

/// The engine: the broker itself (embedded), or with
/// `MILLET_TEST_ENGINE_DELAY_MS=N` the broker behind the delaying engine,
/// which answers every call after up to N ms (CI runs these tests both ways).
fn engine_for(b: &Arc<Broker>) -> Arc<dyn Engine> {
    match std::env::var("MILLET_TEST_ENGINE_DELAY_MS")
        .ok()
        .and_then(|v| v.parse::<u64>().ok())
    {
        Some(ms) if ms > 0 => Arc::new(millet::engine::delaying::Delaying::new(
            b.clone(),
            Duration::from_millis(ms),
            7,
        )),
        _ => b.clone(),
    }
}

/// What a connection reaches: the broker, `engine`, and the broker's ACL as
/// hooks; with `MILLET_TEST_ENGINE_DELAY_MS=N`, the hooks send every
/// SUBSCRIBE's and some PUBLISHes' authorization through the pending path,
/// answered after up to N ms.
fn shared_for(b: &Arc<Broker>, engine: Arc<dyn Engine>) -> Arc<Shared> {
    let hooks: Arc<dyn Hooks> = match std::env::var("MILLET_TEST_ENGINE_DELAY_MS")
        .ok()
        .and_then(|v| v.parse::<u64>().ok())
    {
        Some(ms) if ms > 0 => Arc::new(millet::engine::delaying::DelayingHooks::new(
            b.clone(),
            Duration::from_millis(ms),
            11,
        )),
        _ => b.clone(),
    };
    Shared::with_hooks(b.node.clone(), engine, hooks)
}

/// Hand the connection's requests to the engine, waiting for answers that
/// come later (as the server's driver does without blocking).
fn pump(
    conn: &mut Connection,
    engine: &dyn Engine,
    verdict: &mut Option<millet::protocol::ConnectVerdict>,
    now: Instant,
) {
    while let Some(request) = conn.poll_request() {
        if let (millet::engine::Request::Authenticate(_), Some(v)) = (&request, verdict.take()) {
            // The hooks' verdict the test chose.
            conn.handle_completion(millet::engine::Completion::Verdict(Box::new(v)), now);
            continue;
        }
        let waker = conn.waker().clone();
        match submit(engine, conn.hooks(), request, &waker, now) {
            Call::Ready(done) => conn.handle_completion(done, now),
            Call::Later(pending) => {
                let done = pending
                    .wait(Duration::from_secs(10))
                    .expect("the engine answers within 10 s");
                conn.handle_completion(done, now);
            }
        }
    }
}

fn broker() -> (Arc<Broker>, Instant) {
    broker_with(|_| {})
}

fn connect_packet(proto: Protocol, id: &str, clean: bool) -> Connect {
    Connect {
        protocol: proto,
        clean_start: clean,
        keep_alive: 0,
        properties: ConnectProperties::default(),
        client_id: id.into(),
        will: None,
        username: None,
        password: None,
        bridge: false,
    }
}

impl Client {
    fn new(b: &Arc<Broker>, c: Connect, now: Instant) -> (Client, ConnAck) {
        Client::on_engine(b, engine_for(b), c, now)
    }

    /// A client whose connection's requests, publishes and durability go
    /// to `engine`.
    fn on_engine(
        b: &Arc<Broker>,
        engine: Arc<dyn Engine>,
        c: Connect,
        now: Instant,
    ) -> (Client, ConnAck) {
        Client::on_shared(shared_for(b, engine.clone()), engine, c, now)
    }

    /// A client whose connection reaches `shared` (its requests go to
    /// `engine`), connected with `c`.
    fn on_shared(
        shared: Arc<Shared>,
        engine: Arc<dyn Engine>,
        c: Connect,
        now: Instant,
    ) -> (Client, ConnAck) {
        let mut cl = Client {
            conn: Connection::new(shared, now),
            engine,
            verdict: None,
            proto: c.protocol,
            wire: BytesMut::new(),
            backlog: Vec::new(),
        };
        cl.send(Packet::Connect(Box::new(c)), now);
        let mut pkts = cl.recv_once_woken(now);
        match pkts.first() {
            Some(Packet::ConnAck(a)) => {
                let a = a.clone();
                pkts.remove(0);
                cl.backlog = pkts;
                (cl, a)
            }
            other => panic!("expected CONNACK, got {other:?}"),
        }
    }

    fn v5(b: &Arc<Broker>, id: &str, now: Instant) -> Client {
        Client::new(b, connect_packet(Protocol::V5, id, true), now).0
    }

    /// The socket is gone: the connection closes and its session is
    /// detached through the engine (as the server's driver does).
    fn closed(&mut self, now: Instant) {
        self.conn.handle_closed(now);
        pump(&mut self.conn, &*self.engine, &mut self.verdict, now);
    }

    fn send(&mut self, p: Packet, now: Instant) {
        self.conn.handle_packet(p, now);
        pump(&mut self.conn, &*self.engine, &mut self.verdict, now);
    }

    fn recv(&mut self, now: Instant) -> Vec<Packet> {
        self.conn.poll_transmit(now, &mut self.wire);
        let mut out = std::mem::take(&mut self.backlog);
        while let Some(p) = decode(&mut self.wire, Some(self.proto), usize::MAX)
            .expect("server sent a valid packet")
        {
            out.push(p);
        }
        out
    }

    /// What the connection sends, waiting (at most 10 s) for a wake-up
    /// first when there is nothing yet: an engine that answers later
    /// releases held packets when it says a ticket is durable.
    fn recv_once_woken(&mut self, now: Instant) -> Vec<Packet> {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let woken = self.conn.waker().clear();
            let got = self.recv(now);
            if !got.is_empty() || Instant::now() >= deadline {
                return got;
            }
            if !woken {
                std::thread::sleep(Duration::from_millis(1));
            }
        }
    }

    fn subscribe(&mut self, filter: &str, qos: QoS, now: Instant) {
        self.send(
            Packet::Subscribe(Subscribe {
                packet_id: 1,
                subscription_identifier: None,
                user_properties: vec![],
                filters: vec![(
                    filter.into(),
                    SubscriptionOptions {
                        qos,
                        ..Default::default()
                    },
                )],
            }),
            now,
        );
        let p = self.recv(now);
        assert!(matches!(p.first(), Some(Packet::SubAck(_))), "{p:?}");
    }

    fn publish(
        &mut self,
        topic: &str,
        payload: &'static [u8],
        qos: QoS,
        pid: Option<u16>,
        now: Instant,
    ) {
        self.send(
            Packet::Publish(Publish {
                topic: topic.into(),
                payload: bytes::Bytes::from_static(payload),
                qos,
                packet_id: pid,
                ..Default::default()
            }),
            now,
        );
    }
}

fn publishes(p: &[Packet]) -> Vec<&Publish> {
    p.iter()
        .filter_map(|p| match p {
            Packet::Publish(x) => Some(x),
            _ => None,
        })
        .collect()
}

#[test]
fn suback_goes_out_before_the_retained_messages_an_unanswered_subscribe_replayed() {
    // An engine that answers later (a networked one, the delaying one) may
    // have queued the replay before its answer reaches the connection. The
    // SUBACK still comes first (CI once saw the PUBLISH overtake it).
    let (b, now) = broker();
    let mut publisher = Client::v5(&b, "pub", now);
    for (topic, qos, packet_id) in [
        ("r/1", QoS::AtLeastOnce, Some(1)),
        ("r/2", QoS::AtMostOnce, None),
    ] {
        publisher.send(
            Packet::Publish(Publish {
                topic: topic.into(),
                payload: bytes::Bytes::from_static(b"kept"),
                qos,
                packet_id,
                retain: true,
                ..Default::default()
            }),
            now,
        );
    }
    let mut sub = Client::v5(&b, "sub", now);
    sub.conn.handle_packet(
        Packet::Subscribe(Subscribe {
            packet_id: 9,
            subscription_identifier: None,
            user_properties: vec![],
            filters: vec![(
                "r/#".into(),
                SubscriptionOptions {
                    qos: QoS::AtLeastOnce,
                    ..Default::default()
                },
            )],
        }),
        now,
    );
    // The engine does the work now (the replay lands in the session) ...
    let waker = sub.conn.waker().clone();
    let request = loop {
        let request = sub.conn.poll_request().expect("SUBSCRIBE asks the engine");
        if !matches!(request, millet::engine::Request::Authorize(_)) {
            break request;
        }
        // (Hooks that answer later first: the delayed run's.)
        let done = match submit(&*b, sub.conn.hooks(), request, &waker, now) {
            Call::Ready(done) => done,
            Call::Later(p) => p.wait(Duration::from_secs(10)).expect("answered"),
        };
        sub.conn.handle_completion(done, now);
    };
    let done = match submit(&*b, &*b, request, &waker, now) {
        Call::Ready(done) => done,
        Call::Later(p) => p.wait(Duration::from_secs(10)).expect("answered"),
    };
    // ... but its answer has not reached the connection.
    let early = sub.recv(now);
    assert!(early.is_empty(), "sent before the SUBACK: {early:?}");
    sub.conn.handle_completion(done, now);
    let p = sub.recv(now);
    assert!(
        matches!(p.first(), Some(Packet::SubAck(a)) if a.packet_id == 9),
        "{p:?}"
    );
    let mut topics: Vec<&str> = publishes(&p).iter().map(|x| &*x.topic).collect();
    topics.sort_unstable(); // retained messages replay in no set order
    assert_eq!(topics, ["r/1", "r/2"], "{p:?}");
    assert!(publishes(&p).iter().all(|x| x.retain));
}

#[test]
fn keep_alive_closes_after_one_and_a_half_intervals() {
    // [MQTT-3.1.2-22]
    let (b, t0) = broker();
    let mut c = connect_packet(Protocol::V5, "ka", true);
    c.keep_alive = 10;
    let (mut cl, _) = Client::new(&b, c, t0);
    assert_eq!(cl.conn.poll_timeout(), Some(t0 + Duration::from_secs(15)));
    cl.conn.handle_timeout(t0 + Duration::from_secs(14));
    assert!(cl.conn.poll_close().is_none());
    cl.send(Packet::PingReq, t0 + Duration::from_secs(14));
    assert_eq!(cl.recv(t0), vec![Packet::PingResp]);
    cl.conn.handle_timeout(t0 + Duration::from_secs(28));
    assert!(
        cl.conn.poll_close().is_none(),
        "the ping re-armed the timer"
    );
    cl.conn.handle_timeout(t0 + Duration::from_secs(29));
    let close = cl.conn.poll_close().expect("closed");
    assert_eq!(close.reason, ReasonCode::KEEP_ALIVE_TIMEOUT);
    assert!(close.publish_will);
    let p = cl.recv(t0);
    assert!(
        matches!(&p[..], [Packet::Disconnect(d)] if d.reason_code == ReasonCode::KEEP_ALIVE_TIMEOUT)
    );
}

#[test]
fn server_keep_alive_caps_the_client() {
    // [MQTT-3.2.2-21]
    let (b, t0) = broker_with(|c| c.limits.max_keepalive = 60);
    let mut c = connect_packet(Protocol::V5, "ka2", true);
    c.keep_alive = 600;
    let (cl, ack) = Client::new(&b, c, t0);
    assert_eq!(ack.properties.server_keep_alive, Some(60));
    assert_eq!(cl.conn.poll_timeout(), Some(t0 + Duration::from_secs(90)));
}

#[test]
fn connect_timeout_closes_silent_connections() {
    let (b, t0) = broker();
    let mut conn = Connection::new(shared_for(&b, engine_for(&b)), t0);
    let deadline = conn.poll_timeout().expect("connect timer");
    conn.handle_timeout(deadline);
    assert!(conn.poll_close().is_some());
}

#[test]
fn qos2_inbound_is_delivered_once_even_when_resent() {
    // [MQTT-4.3.3-10]: a resent QoS 2 PUBLISH (same id, before PUBREL) is not delivered twice.
    let (b, t0) = broker();
    let mut sub = Client::v5(&b, "sub", t0);
    sub.subscribe("a/b", QoS::ExactlyOnce, t0);
    let mut publ = Client::v5(&b, "pub", t0);
    publ.publish("a/b", b"x", QoS::ExactlyOnce, Some(7), t0);
    let mut p = publ.recv(t0);
    assert!(matches!(&p[..], [Packet::PubRec(r)] if r.packet_id == 7));
    publ.send(
        Packet::Publish(Publish {
            dup: true,
            topic: "a/b".into(),
            payload: bytes::Bytes::from_static(b"x"),
            qos: QoS::ExactlyOnce,
            packet_id: Some(7),
            ..Default::default()
        }),
        t0,
    );
    p = publ.recv(t0);
    assert!(matches!(&p[..], [Packet::PubRec(r)] if r.packet_id == 7));
    publ.send(Packet::PubRel(PubResp::new(7)), t0);
    p = publ.recv(t0);
    assert!(
        matches!(&p[..], [Packet::PubComp(r)] if r.packet_id == 7 && r.reason_code == ReasonCode::SUCCESS)
    );
    let got = sub.recv(t0);
    assert_eq!(publishes(&got).len(), 1);
    // Outgoing QoS 2: PUBREC → PUBREL → PUBCOMP completes the window.
    let pid = publishes(&got)[0].packet_id.expect("pid");
    sub.send(Packet::PubRec(PubResp::new(pid)), t0);
    assert!(matches!(&sub.recv(t0)[..], [Packet::PubRel(r)] if r.packet_id == pid));
    sub.send(Packet::PubComp(PubResp::new(pid)), t0);
    assert!(sub.recv(t0).is_empty());
}

#[test]
fn pubrel_for_unknown_id_gets_packet_identifier_not_found() {
    let (b, t0) = broker();
    let mut c = Client::v5(&b, "c", t0);
    c.send(Packet::PubRel(PubResp::new(99)), t0);
    assert!(
        matches!(&c.recv(t0)[..], [Packet::PubComp(r)] if r.reason_code == ReasonCode::PACKET_IDENTIFIER_NOT_FOUND)
    );
}

#[test]
fn receive_maximum_limits_the_outgoing_window() {
    // [MQTT-3.3.4-9]: no more than receive-maximum unacknowledged QoS 1/2 PUBLISH.
    let (b, t0) = broker();
    let mut c = connect_packet(Protocol::V5, "slow", true);
    c.properties.receive_maximum = Some(2);
    let (mut sub, _) = Client::new(&b, c, t0);
    sub.subscribe("t", QoS::AtLeastOnce, t0);
    let mut publ = Client::v5(&b, "p", t0);
    for i in 1..=5 {
        publ.publish("t", b"m", QoS::AtLeastOnce, Some(i), t0);
    }
    let got = sub.recv(t0);
    let first = publishes(&got);
    assert_eq!(first.len(), 2);
    let pid = first[0].packet_id.expect("pid");
    assert!(sub.recv(t0).is_empty(), "window full");
    sub.send(Packet::PubAck(PubResp::new(pid)), t0);
    assert_eq!(publishes(&sub.recv(t0)).len(), 1, "one ack frees one slot");
}

#[test]
fn inbound_topic_alias() {
    let (b, t0) = broker_with(|c| c.limits.topic_alias_max = 4);
    let mut sub = Client::v5(&b, "s", t0);
    sub.subscribe("alias/topic", QoS::AtMostOnce, t0);
    let mut p = Client::v5(&b, "p", t0);
    let mut pb = Publish {
        topic: "alias/topic".into(),
        payload: bytes::Bytes::from_static(b"1"),
        ..Default::default()
    };
    pb.properties.topic_alias = Some(3);
    p.send(Packet::Publish(pb.clone()), t0);
    pb.topic = "".into();
    pb.payload = bytes::Bytes::from_static(b"2");
    p.send(Packet::Publish(pb.clone()), t0);
    let got = sub.recv(t0);
    let got = publishes(&got);
    assert_eq!(got.len(), 2);
    assert!(got.iter().all(|x| &*x.topic == "alias/topic"));
    // [MQTT-3.3.2-9]: alias above the maximum is a protocol error (0x94).
    pb.properties.topic_alias = Some(5);
    p.send(Packet::Publish(pb), t0);
    assert_eq!(
        p.conn.poll_close().map(|c| c.reason),
        Some(ReasonCode::TOPIC_ALIAS_INVALID)
    );
}

#[test]
fn outbound_topic_alias_is_used_when_the_client_allows_it() {
    let (b, t0) = broker();
    let mut c = connect_packet(Protocol::V5, "s", true);
    c.properties.topic_alias_maximum = Some(2);
    let (mut sub, _) = Client::new(&b, c, t0);
    sub.subscribe("x/#", QoS::AtMostOnce, t0);
    let mut p = Client::v5(&b, "p", t0);
    p.publish("x/1", b"a", QoS::AtMostOnce, None, t0);
    p.publish("x/1", b"b", QoS::AtMostOnce, None, t0);
    let got = sub.recv(t0);
    let got = publishes(&got);
    assert_eq!(&*got[0].topic, "x/1");
    assert_eq!(got[0].properties.topic_alias, Some(1));
    assert_eq!(&*got[1].topic, "");
    assert_eq!(got[1].properties.topic_alias, Some(1));
}

#[test]
fn takeover_closes_the_old_connection_with_0x8e_and_resumes() {
    // [MQTT-3.1.4-3]
    let (b, t0) = broker();
    let mut c = connect_packet(Protocol::V5, "dup", false);
    c.properties.session_expiry_interval = Some(60);
    let (mut old, _) = Client::new(&b, c.clone(), t0);
    old.subscribe("t", QoS::AtLeastOnce, t0);
    let (mut new, ack) = Client::new(&b, c, t0);
    assert!(ack.session_present);
    let p = old.recv(t0);
    assert!(
        matches!(&p[..], [Packet::Disconnect(d)] if d.reason_code == ReasonCode::SESSION_TAKEN_OVER)
    );
    assert!(old.conn.poll_close().is_some());
    old.closed(t0);
    // The subscription survived on the new connection.
    let mut p = Client::v5(&b, "p", t0);
    p.publish("t", b"m", QoS::AtLeastOnce, Some(1), t0);
    assert_eq!(publishes(&new.recv(t0)).len(), 1);
}

#[test]
fn taken_over_while_already_closing_sends_a_single_disconnect() {
    // Found by the `protocol` fuzz target: a malformed packet and a takeover
    // in the same wake-up queued DISCONNECT 0x81 and then DISCONNECT 0x8E.
    // Nothing may follow the server's DISCONNECT [MQTT-3.14.4-1].
    let (b, t0) = broker();
    let mut old = Client::v5(&b, "twice", t0);
    let _new = Client::v5(&b, "twice", t0);
    old.conn
        .handle_decode_error(&DecodeError::Malformed("PUBREL", "packet identifier"));
    let p = old.recv(t0);
    assert!(
        matches!(&p[..], [Packet::Disconnect(d)] if d.reason_code == ReasonCode::MALFORMED_PACKET),
        "{p:?}"
    );
    assert!(old.conn.poll_close().is_some());
    old.closed(t0);
}

#[test]
fn will_delay_is_honoured_and_cancelled_by_reconnect() {
    let (b, t0) = broker();
    let mut watcher = Client::v5(&b, "w", t0);
    watcher.subscribe("will/#", QoS::AtMostOnce, t0);
    let mut c = connect_packet(Protocol::V5, "dies", false);
    c.properties.session_expiry_interval = Some(100);
    c.will = Some(LastWill {
        topic: "will/dies".into(),
        payload: bytes::Bytes::from_static(b"gone"),
        qos: QoS::AtMostOnce,
        retain: false,
        properties: WillProperties {
            will_delay_interval: Some(5),
            ..Default::default()
        },
    });
    // First: dies, comes back after 3 s → no will [MQTT-3.1.3-9].
    let (mut cl, _) = Client::new(&b, c.clone(), t0);
    cl.closed(t0);
    b.handle_timeout(t0 + Duration::from_secs(3));
    let (mut cl, _) = Client::new(&b, c.clone(), t0 + Duration::from_secs(3));
    b.handle_timeout(t0 + Duration::from_secs(10));
    assert!(publishes(&watcher.recv(t0)).is_empty());
    // Second: dies and stays away → will after 5 s, not before.
    cl.closed(t0 + Duration::from_secs(10));
    b.handle_timeout(t0 + Duration::from_secs(14));
    assert!(publishes(&watcher.recv(t0)).is_empty());
    b.handle_timeout(t0 + Duration::from_secs(15));
    let got = watcher.recv(t0);
    assert_eq!(publishes(&got).len(), 1);
    assert_eq!(&publishes(&got)[0].payload[..], b"gone");
}

#[test]
fn normal_disconnect_discards_the_will() {
    // [MQTT-3.14.4-3]
    let (b, t0) = broker();
    let mut watcher = Client::v5(&b, "w", t0);
    watcher.subscribe("will", QoS::AtMostOnce, t0);
    let mut c = connect_packet(Protocol::V3_1_1, "polite", true);
    c.will = Some(LastWill {
        topic: "will".into(),
        payload: bytes::Bytes::from_static(b"x"),
        qos: QoS::AtMostOnce,
        retain: false,
        properties: Default::default(),
    });
    let (mut cl, _) = Client::new(&b, c.clone(), t0);
    cl.send(Packet::Disconnect(Disconnect::default()), t0);
    cl.closed(t0);
    assert!(publishes(&watcher.recv(t0)).is_empty());
    let (mut cl, _) = Client::new(&b, c, t0);
    cl.closed(t0); // abnormal
    assert_eq!(publishes(&watcher.recv(t0)).len(), 1);
}

#[test]
fn message_expiry_drops_queued_messages_and_decrements_the_interval() {
    // [MQTT-3.3.2-5], [MQTT-3.3.2-6]
    let (b, t0) = broker();
    let mut c = connect_packet(Protocol::V5, "off", false);
    c.properties.session_expiry_interval = Some(1000);
    let (mut sub, _) = Client::new(&b, c.clone(), t0);
    sub.subscribe("e", QoS::AtLeastOnce, t0);
    sub.closed(t0);
    let mut p = Client::v5(&b, "p", t0);
    for (i, secs) in [(1u16, 5u32), (2, 60)] {
        let mut pb = Publish {
            topic: "e".into(),
            payload: bytes::Bytes::from_static(b"m"),
            qos: QoS::AtLeastOnce,
            packet_id: Some(i),
            ..Default::default()
        };
        pb.properties.message_expiry_interval = Some(secs);
        p.send(Packet::Publish(pb), t0);
    }
    let t1 = t0 + Duration::from_secs(10);
    let (mut sub, ack) = Client::new(&b, c, t1);
    assert!(ack.session_present);
    let got = sub.recv(t1);
    let got = publishes(&got);
    assert_eq!(got.len(), 1, "the 5 s message expired while queued");
    assert_eq!(got[0].properties.message_expiry_interval, Some(50));
}

#[test]
fn session_expires_after_its_interval() {
    let (b, t0) = broker();
    let mut c = connect_packet(Protocol::V5, "exp", false);
    c.properties.session_expiry_interval = Some(30);
    let (mut cl, _) = Client::new(&b, c.clone(), t0);
    cl.closed(t0);
    b.handle_timeout(t0 + Duration::from_secs(29));
    let (mut cl, ack) = Client::new(&b, c.clone(), t0 + Duration::from_secs(29));
    assert!(ack.session_present);
    cl.closed(t0 + Duration::from_secs(29));
    b.handle_timeout(t0 + Duration::from_secs(60));
    let (_, ack) = Client::new(&b, c, t0 + Duration::from_secs(60));
    assert!(!ack.session_present);
}

#[test]
fn unacked_messages_are_resent_with_dup_on_resume() {
    // [MQTT-4.4.0-1]
    let (b, t0) = broker();
    let c = connect_packet(Protocol::V3_1_1, "resume", false);
    let (mut sub, _) = Client::new(&b, c.clone(), t0);
    sub.subscribe("r", QoS::AtLeastOnce, t0);
    let mut p = Client::v5(&b, "p", t0);
    p.publish("r", b"m", QoS::AtLeastOnce, Some(1), t0);
    let first = sub.recv(t0);
    assert!(!publishes(&first)[0].dup);
    sub.closed(t0);
    let (mut sub, ack) = Client::new(&b, c, t0);
    assert!(ack.session_present);
    let again = sub.recv(t0);
    let again = publishes(&again);
    assert_eq!(again.len(), 1);
    assert!(again[0].dup);
    assert_eq!(again[0].packet_id, publishes(&first)[0].packet_id);
}

#[test]
fn second_connect_is_a_protocol_error() {
    // [MQTT-3.1.0-2]
    let (b, t0) = broker();
    let mut c = Client::v5(&b, "twice", t0);
    c.send(
        Packet::Connect(Box::new(connect_packet(Protocol::V5, "twice", true))),
        t0,
    );
    assert_eq!(
        c.conn.poll_close().map(|c| c.reason),
        Some(ReasonCode::PROTOCOL_ERROR)
    );
}

#[test]
fn empty_client_id_rules() {
    // [MQTT-3.1.3-8] (3.1.1 with clean session 0) and [MQTT-3.2.2-16] (v5 assigned id)
    let (b, t0) = broker();
    let (_, ack) = Client::new(&b, connect_packet(Protocol::V3_1_1, "", false), t0);
    assert_eq!(ack.reason_code, ReasonCode::CLIENT_IDENTIFIER_NOT_VALID);
    let (_, ack) = Client::new(&b, connect_packet(Protocol::V3_1_1, "", true), t0);
    assert_eq!(ack.reason_code, ReasonCode::SUCCESS);
    let (_, ack) = Client::new(&b, connect_packet(Protocol::V5, "", true), t0);
    assert!(ack.properties.assigned_client_identifier.is_some());
}

#[test]
fn protocol_errors_after_connack_send_disconnect_in_v5_only() {
    // [MQTT-4.13.1-1] (v5 DISCONNECT with reason) vs a plain close in 3.1.1 [MQTT-4.8.0-1]
    let (b, t0) = broker();
    let mut c = Client::v5(&b, "e5", t0);
    c.send(Packet::PubComp(PubResp::new(1)), t0); // harmless
    c.send(Packet::SubAck(SubAck::default()), t0); // a server-only packet
    let p = c.recv(t0);
    assert!(
        matches!(&p[..], [Packet::Disconnect(d)] if d.reason_code == ReasonCode::PROTOCOL_ERROR),
        "{p:?}"
    );
    let (mut c3, _) = Client::new(&b, connect_packet(Protocol::V3_1_1, "e3", true), t0);
    c3.send(Packet::SubAck(SubAck::default()), t0);
    assert!(c3.recv(t0).is_empty());
    assert!(c3.conn.poll_close().is_some());
}

#[test]
fn slow_online_subscriber_pauses_publishers_instead_of_dropping() {
    // Back-pressure: the publisher stops being read while the receiver's queue
    // is above the threshold, and is woken once it drains to half.
    let (b, t0) = broker_with(|c| c.limits.backpressure_queued = 4);
    let mut c = connect_packet(Protocol::V5, "slow", true);
    c.properties.receive_maximum = Some(1);
    let (mut sub, _) = Client::new(&b, c, t0);
    sub.subscribe("bp", QoS::AtLeastOnce, t0);
    let mut publ = Client::v5(&b, "fast", t0);
    let mut pid = 0;
    while !publ.conn.is_paused() {
        pid += 1;
        assert!(pid < 10, "never paused");
        publ.publish("bp", b"m", QoS::AtLeastOnce, Some(pid), t0);
    }
    assert_eq!(pid, 4, "paused when the queue reached the threshold");
    publ.recv(t0); // the acks still go out
    assert!(publ.conn.is_paused());
    let w = publ.conn.waker().clone();
    // The subscriber acknowledges one message at a time until the queue halves.
    let mut acked = 0;
    while !w.is_pending() {
        let got = sub.recv(t0);
        for p in publishes(&got) {
            sub.send(Packet::PubAck(PubResp::new(p.packet_id.expect("pid"))), t0);
            acked += 1;
        }
        assert!(acked < 10, "publisher never woken");
    }
    publ.recv(t0);
    assert!(!publ.conn.is_paused());
    assert_eq!(
        b.node
            .stats
            .messages_dropped
            .load(std::sync::atomic::Ordering::Relaxed),
        0
    );
}

#[test]
fn a_paused_publisher_stays_paused_through_unrelated_wake_ups() {
    // Found by the qos1-persistent benchmark under `interval` durability: the
    // wake-ups that release a publisher's held PUBACKs (store durable) also
    // resumed reading it, so the congested queue grew to `max_queued` and
    // acknowledged messages were dropped. Only the congested session
    // draining (or the 1 s safety deadline) resumes it now.
    let (b, t0) = broker_with(|c| {
        c.limits.backpressure_queued = 4;
        c.limits.max_queued = 6;
    });
    let mut c = connect_packet(Protocol::V5, "slow2", true);
    c.properties.receive_maximum = Some(1);
    let (mut sub, _) = Client::new(&b, c, t0);
    sub.subscribe("bp2", QoS::AtLeastOnce, t0);
    let mut publ = Client::v5(&b, "fast2", t0);
    let mut pid = 0;
    while !publ.conn.is_paused() {
        pid += 1;
        publ.publish("bp2", b"m", QoS::AtLeastOnce, Some(pid), t0);
    }
    // Something else wakes the publisher (here: directly, as the store's
    // durability callback does); it goes through its output ...
    publ.conn.waker().wake();
    publ.recv(t0);
    // ... and stays paused: its session is still congested.
    assert!(
        publ.conn.is_paused(),
        "woken for another reason and resumed"
    );
    // The safety deadline bounds the pause even if the receiver never drains.
    let deadline = publ.conn.poll_timeout().expect("a pause deadline");
    assert!(deadline <= t0 + Duration::from_secs(1));
    publ.conn.handle_timeout(deadline);
    assert!(!publ.conn.is_paused());
    // Back to normal: draining the receiver releases it as before, and no
    // acknowledged message was dropped.
    let got = sub.recv(t0);
    assert_eq!(publishes(&got).len(), 1);
    assert_eq!(
        b.node
            .stats
            .messages_dropped
            .load(std::sync::atomic::Ordering::Relaxed),
        0
    );
}

#[test]
fn a_publisher_is_never_paused_by_its_own_session() {
    // It must keep reading the PUBACKs that drain that session.
    let (b, t0) = broker_with(|c| c.limits.backpressure_queued = 2);
    let mut c = connect_packet(Protocol::V5, "loop", true);
    c.properties.receive_maximum = Some(1);
    let (mut me, _) = Client::new(&b, c, t0);
    me.subscribe("self", QoS::AtLeastOnce, t0);
    for pid in 1..=5 {
        me.publish("self", b"m", QoS::AtLeastOnce, Some(pid), t0);
        assert!(!me.conn.is_paused(), "paused by its own queue at {pid}");
    }
}

// ---- security: connect verdicts, ACL, quotas ------------------------------

mod security {
    use super::*;
    use millet::protocol::ConnectVerdict;
    use millet::security::acl::{Action, Permission, Rule};
    use millet::security::{Security, SecurityConfig};

    fn secure_broker(
        rules: Vec<Rule>,
        f: impl FnOnce(&mut SecurityConfig),
    ) -> (Arc<Broker>, Instant) {
        let mut sc = SecurityConfig::default();
        f(&mut sc);
        let sec = Security::from_config(sc).expect("security config");
        sec.acl.set_rules(rules).expect("valid rules");
        let mut cfg = Config::default();
        cfg.sys_interval = 0;
        let now = Instant::now();
        (
            Arc::new(Broker::new(cfg, now).with_security(Arc::new(sec))),
            now,
        )
    }

    fn connect_with(
        b: &Arc<Broker>,
        c: Connect,
        v: ConnectVerdict,
        now: Instant,
    ) -> (Client, ConnAck) {
        let mut cl = Client {
            conn: Connection::new(shared_for(b, engine_for(b)), now),
            engine: engine_for(b),
            verdict: None,
            proto: c.protocol,
            wire: BytesMut::new(),
            backlog: Vec::new(),
        };
        cl.verdict = Some(v);
        cl.send(Packet::Connect(Box::new(c)), now);
        let mut pkts = cl.recv(now);
        match pkts.first() {
            Some(Packet::ConnAck(a)) => {
                let a = a.clone();
                pkts.remove(0);
                cl.backlog = pkts;
                (cl, a)
            }
            other => panic!("expected CONNACK, got {other:?}"),
        }
    }

    fn rule(permission: Permission, action: Action, client_id: Option<&str>, t: &str) -> Rule {
        Rule {
            permission,
            action,
            username: None,
            client_id: client_id.map(str::to_string),
            topics: vec![t.to_string()],
        }
    }

    fn subscribe_codes(c: &mut Client, filters: &[&str], now: Instant) -> Vec<ReasonCode> {
        c.send(
            Packet::Subscribe(Subscribe {
                packet_id: 7,
                subscription_identifier: None,
                user_properties: vec![],
                filters: filters
                    .iter()
                    .map(|f| {
                        (
                            bytestring::ByteString::from(*f),
                            SubscriptionOptions::default(),
                        )
                    })
                    .collect(),
            }),
            now,
        );
        match c.recv(now).first() {
            Some(Packet::SubAck(a)) => a.reason_codes.clone(),
            other => panic!("expected SUBACK, got {other:?}"),
        }
    }

    #[test]
    fn refusing_verdicts_answer_connack_with_the_mapped_code_and_close() {
        let (b, t0) = broker();
        let cases = [
            (
                Protocol::V5,
                ReasonCode::BAD_USER_NAME_OR_PASSWORD,
                ReasonCode(0x86),
            ),
            (Protocol::V5, ReasonCode::NOT_AUTHORIZED, ReasonCode(0x87)),
            (Protocol::V5, ReasonCode::BANNED, ReasonCode(0x8A)),
            (Protocol::V5, ReasonCode::QUOTA_EXCEEDED, ReasonCode(0x97)),
            // 3.1.1 return codes 4 and 5, decoded back as 0x86 / 0x87
            (
                Protocol::V3_1_1,
                ReasonCode::BAD_USER_NAME_OR_PASSWORD,
                ReasonCode(0x86),
            ),
            (Protocol::V3_1_1, ReasonCode::BANNED, ReasonCode(0x87)),
        ];
        for (i, (proto, rc, want)) in cases.into_iter().enumerate() {
            let id = format!("refused-{i}");
            let (c, ack) = connect_with(
                &b,
                connect_packet(proto, &id, true),
                ConnectVerdict::refuse(rc),
                t0,
            );
            assert_eq!(ack.reason_code, want, "{proto:?} {rc}");
            assert!(c.conn.poll_close().is_some());
            assert!(c.conn.client_id().is_none());
        }
        assert_eq!(b.session_count(), 0);
    }

    #[test]
    fn verdict_rewrites_the_client_id_and_carries_per_client_rules() {
        let (b, t0) = secure_broker(vec![], |_| {});
        let v = ConnectVerdict {
            client_id: Some("cert-cn".into()),
            username: Some("cert-cn".into()),
            acl: vec![Rule::allow(Action::All, vec!["dev/%u/#".into()])],
            ..Default::default()
        };
        let (mut c, ack) = connect_with(&b, connect_packet(Protocol::V5, "claimed", true), v, t0);
        assert_eq!(ack.reason_code, ReasonCode::SUCCESS);
        assert_eq!(c.conn.client_id(), Some("cert-cn"));
        assert_eq!(
            subscribe_codes(&mut c, &["dev/cert-cn/+", "dev/other/+"], t0),
            vec![ReasonCode::SUCCESS, ReasonCode::NOT_AUTHORIZED]
        );
    }

    #[test]
    fn expired_credentials_close_the_connection_with_0x87() {
        // A JWT accepted at CONNECT stops being valid at its `exp`.
        let (b, t0) = secure_broker(vec![], |_| {});
        let v = ConnectVerdict {
            valid_for: Some(Duration::from_secs(30)),
            ..Default::default()
        };
        let (mut c, ack) = connect_with(&b, connect_packet(Protocol::V5, "jwt", true), v, t0);
        assert_eq!(ack.reason_code, ReasonCode::SUCCESS);
        assert_eq!(c.conn.poll_timeout(), Some(t0 + Duration::from_secs(30)));
        c.conn.handle_timeout(t0 + Duration::from_secs(29));
        assert!(c.conn.poll_close().is_none(), "still valid");
        c.conn.handle_timeout(t0 + Duration::from_secs(30));
        let got = c.recv(t0 + Duration::from_secs(30));
        assert!(
            matches!(got.last(), Some(Packet::Disconnect(d)) if d.reason_code == ReasonCode::NOT_AUTHORIZED),
            "{got:?}"
        );
        assert!(c.conn.poll_close().is_some());
        // negative: without an expiry there is no such deadline
        let (c2, _) = connect_with(
            &b,
            connect_packet(Protocol::V5, "pw", true),
            ConnectVerdict::default(),
            t0,
        );
        assert_eq!(c2.conn.poll_timeout(), None);
    }

    #[test]
    fn acl_denies_publish_and_subscribe_v5_and_v3() {
        let rules = vec![
            rule(Permission::Allow, Action::Subscribe, Some("watcher"), "#"),
            rule(Permission::Allow, Action::Publish, None, "up/%c/#"),
            rule(Permission::Allow, Action::Subscribe, None, "down/%c/#"),
        ];
        let (b, t0) = secure_broker(rules, |_| {});
        let mut w = Client::v5(&b, "watcher", t0);
        w.subscribe("#", QoS::AtLeastOnce, t0);
        let mut d5 = Client::v5(&b, "d5", t0);
        d5.publish("up/d5/t", b"ok", QoS::AtLeastOnce, Some(1), t0);
        d5.publish("up/other/t", b"no", QoS::AtLeastOnce, Some(2), t0);
        d5.publish("up/other/t", b"no", QoS::ExactlyOnce, Some(3), t0);
        d5.publish("up/other/t", b"no", QoS::AtMostOnce, None, t0);
        let p = d5.recv(t0);
        assert!(
            matches!(&p[..], [Packet::PubAck(a), Packet::PubAck(b), Packet::PubRec(c)]
                if a.packet_id == 1 && !a.reason_code.is_error()
                && b.packet_id == 2 && b.reason_code == ReasonCode::NOT_AUTHORIZED
                && c.packet_id == 3 && c.reason_code == ReasonCode::NOT_AUTHORIZED),
            "{p:?}"
        );
        assert_eq!(
            subscribe_codes(&mut d5, &["down/d5/#", "down/x/#", "#"], t0),
            vec![
                ReasonCode::SUCCESS,
                ReasonCode::NOT_AUTHORIZED,
                ReasonCode::NOT_AUTHORIZED
            ]
        );
        // 3.1.1 (drop): acknowledged as usual, never routed; SUBACK 0x80.
        let (mut d3, _) = Client::new(&b, connect_packet(Protocol::V3_1_1, "d3", true), t0);
        d3.publish("up/d5/t", b"no", QoS::AtLeastOnce, Some(4), t0);
        let p = d3.recv(t0);
        assert!(
            matches!(&p[..], [Packet::PubAck(a)] if a.packet_id == 4),
            "{p:?}"
        );
        assert!(d3.conn.poll_close().is_none());
        assert_eq!(
            subscribe_codes(&mut d3, &["down/x/#"], t0),
            vec![ReasonCode(0x80)]
        );
        let got = w.recv(t0);
        let got = publishes(&got);
        assert_eq!(got.len(), 1, "{got:?}");
        assert_eq!(&*got[0].topic, "up/d5/t");
    }

    #[test]
    fn v3_deny_action_disconnect_closes() {
        let rules = vec![rule(Permission::Allow, Action::Publish, None, "ok")];
        let (b, t0) = secure_broker(rules, |s| {
            s.acl.v3_deny_action = millet::security::V3DenyAction::Disconnect;
        });
        let (mut d3, _) = Client::new(&b, connect_packet(Protocol::V3_1_1, "d3", true), t0);
        d3.publish("nope", b"x", QoS::AtLeastOnce, Some(1), t0);
        assert!(d3.recv(t0).is_empty());
        assert_eq!(
            d3.conn.poll_close().map(|c| c.reason),
            Some(ReasonCode::NOT_AUTHORIZED)
        );
    }

    #[test]
    fn will_topic_outside_the_acl_refuses_the_connect() {
        let rules = vec![rule(Permission::Allow, Action::Publish, None, "wills/%c")];
        let (b, t0) = secure_broker(rules, |_| {});
        let will = |t: &str| LastWill {
            topic: t.into(),
            payload: bytes::Bytes::from_static(b"gone"),
            qos: QoS::AtMostOnce,
            retain: false,
            properties: Default::default(),
        };
        let mut c = connect_packet(Protocol::V5, "w1", true);
        c.will = Some(will("elsewhere"));
        let (_, ack) = Client::new(&b, c, t0);
        assert_eq!(ack.reason_code, ReasonCode::NOT_AUTHORIZED);
        let mut c = connect_packet(Protocol::V5, "w2", true);
        c.will = Some(will("wills/w2"));
        let (_, ack) = Client::new(&b, c, t0);
        assert_eq!(ack.reason_code, ReasonCode::SUCCESS);
    }

    #[test]
    fn message_rate_quota_disconnects_with_0x96_or_throttles() {
        let (b, t0) = secure_broker(vec![], |s| {
            s.quota.messages_per_sec = 1.0;
            s.quota.messages_burst = 2.0;
        });
        let mut c = Client::v5(&b, "fast", t0);
        for i in 1..=3 {
            c.publish("t", b"x", QoS::AtMostOnce, None, t0);
            if i < 3 {
                assert!(c.conn.poll_close().is_none());
            }
        }
        let p = c.recv(t0);
        assert!(
            matches!(&p[..], [Packet::Disconnect(d)] if d.reason_code == ReasonCode::MESSAGE_RATE_TOO_HIGH),
            "{p:?}"
        );
        // back-pressure mode: accepted, then not read until the bucket refills
        let (b, t0) = secure_broker(vec![], |s| {
            s.quota.messages_per_sec = 1.0;
            s.quota.messages_burst = 1.0;
            s.quota.on_exceeded = millet::security::quota::ExceededAction::Backpressure;
        });
        let mut c = Client::v5(&b, "slowed", t0);
        c.publish("t", b"x", QoS::AtMostOnce, None, t0);
        assert!(!c.conn.is_paused());
        c.publish("t", b"x", QoS::AtMostOnce, None, t0);
        assert!(c.conn.is_paused() && c.conn.poll_close().is_none());
        let until = c.conn.poll_timeout().expect("throttle deadline");
        assert!(until > t0 && until <= t0 + Duration::from_secs(1));
        c.conn.handle_timeout(until);
        assert!(!c.conn.is_paused());
    }
}

#[test]
fn server_redirection_answers_with_the_server_reference() {
    // [MQTT-4.11]: CONNACK 0x9C / 0x9D carry a Server Reference; 3.1.1 gets 3 (unavailable).
    let (b, t0) = broker_with(|c| c.server_reference = Some("other.example:1883".into()));
    let (c, ack) = Client::new(&b, connect_packet(Protocol::V5, "moved", true), t0);
    assert_eq!(ack.reason_code, ReasonCode::USE_ANOTHER_SERVER);
    assert_eq!(
        ack.properties.server_reference.as_deref(),
        Some("other.example:1883")
    );
    assert!(c.conn.poll_close().is_some());
    let (_, ack) = Client::new(&b, connect_packet(Protocol::V3_1_1, "moved3", true), t0);
    assert_eq!(ack.reason_code, ReasonCode::SERVER_UNAVAILABLE);
    let (b, t0) = broker_with(|c| {
        c.server_reference = Some("new.example".into());
        c.server_moved = true;
    });
    let (_, ack) = Client::new(&b, connect_packet(Protocol::V5, "moved", true), t0);
    assert_eq!(ack.reason_code, ReasonCode::SERVER_MOVED);
}

/// The wire size of every packet the server has written so far.
fn wire_sizes(cl: &mut Client, now: Instant) -> Vec<(&'static str, usize)> {
    cl.conn.poll_transmit(now, &mut cl.wire);
    let mut out = Vec::new();
    loop {
        let before = cl.wire.len();
        match decode(&mut cl.wire, Some(cl.proto), usize::MAX).expect("valid packet") {
            Some(p) => out.push((p.name(), before - cl.wire.len())),
            None => break,
        }
    }
    out
}

fn v5_with_max_packet(b: &Arc<Broker>, id: &str, max: u32, now: Instant) -> Client {
    let mut c = connect_packet(Protocol::V5, id, true);
    c.properties.maximum_packet_size = Some(max);
    let mut cl = Client {
        conn: Connection::new(shared_for(b, engine_for(b)), now),
        engine: engine_for(b),
        verdict: None,
        proto: Protocol::V5,
        wire: BytesMut::new(),
        backlog: Vec::new(),
    };
    cl.send(Packet::Connect(Box::new(c)), now);
    cl
}

#[test]
fn connack_leaves_out_default_flags_to_fit_a_small_maximum_packet_size() {
    // [MQTT-3.1.2-24]: nothing bigger than the client's maximum, CONNACK included.
    let (b, t0) = broker();
    let mut roomy = v5_with_max_packet(&b, "roomy", 1024, t0);
    let full = wire_sizes(&mut roomy, t0);
    assert_eq!(full[0].0, "CONNACK");
    let small = (full[0].1 - 4) as u32; // the four `true` flags take 8 bytes
    let mut cl = v5_with_max_packet(&b, "small", small, t0);
    let got = wire_sizes(&mut cl, t0);
    assert_eq!(got.len(), 1, "{got:?}");
    assert_eq!(got[0].0, "CONNACK");
    assert!(got[0].1 <= small as usize, "{got:?} > {small}");
    assert!(cl.conn.poll_close().is_none());
}

#[test]
fn a_client_too_small_for_any_connack_is_closed_without_one() {
    // The reproducer from docs/FUZZING.md: Maximum Packet Size 3.
    let (b, t0) = broker();
    let mut cl = v5_with_max_packet(&b, "tiny", 3, t0);
    let got = wire_sizes(&mut cl, t0);
    assert!(got.is_empty(), "{got:?}");
    let close = cl.conn.poll_close().expect("closed");
    assert_eq!(close.reason, ReasonCode::PACKET_TOO_LARGE);
    cl.closed(t0);
    // The session was released: the same client id connects normally.
    let (_, ack) = Client::new(&b, connect_packet(Protocol::V5, "tiny", true), t0);
    assert_eq!(ack.reason_code, ReasonCode::SUCCESS);
}

#[test]
fn suback_too_big_for_the_client_is_discarded() {
    let (b, t0) = broker();
    let mut cl = v5_with_max_packet(&b, "s", 40, t0);
    assert_eq!(wire_sizes(&mut cl, t0)[0].0, "CONNACK");
    let filters = (0..50)
        .map(|i| (format!("f/{i}").into(), SubscriptionOptions::default()))
        .collect();
    cl.send(
        Packet::Subscribe(Subscribe {
            packet_id: 7,
            subscription_identifier: None,
            user_properties: vec![],
            filters,
        }),
        t0,
    );
    // 50 reason codes do not fit in 40 bytes: no SUBACK [MQTT-3.1.2-24] ...
    assert!(wire_sizes(&mut cl, t0).is_empty());
    // ... but the connection goes on, and a small SUBACK gets through.
    cl.subscribe("one", QoS::AtMostOnce, t0);
    assert!(cl.conn.poll_close().is_none());
}

#[test]
fn dup_resend_too_big_for_a_lowered_maximum_is_dropped_as_delivered() {
    // [MQTT-3.1.2-25]: a resumed client that lowered its Maximum Packet Size
    // does not get the in-flight message that no longer fits, and its window
    // is freed.
    let (b, t0) = broker();
    let mut c = connect_packet(Protocol::V5, "low", false);
    c.properties.session_expiry_interval = Some(60);
    let (mut sub, _) = Client::new(&b, c.clone(), t0);
    sub.subscribe("big", QoS::AtLeastOnce, t0);
    let mut p = Client::v5(&b, "p", t0);
    p.send(
        Packet::Publish(Publish {
            topic: "big".into(),
            payload: bytes::Bytes::from(vec![b'x'; 200]),
            qos: QoS::AtLeastOnce,
            packet_id: Some(1),
            ..Default::default()
        }),
        t0,
    );
    assert_eq!(publishes(&sub.recv(t0)).len(), 1);
    sub.closed(t0);
    c.clean_start = false;
    c.properties.maximum_packet_size = Some(100);
    let (mut sub, ack) = Client::new(&b, c.clone(), t0);
    assert!(ack.session_present);
    assert!(publishes(&sub.recv(t0)).is_empty());
    // Not resent on the next resume either: it was forgotten.
    sub.closed(t0);
    c.properties.maximum_packet_size = None;
    let (mut sub, _) = Client::new(&b, c, t0);
    assert!(publishes(&sub.recv(t0)).is_empty());
}

#[test]
fn dup_resend_on_a_plain_reconnect_waits_until_the_inflight_record_is_durable() {
    // A QoS 2 message moved from the queue to the in-flight window just
    // before its subscriber reconnected: if the client could PUBREC the DUP
    // before that move is durable, a crash would bring the message back from
    // the queue under a new packet id, delivered twice [MQTT-4.3.3].
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = Config::default();
    cfg.sys_interval = 0;
    cfg.data_dir = dir.path().to_path_buf();
    let t0 = Instant::now();
    let b = Arc::new(Broker::open(cfg, t0).unwrap());
    let store = b.persistence().expect("the default config has a store");
    let mut c = connect_packet(Protocol::V5, "dur", false);
    c.properties.session_expiry_interval = Some(300);
    let (mut sub, _) = Client::new(&b, c.clone(), t0);
    sub.subscribe("q2", QoS::ExactlyOnce, t0);
    let mut p = Client::v5(&b, "p", t0);
    store
        .wait_durable(store.submitted_seq(), Duration::from_secs(30))
        .unwrap();

    store.pause_writes(true); // a disk that has not synced yet
    p.publish("q2", b"once", QoS::ExactlyOnce, Some(1), t0);
    assert!(
        publishes(&sub.recv(t0)).is_empty(),
        "first send waits (held)"
    );
    sub.closed(t0);
    let (mut sub, ack) = Client::new(&b, c, t0);
    assert!(ack.session_present);
    assert!(
        publishes(&sub.recv(t0)).is_empty(),
        "the DUP resend must wait for the store"
    );

    store.pause_writes(false);
    store
        .wait_durable(store.submitted_seq(), Duration::from_secs(30))
        .unwrap();
    // Durable in the store; an engine that answers later (the delaying
    // one) says so after its delay, and wakes the connection then.
    let got = sub.recv_once_woken(t0);
    let got = publishes(&got);
    assert_eq!(got.len(), 1, "{got:?}");
    assert!(got[0].dup);
    assert_eq!(got[0].qos, QoS::ExactlyOnce);
}

#[test]
fn displaced_qos0_messages_do_not_come_back_after_a_restart() {
    // A full queue drops its oldest QoS 0 message for a new QoS 1 one; a
    // stored QoS 0 entry must be deleted then, or a restart (here with a
    // larger queue) brings it back (issue 11 item 2).
    let dir = tempfile::tempdir().unwrap();
    let open = |max_queued: usize| {
        let mut cfg = Config::default();
        cfg.sys_interval = 0;
        cfg.data_dir = dir.path().to_path_buf();
        cfg.store.persist_qos0 = true;
        cfg.limits.max_queued = max_queued;
        Arc::new(Broker::open(cfg, Instant::now()).unwrap())
    };
    let t0 = Instant::now();
    let b = open(3);
    let mut c = connect_packet(Protocol::V5, "off", false);
    c.properties.session_expiry_interval = Some(300);
    let (mut sub, _) = Client::new(&b, c.clone(), t0);
    sub.subscribe("t", QoS::AtLeastOnce, t0);
    sub.closed(t0);
    let mut p = Client::v5(&b, "p", t0);
    let sent: [(&'static [u8], QoS); 6] = [
        (b"a", QoS::AtMostOnce),
        (b"b", QoS::AtLeastOnce),
        (b"c", QoS::AtMostOnce),
        (b"d", QoS::AtLeastOnce), // displaces a
        (b"e", QoS::AtLeastOnce), // displaces c
        (b"f", QoS::AtLeastOnce), // dropped: nothing left to displace
    ];
    for (i, (payload, qos)) in sent.into_iter().enumerate() {
        let pid = (qos != QoS::AtMostOnce).then_some(i as u16 + 1);
        p.publish("t", payload, qos, pid, t0);
    }
    let store = b.persistence().expect("the default config has a store");
    store
        .wait_durable(store.submitted_seq(), Duration::from_secs(30))
        .unwrap();
    drop(p);
    drop(sub);
    drop(b);

    let b = open(10);
    let t1 = Instant::now();
    let (mut sub, ack) = Client::new(&b, c, t1);
    assert!(ack.session_present);
    let got = sub.recv(t1);
    let got: Vec<&[u8]> = publishes(&got).iter().map(|p| &p.payload[..]).collect();
    assert_eq!(got, [&b"b"[..], b"d", b"e"]);
}

#[test]
fn outbound_topic_aliases_are_remapped_past_the_maximum_and_reset_per_connection() {
    let (b, t0) = broker();
    let mut c = connect_packet(Protocol::V5, "s", false);
    c.properties.topic_alias_maximum = Some(2);
    c.properties.session_expiry_interval = Some(60);
    let (mut sub, _) = Client::new(&b, c.clone(), t0);
    sub.subscribe("x/#", QoS::AtMostOnce, t0);
    let mut p = Client::v5(&b, "p", t0);
    for t in ["x/1", "x/2", "x/1", "x/3", "x/2", "x/1"] {
        p.publish(t, b"m", QoS::AtMostOnce, None, t0);
    }
    let got = sub.recv(t0);
    let got: Vec<(String, Option<u16>)> = publishes(&got)
        .iter()
        .map(|p| (p.topic.to_string(), p.properties.topic_alias))
        .collect();
    let s = |t: &str, a: u16| (t.to_string(), Some(a));
    assert_eq!(
        got,
        [
            s("x/1", 1),
            s("x/2", 2),
            s("", 1),    // x/1, used again: keeps its alias
            s("x/3", 2), // x/2 loses alias 2
            s("x/2", 1), // x/1 was passed over once; now it goes
            s("x/1", 2),
        ]
    );
    // A new connection starts with no aliases.
    sub.closed(t0);
    let (mut sub, _) = Client::new(&b, c, t0);
    p.publish("x/3", b"m", QoS::AtMostOnce, None, t0);
    let got = sub.recv(t0);
    let got = publishes(&got);
    assert_eq!(
        (&*got[0].topic, got[0].properties.topic_alias),
        ("x/3", Some(1))
    );
}

/// Issue 11 item 6: the broker-wide byte count follows queue → in flight →
/// acknowledged exactly, QoS 0 is not queued for an offline session, and
/// the retained caps refuse a new topic (v5 0x97) but not a replacement.
#[test]
fn memory_accounting_qos0_offline_and_retained_caps() {
    let (b, t0) = broker_with(|c| {
        c.limits.max_retained_messages = 1;
    });
    let mut c = connect_packet(Protocol::V5, "off", false);
    c.properties.session_expiry_interval = Some(1000);
    let (mut sub, _) = Client::new(&b, c.clone(), t0);
    sub.subscribe("m/#", QoS::AtLeastOnce, t0);
    sub.closed(t0);
    let mut p = Client::v5(&b, "p", t0);
    p.publish("m/zero", b"0123456789", QoS::AtMostOnce, None, t0);
    p.publish("m/one", b"0123456789", QoS::AtLeastOnce, Some(1), t0);
    p.recv(t0);
    millet::budget::Meter::flush_local();
    let one = (15 + millet::session::DELIVERY_OVERHEAD) as u64;
    assert_eq!(
        b.node.memory_used(),
        one,
        "only the QoS 1 message is queued: topic + payload + slot"
    );
    let (mut sub, _) = Client::new(&b, c, t0);
    let got = sub.recv(t0);
    let got = publishes(&got);
    assert_eq!(got.len(), 1, "QoS 0 was not queued offline: {got:?}");
    let pid = got[0].packet_id.expect("QoS 1");
    millet::budget::Meter::flush_local();
    assert_eq!(b.node.memory_used(), one, "in flight still counts");
    sub.send(Packet::PubAck(PubResp::new(pid)), t0);
    millet::budget::Meter::flush_local();
    assert_eq!(b.node.memory_used(), 0);
    // Retained: one topic allowed; a second new one refused, a replacement not.
    let retained = |p: &mut Client, topic: &str, pid: u16| {
        p.send(
            Packet::Publish(Publish {
                topic: topic.into(),
                payload: bytes::Bytes::from_static(b"r"),
                qos: QoS::AtLeastOnce,
                packet_id: Some(pid),
                retain: true,
                ..Default::default()
            }),
            t0,
        );
        match p.recv(t0).first() {
            Some(Packet::PubAck(a)) => a.reason_code,
            other => panic!("expected PUBACK, got {other:?}"),
        }
    };
    assert!(!retained(&mut p, "r/a", 2).is_error());
    assert_eq!(retained(&mut p, "r/b", 3), ReasonCode::QUOTA_EXCEEDED);
    assert!(!retained(&mut p, "r/a", 4).is_error());
    assert_eq!(b.retained_count_without_sys(), 1);
}

/// An engine whose durability the test decides (everything else is the
/// broker's): a ticket is pending until the gate opens, however durable the
/// store already is. Shows that acknowledgements wait for the engine's
/// word, as a networked engine's would, not for the local store.
struct DurabilityGate {
    inner: Arc<Broker>,
    open: std::sync::atomic::AtomicBool,
    waiting: parking_lot::Mutex<Vec<Arc<millet::session::ConnWaker>>>,
}

impl DurabilityGate {
    fn open(&self) {
        self.open.store(true, std::sync::atomic::Ordering::SeqCst);
        for w in self.waiting.lock().drain(..) {
            w.wake();
        }
    }
}

impl Engine for DurabilityGate {
    fn attach(
        &self,
        req: millet::engine::AttachRequest,
        reply_to: &Arc<millet::session::ConnWaker>,
        now: Instant,
    ) -> Call {
        Engine::attach(&*self.inner, req, reply_to, now)
    }
    fn subscribe(
        &self,
        req: millet::engine::SubscribeRequest,
        reply_to: &Arc<millet::session::ConnWaker>,
        now: Instant,
    ) -> Call {
        Engine::subscribe(&*self.inner, req, reply_to, now)
    }
    fn unsubscribe(
        &self,
        req: millet::engine::UnsubscribeRequest,
        reply_to: &Arc<millet::session::ConnWaker>,
        now: Instant,
    ) -> Call {
        Engine::unsubscribe(&*self.inner, req, reply_to, now)
    }
    fn detach(
        &self,
        cell: &Arc<millet::session::SessionCell>,
        epoch: u64,
        publish_will: bool,
        expiry_override: Option<u32>,
        now: Instant,
    ) {
        Engine::detach(
            &*self.inner,
            cell,
            epoch,
            publish_will,
            expiry_override,
            now,
        )
    }
    fn publish(
        &self,
        msg: Arc<millet::session::Message>,
        publisher: Option<&Arc<millet::session::ConnWaker>>,
        now: Instant,
    ) -> millet::broker::Routed {
        Engine::publish(&*self.inner, msg, publisher, now)
    }
    fn ticket_status(&self, ticket: millet::engine::Ticket) -> millet::engine::AckStatus {
        if self.open.load(std::sync::atomic::Ordering::SeqCst) || ticket.is_none() {
            Engine::ticket_status(&*self.inner, ticket)
        } else {
            millet::engine::AckStatus::Pending
        }
    }
    fn ticket_wait(&self, ticket: millet::engine::Ticket, waker: &Arc<millet::session::ConnWaker>) {
        if self.open.load(std::sync::atomic::Ordering::SeqCst) {
            Engine::ticket_wait(&*self.inner, ticket, waker);
        } else {
            self.waiting.lock().push(waker.clone());
        }
    }
    fn last_ticket(&self) -> millet::engine::Ticket {
        Engine::last_ticket(&*self.inner)
    }
    fn session_writes<'a>(
        &'a self,
        client_id: &'a bytestring::ByteString,
        session: &millet::session::Session,
    ) -> millet::engine::SessionWrites<'a> {
        Engine::session_writes(&*self.inner, client_id, session)
    }
    fn assign_client_id(&self) -> bytestring::ByteString {
        Engine::assign_client_id(&*self.inner)
    }
    fn handle_timeout(&self, now: Instant) {
        Engine::handle_timeout(&*self.inner, now);
    }
    fn admit_session(&self, client_id: &str) -> Result<(), millet::broker::SessionRefusal> {
        Engine::admit_session(&*self.inner, client_id)
    }
    fn retained_admits(&self, topic: &str, bytes: u64) -> bool {
        Engine::retained_admits(&*self.inner, topic, bytes)
    }
    fn replay_retained(
        &self,
        cell: &Arc<millet::session::SessionCell>,
        replay: &millet::session::DeferredReplay,
        now: Instant,
    ) {
        Engine::replay_retained(&*self.inner, cell, replay, now)
    }
    fn acks_early(&self) -> bool {
        false
    }
}

#[test]
fn acknowledgements_wait_for_the_engine_to_say_durable() {
    // [MQTT-4.3.2-2] / [MQTT-4.3.3-2]: PUBACK and PUBREC mean the server owns
    // the message; with an engine across a network that is when the engine
    // says the message is durable, not when the local store is.
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = Config::default();
    cfg.sys_interval = 0;
    cfg.data_dir = dir.path().to_path_buf();
    let t0 = Instant::now();
    let b = Arc::new(Broker::open(cfg, t0).unwrap());
    let gate = Arc::new(DurabilityGate {
        inner: b.clone(),
        open: Default::default(),
        waiting: Default::default(),
    });
    // A persistent subscriber: the messages must be stored for it.
    let mut c = connect_packet(Protocol::V5, "keeper", false);
    c.properties.session_expiry_interval = Some(300);
    let (mut sub, _) = Client::new(&b, c, t0);
    sub.subscribe("g/#", QoS::ExactlyOnce, t0);
    sub.closed(t0);
    let (mut p, _) = Client::on_engine(
        &b,
        gate.clone(),
        connect_packet(Protocol::V5, "gated", true),
        t0,
    );
    p.publish("g/1", b"one", QoS::AtLeastOnce, Some(1), t0);
    p.publish("g/2", b"two", QoS::ExactlyOnce, Some(2), t0);
    p.publish("g/3", b"three", QoS::AtMostOnce, None, t0);
    let store = b.persistence().expect("the default config has a store");
    store
        .wait_durable(store.submitted_seq(), Duration::from_secs(30))
        .unwrap();
    let early = p.recv(t0);
    assert!(
        early.is_empty(),
        "the store is durable, but the engine has not said so: {early:?}"
    );
    assert!(
        !gate.waiting.lock().is_empty(),
        "the connection waits for the engine"
    );
    p.conn.waker().clear();
    gate.open();
    assert!(
        p.conn.waker().clear(),
        "opening the gate woke the connection"
    );
    let got = p.recv(t0);
    assert!(
        matches!(&got[..], [Packet::PubAck(a), Packet::PubRec(r)]
            if a.packet_id == 1 && r.packet_id == 2 && a.reason_code == ReasonCode::SUCCESS),
        "{got:?}"
    );
}

// ---- hooks: authorization that answers later, and events --------------------

/// Hooks that ask (answer later) for every topic or filter under `slow/`,
/// allowing it unless it contains `deny`, and record every event. Closed,
/// the answers wait for [`GateHooks::release`]; open, each is given at once
/// (still through the pending path: `Call::Later`).
#[derive(Default)]
struct GateHooks {
    open: std::sync::atomic::AtomicBool,
    waiting: parking_lot::Mutex<Vec<(millet::hooks::AuthorizeRequest, Arc<millet::engine::Reply>)>>,
    asked: std::sync::atomic::AtomicUsize,
    events: parking_lot::Mutex<Vec<String>>,
}

impl GateHooks {
    fn open() -> Arc<GateHooks> {
        let h = GateHooks::default();
        h.open.store(true, std::sync::atomic::Ordering::SeqCst);
        Arc::new(h)
    }

    fn verdicts(req: &millet::hooks::AuthorizeRequest) -> millet::engine::Completion {
        millet::engine::Completion::Authorized(
            req.topics.iter().map(|t| !t.contains("deny")).collect(),
        )
    }

    /// Answer every authorization waiting.
    fn release(&self) {
        for (req, reply) in self.waiting.lock().drain(..) {
            reply
                .complete(GateHooks::verdicts(&req))
                .expect("connection alive");
        }
    }

    fn events(&self) -> Vec<String> {
        std::mem::take(&mut *self.events.lock())
    }
}

impl Hooks for GateHooks {
    fn authorize_now(
        &self,
        _client: &millet::hooks::Client<'_>,
        _access: millet::security::acl::Access,
        topic: &str,
    ) -> millet::hooks::Authorization {
        if topic.starts_with("slow/") {
            millet::hooks::Authorization::Ask
        } else {
            millet::hooks::Authorization::Allow
        }
    }

    fn authorize(
        &self,
        req: millet::hooks::AuthorizeRequest,
        reply_to: &Arc<millet::session::ConnWaker>,
        _now: Instant,
    ) -> Call {
        self.asked
            .fetch_add(req.topics.len(), std::sync::atomic::Ordering::SeqCst);
        let (reply, pending) = millet::engine::Reply::new(reply_to);
        if self.open.load(std::sync::atomic::Ordering::SeqCst) {
            reply
                .complete(GateHooks::verdicts(&req))
                .expect("pending kept");
        } else {
            self.waiting.lock().push((req, reply));
        }
        Call::Later(pending)
    }

    fn observes(&self) -> bool {
        true
    }

    fn event(&self, e: &millet::hooks::Event<'_>) {
        use millet::hooks::Event;
        let line = match e {
            Event::Connected {
                client_id,
                session_present,
                ..
            } => format!("connected {client_id} {session_present}"),
            Event::Published {
                client_id,
                msg,
                sessions,
            } => format!("published {client_id} {} {sessions}", msg.topic),
            Event::Subscribed {
                client_id,
                filter,
                qos,
            } => format!("subscribed {client_id} {filter} {}", *qos as u8),
            Event::Unsubscribed {
                client_id,
                filter,
                existed,
            } => format!("unsubscribed {client_id} {filter} {existed}"),
            Event::Delivered {
                client_id,
                msg,
                qos,
            } => format!("delivered {client_id} {} {}", msg.topic, *qos as u8),
            Event::Disconnected { client_id, close } => {
                format!("disconnected {client_id} {:?}", close.map(|c| c.reason.0))
            }
        };
        self.events.lock().push(line);
    }
}

impl Client {
    /// A client whose connection's hooks are `hooks`.
    fn with_hooks(
        b: &Arc<Broker>,
        hooks: Arc<dyn Hooks>,
        c: Connect,
        now: Instant,
    ) -> (Client, ConnAck) {
        let engine = engine_for(b);
        let shared = Shared::with_hooks(b.node.clone(), engine.clone(), hooks);
        Client::on_shared(shared, engine, c, now)
    }

    /// Hand over the connection's requests, opening `gate` for each
    /// authorization it waits for.
    fn drive(&mut self, gate: &GateHooks, now: Instant) {
        while let Some(request) = self.conn.poll_request() {
            let waker = self.conn.waker().clone();
            let call = submit(&*self.engine, self.conn.hooks(), request, &waker, now);
            gate.release();
            let done = match call {
                Call::Ready(done) => done,
                Call::Later(p) => p.wait(Duration::from_secs(10)).expect("answered"),
            };
            self.conn.handle_completion(done, now);
        }
    }
}

/// A SUBSCRIBE of `filters`, each at `qos`.
fn subscribe_to(packet_id: u16, filters: &[&str], qos: QoS) -> Packet {
    Packet::Subscribe(Subscribe {
        packet_id,
        subscription_identifier: None,
        user_properties: vec![],
        filters: filters
            .iter()
            .map(|f| {
                (
                    bytestring::ByteString::from(*f),
                    SubscriptionOptions {
                        qos,
                        ..Default::default()
                    },
                )
            })
            .collect(),
    })
}

fn qos1(topic: &str, pid: u16) -> Packet {
    Packet::Publish(Publish {
        topic: topic.into(),
        payload: bytes::Bytes::from_static(b"x"),
        qos: QoS::AtLeastOnce,
        packet_id: Some(pid),
        ..Default::default()
    })
}

#[test]
fn publishes_wait_in_order_for_an_authorization_that_answers_later() {
    let (b, now) = broker();
    let gate = Arc::new(GateHooks::default());
    let mut sub = Client::v5(&b, "sub", now);
    sub.subscribe("#", QoS::AtLeastOnce, now);
    let (mut p, ack) = Client::with_hooks(
        &b,
        gate.clone(),
        connect_packet(Protocol::V5, "p", true),
        now,
    );
    assert_eq!(ack.reason_code, ReasonCode::SUCCESS);
    // The first PUBLISH waits for the hooks; the next two are held behind it.
    p.conn.handle_packet(qos1("slow/1", 1), now);
    let request = p.conn.poll_request().expect("the hooks are asked");
    assert!(matches!(request, millet::engine::Request::Authorize(_)));
    assert!(!p.conn.accepts_packets());
    let waker = p.conn.waker().clone();
    let Call::Later(pending) = submit(&*p.engine, p.conn.hooks(), request, &waker, now) else {
        panic!("the gate answers later");
    };
    p.conn.handle_packet(qos1("fast/2", 2), now);
    p.conn.handle_packet(qos1("slow/deny/3", 3), now);
    assert!(
        p.recv(now).is_empty(),
        "nothing is acknowledged before the answer"
    );
    assert!(
        sub.recv(now).is_empty(),
        "nothing is routed before the answer"
    );
    gate.release();
    let done = pending.wait(Duration::from_secs(10)).expect("answered");
    p.conn.handle_completion(done, now);
    // fast/2 is handled at once; slow/deny/3 asks again.
    p.drive(&gate, now);
    let mut acks = Vec::new();
    while acks.len() < 3 {
        let got = p.recv_once_woken(now);
        assert!(!got.is_empty(), "PUBACKs missing after {acks:?}");
        acks.extend(got);
    }
    assert_eq!(
        acks,
        vec![
            Packet::PubAck(PubResp::new(1)),
            Packet::PubAck(PubResp::new(2)),
            Packet::PubAck(PubResp::with_reason(3, ReasonCode::NOT_AUTHORIZED)),
        ]
    );
    let got = sub.recv_once_woken(now);
    let topics: Vec<&str> = publishes(&got).iter().map(|x| &*x.topic).collect();
    assert_eq!(
        topics,
        ["slow/1", "fast/2"],
        "in order, the denied one not routed"
    );
    assert_eq!(gate.asked.load(std::sync::atomic::Ordering::SeqCst), 2);
}

#[test]
fn subscribe_filters_are_authorized_by_hooks_that_answer_later() {
    let (b, now) = broker();
    let gate = GateHooks::open();
    let (mut c, _) = Client::with_hooks(
        &b,
        gate.clone(),
        connect_packet(Protocol::V5, "s", true),
        now,
    );
    c.send(
        subscribe_to(
            4,
            &["a/#", "slow/ok", "slow/deny", "slow/+/x"],
            QoS::AtLeastOnce,
        ),
        now,
    );
    let p = c.recv_once_woken(now);
    let Some(Packet::SubAck(a)) = p.first() else {
        panic!("expected SUBACK, got {p:?}");
    };
    assert_eq!(a.packet_id, 4);
    assert_eq!(
        a.reason_codes,
        vec![
            ReasonCode::GRANTED_QOS_1,
            ReasonCode::GRANTED_QOS_1,
            ReasonCode::NOT_AUTHORIZED,
            ReasonCode::GRANTED_QOS_1,
        ]
    );
    // Only the three under slow/ were asked, in one request.
    assert_eq!(gate.asked.load(std::sync::atomic::Ordering::SeqCst), 3);
}

#[test]
fn a_will_topic_the_hooks_refuse_later_refuses_the_connect() {
    let (b, now) = broker();
    let gate = GateHooks::open();
    let will = |topic: &str| LastWill {
        topic: topic.into(),
        payload: bytes::Bytes::from_static(b"gone"),
        qos: QoS::AtMostOnce,
        retain: false,
        properties: WillProperties::default(),
    };
    let mut c = connect_packet(Protocol::V5, "w1", true);
    c.will = Some(will("slow/deny/will"));
    let (_, ack) = Client::with_hooks(&b, gate.clone(), c, now);
    assert_eq!(ack.reason_code, ReasonCode::NOT_AUTHORIZED);
    let mut c = connect_packet(Protocol::V3_1_1, "w2", true);
    c.will = Some(will("slow/deny/will"));
    let (_, ack) = Client::with_hooks(&b, gate.clone(), c, now);
    // 3.1.1 return code 5, which the codec reads back as 0x87.
    assert_eq!(
        ack.reason_code,
        ReasonCode::NOT_AUTHORIZED,
        "3.1.1: not authorized"
    );
    let mut c = connect_packet(Protocol::V5, "w3", true);
    c.will = Some(will("slow/will"));
    let (_, ack) = Client::with_hooks(&b, gate.clone(), c, now);
    assert_eq!(ack.reason_code, ReasonCode::SUCCESS);
    assert_eq!(gate.asked.load(std::sync::atomic::Ordering::SeqCst), 3);
}

#[test]
fn hooks_see_connect_subscribe_publish_deliver_unsubscribe_and_disconnect() {
    let (b, now) = broker();
    let gate = GateHooks::open();
    let (mut c, _) = Client::with_hooks(
        &b,
        gate.clone(),
        connect_packet(Protocol::V5, "ev", true),
        now,
    );
    c.send(subscribe_to(1, &["e/#"], QoS::AtLeastOnce), now);
    assert!(matches!(
        c.recv_once_woken(now).first(),
        Some(Packet::SubAck(_))
    ));
    c.send(qos1("e/1", 7), now);
    let mut got = Vec::new();
    while publishes(&got).is_empty() {
        let more = c.recv_once_woken(now);
        assert!(!more.is_empty(), "no delivery: {got:?}");
        got.extend(more);
    }
    c.send(
        Packet::Unsubscribe(Unsubscribe {
            packet_id: 2,
            user_properties: vec![],
            filters: vec!["e/#".into(), "none".into()],
        }),
        now,
    );
    assert!(matches!(
        c.recv_once_woken(now).first(),
        Some(Packet::UnsubAck(_))
    ));
    c.send(Packet::Disconnect(Disconnect::default()), now);
    c.closed(now);
    assert_eq!(
        gate.events(),
        [
            "connected ev false",
            "subscribed ev e/# 1",
            "published ev e/1 1",
            "delivered ev e/1 1",
            "unsubscribed ev e/# true",
            "unsubscribed ev none false",
            "disconnected ev Some(0)",
        ]
    );
}
