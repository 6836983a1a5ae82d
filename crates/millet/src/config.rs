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
    /// Authentication chain, ACL, quotas, bans and TLS (`[security.auth]`,
    /// `[security.acl]`, `[security.quota]`, `[security.tls]`; see
    /// [`crate::security`]).
    pub security: crate::security::SecurityConfig,
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
    /// Longest topic name or filter, bytes.
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
    /// Longest session expiry interval granted, seconds.
    pub max_session_expiry: u32,
    /// Seconds a new connection has to send CONNECT.
    pub connect_timeout: u64,
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
            security: crate::security::SecurityConfig::default(),
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
            max_session_expiry: u32::MAX,
            connect_timeout: 10,
        }
    }
}

/// Top-level keys settable through `MILLET_<KEY>`.
const ENV_KEYS: &[&str] = &[
    "listen",
    "data_dir",
    "sys_interval",
    "shared_strategy",
    "tls_listen",
    "server_reference",
    "server_moved",
];
/// Sections settable through `MILLET_<SECTION>__<KEY>`.
const ENV_SECTIONS: &[&str] = &["limits__", "store__", "security__"];

/// Command-line flags. Every flag also reads an environment variable.
#[derive(Debug, clap::Parser, Default)]
#[command(
    name = "millet",
    version,
    about = "Millet MQTT gateway",
    after_help = "Password file: millet passwd FILE USER [--password PW | --delete] \
                  (argon2id; without --password the password is read from stdin)"
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
    /// Data directory for the embedded store.
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
    #[arg(long)]
    pub sys_interval: Option<u64>,
    #[arg(long, value_enum)]
    pub shared_strategy: Option<ShareStrategyConfig>,
    /// Redirect MQTT 5 clients to this server (CONNACK 0x9C + server reference).
    #[arg(long)]
    pub server_reference: Option<String>,
    #[arg(long)]
    pub max_connections: Option<usize>,
    #[arg(long)]
    pub max_packet_size: Option<u32>,
    #[arg(long)]
    pub max_inflight: Option<u16>,
    #[arg(long)]
    pub receive_maximum: Option<u16>,
    #[arg(long)]
    pub max_queued: Option<usize>,
    #[arg(long)]
    pub backpressure_queued: Option<usize>,
    #[arg(long)]
    pub max_subscriptions: Option<usize>,
    #[arg(long)]
    pub max_keepalive: Option<u16>,
    #[arg(long)]
    pub topic_alias_max: Option<u16>,
    #[arg(long)]
    pub connect_timeout: Option<u64>,
    /// Durability of acknowledged messages: sync, interval or none (memory only).
    #[arg(long, value_enum)]
    pub durability: Option<DurabilityConfig>,
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
        set!(l.max_subscriptions, cli.max_subscriptions);
        set!(l.backpressure_queued, cli.backpressure_queued);
        set!(l.max_keepalive, cli.max_keepalive);
        set!(l.topic_alias_max, cli.topic_alias_max);
        set!(l.connect_timeout, cli.connect_timeout);
        set!(cfg.store.durability, cli.durability);
        cfg.validate()
            .map_err(|e| Box::new(figment::Error::from(e)))?;
        Ok(cfg)
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
        if l.max_packet_size < 64 {
            return Err("max_packet_size must be at least 64 bytes".into());
        }
        Ok(())
    }
}
