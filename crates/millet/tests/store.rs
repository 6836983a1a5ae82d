//! Integration tests of the durable store (`millet::store`).
//!
//! Includes a crash test that re-executes this test binary as a child writer
//! (`crash_child`, a no-op unless `MILLET_STORE_CRASH_DIR` is set), kills it
//! with SIGKILL mid-load and checks that everything reported durable survived,
//! and a disk-full test on a small tmpfs (skipped with a message when
//! mounting is not possible).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::{BufRead, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use millet::store::{
    unix_now_ms, Durability, InflightEntry, InflightState, MessageProperties, MessageRecord, Op,
    QueueEntry, Recovered, SessionRecord, Store, StoreError, StoreOptions, SubscriptionRecord,
    WillRecord, DB_FILE, WAL_PREFIX,
};

const WAIT: Duration = Duration::from_secs(30);

/// A scratch directory removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new(name: &str) -> TempDir {
        static N: AtomicU64 = AtomicU64::new(0);
        let p = std::env::temp_dir().join(format!(
            "millet-store-test-{name}-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).unwrap();
        TempDir(p)
    }
    fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn msg(topic: &str, payload: &[u8], expires_at_ms: Option<u64>) -> MessageRecord {
    MessageRecord {
        topic: topic.into(),
        payload: payload.to_vec().into(),
        qos: 1,
        retain: false,
        properties: MessageProperties {
            expires_at_ms,
            ..MessageProperties::default()
        },
        publisher: Some("publisher".into()),
    }
}

fn session(cid: &str, expires_at_ms: Option<u64>) -> SessionRecord {
    SessionRecord {
        client_id: cid.into(),
        expiry_interval: 3600,
        expires_at_ms,
        subscriptions: vec![SubscriptionRecord {
            filter: "a/#".into(),
            qos: 1,
            no_local: false,
            retain_as_published: false,
            retain_handling: 0,
            identifier: None,
        }],
        will: None,
        will_at_ms: None,
    }
}

fn qentry(id: u64) -> QueueEntry {
    QueueEntry {
        message_id: id,
        qos: 1,
        retain: false,
        subscription_ids: vec![],
        share: None,
    }
}

fn put_q(cid: &str, seq: u64, id: u64) -> Op {
    Op::PutQueueEntry {
        client_id: cid.into(),
        seq,
        entry: qentry(id),
    }
}

/// A QoS 1 message in flight to `cid` as `pid`, awaiting its PUBACK.
fn put_i(cid: &str, pid: u16, id: u64) -> Op {
    Op::PutInflight {
        client_id: cid.into(),
        packet_id: pid,
        entry: InflightEntry {
            message_id: id,
            qos: 1,
            retain: false,
            subscription_ids: vec![],
            state: InflightState::AwaitAck,
            order: u64::from(pid),
        },
    }
}

fn put_m(id: u64, m: MessageRecord) -> Op {
    Op::PutMessage {
        id,
        message: Box::new(m),
    }
}

fn open(dir: &Path) -> (Store, Recovered) {
    Store::open(dir, Durability::Sync).unwrap()
}

fn commit(store: &Store, ops: Vec<Op>) {
    let seq = store.submit(ops);
    store.wait_durable(seq, WAIT).unwrap();
}

fn find<'a>(r: &'a Recovered, cid: &str) -> &'a millet::store::RecoveredSession {
    r.sessions
        .iter()
        .find(|s| s.session.client_id == cid)
        .unwrap_or_else(|| panic!("session {cid} not recovered"))
}

#[test]
fn round_trip_every_record() {
    let dir = TempDir::new("roundtrip");
    let full_session = SessionRecord {
        client_id: "client-ü".into(),
        expiry_interval: u32::MAX,
        expires_at_ms: None,
        subscriptions: vec![
            SubscriptionRecord {
                filter: "$share/g/x/+".into(),
                qos: 2,
                no_local: true,
                retain_as_published: true,
                retain_handling: 2,
                identifier: Some(268_435_455),
            },
            SubscriptionRecord {
                filter: "y/#".into(),
                qos: 0,
                no_local: false,
                retain_as_published: false,
                retain_handling: 1,
                identifier: None,
            },
        ],
        will: Some(WillRecord {
            topic: "will/t".into(),
            payload: b"gone".to_vec(),
            qos: 2,
            retain: true,
            delay_interval: Some(30),
            message_expiry_interval: Some(600),
            payload_format_indicator: Some(1),
            response_topic: Some("r".into()),
            correlation_data: Some(vec![0, 1]),
            user_properties: vec![("k".into(), "v".into())],
            content_type: Some("text/plain".into()),
        }),
        will_at_ms: Some(1_800_000_000_000),
    };
    let rich = MessageRecord {
        topic: "x/1".into(),
        payload: vec![7; 64].into(),
        qos: 2,
        retain: true,
        properties: MessageProperties {
            payload_format_indicator: Some(1),
            expires_at_ms: Some(u64::MAX),
            response_topic: Some("resp".into()),
            correlation_data: Some(vec![1, 2, 3]),
            user_properties: vec![("a".into(), "1".into()), ("a".into(), "2".into())],
            content_type: Some("application/json".into()),
        },
        publisher: None,
    };
    let inflight = |id: u64, state, order| InflightEntry {
        message_id: id,
        qos: 2,
        retain: false,
        subscription_ids: vec![5],
        state,
        order,
    };
    let (store, r0) = open(dir.path());
    assert_eq!(r0, Recovered::default());
    let cid = "client-ü".to_string();
    let ids: Vec<u64> = (0..4).map(|_| store.alloc_message_id()).collect();
    let mut ops = vec![Op::PutSession(Box::new(full_session.clone()))];
    ops.push(put_m(ids[0], rich.clone()));
    for &id in &ids[1..] {
        ops.push(put_m(id, msg("y/2", b"p", None)));
    }
    // queue written out of order: recovery returns seq order
    for (seq, id) in [(30u64, ids[1]), (10, ids[0]), (20, ids[2])] {
        ops.push(Op::PutQueueEntry {
            client_id: cid.clone().into(),
            seq,
            entry: QueueEntry {
                message_id: id,
                qos: 1,
                retain: true,
                subscription_ids: vec![1, 2],
                share: Some("$share/g/x/+".into()),
            },
        });
    }
    // in-flight: packet ids in a different order than send order
    ops.push(Op::PutInflight {
        client_id: cid.clone().into(),
        packet_id: 9,
        entry: inflight(ids[3], InflightState::AwaitAck, 1),
    });
    ops.push(Op::PutInflight {
        client_id: cid.clone().into(),
        packet_id: 2,
        entry: inflight(ids[0], InflightState::AwaitComp, 2),
    });
    ops.push(Op::PutAwaitingRel {
        client_id: cid.clone().into(),
        packet_id: 65535,
    });
    ops.push(Op::PutAwaitingRel {
        client_id: cid.clone().into(),
        packet_id: 1,
    });
    ops.push(Op::PutRetained {
        topic: "x/1".into(),
        message_id: ids[0],
    });
    commit(&store, ops);
    drop(store);

    let (store, r) = open(dir.path());
    assert_eq!(r.dropped, 0);
    assert_eq!(r.orphaned_messages, 0);
    assert_eq!(r.sessions.len(), 1);
    let s = &r.sessions[0];
    assert_eq!(s.session, full_session);
    let q: Vec<(u64, u64)> = s.queue.iter().map(|(k, e)| (*k, e.message_id)).collect();
    assert_eq!(q, vec![(10, ids[0]), (20, ids[2]), (30, ids[1])]);
    assert_eq!(s.queue[0].1.subscription_ids, vec![1, 2]);
    assert_eq!(s.queue[0].1.share.as_deref(), Some("$share/g/x/+"));
    assert_eq!(
        s.inflight,
        vec![
            (9, inflight(ids[3], InflightState::AwaitAck, 1)),
            (2, inflight(ids[0], InflightState::AwaitComp, 2)),
        ]
    );
    assert_eq!(s.awaiting_rel, vec![1, 65535]);
    assert_eq!(r.retained, vec![("x/1".to_string(), ids[0])]);
    assert_eq!(r.messages.len(), 4);
    assert_eq!(r.messages[&ids[0]], rich);
    // ids keep increasing across restarts
    assert!(store.alloc_message_id() > ids[3]);
}

#[test]
fn messages_are_stored_once_and_reference_counted() {
    let dir = TempDir::new("refcount");
    let (store, _) = open(dir.path());
    let id = store.alloc_message_id();
    let mut ops = vec![put_m(id, msg("t", b"shared", None))];
    for c in ["a", "b", "c"] {
        ops.push(Op::PutSession(Box::new(session(c, None))));
        ops.push(put_q(c, 1, id));
    }
    commit(&store, ops);
    // a and b got it; c moves it to in-flight in one submit
    commit(
        &store,
        vec![
            Op::DeleteQueueEntry {
                client_id: "a".into(),
                seq: 1,
            },
            Op::DeleteQueueEntry {
                client_id: "b".into(),
                seq: 1,
            },
            Op::DeleteQueueEntry {
                client_id: "c".into(),
                seq: 1,
            },
            Op::PutInflight {
                client_id: "c".into(),
                packet_id: 1,
                entry: InflightEntry {
                    message_id: id,
                    qos: 1,
                    retain: false,
                    subscription_ids: vec![],
                    state: InflightState::AwaitAck,
                    order: 1,
                },
            },
        ],
    );
    drop(store);
    let (store, r) = open(dir.path());
    assert_eq!(r.messages.len(), 1, "one copy for three sessions");
    assert_eq!(find(&r, "c").inflight.len(), 1);
    assert!(find(&r, "a").queue.is_empty());
    // PUBACK: last reference gone -> message deleted from disk
    commit(
        &store,
        vec![Op::DeleteInflight {
            client_id: "c".into(),
            packet_id: 1,
        }],
    );
    // A message submitted without any reference is not kept either.
    let lone = store.alloc_message_id();
    commit(&store, vec![put_m(lone, msg("t", b"x", None))]);
    drop(store);
    let (_store, r) = open(dir.path());
    assert!(r.messages.is_empty());
    assert_eq!(r.orphaned_messages, 0, "deleted, not just unreferenced");
}

#[test]
fn retained_replace_and_delete() {
    let dir = TempDir::new("retained");
    let (store, _) = open(dir.path());
    let (m1, m2) = (store.alloc_message_id(), store.alloc_message_id());
    commit(
        &store,
        vec![
            put_m(m1, msg("r/1", b"one", None)),
            Op::PutRetained {
                topic: "r/1".into(),
                message_id: m1,
            },
        ],
    );
    commit(
        &store,
        vec![
            put_m(m2, msg("r/1", b"two", None)),
            Op::PutRetained {
                topic: "r/1".into(),
                message_id: m2,
            },
        ],
    );
    drop(store);
    let (store, r) = open(dir.path());
    assert_eq!(r.retained, vec![("r/1".to_string(), m2)]);
    assert_eq!(r.messages.len(), 1);
    assert_eq!(r.orphaned_messages, 0);
    commit(
        &store,
        vec![Op::DeleteRetained {
            topic: "r/1".into(),
        }],
    );
    drop(store);
    let (_s, r) = open(dir.path());
    assert!(r.retained.is_empty() && r.messages.is_empty() && r.orphaned_messages == 0);
}

#[test]
fn delete_session_removes_everything_it_owns() {
    let dir = TempDir::new("delsession");
    let (store, _) = open(dir.path());
    let id = store.alloc_message_id();
    commit(
        &store,
        vec![
            Op::PutSession(Box::new(session("gone", None))),
            Op::PutSession(Box::new(session("kept", None))),
            put_m(id, msg("t", b"m", None)),
            put_q("gone", 1, id),
            put_q("gone", 2, id),
            put_q("kept", 1, id),
            Op::PutAwaitingRel {
                client_id: "gone".into(),
                packet_id: 3,
            },
        ],
    );
    commit(
        &store,
        vec![Op::DeleteSession {
            client_id: "gone".into(),
        }],
    );
    drop(store);
    let (store, r) = open(dir.path());
    assert_eq!(r.sessions.len(), 1);
    assert_eq!(find(&r, "kept").queue.len(), 1);
    assert_eq!(r.messages.len(), 1);
    commit(
        &store,
        vec![Op::DeleteSession {
            client_id: "kept".into(),
        }],
    );
    drop(store);
    let (_s, r) = open(dir.path());
    assert!(r.sessions.is_empty() && r.messages.is_empty() && r.orphaned_messages == 0);
}

#[test]
fn sweep_removes_expired_sessions_messages_and_orphans() {
    let dir = TempDir::new("sweep");
    let now = unix_now_ms();
    let (store, _) = open(dir.path());
    let fresh = store.alloc_message_id();
    let stale = store.alloc_message_id();
    let stale_inflight = store.alloc_message_id();
    let stale_retained = store.alloc_message_id();
    commit(
        &store,
        vec![
            Op::PutSession(Box::new(session("expired", Some(now - 1)))),
            Op::PutSession(Box::new(session("live", Some(now + 3_600_000)))),
            Op::PutSession(Box::new(session("connected", None))),
            put_m(fresh, msg("t", b"fresh", Some(now + 3_600_000))),
            put_m(stale, msg("t", b"stale", Some(now - 1))),
            put_m(stale_inflight, msg("t", b"stale", Some(now - 1))),
            put_m(stale_retained, msg("t", b"stale", Some(now - 1))),
            put_q("expired", 1, fresh),
            put_q("live", 1, stale),
            put_q("live", 2, fresh),
            put_q("connected", 1, stale),
            Op::PutInflight {
                client_id: "live".into(),
                packet_id: 7,
                entry: InflightEntry {
                    message_id: stale_inflight,
                    qos: 1,
                    retain: false,
                    subscription_ids: vec![],
                    state: InflightState::AwaitAck,
                    order: 0,
                },
            },
            Op::PutRetained {
                topic: "t".into(),
                message_id: stale_retained,
            },
        ],
    );
    let seq = store.sweep(now);
    store.wait_durable(seq, WAIT).unwrap();
    let st = store.stats();
    assert_eq!(st.sweeps, 1);
    assert_eq!(st.swept_sessions, 1);
    // stale (queued twice) and stale_retained; stale_inflight is kept
    assert_eq!(st.swept_messages, 2);
    drop(store);
    let (_s, r) = open(dir.path());
    let mut names: Vec<&str> = r
        .sessions
        .iter()
        .map(|s| s.session.client_id.as_str())
        .collect();
    names.sort_unstable();
    assert_eq!(names, vec!["connected", "live"]);
    let live = find(&r, "live");
    assert_eq!(live.queue.len(), 1);
    assert_eq!(live.queue[0].1.message_id, fresh);
    assert_eq!(live.inflight.len(), 1, "in-flight survives message expiry");
    assert!(find(&r, "connected").queue.is_empty());
    assert!(r.retained.is_empty());
    let mut ids: Vec<u64> = r.messages.keys().copied().collect();
    ids.sort_unstable();
    assert_eq!(ids, vec![fresh, stale_inflight]);
    assert_eq!(r.orphaned_messages, 0);
}

#[test]
fn group_commit_batches_many_submitters() {
    let dir = TempDir::new("group");
    let (store, _) = open(dir.path());
    let store = Arc::new(store);
    commit(
        &store,
        vec![Op::PutSession(Box::new(session("sink", None)))],
    );
    let before = store.stats();
    let threads = 8u64;
    let per = 1000u64;
    let window = 32usize;
    let t0 = Instant::now();
    std::thread::scope(|s| {
        for t in 0..threads {
            let store = store.clone();
            s.spawn(move || {
                let mut outstanding = std::collections::VecDeque::new();
                for i in 0..per {
                    let id = store.alloc_message_id();
                    let seq = store.submit(vec![
                        put_m(id, msg("a/b", &[0u8; 64], None)),
                        put_q("sink", t * per + i, id),
                    ]);
                    outstanding.push_back(seq);
                    if outstanding.len() >= window {
                        let s = outstanding.pop_front().unwrap();
                        store.wait_durable(s, WAIT).unwrap();
                    }
                }
                for s in outstanding {
                    store.wait_durable(s, WAIT).unwrap();
                }
            });
        }
    });
    let el = t0.elapsed();
    let after = store.stats();
    let submits = after.submits - before.submits;
    let commits = after.commits - before.commits;
    let fsyncs = after.fsyncs - before.fsyncs;
    println!(
        "group commit: {submits} submits in {commits} commits / {fsyncs} fsyncs \
         ({:.1} submits per fsync), {:.0} submits/s",
        submits as f64 / fsyncs.max(1) as f64,
        submits as f64 / el.as_secs_f64()
    );
    assert_eq!(submits, threads * per);
    assert!(
        commits * 4 < submits,
        "expected batching: {commits} commits for {submits} submits"
    );
    assert_eq!(fsyncs, commits, "Sync: one fsync per commit");
    drop(store);
    let (_s, r) = open(dir.path());
    assert_eq!(find(&r, "sink").queue.len() as u64, threads * per);
}

/// Throughput of acknowledged QoS 1 messages under `Sync` (printed, not
/// asserted). Each "publish" is a 64-byte message queued for one offline
/// persistent session; the publisher is acknowledged through `on_durable`.
#[test]
fn throughput_sync_qos1() {
    let dir = TempDir::new("throughput");
    let (store, _) = open(dir.path());
    let store = Arc::new(store);
    commit(
        &store,
        vec![Op::PutSession(Box::new(session("offline", None)))],
    );
    let acked = Arc::new(AtomicU64::new(0));
    let acked2 = acked.clone();
    store.on_durable(move |seq| {
        acked2.fetch_max(seq, Ordering::Relaxed);
    });
    let threads = 16u64;
    let per: u64 = std::env::var("MILLET_STORE_BENCH_PER_THREAD")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(2_500);
    let t0 = Instant::now();
    let last = std::thread::scope(|s| {
        let hs: Vec<_> = (0..threads)
            .map(|t| {
                let store = store.clone();
                s.spawn(move || {
                    let mut last = 0;
                    let mut outstanding = std::collections::VecDeque::new();
                    for i in 0..per {
                        let id = store.alloc_message_id();
                        last = store.submit(vec![
                            put_m(id, msg("sensors/1/temp", &[0x5a; 64], None)),
                            put_q("offline", t * per + i, id),
                        ]);
                        // a client with receive maximum 64
                        outstanding.push_back(last);
                        if outstanding.len() >= 64 {
                            let s = outstanding.pop_front().unwrap();
                            store.wait_durable(s, WAIT).unwrap();
                        }
                    }
                    last
                })
            })
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).max().unwrap()
    });
    store.wait_durable(last, WAIT).unwrap();
    let el = t0.elapsed();
    let st = store.stats();
    let n = threads * per;
    // the callback runs on the writer thread right after durable_seq moves
    let deadline = Instant::now() + WAIT;
    while acked.load(Ordering::Relaxed) < last {
        assert!(Instant::now() < deadline, "on_durable never reached {last}");
        std::thread::yield_now();
    }
    println!(
        "throughput (Sync, {threads} publishers, 64-byte QoS 1): {n} acked in {el:.2?} = {:.0} msg/s, \
         {} fsyncs ({:.0} msgs per fsync)",
        n as f64 / el.as_secs_f64(),
        st.fsyncs,
        n as f64 / st.fsyncs.max(1) as f64
    );
}

#[test]
fn interval_policy_acks_before_fsync_then_syncs() {
    let dir = TempDir::new("interval");
    let (store, _) =
        Store::open(dir.path(), Durability::Interval(Duration::from_millis(50))).unwrap();
    commit(&store, vec![Op::PutSession(Box::new(session("s", None)))]);
    let mut last = 0;
    for i in 0..200u64 {
        let id = store.alloc_message_id();
        last = store.submit(vec![put_m(id, msg("t", b"x", None)), put_q("s", i, id)]);
    }
    store.wait_durable(last, WAIT).unwrap();
    let deadline = Instant::now() + WAIT;
    while store.synced_seq() < last {
        assert!(Instant::now() < deadline, "interval fsync never happened");
        std::thread::sleep(Duration::from_millis(5));
    }
    let st = store.stats();
    assert!(
        st.fsyncs < st.commits,
        "interval: fewer fsyncs ({}) than commits ({})",
        st.fsyncs,
        st.commits
    );
    drop(store);
    let (_s, r) = open(dir.path());
    assert_eq!(find(&r, "s").queue.len(), 200);
}

#[test]
fn quota_refuses_growth_but_not_acks() {
    let dir = TempDir::new("quota");
    let limit = 256 * 1024;
    let (store, _) = Store::open_with(
        dir.path(),
        StoreOptions {
            durability: Durability::Sync,
            max_bytes: Some(limit),
            ..StoreOptions::default()
        },
    )
    .unwrap();
    let events = Arc::new(Mutex::new(Vec::<String>::new()));
    let (e1, e2) = (events.clone(), events.clone());
    store.on_failed(move |r, e| {
        e1.lock()
            .unwrap()
            .push(format!("failed {}..={} {e}", r.start(), r.end()))
    });
    store.on_durable(move |s| e2.lock().unwrap().push(format!("durable {s}")));
    commit(&store, vec![Op::PutSession(Box::new(session("s", None)))]);
    let mut refused = None;
    for i in 0..2000u64 {
        let id = store.alloc_message_id();
        let seq = store.submit(vec![
            put_m(id, msg("t", &[1u8; 4096], None)),
            put_q("s", i, id),
        ]);
        match store.wait_durable(seq, WAIT) {
            Ok(()) => {}
            Err(e) => {
                assert!(matches!(e, StoreError::QuotaExceeded { limit: l } if l == limit));
                assert!(e.is_out_of_space());
                refused = Some((i, seq));
                break;
            }
        }
    }
    let (n, seq) = refused.expect("quota never reached");
    // the failure was reported before durable_seq passed it (wait_durable
    // returns as soon as the failure is known, the durable callback follows)
    let deadline = Instant::now() + WAIT;
    let ev = loop {
        let ev = events.lock().unwrap().clone();
        let passed = ev.iter().any(|e| {
            e.strip_prefix("durable ")
                .is_some_and(|s| s.parse::<u64>().unwrap() >= seq)
        });
        if passed {
            break ev;
        }
        assert!(Instant::now() < deadline, "no durable callback past {seq}");
        std::thread::yield_now();
    };
    let fpos = ev
        .iter()
        .position(|e| e.starts_with(&format!("failed {seq}..=")))
        .unwrap();
    let dpos = ev
        .iter()
        .position(|e| {
            e.strip_prefix("durable ")
                .is_some_and(|s| s.parse::<u64>().unwrap() >= seq)
        })
        .unwrap();
    assert!(fpos < dpos, "{ev:?}");
    // acks (deletes) still go through while over quota
    let del: Vec<Op> = (0..n)
        .map(|i| Op::DeleteQueueEntry {
            client_id: "s".into(),
            seq: i,
        })
        .collect();
    commit(&store, del);
    drop(store);
    let (_s, r) = open(dir.path());
    assert!(find(&r, "s").queue.is_empty());
    assert!(r.messages.is_empty());
}

// ---------------------------------------------------------------------------
// Crash safety: SIGKILL a writer child mid-load.

const CRASH_ENV: &str = "MILLET_STORE_CRASH_DIR";
const CRASH_POLICY_ENV: &str = "MILLET_STORE_CRASH_POLICY";
/// Set: the crash child never checkpoints, so everything is in the log.
const CRASH_NO_CHECKPOINT_ENV: &str = "MILLET_STORE_CRASH_NO_CHECKPOINT";

/// The child side of `crash_sigkill_*` (does nothing in a normal test run):
/// writes messages in a loop and prints `D <durable> <synced>` after each
/// group, until killed.
#[test]
fn crash_child() {
    let Some(dir) = std::env::var_os(CRASH_ENV) else {
        return;
    };
    let policy = match std::env::var(CRASH_POLICY_ENV).as_deref() {
        Ok("interval") => Durability::Interval(Duration::from_millis(20)),
        _ => Durability::Sync,
    };
    let mut options = StoreOptions {
        durability: policy,
        ..StoreOptions::default()
    };
    if std::env::var_os(CRASH_NO_CHECKPOINT_ENV).is_some() {
        options.checkpoint_bytes = u64::MAX;
        options.checkpoint_interval = Duration::from_secs(3600);
    }
    let (store, _) = Store::open_with(Path::new(&dir), options).unwrap();
    let store = Arc::new(store);
    let weak = Arc::downgrade(&store);
    store.on_durable(move |d| {
        let synced = weak.upgrade().map_or(0, |s| s.synced_seq());
        let mut out = std::io::stdout().lock();
        let _ = writeln!(out, "D {d} {synced}");
        let _ = out.flush();
    });
    // seq 1 creates the session; seq k >= 2 carries message k at queue seq
    // k. One submitter, so the sequence numbers are known in advance; group
    // commit still batches because submit never waits for the disk.
    let first = store.submit(vec![Op::PutSession(Box::new(session("c", None)))]);
    assert_eq!(first, 1);
    let mut k = 2u64;
    let deadline = Instant::now() + Duration::from_secs(120);
    while Instant::now() < deadline {
        if store.pending() > 512 {
            std::thread::yield_now();
            continue;
        }
        let seq = store.submit(vec![
            put_m(k, msg("crash/t", &[k as u8; 64], None)),
            put_q("c", k, k),
        ]);
        assert_eq!(seq, k);
        k += 1;
    }
}

/// Run the child, kill it after it reported `kill_after` durable sequences,
/// return the last durable and synced sequences it reported.
fn run_crash_child(dir: &Path, policy: &str, kill_after: u64) -> (u64, u64) {
    run_crash_child_with(dir, policy, kill_after, false)
}

fn run_crash_child_with(
    dir: &Path,
    policy: &str,
    kill_after: u64,
    no_checkpoint: bool,
) -> (u64, u64) {
    let exe = std::env::current_exe().unwrap();
    let mut cmd = std::process::Command::new(exe);
    if no_checkpoint {
        cmd.env(CRASH_NO_CHECKPOINT_ENV, "1");
    }
    let mut child = cmd
        .args(["--exact", "crash_child", "--nocapture", "--test-threads=1"])
        .env(CRASH_ENV, dir)
        .env(CRASH_POLICY_ENV, policy)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel::<(u64, u64)>();
    let reader = std::thread::spawn(move || {
        for line in std::io::BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            let mut it = line.split_whitespace();
            if it.next() != Some("D") {
                continue;
            }
            let d = it.next().and_then(|s| s.parse().ok()).unwrap_or(0);
            let s = it.next().and_then(|s| s.parse().ok()).unwrap_or(0);
            if tx.send((d, s)).is_err() {
                break;
            }
        }
    });
    let deadline = Instant::now() + Duration::from_secs(60);
    let (mut durable, mut synced) = (0, 0);
    while durable < kill_after {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok((d, s)) => {
                durable = durable.max(d);
                synced = synced.max(s);
            }
            Err(_) => {
                let _ = child.kill();
                let _ = child.wait();
                panic!("crash child made no progress (durable {durable})");
            }
        }
    }
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    // lines already printed before the kill are still valid reports
    while let Ok((d, s)) = rx.try_recv() {
        durable = durable.max(d);
        synced = synced.max(s);
    }
    let _ = reader.join();
    (durable, synced)
}

/// Every sequence `2..=upto` must have its message and queue entry.
fn check_crash_survivors(dir: &Path, upto: u64) -> usize {
    let (_s, r) = Store::open(dir, Durability::Sync).unwrap();
    assert_eq!(r.dropped, 0, "committed data is never corrupt");
    let c = find(&r, "c");
    let present: std::collections::HashSet<u64> = c.queue.iter().map(|(k, _)| *k).collect();
    for (seq, e) in &c.queue {
        assert_eq!(*seq, e.message_id);
        assert_eq!(r.messages[&e.message_id].payload, vec![*seq as u8; 64]);
    }
    for k in 2..=upto {
        assert!(
            present.contains(&k),
            "seq {k} was reported durable (<= {upto}) but is missing"
        );
    }
    // nothing beyond what was written, and no gaps: commits are a prefix
    let max = present.iter().copied().max().unwrap_or(1);
    assert_eq!(present.len() as u64, max - 1, "recovered state is a prefix");
    present.len()
}

#[test]
fn crash_sigkill_sync_keeps_everything_reported_durable() {
    for (round, kill_after) in [(0, 300u64), (1, 3000)] {
        let dir = TempDir::new(&format!("crash-sync-{round}"));
        let (durable, _) = run_crash_child(dir.path(), "sync", kill_after);
        let n = check_crash_survivors(dir.path(), durable);
        println!(
            "crash (sync) round {round}: killed at durable seq {durable}, recovered {n} messages"
        );
    }
}

#[test]
fn crash_sigkill_interval_keeps_everything_synced() {
    let dir = TempDir::new("crash-interval");
    let (durable, synced) = run_crash_child(dir.path(), "interval", 2000);
    let n = check_crash_survivors(dir.path(), synced);
    println!(
        "crash (interval 20ms): killed at durable {durable} / synced {synced}, recovered {n} messages \
         (lost {} acknowledged)",
        durable.saturating_sub(n as u64 + 1)
    );
}

/// The write-ahead log segments of a store directory, oldest first.
fn log_segments(dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with(WAL_PREFIX))
        })
        .collect();
    v.sort();
    v
}

/// Copy the files of a store directory (not recursive: a store has none).
fn copy_store(from: &Path, to: &Path) {
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
    }
}

#[test]
fn log_replay_after_a_crash_and_torn_or_damaged_log_tails() {
    // Killed with everything since the start still in the write-ahead log
    // (no checkpoint): a restart replays it into the engine.
    let dir = TempDir::new("wal-crash");
    let (durable, _) = run_crash_child_with(dir.path(), "sync", 1500, true);
    let segments = log_segments(dir.path());
    assert_eq!(segments.len(), 1, "{segments:?}");
    let wal_name = segments[0].file_name().unwrap().to_owned();
    let wal_len = std::fs::metadata(&segments[0]).unwrap().len();
    assert!(
        wal_len > 1500 * 64,
        "the log holds the groups ({wal_len} bytes)"
    );

    // A torn last record (the crash hit mid-append): cut off, the rest kept.
    let torn = TempDir::new("wal-torn");
    copy_store(dir.path(), torn.path());
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(torn.path().join(&wal_name))
        .unwrap();
    f.set_len(wal_len - 7).unwrap();
    drop(f);
    let n_torn = check_crash_survivors(torn.path(), 0);
    assert!(
        n_torn > 0 && (n_torn as u64) < durable,
        "{n_torn} of {durable}"
    );

    // A damaged byte in the middle: replay stops at that record; what came
    // before it is recovered, nothing after it (a prefix).
    let bad = TempDir::new("wal-bad");
    copy_store(dir.path(), bad.path());
    let mut bytes = std::fs::read(bad.path().join(&wal_name)).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x5a;
    std::fs::write(bad.path().join(&wal_name), &bytes).unwrap();
    let n_bad = check_crash_survivors(bad.path(), 0);
    assert!(n_bad < n_torn, "{n_bad} recovered past a damaged record");

    // The intact log: everything reported durable is there, and a second
    // open (log already replayed and emptied) finds the same.
    let n = check_crash_survivors(dir.path(), durable);
    assert!(!segments[0].exists(), "replayed segments are deleted");
    assert!(log_segments(dir.path()).len() <= 1);
    assert_eq!(check_crash_survivors(dir.path(), durable), n);
}

#[test]
fn absorbed_ops_leave_the_same_state_as_applying_them_one_by_one() {
    // One group in which messages are queued, moved in flight and acked
    // (never written), one that stays queued, one left in flight, and a
    // message whose queue entry is replaced.
    let dir = TempDir::new("absorb");
    // Checkpoint after every group, so the group below is applied at once.
    let (store, _) = Store::open_with(
        dir.path(),
        StoreOptions {
            checkpoint_interval: Duration::ZERO,
            ..StoreOptions::default()
        },
    )
    .unwrap();
    let inflight = |pid: u16, id: u64| put_i("s", pid, id);
    let del_q = |seq: u64| Op::DeleteQueueEntry {
        client_id: "s".into(),
        seq,
    };
    let del_i = |pid: u16| Op::DeleteInflight {
        client_id: "s".into(),
        packet_id: pid,
    };
    store.pause_writes(true); // everything below lands in one group
    let mut last = store.submit(vec![Op::PutSession(Box::new(session("s", None)))]);
    for id in 1..=100u64 {
        store.submit(vec![
            put_m(id, msg("t", &[id as u8; 16], None)),
            put_q("s", id, id),
        ]);
        store.submit(vec![del_q(id), inflight(id as u16, id)]);
        last = store.submit(vec![del_i(id as u16)]);
    }
    // 101 stays queued; 102 stays in flight; 103 queued twice at seq 103
    // (replaced by 104's message).
    store.submit(vec![put_m(101, msg("t", b"q", None)), put_q("s", 101, 101)]);
    store.submit(vec![put_m(102, msg("t", b"i", None)), put_q("s", 102, 102)]);
    store.submit(vec![del_q(102), inflight(200, 102)]);
    store.submit(vec![
        put_m(103, msg("t", b"old", None)),
        put_q("s", 103, 103),
    ]);
    last = last.max(store.submit(vec![
        put_m(104, msg("t", b"new", None)),
        put_q("s", 103, 104),
    ]));
    store.pause_writes(false);
    store.wait_durable(last, WAIT).unwrap();
    // A sweep waits for every checkpoint before it.
    let sweep = store.sweep(unix_now_ms());
    store.wait_durable(sweep, WAIT).unwrap();
    let st = store.stats();
    // Per acknowledged message all five ops are absorbed (the entries are
    // created and deleted within the group, the message loses its last
    // reference); plus 102's queue put and delete, 103's first queue put
    // and message 103, which nothing references any more.
    assert_eq!(st.absorbed, 100 * 5 + 4, "{st:?}");
    assert!(st.checkpoints >= 1);
    drop(store);
    let (_store, r) = open(dir.path());
    let s = find(&r, "s");
    let queue: Vec<(u64, u64)> = s.queue.iter().map(|(k, e)| (*k, e.message_id)).collect();
    assert_eq!(queue, vec![(101, 101), (103, 104)]);
    let infl: Vec<(u16, u64)> = s.inflight.iter().map(|(p, e)| (*p, e.message_id)).collect();
    assert_eq!(infl, vec![(200, 102)]);
    let mut ids: Vec<u64> = r.messages.keys().copied().collect();
    ids.sort_unstable();
    assert_eq!(
        ids,
        vec![101, 102, 104],
        "unreferenced messages are not stored"
    );
    assert_eq!(
        r.orphaned_messages, 0,
        "absorbed messages never reached the engine"
    );
}

#[test]
fn a_round_that_absorbs_everything_is_durable_without_a_write_or_an_fsync() {
    // The fleet's round: a message queued for a persistent session and
    // acknowledged by it before the writer took the round. Nothing is left
    // to log, so nothing is fsynced, and the publisher's ticket is durable.
    let dir = TempDir::new("absorb-all");
    let (store, _) = open(dir.path());
    commit(&store, vec![Op::PutSession(Box::new(session("s", None)))]);
    let before = store.stats();
    store.pause_writes(true); // one round
    let id = store.alloc_message_id();
    let published = store.submit(vec![put_m(id, msg("t", b"x", None)), put_q("s", 1, id)]);
    let acked = store.submit(vec![Op::DeleteQueueEntry {
        client_id: "s".into(),
        seq: 1,
    }]);
    store.pause_writes(false);
    store.wait_durable(published.max(acked), WAIT).unwrap();
    let after = store.stats();
    assert_eq!(after.commits - before.commits, 1, "{after:?}");
    assert_eq!(after.absorbed - before.absorbed, 3, "{after:?}");
    assert_eq!(
        after.fsyncs, before.fsyncs,
        "nothing logged, nothing to fsync: {after:?}"
    );
    assert!(store.synced_seq() >= acked);
    // The next round that logs something is fsynced as before.
    let id2 = store.alloc_message_id();
    commit(
        &store,
        vec![put_m(id2, msg("t", b"y", None)), put_q("s", 2, id2)],
    );
    assert_eq!(store.stats().fsyncs, before.fsyncs + 1);
    drop(store);
    let (_store, r) = open(dir.path());
    let q: Vec<u64> = find(&r, "s").queue.iter().map(|(k, _)| *k).collect();
    assert_eq!(q, vec![2], "the absorbed entry left nothing behind");
}

/// A `sync` store lingering 10 ms after busy rounds (the broker's setting),
/// holding session "s".
fn open_lingering_with_session(dir: &Path) -> Store {
    let (store, _) = Store::open_with(
        dir,
        StoreOptions {
            linger: Duration::from_millis(10),
            ..StoreOptions::default()
        },
    )
    .unwrap();
    commit(&store, vec![Op::PutSession(Box::new(session("s", None)))]);
    store
}

/// Reopened, session "s" has nothing in flight and no message is stored.
fn assert_nothing_left(dir: &Path) {
    let (_store, r) = open(dir);
    assert!(find(&r, "s").inflight.is_empty());
    assert!(r.messages.is_empty());
}

#[test]
fn an_in_flight_delivery_waits_for_its_acknowledgement_to_absorb_it() {
    // `sync` with lingering (the broker's setting): a submit that puts a
    // message in flight while the writer is idle starts its round up to
    // SYNC_ABSORB_WINDOW later, so the subscriber's acknowledgement, if it
    // comes within that, lands in the same round and nothing is logged.
    let dir = TempDir::new("absorb-window");
    let store = open_lingering_with_session(dir.path());
    // After that round the writer gathers for at most SYNC_LINGER_ONE (a
    // round of one group); past it the writer is idle, which is the case
    // under test (while it gathers, the two submits share a round anyway).
    std::thread::sleep(millet::store::SYNC_LINGER_ONE * 3);
    let before = store.stats();
    let id = store.alloc_message_id();
    let t0 = Instant::now();
    let published = store.submit(vec![put_m(id, msg("t", b"x", None)), put_i("s", 1, id)]);
    // The acknowledgement comes a little later: after the writer has woken
    // for the first submit (tens of microseconds), inside the window.
    std::thread::sleep(Duration::from_micros(200));
    let acked = store.submit(vec![Op::DeleteInflight {
        client_id: "s".into(),
        packet_id: 1,
    }]);
    let between = t0.elapsed();
    let durable_at_once = store.durable_seq() >= acked;
    store.wait_durable(published.max(acked), WAIT).unwrap();
    let after = store.stats();
    // Unless this thread was descheduled for long in between (then the
    // window may have closed first), the acknowledgement found the
    // delivery still waiting: absorbed at its submit, with nothing left to
    // write and no round under way, so both were durable at once, without
    // a round of the writer's.
    if between < millet::store::SYNC_ABSORB_WINDOW * 3 / 4 {
        assert!(durable_at_once, "durable when the ack was submitted");
        assert_eq!(after.commits, before.commits, "no round: {after:?}");
        assert_eq!(after.absorbed - before.absorbed, 3, "{after:?}");
        assert_eq!(after.fsyncs, before.fsyncs, "nothing logged: {after:?}");
    }
    drop(store);
    assert_nothing_left(dir.path());
}

#[test]
fn a_round_leaves_the_newest_in_flight_deliveries_to_the_next() {
    // A fleet in miniature under `sync` with the broker's linger, each
    // message going the broker's way to a connected persistent session:
    // queued (the publisher's submit, `submit_awaiting_ack`), put in flight
    // (the subscriber's connection), acknowledged a moment later. Rounds
    // end every `linger` while exchanges go on; a submit awaiting an
    // acknowledgement that is younger than SYNC_ABSORB_WINDOW when a round
    // is taken waits for the next round, with what follows it, so every
    // exchange acknowledged within the window is absorbed whole, wherever
    // the rounds fall. Without the hold-back most rounds cut an exchange in
    // two (its message logged and fsynced in one round, its deletes in the
    // next).
    let dir = TempDir::new("absorb-straddle");
    let store = open_lingering_with_session(dir.path());
    let before = store.stats();
    let (mut fast, mut last) = (0u64, 0u64);
    for packet_id in 1..=300u16 {
        let id = store.alloc_message_id();
        let t0 = Instant::now();
        let seq = u64::from(packet_id);
        store.submit_awaiting_ack(vec![put_m(id, msg("t", b"x", None)), put_q("s", seq, id)]);
        store.submit(vec![
            Op::DeleteQueueEntry {
                client_id: "s".into(),
                seq,
            },
            put_i("s", packet_id, id),
        ]);
        std::thread::sleep(Duration::from_micros(300));
        last = store.submit(vec![Op::DeleteInflight {
            client_id: "s".into(),
            packet_id,
        }]);
        // The delivery was still held when its acknowledgement came.
        if t0.elapsed() < millet::store::SYNC_ABSORB_WINDOW {
            fast += 1;
        }
        std::thread::sleep(Duration::from_micros(50));
    }
    store.wait_durable(last, WAIT).unwrap();
    let after = store.stats();
    let whole = (after.absorbed - before.absorbed) / 5;
    assert!(fast > 0, "no exchange was timed within the window");
    assert!(
        whole >= fast,
        "{whole} exchanges absorbed whole, {fast} acknowledged within the window: {after:?}"
    );
    // Only a slow exchange is logged: its message in one round, its delete
    // in a later one. Give or take a couple: the queue entry and the
    // in-flight put of one exchange are submitted microseconds apart, each
    // held for the window, and a writer that wakes within those
    // microseconds of the first one's hold ending takes it alone (seen in
    // CI under load: 4 fsyncs with 1 slow exchange).
    let slow = 300 - fast;
    assert!(
        after.fsyncs - before.fsyncs <= 2 * slow + 4,
        "{} fsyncs for {slow} slow exchanges: {after:?}",
        after.fsyncs - before.fsyncs
    );
    drop(store);
    assert_nothing_left(dir.path());
}

// ---------------------------------------------------------------------------
// Corruption and open errors.

/// A store with one session, `n` queued messages and a retained message.
fn populate(dir: &Path, n: u64) -> Recovered {
    let (store, _) = open(dir);
    let mut ops = vec![Op::PutSession(Box::new(session("s", None)))];
    for i in 0..n {
        let id = store.alloc_message_id();
        ops.push(put_m(id, msg("t", &[i as u8; 64], None)));
        ops.push(put_q("s", i, id));
    }
    let id = store.alloc_message_id();
    ops.push(put_m(id, msg("r", b"retained", None)));
    ops.push(Op::PutRetained {
        topic: "r".into(),
        message_id: id,
    });
    commit(&store, ops);
    drop(store);
    open(dir).1
}

#[test]
fn undecodable_records_are_skipped_counted_and_swept() {
    let dir = TempDir::new("badrecord");
    let good = populate(dir.path(), 10);
    {
        // Write records the store cannot decode, straight through the engine.
        let db = redb::Database::create(dir.path().join(DB_FILE)).unwrap();
        let tx = db.begin_write().unwrap();
        {
            let q: redb::TableDefinition<(&[u8], u64), &[u8]> = redb::TableDefinition::new("queue");
            let mut t = tx.open_table(q).unwrap();
            t.insert((b"s".as_slice(), 1000u64), b"\x01garbage".as_slice())
                .unwrap();
            t.insert(
                (b"nobody".as_slice(), 1u64),
                millet::store::Record::encode(&qentry(1)).as_slice(),
            )
            .unwrap();
            let m: redb::TableDefinition<u64, &[u8]> = redb::TableDefinition::new("messages");
            let mut t = tx.open_table(m).unwrap();
            t.insert(999_999u64, b"\x07future format".as_slice())
                .unwrap();
            let s: redb::TableDefinition<&[u8], &[u8]> = redb::TableDefinition::new("sessions");
            let mut t = tx.open_table(s).unwrap();
            t.insert(b"broken".as_slice(), b"".as_slice()).unwrap();
        }
        tx.commit().unwrap();
    }
    let (store, r) = open(dir.path());
    assert_eq!(
        r.dropped, 4,
        "garbage queue entry, orphan entry, bad message, bad session"
    );
    assert_eq!(r.sessions, good.sessions, "everything intact is recovered");
    assert_eq!(r.messages, good.messages);
    assert_eq!(r.retained, good.retained);
    // the next sweep removes what recovery skipped
    let seq = store.sweep(unix_now_ms());
    store.wait_durable(seq, WAIT).unwrap();
    drop(store);
    let (_s, r) = open(dir.path());
    assert_eq!(r.dropped, 0);
    assert_eq!(r.sessions, good.sessions);
}

/// Open after damage: recovers (maybe partially) or fails with an `Open`
/// error naming the path — never panics, never hangs.
fn open_damaged(dir: &Path, what: &str) -> Result<Recovered, StoreError> {
    let r = std::panic::catch_unwind(|| Store::open(dir, Durability::Sync));
    let r = r.unwrap_or_else(|_| panic!("{what}: open panicked"));
    match r {
        Ok((store, rec)) => {
            // and it is writable
            commit(
                &store,
                vec![Op::PutSession(Box::new(session("after", None)))],
            );
            Ok(rec)
        }
        Err(e) => {
            assert!(matches!(e, StoreError::Open { .. }), "{what}: {e:?}");
            let text = e.to_string();
            assert!(
                text.contains(&dir.display().to_string()),
                "{what}: error does not name the path: {text}"
            );
            Err(e)
        }
    }
}

#[test]
fn garbage_appended_recovers_or_fails_clearly() {
    let dir = TempDir::new("garbage");
    let good = populate(dir.path(), 50);
    let file = dir.path().join(DB_FILE);
    let mut f = std::fs::OpenOptions::new()
        .append(true)
        .open(&file)
        .unwrap();
    f.write_all(&[0xA5u8; 10_000]).unwrap();
    drop(f);
    match open_damaged(dir.path(), "garbage appended") {
        Ok(r) => {
            assert_eq!(r.sessions, good.sessions);
            assert_eq!(r.messages, good.messages);
        }
        // redb refuses a file whose length is not a valid layout
        Err(e) => println!("garbage appended: {e}"),
    }
}

#[test]
fn truncated_or_damaged_file_recovers_or_fails_clearly() {
    let base = TempDir::new("damage");
    let pristine = base.path().join("pristine");
    populate(&pristine, 200);
    let bytes = std::fs::read(pristine.join(DB_FILE)).unwrap();
    let len = bytes.len();
    let mut outcomes = Vec::new();
    // truncations (a torn file) at several points, including inside the header
    let cuts = [0, 1, 100, 512, 4096, len / 4, len / 2, len - 4096, len - 1];
    for (i, &cut) in cuts.iter().enumerate() {
        let dir = base.path().join(format!("cut{i}"));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join(DB_FILE), &bytes[..cut.min(len)]).unwrap();
        let what = format!("truncated to {cut} of {len}");
        outcomes.push((what.clone(), open_damaged(&dir, &what).map(|r| r.dropped)));
    }
    // overwritten ranges (bit rot / torn page writes)
    for (i, at) in [0usize, 600, 4096, len / 3, len / 2, len - 2048]
        .iter()
        .enumerate()
    {
        let dir = base.path().join(format!("rot{i}"));
        std::fs::create_dir_all(&dir).unwrap();
        let mut b = bytes.clone();
        let end = (*at + 512).min(len);
        for x in &mut b[*at..end] {
            *x ^= 0x5A;
        }
        std::fs::write(dir.join(DB_FILE), &b).unwrap();
        let what = format!("512 bytes flipped at {at} of {len}");
        outcomes.push((what.clone(), open_damaged(&dir, &what).map(|r| r.dropped)));
    }
    for (what, o) in &outcomes {
        match o {
            Ok(d) => println!("{what}: opened, {d} records dropped"),
            Err(e) => println!("{what}: {e}"),
        }
    }
}

#[test]
fn quarantine_moves_a_corrupt_store_aside_and_starts() {
    let dir = TempDir::new("quarantine");
    populate(dir.path(), 5);
    let file = dir.path().join(DB_FILE);
    std::fs::write(&file, b"this is not a database").unwrap();
    assert!(open_damaged(dir.path(), "junk file").is_err());
    let (store, r) = Store::open_with(
        dir.path(),
        StoreOptions {
            quarantine_corrupt: true,
            ..StoreOptions::default()
        },
    )
    .unwrap();
    assert_eq!(r, Recovered::default());
    commit(&store, vec![Op::PutSession(Box::new(session("new", None)))]);
    let aside: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().contains(".corrupt-"))
        .collect();
    assert_eq!(aside.len(), 1, "the corrupt file is kept for inspection");
}

#[test]
fn unopenable_store_names_the_path() {
    let dir = TempDir::new("unopenable");
    // the store directory is a regular file
    let not_a_dir = dir.path().join("file");
    std::fs::write(&not_a_dir, b"x").unwrap();
    let e = Store::open(&not_a_dir, Durability::Sync).unwrap_err();
    assert!(matches!(e, StoreError::Open { .. }));
    assert!(
        e.to_string().contains(&not_a_dir.display().to_string()),
        "{e}"
    );
    // already open (locked) by another store
    let (_first, _) = open(dir.path());
    let e = Store::open(dir.path(), Durability::Sync).unwrap_err();
    assert!(matches!(e, StoreError::Open { .. }));
    assert!(
        e.to_string().contains(&dir.path().display().to_string()),
        "{e}"
    );
}

// ---------------------------------------------------------------------------
// Disk full (needs root to mount a tmpfs; skipped otherwise).

struct Mount(PathBuf);

impl Drop for Mount {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount").arg(&self.0).status();
    }
}

#[test]
fn disk_full_fails_writes_then_recovers_when_space_returns() {
    let dir = TempDir::new("diskfull");
    let mnt = dir.path().join("mnt");
    std::fs::create_dir_all(&mnt).unwrap();
    let ok = std::process::Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=8M", "tmpfs"])
        .arg(&mnt)
        .stderr(std::process::Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    if !ok {
        eprintln!("SKIPPED disk_full test: cannot mount a tmpfs here (needs root)");
        return;
    }
    let _mount = Mount(mnt.clone());
    // reserve 4 MiB that we free later (the log backlog, up to about two
    // checkpoint segments, must fit in the engine once space returns)
    let filler = mnt.join("filler");
    std::fs::write(&filler, vec![0u8; 4 << 20]).unwrap();
    let store_dir = mnt.join("store");
    let (store, _) = open(&store_dir);
    commit(&store, vec![Op::PutSession(Box::new(session("s", None)))]);
    let mut full = None;
    let mut written = 0u64;
    for i in 0..2000u64 {
        let id = store.alloc_message_id();
        let seq = store.submit(vec![
            put_m(id, msg("t", &[7u8; 16 * 1024], None)),
            put_q("s", i, id),
        ]);
        match store.wait_durable(seq, WAIT) {
            Ok(()) => written = i + 1,
            Err(e) => {
                full = Some(e);
                break;
            }
        }
    }
    let e = full.expect("the 8 MiB tmpfs never filled up");
    assert!(
        matches!(e, StoreError::DiskFull(_)),
        "expected DiskFull, got {e:?}"
    );
    assert!(e.is_out_of_space());
    println!("disk full after {written} messages: {e}");
    // still full: writes that need space fail with the same distinguishable
    // error. (A tiny one may still fit in the log's last page, and the
    // store may release its reserve to finish a checkpoint, which makes
    // room for a few more: those are acknowledged and must survive too.)
    let mut e2 = None;
    for k in 0..200u64 {
        let id = store.alloc_message_id();
        let seq = store.submit(vec![
            put_m(id, msg("t", &[8u8; 64 * 1024], None)),
            put_q("s", 500_000 + k, id),
        ]);
        match store.wait_durable(seq, WAIT) {
            Ok(()) => written += 1,
            Err(e) => {
                e2 = Some(e);
                break;
            }
        }
    }
    let e2 = e2.expect("the disk never filled up again");
    assert!(e2.is_out_of_space(), "{e2:?}");
    // space returns
    std::fs::remove_file(&filler).unwrap();
    let deadline = Instant::now() + WAIT;
    let recovered_at = loop {
        let id = store.alloc_message_id();
        let seq = store.submit(vec![
            put_m(id, msg("t", b"after", None)),
            put_q("s", 1_000_000, id),
        ]);
        match store.wait_durable(seq, WAIT) {
            Ok(()) => break seq,
            Err(e) => {
                assert!(e.is_out_of_space(), "{e:?}");
                assert!(Instant::now() < deadline, "store never recovered: {e}");
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    };
    // Either the log append or a checkpoint met the full disk; the refused
    // writes are counted, and nothing refused was acknowledged.
    assert!(store.stats().failed_submits >= 2);
    println!("recovered at seq {recovered_at}");
    drop(store);
    let (_s, r) = open(&store_dir);
    let s = find(&r, "s");
    assert_eq!(
        s.queue.len() as u64,
        written + 1,
        "all acknowledged messages survive"
    );
    assert_eq!(s.queue.last().unwrap().0, 1_000_000);
}

#[test]
fn a_reservation_keeps_its_place_in_the_commit_order() {
    // The router's case: a message is queued on a session (its place taken
    // then), and the session's connection delivers it and submits the
    // queue entry's removal before the router submits the entry. Applied
    // in submission order instead, the entry would come back after the
    // removal, and a restart would deliver the message a second time.
    let dir = TempDir::new("reserve");
    {
        let (store, _) = open(dir.path());
        commit(&store, vec![Op::PutSession(Box::new(session("s", None)))]);
        let id = store.alloc_message_id();
        let slot = store.reserve();
        let removal = store.submit(vec![
            Op::DeleteQueueEntry {
                client_id: "s".into(),
                seq: 1,
            },
            put_i("s", 7, id),
        ]);
        // Nothing after an unfilled place is applied, however long it waits.
        assert!(matches!(
            store.wait_durable(removal, Duration::from_millis(50)),
            Err(StoreError::Timeout)
        ));
        assert!(store.durable_seq() < slot.seq());
        let queued = slot.fill(
            vec![put_m(id, msg("a/b", b"x", None)), put_q("s", 1, id)],
            true,
        );
        assert!(queued < removal);
        store.wait_durable(removal, WAIT).unwrap();
        // A reservation dropped unfilled fills its place with nothing.
        let dropped = store.reserve();
        let later = store.submit(vec![Op::DeleteInflight {
            client_id: "s".into(),
            packet_id: 9,
        }]);
        drop(dropped);
        store.wait_durable(later, WAIT).unwrap();
    }
    let (_store, r) = open(dir.path());
    let s = find(&r, "s");
    assert!(
        s.queue.is_empty(),
        "the removed entry came back: {:?}",
        s.queue
    );
    assert_eq!(s.inflight.len(), 1, "{:?}", s.inflight);
}
