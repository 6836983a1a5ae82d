//! Why the server ends a connection or refuses a CONNECT: [`ProtocolError`],
//! with the one mapping from each cause to its reason code, its will
//! behaviour, how the client is told, and the text for the log and the
//! Reason String.

use millet_codec::{DecodeError, Protocol, ReasonCode};

use crate::broker::SessionRefusal;
use crate::security::quota::BanTarget;

/// Why a connection ends (or its CONNECT is refused), one variant per cause.
///
/// - [`ProtocolError::reason_code`]: the MQTT 5 reason code of the CONNACK or
///   DISCONNECT that says so (and of [`super::Close::reason`]);
///   [`ProtocolError::reason_code_v3`]: the one a 3.x client gets (in MQTT 5
///   terms; the 3.x encoder turns it into a CONNACK return code with
///   [`ReasonCode::to_v3_connack`]).
/// - [`ProtocolError::notice`]: how the client is told (DISCONNECT, CONNACK
///   or nothing).
/// - [`ProtocolError::publishes_will`]: whether the will is published
///   [MQTT-3.1.2-8].
/// - `Display`: the log text ("Client X disconnected: ..."), which is also
///   the DISCONNECT's Reason String except where
///   [`ProtocolError::reason_string`] says otherwise.
///
/// The client's own DISCONNECT is here too ([`ProtocolError::ClientDisconnect`]),
/// so that every close has one description.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProtocolError {
    // ---- before the CONNECT is accepted: nothing or a CONNACK -----------
    /// The first packet is not a CONNECT [MQTT-3.1.0-1] (the packet's name).
    #[error("{0} before CONNECT")]
    PacketBeforeConnect(&'static str),
    /// The CONNECT could not be decoded (other than an unsupported level).
    #[error("bad CONNECT: {0}")]
    BadConnect(Box<DecodeError>),
    /// A CONNECT of a protocol level this server does not speak: CONNACK
    /// 0x84 / 3.x 1 [MQTT-3.1.2-2].
    #[error("{}", DecodeError::UnsupportedProtocol)]
    UnsupportedProtocolVersion,
    /// No CONNECT (or no end of its AUTH exchange) within `connect_timeout`.
    #[error("no CONNECT within the connect timeout")]
    ConnectTimeout,
    /// Another packet than AUTH during the CONNECT's AUTH exchange.
    #[error("{0} during the AUTH exchange")]
    PacketDuringAuth(&'static str),
    /// An AUTH with a wrong method or reason during the CONNECT's exchange
    /// [MQTT-4.12.0-4].
    #[error("invalid AUTH during authentication")]
    InvalidAuthDuringConnect,
    /// `server_reference` is configured: the client is sent elsewhere
    /// [MQTT-4.11] (v5 0x9D server moved / 0x9C use another server; 3.x:
    /// server unavailable).
    #[error("redirected to {reference}")]
    Redirected { reference: Box<str>, moved: bool },
    /// `limits.max_connections` reached (v5 0x97; 3.x: server unavailable).
    #[error("max_connections reached")]
    MaxConnections,
    /// A zero-length client id without clean session in 3.x [MQTT-3.1.3-8].
    #[error("empty client id")]
    EmptyClientId,
    /// The will topic is not a valid topic name or exceeds the limits.
    #[error("invalid will topic")]
    WillTopicInvalid,
    /// The will topic is reserved (`$SYS/...`: 0x87, `$share/...`: 0x90;
    /// see [`super::reserved_topic`], whose code it carries).
    #[error("will topic {topic} is reserved")]
    WillTopicReserved { topic: Box<str>, code: ReasonCode },
    /// The driver's verdict refused the CONNECT (authentication, ban,
    /// per-user limit), with the verdict's reason code.
    #[error("CONNECT refused ({0})")]
    ConnectRefused(ReasonCode),
    /// The ACL does not let the client publish its will.
    #[error("will topic not authorized")]
    WillTopicNotAuthorized,
    /// No authentication provider for the CONNECT's method.
    #[error("unsupported authentication method {0}")]
    BadAuthenticationMethod(Box<str>),
    /// The CONNECT's AUTH exchange failed.
    #[error("authentication failed")]
    AuthenticationFailed,
    /// A new session is refused (`max_sessions`, memory budget): v5 0x97,
    /// 3.x server unavailable.
    #[error("new session refused: {}", session_refusal_text(*.0))]
    SessionRefused(SessionRefusal),
    /// The client's Maximum Packet Size is smaller than any CONNACK: closed
    /// without one [MQTT-3.1.2-24].
    #[error("the client's maximum packet size ({max}) is too small for a CONNACK")]
    ConnAckTooLarge { max: usize },

    // ---- connected: DISCONNECT (v5), plain close (3.x) ------------------
    /// A packet from a connected client could not be decoded; its reason
    /// code is the decoder's ([`DecodeError::reason_code`]).
    #[error("{0}")]
    Decode(Box<DecodeError>),
    /// The credentials expired (a JWT's `exp`).
    #[error("credentials expired")]
    CredentialsExpired,
    /// Nothing from the client for 1.5 keep-alive intervals [MQTT-3.1.2-22].
    #[error("keep alive timeout")]
    KeepAliveTimeout,
    /// A ban added at run time matches the client. 0x8A is a CONNACK code,
    /// not a DISCONNECT one, but it is what Millet has always sent (and
    /// documents).
    #[error("banned ({0})")]
    Banned(Box<BanTarget>),
    /// A DISCONNECT set a session expiry on a session that had none
    /// [MQTT-3.14.2-2].
    #[error("DISCONNECT raised a zero session expiry")]
    SessionExpiryRaised,
    /// A second CONNECT [MQTT-3.1.0-2].
    #[error("second CONNECT")]
    SecondConnect,
    /// A packet only a server sends (the packet's name).
    #[error("unexpected {0} from a client")]
    UnexpectedPacket(&'static str),
    /// Topic alias 0 or above our Topic Alias Maximum [MQTT-3.3.2-8].
    #[error("topic alias {alias} out of range")]
    TopicAliasInvalid { alias: u16 },
    /// A PUBLISH with an empty topic and an alias never set.
    #[error("unknown topic alias {alias}")]
    TopicAliasUnknown { alias: u16 },
    /// An empty topic (no alias) or one with wildcards.
    #[error("invalid topic name")]
    TopicNameInvalid,
    /// A PUBLISH from a client with a Subscription Identifier [MQTT-3.3.4-6].
    #[error("PUBLISH with a subscription identifier")]
    PublishWithSubscriptionId,
    /// A QoS 0 (or 3.x) PUBLISH whose topic exceeds `max_topic_length` /
    /// `max_topic_levels`.
    #[error("topic exceeds the configured limits")]
    TopicExceedsLimits,
    /// The message-rate quota is exceeded (`on_exceeded = "disconnect"`).
    #[error("message rate quota exceeded")]
    MessageRateTooHigh,
    /// More unacknowledged incoming QoS 2 messages than our Receive Maximum.
    #[error("receive maximum exceeded")]
    ReceiveMaximumExceeded,
    /// A 3.x PUBLISH the ACL refuses with `v3_deny_action = "disconnect"`.
    #[error("PUBLISH to {topic} not authorized")]
    PublishNotAuthorized { topic: Box<str> },
    /// No Local on a shared subscription [MQTT-3.8.3-4].
    #[error("No Local on a shared subscription")]
    NoLocalOnSharedSubscription,
    /// A re-authentication AUTH without the CONNECT's method
    /// [MQTT-4.12.0-7], [MQTT-4.12.1-1].
    #[error("AUTH without (or with a different) authentication method")]
    AuthMethodMismatch,
    /// A SCRAM re-authentication as another user than the CONNECT's.
    #[error("re-authentication as a different user")]
    ReauthDifferentUser,
    /// An AUTH reason code other than 0x19 (or 0x18 within an exchange).
    #[error("unexpected AUTH reason code")]
    UnexpectedAuthReasonCode,
    /// Re-authentication could not start (no provider for the method).
    #[error("re-authentication refused")]
    ReauthRefused,
    /// The re-authentication exchange failed.
    #[error("re-authentication failed")]
    ReauthFailed,

    /// More packets than [`crate::protocol::MAX_HELD_PACKETS`] arrived while
    /// the connection waited for the engine (0x97).
    #[error("too many packets while waiting for the engine")]
    HeldPacketsExceeded,
    /// The engine answered with something that does not fit the request
    /// (a defect, logged as such).
    #[error("engine answer does not match the request")]
    EngineMismatch,

    // ---- 3.x only, no negative acknowledgement: closed silently ----------
    /// A QoS 1/2 PUBLISH at the memory budget (v5 gets PUBACK 0x97 instead).
    #[error("memory budget reached: QoS 1/2 PUBLISH refused")]
    MemoryBudgetReached,
    /// A store write failed; the message cannot be acknowledged (v5 gets a
    /// negative acknowledgement instead).
    #[error("store write failed: cannot acknowledge")]
    StoreWriteFailed,

    // ---- the server and the client ---------------------------------------
    /// The server shuts down: 0x8B (or 0x9C with a server reference); the
    /// will is not published (the session would outlive us in a durable store).
    #[error("server shutting down")]
    ServerShuttingDown,
    /// Another connection took the session over [MQTT-3.1.4-3]. The will is
    /// published unless the client's own normal DISCONNECT turns up first.
    #[error("closed by the server ({})", ReasonCode::SESSION_TAKEN_OVER)]
    SessionTakenOver,
    /// The session's `kick` was set (with this reason code).
    #[error("closed by the server ({0})")]
    Kicked(ReasonCode),
    /// The client sent DISCONNECT with this reason code: the will is
    /// published unless it is 0x00 [MQTT-3.14.4-3]. Not an error, but a way
    /// a connection ends like the others.
    #[error("client sent DISCONNECT")]
    ClientDisconnect(ReasonCode),
}

/// How the client learns why the connection ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Notice {
    /// A DISCONNECT with the reason code and a Reason String, to a v5 client
    /// whose CONNECT was accepted; otherwise a plain close.
    Disconnect,
    /// A CONNACK with the reason code (3.x: the return code).
    ConnAck,
    /// Nothing: the connection is closed.
    Nothing,
}

/// The text of a [`SessionRefusal`], for the log.
pub fn session_refusal_text(r: SessionRefusal) -> &'static str {
    match r {
        SessionRefusal::MaxSessions => "max_sessions reached",
        SessionRefusal::Memory => "memory budget high watermark reached",
        SessionRefusal::ClusterUnavailable => "cluster mode: NATS unreachable",
    }
}

impl ProtocolError {
    /// The MQTT 5 reason code (CONNACK or DISCONNECT, see [`Self::notice`]).
    pub fn reason_code(&self) -> ReasonCode {
        use ProtocolError as E;
        match self {
            E::PacketBeforeConnect(_)
            | E::BadConnect(_)
            | E::ConnectTimeout
            | E::MemoryBudgetReached
            | E::EngineMismatch
            | E::StoreWriteFailed => ReasonCode::UNSPECIFIED_ERROR,
            E::UnsupportedProtocolVersion => DecodeError::UnsupportedProtocol.reason_code(),
            E::Decode(err) => err.reason_code(),
            E::PacketDuringAuth(_)
            | E::InvalidAuthDuringConnect
            | E::SessionExpiryRaised
            | E::SecondConnect
            | E::UnexpectedPacket(_)
            | E::TopicAliasUnknown { .. }
            | E::PublishWithSubscriptionId
            | E::NoLocalOnSharedSubscription
            | E::AuthMethodMismatch
            | E::UnexpectedAuthReasonCode => ReasonCode::PROTOCOL_ERROR,
            E::Redirected { moved: true, .. } => ReasonCode::SERVER_MOVED,
            E::Redirected { moved: false, .. } => ReasonCode::USE_ANOTHER_SERVER,
            E::SessionRefused(SessionRefusal::ClusterUnavailable) => ReasonCode::SERVER_UNAVAILABLE,
            E::MaxConnections | E::SessionRefused(_) | E::HeldPacketsExceeded => {
                ReasonCode::QUOTA_EXCEEDED
            }
            E::EmptyClientId => ReasonCode::CLIENT_IDENTIFIER_NOT_VALID,
            E::WillTopicInvalid | E::TopicNameInvalid | E::TopicExceedsLimits => {
                ReasonCode::TOPIC_NAME_INVALID
            }
            E::WillTopicReserved { code, .. } => *code,
            E::ConnectRefused(code) | E::Kicked(code) | E::ClientDisconnect(code) => *code,
            E::WillTopicNotAuthorized
            | E::AuthenticationFailed
            | E::CredentialsExpired
            | E::PublishNotAuthorized { .. }
            | E::ReauthDifferentUser
            | E::ReauthRefused
            | E::ReauthFailed => ReasonCode::NOT_AUTHORIZED,
            E::BadAuthenticationMethod(_) => ReasonCode::BAD_AUTHENTICATION_METHOD,
            E::ConnAckTooLarge { .. } => ReasonCode::PACKET_TOO_LARGE,
            E::KeepAliveTimeout => ReasonCode::KEEP_ALIVE_TIMEOUT,
            // A ban that reaches a connected client: 0x8A (Banned) is a
            // CONNACK code only; DISCONNECT says 0x98 Administrative action
            // [MQTT-3.14.2.1], with the ban in the reason string.
            E::Banned(_) => ReasonCode::ADMINISTRATIVE_ACTION,
            E::TopicAliasInvalid { .. } => ReasonCode::TOPIC_ALIAS_INVALID,
            E::MessageRateTooHigh => ReasonCode::MESSAGE_RATE_TOO_HIGH,
            E::ReceiveMaximumExceeded => ReasonCode::RECEIVE_MAXIMUM_EXCEEDED,
            E::ServerShuttingDown => ReasonCode::SERVER_SHUTTING_DOWN,
            E::SessionTakenOver => ReasonCode::SESSION_TAKEN_OVER,
        }
    }

    /// The reason code for a 3.x client, in MQTT 5 terms (the 3.x encoder
    /// derives the CONNACK return code from it): where the v5 code has no
    /// close 3.x return code, "server unavailable" (3); otherwise the v5 code.
    pub fn reason_code_v3(&self) -> ReasonCode {
        match self {
            ProtocolError::Redirected { .. }
            | ProtocolError::MaxConnections
            | ProtocolError::SessionRefused(_) => ReasonCode::SERVER_UNAVAILABLE,
            other => other.reason_code(),
        }
    }

    /// The reason code for a client speaking `protocol` (None: before CONNECT).
    pub fn reason_code_for(&self, protocol: Option<Protocol>) -> ReasonCode {
        if protocol.is_some_and(Protocol::is_v5) {
            self.reason_code()
        } else {
            self.reason_code_v3()
        }
    }

    /// How the client is told.
    pub fn notice(&self) -> Notice {
        use ProtocolError as E;
        match self {
            E::PacketBeforeConnect(_)
            | E::BadConnect(_)
            | E::ConnectTimeout
            | E::ConnAckTooLarge { .. }
            | E::MemoryBudgetReached
            | E::StoreWriteFailed
            | E::ClientDisconnect(_) => Notice::Nothing,
            E::UnsupportedProtocolVersion
            | E::Redirected { .. }
            | E::MaxConnections
            | E::EmptyClientId
            | E::WillTopicInvalid
            | E::WillTopicReserved { .. }
            | E::ConnectRefused(_)
            | E::WillTopicNotAuthorized
            | E::BadAuthenticationMethod(_)
            | E::AuthenticationFailed
            | E::SessionRefused(_) => Notice::ConnAck,
            E::PacketDuringAuth(_)
            | E::InvalidAuthDuringConnect
            | E::Decode(_)
            | E::CredentialsExpired
            | E::KeepAliveTimeout
            | E::Banned(_)
            | E::SessionExpiryRaised
            | E::SecondConnect
            | E::UnexpectedPacket(_)
            | E::TopicAliasInvalid { .. }
            | E::TopicAliasUnknown { .. }
            | E::TopicNameInvalid
            | E::PublishWithSubscriptionId
            | E::TopicExceedsLimits
            | E::MessageRateTooHigh
            | E::ReceiveMaximumExceeded
            | E::PublishNotAuthorized { .. }
            | E::NoLocalOnSharedSubscription
            | E::AuthMethodMismatch
            | E::ReauthDifferentUser
            | E::UnexpectedAuthReasonCode
            | E::ReauthRefused
            | E::ReauthFailed
            | E::HeldPacketsExceeded
            | E::EngineMismatch
            | E::ServerShuttingDown
            | E::SessionTakenOver
            | E::Kicked(_) => Notice::Disconnect,
        }
    }

    /// Whether the will is published [MQTT-3.1.2-8]: yes for a close the
    /// server decides on a live connection, except at shutdown; no for a
    /// refused CONNECT, a kick, and a client's normal DISCONNECT.
    pub fn publishes_will(&self) -> bool {
        match self {
            ProtocolError::ClientDisconnect(code) => *code != ReasonCode::NORMAL_DISCONNECTION,
            ProtocolError::Redirected { .. }
            | ProtocolError::MaxConnections
            | ProtocolError::EmptyClientId
            | ProtocolError::WillTopicInvalid
            | ProtocolError::WillTopicReserved { .. }
            | ProtocolError::ConnectRefused(_)
            | ProtocolError::WillTopicNotAuthorized
            | ProtocolError::BadAuthenticationMethod(_)
            | ProtocolError::AuthenticationFailed
            | ProtocolError::SessionRefused(_)
            | ProtocolError::ConnAckTooLarge { .. }
            | ProtocolError::ServerShuttingDown
            | ProtocolError::Kicked(_) => false,
            _ => true,
        }
    }

    /// The Reason String of the DISCONNECT: the log text, except for a
    /// takeover or a kick, where the client is told less.
    pub fn reason_string(&self) -> String {
        match self {
            ProtocolError::SessionTakenOver => "session taken over".into(),
            ProtocolError::Kicked(_) => "closed by the server".into(),
            other => other.to_string(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Reason codes a server may put in a CONNACK (MQTT 5.0 §3.2.2.2).
    const CONNACK_CODES: &[u8] = &[
        0x00, 0x80, 0x81, 0x82, 0x83, 0x84, 0x85, 0x86, 0x87, 0x88, 0x89, 0x8A, 0x8C, 0x90, 0x95,
        0x97, 0x99, 0x9A, 0x9B, 0x9C, 0x9D, 0x9F,
    ];
    /// Reason codes a DISCONNECT may carry (MQTT 5.0 §3.14.2.1; 0x04 is the
    /// client's only).
    const DISCONNECT_CODES: &[u8] = &[
        0x00, 0x04, 0x80, 0x81, 0x82, 0x83, 0x87, 0x89, 0x8B, 0x8D, 0x8E, 0x8F, 0x90, 0x93, 0x94,
        0x95, 0x96, 0x97, 0x98, 0x99, 0x9A, 0x9B, 0x9C, 0x9D, 0x9E, 0x9F, 0xA0, 0xA1, 0xA2,
    ];

    /// Each variant's position: exhaustive, so a new variant must be added
    /// here, and then to `samples`.
    fn ordinal(e: &ProtocolError) -> usize {
        use ProtocolError as E;
        match e {
            E::PacketBeforeConnect(_) => 0,
            E::BadConnect(_) => 1,
            E::UnsupportedProtocolVersion => 2,
            E::ConnectTimeout => 3,
            E::PacketDuringAuth(_) => 4,
            E::InvalidAuthDuringConnect => 5,
            E::Redirected { .. } => 6,
            E::MaxConnections => 7,
            E::EmptyClientId => 8,
            E::WillTopicInvalid => 9,
            E::WillTopicReserved { .. } => 10,
            E::ConnectRefused(_) => 11,
            E::WillTopicNotAuthorized => 12,
            E::BadAuthenticationMethod(_) => 13,
            E::AuthenticationFailed => 14,
            E::SessionRefused(_) => 15,
            E::ConnAckTooLarge { .. } => 16,
            E::Decode(_) => 17,
            E::CredentialsExpired => 18,
            E::KeepAliveTimeout => 19,
            E::Banned(_) => 20,
            E::SessionExpiryRaised => 21,
            E::SecondConnect => 22,
            E::UnexpectedPacket(_) => 23,
            E::TopicAliasInvalid { .. } => 24,
            E::TopicAliasUnknown { .. } => 25,
            E::TopicNameInvalid => 26,
            E::PublishWithSubscriptionId => 27,
            E::TopicExceedsLimits => 28,
            E::MessageRateTooHigh => 29,
            E::ReceiveMaximumExceeded => 30,
            E::PublishNotAuthorized { .. } => 31,
            E::NoLocalOnSharedSubscription => 32,
            E::AuthMethodMismatch => 33,
            E::ReauthDifferentUser => 34,
            E::UnexpectedAuthReasonCode => 35,
            E::ReauthRefused => 36,
            E::ReauthFailed => 37,
            E::MemoryBudgetReached => 38,
            E::StoreWriteFailed => 39,
            E::ServerShuttingDown => 40,
            E::SessionTakenOver => 41,
            E::Kicked(_) => 42,
            E::ClientDisconnect(_) => 43,
            E::HeldPacketsExceeded => 44,
            E::EngineMismatch => 45,
        }
    }
    const VARIANTS: usize = 46;

    /// Every variant, with each value its data can take where that changes
    /// the code (decode errors a connected client can cause, the verdict's
    /// codes, the reserved-topic codes, ...).
    fn samples() -> Vec<ProtocolError> {
        use ProtocolError as E;
        let decode_errors = [
            DecodeError::MalformedRemainingLength,
            DecodeError::Malformed("PUBLISH", "truncated"),
            DecodeError::InvalidQoS(3),
            DecodeError::ZeroPacketId("PUBLISH"),
            DecodeError::DuplicateProperty {
                packet: "PUBLISH",
                id: 1,
            },
            DecodeError::InvalidTopicName,
            DecodeError::NoTopicFilters("SUBSCRIBE"),
            DecodeError::PacketTooLarge { size: 10, max: 5 },
            DecodeError::NotInThisVersion("AUTH"),
        ];
        let mut v = vec![
            E::PacketBeforeConnect("PUBLISH"),
            E::UnsupportedProtocolVersion,
            E::ConnectTimeout,
            E::PacketDuringAuth("PUBLISH"),
            E::InvalidAuthDuringConnect,
            E::Redirected {
                reference: "elsewhere:1883".into(),
                moved: true,
            },
            E::Redirected {
                reference: "elsewhere:1883".into(),
                moved: false,
            },
            E::MaxConnections,
            E::EmptyClientId,
            E::WillTopicInvalid,
            E::WillTopicNotAuthorized,
            E::BadAuthenticationMethod("X".into()),
            E::AuthenticationFailed,
            E::SessionRefused(SessionRefusal::MaxSessions),
            E::SessionRefused(SessionRefusal::Memory),
            E::ConnAckTooLarge { max: 3 },
            E::CredentialsExpired,
            E::KeepAliveTimeout,
            E::Banned(Box::new(BanTarget::ClientId("c".into()))),
            E::SessionExpiryRaised,
            E::SecondConnect,
            E::UnexpectedPacket("CONNACK"),
            E::TopicAliasInvalid { alias: 0 },
            E::TopicAliasUnknown { alias: 7 },
            E::TopicNameInvalid,
            E::PublishWithSubscriptionId,
            E::TopicExceedsLimits,
            E::MessageRateTooHigh,
            E::ReceiveMaximumExceeded,
            E::PublishNotAuthorized {
                topic: "a/b".into(),
            },
            E::NoLocalOnSharedSubscription,
            E::AuthMethodMismatch,
            E::ReauthDifferentUser,
            E::UnexpectedAuthReasonCode,
            E::ReauthRefused,
            E::ReauthFailed,
            E::MemoryBudgetReached,
            E::StoreWriteFailed,
            E::HeldPacketsExceeded,
            E::EngineMismatch,
            E::ServerShuttingDown,
            E::SessionTakenOver,
            E::Kicked(ReasonCode::ADMINISTRATIVE_ACTION),
            E::ClientDisconnect(ReasonCode::NORMAL_DISCONNECTION),
            E::ClientDisconnect(ReasonCode::DISCONNECT_WITH_WILL),
        ];
        for topic in ["$SYS/x", "$share/g/t"] {
            let code = super::super::reserved_topic(topic).unwrap_or_default();
            v.push(E::WillTopicReserved {
                topic: topic.into(),
                code,
            });
        }
        // The verdict's codes (see `ConnectVerdict::reason`).
        for code in [0x86, 0x87, 0x8A, 0x97] {
            v.push(E::ConnectRefused(ReasonCode(code)));
        }
        for err in decode_errors {
            v.push(E::BadConnect(Box::new(err.clone())));
            v.push(E::Decode(Box::new(err)));
        }
        v
    }

    #[test]
    fn samples_cover_every_variant() {
        let mut seen = [false; VARIANTS];
        for e in samples() {
            seen[ordinal(&e)] = true;
        }
        let missing: Vec<usize> = (0..VARIANTS).filter(|&i| !seen[i]).collect();
        assert!(missing.is_empty(), "variants without a sample: {missing:?}");
    }

    #[test]
    fn every_variant_maps_to_a_code_valid_for_its_packet() {
        for e in samples() {
            let code = e.reason_code();
            let v3 = e.reason_code_v3();
            match e.notice() {
                Notice::ConnAck => {
                    assert!(CONNACK_CODES.contains(&code.0), "{e:?}: {code} in CONNACK");
                    assert!(code.is_error(), "{e:?}: a refusal with {code}");
                    assert!(CONNACK_CODES.contains(&v3.0), "{e:?}: {v3} for 3.x");
                    assert_ne!(v3.to_v3_connack(), 0, "{e:?}: 3.x return code 0");
                    assert!(!e.publishes_will() || e == ProtocolError::UnsupportedProtocolVersion);
                }
                Notice::Disconnect => {
                    assert!(
                        DISCONNECT_CODES.contains(&code.0),
                        "{e:?}: {code} in DISCONNECT"
                    );
                    assert!(code.is_error(), "{e:?}: a server DISCONNECT with {code}");
                    assert_ne!(code.0, 0x04, "{e:?}: 0x04 is the client's");
                    assert_eq!(v3, code, "{e:?}: 3.x has no DISCONNECT code");
                }
                Notice::Nothing => {
                    // Only in `Close::reason` (and the log), but still one a
                    // DISCONNECT could carry.
                    assert!(DISCONNECT_CODES.contains(&code.0), "{e:?}: {code}");
                    assert_eq!(v3, code, "{e:?}");
                }
            }
        }
    }

    #[test]
    fn log_texts_and_reason_strings() {
        use ProtocolError as E;
        for (e, log, reason_string) in [
            (
                E::KeepAliveTimeout,
                "keep alive timeout",
                "keep alive timeout",
            ),
            (
                E::ClientDisconnect(ReasonCode::NORMAL_DISCONNECTION),
                "client sent DISCONNECT",
                "client sent DISCONNECT",
            ),
            (
                E::SessionTakenOver,
                "closed by the server (0x8E)",
                "session taken over",
            ),
            (
                E::Kicked(ReasonCode::ADMINISTRATIVE_ACTION),
                "closed by the server (0x98)",
                "closed by the server",
            ),
            (
                E::Banned(Box::new(BanTarget::ClientId("dev-7".into()))),
                "banned (client:dev-7)",
                "banned (client:dev-7)",
            ),
            (
                E::TopicAliasInvalid { alias: 11 },
                "topic alias 11 out of range",
                "topic alias 11 out of range",
            ),
            (
                E::SessionRefused(SessionRefusal::Memory),
                "new session refused: memory budget high watermark reached",
                "new session refused: memory budget high watermark reached",
            ),
            (
                E::UnsupportedProtocolVersion,
                "unsupported protocol level",
                "unsupported protocol level",
            ),
            (
                E::BadConnect(Box::new(DecodeError::InvalidProtocolName)),
                "bad CONNECT: invalid protocol name",
                "bad CONNECT: invalid protocol name",
            ),
            (
                E::ConnectRefused(ReasonCode::BANNED),
                "CONNECT refused (0x8A)",
                "CONNECT refused (0x8A)",
            ),
        ] {
            assert_eq!(e.to_string(), log);
            assert_eq!(e.reason_string(), reason_string);
        }
    }

    #[test]
    fn will_behaviour() {
        use ProtocolError as E;
        assert!(E::KeepAliveTimeout.publishes_will());
        assert!(E::SessionTakenOver.publishes_will());
        assert!(E::ConnectTimeout.publishes_will());
        assert!(!E::ServerShuttingDown.publishes_will());
        assert!(!E::Kicked(ReasonCode::ADMINISTRATIVE_ACTION).publishes_will());
        assert!(!E::ClientDisconnect(ReasonCode::NORMAL_DISCONNECTION).publishes_will());
        assert!(E::ClientDisconnect(ReasonCode::DISCONNECT_WITH_WILL).publishes_will());
        assert!(!E::ConnAckTooLarge { max: 3 }.publishes_will());
    }

    #[test]
    fn the_enum_stays_small() {
        // `Close` lives in every connection; boxed payloads keep it as
        // small as it was with a `String`.
        assert!(std::mem::size_of::<ProtocolError>() <= 24);
        assert!(std::mem::size_of::<super::super::Close>() <= 32);
    }
}
