//! `millet ctl`: the admin API from the command line.
//!
//! Wraps the REST API ([`crate::admin`]) for the common tasks: clients,
//! kick, subscriptions (and subscribing on a client's behalf), publish,
//! retained messages, bans, stats, reload; `watch` subscribes over MQTT and
//! prints messages as they come. Human tables by default, `--json` for
//! scripts (the API's JSON, one document per command; `watch` prints one
//! JSON object per line). API keys are managed offline with
//! `millet ctl key add` ([`crate::admin::keys`]).
//!
//! Exit codes: 0 done; 1 the broker refused (400, 404, 409); 2 usage;
//! 3 broker unreachable; 4 not authenticated or not allowed (401, 403);
//! 5 the broker failed (5xx or an unreadable answer).

use std::path::PathBuf;
use std::time::Duration;

use bytes::BytesMut;
use clap::{Parser, Subcommand};
use serde_json::{json, Value};

/// Exit codes (see the module documentation).
pub const REFUSED: u8 = 1;
pub const USAGE: u8 = 2;
pub const UNREACHABLE: u8 = 3;
pub const UNAUTHORIZED: u8 = 4;
pub const FAILED: u8 = 5;

#[derive(Parser, Debug)]
#[command(
    name = "millet ctl",
    about = "Administer a running Millet through its admin API",
    after_help = "Exit codes: 0 done, 1 refused by the broker, 2 usage, 3 unreachable, \
                  4 not authenticated / not allowed, 5 broker error.\n\
                  API keys: millet ctl key add NAME --file FILE"
)]
struct Ctl {
    /// Admin API address (https://... when the broker runs with `[admin] tls`).
    #[arg(long, env = "MILLET_CTL_URL", default_value = "http://127.0.0.1:18083")]
    url: String,
    /// CA certificate (PEM) to trust for an https URL, besides the system's
    /// roots: the broker's own CA or self-signed certificate.
    #[arg(long, env = "MILLET_CTL_CA")]
    ca: Option<PathBuf>,
    /// API key or bearer token (default: DATA_DIR/admin.token).
    #[arg(long, env = "MILLET_CTL_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// Read the token from this file.
    #[arg(long)]
    token_file: Option<PathBuf>,
    /// The broker's data directory, for its generated admin.token.
    #[arg(long, env = "MILLET_DATA_DIR", default_value = "millet-data")]
    data_dir: PathBuf,
    /// The API's JSON instead of tables.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// List clients (sessions, connected or not).
    Clients {
        /// Client id prefix.
        #[arg(long)]
        prefix: Option<String>,
        #[arg(long)]
        username: Option<String>,
        /// Only connected (true) or only disconnected (false) ones.
        #[arg(long)]
        connected: Option<bool>,
        #[arg(long, default_value_t = 100)]
        limit: usize,
    },
    /// One client, with its subscriptions.
    Client { id: String },
    /// Disconnect a client (v5: DISCONNECT 0x98).
    Kick { id: String },
    /// Subscriptions, of every client or of one.
    Subscriptions { id: Option<String> },
    /// Subscribe a client to FILTER.
    Subscribe {
        id: String,
        filter: String,
        #[arg(long, default_value_t = 0)]
        qos: u8,
    },
    /// Remove a client's subscription.
    Unsubscribe { id: String, filter: String },
    /// Publish a message as the broker.
    Publish {
        topic: String,
        #[arg(default_value = "")]
        payload: String,
        #[arg(long, default_value_t = 0)]
        qos: u8,
        #[arg(long)]
        retain: bool,
    },
    /// Subscribe over MQTT and print messages as they arrive.
    Watch {
        filter: String,
        /// The broker's MQTT listener.
        #[arg(long, default_value = "127.0.0.1:1883")]
        mqtt: String,
        #[arg(long, default_value_t = 0)]
        qos: u8,
        /// Stop after this many messages (0: never).
        #[arg(long, default_value_t = 0)]
        count: u64,
        #[arg(long)]
        username: Option<String>,
        #[arg(long)]
        password: Option<String>,
    },
    /// Retained messages, or delete one (`retained --delete TOPIC`).
    Retained {
        #[arg(long, default_value_t = 100)]
        limit: usize,
        #[arg(long)]
        delete: Option<String>,
    },
    /// Bans in force.
    Bans,
    /// Ban `client:ID`, `user:NAME`, `ip:ADDR` or `ip:NET/LEN`.
    Ban {
        target: String,
        /// Seconds (default: until removed).
        #[arg(long = "for")]
        duration: Option<u64>,
    },
    /// Remove a ban.
    Unban { target: String },
    /// Node statistics.
    Stats,
    /// Re-read the configuration's reloadable files.
    Reload,
}

/// An error with its exit code.
#[derive(Debug)]
pub struct CtlError {
    pub code: u8,
    pub message: String,
}

fn err(code: u8, message: impl Into<String>) -> CtlError {
    CtlError {
        code,
        message: message.into(),
    }
}

/// Run `millet ctl ARGS` (ARGS without `millet ctl`); what to print on
/// success.
pub fn run(args: &[String]) -> Result<String, CtlError> {
    let argv = std::iter::once("millet ctl".to_string()).chain(args.iter().cloned());
    let ctl = match Ctl::try_parse_from(argv) {
        Ok(c) => c,
        Err(e) => {
            let code = if e.use_stderr() { USAGE } else { 0 };
            return if code == 0 {
                Ok(e.to_string())
            } else {
                Err(err(USAGE, e.to_string()))
            };
        }
    };
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| err(FAILED, format!("cannot start the runtime: {e}")))?;
    rt.block_on(ctl.execute())
}

impl Ctl {
    fn token(&self) -> Result<String, CtlError> {
        if let Some(t) = &self.token {
            return Ok(t.trim().to_string());
        }
        let path = self
            .token_file
            .clone()
            .unwrap_or_else(|| self.data_dir.join(super::TOKEN_FILE));
        std::fs::read_to_string(&path)
            .map(|t| t.trim().to_string())
            .map_err(|e| {
                err(
                    UNAUTHORIZED,
                    format!(
                        "no token: {} ({e}); give --token, --token-file or --data-dir",
                        path.display()
                    ),
                )
            })
    }

    async fn call(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<Value>,
    ) -> Result<Value, CtlError> {
        let token = self.token()?;
        let url = format!("{}{path}", self.url.trim_end_matches('/'));
        let mut builder = reqwest::Client::builder().timeout(Duration::from_secs(30));
        if let Some(path) = &self.ca {
            let pem = std::fs::read(path)
                .map_err(|e| err(USAGE, format!("--ca {}: {e}", path.display())))?;
            let certs = reqwest::Certificate::from_pem_bundle(&pem)
                .map_err(|e| err(USAGE, format!("--ca {}: {e}", path.display())))?;
            if certs.is_empty() {
                return Err(err(
                    USAGE,
                    format!("--ca {}: no PEM certificate in it", path.display()),
                ));
            }
            for c in certs {
                builder = builder.add_root_certificate(c);
            }
        }
        let client = builder.build().map_err(|e| err(FAILED, e.to_string()))?;
        let mut req = client.request(method, &url).bearer_auth(token);
        if let Some(b) = body {
            req = req.json(&b);
        }
        let resp = req
            .send()
            .await
            .map_err(|e| err(UNREACHABLE, format!("cannot reach {url}: {e}")))?;
        let status = resp.status();
        let text = resp
            .text()
            .await
            .map_err(|e| err(FAILED, format!("reading the answer: {e}")))?;
        let value: Value = serde_json::from_str(&text).unwrap_or(Value::String(text));
        if status.is_success() {
            return Ok(value);
        }
        let message = value
            .get("message")
            .and_then(Value::as_str)
            .map(str::to_string)
            .unwrap_or_else(|| value.to_string());
        let code = match status.as_u16() {
            401 | 403 => UNAUTHORIZED,
            400..=499 => REFUSED,
            _ => FAILED,
        };
        Err(err(code, format!("{status}: {message}")))
    }

    async fn execute(&self) -> Result<String, CtlError> {
        use reqwest::Method;
        let enc = |s: &str| utf8_percent_encode(s);
        let (value, shape) = match &self.cmd {
            Cmd::Clients {
                prefix,
                username,
                connected,
                limit,
            } => {
                let mut q = vec![format!("limit={limit}")];
                if let Some(p) = prefix {
                    q.push(format!("prefix={}", enc(p)));
                }
                if let Some(u) = username {
                    q.push(format!("username={}", enc(u)));
                }
                if let Some(c) = connected {
                    q.push(format!("connected={c}"));
                }
                let v = self
                    .call(
                        Method::GET,
                        &format!("/api/v1/clients?{}", q.join("&")),
                        None,
                    )
                    .await?;
                (
                    v,
                    Shape::Table(&[
                        "client_id",
                        "connected",
                        "username",
                        "peer",
                        "protocol",
                        "subscriptions",
                        "queued",
                        "inflight",
                    ]),
                )
            }
            Cmd::Client { id } => {
                let v = self
                    .call(Method::GET, &format!("/api/v1/clients/{}", enc(id)), None)
                    .await?;
                (v, Shape::Object)
            }
            Cmd::Kick { id } => {
                let v = self
                    .call(
                        Method::DELETE,
                        &format!("/api/v1/clients/{}", enc(id)),
                        None,
                    )
                    .await?;
                (v, Shape::Object)
            }
            Cmd::Subscriptions { id } => {
                let path = match id {
                    Some(id) => format!("/api/v1/clients/{}/subscriptions", enc(id)),
                    None => "/api/v1/subscriptions".to_string(),
                };
                let v = self.call(Method::GET, &path, None).await?;
                (
                    v,
                    Shape::Table(&[
                        "client_id",
                        "filter",
                        "qos",
                        "no_local",
                        "retain_as_published",
                        "retain_handling",
                    ]),
                )
            }
            Cmd::Subscribe { id, filter, qos } => {
                let v = self
                    .call(
                        Method::POST,
                        &format!("/api/v1/clients/{}/subscriptions", enc(id)),
                        Some(json!({"filter": filter, "qos": qos})),
                    )
                    .await?;
                (v, Shape::Object)
            }
            Cmd::Unsubscribe { id, filter } => {
                let v = self
                    .call(
                        Method::DELETE,
                        &format!(
                            "/api/v1/clients/{}/subscriptions/{}",
                            enc(id),
                            enc_path(filter)
                        ),
                        None,
                    )
                    .await?;
                (v, Shape::Object)
            }
            Cmd::Publish {
                topic,
                payload,
                qos,
                retain,
            } => {
                let v = self
                    .call(
                        Method::POST,
                        "/api/v1/publish",
                        Some(json!({"topic": topic, "payload": payload, "qos": qos, "retain": retain})),
                    )
                    .await?;
                (v, Shape::Object)
            }
            Cmd::Watch {
                filter,
                mqtt,
                qos,
                count,
                username,
                password,
            } => {
                return watch(
                    mqtt,
                    filter,
                    *qos,
                    *count,
                    username.as_deref(),
                    password.as_deref(),
                    self.json,
                )
                .await;
            }
            Cmd::Retained { limit, delete } => match delete {
                Some(topic) => {
                    let v = self
                        .call(
                            Method::DELETE,
                            &format!("/api/v1/retained/{}", enc_path(topic)),
                            None,
                        )
                        .await?;
                    (v, Shape::Object)
                }
                None => {
                    let v = self
                        .call(
                            Method::GET,
                            &format!("/api/v1/retained?limit={limit}"),
                            None,
                        )
                        .await?;
                    (
                        v,
                        Shape::Table(&["topic", "qos", "payload_bytes", "payload", "expires_in"]),
                    )
                }
            },
            Cmd::Bans => {
                let v = self.call(Method::GET, "/api/v1/bans", None).await?;
                (v, Shape::Table(&["target", "expires_in"]))
            }
            Cmd::Ban { target, duration } => {
                let v = self
                    .call(
                        Method::POST,
                        "/api/v1/bans",
                        Some(json!({"target": target, "duration": duration})),
                    )
                    .await?;
                (v, Shape::Object)
            }
            Cmd::Unban { target } => {
                let v = self
                    .call(
                        Method::DELETE,
                        &format!("/api/v1/bans/{}", enc_path(target)),
                        None,
                    )
                    .await?;
                (v, Shape::Object)
            }
            Cmd::Stats => {
                let v = self.call(Method::GET, "/api/v1/stats", None).await?;
                let node = v.get("node").cloned().unwrap_or(Value::Null);
                (if self.json { v } else { node }, Shape::Object)
            }
            Cmd::Reload => {
                let v = self.call(Method::POST, "/api/v1/reload", None).await?;
                (v, Shape::Object)
            }
        };
        if self.json {
            return serde_json::to_string_pretty(&value).map_err(|e| err(FAILED, e.to_string()));
        }
        Ok(match shape {
            Shape::Table(cols) => table(&value, cols),
            Shape::Object => object(&value),
        })
    }
}

enum Shape {
    /// `{"data": [rows]}` (or a bare array) as a table of these columns.
    Table(&'static [&'static str]),
    /// One object as `key: value` lines.
    Object,
}

fn cell(v: Option<&Value>) -> String {
    match v {
        None | Some(Value::Null) => "-".into(),
        Some(Value::String(s)) => s.clone(),
        Some(other) => other.to_string(),
    }
}

fn table(value: &Value, cols: &[&str]) -> String {
    let rows: &[Value] = match value.get("data").or(Some(value)) {
        Some(Value::Array(a)) => a,
        _ => &[],
    };
    let cells: Vec<Vec<String>> = rows
        .iter()
        .map(|r| cols.iter().map(|c| cell(r.get(*c))).collect())
        .collect();
    let widths: Vec<usize> = cols
        .iter()
        .enumerate()
        .map(|(i, c)| {
            cells
                .iter()
                .map(|r| r[i].chars().count())
                .chain(std::iter::once(c.len()))
                .max()
                .unwrap_or(0)
                .min(60)
        })
        .collect();
    let mut out = String::new();
    let line = |out: &mut String, fields: &mut dyn Iterator<Item = String>| {
        let parts: Vec<String> = fields
            .zip(&widths)
            .map(|(f, w)| {
                let f: String = f.chars().take(*w).collect();
                format!("{f:<w$}", w = *w)
            })
            .collect();
        out.push_str(parts.join("  ").trim_end());
        out.push('\n');
    };
    line(&mut out, &mut cols.iter().map(|c| c.to_uppercase()));
    for r in cells {
        line(&mut out, &mut r.into_iter());
    }
    if let Some(next) = value.get("next").and_then(Value::as_str) {
        out.push_str(&format!("(more: --limit, next after {next})\n"));
    }
    out.push_str(&format!("{} row(s)", rows.len()));
    out
}

fn object(value: &Value) -> String {
    match value {
        Value::Object(m) => m
            .iter()
            .map(|(k, v)| match v {
                Value::Array(a) if a.iter().all(Value::is_object) && !a.is_empty() => {
                    let items: Vec<String> = a.iter().map(|x| format!("  {x}")).collect();
                    format!("{k}:\n{}", items.join("\n"))
                }
                other => format!("{k}: {}", cell(Some(other))),
            })
            .collect::<Vec<_>>()
            .join("\n"),
        other => cell(Some(other)),
    }
}

/// Percent-encode a path segment (client ids may hold `/`, `#`, `+`, spaces).
fn utf8_percent_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// A topic or filter as the tail of a path (the API's `{*topic}`): its `/`
/// stay, everything else is encoded.
fn enc_path(s: &str) -> String {
    s.split('/')
        .map(utf8_percent_encode)
        .collect::<Vec<_>>()
        .join("/")
}

/// `watch`: an MQTT 3.1.1 subscriber (this crate's codec) printing what
/// arrives, until `count` messages (0: until interrupted or disconnected).
async fn watch(
    addr: &str,
    filter: &str,
    qos: u8,
    count: u64,
    username: Option<&str>,
    password: Option<&str>,
    as_json: bool,
) -> Result<String, CtlError> {
    use millet_codec::{
        decode, encode, Connect, ConnectProperties, Packet, Protocol, PubResp, QoS, Subscribe,
        SubscriptionOptions,
    };
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let proto = Protocol::V3_1_1;
    let qos = match qos {
        0 => QoS::AtMostOnce,
        1 => QoS::AtLeastOnce,
        2 => QoS::ExactlyOnce,
        q => return Err(err(USAGE, format!("--qos {q}: 0, 1 or 2"))),
    };
    let mut sock = tokio::time::timeout(
        Duration::from_secs(10),
        tokio::net::TcpStream::connect(addr),
    )
    .await
    .map_err(|_| err(UNREACHABLE, format!("cannot reach {addr}: timed out")))?
    .map_err(|e| err(UNREACHABLE, format!("cannot reach {addr}: {e}")))?;
    let mut out = BytesMut::new();
    let connect = Packet::Connect(Box::new(Connect {
        protocol: proto,
        clean_start: true,
        keep_alive: 60,
        properties: ConnectProperties::default(),
        client_id: format!("millet-ctl-{:08x}", rand::random::<u32>()).into(),
        will: None,
        username: username.map(Into::into),
        password: password.map(|p| bytes::Bytes::copy_from_slice(p.as_bytes())),
        bridge: false,
    }));
    let subscribe = Packet::Subscribe(Subscribe {
        packet_id: 1,
        subscription_identifier: None,
        user_properties: vec![],
        filters: vec![(
            filter.into(),
            SubscriptionOptions {
                qos,
                ..Default::default()
            },
        )],
    });
    for p in [&connect, &subscribe] {
        encode(p, proto, &mut out).map_err(|e| err(USAGE, e.to_string()))?;
    }
    sock.write_all(&out)
        .await
        .map_err(|e| err(UNREACHABLE, e.to_string()))?;
    out.clear();
    let mut rbuf = BytesMut::with_capacity(64 * 1024);
    let mut seen = 0u64;
    let mut ping = tokio::time::interval(Duration::from_secs(30));
    ping.tick().await;
    let stdout = std::io::stdout();
    loop {
        while let Some(p) = decode(&mut rbuf, Some(proto), usize::MAX)
            .map_err(|e| err(FAILED, format!("the broker sent a bad packet: {e}")))?
        {
            match p {
                Packet::ConnAck(a) if a.reason_code.is_error() => {
                    let code = if matches!(a.reason_code.0, 0x86 | 0x87 | 0x8A) {
                        UNAUTHORIZED
                    } else {
                        REFUSED
                    };
                    return Err(err(code, format!("CONNECT refused: {}", a.reason_code)));
                }
                Packet::SubAck(s) if s.reason_codes.iter().any(|c| c.is_error()) => {
                    return Err(err(REFUSED, format!("SUBSCRIBE {filter} refused")));
                }
                Packet::Publish(m) => {
                    let line = if as_json {
                        json!({
                            "topic": &*m.topic,
                            "qos": m.qos as u8,
                            "retain": m.retain,
                            "payload": String::from_utf8_lossy(&m.payload),
                        })
                        .to_string()
                    } else {
                        format!("{} {}", m.topic, String::from_utf8_lossy(&m.payload))
                    };
                    {
                        use std::io::Write;
                        let mut lock = stdout.lock();
                        let _ = writeln!(lock, "{line}");
                        let _ = lock.flush();
                    }
                    let ack = match (m.qos, m.packet_id) {
                        (QoS::AtLeastOnce, Some(id)) => Some(Packet::PubAck(PubResp::new(id))),
                        (QoS::ExactlyOnce, Some(id)) => Some(Packet::PubRec(PubResp::new(id))),
                        _ => None,
                    };
                    if let Some(a) = ack {
                        let _ = encode(&a, proto, &mut out);
                    }
                    seen += 1;
                }
                Packet::PubRel(r) => {
                    let _ = encode(&Packet::PubComp(PubResp::new(r.packet_id)), proto, &mut out);
                }
                _ => {}
            }
        }
        if !out.is_empty() {
            sock.write_all(&out)
                .await
                .map_err(|e| err(UNREACHABLE, e.to_string()))?;
            out.clear();
        }
        if count > 0 && seen >= count {
            return Ok(String::new());
        }
        tokio::select! {
            n = sock.read_buf(&mut rbuf) => {
                match n {
                    Ok(0) | Err(_) => return Err(err(UNREACHABLE, "the broker closed the connection")),
                    Ok(_) => {}
                }
            }
            _ = ping.tick() => {
                let _ = encode(&Packet::PingReq, proto, &mut out);
            }
        }
    }
}
