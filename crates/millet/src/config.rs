//! Configuration: defaults, then a TOML file (`--config FILE`), then
//! environment variables (`MILLET_LISTEN`, `MILLET_LIMITS__MAX_INFLIGHT`, ...),
//! then command-line flags, each layer overriding the one before. Merged with
//! `figment`; the structs below are the whole reference (see README).

use std::net::SocketAddr;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

/// Strategy for picking one member of a shared-subscription group.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum ShareStrategyConfig {
    #[default]
    RoundRobin,
    Random,
    HashClientId,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// TCP listeners, e.g. `["127.0.0.1:1883"]`.
    pub listen: Vec<SocketAddr>,
    /// Directory for the embedded store (durable state) and runtime files.
    pub data_dir: PathBuf,
    /// Interval between `$SYS` publications, seconds (0 disables).
    pub sys_interval: u64,
    /// How shared subscription groups pick a member.
    pub shared_strategy: ShareStrategyConfig,
    /// Server redirection (MQTT 5): when set, every v5 CONNECT is answered
    /// with CONNACK 0x9C "use another server" (or 0x9D "server moved" with
    /// `server_moved`) carrying this server reference, and the drain at
    /// shutdown sends DISCONNECT 0x9C with it instead of 0x8B. 3.x clients get
    /// CONNACK 3 (server unavailable). For moving a fleet between clusters.
    pub server_reference: Option<String>,
    pub server_moved: bool,
    pub limits: Limits,
    pub store: StoreConfig,
    /// MQTT-over-TLS listeners, e.g. `["127.0.0.1:8883"]`; need `[security.tls]`
    /// (which, with this list empty, listens on `127.0.0.1:8883`).
    pub tls_listen: Vec<SocketAddr>,
    /// MQTT-over-WebSocket listeners (default `["127.0.0.1:8083"]`; `[]` or
    /// `--no-ws`: none). The built-in default only warns when its port is
    /// taken; a configured address that cannot be bound stops the start.
    pub ws_listen: Vec<SocketAddr>,
    /// MQTT over WebSocket over TLS; needs `[security.tls]` (which, with this
    /// list empty, listens on `127.0.0.1:8084` unless `--no-ws`).
    pub wss_listen: Vec<SocketAddr>,
    /// HTTP path of the WebSocket upgrade (default `/mqtt`).
    pub ws_path: String,
    /// Listeners (addresses as in `listen`, `tls_listen`, `ws_listen`,
    /// `wss_listen`) whose connections start with a PROXY protocol v1 or v2
    /// header from a load balancer: the client address in it is used
    /// everywhere; a connection without one is closed.
    pub proxy_protocol_listeners: Vec<SocketAddr>,
    /// Authentication chain, ACL, quotas, bans and TLS (`[security.auth]`,
    /// `[security.acl]`, `[security.quota]`, `[security.tls]`; see
    /// [`crate::security`]).
    pub security: crate::security::SecurityConfig,
    /// The admin HTTP API and Prometheus metrics (`[admin]`, see [`crate::admin`]).
    pub admin: AdminConfig,
    /// The engine behind the protocol (`[engine]`, see [`crate::engine`]).
    pub engine: EngineConfig,
}

/// `[engine]`: where sessions, subscriptions and durable messages live.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct EngineConfig {
    /// Which engine: `embedded` (one node, the default) or `nats` (cluster
    /// mode: nodes joined through NATS, `[engine.nats]`; `--nats URL`).
    pub kind: EngineKind,
    /// Cluster mode's NATS connection (`[engine.nats]`).
    pub nats: NatsConfig,
    /// For tests: answer every engine call (attach, subscribe, unsubscribe)
    /// after a random delay of up to this many milliseconds, as an engine
    /// across a network would (see [`crate::engine::delaying`]). 0: off.
    pub test_delay_ms: u64,
    /// Seed of the test delays (the same seed gives the same delays).
    pub test_delay_seed: u64,
}

/// The engine behind the protocol (`[engine] kind`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum EngineKind {
    /// One node: in-process routing and the embedded store.
    #[default]
    Embedded,
    /// Cluster mode: nodes joined through NATS (docs/CLUSTER.md).
    Nats,
}

/// `[engine.nats]`: how a cluster node reaches NATS.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct NatsConfig {
    /// Server URLs (`nats://host:port`, `tls://host:port`); the client
    /// fails over between them.
    pub servers: Vec<String>,
    /// This node's id in the cluster (unique per node; default: the host
    /// name and the first listen port).
    pub node_id: Option<String>,
    /// A NATS credentials file (JWT and NKey seed).
    pub credentials_file: Option<PathBuf>,
    /// User and password, when the servers want them.
    pub user: Option<String>,
    pub password: Option<String>,
    /// A token, when the servers want one.
    pub token: Option<String>,
    /// CA certificates (PEM) to verify the servers by, instead of the
    /// system's roots; setting it requires TLS.
    pub tls_ca_file: Option<PathBuf>,
    /// A client certificate and key (PEM) for servers that ask for one.
    pub tls_cert: Option<PathBuf>,
    pub tls_key: Option<PathBuf>,
    /// How long to wait for NATS at start-up before giving up (seconds).
    pub connect_timeout_secs: u64,
    /// Replicas of the cluster's JetStream state (1 for a single NATS
    /// server; 3 for a three-server cluster, which survives one loss).
    pub replicas: usize,
    /// How long the stream of QoS 1/2 messages (`MILLET_MSGS`) keeps a
    /// message (seconds): how long a session may be away and still be
    /// caught up from it.
    pub message_retention_secs: u64,
}

/// `limits.max_topic_length` in cluster mode, at most: the longest topic
/// whose NATS subject (three bytes per escaped byte, plus the prefix) fits
/// in a NATS server's default protocol line of 4 KiB with room to spare.
pub const CLUSTER_MAX_TOPIC_LENGTH: usize = 1024;

impl Default for NatsConfig {
    fn default() -> Self {
        NatsConfig {
            servers: Vec::new(),
            node_id: None,
            credentials_file: None,
            user: None,
            password: None,
            token: None,
            tls_ca_file: None,
            tls_cert: None,
            tls_key: None,
            connect_timeout_secs: 10,
            replicas: 3,
            message_retention_secs: 86_400,
        }
    }
}

/// `[admin]`: the admin HTTP API (REST, `/metrics`, health). See README
/// "Admin API and metrics".
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AdminConfig {
    /// Serve the admin API at all (`--no-admin` turns it off).
    pub enabled: bool,
    /// Address of the admin listener. Off loopback only with `keys_file`
    /// or `bearer_token` set (checked at start-up).
    pub listen: SocketAddr,
    /// API keys, `NAME:SHA256HEX` per line, written by `millet ctl key add`;
    /// re-read when it changes.
    pub keys_file: Option<PathBuf>,
    /// A static bearer token (quick starts; `MILLET_ADMIN__BEARER_TOKEN`).
    /// Prefer `keys_file`: the token sits in clear in the configuration.
    pub bearer_token: Option<String>,
    /// `/metrics` requires authentication like the rest of the API.
    pub metrics_auth: bool,
    /// Serve HTTPS instead of HTTP (`--admin-tls`): with `tls_cert` and
    /// `tls_key` when given, else with the `[security.tls]` certificate
    /// (no client certificate asked for: the API authenticates by key).
    pub tls: bool,
    /// The admin listener's own certificate chain (PEM, leaf first), e.g.
    /// one for the dashboard's public name; with `tls_key`.
    pub tls_cert: Option<PathBuf>,
    /// The private key of `tls_cert` (PEM).
    pub tls_key: Option<PathBuf>,
}

/// Default port of the admin listener (EMQX's dashboard port).
pub const DEFAULT_ADMIN_PORT: u16 = 18083;

impl Default for AdminConfig {
    fn default() -> Self {
        AdminConfig {
            enabled: true,
            listen: SocketAddr::from(([127, 0, 0, 1], DEFAULT_ADMIN_PORT)),
            keys_file: None,
            bearer_token: None,
            metrics_auth: true,
            tls: false,
            tls_cert: None,
            tls_key: None,
        }
    }
}

impl AdminConfig {
    /// Whether the address is the built-in default (a busy default port
    /// only disables the API, with a warning; a configured one is an error).
    pub fn is_default_listen(&self) -> bool {
        self.listen == AdminConfig::default().listen
    }
}

/// When an acknowledged QoS 1/2 message is on disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum DurabilityConfig {
    /// fsync before PUBACK / PUBREC (group commit shares one fsync among many
    /// publishers). Nothing acknowledged is lost on a crash or power loss.
    #[default]
    Sync,
    /// PUBACK / PUBREC once the write is handed to the store's writer, which
    /// logs it within 5 ms; fsync every `interval_ms`. A killed process can
    /// lose the acknowledged writes of the last ≤ 5 ms, an OS crash or power
    /// loss those of the last interval.
    Interval,
    /// No store: sessions, queues and retained messages live in memory only
    /// and are lost on restart.
    None,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct StoreConfig {
    pub durability: DurabilityConfig,
    /// fsync period for `interval`, milliseconds.
    pub interval_ms: u64,
    /// Upper bound on the store's size, bytes: beyond it QoS 1/2 publishes
    /// that need storing are refused (v5 0x97) instead of acknowledged.
    pub max_bytes: Option<u64>,
    /// Move an unreadable store aside and start empty (default: refuse to start).
    pub quarantine_corrupt: bool,
    /// Also store QoS 0 messages queued for persistent sessions.
    pub persist_qos0: bool,
    /// Checkpoint the write-ahead log into the store once it holds this many
    /// bytes ...
    pub checkpoint_bytes: u64,
    /// ... or this many milliseconds after its first record (0: after every
    /// group, which gives up write absorption).
    pub checkpoint_ms: u64,
    /// `sync` group commit: after each fsync the store's writer gathers
    /// writes for up to this many milliseconds before the next round, so
    /// that one fsync covers many publishers; 2 ms at most after a round of
    /// a single write, and a round starts at once when 64 writes wait (0:
    /// a round as soon as a write comes). A PUBACK / PUBREC waits at most
    /// this much longer.
    pub sync_linger_ms: u64,
}

impl Default for StoreConfig {
    fn default() -> Self {
        StoreConfig {
            durability: DurabilityConfig::Sync,
            interval_ms: 100,
            max_bytes: None,
            quarantine_corrupt: false,
            persist_qos0: false,
            checkpoint_bytes: 1 << 20,
            checkpoint_ms: 100,
            sync_linger_ms: 10,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Limits {
    /// Maximum simultaneous client connections (further CONNECTs get 0x97 / server unavailable).
    pub max_connections: usize,
    /// Largest packet accepted from a client, bytes (announced in v5 CONNACK).
    pub max_packet_size: u32,
    /// Outgoing QoS 1/2 messages un-acknowledged per client (min with the client's receive maximum).
    pub max_inflight: u16,
    /// Incoming QoS 2 messages awaiting PUBREL per client (our v5 receive maximum).
    pub receive_maximum: u16,
    /// Messages queued per offline or slow session; when full, QoS 0 goes first, then new messages are dropped (counted).
    pub max_queued: usize,
    /// Back-pressure threshold: a publisher sending to an online session with
    /// this many messages queued stops being read until the queue halves.
    pub backpressure_queued: usize,
    /// Longest topic name or filter, bytes (at most
    /// [`CLUSTER_MAX_TOPIC_LENGTH`] in cluster mode).
    pub max_topic_length: usize,
    /// Most levels in a topic name or filter.
    pub max_topic_levels: usize,
    /// Most subscriptions per client (further filters get 0x97 quota exceeded).
    pub max_subscriptions: usize,
    /// Highest keep alive accepted, seconds; v5 clients asking for more get this as server keep alive.
    pub max_keepalive: u16,
    /// Keep alive imposed when a client asks for 0 (no keep alive), seconds; 0 allows "none".
    pub min_keepalive: u16,
    /// Topic aliases a v5 client may define (topic alias maximum in CONNACK).
    pub topic_alias_max: u16,
    /// Longest session expiry interval granted, seconds (also caps 3.x
    /// persistent sessions, which ask for "never"). Default 7 days.
    pub max_session_expiry: u32,
    /// Payload bytes (topic + payload) queued per session; when full, QoS 0
    /// goes first, then new messages are dropped (counted, like `max_queued`).
    pub max_queued_bytes: usize,
    /// Queue QoS 0 messages for sessions with no connection attached
    /// (default false, like Mosquitto's `queue_qos0_messages`).
    pub queue_qos0_offline: bool,
    /// Broker-wide bytes of messages held in session queues, in-flight
    /// windows and the retained store. At 90%: new sessions are refused
    /// (0x97 / 3.x: 3) and QoS 0 deliveries dropped; at 100%: QoS 1/2
    /// PUBLISH refused (v5 0x97; 3.x publisher disconnected). 0: no limit.
    pub memory_budget: u64,
    /// Most sessions (connected, and disconnected ones not yet expired);
    /// further new sessions get CONNACK 0x97 (v5) / 3 (3.x).
    pub max_sessions: usize,
    /// Most retained topics; a new retained topic beyond it is not stored
    /// (v5 QoS 1/2: PUBACK/PUBREC 0x97). Replacing or deleting one always works.
    pub max_retained_messages: usize,
    /// Most bytes (topic + payload) in the retained store, same policy.
    pub max_retained_bytes: u64,
    /// Seconds a new connection has to send CONNECT.
    pub connect_timeout: u64,
    /// Retained messages one session may have waiting to be sent beyond
    /// `max_queued` (a SUBSCRIBE's retained replay is delivered in full,
    /// paced by the client's flow control, up to this many).
    pub max_retained_replay: usize,
    /// Longest a write to a client may make no progress, seconds (less for
    /// a client whose 1.5 × keep alive is shorter): then the client is taken
    /// for gone and disconnected.
    pub write_timeout: u64,
    /// Largest packet accepted before the CONNECT is accepted (CONNECT and
    /// AUTH), bytes: an unauthenticated client cannot make us buffer more.
    pub max_connect_packet_size: u32,
    /// Bytes of read buffers all connections that have not completed
    /// CONNECT may hold together; a connection that would exceed it is
    /// closed (counted, logged at a throttled rate).
    pub preauth_memory: usize,
    /// Milliseconds a connected client may be quiet (nothing read, written
    /// or delivered) before its connection gives up its task and waits as
    /// a parked record: a socket registration, its protocol state and its
    /// keep-alive deadline in a broker-wide sweep (see docs/DESIGN.md,
    /// "Parked connections"). 0: never park. Plain TCP only. Default
    /// 500 ms: in the event loops (`tcp_reactor`) a parked connection is
    /// its state alone (its future, ~0.25 KiB, goes) and parking and
    /// resuming cost no system call, so a fleet device parks between its
    /// messages (measured: BENCHMARKS.md). With `tcp_reactor = false` a
    /// park and resume respawns a task and re-registers the socket
    /// (+10 to +30% broker CPU for devices sending every 10 s): raise it
    /// to 30000 there.
    pub park_after_ms: u64,
    /// Serve plain-TCP connections from per-worker event loops (each
    /// connection a slab entry in an epoll set of Millet's own) instead of
    /// a tokio task and socket registration each: about 0.6 KiB less per
    /// connection, and parking costs no system call. `false`: a task per
    /// connection, as TLS and WebSocket connections always are.
    pub tcp_reactor: bool,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            listen: vec![SocketAddr::from(([127, 0, 0, 1], 1883))],
            data_dir: PathBuf::from("millet-data"),
            sys_interval: 10,
            shared_strategy: ShareStrategyConfig::RoundRobin,
            server_reference: None,
            server_moved: false,
            limits: Limits::default(),
            store: StoreConfig::default(),
            tls_listen: Vec::new(),
            ws_listen: vec![default_ws_listen()],
            wss_listen: Vec::new(),
            ws_path: DEFAULT_WS_PATH.to_string(),
            proxy_protocol_listeners: Vec::new(),
            security: crate::security::SecurityConfig::default(),
            admin: AdminConfig::default(),
            engine: EngineConfig::default(),
        }
    }
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_connections: 1_000_000,
            max_packet_size: 1024 * 1024,
            max_inflight: 32,
            receive_maximum: 128,
            max_queued: 10_000,
            backpressure_queued: 1000,
            max_topic_length: 65535,
            max_topic_levels: 128,
            max_subscriptions: 1024,
            max_keepalive: 3600,
            min_keepalive: 0,
            topic_alias_max: 64,
            max_session_expiry: 7 * 24 * 3600,
            max_queued_bytes: 16 << 20,
            queue_qos0_offline: false,
            memory_budget: 1 << 30,
            max_sessions: 1_000_000,
            max_retained_messages: 1_000_000,
            max_retained_bytes: 256 << 20,
            connect_timeout: 10,
            max_retained_replay: 1_000_000,
            write_timeout: 60,
            max_connect_packet_size: 64 * 1024,
            preauth_memory: 64 * 1024 * 1024,
            park_after_ms: 500,
            tcp_reactor: true,
        }
    }
}

/// Default port of the MQTT-over-WebSocket listener (EMQX's).
pub const DEFAULT_WS_PORT: u16 = 8083;
/// Default port of the MQTT-over-secure-WebSocket listener (EMQX's).
pub const DEFAULT_WSS_PORT: u16 = 8084;
/// Default HTTP path of the WebSocket upgrade.
pub const DEFAULT_WS_PATH: &str = "/mqtt";

fn default_ws_listen() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], DEFAULT_WS_PORT))
}

fn default_wss_listen() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], DEFAULT_WSS_PORT))
}

/// Top-level keys settable through `MILLET_<KEY>`.
const ENV_KEYS: &[&str] = &[
    "listen",
    "data_dir",
    "sys_interval",
    "shared_strategy",
    "tls_listen",
    "ws_listen",
    "wss_listen",
    "ws_path",
    "proxy_protocol_listeners",
    "server_reference",
    "server_moved",
];
/// Sections settable through `MILLET_<SECTION>__<KEY>`.
const ENV_SECTIONS: &[&str] = &["limits__", "store__", "security__", "admin__", "engine__"];

/// How log lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines (colour only on a terminal).
    #[default]
    Text,
    /// One JSON object per line: timestamp, level, target, message, fields.
    Json,
}

/// Command-line flags. Every flag also reads an environment variable.
#[derive(Debug, clap::Parser, Default)]
#[command(
    name = "millet",
    version,
    about = "Millet MQTT gateway",
    after_help = "Credential tools (without --password: prompted for twice on a terminal, else read from stdin):\n  \
                  millet passwd FILE USER [--password PW | --delete]                   argon2id password file\n  \
                  millet scram FILE USER [--password PW | --delete] [--iterations N]   SCRAM-SHA-256 credentials file\n  \
                  millet ctl key add NAME --file FILE                                   admin API key (printed once, stored hashed)"
)]
pub struct Cli {
    /// TOML configuration file.
    #[arg(long, env = "MILLET_CONFIG")]
    pub config: Option<PathBuf>,
    /// Listen address (repeatable), e.g. 127.0.0.1:1883.
    #[arg(long)]
    pub listen: Vec<SocketAddr>,
    /// MQTT-over-TLS listen address (repeatable), e.g. 127.0.0.1:8883; needs [security.tls].
    #[arg(long)]
    pub tls_listen: Vec<SocketAddr>,
    /// MQTT-over-WebSocket listen address (repeatable); default 127.0.0.1:8083.
    #[arg(long)]
    pub ws_listen: Vec<SocketAddr>,
    /// MQTT-over-secure-WebSocket listen address (repeatable); needs [security.tls] (default then 127.0.0.1:8084).
    #[arg(long)]
    pub wss_listen: Vec<SocketAddr>,
    /// HTTP path of the WebSocket upgrade (default /mqtt).
    #[arg(long)]
    pub ws_path: Option<String>,
    /// A listener (one of the addresses above, repeatable) whose connections start with a PROXY protocol v1/v2 header.
    #[arg(long)]
    pub proxy_protocol_listener: Vec<SocketAddr>,
    /// Serve no MQTT over WebSocket (neither ws nor wss).
    #[arg(long)]
    pub no_ws: bool,
    /// Data directory for the embedded store.
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
    /// Seconds between `$SYS` updates (0: off).
    #[arg(long)]
    pub sys_interval: Option<u64>,
    /// How a shared subscription group picks a member.
    #[arg(long, value_enum)]
    pub shared_strategy: Option<ShareStrategyConfig>,
    /// Redirect MQTT 5 clients to this server (CONNACK 0x9C + server reference).
    #[arg(long)]
    pub server_reference: Option<String>,
    /// Most simultaneous connections; beyond, CONNACK 0x97 (v5) / 3 (3.x).
    #[arg(long)]
    pub max_connections: Option<usize>,
    /// Largest packet accepted and sent, bytes (announced in the v5 CONNACK).
    #[arg(long)]
    pub max_packet_size: Option<u32>,
    /// Unacknowledged outgoing QoS 1/2 messages per client (at most the client's receive maximum).
    #[arg(long)]
    pub max_inflight: Option<u16>,
    /// Incoming QoS 2 messages awaiting PUBREL per client (our v5 receive maximum).
    #[arg(long)]
    pub receive_maximum: Option<u16>,
    /// Messages queued per session; when full, QoS 0 goes first, then new messages are dropped.
    #[arg(long)]
    pub max_queued: Option<usize>,
    /// Payload bytes queued per session (topic + payload); beyond, dropped like --max-queued.
    #[arg(long)]
    pub max_queued_bytes: Option<usize>,
    /// Queue QoS 0 messages for disconnected sessions (default: not queued, like Mosquitto).
    #[arg(long)]
    pub queue_qos0_offline: Option<bool>,
    /// Broker-wide bytes of queued, in-flight and retained messages (0: none); see README limits.
    #[arg(long)]
    pub memory_budget: Option<u64>,
    /// Most sessions, connected or not; beyond, CONNACK 0x97 (v5) / 3 (3.x).
    #[arg(long)]
    pub max_sessions: Option<usize>,
    /// Most retained topics; a new one beyond is not stored (v5 QoS 1/2: 0x97).
    #[arg(long)]
    pub max_retained_messages: Option<usize>,
    /// Most bytes in the retained store; a new topic beyond is not stored.
    #[arg(long)]
    pub max_retained_bytes: Option<u64>,
    /// Longest session expiry granted, seconds (default 604800, 7 days).
    #[arg(long)]
    pub max_session_expiry: Option<u32>,
    /// A publisher to an online session with this many queued messages is not read until the queue halves.
    #[arg(long)]
    pub backpressure_queued: Option<usize>,
    /// Subscriptions per client; beyond, SUBACK 0x97.
    #[arg(long)]
    pub max_subscriptions: Option<usize>,
    /// Highest keep alive granted, seconds (v5 clients asking more get it as server keep alive).
    #[arg(long)]
    pub max_keepalive: Option<u16>,
    /// Topic aliases a v5 client may define.
    #[arg(long)]
    pub topic_alias_max: Option<u16>,
    /// Seconds a new connection has to complete CONNECT (and TLS).
    #[arg(long)]
    pub connect_timeout: Option<u64>,
    /// Durability of acknowledged messages: sync, interval or none (memory only).
    #[arg(long, value_enum)]
    pub durability: Option<DurabilityConfig>,
    /// Admin HTTP API (REST, /metrics) address; default 127.0.0.1:18083.
    #[arg(long)]
    pub admin_listen: Option<SocketAddr>,
    /// Do not serve the admin HTTP API.
    #[arg(long)]
    pub no_admin: bool,
    /// Serve the admin API and dashboard over HTTPS ([admin] tls_cert / tls_key, else [security.tls]).
    #[arg(long)]
    pub admin_tls: bool,
    /// Cluster mode: join the nodes on these NATS servers (comma-separated
    /// URLs; sets `[engine] kind = "nats"`).
    #[arg(long, value_delimiter = ',')]
    pub nats: Vec<String>,
    /// This node's id in a cluster (`[engine.nats] node_id`).
    #[arg(long)]
    pub node_id: Option<String>,
    /// Log format on stderr: text (default) or json (one object per line).
    #[arg(long, env = "MILLET_LOG_FORMAT", value_enum, default_value = "text")]
    pub log_format: LogFormat,
    /// Log filter (tracing EnvFilter syntax), e.g. `info,millet=debug`.
    #[arg(long, env = "MILLET_LOG", default_value = "info")]
    pub log: String,
}

impl Config {
    /// Merge defaults, the config file, `MILLET_*` environment variables and flags.
    pub fn load(cli: &Cli) -> Result<Config, Box<figment::Error>> {
        use figment::providers::{Env, Format, Serialized, Toml};
        let mut fig = figment::Figment::from(Serialized::defaults(Config::default()));
        if let Some(path) = &cli.config {
            fig = fig.merge(Toml::file_exact(path));
        }
        // Only variables naming a configuration key: MILLET_BIN, MILLET_ARGS
        // and friends belong to scripts, not to us.
        fig = fig.merge(
            Env::prefixed("MILLET_")
                .filter(|k| {
                    let k = k.as_str().to_ascii_lowercase();
                    ENV_KEYS.contains(&k.as_str()) || ENV_SECTIONS.iter().any(|s| k.starts_with(s))
                })
                .split("__"),
        );
        let mut cfg: Config = fig.extract().map_err(Box::new)?;
        if !cli.listen.is_empty() {
            cfg.listen = cli.listen.clone();
        }
        if !cli.tls_listen.is_empty() {
            cfg.tls_listen = cli.tls_listen.clone();
        }
        if cfg.security.tls.is_some() && cfg.tls_listen.is_empty() {
            cfg.tls_listen = vec![SocketAddr::from((
                [127, 0, 0, 1],
                crate::security::tls::DEFAULT_TLS_PORT,
            ))];
        }
        if !cli.ws_listen.is_empty() {
            cfg.ws_listen = cli.ws_listen.clone();
        }
        if !cli.wss_listen.is_empty() {
            cfg.wss_listen = cli.wss_listen.clone();
        }
        if cfg.security.tls.is_some() && cfg.wss_listen.is_empty() {
            cfg.wss_listen = vec![default_wss_listen()];
        }
        if cli.no_ws {
            cfg.ws_listen.clear();
            cfg.wss_listen.clear();
        }
        if let Some(p) = &cli.ws_path {
            cfg.ws_path = p.clone();
        }
        if !cli.proxy_protocol_listener.is_empty() {
            cfg.proxy_protocol_listeners = cli.proxy_protocol_listener.clone();
        }
        macro_rules! set {
            ($field:expr, $opt:expr) => {
                if let Some(v) = $opt {
                    $field = v;
                }
            };
        }
        set!(cfg.data_dir, cli.data_dir.clone());
        set!(cfg.sys_interval, cli.sys_interval);
        set!(cfg.shared_strategy, cli.shared_strategy);
        if cli.server_reference.is_some() {
            cfg.server_reference = cli.server_reference.clone();
        }
        let l = &mut cfg.limits;
        set!(l.max_connections, cli.max_connections);
        set!(l.max_packet_size, cli.max_packet_size);
        set!(l.max_inflight, cli.max_inflight);
        set!(l.receive_maximum, cli.receive_maximum);
        set!(l.max_queued, cli.max_queued);
        set!(l.max_queued_bytes, cli.max_queued_bytes);
        set!(l.queue_qos0_offline, cli.queue_qos0_offline);
        set!(l.memory_budget, cli.memory_budget);
        set!(l.max_sessions, cli.max_sessions);
        set!(l.max_retained_messages, cli.max_retained_messages);
        set!(l.max_retained_bytes, cli.max_retained_bytes);
        set!(l.max_session_expiry, cli.max_session_expiry);
        set!(l.max_subscriptions, cli.max_subscriptions);
        set!(l.backpressure_queued, cli.backpressure_queued);
        set!(l.max_keepalive, cli.max_keepalive);
        set!(l.topic_alias_max, cli.topic_alias_max);
        set!(l.connect_timeout, cli.connect_timeout);
        set!(cfg.store.durability, cli.durability);
        set!(cfg.admin.listen, cli.admin_listen);
        if cli.no_admin {
            cfg.admin.enabled = false;
        }
        if cli.admin_tls {
            cfg.admin.tls = true;
        }
        if !cli.nats.is_empty() {
            cfg.engine.kind = EngineKind::Nats;
            cfg.engine.nats.servers = cli.nats.clone();
        }
        if cli.node_id.is_some() {
            cfg.engine.nats.node_id = cli.node_id.clone();
        }
        if cfg.engine.kind == EngineKind::Nats {
            // A topic travels as a NATS subject (each byte escaped to at
            // most three), and NATS refuses a protocol line over 4 KiB by
            // closing the connection: one long topic would cut the node
            // off the cluster.
            cfg.limits.max_topic_length = cfg.limits.max_topic_length.min(CLUSTER_MAX_TOPIC_LENGTH);
        }
        cfg.validate()
            .map_err(|e| Box::new(figment::Error::from(e)))?;
        Ok(cfg)
    }

    /// The admin listener's TLS settings when `admin.tls` is on: its own
    /// certificate and key, else `[security.tls]`'s (without client
    /// certificate checks).
    pub fn admin_tls(&self) -> Option<crate::security::tls::TlsConfig> {
        if !self.admin.tls {
            return None;
        }
        match (&self.admin.tls_cert, &self.admin.tls_key) {
            (Some(cert), Some(key)) => Some(crate::security::tls::TlsConfig::new(cert, key)),
            _ => self
                .security
                .tls
                .as_ref()
                .map(|t| crate::security::tls::TlsConfig::new(&t.cert, &t.key)),
        }
    }

    fn validate(&self) -> Result<(), String> {
        let l = &self.limits;
        if self.listen.is_empty() {
            return Err("at least one listen address is required".into());
        }
        if l.max_inflight == 0 || l.receive_maximum == 0 {
            return Err("max_inflight and receive_maximum must be at least 1".into());
        }
        if !self.tls_listen.is_empty() && self.security.tls.is_none() {
            return Err("tls_listen needs a [security.tls] section (cert and key)".into());
        }
        if !self.wss_listen.is_empty() && self.security.tls.is_none() {
            return Err("wss_listen needs a [security.tls] section (cert and key)".into());
        }
        if self.admin.tls_cert.is_some() != self.admin.tls_key.is_some() {
            return Err("admin.tls_cert and admin.tls_key go together".into());
        }
        if self.admin.enabled && self.admin.tls && self.admin_tls().is_none() {
            return Err(
                "admin.tls needs admin.tls_cert and admin.tls_key, or a [security.tls] section"
                    .into(),
            );
        }
        if !self.ws_path.starts_with('/') || self.ws_path.contains(['?', '#', ' ']) {
            return Err(format!(
                "ws_path {:?} must be an HTTP path starting with `/` (no query, fragment or space)",
                self.ws_path
            ));
        }
        for a in &self.security.auth.anonymous_listeners {
            if !self.listen.contains(a)
                && !self.tls_listen.contains(a)
                && !self.ws_listen.contains(a)
                && !self.wss_listen.contains(a)
            {
                return Err(format!(
                    "security.auth.anonymous_listeners names {a}, which is not a listener \
                     (listen = {:?}, tls_listen = {:?}, ws_listen = {:?}, wss_listen = {:?})",
                    self.listen, self.tls_listen, self.ws_listen, self.wss_listen
                ));
            }
        }
        for a in &self.proxy_protocol_listeners {
            if !self.listen.contains(a)
                && !self.tls_listen.contains(a)
                && !self.ws_listen.contains(a)
                && !self.wss_listen.contains(a)
            {
                return Err(format!(
                    "proxy_protocol_listeners names {a}, which is not a listener \
                     (listen = {:?}, tls_listen = {:?}, ws_listen = {:?}, wss_listen = {:?})",
                    self.listen, self.tls_listen, self.ws_listen, self.wss_listen
                ));
            }
        }
        let n = &self.engine.nats;
        if self.engine.kind == EngineKind::Nats {
            if n.servers.is_empty() {
                return Err(
                    "[engine] kind = \"nats\" needs [engine.nats] servers (or --nats URL)".into(),
                );
            }
            if self.engine.test_delay_ms != 0 {
                return Err("engine.test_delay_ms is for the embedded engine only".into());
            }
            if n.node_id.as_deref().is_some_and(|id| {
                id.is_empty()
                    || !id
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
            }) {
                return Err("engine.nats.node_id: letters, digits, `-` and `_` only".into());
            }
            if !(1..=5).contains(&n.replicas) {
                return Err("engine.nats.replicas must be 1 to 5".into());
            }
            if n.tls_cert.is_some() != n.tls_key.is_some() {
                return Err("engine.nats.tls_cert and engine.nats.tls_key go together".into());
            }
        }
        if l.max_packet_size < 64 {
            return Err("max_packet_size must be at least 64 bytes".into());
        }
        let a = &self.admin;
        if a.bearer_token.as_deref().is_some_and(|t| t.len() < 16) {
            return Err("admin.bearer_token must be at least 16 characters".into());
        }
        if a.enabled
            && !a.listen.ip().is_loopback()
            && a.keys_file.is_none()
            && a.bearer_token.is_none()
        {
            return Err(format!(
                "admin.listen {} is not a loopback address: the admin API is never served off \
                 loopback without authentication; set admin.keys_file (keys from \
                 `millet ctl key add NAME --file FILE`) or admin.bearer_token",
                a.listen
            ));
        }
        Ok(())
    }

    /// Whether `addr` is a WebSocket listener's built-in default (a busy
    /// default port only leaves that listener off, with a warning, like the
    /// admin API's; a configured one is an error).
    pub fn is_default_ws_listen(&self, addr: SocketAddr) -> bool {
        (addr == default_ws_listen() && self.ws_listen == [default_ws_listen()])
            || (addr == default_wss_listen() && self.wss_listen == [default_wss_listen()])
    }

    /// Settings that are valid but probably not what the operator meant,
    /// as start-up warnings.
    pub fn warnings(&self) -> Vec<String> {
        let l = &self.limits;
        let mut out = Vec::new();
        if (l.max_queued_bytes as u64) < u64::from(l.max_packet_size) {
            out.push(format!(
                "limits.max_queued_bytes ({}) is smaller than limits.max_packet_size ({}): \
                 a message bigger than max_queued_bytes is accepted from its publisher but \
                 dropped for every subscriber that is not reading it at once",
                l.max_queued_bytes, l.max_packet_size
            ));
        }
        if l.memory_budget != 0 && l.memory_budget < l.max_queued_bytes as u64 {
            out.push(format!(
                "limits.memory_budget ({}) is smaller than limits.max_queued_bytes ({}): \
                 one session's queue can fill the whole broker's budget",
                l.memory_budget, l.max_queued_bytes
            ));
        }
        out
    }
}

/// Top-level keys of [`Config`] (for "put it before the first table" hints).
const TOP_LEVEL_KEYS: &[&str] = &[
    "listen",
    "data_dir",
    "sys_interval",
    "shared_strategy",
    "server_reference",
    "server_moved",
    "tls_listen",
    "ws_listen",
    "wss_listen",
    "ws_path",
    "proxy_protocol_listeners",
];

/// A configuration error as an operator reads it: which file, which
/// `[section]` and key, and what was expected (figment's own text says
/// ``found `x`, expected `one of ...` for key "default.a.b"``).
pub fn describe_error(e: &figment::Error) -> String {
    e.clone()
        .into_iter()
        .map(|e| describe_one(&e))
        .collect::<Vec<_>>()
        .join("\n")
}

fn describe_one(e: &figment::Error) -> String {
    use figment::error::Kind;
    let origin = match e.metadata.as_ref() {
        Some(m) => match &m.source {
            Some(figment::Source::File(p)) => format!("{}: ", p.display()),
            _ => format!("{}: ", m.name),
        },
        None => String::new(),
    };
    let (section, key) = match e.path.split_last() {
        Some((k, s)) => (s.join("."), k.as_str()),
        None => (String::new(), ""),
    };
    let place = if section.is_empty() {
        "at the top level".to_string()
    } else {
        format!("in [{section}]")
    };
    match &e.kind {
        Kind::UnknownField(field, expected) => {
            let mut s = format!("{origin}unknown key `{field}` {place}");
            if let Some(near) = nearest(field, expected) {
                s.push_str(&format!(": did you mean `{near}`?"));
            }
            s.push_str(&format!(" (valid keys: {})", expected.join(", ")));
            if !section.is_empty() && TOP_LEVEL_KEYS.contains(&field.as_str()) {
                s.push_str(&format!(
                    ". `{field}` is a top-level key: in a TOML file, top-level keys go before the first [table]"
                ));
            }
            s
        }
        Kind::MissingField(field) => format!("{origin}missing key `{field}` {place}"),
        kind if !key.is_empty() => format!("{origin}`{key}` {place}: {kind}"),
        kind => format!("{origin}{kind}"),
    }
}

/// The candidate within edit distance 2 of `word`, if any.
fn nearest<'a>(word: &str, candidates: &[&'a str]) -> Option<&'a str> {
    candidates
        .iter()
        .map(|c| (edit_distance(word, c), *c))
        .filter(|(d, _)| *d <= 2)
        .min_by_key(|(d, _)| *d)
        .map(|(_, c)| c)
}

fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut cur = vec![i + 1];
        for (j, cb) in b.iter().enumerate() {
            let sub = prev[j] + usize::from(ca != *cb);
            cur.push(sub.min(prev[j + 1] + 1).min(cur[j] + 1));
        }
        prev = cur;
    }
    prev[b.len()]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load_text(text: &str) -> Result<Config, String> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("millet.toml");
        std::fs::write(&path, text).unwrap();
        let cli = Cli {
            config: Some(path),
            ..Cli::default()
        };
        Config::load(&cli).map_err(|e| describe_error(&e))
    }

    #[test]
    fn unknown_keys_read_naturally() {
        let e = load_text("[security.auth.jwtt]\nalgorithm = \"HS256\"\n").unwrap_err();
        assert!(
            e.contains("millet.toml: unknown key `jwtt` in [security.auth]: did you mean `jwt`?"),
            "{e}"
        );
        assert!(!e.contains("default."), "{e}");
        let e = load_text("[limits]\nmax_inflightt = 3\n").unwrap_err();
        assert!(
            e.contains("unknown key `max_inflightt` in [limits]: did you mean `max_inflight`?"),
            "{e}"
        );
        // a top-level key written after a table belongs to that table
        let e = load_text(
            "[security.tls]\ncert = \"c\"\nkey = \"k\"\ntls_listen = [\"127.0.0.1:8883\"]\n",
        )
        .unwrap_err();
        assert!(
            e.contains("top-level keys go before the first [table]"),
            "{e}"
        );
        let e = load_text("listenn = []\n").unwrap_err();
        assert!(
            e.contains("unknown key `listenn` at the top level: did you mean `listen`?"),
            "{e}"
        );
        let e = load_text("[limits]\nmax_inflight = \"many\"\n").unwrap_err();
        assert!(e.contains("`max_inflight` in [limits]"), "{e}");
    }

    #[test]
    fn every_flag_has_a_description() {
        use clap::CommandFactory;
        let cmd = Cli::command();
        for a in cmd.get_arguments() {
            assert!(
                a.get_help().is_some() || a.get_long_help().is_some(),
                "--{} has no description",
                a.get_id()
            );
        }
    }

    #[test]
    fn the_admin_api_is_never_off_loopback_without_keys() {
        let e = load_text("[admin]\nlisten = \"0.0.0.0:18083\"\n").unwrap_err();
        assert!(e.contains("not a loopback address"), "{e}");
        assert!(e.contains("millet ctl key add"), "{e}");
        load_text("[admin]\nlisten = \"0.0.0.0:18083\"\nkeys_file = \"keys\"\n").unwrap();
        load_text("[admin]\nlisten = \"0.0.0.0:18083\"\nenabled = false\n").unwrap();
        let e = load_text("[admin]\nbearer_token = \"short\"\n").unwrap_err();
        assert!(e.contains("at least 16"), "{e}");
        let c = load_text("").unwrap();
        assert!(c.admin.enabled && c.admin.is_default_listen() && c.admin.metrics_auth);
    }

    #[test]
    fn websocket_listeners() {
        let c = load_text("").unwrap();
        assert_eq!(c.ws_listen, [default_ws_listen()]);
        assert!(c.wss_listen.is_empty());
        assert_eq!(c.ws_path, "/mqtt");
        assert!(c.is_default_ws_listen(default_ws_listen()));
        let c = load_text("ws_listen = [\"127.0.0.1:9001\"]\nws_path = \"/ws\"\n").unwrap();
        assert_eq!(
            c.ws_listen,
            ["127.0.0.1:9001".parse::<SocketAddr>().unwrap()]
        );
        assert!(!c.is_default_ws_listen(c.ws_listen[0]));
        assert_eq!(c.ws_path, "/ws");
        let c = load_text("ws_listen = []\n").unwrap();
        assert!(c.ws_listen.is_empty());
        let e = load_text("wss_listen = [\"127.0.0.1:8084\"]\n").unwrap_err();
        assert!(e.contains("wss_listen needs a [security.tls]"), "{e}");
        let e = load_text("ws_path = \"mqtt\"\n").unwrap_err();
        assert!(e.contains("must be an HTTP path"), "{e}");
        let cli = Cli {
            no_ws: true,
            ..Cli::default()
        };
        let c = Config::load(&cli).unwrap();
        assert!(c.ws_listen.is_empty() && c.wss_listen.is_empty());
    }

    #[test]
    fn proxy_protocol_listeners_must_be_listeners() {
        let c = load_text(
            "listen = [\"127.0.0.1:1883\", \"127.0.0.1:1884\"]\nproxy_protocol_listeners = [\"127.0.0.1:1884\"]\n",
        )
        .unwrap();
        assert_eq!(c.proxy_protocol_listeners.len(), 1);
        let e = load_text("proxy_protocol_listeners = [\"127.0.0.1:1999\"]\n").unwrap_err();
        assert!(
            e.contains("proxy_protocol_listeners names 127.0.0.1:1999, which is not a listener"),
            "{e}"
        );
    }

    #[test]
    fn cluster_mode_caps_the_topic_length() {
        if std::env::var_os("MILLET_ENGINE__TEST_DELAY_MS").is_some() {
            // The suite's delaying-engine pass sets it, and cluster mode
            // refuses it (the delaying engine wraps the embedded one).
            let e = load_text(
                "[engine]\nkind = \"nats\"\n[engine.nats]\nservers = [\"nats://a:4222\"]\n",
            )
            .unwrap_err();
            assert!(
                e.contains("test_delay_ms is for the embedded engine only"),
                "{e}"
            );
            return;
        }
        let c =
            load_text("[engine]\nkind = \"nats\"\n[engine.nats]\nservers = [\"nats://a:4222\"]\n")
                .unwrap();
        assert_eq!(c.limits.max_topic_length, CLUSTER_MAX_TOPIC_LENGTH);
        let c = load_text(
            "[engine]\nkind = \"nats\"\n[engine.nats]\nservers = [\"nats://a:4222\"]\n[limits]\nmax_topic_length = 200\n",
        )
        .unwrap();
        assert_eq!(c.limits.max_topic_length, 200, "a lower limit stays");
        assert_eq!(load_text("").unwrap().limits.max_topic_length, 65535);
    }

    #[test]
    fn anonymous_listeners_must_be_listeners() {
        let e = load_text(
            "listen = [\"127.0.0.1:1883\"]\n[security.auth]\nanonymous_listeners = [\"0.0.0.0:1884\"]\n",
        )
        .unwrap_err();
        assert!(
            e.contains("names 0.0.0.0:1884, which is not a listener"),
            "{e}"
        );
    }

    #[test]
    fn limits_that_contradict_each_other_are_warned_about() {
        assert!(load_text("").unwrap().warnings().is_empty(), "defaults");
        let w = load_text("[limits]\nmax_queued_bytes = 4096\n")
            .unwrap()
            .warnings();
        assert_eq!(w.len(), 1, "{w:?}");
        assert!(
            w[0].contains(
                "max_queued_bytes (4096) is smaller than limits.max_packet_size (1048576)"
            ),
            "{w:?}"
        );
        let w = load_text("[limits]\nmemory_budget = 1000000\n")
            .unwrap()
            .warnings();
        assert!(
            w.len() == 1 && w[0].contains("memory_budget (1000000)"),
            "{w:?}"
        );
        let unlimited = load_text("[limits]\nmemory_budget = 0\n").unwrap();
        assert!(unlimited.warnings().is_empty(), "0 is no limit");
    }
}
