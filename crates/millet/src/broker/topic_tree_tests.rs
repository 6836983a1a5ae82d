//! Tests of the subscription index and the retained store (OASIS MQTT 5.0
//! section 4.7 topic matching), including randomized comparisons with the
//! codec's one-filter matcher, [`millet_codec::topic::topic_matches`].
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::{BTreeMap, BTreeSet};

use super::index::{group_by_key, Match, MatchRef, ShareStrategy, SubscriptionIndex};
use super::retained::RetainedStore;
// The reference: the codec's one definition of MQTT matching.
use millet_codec::topic::topic_matches as reference_match;

/// Deterministic xorshift64* generator.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }

    fn pick<'a>(&mut self, items: &[&'a str]) -> &'a str {
        items[self.below(items.len())]
    }
}

const TABLE: &[(&str, &str, bool)] = &[
    // Spec 4.7.1.2 multi-level wildcard.
    ("sport/tennis/player1/#", "sport/tennis/player1", true),
    (
        "sport/tennis/player1/#",
        "sport/tennis/player1/ranking",
        true,
    ),
    (
        "sport/tennis/player1/#",
        "sport/tennis/player1/score/wimbledon",
        true,
    ),
    ("sport/tennis/player1/#", "sport/tennis/player2", false),
    ("sport/tennis/player1/#", "sport/tennis", false),
    ("sport/#", "sport", true),
    ("sport/#", "sport/", true),
    ("sport/#", "sports", false),
    ("#", "sport/tennis", true),
    ("#", "/", true),
    ("#", "a", true),
    // Spec 4.7.1.3 single-level wildcard.
    ("sport/tennis/+", "sport/tennis/player1", true),
    ("sport/tennis/+", "sport/tennis/player2", true),
    ("sport/tennis/+", "sport/tennis/player1/ranking", false),
    ("sport/tennis/+", "sport/tennis", false),
    ("sport/+", "sport", false),
    ("sport/+", "sport/", true),
    ("sport/+", "sport/tennis/player1", false),
    ("+/+", "/finance", true),
    ("/+", "/finance", true),
    ("+", "/finance", false),
    ("+", "finance", true),
    ("+/tennis/#", "sport/tennis/player1", true),
    ("+/tennis/#", "sport/tennis", true),
    ("+/tennis/#", "sport/golf", false),
    ("sport/+/player1", "sport/tennis/player1", true),
    ("sport/+/player1", "sport//player1", true),
    ("sport/+/player1", "sport/tennis/player2", false),
    // Spec 4.7.2 topics beginning with $.
    ("#", "$SYS", false),
    ("#", "$SYS/monitor/Clients", false),
    ("+/monitor/Clients", "$SYS/monitor/Clients", false),
    ("+", "$SYS", false),
    ("+/#", "$SYS/x", false),
    ("$SYS/#", "$SYS/monitor/Clients", true),
    ("$SYS/#", "$SYS", true),
    ("$SYS/monitor/+", "$SYS/monitor/Clients", true),
    ("$SYS/+/Clients", "$SYS/monitor/Clients", true),
    ("+/$SYS", "a/$SYS", true),
    ("a/#", "a/$SYS", true),
    // Empty levels.
    ("a//b", "a//b", true),
    ("a//b", "a/b", false),
    ("a/+/b", "a//b", true),
    ("a/+/", "a/x/", true),
    ("a/+/", "a//", true),
    ("a/+/", "a/x", false),
    ("/", "/", true),
    ("+/+", "/", true),
    ("+", "/", false),
    ("/#", "/", true),
    ("/#", "/a/b", true),
    ("/#", "a", false),
    ("+/#", "/", true),
    ("+/#", "a", true),
    ("//", "//", true),
    ("+/+/+", "//", true),
    ("+/+/+", "a/b", false),
    // Literal prefixes and lengths.
    ("a/b/#", "a/bc", false),
    ("a/+/#", "a", false),
    ("a/+/#", "a/b", true),
    ("a/+/#", "a/b/c/d", true),
    ("a", "a/", false),
    ("a/", "a", false),
    ("A", "a", false),
];

fn index_matches(filter: &str, topic: &str) -> bool {
    let mut idx = SubscriptionIndex::new(ShareStrategy::RoundRobin);
    idx.insert(filter, 1u64, ());
    let mut out = Vec::new();
    idx.matches(topic, "pub", &mut out);
    assert!(out.len() <= 1);
    let mut filters = Vec::new();
    idx.for_each_match(topic, "pub", |_| true, |m| filters.push(m.filter));
    assert_eq!(filters.len(), out.len());
    filters.iter().all(|f| *f == filter) && !out.is_empty()
}

fn retained_matches(filter: &str, topic: &str) -> bool {
    let mut store = RetainedStore::new();
    store.set(topic, 7u32);
    let mut out = Vec::new();
    store.matching(filter, &mut out);
    let mut topics = Vec::new();
    store.for_each_matching(filter, |t, m| topics.push((t, *m)));
    assert!(out.len() <= 1);
    assert_eq!(topics.len(), out.len());
    topics == [(topic, 7)]
}

#[test]
fn spec_table() {
    for &(filter, topic, expected) in TABLE {
        assert_eq!(
            reference_match(filter, topic),
            expected,
            "reference {filter} {topic}"
        );
        assert_eq!(
            index_matches(filter, topic),
            expected,
            "index {filter} {topic}"
        );
        assert_eq!(
            retained_matches(filter, topic),
            expected,
            "retained {filter} {topic}"
        );
        // A shared subscription follows the same rules.
        let mut idx = SubscriptionIndex::new(ShareStrategy::Random);
        idx.insert_shared("g", filter, 1u64, ());
        let mut out = Vec::new();
        idx.matches(topic, "pub", &mut out);
        assert_eq!(!out.is_empty(), expected, "shared {filter} {topic}");
    }
}

#[test]
fn all_table_filters_in_one_index() {
    let mut idx = SubscriptionIndex::new(ShareStrategy::RoundRobin);
    let filters: BTreeSet<&str> = TABLE.iter().map(|r| r.0).collect();
    for (i, f) in filters.iter().enumerate() {
        assert_eq!(idx.insert(f, i, *f), None);
    }
    let mut out = Vec::new();
    for &(_, topic, _) in TABLE {
        out.clear();
        idx.matches(topic, "p", &mut out);
        let got: BTreeSet<&str> = out.iter().map(|m| m.value).collect();
        let want: BTreeSet<&str> = filters
            .iter()
            .copied()
            .filter(|f| reference_match(f, topic))
            .collect();
        assert_eq!(got, want, "{topic}");
    }
}

#[test]
fn insert_replace_remove() {
    let mut idx = SubscriptionIndex::new(ShareStrategy::RoundRobin);
    assert!(idx.is_empty());
    assert_eq!(idx.insert("a/b", 1u64, 0u8), None);
    assert_eq!(idx.insert("a/b", 1, 2), Some(0));
    assert_eq!(idx.get("a/b", 1), Some(&2));
    assert_eq!(idx.subscription_count(), 1);
    assert_eq!(idx.remove("a/b", 2), None);
    assert_eq!(idx.remove("a/c", 1), None);
    assert_eq!(idx.remove("a/+", 1), None);
    assert_eq!(idx.remove("a/b", 1), Some(2));
    assert_eq!(idx.remove("a/b", 1), None);
    assert!(idx.is_empty());
    assert_eq!(idx.node_count(), 0);
}

#[test]
fn overlapping_subscriptions_are_all_reported() {
    let mut idx = SubscriptionIndex::new(ShareStrategy::RoundRobin);
    idx.insert("a/b", 1u64, 1u8);
    idx.insert("a/+", 1, 2);
    idx.insert("#", 1, 0);
    idx.insert("a/#", 2, 1);
    idx.insert("a/c", 3, 1);
    idx.insert_shared("g", "a/b", 1, 9);
    let mut out = Vec::new();
    idx.matches("a/b", "p", &mut out);
    assert_eq!(out.len(), 5);
    let runs: Vec<Vec<(u64, u8, bool)>> = group_by_key(&mut out)
        .map(|run| run.iter().map(|m| (m.key, m.value, m.shared)).collect())
        .collect();
    assert_eq!(runs.len(), 3);
    let mut first = runs[0].clone();
    first.sort();
    assert_eq!(first, vec![(1, 0, false), (1, 1, false), (1, 2, false)]);
    assert_eq!(runs[1], vec![(2, 1, false)]);
    // The shared copy is never merged with the non-shared ones.
    assert_eq!(runs[2], vec![(1, 9, true)]);
}

#[test]
fn match_reports_filter_and_group() {
    let mut idx = SubscriptionIndex::new(ShareStrategy::RoundRobin);
    idx.insert("x/+", 5u64, ());
    idx.insert_shared("workers", "x/#", 6, ());
    let mut out: Vec<MatchRef<'_, u64, ()>> = Vec::new();
    idx.for_each_match("x/y", "p", |_| true, |m| out.push(m));
    out.sort_by_key(|m| m.key);
    assert_eq!((out[0].key, out[0].filter, out[0].group), (5, "x/+", None));
    assert_eq!(
        (out[1].key, out[1].filter, out[1].group),
        (6, "x/#", Some("workers"))
    );
}

fn shared_counts(idx: &SubscriptionIndex<u64, ()>, publishers: &[&str], n: usize) -> Vec<usize> {
    let mut counts = vec![0; 8];
    let mut out = Vec::with_capacity(4);
    for i in 0..n {
        out.clear();
        idx.matches("jobs/1", publishers[i % publishers.len()], &mut out);
        assert_eq!(out.len(), 1, "exactly one member per group");
        counts[out[0].key as usize] += 1;
    }
    counts
}

#[test]
fn match_buffer_is_reusable() {
    let mut idx = SubscriptionIndex::new(ShareStrategy::RoundRobin);
    idx.insert("t", 1u64, 'v');
    let mut out: Vec<Match<u64, char>> = Vec::with_capacity(64);
    for _ in 0..3 {
        out.clear();
        idx.matches("t", "p", &mut out);
        idx.insert("u", 2, 'w'); // the buffer does not borrow the index
    }
    assert_eq!(
        out,
        vec![Match {
            key: 1,
            value: 'v',
            shared: false
        }]
    );
    assert_eq!(out.capacity(), 64);
}

#[test]
fn shared_round_robin_is_even() {
    let mut idx = SubscriptionIndex::new(ShareStrategy::RoundRobin);
    for k in 0..3u64 {
        idx.insert_shared("g", "jobs/+", k, ());
    }
    assert_eq!(idx.shared_group_count(), 1);
    assert_eq!(idx.shared_subscription_count(), 3);
    assert_eq!(shared_counts(&idx, &["p"], 300)[..3], [100, 100, 100]);
    // Two groups on the same filter each get one copy.
    idx.insert_shared("h", "jobs/+", 4, ());
    let mut out = Vec::new();
    idx.matches("jobs/1", "p", &mut out);
    assert!(out.iter().all(|m| m.shared));
    let mut groups = BTreeSet::new();
    idx.for_each_match(
        "jobs/1",
        "p",
        |_| true,
        |m| {
            groups.insert(m.group);
        },
    );
    assert_eq!(groups, [Some("g"), Some("h")].into_iter().collect());
}

#[test]
fn shared_random_spreads() {
    let mut idx = SubscriptionIndex::with_seed(ShareStrategy::Random, 42);
    for k in 0..4u64 {
        idx.insert_shared("g", "jobs/#", k, ());
    }
    let counts = shared_counts(&idx, &["p"], 4000);
    for c in &counts[..4] {
        assert!((800..1200).contains(c), "{counts:?}");
    }
}

#[test]
fn shared_hash_client_id_is_sticky() {
    let mut idx = SubscriptionIndex::new(ShareStrategy::HashClientId);
    for k in 0..4u64 {
        idx.insert_shared("g", "jobs/1", k, ());
    }
    for p in ["alpha", "beta", "gamma"] {
        let counts = shared_counts(&idx, &[p], 20);
        assert_eq!(counts.iter().filter(|c| **c > 0).count(), 1, "{p}");
    }
    let pubs: Vec<String> = (0..200).map(|i| format!("client-{i}")).collect();
    let pubs: Vec<&str> = pubs.iter().map(String::as_str).collect();
    let counts = shared_counts(&idx, &pubs, 200);
    assert!(counts[..4].iter().all(|c| *c > 20), "{counts:?}");
}

#[test]
fn shared_pick_and_eligibility() {
    let mut idx = SubscriptionIndex::new(ShareStrategy::RoundRobin);
    assert_eq!(idx.pick_shared_member("g", "t", 1u64), None);
    idx.insert_shared("g", "t", 1u64, 'a');
    assert_eq!(idx.pick_shared_member("g", "t", 1), None);
    assert_eq!(idx.pick_shared_member("g", "t", 2), Some((1, 'a')));
    idx.insert_shared("g", "t", 2, 'b');
    idx.insert_shared("g", "t", 3, 'c');
    for _ in 0..10 {
        let (k, _) = idx.pick_shared_member("g", "t", 2).unwrap();
        assert_ne!(k, 2);
    }
    let picked = idx.pick_shared_member_where("g", "t", "p", |k| k == 3);
    assert_eq!(picked, Some((3, &'c')));
    assert_eq!(idx.pick_shared_member_where("g", "t", "p", |_| false), None);
    assert_eq!(idx.pick_shared_member("other", "t", 1), None);
    // Preference: member 1 is never chosen while others are eligible...
    for _ in 0..10 {
        idx.for_each_match("t", "p", |k| k != 1, |m| assert_ne!(m.key, 1));
    }
    // ...but with nobody eligible the group still gets its copy.
    let mut n = 0;
    idx.for_each_match("t", "p", |_| false, |_| n += 1);
    assert_eq!(n, 1);
    let members: BTreeSet<u64> = idx.shared_members("g", "t").map(|(k, _)| k).collect();
    assert_eq!(members, [1, 2, 3].into_iter().collect());
    assert_eq!(idx.get_shared("g", "t", 2), Some(&'b'));
    assert_eq!(idx.insert_shared("g", "t", 2, 'B'), Some('b'));
    assert_eq!(idx.remove_shared("g", "t", 9), None);
    assert_eq!(idx.remove_shared("h", "t", 1), None);
    for k in 1..=3 {
        assert!(idx.remove_shared("g", "t", k).is_some());
    }
    assert_eq!(idx.shared_group_count(), 0);
    assert_eq!(idx.shared_subscription_count(), 0);
    assert_eq!(idx.node_count(), 0);
}

#[test]
fn remove_prunes_nodes() {
    // The trie holds the filters with wildcards.
    let mut idx = SubscriptionIndex::new(ShareStrategy::RoundRobin);
    idx.insert("a/b/+", 1u64, ());
    idx.insert("a/b/#", 1, ());
    assert_eq!(idx.node_count(), 4); // a, b, +, #
    idx.remove("a/b/+", 1);
    assert_eq!(idx.node_count(), 3);
    idx.remove("a/b/#", 1);
    assert_eq!(idx.node_count(), 0);

    idx.insert("a/+", 1, ());
    idx.insert("a/+/+/#", 1, ());
    idx.insert_shared("g", "a/+/+", 2, ());
    assert_eq!(idx.node_count(), 4); // a, +, +, #
    idx.remove("a/+/+/#", 1);
    assert_eq!(idx.node_count(), 3);
    idx.remove_shared("g", "a/+/+", 2);
    assert_eq!(idx.node_count(), 2);
    // Removing an inner filter keeps the nodes its descendants need.
    idx.insert("a/+/c", 3, ());
    idx.remove("a/+", 1);
    assert_eq!(idx.node_count(), 3);
    let mut out = Vec::new();
    idx.matches("a/b/c", "p", &mut out);
    assert_eq!(out.len(), 1);
    idx.remove("a/+/c", 3);
    assert_eq!(idx.node_count(), 0);
    assert!(idx.is_empty());

    // Churn does not grow the trie.
    for i in 0..1000u64 {
        let f = format!("dev/{i}/+/state");
        idx.insert(&f, i, ());
        idx.remove(&f, i);
    }
    assert_eq!(idx.node_count(), 0);
}

#[test]
fn filters_without_wildcards_are_one_entry_each() {
    let mut idx = SubscriptionIndex::new(ShareStrategy::RoundRobin);
    idx.insert("a/b/c", 1u64, 'x');
    idx.insert("a/b/c", 2, 'y');
    idx.insert_shared("g", "a/b/c", 3, 'z');
    idx.insert("a/+/c", 4, 'w');
    assert_eq!(idx.node_count(), 3); // a, +, c: only the wildcard filter
    assert_eq!(idx.exact_count(), 1);
    assert_eq!(idx.get("a/b/c", 2), Some(&'y'));
    assert_eq!(idx.get_shared("g", "a/b/c", 3), Some(&'z'));
    let mut got = Vec::new();
    idx.for_each_match(
        "a/b/c",
        "p",
        |_| true,
        |m| got.push((m.key, m.filter, m.group)),
    );
    got.sort_unstable();
    assert_eq!(
        got,
        [
            (1, "a/b/c", None),
            (2, "a/b/c", None),
            (3, "a/b/c", Some("g")),
            (4, "a/+/c", None)
        ]
    );
    let mut out = Vec::new();
    idx.matches("a/b/d", "p", &mut out);
    assert!(out.is_empty());
    // A filter without wildcards matches a `$` topic (only wildcards skip them).
    idx.insert("$SYS/up", 5, 'u');
    out.clear();
    idx.matches("$SYS/up", "p", &mut out);
    assert_eq!(out.len(), 1);
    // Gone with its last subscriber, normal or shared.
    assert_eq!(idx.remove("a/b/c", 1), Some('x'));
    assert_eq!(idx.remove("a/b/c", 2), Some('y'));
    assert_eq!(idx.exact_count(), 2);
    assert_eq!(idx.remove_shared("g", "a/b/c", 3), Some('z'));
    assert_eq!(idx.remove("$SYS/up", 5), Some('u'));
    assert_eq!(idx.exact_count(), 0);
    assert_eq!(idx.remove("a/+/c", 4), Some('w'));
    assert!(idx.is_empty());
    for i in 0..1000u64 {
        let f = format!("devices/{i}/cmd");
        idx.insert(&f, i, 'd');
    }
    assert_eq!((idx.exact_count(), idx.node_count()), (1000, 0));
    for i in 0..1000u64 {
        assert_eq!(idx.remove(&format!("devices/{i}/cmd"), i), Some('d'));
    }
    assert_eq!(idx.exact_count(), 0);
}

#[test]
fn large_fan_out() {
    let mut idx = SubscriptionIndex::new(ShareStrategy::RoundRobin);
    for k in 0..10_000u64 {
        idx.insert("news/#", k, k);
        idx.insert_shared("g", "news/#", k, k);
    }
    for k in (0..10_000u64).step_by(2) {
        assert_eq!(idx.remove("news/#", k), Some(k));
        assert_eq!(idx.remove_shared("g", "news/#", k), Some(k));
    }
    assert_eq!(idx.insert("news/#", 1, 11), Some(1));
    let mut out = Vec::with_capacity(10_000);
    idx.matches("news/today", "p", &mut out);
    assert_eq!(out.len(), 5_001);
    assert!(out.iter().all(|m| m.key % 2 == 1));
    assert!(out.iter().any(|m| m.key == 1 && m.value == 11));
    assert_eq!(idx.get("news/#", 9_999), Some(&9_999));
    assert_eq!(idx.get_shared("g", "news/#", 9_998), None);
    for k in (1..10_000u64).step_by(2) {
        idx.remove("news/#", k);
        idx.remove_shared("g", "news/#", k);
    }
    assert!(idx.is_empty());
    assert_eq!(idx.node_count(), 0);
}

#[test]
fn very_deep_filters_do_not_overflow_the_stack() {
    let deep = vec!["a"; 40_000].join("/");
    let mut idx = SubscriptionIndex::new(ShareStrategy::RoundRobin);
    idx.insert(&deep, 1u64, ()); // no wildcard: one entry, not in the trie
    idx.insert(&format!("{deep}/#"), 2, ());
    idx.insert(&format!("{deep}/+"), 3, ());
    let mut out = Vec::new();
    idx.matches(&deep, "p", &mut out);
    assert_eq!(out.len(), 2);
    idx.remove(&format!("{deep}/#"), 2);
    assert_eq!(idx.node_count(), 40_001);
    drop(idx); // iterative drop

    let mut store = RetainedStore::new();
    store.set(&deep, 1u8);
    let mut got = Vec::new();
    store.matching("a/#", &mut got);
    assert_eq!(got.len(), 1);
    store.retain_where(|_| true);
    assert_eq!(store.remove(&deep), Some(1));
    assert_eq!(store.node_count(), 0);
    store.set(&deep, 2);
    drop(store);
}

/// The default limits (65,535-byte topics and filters, 128 levels) keep
/// matching bounded: each trie node is visited at most once per topic, so a
/// maximal topic against the worst index one client can build (1,024
/// subscriptions, the `max_subscriptions` default, of 128 levels that are
/// each `+` or the topic's level) visits at most 1,024 x 128 nodes.
#[test]
fn maximal_topics_and_filters_match_in_bounded_time() {
    let level = "x".repeat(510);
    let levels: Vec<&str> = vec![level.as_str(); 128];
    let topic = levels.join("/");
    assert!(topic.len() <= 65_535 && topic.split('/').count() == 128);
    let mut idx = SubscriptionIndex::new(ShareStrategy::RoundRobin);
    let mut rng = Rng(0x0DDB_A11C_0FFE_E000);
    let mut expected = 0;
    for k in 0..1024u64 {
        let mut f: Vec<&str> = (0..128)
            .map(|_| {
                if rng.below(2) == 0 {
                    "+"
                } else {
                    level.as_str()
                }
            })
            .collect();
        if k % 2 == 0 {
            f[127] = "#";
        }
        let filter = f.join("/");
        if idx.insert(&filter, k, ()).is_none() {
            expected += 1;
        }
    }
    idx.insert(&topic, 5000, ());
    idx.insert(&(vec!["+"; 127].join("/") + "/#"), 5001, ());
    let nodes = idx.node_count();
    assert!(nodes <= 1026 * 128, "{nodes} nodes");
    let mut out = Vec::new();
    let start = std::time::Instant::now();
    for _ in 0..10 {
        out.clear();
        idx.matches(&topic, "p", &mut out);
    }
    assert_eq!(out.len(), expected + 2);
    // Generous bound (debug build, shared CI machine): linear work, not an
    // exponential walk, which would not finish at all at 128 levels.
    assert!(
        start.elapsed() < std::time::Duration::from_secs(20),
        "{:?}",
        start.elapsed()
    );
}

const LEVELS: &[&str] = &["a", "b", "", "c", "$x"];

fn random_topic(rng: &mut Rng) -> String {
    let n = 1 + rng.below(4);
    (0..n)
        .map(|_| rng.pick(LEVELS))
        .collect::<Vec<_>>()
        .join("/")
}

fn random_filter(rng: &mut Rng) -> String {
    let n = 1 + rng.below(4);
    let mut levels: Vec<&str> = (0..n)
        .map(|_| match rng.below(4) {
            0 => "+",
            _ => rng.pick(LEVELS),
        })
        .collect();
    if rng.below(3) == 0 {
        levels.push("#");
    }
    levels.join("/")
}

#[test]
fn randomized_index_vs_reference() {
    let mut rng = Rng(0x1234_5678_9ABC_DEF1);
    let mut idx = SubscriptionIndex::with_seed(ShareStrategy::Random, 7);
    // (filter, key) -> value; shared: (group, filter) -> members
    let mut model: BTreeMap<(String, u64), u32> = BTreeMap::new();
    let mut shared: BTreeMap<(String, String), BTreeSet<u64>> = BTreeMap::new();
    let mut out = Vec::new();
    for round in 0..4000u32 {
        let filter = random_filter(&mut rng);
        let key = rng.below(6) as u64;
        match rng.below(6) {
            0..=1 => {
                let prev = model.insert((filter.clone(), key), round);
                assert_eq!(idx.insert(&filter, key, round), prev);
            }
            2 => {
                let prev = model.remove(&(filter.clone(), key));
                assert_eq!(idx.remove(&filter, key), prev);
            }
            3 => {
                let group = rng.pick(&["g1", "g2"]).to_string();
                let fresh = shared
                    .entry((group.clone(), filter.clone()))
                    .or_default()
                    .insert(key);
                assert_eq!(
                    idx.insert_shared(&group, &filter, key, round).is_none(),
                    fresh
                );
            }
            4 => {
                let group = rng.pick(&["g1", "g2"]).to_string();
                let gk = (group.clone(), filter.clone());
                let present = shared.get_mut(&gk).is_some_and(|m| m.remove(&key));
                if shared.get(&gk).is_some_and(BTreeSet::is_empty) {
                    shared.remove(&gk);
                }
                assert_eq!(idx.remove_shared(&group, &filter, key).is_some(), present);
            }
            _ => {}
        }
        let topic = random_topic(&mut rng);
        out.clear();
        let mut refs = Vec::new();
        idx.for_each_match(&topic, "pub", |_| true, |m| refs.push(m));
        idx.matches(&topic, "pub", &mut out);
        assert_eq!(out.len(), refs.len());
        let mut got: Vec<(String, u64, u32)> = refs
            .iter()
            .filter(|m| m.group.is_none())
            .map(|m| (m.filter.to_string(), m.key, *m.value))
            .collect();
        got.sort();
        let want: Vec<(String, u64, u32)> = model
            .iter()
            .filter(|((f, _), _)| reference_match(f, &topic))
            .map(|((f, k), v)| (f.clone(), *k, *v))
            .collect();
        assert_eq!(got, want, "topic {topic:?}");
        let mut got_groups: Vec<(String, String)> = Vec::new();
        for m in refs.iter().filter(|m| m.group.is_some()) {
            let gk = (m.group.unwrap().to_string(), m.filter.to_string());
            assert!(shared[&gk].contains(&m.key));
            got_groups.push(gk);
        }
        got_groups.sort();
        let want_groups: Vec<(String, String)> = shared
            .keys()
            .filter(|(_, f)| reference_match(f, &topic))
            .cloned()
            .collect();
        assert_eq!(got_groups, want_groups, "topic {topic:?}");
        assert_eq!(idx.subscription_count(), model.len());
        assert_eq!(idx.shared_group_count(), shared.len());
        let members: usize = shared.values().map(BTreeSet::len).sum();
        assert_eq!(idx.shared_subscription_count(), members);
    }
    for (f, k) in model.keys() {
        assert!(idx.remove(f, *k).is_some());
    }
    for ((g, f), members) in &shared {
        for k in members {
            assert!(idx.remove_shared(g, f, *k).is_some());
        }
    }
    assert!(idx.is_empty());
    assert_eq!(idx.node_count(), 0);
}

#[test]
fn retained_basics() {
    let mut store = RetainedStore::new();
    assert!(store.is_empty());
    assert_eq!(store.set("a/b", 1), None);
    assert_eq!(store.set("a/b", 2), Some(1));
    assert_eq!(store.set("a", 3), None);
    assert_eq!(store.set("$SYS/up", 4), None);
    assert_eq!(store.len(), 3);
    assert_eq!(store.get("a/b"), Some(&2));
    assert_eq!(store.get("a/c"), None);
    assert_eq!(store.get("a/b/c"), None);
    let mut out = Vec::new();
    store.for_each_matching("#", |t, m| out.push((t, *m)));
    out.sort();
    assert_eq!(out, vec![("a", 3), ("a/b", 2)]);
    out.clear();
    store.for_each_matching("$SYS/#", |t, m| out.push((t, *m)));
    assert_eq!(out, vec![("$SYS/up", 4)]);
    let mut cloned = Vec::new();
    store.matching("+/+", &mut cloned);
    assert_eq!(cloned, vec![2]);
    let mut all = 0;
    store.for_each(|_, _| all += 1);
    assert_eq!(all, 3);
    assert_eq!(store.remove("a"), Some(3));
    assert_eq!(store.remove("a"), None);
    assert_eq!(store.node_count(), 4); // a, b, $SYS, up
    assert_eq!(store.remove("a/b"), Some(2));
    assert_eq!(store.node_count(), 2);
    assert_eq!(store.remove("x"), None);
    assert_eq!(store.remove("$SYS/up"), Some(4));
    assert_eq!(store.node_count(), 0);
    assert!(store.is_empty());
}

#[test]
fn retained_retain_where_prunes() {
    let mut store = RetainedStore::new();
    for i in 0..100u32 {
        store.set(&format!("dev/{i}/temp"), i);
        store.set(&format!("dev/{i}"), i + 1000);
    }
    assert_eq!(store.retain_where(|m| *m >= 1000 || m % 2 == 0), 50);
    assert_eq!(store.len(), 150);
    assert_eq!(store.get("dev/3/temp"), None);
    assert_eq!(store.get("dev/3"), Some(&1003));
    assert_eq!(store.get("dev/4/temp"), Some(&4));
    // dev + 100 device nodes + 50 temp nodes
    assert_eq!(store.node_count(), 151);
    assert_eq!(store.retain_where(|_| false), 150);
    assert_eq!(store.node_count(), 0);
}

#[test]
fn retained_literal_prefix_is_fast() {
    let mut store = RetainedStore::new();
    for i in 0..200_000u32 {
        store.set(&format!("other/{}/{}", i % 1000, i), i);
    }
    for i in 0..10u32 {
        store.set(&format!("devices/123/s{i}"), i);
    }
    let start = std::time::Instant::now();
    let mut out = Vec::new();
    for _ in 0..1000 {
        out.clear();
        store.matching("devices/123/#", &mut out);
    }
    assert_eq!(out.len(), 10);
    // 1000 subtree walks of 10 messages: far below a scan of 200k topics.
    assert!(start.elapsed() < std::time::Duration::from_secs(2));
}

#[test]
fn randomized_retained_vs_reference() {
    let mut rng = Rng(0xDEAD_BEEF_CAFE_F00D);
    let mut store = RetainedStore::new();
    let mut model: BTreeMap<String, u32> = BTreeMap::new();
    for round in 0..4000u32 {
        let topic = random_topic(&mut rng);
        match rng.below(3) {
            0 | 1 => assert_eq!(store.set(&topic, round), model.insert(topic, round)),
            _ => assert_eq!(store.remove(&topic), model.remove(&topic)),
        }
        let filter = random_filter(&mut rng);
        let mut got: Vec<(String, u32)> = Vec::new();
        store.for_each_matching(&filter, |t, m| got.push((t.to_string(), *m)));
        let mut cloned = Vec::new();
        store.matching(&filter, &mut cloned);
        assert_eq!(cloned.len(), got.len());
        got.sort();
        let want: Vec<(String, u32)> = model
            .iter()
            .filter(|(t, _)| reference_match(&filter, t))
            .map(|(t, m)| (t.clone(), *m))
            .collect();
        assert_eq!(got, want, "filter {filter:?}");
        assert_eq!(store.len(), model.len());
        if round % 500 == 499 {
            let cut = round / 2;
            model.retain(|_, m| *m >= cut);
            let before = store.len();
            let removed = store.retain_where(|m| *m >= cut);
            assert_eq!(before - removed, model.len());
        }
    }
    for t in model.keys() {
        assert!(store.remove(t).is_some());
    }
    assert_eq!(store.node_count(), 0);
}
