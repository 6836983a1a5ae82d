//! The broker: routing and everything shared between connections. No IO
//! and no clock: time comes in as `now`, and the server's ticker calls
//! [`Broker::handle_timeout`]. The state is split by owner:
//!
//! | file | owns |
//! | --- | --- |
//! | `mod.rs` | [`Broker`] itself, its constructor, the ticker ([`Broker::handle_timeout`]); configuration, counters, security and the memory meter are its [`Node`]'s |
//! | `registry.rs` | client id → session cell (`registry`), attach / takeover / detach, session expiry (`expiries`) |
//! | `route.rs` | the subscription index (`index`): subscribe, unsubscribe, publish routing and delivery into session queues, back-pressure |
//! | `wills.rs` | will publication and the wills waiting for their delay (`delayed_wills`) |
//! | `retained.rs` | the retained messages (`retained`, their counts and limits), replay on subscribe, expiry |
//! | `recovery.rs` | nothing at run time: [`Broker::open`] and restoring the state above from the store |
//! | `persist.rs` | the store handle (`persist`), store records, durability tickets |
//! | `stats.rs` | the counters' types (the node holds them: `node.stats`, `node.overload`) |
//! | `sys.rs` | `$SYS` publication (`sys`) |
//! | `admin.rs` | nothing: the admin API's queries and commands on the state above |
//! | `index.rs` | the subscription index's data structure |
//!
//! Lock order (never acquire against it): `registry` → a session's `state`.
//! A session's `state` lock is never held while taking `index` or `retained`,
//! because publishers hold `index` (read) while they take session locks.

pub mod admin;
pub mod index;
pub mod persist;
mod recovery;
mod registry;
pub mod retained;
mod route;
mod stats;
mod sys;
mod wills;
pub(crate) use sys::rss_bytes;
#[cfg(test)]
mod topic_tree_tests;

pub use registry::{qos2_digest, Attached, MovedSession, Qos2Resume, SessionRefusal};
pub use route::{IndexEntry, Routed, Scope, SubscribeOutcome};
pub use stats::{
    AuthFailure, AuthFailures, Direction, Overload, QosCounters, Stats, LATENCY_SAMPLE_EVERY,
};

use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytestring::ByteString;
use millet_codec::topic;
use parking_lot::{Mutex, RwLock};

use crate::auth::Authenticator;
use crate::config::{Config, ShareStrategyConfig};
use crate::node::Node;
use crate::session::{Message, SessionId};
use index::{ShareStrategy, SubscriptionIndex};
use retained::RetainedStore;
use route::DropLines;
use wills::DelayedWill;

pub struct Broker {
    /// Configuration, counters, security and the memory meter: the
    /// process's own ([`Node`]), shared with its connections.
    pub node: Arc<Node>,
    index: RwLock<SubscriptionIndex<SessionId, IndexEntry>>,
    retained: RwLock<RetainedStore<Arc<Message>>>,
    registry: Mutex<registry::Registry>,
    /// Every session's queue limits and memory meter (one, shared).
    queue_limits: Arc<crate::session::QueueLimits>,
    delayed_wills: Mutex<Vec<DelayedWill>>,
    /// When offline sessions expire, soonest first: the ticker looks at the
    /// due ones only, instead of every session every tick. Entries are
    /// checked against the session when due (a session that reconnected
    /// or changed its expiry since is skipped: lazy deletion).
    expiries: Mutex<std::collections::BinaryHeap<std::cmp::Reverse<(Instant, ByteString)>>>,
    next_session_id: AtomicU64,
    next_epoch: AtomicU64,
    started: Instant,
    sys: Mutex<sys::SysState>,
    /// The embedded store; `None` runs in memory only.
    persist: Option<persist::Persistence>,
    last_sweep: Mutex<Option<Instant>>,
    /// Broker-wide cap on the per-session "queue full" lines.
    drop_lines: Mutex<DropLines>,
    /// Retained messages (their bytes are the node's, `Node::retained_bytes`),
    /// `$SYS` topics not included; changed only under the `retained` write lock.
    retained_count: AtomicU64,
    /// The other nodes of a cluster ([`ClusterLink`]); unset on one node.
    cluster: std::sync::OnceLock<Arc<dyn ClusterLink>>,
}

/// What routing needs from a cluster (the NATS engine,
/// [`crate::engine::nats`]): a publish made on this node is forwarded to
/// the nodes with interest in it, and the filters this node's sessions
/// hold are its interest. Shared subscriptions are the cluster's: a message
/// reaches one member of a group cluster-wide, so this node routes a local
/// publish to its plain subscriptions only ([`Scope::Plain`]) and gets its
/// share of every group's messages back from the cluster
/// ([`Broker::route_from_cluster`]).
pub trait ClusterLink: Send + Sync + 'static {
    /// Send `msg`, just routed on this node, to the other nodes; with
    /// `retain`, also keep it as the cluster's retained message for its
    /// topic (an empty payload clears it). The ticket its acknowledgement
    /// waits for (none: nothing).
    fn forward(&self, msg: &Message, retain: bool) -> persist::Ticket;
    /// A ticket done once both are ([`crate::engine::Engine::join_tickets`]).
    fn join_tickets(&self, a: persist::Ticket, b: persist::Ticket) -> persist::Ticket;
    /// Queue the cluster's retained messages matching `replay`'s filter on
    /// `cell`'s session (with this node's own `$SYS` ones), once found:
    /// [`Broker::replay_messages`].
    fn replay_retained(
        &self,
        cell: &Arc<crate::session::SessionCell>,
        replay: &crate::session::DeferredReplay,
    );
    /// The first subscription of this node to `filter` (`share`: the
    /// group of a shared subscription) was made.
    fn interest_added(&self, filter: &str, share: Option<&str>);
    /// The last subscription of this node to `filter` (in `share`) went.
    fn interest_removed(&self, filter: &str, share: Option<&str>);
    /// A QoS 1/2 message of the shared subscription `$share/{group}/{filter}`
    /// whose member left without acknowledging it, and which has no other
    /// member on this node: give it to a member on another node.
    fn redeliver_shared(&self, group: &str, filter: &str, msg: &Message);
    /// The session of `client_id` ended on this node (expired, discarded
    /// by a clean start, or moved to another node).
    fn session_ended(&self, client_id: &str);
}

impl Broker {
    pub fn new(config: Config, now: Instant) -> Broker {
        Broker::on_node(Arc::new(Node::new(config)), now)
    }

    /// The broker of `node` (its configuration, counters and meter).
    pub fn on_node(node: Arc<Node>, now: Instant) -> Broker {
        let strategy = match node.config.shared_strategy {
            ShareStrategyConfig::RoundRobin => ShareStrategy::RoundRobin,
            ShareStrategyConfig::Random => ShareStrategy::Random,
            ShareStrategyConfig::HashClientId => ShareStrategy::HashClientId,
        };
        let queue_limits = Arc::new(crate::session::QueueLimits {
            max_queued: node.config.limits.max_queued,
            max_queued_bytes: node.config.limits.max_queued_bytes,
            meter: node.meter.clone(),
        });
        Broker {
            node,
            index: RwLock::new(SubscriptionIndex::new(strategy)),
            retained: RwLock::new(RetainedStore::new()),
            registry: Mutex::default(),
            queue_limits,
            delayed_wills: Mutex::new(Vec::new()),
            expiries: Mutex::default(),
            next_session_id: AtomicU64::new(1),
            next_epoch: AtomicU64::new(1),
            started: now,
            sys: Mutex::new(sys::SysState::default()),
            persist: None,
            last_sweep: Mutex::new(None),
            drop_lines: Mutex::default(),
            retained_count: AtomicU64::new(0),
            cluster: std::sync::OnceLock::new(),
        }
    }

    /// Join a cluster: from now on publishes are forwarded through `link`
    /// and subscriptions change its interest. Called once, before serving;
    /// the subscriptions restored from the store are reported to it here.
    pub fn join_cluster(&self, link: Arc<dyn ClusterLink>) -> anyhow::Result<()> {
        if self.cluster.set(link.clone()).is_err() {
            anyhow::bail!("this node is already in a cluster");
        }
        let cells: Vec<Arc<crate::session::SessionCell>> =
            self.registry.lock().values().cloned().collect();
        let mut seen = std::collections::HashSet::new();
        for cell in cells {
            let st = cell.state.lock();
            for (filter, sub) in st.session.subscriptions.iter() {
                if !seen.insert(filter.clone()) {
                    continue;
                }
                match topic::parse_shared(filter) {
                    Ok(Some(sf)) if sub.share_group.is_some() => {
                        link.interest_added(sf.filter, Some(sf.group))
                    }
                    _ => link.interest_added(filter, None),
                }
            }
        }
        Ok(())
    }

    pub(crate) fn cluster(&self) -> Option<&Arc<dyn ClusterLink>> {
        self.cluster.get()
    }

    /// Install the security layer (ACL, quotas, bans) consulted by connections.
    pub fn with_security(self, s: Arc<crate::security::Security>) -> Broker {
        self.node.set_security(s);
        self
    }

    /// Install the enhanced-authentication provider (MQTT 5 AUTH).
    pub fn with_authenticator(self, a: Arc<dyn Authenticator>) -> Broker {
        self.node.set_authenticator(a);
        self
    }

    pub fn uptime(&self, now: Instant) -> Duration {
        now.saturating_duration_since(self.started)
    }

    /// Time-driven work: delayed wills, session expiry, retained expiry,
    /// `$SYS` publication. Call it about once a second.
    pub fn handle_timeout(&self, now: Instant) {
        self.publish_due_wills(now);
        self.expire_sessions(now);
        self.expire_retained(now);
        self.node.overload.log(
            now,
            self.node.memory_used(),
            self.node.config.limits.memory_budget,
        );
        if let Some(p) = &self.persist {
            let mut last = self.last_sweep.lock();
            if last.is_none_or(|t| now.saturating_duration_since(t) >= Duration::from_secs(30)) {
                *last = Some(now);
                p.sweep();
            }
        }
        sys::tick(self, now);
    }
}
