//! MQTT 5 properties (section 2.2.2.2): **the one place they are defined.**
//!
//! Two tables, both in this file, drive the property structs and both
//! directions of the wire format:
//!
//! 1. `property_table!`: every property once, with its identifier, its wire
//!    type and value range (a [`Wire`] kind) and its name.
//! 2. `property_sets!`: for each packet, which properties it may carry and
//!    the field each one lands in. This defines the property structs
//!    ([`ConnectProperties`], [`PublishProperties`], ...) and implements
//!    [`PropertySet`] for them (and for [`Subscribe`] / [`Unsubscribe`], whose
//!    properties are fields of the packet itself).
//!
//! From these, per packet: the allowed set is the properties listed for it
//! (anything else is [`DecodeError::InvalidProperty`]); a property may repeat
//! when its field is a `Vec` and not when it is an `Option`
//! ([`DecodeError::DuplicateProperty`]); decoding reads each value with its
//! kind's checks ([`DecodeError::InvalidPropertyValue`]); encoding writes the
//! fields that are set, in field order. The loops around them are
//! `decode::properties` and `encode::props`.
//!
//! A field whose Rust type does not match its property's kind does not
//! compile, nor does (through `-D warnings`) a property listed twice for one
//! packet.

use bytes::Bytes;
use bytestring::ByteString;

use crate::decode::Reader;
use crate::encode::Sink;
use crate::{DecodeError, QoS, Subscribe, Unsubscribe};

/// One MQTT 5 property: a row of `property_table!`.
pub(crate) trait Property {
    /// Property identifier (written as a one-byte Variable Byte Integer).
    const ID: u8;
    /// Name used in encode errors ([`crate::EncodeError::FieldTooLong`]).
    const NAME: &'static str;
    /// Wire type, value range and Rust value type.
    type Wire: Wire;
}

/// How a property value is carried on the wire, which values are valid and
/// the Rust type it decodes to.
pub(crate) trait Wire {
    type Value;
    /// Reads a value of property `id` (its identifier already read).
    fn read(r: &mut Reader<'_>, id: u8, name: &'static str) -> Result<Self::Value, DecodeError>;
    /// Writes a value (the identifier already written).
    fn write<S: Sink>(s: &mut S, v: &Self::Value, name: &'static str);
}

/// The Rust value type of property `P`.
pub(crate) type ValueOf<P> = <<P as Property>::Wire as Wire>::Value;

/// Reads the value of property `P`.
#[inline]
pub(crate) fn read<P: Property>(r: &mut Reader<'_>) -> Result<ValueOf<P>, DecodeError> {
    P::Wire::read(r, P::ID, P::NAME)
}

/// Writes property `P`: identifier, then value.
#[inline]
pub(crate) fn write<P: Property, S: Sink>(s: &mut S, v: &ValueOf<P>) {
    s.u8(P::ID);
    P::Wire::write(s, v, P::NAME);
}

// ---------------------------------------------------------------------------
// Wire kinds (section 1.5 data representations)
// ---------------------------------------------------------------------------

/// Byte, 0 or 1 (every Byte property of MQTT 5 allows only these two).
#[inline]
fn byte01(r: &mut Reader<'_>, id: u8) -> Result<u8, DecodeError> {
    let v = r.u8("property value")?;
    if v > 1 {
        return Err(DecodeError::InvalidPropertyValue {
            packet: r.packet,
            id,
        });
    }
    Ok(v)
}

/// Byte, 0 or 1, kept as a `u8` (Payload Format Indicator).
pub(crate) enum Byte {}
impl Wire for Byte {
    type Value = u8;
    #[inline]
    fn read(r: &mut Reader<'_>, id: u8, _: &'static str) -> Result<u8, DecodeError> {
        byte01(r, id)
    }
    #[inline]
    fn write<S: Sink>(s: &mut S, v: &u8, _: &'static str) {
        s.u8(*v);
    }
}

/// Byte, 0 or 1, as a `bool`.
pub(crate) enum Flag {}
impl Wire for Flag {
    type Value = bool;
    #[inline]
    fn read(r: &mut Reader<'_>, id: u8, _: &'static str) -> Result<bool, DecodeError> {
        Ok(byte01(r, id)? != 0)
    }
    #[inline]
    fn write<S: Sink>(s: &mut S, v: &bool, _: &'static str) {
        s.u8(u8::from(*v));
    }
}

/// Byte, 0 or 1, as a [`QoS`] (Maximum QoS: a server sends it only to say
/// it supports less than QoS 2).
pub(crate) enum MaxQos {}
impl Wire for MaxQos {
    type Value = QoS;
    #[inline]
    fn read(r: &mut Reader<'_>, id: u8, _: &'static str) -> Result<QoS, DecodeError> {
        Ok(if byte01(r, id)? == 0 {
            QoS::AtMostOnce
        } else {
            QoS::AtLeastOnce
        })
    }
    #[inline]
    fn write<S: Sink>(s: &mut S, v: &QoS, _: &'static str) {
        s.u8(*v as u8);
    }
}

/// Two Byte Integer, any value.
pub(crate) enum U16 {}
impl Wire for U16 {
    type Value = u16;
    #[inline]
    fn read(r: &mut Reader<'_>, _: u8, _: &'static str) -> Result<u16, DecodeError> {
        r.u16("property value")
    }
    #[inline]
    fn write<S: Sink>(s: &mut S, v: &u16, _: &'static str) {
        s.u16(*v);
    }
}

/// Two Byte Integer, 0 is a protocol error.
pub(crate) enum NonZeroU16 {}
impl Wire for NonZeroU16 {
    type Value = u16;
    #[inline]
    fn read(r: &mut Reader<'_>, id: u8, _: &'static str) -> Result<u16, DecodeError> {
        match r.u16("property value")? {
            0 => Err(DecodeError::InvalidPropertyValue {
                packet: r.packet,
                id,
            }),
            v => Ok(v),
        }
    }
    #[inline]
    fn write<S: Sink>(s: &mut S, v: &u16, _: &'static str) {
        s.u16(*v);
    }
}

/// Four Byte Integer, any value.
pub(crate) enum U32 {}
impl Wire for U32 {
    type Value = u32;
    #[inline]
    fn read(r: &mut Reader<'_>, _: u8, _: &'static str) -> Result<u32, DecodeError> {
        r.u32("property value")
    }
    #[inline]
    fn write<S: Sink>(s: &mut S, v: &u32, _: &'static str) {
        s.u32(*v);
    }
}

/// Four Byte Integer, 0 is a protocol error.
pub(crate) enum NonZeroU32 {}
impl Wire for NonZeroU32 {
    type Value = u32;
    #[inline]
    fn read(r: &mut Reader<'_>, id: u8, _: &'static str) -> Result<u32, DecodeError> {
        match r.u32("property value")? {
            0 => Err(DecodeError::InvalidPropertyValue {
                packet: r.packet,
                id,
            }),
            v => Ok(v),
        }
    }
    #[inline]
    fn write<S: Sink>(s: &mut S, v: &u32, _: &'static str) {
        s.u32(*v);
    }
}

/// Variable Byte Integer, 1 to 268,435,455 (0 is a protocol error). A
/// truncated or over-long one is malformed under the property's own name.
pub(crate) enum VarInt {}
impl Wire for VarInt {
    type Value = u32;
    #[inline]
    fn read(r: &mut Reader<'_>, id: u8, name: &'static str) -> Result<u32, DecodeError> {
        match r.vbi(name)? {
            0 => Err(DecodeError::InvalidPropertyValue {
                packet: r.packet,
                id,
            }),
            v => Ok(v),
        }
    }
    #[inline]
    fn write<S: Sink>(s: &mut S, v: &u32, name: &'static str) {
        s.vbi(*v as usize, name);
    }
}

/// UTF-8 Encoded String [MQTT-1.5.4-1], [MQTT-1.5.4-2].
pub(crate) enum Utf8 {}
impl Wire for Utf8 {
    type Value = ByteString;
    #[inline]
    fn read(r: &mut Reader<'_>, _: u8, _: &'static str) -> Result<ByteString, DecodeError> {
        r.string("property value")
    }
    #[inline]
    fn write<S: Sink>(s: &mut S, v: &ByteString, name: &'static str) {
        s.field(v.as_bytes(), name);
    }
}

/// Binary Data.
pub(crate) enum Binary {}
impl Wire for Binary {
    type Value = Bytes;
    #[inline]
    fn read(r: &mut Reader<'_>, _: u8, _: &'static str) -> Result<Bytes, DecodeError> {
        r.binary("property value")
    }
    #[inline]
    fn write<S: Sink>(s: &mut S, v: &Bytes, name: &'static str) {
        s.field(v, name);
    }
}

/// UTF-8 String Pair (User Property).
pub(crate) enum Pair {}
impl Wire for Pair {
    type Value = crate::UserProperty;
    #[inline]
    fn read(
        r: &mut Reader<'_>,
        _: u8,
        _: &'static str,
    ) -> Result<crate::UserProperty, DecodeError> {
        let k = r.string("user property name")?;
        let v = r.string("user property value")?;
        Ok((k, v))
    }
    #[inline]
    fn write<S: Sink>(s: &mut S, (k, v): &crate::UserProperty, _: &'static str) {
        s.field(k.as_bytes(), "user property name");
        s.field(v.as_bytes(), "user property value");
    }
}

// ---------------------------------------------------------------------------
// Table 1: the properties
// ---------------------------------------------------------------------------

/// The property table: the one place MQTT 5 properties are defined (with
/// `property_sets!` for which packet carries which). Defines one marker
/// type per property in [`p`], implementing [`Property`].
macro_rules! property_table {
    ($( $id:literal $Prop:ident: $wire:ident, $name:literal; )*) => {
        /// One uninhabited marker type per MQTT 5 property.
        pub(crate) mod p {
            $(
                #[doc = concat!("`", stringify!($id), "` ", $name, ".")]
                pub(crate) enum $Prop {}
                impl super::Property for $Prop {
                    const ID: u8 = $id;
                    const NAME: &'static str = $name;
                    type Wire = super::$wire;
                }
            )*
        }
    };
}

// The property table of MQTT 5.0, section 2.2.2.2: identifier, name (as in the
// spec, and as the field name in encode errors), wire kind.
property_table! {
    0x01 PayloadFormatIndicator: Byte, "payload format indicator";
    0x02 MessageExpiryInterval: U32, "message expiry interval";
    0x03 ContentType: Utf8, "content type";
    0x08 ResponseTopic: Utf8, "response topic";
    0x09 CorrelationData: Binary, "correlation data";
    0x0B SubscriptionIdentifier: VarInt, "subscription identifier";
    0x11 SessionExpiryInterval: U32, "session expiry interval";
    0x12 AssignedClientIdentifier: Utf8, "assigned client identifier";
    0x13 ServerKeepAlive: U16, "server keep alive";
    0x15 AuthenticationMethod: Utf8, "authentication method";
    0x16 AuthenticationData: Binary, "authentication data";
    0x17 RequestProblemInformation: Flag, "request problem information";
    0x18 WillDelayInterval: U32, "will delay interval";
    0x19 RequestResponseInformation: Flag, "request response information";
    0x1A ResponseInformation: Utf8, "response information";
    0x1C ServerReference: Utf8, "server reference";
    0x1F ReasonString: Utf8, "reason string";
    0x21 ReceiveMaximum: NonZeroU16, "receive maximum";
    0x22 TopicAliasMaximum: U16, "topic alias maximum";
    0x23 TopicAlias: NonZeroU16, "topic alias";
    0x24 MaximumQos: MaxQos, "maximum QoS";
    0x25 RetainAvailable: Flag, "retain available";
    0x26 UserProperty: Pair, "user property";
    0x27 MaximumPacketSize: NonZeroU32, "maximum packet size";
    0x28 WildcardSubscriptionAvailable: Flag, "wildcard subscription available";
    0x29 SubscriptionIdentifierAvailable: Flag, "subscription identifier available";
    0x2A SharedSubscriptionAvailable: Flag, "shared subscription available";
}

// ---------------------------------------------------------------------------
// Table 2: which packet carries which property, in which field
// ---------------------------------------------------------------------------

/// A field holding a property: `Option` (at most once in the packet) or
/// `Vec` (may repeat).
pub(crate) trait Slot<T> {
    /// The property may appear more than once.
    const REPEATABLE: bool;
    /// Stores a decoded value.
    fn put(&mut self, v: T);
    /// Calls `f` on each value held, in order.
    fn each(&self, f: impl FnMut(&T));
    fn is_empty(&self) -> bool;
}

impl<T> Slot<T> for Option<T> {
    const REPEATABLE: bool = false;
    #[inline]
    fn put(&mut self, v: T) {
        *self = Some(v);
    }
    #[inline]
    fn each(&self, mut f: impl FnMut(&T)) {
        if let Some(v) = self {
            f(v);
        }
    }
    #[inline]
    fn is_empty(&self) -> bool {
        self.is_none()
    }
}

impl<T> Slot<T> for Vec<T> {
    const REPEATABLE: bool = true;
    #[inline]
    fn put(&mut self, v: T) {
        self.push(v);
    }
    #[inline]
    fn each(&self, f: impl FnMut(&T)) {
        self.iter().for_each(f);
    }
    #[inline]
    fn is_empty(&self) -> bool {
        <[T]>::is_empty(self)
    }
}

/// The properties one packet may carry (or the Will Properties of CONNECT).
pub(crate) trait PropertySet {
    /// Bit `id` set for each property identifier the packet may carry.
    const ALLOWED: u64;
    /// Bit `id` set for each property that may appear more than once.
    const REPEATABLE: u64;
    /// Reads the value of property `id`, already checked against
    /// [`Self::ALLOWED`] and for duplicates, into its field.
    fn decode_property(&mut self, id: u8, r: &mut Reader<'_>) -> Result<(), DecodeError>;
    /// Writes each property that is set (identifier, value), in field order.
    fn encode_properties<S: Sink>(&self, s: &mut S);
}

/// The per-packet half of the property table: the one place that says which
/// properties a packet carries. Implements [`PropertySet`] from a field list,
/// and for the `struct` form
/// also defines the struct and its `is_empty`.
macro_rules! property_sets {
    () => {};
    (
        $(#[$meta:meta])*
        pub struct $Set:ident {
            $( $(#[$fmeta:meta])* pub $field:ident: $fty:ty = $Prop:ident, )*
        }
        $($rest:tt)*
    ) => {
        $(#[$meta])*
        #[derive(Debug, Clone, PartialEq, Eq, Default)]
        pub struct $Set {
            $( $(#[$fmeta])* pub $field: $fty, )*
        }

        impl $Set {
            /// No property is set: the packet would carry a property length of 0.
            pub fn is_empty(&self) -> bool {
                true $( && Slot::<ValueOf<p::$Prop>>::is_empty(&self.$field) )*
            }
        }

        property_sets! { impl $Set { $( $field: $fty = $Prop, )* } $($rest)* }
    };
    (
        impl $Set:ident { $( $field:ident: $fty:ty = $Prop:ident, )* }
        $($rest:tt)*
    ) => {
        impl PropertySet for $Set {
            const ALLOWED: u64 = 0 $( | 1u64 << <p::$Prop as Property>::ID )*;
            const REPEATABLE: u64 = 0 $(
                | if <$fty as Slot<ValueOf<p::$Prop>>>::REPEATABLE {
                    1u64 << <p::$Prop as Property>::ID
                } else {
                    0
                }
            )*;

            #[inline]
            fn decode_property(&mut self, id: u8, r: &mut Reader<'_>) -> Result<(), DecodeError> {
                match id {
                    $(
                        <p::$Prop as Property>::ID => {
                            let v = read::<p::$Prop>(r)?;
                            Slot::<ValueOf<p::$Prop>>::put(&mut self.$field, v);
                        }
                    )*
                    _ => return Err(DecodeError::InvalidProperty { packet: r.packet, id }),
                }
                Ok(())
            }

            // Out of line, as the hand-written encoders were: inlined, they
            // grow `encode` enough to cost the 3.1.1 path ~10% (callgrind).
            #[inline(never)]
            fn encode_properties<S: Sink>(&self, s: &mut S) {
                $(
                    Slot::<ValueOf<p::$Prop>>::each(&self.$field, |v| write::<p::$Prop, S>(s, v));
                )*
            }
        }

        property_sets! { $($rest)* }
    };
}

// Field order is the order properties are encoded in. The "Used in" column of
// the spec's property table, read per packet.
property_sets! {
    /// CONNECT properties (section 3.1.2.11).
    pub struct ConnectProperties {
        pub session_expiry_interval: Option<u32> = SessionExpiryInterval,
        pub receive_maximum: Option<u16> = ReceiveMaximum,
        pub maximum_packet_size: Option<u32> = MaximumPacketSize,
        pub topic_alias_maximum: Option<u16> = TopicAliasMaximum,
        pub request_response_information: Option<bool> = RequestResponseInformation,
        pub request_problem_information: Option<bool> = RequestProblemInformation,
        pub user_properties: Vec<crate::UserProperty> = UserProperty,
        pub authentication_method: Option<ByteString> = AuthenticationMethod,
        pub authentication_data: Option<Bytes> = AuthenticationData,
    }

    /// Will Properties, in the CONNECT payload (section 3.1.3.2).
    pub struct WillProperties {
        pub will_delay_interval: Option<u32> = WillDelayInterval,
        pub payload_format_indicator: Option<u8> = PayloadFormatIndicator,
        pub message_expiry_interval: Option<u32> = MessageExpiryInterval,
        pub content_type: Option<ByteString> = ContentType,
        pub response_topic: Option<ByteString> = ResponseTopic,
        pub correlation_data: Option<Bytes> = CorrelationData,
        pub user_properties: Vec<crate::UserProperty> = UserProperty,
    }

    /// CONNACK properties (section 3.2.2.3).
    pub struct ConnAckProperties {
        pub session_expiry_interval: Option<u32> = SessionExpiryInterval,
        pub receive_maximum: Option<u16> = ReceiveMaximum,
        pub maximum_qos: Option<QoS> = MaximumQos,
        pub retain_available: Option<bool> = RetainAvailable,
        pub maximum_packet_size: Option<u32> = MaximumPacketSize,
        pub assigned_client_identifier: Option<ByteString> = AssignedClientIdentifier,
        pub topic_alias_maximum: Option<u16> = TopicAliasMaximum,
        pub reason_string: Option<ByteString> = ReasonString,
        pub user_properties: Vec<crate::UserProperty> = UserProperty,
        pub wildcard_subscription_available: Option<bool> = WildcardSubscriptionAvailable,
        pub subscription_identifiers_available: Option<bool> = SubscriptionIdentifierAvailable,
        pub shared_subscription_available: Option<bool> = SharedSubscriptionAvailable,
        pub server_keep_alive: Option<u16> = ServerKeepAlive,
        pub response_information: Option<ByteString> = ResponseInformation,
        pub server_reference: Option<ByteString> = ServerReference,
        pub authentication_method: Option<ByteString> = AuthenticationMethod,
        pub authentication_data: Option<Bytes> = AuthenticationData,
    }

    /// PUBLISH properties (section 3.3.2.3).
    pub struct PublishProperties {
        pub payload_format_indicator: Option<u8> = PayloadFormatIndicator,
        pub message_expiry_interval: Option<u32> = MessageExpiryInterval,
        pub topic_alias: Option<u16> = TopicAlias,
        pub response_topic: Option<ByteString> = ResponseTopic,
        pub correlation_data: Option<Bytes> = CorrelationData,
        pub user_properties: Vec<crate::UserProperty> = UserProperty,
        /// Server to client only; a client sending one is a protocol error.
        /// Repeats: one per matching subscription.
        pub subscription_identifiers: Vec<u32> = SubscriptionIdentifier,
        pub content_type: Option<ByteString> = ContentType,
    }

    /// Properties of PUBACK / PUBREC / PUBREL / PUBCOMP / SUBACK / UNSUBACK.
    pub struct AckProperties {
        pub reason_string: Option<ByteString> = ReasonString,
        pub user_properties: Vec<crate::UserProperty> = UserProperty,
    }

    /// DISCONNECT properties (section 3.14.2.2).
    pub struct DisconnectProperties {
        pub session_expiry_interval: Option<u32> = SessionExpiryInterval,
        pub reason_string: Option<ByteString> = ReasonString,
        pub user_properties: Vec<crate::UserProperty> = UserProperty,
        pub server_reference: Option<ByteString> = ServerReference,
    }

    /// AUTH properties (section 3.15.2.2).
    pub struct AuthProperties {
        pub authentication_method: Option<ByteString> = AuthenticationMethod,
        pub authentication_data: Option<Bytes> = AuthenticationData,
        pub reason_string: Option<ByteString> = ReasonString,
        pub user_properties: Vec<crate::UserProperty> = UserProperty,
    }

    // SUBSCRIBE and UNSUBSCRIBE keep their properties in the packet struct.
    // Unlike PUBLISH, SUBSCRIBE carries at most one Subscription Identifier.
    impl Subscribe {
        subscription_identifier: Option<u32> = SubscriptionIdentifier,
        user_properties: Vec<crate::UserProperty> = UserProperty,
    }

    impl Unsubscribe {
        user_properties: Vec<crate::UserProperty> = UserProperty,
    }
}
