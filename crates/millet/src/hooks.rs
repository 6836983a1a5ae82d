//! The hooks seam: what decides on a connection's actions (authorization)
//! and what observes them (events), beside the engine seam
//! ([`crate::engine`]).
//!
//! Authentication is the first hook: a CONNECT becomes
//! [`crate::engine::Request::Authenticate`], which the driver answers from
//! its `[security]` chain, at once or later. Authorization of every PUBLISH,
//! SUBSCRIBE filter and will topic comes here:
//! - [`Hooks::authorize_now`] answers in place when it can (the in-process
//!   ACL always can: no allocation, no wait), or says [`Authorization::Ask`];
//! - then the protocol states [`crate::engine::Request::Authorize`], waits
//!   in a pending state holding the client's later packets in order (as for
//!   the engine's calls), and [`Hooks::authorize`] answers now or later
//!   ([`Completion::Authorized`]): an HTTP or JWKS lookup never blocks a
//!   worker.
//!
//! Events ([`Event`]) are told to [`Hooks::event`] after the fact: the
//! connection was accepted, a message was published (after authorization,
//! as routed), a filter was subscribed or unsubscribed, a message was
//! delivered, the connection closed. They are where the rules engine and
//! thing models attach next. An observer is called on the connection's
//! worker, sometimes under its session's lock: it must not block and must
//! not call back into the broker (it queues what it does). A hooks value
//! that observes nothing says so ([`Hooks::observes`]) and costs nothing.
//!
//! Implementations:
//! - [`crate::broker::Broker`]: the `[security.acl]` rules (per-client rules
//!   from the authentication first), everything allowed without a security
//!   layer; observes nothing.
//! - [`crate::security::http_authz::HttpAuthz`]: an HTTP service
//!   (`[security.acl.http]`), its answers cached and given in place, the
//!   rest asked by a task while the connection waits.
//! - [`crate::engine::delaying::DelayingHooks`]: for tests, sends some of the
//!   authorizations through the pending path, answered after a random
//!   delay (`[engine] test_delay_ms`).

use std::sync::Arc;
use std::time::Instant;

use bytestring::ByteString;
use millet_codec::QoS;

use crate::engine::{Call, Completion};
use crate::protocol::Close;
use crate::security::acl::{Access, Rule};
use crate::session::{ConnWaker, Message};

/// Who asks, for an authorization: the client id, the effective username
/// (the authentication's), and the per-client rules the authentication gave
/// (JWT claims, HTTP hook), consulted before the ACL's.
#[derive(Debug, Clone, Copy)]
pub struct Client<'a> {
    pub client_id: &'a str,
    pub username: Option<&'a str>,
    pub rules: &'a [Rule],
}

/// The answer of [`Hooks::authorize_now`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Authorization {
    Allow,
    Deny,
    /// Not known without a wait: the protocol asks [`Hooks::authorize`].
    Ask,
}

impl From<bool> for Authorization {
    fn from(allowed: bool) -> Authorization {
        if allowed {
            Authorization::Allow
        } else {
            Authorization::Deny
        }
    }
}

/// Authorizations [`Hooks::authorize_now`] could not answer in place, for
/// [`Hooks::authorize`]: one client, one kind of access, the topics (a
/// PUBLISH's or will's topic name, or a SUBSCRIBE's filters, in order).
#[derive(Debug, Clone)]
pub struct AuthorizeRequest {
    pub client_id: ByteString,
    pub username: Option<ByteString>,
    /// The per-client rules from the authentication (see [`Client`]).
    pub rules: Vec<Rule>,
    pub access: Access,
    pub topics: Vec<ByteString>,
}

impl AuthorizeRequest {
    pub fn client(&self) -> Client<'_> {
        Client {
            client_id: &self.client_id,
            username: self.username.as_deref(),
            rules: &self.rules,
        }
    }
}

/// What happened on a connection, for observers ([`Hooks::event`]).
#[derive(Debug, Clone, Copy)]
pub enum Event<'a> {
    /// CONNACK 0x00 was queued: the client is connected, its session
    /// attached.
    Connected {
        client_id: &'a str,
        username: Option<&'a str>,
        session_present: bool,
    },
    /// An authorized PUBLISH was routed to `sessions` sessions.
    Published {
        client_id: &'a str,
        msg: &'a Message,
        sessions: usize,
    },
    /// A filter was granted at `qos`.
    Subscribed {
        client_id: &'a str,
        filter: &'a str,
        qos: QoS,
    },
    /// A filter was removed (`existed`: it was subscribed).
    Unsubscribed {
        client_id: &'a str,
        filter: &'a str,
        existed: bool,
    },
    /// A PUBLISH was written to the client, at `qos` (a resend of an
    /// unacknowledged one is not told again).
    Delivered {
        client_id: &'a str,
        msg: &'a Message,
        qos: QoS,
    },
    /// The connection closed: how, as decided by either side (a DISCONNECT
    /// from the client, a protocol error, a takeover...), or `None` when
    /// the network connection was lost.
    Disconnected {
        client_id: &'a str,
        close: Option<&'a Close>,
    },
}

/// What decides on and observes a connection's actions (module doc).
pub trait Hooks: Send + Sync + 'static {
    /// May `client` do `access` on `topic` (a topic name to publish to, or
    /// a filter to subscribe to)? Answered in place, or
    /// [`Authorization::Ask`]: the protocol then waits for
    /// [`Hooks::authorize`]. Called on the connection's worker for every
    /// PUBLISH: it must not block.
    fn authorize_now(&self, client: &Client<'_>, access: Access, topic: &str) -> Authorization;

    /// The authorizations `authorize_now` asked for: answers
    /// [`Completion::Authorized`], one verdict per topic of `req` in order,
    /// at once ([`Call::Ready`]) or later (filling a
    /// [`crate::engine::Reply`] made for `reply_to`). A hook that cannot
    /// decide (its service down, a timeout) denies: fail closed.
    fn authorize(&self, req: AuthorizeRequest, reply_to: &Arc<ConnWaker>, now: Instant) -> Call;

    /// Whether [`Hooks::event`] wants to be told (asked once per server:
    /// the protocol builds no event for hooks that observe nothing).
    fn observes(&self) -> bool {
        false
    }

    /// Told what happened (see [`Event`] and the module doc: must not
    /// block nor call back into the broker).
    fn event(&self, _event: &Event<'_>) {}
}

/// The answers to `req` from a synchronous check, for [`Hooks::authorize`]
/// of hooks that can always answer in place.
pub fn authorize_each(
    req: &AuthorizeRequest,
    mut check: impl FnMut(&Client<'_>, Access, &str) -> bool,
) -> Call {
    let client = req.client();
    let verdicts = req
        .topics
        .iter()
        .map(|t| check(&client, req.access, t))
        .collect();
    Call::Ready(Completion::Authorized(verdicts))
}

/// The in-process ACL: `[security.acl]`, after the client's own rules;
/// everything allowed without a security layer.
impl Hooks for crate::broker::Broker {
    fn authorize_now(&self, client: &Client<'_>, access: Access, topic: &str) -> Authorization {
        self.acl_allows(client, access, topic).into()
    }

    fn authorize(&self, req: AuthorizeRequest, _reply_to: &Arc<ConnWaker>, _now: Instant) -> Call {
        authorize_each(&req, |c, access, t| self.acl_allows(c, access, t))
    }
}

impl crate::broker::Broker {
    /// The ACL's answer (everything is allowed without a security layer).
    pub fn acl_allows(&self, client: &Client<'_>, access: Access, topic: &str) -> bool {
        self.node.security().is_none_or(|s| {
            s.acl.check(
                client.client_id,
                client.username,
                client.rules,
                access,
                topic,
            )
        })
    }
}

/// The hooks a server runs with: the HTTP authorization hook when
/// `[security.acl.http]` is set, else the broker's ACL; wrapped in the test
/// delay when `[engine] test_delay_ms` is set (some authorizations then
/// take the pending path).
pub fn from_config(
    broker: &Arc<crate::broker::Broker>,
) -> Result<Arc<dyn Hooks>, crate::security::http_authz::HttpAuthzError> {
    let http = broker
        .node
        .security()
        .and_then(|s| s.config.acl.http.clone());
    let hooks: Arc<dyn Hooks> = match http {
        Some(cfg) => {
            tracing::info!(url = %cfg.url, cache_ttl_secs = cfg.cache_ttl_secs, "authorization asks an HTTP service ([security.acl.http])");
            Arc::new(crate::security::http_authz::HttpAuthz::new(
                cfg,
                broker.clone(),
            )?)
        }
        None => broker.clone(),
    };
    let cfg = &broker.node.config.engine;
    if cfg.test_delay_ms == 0 {
        return Ok(hooks);
    }
    Ok(Arc::new(crate::engine::delaying::DelayingHooks::new(
        hooks,
        std::time::Duration::from_millis(cfg.test_delay_ms),
        cfg.test_delay_seed ^ 0x9e37_79b9_7f4a_7c15,
    )))
}
