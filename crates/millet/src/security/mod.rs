//! Security: TLS, authentication providers and their chain, authorization
//! (ACL), quotas and bans. Everything here is self-contained; the protocol
//! and server call in through [`Security`] (built from [`SecurityConfig`]).
//!
//! - [`tls`]: rustls server config from PEM files, mTLS, hot reload,
//!   certificate identity.
//! - [`passwd`]: argon2id password file and the `millet passwd` command.
//! - [`signature`]: per-device / per-product HMAC signatures with a replay
//!   window.
//! - [`jwt`]: HS256 / RS256 / ES256 tokens, claims → ACL rules.
//! - [`http_hook`]: POST to an HTTP service, cached, fail-closed.
//! - [`scram`]: SCRAM-SHA-256 for MQTT 5 enhanced authentication.
//! - [`acl`]: rules, topic matching, reload.
//! - [`quota`]: token buckets, connection rate, per-user connections, bans.
//! - [`reload`]: a file's parsed content, reloaded keeping the old content
//!   on error (password, SCRAM, signature and ACL files).
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
//! # The chain
//! Providers are asked in `chain` order: allow → accepted (with the
//! provider's per-client ACL rules); deny → refused; ignore → next. At the
//! end of the chain the listener's [`ListenerPolicy`] decides: anonymous →
//! allow, authenticated → deny. [`AuthChain::authenticate`] uses "anonymous
//! iff no provider is configured".
//!
//! A configured provider is always in force (never silently anonymous):
//! without `chain`, the chain is every configured provider in the order
//! [`DEFAULT_CHAIN_ORDER`] (`tls_cert` only when `[security.tls]` verifies
//! client certificates and uses them as an identity); with `chain`, a
//! configured provider section the chain leaves out is a start-up error.
//!
//! # Posture
//! Without configuration Millet listens on loopback only and lets anonymous
//! clients in there. A listener on any other address requires
//! authentication unless listed in `security.auth.anonymous_listeners`;
//! once any provider (or SCRAM) is configured, every listener not listed
//! there requires it. See [`ListenerPolicy::for_listener`] and
//! [`posture_report`].

pub mod acl;
pub mod http_hook;
pub mod jwt;
pub mod passwd;
pub mod quota;
pub mod reload;
pub mod scram;
pub mod signature;
pub mod tls;

use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::broker::AuthFailure;
use acl::{Acl, Rule};
use http_hook::{HttpHook, HttpHookConfig};
use jwt::{JwtAuth, JwtConfig};
use passwd::PasswordStore;
use quota::{BanList, BanTarget, ConnectionRateLimiter, QuotaConfig, UserConnections};
use scram::{ScramAuthenticator, ScramStore};
use signature::{SignatureAuth, SignatureConfig};
use tls::{IdentityAs, ReloadableTls, TlsConfig};

/// A provider's answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Accepted, with extra ACL rules for this client (consulted before the
    /// ACL file's).
    Allow {
        acl: Vec<Rule>,
        /// The credentials stop being valid then (unix seconds; a JWT's
        /// `exp`): the connection is closed at that time.
        valid_until: Option<u64>,
    },
    Deny,
    /// Refused for a reason finer than "bad credentials" (an expired JWT,
    /// a failing HTTP hook): counted under that reason in `/metrics`,
    /// otherwise the same as [`Decision::Deny`].
    DenyFor(AuthFailure),
    /// Not this provider's business: ask the next.
    Ignore,
}

impl Decision {
    /// Allow without extra rules.
    pub fn allow() -> Decision {
        Decision::Allow {
            acl: Vec::new(),
            valid_until: None,
        }
    }

    /// [`Decision::DenyFor`] as a plain [`Decision::Deny`].
    pub fn plain(self) -> Decision {
        match self {
            Decision::DenyFor(_) => Decision::Deny,
            d => d,
        }
    }
}

/// The chain's answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AuthResult {
    /// Accepted; `acl` holds the per-client rules to pass to every
    /// [`Acl::check`] for this connection.
    Allow {
        acl: Vec<Rule>,
        /// See [`Decision::Allow`].
        valid_until: Option<u64>,
    },
    /// Refused: CONNACK 0x86 / 0x87 (v5) or 4 / 5 (v3.1.1); the reason
    /// for the metrics when finer than the CONNACK's (`None`: a provider
    /// refused the credentials).
    Deny(Option<AuthFailure>),
}

/// What the chain knows about a CONNECT.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConnectRequest {
    pub client_id: String,
    pub username: Option<String>,
    pub password: Option<Vec<u8>>,
    pub peer: SocketAddr,
    /// Protocol level: 3 (3.1), 4 (3.1.1) or 5.
    pub protocol: u8,
    /// Identity of a verified client certificate ([`tls::peer_identity`]).
    pub tls_identity: Option<String>,
}

impl ConnectRequest {
    /// Replace the username or client id with the certificate identity (per
    /// `tls.identity_as`). Call before [`AuthChain::authenticate`], and use
    /// the resulting names for the session.
    pub fn apply_tls_identity(&mut self, how: IdentityAs) {
        let Some(id) = self.tls_identity.clone() else {
            return;
        };
        match how {
            IdentityAs::None => {}
            IdentityAs::Username => self.username = Some(id),
            IdentityAs::ClientId => self.client_id = id,
        }
    }
}

/// A boxed, sendable future.
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// An authentication provider in the chain.
pub trait AuthProvider: Send + Sync {
    /// Name for logs (`password_file`, `jwt`, ...).
    fn name(&self) -> &'static str;
    /// Decide on one CONNECT.
    fn authenticate<'a>(&'a self, req: &'a ConnectRequest) -> BoxFuture<'a, Decision>;
    /// Re-read files; on error the old state stays in force.
    fn reload(&self) -> Result<(), String> {
        Ok(())
    }
}

/// Argon2 password file (verification on a blocking thread).
pub struct PasswordFileProvider(pub Arc<PasswordStore>);

impl AuthProvider for PasswordFileProvider {
    fn name(&self) -> &'static str {
        "password_file"
    }
    fn authenticate<'a>(&'a self, req: &'a ConnectRequest) -> BoxFuture<'a, Decision> {
        let store = self.0.clone();
        let user = req.username.clone();
        let pw = req.password.clone();
        Box::pin(async move {
            if user.is_none() || pw.is_none() {
                return Decision::Ignore;
            }
            tokio::task::spawn_blocking(move || store.check(user.as_deref(), pw.as_deref()))
                .await
                .unwrap_or(Decision::Deny)
        })
    }
    fn reload(&self) -> Result<(), String> {
        self.0.reload().map_err(|e| e.to_string())
    }
}

/// Device signatures (clock: the system's).
pub struct SignatureProvider(pub Arc<SignatureAuth>);

impl AuthProvider for SignatureProvider {
    fn name(&self) -> &'static str {
        "signature"
    }
    fn authenticate<'a>(&'a self, req: &'a ConnectRequest) -> BoxFuture<'a, Decision> {
        Box::pin(async move {
            self.0.check(
                &req.client_id,
                req.username.as_deref(),
                req.password.as_deref(),
                signature::unix_now_ms(),
            )
        })
    }
    fn reload(&self) -> Result<(), String> {
        self.0.reload().map_err(|e| e.to_string())
    }
}

/// JWT in the password.
pub struct JwtProvider(pub Arc<JwtAuth>);

impl AuthProvider for JwtProvider {
    fn name(&self) -> &'static str {
        "jwt"
    }
    fn authenticate<'a>(&'a self, req: &'a ConnectRequest) -> BoxFuture<'a, Decision> {
        Box::pin(async move {
            self.0.check_why(
                &req.client_id,
                req.username.as_deref(),
                req.password.as_deref(),
                signature::unix_now_ms() / 1000,
            )
        })
    }
    fn reload(&self) -> Result<(), String> {
        self.0.reload().map_err(|e| e.to_string())
    }
}

/// HTTP hook.
pub struct HttpProvider(pub Arc<HttpHook>);

impl AuthProvider for HttpProvider {
    fn name(&self) -> &'static str {
        "http"
    }
    fn authenticate<'a>(&'a self, req: &'a ConnectRequest) -> BoxFuture<'a, Decision> {
        Box::pin(self.0.check_why(
            &req.client_id,
            req.username.as_deref(),
            req.password.as_deref(),
            req.peer,
            req.protocol,
        ))
    }
    fn reload(&self) -> Result<(), String> {
        self.0.clear_cache();
        Ok(())
    }
}

/// A verified client certificate authenticates the client (allow when the
/// TLS layer verified one, ignore otherwise).
pub struct TlsCertProvider;

impl AuthProvider for TlsCertProvider {
    fn name(&self) -> &'static str {
        "tls_cert"
    }
    fn authenticate<'a>(&'a self, req: &'a ConnectRequest) -> BoxFuture<'a, Decision> {
        let d = if req.tls_identity.is_some() {
            Decision::allow()
        } else {
            Decision::Ignore
        };
        Box::pin(std::future::ready(d))
    }
}

/// What happens at the end of the chain on one listener.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ListenerPolicy {
    /// Clients no provider decided on are let in.
    Anonymous,
    /// Clients no provider accepted are refused.
    Authenticated,
}

impl ListenerPolicy {
    /// The posture rule: explicitly anonymous listeners are anonymous; a
    /// loopback listener is anonymous while no provider is configured;
    /// anything else requires authentication.
    pub fn for_listener(
        addr: SocketAddr,
        marked_anonymous: bool,
        providers_configured: bool,
    ) -> ListenerPolicy {
        if marked_anonymous || (!providers_configured && addr.ip().is_loopback()) {
            ListenerPolicy::Anonymous
        } else {
            ListenerPolicy::Authenticated
        }
    }
}

/// Start-up log lines describing each listener's posture: `(is_warning, line)`.
pub fn posture_report(
    listeners: &[(SocketAddr, bool)],
    providers: &[&'static str],
) -> Vec<(bool, String)> {
    listeners
        .iter()
        .map(|&(addr, marked)| {
            match ListenerPolicy::for_listener(addr, marked, !providers.is_empty()) {
                ListenerPolicy::Anonymous if marked => (
                    !addr.ip().is_loopback(),
                    format!("listener {addr}: anonymous clients allowed (explicitly marked anonymous)"),
                ),
                ListenerPolicy::Anonymous => (
                    false,
                    format!("listener {addr}: anonymous clients allowed (loopback, no authentication configured)"),
                ),
                ListenerPolicy::Authenticated if providers.is_empty() => (
                    true,
                    format!("listener {addr}: authentication required but no provider is configured: every client will be refused (configure a provider under [security.auth], or list the listener in security.auth.anonymous_listeners)"),
                ),
                ListenerPolicy::Authenticated => (
                    false,
                    format!("listener {addr}: authentication required (chain: {})", providers.join(", ")),
                ),
            }
        })
        .collect()
}

/// Log [`posture_report`] at info / warn.
pub fn log_posture(listeners: &[(SocketAddr, bool)], providers: &[&'static str]) {
    for (warn, line) in posture_report(listeners, providers) {
        if warn {
            tracing::warn!("{line}");
        } else {
            tracing::info!("{line}");
        }
    }
}

/// The ordered provider chain.
#[derive(Default)]
pub struct AuthChain {
    providers: Vec<Arc<dyn AuthProvider>>,
}

impl std::fmt::Debug for AuthChain {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list().entries(self.names()).finish()
    }
}

impl AuthChain {
    pub fn new(providers: Vec<Arc<dyn AuthProvider>>) -> AuthChain {
        AuthChain { providers }
    }

    pub fn push(&mut self, p: Arc<dyn AuthProvider>) {
        self.providers.push(p);
    }

    pub fn is_empty(&self) -> bool {
        self.providers.is_empty()
    }

    pub fn names(&self) -> Vec<&'static str> {
        self.providers.iter().map(|p| p.name()).collect()
    }

    /// Ask the chain; end of chain → deny if any provider is configured,
    /// allow ("anonymous") if none.
    pub async fn authenticate(&self, req: &ConnectRequest) -> AuthResult {
        let policy = if self.providers.is_empty() {
            ListenerPolicy::Anonymous
        } else {
            ListenerPolicy::Authenticated
        };
        self.authenticate_with(req, policy).await
    }

    /// Ask the chain with an explicit end-of-chain policy.
    pub async fn authenticate_with(
        &self,
        req: &ConnectRequest,
        policy: ListenerPolicy,
    ) -> AuthResult {
        for p in &self.providers {
            match p.authenticate(req).await {
                Decision::Allow { acl, valid_until } => {
                    tracing::debug!(client_id = %req.client_id, provider = p.name(), "authenticated");
                    return AuthResult::Allow { acl, valid_until };
                }
                d @ (Decision::Deny | Decision::DenyFor(_)) => {
                    let why = match d {
                        Decision::DenyFor(why) => Some(why),
                        _ => None,
                    };
                    tracing::info!(client_id = %req.client_id, username = req.username.as_deref().unwrap_or(""), peer = %req.peer, protocol = req.protocol, provider = p.name(), reason = why.map_or("refused", AuthFailure::label), "authentication refused");
                    return AuthResult::Deny(why);
                }
                Decision::Ignore => {}
            }
        }
        match policy {
            ListenerPolicy::Anonymous => AuthResult::Allow {
                acl: Vec::new(),
                valid_until: None,
            },
            ListenerPolicy::Authenticated => {
                tracing::info!(client_id = %req.client_id, username = req.username.as_deref().unwrap_or(""), peer = %req.peer, protocol = req.protocol, "authentication refused: no provider accepted the client");
                AuthResult::Deny(Some(AuthFailure::NotAuthorized))
            }
        }
    }

    /// Reload the provider named `name` (absent: nothing to do).
    pub fn reload_one(&self, name: &str) -> Result<(), String> {
        match self.providers.iter().find(|p| p.name() == name) {
            Some(p) => p.reload(),
            None => Ok(()),
        }
    }

    /// Reload every provider; returns the errors (`provider: error`).
    pub fn reload(&self) -> Vec<String> {
        self.providers
            .iter()
            .filter_map(|p| p.reload().err().map(|e| format!("{}: {e}", p.name())))
            .collect()
    }
}

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

/// Errors building [`Security`].
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

/// Everything the server and protocol need, built from [`SecurityConfig`].
pub struct Security {
    pub config: SecurityConfig,
    pub chain: AuthChain,
    pub acl: Arc<Acl>,
    pub bans: Arc<BanList>,
    pub user_connections: Arc<UserConnections>,
    /// `Some` when `[security.tls]` is configured.
    pub tls: Option<Arc<ReloadableTls>>,
    /// `Some` when `[security.auth.scram]` is configured: the broker's
    /// [`crate::auth::Authenticator`].
    pub scram: Option<Arc<ScramAuthenticator>>,
    /// Modification stamps of each [`reloadable_parts`] entry's files at
    /// its last (attempted) load.
    stamps: parking_lot::Mutex<Vec<Vec<FileStamp>>>,
    /// Bans loaded from `quota.bans_file` (lifted when the file drops them).
    file_bans: parking_lot::Mutex<Vec<BanTarget>>,
}

type FileStamp = Option<(std::time::SystemTime, u64)>;

fn file_stamps(paths: &[PathBuf]) -> Vec<FileStamp> {
    paths
        .iter()
        .map(|p| {
            std::fs::metadata(p)
                .ok()
                .and_then(|m| Some((m.modified().ok()?, m.len())))
        })
        .collect()
}

impl std::fmt::Debug for Security {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Security")
            .field("chain", &self.chain)
            .field("tls", &self.tls.is_some())
            .field("scram", &self.scram.is_some())
            .finish_non_exhaustive()
    }
}

impl Security {
    /// Load every file and build the providers. Must run inside a tokio
    /// runtime only for [`ReloadableTls`]' spawn helpers (not here).
    pub fn from_config(config: SecurityConfig) -> Result<Security, SecurityError> {
        let a = &config.auth;
        let kinds = effective_chain(&config)?;
        let mut chain = AuthChain::default();
        for kind in &kinds {
            let missing = |s: &str| {
                SecurityError::Config(format!(
                    "security.auth.chain names \"{s}\" but [security.auth.{s}] is missing"
                ))
            };
            let p: Arc<dyn AuthProvider> = match kind {
                ProviderKind::PasswordFile => {
                    let c = a
                        .password_file
                        .as_ref()
                        .ok_or_else(|| missing("password_file"))?;
                    Arc::new(PasswordFileProvider(Arc::new(PasswordStore::from_file(
                        &c.path,
                    )?)))
                }
                ProviderKind::Signature => {
                    let c = a.signature.clone().ok_or_else(|| missing("signature"))?;
                    Arc::new(SignatureProvider(Arc::new(SignatureAuth::from_config(c)?)))
                }
                ProviderKind::Jwt => {
                    let c = a.jwt.clone().ok_or_else(|| missing("jwt"))?;
                    if c.bind == jwt::JwtBind::None {
                        tracing::warn!(
                            "[security.auth.jwt] bind = \"none\": a client with any valid token \
                             may present any username or client id and gets that name's ACL rules; \
                             use bind = \"username\" (the default) or \"client_id\" unless every \
                             token carries its own publish / subscribe claims"
                        );
                    }
                    Arc::new(JwtProvider(Arc::new(JwtAuth::new(c)?)))
                }
                ProviderKind::Http => {
                    let c = a.http.clone().ok_or_else(|| missing("http"))?;
                    Arc::new(HttpProvider(Arc::new(HttpHook::new(c)?)))
                }
                ProviderKind::TlsCert => {
                    if config.tls.as_ref().and_then(|t| t.ca.as_ref()).is_none() {
                        return Err(SecurityError::Config(
                            "security.auth.chain names \"tls_cert\" but [security.tls] has no ca \
                             (client certificates are not verified)"
                                .into(),
                        ));
                    }
                    Arc::new(TlsCertProvider)
                }
            };
            chain.push(p);
        }
        if let Some(t) = &config.tls {
            if t.ca.is_none() && t.identity_as != IdentityAs::None {
                return Err(SecurityError::Config(
                    "[security.tls] identity_as needs ca: without it client certificates \
                     are not verified"
                        .into(),
                ));
            }
        }
        let acl = match &config.acl.file {
            Some(f) => Acl::from_file(f)?,
            None => Acl::default(),
        };
        let bans = BanList::new();
        let now = std::time::Instant::now();
        for b in &config.quota.bans {
            let t: BanTarget = b.parse().map_err(SecurityError::Config)?;
            bans.ban(t, None, now);
        }
        let tls = match &config.tls {
            Some(t) => Some(Arc::new(ReloadableTls::new(t.clone())?)),
            None => None,
        };
        let scram = match &a.scram {
            Some(s) => Some(Arc::new(ScramAuthenticator::new(Arc::new(
                ScramStore::from_file(&s.path)?,
            )))),
            None => None,
        };
        let stamps = parking_lot::Mutex::new(
            reloadable_parts(&config)
                .iter()
                .map(|(_, f)| file_stamps(f))
                .collect(),
        );
        let file_bans = match &config.quota.bans_file {
            Some(f) => {
                let text = std::fs::read_to_string(f).map_err(|e| {
                    SecurityError::Config(format!("cannot read {}: {e}", f.display()))
                })?;
                let list = quota::parse_ban_file(&text)
                    .map_err(|e| SecurityError::Config(format!("{}: {e}", f.display())))?;
                list.into_iter()
                    .map(|(t, d)| {
                        bans.ban(t.clone(), d, now);
                        t
                    })
                    .collect()
            }
            None => Vec::new(),
        };
        Ok(Security {
            stamps,
            file_bans: parking_lot::Mutex::new(file_bans),
            user_connections: Arc::new(UserConnections::new(config.quota.max_connections_per_user)),
            config,
            chain,
            acl: Arc::new(acl),
            bans: Arc::new(bans),
            tls,
            scram,
        })
    }

    /// The end-of-chain policy for a listener.
    pub fn listener_policy(&self, addr: SocketAddr) -> ListenerPolicy {
        ListenerPolicy::for_listener(
            addr,
            self.config.auth.anonymous_listeners.contains(&addr),
            self.authentication_configured(),
        )
    }

    /// Some way to authenticate is configured: a provider in the chain, or
    /// SCRAM over MQTT 5 AUTH.
    pub fn authentication_configured(&self) -> bool {
        !self.chain.is_empty() || self.scram.is_some()
    }

    /// What authenticates clients, for the posture log: the chain's
    /// providers, then `scram` when configured.
    pub fn provider_names(&self) -> Vec<&'static str> {
        let mut v = self.chain.names();
        if self.scram.is_some() {
            v.push("scram (MQTT 5 AUTH)");
        }
        v
    }

    /// Authenticate a CONNECT received on `listener` (applies the TLS
    /// identity per `tls.identity_as` first; the possibly rewritten request
    /// is returned with the result).
    pub async fn authenticate(
        &self,
        mut req: ConnectRequest,
        listener: SocketAddr,
    ) -> (ConnectRequest, AuthResult) {
        if let Some(t) = &self.config.tls {
            req.apply_tls_identity(t.identity_as);
        }
        let r = self
            .chain
            .authenticate_with(&req, self.listener_policy(listener))
            .await;
        (req, r)
    }

    /// A new-connection rate limiter for one listener.
    pub fn connection_rate_limiter(&self) -> ConnectionRateLimiter {
        ConnectionRateLimiter::new(
            self.config.quota.connections_per_sec,
            self.config.quota.connections_burst,
            std::time::Instant::now(),
        )
    }

    /// Log each listener's posture.
    pub fn log_posture(&self, listeners: &[SocketAddr]) {
        let l: Vec<(SocketAddr, bool)> = listeners
            .iter()
            .map(|a| (*a, self.config.auth.anonymous_listeners.contains(a)))
            .collect();
        log_posture(&l, &self.provider_names());
    }

    /// The files this configuration reads (ACL, password, SCRAM, signature
    /// secrets, JWT keys, TLS certificate / key / CA).
    pub fn watched_files(&self) -> Vec<PathBuf> {
        watched_files(&self.config)
    }

    /// Reload the parts whose files' modification time or size changed
    /// since the last (attempted) load, and log one line saying what was
    /// reloaded. Returns the errors (each names its part and file), or
    /// `None` when nothing changed.
    pub fn reload_if_changed(&self) -> Option<Vec<String>> {
        let parts = reloadable_parts(&self.config);
        let now: Vec<Vec<FileStamp>> = parts.iter().map(|(_, f)| file_stamps(f)).collect();
        let changed: Vec<&'static str> = {
            let mut old = self.stamps.lock();
            let changed = parts
                .iter()
                .zip(&now)
                .enumerate()
                .filter(|(i, (_, stamp))| old.get(*i) != Some(*stamp))
                .map(|(_, ((name, _), _))| *name)
                .collect();
            *old = now;
            changed
        };
        if changed.is_empty() {
            return None;
        }
        Some(self.reload_parts(&changed, "files changed"))
    }

    /// Reload every file (providers, ACL, TLS, SCRAM, bans); the old state
    /// stays for each part that fails. Logs one line; returns the errors.
    pub fn reload(&self) -> Vec<String> {
        self.reload_from("SIGHUP")
    }

    /// [`Security::reload`], logged as triggered by `trigger` (`SIGHUP`,
    /// `admin API`).
    pub fn reload_from(&self, trigger: &str) -> Vec<String> {
        let parts = reloadable_parts(&self.config);
        *self.stamps.lock() = parts.iter().map(|(_, f)| file_stamps(f)).collect();
        let names: Vec<&'static str> = parts.iter().map(|(n, _)| *n).collect();
        self.reload_parts(&names, trigger)
    }

    fn reload_parts(&self, names: &[&'static str], trigger: &str) -> Vec<String> {
        let mut done = Vec::new();
        let mut errs = Vec::new();
        for &name in names {
            match self.reload_part(name) {
                Ok(what) => done.push(what),
                Err(e) => errs.push(format!("{name}: {e}")),
            }
        }
        if !done.is_empty() {
            tracing::info!("security reload ({trigger}): {}", done.join("; "));
        }
        errs
    }

    /// Reload one part; `Ok` describes what is now in force.
    fn reload_part(&self, name: &'static str) -> Result<String, String> {
        let c = &self.config;
        match name {
            "acl" => {
                let n = self.acl.reload().map_err(|e| e.to_string())?;
                let path = c.acl.file.as_deref().unwrap_or(std::path::Path::new(""));
                Ok(format!("acl {} ({n} rules)", path.display()))
            }
            "bans_file" => {
                let n = self.reload_ban_file()?;
                Ok(format!("bans_file ({n} bans)"))
            }
            "tls" => match &self.tls {
                Some(t) => {
                    t.reload().map_err(|e| e.to_string())?;
                    Ok(format!("tls {}", t.config().cert.display()))
                }
                None => Ok("tls".into()),
            },
            "scram" => match &self.scram {
                Some(sc) => {
                    sc.store().reload().map_err(|e| e.to_string())?;
                    Ok("scram".into())
                }
                None => Ok("scram".into()),
            },
            provider => {
                self.chain.reload_one(provider)?;
                Ok(provider.to_string())
            }
        }
    }

    /// Re-read `quota.bans_file`: its bans replace the ones it gave before
    /// (bans from `quota.bans` stay). On error nothing changes.
    fn reload_ban_file(&self) -> Result<usize, String> {
        let Some(f) = &self.config.quota.bans_file else {
            return Ok(0);
        };
        let text =
            std::fs::read_to_string(f).map_err(|e| format!("cannot read {}: {e}", f.display()))?;
        let list = quota::parse_ban_file(&text)?;
        let now = std::time::Instant::now();
        let mut old = self.file_bans.lock();
        for t in old.drain(..) {
            self.bans.unban(&t);
        }
        for (t, d) in list {
            self.bans.ban(t.clone(), d, now);
            old.push(t);
        }
        Ok(old.len())
    }
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

/// The parts that can be reloaded, each with the files it reads (the
/// provider names are those of the chain).
fn reloadable_parts(c: &SecurityConfig) -> Vec<(&'static str, Vec<PathBuf>)> {
    let a = &c.auth;
    let mut v: Vec<(&'static str, Vec<PathBuf>)> = Vec::new();
    if let Some(f) = &c.acl.file {
        v.push(("acl", vec![f.clone()]));
    }
    if let Some(f) = &c.quota.bans_file {
        v.push(("bans_file", vec![f.clone()]));
    }
    if let Some(p) = &a.password_file {
        v.push(("password_file", vec![p.path.clone()]));
    }
    if let Some(p) = &a.scram {
        v.push(("scram", vec![p.path.clone()]));
    }
    if let Some(p) = &a.signature {
        v.push(("signature", vec![p.secrets.clone()]));
    }
    if let Some(j) = &a.jwt {
        let files: Vec<PathBuf> = [&j.secret_file, &j.public_key, &j.jwks]
            .into_iter()
            .flatten()
            .cloned()
            .collect();
        v.push(("jwt", files));
    }
    if a.http.is_some() {
        v.push(("http", Vec::new())); // no file: SIGHUP clears its cache
    }
    if let Some(t) = &c.tls {
        let mut files = vec![t.cert.clone(), t.key.clone()];
        files.extend(t.ca.clone());
        v.push(("tls", files));
    }
    v
}

fn watched_files(c: &SecurityConfig) -> Vec<PathBuf> {
    let a = &c.auth;
    let mut v: Vec<PathBuf> = Vec::new();
    v.extend(c.acl.file.clone());
    v.extend(c.quota.bans_file.clone());
    v.extend(a.password_file.as_ref().map(|p| p.path.clone()));
    v.extend(a.scram.as_ref().map(|p| p.path.clone()));
    v.extend(a.signature.as_ref().map(|p| p.secrets.clone()));
    if let Some(j) = &a.jwt {
        v.extend(j.secret_file.clone());
        v.extend(j.public_key.clone());
        v.extend(j.jwks.clone());
    }
    if let Some(t) = &c.tls {
        v.push(t.cert.clone());
        v.push(t.key.clone());
        v.extend(t.ca.clone());
    }
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Fixed(&'static str, Decision);
    impl AuthProvider for Fixed {
        fn name(&self) -> &'static str {
            self.0
        }
        fn authenticate<'a>(&'a self, _: &'a ConnectRequest) -> BoxFuture<'a, Decision> {
            Box::pin(std::future::ready(self.1.clone()))
        }
    }

    fn req() -> ConnectRequest {
        ConnectRequest {
            client_id: "c".into(),
            username: Some("u".into()),
            password: Some(b"p".to_vec()),
            peer: "127.0.0.1:40000".parse().unwrap(),
            protocol: 5,
            tls_identity: None,
        }
    }

    fn p(name: &'static str, d: Decision) -> Arc<dyn AuthProvider> {
        Arc::new(Fixed(name, d))
    }

    #[tokio::test]
    async fn chain_order_and_end_of_chain() {
        let empty = AuthChain::default();
        assert_eq!(
            empty.authenticate(&req()).await,
            AuthResult::Allow {
                acl: vec![],
                valid_until: None
            }
        );
        let rules = vec![Rule::allow(acl::Action::All, vec!["x".into()])];
        let chain = AuthChain::new(vec![
            p("a", Decision::Ignore),
            p(
                "b",
                Decision::Allow {
                    acl: rules.clone(),
                    valid_until: None,
                },
            ),
            p("c", Decision::Deny),
        ]);
        assert_eq!(
            chain.authenticate(&req()).await,
            AuthResult::Allow {
                acl: rules,
                valid_until: None
            }
        );
        let chain = AuthChain::new(vec![p("a", Decision::Deny), p("b", Decision::allow())]);
        assert!(matches!(
            chain.authenticate(&req()).await,
            AuthResult::Deny(_)
        ));
        let chain = AuthChain::new(vec![p("a", Decision::Ignore)]);
        assert!(matches!(
            chain.authenticate(&req()).await,
            AuthResult::Deny(_)
        ));
        assert_eq!(
            chain
                .authenticate_with(&req(), ListenerPolicy::Anonymous)
                .await,
            AuthResult::Allow {
                acl: vec![],
                valid_until: None
            }
        );
    }

    #[test]
    fn posture() {
        let lo: SocketAddr = "127.0.0.1:1883".parse().unwrap();
        let any: SocketAddr = "0.0.0.0:1883".parse().unwrap();
        let v6lo: SocketAddr = "[::1]:1883".parse().unwrap();
        use ListenerPolicy::*;
        assert_eq!(ListenerPolicy::for_listener(lo, false, false), Anonymous);
        assert_eq!(ListenerPolicy::for_listener(v6lo, false, false), Anonymous);
        assert_eq!(ListenerPolicy::for_listener(lo, false, true), Authenticated);
        assert_eq!(
            ListenerPolicy::for_listener(any, false, false),
            Authenticated
        );
        assert_eq!(ListenerPolicy::for_listener(any, true, true), Anonymous);
        let r = posture_report(&[(lo, false), (any, false)], &[]);
        assert!(!r[0].0 && r[0].1.contains("anonymous"));
        assert!(r[1].0 && r[1].1.contains("every client will be refused"));
        let r = posture_report(&[(any, false)], &["jwt"]);
        assert!(!r[0].0 && r[0].1.contains("chain: jwt"));
    }

    #[test]
    fn tls_identity_rewrites_fields() {
        let mut r = req();
        r.apply_tls_identity(IdentityAs::Username);
        assert_eq!(r.username.as_deref(), Some("u"));
        r.tls_identity = Some("dev-1".into());
        r.apply_tls_identity(IdentityAs::Username);
        assert_eq!(r.username.as_deref(), Some("dev-1"));
        r.apply_tls_identity(IdentityAs::ClientId);
        assert_eq!(r.client_id, "dev-1");
    }

    fn passwd_file() -> tempfile::NamedTempFile {
        let f = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(f.path(), "").unwrap();
        f
    }

    #[test]
    fn a_configured_provider_is_in_force_without_a_chain() {
        // The fail-open case: [security.auth.password_file] and no chain.
        let f = passwd_file();
        let c = SecurityConfig::from_toml(&format!(
            "[auth.password_file]\npath = {:?}\n[auth.jwt]\nalgorithm = \"HS256\"\nsecret = \"k\"",
            f.path()
        ))
        .unwrap();
        let s = Security::from_config(c).unwrap();
        assert_eq!(s.chain.names(), vec!["password_file", "jwt"]);
        assert!(s.authentication_configured());
        let lo: SocketAddr = "127.0.0.1:1883".parse().unwrap();
        assert_eq!(s.listener_policy(lo), ListenerPolicy::Authenticated);
    }

    #[test]
    fn a_configured_provider_left_out_of_the_chain_is_an_error() {
        let f = passwd_file();
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
    fn scram_alone_requires_authentication_on_loopback() {
        let f = passwd_file();
        let c = SecurityConfig::from_toml(&format!("[auth.scram]\npath = {:?}", f.path())).unwrap();
        let s = Security::from_config(c).unwrap();
        assert!(s.chain.is_empty() && s.authentication_configured());
        let lo: SocketAddr = "127.0.0.1:1883".parse().unwrap();
        assert_eq!(s.listener_policy(lo), ListenerPolicy::Authenticated);
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
