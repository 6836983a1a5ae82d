//! The node: what one gateway process holds about itself, whatever engine
//! it runs on: its configuration, its counters, its security settings and
//! its memory meter. Connections (the protocol state machine and the
//! driver) reach it through [`crate::protocol::Shared`] and never reach
//! the broker; the embedded engine ([`crate::broker::Broker`]) keeps a
//! reference of its own for what it counts and limits. A networked engine
//! would do the same: these are per-process facts, not replicated state.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};

use crate::auth::Authenticator;
use crate::broker::{Overload, Stats};
use crate::budget::{Meter, Pressure};
use crate::config::Config;
use crate::security::Security;

pub struct Node {
    pub config: Config,
    /// Node-wide counters (`$SYS`, metrics, the admin API).
    pub stats: Stats,
    /// What the limits refused (logged at a throttled rate, in `$SYS`).
    pub overload: Overload,
    /// Authorization, quotas and bans ([`crate::security`]); unset: allow all.
    security: OnceLock<Arc<Security>>,
    /// Bytes held by session queues and in-flight windows (`memory_budget`).
    pub(crate) meter: Arc<Meter>,
    /// Bytes of the retained messages held here (topic + payload), `$SYS`
    /// topics not included; changed only under the retained store's lock.
    pub(crate) retained_bytes: AtomicU64,
    /// The enhanced-authentication provider (MQTT 5 AUTH); unset: none.
    authenticator: OnceLock<Arc<dyn Authenticator>>,
    /// Test hook, see [`Node::panic_on_publish_to`].
    panic_topic: OnceLock<Box<str>>,
}

impl Node {
    pub fn new(config: Config) -> Node {
        Node {
            config,
            stats: Stats::default(),
            overload: Overload::default(),
            security: OnceLock::new(),
            meter: Arc::default(),
            retained_bytes: AtomicU64::new(0),
            authenticator: OnceLock::new(),
            panic_topic: OnceLock::new(),
        }
    }

    /// Install the security layer (ACL, quotas, bans) consulted by
    /// connections. Once, before the first connection: a second call
    /// leaves the first in place (and says so).
    pub fn set_security(&self, s: Arc<Security>) {
        if self.security.set(s).is_err() {
            tracing::warn!("security layer installed twice; the first stays");
        }
    }

    pub fn security(&self) -> Option<&Arc<Security>> {
        self.security.get()
    }

    /// Install the enhanced-authentication provider (MQTT 5 AUTH), once.
    pub fn set_authenticator(&self, a: Arc<dyn Authenticator>) {
        if self.authenticator.set(a).is_err() {
            tracing::warn!("authenticator installed twice; the first stays");
        }
    }

    pub fn authenticator(&self) -> Option<&Arc<dyn Authenticator>> {
        self.authenticator.get()
    }

    /// Bytes held in session queues, in-flight windows and the retained
    /// store, as counted against `limits.memory_budget`.
    pub fn memory_used(&self) -> u64 {
        self.meter
            .used()
            .saturating_add(self.retained_bytes.load(Ordering::Relaxed))
    }

    /// Where the node stands against its memory budget.
    pub fn memory_pressure(&self) -> Pressure {
        Pressure::of(self.memory_used(), self.config.limits.memory_budget)
    }

    /// Test hook: the connection task that handles a PUBLISH to `topic`
    /// panics (to test that a panicking connection task still detaches its
    /// session). Only tests call it; peers and configuration cannot set it.
    #[doc(hidden)]
    pub fn panic_on_publish_to(&self, topic: &str) {
        let _ = self.panic_topic.set(topic.into());
    }

    /// Whether a PUBLISH to `topic` must panic (see [`Node::panic_on_publish_to`]).
    pub(crate) fn injected_panic(&self, topic: &str) -> bool {
        self.panic_topic.get().is_some_and(|t| **t == *topic)
    }
}
