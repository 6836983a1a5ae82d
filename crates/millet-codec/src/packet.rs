//! MQTT control packets as plain data: one struct per packet, shared by the
//! three protocol versions. Fields that only exist in MQTT 5 are ignored when
//! encoding for 3.1 / 3.1.1 and left at their defaults when decoding them.
//! The MQTT 5 property structs are defined in `property`, from the property
//! table.

use bytes::Bytes;
use bytestring::ByteString;

use crate::{
    AckProperties, AuthProperties, ConnAckProperties, ConnectProperties, DisconnectProperties,
    PublishProperties, ReasonCode, WillProperties,
};

/// Protocol version negotiated in CONNECT.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Protocol {
    /// MQTT 3.1, protocol name `MQIsdp`, level 3.
    V3_1,
    /// MQTT 3.1.1, protocol name `MQTT`, level 4.
    V3_1_1,
    /// MQTT 5.0, protocol name `MQTT`, level 5.
    V5,
}

impl Protocol {
    pub fn level(self) -> u8 {
        match self {
            Protocol::V3_1 => 3,
            Protocol::V3_1_1 => 4,
            Protocol::V5 => 5,
        }
    }
    pub fn is_v5(self) -> bool {
        self == Protocol::V5
    }
}

/// Quality of service level.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub enum QoS {
    #[default]
    AtMostOnce = 0,
    AtLeastOnce = 1,
    ExactlyOnce = 2,
}

impl QoS {
    pub fn from_u8(v: u8) -> Option<QoS> {
        match v {
            0 => Some(QoS::AtMostOnce),
            1 => Some(QoS::AtLeastOnce),
            2 => Some(QoS::ExactlyOnce),
            _ => None,
        }
    }
}

/// A user property (MQTT 5): an ordered name / value pair; names may repeat.
pub type UserProperty = (ByteString, ByteString);

/// Every packet a client or server can send.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Packet {
    Connect(Box<Connect>),
    ConnAck(ConnAck),
    Publish(Publish),
    PubAck(PubResp),
    PubRec(PubResp),
    PubRel(PubResp),
    PubComp(PubResp),
    Subscribe(Subscribe),
    SubAck(SubAck),
    Unsubscribe(Unsubscribe),
    UnsubAck(UnsubAck),
    PingReq,
    PingResp,
    Disconnect(Disconnect),
    Auth(Auth),
}

impl Packet {
    /// Name of the packet type, for logs and error messages.
    pub fn name(&self) -> &'static str {
        match self {
            Packet::Connect(_) => "CONNECT",
            Packet::ConnAck(_) => "CONNACK",
            Packet::Publish(_) => "PUBLISH",
            Packet::PubAck(_) => "PUBACK",
            Packet::PubRec(_) => "PUBREC",
            Packet::PubRel(_) => "PUBREL",
            Packet::PubComp(_) => "PUBCOMP",
            Packet::Subscribe(_) => "SUBSCRIBE",
            Packet::SubAck(_) => "SUBACK",
            Packet::Unsubscribe(_) => "UNSUBSCRIBE",
            Packet::UnsubAck(_) => "UNSUBACK",
            Packet::PingReq => "PINGREQ",
            Packet::PingResp => "PINGRESP",
            Packet::Disconnect(_) => "DISCONNECT",
            Packet::Auth(_) => "AUTH",
        }
    }

    /// Removes the Reason String and User Properties of a server-sent
    /// control packet, the properties MQTT 5 says a server must leave out
    /// when they would push a packet past the client's Maximum Packet Size
    /// ([MQTT-3.2.2-19], [MQTT-3.2.2-20], [MQTT-3.4.2-2], [MQTT-3.4.2-3],
    /// [MQTT-3.9.2-1], [MQTT-3.14.2-3], [MQTT-3.15.2-2] and their siblings).
    /// For a CONNACK it also drops the capability flags whose absence means
    /// the same as the value sent (`true`). Returns whether anything changed.
    /// A PUBLISH, CONNECT, SUBSCRIBE or UNSUBSCRIBE is left alone.
    pub fn strip_optional_properties(&mut self) -> bool {
        /// Clears both; true if either was set.
        fn clear(reason: &mut Option<ByteString>, user: &mut Vec<UserProperty>) -> bool {
            let changed = reason.is_some() || !user.is_empty();
            *reason = None;
            *user = Vec::new();
            changed
        }
        fn ack(p: &mut AckProperties) -> bool {
            clear(&mut p.reason_string, &mut p.user_properties)
        }
        match self {
            Packet::ConnAck(c) => {
                let p = &mut c.properties;
                let mut changed = clear(&mut p.reason_string, &mut p.user_properties);
                for flag in [
                    &mut p.retain_available,
                    &mut p.wildcard_subscription_available,
                    &mut p.subscription_identifiers_available,
                    &mut p.shared_subscription_available,
                ] {
                    if *flag == Some(true) {
                        *flag = None;
                        changed = true;
                    }
                }
                changed
            }
            Packet::PubAck(r) | Packet::PubRec(r) | Packet::PubRel(r) | Packet::PubComp(r) => {
                ack(&mut r.properties)
            }
            Packet::SubAck(s) => ack(&mut s.properties),
            Packet::UnsubAck(u) => ack(&mut u.properties),
            Packet::Disconnect(d) => {
                let p = &mut d.properties;
                clear(&mut p.reason_string, &mut p.user_properties)
            }
            Packet::Auth(a) => {
                let p = &mut a.properties;
                clear(&mut p.reason_string, &mut p.user_properties)
            }
            Packet::Connect(_)
            | Packet::Publish(_)
            | Packet::Subscribe(_)
            | Packet::Unsubscribe(_)
            | Packet::PingReq
            | Packet::PingResp => false,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Connect {
    pub protocol: Protocol,
    /// Clean Session (3.x) / Clean Start (5).
    pub clean_start: bool,
    pub keep_alive: u16,
    pub properties: ConnectProperties,
    pub client_id: ByteString,
    pub will: Option<LastWill>,
    pub username: Option<ByteString>,
    pub password: Option<Bytes>,
    /// The protocol level had the bridge bit (0x80) set: a Mosquitto-style
    /// bridge (`try_private true`, levels 0x83 / 0x84), which expects its own
    /// messages not to come back to it and retain flags kept as published.
    pub bridge: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LastWill {
    pub topic: ByteString,
    pub payload: Bytes,
    pub qos: QoS,
    pub retain: bool,
    pub properties: WillProperties,
}

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ConnAck {
    pub session_present: bool,
    /// For 3.x the encoder maps this to the 3.1.1 return code
    /// (see [`ReasonCode::to_v3_connack`]).
    pub reason_code: ReasonCode,
    pub properties: ConnAckProperties,
}

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Publish {
    pub dup: bool,
    pub qos: QoS,
    pub retain: bool,
    /// May be empty in MQTT 5 when a topic alias is present.
    pub topic: ByteString,
    /// Present (non-zero) exactly when `qos > 0`.
    pub packet_id: Option<u16>,
    pub properties: PublishProperties,
    pub payload: Bytes,
}

/// PUBACK, PUBREC, PUBREL and PUBCOMP share one layout.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct PubResp {
    pub packet_id: u16,
    pub reason_code: ReasonCode,
    pub properties: AckProperties,
}

impl PubResp {
    pub fn new(packet_id: u16) -> Self {
        PubResp {
            packet_id,
            reason_code: ReasonCode::SUCCESS,
            properties: AckProperties::default(),
        }
    }
    pub fn with_reason(packet_id: u16, reason_code: ReasonCode) -> Self {
        PubResp {
            packet_id,
            reason_code,
            properties: AckProperties::default(),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct SubscriptionOptions {
    pub qos: QoS,
    pub no_local: bool,
    pub retain_as_published: bool,
    /// 0: send retained on subscribe; 1: only if the subscription is new; 2: never.
    pub retain_handling: u8,
}

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Subscribe {
    pub packet_id: u16,
    pub subscription_identifier: Option<u32>,
    pub user_properties: Vec<UserProperty>,
    pub filters: Vec<(ByteString, SubscriptionOptions)>,
}

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct SubAck {
    pub packet_id: u16,
    pub properties: AckProperties,
    /// One per filter. For 3.x: 0x00..=0x02 granted QoS, anything >= 0x80
    /// is encoded as 0x80 (failure).
    pub reason_codes: Vec<ReasonCode>,
}

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Unsubscribe {
    pub packet_id: u16,
    pub user_properties: Vec<UserProperty>,
    pub filters: Vec<ByteString>,
}

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct UnsubAck {
    pub packet_id: u16,
    pub properties: AckProperties,
    /// One per filter (MQTT 5 only; not encoded for 3.x).
    pub reason_codes: Vec<ReasonCode>,
}

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Disconnect {
    pub reason_code: ReasonCode,
    pub properties: DisconnectProperties,
}

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Auth {
    pub reason_code: ReasonCode,
    pub properties: AuthProperties,
}
