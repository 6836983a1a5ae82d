//! HTTP authorization hook (`[security.acl.http]`): a [`Hooks`]
//! implementation that asks an HTTP service whether a client may publish to
//! a topic or subscribe to a filter, as EMQX's HTTP authorizer does.
//!
//! Request: `POST {url}` with JSON
//! `{"client_id", "username", "access": "publish" | "subscribe", "topic"}`.
//! Response: status 200 with JSON `{"result": "allow" | "deny" | "ignore"}`;
//! `ignore` leaves the decision to the local ACL (`[security.acl] file` and
//! the per-client rules of the authentication). Any other status, a bad
//! body, a timeout (default 2 s) or a connection error answers `on_error`:
//! deny (fail closed, the default) or ignore.
//!
//! Answers are cached for `cache_ttl_secs` (default 60) per client id,
//! username, access and topic, at most `cache_max_entries`. A cached answer
//! is given in place ([`Hooks::authorize_now`]); any other makes the
//! connection wait ([`Authorization::Ask`]) while a task asks the service,
//! so a slow service holds back only the client that waits for it (its
//! later packets are held in order), never a worker.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use serde::{Deserialize, Serialize};

use super::acl::Access;
use super::http_hook::{cache_bounded, http_client, OnError};
use crate::broker::Broker;
use crate::engine::{Call, Completion, Reply};
use crate::hooks::{Authorization, AuthorizeRequest, Client, Hooks};
use crate::session::ConnWaker;

/// `[security.acl.http]`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HttpAuthzConfig {
    pub url: String,
    #[serde(default = "default_timeout")]
    pub timeout_ms: u64,
    /// 0 disables the cache (every PUBLISH waits for the service).
    #[serde(default = "default_ttl")]
    pub cache_ttl_secs: u64,
    #[serde(default = "default_cache_max")]
    pub cache_max_entries: usize,
    #[serde(default)]
    pub on_error: OnError,
}

fn default_timeout() -> u64 {
    2000
}
fn default_ttl() -> u64 {
    60
}
fn default_cache_max() -> usize {
    100_000
}

#[derive(Debug, Serialize)]
struct AuthzBody<'a> {
    client_id: &'a str,
    username: Option<&'a str>,
    access: &'static str,
    topic: &'a str,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
enum Verdict {
    Allow,
    Deny,
    Ignore,
}

#[derive(Debug, Deserialize)]
struct AuthzResponse {
    result: Verdict,
}

/// The hook; cheap to clone (one shared state).
#[derive(Clone)]
pub struct HttpAuthz(Arc<Inner>);

struct Inner {
    cfg: HttpAuthzConfig,
    client: reqwest::Client,
    /// Key: client id, username, access and topic, NUL-separated.
    cache: Mutex<HashMap<String, (Verdict, Instant)>>,
    /// The local ACL, for `ignore`.
    local: Arc<Broker>,
    /// The server's runtime, where the questions run (taken when built:
    /// an answer may be asked for from another thread).
    runtime: Option<tokio::runtime::Handle>,
}

/// Setup errors.
#[derive(Debug, thiserror::Error)]
#[error("HTTP authorization hook ([security.acl.http]): {0}")]
pub struct HttpAuthzError(String);

fn access_name(a: Access) -> &'static str {
    match a {
        Access::Publish => "publish",
        Access::Subscribe => "subscribe",
    }
}

fn cache_key(client: &Client<'_>, access: Access, topic: &str) -> String {
    let user = client.username.unwrap_or("");
    let mut k = String::with_capacity(client.client_id.len() + user.len() + topic.len() + 8);
    k.push_str(client.client_id);
    k.push('\0');
    // A username that is absent differs from an empty one.
    k.push(if client.username.is_some() { 'u' } else { '-' });
    k.push_str(user);
    k.push('\0');
    k.push_str(access_name(access));
    k.push('\0');
    k.push_str(topic);
    k
}

impl HttpAuthz {
    pub fn new(cfg: HttpAuthzConfig, local: Arc<Broker>) -> Result<HttpAuthz, HttpAuthzError> {
        let client = http_client(&cfg.url, cfg.timeout_ms).map_err(HttpAuthzError)?;
        Ok(HttpAuthz(Arc::new(Inner {
            cfg,
            client,
            cache: Mutex::new(HashMap::new()),
            local,
            runtime: tokio::runtime::Handle::try_current().ok(),
        })))
    }

    fn cached(&self, key: &str) -> Option<Verdict> {
        let now = Instant::now();
        let mut cache = self.0.cache.lock();
        match cache.get(key) {
            Some((v, until)) if now < *until => Some(*v),
            Some(_) => {
                cache.remove(key);
                None
            }
            None => None,
        }
    }

    fn remember(&self, key: String, v: Verdict) {
        let ttl = Duration::from_secs(self.0.cfg.cache_ttl_secs);
        if ttl.is_zero() {
            return;
        }
        let max = self.0.cfg.cache_max_entries;
        cache_bounded(
            &mut self.0.cache.lock(),
            max,
            key,
            (v, Instant::now() + ttl),
        );
    }

    /// The service's verdict on one topic (`on_error` when it cannot say).
    async fn ask(&self, client: &Client<'_>, access: Access, topic: &str) -> Verdict {
        let body = AuthzBody {
            client_id: client.client_id,
            username: client.username,
            access: access_name(access),
            topic,
        };
        let url = &self.0.cfg.url;
        let answer = async {
            let resp = self
                .0
                .client
                .post(url)
                .json(&body)
                .send()
                .await
                .map_err(|e| e.to_string())?;
            if resp.status() != reqwest::StatusCode::OK {
                return Err(format!("answered HTTP status {}", resp.status()));
            }
            resp.json::<AuthzResponse>()
                .await
                .map(|r| r.result)
                .map_err(|e| format!("unreadable answer: {e}"))
        };
        match answer.await {
            Ok(v) => {
                self.remember(cache_key(client, access, topic), v);
                v
            }
            Err(e) => {
                tracing::warn!(client_id = client.client_id, %url, topic, on_error = ?self.0.cfg.on_error, "HTTP authorization hook failed: {e}");
                match self.0.cfg.on_error {
                    OnError::Deny => Verdict::Deny,
                    OnError::Ignore => Verdict::Ignore,
                }
            }
        }
    }

    fn decide(&self, v: Verdict, client: &Client<'_>, access: Access, topic: &str) -> bool {
        match v {
            Verdict::Allow => true,
            Verdict::Deny => false,
            Verdict::Ignore => self.0.local.acl_allows(client, access, topic),
        }
    }
}

impl Hooks for HttpAuthz {
    fn authorize_now(&self, client: &Client<'_>, access: Access, topic: &str) -> Authorization {
        match self.cached(&cache_key(client, access, topic)) {
            Some(v) => self.decide(v, client, access, topic).into(),
            None => Authorization::Ask,
        }
    }

    fn authorize(&self, req: AuthorizeRequest, reply_to: &Arc<ConnWaker>, _now: Instant) -> Call {
        let runtime = tokio::runtime::Handle::try_current()
            .ok()
            .or_else(|| self.0.runtime.clone());
        let Some(runtime) = runtime else {
            // Not on the server's runtime (a test driving a connection by
            // hand): nothing can ask the service, so fail closed.
            tracing::warn!("HTTP authorization hook called outside a runtime: denied");
            return Call::Ready(Completion::Authorized(vec![false; req.topics.len()]));
        };
        let (reply, pending) = Reply::new(reply_to);
        let this = self.clone();
        runtime.spawn(async move {
            let client = req.client();
            let mut verdicts = Vec::with_capacity(req.topics.len());
            for topic in &req.topics {
                let v = this.ask(&client, req.access, topic).await;
                verdicts.push(this.decide(v, &client, req.access, topic));
            }
            // A connection gone meanwhile: nobody takes the answer.
            let _ = reply.complete(Completion::Authorized(verdicts));
        });
        Call::Later(pending)
    }
}
