//! The web dashboard: a few static files compiled into the binary
//! (`static/`, no build step), served without authentication. The page
//! asks for an API key and sends it as `Authorization: Bearer` on every
//! API call; everything it loads comes from here (a strict
//! Content-Security-Policy, no other origin).

use axum::extract::Path;
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Redirect, Response};

use super::ApiError;

/// `(name, content type, bytes)` of every file under `/dashboard/`.
const FILES: &[(&str, &str, &[u8])] = &[
    (
        "app.js",
        "text/javascript; charset=utf-8",
        include_bytes!("static/app.js"),
    ),
    (
        "style.css",
        "text/css; charset=utf-8",
        include_bytes!("static/style.css"),
    ),
    (
        "mqtt.min.js",
        "text/javascript; charset=utf-8",
        include_bytes!("static/mqtt.min.js"),
    ),
    (
        "favicon.svg",
        "image/svg+xml",
        include_bytes!("static/favicon.svg"),
    ),
    (
        "mqtt.LICENSE.md",
        "text/plain; charset=utf-8",
        include_bytes!("static/mqtt.LICENSE.md"),
    ),
];

const INDEX: &str = include_str!("static/index.html");

/// Scripts, styles and images from this origin only; the topic tester
/// opens MQTT-over-WebSocket connections to any host the user types.
const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; \
                   connect-src 'self' ws: wss:; form-action 'none'; frame-ancestors 'none'; \
                   base-uri 'none'";

fn with_headers(content_type: &'static str, body: &'static [u8]) -> Response {
    let mut r = body.into_response();
    let h = r.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(CSP),
    );
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    r
}

/// `GET /`: to the dashboard.
pub(super) async fn root() -> Redirect {
    Redirect::to("/dashboard")
}

/// `GET /dashboard`: the page.
pub(super) async fn index() -> Response {
    with_headers("text/html; charset=utf-8", INDEX.as_bytes())
}

/// `GET /dashboard/{file}`: a script, the style sheet or a licence.
pub(super) async fn file(Path(name): Path<String>) -> Response {
    match FILES.iter().find(|(n, _, _)| *n == name) {
        Some((_, ct, body)) => with_headers(ct, body),
        None => ApiError::new(
            StatusCode::NOT_FOUND,
            "not_found",
            format!("no dashboard file {name:?}"),
        )
        .into_response(),
    }
}
