//! Durable embedded store: what a broker keeps for sessions that outlive a
//! restart (see `README.md` beside this file for the engine choice).
//!
//! - [`records`]: the stored records and their versioned binary encoding.
//! - [`Store`]: open + recover (replaying the write-ahead log), a
//!   non-blocking [`Store::submit`] of [`Op`]s that returns a commit sequence
//!   number, a writer thread that appends everything queued since its last
//!   round to the log as one record (after dropping the ops that cancel out
//!   within the round) with one fsync for many publishers, then advances
//!   [`Store::durable_seq`] and calls the [`Store::on_durable`] callback; and
//!   a checkpoint thread that applies closed log segments to redb. Failed
//!   sequences are reported through [`Store::on_failed`] *before*
//!   `durable_seq` passes them. See `writer.rs`, `wal.rs` and docs/STORE.md.
//!
//! ## Durability policies
//! - [`Durability::Sync`]: a sequence is durable once its log record is
//!   fsynced. Nothing acknowledged is lost, whatever crashes.
//! - [`Durability::Interval`]`(d)`: a sequence is reported durable once its
//!   record is appended (it survives a killed process), and the log is
//!   fsynced every `d`. **What can be lost:** on an OS crash or power loss,
//!   what was appended since the last fsync, up to `d`. What survives is a
//!   prefix of the sequence. [`Store::synced_seq`] tells how far the fsync
//!   has got. (The broker acknowledges even earlier under this policy, see
//!   `broker::persist`.)
//!
//! ## Messages and references
//! A message is stored once ([`Op::PutMessage`]) and referenced by queue,
//! in-flight and retained entries. The writer counts references; a message
//! whose count is zero at the end of a round or checkpoint is deleted (or
//! never written). So
//! submit a message together with its first references, and move a message
//! (queue → in-flight) with both ops in one submit.
//!
//! ## Threading
//! `Store` is `Send + Sync`; share it behind an `Arc`. `submit` takes a
//! short mutex and never waits for IO. Callbacks run on the writer thread:
//! keep them short and never call [`Store::wait_durable`] from them.

mod engine;
pub mod records;
mod wal;
mod writer;

use std::collections::{HashMap, VecDeque};
use std::fmt;
use std::ops::RangeInclusive;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytestring::ByteString;
use parking_lot::{Condvar, Mutex, RwLock};

pub use records::{
    DecodeError, InflightEntry, InflightState, MessageProperties, MessageRecord, QueueEntry,
    Record, SessionRecord, SubscriptionRecord, WillRecord,
};

/// Name of the engine file inside the store directory.
pub const DB_FILE: &str = "millet.redb";
pub use wal::{RESERVE_FILE, WAL_PREFIX};

/// When a QoS 1/2 PUBLISH may be acknowledged.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Durability {
    /// fsync before the sequence is reported durable (group commit).
    Sync,
    /// Report durable once committed; fsync every given interval. See the
    /// module documentation for what can be lost.
    Interval(Duration),
}

/// Options of [`Store::open_with`].
#[derive(Debug, Clone)]
pub struct StoreOptions {
    pub durability: Durability,
    /// Bound on the stored data (bytes of live records and engine metadata).
    /// Once reached, submits that add messages ([`Op::PutMessage`],
    /// [`Op::PutRetained`]) fail with [`StoreError::QuotaExceeded`]; other
    /// submits (acks, deletes, session changes) still go through.
    pub max_bytes: Option<u64>,
    /// If the engine file cannot be opened because it is corrupt, move it
    /// aside (`millet.redb.corrupt-<unix ms>`), log an error and start empty,
    /// instead of failing with [`StoreError::Open`]. Off by default.
    pub quarantine_corrupt: bool,
    /// Checkpoint (apply the log to the engine and empty it) once the log
    /// holds this many bytes ...
    pub checkpoint_bytes: u64,
    /// ... or this long after the first record logged since the last
    /// checkpoint. Zero checkpoints after every group (no absorption window).
    pub checkpoint_interval: Duration,
    /// After each round the writer waits up to this long before taking the
    /// next, so that a round carries more and absorbs more (zero: take work
    /// as soon as it comes). Under [`Durability::Sync`] it adapts (see
    /// `Writer::next_linger`): the full time only while rounds carry
    /// several groups, at most [`SYNC_LINGER_ONE`] after a round of one
    /// group, and a round starts at once when [`GATHER_ENOUGH`] groups
    /// wait.
    pub linger: Duration,
}

/// `Sync`: after a round of a single group (a lone publisher waiting for
/// each acknowledgement, or a trickle), the writer gathers at most this
/// long: lingering longer would only slow the lone publisher down.
pub const SYNC_LINGER_ONE: Duration = Duration::from_millis(2);

/// `Sync`: a submit that puts a message in flight to a connected client, or
/// queues one for it ([`Store::submit_awaiting_ack`]; its acknowledgement is
/// expected within moments), is not taken into a round until it is this
/// old, so that the acknowledgement's deletes land in the same round and
/// absorb the whole exchange (nothing logged, no fsync). A round takes the commands before the first such young submit and leaves
/// it and everything after it for the next round (order and the durable
/// watermark are kept; see `Writer::next_batch`). An idle writer so starts
/// at most this much later; a gathering one leaves the newest exchanges,
/// which would otherwise straddle two rounds, to the next. A fleet's
/// device→backend message is acknowledged by the backend within a
/// fraction of this.
pub const SYNC_ABSORB_WINDOW: Duration = Duration::from_millis(1);
/// `Sync`: this many waiting groups start a round at once, lingering or
/// not: one fsync is then shared widely enough, and publishers with full
/// windows are not held back (throughput under load).
pub const GATHER_ENOUGH: usize = 64;

impl Default for StoreOptions {
    fn default() -> Self {
        StoreOptions {
            durability: Durability::Sync,
            max_bytes: None,
            quarantine_corrupt: false,
            checkpoint_bytes: 1 << 20,
            checkpoint_interval: Duration::from_millis(100),
            linger: Duration::ZERO,
        }
    }
}

/// One change to the stored state. Strings are client ids / topics.
/// (Serialized into the write-ahead log with postcard: a change to this enum
/// must bump the log's magic.)
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub enum Op {
    /// Create or replace a session (metadata, subscriptions, will, expiry).
    PutSession(Box<SessionRecord>),
    /// Remove a session with all its queue, in-flight and awaiting-PUBREL
    /// entries (dropping the message references they hold).
    DeleteSession {
        client_id: ByteString,
    },
    /// Store a message under a broker-chosen id ([`Store::alloc_message_id`]).
    PutMessage {
        id: u64,
        message: Box<MessageRecord>,
    },
    /// Queue a message for a session at position `seq` (increasing per
    /// session; recovery returns the queue in `seq` order). Contract: a
    /// position is never reused while an entry may be stored there (the
    /// writer relies on it to drop a put and its delete without touching
    /// the engine); within one submit group a later put at the same
    /// position replaces the earlier one.
    PutQueueEntry {
        client_id: ByteString,
        seq: u64,
        entry: QueueEntry,
    },
    DeleteQueueEntry {
        client_id: ByteString,
        seq: u64,
    },
    /// Record (or update, e.g. AwaitAck → AwaitComp) an outgoing in-flight
    /// message under its packet id. Contract: an `AwaitAck` put is the
    /// first record of that packet id since its previous use was deleted
    /// (the broker allocates packet ids outside the in-flight window).
    PutInflight {
        client_id: ByteString,
        packet_id: u16,
        entry: InflightEntry,
    },
    DeleteInflight {
        client_id: ByteString,
        packet_id: u16,
    },
    /// An incoming QoS 2 packet id awaiting PUBREL.
    PutAwaitingRel {
        client_id: ByteString,
        packet_id: u16,
    },
    DeleteAwaitingRel {
        client_id: ByteString,
        packet_id: u16,
    },
    /// Make a stored message the retained message of `topic` (replaces).
    PutRetained {
        topic: String,
        message_id: u64,
    },
    DeleteRetained {
        topic: String,
    },
}

impl Op {
    /// Ops that make the store grow (refused when over `max_bytes`).
    fn grows(&self) -> bool {
        matches!(self, Op::PutMessage { .. } | Op::PutRetained { .. })
    }
}

/// Errors of the store.
#[derive(Debug, Clone, thiserror::Error)]
pub enum StoreError {
    /// The store could not be opened (names the path).
    #[error("cannot open store at {}: {source}", path.display())]
    Open {
        path: PathBuf,
        #[source]
        source: Arc<dyn std::error::Error + Send + Sync>,
    },
    /// The device is full (ENOSPC / EDQUOT). Writes succeed again once space
    /// returns.
    #[error("disk full: {0}")]
    DiskFull(String),
    /// The configured `max_bytes` is reached.
    #[error("store size limit of {limit} bytes reached")]
    QuotaExceeded { limit: u64 },
    /// Another I/O error.
    #[error("store I/O error: {0}")]
    Io(String),
    /// The engine found corrupt data.
    #[error("store corrupted: {0}")]
    Corrupt(String),
    /// The store is shut down.
    #[error("store is closed")]
    Closed,
    /// [`Store::wait_durable`] gave up.
    #[error("timed out waiting for the store")]
    Timeout,
}

impl StoreError {
    /// Disk full or quota reached: answer QoS 1/2 publishes with v5 0x97
    /// (Quota exceeded) / v3 0x80 rather than acknowledging them.
    pub fn is_out_of_space(&self) -> bool {
        matches!(
            self,
            StoreError::DiskFull(_) | StoreError::QuotaExceeded { .. }
        )
    }
}

/// A session as recovered, with everything it owns.
#[derive(Debug, Clone, PartialEq)]
pub struct RecoveredSession {
    pub session: SessionRecord,
    /// Queue in `seq` order.
    pub queue: Vec<(u64, QueueEntry)>,
    /// In-flight window as `(packet id, entry)`, in `entry.order` order.
    pub inflight: Vec<(u16, InflightEntry)>,
    /// Incoming QoS 2 packet ids awaiting PUBREL, ascending.
    pub awaiting_rel: Vec<u16>,
}

/// Everything read back at open.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Recovered {
    pub sessions: Vec<RecoveredSession>,
    /// Every message referenced by a recovered queue / in-flight / retained
    /// entry (entries whose message is missing are dropped and counted).
    pub messages: HashMap<u64, MessageRecord>,
    /// Retained messages: topic → message id (a key of `messages`).
    pub retained: Vec<(String, u64)>,
    /// Records skipped because they failed to decode or referenced something
    /// missing (also logged once with `tracing::warn!`).
    pub dropped: usize,
    /// Messages stored but referenced by nothing (not returned; the first
    /// [`Store::sweep`] deletes them).
    pub orphaned_messages: usize,
}

/// Counters of the writer (monotonic since open).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StoreStats {
    /// `submit` calls.
    pub submits: u64,
    /// Ops in those calls.
    pub ops: u64,
    /// Groups committed (one log append each; the engine only sees them at
    /// a checkpoint).
    pub commits: u64,
    /// fsyncs of the log (a checkpoint's own fsync is not counted).
    pub fsyncs: u64,
    /// Submits that failed (reported through `on_failed`).
    pub failed_submits: u64,
    /// Times the engine was reopened after an I/O error.
    pub reopens: u64,
    pub sweeps: u64,
    pub swept_sessions: u64,
    pub swept_messages: u64,
    /// Queue / in-flight / awaiting / retained entries removed by sweeps.
    pub swept_entries: u64,
    /// Ops never written because a later op of the same group superseded
    /// them (an entry put and deleted again, a message whose every
    /// reference went away before its group was committed).
    pub absorbed: u64,
    /// Checkpoints: log content applied to the engine in one transaction.
    pub checkpoints: u64,
}

#[derive(Default)]
struct Counters {
    /// Time of each log round: append, plus fsync under `sync` (one
    /// observation per round, not per message).
    log_write: crate::histogram::Histogram,
    submits: AtomicU64,
    ops: AtomicU64,
    commits: AtomicU64,
    fsyncs: AtomicU64,
    failed_submits: AtomicU64,
    reopens: AtomicU64,
    sweeps: AtomicU64,
    swept_sessions: AtomicU64,
    swept_messages: AtomicU64,
    swept_entries: AtomicU64,
    absorbed: AtomicU64,
    checkpoints: AtomicU64,
}

impl Counters {
    fn snapshot(&self) -> StoreStats {
        let g = |a: &AtomicU64| a.load(Ordering::Relaxed);
        StoreStats {
            submits: g(&self.submits),
            ops: g(&self.ops),
            commits: g(&self.commits),
            fsyncs: g(&self.fsyncs),
            failed_submits: g(&self.failed_submits),
            reopens: g(&self.reopens),
            sweeps: g(&self.sweeps),
            swept_sessions: g(&self.swept_sessions),
            swept_messages: g(&self.swept_messages),
            swept_entries: g(&self.swept_entries),
            absorbed: g(&self.absorbed),
            checkpoints: g(&self.checkpoints),
        }
    }
}

/// What the writer is asked to do; each command has its sequence number.
pub(crate) enum Cmd {
    Submit {
        seq: u64,
        ops: Vec<Op>,
        /// `Sync`, for a submit that [`Cmd::expects_ack`] or was made with
        /// [`Store::submit_awaiting_ack`]: not taken into a round before
        /// then (see [`SYNC_ABSORB_WINDOW`]).
        hold_until: Option<Instant>,
    },
    Sweep {
        seq: u64,
        now_unix_ms: u64,
    },
    /// A place in the order taken by [`Store::reserve`], not filled yet:
    /// no round takes it or anything after it.
    Reserved {
        seq: u64,
    },
}

impl Cmd {
    /// Held back from a round taken at `now` (see [`SYNC_ABSORB_WINDOW`]).
    pub(crate) fn held(&self, now: Instant) -> Option<Instant> {
        match self {
            Cmd::Submit {
                hold_until: Some(t),
                ..
            } if now < *t => Some(*t),
            _ => None,
        }
    }

    /// Puts a message in flight to a client, whose acknowledgement (deleting
    /// the entry again) is expected shortly.
    fn expects_ack(&self) -> bool {
        match self {
            Cmd::Submit { ops, .. } => ops.iter().any(|op| {
                matches!(op, Op::PutInflight { entry, .. } if entry.state == InflightState::AwaitAck)
            }),
            Cmd::Sweep { .. } | Cmd::Reserved { .. } => false,
        }
    }
}

#[derive(Default)]
pub(crate) struct Queue {
    cmds: Vec<Cmd>,
    next_seq: u64,
    shutdown: bool,
    /// The writer takes no new work (see [`Store::pause_writes`]).
    paused: bool,
    /// The writer is gathering a round (see `Writer::next_batch`): a submit
    /// wakes it only once `gather_enough` commands wait.
    gathering: bool,
    gather_enough: usize,
    /// Whether submits that expect an acknowledgement are held back for
    /// [`SYNC_ABSORB_WINDOW`] (`Sync` with a linger only).
    absorb_window: bool,
    /// The writer took a round and has not reported it durable yet.
    in_round: bool,
    /// Times submit-time absorption left nothing to write (the writer
    /// gathers while they go on: `Writer::next_batch`).
    absorbed_at_submit: u64,
}

/// Submit-time absorption looks at no more waiting commands than this (a
/// quiet broker's: an exchange is three submits; a busy one's rounds
/// absorb as they are taken, and its hot path is not made to do it twice).
const ABSORB_AT_SUBMIT_MAX: usize = 64;

impl Queue {
    /// Absorb the newest command's deletes (an acknowledgement's, a
    /// delivery's) into the commands waiting before it, when they are all
    /// submits ([`engine::absorb_deletes`]): a delivery and its
    /// acknowledgement, both still waiting, leave nothing. Returns the ops dropped, and
    /// whether nothing is left to write: then, with no round under way,
    /// everything submitted is durable already ([`Store::push`]).
    fn absorb_waiting(&mut self) -> (u64, bool) {
        if self.cmds.len() > ABSORB_AT_SUBMIT_MAX
            || !self.cmds.iter().all(|c| matches!(c, Cmd::Submit { .. }))
        {
            return (0, false);
        }
        let Some((Cmd::Submit { ops: ack, .. }, before)) = self.cmds.split_last_mut() else {
            return (0, false);
        };
        let mut waiting: smallvec::SmallVec<[&mut Vec<Op>; 16]> = before
            .iter_mut()
            .filter_map(|c| match c {
                Cmd::Submit { ops, .. } if !ops.is_empty() => Some(ops),
                _ => None,
            })
            .collect();
        let dropped = engine::absorb_deletes(&mut waiting, ack);
        let empty = ack.is_empty() && waiting.iter().all(|ops| ops.is_empty());
        drop(waiting);
        if dropped > 0 {
            for c in &mut self.cmds {
                if let Cmd::Submit {
                    ops, hold_until, ..
                } = c
                {
                    if ops.is_empty() {
                        // Nothing left to wait for.
                        *hold_until = None;
                    }
                }
            }
        }
        (dropped, empty)
    }
}

type DurableFn = Arc<dyn Fn(u64) + Send + Sync>;
type FailedFn = Arc<dyn Fn(RangeInclusive<u64>, &StoreError) + Send + Sync>;

/// How many failed ranges [`Store::wait_durable`] remembers.
const FAILED_LOG: usize = 4096;

pub(crate) struct Shared {
    queue: Mutex<Queue>,
    /// Wakes the writer.
    work: Condvar,
    durable_seq: AtomicU64,
    synced_seq: AtomicU64,
    /// Guards the durable/failed progress for `wait_durable`.
    progress: Mutex<VecDeque<(RangeInclusive<u64>, StoreError)>>,
    progressed: Condvar,
    on_durable: RwLock<Option<DurableFn>>,
    on_failed: RwLock<Option<FailedFn>>,
    counters: Counters,
    writer_dead: std::sync::atomic::AtomicBool,
    /// Outcome of the writer's last round (see [`Store::failing`]).
    failing: std::sync::atomic::AtomicU8,
}

/// The store. See the module documentation.
pub struct Store {
    shared: Arc<Shared>,
    next_message_id: AtomicU64,
    path: PathBuf,
    writer: Option<std::thread::JoinHandle<()>>,
}

/// A place in the store's commit order (see [`Store::reserve`]).
#[must_use = "a reservation holds every later submit back until it is filled"]
pub struct Reservation<'a> {
    store: &'a Store,
    seq: u64,
    filled: bool,
}

impl Reservation<'_> {
    /// The reserved sequence number (the ticket of what fills it).
    pub fn seq(&self) -> u64 {
        self.seq
    }

    /// Put `ops` in the reserved place; returns its sequence number, as
    /// [`Store::submit`] (or [`Store::submit_awaiting_ack`] when
    /// `awaits_ack`) would have.
    pub fn fill(mut self, ops: Vec<Op>, awaits_ack: bool) -> u64 {
        self.filled = true;
        self.store.fill(self.seq, ops, awaits_ack);
        self.seq
    }
}

impl Drop for Reservation<'_> {
    fn drop(&mut self) {
        if !self.filled {
            self.store.fill(self.seq, Vec::new(), false);
        }
    }
}

impl fmt::Debug for Reservation<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Reservation")
            .field("seq", &self.seq)
            .finish()
    }
}

impl fmt::Debug for Store {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Store")
            .field("path", &self.path)
            .field("durable_seq", &self.durable_seq())
            .finish_non_exhaustive()
    }
}

impl Store {
    /// Open (creating if needed) the store in `dir` and recover its content.
    pub fn open(dir: &Path, policy: Durability) -> Result<(Store, Recovered), StoreError> {
        Store::open_with(
            dir,
            StoreOptions {
                durability: policy,
                ..StoreOptions::default()
            },
        )
    }

    /// [`Store::open`] with all options.
    pub fn open_with(dir: &Path, options: StoreOptions) -> Result<(Store, Recovered), StoreError> {
        let (engine, mut loaded) = engine::Engine::open_and_load(dir, options.quarantine_corrupt)?;
        let (wal, replay) = wal::Wal::open(dir)?;
        // Room for about two segments' worth of checkpoint, within reason.
        let reserve = wal::Reserve::new(
            dir,
            options.checkpoint_bytes.saturating_mul(2).min(64 << 20),
        );
        let mut engine = engine;
        if replay.groups() > 0 {
            // Groups logged after the last checkpoint go into the engine one
            // segment at a time (each deleted once committed, so at most one
            // segment's worth of space is needed twice); then everything is
            // read back.
            let n = replay.groups();
            for (path, groups) in &replay.segments {
                if !groups.is_empty() {
                    let mut r = engine.replay(&mut loaded.index, groups);
                    if r.as_ref().is_err_and(StoreError::is_out_of_space) && reserve.release() {
                        // redb takes no more writes after an I/O error: reopen.
                        drop(engine);
                        engine = engine::Engine::reopen(dir)
                            .map_err(|e| open_failed(&dir.join(DB_FILE), e))?;
                        loaded = engine
                            .load_guarded(dir)
                            .map_err(|e| open_failed(&dir.join(DB_FILE), e))?;
                        r = engine.replay(&mut loaded.index, groups);
                    }
                    r.map_err(|e| open_failed(&dir.join(DB_FILE), e))?;
                }
                wal::Wal::remove_segments(dir, std::slice::from_ref(path))
                    .map_err(|e| open_failed(dir, e))?;
            }
            loaded = engine
                .load_guarded(dir)
                .map_err(|e| open_failed(&dir.join(DB_FILE), e))?;
            tracing::info!(path = %dir.display(), groups = n,
                "store log replayed into the engine");
        } else {
            let paths: Vec<PathBuf> = replay.segments.iter().map(|(p, _)| p.clone()).collect();
            wal::Wal::remove_segments(dir, &paths).map_err(|e| open_failed(dir, e))?;
        }
        reserve.ensure();
        if loaded.recovered.dropped > 0 {
            tracing::warn!(
                path = %dir.display(),
                dropped = loaded.recovered.dropped,
                "store recovery dropped {} corrupt or dangling records; everything else was recovered",
                loaded.recovered.dropped
            );
        }
        let shared = Arc::new(Shared {
            queue: Mutex::new(Queue {
                cmds: Vec::new(),
                next_seq: 1,
                shutdown: false,
                paused: false,
                gathering: false,
                gather_enough: usize::MAX,
                absorb_window: matches!(options.durability, Durability::Sync)
                    && !options.linger.is_zero(),
                in_round: false,
                absorbed_at_submit: 0,
            }),
            work: Condvar::new(),
            durable_seq: AtomicU64::new(0),
            synced_seq: AtomicU64::new(0),
            progress: Mutex::new(VecDeque::new()),
            progressed: Condvar::new(),
            on_durable: RwLock::new(None),
            on_failed: RwLock::new(None),
            counters: Counters::default(),
            writer_dead: std::sync::atomic::AtomicBool::new(false),
            failing: std::sync::atomic::AtomicU8::new(0),
        });
        let next_message_id = loaded.next_message_id;
        let recovered = loaded.recovered;
        let w = writer::Writer::new(
            engine,
            wal,
            reserve,
            loaded.index,
            dir.to_path_buf(),
            options,
            shared.clone(),
        )
        .map_err(|e| StoreError::Open {
            path: dir.to_path_buf(),
            source: Arc::new(e),
        })?;
        let writer = std::thread::Builder::new()
            .name("millet-store".into())
            .spawn(move || w.run())
            .map_err(|e| StoreError::Open {
                path: dir.to_path_buf(),
                source: Arc::new(e),
            })?;
        Ok((
            Store {
                shared,
                next_message_id: AtomicU64::new(next_message_id),
                path: dir.to_path_buf(),
                writer: Some(writer),
            },
            recovered,
        ))
    }

    /// The store directory.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// A fresh message id (greater than every id recovered).
    pub fn alloc_message_id(&self) -> u64 {
        self.next_message_id.fetch_add(1, Ordering::Relaxed)
    }

    /// Queue `ops` for the writer; returns their commit sequence number.
    /// Never blocks on IO. The ops of one call are applied atomically and in
    /// order; calls are applied in sequence order. After shutdown began the
    /// sequence is reported failed with [`StoreError::Closed`].
    pub fn submit(&self, ops: Vec<Op>) -> u64 {
        self.submit_hinted(ops, false)
    }

    /// [`Store::submit`] for ops that queue a message for a connected
    /// client, whose acknowledgement is expected within moments: under
    /// `Sync` they wait [`SYNC_ABSORB_WINDOW`] for it, like a submit that
    /// puts a message in flight ([`Cmd::expects_ack`]).
    pub fn submit_awaiting_ack(&self, ops: Vec<Op>) -> u64 {
        self.submit_hinted(ops, true)
    }

    fn submit_hinted(&self, ops: Vec<Op>, awaits_ack: bool) -> u64 {
        let c = &self.shared.counters;
        c.submits.fetch_add(1, Ordering::Relaxed);
        c.ops.fetch_add(ops.len() as u64, Ordering::Relaxed);
        self.push(awaits_ack, |seq| Cmd::Submit {
            seq,
            ops,
            hold_until: None,
        })
    }

    /// Take the next place in the commit order now, for ops that are only
    /// known later ([`Reservation::fill`]). Nothing submitted after this
    /// call is applied before the reservation is filled (or dropped, which
    /// fills it with nothing).
    ///
    /// The router needs it: it queues a message on a session under the
    /// session's lock, and submits the queue entry once every matching
    /// session has it. The session's connection may take the message from
    /// the queue in between and submit the entry's removal: reserved under
    /// the session's lock, the entry's place comes before the removal's,
    /// and a crash cannot bring a delivered message back.
    pub fn reserve(&self) -> Reservation<'_> {
        let seq = self.push(false, |seq| Cmd::Reserved { seq });
        Reservation {
            store: self,
            seq,
            filled: false,
        }
    }

    /// Ask the writer to remove, as of `now_unix_ms`: expired sessions (with
    /// everything they own), queue entries and retained entries of expired
    /// messages, entries of sessions that no longer exist, and messages that
    /// nothing references. In-flight entries are kept even if their message
    /// expired (delivery has started). Returns the sequence of the sweep.
    pub fn sweep(&self, now_unix_ms: u64) -> u64 {
        self.push(false, |seq| Cmd::Sweep { seq, now_unix_ms })
    }

    fn fill(&self, seq: u64, ops: Vec<Op>, awaits_ack: bool) {
        let c = &self.shared.counters;
        if !ops.is_empty() {
            c.submits.fetch_add(1, Ordering::Relaxed);
            c.ops.fetch_add(ops.len() as u64, Ordering::Relaxed);
        }
        let mut q = self.shared.queue.lock();
        // Usually the newest command or close to it.
        let Some(i) = q
            .cmds
            .iter()
            .rposition(|c| matches!(c, Cmd::Reserved { seq: s } if *s == seq))
        else {
            // Refused at `reserve` (shutdown), or failed by a shutdown
            // that took it unfilled: reported failed already.
            return;
        };
        let mut cmd = Cmd::Submit {
            seq,
            ops,
            hold_until: None,
        };
        if q.absorb_window && (awaits_ack || cmd.expects_ack()) {
            if let Cmd::Submit { hold_until, .. } = &mut cmd {
                *hold_until = Some(Instant::now() + SYNC_ABSORB_WINDOW);
            }
        }
        q.cmds[i] = cmd;
        // The writer waiting for this very place (the first) is not
        // gathering: a gathering one takes it at the end of its gathering.
        let wake = !q.gathering || q.cmds.len() >= q.gather_enough;
        drop(q);
        if wake {
            self.shared.work.notify_one();
        }
    }

    fn push(&self, awaits_ack: bool, make: impl FnOnce(u64) -> Cmd) -> u64 {
        let mut q = self.shared.queue.lock();
        let seq = q.next_seq;
        q.next_seq += 1;
        if q.shutdown || self.shared.writer_dead.load(Ordering::Acquire) {
            drop(q);
            self.shared.report_failed(&[seq..=seq], &StoreError::Closed);
            return seq;
        }
        let mut cmd = make(seq);
        if q.absorb_window && (awaits_ack || cmd.expects_ack()) {
            if let Cmd::Submit { hold_until, .. } = &mut cmd {
                *hold_until = Some(Instant::now() + SYNC_ABSORB_WINDOW);
            }
        }
        // An acknowledgement (a delete) whose delivery still waits for the
        // writer: absorbed here, and when that leaves nothing to write and
        // no round is under way, everything submitted so far is durable
        // now: the publisher's acknowledgement goes out without the
        // writer's round (`Sync` only: its absorb window holds deliveries
        // back for this; not while the store is failing, whose rounds
        // refuse what grows).
        let deletes = q.absorb_window
            && matches!(&cmd, Cmd::Submit { ops, .. } if ops.iter().any(Op::is_delete));
        q.cmds.push(cmd);
        if deletes && !q.shutdown && self.shared.failing.load(Ordering::Acquire) == 0 {
            let (dropped, empty) = q.absorb_waiting();
            if dropped > 0 {
                let c = &self.shared.counters;
                c.absorbed.fetch_add(dropped, Ordering::Relaxed);
            }
            // A round under way is reported durable after what it holds,
            // which may come before these: then the writer reports them.
            if empty && !q.in_round && !q.paused {
                q.cmds.clear();
                q.absorbed_at_submit = q.absorbed_at_submit.wrapping_add(1);
                drop(q);
                self.shared.advance(seq, Some(seq));
                return seq;
            }
        }
        let wake = !q.gathering || q.cmds.len() >= q.gather_enough;
        drop(q);
        if wake {
            self.shared.work.notify_one();
        }
        seq
    }

    /// The last sequence handed out by [`Store::submit`] or [`Store::sweep`]
    /// (0 before any): once [`Store::durable_seq`] reaches it, everything
    /// submitted so far is durable.
    pub fn submitted_seq(&self) -> u64 {
        self.shared.queue.lock().next_seq.saturating_sub(1)
    }

    /// Highest sequence that satisfies the durability policy (every sequence
    /// at or below it is durable or was reported failed).
    pub fn durable_seq(&self) -> u64 {
        self.shared.durable_seq.load(Ordering::Acquire)
    }

    /// Highest sequence known to be fsynced (equals `durable_seq` under
    /// [`Durability::Sync`]).
    pub fn synced_seq(&self) -> u64 {
        self.shared.synced_seq.load(Ordering::Acquire)
    }

    /// Register the callback called (on the writer thread) with the new
    /// `durable_seq` after each group. Replaces a previous one.
    pub fn on_durable(&self, f: impl Fn(u64) + Send + Sync + 'static) {
        *self.shared.on_durable.write() = Some(Arc::new(f));
    }

    /// Register the callback called (on the writer thread) with each range of
    /// sequences that failed, before `durable_seq` moves past them.
    pub fn on_failed(&self, f: impl Fn(RangeInclusive<u64>, &StoreError) + Send + Sync + 'static) {
        *self.shared.on_failed.write() = Some(Arc::new(f));
    }

    /// Block until `seq` is durable (`Ok`) or failed (`Err` with the reason),
    /// at most `timeout`. For tests and simple callers; the broker should use
    /// the callbacks. Failures older than the last 4096 failed ranges are
    /// forgotten and reported as `Ok`.
    pub fn wait_durable(&self, seq: u64, timeout: Duration) -> Result<(), StoreError> {
        let deadline = Instant::now() + timeout;
        let mut log = self.shared.progress.lock();
        loop {
            if let Some((_, e)) = log.iter().rev().find(|(r, _)| r.contains(&seq)) {
                return Err(e.clone());
            }
            if self.durable_seq() >= seq {
                return Ok(());
            }
            if self.shared.writer_dead.load(Ordering::Acquire) {
                return Err(StoreError::Closed);
            }
            if self
                .shared
                .progressed
                .wait_until(&mut log, deadline)
                .timed_out()
            {
                if let Some((_, e)) = log.iter().rev().find(|(r, _)| r.contains(&seq)) {
                    return Err(e.clone());
                }
                return if self.durable_seq() >= seq {
                    Ok(())
                } else {
                    Err(StoreError::Timeout)
                };
            }
        }
    }

    /// Stop (`true`) or restart the writer taking new work, as a very slow
    /// disk would: submits queue up and nothing new becomes durable. For
    /// tests of what waits for durability; shutdown overrides it.
    #[doc(hidden)]
    pub fn pause_writes(&self, paused: bool) {
        self.shared.queue.lock().paused = paused;
        self.shared.work.notify_one();
    }

    /// Whether the writer's last round failed: `None` when it logged fine,
    /// `Some(true)` when it refused writes for lack of space (disk full or
    /// `max_bytes`), `Some(false)` on another error. Lets a caller that
    /// acknowledges before durability (interval policy) refuse new work
    /// while the store is failing.
    pub fn failing(&self) -> Option<bool> {
        match self.shared.failing.load(Ordering::Acquire) {
            0 => None,
            2 => Some(true),
            _ => Some(false),
        }
    }

    /// Submits not yet taken by the writer (for backpressure).
    pub fn pending(&self) -> usize {
        self.shared.queue.lock().cmds.len()
    }

    pub fn stats(&self) -> StoreStats {
        self.shared.counters.snapshot()
    }

    /// Latency of the writer's log rounds (append, and fsync when the
    /// policy syncs), for `/metrics`.
    pub fn log_write_latency(&self) -> crate::histogram::Snapshot {
        self.shared.counters.log_write.snapshot()
    }

    /// Stop accepting submits, let the writer finish what is queued, fsync,
    /// and close the engine. Also done on drop.
    pub fn shutdown(mut self) {
        self.stop();
    }

    fn stop(&mut self) {
        if self.writer.is_some() {
            let s = self.stats();
            tracing::info!(
                submits = s.submits,
                ops = s.ops,
                absorbed = s.absorbed,
                commits = s.commits,
                fsyncs = s.fsyncs,
                failed = s.failed_submits,
                "store closing"
            );
        }
        self.shared.queue.lock().shutdown = true;
        self.shared.work.notify_one();
        if let Some(h) = self.writer.take() {
            // The writer never panics by design; if it did, there is nothing
            // left to do here but not propagate it out of Drop.
            let _ = h.join();
        }
    }
}

impl Drop for Store {
    fn drop(&mut self) {
        self.stop();
    }
}

impl Shared {
    fn set_failing(&self, e: Option<&StoreError>) {
        let v = match e {
            None => 0,
            Some(e) if e.is_out_of_space() => 2,
            Some(_) => 1,
        };
        self.failing.store(v, Ordering::Release);
    }

    fn report_failed(&self, ranges: &[RangeInclusive<u64>], err: &StoreError) {
        if ranges.is_empty() {
            return;
        }
        let n: u64 = ranges.iter().map(|r| r.end() - r.start() + 1).sum();
        self.counters.failed_submits.fetch_add(n, Ordering::Relaxed);
        {
            let mut log = self.progress.lock();
            for r in ranges {
                if log.len() == FAILED_LOG {
                    log.pop_front();
                }
                log.push_back((r.clone(), err.clone()));
            }
        }
        let cb = self.on_failed.read().clone();
        if let Some(cb) = cb {
            for r in ranges {
                guarded("on_failed", || cb(r.clone(), err));
            }
        }
        self.progressed.notify_all();
    }

    fn advance(&self, durable: u64, synced: Option<u64>) {
        if let Some(s) = synced {
            self.synced_seq.fetch_max(s, Ordering::AcqRel);
        }
        {
            // Under the lock so that `wait_durable` cannot miss the wakeup.
            let _log = self.progress.lock();
            self.durable_seq.fetch_max(durable, Ordering::AcqRel);
        }
        self.progressed.notify_all();
        let cb = self.on_durable.read().clone();
        if let Some(cb) = cb {
            guarded("on_durable", || cb(durable));
        }
    }
}

/// An error met while opening, as [`StoreError::Open`] naming `path`
/// (unchanged if it already is one).
fn open_failed(path: &Path, e: StoreError) -> StoreError {
    match e {
        StoreError::Open { .. } => e,
        other => StoreError::Open {
            path: path.to_path_buf(),
            source: Arc::new(other),
        },
    }
}

/// Run a user callback; a panic in it must not kill the writer thread.
fn guarded(name: &str, f: impl FnOnce()) {
    if std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)).is_err() {
        tracing::error!("store: the {name} callback panicked; the writer goes on");
    }
}

/// Group consecutive sequence numbers into ranges.
fn ranges(mut seqs: Vec<u64>) -> Vec<RangeInclusive<u64>> {
    seqs.sort_unstable();
    let mut out: Vec<RangeInclusive<u64>> = Vec::new();
    for s in seqs {
        match out.last_mut() {
            Some(r) if *r.end() + 1 == s => *r = *r.start()..=s,
            _ => out.push(s..=s),
        }
    }
    out
}

/// Current wall clock in unix milliseconds (for expiry deadlines and sweeps).
pub fn unix_now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_merge() {
        assert_eq!(ranges(vec![5, 1, 2, 3, 7, 8]), vec![1..=3, 5..=5, 7..=8]);
        assert!(ranges(vec![]).is_empty());
    }

    #[test]
    fn open_error_names_path() {
        let e = StoreError::Open {
            path: PathBuf::from("/x/y"),
            source: Arc::new(std::io::Error::other("boom")),
        };
        assert_eq!(e.to_string(), "cannot open store at /x/y: boom");
        assert!(StoreError::DiskFull("x".into()).is_out_of_space());
        assert!(StoreError::QuotaExceeded { limit: 1 }.is_out_of_space());
        assert!(!StoreError::Io("x".into()).is_out_of_space());
    }
}
