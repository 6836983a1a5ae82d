//! # millet-codec
//!
//! Sans-IO encoder and decoder for MQTT 3.1, 3.1.1 and 5.0 control packets.
//! No sockets, no async, no clock: bytes in, [`Packet`]s out, and back.
//!
//! ## Contract
//! - [`decode`] takes the bytes received so far. `Ok(None)` means "incomplete,
//!   read more" (normal, not an error); `Ok(Some(packet))` consumes exactly that
//!   packet's bytes from the buffer. Errors carry the reason code the server must
//!   answer with ([`DecodeError::reason_code`]).
//! - A packet larger than `max_packet_size` is rejected from its fixed header,
//!   before its body is buffered.
//! - Payloads and binary fields are [`bytes::Bytes`] slices of the receive
//!   buffer (zero-copy); topic names are [`bytestring::ByteString`]s over the
//!   same buffer.
//! - [`encode`] appends one packet to a `BytesMut`, in the wire format of the
//!   given protocol version (MQTT 5-only fields are dropped for 3.x).
//!
//! ## Layout
//! - `packet`: the packet structs, shared by all versions.
//! - `property`: the MQTT 5 property table, the one place properties are
//!   defined; it generates the property structs and drives their decoding
//!   and encoding.
//! - `reason`: reason codes and their 3.1.1 equivalents.
//! - `error`: decode / encode errors, each mapped to one reason code.
//! - `decode` / `encode`: the wire format.
//! - `topic`: topic name and filter validation, `$share` parsing.

#![forbid(unsafe_code)]
#![deny(clippy::unwrap_used, clippy::expect_used)]

mod decode;
mod encode;
mod error;
mod packet;
mod property;
mod reason;
pub mod topic;

pub use decode::decode;
pub use encode::{encode, encoded_len};
pub use error::{DecodeError, EncodeError};
pub use packet::*;
pub use property::{
    AckProperties, AuthProperties, ConnAckProperties, ConnectProperties, DisconnectProperties,
    PublishProperties, WillProperties,
};
pub use reason::ReasonCode;

pub use bytes;
pub use bytestring;
