//! Subscription index: maps MQTT topic filters to subscribers and answers
//! "who is subscribed to this topic?" for every PUBLISH.
//!
//! # Structure
//!
//! Filters without wildcards live in a hash map keyed by the whole filter
//! (`exact`): a publish finds them with one lookup of its topic, and a
//! device's own topics (`devices/{id}/cmd`) cost one entry rather than a
//! trie node per level. The filters with `+` or `#` live in a trie keyed by
//! topic level (OASIS MQTT 5.0 section 4.7). Each `Node` is reached by one
//! filter level and has:
//!
//! * `children`: literal levels, in an `ahash` map keyed by `Box<str>` (looked
//!   up with the borrowed `&str` level of the topic, so matching never
//!   allocates);
//! * `plus` / `hash`: dedicated slots for the `+` and `#` wildcard children, so
//!   matching never hashes a wildcard and checking for them costs one branch;
//! * `subs`: `None` unless some subscription ends at this node. It holds the
//!   full filter string (given in [`MatchRef`]), the normal subscribers and the
//!   shared groups (`$share/{group}/{filter}`) on that filter.
//!
//! Subscribers of one node live in a `SubList`: a `Vec<(K, V)>` (dense,
//! O(n) to iterate for a large fan-out) that grows a `K -> position` hash
//! index once it holds more than a handful of entries, so insert/remove stay
//! O(1) even with 10k subscribers on one filter (removal is `swap_remove` plus
//! fixing the moved entry's position).
//!
//! Matching walks the topic with an explicit stack of `(node, byte offset of
//! the next level)` kept in a `SmallVec` (inline for typical depths), so it
//! neither allocates per level nor recurses: a subscription with tens of
//! thousands of levels cannot overflow the thread stack. For the same reason
//! insertion and removal are iterative and `Node`'s `Drop` is iterative.
//!
//! Removal prunes every node left without subscriptions or children, so the
//! trie's size follows the live subscriptions rather than the churn history
//! ([`SubscriptionIndex::node_count`] exposes it).
//!
//! Two ways to match: [`SubscriptionIndex::matches`] appends owned
//! [`Match`]es (cloned values) to a reusable `Vec`, so delivery can happen
//! after the read lock is released; [`SubscriptionIndex::for_each_match`]
//! visits borrowed [`MatchRef`]s (with the filter and group names) and lets
//! the caller prefer some shared group members (e.g. connected ones).
//!
//! Shared groups: one `SharedGroup` per `(group, filter)`; a matching topic
//! yields exactly one member chosen by the index's [`ShareStrategy`]. Matching
//! runs under a read lock, so the round-robin cursor is an `AtomicUsize` per
//! group and the random source is an `AtomicU64` (splitmix64) in the index.
//!
//! Duplicates: one subscriber may match through several overlapping filters;
//! every match is reported. The broker merges them per subscriber (MQTT 5.0
//! section 3.3.4: one delivery with the highest QoS and all subscription
//! identifiers); [`group_by_key`] sorts the matches so each subscriber's
//! non-shared matches are adjacent. Shared matches are never merged with
//! anything (section 4.8.2: a non-shared and a shared subscription of the same
//! client each get their copy).

use std::collections::hash_map::RandomState as StdRandomState;
use std::hash::{BuildHasher, Hash, Hasher};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

use ahash::AHashMap;
use millet_codec::topic::is_sys_topic;
use smallvec::SmallVec;

/// How one member of a shared group is chosen for each matching message.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ShareStrategy {
    /// Members in turn (per group cursor).
    #[default]
    RoundRobin,
    /// A uniformly random member.
    Random,
    /// A member chosen by a hash of the publisher's client id, so one
    /// publisher's messages stick to one member while membership is stable.
    HashClientId,
}

/// One subscription matched by a topic, borrowed from the index (visitor
/// form, [`SubscriptionIndex::for_each_match`]).
#[derive(Debug)]
pub struct MatchRef<'a, K, V> {
    /// The subscriber.
    pub key: K,
    /// The subscription's value (options, subscription identifier...).
    pub value: &'a V,
    /// The topic filter that matched (without the `$share/{group}/` prefix).
    pub filter: &'a str,
    /// The share group name when this is the chosen member of a shared group.
    pub group: Option<&'a str>,
}

impl<K: Copy, V> Clone for MatchRef<'_, K, V> {
    fn clone(&self) -> Self {
        *self
    }
}

impl<K: Copy, V> Copy for MatchRef<'_, K, V> {}

/// One subscription matched by a topic, owned (the value is cloned), so a
/// match buffer outlives the index's read lock and can be reused
/// ([`SubscriptionIndex::matches`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Match<K, V> {
    /// The subscriber.
    pub key: K,
    /// The subscription's value (options, subscription identifier...).
    pub value: V,
    /// Whether this is the chosen member of a shared group.
    pub shared: bool,
}

/// Sorts `matches` so that the non-shared matches of each subscriber are
/// adjacent, and yields them as runs to merge into one delivery (one run per
/// subscriber). Every shared match is a run of its own, after the non-shared
/// ones: MQTT 5.0 section 4.8.2 gives a client one copy per shared
/// subscription besides the one from its non-shared subscriptions. Does not
/// allocate.
pub fn group_by_key<K: Ord + Copy, V>(
    matches: &mut [Match<K, V>],
) -> impl Iterator<Item = &[Match<K, V>]> {
    matches.sort_unstable_by_key(|m| (m.shared, m.key));
    matches.chunk_by(|a, b| !a.shared && !b.shared && a.key == b.key)
}

/// Above this many entries a [`SubList`] maintains a hash index.
const INDEX_THRESHOLD: usize = 16;

/// Subscribers of one filter (or members of one shared group).
#[derive(Debug)]
struct SubList<K, V> {
    entries: Vec<(K, V)>,
    // Boxed: `None` (the usual case) costs 8 bytes, not a whole map.
    #[allow(clippy::box_collection)]
    positions: Option<Box<AHashMap<K, usize>>>,
}

impl<K: Copy + Eq + Hash, V> SubList<K, V> {
    fn new() -> Self {
        Self {
            entries: Vec::new(),
            positions: None,
        }
    }

    fn len(&self) -> usize {
        self.entries.len()
    }

    fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    fn position(&self, key: K) -> Option<usize> {
        match &self.positions {
            Some(map) => map.get(&key).copied(),
            None => self.entries.iter().position(|(k, _)| *k == key),
        }
    }

    fn get(&self, key: K) -> Option<&V> {
        self.position(key).map(|i| &self.entries[i].1)
    }

    fn insert(&mut self, key: K, value: V) -> Option<V> {
        if let Some(i) = self.position(key) {
            return Some(std::mem::replace(&mut self.entries[i].1, value));
        }
        if self.entries.is_empty() {
            self.entries.reserve_exact(1); // most filters have one subscriber
        }
        self.entries.push((key, value));
        let last = self.entries.len() - 1;
        match &mut self.positions {
            Some(map) => {
                map.insert(key, last);
            }
            None if self.entries.len() > INDEX_THRESHOLD => {
                let map = self
                    .entries
                    .iter()
                    .enumerate()
                    .map(|(i, (k, _))| (*k, i))
                    .collect();
                self.positions = Some(Box::new(map));
            }
            None => {}
        }
        None
    }

    fn remove(&mut self, key: K) -> Option<V> {
        let i = self.position(key)?;
        let (_, value) = self.entries.swap_remove(i);
        if let Some(map) = &mut self.positions {
            map.remove(&key);
            if let Some((moved, _)) = self.entries.get(i) {
                map.insert(*moved, i);
            }
            // Hysteresis: drop the index well below the threshold.
            if self.entries.len() < INDEX_THRESHOLD / 2 {
                self.positions = None;
            }
        }
        if self.entries.is_empty() {
            self.entries = Vec::new();
        }
        Some(value)
    }
}

/// The members of one `$share/{group}/{filter}` subscription.
#[derive(Debug)]
struct SharedGroup<K, V> {
    name: Box<str>,
    members: SubList<K, V>,
    cursor: AtomicUsize,
}

/// Everything subscribed at one node (one filter).
#[derive(Debug)]
struct Subs<K, V> {
    filter: Box<str>,
    normal: SubList<K, V>,
    shared: Vec<SharedGroup<K, V>>,
}

impl<K, V> Subs<K, V> {
    fn is_empty(&self) -> bool {
        self.normal.entries.is_empty() && self.shared.is_empty()
    }

    fn group(&self, name: &str) -> Option<&SharedGroup<K, V>> {
        self.shared.iter().find(|g| &*g.name == name)
    }
}

/// Up to this many literal children are kept in a vector (a fleet's
/// `devices/{id}/cmd` has one child per device node); beyond, a hash map.
const FEW_CHILDREN: usize = 8;

/// A node's literal children: a small vector (no hashing, one exact-size
/// allocation) for the common few, a hash map for many. An empty node
/// allocates nothing; this is paid per device in a fleet.
#[derive(Debug)]
enum Children<N> {
    Few(Vec<(Box<str>, N)>),
    Many(Box<AHashMap<Box<str>, N>>),
}

impl<N> Children<N> {
    fn len(&self) -> usize {
        match self {
            Children::Few(v) => v.len(),
            Children::Many(m) => m.len(),
        }
    }

    fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn get(&self, level: &str) -> Option<&N> {
        match self {
            Children::Few(v) => v.iter().find(|(k, _)| &**k == level).map(|(_, n)| n),
            Children::Many(m) => m.get(level),
        }
    }

    fn get_mut(&mut self, level: &str) -> Option<&mut N> {
        match self {
            Children::Few(v) => v.iter_mut().find(|(k, _)| &**k == level).map(|(_, n)| n),
            Children::Many(m) => m.get_mut(level),
        }
    }

    fn get_or_insert_with(&mut self, level: &str, make: impl FnOnce() -> N) -> &mut N {
        if let Children::Few(v) = self {
            if v.len() >= FEW_CHILDREN && !v.iter().any(|(k, _)| &**k == level) {
                *self = Children::Many(Box::new(std::mem::take(v).into_iter().collect()));
            }
        }
        match self {
            Children::Few(v) => {
                let i = match v.iter().position(|(k, _)| &**k == level) {
                    Some(i) => i,
                    None => {
                        v.reserve_exact(1);
                        v.push((level.into(), make()));
                        v.len() - 1
                    }
                };
                &mut v[i].1
            }
            Children::Many(m) => m.entry(level.into()).or_insert_with(make),
        }
    }

    fn remove(&mut self, level: &str) {
        match self {
            Children::Few(v) => {
                if let Some(i) = v.iter().position(|(k, _)| &**k == level) {
                    v.swap_remove(i);
                }
                if v.is_empty() {
                    *v = Vec::new();
                }
            }
            Children::Many(m) => {
                m.remove(level);
                if m.len() <= FEW_CHILDREN / 2 {
                    let mut v: Vec<_> = m.drain().collect();
                    v.shrink_to_fit();
                    *self = Children::Few(v);
                }
            }
        }
    }

    fn drain_into(&mut self, into: &mut Vec<N>) {
        match std::mem::replace(self, Children::Few(Vec::new())) {
            Children::Few(v) => into.extend(v.into_iter().map(|(_, n)| n)),
            Children::Many(m) => into.extend(m.into_iter().map(|(_, n)| n)),
        }
    }
}

/// One trie node (one filter level).
#[derive(Debug)]
struct Node<K, V> {
    children: Children<Node<K, V>>,
    plus: Option<Box<Node<K, V>>>,
    hash: Option<Box<Node<K, V>>>,
    subs: Option<Box<Subs<K, V>>>,
}

impl<K, V> Node<K, V> {
    fn new() -> Self {
        Self {
            children: Children::Few(Vec::new()),
            plus: None,
            hash: None,
            subs: None,
        }
    }

    fn child_count(&self) -> usize {
        self.children.len() + usize::from(self.plus.is_some()) + usize::from(self.hash.is_some())
    }

    fn child(&self, level: &str) -> Option<&Node<K, V>> {
        match level {
            "+" => self.plus.as_deref(),
            "#" => self.hash.as_deref(),
            _ => self.children.get(level),
        }
    }

    fn child_mut(&mut self, level: &str) -> Option<&mut Node<K, V>> {
        match level {
            "+" => self.plus.as_deref_mut(),
            "#" => self.hash.as_deref_mut(),
            _ => self.children.get_mut(level),
        }
    }

    /// Returns the child for `level`, creating it (and counting it) if absent.
    fn child_or_insert(&mut self, level: &str, created: &mut usize) -> &mut Node<K, V> {
        let slot = match level {
            "+" => &mut self.plus,
            "#" => &mut self.hash,
            _ => {
                return self.children.get_or_insert_with(level, || {
                    *created += 1;
                    Node::new()
                });
            }
        };
        slot.get_or_insert_with(|| {
            *created += 1;
            Box::new(Node::new())
        })
    }

    fn remove_child(&mut self, level: &str) {
        match level {
            "+" => self.plus = None,
            "#" => self.hash = None,
            _ => {
                self.children.remove(level);
            }
        }
    }

    fn take_children(&mut self, into: &mut Vec<Node<K, V>>) {
        self.children.drain_into(into);
        into.extend(self.plus.take().map(|n| *n));
        into.extend(self.hash.take().map(|n| *n));
    }
}

impl<K, V> Drop for Node<K, V> {
    /// Iterative drop: a very deep chain must not overflow the stack.
    fn drop(&mut self) {
        if self.child_count() == 0 {
            return;
        }
        let mut stack = Vec::new();
        self.take_children(&mut stack);
        while let Some(mut node) = stack.pop() {
            node.take_children(&mut stack);
        }
    }
}

/// A pending step of the match walk: a node and the byte offset of the next
/// topic level (`None` once every level is consumed).
type Frame<'a, K, V> = (&'a Node<K, V>, Option<usize>);

/// The subscription index. See the module documentation.
#[derive(Debug)]
pub struct SubscriptionIndex<K, V> {
    root: Node<K, V>,
    /// Filters without wildcards, by the whole filter (their `Subs::filter`
    /// is left empty: the key is the filter). A device's own topics
    /// (`devices/{id}/cmd`) cost one entry here instead of a trie node per
    /// level, and a publish finds them with one hash of its topic.
    exact: AHashMap<Box<str>, Box<Subs<K, V>>>,
    strategy: ShareStrategy,
    rng: AtomicU64,
    /// Nodes besides the root.
    nodes: usize,
    subscriptions: usize,
    shared_members: usize,
    shared_groups: usize,
}

impl<K, V> Default for SubscriptionIndex<K, V>
where
    K: Copy + Eq + Hash + Ord,
    V: Clone,
{
    fn default() -> Self {
        Self::new(ShareStrategy::default())
    }
}

/// Whether `filter` has no wildcard level (it then lives in the exact table).
fn is_exact(filter: &str) -> bool {
    !filter.split('/').any(|l| l == "+" || l == "#")
}

/// The walk of one filter, level by level, ending at the filter's node.
fn filter_levels(filter: &str) -> std::str::Split<'_, char> {
    filter.split('/')
}

impl<K, V> SubscriptionIndex<K, V>
where
    K: Copy + Eq + Hash + Ord,
    V: Clone,
{
    /// An empty index whose random choices are seeded from the process's
    /// random hash keys.
    pub fn new(strategy: ShareStrategy) -> Self {
        let seed = StdRandomState::new().build_hasher().finish();
        Self::with_seed(strategy, seed)
    }

    /// An empty index with a fixed seed for [`ShareStrategy::Random`]
    /// (deterministic tests).
    pub fn with_seed(strategy: ShareStrategy, seed: u64) -> Self {
        Self {
            root: Node::new(),
            exact: AHashMap::new(),
            strategy,
            rng: AtomicU64::new(seed),
            nodes: 0,
            subscriptions: 0,
            shared_members: 0,
            shared_groups: 0,
        }
    }

    /// The strategy used to pick a shared group member.
    pub fn strategy(&self) -> ShareStrategy {
        self.strategy
    }

    /// Changes the shared group strategy.
    pub fn set_strategy(&mut self, strategy: ShareStrategy) {
        self.strategy = strategy;
    }

    /// Number of normal (non-shared) subscriptions.
    pub fn subscription_count(&self) -> usize {
        self.subscriptions
    }

    /// Number of shared subscriptions (members summed over all groups).
    pub fn shared_subscription_count(&self) -> usize {
        self.shared_members
    }

    /// Number of `(group, filter)` shared groups with at least one member.
    pub fn shared_group_count(&self) -> usize {
        self.shared_groups
    }

    /// Number of trie nodes besides the root (memory use / pruning checks).
    /// Filters without wildcards are not in the trie ([`Self::exact_count`]).
    pub fn node_count(&self) -> usize {
        self.nodes
    }

    /// Number of distinct filters without wildcards that have subscribers.
    pub fn exact_count(&self) -> usize {
        self.exact.len()
    }

    /// Whether there is no subscription at all.
    pub fn is_empty(&self) -> bool {
        self.subscriptions == 0 && self.shared_members == 0
    }

    /// The `Subs` of `filter`, created if missing (with its trie nodes).
    fn subs_mut_or_insert(&mut self, filter: &str) -> &mut Subs<K, V> {
        if is_exact(filter) {
            return self.exact.entry(filter.into()).or_insert_with(|| {
                Box::new(Subs {
                    filter: Box::default(),
                    normal: SubList::new(),
                    shared: Vec::new(),
                })
            });
        }
        let mut node = &mut self.root;
        let mut created = 0;
        for level in filter_levels(filter) {
            node = node.child_or_insert(level, &mut created);
        }
        self.nodes += created;
        node.subs.get_or_insert_with(|| {
            Box::new(Subs {
                filter: filter.into(),
                normal: SubList::new(),
                shared: Vec::new(),
            })
        })
    }

    /// The `Subs` of `filter`, if any.
    fn subs(&self, filter: &str) -> Option<&Subs<K, V>> {
        if is_exact(filter) {
            self.exact.get(filter).map(|s| &**s)
        } else {
            self.find(filter)?.subs.as_deref()
        }
    }

    fn subs_mut(&mut self, filter: &str) -> Option<&mut Subs<K, V>> {
        if is_exact(filter) {
            self.exact.get_mut(filter).map(|s| &mut **s)
        } else {
            self.find_mut(filter)?.subs.as_deref_mut()
        }
    }

    fn find(&self, filter: &str) -> Option<&Node<K, V>> {
        let mut node = &self.root;
        for level in filter_levels(filter) {
            node = node.child(level)?;
        }
        Some(node)
    }

    fn find_mut(&mut self, filter: &str) -> Option<&mut Node<K, V>> {
        let mut node = &mut self.root;
        for level in filter_levels(filter) {
            node = node.child_mut(level)?;
        }
        Some(node)
    }

    /// Removes the empty node of `filter` and every ancestor left empty.
    /// Iterative: finds the deepest ancestor that must stay, then cuts below.
    fn prune(&mut self, filter: &str) {
        if is_exact(filter) {
            if self.exact.get(filter).is_some_and(|s| s.is_empty()) {
                self.exact.remove(filter);
                // Give memory back once most entries are gone.
                if self.exact.capacity() > 64 && self.exact.len() * 4 < self.exact.capacity() {
                    self.exact.shrink_to_fit();
                }
            }
            return;
        }
        let Some(end) = self.find_mut(filter) else {
            return;
        };
        if end.subs.as_ref().is_some_and(|s| !s.is_empty()) {
            return;
        }
        end.subs = None;
        if end.child_count() > 0 {
            return;
        }
        // Depth d node = node after d levels; root is depth 0 and always kept.
        let mut keep_depth = 0;
        let mut depth = 0;
        let mut node = &self.root;
        for level in filter_levels(filter) {
            if depth > 0 && (node.subs.is_some() || node.child_count() > 1) {
                keep_depth = depth;
            }
            let Some(next) = node.child(level) else {
                return;
            };
            node = next;
            depth += 1;
        }
        // Cut the edge below the node at `keep_depth`.
        let mut node = &mut self.root;
        let mut levels = filter_levels(filter);
        for _ in 0..keep_depth {
            let Some(level) = levels.next() else { return };
            let Some(next) = node.child_mut(level) else {
                return;
            };
            node = next;
        }
        if let Some(level) = levels.next() {
            node.remove_child(level);
            self.nodes -= depth - keep_depth;
        }
    }

    /// Adds or replaces the normal subscription of `key` to `filter`; returns
    /// the previous value if it replaced one.
    pub fn insert(&mut self, filter: &str, key: K, value: V) -> Option<V> {
        let prev = self.subs_mut_or_insert(filter).normal.insert(key, value);
        if prev.is_none() {
            self.subscriptions += 1;
        }
        prev
    }

    /// Removes the normal subscription of `key` to `filter`.
    pub fn remove(&mut self, filter: &str, key: K) -> Option<V> {
        let subs = self.subs_mut(filter)?;
        let prev = subs.normal.remove(key)?;
        let now_empty = subs.is_empty();
        self.subscriptions -= 1;
        if now_empty {
            self.prune(filter);
        }
        Some(prev)
    }

    /// How many keys hold a normal subscription to `filter`.
    pub fn filter_subscribers(&self, filter: &str) -> usize {
        self.subs(filter).map_or(0, |s| s.normal.len())
    }

    /// The value of the normal subscription of `key` to `filter`.
    pub fn get(&self, filter: &str, key: K) -> Option<&V> {
        self.subs(filter)?.normal.get(key)
    }

    /// Adds or replaces `key` as a member of `$share/{group}/{filter}`.
    pub fn insert_shared(&mut self, group: &str, filter: &str, key: K, value: V) -> Option<V> {
        let subs = self.subs_mut_or_insert(filter);
        let i = match subs.shared.iter().position(|g| &*g.name == group) {
            Some(i) => i,
            None => {
                subs.shared.push(SharedGroup {
                    name: group.into(),
                    members: SubList::new(),
                    cursor: AtomicUsize::new(0),
                });
                subs.shared.len() - 1
            }
        };
        let prev = subs.shared[i].members.insert(key, value);
        if subs.shared[i].members.len() == 1 && prev.is_none() {
            self.shared_groups += 1;
        }
        if prev.is_none() {
            self.shared_members += 1;
        }
        prev
    }

    /// Removes `key` from `$share/{group}/{filter}`; the group disappears with
    /// its last member.
    pub fn remove_shared(&mut self, group: &str, filter: &str, key: K) -> Option<V> {
        let subs = self.subs_mut(filter)?;
        let i = subs.shared.iter().position(|g| &*g.name == group)?;
        let prev = subs.shared[i].members.remove(key)?;
        let group_gone = subs.shared[i].members.is_empty();
        if group_gone {
            subs.shared.swap_remove(i);
        }
        let now_empty = subs.is_empty();
        self.shared_members -= 1;
        if group_gone {
            self.shared_groups -= 1;
        }
        if now_empty {
            self.prune(filter);
        }
        Some(prev)
    }

    /// The value of `key`'s membership in `$share/{group}/{filter}`.
    pub fn get_shared(&self, group: &str, filter: &str, key: K) -> Option<&V> {
        self.subs(filter)?.group(group)?.members.get(key)
    }

    /// The members of `$share/{group}/{filter}` (empty if no such group).
    pub fn shared_members<'a>(
        &'a self,
        group: &str,
        filter: &str,
    ) -> impl Iterator<Item = (K, &'a V)> + 'a {
        self.subs(filter)
            .and_then(|s| s.group(group))
            .into_iter()
            .flat_map(|g| g.members.entries.iter().map(|(k, v)| (*k, v)))
    }

    fn next_random(&self) -> u64 {
        let s = self
            .rng
            .fetch_add(0x9E37_79B9_7F4A_7C15, Ordering::Relaxed)
            .wrapping_add(0x9E37_79B9_7F4A_7C15);
        mix64(s)
    }

    /// Index of the member to try first in `group`.
    fn start_index(&self, group: &SharedGroup<K, V>, publisher: &str) -> usize {
        let len = group.members.len();
        let n = match self.strategy {
            ShareStrategy::RoundRobin => group.cursor.fetch_add(1, Ordering::Relaxed),
            // The truncation to usize keeps the low (well mixed) bits.
            ShareStrategy::Random => self.next_random() as usize,
            ShareStrategy::HashClientId => mix64(fnv1a(publisher.as_bytes())) as usize,
        };
        n % len.max(1)
    }

    /// Chooses a member of `group`: the strategy's pick if `eligible`
    /// accepts it, else the next accepted member in order. If no member is
    /// accepted: the strategy's pick when `fallback`, else `None`.
    fn choose<'a>(
        &self,
        group: &'a SharedGroup<K, V>,
        publisher: &str,
        mut eligible: impl FnMut(K) -> bool,
        fallback: bool,
    ) -> Option<(K, &'a V)> {
        let entries = &group.members.entries;
        let len = entries.len();
        if len == 0 {
            return None;
        }
        let start = self.start_index(group, publisher);
        (0..len)
            .map(|i| &entries[(start + i) % len])
            .find(|(k, _)| eligible(*k))
            .or_else(|| fallback.then(|| &entries[start]))
            .map(|(k, v)| (*k, v))
    }

    /// Appends to `out` every normal subscription matching `topic` and, for
    /// each matching shared group, one member chosen by the strategy
    /// (`publisher` is the publishing client's id, used by
    /// [`ShareStrategy::HashClientId`]). Values are cloned. Does not allocate
    /// when `out` has capacity and the match walk stays under 32 levels deep.
    pub fn matches(&self, topic: &str, publisher: &str, out: &mut Vec<Match<K, V>>) {
        self.for_each_match(
            topic,
            publisher,
            |_| true,
            |m| {
                out.push(Match {
                    key: m.key,
                    value: m.value.clone(),
                    shared: m.group.is_some(),
                })
            },
        );
    }

    /// Visitor form of [`matches`](Self::matches), borrowing the values and
    /// also giving the matched filter and share group. `eligible` is a preference
    /// for shared groups: the strategy's pick is skipped in favour of the
    /// next member for which `eligible` returns true (e.g. an online one); if
    /// no member is eligible, the strategy's pick is used anyway so the
    /// message is not lost to the group.
    pub fn for_each_match<'a>(
        &'a self,
        topic: &str,
        publisher: &str,
        mut eligible: impl FnMut(K) -> bool,
        mut visit: impl FnMut(MatchRef<'a, K, V>),
    ) {
        let dollar = is_sys_topic(topic);
        let mut emit_subs = |filter: &'a str, subs: &'a Subs<K, V>| {
            for (key, value) in &subs.normal.entries {
                visit(MatchRef {
                    key: *key,
                    value,
                    filter,
                    group: None,
                });
            }
            for group in &subs.shared {
                let chosen = self.choose(group, publisher, &mut eligible, true);
                if let Some((key, value)) = chosen {
                    visit(MatchRef {
                        key,
                        value,
                        filter,
                        group: Some(&group.name),
                    });
                }
            }
        };
        // The filter equal to the topic (a filter without wildcards matches
        // a `$` topic too: only wildcards skip them).
        if let Some((filter, subs)) = self.exact.get_key_value(topic) {
            emit_subs(filter, subs);
        }
        if self.nodes == 0 {
            return; // no wildcard filter at all
        }
        let mut emit = |node: &'a Node<K, V>| {
            if let Some(subs) = node.subs.as_deref() {
                emit_subs(&subs.filter, subs);
            }
        };
        let mut stack: SmallVec<[Frame<'a, K, V>; 32]> = SmallVec::new();
        stack.push((&self.root, Some(0)));
        while let Some((node, pos)) = stack.pop() {
            let Some(start) = pos else {
                // All levels consumed: this node's filter matches, and so does
                // `{filter}/#` (`#` includes the parent level).
                emit(node);
                if let Some(h) = node.hash.as_deref() {
                    emit(h);
                }
                continue;
            };
            // [MQTT-4.7.2-1]: no leading wildcard matches a `$` topic.
            let wild_ok = !(dollar && start == 0);
            if wild_ok {
                if let Some(h) = node.hash.as_deref() {
                    emit(h);
                }
            }
            let rest = topic.get(start..).unwrap_or_default();
            // By byte: a `/` is never inside a multi-byte character.
            let (level, next) = match rest.bytes().position(|b| b == b'/') {
                Some(i) => (&rest[..i], Some(start + i + 1)),
                None => (rest, None),
            };
            if wild_ok {
                if let Some(p) = node.plus.as_deref() {
                    stack.push((p, next));
                }
            }
            if !node.children.is_empty() {
                if let Some(c) = node.children.get(level) {
                    stack.push((c, next));
                }
            }
        }
    }

    /// Chooses a member of `$share/{group}/{filter}` other than `exclude`
    /// (e.g. to redeliver a departing member's messages), by the strategy.
    pub fn pick_shared_member(&self, group: &str, filter: &str, exclude: K) -> Option<(K, V)> {
        self.pick_shared_member_where(group, filter, "", |k| k != exclude)
            .map(|(k, v)| (k, v.clone()))
    }

    /// Chooses a member of `$share/{group}/{filter}` accepted by `accept`, by
    /// the strategy (`publisher` feeds [`ShareStrategy::HashClientId`]);
    /// `None` if no member is accepted or there is no such group.
    pub fn pick_shared_member_where(
        &self,
        group: &str,
        filter: &str,
        publisher: &str,
        accept: impl FnMut(K) -> bool,
    ) -> Option<(K, &V)> {
        let g = self.subs(filter)?.group(group)?;
        self.choose(g, publisher, accept, false)
    }
}

/// splitmix64 finalizer.
fn mix64(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// FNV-1a: a stable hash (same member across restarts for one client id).
fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xCBF2_9CE4_8422_2325, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x0000_0100_0000_01B3)
    })
}
