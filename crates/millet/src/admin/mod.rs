//! The admin HTTP API (axum): REST with JSON under `/api/v1`, Prometheus
//! `/metrics`, `/healthz` and `/readyz`, and the OpenAPI document at
//! `/api/v1/openapi.json` (hand-written, `openapi.json` next to this file;
//! the conformance test checks the real responses against it).
//!
//! Authentication: `Authorization: Bearer <key>` with a key from
//! `admin.keys_file` ([`keys`]) or `admin.bearer_token`. With neither
//! configured, a random token is generated at start-up into
//! `DATA_DIR/admin.token` (mode 0600): the API is never open to anyone
//! who can reach the port, not even on loopback (another local user).
//! Off loopback, a key file or token must be configured (checked when
//! the configuration is loaded). `/healthz`, `/readyz` and the web
//! dashboard's static files (`/`, `/dashboard`, `/dashboard/{file}`:
//! [`dashboard`]) need no authentication; `/metrics` needs it unless
//! `admin.metrics_auth = false`.
//!
//! Errors are JSON: `{"error": "not_found", "message": "..."}` with 400,
//! 401, 403, 404, 405, 409 or 503.

pub mod ctl;
mod dashboard;
pub mod keys;
pub mod metrics;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::extract::rejection::{JsonRejection, PathRejection, QueryRejection};
use axum::extract::{Path, Query, Request, State};
use axum::http::{header, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post};
use axum::{Json, Router};
use bytes::Bytes;
use millet_codec::{QoS, ReasonCode, SubscriptionOptions};
use serde::{Deserialize, Serialize};
use serde_json::json;

use crate::broker::admin::{Kicked, PublishRefused};
use crate::broker::{Broker, SubscribeOutcome};
use crate::security::quota::BanTarget;
use keys::{KeyStore, Principal};

/// The OpenAPI 3 document served at `/api/v1/openapi.json`.
pub const OPENAPI: &str = include_str!("openapi.json");

/// Name of the generated token file in the data directory.
pub const TOKEN_FILE: &str = "admin.token";

/// Largest page a list endpoint returns.
const MAX_LIMIT: usize = 10_000;
const DEFAULT_LIMIT: usize = 100;

/// A running admin listener.
pub struct AdminServer {
    pub addr: SocketAddr,
    stop: tokio::sync::watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
}

impl AdminServer {
    /// Stop accepting, let requests in progress finish for at most `grace`.
    pub async fn shutdown(self, grace: Duration) {
        let _ = self.stop.send(true);
        let mut task = self.task;
        if tokio::time::timeout(grace, &mut task).await.is_err() {
            task.abort();
        }
    }
}

/// Shared by every request.
struct AdminState {
    broker: Arc<Broker>,
    keys: KeyStore,
    /// MQTT listeners bound and not draining (`/readyz`).
    ready: Arc<AtomicBool>,
    metrics_auth: bool,
    /// The bans added through the API, kept in `DATA_DIR/admin-bans`.
    bans: AdminBans,
}

/// Name of the file in the data directory that keeps the bans added
/// through the API across restarts.
pub const BANS_FILE: &str = "admin-bans";

type BanEntries = std::collections::BTreeMap<String, (BanTarget, Option<u64>)>;

/// The bans added through the API: `TARGET UNIX_SECONDS|-` per line in
/// `DATA_DIR/admin-bans` (`-`: permanent), rewritten atomically on every
/// change and loaded at start-up (expired ones dropped).
struct AdminBans {
    path: std::path::PathBuf,
    /// Target text -> (target, expiry as Unix seconds).
    entries: parking_lot::Mutex<BanEntries>,
}

fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

impl AdminBans {
    /// Read the file and apply its live bans to `list`.
    fn load(
        path: std::path::PathBuf,
        list: Option<&crate::security::quota::BanList>,
    ) -> anyhow::Result<AdminBans> {
        let mut entries = BanEntries::new();
        let text = match std::fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
            Err(e) => anyhow::bail!("cannot read {}: {e}", path.display()),
        };
        let now = unix_now();
        for (i, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let bad = |e: String| anyhow::anyhow!("{}: line {}: {e}", path.display(), i + 1);
            let (t, until) = line.rsplit_once(' ').unwrap_or((line, "-"));
            let target: BanTarget = t.parse().map_err(bad)?;
            let until = match until {
                "-" => None,
                n => Some(n.parse::<u64>().map_err(|e| bad(format!("{n:?}: {e}")))?),
            };
            if until.is_some_and(|u| u <= now) {
                continue;
            }
            if let Some(l) = list {
                let left = until.map(|u| Duration::from_secs(u - now));
                l.ban(target.clone(), left, Instant::now());
            }
            entries.insert(target.to_string(), (target, until));
        }
        if !entries.is_empty() {
            tracing::info!(file = %path.display(), bans = entries.len(), "admin API: bans restored");
        }
        Ok(AdminBans {
            path,
            entries: parking_lot::Mutex::new(entries),
        })
    }

    fn save(&self, entries: &BanEntries) {
        let now = unix_now();
        let mut text = String::from(
            "# bans added through the admin API: TARGET UNIX_SECONDS|- (written by Millet)\n",
        );
        for (t, (_, until)) in entries {
            match until {
                Some(u) if *u <= now => {}
                Some(u) => text.push_str(&format!("{t} {u}\n")),
                None => text.push_str(&format!("{t} -\n")),
            }
        }
        let mut tmp = self.path.as_os_str().to_owned();
        tmp.push(".tmp");
        let tmp = std::path::PathBuf::from(tmp);
        if let Err(e) = write_private(&tmp, &text).and_then(|()| std::fs::rename(&tmp, &self.path))
        {
            tracing::error!(file = %self.path.display(), error = %e,
                "admin API: cannot save the bans; they hold until restart");
        }
    }

    fn add(&self, target: &BanTarget, duration: Option<u64>) {
        let mut e = self.entries.lock();
        let until = duration.map(|d| unix_now().saturating_add(d));
        e.insert(target.to_string(), (target.clone(), until));
        self.save(&e);
    }

    fn remove(&self, target: &BanTarget) {
        let mut e = self.entries.lock();
        if e.remove(&target.to_string()).is_some() {
            self.save(&e);
        }
    }
}

/// A JSON error: `{"error": code, "message": text}`.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    code: &'static str,
    message: String,
}

impl ApiError {
    fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> ApiError {
        ApiError {
            status,
            code,
            message: message.into(),
        }
    }
    fn bad_request(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::BAD_REQUEST, "bad_request", message)
    }
    fn not_found(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::NOT_FOUND, "not_found", message)
    }
    fn conflict(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::CONFLICT, "conflict", message)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut r = (
            self.status,
            Json(json!({"error": self.code, "message": self.message})),
        )
            .into_response();
        if self.status == StatusCode::UNAUTHORIZED {
            r.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                header::HeaderValue::from_static("Bearer realm=\"millet\""),
            );
        }
        r
    }
}

impl From<JsonRejection> for ApiError {
    fn from(e: JsonRejection) -> ApiError {
        ApiError::bad_request(format!("request body: {}", e.body_text()))
    }
}
impl From<QueryRejection> for ApiError {
    fn from(e: QueryRejection) -> ApiError {
        ApiError::bad_request(format!("query string: {}", e.body_text()))
    }
}
impl From<PathRejection> for ApiError {
    fn from(e: PathRejection) -> ApiError {
        ApiError::bad_request(format!("path: {}", e.body_text()))
    }
}

type ApiResult<T> = Result<T, ApiError>;

/// Start the admin listener per `broker.config.admin`. `None` when it is
/// disabled, or when the *default* address is taken (another Millet on
/// this host: warned, the broker runs without its API); a configured
/// address that cannot be bound is an error.
pub async fn start(
    broker: Arc<Broker>,
    ready: Arc<AtomicBool>,
) -> anyhow::Result<Option<AdminServer>> {
    let cfg = broker.node.config.admin.clone();
    let tls_cfg = broker.node.config.admin_tls();
    if !cfg.enabled {
        tracing::info!("admin API disabled");
        return Ok(None);
    }
    let listener = match tokio::net::TcpListener::bind(cfg.listen).await {
        Ok(l) => l,
        Err(e) if cfg.is_default_listen() => {
            tracing::warn!(addr = %cfg.listen, error = %e,
                "admin API not started: its default address is taken (set [admin] listen / --admin-listen, or --no-admin)");
            return Ok(None);
        }
        Err(e) => anyhow::bail!("cannot listen on {} (admin API): {e}", cfg.listen),
    };
    let addr = listener.local_addr()?;
    let mut token = cfg.bearer_token.clone();
    if cfg.keys_file.is_none() && token.is_none() {
        let path = broker.node.config.data_dir.join(TOKEN_FILE);
        let t = keys::generate_key();
        std::fs::create_dir_all(&broker.node.config.data_dir)
            .and_then(|()| write_private(&path, &format!("{t}\n")))
            .map_err(|e| anyhow::anyhow!("cannot write {}: {e}", path.display()))?;
        tracing::info!(token_file = %path.display(),
            "admin API: no keys_file or bearer_token configured; generated a token (Authorization: Bearer $(cat {}))",
            path.display());
        token = Some(t);
    }
    let keys = KeyStore::new(cfg.keys_file.clone(), token.as_deref())
        .map_err(|e| anyhow::anyhow!("admin API keys: {e}"))?;
    if !addr.ip().is_loopback() && keys.count() == 0 {
        anyhow::bail!(
            "admin API on {addr} (not loopback) has no key: add one with `millet ctl key add NAME --file {}` \
             or set admin.bearer_token",
            cfg.keys_file
                .as_deref()
                .map(|p| p.display().to_string())
                .unwrap_or_else(|| "FILE".into())
        );
    }
    let bans = AdminBans::load(
        broker.node.config.data_dir.join(BANS_FILE),
        broker.node.security().map(|s| &*s.bans),
    )?;
    let state = Arc::new(AdminState {
        broker,
        keys,
        ready,
        metrics_auth: cfg.metrics_auth,
        bans,
    });
    let tls = match tls_cfg {
        Some(c) => {
            let t = crate::security::tls::ReloadableTls::new(c)
                .map_err(|e| anyhow::anyhow!("admin API TLS: {e}"))?;
            Some(Arc::new(t))
        }
        None => None,
    };
    let app = router(state);
    let (stop, mut stopped) = tokio::sync::watch::channel(false);
    let scheme = if tls.is_some() { "HTTPS" } else { "HTTP" };
    let task = tokio::spawn(async move {
        let shutdown = async move {
            let _ = stopped.wait_for(|s| *s).await;
        };
        let served = match tls {
            None => {
                axum::serve(listener, app)
                    .with_graceful_shutdown(shutdown)
                    .await
            }
            Some(tls) => {
                // Renewed certificate files are picked up (like the MQTT
                // TLS listeners'); the watcher ends with the listener.
                let watch = tls.clone().spawn_watch_files(Duration::from_secs(5));
                let r = axum::serve(TlsListener::new(listener, tls), app)
                    .with_graceful_shutdown(shutdown)
                    .await;
                watch.abort();
                r
            }
        };
        if let Err(e) = served {
            tracing::error!(error = %e, "admin API listener failed");
        }
    });
    tracing::info!(%addr, "admin API listening ({scheme})");
    Ok(Some(AdminServer { addr, stop, task }))
}

/// Longest a client may take over its TLS handshake with the admin
/// listener.
const TLS_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Most TLS handshakes with the admin listener in progress at once (more
/// wait in the accept queue).
const TLS_HANDSHAKES: usize = 64;

/// An HTTPS listener for `axum::serve`: a task accepts TCP connections
/// and runs each TLS handshake as its own task (bounded in time and in
/// number), so a slow or silent client holds up nobody; finished
/// handshakes are handed to axum.
struct TlsListener {
    addr: SocketAddr,
    ready: tokio::sync::mpsc::Receiver<(
        tokio_rustls::server::TlsStream<tokio::net::TcpStream>,
        SocketAddr,
    )>,
    accept: tokio::task::JoinHandle<()>,
}

impl TlsListener {
    fn new(
        listener: tokio::net::TcpListener,
        tls: Arc<crate::security::tls::ReloadableTls>,
    ) -> TlsListener {
        let addr = listener
            .local_addr()
            .unwrap_or_else(|_| SocketAddr::from(([0, 0, 0, 0], 0)));
        let (tx, ready) = tokio::sync::mpsc::channel(16);
        let permits = Arc::new(tokio::sync::Semaphore::new(TLS_HANDSHAKES));
        let accept = tokio::spawn(async move {
            loop {
                let Ok(permit) = permits.clone().acquire_owned().await else {
                    return;
                };
                let (tcp, peer) = tokio::select! {
                    r = listener.accept() => match r {
                        Ok(c) => c,
                        Err(e) => {
                            tracing::warn!(error = %e, "admin API: accept failed");
                            tokio::time::sleep(Duration::from_millis(50)).await;
                            continue;
                        }
                    },
                    () = tx.closed() => return,
                };
                let acceptor = tls.acceptor();
                let tx = tx.clone();
                tokio::spawn(async move {
                    let _permit = permit;
                    match tokio::time::timeout(TLS_HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                        Ok(Ok(s)) => {
                            let _ = tx.send((s, peer)).await;
                        }
                        Ok(Err(e)) => {
                            tracing::debug!(%peer, error = %e, "admin API: TLS handshake failed");
                        }
                        Err(_) => tracing::debug!(%peer, "admin API: TLS handshake timed out"),
                    }
                });
            }
        });
        TlsListener {
            addr,
            ready,
            accept,
        }
    }
}

impl Drop for TlsListener {
    fn drop(&mut self) {
        self.accept.abort();
    }
}

impl axum::serve::Listener for TlsListener {
    type Io = tokio_rustls::server::TlsStream<tokio::net::TcpStream>;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        match self.ready.recv().await {
            Some(c) => c,
            // The accepting task is gone (only when the listener is
            // dropped): nothing more will come.
            None => std::future::pending().await,
        }
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        Ok(self.addr)
    }
}

/// Write `text` to `path` with mode 0600 (Unix), replacing it.
fn write_private(path: &std::path::Path, text: &str) -> std::io::Result<()> {
    use std::io::Write as _;
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create(true).truncate(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(0o600);
    }
    let mut f = opts.open(path)?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        f.set_permissions(std::fs::Permissions::from_mode(0o600))?;
    }
    f.write_all(text.as_bytes())
}

fn router(state: Arc<AdminState>) -> Router {
    let api = Router::new()
        .route("/api/v1/openapi.json", get(openapi))
        .route("/api/v1/clients", get(list_clients))
        .route("/api/v1/clients/{id}", get(get_client).delete(kick_client))
        .route(
            "/api/v1/clients/{id}/subscriptions",
            post(subscribe_for).get(client_subscriptions),
        )
        .route(
            "/api/v1/clients/{id}/subscriptions/{*filter}",
            delete(unsubscribe_for),
        )
        .route("/api/v1/subscriptions", get(list_subscriptions))
        .route("/api/v1/publish", post(publish))
        .route("/api/v1/retained", get(list_retained))
        .route("/api/v1/retained/{*topic}", delete(delete_retained))
        .route("/api/v1/bans", get(list_bans).post(add_ban))
        .route("/api/v1/bans/{*target}", delete(remove_ban))
        .route("/api/v1/stats", get(stats))
        .route("/api/v1/reload", post(reload));
    let metrics_route = Router::new().route("/metrics", get(metrics));
    let (api, public_metrics) = if state.metrics_auth {
        (api.merge(metrics_route), None)
    } else {
        (api, Some(metrics_route))
    };
    let api = api.route_layer(axum::middleware::from_fn_with_state(
        state.clone(),
        authenticate,
    ));
    let mut app = Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/", get(dashboard::root))
        .route("/dashboard", get(dashboard::index))
        .route("/dashboard/{file}", get(dashboard::file))
        .merge(api);
    if let Some(m) = public_metrics {
        app = app.merge(m);
    }
    app.fallback(|| async { ApiError::not_found("no such endpoint (see /api/v1/openapi.json)") })
        .method_not_allowed_fallback(|| async {
            ApiError::new(
                StatusCode::METHOD_NOT_ALLOWED,
                "method_not_allowed",
                "method not allowed on this endpoint",
            )
        })
        .with_state(state)
}

/// Who made the request, for the log lines of changes.
#[derive(Clone)]
struct Caller(Principal);

impl std::fmt::Display for Caller {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.0 {
            Principal::Key(n) => write!(f, "key:{n}"),
            Principal::Token => f.write_str("token"),
        }
    }
}

async fn authenticate(State(st): State<Arc<AdminState>>, mut req: Request, next: Next) -> Response {
    let presented = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| {
            let (scheme, rest) = v.split_once(' ')?;
            scheme.eq_ignore_ascii_case("bearer").then(|| rest.trim())
        });
    let Some(presented) = presented else {
        return ApiError::new(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "authentication required: Authorization: Bearer <key>",
        )
        .into_response();
    };
    match st.keys.verify(presented) {
        Some(p) => {
            req.extensions_mut().insert(Caller(p));
            next.run(req).await
        }
        None => {
            tracing::debug!(path = %req.uri().path(), "admin API: bad key");
            ApiError::new(StatusCode::UNAUTHORIZED, "unauthorized", "invalid API key")
                .into_response()
        }
    }
}

async fn healthz() -> Json<serde_json::Value> {
    Json(json!({"status": "ok"}))
}

async fn readyz(State(st): State<Arc<AdminState>>) -> Response {
    let listeners = st.ready.load(Ordering::Acquire);
    let store = st.broker.store_state();
    let ok = listeners && store != "failing";
    let body = json!({
        "status": if ok { "ready" } else { "not_ready" },
        "listeners": listeners,
        "store": store,
    });
    if ok {
        (StatusCode::OK, Json(body)).into_response()
    } else {
        let why = if listeners {
            "the store is failing"
        } else {
            "listeners not bound, or draining"
        };
        (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({"error": "not_ready", "message": why, "listeners": listeners, "store": store})),
        )
            .into_response()
    }
}

async fn openapi() -> Response {
    ([(header::CONTENT_TYPE, "application/json")], OPENAPI).into_response()
}

async fn metrics(State(st): State<Arc<AdminState>>) -> Response {
    let broker = st.broker.clone();
    // Queue depths lock every session: off the async workers.
    match tokio::task::spawn_blocking(move || metrics::render(&broker, Instant::now())).await {
        Ok(text) => (
            [(
                header::CONTENT_TYPE,
                "text/plain; version=0.0.4; charset=utf-8",
            )],
            text,
        )
            .into_response(),
        Err(e) => ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            format!("rendering metrics failed: {e}"),
        )
        .into_response(),
    }
}

fn limit_of(limit: Option<usize>) -> ApiResult<usize> {
    match limit.unwrap_or(DEFAULT_LIMIT) {
        0 => Err(ApiError::bad_request("limit must be at least 1")),
        n if n > MAX_LIMIT => Err(ApiError::bad_request(format!(
            "limit must be at most {MAX_LIMIT}"
        ))),
        n => Ok(n),
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ClientsQuery {
    /// Client id prefix.
    prefix: Option<String>,
    username: Option<String>,
    connected: Option<bool>,
    limit: Option<usize>,
    after: Option<String>,
}

async fn list_clients(
    State(st): State<Arc<AdminState>>,
    q: Result<Query<ClientsQuery>, QueryRejection>,
) -> ApiResult<Json<serde_json::Value>> {
    let Query(q) = q?;
    let limit = limit_of(q.limit)?;
    let (data, next) = st.broker.admin_clients(
        q.prefix.as_deref().unwrap_or(""),
        q.username.as_deref(),
        q.connected,
        q.after.as_deref(),
        limit,
    );
    Ok(Json(json!({"data": data, "next": next})))
}

async fn get_client(
    State(st): State<Arc<AdminState>>,
    id: Result<Path<String>, PathRejection>,
) -> ApiResult<Json<serde_json::Value>> {
    let Path(id) = id?;
    let (client, subs) = st
        .broker
        .admin_client(&id)
        .ok_or_else(|| ApiError::not_found(format!("no session for client id {id:?}")))?;
    let mut v = serde_json::to_value(client)
        .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", e.to_string()))?;
    if let Some(o) = v.as_object_mut() {
        o.insert("subscription_list".into(), json!(subs));
    }
    Ok(Json(v))
}

async fn kick_client(
    State(st): State<Arc<AdminState>>,
    axum::Extension(who): axum::Extension<Caller>,
    id: Result<Path<String>, PathRejection>,
) -> ApiResult<Json<serde_json::Value>> {
    let Path(id) = id?;
    match st
        .broker
        .admin_kick(&id, ReasonCode::ADMINISTRATIVE_ACTION, Instant::now())
    {
        Kicked::NotFound => Err(ApiError::not_found(format!(
            "no session for client id {id:?}"
        ))),
        Kicked::Connection => {
            tracing::info!(client_id = %id, by = %who, "admin API: client kicked (0x98 administrative action)");
            Ok(Json(json!({"client_id": id, "kicked": "connection"})))
        }
        Kicked::Session => {
            tracing::info!(client_id = %id, by = %who, "admin API: offline session discarded");
            Ok(Json(json!({"client_id": id, "kicked": "session"})))
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SubscriptionsQuery {
    client_id: Option<String>,
    limit: Option<usize>,
}

async fn list_subscriptions(
    State(st): State<Arc<AdminState>>,
    q: Result<Query<SubscriptionsQuery>, QueryRejection>,
) -> ApiResult<Json<serde_json::Value>> {
    let Query(q) = q?;
    let limit = limit_of(q.limit)?;
    let data = st
        .broker
        .admin_subscriptions(q.client_id.as_deref(), limit)
        .ok_or_else(|| ApiError::not_found("no session for that client id"))?;
    Ok(Json(json!({"data": data})))
}

async fn client_subscriptions(
    State(st): State<Arc<AdminState>>,
    id: Result<Path<String>, PathRejection>,
) -> ApiResult<Json<serde_json::Value>> {
    let Path(id) = id?;
    let data = st
        .broker
        .admin_subscriptions(Some(&id), MAX_LIMIT)
        .ok_or_else(|| ApiError::not_found(format!("no session for client id {id:?}")))?;
    Ok(Json(json!({"data": data})))
}

fn qos_of(q: u8) -> ApiResult<QoS> {
    QoS::from_u8(q).ok_or_else(|| ApiError::bad_request(format!("qos {q}: must be 0, 1 or 2")))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SubscribeBody {
    filter: String,
    #[serde(default)]
    qos: u8,
    #[serde(default)]
    no_local: bool,
    #[serde(default)]
    retain_as_published: bool,
    #[serde(default)]
    retain_handling: u8,
}

async fn subscribe_for(
    State(st): State<Arc<AdminState>>,
    axum::Extension(who): axum::Extension<Caller>,
    id: Result<Path<String>, PathRejection>,
    body: Result<Json<SubscribeBody>, JsonRejection>,
) -> ApiResult<Response> {
    let Path(id) = id?;
    let Json(b) = body?;
    let qos = qos_of(b.qos)?;
    if b.retain_handling > 2 {
        return Err(ApiError::bad_request("retain_handling must be 0, 1 or 2"));
    }
    let options = SubscriptionOptions {
        qos,
        no_local: b.no_local,
        retain_as_published: b.retain_as_published,
        retain_handling: b.retain_handling,
    };
    let outcome = st
        .broker
        .admin_subscribe(&id, &b.filter, options, Instant::now())
        .ok_or_else(|| ApiError::not_found(format!("no session for client id {id:?}")))?;
    match outcome {
        SubscribeOutcome::Granted { is_new } => {
            tracing::info!(client_id = %id, filter = %b.filter, qos = b.qos, by = %who, "admin API: subscribed on the client's behalf");
            let status = if is_new {
                StatusCode::CREATED
            } else {
                StatusCode::OK
            };
            Ok((
                status,
                Json(json!({"client_id": id, "filter": b.filter, "qos": b.qos, "created": is_new})),
            )
                .into_response())
        }
        SubscribeOutcome::Refused(rc) if rc == ReasonCode::QUOTA_EXCEEDED => Err(
            ApiError::conflict("the client is at limits.max_subscriptions"),
        ),
        SubscribeOutcome::Refused(rc) if rc == ReasonCode::PROTOCOL_ERROR => Err(
            ApiError::bad_request("no_local is not allowed on a shared subscription"),
        ),
        SubscribeOutcome::Refused(_) => Err(ApiError::bad_request(format!(
            "invalid topic filter {:?}",
            b.filter
        ))),
    }
}

async fn unsubscribe_for(
    State(st): State<Arc<AdminState>>,
    axum::Extension(who): axum::Extension<Caller>,
    p: Result<Path<(String, String)>, PathRejection>,
) -> ApiResult<Json<serde_json::Value>> {
    let Path((id, filter)) = p?;
    match st.broker.admin_unsubscribe(&id, &filter) {
        None => Err(ApiError::not_found(format!(
            "no session for client id {id:?}"
        ))),
        Some(false) => Err(ApiError::not_found(format!(
            "client {id:?} has no subscription {filter:?}"
        ))),
        Some(true) => {
            tracing::info!(client_id = %id, %filter, by = %who, "admin API: unsubscribed on the client's behalf");
            Ok(Json(
                json!({"client_id": id, "filter": filter, "removed": true}),
            ))
        }
    }
}

#[derive(Deserialize, Default, Clone, Copy, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
enum PayloadEncoding {
    #[default]
    Utf8,
    Base64,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PublishBody {
    topic: String,
    #[serde(default)]
    payload: String,
    #[serde(default)]
    encoding: PayloadEncoding,
    #[serde(default)]
    qos: u8,
    #[serde(default)]
    retain: bool,
    message_expiry_interval: Option<u32>,
}

async fn publish(
    State(st): State<Arc<AdminState>>,
    axum::Extension(who): axum::Extension<Caller>,
    body: Result<Json<PublishBody>, JsonRejection>,
) -> ApiResult<Json<serde_json::Value>> {
    let Json(b) = body?;
    let qos = qos_of(b.qos)?;
    let payload = match b.encoding {
        PayloadEncoding::Utf8 => Bytes::from(b.payload.into_bytes()),
        PayloadEncoding::Base64 => {
            use base64::Engine as _;
            Bytes::from(
                base64::engine::general_purpose::STANDARD
                    .decode(b.payload.as_bytes())
                    .map_err(|e| ApiError::bad_request(format!("payload: invalid base64: {e}")))?,
            )
        }
    };
    if payload.len() > st.broker.node.config.limits.max_packet_size as usize {
        return Err(ApiError::bad_request(format!(
            "payload of {} bytes exceeds limits.max_packet_size",
            payload.len()
        )));
    }
    let routed = st
        .broker
        .admin_publish(
            &b.topic,
            payload,
            qos,
            b.retain,
            b.message_expiry_interval,
            Instant::now(),
        )
        .map_err(|e| match e {
            PublishRefused::InvalidTopic => {
                ApiError::bad_request(format!("invalid topic name {:?}", b.topic))
            }
            PublishRefused::ReservedTopic => ApiError::new(
                StatusCode::FORBIDDEN,
                "forbidden",
                format!("{:?}: topics starting with $ belong to the broker", b.topic),
            ),
            PublishRefused::RetainedFull => ApiError::conflict(
                "the retained store is full (max_retained_messages / bytes, or memory)",
            ),
        })?;
    // QoS 1/2 and retained: answer once what the publish stored is durable.
    if !routed.ticket.is_none() {
        let broker = st.broker.clone();
        let seq = routed.ticket.0;
        let r = tokio::task::spawn_blocking(move || {
            broker
                .persistence()
                .map(|p| p.wait_durable(seq, Duration::from_secs(10)))
        })
        .await;
        if let Ok(Some(Err(e))) = r {
            return Err(ApiError::conflict(format!("not stored: {e}")));
        }
    }
    tracing::debug!(topic = %b.topic, qos = b.qos, retain = b.retain, by = %who, "admin API: published");
    Ok(Json(json!({"topic": b.topic, "sessions": routed.sessions})))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RetainedQuery {
    filter: Option<String>,
    after: Option<String>,
    limit: Option<usize>,
}

async fn list_retained(
    State(st): State<Arc<AdminState>>,
    q: Result<Query<RetainedQuery>, QueryRejection>,
) -> ApiResult<Json<serde_json::Value>> {
    let Query(q) = q?;
    let limit = limit_of(q.limit)?;
    let filter = q.filter.as_deref().unwrap_or("#");
    if !millet_codec::topic::valid_topic_filter(filter) {
        return Err(ApiError::bad_request(format!(
            "invalid topic filter {filter:?}"
        )));
    }
    let (data, next) = st
        .broker
        .admin_retained(filter, q.after.as_deref(), limit, Instant::now());
    Ok(Json(json!({"data": data, "next": next})))
}

async fn delete_retained(
    State(st): State<Arc<AdminState>>,
    axum::Extension(who): axum::Extension<Caller>,
    t: Result<Path<String>, PathRejection>,
) -> ApiResult<Json<serde_json::Value>> {
    let Path(topic) = t?;
    if !st.broker.admin_delete_retained(&topic) {
        return Err(ApiError::not_found(format!(
            "no retained message on {topic:?}"
        )));
    }
    tracing::info!(%topic, by = %who, "admin API: retained message deleted");
    Ok(Json(json!({"topic": topic, "deleted": true})))
}

#[derive(Serialize)]
struct BanInfo {
    target: String,
    /// Seconds left; absent: permanent.
    #[serde(skip_serializing_if = "Option::is_none")]
    expires_in: Option<u64>,
}

fn security(st: &AdminState) -> ApiResult<&Arc<crate::security::Security>> {
    st.broker.node.security().ok_or_else(|| {
        ApiError::conflict("bans need the security layer, which this broker runs without")
    })
}

async fn list_bans(State(st): State<Arc<AdminState>>) -> ApiResult<Json<serde_json::Value>> {
    let now = Instant::now();
    let data: Vec<BanInfo> = security(&st)?
        .bans
        .list(now)
        .into_iter()
        .map(|b| BanInfo {
            target: b.target.to_string(),
            expires_in: b.until.map(|u| u.saturating_duration_since(now).as_secs()),
        })
        .collect();
    Ok(Json(json!({ "data": data })))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct BanBody {
    /// `client:ID`, `user:NAME`, `ip:ADDR` or `ip:NET/LEN`.
    target: String,
    /// Seconds; absent: permanent.
    duration: Option<u64>,
}

async fn add_ban(
    State(st): State<Arc<AdminState>>,
    axum::Extension(who): axum::Extension<Caller>,
    body: Result<Json<BanBody>, JsonRejection>,
) -> ApiResult<Response> {
    let Json(b) = body?;
    let target: BanTarget = b.target.parse().map_err(ApiError::bad_request)?;
    if b.duration == Some(0) {
        return Err(ApiError::bad_request("duration must be at least 1 second"));
    }
    let sec = security(&st)?;
    sec.bans.ban(
        target.clone(),
        b.duration.map(Duration::from_secs),
        Instant::now(),
    );
    st.bans.add(&target, b.duration);
    tracing::info!(%target, duration = ?b.duration, by = %who, "admin API: ban added");
    Ok((
        StatusCode::CREATED,
        Json(json!({"target": target.to_string(), "expires_in": b.duration})),
    )
        .into_response())
}

async fn remove_ban(
    State(st): State<Arc<AdminState>>,
    axum::Extension(who): axum::Extension<Caller>,
    t: Result<Path<String>, PathRejection>,
) -> ApiResult<Json<serde_json::Value>> {
    let Path(t) = t?;
    let target: BanTarget = t.parse().map_err(ApiError::bad_request)?;
    if !security(&st)?.bans.unban(&target) {
        return Err(ApiError::not_found(format!("no ban on {target}")));
    }
    st.bans.remove(&target);
    tracing::info!(%target, by = %who, "admin API: ban removed");
    Ok(Json(json!({"target": target.to_string(), "removed": true})))
}

async fn stats(State(st): State<Arc<AdminState>>) -> Json<serde_json::Value> {
    let b = &st.broker;
    let s = &b.node.stats;
    let g = |a: &std::sync::atomic::AtomicU64| a.load(Ordering::Relaxed);
    let sessions = b.session_count() as u64;
    let node = json!({
        "version": env!("CARGO_PKG_VERSION"),
        "uptime": b.uptime(Instant::now()).as_secs(),
        "connections": g(&s.clients_connected),
        "sessions": sessions,
        "sessions_maximum": g(&s.clients_maximum).max(sessions),
        "subscriptions": g(&s.subscriptions),
        "retained_messages": b.retained_count_without_sys(),
        "retained_bytes": b.retained_bytes(),
        "messages_received": g(&s.publish_received),
        "messages_sent": g(&s.publish_sent),
        "messages_received_by_qos": s.by_qos.totals(crate::broker::Direction::Received).0,
        "messages_sent_by_qos": s.by_qos.totals(crate::broker::Direction::Sent).0,
        "messages_dropped": g(&s.messages_dropped),
        "bytes_received": g(&s.bytes_received),
        "bytes_sent": g(&s.bytes_sent),
        "memory_used": b.node.memory_used(),
        "memory_budget": b.node.config.limits.memory_budget,
        "resident_memory": crate::broker::rss_bytes(),
        "store": b.store_state(),
        "listeners": listeners(&b.node.config),
    });
    // One node until cluster mode: the list is where the other nodes go.
    Json(json!({"node": node, "nodes": [node.clone()]}))
}

/// The MQTT listeners as configured (an address with port 0 is shown as
/// such): the dashboard's topic tester learns the WebSocket port here.
fn listeners(c: &crate::config::Config) -> serde_json::Value {
    let addrs = |l: &[SocketAddr]| l.iter().map(|a| a.to_string()).collect::<Vec<_>>();
    json!({
        "mqtt": addrs(&c.listen),
        "mqtts": addrs(&c.tls_listen),
        "ws": addrs(&c.ws_listen),
        "wss": addrs(&c.wss_listen),
        "ws_path": c.ws_path,
    })
}

async fn reload(
    State(st): State<Arc<AdminState>>,
    axum::Extension(who): axum::Extension<Caller>,
) -> ApiResult<Json<serde_json::Value>> {
    let mut errors: Vec<String> = match st.broker.node.security() {
        Some(s) => s.reload_from("admin API"),
        None => Vec::new(),
    };
    let keys = match st.keys.reload() {
        Ok(n) => Some(n),
        Err(e) => {
            errors.push(format!("admin keys_file: {e}"));
            None
        }
    };
    tracing::info!(by = %who, errors = errors.len(), "admin API: reload");
    if !errors.is_empty() {
        return Err(ApiError::conflict(format!(
            "reload failed, previous state kept for: {}",
            errors.join("; ")
        )));
    }
    Ok(Json(json!({"reloaded": true, "admin_keys": keys})))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{AdminConfig, Config};

    async fn start_admin(admin: AdminConfig) -> (AdminServer, tempfile::TempDir) {
        let dir = tempfile::tempdir().unwrap();
        let config = Config {
            data_dir: dir.path().join("data"),
            admin,
            ..Default::default()
        };
        let broker = Arc::new(Broker::new(config, Instant::now()));
        let ready = Arc::new(AtomicBool::new(true));
        let a = start(broker, ready).await.unwrap().unwrap();
        (a, dir)
    }

    async fn get(addr: SocketAddr, path: &str, key: Option<&str>) -> (u16, serde_json::Value) {
        let mut r = reqwest::Client::new().get(format!("http://{addr}{path}"));
        if let Some(k) = key {
            r = r.bearer_auth(k);
        }
        let resp = r.send().await.unwrap();
        let status = resp.status().as_u16();
        (status, resp.json().await.unwrap_or(serde_json::Value::Null))
    }

    #[tokio::test]
    async fn only_configured_keys_pass_and_health_needs_none() {
        let dir = tempfile::tempdir().unwrap();
        let keys_file = dir.path().join("keys");
        let (key, code) = keys::ctl(&[
            "key".into(),
            "add".into(),
            "ops".into(),
            "--file".into(),
            keys_file.display().to_string(),
        ]);
        assert_eq!(code, 0);
        let (a, _d) = start_admin(AdminConfig {
            listen: "127.0.0.1:0".parse().unwrap(),
            keys_file: Some(keys_file),
            bearer_token: Some("token-of-sixteen-chars".into()),
            ..Default::default()
        })
        .await;
        assert_eq!(get(a.addr, "/healthz", None).await.0, 200);
        assert_eq!(get(a.addr, "/readyz", None).await.0, 200);
        for bad in [None, Some("nope"), Some(""), Some("mlk_x")] {
            let (s, body) = get(a.addr, "/api/v1/stats", bad).await;
            assert_eq!(s, 401, "{bad:?}");
            assert_eq!(body["error"], "unauthorized");
        }
        assert_eq!(get(a.addr, "/metrics", None).await.0, 401);
        assert_eq!(get(a.addr, "/api/v1/stats", Some(&key)).await.0, 200);
        let (s, body) = get(a.addr, "/api/v1/stats", Some("token-of-sixteen-chars")).await;
        assert_eq!(s, 200);
        assert_eq!(body["node"]["connections"], 0);
        a.shutdown(Duration::from_secs(1)).await;
    }

    #[tokio::test]
    async fn without_keys_a_private_token_is_generated_and_metrics_may_be_open() {
        let (a, dir) = start_admin(AdminConfig {
            listen: "127.0.0.1:0".parse().unwrap(),
            metrics_auth: false,
            ..Default::default()
        })
        .await;
        let path = dir.path().join("data").join(TOKEN_FILE);
        let token = std::fs::read_to_string(&path).unwrap();
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&path).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600);
        }
        assert_eq!(get(a.addr, "/api/v1/clients", None).await.0, 401);
        let (s, body) = get(a.addr, "/api/v1/clients", Some(token.trim())).await;
        assert_eq!((s, body["data"].as_array().map(Vec::len)), (200, Some(0)));
        let r = reqwest::get(format!("http://{}/metrics", a.addr))
            .await
            .unwrap();
        assert_eq!(r.status().as_u16(), 200);
        assert!(r.text().await.unwrap().contains("millet_connections 0"));
        a.shutdown(Duration::from_secs(1)).await;
    }

    #[test]
    fn the_openapi_document_parses_and_names_every_route() {
        let doc: serde_json::Value = serde_json::from_str(OPENAPI).unwrap();
        let paths = doc["paths"].as_object().unwrap();
        for p in [
            "/healthz",
            "/readyz",
            "/metrics",
            "/api/v1/clients/{id}",
            "/api/v1/bans/{target}",
            "/api/v1/reload",
            "/",
            "/dashboard",
            "/dashboard/{file}",
        ] {
            assert!(paths.contains_key(p), "{p}");
        }
    }

    #[tokio::test]
    async fn the_dashboard_is_served_without_a_key_and_stats_name_the_listeners() {
        let (a, dir) = start_admin(AdminConfig {
            listen: "127.0.0.1:0".parse().unwrap(),
            ..Default::default()
        })
        .await;
        let http = reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .unwrap();
        let r = http
            .get(format!("http://{}/", a.addr))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status().as_u16(), 303);
        assert_eq!(r.headers()["location"], "/dashboard");
        let r = http
            .get(format!("http://{}/dashboard", a.addr))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status().as_u16(), 200);
        assert!(r.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/html"));
        assert!(r.headers()["content-security-policy"]
            .to_str()
            .unwrap()
            .contains("script-src 'self'"));
        assert!(r.text().await.unwrap().contains("/dashboard/app.js"));
        for (file, ct) in [
            ("app.js", "text/javascript"),
            ("mqtt.min.js", "text/javascript"),
            ("style.css", "text/css"),
            ("mqtt.LICENSE.md", "text/plain"),
        ] {
            let r = http
                .get(format!("http://{}/dashboard/{file}", a.addr))
                .send()
                .await
                .unwrap();
            assert_eq!(r.status().as_u16(), 200, "{file}");
            let got = r.headers()["content-type"].to_str().unwrap().to_owned();
            assert!(got.starts_with(ct), "{file}: {got}");
        }
        assert_eq!(get(a.addr, "/dashboard/nope.js", None).await.0, 404);
        assert_eq!(get(a.addr, "/dashboard/../admin.token", None).await.0, 404);
        let token = std::fs::read_to_string(dir.path().join("data").join(TOKEN_FILE)).unwrap();
        let (s, body) = get(a.addr, "/api/v1/stats", Some(token.trim())).await;
        assert_eq!(s, 200);
        let l = &body["node"]["listeners"];
        assert_eq!(l["ws"][0], "127.0.0.1:8083");
        assert_eq!(l["ws_path"], "/mqtt");
        assert_eq!(l["mqtt"][0], "127.0.0.1:1883");
        a.shutdown(Duration::from_secs(1)).await;
    }
}
