//! Retained message store: one retained message per topic name, found by
//! topic filter when a client subscribes (OASIS MQTT 5.0 section 3.3.1.3).
//!
//! Owns the retained messages: this trie ([`RetainedStore`]) and, in the
//! `impl Broker` at the end, the broker's `retained`, `retained_count` and
//! `retained_bytes`: the limits on new retained topics, the counts, replay
//! on subscribe, and expiry. (Storing or clearing a retained message as
//! part of a publish is in `route.rs`, [`Broker::publish`].)
//!
//! # Structure
//!
//! A trie of topic levels (`/`-separated, empty levels included), with
//! children in an `ahash` map keyed by `Box<str>`. A node holds an `Entry`
//! (the full topic name and the message) when a message is retained on the
//! topic that ends there. Storing the topic name lets matching hand out
//! `&str` topics without building strings.
//!
//! Matching a filter walks the trie along the filter: a literal level is one
//! hash lookup, `+` visits every child, `#` visits the node itself (the parent
//! level) and its whole subtree. So a subscription to `devices/123/#` costs
//! the size of that subtree, whatever else is retained. As in the
//! subscription index, a `+` or `#` first filter level skips topics starting
//! with `$` [MQTT-4.7.2-1].
//!
//! Every walk uses an explicit stack (no recursion) and `Node`'s `Drop` is
//! iterative, so topics with tens of thousands of levels cannot overflow the
//! thread stack. Removal prunes nodes left without a message or children.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

use ahash::AHashMap;
use millet_codec::topic::is_sys_topic;
use smallvec::SmallVec;

use super::Broker;
use crate::session::{Delivery, Enqueued, Message, SessionCell};

/// A retained message and the topic it was published on.
#[derive(Debug)]
struct Entry<M> {
    topic: Box<str>,
    msg: M,
}

#[derive(Debug)]
struct Node<M> {
    children: AHashMap<Box<str>, Node<M>>,
    entry: Option<Entry<M>>,
}

impl<M> Node<M> {
    fn new() -> Self {
        Self {
            children: AHashMap::new(),
            entry: None,
        }
    }
}

impl<M> Drop for Node<M> {
    /// Iterative drop: a very deep chain must not overflow the stack.
    fn drop(&mut self) {
        if self.children.is_empty() {
            return;
        }
        let mut stack: Vec<Node<M>> = self.children.drain().map(|(_, n)| n).collect();
        while let Some(mut node) = stack.pop() {
            stack.extend(node.children.drain().map(|(_, n)| n));
        }
    }
}

/// The retained message store. See the module documentation.
#[derive(Debug)]
pub struct RetainedStore<M> {
    root: Node<M>,
    len: usize,
    /// Nodes besides the root.
    nodes: usize,
}

impl<M: Clone> Default for RetainedStore<M> {
    fn default() -> Self {
        Self::new()
    }
}

/// A pending step of a filter walk: a node and the byte offset of the next
/// filter level (`None` once every level is consumed).
type Frame<'a, M> = (&'a Node<M>, Option<usize>);

impl<M: Clone> RetainedStore<M> {
    /// An empty store.
    pub fn new() -> Self {
        Self {
            root: Node::new(),
            len: 0,
            nodes: 0,
        }
    }

    /// Number of retained messages.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether no message is retained.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Number of trie nodes besides the root (memory use / pruning checks).
    pub fn node_count(&self) -> usize {
        self.nodes
    }

    fn find(&self, topic: &str) -> Option<&Node<M>> {
        let mut node = &self.root;
        for level in topic.split('/') {
            node = node.children.get(level)?;
        }
        Some(node)
    }

    fn find_mut(&mut self, topic: &str) -> Option<&mut Node<M>> {
        let mut node = &mut self.root;
        for level in topic.split('/') {
            node = node.children.get_mut(level)?;
        }
        Some(node)
    }

    /// Retains `msg` on `topic` (a topic name, no wildcards), replacing and
    /// returning the previous one.
    pub fn set(&mut self, topic: &str, msg: M) -> Option<M> {
        let mut node = &mut self.root;
        let mut created = 0;
        for level in topic.split('/') {
            node = node.children.entry(level.into()).or_insert_with(|| {
                created += 1;
                Node::new()
            });
        }
        self.nodes += created;
        match &mut node.entry {
            Some(entry) => Some(std::mem::replace(&mut entry.msg, msg)),
            slot @ None => {
                *slot = Some(Entry {
                    topic: topic.into(),
                    msg,
                });
                self.len += 1;
                None
            }
        }
    }

    /// Removes and returns the message retained on `topic`, pruning the nodes
    /// left empty.
    pub fn remove(&mut self, topic: &str) -> Option<M> {
        let node = self.find_mut(topic)?;
        let entry = node.entry.take()?;
        let leaf = node.children.is_empty();
        self.len -= 1;
        if leaf {
            self.prune(topic);
        }
        Some(entry.msg)
    }

    /// The message retained on `topic`.
    pub fn get(&self, topic: &str) -> Option<&M> {
        self.find(topic)?.entry.as_ref().map(|e| &e.msg)
    }

    /// Removes the (empty, childless) node of `topic` and every ancestor left
    /// empty: finds the deepest ancestor that must stay, then cuts below it.
    fn prune(&mut self, topic: &str) {
        let mut keep_depth = 0;
        let mut depth = 0;
        let mut node = &self.root;
        for level in topic.split('/') {
            if depth > 0 && (node.entry.is_some() || node.children.len() > 1) {
                keep_depth = depth;
            }
            let Some(next) = node.children.get(level) else {
                return;
            };
            node = next;
            depth += 1;
        }
        if node.entry.is_some() || !node.children.is_empty() {
            return;
        }
        let mut node = &mut self.root;
        let mut levels = topic.split('/');
        for _ in 0..keep_depth {
            let Some(next) = levels.next().and_then(|l| node.children.get_mut(l)) else {
                return;
            };
            node = next;
        }
        if let Some(level) = levels.next() {
            if node.children.remove(level).is_some() {
                self.nodes -= depth - keep_depth;
            }
        }
    }

    /// Appends to `out` (cloned) every retained message whose topic matches
    /// `filter` (a validated topic filter). Order is unspecified.
    pub fn matching(&self, filter: &str, out: &mut Vec<M>) {
        self.for_each_matching(filter, |_, msg| out.push(msg.clone()));
    }

    /// Visitor form of [`matching`](Self::matching), borrowing the topic
    /// names and messages. Order is unspecified.
    pub fn for_each_matching<'a>(&'a self, filter: &str, mut visit: impl FnMut(&'a str, &'a M)) {
        let mut emit = |node: &'a Node<M>| {
            if let Some(e) = &node.entry {
                visit(&e.topic, &e.msg);
            }
        };
        let mut stack: SmallVec<[Frame<'a, M>; 16]> = SmallVec::new();
        let mut subtree: SmallVec<[&'a Node<M>; 32]> = SmallVec::new();
        stack.push((&self.root, Some(0)));
        while let Some((node, pos)) = stack.pop() {
            let Some(start) = pos else {
                emit(node);
                continue;
            };
            // [MQTT-4.7.2-1]: no leading wildcard matches a `$` topic.
            let skip_dollar = start == 0;
            let wanted = |name: &str| !(skip_dollar && is_sys_topic(name));
            let rest = filter.get(start..).unwrap_or_default();
            let (level, next) = match rest.find('/') {
                Some(i) => (&rest[..i], Some(start + i + 1)),
                None => (rest, None),
            };
            match level {
                "#" => {
                    // The parent level itself, then the whole subtree.
                    emit(node);
                    subtree.extend(
                        node.children
                            .iter()
                            .filter(|(name, _)| wanted(name))
                            .map(|(_, n)| n),
                    );
                    while let Some(n) = subtree.pop() {
                        emit(n);
                        subtree.extend(n.children.values());
                    }
                }
                "+" => stack.extend(
                    node.children
                        .iter()
                        .filter(|(name, _)| wanted(name))
                        .map(|(_, n)| (n, next)),
                ),
                _ => {
                    if let Some(c) = node.children.get(level) {
                        stack.push((c, next));
                    }
                }
            }
        }
    }

    /// Visits every retained message (including `$` topics). Order is
    /// unspecified.
    pub fn for_each<'a>(&'a self, mut visit: impl FnMut(&'a str, &'a M)) {
        let mut stack: Vec<&'a Node<M>> = vec![&self.root];
        while let Some(n) = stack.pop() {
            if let Some(e) = &n.entry {
                visit(&e.topic, &e.msg);
            }
            stack.extend(n.children.values());
        }
    }

    /// Keeps only the messages for which `keep` returns true (e.g. removes
    /// the expired ones), pruning the nodes left empty. Returns how many were
    /// removed.
    pub fn retain_where(&mut self, mut keep: impl FnMut(&M) -> bool) -> usize {
        let mut doomed: Vec<Box<str>> = Vec::new();
        self.for_each(|topic, msg| {
            if !keep(msg) {
                doomed.push(topic.into());
            }
        });
        for topic in &doomed {
            self.remove(topic);
        }
        doomed.len()
    }
}

// The broker's retained state: the store above behind `retained`, its
// counts (`retained_count`, `retained_bytes`), the limits on it, replay on
// subscribe and expiry.

/// Bytes a message holds as counted by the limits: topic + payload.
pub(super) fn message_bytes(m: &Message) -> u64 {
    (m.topic.len() + m.payload.len()) as u64
}

impl Broker {
    /// Would a retained message of `bytes` on `topic` be stored? Replacing
    /// or deleting one always is; a new topic within `max_retained_messages`
    /// and `max_retained_bytes`, and below the memory budget. `$SYS` topics
    /// (the broker's own) are not limited.
    pub fn retained_admits(&self, topic: &str, bytes: u64) -> bool {
        if topic.starts_with("$SYS/") {
            return true;
        }
        let l = &self.node.config.limits;
        let full = self.retained_count.load(Ordering::Relaxed) >= l.max_retained_messages as u64
            || self
                .node
                .retained_bytes
                .load(Ordering::Relaxed)
                .saturating_add(bytes)
                > l.max_retained_bytes
            || self.node.memory_pressure() == crate::budget::Pressure::Full;
        !full || self.retained.read().get(topic).is_some()
    }

    /// Count a change of the retained store (`$SYS` topics not counted).
    pub(super) fn retained_changed(
        &self,
        topic: &str,
        added: Option<&Message>,
        removed: Option<&Message>,
    ) {
        if topic.starts_with("$SYS/") {
            return;
        }
        let (c, b) = (&self.retained_count, &self.node.retained_bytes);
        if let Some(m) = added {
            c.fetch_add(1, Ordering::Relaxed);
            b.fetch_add(message_bytes(m), Ordering::Relaxed);
        }
        if let Some(m) = removed {
            c.fetch_sub(1, Ordering::Relaxed);
            b.fetch_sub(message_bytes(m), Ordering::Relaxed);
        }
    }

    /// Queue the retained messages matching a subscription's filter
    /// [MQTT-3.3.1-9]: they get queue room of their own
    /// ([`crate::session::Session::grant_replay_room`]) and are charged to neither the
    /// session's bytes nor the memory budget (they share the retained copy).
    pub fn replay_retained(
        &self,
        cell: &Arc<SessionCell>,
        r: &crate::session::DeferredReplay,
        now: Instant,
    ) {
        if let Some(link) = self.cluster() {
            // The cluster's retained messages are in its engine.
            link.replay_retained(cell, r);
            return;
        }
        let retained = self.retained_matching(&r.filter, now);
        self.replay_messages(cell, r, retained);
    }

    /// Queue `retained` (messages matching `r.filter`) on `cell`'s session
    /// as the replay of `r`: [`Broker::replay_retained`] for messages an
    /// engine found elsewhere (a cluster's).
    pub fn replay_messages(
        &self,
        cell: &Arc<SessionCell>,
        r: &crate::session::DeferredReplay,
        retained: Vec<Arc<Message>>,
    ) {
        let delivery = |m: Arc<Message>| {
            let mut ids = SmallVec::new();
            ids.extend(r.identifier);
            Delivery {
                qos: m.qos.min(r.options.qos),
                msg: m,
                retain: true, // [MQTT-3.3.1-8]
                subscription_ids: ids,
                share: None,
                seq: 0,
                replay: true,
            }
        };
        let mut st = cell.state.lock();
        st.session
            .grant_replay_room(retained.len(), self.node.config.limits.max_retained_replay);
        if st.session.persisted && self.persist.is_some() {
            // QoS 1/2 replays are stored with the queue: the general path.
            drop(st);
            for m in retained {
                self.deliver(cell, delivery(m));
            }
            return;
        }
        // In memory only: queued under one lock (100,000 retained messages
        // took 100,000 lock round trips and wake-ups).
        let mut dropped = 0;
        for m in retained {
            if st.session.enqueue(delivery(m)) != Enqueued::Queued {
                dropped += 1;
            }
        }
        if dropped > 0 {
            if let Some(n) = st.session.drop_log.due_with(Instant::now) {
                self.log_queue_full(&cell.client_id, n);
            }
        }
        st.wake();
        drop(st);
        self.node
            .stats
            .messages_dropped
            .fetch_add(dropped, Ordering::Relaxed);
    }

    /// Retained messages matching `filter`, for delivery on subscribe.
    pub fn retained_matching(&self, filter: &str, now: Instant) -> Vec<Arc<Message>> {
        let mut out = Vec::new();
        self.retained.read().for_each_matching(filter, |_, m| {
            if !m.is_expired(now) {
                out.push(m.clone());
            }
        });
        out
    }

    pub fn retained_count(&self) -> usize {
        self.retained.read().len()
    }

    /// Retained messages, not counting the broker's own `$SYS` topics.
    pub fn retained_count_without_sys(&self) -> usize {
        self.retained_count.load(Ordering::Relaxed) as usize
    }

    /// Drop the expired retained messages (part of [`Broker::handle_timeout`]).
    pub(super) fn expire_retained(&self, now: Instant) {
        let mut gone = (0, 0, false);
        let mut r = self.retained.write();
        r.for_each(|t, m| {
            if m.is_expired(now) {
                gone.2 = true;
                if !t.starts_with("$SYS/") {
                    gone.0 += 1;
                    gone.1 += message_bytes(m);
                }
            }
        });
        if gone.2 {
            r.retain_where(|m| !m.is_expired(now));
            self.retained_count.fetch_sub(gone.0, Ordering::Relaxed);
            self.node
                .retained_bytes
                .fetch_sub(gone.1, Ordering::Relaxed);
        }
    }
}
