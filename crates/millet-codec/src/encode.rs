//! [`Packet`] → MQTT wire format.
//!
//! The body of every packet is described once, against the [`Sink`] trait: a
//! [`Sizer`] sink measures it (and validates field lengths), a `BytesMut` sink
//! writes it. [`encode`] runs the sizer, reserves the exact size once, then
//! writes, so the two can never disagree.

use bytes::{BufMut, BytesMut};

use crate::decode::MAX_VBI;
use crate::property::PropertySet;
use crate::{EncodeError, Packet, Protocol, QoS};

/// Longest UTF-8 string or binary field (16-bit length prefix).
const MAX_FIELD: usize = 65_535;

/// Appends `packet`, in the wire format of `protocol`, to `buf`.
///
/// For 3.1 / 3.1.1, MQTT 5-only fields (properties, reason codes other than
/// CONNACK's and SUBACK's) are dropped; AUTH is [`EncodeError::NotInThisVersion`].
/// A CONNECT is written with the protocol name and level of `protocol` (not of
/// `Connect::protocol`). On error nothing is written.
pub fn encode(packet: &Packet, protocol: Protocol, buf: &mut BytesMut) -> Result<(), EncodeError> {
    let remaining = remaining_len(packet, protocol)?;
    let total = total_len(remaining)?;
    buf.reserve(total);
    #[cfg(debug_assertions)]
    let start = buf.len();
    buf.put_u8(first_byte(packet));
    put_vbi(buf, remaining);
    body(packet, protocol, buf);
    #[cfg(debug_assertions)]
    debug_assert_eq!(
        buf.len() - start,
        total,
        "encoded_len disagrees with encode"
    );
    Ok(())
}

/// The size of `packet` on the wire for `protocol`, fixed header included:
/// exactly the number of bytes [`encode`] appends. Used to honour a peer's
/// maximum packet size.
pub fn encoded_len(packet: &Packet, protocol: Protocol) -> Result<usize, EncodeError> {
    total_len(remaining_len(packet, protocol)?)
}

fn remaining_len(packet: &Packet, protocol: Protocol) -> Result<usize, EncodeError> {
    if !protocol.is_v5() && matches!(packet, Packet::Auth(_)) {
        return Err(EncodeError::NotInThisVersion("AUTH"));
    }
    let mut sizer = Sizer::default();
    body(packet, protocol, &mut sizer);
    sizer.finish()
}

fn total_len(remaining: usize) -> Result<usize, EncodeError> {
    if remaining > MAX_VBI {
        return Err(EncodeError::TooLarge);
    }
    Ok(1 + vbi_len(remaining) + remaining)
}

fn vbi_len(v: usize) -> usize {
    match v {
        0..=127 => 1,
        128..=16_383 => 2,
        16_384..=2_097_151 => 3,
        _ => 4,
    }
}

/// Writes a Variable Byte Integer; `v` must be at most [`MAX_VBI`] (the sizer
/// checked it).
fn put_vbi(buf: &mut BytesMut, mut v: usize) {
    loop {
        let mut b = (v & 0x7F) as u8;
        v >>= 7;
        if v > 0 {
            b |= 0x80;
        }
        buf.put_u8(b);
        if v == 0 {
            break;
        }
    }
}

fn first_byte(packet: &Packet) -> u8 {
    match packet {
        Packet::Connect(_) => 0x10,
        Packet::ConnAck(_) => 0x20,
        Packet::Publish(p) => {
            // [MQTT-3.3.1-2] DUP is 0 for QoS 0.
            let dup = p.dup && p.qos != QoS::AtMostOnce;
            0x30 | (u8::from(dup) << 3) | ((p.qos as u8) << 1) | u8::from(p.retain)
        }
        Packet::PubAck(_) => 0x40,
        Packet::PubRec(_) => 0x50,
        Packet::PubRel(_) => 0x62,
        Packet::PubComp(_) => 0x70,
        Packet::Subscribe(_) => 0x82,
        Packet::SubAck(_) => 0x90,
        Packet::Unsubscribe(_) => 0xA2,
        Packet::UnsubAck(_) => 0xB0,
        Packet::PingReq => 0xC0,
        Packet::PingResp => 0xD0,
        Packet::Disconnect(_) => 0xE0,
        Packet::Auth(_) => 0xF0,
    }
}

/// Where a packet body goes: measured by [`Sizer`] or written to `BytesMut`.
pub(crate) trait Sink {
    fn u8(&mut self, v: u8);
    fn u16(&mut self, v: u16);
    fn u32(&mut self, v: u32);
    /// Variable Byte Integer; the sizer rejects values above [`MAX_VBI`].
    fn vbi(&mut self, v: usize, what: &'static str);
    fn raw(&mut self, v: &[u8]);
    /// Two-byte length then the bytes; the sizer rejects more than 65,535.
    fn field(&mut self, v: &[u8], what: &'static str);
}

#[derive(Default)]
struct Sizer {
    len: usize,
    err: Option<EncodeError>,
}

impl Sizer {
    fn add(&mut self, n: usize) {
        self.len = self.len.saturating_add(n);
    }
    fn fail(&mut self, e: EncodeError) {
        if self.err.is_none() {
            self.err = Some(e);
        }
    }
    fn finish(self) -> Result<usize, EncodeError> {
        match self.err {
            Some(e) => Err(e),
            None => Ok(self.len),
        }
    }
}

impl Sink for Sizer {
    fn u8(&mut self, _: u8) {
        self.add(1);
    }
    fn u16(&mut self, _: u16) {
        self.add(2);
    }
    fn u32(&mut self, _: u32) {
        self.add(4);
    }
    fn vbi(&mut self, v: usize, what: &'static str) {
        if v > MAX_VBI {
            self.fail(if what == "property length" {
                EncodeError::TooLarge
            } else {
                EncodeError::FieldTooLong(what)
            });
        }
        self.add(vbi_len(v));
    }
    fn raw(&mut self, v: &[u8]) {
        self.add(v.len());
    }
    fn field(&mut self, v: &[u8], what: &'static str) {
        if v.len() > MAX_FIELD {
            self.fail(EncodeError::FieldTooLong(what));
        }
        self.add(2usize.saturating_add(v.len()));
    }
}

impl Sink for BytesMut {
    #[inline]
    fn u8(&mut self, v: u8) {
        self.put_u8(v);
    }
    #[inline]
    fn u16(&mut self, v: u16) {
        self.put_u16(v);
    }
    #[inline]
    fn u32(&mut self, v: u32) {
        self.put_u32(v);
    }
    #[inline]
    fn vbi(&mut self, v: usize, _: &'static str) {
        put_vbi(self, v);
    }
    #[inline]
    fn raw(&mut self, v: &[u8]) {
        self.extend_from_slice(v);
    }
    #[inline]
    fn field(&mut self, v: &[u8], _: &'static str) {
        self.put_u16(v.len() as u16);
        self.extend_from_slice(v);
    }
}

/// Property length then the properties.
fn props<S: Sink, P: PropertySet>(s: &mut S, p: &P) {
    s.vbi(props_len(p), "property length");
    p.encode_properties(s);
}

fn props_len<P: PropertySet>(p: &P) -> usize {
    let mut sizer = Sizer::default();
    p.encode_properties(&mut sizer);
    // Field errors are reported by the outer sizer, which visits `p` too.
    sizer.len
}

/// MQTT 5 acknowledgement tail shared by PUBACK..PUBCOMP, DISCONNECT and AUTH:
/// nothing when the reason is Success and there are no properties (the short
/// form), the reason code alone when there are no properties (`reason_only`
/// permits it), otherwise reason code, property length and properties.
fn reason_and_props<S: Sink, P: PropertySet>(s: &mut S, reason: u8, p: &P, reason_only: bool) {
    let plen = props_len(p);
    if plen == 0 && reason == 0 {
        return;
    }
    s.u8(reason);
    if plen == 0 && reason_only {
        return;
    }
    s.vbi(plen, "property length");
    p.encode_properties(s);
}

fn body<S: Sink>(packet: &Packet, protocol: Protocol, s: &mut S) {
    let v5 = protocol.is_v5();
    match packet {
        Packet::Connect(c) => {
            let name: &[u8] = if protocol == Protocol::V3_1 {
                b"MQIsdp"
            } else {
                b"MQTT"
            };
            s.field(name, "protocol name");
            s.u8(protocol.level() | if c.bridge { 0x80 } else { 0 });
            let mut flags = u8::from(c.clean_start) << 1;
            if let Some(w) = &c.will {
                flags |= 0x04 | ((w.qos as u8) << 3) | (u8::from(w.retain) << 5);
            }
            if c.password.is_some() {
                flags |= 0x40;
            }
            if c.username.is_some() {
                flags |= 0x80;
            }
            s.u8(flags);
            s.u16(c.keep_alive);
            if v5 {
                props(s, &c.properties);
            }
            s.field(c.client_id.as_bytes(), "client identifier");
            if let Some(w) = &c.will {
                if v5 {
                    props(s, &w.properties);
                }
                s.field(w.topic.as_bytes(), "will topic");
                s.field(&w.payload, "will payload");
            }
            if let Some(u) = &c.username {
                s.field(u.as_bytes(), "user name");
            }
            if let Some(p) = &c.password {
                s.field(p, "password");
            }
        }
        Packet::ConnAck(a) => {
            // MQTT 3.1 has no session present flag.
            s.u8(u8::from(a.session_present && protocol != Protocol::V3_1));
            if v5 {
                s.u8(a.reason_code.0);
                props(s, &a.properties);
            } else {
                s.u8(a.reason_code.to_v3_connack());
            }
        }
        Packet::Publish(p) => {
            s.field(p.topic.as_bytes(), "topic name");
            if p.qos != QoS::AtMostOnce {
                debug_assert!(p.packet_id.is_some(), "PUBLISH QoS > 0 without packet id");
                s.u16(p.packet_id.unwrap_or(0));
            }
            if v5 {
                props(s, &p.properties);
            }
            s.raw(&p.payload);
        }
        Packet::PubAck(r) | Packet::PubRec(r) | Packet::PubRel(r) | Packet::PubComp(r) => {
            s.u16(r.packet_id);
            if v5 {
                reason_and_props(s, r.reason_code.0, &r.properties, true);
            }
        }
        Packet::Subscribe(sub) => {
            s.u16(sub.packet_id);
            if v5 {
                props(s, sub);
            }
            for (filter, o) in &sub.filters {
                s.field(filter.as_bytes(), "topic filter");
                let mut opts = o.qos as u8;
                if v5 {
                    opts |= (u8::from(o.no_local) << 2)
                        | (u8::from(o.retain_as_published) << 3)
                        | ((o.retain_handling & 0x03) << 4);
                }
                s.u8(opts);
            }
        }
        Packet::SubAck(a) => {
            s.u16(a.packet_id);
            if v5 {
                props(s, &a.properties);
            }
            for c in &a.reason_codes {
                s.u8(if v5 || c.0 < 0x80 { c.0 } else { 0x80 });
            }
        }
        Packet::Unsubscribe(u) => {
            s.u16(u.packet_id);
            if v5 {
                props(s, u);
            }
            for filter in &u.filters {
                s.field(filter.as_bytes(), "topic filter");
            }
        }
        Packet::UnsubAck(a) => {
            s.u16(a.packet_id);
            if v5 {
                props(s, &a.properties);
                for c in &a.reason_codes {
                    s.u8(c.0);
                }
            }
        }
        Packet::PingReq | Packet::PingResp => {}
        Packet::Disconnect(d) => {
            if v5 {
                reason_and_props(s, d.reason_code.0, &d.properties, true);
            }
        }
        Packet::Auth(a) => {
            // The spec only allows omitting the property length together with
            // a Success reason code (section 3.15.2.1).
            reason_and_props(s, a.reason_code.0, &a.properties, false);
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
pub(crate) mod tests {
    use bytes::Bytes;
    use bytestring::ByteString;

    use super::*;
    use crate::{
        decode, AckProperties, Auth, AuthProperties, ConnAck, ConnAckProperties, Connect,
        ConnectProperties, Disconnect, DisconnectProperties, LastWill, PubResp, Publish,
        PublishProperties, ReasonCode, SubAck, Subscribe, SubscriptionOptions, UnsubAck,
        Unsubscribe, UserProperty, WillProperties,
    };

    pub(crate) const ALL: [Protocol; 3] = [Protocol::V3_1, Protocol::V3_1_1, Protocol::V5];

    fn s(v: &str) -> ByteString {
        ByteString::from(v)
    }

    fn b(v: &[u8]) -> Bytes {
        Bytes::copy_from_slice(v)
    }

    fn users() -> Vec<UserProperty> {
        vec![
            (s("k"), s("v1")),
            (s("k"), s("v2")),
            (s("région"), s("ünïcode")),
        ]
    }

    fn ack_props() -> AckProperties {
        AckProperties {
            reason_string: Some(s("because")),
            user_properties: users(),
        }
    }

    /// One of every packet, with every MQTT 5 field set.
    pub(crate) fn samples() -> Vec<Packet> {
        let connect = Connect {
            protocol: Protocol::V5,
            clean_start: true,
            keep_alive: 60,
            properties: ConnectProperties {
                session_expiry_interval: Some(3600),
                receive_maximum: Some(100),
                maximum_packet_size: Some(1 << 20),
                topic_alias_maximum: Some(10),
                request_response_information: Some(true),
                request_problem_information: Some(false),
                user_properties: users(),
                authentication_method: Some(s("SCRAM-SHA-1")),
                authentication_data: Some(b(b"\x00\x01\x02")),
            },
            client_id: s("client-1"),
            will: Some(LastWill {
                topic: s("last/will"),
                payload: b(b"gone"),
                qos: QoS::AtLeastOnce,
                retain: true,
                properties: WillProperties {
                    will_delay_interval: Some(5),
                    payload_format_indicator: Some(1),
                    message_expiry_interval: Some(60),
                    content_type: Some(s("text/plain")),
                    response_topic: Some(s("resp/topic")),
                    correlation_data: Some(b(b"corr")),
                    user_properties: users(),
                },
            }),
            username: Some(s("user")),
            password: Some(b(b"p\x00ss")),
            bridge: false,
        };
        let connack = ConnAck {
            session_present: true,
            reason_code: ReasonCode::SUCCESS,
            properties: ConnAckProperties {
                session_expiry_interval: Some(7200),
                receive_maximum: Some(20),
                maximum_qos: Some(QoS::AtLeastOnce),
                retain_available: Some(false),
                maximum_packet_size: Some(65_536),
                assigned_client_identifier: Some(s("auto-123")),
                topic_alias_maximum: Some(5),
                reason_string: Some(s("welcome")),
                user_properties: users(),
                wildcard_subscription_available: Some(true),
                subscription_identifiers_available: Some(true),
                shared_subscription_available: Some(false),
                server_keep_alive: Some(30),
                response_information: Some(s("resp/")),
                server_reference: Some(s("other:1883")),
                authentication_method: Some(s("SCRAM-SHA-1")),
                authentication_data: Some(b(b"server-final")),
            },
        };
        let publish = Publish {
            dup: true,
            qos: QoS::ExactlyOnce,
            retain: true,
            topic: s("a/b/c"),
            packet_id: Some(42),
            properties: PublishProperties {
                payload_format_indicator: Some(0),
                message_expiry_interval: Some(10),
                topic_alias: Some(3),
                response_topic: Some(s("r/t")),
                correlation_data: Some(b(b"\xff\xfe")),
                user_properties: users(),
                subscription_identifiers: vec![1, 268_435_455, 128],
                content_type: Some(s("application/json")),
            },
            payload: b(b"{\"hello\":\"world\"}"),
        };
        let resp = |id| PubResp {
            packet_id: id,
            reason_code: ReasonCode::NO_MATCHING_SUBSCRIBERS,
            properties: ack_props(),
        };
        vec![
            Packet::Connect(Box::new(connect)),
            Packet::ConnAck(connack),
            Packet::Publish(publish),
            Packet::Publish(Publish {
                topic: s("qos0"),
                payload: Bytes::new(),
                ..Publish::default()
            }),
            Packet::PubAck(resp(1)),
            Packet::PubRec(resp(2)),
            Packet::PubRel(resp(3)),
            Packet::PubComp(resp(65_535)),
            Packet::PubAck(PubResp::new(7)),
            Packet::PubRec(PubResp::with_reason(8, ReasonCode::QUOTA_EXCEEDED)),
            Packet::Subscribe(Subscribe {
                packet_id: 9,
                subscription_identifier: Some(2_097_152),
                user_properties: users(),
                filters: vec![
                    (
                        s("a/+/c"),
                        SubscriptionOptions {
                            qos: QoS::ExactlyOnce,
                            no_local: true,
                            retain_as_published: true,
                            retain_handling: 2,
                        },
                    ),
                    (s("$share/g/#"), SubscriptionOptions::default()),
                    // Invalid filters are the broker's business, not the codec's.
                    (
                        s("bad#/filter"),
                        SubscriptionOptions {
                            qos: QoS::AtLeastOnce,
                            retain_handling: 1,
                            ..SubscriptionOptions::default()
                        },
                    ),
                ],
            }),
            Packet::SubAck(SubAck {
                packet_id: 9,
                properties: ack_props(),
                reason_codes: vec![
                    ReasonCode::GRANTED_QOS_2,
                    ReasonCode::GRANTED_QOS_0,
                    ReasonCode::TOPIC_FILTER_INVALID,
                ],
            }),
            Packet::Unsubscribe(Unsubscribe {
                packet_id: 10,
                user_properties: users(),
                filters: vec![s("a/+/c"), s("#")],
            }),
            Packet::UnsubAck(UnsubAck {
                packet_id: 10,
                properties: ack_props(),
                reason_codes: vec![ReasonCode::SUCCESS, ReasonCode::NO_SUBSCRIPTION_EXISTED],
            }),
            Packet::PingReq,
            Packet::PingResp,
            Packet::Disconnect(Disconnect {
                reason_code: ReasonCode::SERVER_SHUTTING_DOWN,
                properties: DisconnectProperties {
                    session_expiry_interval: Some(0),
                    reason_string: Some(s("bye")),
                    user_properties: users(),
                    server_reference: Some(s("elsewhere")),
                },
            }),
            Packet::Disconnect(Disconnect::default()),
            Packet::Disconnect(Disconnect {
                reason_code: ReasonCode::DISCONNECT_WITH_WILL,
                ..Disconnect::default()
            }),
            Packet::Auth(Auth {
                reason_code: ReasonCode::CONTINUE_AUTHENTICATION,
                properties: AuthProperties {
                    authentication_method: Some(s("SCRAM-SHA-1")),
                    authentication_data: Some(b(b"client-final")),
                    reason_string: Some(s("more")),
                    user_properties: users(),
                },
            }),
            Packet::Auth(Auth::default()),
            Packet::Auth(Auth {
                reason_code: ReasonCode::REAUTHENTICATE,
                ..Auth::default()
            }),
        ]
    }

    /// What a packet looks like after a trip through the 3.x wire format.
    pub(crate) fn as_v3(p: &Packet, proto: Protocol) -> Packet {
        let mut p = p.clone();
        match &mut p {
            Packet::Connect(c) => {
                c.protocol = proto;
                c.properties = ConnectProperties::default();
                if let Some(w) = &mut c.will {
                    w.properties = WillProperties::default();
                }
            }
            Packet::ConnAck(a) => {
                a.properties = ConnAckProperties::default();
                a.reason_code = ReasonCode::from_v3_connack(a.reason_code.to_v3_connack());
                a.session_present &= proto != Protocol::V3_1;
            }
            Packet::Publish(p) => p.properties = PublishProperties::default(),
            Packet::PubAck(r) | Packet::PubRec(r) | Packet::PubRel(r) | Packet::PubComp(r) => {
                *r = PubResp::new(r.packet_id)
            }
            Packet::Subscribe(sub) => {
                sub.subscription_identifier = None;
                sub.user_properties.clear();
                for (_, o) in &mut sub.filters {
                    *o = SubscriptionOptions {
                        qos: o.qos,
                        ..SubscriptionOptions::default()
                    };
                }
            }
            Packet::SubAck(a) => {
                a.properties = AckProperties::default();
                for c in &mut a.reason_codes {
                    if c.is_error() {
                        *c = ReasonCode(0x80);
                    }
                }
            }
            Packet::Unsubscribe(u) => u.user_properties.clear(),
            Packet::UnsubAck(a) => {
                a.properties = AckProperties::default();
                a.reason_codes.clear();
            }
            Packet::Disconnect(d) => *d = Disconnect::default(),
            Packet::PingReq | Packet::PingResp | Packet::Auth(_) => {}
        }
        p
    }

    fn enc(p: &Packet, proto: Protocol) -> BytesMut {
        let mut buf = BytesMut::new();
        encode(p, proto, &mut buf).unwrap();
        assert_eq!(buf.len(), encoded_len(p, proto).unwrap(), "{p:?}");
        buf
    }

    fn dec(buf: &mut BytesMut, proto: Protocol) -> Packet {
        decode(buf, Some(proto), usize::MAX).unwrap().unwrap()
    }

    #[test]
    fn round_trip_every_packet_every_version() {
        for proto in ALL {
            for p in samples() {
                if !proto.is_v5() && matches!(p, Packet::Auth(_)) {
                    assert_eq!(
                        encode(&p, proto, &mut BytesMut::new()),
                        Err(EncodeError::NotInThisVersion("AUTH"))
                    );
                    assert_eq!(
                        encoded_len(&p, proto),
                        Err(EncodeError::NotInThisVersion("AUTH"))
                    );
                    continue;
                }
                let mut buf = enc(&p, proto);
                let got = dec(&mut buf, proto);
                assert!(buf.is_empty(), "{proto:?} {p:?}: bytes left over");
                let want = if proto.is_v5() {
                    p.clone()
                } else {
                    as_v3(&p, proto)
                };
                assert_eq!(got, want, "{proto:?}");
                // Encoding is deterministic: re-encoding gives the same bytes.
                assert_eq!(enc(&got, proto), enc(&want, proto));
            }
        }
    }

    #[test]
    fn round_trip_connect_without_will_or_credentials() {
        for proto in ALL {
            let p = Packet::Connect(Box::new(Connect {
                protocol: proto,
                clean_start: false,
                keep_alive: 0,
                properties: ConnectProperties::default(),
                client_id: s(""),
                will: None,
                username: None,
                password: None,
                bridge: false,
            }));
            let mut buf = enc(&p, proto);
            assert_eq!(dec(&mut buf, proto), p);
            // The decoder learns the version from CONNECT itself.
            let mut buf = enc(&p, proto);
            assert_eq!(decode(&mut buf, None, usize::MAX).unwrap().unwrap(), p);
        }
    }

    #[test]
    fn v5_connect_password_without_username_mqtt_3_1_2_22() {
        // Allowed in MQTT 5 (a 3.x encoder writes it too, the 3.x decoder rejects it).
        let p = Packet::Connect(Box::new(Connect {
            protocol: Protocol::V5,
            clean_start: true,
            keep_alive: 10,
            properties: ConnectProperties::default(),
            client_id: s("c"),
            will: None,
            username: None,
            password: Some(b(b"secret")),
            bridge: false,
        }));
        let mut buf = enc(&p, Protocol::V5);
        assert_eq!(decode(&mut buf, None, usize::MAX).unwrap().unwrap(), p);
    }

    #[test]
    fn spec_example_bytes_3_1_1_connect() {
        let p = Packet::Connect(Box::new(Connect {
            protocol: Protocol::V3_1_1,
            clean_start: true,
            keep_alive: 60,
            properties: ConnectProperties::default(),
            client_id: s("id"),
            will: None,
            username: Some(s("u")),
            password: Some(b(b"p")),
            bridge: false,
        }));
        let buf = enc(&p, Protocol::V3_1_1);
        assert_eq!(
            &buf[..],
            b"\x10\x14\x00\x04MQTT\x04\xc2\x00\x3c\x00\x02id\x00\x01u\x00\x01p"
        );
        let buf = enc(&p, Protocol::V3_1);
        assert_eq!(&buf[..9], b"\x10\x16\x00\x06MQIsdp\x03"[..9].as_ref());
    }

    #[test]
    fn publish_bytes() {
        let p = Packet::Publish(Publish {
            dup: false,
            qos: QoS::AtLeastOnce,
            retain: true,
            topic: s("a/b"),
            packet_id: Some(10),
            properties: PublishProperties::default(),
            payload: b(b"hi"),
        });
        assert_eq!(
            &enc(&p, Protocol::V3_1_1)[..],
            b"\x33\x09\x00\x03a/b\x00\x0ahi"
        );
        assert_eq!(
            &enc(&p, Protocol::V5)[..],
            b"\x33\x0a\x00\x03a/b\x00\x0a\x00hi"
        );
    }

    #[test]
    fn publish_qos0_never_sets_dup_mqtt_3_3_1_2() {
        let p = Packet::Publish(Publish {
            dup: true,
            topic: s("t"),
            ..Publish::default()
        });
        let buf = enc(&p, Protocol::V3_1_1);
        assert_eq!(&buf[..], b"\x30\x03\x00\x01t");
    }

    #[test]
    fn v5_short_forms() {
        // PUBACK etc.: Success without properties → remaining length 2.
        for p in [
            Packet::PubAck(PubResp::new(1)),
            Packet::PubRec(PubResp::new(1)),
            Packet::PubComp(PubResp::new(1)),
        ] {
            assert_eq!(enc(&p, Protocol::V5)[1..], b"\x02\x00\x01"[..]);
        }
        assert_eq!(
            &enc(&Packet::PubRel(PubResp::new(1)), Protocol::V5)[..],
            b"\x62\x02\x00\x01"
        );
        // A reason code without properties → remaining length 3.
        assert_eq!(
            &enc(
                &Packet::PubAck(PubResp::with_reason(1, ReasonCode::NOT_AUTHORIZED)),
                Protocol::V5
            )[..],
            b"\x40\x03\x00\x01\x87"
        );
        // DISCONNECT / AUTH: remaining length 0.
        assert_eq!(
            &enc(&Packet::Disconnect(Disconnect::default()), Protocol::V5)[..],
            b"\xe0\x00"
        );
        assert_eq!(
            &enc(&Packet::Auth(Auth::default()), Protocol::V5)[..],
            b"\xf0\x00"
        );
        let d = Packet::Disconnect(Disconnect {
            reason_code: ReasonCode::SESSION_TAKEN_OVER,
            ..Disconnect::default()
        });
        assert_eq!(&enc(&d, Protocol::V5)[..], b"\xe0\x01\x8e");
        let a = Packet::Auth(Auth {
            reason_code: ReasonCode::REAUTHENTICATE,
            ..Auth::default()
        });
        assert_eq!(&enc(&a, Protocol::V5)[..], b"\xf0\x02\x19\x00");
    }

    #[test]
    fn v3_drops_v5_fields() {
        let ack = Packet::PubAck(PubResp {
            packet_id: 5,
            reason_code: ReasonCode::NOT_AUTHORIZED,
            properties: ack_props(),
        });
        assert_eq!(&enc(&ack, Protocol::V3_1_1)[..], b"\x40\x02\x00\x05");
        let d = Packet::Disconnect(Disconnect {
            reason_code: ReasonCode::SERVER_BUSY,
            ..Disconnect::default()
        });
        assert_eq!(&enc(&d, Protocol::V3_1_1)[..], b"\xe0\x00");
        let u = Packet::UnsubAck(UnsubAck {
            packet_id: 3,
            properties: ack_props(),
            reason_codes: vec![ReasonCode::SUCCESS],
        });
        assert_eq!(&enc(&u, Protocol::V3_1_1)[..], b"\xb0\x02\x00\x03");
    }

    #[test]
    fn v3_suback_failure_is_0x80_mqtt_3_9_3() {
        let a = Packet::SubAck(SubAck {
            packet_id: 1,
            properties: ack_props(),
            reason_codes: vec![
                ReasonCode::GRANTED_QOS_1,
                ReasonCode::NOT_AUTHORIZED,
                ReasonCode::TOPIC_FILTER_INVALID,
                ReasonCode::UNSPECIFIED_ERROR,
            ],
        });
        assert_eq!(
            &enc(&a, Protocol::V3_1_1)[..],
            b"\x90\x06\x00\x01\x01\x80\x80\x80"
        );
    }

    #[test]
    fn v3_connack_return_codes() {
        for (rc, v3) in [
            (ReasonCode::SUCCESS, 0u8),
            (ReasonCode::UNSUPPORTED_PROTOCOL_VERSION, 1),
            (ReasonCode::CLIENT_IDENTIFIER_NOT_VALID, 2),
            (ReasonCode::SERVER_UNAVAILABLE, 3),
            (ReasonCode::BAD_USER_NAME_OR_PASSWORD, 4),
            (ReasonCode::NOT_AUTHORIZED, 5),
            (ReasonCode::BANNED, 5),
        ] {
            let a = Packet::ConnAck(ConnAck {
                session_present: false,
                reason_code: rc,
                properties: ConnAckProperties::default(),
            });
            assert_eq!(&enc(&a, Protocol::V3_1_1)[..], [0x20, 2, 0, v3]);
        }
        let a = Packet::ConnAck(ConnAck {
            session_present: true,
            ..ConnAck::default()
        });
        assert_eq!(&enc(&a, Protocol::V3_1_1)[..], [0x20, 2, 1, 0]);
        // MQTT 3.1 has no session present flag.
        assert_eq!(&enc(&a, Protocol::V3_1)[..], [0x20, 2, 0, 0]);
    }

    #[test]
    fn field_too_long() {
        let long = s(&"x".repeat(65_536));
        let p = Packet::Publish(Publish {
            topic: long.clone(),
            ..Publish::default()
        });
        assert_eq!(
            encoded_len(&p, Protocol::V5),
            Err(EncodeError::FieldTooLong("topic name"))
        );
        let mut buf = BytesMut::new();
        assert_eq!(
            encode(&p, Protocol::V5, &mut buf),
            Err(EncodeError::FieldTooLong("topic name"))
        );
        assert!(buf.is_empty(), "nothing written on error");
        let p = Packet::Disconnect(Disconnect {
            reason_code: ReasonCode::SUCCESS,
            properties: DisconnectProperties {
                reason_string: Some(long),
                ..DisconnectProperties::default()
            },
        });
        assert_eq!(
            encoded_len(&p, Protocol::V5),
            Err(EncodeError::FieldTooLong("reason string"))
        );
        // Dropped for 3.x, so no error there.
        assert_eq!(encoded_len(&p, Protocol::V3_1_1), Ok(2));
        let p = Packet::Publish(Publish {
            topic: s("t"),
            properties: PublishProperties {
                subscription_identifiers: vec![268_435_456],
                ..PublishProperties::default()
            },
            ..Publish::default()
        });
        assert_eq!(
            encoded_len(&p, Protocol::V5),
            Err(EncodeError::FieldTooLong("subscription identifier"))
        );
        let max = s(&"x".repeat(65_535));
        let p = Packet::Publish(Publish {
            topic: max,
            ..Publish::default()
        });
        let mut buf = enc(&p, Protocol::V5);
        assert_eq!(dec(&mut buf, Protocol::V5), p);
    }

    #[test]
    fn too_large() {
        assert_eq!(total_len(MAX_VBI + 1), Err(EncodeError::TooLarge));
        assert_eq!(total_len(MAX_VBI), Ok(MAX_VBI + 5));
        assert_eq!(total_len(0), Ok(2));
        assert_eq!(total_len(127), Ok(129));
        assert_eq!(total_len(128), Ok(131));
        assert_eq!(total_len(16_384), Ok(16_388));
    }

    #[test]
    fn remaining_length_boundaries() {
        for len in [0usize, 127, 128, 16_383, 16_384, 2_097_151, 2_097_152] {
            let p = Packet::Publish(Publish {
                topic: s("t"),
                payload: Bytes::from(vec![7u8; len]),
                ..Publish::default()
            });
            let mut buf = enc(&p, Protocol::V3_1_1);
            assert_eq!(buf.len(), encoded_len(&p, Protocol::V3_1_1).unwrap());
            assert_eq!(dec(&mut buf, Protocol::V3_1_1), p);
        }
    }

    #[test]
    fn encode_appends() {
        let mut buf = BytesMut::new();
        for p in [
            Packet::PingReq,
            Packet::PingResp,
            Packet::PubAck(PubResp::new(2)),
        ] {
            encode(&p, Protocol::V3_1_1, &mut buf).unwrap();
        }
        assert_eq!(&buf[..], b"\xc0\x00\xd0\x00\x40\x02\x00\x02");
        assert_eq!(dec(&mut buf, Protocol::V3_1_1), Packet::PingReq);
        assert_eq!(dec(&mut buf, Protocol::V3_1_1), Packet::PingResp);
        assert_eq!(
            dec(&mut buf, Protocol::V3_1_1),
            Packet::PubAck(PubResp::new(2))
        );
        assert!(buf.is_empty());
    }

    /// Writes every sample, in every version, as fuzz seeds:
    /// `MILLET_FUZZ_SEEDS=fuzz/corpus/decode cargo test -p millet-codec -- --ignored`.
    #[test]
    #[ignore = "writes fuzz seeds: run with MILLET_FUZZ_SEEDS=dir and --ignored"]
    fn write_fuzz_seeds() {
        let Some(dir) = std::env::var_os("MILLET_FUZZ_SEEDS") else {
            return;
        };
        for proto in ALL {
            for (i, p) in samples().iter().enumerate() {
                let mut buf = BytesMut::new();
                if encode(p, proto, &mut buf).is_ok() {
                    let name = format!("seed-{}-{i:02}-{}", proto.level(), p.name());
                    std::fs::write(std::path::Path::new(&dir).join(name), &buf).unwrap();
                }
            }
        }
    }
}
