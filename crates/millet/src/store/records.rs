//! Stored records and their binary encoding.
//!
//! Every value is `[FORMAT_VERSION][postcard(record)]`. postcard's wire format
//! is stable within its 1.x major version (it is specified), so a record
//! written today decodes tomorrow; a change to a record's layout must bump
//! [`FORMAT_VERSION`] and keep a decoder for the old one. A value that does not
//! decode (unknown version, truncated, invalid field such as QoS 3) is treated
//! as corrupt: recovery skips and counts it.
//!
//! Records use plain `String` / `Vec<u8>` so the store does not depend on the
//! broker's in-memory types; conversion helpers to and from the codec types are
//! at the bottom of this file.

use bytes::Bytes;
use bytestring::ByteString;
use millet_codec::{LastWill, PublishProperties, QoS, SubscriptionOptions, WillProperties};
use serde::{de::DeserializeOwned, Deserialize, Serialize};

/// Version byte in front of every stored value.
pub const FORMAT_VERSION: u8 = 1;

/// Why a stored value could not be decoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error("empty value")]
    Empty,
    #[error("unknown format version {0}")]
    Version(u8),
    #[error("malformed record: {0}")]
    Malformed(String),
    #[error("invalid field: {0}")]
    Invalid(&'static str),
}

/// Encoding shared by all records.
pub trait Record: Serialize + DeserializeOwned {
    /// Field-level checks beyond what the format enforces.
    fn validate(&self) -> Result<(), DecodeError> {
        Ok(())
    }

    fn encode(&self) -> Vec<u8> {
        let out = vec![FORMAT_VERSION];
        // postcard only fails for types it cannot represent (none here: no
        // maps with non-string keys, no untagged enums) or a full fixed-size
        // buffer (we grow a Vec), so the error branch is unreachable in
        // practice; it yields a value that fails to decode rather than panic.
        postcard::to_extend(self, out).unwrap_or_default()
    }

    fn decode(bytes: &[u8]) -> Result<Self, DecodeError> {
        let (&version, rest) = bytes.split_first().ok_or(DecodeError::Empty)?;
        if version != FORMAT_VERSION {
            return Err(DecodeError::Version(version));
        }
        let (rec, tail): (Self, &[u8]) =
            postcard::take_from_bytes(rest).map_err(|e| DecodeError::Malformed(e.to_string()))?;
        if !tail.is_empty() {
            return Err(DecodeError::Malformed(format!(
                "{} trailing bytes",
                tail.len()
            )));
        }
        rec.validate()?;
        Ok(rec)
    }
}

fn check_qos(q: u8) -> Result<(), DecodeError> {
    if q <= 2 {
        Ok(())
    } else {
        Err(DecodeError::Invalid("qos"))
    }
}

/// One subscription of a session.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SubscriptionRecord {
    /// The filter as subscribed, including a `$share/{group}/` prefix.
    pub filter: String,
    pub qos: u8,
    pub no_local: bool,
    pub retain_as_published: bool,
    /// 0, 1 or 2 (MQTT 5 Retain Handling).
    pub retain_handling: u8,
    /// MQTT 5 Subscription Identifier.
    pub identifier: Option<u32>,
}

/// Properties of a message (PUBLISH or will), with the expiry made absolute.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MessageProperties {
    pub payload_format_indicator: Option<u8>,
    /// Absolute expiry, unix milliseconds (from the Message Expiry Interval at
    /// the time the message was received).
    pub expires_at_ms: Option<u64>,
    pub response_topic: Option<String>,
    pub correlation_data: Option<Vec<u8>>,
    pub user_properties: Vec<(String, String)>,
    pub content_type: Option<String>,
}

/// The will of a session.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WillRecord {
    pub topic: String,
    pub payload: Vec<u8>,
    pub qos: u8,
    pub retain: bool,
    /// Will Delay Interval, seconds (MQTT 5; `None` = publish at once).
    pub delay_interval: Option<u32>,
    /// Message Expiry Interval of the will, seconds, relative: the clock
    /// starts when the will is published, not when it is stored.
    pub message_expiry_interval: Option<u32>,
    pub payload_format_indicator: Option<u8>,
    pub response_topic: Option<String>,
    pub correlation_data: Option<Vec<u8>>,
    pub user_properties: Vec<(String, String)>,
    pub content_type: Option<String>,
}

/// A persistent session (v5 expiry > 0, or v3 clean session = 0).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SessionRecord {
    pub client_id: String,
    /// Session Expiry Interval, seconds (`u32::MAX` = never).
    pub expiry_interval: u32,
    /// Wall-clock deadline, unix milliseconds. `None` while a connection is
    /// attached (the clock starts at disconnect): after a restart the broker
    /// should treat such a session as disconnected at restart time.
    pub expires_at_ms: Option<u64>,
    pub subscriptions: Vec<SubscriptionRecord>,
    pub will: Option<WillRecord>,
    /// When a disconnected session's delayed will is due (unix ms), if the
    /// broker recorded that the will is pending.
    pub will_at_ms: Option<u64>,
}

/// A message, stored once and referenced by queue / in-flight / retained
/// entries.
///
/// Topic, payload and publisher share the broker's buffers (a record is
/// built per stored message, and most are absorbed before they are
/// written: copying them was the largest single source of allocation in a
/// fleet's profile, about a quarter of the event loop's malloc time). They encode exactly as `String` / `Vec<u8>` did (postcard:
/// length, then the bytes). A record the writer keeps past its round is
/// detached from those buffers ([`MessageRecord::detach`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MessageRecord {
    pub topic: ByteString,
    pub payload: Bytes,
    pub qos: u8,
    pub retain: bool,
    pub properties: MessageProperties,
    /// Client id of the publisher (No Local, shared-subscription hashing).
    pub publisher: Option<ByteString>,
}

impl MessageRecord {
    /// Copy topic, payload and publisher into buffers of their own, so that
    /// a record kept for long (the writer's segment awaiting its
    /// checkpoint) does not pin the read buffer a message arrived in.
    pub fn detach(&mut self) {
        self.topic = ByteString::from(&*self.topic);
        self.payload = Bytes::copy_from_slice(&self.payload);
        if let Some(p) = &mut self.publisher {
            *p = ByteString::from(&**p);
        }
    }

    pub fn is_expired(&self, now_unix_ms: u64) -> bool {
        self.properties
            .expires_at_ms
            .is_some_and(|t| t <= now_unix_ms)
    }
}

/// A message waiting in a session's queue.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct QueueEntry {
    pub message_id: u64,
    /// QoS after downgrade to the subscription's maximum.
    pub qos: u8,
    /// Retain flag as it will be sent.
    pub retain: bool,
    pub subscription_ids: Vec<u32>,
    /// The `$share/g/f` filter the message came through, if shared.
    pub share: Option<String>,
}

/// State of an outgoing QoS 1/2 message.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum InflightState {
    /// PUBLISH sent, awaiting PUBACK (QoS 1) or PUBREC (QoS 2).
    AwaitAck,
    /// PUBREL sent, awaiting PUBCOMP.
    AwaitComp,
}

/// An outgoing QoS 1/2 message not yet fully acknowledged.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InflightEntry {
    pub message_id: u64,
    pub qos: u8,
    pub retain: bool,
    pub subscription_ids: Vec<u32>,
    pub state: InflightState,
    /// Send order (e.g. a per-session counter): recovery returns the in-flight
    /// window sorted by it, so resends keep the original order.
    pub order: u64,
}

impl Record for SessionRecord {
    fn validate(&self) -> Result<(), DecodeError> {
        for s in &self.subscriptions {
            check_qos(s.qos)?;
            if s.retain_handling > 2 {
                return Err(DecodeError::Invalid("retain_handling"));
            }
        }
        if let Some(w) = &self.will {
            check_qos(w.qos)?;
        }
        Ok(())
    }
}

impl Record for MessageRecord {
    fn validate(&self) -> Result<(), DecodeError> {
        check_qos(self.qos)
    }
}

impl Record for QueueEntry {
    fn validate(&self) -> Result<(), DecodeError> {
        check_qos(self.qos)
    }
}

impl Record for InflightEntry {
    fn validate(&self) -> Result<(), DecodeError> {
        check_qos(self.qos)?;
        if self.qos == 0 {
            return Err(DecodeError::Invalid("in-flight qos 0"));
        }
        Ok(())
    }
}

/// Internal: the store's own metadata record.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct MetaRecord {
    pub format: u8,
}

impl Record for MetaRecord {}

// ---------------------------------------------------------------------------
// Conversions to and from the codec / broker types.

fn bs(s: &ByteString) -> String {
    s.to_string()
}

fn user_props_to(v: &[(ByteString, ByteString)]) -> Vec<(String, String)> {
    v.iter().map(|(k, v)| (bs(k), bs(v))).collect()
}

fn user_props_from(v: &[(String, String)]) -> Vec<(ByteString, ByteString)> {
    v.iter()
        .map(|(k, v)| (ByteString::from(k.as_str()), ByteString::from(v.as_str())))
        .collect()
}

/// QoS from a stored byte (validated on decode, so out-of-range means a
/// record built in memory with a bad value: treated as QoS 0).
pub fn qos_from_u8(q: u8) -> QoS {
    QoS::from_u8(q).unwrap_or(QoS::AtMostOnce)
}

impl SubscriptionRecord {
    pub fn new(filter: &str, options: &SubscriptionOptions, identifier: Option<u32>) -> Self {
        SubscriptionRecord {
            filter: filter.to_owned(),
            qos: options.qos as u8,
            no_local: options.no_local,
            retain_as_published: options.retain_as_published,
            retain_handling: options.retain_handling,
            identifier,
        }
    }

    pub fn options(&self) -> SubscriptionOptions {
        SubscriptionOptions {
            qos: qos_from_u8(self.qos),
            no_local: self.no_local,
            retain_as_published: self.retain_as_published,
            retain_handling: self.retain_handling,
        }
    }
}

impl From<&LastWill> for WillRecord {
    fn from(w: &LastWill) -> Self {
        let p = &w.properties;
        WillRecord {
            topic: bs(&w.topic),
            payload: w.payload.to_vec(),
            qos: w.qos as u8,
            retain: w.retain,
            delay_interval: p.will_delay_interval,
            message_expiry_interval: p.message_expiry_interval,
            payload_format_indicator: p.payload_format_indicator,
            response_topic: p.response_topic.as_ref().map(bs),
            correlation_data: p.correlation_data.as_ref().map(|b| b.to_vec()),
            user_properties: user_props_to(&p.user_properties),
            content_type: p.content_type.as_ref().map(bs),
        }
    }
}

impl WillRecord {
    pub fn to_last_will(&self) -> LastWill {
        LastWill {
            topic: ByteString::from(self.topic.as_str()),
            payload: Bytes::from(self.payload.clone()),
            qos: qos_from_u8(self.qos),
            retain: self.retain,
            properties: WillProperties {
                will_delay_interval: self.delay_interval,
                payload_format_indicator: self.payload_format_indicator,
                message_expiry_interval: self.message_expiry_interval,
                content_type: self.content_type.as_deref().map(ByteString::from),
                response_topic: self.response_topic.as_deref().map(ByteString::from),
                correlation_data: self.correlation_data.clone().map(Bytes::from),
                user_properties: user_props_from(&self.user_properties),
            },
        }
    }
}

impl MessageProperties {
    /// From PUBLISH properties, with the message's absolute expiry (computed
    /// by the caller from its wall clock). Topic alias and subscription
    /// identifiers are not stored (per-connection / per-delivery).
    pub fn from_publish(p: &PublishProperties, expires_at_ms: Option<u64>) -> Self {
        MessageProperties {
            payload_format_indicator: p.payload_format_indicator,
            expires_at_ms,
            response_topic: p.response_topic.as_ref().map(bs),
            correlation_data: p.correlation_data.as_ref().map(|b| b.to_vec()),
            user_properties: user_props_to(&p.user_properties),
            content_type: p.content_type.as_ref().map(bs),
        }
    }

    /// Back to PUBLISH properties; the Message Expiry Interval becomes the
    /// remaining time at `now_unix_ms` (rounded up, at least 1 s while not
    /// expired; 0 if already expired — callers should drop expired messages).
    pub fn to_publish(&self, now_unix_ms: u64) -> PublishProperties {
        let message_expiry_interval = self.expires_at_ms.map(|t| {
            let left = t.saturating_sub(now_unix_ms);
            u32::try_from(left.div_ceil(1000)).unwrap_or(u32::MAX)
        });
        PublishProperties {
            payload_format_indicator: self.payload_format_indicator,
            message_expiry_interval,
            topic_alias: None,
            response_topic: self.response_topic.as_deref().map(ByteString::from),
            correlation_data: self.correlation_data.clone().map(Bytes::from),
            user_properties: user_props_from(&self.user_properties),
            subscription_identifiers: Vec::new(),
            content_type: self.content_type.as_deref().map(ByteString::from),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn props() -> MessageProperties {
        MessageProperties {
            payload_format_indicator: Some(1),
            expires_at_ms: Some(1_700_000_000_123),
            response_topic: Some("resp/x".into()),
            correlation_data: Some(vec![1, 2, 3]),
            user_properties: vec![("k".into(), "v".into()), ("k".into(), "w".into())],
            content_type: Some("text/plain".into()),
        }
    }

    fn rt<R: Record + PartialEq + std::fmt::Debug>(r: &R) {
        let bytes = r.encode();
        assert_eq!(bytes[0], FORMAT_VERSION);
        assert_eq!(&R::decode(&bytes).unwrap(), r);
        // every strict prefix is rejected, never panics
        for n in 0..bytes.len() {
            assert!(R::decode(&bytes[..n]).is_err(), "prefix {n} decoded");
        }
        let mut v = bytes.clone();
        v.push(0);
        assert!(R::decode(&v).is_err(), "trailing byte accepted");
        v = bytes;
        v[0] = 99;
        assert_eq!(R::decode(&v), Err(DecodeError::Version(99)));
    }

    #[test]
    fn round_trips() {
        rt(&MessageRecord {
            topic: "a/b".into(),
            payload: vec![0u8; 64].into(),
            qos: 1,
            retain: true,
            properties: props(),
            publisher: Some("pub-1".into()),
        });
        rt(&QueueEntry {
            message_id: u64::MAX,
            qos: 2,
            retain: false,
            subscription_ids: vec![1, 268_435_455],
            share: Some("$share/g/a/#".into()),
        });
        rt(&InflightEntry {
            message_id: 7,
            qos: 2,
            retain: true,
            subscription_ids: vec![],
            state: InflightState::AwaitComp,
            order: 9,
        });
        rt(&SessionRecord {
            client_id: "c1".into(),
            expiry_interval: 3600,
            expires_at_ms: Some(5),
            subscriptions: vec![SubscriptionRecord {
                filter: "$share/g/x/+".into(),
                qos: 2,
                no_local: true,
                retain_as_published: true,
                retain_handling: 2,
                identifier: Some(42),
            }],
            will: Some(WillRecord {
                topic: "will/t".into(),
                payload: b"bye".to_vec(),
                qos: 1,
                retain: true,
                delay_interval: Some(30),
                message_expiry_interval: Some(60),
                payload_format_indicator: Some(1),
                response_topic: None,
                correlation_data: Some(vec![9]),
                user_properties: vec![("a".into(), "b".into())],
                content_type: None,
            }),
            will_at_ms: Some(77),
        });
    }

    #[test]
    fn message_records_encode_as_before_sharing_buffers() {
        // The record's shape up to session 15: owned strings and bytes.
        // Stores written then must still open, and vice versa.
        #[derive(Serialize, Deserialize, PartialEq, Debug)]
        struct Owned {
            topic: String,
            payload: Vec<u8>,
            qos: u8,
            retain: bool,
            properties: MessageProperties,
            publisher: Option<String>,
        }
        impl Record for Owned {}
        let old = Owned {
            topic: "fleet/7/tele/é".into(),
            payload: (0..=255u8).collect(),
            qos: 1,
            retain: false,
            properties: props(),
            publisher: Some("device-7".into()),
        };
        let read_buffer = Bytes::from(b"..fleet/7/tele/\xc3\xa9..".to_vec());
        let mut shared = MessageRecord {
            topic: ByteString::try_from(read_buffer.slice(2..17)).unwrap(),
            payload: Bytes::from((0..=255u8).collect::<Vec<_>>()),
            qos: 1,
            retain: false,
            properties: props(),
            publisher: Some("device-7".into()),
        };
        assert_eq!(shared.encode(), old.encode());
        assert_eq!(MessageRecord::decode(&old.encode()).unwrap(), shared);
        assert_eq!(Owned::decode(&shared.encode()).unwrap(), old);
        // Detached: equal, and no longer a view of the read buffer.
        let before = shared.clone();
        shared.detach();
        assert_eq!(shared, before);
        let buf = read_buffer.as_ptr_range();
        assert!(!buf.contains(&shared.topic.as_bytes().as_ptr()));
    }

    #[test]
    fn invalid_fields_rejected() {
        let mut m = MessageRecord {
            topic: "t".into(),
            payload: Bytes::new(),
            qos: 3,
            retain: false,
            properties: MessageProperties::default(),
            publisher: None,
        };
        assert_eq!(
            MessageRecord::decode(&m.encode()),
            Err(DecodeError::Invalid("qos"))
        );
        m.qos = 0;
        assert!(MessageRecord::decode(&m.encode()).is_ok());
        assert_eq!(MessageRecord::decode(&[]), Err(DecodeError::Empty));
    }

    #[test]
    fn codec_conversions() {
        let will = LastWill {
            topic: "w".into(),
            payload: Bytes::from_static(b"p"),
            qos: QoS::ExactlyOnce,
            retain: true,
            properties: WillProperties {
                will_delay_interval: Some(5),
                payload_format_indicator: Some(1),
                message_expiry_interval: Some(10),
                content_type: Some("ct".into()),
                response_topic: Some("rt".into()),
                correlation_data: Some(Bytes::from_static(b"cd")),
                user_properties: vec![("a".into(), "b".into())],
            },
        };
        assert_eq!(WillRecord::from(&will).to_last_will(), will);

        let opts = SubscriptionOptions {
            qos: QoS::AtLeastOnce,
            no_local: true,
            retain_as_published: false,
            retain_handling: 1,
        };
        assert_eq!(SubscriptionRecord::new("f", &opts, Some(3)).options(), opts);

        let p = PublishProperties {
            payload_format_indicator: Some(0),
            message_expiry_interval: Some(10),
            topic_alias: Some(4),
            response_topic: Some("r".into()),
            correlation_data: Some(Bytes::from_static(b"c")),
            user_properties: vec![("x".into(), "y".into())],
            subscription_identifiers: vec![1],
            content_type: Some("c".into()),
        };
        let m = MessageProperties::from_publish(&p, Some(20_000));
        let back = m.to_publish(10_500);
        assert_eq!(back.message_expiry_interval, Some(10));
        assert_eq!(back.topic_alias, None);
        assert!(back.subscription_identifiers.is_empty());
        assert_eq!(back.user_properties, p.user_properties);
        assert_eq!(m.to_publish(30_000).message_expiry_interval, Some(0));
    }
}
