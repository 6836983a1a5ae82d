//! The authenticator interface for MQTT 5 enhanced authentication (AUTH
//! packet exchanges, section 4.12). Concrete methods (SCRAM, ...) plug in
//! here; with none configured, a CONNECT naming an authentication method is
//! refused with 0x8C (bad authentication method).

use bytes::Bytes;

/// One step of an authentication exchange.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AuthStep {
    /// Send AUTH 0x18 with this data and wait for the client's next AUTH.
    Continue(Bytes),
    /// Authenticated; optional final data for CONNACK / AUTH 0x00.
    Success(Option<Bytes>),
    /// Refused: CONNACK / DISCONNECT with 0x87 (not authorized).
    Failure,
}

/// A running exchange for one connection.
pub trait AuthExchange: Send {
    /// Feed the client's authentication data (from CONNECT or AUTH).
    fn step(&mut self, data: Option<&[u8]>) -> AuthStep;
}

/// An enhanced authentication provider.
pub trait Authenticator: Send + Sync {
    /// Start an exchange for `method`, or `None` if this provider does not
    /// implement the method.
    fn start(&self, method: &str, client_id: &str) -> Option<Box<dyn AuthExchange>>;
}
