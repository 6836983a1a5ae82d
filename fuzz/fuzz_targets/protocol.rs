//! Protocol state machine fuzz target: a real in-memory `Broker` and three
//! `Connection`s driven without sockets on a fake clock, the way
//! `server::serve` drives them, by a sequence of operations read from the
//! input. After every step each connection's output is decoded and checked:
//!
//! - the server's bytes always decode cleanly (no error, no trailing partial
//!   packet) for the connection's protocol;
//! - the first packet is CONNACK; nothing follows a refusing CONNACK or a
//!   server DISCONNECT; there is only one CONNACK;
//! - a QoS 1/2 PUBLISH has a non-zero packet id, a QoS 0 one none;
//! - a new (non-DUP) QoS 1/2 PUBLISH never reuses a packet id the client has
//!   not released (PUBACK, PUBREC with an error, PUBCOMP), and never exceeds
//!   the client's Receive Maximum [MQTT-3.3.4-9];
//! - v5: no PUBLISH exceeds the client's Maximum Packet Size
//!   [MQTT-3.1.2-24]; outgoing topic aliases are within the client's Topic
//!   Alias Maximum and an alias-only PUBLISH uses an alias already set
//!   [MQTT-3.3.2-8, -10];
//! - and, as everywhere, no panic.
//!
//! Input format, repeated until the input runs out (one op byte, then its
//! arguments; `i = (op & 3) % 3` picks the connection, `op >> 2` the kind):
//!
//! - `0..=47`: `len: u8`, then `len` bytes the client sends on connection `i`
//!   (decoded with `millet_codec::decode` like the server does; decode errors
//!   go to `handle_decode_error`). Not read while the connection is paused.
//! - `48..=53`: `n: u8`, advance the clock `n` seconds; `54..=55`: `n: u8`,
//!   advance `n` hours. Then `Broker::handle_timeout` and every
//!   `Connection::handle_timeout`.
//! - `56..=59`: the socket of connection `i` is gone: `handle_closed`, and a
//!   new connection takes its place.
//! - `60..=61`: server shutdown for connection `i` (`handle_shutdown`).
//! - `62..=63`: nothing (just a poll round).
//!
//! A connection whose `poll_close` is set is closed (`handle_closed`) and
//! replaced after its output was checked, as the server does.

#![no_main]

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use libfuzzer_sys::fuzz_target;
use millet::broker::Broker;
use millet::config::Config;
use millet::protocol::{Connection, Shared};
use millet_codec::bytes::BytesMut;
use millet_codec::{decode, Packet, Protocol, QoS};

const NCONN: usize = 3;

/// `MILLET_FUZZ_TRACE=1`: print every packet both ways (to read a seed or a
/// crash input: `target/.../protocol <file>`).
fn trace() -> bool {
    static TRACE: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *TRACE.get_or_init(|| std::env::var_os("MILLET_FUZZ_TRACE").is_some())
}

/// What the fuzzing "client" has told the server, and what the server has
/// sent on one connection: enough to check the server's output.
#[derive(Default)]
struct Peer {
    /// The CONNECT the server handled (its limits apply to the server).
    connected: Option<ClientLimits>,
    /// Packets decoded from the server so far on this connection.
    received: usize,
    /// The server has ended the stream (DISCONNECT or a refusing CONNACK).
    ended: Option<&'static str>,
    /// Outgoing QoS 1/2 packet ids not yet released by the client:
    /// id -> (qos, PUBREC received).
    inflight: HashMap<u16, (QoS, bool)>,
    /// Outgoing topic aliases the server has set.
    aliases: HashMap<u16, String>,
}

#[derive(Clone, Copy)]
struct ClientLimits {
    protocol: Protocol,
    receive_maximum: u16,
    topic_alias_maximum: u16,
    maximum_packet_size: usize,
}

struct Conn {
    conn: Connection,
    /// Bytes the client sent that the server has not read yet.
    socket: Vec<u8>,
    /// The server's read buffer.
    rbuf: BytesMut,
    peer: Peer,
}

impl Conn {
    fn new(broker: &Arc<Broker>, now: Instant) -> Conn {
        Conn {
            conn: Connection::new(Shared::embedded(broker.clone()), now),
            socket: Vec::new(),
            rbuf: BytesMut::new(),
            peer: Peer::default(),
        }
    }

    /// Read what the client sent (unless paused) and handle every complete
    /// packet, like `server::serve` step 1.
    fn pump(&mut self, broker: &Arc<Broker>, now: Instant) {
        if !self.conn.is_paused() && !self.socket.is_empty() {
            self.rbuf.extend_from_slice(&self.socket);
            self.socket.clear();
        }
        while self.conn.poll_close().is_none()
            && !self.rbuf.is_empty()
            && self.conn.accepts_packets()
        {
            match decode(
                &mut self.rbuf,
                self.conn.protocol(),
                self.conn.max_packet_size(),
            ) {
                Ok(Some(p)) => {
                    if trace() {
                        eprintln!("  client -> {p:?}");
                    }
                    self.observe_client(&p);
                    self.conn.handle_packet(p, now);
                    // The embedded engine answers at once.
                    while let Some(request) = self.conn.poll_request() {
                        let waker = self.conn.waker().clone();
                        match millet::engine::submit(&**broker, &**broker, request, &waker, now) {
                            millet::engine::Call::Ready(done) => {
                                self.conn.handle_completion(done, now)
                            }
                            millet::engine::Call::Later(_) => {
                                unreachable!("the embedded engine answers at once")
                            }
                        }
                    }
                }
                Ok(None) => break,
                Err(e) => {
                    if trace() {
                        eprintln!("  client -> decode error {e}");
                    }
                    self.conn.handle_decode_error(&e)
                }
            }
        }
    }

    /// Track the client's side of the conversation (before the server sees it).
    fn observe_client(&mut self, p: &Packet) {
        if self.conn.poll_close().is_some() {
            return;
        }
        if self.conn.is_awaiting_connect() {
            if let Packet::Connect(c) = p {
                let v5 = c.protocol == Protocol::V5;
                self.peer.connected = Some(ClientLimits {
                    protocol: c.protocol,
                    receive_maximum: c.properties.receive_maximum.unwrap_or(u16::MAX),
                    topic_alias_maximum: if v5 {
                        c.properties.topic_alias_maximum.unwrap_or(0)
                    } else {
                        0
                    },
                    maximum_packet_size: c
                        .properties
                        .maximum_packet_size
                        .map_or(usize::MAX, |m| m as usize),
                });
            }
            return;
        }
        if self.conn.client_id().is_none() {
            return; // not connected (yet): acks are not handled
        }
        let inflight = &mut self.peer.inflight;
        match p {
            Packet::PubAck(r) => {
                if let Some((QoS::AtLeastOnce, _)) = inflight.get(&r.packet_id) {
                    inflight.remove(&r.packet_id);
                }
            }
            Packet::PubRec(r) => {
                if let Some((QoS::ExactlyOnce, rec)) = inflight.get_mut(&r.packet_id) {
                    if r.reason_code.is_error() {
                        inflight.remove(&r.packet_id);
                    } else {
                        *rec = true;
                    }
                }
            }
            Packet::PubComp(r) => {
                if let Some((_, true)) = inflight.get(&r.packet_id) {
                    inflight.remove(&r.packet_id);
                }
            }
            _ => {}
        }
    }

    /// `poll_transmit`, then check everything the server wrote.
    fn transmit(&mut self, now: Instant) {
        let mut wire = BytesMut::new();
        self.conn.poll_transmit(now, &mut wire);
        if wire.is_empty() {
            return;
        }
        let proto = self
            .conn
            .protocol()
            .expect("the server wrote before knowing the protocol");
        loop {
            let before = wire.clone();
            match decode(&mut wire, Some(proto), usize::MAX) {
                Ok(Some(p)) => {
                    let len = before.len() - wire.len();
                    self.check_server_packet(&p, proto, len, &before[..len]);
                }
                Ok(None) => {
                    assert!(
                        wire.is_empty(),
                        "server wrote a truncated packet: {:?}",
                        &wire[..]
                    );
                    break;
                }
                Err(e) => panic!("server wrote an invalid packet ({e}): {:?}", &before[..]),
            }
        }
    }

    fn check_server_packet(&mut self, p: &Packet, proto: Protocol, len: usize, raw: &[u8]) {
        if trace() {
            eprintln!("  server -> {p:?}");
        }
        let peer = &mut self.peer;
        if let Some(why) = peer.ended {
            panic!("server sent {} after {why}", p.name());
        }
        if peer.received == 0 {
            assert!(
                matches!(p, Packet::ConnAck(_) | Packet::Auth(_)),
                "first packet from the server is {p:?}"
            );
        } else {
            assert!(!matches!(p, Packet::ConnAck(_)), "second CONNACK: {p:?}");
        }
        peer.received += 1;
        let limits = peer.connected.filter(|l| l.protocol == proto);
        // Every packet, control packets included [MQTT-3.1.2-24]: the server
        // leaves out optional properties, or discards the packet.
        if let (Some(l), Protocol::V5) = (limits, proto) {
            assert!(
                len <= l.maximum_packet_size,
                "{}-byte {} exceeds the client's maximum packet size {}: {raw:?}",
                len,
                p.name(),
                l.maximum_packet_size
            );
        }
        match p {
            Packet::ConnAck(a) if a.reason_code != millet_codec::ReasonCode::SUCCESS => {
                peer.ended = Some("a refusing CONNACK");
            }
            Packet::Disconnect(_) => peer.ended = Some("DISCONNECT"),
            Packet::Publish(pb) => {
                match pb.qos {
                    QoS::AtMostOnce => assert!(pb.packet_id.is_none(), "QoS 0 with id: {pb:?}"),
                    qos => {
                        let pid = pb.packet_id.unwrap_or(0);
                        assert_ne!(pid, 0, "QoS {qos:?} PUBLISH without packet id: {pb:?}");
                        if !pb.dup {
                            assert!(
                                !peer.inflight.contains_key(&pid),
                                "new PUBLISH reuses packet id {pid} still in flight: {pb:?}"
                            );
                            if let Some(l) = limits {
                                assert!(
                                    peer.inflight.len() < usize::from(l.receive_maximum),
                                    "PUBLISH beyond the client's receive maximum {}: {pb:?}",
                                    l.receive_maximum
                                );
                            }
                        }
                        peer.inflight.insert(pid, (qos, false));
                    }
                }
                if let Some(alias) = pb.properties.topic_alias {
                    let max = limits.map_or(0, |l| l.topic_alias_maximum);
                    assert!(
                        alias >= 1 && alias <= max,
                        "topic alias {alias} outside 1..={max}: {pb:?}"
                    );
                    if pb.topic.is_empty() {
                        assert!(
                            peer.aliases.contains_key(&alias),
                            "alias-only PUBLISH with unset alias {alias}: {pb:?}"
                        );
                    } else {
                        peer.aliases.insert(alias, pb.topic.to_string());
                    }
                } else {
                    assert!(!pb.topic.is_empty(), "PUBLISH without topic: {pb:?}");
                }
            }
            Packet::PubRel(r) => {
                // Answering PUBREC, or resent on resume: awaiting PUBCOMP. A
                // PUBREL for an id the server does not have in flight (3.x
                // answers an unknown PUBREC with it; it cannot say "not
                // found") does not make the id in use.
                if let Some(e) = peer.inflight.get_mut(&r.packet_id) {
                    e.1 = true;
                }
            }
            _ => {}
        }
    }
}

struct World {
    broker: Arc<Broker>,
    now: Instant,
    conns: Vec<Conn>,
}

impl World {
    fn new() -> World {
        let cfg = Config {
            sys_interval: 0,
            ..Config::default()
        };
        let now = Instant::now();
        let broker = Arc::new(Broker::new(cfg, now));
        let conns = (0..NCONN).map(|_| Conn::new(&broker, now)).collect();
        World { broker, now, conns }
    }

    fn replace(&mut self, i: usize) {
        let now = self.now;
        let conn = &mut self.conns[i].conn;
        conn.handle_closed(now);
        // The session's detach is a request to the engine.
        while let Some(request) = conn.poll_request() {
            let waker = conn.waker().clone();
            let _ = millet::engine::submit(&*self.broker, &*self.broker, request, &waker, now);
        }
        self.conns[i] = Conn::new(&self.broker, now);
    }

    /// One wake-up of every connection: read, write (checked), close.
    fn poll_all(&mut self) {
        let now = self.now;
        for i in 0..NCONN {
            self.conns[i].pump(&self.broker, now);
            self.conns[i].transmit(now);
            if self.conns[i].conn.poll_close().is_some() {
                self.replace(i);
            }
        }
    }

    fn advance(&mut self, secs: u64) {
        self.now += Duration::from_secs(secs);
        let now = self.now;
        self.broker.handle_timeout(now);
        for c in &mut self.conns {
            c.conn.handle_timeout(now);
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let mut w = World::new();
    let mut input = data.iter().copied();
    while let Some(op) = input.next() {
        let i = usize::from(op & 3) % NCONN;
        if trace() {
            eprintln!("op {op:#04x} on connection {i}");
        }
        match op >> 2 {
            0..=47 => {
                let len = usize::from(input.next().unwrap_or(0));
                let chunk: Vec<u8> = input.by_ref().take(len).collect();
                w.conns[i].socket.extend_from_slice(&chunk);
            }
            k @ 48..=55 => {
                let n = u64::from(input.next().unwrap_or(1));
                w.advance(if k >= 54 { n * 3600 } else { n });
            }
            56..=59 => w.replace(i),
            60..=61 => w.conns[i].conn.handle_shutdown(),
            _ => {}
        }
        w.poll_all();
    }
    // The end: every socket goes away, then time passes (wills, expiry).
    for i in 0..NCONN {
        w.replace(i);
    }
    w.advance(3600 * 24 * 365);
    w.poll_all();
});
