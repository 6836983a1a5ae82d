//! Quotas, sans-IO (every time-dependent call takes `now`):
//! - [`TokenBucket`] and [`ClientLimiter`]: per-client messages/s and
//!   bytes/s for incoming PUBLISH. On [`QuotaDecision::Exceeded`] the
//!   protocol answers v5 0x96 (message rate too high) or applies
//!   back-pressure (stop reading for `retry_after`).
//! - [`ConnectionRateLimiter`]: new connections per second per listener.
//! - [`UserConnections`]: most simultaneous connections per username, with an
//!   RAII [`ConnectionPermit`].
//! - [`BanList`]: client id, username, IP or CIDR bans with optional expiry,
//!   changeable at run time.

use std::collections::HashMap;
use std::fmt;
use std::net::IpAddr;
use std::str::FromStr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use ipnet::IpNet;
use parking_lot::{Mutex, RwLock};
use serde::{Deserialize, Serialize};

/// `[security.quota]` section. Zero means "no limit" everywhere.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct QuotaConfig {
    /// Incoming PUBLISH messages per second per client.
    pub messages_per_sec: f64,
    /// Burst for messages (bucket size); 0: one second's worth.
    pub messages_burst: f64,
    /// Incoming PUBLISH payload+topic bytes per second per client.
    pub bytes_per_sec: f64,
    /// Burst for bytes; 0: one second's worth.
    pub bytes_burst: f64,
    /// `"disconnect"` (v5 0x96, v3 close) or `"backpressure"` (delay reads).
    pub on_exceeded: ExceededAction,
    /// New connections per second per listener.
    pub connections_per_sec: f64,
    /// Burst of new connections per listener; 0: one second's worth.
    pub connections_burst: f64,
    /// Simultaneous connections per username.
    pub max_connections_per_user: usize,
    /// Bans at start-up: `"client:ID"`, `"user:NAME"`, `"ip:ADDR_OR_CIDR"`.
    pub bans: Vec<String>,
    /// Bans changeable at run time: a file with one `TARGET [SECONDS]` per
    /// line (`#` comments; SECONDS: expiry from the (re)load, none:
    /// permanent), re-read on SIGHUP and when it changes.
    pub bans_file: Option<std::path::PathBuf>,
}

impl Default for QuotaConfig {
    fn default() -> Self {
        QuotaConfig {
            messages_per_sec: 0.0,
            messages_burst: 0.0,
            bytes_per_sec: 0.0,
            bytes_burst: 0.0,
            on_exceeded: ExceededAction::Disconnect,
            connections_per_sec: 0.0,
            connections_burst: 0.0,
            max_connections_per_user: 0,
            bans: Vec::new(),
            bans_file: None,
        }
    }
}

/// What to do when a client exceeds its message / byte rate.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ExceededAction {
    /// v5: DISCONNECT 0x96 (message rate too high); v3.1.1: close.
    Disconnect,
    /// Stop reading from the client until `retry_after`.
    Backpressure,
}

/// A token bucket: `rate` tokens per second, at most `burst` stored.
#[derive(Debug, Clone)]
pub struct TokenBucket {
    rate: f64,
    burst: f64,
    tokens: f64,
    last: Instant,
}

impl TokenBucket {
    /// A full bucket. `burst <= 0` means one second's worth (`rate`).
    pub fn new(rate: f64, burst: f64, now: Instant) -> TokenBucket {
        let burst = if burst > 0.0 { burst } else { rate.max(1.0) };
        TokenBucket {
            rate: rate.max(0.0),
            burst,
            tokens: burst,
            last: now,
        }
    }

    fn refill(&mut self, now: Instant) {
        let dt = now.saturating_duration_since(self.last).as_secs_f64();
        self.tokens = (self.tokens + dt * self.rate).min(self.burst);
        if now > self.last {
            self.last = now;
        }
    }

    /// Tokens available at `now`.
    pub fn available(&mut self, now: Instant) -> f64 {
        self.refill(now);
        self.tokens
    }

    /// Take `n` tokens if available.
    pub fn try_take(&mut self, n: f64, now: Instant) -> bool {
        self.refill(now);
        if self.tokens >= n {
            self.tokens -= n;
            true
        } else {
            false
        }
    }

    /// Take `n` tokens unconditionally (the balance may go negative: the
    /// debt is paid back before anything else passes). Returns how long
    /// until the balance is back at zero (zero if it never went below).
    pub fn take_with_debt(&mut self, n: f64, now: Instant) -> Duration {
        self.refill(now);
        self.tokens -= n;
        self.wait_for(0.0)
    }

    /// How long until `n` tokens are available (zero if they are now).
    pub fn time_until(&mut self, n: f64, now: Instant) -> Duration {
        self.refill(now);
        self.wait_for(n)
    }

    fn wait_for(&self, n: f64) -> Duration {
        if self.tokens >= n {
            return Duration::ZERO;
        }
        if self.rate <= 0.0 {
            return Duration::MAX;
        }
        Duration::from_secs_f64((n - self.tokens) / self.rate)
    }
}

/// Result of a quota check.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QuotaDecision {
    Allow,
    /// Over quota; tokens would be available after `retry_after`.
    Exceeded {
        retry_after: Duration,
    },
}

/// One client's message and byte buckets.
#[derive(Debug, Clone)]
pub struct ClientLimiter {
    messages: Option<TokenBucket>,
    bytes: Option<TokenBucket>,
}

impl ClientLimiter {
    /// Buckets per `cfg` (a zero rate disables that bucket).
    pub fn new(cfg: &QuotaConfig, now: Instant) -> ClientLimiter {
        ClientLimiter {
            messages: (cfg.messages_per_sec > 0.0)
                .then(|| TokenBucket::new(cfg.messages_per_sec, cfg.messages_burst, now)),
            bytes: (cfg.bytes_per_sec > 0.0)
                .then(|| TokenBucket::new(cfg.bytes_per_sec, cfg.bytes_burst, now)),
        }
    }

    /// Whether any limit is configured.
    pub fn is_limited(&self) -> bool {
        self.messages.is_some() || self.bytes.is_some()
    }

    /// Account one incoming PUBLISH of `bytes` bytes. Both buckets must
    /// have room; nothing is taken when one of them does not.
    pub fn check_publish(&mut self, bytes: usize, now: Instant) -> QuotaDecision {
        let b = bytes as f64;
        let mut wait = Duration::ZERO;
        if let Some(m) = &mut self.messages {
            wait = wait.max(m.time_until(1.0, now));
        }
        if let Some(bb) = &mut self.bytes {
            // A message larger than the burst could never pass: let it
            // through when the bucket is full, paying the debt afterwards.
            let need = b.min(bb.burst);
            wait = wait.max(bb.time_until(need, now));
        }
        if wait > Duration::ZERO {
            return QuotaDecision::Exceeded { retry_after: wait };
        }
        if let Some(m) = &mut self.messages {
            m.try_take(1.0, now);
        }
        if let Some(bb) = &mut self.bytes {
            bb.take_with_debt(b, now);
        }
        QuotaDecision::Allow
    }
}

/// New-connection rate limit for one listener (shared by its accept loop).
#[derive(Debug)]
pub struct ConnectionRateLimiter {
    bucket: Option<Mutex<TokenBucket>>,
}

impl ConnectionRateLimiter {
    /// `per_sec == 0`: unlimited.
    pub fn new(per_sec: f64, burst: f64, now: Instant) -> ConnectionRateLimiter {
        ConnectionRateLimiter {
            bucket: (per_sec > 0.0).then(|| Mutex::new(TokenBucket::new(per_sec, burst, now))),
        }
    }

    /// May one more connection be accepted now?
    pub fn allow(&self, now: Instant) -> bool {
        match &self.bucket {
            Some(b) => b.lock().try_take(1.0, now),
            None => true,
        }
    }
}

/// Counts connections per username against a maximum.
#[derive(Debug)]
pub struct UserConnections {
    max: usize,
    counts: Arc<Mutex<HashMap<String, usize>>>,
}

/// Held while a connection counts against its username; released on drop.
#[derive(Debug)]
pub struct ConnectionPermit {
    user: String,
    counts: Arc<Mutex<HashMap<String, usize>>>,
}

impl Drop for ConnectionPermit {
    fn drop(&mut self) {
        let mut c = self.counts.lock();
        if let Some(n) = c.get_mut(&self.user) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                c.remove(&self.user);
            }
        }
    }
}

impl UserConnections {
    /// `max == 0`: unlimited (permits are still counted).
    pub fn new(max: usize) -> UserConnections {
        UserConnections {
            max,
            counts: Arc::default(),
        }
    }

    /// A permit for one more connection of `user`, or `None` at the limit
    /// (CONNACK 0x97 quota exceeded / 0x87 for v3).
    pub fn try_acquire(&self, user: &str) -> Option<ConnectionPermit> {
        let mut c = self.counts.lock();
        let n = c.entry(user.to_string()).or_insert(0);
        if self.max > 0 && *n >= self.max {
            return None;
        }
        *n += 1;
        Some(ConnectionPermit {
            user: user.to_string(),
            counts: self.counts.clone(),
        })
    }

    /// Current connections of `user`.
    pub fn count(&self, user: &str) -> usize {
        self.counts.lock().get(user).copied().unwrap_or(0)
    }
}

/// What a ban applies to.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum BanTarget {
    ClientId(String),
    Username(String),
    /// An address (as a /32 or /128) or a network.
    Ip(IpNet),
}

impl fmt::Display for BanTarget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            BanTarget::ClientId(c) => write!(f, "client:{c}"),
            BanTarget::Username(u) => write!(f, "user:{u}"),
            BanTarget::Ip(n) => write!(f, "ip:{n}"),
        }
    }
}

impl FromStr for BanTarget {
    type Err = String;
    /// `client:ID`, `user:NAME`, `ip:1.2.3.4`, `ip:10.0.0.0/8`, `ip:::1`.
    fn from_str(s: &str) -> Result<Self, String> {
        let (kind, v) = s
            .split_once(':')
            .ok_or_else(|| format!("ban {s:?}: expected client:ID, user:NAME or ip:ADDR[/LEN]"))?;
        if v.is_empty() {
            return Err(format!("ban {s:?}: empty value"));
        }
        match kind {
            "client" | "client_id" => Ok(BanTarget::ClientId(v.to_string())),
            "user" | "username" => Ok(BanTarget::Username(v.to_string())),
            "ip" => {
                if let Ok(n) = v.parse::<IpNet>() {
                    Ok(BanTarget::Ip(n.trunc()))
                } else {
                    let a: IpAddr = v.parse().map_err(|e| format!("ban {s:?}: {e}"))?;
                    Ok(BanTarget::Ip(IpNet::from(a.to_canonical())))
                }
            }
            k => Err(format!("ban {s:?}: unknown kind {k:?}")),
        }
    }
}

/// Parse a ban file: `TARGET [SECONDS]` per line, `#` comments.
pub fn parse_ban_file(text: &str) -> Result<Vec<(BanTarget, Option<Duration>)>, String> {
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let line = line.split('#').next().unwrap_or("").trim();
        if line.is_empty() {
            continue;
        }
        let mut it = line.split_whitespace();
        let target: BanTarget = it
            .next()
            .unwrap_or_default()
            .parse()
            .map_err(|e| format!("line {}: {e}", i + 1))?;
        let duration = match it.next() {
            Some(s) => {
                Some(Duration::from_secs(s.parse().map_err(|e| {
                    format!("line {}: seconds {s:?}: {e}", i + 1)
                })?))
            }
            None => None,
        };
        if it.next().is_some() {
            return Err(format!("line {}: expected TARGET [SECONDS]", i + 1));
        }
        out.push((target, duration));
    }
    Ok(out)
}

/// One ban as listed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ban {
    pub target: BanTarget,
    /// `None`: permanent.
    pub until: Option<Instant>,
}

/// The ban list: reads take a shared lock; expired entries are ignored and
/// removed by [`BanList::prune`] (or replaced by a new ban).
#[derive(Debug, Default)]
pub struct BanList {
    inner: RwLock<Bans>,
    /// Counts bans added: connection tasks watch it and check themselves
    /// against the list, so a new ban disconnects matching live clients.
    added: tokio::sync::watch::Sender<u64>,
}

#[derive(Debug, Default)]
struct Bans {
    clients: HashMap<String, Option<Instant>>,
    users: HashMap<String, Option<Instant>>,
    nets: Vec<(IpNet, Option<Instant>)>,
}

fn live(until: &Option<Instant>, now: Instant) -> bool {
    until.is_none_or(|u| now < u)
}

impl BanList {
    pub fn new() -> BanList {
        BanList::default()
    }

    /// Ban `target` for `duration` from `now` (`None`: permanently).
    /// Replaces an existing ban of the same target.
    pub fn ban(&self, target: BanTarget, duration: Option<Duration>, now: Instant) {
        // A duration too large for the clock is a permanent ban.
        let until = duration.and_then(|d| now.checked_add(d));
        let mut b = self.inner.write();
        self.added.send_modify(|n| *n += 1);
        match target {
            BanTarget::ClientId(c) => {
                b.clients.insert(c, until);
            }
            BanTarget::Username(u) => {
                b.users.insert(u, until);
            }
            BanTarget::Ip(n) => {
                b.nets.retain(|(x, _)| *x != n);
                b.nets.push((n, until));
            }
        }
    }

    /// Changes each time a ban is added: a connection re-checks itself.
    pub fn watch_added(&self) -> tokio::sync::watch::Receiver<u64> {
        self.added.subscribe()
    }

    /// Lift a ban; `false` if there was none.
    pub fn unban(&self, target: &BanTarget) -> bool {
        let mut b = self.inner.write();
        match target {
            BanTarget::ClientId(c) => b.clients.remove(c).is_some(),
            BanTarget::Username(u) => b.users.remove(u).is_some(),
            BanTarget::Ip(n) => {
                let before = b.nets.len();
                b.nets.retain(|(x, _)| x != n);
                b.nets.len() != before
            }
        }
    }

    /// Is this address banned (checked at accept time, before CONNECT)?
    pub fn ip_banned(&self, ip: IpAddr, now: Instant) -> Option<BanTarget> {
        let ip = ip.to_canonical();
        let b = self.inner.read();
        b.nets
            .iter()
            .find(|(n, until)| live(until, now) && n.contains(&ip))
            .map(|(n, _)| BanTarget::Ip(*n))
    }

    /// The first live ban matching this connection, if any.
    pub fn check(
        &self,
        client_id: &str,
        username: Option<&str>,
        ip: Option<IpAddr>,
        now: Instant,
    ) -> Option<BanTarget> {
        {
            let b = self.inner.read();
            if b.clients.get(client_id).is_some_and(|u| live(u, now)) {
                return Some(BanTarget::ClientId(client_id.to_string()));
            }
            if let Some(user) = username {
                if b.users.get(user).is_some_and(|u| live(u, now)) {
                    return Some(BanTarget::Username(user.to_string()));
                }
            }
        }
        ip.and_then(|ip| self.ip_banned(ip, now))
    }

    /// Drop expired bans; returns how many were removed.
    pub fn prune(&self, now: Instant) -> usize {
        let mut b = self.inner.write();
        let before = b.clients.len() + b.users.len() + b.nets.len();
        b.clients.retain(|_, u| live(u, now));
        b.users.retain(|_, u| live(u, now));
        b.nets.retain(|(_, u)| live(u, now));
        before - (b.clients.len() + b.users.len() + b.nets.len())
    }

    /// Live bans.
    pub fn list(&self, now: Instant) -> Vec<Ban> {
        let b = self.inner.read();
        let mut out: Vec<Ban> = b
            .clients
            .iter()
            .map(|(c, u)| (BanTarget::ClientId(c.clone()), *u))
            .chain(
                b.users
                    .iter()
                    .map(|(c, u)| (BanTarget::Username(c.clone()), *u)),
            )
            .chain(b.nets.iter().map(|(n, u)| (BanTarget::Ip(*n), *u)))
            .filter(|(_, u)| live(u, now))
            .map(|(target, until)| Ban { target, until })
            .collect();
        out.sort_by_key(|b| b.target.to_string());
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    fn close(a: Duration, b: Duration) -> bool {
        let d = a.abs_diff(b);
        d < Duration::from_micros(10)
    }

    #[test]
    fn token_bucket_refills_at_rate() {
        let t0 = Instant::now();
        let mut b = TokenBucket::new(10.0, 5.0, t0);
        for _ in 0..5 {
            assert!(b.try_take(1.0, t0));
        }
        assert!(!b.try_take(1.0, t0));
        assert!(close(b.time_until(1.0, t0), ms(100)));
        assert!(!b.try_take(1.0, t0 + ms(50)));
        assert!(b.try_take(1.0, t0 + ms(100)));
        // never above burst
        assert!((b.available(t0 + Duration::from_secs(100)) - 5.0).abs() < 1e-9);
        // time going backwards does not mint tokens
        let mut c = TokenBucket::new(1.0, 1.0, t0 + ms(10));
        assert!(c.try_take(1.0, t0));
        assert!(!c.try_take(1.0, t0));
    }

    #[test]
    fn client_limiter_messages_and_bytes() {
        let t0 = Instant::now();
        let cfg = QuotaConfig {
            messages_per_sec: 2.0,
            bytes_per_sec: 100.0,
            ..Default::default()
        };
        let mut l = ClientLimiter::new(&cfg, t0);
        assert!(l.is_limited());
        assert_eq!(l.check_publish(10, t0), QuotaDecision::Allow);
        assert_eq!(l.check_publish(10, t0), QuotaDecision::Allow);
        match l.check_publish(10, t0) {
            QuotaDecision::Exceeded { retry_after } => assert!(close(retry_after, ms(500))),
            d => panic!("{d:?}"),
        }
        assert_eq!(l.check_publish(10, t0 + ms(500)), QuotaDecision::Allow);
        // bytes: 70 left at most, after 1s full again (100)
        let t1 = t0 + Duration::from_secs(2);
        assert_eq!(l.check_publish(90, t1), QuotaDecision::Allow);
        assert!(matches!(
            l.check_publish(50, t1),
            QuotaDecision::Exceeded { .. }
        ));
        // an oversized message passes on a full bucket and leaves a debt
        let t2 = t1 + Duration::from_secs(5);
        assert_eq!(l.check_publish(300, t2), QuotaDecision::Allow);
        match l.check_publish(1, t2 + Duration::from_secs(1)) {
            QuotaDecision::Exceeded { retry_after } => assert!(close(retry_after, ms(1010))),
            d => panic!("{d:?}"),
        }
        let unlimited = ClientLimiter::new(&QuotaConfig::default(), t0);
        assert!(!unlimited.is_limited());
    }

    #[test]
    fn connection_rate() {
        let t0 = Instant::now();
        let r = ConnectionRateLimiter::new(1.0, 2.0, t0);
        assert!(r.allow(t0));
        assert!(r.allow(t0));
        assert!(!r.allow(t0));
        assert!(r.allow(t0 + Duration::from_secs(1)));
        let u = ConnectionRateLimiter::new(0.0, 0.0, t0);
        assert!((0..1000).all(|_| u.allow(t0)));
    }

    #[test]
    fn per_user_connections() {
        let u = UserConnections::new(2);
        let a = u.try_acquire("alice");
        let b = u.try_acquire("alice");
        assert!(a.is_some() && b.is_some());
        assert!(u.try_acquire("alice").is_none());
        assert!(u.try_acquire("bob").is_some());
        assert_eq!(u.count("alice"), 2);
        drop(a);
        assert_eq!(u.count("alice"), 1);
        assert!(u.try_acquire("alice").is_some());
    }

    #[test]
    fn ban_list() {
        let t0 = Instant::now();
        let bans = BanList::new();
        let ip = |s: &str| s.parse::<IpAddr>().ok();
        bans.ban("client:bad".parse().unwrap(), None, t0);
        bans.ban(
            "user:eve".parse().unwrap(),
            Some(Duration::from_secs(10)),
            t0,
        );
        bans.ban("ip:192.0.2.0/24".parse().unwrap(), None, t0);
        bans.ban("ip:2001:db8::1".parse().unwrap(), None, t0);
        assert_eq!(
            bans.check("bad", None, None, t0),
            Some(BanTarget::ClientId("bad".into()))
        );
        assert_eq!(
            bans.check("ok", Some("eve"), None, t0),
            Some(BanTarget::Username("eve".into()))
        );
        assert!(bans
            .check("ok", Some("eve"), None, t0 + Duration::from_secs(10))
            .is_none());
        assert!(bans.check("ok", None, ip("192.0.2.77"), t0).is_some());
        assert!(bans
            .check("ok", None, ip("::ffff:192.0.2.77"), t0)
            .is_some());
        assert!(bans.check("ok", None, ip("192.0.3.1"), t0).is_none());
        assert!(bans.check("ok", None, ip("2001:db8::1"), t0).is_some());
        assert!(bans.check("ok", None, ip("2001:db8::2"), t0).is_none());
        assert_eq!(bans.list(t0).len(), 4);
        assert_eq!(bans.prune(t0 + Duration::from_secs(11)), 1);
        assert!(bans.unban(&"ip:192.0.2.0/24".parse().unwrap()));
        assert!(!bans.unban(&"ip:192.0.2.0/24".parse().unwrap()));
        assert!(bans.check("ok", None, ip("192.0.2.77"), t0).is_none());
        assert!(bans.unban(&BanTarget::ClientId("bad".into())));
        assert!(bans.check("bad", None, None, t0).is_none());
        assert!("nope".parse::<BanTarget>().is_err());
        assert!("ip:300.1.1.1".parse::<BanTarget>().is_err());
        assert!("host:x".parse::<BanTarget>().is_err());
        assert_eq!(
            "ip:10.1.2.3/8".parse::<BanTarget>().unwrap().to_string(),
            "ip:10.0.0.0/8"
        );
    }
}
