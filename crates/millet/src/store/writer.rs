//! The background threads: group commit into the write-ahead log, the fsync
//! policy, checkpoints into the engine, error handling.
//!
//! The *writer* thread owns the log. Each round it takes everything queued
//! since the last round and appends it to the current log segment
//! ([`Wal`]) as one record; under `Sync` one `fdatasync` then makes the
//! whole group durable, so N concurrent publishers share one fsync. Under
//! `Interval` the append alone reports the group durable (it survives a
//! killed process: it is in the kernel's page cache) and the log is fsynced
//! every interval.
//!
//! The *checkpoint* thread owns the engine. When the current segment reaches
//! `checkpoint_bytes`, or `checkpoint_interval` after its first record, the
//! writer starts a new segment and hands the old one's groups over; the
//! checkpoint thread applies them in one fsynced transaction with write
//! absorption and deletes the segment. Logging never waits for it. On an
//! engine error the engine is dropped; the next attempt, at least
//! [`REOPEN_BACKOFF`] later, reopens it and rebuilds the in-memory index from
//! disk (redb refuses further writes after an I/O error until reopened) and
//! applies the same groups again, in order. Meanwhile the log keeps taking
//! groups up to a hard bound, beyond which they fail with the engine's
//! error. When the disk fills up, log appends fail with
//! [`StoreError::DiskFull`] and succeed again once space returns.
//!
//! Sweeps read the tables, so the writer waits for every handed-over
//! segment to be checkpointed, checkpoints its own, and sweeps, all before
//! it takes the next round (sweeps are rare: every minute or so).

use std::collections::VecDeque;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::{Condvar, Mutex};

use super::engine::{absorb, map_err, Engine, Index, Swept};
use super::wal::{Reserve, Wal};
use super::{
    ranges, Cmd, Durability, Op, Shared, StoreError, StoreOptions, DB_FILE, GATHER_ENOUGH,
    SYNC_LINGER_ONE,
};

/// The last exact computation of the store's usage against `max_bytes`.
#[derive(Clone, Copy)]
struct QuotaCheck {
    over: bool,
    at: Instant,
    /// Live data plus log then.
    used: u64,
    /// The files' length (engine file plus log) then.
    len: u64,
}

/// Minimum time between two attempts to reopen a failed engine.
const REOPEN_BACKOFF: Duration = Duration::from_millis(100);
/// How often to recompute exact usage while the files are above `max_bytes`.
const QUOTA_RECHECK: Duration = Duration::from_secs(1);
/// ... and at most how often when the files grew by more than the room the
/// last computation left (so a fast writer cannot run far past the limit
/// between two computations).
const QUOTA_RECHECK_GROWN: Duration = Duration::from_millis(20);
/// Log bytes not yet checkpointed may reach this many times
/// `checkpoint_bytes` (at least [`LOG_HARD_MIN`]) while checkpoints fail or
/// lag; beyond, groups are refused.
const LOG_HARD_FACTOR: u64 = 16;
const LOG_HARD_MIN: u64 = 16 << 20;

/// The engine and what the checkpoint thread keeps about it.
struct EngineState {
    engine: Option<Engine>,
    index: Index,
    dir: PathBuf,
    /// When the engine failed: next reopen attempt and the error.
    failed: Option<(Instant, StoreError)>,
    /// Released when a checkpoint finds the disk full (see [`Reserve`]).
    reserve: Reserve,
}

impl EngineState {
    fn engine_failed(&mut self, e: StoreError) {
        if self.failed.is_none() {
            tracing::error!(path = %self.dir.join(DB_FILE).display(), error = %e,
                "store write failed; retrying until the store can be reopened");
        }
        self.engine = None;
        self.failed = Some((Instant::now() + REOPEN_BACKOFF, e));
    }

    fn ensure_engine(&mut self, shared: &Shared) -> Result<&Engine, StoreError> {
        if self.engine.is_none() {
            if let Some((at, e)) = &self.failed {
                if Instant::now() < *at {
                    return Err(e.clone());
                }
            }
            let r = Engine::reopen(&self.dir).and_then(|engine| {
                let loaded = engine.load()?;
                Ok((engine, loaded))
            });
            match r {
                Ok((engine, loaded)) => {
                    tracing::info!(path = %self.dir.join(DB_FILE).display(), "store reopened; writes resume");
                    self.engine = Some(engine);
                    // Groups not yet checkpointed are applied on top of this.
                    self.index = loaded.index;
                    self.failed = None;
                    shared.counters.reopens.fetch_add(1, Ordering::Relaxed);
                }
                Err(e) => {
                    self.failed = Some((Instant::now() + REOPEN_BACKOFF, e.clone()));
                    return Err(e);
                }
            }
        }
        self.engine.as_ref().ok_or(StoreError::Closed)
    }

    /// Apply `groups` in one fsynced transaction; the number of absorbed ops.
    fn checkpoint(&mut self, shared: &Shared, groups: &[&[Op]]) -> Result<u64, StoreError> {
        self.ensure_engine(shared)?;
        let Some(engine) = self.engine.as_ref() else {
            return Err(StoreError::Closed);
        };
        let r = engine.write_durably(&mut self.index, |t, index| t.apply_group(index, groups));
        match &r {
            Err(e) => {
                // Make room for the retry (after the reopen back-off).
                if e.is_out_of_space() {
                    self.reserve.release();
                }
                self.engine_failed(e.clone());
            }
            Ok(_) => self.reserve.ensure(),
        }
        r
    }

    fn sweep(&mut self, shared: &Shared, now_unix_ms: u64) -> Result<Swept, StoreError> {
        self.ensure_engine(shared)?;
        let Some(engine) = self.engine.as_ref() else {
            return Err(StoreError::Closed);
        };
        let r = engine.write_durably(&mut self.index, |t, index| t.sweep(index, now_unix_ms));
        if let Err(e) = &r {
            self.engine_failed(e.clone());
        }
        r
    }

    /// Logical bytes in use in the engine.
    fn used_bytes(&mut self, shared: &Shared) -> Result<u64, StoreError> {
        let engine = self.ensure_engine(shared)?;
        let tx = engine.db.begin_write().map_err(map_err)?;
        let used = engine.used_bytes(&tx)?;
        tx.abort().map_err(map_err)?;
        Ok(used)
    }
}

/// A closed log segment waiting for its checkpoint.
struct Handover {
    segment: PathBuf,
    groups: Vec<Vec<Op>>,
    /// Bytes of the segment (for the bound on unchecked log).
    bytes: u64,
    /// Highest sequence in it (synced once checkpointed).
    last_seq: u64,
}

#[derive(Default)]
struct CkQueue {
    todo: VecDeque<Handover>,
    /// The checkpoint thread has taken a handover out of `todo` and is
    /// applying it (it goes back to the front if that fails).
    busy: bool,
    shutdown: bool,
    /// The last checkpoint failed with this (cleared by a success), and
    /// when to try again.
    error: Option<StoreError>,
    retry_at: Option<Instant>,
}

/// What the writer and the checkpoint thread share.
struct CkShared {
    state: Mutex<EngineState>,
    queue: Mutex<CkQueue>,
    /// Wakes the checkpoint thread (work) and the writer (progress).
    work: Condvar,
    progress: Condvar,
    /// Log bytes handed over and not yet checkpointed.
    backlog_bytes: AtomicU64,
}

pub(crate) struct Writer {
    wal: Wal,
    dir: PathBuf,
    options: StoreOptions,
    shared: Arc<Shared>,
    ck: Arc<CkShared>,
    checkpointer: Option<std::thread::JoinHandle<()>>,
    last_sync: Instant,
    /// Until when the writer gathers writes for its next round (see
    /// [`Writer::next_linger`]).
    gather_until: Option<Instant>,
    /// `Queue::absorbed_at_submit` when the writer last looked.
    seen_absorbed: u64,
    /// Highest sequence logged but not fsynced (Interval).
    unsynced: Option<u64>,
    /// Groups in the current segment, when its first one was logged, and
    /// the highest sequence in it.
    pending: Vec<Vec<Op>>,
    pending_since: Option<Instant>,
    pending_last_seq: u64,
    /// Log appends are failing (logged once per episode).
    log_failing: bool,
    /// Quota state: over the limit, and when that was last computed.
    over_quota: Option<QuotaCheck>,
}

impl Writer {
    pub fn new(
        engine: Engine,
        wal: Wal,
        reserve: Reserve,
        index: Index,
        dir: PathBuf,
        options: StoreOptions,
        shared: Arc<Shared>,
    ) -> std::io::Result<Writer> {
        let ck = Arc::new(CkShared {
            state: Mutex::new(EngineState {
                engine: Some(engine),
                index,
                dir: dir.clone(),
                failed: None,
                reserve,
            }),
            queue: Mutex::new(CkQueue::default()),
            work: Condvar::new(),
            progress: Condvar::new(),
            backlog_bytes: AtomicU64::new(0),
        });
        let checkpointer = {
            let ck = ck.clone();
            let shared = shared.clone();
            let dir = dir.clone();
            std::thread::Builder::new()
                .name("millet-checkpoint".into())
                .spawn(move || checkpoint_loop(&ck, &shared, &dir))?
        };
        Ok(Writer {
            wal,
            dir,
            options,
            shared,
            ck,
            checkpointer: Some(checkpointer),
            last_sync: Instant::now(),
            gather_until: None,
            seen_absorbed: 0,
            unsynced: None,
            pending: Vec::new(),
            pending_since: None,
            pending_last_seq: 0,
            log_failing: false,
            over_quota: None,
        })
    }

    fn interval(&self) -> Option<Duration> {
        match self.options.durability {
            Durability::Sync => None,
            Durability::Interval(d) => Some(d),
        }
    }

    /// How long to gather after a round in which `groups` groups stored a
    /// message. `Sync`: group commit pays one fsync per round, and an fsync
    /// costs about as much CPU as handling dozens of messages; a fleet of
    /// quiet devices sends its messages one at a time, spread out, so
    /// rounds only carry several if the writer waits for them. While rounds
    /// carry several it waits the full `linger` (fewer fsyncs: CPU); after
    /// a round of one (or none) at most [`SYNC_LINGER_ONE`] (a lone
    /// publisher waiting for each PUBACK is not slowed down); and
    /// [`GATHER_ENOUGH`] waiting groups end the wait at once (throughput).
    fn next_linger(&self, groups: usize) -> Duration {
        match self.options.durability {
            Durability::Sync if groups < 2 => self.options.linger.min(SYNC_LINGER_ONE),
            _ => self.options.linger,
        }
    }

    pub fn run(mut self) {
        loop {
            let (cmds, shutdown) = self.next_batch();
            let idle = cmds.is_empty();
            if !idle {
                let started = Instant::now();
                // Groups that store a message: a publisher waits for each
                // (acks and deliveries that ride along are not counted).
                let publishes = cmds
                    .iter()
                    .filter(|c| matches!(c, Cmd::Submit { ops, .. } if ops.iter().any(Op::grows)))
                    .count();
                self.process(cmds);
                // Reported durable: submit-time absorption may now report
                // what it leaves empty (`Store::push`).
                self.shared.queue.lock().in_round = false;
                let linger = self.next_linger(publishes);
                self.gather_until = (!shutdown && !linger.is_zero()).then(|| started + linger);
            }
            self.timers();
            if idle && shutdown {
                break;
            }
        }
        // Hand the last segment over and let the checkpoint thread finish.
        if let Err(e) = self.wal.sync() {
            tracing::error!(path = %self.wal.path().display(), error = %e,
                "store: cannot sync the log at shutdown");
        }
        self.hand_over_now();
        {
            let mut q = self.ck.queue.lock();
            q.shutdown = true;
        }
        self.ck.work.notify_all();
        if let Some(h) = self.checkpointer.take() {
            let _ = h.join();
        }
        // An empty current segment is not needed; one with groups the engine
        // could not take stays and is replayed at the next start.
        if self.pending.is_empty() {
            let _ = Wal::remove_segments(&self.dir, &[self.wal.path().to_path_buf()]);
        }
        // Close the engine before telling anyone we are gone.
        self.ck.state.lock().engine = None;
        let _log = self.shared.progress.lock();
        self.shared.writer_dead.store(true, Ordering::Release);
        drop(_log);
        self.shared.progressed.notify_all();
    }

    /// When the next timer (interval fsync, checkpoint) is due, if any.
    fn next_deadline(&self) -> Option<Instant> {
        let sync = match (self.interval(), self.unsynced) {
            (Some(d), Some(_)) => Some(self.last_sync + d),
            _ => None,
        };
        // A due hand-over waits while the checkpoint thread is busy; it
        // wakes the writer when it is done.
        let checkpoint = self
            .pending_since
            .map(|t| t + self.options.checkpoint_interval)
            .filter(|_| {
                let q = self.ck.queue.lock();
                q.todo.is_empty() && !q.busy
            });
        match (sync, checkpoint) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// Wait for work; returns what is queued (possibly nothing when a timer
    /// fires) and whether shutdown was requested.
    fn next_batch(&mut self) -> (Vec<Cmd>, bool) {
        // Under the queue lock, so that the checkpoint thread's wake-up
        // (taken under the same lock) cannot fall between the two.
        let mut q = self.shared.queue.lock();
        let deadline = self.next_deadline();
        q.gather_enough = match self.options.durability {
            Durability::Sync => GATHER_ENOUGH,
            Durability::Interval(_) => usize::MAX,
        };
        loop {
            // Gathering after a round (see `next_linger`): submits do not
            // wake the writer, unless enough of them wait.
            let now = Instant::now();
            let mut gather = self.gather_until.filter(|t| now < *t);
            if gather.is_none() {
                self.gather_until = None;
            }
            let ready = !q.cmds.is_empty() && (!q.paused || q.shutdown);
            // Exchanges absorbed at their submits since the last look
            // (`Store::push`) are the fleet's steady state: the writer
            // gathers as after a busy round, so that the next exchanges'
            // submits do not each wake it (they are held for their
            // acknowledgements anyway, and most are absorbed at them).
            if !ready
                && gather.is_none()
                && q.absorbed_at_submit != self.seen_absorbed
                && !self.options.linger.is_zero()
            {
                self.seen_absorbed = q.absorbed_at_submit;
                self.gather_until = Some(now + self.options.linger);
                gather = self.gather_until;
            }
            // A timer of the writer's own (interval fsync, checkpoint) is
            // due: `run` handles it (gathering goes on afterwards).
            let timer_due = deadline.is_some_and(|d| now >= d);
            let full = q.cmds.len() >= q.gather_enough;
            // The first submit still waiting for its acknowledgement to be
            // absorbed with it (`SYNC_ABSORB_WINDOW`): the round ends before
            // it, and it and everything after wait for the next.
            let mut hold = None;
            if ready && !q.shutdown && (gather.is_none() || full) {
                // A reserved place not filled yet ends the round whatever
                // else holds: nothing after it may be applied before it.
                let reserved = q
                    .cmds
                    .iter()
                    .position(|c| matches!(c, Cmd::Reserved { .. }))
                    .unwrap_or(q.cmds.len());
                let (split, until) = q.cmds[..reserved]
                    .iter()
                    .enumerate()
                    .find_map(|(i, c)| c.held(now).map(|t| (i, Some(t))))
                    .unwrap_or((reserved, None));
                // So many young submits start a round whole: holding them
                // would only slow publishers down.
                let split = if reserved - split >= q.gather_enough {
                    reserved
                } else {
                    split
                };
                if split > 0 {
                    let rest = q.cmds.split_off(split);
                    let round = std::mem::replace(&mut q.cmds, rest);
                    q.gathering = false;
                    q.in_round = true;
                    self.gather_until = None;
                    return (round, false);
                }
                hold = until;
            }
            if ready && q.shutdown {
                q.gathering = false;
                q.in_round = true;
                self.gather_until = None;
                return (std::mem::take(&mut q.cmds), true);
            }
            if q.shutdown || timer_due {
                q.gathering = false;
                return (Vec::new(), q.shutdown);
            }
            let gather = gather.or(hold);
            q.gathering = gather.is_some();
            match [deadline, gather].into_iter().flatten().min() {
                Some(due) => {
                    self.shared.work.wait_until(&mut q, due);
                }
                None => self.shared.work.wait(&mut q),
            }
        }
    }

    fn timers(&mut self) {
        if let (Some(d), Some(_)) = (self.interval(), self.unsynced) {
            if self.last_sync.elapsed() >= d {
                self.sync_log();
            }
        }
        let due = self.pending_since.is_some_and(|t| {
            t.elapsed() >= self.options.checkpoint_interval
                || self.wal.len() >= self.options.checkpoint_bytes
        });
        if due {
            self.hand_over();
        }
    }

    /// Interval policy: fsync what was logged without fsync.
    fn sync_log(&mut self) {
        let Some(seq) = self.unsynced else { return };
        // Whatever happens, do not retry before the next interval.
        self.last_sync = Instant::now();
        match self.wal.sync() {
            Ok(()) => {
                self.unsynced = None;
                self.shared.counters.fsyncs.fetch_add(1, Ordering::Relaxed);
                self.shared.synced_seq.fetch_max(seq, Ordering::AcqRel);
            }
            Err(e) => {
                tracing::error!(path = %self.wal.path().display(), error = %e,
                    "store: fsync of the log failed; retrying at the next interval");
            }
        }
    }

    /// Close the current segment and give its groups to the checkpoint
    /// thread, once that is idle (so at most one segment waits for the
    /// engine; a lagging engine makes the segments bigger instead, and
    /// absorbs more).
    fn hand_over(&mut self) {
        if self.pending.is_empty() {
            return;
        }
        {
            let q = self.ck.queue.lock();
            if !q.todo.is_empty() || q.busy {
                return;
            }
        }
        self.hand_over_now();
    }

    fn hand_over_now(&mut self) {
        if self.pending.is_empty() {
            return;
        }
        let bytes = self.wal.len();
        let segment = match self.wal.rotate() {
            Ok(p) => p,
            Err(e) => {
                // Keep logging into the same segment; try again later.
                tracing::warn!(path = %self.wal.path().display(), error = %e,
                    "store: cannot start a new log segment");
                self.pending_since = Some(Instant::now());
                return;
            }
        };
        // The closed segment was synced by the rotation.
        if let Some(seq) = self.unsynced.take() {
            self.shared.synced_seq.fetch_max(seq, Ordering::AcqRel);
            self.last_sync = Instant::now();
        }
        let h = Handover {
            segment,
            groups: std::mem::take(&mut self.pending),
            bytes,
            last_seq: self.pending_last_seq,
        };
        self.pending_since = None;
        self.ck.backlog_bytes.fetch_add(bytes, Ordering::AcqRel);
        self.ck.queue.lock().todo.push_back(h);
        self.ck.work.notify_all();
    }

    /// Wait until everything handed over is checkpointed; the error of the
    /// last failed attempt if it did not succeed (after one retry round).
    fn drain_checkpoints(&mut self) -> Result<(), StoreError> {
        let mut q = self.ck.queue.lock();
        loop {
            if q.todo.is_empty() && !q.busy {
                return Ok(());
            }
            if let (Some(e), false) = (&q.error, q.busy) {
                return Err(e.clone());
            }
            self.ck.progress.wait(&mut q);
        }
    }

    fn process(&mut self, cmds: Vec<Cmd>) {
        let mut segment: Vec<(u64, Vec<Op>)> = Vec::new();
        for cmd in cmds {
            match cmd {
                Cmd::Submit { seq, ops, .. } => segment.push((seq, ops)),
                Cmd::Sweep { seq, now_unix_ms } => {
                    self.log(std::mem::take(&mut segment));
                    self.sweep(seq, now_unix_ms);
                }
                // Only at shutdown: its ops never come in time.
                Cmd::Reserved { seq } => {
                    self.log(std::mem::take(&mut segment));
                    self.shared.report_failed(&[seq..=seq], &StoreError::Closed);
                    self.shared.advance(seq, None);
                }
            }
        }
        self.log(segment);
        if self.wal.len() >= self.options.checkpoint_bytes
            || self.options.checkpoint_interval.is_zero()
        {
            self.hand_over();
        }
    }

    /// Append a group of submits to the log (fsynced under `Sync`) and
    /// report it durable, or failed.
    fn log(&mut self, segment: Vec<(u64, Vec<Op>)>) {
        let Some(last) = segment.iter().map(|(s, _)| *s).max() else {
            return;
        };
        let refuse_growth = match self.admit() {
            Ok(r) => r,
            Err(e) => {
                self.shared.set_failing(Some(&e));
                self.shared
                    .report_failed(&ranges(segment.iter().map(|(s, _)| *s).collect()), &e);
                self.shared.advance(last, None);
                return;
            }
        };
        let (accepted, rejected): (Vec<_>, Vec<_>) = segment
            .into_iter()
            .partition(|(_, ops)| refuse_growth.is_none() || !ops.iter().any(Op::grows));
        if let (false, Some(e)) = (rejected.is_empty(), &refuse_growth) {
            self.shared
                .report_failed(&ranges(rejected.iter().map(|(s, _)| *s).collect()), e);
        }
        if accepted.is_empty() {
            self.shared.set_failing(refuse_growth.as_ref());
            self.shared.advance(last, None);
            return;
        }
        let sync = match self.interval() {
            None => true,
            Some(d) => self.last_sync.elapsed() >= d,
        };
        // Only what survives the batch is logged (write absorption).
        let groups: Vec<&[Op]> = accepted.iter().map(|(_, ops)| ops.as_slice()).collect();
        let (keep, absorbed) = absorb(&groups);
        let survivors: Vec<&Op> = groups
            .iter()
            .flat_map(|g| g.iter())
            .zip(&keep)
            .filter_map(|(op, k)| k.then_some(op))
            .collect();
        drop(groups);
        let before = self.wal.len();
        let round_started = Instant::now();
        let appended = !survivors.is_empty();
        let mut r = if appended {
            self.wal.append(&survivors)
        } else {
            Ok(())
        };
        drop(survivors);
        // A round that absorbed everything (a fleet's message and its
        // subscriber's acknowledgement in one round) logged nothing: unless
        // earlier appends wait for their fsync (`Interval`), there is
        // nothing to sync. Under `Sync` every earlier round was synced.
        let nothing_to_sync = !appended && self.unsynced.is_none();
        let sync = sync && !nothing_to_sync;
        if r.is_ok() && sync {
            r = self.wal.sync();
            if r.is_err() {
                // Not durable, so not to be applied later either.
                let _ = self.wal.truncate(before);
            }
        }
        let c = &self.shared.counters;
        c.log_write.observe(round_started.elapsed());
        match r {
            Ok(()) => {
                if self.log_failing {
                    self.log_failing = false;
                    tracing::info!(path = %self.wal.path().display(), "store log writes resume");
                }
                c.commits.fetch_add(1, Ordering::Relaxed);
                c.absorbed.fetch_add(absorbed, Ordering::Relaxed);
                self.shared.set_failing(refuse_growth.as_ref());
                let mut survivors: Vec<Op> = Vec::new();
                let mut keep = keep.into_iter();
                for (_, ops) in accepted {
                    for mut op in ops {
                        if keep.next().unwrap_or(true) {
                            // Kept until the checkpoint: not in the buffer
                            // the message arrived in.
                            if let Op::PutMessage { message, .. } = &mut op {
                                message.detach();
                            }
                            survivors.push(op);
                        }
                    }
                }
                if !survivors.is_empty() {
                    if self.pending.is_empty() {
                        self.pending_since = Some(Instant::now());
                    }
                    self.pending_last_seq = self.pending_last_seq.max(last);
                    self.pending.push(survivors);
                }
                if sync {
                    c.fsyncs.fetch_add(1, Ordering::Relaxed);
                    self.last_sync = Instant::now();
                    self.unsynced = None;
                    self.shared.advance(last, Some(last));
                } else if nothing_to_sync {
                    self.shared.advance(last, Some(last));
                } else {
                    self.unsynced = Some(last);
                    self.shared.advance(last, None);
                }
            }
            Err(e) => {
                self.shared.set_failing(Some(&e));
                if !self.log_failing {
                    self.log_failing = true;
                    tracing::error!(path = %self.wal.path().display(), error = %e,
                        "store log write failed; failing writes until it succeeds again");
                }
                self.shared
                    .report_failed(&ranges(accepted.iter().map(|(s, _)| *s).collect()), &e);
                self.shared.advance(last, None);
            }
        }
    }

    /// Whether a group may be logged: `Err` while the log not yet
    /// checkpointed is over its hard bound; `Ok(Some(error))` when submits
    /// that add data must be refused with that error: over `max_bytes`, or
    /// the engine is out of space (what is logged must still fit in it once
    /// space returns, so the backlog must not grow meanwhile).
    fn admit(&mut self) -> Result<Option<StoreError>, StoreError> {
        let hard = self
            .options
            .checkpoint_bytes
            .saturating_mul(LOG_HARD_FACTOR)
            .max(LOG_HARD_MIN);
        let backlog = self.ck.backlog_bytes.load(Ordering::Acquire) + self.wal.len();
        let ck_error = self.ck.queue.lock().error.clone();
        if backlog > hard {
            return Err(
                ck_error.unwrap_or_else(|| StoreError::Io("store log over its bound".into()))
            );
        }
        if let Some(e) = ck_error.filter(StoreError::is_out_of_space) {
            return Ok(Some(e));
        }
        Ok(self.over_quota()?.then(|| StoreError::QuotaExceeded {
            limit: self.options.max_bytes.unwrap_or(0),
        }))
    }

    /// Run a sweep: everything logged so far goes into the engine first.
    fn sweep(&mut self, seq: u64, now_unix_ms: u64) {
        self.hand_over_now();
        let r = self.drain_checkpoints().and_then(|()| {
            let mut st = self.ck.state.lock();
            st.sweep(&self.shared, now_unix_ms)
        });
        match r {
            Ok(s) => {
                let c = &self.shared.counters;
                c.commits.fetch_add(1, Ordering::Relaxed);
                c.sweeps.fetch_add(1, Ordering::Relaxed);
                c.swept_sessions.fetch_add(s.sessions, Ordering::Relaxed);
                c.swept_messages.fetch_add(s.messages, Ordering::Relaxed);
                c.swept_entries.fetch_add(s.entries, Ordering::Relaxed);
                // Everything up to here is in the engine, fsynced.
                self.shared.advance(seq, Some(seq));
            }
            Err(e) => {
                self.shared.report_failed(&[seq..=seq], &e);
                self.shared.advance(seq, None);
            }
        }
    }

    /// Whether the store is over `max_bytes`: cheap file-size test first
    /// (engine file plus log); only when that is larger than the limit is the
    /// exact usage of live data computed (at most every [`QUOTA_RECHECK`]),
    /// since freed pages are reused and the file does not shrink.
    fn over_quota(&mut self) -> Result<bool, StoreError> {
        let Some(limit) = self.options.max_bytes else {
            return Ok(false);
        };
        let log = self.ck.backlog_bytes.load(Ordering::Acquire) + self.wal.len();
        let len = std::fs::metadata(self.dir.join(DB_FILE))
            .map(|m| m.len())
            .unwrap_or(0)
            + log;
        if len <= limit {
            self.over_quota = None;
            return Ok(false);
        }
        if let Some(q) = self.over_quota {
            let age = q.at.elapsed();
            // Grown past the room left at the last computation: what was
            // under the limit may not be any more.
            let grown = !q.over && len.saturating_sub(q.len) > limit.saturating_sub(q.used);
            if age < QUOTA_RECHECK && !(grown && age >= QUOTA_RECHECK_GROWN) {
                return Ok(q.over);
            }
        }
        // Waits for a running checkpoint; only while the files are above
        // the limit, at most once per QUOTA_RECHECK (QUOTA_RECHECK_GROWN
        // while they grow past the room left).
        let used = self.ck.state.lock().used_bytes(&self.shared)? + log;
        let over = used > limit;
        self.over_quota = Some(QuotaCheck {
            over,
            at: Instant::now(),
            used,
            len,
        });
        Ok(over)
    }
}

/// The checkpoint thread: apply handed-over segments in order, delete them.
fn checkpoint_loop(ck: &CkShared, shared: &Shared, dir: &std::path::Path) {
    loop {
        let h = {
            let mut q = ck.queue.lock();
            loop {
                if !q.todo.is_empty() {
                    // Retry a failed checkpoint only after the backoff. At
                    // shutdown one last attempt is made; if that fails too,
                    // the segments stay and are replayed at the next start.
                    if q.shutdown && q.error.is_some() && q.retry_at.is_none() {
                        return;
                    }
                    if let Some(at) = q.retry_at.filter(|at| *at > Instant::now()) {
                        ck.work.wait_until(&mut q, at);
                        continue;
                    }
                    if q.shutdown {
                        // Marks the last attempt (see above).
                        q.retry_at = None;
                    }
                    if let Some(h) = q.todo.pop_front() {
                        q.busy = true;
                        break h;
                    }
                }
                if q.shutdown {
                    return;
                }
                ck.work.wait(&mut q);
            }
        };
        let refs: Vec<&[Op]> = h.groups.iter().map(Vec::as_slice).collect();
        let r = ck.state.lock().checkpoint(shared, &refs);
        drop(refs);
        let mut q = ck.queue.lock();
        q.busy = false;
        match r {
            Ok(absorbed) => {
                q.error = None;
                q.retry_at = None;
                drop(q);
                let c = &shared.counters;
                c.checkpoints.fetch_add(1, Ordering::Relaxed);
                c.absorbed.fetch_add(absorbed, Ordering::Relaxed);
                shared.synced_seq.fetch_max(h.last_seq, Ordering::AcqRel);
                if let Err(e) = Wal::retire_segments(dir, std::slice::from_ref(&h.segment)) {
                    // Harmless: replaying groups the engine already has ends
                    // in the same state.
                    tracing::warn!(error = %e, "store: cannot delete a checkpointed log segment");
                }
                ck.backlog_bytes.fetch_sub(h.bytes, Ordering::AcqRel);
                // The writer may be holding a segment back for us.
                let _q = shared.queue.lock();
                shared.work.notify_all();
            }
            Err(e) => {
                q.error = Some(e);
                if !q.shutdown {
                    q.retry_at = Some(Instant::now() + REOPEN_BACKOFF);
                }
                q.todo.push_front(h);
            }
        }
        ck.progress.notify_all();
    }
}
