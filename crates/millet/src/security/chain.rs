//! The authentication chain: the providers asked about a CONNECT and the
//! verdict they produce. Owns the provider list ([`AuthChain`]) and the
//! provider adapters over each authenticator (password file, signature,
//! JWT, HTTP hook, TLS certificate); the authenticators' own state (files,
//! keys, caches) lives in their modules. Publish / subscribe authorization
//! is [`super::acl`]'s, with the per-client rules an [`AuthResult::Allow`]
//! carries.
//!
//! Providers are asked in `chain` order: allow → accepted (with the
//! provider's per-client ACL rules); deny → refused; ignore → next. At the
//! end of the chain the listener's [`ListenerPolicy`] decides: anonymous →
//! allow, authenticated → deny. [`AuthChain::authenticate`] uses "anonymous
//! iff no provider is configured".
//!
//! Which providers make up the chain is decided from the configuration by
//! [`super::effective_chain`].

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;

use super::acl::Rule;
use super::http_hook::HttpHook;
use super::jwt::JwtAuth;
use super::passwd::PasswordStore;
use super::posture::ListenerPolicy;
use super::signature::{self, SignatureAuth};
use super::tls::IdentityAs;
use crate::broker::AuthFailure;

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
    /// [`Acl::check`](super::acl::Acl::check) for this connection.
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
    /// Identity of a verified client certificate ([`super::tls::peer_identity`]).
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::security::acl;

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
}
