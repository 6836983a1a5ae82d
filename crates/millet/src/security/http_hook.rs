//! HTTP authentication hook.
//!
//! Request: `POST {url}` with JSON
//! `{"client_id", "username", "password", "password_encoding", "peer", "protocol"}`
//! (`password` is UTF-8 when valid and `password_encoding = "utf8"`, else
//! standard base64 with `password_encoding = "base64"`; `username` /
//! `password` may be null; `protocol` is 3, 4 or 5).
//!
//! Response: status 200 with JSON `{"result": "allow" | "deny" | "ignore",
//! "publish": [...], "subscribe": [...]}` (the lists optional; they become
//! per-client allow rules). Any other status, a bad body, a timeout
//! (default 2 s) or a connection error answers `on_error`: deny (fail
//! closed, the default) or ignore.
//!
//! Answers (not errors) are cached for `cache_ttl_secs` keyed by client id,
//! username and SHA-256 of the password.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use parking_lot::Mutex;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::jwt::claims_to_rules;
use super::Decision;
use crate::broker::AuthFailure;

/// What to answer when the hook cannot be asked.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum OnError {
    #[default]
    Deny,
    Ignore,
}

/// `[security.auth.http]` section.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HttpHookConfig {
    pub url: String,
    #[serde(default = "default_timeout")]
    pub timeout_ms: u64,
    /// 0 disables the cache.
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
    10_000
}

impl HttpHookConfig {
    pub fn new(url: &str) -> HttpHookConfig {
        HttpHookConfig {
            url: url.to_string(),
            timeout_ms: default_timeout(),
            cache_ttl_secs: default_ttl(),
            cache_max_entries: default_cache_max(),
            on_error: OnError::Deny,
        }
    }
}

#[derive(Debug, Serialize)]
struct HookRequest<'a> {
    client_id: &'a str,
    username: Option<&'a str>,
    password: Option<String>,
    password_encoding: &'static str,
    peer: String,
    protocol: u8,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "lowercase")]
enum HookResult {
    Allow,
    Deny,
    Ignore,
}

#[derive(Debug, Deserialize)]
struct HookResponse {
    result: HookResult,
    #[serde(default)]
    publish: Vec<String>,
    #[serde(default)]
    subscribe: Vec<String>,
}

type CacheKey = (String, Option<String>, [u8; 32]);

/// The HTTP hook provider.
#[derive(Debug)]
pub struct HttpHook {
    cfg: HttpHookConfig,
    client: reqwest::Client,
    cache: Mutex<HashMap<CacheKey, (Decision, Instant)>>,
}

/// Setup errors.
#[derive(Debug, thiserror::Error)]
#[error("HTTP hook: {0}")]
pub struct HttpHookError(String);

impl HttpHook {
    pub fn new(cfg: HttpHookConfig) -> Result<HttpHook, HttpHookError> {
        let client = http_client(&cfg.url, cfg.timeout_ms).map_err(HttpHookError)?;
        Ok(HttpHook {
            cfg,
            client,
            cache: Mutex::new(HashMap::new()),
        })
    }

    /// Drop every cached answer (e.g. after a credential change).
    pub fn clear_cache(&self) {
        self.cache.lock().clear();
    }

    /// [`HttpHook::check_why`] with every refusal a plain
    /// [`Decision::Deny`].
    pub async fn check(
        &self,
        client_id: &str,
        username: Option<&str>,
        password: Option<&[u8]>,
        peer: SocketAddr,
        protocol: u8,
    ) -> Decision {
        self.check_why(client_id, username, password, peer, protocol)
            .await
            .plain()
    }

    /// Ask the hook (or its cache); a failing hook under `on_error =
    /// "deny"` is [`Decision::DenyFor`] [`AuthFailure::HookError`].
    pub async fn check_why(
        &self,
        client_id: &str,
        username: Option<&str>,
        password: Option<&[u8]>,
        peer: SocketAddr,
        protocol: u8,
    ) -> Decision {
        let key: CacheKey = (
            client_id.to_string(),
            username.map(str::to_string),
            Sha256::digest(password.unwrap_or_default()).into(),
        );
        let ttl = Duration::from_secs(self.cfg.cache_ttl_secs);
        if !ttl.is_zero() {
            let now = Instant::now();
            let mut cache = self.cache.lock();
            match cache.get(&key) {
                Some((d, until)) if now < *until => return d.clone(),
                Some(_) => {
                    cache.remove(&key);
                }
                None => {}
            }
        }
        let (password, password_encoding) = match password {
            None => (None, "utf8"),
            Some(p) => match std::str::from_utf8(p) {
                Ok(s) => (Some(s.to_string()), "utf8"),
                Err(_) => (Some(B64.encode(p)), "base64"),
            },
        };
        let body = HookRequest {
            client_id,
            username,
            password,
            password_encoding,
            peer: peer.to_string(),
            protocol,
        };
        let decision = match self.ask(&body).await {
            Ok(d) => d,
            Err(e) => {
                tracing::warn!(client_id, url = %self.cfg.url, on_error = ?self.cfg.on_error, "HTTP auth hook failed: {e}");
                return match self.cfg.on_error {
                    OnError::Deny => Decision::DenyFor(AuthFailure::HookError),
                    OnError::Ignore => Decision::Ignore,
                };
            }
        };
        if !ttl.is_zero() {
            let entry = (decision.clone(), Instant::now() + ttl);
            cache_bounded(
                &mut self.cache.lock(),
                self.cfg.cache_max_entries,
                key,
                entry,
            );
        }
        decision
    }

    /// Why a request failed, in words: reqwest's own text ("error sending
    /// request for url ...") hides the cause in its source chain.
    fn why(&self, e: &reqwest::Error) -> String {
        let mut cause = String::new();
        let mut src: Option<&dyn std::error::Error> = std::error::Error::source(e);
        while let Some(s) = src {
            cause = s.to_string();
            src = s.source();
        }
        if e.is_timeout() {
            format!("timed out after {} ms", self.cfg.timeout_ms)
        } else if e.is_connect() {
            if cause.is_empty() {
                "cannot connect".into()
            } else {
                format!("cannot connect: {cause}")
            }
        } else if cause.is_empty() {
            e.to_string()
        } else {
            format!("{e}: {cause}")
        }
    }

    async fn ask(&self, body: &HookRequest<'_>) -> Result<Decision, String> {
        let resp = self
            .client
            .post(&self.cfg.url)
            .json(body)
            .send()
            .await
            .map_err(|e| self.why(&e))?;
        if resp.status() != reqwest::StatusCode::OK {
            return Err(format!("answered HTTP status {}", resp.status()));
        }
        let r: HookResponse = resp
            .json()
            .await
            .map_err(|e| format!("unreadable answer: {}", self.why(&e)))?;
        Ok(match r.result {
            HookResult::Allow => Decision::Allow {
                acl: claims_to_rules(&r.publish, &r.subscribe),
                valid_until: None,
            },
            HookResult::Deny => Decision::Deny,
            HookResult::Ignore => Decision::Ignore,
        })
    }
}

/// The HTTP client for a hook at `url` (http or https only): `timeout_ms`
/// for connecting and for the whole request, no redirects, no proxy.
pub(crate) fn http_client(url: &str, timeout_ms: u64) -> Result<reqwest::Client, String> {
    let parsed = reqwest::Url::parse(url).map_err(|e| e.to_string())?;
    if !matches!(parsed.scheme(), "http" | "https") {
        return Err(format!("unsupported URL scheme {}", parsed.scheme()));
    }
    let timeout = Duration::from_millis(timeout_ms.max(1));
    reqwest::Client::builder()
        .timeout(timeout)
        .connect_timeout(timeout)
        .redirect(reqwest::redirect::Policy::none())
        .no_proxy()
        .build()
        .map_err(|e| e.to_string())
}

/// Insert into a hook's answer cache of at most `max` entries: when full,
/// the expired ones go, then (still full) all of them.
pub(crate) fn cache_bounded<K: std::hash::Hash + Eq, V>(
    cache: &mut HashMap<K, (V, Instant)>,
    max: usize,
    key: K,
    entry: (V, Instant),
) {
    if cache.len() >= max {
        let now = Instant::now();
        cache.retain(|_, (_, until)| now < *until);
        if cache.len() >= max {
            cache.clear();
        }
    }
    cache.insert(key, entry);
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::security::acl::{Action, Rule};
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    /// A tiny HTTP/1.1 server on 127.0.0.1: answers each request with
    /// `respond(body_json)` → (status, body, delay). Returns (url, hits).
    pub async fn serve<F>(respond: F) -> (String, Arc<AtomicUsize>)
    where
        F: Fn(serde_json::Value) -> (u16, String, Duration) + Send + Sync + 'static,
    {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let hits = Arc::new(AtomicUsize::new(0));
        let h = hits.clone();
        let respond = Arc::new(respond);
        tokio::spawn(async move {
            while let Ok((mut s, _)) = listener.accept().await {
                let h = h.clone();
                let respond = respond.clone();
                tokio::spawn(async move {
                    let mut buf = Vec::new();
                    let mut chunk = [0u8; 4096];
                    let (head_end, len) = loop {
                        let n = s.read(&mut chunk).await.unwrap_or(0);
                        if n == 0 {
                            return;
                        }
                        buf.extend_from_slice(&chunk[..n]);
                        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                            let head = String::from_utf8_lossy(&buf[..i]).to_lowercase();
                            let len = head
                                .lines()
                                .find_map(|l| l.strip_prefix("content-length:"))
                                .and_then(|v| v.trim().parse::<usize>().ok())
                                .unwrap_or(0);
                            break (i + 4, len);
                        }
                    };
                    while buf.len() < head_end + len {
                        let n = s.read(&mut chunk).await.unwrap_or(0);
                        if n == 0 {
                            return;
                        }
                        buf.extend_from_slice(&chunk[..n]);
                    }
                    h.fetch_add(1, Ordering::SeqCst);
                    let body: serde_json::Value =
                        serde_json::from_slice(&buf[head_end..head_end + len])
                            .unwrap_or(serde_json::Value::Null);
                    let (status, out, delay) = respond(body);
                    tokio::time::sleep(delay).await;
                    let resp = format!(
                        "HTTP/1.1 {status} X\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{out}",
                        out.len()
                    );
                    let _ = s.write_all(resp.as_bytes()).await;
                    let _ = s.shutdown().await;
                });
            }
        });
        (format!("http://{addr}/auth"), hits)
    }

    fn peer() -> SocketAddr {
        "127.0.0.1:5555".parse().unwrap()
    }

    fn by_password(body: serde_json::Value) -> (u16, String, Duration) {
        let pw = body["password"].as_str().unwrap_or_default().to_string();
        assert_eq!(body["peer"], "127.0.0.1:5555");
        assert_eq!(body["protocol"], 5);
        let out = match pw.as_str() {
            "good" => r#"{"result":"allow","publish":["up/%c"],"subscribe":["down/%c"]}"#,
            "bad" => r#"{"result":"deny"}"#,
            "slow" => return (200, r#"{"result":"allow"}"#.into(), Duration::from_secs(5)),
            "500" => return (500, "oops".into(), Duration::ZERO),
            "junk" => "not json",
            _ => r#"{"result":"ignore"}"#,
        };
        (200, out.to_string(), Duration::ZERO)
    }

    #[tokio::test]
    async fn answers_and_rules() {
        let (url, _) = serve(by_password).await;
        let hook = HttpHook::new(HttpHookConfig::new(&url)).unwrap();
        let d = hook.check("c1", Some("u"), Some(b"good"), peer(), 5).await;
        assert_eq!(
            d,
            Decision::Allow {
                acl: vec![
                    Rule::allow(Action::Publish, vec!["up/%c".into()]),
                    Rule::allow(Action::Subscribe, vec!["down/%c".into()]),
                ],
                valid_until: None,
            }
        );
        assert_eq!(
            hook.check("c1", Some("u"), Some(b"bad"), peer(), 5).await,
            Decision::Deny
        );
        assert_eq!(
            hook.check("c1", Some("u"), Some(b"who"), peer(), 5).await,
            Decision::Ignore
        );
    }

    #[tokio::test]
    async fn fails_closed_or_ignores_on_error() {
        let (url, _) = serve(by_password).await;
        let mut cfg = HttpHookConfig::new(&url);
        cfg.timeout_ms = 200;
        let hook = HttpHook::new(cfg.clone()).unwrap();
        for pw in [&b"slow"[..], b"500", b"junk"] {
            assert_eq!(
                hook.check("c", None, Some(pw), peer(), 5).await,
                Decision::Deny,
                "{pw:?}"
            );
        }
        cfg.on_error = OnError::Ignore;
        let hook = HttpHook::new(cfg).unwrap();
        assert_eq!(
            hook.check("c", None, Some(b"slow"), peer(), 5).await,
            Decision::Ignore
        );
        // nobody listening
        let dead = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap()
        };
        let hook = HttpHook::new(HttpHookConfig::new(&format!("http://{dead}/"))).unwrap();
        assert_eq!(
            hook.check("c", None, Some(b"good"), peer(), 5).await,
            Decision::Deny
        );
        assert!(HttpHook::new(HttpHookConfig::new("ftp://x/")).is_err());
    }

    #[tokio::test]
    async fn cache_hits_and_keys() {
        let (url, hits) = serve(by_password).await;
        let hook = HttpHook::new(HttpHookConfig::new(&url)).unwrap();
        for _ in 0..3 {
            assert!(matches!(
                hook.check("c1", Some("u"), Some(b"good"), peer(), 5).await,
                Decision::Allow { .. }
            ));
        }
        assert_eq!(hits.load(Ordering::SeqCst), 1);
        // a different password is a different key
        assert_eq!(
            hook.check("c1", Some("u"), Some(b"bad"), peer(), 5).await,
            Decision::Deny
        );
        assert_eq!(hits.load(Ordering::SeqCst), 2);
        // errors are not cached
        let _ = hook.check("c1", Some("u"), Some(b"500"), peer(), 5).await;
        let _ = hook.check("c1", Some("u"), Some(b"500"), peer(), 5).await;
        assert_eq!(hits.load(Ordering::SeqCst), 4);
        hook.clear_cache();
        let _ = hook.check("c1", Some("u"), Some(b"good"), peer(), 5).await;
        assert_eq!(hits.load(Ordering::SeqCst), 5);

        let mut cfg = HttpHookConfig::new(&url);
        cfg.cache_ttl_secs = 0;
        let nocache = HttpHook::new(cfg).unwrap();
        let _ = nocache
            .check("c1", Some("u"), Some(b"good"), peer(), 5)
            .await;
        let _ = nocache
            .check("c1", Some("u"), Some(b"good"), peer(), 5)
            .await;
        assert_eq!(hits.load(Ordering::SeqCst), 7);
    }

    #[tokio::test]
    async fn binary_password_is_base64() {
        let (url, _) = serve(|body| {
            let ok = body["password_encoding"] == "base64" && body["password"] == "/wA=";
            let r = if ok { "allow" } else { "deny" };
            (200, format!(r#"{{"result":"{r}"}}"#), Duration::ZERO)
        })
        .await;
        let hook = HttpHook::new(HttpHookConfig::new(&url)).unwrap();
        assert!(matches!(
            hook.check("c", None, Some(&[0xff, 0x00]), peer(), 4).await,
            Decision::Allow { .. }
        ));
    }
}
