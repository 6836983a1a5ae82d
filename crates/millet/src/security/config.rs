//! The security configuration: the `[security...]` types as parsed from
//! TOML, and the chain they ask for. Owns [`SecurityConfig`] and its parts,
//! [`SecurityError`], and the rule that turns the configuration into the
//! chain in force ([`effective_chain`]); loading the files it names is
//! [`super::Security::from_config`]'s.
//!
//! # Configuration (TOML)
//! ```toml
//! [security.auth]
//! chain = ["tls_cert", "password_file", "signature", "jwt", "http"]
//! anonymous_listeners = ["0.0.0.0:1884"]   # optional: explicitly anonymous
//! [security.auth.password_file]
//! path = "/etc/millet/passwd"
//! [security.auth.signature]
//! secrets = "/etc/millet/device-secrets.toml"
//! algorithm = "hmac-sha256"   # hmac-sha384 | hmac-sha512
//! encoding = "hex"            # base64
//! window_secs = 300
//! [security.auth.jwt]
//! algorithm = "HS256"         # RS256 | ES256 (public_key = PEM or jwks = JSON)
//! secret = "change-me"
//! [security.auth.http]
//! url = "http://127.0.0.1:8080/mqtt/auth"
//! timeout_ms = 2000
//! cache_ttl_secs = 60
//! on_error = "deny"           # ignore
//! [security.auth.scram]
//! path = "/etc/millet/scram"  # SCRAM-SHA-256 over v5 AUTH
//!
//! [security.acl]
//! file = "/etc/millet/acl.toml"
//!
//! [security.quota]
//! messages_per_sec = 100
//! bytes_per_sec = 1048576
//! on_exceeded = "disconnect"  # backpressure
//! connections_per_sec = 50
//! max_connections_per_user = 10
//! bans = ["ip:192.0.2.0/24", "client:bad-device"]
//!
//! [security.tls]
//! cert = "/etc/millet/server.pem"
//! key = "/etc/millet/server.key"
//! ca = "/etc/millet/clients-ca.pem"
//! require_client_cert = true
//! identity_as = "username"    # client_id | none
//! ```
//!
//! # Which providers are in force
//! A configured provider is always in force (never silently anonymous):
//! without `chain`, the chain is every configured provider in the order
//! [`DEFAULT_CHAIN_ORDER`] (`tls_cert` only when `[security.tls]` verifies
//! client certificates and uses them as an identity); with `chain`, a
//! configured provider section the chain leaves out is a start-up error.

use std::net::SocketAddr;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use super::http_authz::HttpAuthzConfig;
use super::http_hook::{self, HttpHookConfig};
use super::jwt::{self, JwtConfig};
use super::quota::QuotaConfig;
use super::signature::{self, SignatureConfig};
use super::tls::{self, IdentityAs, TlsConfig};
use super::{acl, passwd, scram};

/// A provider name in `auth.chain`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ProviderKind {
    PasswordFile,
    Signature,
    Jwt,
    Http,
    TlsCert,
}

/// `[security.auth.password_file]`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PasswordFileConfig {
    pub path: PathBuf,
}

/// `[security.auth.scram]`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ScramConfig {
    pub path: PathBuf,
}

/// `[security.auth]`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AuthConfig {
    pub chain: Vec<ProviderKind>,
    /// Listeners explicitly marked anonymous.
    pub anonymous_listeners: Vec<SocketAddr>,
    pub password_file: Option<PasswordFileConfig>,
    pub signature: Option<SignatureConfig>,
    pub jwt: Option<JwtConfig>,
    pub http: Option<HttpHookConfig>,
    pub scram: Option<ScramConfig>,
}

/// `[security.acl]`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AclConfig {
    /// Rule file (TOML, see [`acl`]); none: no rules (everything allowed,
    /// unless a provider hands out per-client rules).
    pub file: Option<PathBuf>,
    /// What a denied PUBLISH from an MQTT 3.x client does (v5 clients get
    /// PUBACK / PUBREC 0x87): `"drop"` (QoS 1/2 still acknowledged so the
    /// client does not resend forever) or `"disconnect"` (close).
    pub v3_deny_action: V3DenyAction,
    /// An HTTP service asked for every authorization not in its cache
    /// (`[security.acl.http]`; see [`super::http_authz`]); its `ignore`
    /// leaves the decision to the rules above.
    pub http: Option<HttpAuthzConfig>,
}

/// `acl.v3_deny_action`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum V3DenyAction {
    #[default]
    Drop,
    Disconnect,
}

/// The whole security configuration.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SecurityConfig {
    pub auth: AuthConfig,
    pub acl: AclConfig,
    pub quota: QuotaConfig,
    pub tls: Option<TlsConfig>,
}

impl SecurityConfig {
    pub fn from_toml(text: &str) -> Result<SecurityConfig, SecurityError> {
        toml::from_str(text).map_err(|e| SecurityError::Config(e.to_string()))
    }
}

/// Errors building [`Security`](super::Security).
#[derive(Debug, thiserror::Error)]
pub enum SecurityError {
    #[error("security configuration: {0}")]
    Config(String),
    #[error(transparent)]
    Passwd(#[from] passwd::PasswdError),
    #[error(transparent)]
    Signature(#[from] signature::SignatureError),
    #[error(transparent)]
    Jwt(#[from] jwt::JwtError),
    #[error(transparent)]
    Http(#[from] http_hook::HttpHookError),
    #[error(transparent)]
    Scram(#[from] scram::ScramError),
    #[error(transparent)]
    Acl(#[from] acl::AclError),
    #[error(transparent)]
    Tls(#[from] tls::TlsError),
}

/// The order of the default chain (`security.auth.chain` unset): the
/// configured providers, cheapest and most specific first. `tls_cert` joins
/// it only when `[security.tls]` verifies client certificates (`ca`) and uses
/// them as an identity (`identity_as` not `none`).
pub const DEFAULT_CHAIN_ORDER: [ProviderKind; 5] = [
    ProviderKind::TlsCert,
    ProviderKind::PasswordFile,
    ProviderKind::Signature,
    ProviderKind::Jwt,
    ProviderKind::Http,
];

impl ProviderKind {
    /// The name used in `security.auth.chain` and `[security.auth.NAME]`.
    pub fn name(self) -> &'static str {
        match self {
            ProviderKind::PasswordFile => "password_file",
            ProviderKind::Signature => "signature",
            ProviderKind::Jwt => "jwt",
            ProviderKind::Http => "http",
            ProviderKind::TlsCert => "tls_cert",
        }
    }

    /// Is this provider configured (its section present; for `tls_cert`,
    /// client certificates verified and used as an identity)?
    fn configured_in(self, c: &SecurityConfig) -> bool {
        let a = &c.auth;
        match self {
            ProviderKind::PasswordFile => a.password_file.is_some(),
            ProviderKind::Signature => a.signature.is_some(),
            ProviderKind::Jwt => a.jwt.is_some(),
            ProviderKind::Http => a.http.is_some(),
            ProviderKind::TlsCert => c
                .tls
                .as_ref()
                .is_some_and(|t| t.ca.is_some() && t.identity_as != IdentityAs::None),
        }
    }
}

/// The chain in force: `security.auth.chain` as written (no duplicates, and
/// leaving out no configured provider section), or, when it is empty, every
/// configured provider in [`DEFAULT_CHAIN_ORDER`]. Never fails open: a
/// provider that is configured is asked.
pub fn effective_chain(c: &SecurityConfig) -> Result<Vec<ProviderKind>, SecurityError> {
    let chain = &c.auth.chain;
    if chain.is_empty() {
        return Ok(DEFAULT_CHAIN_ORDER
            .into_iter()
            .filter(|k| k.configured_in(c))
            .collect());
    }
    for (i, kind) in chain.iter().enumerate() {
        if chain[..i].contains(kind) {
            return Err(SecurityError::Config(format!(
                "provider \"{}\" is listed twice in security.auth.chain",
                kind.name()
            )));
        }
    }
    for kind in DEFAULT_CHAIN_ORDER {
        if kind != ProviderKind::TlsCert && kind.configured_in(c) && !chain.contains(&kind) {
            return Err(SecurityError::Config(format!(
                "[security.auth.{0}] is configured but security.auth.chain does not list \"{0}\": \
                 add it to the chain, or remove the section (or remove chain to use every \
                 configured provider)",
                kind.name()
            )));
        }
    }
    Ok(chain.clone())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::security::{ListenerPolicy, Security};

    #[test]
    fn a_configured_provider_left_out_of_the_chain_is_an_error() {
        let f = super::super::empty_passwd_file();
        let c = SecurityConfig::from_toml(&format!(
            "[auth]\nchain = [\"jwt\"]\n[auth.password_file]\npath = {:?}\n[auth.jwt]\nalgorithm = \"HS256\"\nsecret = \"k\"",
            f.path()
        ))
        .unwrap();
        let e = Security::from_config(c).unwrap_err().to_string();
        assert!(
            e.contains("[security.auth.password_file] is configured but security.auth.chain does not list \"password_file\""),
            "{e}"
        );
    }

    #[test]
    fn tls_cert_joins_the_default_chain_only_as_an_identity() {
        let base = "[tls]\ncert = \"c\"\nkey = \"k\"\nca = \"ca\"\n";
        let c = SecurityConfig::from_toml(base).unwrap();
        assert_eq!(effective_chain(&c).unwrap(), vec![]);
        let c = SecurityConfig::from_toml(&format!("{base}identity_as = \"username\"")).unwrap();
        assert_eq!(effective_chain(&c).unwrap(), vec![ProviderKind::TlsCert]);
        let no_ca = SecurityConfig::from_toml(
            "[tls]\ncert = \"c\"\nkey = \"k\"\nidentity_as = \"username\"",
        )
        .unwrap();
        let e = Security::from_config(no_ca).unwrap_err().to_string();
        assert!(e.contains("identity_as needs ca"), "{e}");
    }

    #[test]
    fn config_parses_and_validates() {
        let c = SecurityConfig::from_toml(
            r#"
[auth]
chain = ["jwt", "http"]
anonymous_listeners = ["0.0.0.0:1884"]
[auth.jwt]
algorithm = "HS256"
secret = "k"
[auth.http]
url = "http://127.0.0.1:9/auth"
on_error = "ignore"
[quota]
messages_per_sec = 10.0
bans = ["ip:192.0.2.0/24"]
"#,
        )
        .unwrap();
        assert_eq!(c.auth.chain, vec![ProviderKind::Jwt, ProviderKind::Http]);
        let s = Security::from_config(c).unwrap();
        assert_eq!(s.chain.names(), vec!["jwt", "http"]);
        assert_eq!(
            s.listener_policy("0.0.0.0:1884".parse().unwrap()),
            ListenerPolicy::Anonymous
        );
        assert_eq!(
            s.listener_policy("127.0.0.1:1883".parse().unwrap()),
            ListenerPolicy::Authenticated
        );
        assert!(s
            .bans
            .ip_banned("192.0.2.1".parse().unwrap(), std::time::Instant::now())
            .is_some());
        assert!(SecurityConfig::from_toml("[auth]\nchain=[\"nope\"]").is_err());
        assert!(SecurityConfig::from_toml("[bogus]").is_err());
        let missing = SecurityConfig::from_toml("[auth]\nchain=[\"jwt\"]").unwrap();
        let e = Security::from_config(missing).unwrap_err().to_string();
        assert!(e.contains("[security.auth.jwt] is missing"), "{e}");
        let twice = SecurityConfig::from_toml(
            "[auth]\nchain=[\"jwt\",\"jwt\"]\n[auth.jwt]\nalgorithm=\"HS256\"\nsecret=\"k\"",
        )
        .unwrap();
        assert!(Security::from_config(twice).is_err());
        let default = Security::from_config(SecurityConfig::default()).unwrap();
        assert!(default.chain.is_empty());
        assert!(default.tls.is_none() && default.scram.is_none());
    }
}
