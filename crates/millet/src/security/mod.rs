//! Security: TLS, authentication providers and their chain, authorization
//! (ACL), quotas and bans. Everything here is self-contained; the protocol
//! and server call in through [`Security`] (built from [`SecurityConfig`]).
//! Every public item is re-exported here (`crate::security::X`).
//!
//! Which file owns what:
//! - [`config`]: the `[security...]` configuration types (the TOML
//!   reference), [`SecurityError`], and which providers are in force
//!   ([`effective_chain`]).
//! - [`chain`]: the provider chain and its verdict on a CONNECT
//!   ([`AuthChain`], [`AuthProvider`], [`Decision`], [`AuthResult`]).
//! - [`posture`]: what each listener lets in when no provider decides
//!   ([`ListenerPolicy`]) and the start-up report to the operator.
//! - [`loaded`]: [`Security`], everything built from the configuration and
//!   in force now.
//! - [`refresh`]: which files each part reads, their stamps, and reloading
//!   the parts that changed (or all of them on SIGHUP / admin API).
//! - [`reload`]: a file's parsed content, reloaded keeping the old content
//!   on error (password, SCRAM, signature and ACL files).
//! - [`tls`]: rustls server config from PEM files, mTLS, hot reload,
//!   certificate identity.
//! - [`passwd`]: argon2id password file and the `millet passwd` command.
//! - [`signature`]: per-device / per-product HMAC signatures with a replay
//!   window.
//! - [`jwt`]: HS256 / RS256 / ES256 tokens, claims → ACL rules.
//! - [`http_hook`]: POST to an HTTP service, cached, fail-closed.
//! - [`http_authz`]: the HTTP authorization hook (`[security.acl.http]`), a
//!   [`crate::hooks::Hooks`]: cached answers in place, the rest later.
//! - [`scram`]: SCRAM-SHA-256 for MQTT 5 enhanced authentication.
//! - [`acl`]: rules, topic matching, reload.
//! - [`quota`]: token buckets, connection rate, per-user connections, bans.

pub mod acl;
pub mod chain;
pub mod config;
pub mod http_authz;
pub mod http_hook;
pub mod jwt;
pub mod loaded;
pub mod passwd;
pub mod posture;
pub mod quota;
pub mod refresh;
pub mod reload;
pub mod scram;
pub mod signature;
pub mod tls;

pub use chain::{
    AuthChain, AuthProvider, AuthResult, BoxFuture, ConnectRequest, Decision, HttpProvider,
    JwtProvider, PasswordFileProvider, SignatureProvider, TlsCertProvider,
};
pub use config::{
    effective_chain, AclConfig, AuthConfig, PasswordFileConfig, ProviderKind, ScramConfig,
    SecurityConfig, SecurityError, V3DenyAction, DEFAULT_CHAIN_ORDER,
};
pub use loaded::Security;
pub use posture::{log_posture, posture_report, ListenerPolicy};

/// An empty password file, for the tests of the chain's configuration.
#[cfg(test)]
pub(crate) fn empty_passwd_file() -> tempfile::NamedTempFile {
    let f = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(f.path(), "").unwrap();
    f
}
