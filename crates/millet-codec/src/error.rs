//! Codec errors. Each maps to exactly one MQTT reason code in
//! [`DecodeError::reason_code`], the code the server answers with (in CONNACK
//! before the connection is accepted, in DISCONNECT after, or a plain close
//! for 3.x clients).

use crate::ReasonCode;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum DecodeError {
    /// The remaining length field is longer than four bytes or otherwise invalid.
    #[error("malformed remaining length")]
    MalformedRemainingLength,
    /// Fixed header flags that the spec reserves have the wrong value [MQTT-2.2.2-2].
    #[error("reserved flags of {packet} are invalid: {flags:#06b}")]
    InvalidFlags { packet: &'static str, flags: u8 },
    /// Packet type 0 or 15 in 3.x, or 0 in 5.
    #[error("reserved packet type {0}")]
    ReservedPacketType(u8),
    /// The packet ends before a field it announces, or has bytes left over.
    #[error("malformed {0}: {1}")]
    Malformed(&'static str, &'static str),
    /// A UTF-8 string field is not well-formed UTF-8 or contains U+0000 [MQTT-1.5.4-1], [MQTT-1.5.4-2].
    #[error("invalid UTF-8 string in {0}")]
    InvalidUtf8(&'static str),
    /// QoS 3 in a PUBLISH or will [MQTT-3.3.1-4].
    #[error("invalid QoS {0}")]
    InvalidQoS(u8),
    /// Packet identifier 0 where one is required [MQTT-2.2.1-3].
    #[error("packet identifier 0 in {0}")]
    ZeroPacketId(&'static str),
    /// A property identifier not defined for this packet.
    #[error("property {id:#04x} not allowed in {packet}")]
    InvalidProperty { packet: &'static str, id: u8 },
    /// A property that may appear once appears twice.
    #[error("duplicate property {id:#04x} in {packet}")]
    DuplicateProperty { packet: &'static str, id: u8 },
    /// A property value out of range (e.g. receive maximum 0, maximum packet size 0).
    #[error("invalid value for property {id:#04x} in {packet}")]
    InvalidPropertyValue { packet: &'static str, id: u8 },
    /// Wildcards in a topic name, or an empty topic without a topic alias [MQTT-3.3.2-2].
    #[error("invalid topic name")]
    InvalidTopicName,
    /// An invalid subscription / unsubscription filter is not a decode error (it gets a
    /// per-filter reason code); this is a SUBSCRIBE / UNSUBSCRIBE with no filters [MQTT-3.8.3-3].
    #[error("{0} without topic filters")]
    NoTopicFilters(&'static str),
    /// Subscription options with reserved bits set or retain handling 3 [MQTT-3.8.3-5].
    #[error("invalid subscription options {0:#04x}")]
    InvalidSubscriptionOptions(u8),
    /// A CONNECT with protocol name `MQTT` / `MQIsdp` and a level this server
    /// does not speak: answered with CONNACK 0x01 / 0x84 [MQTT-3.1.2-2].
    #[error("unsupported protocol level")]
    UnsupportedProtocol,
    /// A CONNECT whose protocol name is neither `MQTT` nor `MQIsdp`: the
    /// connection is closed without a CONNACK [MQTT-3.1.2-1].
    #[error("invalid protocol name")]
    InvalidProtocolName,
    /// CONNECT flags: reserved bit set [MQTT-3.1.2-3], will flags inconsistent [MQTT-3.1.2-11..15],
    /// password without user name in 3.x [MQTT-3.1.2-22].
    #[error("invalid CONNECT flags {0:#04x}")]
    InvalidConnectFlags(u8),
    /// The packet exceeds the maximum packet size the decoder was given.
    #[error("packet of {size} bytes exceeds the maximum of {max}")]
    PacketTooLarge { size: usize, max: usize },
    /// A packet that is not valid for the negotiated version (AUTH in 3.x).
    #[error("{0} is not valid in this protocol version")]
    NotInThisVersion(&'static str),
}

impl DecodeError {
    /// The reason code the server answers a peer's malformed packet with.
    pub fn reason_code(&self) -> ReasonCode {
        match self {
            DecodeError::PacketTooLarge { .. } => ReasonCode::PACKET_TOO_LARGE,
            DecodeError::UnsupportedProtocol => ReasonCode::UNSUPPORTED_PROTOCOL_VERSION,
            DecodeError::InvalidTopicName => ReasonCode::TOPIC_NAME_INVALID,
            // QoS 3 in PUBLISH is a Malformed Packet [MQTT-3.3.1-4], handled below.
            DecodeError::DuplicateProperty { .. }
            | DecodeError::InvalidPropertyValue { .. }
            | DecodeError::ZeroPacketId(_)
            | DecodeError::NoTopicFilters(_)
            | DecodeError::NotInThisVersion(_) => ReasonCode::PROTOCOL_ERROR,
            _ => ReasonCode::MALFORMED_PACKET,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum EncodeError {
    /// The encoded packet would exceed 268,435,455 bytes (the largest remaining length).
    #[error("packet too large to encode")]
    TooLarge,
    /// A string or binary field longer than 65,535 bytes.
    #[error("field {0} longer than 65535 bytes")]
    FieldTooLong(&'static str),
    /// The packet cannot be expressed in the target protocol version (AUTH in 3.x).
    #[error("{0} cannot be encoded for this protocol version")]
    NotInThisVersion(&'static str),
}
