//! [`Security`]: everything the server and protocol need, built from a
//! [`SecurityConfig`] and in force now. Owns the built chain, the ACL, the
//! ban list and per-user connection counts, the TLS and SCRAM state, and
//! what a CONNECT on a listener is told ([`Security::authenticate`]).
//! Keeping it current when its files change is [`super::refresh`]'s.

use std::net::SocketAddr;
use std::sync::Arc;

use super::acl::Acl;
use super::chain::{
    AuthChain, AuthProvider, AuthResult, ConnectRequest, HttpProvider, JwtProvider,
    PasswordFileProvider, SignatureProvider, TlsCertProvider,
};
use super::config::{effective_chain, ProviderKind, SecurityConfig, SecurityError};
use super::http_hook::HttpHook;
use super::jwt::{self, JwtAuth};
use super::passwd::PasswordStore;
use super::posture::{log_posture, ListenerPolicy};
use super::quota::{self, BanList, BanTarget, ConnectionRateLimiter, UserConnections};
use super::refresh::reloadable_parts;
use super::reload::{file_stamps, FileStamp};
use super::scram::{ScramAuthenticator, ScramStore};
use super::signature::SignatureAuth;
use super::tls::{IdentityAs, ReloadableTls};

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
    pub(super) stamps: parking_lot::Mutex<Vec<Vec<FileStamp>>>,
    /// Bans loaded from `quota.bans_file` (lifted when the file drops them).
    pub(super) file_bans: parking_lot::Mutex<Vec<BanTarget>>,
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
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_configured_provider_is_in_force_without_a_chain() {
        // The fail-open case: [security.auth.password_file] and no chain.
        let f = super::super::empty_passwd_file();
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
    fn scram_alone_requires_authentication_on_loopback() {
        let f = super::super::empty_passwd_file();
        let c = SecurityConfig::from_toml(&format!("[auth.scram]\npath = {:?}", f.path())).unwrap();
        let s = Security::from_config(c).unwrap();
        assert!(s.chain.is_empty() && s.authentication_configured());
        let lo: SocketAddr = "127.0.0.1:1883".parse().unwrap();
        assert_eq!(s.listener_policy(lo), ListenerPolicy::Authenticated);
    }
}
