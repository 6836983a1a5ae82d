//! MQTT wire format → [`Packet`].
//!
//! Parsing never panics: every read is bounds-checked through [`Reader`], and
//! arithmetic on lengths is checked. Strings, binary fields and payloads are
//! `Bytes` slices of the frame split off the caller's buffer (zero-copy).

use bytes::{Bytes, BytesMut};
use bytestring::ByteString;

use crate::property::PropertySet;
use crate::topic;
use crate::{
    Auth, AuthProperties, ConnAck, ConnAckProperties, Connect, ConnectProperties, DecodeError,
    Disconnect, LastWill, Packet, Protocol, PubResp, Publish, PublishProperties, QoS, ReasonCode,
    SubAck, Subscribe, SubscriptionOptions, UnsubAck, Unsubscribe, WillProperties,
};

/// Largest value of a Variable Byte Integer (four bytes), hence of the
/// remaining length [MQTT-1.5.5].
pub(crate) const MAX_VBI: usize = 268_435_455;

/// Control packet types (fixed header, bits 7-4).
pub(crate) mod ptype {
    pub const CONNECT: u8 = 1;
    pub const CONNACK: u8 = 2;
    pub const PUBLISH: u8 = 3;
    pub const PUBACK: u8 = 4;
    pub const PUBREC: u8 = 5;
    pub const PUBREL: u8 = 6;
    pub const PUBCOMP: u8 = 7;
    pub const SUBSCRIBE: u8 = 8;
    pub const SUBACK: u8 = 9;
    pub const UNSUBSCRIBE: u8 = 10;
    pub const UNSUBACK: u8 = 11;
    pub const PINGREQ: u8 = 12;
    pub const PINGRESP: u8 = 13;
    pub const DISCONNECT: u8 = 14;
    pub const AUTH: u8 = 15;
}

const PACKET_NAMES: [&str; 16] = [
    "RESERVED",
    "CONNECT",
    "CONNACK",
    "PUBLISH",
    "PUBACK",
    "PUBREC",
    "PUBREL",
    "PUBCOMP",
    "SUBSCRIBE",
    "SUBACK",
    "UNSUBSCRIBE",
    "UNSUBACK",
    "PINGREQ",
    "PINGRESP",
    "DISCONNECT",
    "AUTH",
];

fn packet_name(ptype: u8) -> &'static str {
    PACKET_NAMES
        .get(usize::from(ptype))
        .copied()
        .unwrap_or("RESERVED")
}

/// Decodes one packet from the front of `buf`.
///
/// - `Ok(None)`: `buf` does not hold a whole packet yet; nothing is consumed.
/// - `Ok(Some(packet))`: exactly that packet's bytes were consumed.
/// - `Err(e)`: the peer sent an invalid packet; the connection must be closed
///   (with `e.reason_code()` where the protocol allows). When the error is
///   found in the fixed header nothing is consumed; otherwise the packet's
///   bytes are.
///
/// `protocol` is the version negotiated by CONNECT, `None` before it: CONNECT
/// decides its own version from its protocol name and level, every other
/// packet is then decoded as MQTT 3.1.1 (type 15 is then a reserved type).
///
/// `max_packet_size` bounds the whole packet (fixed header included); a larger
/// packet is rejected as soon as its remaining length is known.
pub fn decode(
    buf: &mut BytesMut,
    protocol: Option<Protocol>,
    max_packet_size: usize,
) -> Result<Option<Packet>, DecodeError> {
    let Some(&first) = buf.first() else {
        return Ok(None);
    };
    let ptype = first >> 4;
    let flags = first & 0x0F;
    check_fixed_header(ptype, flags, protocol)?;

    // Remaining length: Variable Byte Integer, at most four bytes [MQTT-1.5.5].
    let mut remaining: usize = 0;
    let mut header_len: usize = 1;
    loop {
        let Some(&b) = buf.get(header_len) else {
            return Ok(None);
        };
        remaining |= usize::from(b & 0x7F) << (7 * (header_len - 1));
        header_len += 1;
        if b & 0x80 == 0 {
            // [MQTT-1.5.5-1] the minimum number of bytes must be used.
            if b == 0 && header_len > 2 {
                return Err(DecodeError::MalformedRemainingLength);
            }
            break;
        }
        if header_len == 5 {
            return Err(DecodeError::MalformedRemainingLength);
        }
    }
    let total = header_len + remaining;
    if total > max_packet_size {
        return Err(DecodeError::PacketTooLarge {
            size: total,
            max: max_packet_size,
        });
    }
    if buf.len() < total {
        // No `reserve` here: a peer announcing a large packet must not make us
        // allocate before it has sent the bytes.
        return Ok(None);
    }

    let frame = buf.split_to(total).freeze();
    let proto = protocol.unwrap_or(Protocol::V3_1_1);
    let mut r = Reader {
        data: &frame,
        pos: header_len,
        end: total,
        packet: packet_name(ptype),
    };
    let packet = match ptype {
        ptype::CONNECT => Packet::Connect(Box::new(decode_connect(&mut r)?)),
        ptype::CONNACK => Packet::ConnAck(decode_connack(&mut r, proto)?),
        ptype::PUBLISH => Packet::Publish(decode_publish(&mut r, flags, proto)?),
        ptype::PUBACK => Packet::PubAck(decode_pub_resp(&mut r, proto)?),
        ptype::PUBREC => Packet::PubRec(decode_pub_resp(&mut r, proto)?),
        ptype::PUBREL => Packet::PubRel(decode_pub_resp(&mut r, proto)?),
        ptype::PUBCOMP => Packet::PubComp(decode_pub_resp(&mut r, proto)?),
        ptype::SUBSCRIBE => Packet::Subscribe(decode_subscribe(&mut r, proto)?),
        ptype::SUBACK => Packet::SubAck(decode_suback(&mut r, proto)?),
        ptype::UNSUBSCRIBE => Packet::Unsubscribe(decode_unsubscribe(&mut r, proto)?),
        ptype::UNSUBACK => Packet::UnsubAck(decode_unsuback(&mut r, proto)?),
        ptype::PINGREQ => {
            r.finish()?;
            Packet::PingReq
        }
        ptype::PINGRESP => {
            r.finish()?;
            Packet::PingResp
        }
        ptype::DISCONNECT => Packet::Disconnect(decode_disconnect(&mut r, proto)?),
        ptype::AUTH => Packet::Auth(decode_auth(&mut r)?),
        _ => return Err(DecodeError::ReservedPacketType(ptype)),
    };
    Ok(Some(packet))
}

/// Packet type and the fixed header flags [MQTT-2.2.2-1], [MQTT-2.2.2-2].
fn check_fixed_header(ptype: u8, flags: u8, protocol: Option<Protocol>) -> Result<(), DecodeError> {
    let expected = match ptype {
        0 => return Err(DecodeError::ReservedPacketType(0)),
        ptype::PUBLISH => {
            let qos = (flags >> 1) & 0x03;
            if qos == 3 {
                // [MQTT-3.3.1-4]
                return Err(DecodeError::InvalidQoS(qos));
            }
            if qos == 0 && flags & 0x08 != 0 {
                // [MQTT-3.3.1-2] DUP must be 0 for QoS 0.
                return Err(DecodeError::InvalidFlags {
                    packet: "PUBLISH",
                    flags,
                });
            }
            return Ok(());
        }
        // MQTT 3.1 sends these with QoS 1 and lets a resend set DUP (3.1
        // section 3.6 / 3.8 / 3.10); 3.1.1 and 5 fix the flags at 0b0010.
        ptype::PUBREL | ptype::SUBSCRIBE | ptype::UNSUBSCRIBE
            if protocol == Some(Protocol::V3_1) && flags == 0b1010 =>
        {
            return Ok(());
        }
        ptype::PUBREL | ptype::SUBSCRIBE | ptype::UNSUBSCRIBE => 0b0010,
        ptype::AUTH => match protocol {
            Some(Protocol::V5) => 0,
            Some(_) => return Err(DecodeError::NotInThisVersion("AUTH")),
            None => return Err(DecodeError::ReservedPacketType(ptype)),
        },
        _ => 0,
    };
    if flags != expected {
        return Err(DecodeError::InvalidFlags {
            packet: packet_name(ptype),
            flags,
        });
    }
    Ok(())
}

/// Bounds-checked cursor over `data[pos..end]`.
pub(crate) struct Reader<'a> {
    data: &'a Bytes,
    pos: usize,
    end: usize,
    /// Packet name, for errors.
    pub(crate) packet: &'static str,
}

impl<'a> Reader<'a> {
    #[inline]
    fn remaining(&self) -> usize {
        self.end.saturating_sub(self.pos)
    }

    #[inline]
    fn malformed(&self, what: &'static str) -> DecodeError {
        DecodeError::Malformed(self.packet, what)
    }

    /// Bytes left over after the packet's declared content are malformed.
    fn finish(&self) -> Result<(), DecodeError> {
        if self.remaining() != 0 {
            return Err(self.malformed("unexpected trailing bytes"));
        }
        Ok(())
    }

    #[inline]
    fn take(&mut self, n: usize, what: &'static str) -> Result<&'a [u8], DecodeError> {
        let end = match self.pos.checked_add(n) {
            Some(end) if end <= self.end => end,
            _ => return Err(self.malformed(what)),
        };
        let data: &'a Bytes = self.data;
        let s = data.get(self.pos..end).ok_or(self.malformed(what))?;
        self.pos = end;
        Ok(s)
    }

    /// Like [`Reader::take`] but a zero-copy `Bytes` slice.
    #[inline]
    fn take_bytes(&mut self, n: usize, what: &'static str) -> Result<Bytes, DecodeError> {
        let start = self.pos;
        self.take(n, what)?;
        // In bounds: `take` checked `start..self.pos` against `data`.
        Ok(self.data.slice(start..self.pos))
    }

    /// Everything up to the end of the packet.
    fn rest(&mut self) -> Bytes {
        let start = self.pos.min(self.end);
        self.pos = self.end;
        if self.end <= self.data.len() {
            self.data.slice(start..self.end)
        } else {
            Bytes::new()
        }
    }

    #[inline]
    pub(crate) fn u8(&mut self, what: &'static str) -> Result<u8, DecodeError> {
        match self.take(1, what)? {
            [b] => Ok(*b),
            _ => Err(self.malformed(what)),
        }
    }

    #[inline]
    pub(crate) fn u16(&mut self, what: &'static str) -> Result<u16, DecodeError> {
        match self.take(2, what)? {
            [a, b] => Ok(u16::from_be_bytes([*a, *b])),
            _ => Err(self.malformed(what)),
        }
    }

    pub(crate) fn u32(&mut self, what: &'static str) -> Result<u32, DecodeError> {
        match self.take(4, what)? {
            [a, b, c, d] => Ok(u32::from_be_bytes([*a, *b, *c, *d])),
            _ => Err(self.malformed(what)),
        }
    }

    /// Variable Byte Integer, at most four bytes, minimally encoded [MQTT-1.5.5-1].
    pub(crate) fn vbi(&mut self, what: &'static str) -> Result<u32, DecodeError> {
        let mut value: u32 = 0;
        for i in 0..4u32 {
            let b = self.u8(what)?;
            value |= u32::from(b & 0x7F) << (7 * i);
            if b & 0x80 == 0 {
                if b == 0 && i > 0 {
                    return Err(self.malformed(what));
                }
                return Ok(value);
            }
        }
        Err(self.malformed(what))
    }

    /// Two-byte length prefix then that many bytes.
    #[inline]
    pub(crate) fn binary(&mut self, what: &'static str) -> Result<Bytes, DecodeError> {
        let len = self.u16(what)?;
        self.take_bytes(usize::from(len), what)
    }

    /// A UTF-8 Encoded String: well-formed UTF-8 [MQTT-1.5.4-1], no U+0000
    /// [MQTT-1.5.4-2].
    #[inline]
    pub(crate) fn string(&mut self, what: &'static str) -> Result<ByteString, DecodeError> {
        let raw = self.binary(what)?;
        to_string(raw, what)
    }

    fn packet_id(&mut self) -> Result<u16, DecodeError> {
        let id = self.u16("packet identifier")?;
        if id == 0 {
            // [MQTT-2.2.1-3]
            return Err(DecodeError::ZeroPacketId(self.packet));
        }
        Ok(id)
    }
}

#[inline]
fn to_string(raw: Bytes, what: &'static str) -> Result<ByteString, DecodeError> {
    if raw.contains(&0) {
        return Err(DecodeError::InvalidUtf8(what));
    }
    ByteString::try_from(raw).map_err(|_| DecodeError::InvalidUtf8(what))
}

/// Reads a property length and the properties it covers into `set`:
/// identifiers not allowed in the packet are malformed, a second copy of a
/// property that may appear once is a protocol error; values are checked by
/// the property table (`crate::property`).
fn properties<P: PropertySet>(r: &mut Reader<'_>, set: &mut P) -> Result<(), DecodeError> {
    let packet = r.packet;
    let len = r.vbi("property length")?;
    let end = match r.pos.checked_add(len as usize) {
        Some(end) if end <= r.end => end,
        _ => return Err(r.malformed("property length exceeds packet")),
    };
    let mut p = Reader {
        data: r.data,
        pos: r.pos,
        end,
        packet,
    };
    let mut seen: u64 = 0;
    while p.remaining() > 0 {
        let id = p.u8("property identifier")?;
        let bit = 1u64.checked_shl(u32::from(id)).unwrap_or(0);
        if P::ALLOWED & bit == 0 {
            return Err(DecodeError::InvalidProperty { packet, id });
        }
        if seen & bit & !P::REPEATABLE != 0 {
            return Err(DecodeError::DuplicateProperty { packet, id });
        }
        seen |= bit;
        set.decode_property(id, &mut p)?;
    }
    r.pos = end;
    Ok(())
}

fn decode_connect(r: &mut Reader<'_>) -> Result<Connect, DecodeError> {
    let name_len = r.u16("protocol name")?;
    let name = r.take(usize::from(name_len), "protocol name")?;
    let level = r.u8("protocol level")?;
    // Bit 7 of the level marks a bridge (Mosquitto's `try_private`, also
    // understood by EMQX), only on the 3.x levels.
    let bridge = matches!(level, 0x83 | 0x84);
    let level = if bridge { level & 0x7F } else { level };
    let protocol = match (name, level) {
        (b"MQTT", 4) => Protocol::V3_1_1,
        (b"MQTT", 5) => Protocol::V5,
        (b"MQIsdp", 3) => Protocol::V3_1,
        (b"MQTT", _) | (b"MQIsdp", _) => return Err(DecodeError::UnsupportedProtocol),
        _ => return Err(DecodeError::InvalidProtocolName),
    };
    let flags = r.u8("connect flags")?;
    let will_flag = flags & 0x04 != 0;
    let will_qos = (flags >> 3) & 0x03;
    let will_retain = flags & 0x20 != 0;
    let password_flag = flags & 0x40 != 0;
    let username_flag = flags & 0x80 != 0;
    // [MQTT-3.1.2-3] reserved bit; [MQTT-3.1.2-11], [MQTT-3.1.2-13], [MQTT-3.1.2-15]
    // will QoS / retain only with the will flag; [MQTT-3.1.2-12] will QoS 3;
    // [MQTT-3.1.2-22] password without user name (3.x only).
    if flags & 0x01 != 0
        || (!will_flag && (will_qos != 0 || will_retain))
        || will_qos == 3
        || (password_flag && !username_flag && !protocol.is_v5())
    {
        return Err(DecodeError::InvalidConnectFlags(flags));
    }
    let keep_alive = r.u16("keep alive")?;

    let mut properties = ConnectProperties::default();
    if protocol.is_v5() {
        self::properties(r, &mut properties)?;
    }

    let client_id = r.string("client identifier")?;

    let will = if will_flag {
        let mut wp = WillProperties::default();
        if protocol.is_v5() {
            self::properties(r, &mut wp)?;
        }
        let topic = r.string("will topic")?;
        if !topic::valid_topic_name(&topic) {
            return Err(DecodeError::InvalidTopicName);
        }
        let payload = r.binary("will payload")?;
        Some(LastWill {
            topic,
            payload,
            qos: QoS::from_u8(will_qos).ok_or(DecodeError::InvalidConnectFlags(flags))?,
            retain: will_retain,
            properties: wp,
        })
    } else {
        None
    };

    let username = if username_flag {
        Some(r.string("user name")?)
    } else {
        None
    };
    let password = if password_flag {
        Some(r.binary("password")?)
    } else {
        None
    };
    r.finish()?;

    Ok(Connect {
        protocol,
        clean_start: flags & 0x02 != 0,
        keep_alive,
        properties,
        client_id,
        will,
        username,
        password,
        bridge,
    })
}

fn decode_connack(r: &mut Reader<'_>, proto: Protocol) -> Result<ConnAck, DecodeError> {
    let ack_flags = r.u8("acknowledge flags")?;
    // MQTT 3.1 has no session present flag: the byte is unused.
    let session_present = proto != Protocol::V3_1 && ack_flags & 0x01 != 0;
    if proto != Protocol::V3_1 && ack_flags & 0xFE != 0 {
        // [MQTT-3.2.2-1] reserved bits.
        return Err(r.malformed("reserved acknowledge flags"));
    }
    let code = r.u8("reason code")?;
    let mut ack = ConnAck {
        session_present,
        reason_code: ReasonCode(code),
        properties: ConnAckProperties::default(),
    };
    if proto.is_v5() {
        properties(r, &mut ack.properties)?;
    } else {
        ack.reason_code = ReasonCode::from_v3_connack(code);
    }
    r.finish()?;
    Ok(ack)
}

fn decode_publish(r: &mut Reader<'_>, flags: u8, proto: Protocol) -> Result<Publish, DecodeError> {
    let qos_bits = (flags >> 1) & 0x03;
    let qos = QoS::from_u8(qos_bits).ok_or(DecodeError::InvalidQoS(qos_bits))?;

    let raw_topic = r.binary("topic name")?;
    let mut wildcard = false;
    for &b in raw_topic.iter() {
        match b {
            0 => return Err(DecodeError::InvalidUtf8("topic name")),
            b'+' | b'#' => wildcard = true,
            _ => {}
        }
    }
    if wildcard {
        // [MQTT-3.3.2-2]
        return Err(DecodeError::InvalidTopicName);
    }
    let topic =
        ByteString::try_from(raw_topic).map_err(|_| DecodeError::InvalidUtf8("topic name"))?;

    let packet_id = if qos == QoS::AtMostOnce {
        None
    } else {
        Some(r.packet_id()?)
    };

    let mut props = PublishProperties::default();
    if proto.is_v5() {
        properties(r, &mut props)?;
    }
    // [MQTT-3.3.2-1] a topic name is required, unless (MQTT 5) a topic alias
    // stands for it.
    if topic.is_empty() && props.topic_alias.is_none() {
        return Err(DecodeError::InvalidTopicName);
    }

    Ok(Publish {
        dup: flags & 0x08 != 0,
        qos,
        retain: flags & 0x01 != 0,
        topic,
        packet_id,
        properties: props,
        payload: r.rest(),
    })
}

/// PUBACK, PUBREC, PUBREL, PUBCOMP.
fn decode_pub_resp(r: &mut Reader<'_>, proto: Protocol) -> Result<PubResp, DecodeError> {
    let mut resp = PubResp::new(r.packet_id()?);
    // MQTT 5: remaining length 2 → Success without properties; 3 → reason
    // code without properties (sections 3.4.2.1, 3.4.2.2.1).
    if proto.is_v5() && r.remaining() > 0 {
        resp.reason_code = ReasonCode(r.u8("reason code")?);
        if r.remaining() > 0 {
            properties(r, &mut resp.properties)?;
        }
    }
    r.finish()?;
    Ok(resp)
}

fn decode_subscribe(r: &mut Reader<'_>, proto: Protocol) -> Result<Subscribe, DecodeError> {
    let mut sub = Subscribe {
        packet_id: r.packet_id()?,
        ..Subscribe::default()
    };
    if proto.is_v5() {
        properties(r, &mut sub)?;
    }
    while r.remaining() > 0 {
        let filter = r.string("topic filter")?;
        let opts = r.u8("subscription options")?;
        let qos = QoS::from_u8(opts & 0x03);
        let options = if proto.is_v5() {
            let retain_handling = (opts >> 4) & 0x03;
            // [MQTT-3.8.3-5] reserved bits 6-7; retain handling 3 and QoS 3
            // are malformed.
            match qos {
                Some(qos) if opts & 0xC0 == 0 && retain_handling != 3 => SubscriptionOptions {
                    qos,
                    no_local: opts & 0x04 != 0,
                    retain_as_published: opts & 0x08 != 0,
                    retain_handling,
                },
                _ => return Err(DecodeError::InvalidSubscriptionOptions(opts)),
            }
        } else {
            // [MQTT-3.8.3-4] (3.1.1): only the QoS bits may be set.
            match qos {
                Some(qos) if opts & 0xFC == 0 => SubscriptionOptions {
                    qos,
                    ..SubscriptionOptions::default()
                },
                _ => return Err(DecodeError::InvalidSubscriptionOptions(opts)),
            }
        };
        sub.filters.push((filter, options));
    }
    if sub.filters.is_empty() {
        // [MQTT-3.8.3-3]
        return Err(DecodeError::NoTopicFilters("SUBSCRIBE"));
    }
    Ok(sub)
}

fn decode_suback(r: &mut Reader<'_>, proto: Protocol) -> Result<SubAck, DecodeError> {
    let mut ack = SubAck {
        packet_id: r.packet_id()?,
        ..SubAck::default()
    };
    if proto.is_v5() {
        properties(r, &mut ack.properties)?;
    }
    let codes = r.rest();
    if codes.is_empty() {
        return Err(r.malformed("no return codes"));
    }
    ack.reason_codes.reserve_exact(codes.len());
    for &c in codes.iter() {
        if !proto.is_v5() && !matches!(c, 0x00 | 0x01 | 0x02 | 0x80) {
            // [MQTT-3.9.3-2] (3.1.1) other return codes are reserved.
            return Err(r.malformed("reserved return code"));
        }
        ack.reason_codes.push(ReasonCode(c));
    }
    Ok(ack)
}

fn decode_unsubscribe(r: &mut Reader<'_>, proto: Protocol) -> Result<Unsubscribe, DecodeError> {
    let mut unsub = Unsubscribe {
        packet_id: r.packet_id()?,
        ..Unsubscribe::default()
    };
    if proto.is_v5() {
        properties(r, &mut unsub)?;
    }
    while r.remaining() > 0 {
        unsub.filters.push(r.string("topic filter")?);
    }
    if unsub.filters.is_empty() {
        // [MQTT-3.10.3-2]
        return Err(DecodeError::NoTopicFilters("UNSUBSCRIBE"));
    }
    Ok(unsub)
}

fn decode_unsuback(r: &mut Reader<'_>, proto: Protocol) -> Result<UnsubAck, DecodeError> {
    let mut ack = UnsubAck {
        packet_id: r.packet_id()?,
        ..UnsubAck::default()
    };
    if proto.is_v5() {
        properties(r, &mut ack.properties)?;
        let codes = r.rest();
        if codes.is_empty() {
            return Err(r.malformed("no reason codes"));
        }
        ack.reason_codes = codes.iter().map(|&c| ReasonCode(c)).collect();
    }
    r.finish()?;
    Ok(ack)
}

fn decode_disconnect(r: &mut Reader<'_>, proto: Protocol) -> Result<Disconnect, DecodeError> {
    let mut d = Disconnect::default();
    // MQTT 5: remaining length 0 → normal disconnection; 1 → reason code
    // without properties (sections 3.14.2.1, 3.14.2.2.1).
    if proto.is_v5() && r.remaining() > 0 {
        d.reason_code = ReasonCode(r.u8("reason code")?);
        if r.remaining() > 0 {
            properties(r, &mut d.properties)?;
        }
    }
    r.finish()?;
    Ok(d)
}

/// AUTH (MQTT 5 only; the fixed header check rejects it for 3.x).
fn decode_auth(r: &mut Reader<'_>) -> Result<Auth, DecodeError> {
    let mut a = Auth {
        reason_code: ReasonCode::SUCCESS,
        properties: AuthProperties::default(),
    };
    if r.remaining() > 0 {
        a.reason_code = ReasonCode(r.u8("reason code")?);
        if r.remaining() > 0 {
            properties(r, &mut a.properties)?;
        }
    }
    r.finish()?;
    Ok(a)
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use crate::encode::tests::{samples, ALL};
    use crate::{encode, encoded_len};

    const MAX: usize = usize::MAX;

    /// A packet: first byte, remaining length, body.
    fn pkt(first: u8, body: &[u8]) -> Vec<u8> {
        let mut v = vec![first];
        let mut n = body.len();
        loop {
            let mut b = (n & 0x7F) as u8;
            n >>= 7;
            if n > 0 {
                b |= 0x80;
            }
            v.push(b);
            if n == 0 {
                break;
            }
        }
        v.extend_from_slice(body);
        v
    }

    /// A length-prefixed field.
    fn f(s: &[u8]) -> Vec<u8> {
        let mut v = (s.len() as u16).to_be_bytes().to_vec();
        v.extend_from_slice(s);
        v
    }

    fn cat(parts: &[&[u8]]) -> Vec<u8> {
        parts.concat()
    }

    /// CONNECT body for MQTT 5 / 3.1.1 with the given flags and rest.
    fn connect(level: u8, flags: u8, rest: &[u8]) -> Vec<u8> {
        let name: &[u8] = if level == 3 { b"MQIsdp" } else { b"MQTT" };
        pkt(0x10, &cat(&[&f(name), &[level, flags, 0, 60], rest]))
    }

    /// MQTT 5 PUBLISH QoS 0 to topic "t" with the given raw properties.
    fn publish_v5(props: &[u8]) -> Vec<u8> {
        pkt(
            0x30,
            &cat(&[&f(b"t"), &[props.len() as u8], props, b"payload"]),
        )
    }

    fn dec(bytes: &[u8], proto: Option<Protocol>) -> Result<Option<Packet>, DecodeError> {
        decode(&mut BytesMut::from(bytes), proto, MAX)
    }

    fn dec_ok(bytes: &[u8], proto: Option<Protocol>) -> Packet {
        let mut buf = BytesMut::from(bytes);
        let p = decode(&mut buf, proto, MAX).unwrap().unwrap();
        assert!(buf.is_empty(), "whole packet consumed");
        p
    }

    use DecodeError as E;
    const V3: Option<Protocol> = Some(Protocol::V3_1_1);
    const V31: Option<Protocol> = Some(Protocol::V3_1);
    const V5: Option<Protocol> = Some(Protocol::V5);
    const NONE: Option<Protocol> = None;
    const MALFORMED: ReasonCode = ReasonCode::MALFORMED_PACKET;
    const PROTOCOL: ReasonCode = ReasonCode::PROTOCOL_ERROR;

    /// Name, negotiated protocol, bytes, expected error, its reason code.
    type Case = (
        &'static str,
        Option<Protocol>,
        Vec<u8>,
        DecodeError,
        ReasonCode,
    );

    #[test]
    fn error_table() {
        let m = |p, w| E::Malformed(p, w);
        #[rustfmt::skip]
        let cases: Vec<Case> = vec![
            // Fixed header [MQTT-2.2.2-2].
            ("reserved type 0", V5, vec![0x00, 0x00], E::ReservedPacketType(0), MALFORMED),
            ("reserved type 0 before CONNECT", NONE, vec![0x00], E::ReservedPacketType(0), MALFORMED),
            ("type 15 before CONNECT", NONE, vec![0xF0, 0x00], E::ReservedPacketType(15), MALFORMED),
            ("AUTH in 3.1.1", V3, vec![0xF0, 0x00], E::NotInThisVersion("AUTH"), PROTOCOL),
            ("AUTH in 3.1", V31, vec![0xF0, 0x00], E::NotInThisVersion("AUTH"), PROTOCOL),
            ("AUTH flags", V5, vec![0xF1, 0x00], E::InvalidFlags { packet: "AUTH", flags: 1 }, MALFORMED),
            ("PUBREL flags 0", V5, pkt(0x60, &[0, 1]), E::InvalidFlags { packet: "PUBREL", flags: 0 }, MALFORMED),
            ("SUBSCRIBE flags 0", V3, pkt(0x80, &[0, 1]), E::InvalidFlags { packet: "SUBSCRIBE", flags: 0 }, MALFORMED),
            ("UNSUBSCRIBE flags 3", V5, pkt(0xA3, &[0, 1]), E::InvalidFlags { packet: "UNSUBSCRIBE", flags: 3 }, MALFORMED),
            ("CONNECT flags", NONE, vec![0x12, 0x00], E::InvalidFlags { packet: "CONNECT", flags: 2 }, MALFORMED),
            ("PUBACK flags", V3, pkt(0x42, &[0, 1]), E::InvalidFlags { packet: "PUBACK", flags: 2 }, MALFORMED),
            ("PINGREQ flags", V3, vec![0xC8, 0x00], E::InvalidFlags { packet: "PINGREQ", flags: 8 }, MALFORMED),
            ("DISCONNECT flags", V5, vec![0xE1, 0x00], E::InvalidFlags { packet: "DISCONNECT", flags: 1 }, MALFORMED),
            // [MQTT-3.3.1-4] QoS 3; [MQTT-3.3.1-2] DUP with QoS 0.
            ("PUBLISH QoS 3", V3, vec![0x36], E::InvalidQoS(3), MALFORMED),
            ("PUBLISH QoS 0 DUP", V5, pkt(0x38, &f(b"t")), E::InvalidFlags { packet: "PUBLISH", flags: 8 }, MALFORMED),
            // Remaining length [MQTT-1.5.5].
            ("5-byte remaining length", V3, vec![0x30, 0xFF, 0xFF, 0xFF, 0xFF, 0x01], E::MalformedRemainingLength, MALFORMED),
            ("4th length byte continues", V3, vec![0x30, 0x80, 0x80, 0x80, 0x80], E::MalformedRemainingLength, MALFORMED),
            ("non-minimal remaining length [MQTT-1.5.5-1]", V3, vec![0xC0, 0x80, 0x00], E::MalformedRemainingLength, MALFORMED),
            // Truncated / trailing.
            ("PUBLISH topic overruns", V3, pkt(0x30, &[0, 5, b'a']), m("PUBLISH", "topic name"), MALFORMED),
            ("PUBLISH QoS 1 without id", V3, pkt(0x32, &f(b"t")), m("PUBLISH", "packet identifier"), MALFORMED),
            ("PINGREQ with body", V3, pkt(0xC0, &[0]), m("PINGREQ", "unexpected trailing bytes"), MALFORMED),
            ("PINGRESP with body", V3, pkt(0xD0, &[0]), m("PINGRESP", "unexpected trailing bytes"), MALFORMED),
            ("3.1.1 PUBACK with reason", V3, pkt(0x40, &[0, 1, 0]), m("PUBACK", "unexpected trailing bytes"), MALFORMED),
            ("PUBACK before CONNECT is 3.1.1", NONE, pkt(0x40, &[0, 1, 0]), m("PUBACK", "unexpected trailing bytes"), MALFORMED),
            ("3.1.1 DISCONNECT with body", V3, pkt(0xE0, &[0]), m("DISCONNECT", "unexpected trailing bytes"), MALFORMED),
            ("3.1.1 UNSUBACK with body", V3, pkt(0xB0, &[0, 1, 0]), m("UNSUBACK", "unexpected trailing bytes"), MALFORMED),
            ("PUBACK too short", V5, pkt(0x40, &[0]), m("PUBACK", "packet identifier"), MALFORMED),
            ("V5 PUBACK property length overruns", V5, pkt(0x40, &[0, 1, 0, 5, 0x1F]), m("PUBACK", "property length exceeds packet"), MALFORMED),
            ("V5 PUBACK trailing after properties", V5, pkt(0x40, &[0, 1, 0, 0, 9]), m("PUBACK", "unexpected trailing bytes"), MALFORMED),
            ("V5 DISCONNECT trailing", V5, pkt(0xE0, &[0, 0, 9]), m("DISCONNECT", "unexpected trailing bytes"), MALFORMED),
            ("V5 property value overruns property length", V5, publish_v5(&[0x02, 0, 0]), m("PUBLISH", "property value"), MALFORMED),
            ("V5 non-minimal property length", V5, pkt(0x30, &cat(&[&f(b"t"), &[0x80, 0x00]])), m("PUBLISH", "property length"), MALFORMED),
            ("V5 sub id 5 bytes", V5, publish_v5(&[0x0B, 0x80, 0x80, 0x80, 0x80, 0x01]), m("PUBLISH", "subscription identifier"), MALFORMED),
            ("CONNACK reserved flags [MQTT-3.2.2-1]", V3, pkt(0x20, &[0x02, 0]), m("CONNACK", "reserved acknowledge flags"), MALFORMED),
            ("SUBACK without codes", V3, pkt(0x90, &[0, 1]), m("SUBACK", "no return codes"), MALFORMED),
            ("3.1.1 SUBACK reserved code [MQTT-3.9.3-2]", V3, pkt(0x90, &[0, 1, 0x81]), m("SUBACK", "reserved return code"), MALFORMED),
            ("V5 UNSUBACK without codes", V5, pkt(0xB0, &[0, 1, 0]), m("UNSUBACK", "no reason codes"), MALFORMED),
            // UTF-8 [MQTT-1.5.4-1], [MQTT-1.5.4-2].
            ("topic with U+0000", V3, pkt(0x30, &f(b"a\0b")), E::InvalidUtf8("topic name"), MALFORMED),
            ("topic not UTF-8", V3, pkt(0x30, &f(b"a\xFFb")), E::InvalidUtf8("topic name"), MALFORMED),
            ("topic with surrogate", V5, pkt(0x30, &f(b"\xED\xA0\x80")), E::InvalidUtf8("topic name"), MALFORMED),
            ("client id overlong NUL", NONE, connect(4, 0x02, &f(b"\xC0\x80")), E::InvalidUtf8("client identifier"), MALFORMED),
            ("user name with NUL", NONE, connect(4, 0x82, &cat(&[&f(b"c"), &f(b"u\0")])), E::InvalidUtf8("user name"), MALFORMED),
            ("filter not UTF-8", V3, pkt(0x82, &cat(&[&[0, 1], &f(b"\xFE"), &[0]])), E::InvalidUtf8("topic filter"), MALFORMED),
            ("unsubscribe filter NUL", V5, pkt(0xA2, &cat(&[&[0, 1, 0], &f(b"a\0")])), E::InvalidUtf8("topic filter"), MALFORMED),
            ("user property not UTF-8", V5, publish_v5(&cat(&[&[0x26], &f(b"k"), &f(b"\xFF")])), E::InvalidUtf8("user property value"), MALFORMED),
            ("reason string NUL", V5, pkt(0x40, &cat(&[&[0, 1, 0x80, 4, 0x1F], &f(b"\0")])), E::InvalidUtf8("property value"), MALFORMED),
            // Packet identifiers [MQTT-2.2.1-3].
            ("PUBLISH QoS 1 id 0", V3, pkt(0x32, &cat(&[&f(b"t"), &[0, 0]])), E::ZeroPacketId("PUBLISH"), PROTOCOL),
            ("PUBLISH QoS 2 id 0", V5, pkt(0x34, &cat(&[&f(b"t"), &[0, 0, 0]])), E::ZeroPacketId("PUBLISH"), PROTOCOL),
            ("PUBACK id 0", V3, pkt(0x40, &[0, 0]), E::ZeroPacketId("PUBACK"), PROTOCOL),
            ("PUBREC id 0", V5, pkt(0x50, &[0, 0]), E::ZeroPacketId("PUBREC"), PROTOCOL),
            ("PUBREL id 0", V3, pkt(0x62, &[0, 0]), E::ZeroPacketId("PUBREL"), PROTOCOL),
            ("PUBCOMP id 0", V5, pkt(0x70, &[0, 0]), E::ZeroPacketId("PUBCOMP"), PROTOCOL),
            ("SUBSCRIBE id 0", V3, pkt(0x82, &cat(&[&[0, 0], &f(b"a"), &[0]])), E::ZeroPacketId("SUBSCRIBE"), PROTOCOL),
            ("UNSUBSCRIBE id 0", V3, pkt(0xA2, &cat(&[&[0, 0], &f(b"a")])), E::ZeroPacketId("UNSUBSCRIBE"), PROTOCOL),
            ("SUBACK id 0", V3, pkt(0x90, &[0, 0, 0]), E::ZeroPacketId("SUBACK"), PROTOCOL),
            ("UNSUBACK id 0", V3, pkt(0xB0, &[0, 0]), E::ZeroPacketId("UNSUBACK"), PROTOCOL),
            // Topic names [MQTT-3.3.2-1], [MQTT-3.3.2-2].
            ("PUBLISH topic with +", V3, pkt(0x30, &f(b"a/+")), E::InvalidTopicName, ReasonCode::TOPIC_NAME_INVALID),
            ("PUBLISH topic with #", V5, pkt(0x30, &cat(&[&f(b"#"), &[0]])), E::InvalidTopicName, ReasonCode::TOPIC_NAME_INVALID),
            ("PUBLISH empty topic 3.1.1", V3, pkt(0x30, &f(b"")), E::InvalidTopicName, ReasonCode::TOPIC_NAME_INVALID),
            ("PUBLISH empty topic V5 without alias", V5, pkt(0x30, &cat(&[&f(b""), &[0]])), E::InvalidTopicName, ReasonCode::TOPIC_NAME_INVALID),
            ("will topic with wildcard", NONE, connect(4, 0x06, &cat(&[&f(b"c"), &f(b"a/#"), &f(b"x")])), E::InvalidTopicName, ReasonCode::TOPIC_NAME_INVALID),
            ("will topic empty", NONE, connect(5, 0x06, &cat(&[&[0], &f(b"c"), &[0], &f(b""), &f(b"x")])), E::InvalidTopicName, ReasonCode::TOPIC_NAME_INVALID),
            // Properties: not allowed in the packet.
            ("session expiry in PUBLISH", V5, publish_v5(&[0x11, 0, 0, 0, 1]), E::InvalidProperty { packet: "PUBLISH", id: 0x11 }, MALFORMED),
            ("unknown property 0x04", V5, publish_v5(&[0x04, 0]), E::InvalidProperty { packet: "PUBLISH", id: 0x04 }, MALFORMED),
            ("unknown property 0x7F", V5, publish_v5(&[0x7F, 0]), E::InvalidProperty { packet: "PUBLISH", id: 0x7F }, MALFORMED),
            ("property id 0xFF", V5, publish_v5(&[0xFF, 0]), E::InvalidProperty { packet: "PUBLISH", id: 0xFF }, MALFORMED),
            ("topic alias in CONNECT", NONE, connect(5, 0x02, &cat(&[&[3, 0x23, 0, 1], &f(b"c")])), E::InvalidProperty { packet: "CONNECT", id: 0x23 }, MALFORMED),
            ("will delay in CONNECT properties", NONE, connect(5, 0x02, &cat(&[&[5, 0x18, 0, 0, 0, 1], &f(b"c")])), E::InvalidProperty { packet: "CONNECT", id: 0x18 }, MALFORMED),
            ("session expiry in will properties", NONE, connect(5, 0x06, &cat(&[&[0], &f(b"c"), &[5, 0x11, 0, 0, 0, 1], &f(b"w"), &f(b"x")])), E::InvalidProperty { packet: "CONNECT", id: 0x11 }, MALFORMED),
            ("reason string in UNSUBSCRIBE", V5, pkt(0xA2, &cat(&[&[0, 1, 4, 0x1F], &f(b"r"), &f(b"a")])), E::InvalidProperty { packet: "UNSUBSCRIBE", id: 0x1F }, MALFORMED),
            ("server reference in PUBACK", V5, pkt(0x40, &cat(&[&[0, 1, 0, 4, 0x1C], &f(b"s")])), E::InvalidProperty { packet: "PUBACK", id: 0x1C }, MALFORMED),
            ("maximum QoS in DISCONNECT", V5, pkt(0xE0, &[0, 2, 0x24, 0]), E::InvalidProperty { packet: "DISCONNECT", id: 0x24 }, MALFORMED),
            ("session expiry in AUTH", V5, pkt(0xF0, &[0x18, 5, 0x11, 0, 0, 0, 0]), E::InvalidProperty { packet: "AUTH", id: 0x11 }, MALFORMED),
            ("will delay in CONNACK", V5, pkt(0x20, &[0, 0, 5, 0x18, 0, 0, 0, 1]), E::InvalidProperty { packet: "CONNACK", id: 0x18 }, MALFORMED),
            // Properties: duplicates.
            ("message expiry twice", V5, publish_v5(&[0x02, 0, 0, 0, 1, 0x02, 0, 0, 0, 2]), E::DuplicateProperty { packet: "PUBLISH", id: 0x02 }, PROTOCOL),
            ("reason string twice", V5, pkt(0x40, &cat(&[&[0, 1, 0, 8, 0x1F], &f(b"a"), &[0x1F], &f(b"b")])), E::DuplicateProperty { packet: "PUBACK", id: 0x1F }, PROTOCOL),
            ("subscription id twice in SUBSCRIBE", V5, pkt(0x82, &cat(&[&[0, 1, 4, 0x0B, 1, 0x0B, 2], &f(b"a"), &[0]])), E::DuplicateProperty { packet: "SUBSCRIBE", id: 0x0B }, PROTOCOL),
            ("receive maximum twice in CONNECT", NONE, connect(5, 0x02, &cat(&[&[6, 0x21, 0, 1, 0x21, 0, 2], &f(b"c")])), E::DuplicateProperty { packet: "CONNECT", id: 0x21 }, PROTOCOL),
            // Properties: values.
            ("topic alias 0", V5, publish_v5(&[0x23, 0, 0]), E::InvalidPropertyValue { packet: "PUBLISH", id: 0x23 }, PROTOCOL),
            ("payload format 2", V5, publish_v5(&[0x01, 2]), E::InvalidPropertyValue { packet: "PUBLISH", id: 0x01 }, PROTOCOL),
            ("subscription id 0 in PUBLISH", V5, publish_v5(&[0x0B, 0]), E::InvalidPropertyValue { packet: "PUBLISH", id: 0x0B }, PROTOCOL),
            ("subscription id 0 in SUBSCRIBE", V5, pkt(0x82, &cat(&[&[0, 1, 2, 0x0B, 0], &f(b"a"), &[0]])), E::InvalidPropertyValue { packet: "SUBSCRIBE", id: 0x0B }, PROTOCOL),
            ("receive maximum 0", NONE, connect(5, 0x02, &cat(&[&[3, 0x21, 0, 0], &f(b"c")])), E::InvalidPropertyValue { packet: "CONNECT", id: 0x21 }, PROTOCOL),
            ("maximum packet size 0", NONE, connect(5, 0x02, &cat(&[&[5, 0x27, 0, 0, 0, 0], &f(b"c")])), E::InvalidPropertyValue { packet: "CONNECT", id: 0x27 }, PROTOCOL),
            ("request problem information 2", NONE, connect(5, 0x02, &cat(&[&[2, 0x17, 2], &f(b"c")])), E::InvalidPropertyValue { packet: "CONNECT", id: 0x17 }, PROTOCOL),
            ("request response information 2", NONE, connect(5, 0x02, &cat(&[&[2, 0x19, 2], &f(b"c")])), E::InvalidPropertyValue { packet: "CONNECT", id: 0x19 }, PROTOCOL),
            ("will payload format 3", NONE, connect(5, 0x06, &cat(&[&[0], &f(b"c"), &[2, 0x01, 3], &f(b"w"), &f(b"x")])), E::InvalidPropertyValue { packet: "CONNECT", id: 0x01 }, PROTOCOL),
            ("maximum QoS 2", V5, pkt(0x20, &[0, 0, 2, 0x24, 2]), E::InvalidPropertyValue { packet: "CONNACK", id: 0x24 }, PROTOCOL),
            ("retain available 2", V5, pkt(0x20, &[0, 0, 2, 0x25, 2]), E::InvalidPropertyValue { packet: "CONNACK", id: 0x25 }, PROTOCOL),
            ("wildcard available 2", V5, pkt(0x20, &[0, 0, 2, 0x28, 2]), E::InvalidPropertyValue { packet: "CONNACK", id: 0x28 }, PROTOCOL),
            ("sub ids available 2", V5, pkt(0x20, &[0, 0, 2, 0x29, 2]), E::InvalidPropertyValue { packet: "CONNACK", id: 0x29 }, PROTOCOL),
            ("shared available 2", V5, pkt(0x20, &[0, 0, 2, 0x2A, 2]), E::InvalidPropertyValue { packet: "CONNACK", id: 0x2A }, PROTOCOL),
            ("CONNACK receive maximum 0", V5, pkt(0x20, &[0, 0, 3, 0x21, 0, 0]), E::InvalidPropertyValue { packet: "CONNACK", id: 0x21 }, PROTOCOL),
            // CONNECT.
            ("protocol MQTT level 3", NONE, pkt(0x10, &cat(&[&f(b"MQTT"), &[3, 2, 0, 60], &f(b"c")])), E::UnsupportedProtocol, ReasonCode::UNSUPPORTED_PROTOCOL_VERSION),
            ("protocol MQTT level 6", NONE, connect(6, 0x02, &f(b"c")), E::UnsupportedProtocol, ReasonCode::UNSUPPORTED_PROTOCOL_VERSION),
            ("protocol MQIsdp level 4", NONE, pkt(0x10, &cat(&[&f(b"MQIsdp"), &[4, 2, 0, 60], &f(b"c")])), E::UnsupportedProtocol, ReasonCode::UNSUPPORTED_PROTOCOL_VERSION),
            ("protocol name mqtt", NONE, pkt(0x10, &cat(&[&f(b"mqtt"), &[4, 2, 0, 60], &f(b"c")])), E::InvalidProtocolName, ReasonCode::MALFORMED_PACKET),
            ("reserved connect flag [MQTT-3.1.2-3]", NONE, connect(4, 0x03, &f(b"c")), E::InvalidConnectFlags(0x03), MALFORMED),
            ("will QoS without will [MQTT-3.1.2-11]", NONE, connect(4, 0x0A, &f(b"c")), E::InvalidConnectFlags(0x0A), MALFORMED),
            ("will retain without will [MQTT-3.1.2-13]", NONE, connect(5, 0x22, &cat(&[&[0], &f(b"c")])), E::InvalidConnectFlags(0x22), MALFORMED),
            ("will QoS 3 [MQTT-3.1.2-12]", NONE, connect(4, 0x1E, &cat(&[&f(b"c"), &f(b"w"), &f(b"x")])), E::InvalidConnectFlags(0x1E), MALFORMED),
            ("password without user name 3.1.1 [MQTT-3.1.2-22]", NONE, connect(4, 0x42, &cat(&[&f(b"c"), &f(b"p")])), E::InvalidConnectFlags(0x42), MALFORMED),
            ("password without user name 3.1", NONE, connect(3, 0x42, &cat(&[&f(b"c"), &f(b"p")])), E::InvalidConnectFlags(0x42), MALFORMED),
            ("CONNECT missing user name", NONE, connect(4, 0x82, &f(b"c")), m("CONNECT", "user name"), MALFORMED),
            ("CONNECT trailing bytes", NONE, connect(4, 0x02, &cat(&[&f(b"c"), &[0]])), m("CONNECT", "unexpected trailing bytes"), MALFORMED),
            // SUBSCRIBE / UNSUBSCRIBE.
            ("3.1.1 options reserved bits [MQTT-3.8.3-4]", V3, pkt(0x82, &cat(&[&[0, 1], &f(b"a"), &[0x04]])), E::InvalidSubscriptionOptions(0x04), MALFORMED),
            ("3.1.1 options QoS 3", V3, pkt(0x82, &cat(&[&[0, 1], &f(b"a"), &[0x03]])), E::InvalidSubscriptionOptions(0x03), MALFORMED),
            ("3.1 options reserved bits", V31, pkt(0x82, &cat(&[&[0, 1], &f(b"a"), &[0x80]])), E::InvalidSubscriptionOptions(0x80), MALFORMED),
            ("V5 options reserved bits [MQTT-3.8.3-5]", V5, pkt(0x82, &cat(&[&[0, 1, 0], &f(b"a"), &[0x40]])), E::InvalidSubscriptionOptions(0x40), MALFORMED),
            ("V5 retain handling 3", V5, pkt(0x82, &cat(&[&[0, 1, 0], &f(b"a"), &[0x30]])), E::InvalidSubscriptionOptions(0x30), MALFORMED),
            ("V5 options QoS 3", V5, pkt(0x82, &cat(&[&[0, 1, 0], &f(b"a"), &[0x03]])), E::InvalidSubscriptionOptions(0x03), MALFORMED),
            ("filter without options", V3, pkt(0x82, &cat(&[&[0, 1], &f(b"a")])), m("SUBSCRIBE", "subscription options"), MALFORMED),
            ("SUBSCRIBE without filters [MQTT-3.8.3-3]", V3, pkt(0x82, &[0, 1]), E::NoTopicFilters("SUBSCRIBE"), PROTOCOL),
            ("V5 SUBSCRIBE without filters", V5, pkt(0x82, &[0, 1, 0]), E::NoTopicFilters("SUBSCRIBE"), PROTOCOL),
            ("UNSUBSCRIBE without filters [MQTT-3.10.3-2]", V3, pkt(0xA2, &[0, 1]), E::NoTopicFilters("UNSUBSCRIBE"), PROTOCOL),
            ("V5 UNSUBSCRIBE without filters", V5, pkt(0xA2, &[0, 1, 0]), E::NoTopicFilters("UNSUBSCRIBE"), PROTOCOL),
        ];
        assert!(cases.len() > 100);
        for (name, proto, bytes, want, code) in cases {
            let mut buf = BytesMut::from(&bytes[..]);
            let got = decode(&mut buf, proto, MAX);
            assert_eq!(got, Err(want.clone()), "{name}");
            assert_eq!(want.reason_code(), code, "{name}: reason code");
        }
    }

    #[test]
    fn header_errors_consume_nothing() {
        let mut buf = BytesMut::from(&[0x36u8, 0x00][..]);
        assert_eq!(decode(&mut buf, V5, MAX), Err(E::InvalidQoS(3)));
        assert_eq!(buf.len(), 2);
    }

    #[test]
    fn packet_too_large_before_body_arrives() {
        // A PUBLISH announcing 1,000 bytes of which none have arrived.
        let mut buf = BytesMut::from(&[0x30u8, 0xE8, 0x07][..]);
        assert_eq!(
            decode(&mut buf, V3, 1000),
            Err(E::PacketTooLarge {
                size: 1003,
                max: 1000
            })
        );
        assert_eq!(
            E::PacketTooLarge { size: 0, max: 0 }.reason_code(),
            ReasonCode::PACKET_TOO_LARGE
        );
        // Exactly at the limit is fine (and incomplete).
        assert_eq!(decode(&mut buf, V3, 1003), Ok(None));
        assert_eq!(buf.len(), 3);
        // The limit counts the fixed header: PINGREQ is 2 bytes.
        assert_eq!(
            dec(&[0xC0, 0], None).unwrap(),
            decode(&mut BytesMut::from(&[0xC0u8, 0][..]), V3, 2).unwrap()
        );
        assert_eq!(
            decode(&mut BytesMut::from(&[0xC0u8, 0][..]), V3, 1),
            Err(E::PacketTooLarge { size: 2, max: 1 })
        );
        // Largest remaining length with an incomplete body: checked, not waited for.
        assert_eq!(
            decode(
                &mut BytesMut::from(&[0x30u8, 0xFF, 0xFF, 0xFF, 0x7F][..]),
                V5,
                1 << 20
            ),
            Err(E::PacketTooLarge {
                size: 268_435_460,
                max: 1 << 20
            })
        );
    }

    #[test]
    fn incremental_decode_one_byte_at_a_time() {
        for proto in ALL {
            for p in samples() {
                if !proto.is_v5() && matches!(p, Packet::Auth(_)) {
                    continue;
                }
                let mut wire = BytesMut::new();
                encode(&p, proto, &mut wire).unwrap();
                let mut buf = BytesMut::new();
                for (i, &b) in wire.iter().enumerate() {
                    buf.extend_from_slice(&[b]);
                    let r = decode(&mut buf, Some(proto), MAX).unwrap();
                    if i + 1 < wire.len() {
                        assert_eq!(r, None, "{proto:?} {} at {i}", p.name());
                        assert_eq!(buf.len(), i + 1, "nothing consumed");
                    } else {
                        assert!(r.is_some());
                        assert!(buf.is_empty());
                    }
                }
            }
        }
    }

    #[test]
    fn empty_buffer_is_incomplete() {
        assert_eq!(decode(&mut BytesMut::new(), None, MAX), Ok(None));
        assert_eq!(decode(&mut BytesMut::new(), V5, 0), Ok(None));
    }

    #[test]
    fn consumes_exactly_one_packet() {
        let mut buf = BytesMut::new();
        buf.extend_from_slice(&pkt(0x40, &[0, 1]));
        buf.extend_from_slice(&pkt(0x30, &cat(&[&f(b"t"), b"x"])));
        buf.extend_from_slice(&[0xC0]); // start of a PINGREQ
        assert_eq!(dec_partial(&mut buf), Some(Packet::PubAck(PubResp::new(1))));
        assert!(matches!(dec_partial(&mut buf), Some(Packet::Publish(_))));
        assert_eq!(dec_partial(&mut buf), None);
        assert_eq!(&buf[..], &[0xC0]);
        buf.extend_from_slice(&[0x00]);
        assert_eq!(dec_partial(&mut buf), Some(Packet::PingReq));
        assert!(buf.is_empty());
    }

    fn dec_partial(buf: &mut BytesMut) -> Option<Packet> {
        decode(buf, V3, MAX).unwrap()
    }

    #[test]
    fn publish_is_zero_copy() {
        let wire = pkt(0x32, &cat(&[&f(b"sensors/1"), &[0, 7], b"the payload"]));
        let mut buf = BytesMut::with_capacity(4096);
        buf.extend_from_slice(&wire);
        let range = buf.as_ptr() as usize..buf.as_ptr() as usize + buf.len();
        let Some(Packet::Publish(p)) = decode(&mut buf, V3, MAX).unwrap() else {
            panic!("not a PUBLISH");
        };
        assert_eq!(&p.payload[..], b"the payload");
        assert_eq!(&p.topic[..], "sensors/1");
        assert_eq!(p.packet_id, Some(7));
        let inside = |ptr: *const u8, len: usize| {
            range.contains(&(ptr as usize)) && range.contains(&(ptr as usize + len - 1))
        };
        assert!(
            inside(p.payload.as_ptr(), p.payload.len()),
            "payload is copied"
        );
        assert!(
            inside(p.topic.as_bytes().as_ptr(), p.topic.len()),
            "topic is copied"
        );
    }

    #[test]
    fn v5_properties_are_zero_copy() {
        let props = cat(&[&[0x09], &f(b"corr-data"), &[0x08], &f(b"reply/to")]);
        let wire = publish_v5(&props);
        let mut buf = BytesMut::from(&wire[..]);
        let range = buf.as_ptr() as usize..buf.as_ptr() as usize + buf.len();
        let Some(Packet::Publish(p)) = decode(&mut buf, V5, MAX).unwrap() else {
            panic!("not a PUBLISH");
        };
        let cd = p.properties.correlation_data.unwrap();
        assert_eq!(&cd[..], b"corr-data");
        assert!(range.contains(&(cd.as_ptr() as usize)));
        let rt = p.properties.response_topic.unwrap();
        assert!(range.contains(&(rt.as_bytes().as_ptr() as usize)));
    }

    #[test]
    fn v5_short_forms_decode() {
        // PUBACK..PUBCOMP remaining length 2: Success, no properties (3.4.2.1).
        for first in [0x40u8, 0x50, 0x62, 0x70] {
            let p = dec_ok(&pkt(first, &[0, 9]), V5);
            let want = PubResp::new(9);
            assert!(
                matches!(p, Packet::PubAck(ref r) | Packet::PubRec(ref r) | Packet::PubRel(ref r) | Packet::PubComp(ref r) if *r == want)
            );
        }
        // Remaining length 3: reason code, no properties.
        assert_eq!(
            dec_ok(&pkt(0x50, &[0, 9, 0x80]), V5),
            Packet::PubRec(PubResp::with_reason(9, ReasonCode::UNSPECIFIED_ERROR))
        );
        // Remaining length 4 with property length 0.
        assert_eq!(
            dec_ok(&pkt(0x70, &[0, 9, 0x92, 0]), V5),
            Packet::PubComp(PubResp::with_reason(
                9,
                ReasonCode::PACKET_IDENTIFIER_NOT_FOUND
            ))
        );
        // DISCONNECT / AUTH remaining length 0: Success, no properties.
        assert_eq!(
            dec_ok(&[0xE0, 0], V5),
            Packet::Disconnect(Disconnect::default())
        );
        assert_eq!(dec_ok(&[0xF0, 0], V5), Packet::Auth(Auth::default()));
        // DISCONNECT remaining length 1: reason only (3.14.2.2.1).
        assert_eq!(
            dec_ok(&[0xE0, 1, 0x04], V5),
            Packet::Disconnect(Disconnect {
                reason_code: ReasonCode::DISCONNECT_WITH_WILL,
                ..Disconnect::default()
            })
        );
        // AUTH with reason only is accepted too.
        assert_eq!(
            dec_ok(&[0xF0, 1, 0x18], V5),
            Packet::Auth(Auth {
                reason_code: ReasonCode::CONTINUE_AUTHENTICATION,
                ..Auth::default()
            })
        );
    }

    #[test]
    fn v5_empty_topic_with_alias_mqtt_3_3_2_1() {
        let wire = pkt(0x30, &cat(&[&f(b""), &[3, 0x23, 0, 4], b"x"]));
        let Packet::Publish(p) = dec_ok(&wire, V5) else {
            panic!()
        };
        assert_eq!(p.topic, "");
        assert_eq!(p.properties.topic_alias, Some(4));
        // The same bytes in 3.1.1 are an empty topic followed by a payload.
        assert_eq!(dec(&wire, V3), Err(E::InvalidTopicName));
    }

    #[test]
    fn v5_publish_repeats_subscription_identifier_and_user_properties() {
        let props = cat(&[
            &[0x0B, 0x01, 0x0B, 0xFF, 0xFF, 0xFF, 0x7F],
            &[0x26],
            &f(b"a"),
            &f(b"1"),
            &[0x26],
            &f(b"a"),
            &f(b"2"),
        ]);
        let Packet::Publish(p) = dec_ok(&publish_v5(&props), V5) else {
            panic!()
        };
        assert_eq!(p.properties.subscription_identifiers, vec![1, 268_435_455]);
        assert_eq!(
            p.properties.user_properties,
            vec![("a".into(), "1".into()), ("a".into(), "2".into())]
        );
        assert_eq!(&p.payload[..], b"payload");
    }

    #[test]
    fn connect_protocol_detection() {
        for (level, proto) in [
            (3, Protocol::V3_1),
            (4, Protocol::V3_1_1),
            (5, Protocol::V5),
        ] {
            let rest = if level == 5 {
                cat(&[&[0], &f(b"id")])
            } else {
                f(b"id")
            };
            // The negotiated protocol passed in does not matter for CONNECT.
            for given in [None, V3, V5] {
                let Packet::Connect(c) = dec_ok(&connect(level, 0x02, &rest), given) else {
                    panic!()
                };
                assert_eq!(c.protocol, proto);
                assert_eq!(c.client_id, "id");
                assert!(c.clean_start);
                assert_eq!(c.keep_alive, 60);
            }
        }
        // Empty client id is allowed by the codec (the server decides).
        let Packet::Connect(c) = dec_ok(&connect(4, 0x00, &f(b"")), None) else {
            panic!()
        };
        assert_eq!(c.client_id, "");
        assert!(!c.clean_start);
    }

    #[test]
    fn connect_will_and_credentials() {
        let wire = connect(
            4,
            0xF6, // user, password, will retain, will QoS 2, will, clean
            &cat(&[&f(b"c"), &f(b"w/t"), &f(b"bye"), &f(b"u"), &f(b"\xFFpw")]),
        );
        let Packet::Connect(c) = dec_ok(&wire, None) else {
            panic!()
        };
        let w = c.will.unwrap();
        assert_eq!(
            (w.topic.as_ref(), &w.payload[..], w.qos, w.retain),
            ("w/t", &b"bye"[..], QoS::ExactlyOnce, true)
        );
        assert_eq!(c.username.as_deref(), Some("u"));
        assert_eq!(c.password.as_deref(), Some(&b"\xFFpw"[..]));
    }

    #[test]
    fn subscribe_filters_are_not_validated_beyond_utf8() {
        let wire = pkt(0x82, &cat(&[&[0, 1], &f(b"a/#/b"), &[1], &f(b""), &[2]]));
        let Packet::Subscribe(s) = dec_ok(&wire, V3) else {
            panic!()
        };
        assert_eq!(s.filters.len(), 2);
        assert_eq!(s.filters[0].0, "a/#/b");
        assert_eq!(s.filters[1].1.qos, QoS::ExactlyOnce);
    }

    #[test]
    fn v5_subscribe_options_and_identifier() {
        let wire = pkt(
            0x82,
            &cat(&[&[0, 1, 2, 0x0B, 0x05], &f(b"a/+"), &[0b0010_1110]]),
        );
        let Packet::Subscribe(s) = dec_ok(&wire, V5) else {
            panic!()
        };
        assert_eq!(s.subscription_identifier, Some(5));
        assert_eq!(
            s.filters[0].1,
            SubscriptionOptions {
                qos: QoS::ExactlyOnce,
                no_local: true,
                retain_as_published: true,
                retain_handling: 2,
            }
        );
    }

    #[test]
    fn v3_connack_codes() {
        for (code, rc) in [
            (0u8, ReasonCode::SUCCESS),
            (1, ReasonCode::UNSUPPORTED_PROTOCOL_VERSION),
            (5, ReasonCode::NOT_AUTHORIZED),
        ] {
            let Packet::ConnAck(a) = dec_ok(&[0x20, 2, 1, code], V3) else {
                panic!()
            };
            assert_eq!(a.reason_code, rc);
            assert!(a.session_present);
        }
        // 3.1: the flags byte is unused.
        let Packet::ConnAck(a) = dec_ok(&[0x20, 2, 0xFF, 0], V31) else {
            panic!()
        };
        assert!(!a.session_present);
    }

    /// A Mosquitto bridge (`try_private true`) sets bit 7 of the protocol
    /// level: 0x83 (3.1) and 0x84 (3.1.1) are bridges; 0x85 is not a level.
    #[test]
    fn bridge_bit_on_the_3x_levels() {
        for (name, level, proto) in [
            (&b"MQIsdp"[..], 0x83u8, Protocol::V3_1),
            (&b"MQTT"[..], 0x84, Protocol::V3_1_1),
        ] {
            let bytes = pkt(0x10, &cat(&[&f(name), &[level, 2, 0, 60], &f(b"c")]));
            let Packet::Connect(c) = dec_ok(&bytes, NONE) else {
                panic!()
            };
            assert_eq!((c.protocol, c.bridge), (proto, true));
            // Round trip: the encoder sets the bit again.
            let mut buf = BytesMut::new();
            crate::encode(&Packet::Connect(c), proto, &mut buf).unwrap();
            assert_eq!(&buf[..], &bytes[..]);
        }
        let Packet::Connect(c) = dec_ok(&connect(4, 0x02, &f(b"c")), NONE) else {
            panic!()
        };
        assert!(!c.bridge);
        let v5_bridge = pkt(0x10, &cat(&[&f(b"MQTT"), &[0x85, 2, 0, 60, 0], &f(b"c")]));
        assert_eq!(dec(&v5_bridge, NONE), Err(E::UnsupportedProtocol));
    }

    /// MQTT 3.1 clients may set DUP on a resent PUBREL, SUBSCRIBE or
    /// UNSUBSCRIBE (3.1 sections 3.6, 3.8, 3.10); 3.1.1 and 5 forbid it
    /// [MQTT-3.6.1-1], [MQTT-3.8.1-1], [MQTT-3.10.1-1].
    #[test]
    fn v31_allows_dup_on_pubrel_subscribe_unsubscribe() {
        let pubrel = pkt(0x6A, &[0, 7]);
        let subscribe = pkt(0x8A, &cat(&[&[0, 1], &f(b"a"), &[1]]));
        let unsubscribe = pkt(0xAA, &cat(&[&[0, 1], &f(b"a")]));
        assert!(matches!(dec_ok(&pubrel, V31), Packet::PubRel(r) if r.packet_id == 7));
        assert!(matches!(dec_ok(&subscribe, V31), Packet::Subscribe(_)));
        assert!(matches!(dec_ok(&unsubscribe, V31), Packet::Unsubscribe(_)));
        for proto in [V3, V5] {
            for bytes in [&pubrel, &subscribe, &unsubscribe] {
                assert!(
                    matches!(dec(bytes, proto), Err(E::InvalidFlags { .. })),
                    "{proto:?} {bytes:02x?}"
                );
            }
        }
        // Only DUP: other flag bits stay malformed in 3.1 too.
        assert!(dec(&pkt(0x6B, &[0, 7]), V31).is_err());
        assert!(dec(&pkt(0x60, &[0, 7]), V31).is_err());
    }

    #[test]
    fn encoded_len_matches_decoded_wire_size() {
        for p in samples() {
            let n = encoded_len(&p, Protocol::V5).unwrap();
            let mut buf = BytesMut::new();
            encode(&p, Protocol::V5, &mut buf).unwrap();
            assert_eq!(n, buf.len());
            // A maximum packet size of exactly `n` accepts it, `n - 1` rejects it.
            assert!(decode(&mut buf.clone(), V5, n).unwrap().is_some());
            assert_eq!(
                decode(&mut buf, V5, n - 1),
                Err(E::PacketTooLarge {
                    size: n,
                    max: n - 1
                })
            );
        }
    }

    #[test]
    fn never_panics_on_truncations_and_bit_flips() {
        // A cheap in-tree stand-in for the fuzzer: every prefix and every
        // single-bit flip of every sample, in every mode.
        for proto in ALL {
            for p in samples() {
                let mut wire = BytesMut::new();
                if encode(&p, proto, &mut wire).is_err() {
                    continue;
                }
                for given in [
                    None,
                    Some(Protocol::V3_1),
                    Some(Protocol::V3_1_1),
                    Some(Protocol::V5),
                ] {
                    for cut in 0..wire.len() {
                        let _ = decode(&mut BytesMut::from(&wire[..cut]), given, MAX);
                    }
                    for i in 0..wire.len() {
                        for bit in 0..8 {
                            let mut w = wire.clone();
                            w[i] ^= 1 << bit;
                            let _ = decode(&mut w, given, MAX);
                        }
                    }
                }
            }
        }
    }

    /// The "Used in" column of the spec's property table (MQTT 5.0 section
    /// 2.2.2.2), written here independently of `crate::property`. "WILL" is
    /// the Will Properties of CONNECT.
    const SPEC_USED_IN: &[(u8, &[&str])] = &[
        (0x01, &["PUBLISH", "WILL"]),
        (0x02, &["PUBLISH", "WILL"]),
        (0x03, &["PUBLISH", "WILL"]),
        (0x08, &["PUBLISH", "WILL"]),
        (0x09, &["PUBLISH", "WILL"]),
        (0x0B, &["PUBLISH", "SUBSCRIBE"]),
        (0x11, &["CONNECT", "CONNACK", "DISCONNECT"]),
        (0x12, &["CONNACK"]),
        (0x13, &["CONNACK"]),
        (0x15, &["CONNECT", "CONNACK", "AUTH"]),
        (0x16, &["CONNECT", "CONNACK", "AUTH"]),
        (0x17, &["CONNECT"]),
        (0x18, &["WILL"]),
        (0x19, &["CONNECT"]),
        (0x1A, &["CONNACK"]),
        (0x1C, &["CONNACK", "DISCONNECT"]),
        (
            0x1F,
            &[
                "CONNACK",
                "PUBACK",
                "PUBREC",
                "PUBREL",
                "PUBCOMP",
                "SUBACK",
                "UNSUBACK",
                "DISCONNECT",
                "AUTH",
            ],
        ),
        (0x21, &["CONNECT", "CONNACK"]),
        (0x22, &["CONNECT", "CONNACK"]),
        (0x23, &["PUBLISH"]),
        (0x24, &["CONNACK"]),
        (0x25, &["CONNACK"]),
        (
            0x26,
            &[
                "CONNECT",
                "WILL",
                "CONNACK",
                "PUBLISH",
                "PUBACK",
                "PUBREC",
                "PUBREL",
                "PUBCOMP",
                "SUBSCRIBE",
                "SUBACK",
                "UNSUBSCRIBE",
                "UNSUBACK",
                "DISCONNECT",
                "AUTH",
            ],
        ),
        (0x27, &["CONNECT", "CONNACK"]),
        (0x28, &["CONNACK"]),
        (0x29, &["CONNACK"]),
        (0x2A, &["CONNACK"]),
    ];

    /// A valid value of property `id` on the wire (chosen independently of
    /// the codec), and what a truncated one is reported as.
    fn spec_value(id: u8) -> (Vec<u8>, &'static str) {
        match id {
            // Byte
            0x01 | 0x17 | 0x19 | 0x24 | 0x25 | 0x28 | 0x29 | 0x2A => (vec![1], "property value"),
            // Two Byte Integer
            0x13 | 0x21 | 0x22 | 0x23 => (vec![0, 7], "property value"),
            // Four Byte Integer
            0x02 | 0x11 | 0x18 | 0x27 => (vec![0, 0, 1, 0], "property value"),
            // Variable Byte Integer
            0x0B => (vec![0x81, 0x01], "subscription identifier"),
            // UTF-8 String
            0x03 | 0x08 | 0x12 | 0x15 | 0x1A | 0x1C | 0x1F => (f(b"xy"), "property value"),
            // Binary Data
            0x09 | 0x16 => (f(b"\x00\xFF"), "property value"),
            // UTF-8 String Pair
            0x26 => (cat(&[&f(b"k"), &f(b"v")]), "user property value"),
            _ => unreachable!("not a property: {id:#04x}"),
        }
    }

    /// Every packet that carries properties, with `props` as its property
    /// block: (name in the spec table, name in errors, negotiated protocol, wire).
    fn with_props(props: &[u8]) -> Vec<(&'static str, &'static str, Option<Protocol>, Vec<u8>)> {
        let len = [u8::try_from(props.len()).unwrap()];
        assert!(len[0] < 128);
        let block = cat(&[&len, props]);
        let b = &block[..];
        vec![
            (
                "CONNECT",
                "CONNECT",
                NONE,
                connect(5, 0x02, &cat(&[b, &f(b"c")])),
            ),
            (
                "WILL",
                "CONNECT",
                NONE,
                connect(5, 0x06, &cat(&[&[0], &f(b"c"), b, &f(b"w"), &f(b"x")])),
            ),
            ("CONNACK", "CONNACK", V5, pkt(0x20, &cat(&[&[0, 0], b]))),
            (
                "PUBLISH",
                "PUBLISH",
                V5,
                pkt(0x30, &cat(&[&f(b"t"), b, b"payload"])),
            ),
            ("PUBACK", "PUBACK", V5, pkt(0x40, &cat(&[&[0, 1, 0], b]))),
            ("PUBREC", "PUBREC", V5, pkt(0x50, &cat(&[&[0, 1, 0], b]))),
            ("PUBREL", "PUBREL", V5, pkt(0x62, &cat(&[&[0, 1, 0], b]))),
            ("PUBCOMP", "PUBCOMP", V5, pkt(0x70, &cat(&[&[0, 1, 0], b]))),
            (
                "SUBSCRIBE",
                "SUBSCRIBE",
                V5,
                pkt(0x82, &cat(&[&[0, 1], b, &f(b"a"), &[0]])),
            ),
            ("SUBACK", "SUBACK", V5, pkt(0x90, &cat(&[&[0, 1], b, &[0]]))),
            (
                "UNSUBSCRIBE",
                "UNSUBSCRIBE",
                V5,
                pkt(0xA2, &cat(&[&[0, 1], b, &f(b"a")])),
            ),
            (
                "UNSUBACK",
                "UNSUBACK",
                V5,
                pkt(0xB0, &cat(&[&[0, 1], b, &[0]])),
            ),
            ("DISCONNECT", "DISCONNECT", V5, pkt(0xE0, &cat(&[&[0], b]))),
            ("AUTH", "AUTH", V5, pkt(0xF0, &cat(&[&[0x18], b]))),
        ]
    }

    /// Every property identifier in every packet, against the spec table:
    /// allowed once; a second copy is a Protocol Error unless it may repeat
    /// (User Property; Subscription Identifier in PUBLISH only; each packet's
    /// property section: "It is a Protocol Error to include ... more than
    /// once"); an identifier the packet does not define is a Malformed Packet
    /// (section 2.2.2.2); a truncated value is malformed.
    #[test]
    fn property_table_against_the_spec_every_id_every_packet() {
        let mut checked = 0;
        for id in 0u8..=0x30 {
            let used_in = SPEC_USED_IN
                .iter()
                .find(|(i, _)| *i == id)
                .map_or(&[][..], |(_, used)| *used);
            let (value, truncated_what) = if used_in.is_empty() {
                (vec![0, 0], "")
            } else {
                spec_value(id)
            };
            let once = cat(&[&[id], &value]);
            let twice = cat(&[&once, &once]);
            let cut = &once[..once.len() - 1];
            let packets = with_props(&once)
                .into_iter()
                .zip(with_props(&twice))
                .zip(with_props(cut));
            for (((spec_name, packet, proto, once), (_, _, _, twice)), (_, _, _, cut)) in packets {
                let ctx = format!("{id:#04x} in {spec_name}");
                if !used_in.contains(&spec_name) {
                    let want = E::InvalidProperty { packet, id };
                    assert_eq!(dec(&once, proto), Err(want.clone()), "{ctx}");
                    assert_eq!(want.reason_code(), MALFORMED);
                    continue;
                }
                assert!(dec(&once, proto).unwrap().is_some(), "{ctx}");
                let repeats = id == 0x26 || (id == 0x0B && spec_name == "PUBLISH");
                if repeats {
                    assert!(dec(&twice, proto).unwrap().is_some(), "{ctx} twice");
                } else {
                    let want = E::DuplicateProperty { packet, id };
                    assert_eq!(dec(&twice, proto), Err(want.clone()), "{ctx} twice");
                    assert_eq!(want.reason_code(), PROTOCOL);
                }
                assert_eq!(
                    dec(&cut, proto),
                    Err(E::Malformed(packet, truncated_what)),
                    "{ctx} truncated"
                );
                checked += 1;
            }
        }
        // One per (property, packet) pair of the spec table.
        assert_eq!(
            checked,
            SPEC_USED_IN.iter().map(|(_, u)| u.len()).sum::<usize>()
        );
    }
}
