//! Measured comparison of MQTT codecs for `docs/CODEC.md`.
//!
//! Workload: a buffer of N (default 100,000) concatenated QoS 1 PUBLISH
//! packets, topic `devices/123456/telemetry`, 64-byte or 1 KiB payload, in
//! MQTT 3.1.1 and in MQTT 5 (with one user property). Each codec decodes the
//! whole buffer into a `Vec` of its own packet type, then encodes them all
//! back into one pre-sized `BytesMut`. Reported per packet: wall time (best of
//! `--runs`), heap allocations (counted by the global allocator below),
//! whether the decoded payload points into the receive buffer (zero-copy) and
//! whether the re-encoded bytes equal the input.
//!
//! `--probe` instead feeds each decoder a few malformed PUBLISH packets that
//! the spec requires a server to reject, and prints what each one did.
//!
//! Usage:
//!   codec_compare [--codec NAME]... [--case v311-64|v311-1k|v5-64|v5-1k]...
//!                 [--runs N] [--packets N] [--probe]
//!
//! Under callgrind, `--toggle-collect='*decode_phase*'` (or `*encode_phase*`,
//! `*drop_phase*`) restricts the count to the decode (encode, free) loop of
//! the chosen codec.

// The counting allocator needs `unsafe impl GlobalAlloc`; the library itself
// stays `forbid(unsafe_code)`.
#![allow(unsafe_code)]

use std::alloc::{GlobalAlloc, Layout, System};
use std::hint::black_box;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use bytes::{Buf, Bytes, BytesMut};
use bytestring::ByteString;
use tokio_util::codec::{Decoder, Encoder};

// ---------------------------------------------------------------------------
// Allocation counter
// ---------------------------------------------------------------------------

/// Counts calls to `alloc`, `alloc_zeroed` and `realloc`, and forwards every
/// call unchanged to [`System`].
struct CountingAlloc;

static ALLOCS: AtomicUsize = AtomicUsize::new(0);

// SAFETY: every method forwards its arguments unchanged to `System`, which is
// itself a sound `GlobalAlloc`, and returns `System`'s result unchanged; the
// only other effect is a relaxed `fetch_add` on a static `AtomicUsize`, which
// neither allocates (so it cannot recurse into the allocator), nor panics
// (`fetch_add` wraps on overflow), nor touches the memory being managed. The
// contract of each method (layout validity, `ptr` having been allocated by
// this allocator with `layout`) is the caller's, and is passed on to `System`
// exactly as received, so it holds for `System` whenever it holds for us.
unsafe impl GlobalAlloc for CountingAlloc {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        ALLOCS.fetch_add(1, Ordering::Relaxed);
        // SAFETY: same contract as our caller's, forwarded unchanged.
        unsafe { System.alloc(layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        ALLOCS.fetch_add(1, Ordering::Relaxed);
        // SAFETY: same contract as our caller's, forwarded unchanged.
        unsafe { System.alloc_zeroed(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: `ptr` was returned by `System` (all our allocations are
        // System's) with this `layout`: the caller's contract, forwarded.
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        ALLOCS.fetch_add(1, Ordering::Relaxed);
        // SAFETY: same contract as our caller's, forwarded unchanged.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static GLOBAL: CountingAlloc = CountingAlloc;

fn allocs() -> usize {
    ALLOCS.load(Ordering::Relaxed)
}

// ---------------------------------------------------------------------------
// Workload
// ---------------------------------------------------------------------------

const TOPIC: &str = "devices/123456/telemetry";
const MAX_PACKET: usize = 1 << 20;

#[derive(Clone, Copy, PartialEq, Eq)]
struct Case {
    v5: bool,
    payload: usize,
}

impl Case {
    fn name(self) -> String {
        let v = if self.v5 { "v5" } else { "v311" };
        let p = if self.payload == 1024 {
            "1k".to_string()
        } else {
            self.payload.to_string()
        };
        format!("{v}-{p}")
    }
    fn label(self) -> String {
        let v = if self.v5 {
            "5.0 (+1 user prop)"
        } else {
            "3.1.1"
        };
        format!("{v}, {} B payload", self.payload)
    }
}

const CASES: [Case; 4] = [
    Case {
        v5: false,
        payload: 64,
    },
    Case {
        v5: false,
        payload: 1024,
    },
    Case {
        v5: true,
        payload: 64,
    },
    Case {
        v5: true,
        payload: 1024,
    },
];

/// The input buffer, built with millet-codec (checked against every other
/// codec's re-encoding, which must be byte-identical).
fn build_input(case: Case, n: usize) -> BytesMut {
    use millet_codec::{Packet, Protocol, Publish, PublishProperties, QoS};
    let payload: Bytes = (0..case.payload)
        .map(|i| b'a' + (i % 26) as u8)
        .collect::<Vec<u8>>()
        .into();
    let mut properties = PublishProperties::default();
    if case.v5 {
        properties.user_properties = vec![(
            ByteString::from_static("source"),
            ByteString::from_static("sensor-7"),
        )];
    }
    let proto = if case.v5 {
        Protocol::V5
    } else {
        Protocol::V3_1_1
    };
    let mut buf = BytesMut::new();
    for i in 0..n {
        let p = Packet::Publish(Publish {
            dup: false,
            qos: QoS::AtLeastOnce,
            retain: false,
            topic: ByteString::from_static(TOPIC),
            packet_id: Some((i % 65_535) as u16 + 1),
            properties: properties.clone(),
            payload: payload.clone(),
        });
        millet_codec::encode(&p, proto, &mut buf).expect("encode input");
    }
    buf
}

/// Length of the frame at the front of `b` (fixed header + remaining length).
/// Only used for mqtt-proto, whose `Packet::decode(&[u8])` does not say how
/// many bytes it consumed.
fn frame_len(b: &[u8]) -> Option<usize> {
    let mut len = 0usize;
    for i in 0..4 {
        let byte = *b.get(1 + i)?;
        len |= usize::from(byte & 0x7F) << (7 * i);
        if byte & 0x80 == 0 {
            return Some(1 + i + 1 + len);
        }
    }
    None
}

// ---------------------------------------------------------------------------
// The codecs behind one interface
// ---------------------------------------------------------------------------

trait Codec {
    type Pkt;
    const NAME: &'static str;
    fn new(v5: bool) -> Self;
    /// Decodes one packet from the front of `buf`, consuming its bytes.
    /// `Ok(None)`: no whole packet in `buf`.
    fn decode_one(&mut self, buf: &mut BytesMut) -> Result<Option<Self::Pkt>, String>;
    /// Appends every packet of `pkts` to `out` (rmqtt-codec's encoder takes
    /// packets by value, so `pkts` is drained).
    fn encode_all(&mut self, pkts: &mut Vec<Self::Pkt>, out: &mut BytesMut);
    /// The decoded PUBLISH payload.
    fn payload(p: &Self::Pkt) -> &[u8];
}

struct Millet(millet_codec::Protocol);

impl Codec for Millet {
    type Pkt = millet_codec::Packet;
    const NAME: &'static str = "millet-codec";
    fn new(v5: bool) -> Self {
        Millet(if v5 {
            millet_codec::Protocol::V5
        } else {
            millet_codec::Protocol::V3_1_1
        })
    }
    #[inline]
    fn decode_one(&mut self, buf: &mut BytesMut) -> Result<Option<Self::Pkt>, String> {
        millet_codec::decode(buf, Some(self.0), MAX_PACKET)
            .map_err(|e| format!("{e:?} -> reason {:#04x}", e.reason_code().0))
    }
    fn encode_all(&mut self, pkts: &mut Vec<Self::Pkt>, out: &mut BytesMut) {
        for p in pkts.iter() {
            millet_codec::encode(p, self.0, out).expect("millet encode");
        }
    }
    fn payload(p: &Self::Pkt) -> &[u8] {
        match p {
            millet_codec::Packet::Publish(p) => &p.payload,
            _ => &[],
        }
    }
}

/// mqttbytes 0.6: separate `v4` and `v5` modules with their own packet types.
struct MqttBytes(bool);

// Not boxed: the measurement must see each crate's own packet type unchanged.
#[allow(clippy::large_enum_variant)]
enum MqttBytesPkt {
    V4(mqttbytes::v4::Packet),
    V5(mqttbytes::v5::Packet),
}

impl Codec for MqttBytes {
    type Pkt = MqttBytesPkt;
    const NAME: &'static str = "mqttbytes 0.6";
    fn new(v5: bool) -> Self {
        MqttBytes(v5)
    }
    #[inline]
    fn decode_one(&mut self, buf: &mut BytesMut) -> Result<Option<Self::Pkt>, String> {
        let r = if self.0 {
            mqttbytes::v5::read(buf, MAX_PACKET).map(MqttBytesPkt::V5)
        } else {
            mqttbytes::v4::read(buf, MAX_PACKET).map(MqttBytesPkt::V4)
        };
        match r {
            Ok(p) => Ok(Some(p)),
            Err(mqttbytes::Error::InsufficientBytes(_)) => Ok(None),
            Err(e) => Err(format!("{e:?}")),
        }
    }
    fn encode_all(&mut self, pkts: &mut Vec<Self::Pkt>, out: &mut BytesMut) {
        // mqttbytes 0.6 has no `Packet::write`: each packet struct writes itself.
        for p in pkts.iter() {
            match p {
                MqttBytesPkt::V4(mqttbytes::v4::Packet::Publish(p)) => {
                    p.write(out).expect("mqttbytes v4 write");
                }
                MqttBytesPkt::V5(mqttbytes::v5::Packet::Publish(p)) => {
                    p.write(out).expect("mqttbytes v5 write");
                }
                _ => unreachable!("workload is PUBLISH only"),
            }
        }
    }
    fn payload(p: &Self::Pkt) -> &[u8] {
        match p {
            MqttBytesPkt::V4(mqttbytes::v4::Packet::Publish(p)) => &p.payload,
            MqttBytesPkt::V5(mqttbytes::v5::Packet::Publish(p)) => &p.payload,
            _ => &[],
        }
    }
}

/// The codec inside rumqttc 0.25 (`default-features = false`).
struct Rumqttc(bool);

// Not boxed: the measurement must see each crate's own packet type unchanged.
#[allow(clippy::large_enum_variant)]
enum RumqttcPkt {
    V4(rumqttc::mqttbytes::v4::Packet),
    V5(rumqttc::v5::mqttbytes::v5::Packet),
}

impl Codec for Rumqttc {
    type Pkt = RumqttcPkt;
    const NAME: &'static str = "rumqttc 0.25";
    fn new(v5: bool) -> Self {
        Rumqttc(v5)
    }
    #[inline]
    fn decode_one(&mut self, buf: &mut BytesMut) -> Result<Option<Self::Pkt>, String> {
        if self.0 {
            use rumqttc::v5::mqttbytes::v5::Packet;
            match Packet::read(buf, Some(MAX_PACKET as u32)) {
                Ok(p) => Ok(Some(RumqttcPkt::V5(p))),
                Err(rumqttc::v5::mqttbytes::Error::InsufficientBytes(_)) => Ok(None),
                Err(e) => Err(format!("{e:?}")),
            }
        } else {
            use rumqttc::mqttbytes::v4::Packet;
            match Packet::read(buf, MAX_PACKET) {
                Ok(p) => Ok(Some(RumqttcPkt::V4(p))),
                Err(rumqttc::mqttbytes::Error::InsufficientBytes(_)) => Ok(None),
                Err(e) => Err(format!("{e:?}")),
            }
        }
    }
    fn encode_all(&mut self, pkts: &mut Vec<Self::Pkt>, out: &mut BytesMut) {
        for p in pkts.iter() {
            match p {
                RumqttcPkt::V4(p) => {
                    p.write(out, MAX_PACKET).expect("rumqttc v4 write");
                }
                RumqttcPkt::V5(p) => {
                    p.write(out, Some(MAX_PACKET as u32))
                        .expect("rumqttc v5 write");
                }
            }
        }
    }
    fn payload(p: &Self::Pkt) -> &[u8] {
        match p {
            RumqttcPkt::V4(rumqttc::mqttbytes::v4::Packet::Publish(p)) => &p.payload,
            RumqttcPkt::V5(rumqttc::v5::mqttbytes::v5::Packet::Publish(p)) => &p.payload,
            _ => &[],
        }
    }
}

/// mqtt-proto 0.4: sync `Packet::decode(&[u8])` (a `block_on` over its async
/// decoder) and `Packet::encode() -> VarBytes`.
struct MqttProto(bool);

// Not boxed: the measurement must see each crate's own packet type unchanged.
#[allow(clippy::large_enum_variant)]
enum MqttProtoPkt {
    V3(mqtt_proto::v3::Packet),
    V5(mqtt_proto::v5::Packet),
}

impl Codec for MqttProto {
    type Pkt = MqttProtoPkt;
    const NAME: &'static str = "mqtt-proto 0.4";
    fn new(v5: bool) -> Self {
        MqttProto(v5)
    }
    #[inline]
    fn decode_one(&mut self, buf: &mut BytesMut) -> Result<Option<Self::Pkt>, String> {
        let Some(len) = frame_len(buf) else {
            return Ok(None);
        };
        if buf.len() < len {
            return Ok(None);
        }
        let r = if self.0 {
            mqtt_proto::v5::Packet::decode(&buf[..len])
                .map(|p| p.map(MqttProtoPkt::V5))
                .map_err(|e| format!("{e:?}"))
        } else {
            mqtt_proto::v3::Packet::decode(&buf[..len])
                .map(|p| p.map(MqttProtoPkt::V3))
                .map_err(|e| format!("{e:?}"))
        };
        buf.advance(len);
        r
    }
    fn encode_all(&mut self, pkts: &mut Vec<Self::Pkt>, out: &mut BytesMut) {
        // The public encoder returns an owned buffer per packet.
        for p in pkts.iter() {
            match p {
                MqttProtoPkt::V3(p) => {
                    out.extend_from_slice(p.encode().expect("mqtt-proto v3 encode").as_ref())
                }
                MqttProtoPkt::V5(p) => {
                    out.extend_from_slice(p.encode().expect("mqtt-proto v5 encode").as_ref())
                }
            }
        }
    }
    fn payload(p: &Self::Pkt) -> &[u8] {
        match p {
            MqttProtoPkt::V3(mqtt_proto::v3::Packet::Publish(p)) => &p.payload,
            MqttProtoPkt::V5(mqtt_proto::v5::Packet::Publish(p)) => &p.payload,
            _ => &[],
        }
    }
}

/// rmqtt-codec 0.3: `tokio_util::codec` `Decoder` / `Encoder` impls, which are
/// plain sync functions over `BytesMut`.
enum Rmqtt {
    V3(rmqtt_codec::v3::Codec),
    V5(rmqtt_codec::v5::Codec),
}

enum RmqttPkt {
    V3(rmqtt_codec::v3::Packet),
    V5(rmqtt_codec::v5::Packet),
}

impl Codec for Rmqtt {
    type Pkt = RmqttPkt;
    const NAME: &'static str = "rmqtt-codec 0.3";
    fn new(v5: bool) -> Self {
        if v5 {
            Rmqtt::V5(rmqtt_codec::v5::Codec::new(MAX_PACKET as u32, 0))
        } else {
            Rmqtt::V3(rmqtt_codec::v3::Codec::new(MAX_PACKET as u32))
        }
    }
    #[inline]
    fn decode_one(&mut self, buf: &mut BytesMut) -> Result<Option<Self::Pkt>, String> {
        match self {
            Rmqtt::V3(c) => c
                .decode(buf)
                .map(|p| p.map(|(p, _)| RmqttPkt::V3(p)))
                .map_err(|e| format!("{e:?}")),
            Rmqtt::V5(c) => c
                .decode(buf)
                .map(|p| p.map(|(p, _)| RmqttPkt::V5(p)))
                .map_err(|e| format!("{e:?}")),
        }
    }
    fn encode_all(&mut self, pkts: &mut Vec<Self::Pkt>, out: &mut BytesMut) {
        // `Encoder<Packet>` takes the packet by value: the packets are moved
        // in and dropped inside the loop.
        for p in pkts.drain(..) {
            match (&mut *self, p) {
                (Rmqtt::V3(c), RmqttPkt::V3(p)) => c.encode(p, out).expect("rmqtt v3 encode"),
                (Rmqtt::V5(c), RmqttPkt::V5(p)) => c.encode(p, out).expect("rmqtt v5 encode"),
                _ => unreachable!("codec and packet versions match"),
            }
        }
    }
    fn payload(p: &Self::Pkt) -> &[u8] {
        match p {
            RmqttPkt::V3(rmqtt_codec::v3::Packet::Publish(p)) => &p.payload,
            RmqttPkt::V5(rmqtt_codec::v5::Packet::Publish(p)) => &p.payload,
            _ => &[],
        }
    }
}

// ---------------------------------------------------------------------------
// Measurement
// ---------------------------------------------------------------------------

#[inline(never)]
fn decode_phase<C: Codec>(codec: &mut C, buf: &mut BytesMut, out: &mut Vec<C::Pkt>) {
    while let Some(p) = codec.decode_one(buf).expect("decode") {
        out.push(p);
    }
}

#[inline(never)]
fn encode_phase<C: Codec>(codec: &mut C, pkts: &mut Vec<C::Pkt>, out: &mut BytesMut) {
    codec.encode_all(pkts, out);
}

/// Frees what decoding allocated (for rmqtt-codec `encode_phase` already did).
#[inline(never)]
fn drop_phase<P>(pkts: &mut Vec<P>) {
    pkts.clear();
}

struct Result1 {
    codec: &'static str,
    case: Case,
    dec: Duration,
    enc: Duration,
    drop: Duration,
    dec_allocs: usize,
    enc_allocs: usize,
    zero_copy: usize,
    roundtrip_ok: bool,
    pkt_size: usize,
}

fn run<C: Codec>(case: Case, n: usize, runs: usize) -> Result1 {
    let input = build_input(case, n);
    let mut best_dec = Duration::MAX;
    let mut best_enc = Duration::MAX;
    let mut best_drop = Duration::MAX;
    let mut dec_allocs = usize::MAX;
    let mut enc_allocs = usize::MAX;
    let mut zero_copy = 0;
    let mut roundtrip_ok = true;
    // Reused across runs so that only the first run pays the page faults of
    // these large buffers (the best run is reported).
    let mut pkts: Vec<C::Pkt> = Vec::with_capacity(n);
    let mut out = BytesMut::with_capacity(input.len() + 64);
    for _ in 0..runs {
        let mut codec = C::new(case.v5);
        pkts.clear();
        out.clear();
        // Set-up, not measured: a fresh receive buffer holding the input,
        // with some spare room as a socket read buffer would have (without
        // any, rmqtt-codec's `reserve(5)` after each frame copies the rest of
        // the buffer).
        let mut buf = BytesMut::with_capacity(input.len() + 4096);
        buf.extend_from_slice(&input);
        let range = buf.as_ptr() as usize..buf.as_ptr() as usize + buf.len();

        let a0 = allocs();
        let t0 = Instant::now();
        decode_phase(&mut codec, &mut buf, &mut pkts);
        let dec = t0.elapsed();
        let a1 = allocs();
        assert_eq!(pkts.len(), n, "{}: decoded packet count", C::NAME);

        zero_copy = pkts
            .iter()
            .filter(|p| {
                let pl = C::payload(p);
                assert_eq!(pl.len(), case.payload, "{}: payload length", C::NAME);
                range.contains(&(pl.as_ptr() as usize))
            })
            .count();

        let a2 = allocs();
        let t1 = Instant::now();
        encode_phase(&mut codec, &mut pkts, &mut out);
        let enc = t1.elapsed();
        let a3 = allocs();
        roundtrip_ok &= out[..] == input[..];
        black_box(&out);
        let t2 = Instant::now();
        drop_phase(&mut pkts);
        let drop = t2.elapsed();

        best_dec = best_dec.min(dec);
        best_enc = best_enc.min(enc);
        best_drop = best_drop.min(drop);
        dec_allocs = dec_allocs.min(a1 - a0);
        enc_allocs = enc_allocs.min(a3 - a2);
    }
    Result1 {
        codec: C::NAME,
        case,
        dec: best_dec,
        enc: best_enc,
        drop: best_drop,
        dec_allocs,
        enc_allocs,
        zero_copy,
        roundtrip_ok,
        pkt_size: std::mem::size_of::<C::Pkt>(),
    }
}

// ---------------------------------------------------------------------------
// Conformance probe
// ---------------------------------------------------------------------------

/// A PUBLISH frame: fixed header byte, topic bytes, packet id, MQTT 5
/// property block (without its length), payload.
fn publish_frame(
    first: u8,
    topic: &[u8],
    pid: Option<u16>,
    props: Option<&[u8]>,
    payload: &[u8],
) -> BytesMut {
    let mut body = Vec::new();
    body.extend_from_slice(&(topic.len() as u16).to_be_bytes());
    body.extend_from_slice(topic);
    if let Some(pid) = pid {
        body.extend_from_slice(&pid.to_be_bytes());
    }
    if let Some(props) = props {
        assert!(props.len() < 128);
        body.push(props.len() as u8);
        body.extend_from_slice(props);
    }
    body.extend_from_slice(payload);
    assert!(body.len() < 128);
    let mut f = BytesMut::new();
    f.extend_from_slice(&[first, body.len() as u8]);
    f.extend_from_slice(&body);
    f
}

struct Probe {
    what: &'static str,
    v5: bool,
    frame: BytesMut,
}

fn probes() -> Vec<Probe> {
    let p = |what, v5, frame| Probe { what, v5, frame };
    vec![
        p(
            "3.1.1 QoS 1 PUBLISH with packet id 0 [MQTT-2.2.1-3]",
            false,
            publish_frame(0x32, b"a/b", Some(0), None, b"x"),
        ),
        p(
            "3.1.1 PUBLISH, QoS 3 [MQTT-3.3.1-4]",
            false,
            publish_frame(0x36, b"a/b", Some(1), None, b"x"),
        ),
        p(
            "3.1.1 PUBLISH, topic `a/+` (wildcard) [MQTT-3.3.2-2]",
            false,
            publish_frame(0x30, b"a/+", None, None, b"x"),
        ),
        p(
            "3.1.1 PUBLISH, topic not UTF-8 [MQTT-1.5.4-1]",
            false,
            publish_frame(0x30, &[b'a', 0xC3, 0x28], None, None, b"x"),
        ),
        p(
            "3.1.1 PUBLISH, topic contains U+0000 [MQTT-1.5.4-2]",
            false,
            publish_frame(0x30, b"a\0b", None, None, b"x"),
        ),
        p(
            "5.0 PUBLISH, Payload Format Indicator twice (protocol error)",
            true,
            publish_frame(0x30, b"a/b", None, Some(&[0x01, 0x00, 0x01, 0x00]), b"x"),
        ),
        p(
            "5.0 PUBLISH, Session Expiry Interval property (not allowed in PUBLISH)",
            true,
            publish_frame(0x30, b"a/b", None, Some(&[0x11, 0, 0, 0, 1]), b"x"),
        ),
        p(
            "5.0 PUBLISH, Topic Alias 0 [MQTT-3.3.2-8]",
            true,
            publish_frame(0x30, b"a/b", None, Some(&[0x23, 0x00, 0x00]), b"x"),
        ),
        p(
            "5.0 PUBLISH, empty topic and no Topic Alias (protocol error)",
            true,
            publish_frame(0x30, b"", None, Some(&[]), b"x"),
        ),
    ]
}

fn probe_one<C: Codec>(pr: &Probe) -> String {
    let mut codec = C::new(pr.v5);
    let mut buf = pr.frame.clone();
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| codec.decode_one(&mut buf))) {
        Ok(Ok(Some(_))) => "**accepted**".to_string(),
        Ok(Ok(None)) => "incomplete?".to_string(),
        Ok(Err(e)) => format!("rejected: `{e}`"),
        Err(_) => "**panicked**".to_string(),
    }
}

// ---------------------------------------------------------------------------
// Driver
// ---------------------------------------------------------------------------

const CODECS: [&str; 5] = ["millet", "mqttbytes", "rumqttc", "mqtt-proto", "rmqtt"];

fn run_named(name: &str, case: Case, n: usize, runs: usize) -> Result1 {
    match name {
        "millet" => run::<Millet>(case, n, runs),
        "mqttbytes" => run::<MqttBytes>(case, n, runs),
        "rumqttc" => run::<Rumqttc>(case, n, runs),
        "mqtt-proto" => run::<MqttProto>(case, n, runs),
        "rmqtt" => run::<Rmqtt>(case, n, runs),
        other => panic!("unknown codec {other:?}; one of {CODECS:?}"),
    }
}

fn probe_named(name: &str, pr: &Probe) -> String {
    match name {
        "millet" => probe_one::<Millet>(pr),
        "mqttbytes" => probe_one::<MqttBytes>(pr),
        "rumqttc" => probe_one::<Rumqttc>(pr),
        "mqtt-proto" => probe_one::<MqttProto>(pr),
        "rmqtt" => probe_one::<Rmqtt>(pr),
        other => panic!("unknown codec {other:?}; one of {CODECS:?}"),
    }
}

fn main() {
    let mut codecs: Vec<String> = Vec::new();
    let mut cases: Vec<Case> = Vec::new();
    let mut runs = 5usize;
    let mut n = 100_000usize;
    let mut probe = false;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--codec" => codecs.push(args.next().expect("--codec NAME")),
            "--case" => {
                let c = args.next().expect("--case NAME");
                cases.push(
                    *CASES
                        .iter()
                        .find(|k| k.name() == c)
                        .unwrap_or_else(|| panic!("unknown case {c:?}")),
                );
            }
            "--runs" => runs = args.next().and_then(|s| s.parse().ok()).expect("--runs N"),
            "--packets" => {
                n = args
                    .next()
                    .and_then(|s| s.parse().ok())
                    .expect("--packets N")
            }
            "--probe" => probe = true,
            other => panic!("unknown argument {other:?}"),
        }
    }
    if codecs.is_empty() {
        codecs = CODECS.iter().map(|s| s.to_string()).collect();
    }
    if cases.is_empty() {
        cases = CASES.to_vec();
    }

    if probe {
        // Quiet the default panic message: a panic is reported in the table.
        std::panic::set_hook(Box::new(|_| {}));
        println!("| malformed input | {} |", codecs.join(" | "));
        println!("|---|{}", "---|".repeat(codecs.len()));
        for pr in probes() {
            let cells: Vec<String> = codecs.iter().map(|c| probe_named(c, &pr)).collect();
            println!("| {} | {} |", pr.what, cells.join(" | "));
        }
        return;
    }

    println!("{n} QoS 1 PUBLISH packets, topic `{TOPIC}`, best of {runs} run(s)\n");
    println!(
        "| case | codec | decode ns/pkt | encode ns/pkt | drop ns/pkt | decode allocs/pkt | encode allocs/pkt | payload zero-copy | re-encode == input | packet type size (B) |"
    );
    println!("|---|---|---:|---:|---:|---:|---:|---|---|---:|");
    for case in &cases {
        for c in &codecs {
            let r = run_named(c, *case, n, runs);
            let per = |d: Duration| d.as_nanos() as f64 / n as f64;
            let zc = if r.zero_copy == n {
                "yes".to_string()
            } else if r.zero_copy == 0 {
                "no (copied)".to_string()
            } else {
                format!("{}/{n}", r.zero_copy)
            };
            println!(
                "| {} | {} | {:.1} | {:.1} | {:.1} | {:.2} | {:.2} | {} | {} | {} |",
                r.case.label(),
                r.codec,
                per(r.dec),
                per(r.enc),
                per(r.drop),
                r.dec_allocs as f64 / n as f64,
                r.enc_allocs as f64 / n as f64,
                zc,
                if r.roundtrip_ok { "yes" } else { "NO" },
                r.pkt_size,
            );
        }
    }
}
