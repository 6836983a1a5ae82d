//! The background writer: group commit, fsync policy, error handling.
//!
//! One thread owns the engine. Each round it takes *everything* queued since
//! the last round, applies it in one write transaction and commits it with one
//! fsync (`Sync`), so N concurrent publishers share one fsync. On an engine
//! error the whole group is reported failed, the engine is dropped, and the
//! next round reopens it and rebuilds the in-memory index from disk (redb
//! refuses further writes after an I/O error until reopened). Reopen attempts
//! are spaced by [`REOPEN_BACKOFF`]; rounds in between fail fast with the last
//! error. So when the disk fills up, publishes fail with
//! [`StoreError::DiskFull`] and succeed again once space returns.

use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::engine::{map_err, Engine, Index, Swept, Tables};
use super::{ranges, Cmd, Durability, Op, Shared, StoreError, StoreOptions, DB_FILE};

/// Minimum time between two attempts to reopen a failed engine.
const REOPEN_BACKOFF: Duration = Duration::from_millis(100);
/// How often to recompute exact usage while the file is above `max_bytes`.
const QUOTA_RECHECK: Duration = Duration::from_secs(1);

pub(crate) struct Writer {
    engine: Option<Engine>,
    index: Index,
    dir: PathBuf,
    options: StoreOptions,
    shared: Arc<Shared>,
    last_sync: Instant,
    /// Highest sequence committed but not fsynced (Interval).
    unsynced: Option<u64>,
    /// When the engine failed: next reopen attempt and the error to report
    /// until then.
    failed: Option<(Instant, StoreError)>,
    /// Quota state: over the limit, and when that was last computed.
    over_quota: Option<(bool, Instant)>,
}

impl Writer {
    pub fn new(
        engine: Engine,
        index: Index,
        dir: PathBuf,
        options: StoreOptions,
        shared: Arc<Shared>,
    ) -> Writer {
        Writer {
            engine: Some(engine),
            index,
            dir,
            options,
            shared,
            last_sync: Instant::now(),
            unsynced: None,
            failed: None,
            over_quota: None,
        }
    }

    fn interval(&self) -> Option<Duration> {
        match self.options.durability {
            Durability::Sync => None,
            Durability::Interval(d) => Some(d),
        }
    }

    pub fn run(mut self) {
        loop {
            let (cmds, shutdown) = self.next_batch();
            if !cmds.is_empty() {
                self.process(cmds);
                continue;
            }
            if shutdown {
                break;
            }
            self.timer_sync();
        }
        if self.unsynced.is_some() {
            self.sync_now();
        }
        // Close the engine before telling anyone we are gone.
        self.engine = None;
        let _log = self.shared.progress.lock();
        self.shared.writer_dead.store(true, Ordering::Release);
        drop(_log);
        self.shared.progressed.notify_all();
    }

    /// Wait for work; returns what is queued (possibly nothing when the sync
    /// timer fires) and whether shutdown was requested.
    fn next_batch(&mut self) -> (Vec<Cmd>, bool) {
        let mut q = self.shared.queue.lock();
        loop {
            if !q.cmds.is_empty() && (!q.paused || q.shutdown) {
                return (std::mem::take(&mut q.cmds), q.shutdown);
            }
            if q.shutdown {
                return (Vec::new(), true);
            }
            match (self.interval(), self.unsynced) {
                (Some(d), Some(_)) => {
                    let due = self.last_sync + d;
                    let timed_out = Instant::now() >= due
                        || self.shared.work.wait_until(&mut q, due).timed_out();
                    if timed_out && q.cmds.is_empty() {
                        return (Vec::new(), q.shutdown);
                    }
                }
                _ => {
                    self.shared.work.wait(&mut q);
                }
            }
        }
    }

    fn timer_sync(&mut self) {
        if let (Some(d), Some(_)) = (self.interval(), self.unsynced) {
            if self.last_sync.elapsed() >= d {
                self.sync_now();
            }
        }
    }

    /// Interval policy: fsync what was committed without fsync.
    fn sync_now(&mut self) {
        let Some(seq) = self.unsynced else { return };
        let Some(engine) = self.engine.as_ref() else {
            return;
        };
        let r = (|| -> Result<(), StoreError> {
            let mut tx = engine.db.begin_write().map_err(map_err)?;
            tx.set_durability(redb::Durability::Immediate)
                .map_err(|e| StoreError::Io(e.to_string()))?;
            tx.commit().map_err(map_err)
        })();
        match r {
            Ok(()) => {
                self.last_sync = Instant::now();
                self.unsynced = None;
                self.shared.counters.fsyncs.fetch_add(1, Ordering::Relaxed);
                self.shared.synced_seq.fetch_max(seq, Ordering::AcqRel);
            }
            Err(e) => self.engine_failed(e),
        }
    }

    fn engine_failed(&mut self, e: StoreError) {
        if self.failed.is_none() {
            tracing::error!(path = %self.dir.join(DB_FILE).display(), error = %e,
                "store write failed; failing writes until the store can be reopened");
        }
        if self.unsynced.take().is_some() {
            tracing::error!(
                "store: commits not yet fsynced (interval durability) are lost with the failed engine"
            );
        }
        self.engine = None;
        self.failed = Some((Instant::now() + REOPEN_BACKOFF, e));
    }

    fn ensure_engine(&mut self) -> Result<(), StoreError> {
        if self.engine.is_some() {
            return Ok(());
        }
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
                self.index = loaded.index;
                self.failed = None;
                self.over_quota = None;
                self.last_sync = Instant::now();
                self.shared.counters.reopens.fetch_add(1, Ordering::Relaxed);
                Ok(())
            }
            Err(e) => {
                self.failed = Some((Instant::now() + REOPEN_BACKOFF, e.clone()));
                Err(e)
            }
        }
    }

    fn process(&mut self, cmds: Vec<Cmd>) {
        let Some(last) = cmds.iter().map(Cmd::seq).max() else {
            return;
        };
        let all: Vec<u64> = cmds.iter().map(Cmd::seq).collect();
        if let Err(e) = self.ensure_engine() {
            self.shared.report_failed(&ranges(all), &e);
            self.shared.advance(last, None);
            return;
        }
        let sync = match self.interval() {
            None => true,
            Some(d) => self.last_sync.elapsed() >= d,
        };
        match self.commit(&cmds, sync) {
            Ok((rejected, swept)) => {
                let c = &self.shared.counters;
                c.commits.fetch_add(1, Ordering::Relaxed);
                if swept.0 > 0 {
                    c.sweeps.fetch_add(swept.0, Ordering::Relaxed);
                    c.swept_sessions
                        .fetch_add(swept.1.sessions, Ordering::Relaxed);
                    c.swept_messages
                        .fetch_add(swept.1.messages, Ordering::Relaxed);
                    c.swept_entries
                        .fetch_add(swept.1.entries, Ordering::Relaxed);
                }
                if !rejected.is_empty() {
                    let limit = self.options.max_bytes.unwrap_or(0);
                    self.shared
                        .report_failed(&ranges(rejected), &StoreError::QuotaExceeded { limit });
                }
                if sync {
                    c.fsyncs.fetch_add(1, Ordering::Relaxed);
                    self.last_sync = Instant::now();
                    self.unsynced = None;
                    self.shared.advance(last, Some(last));
                } else {
                    self.unsynced = Some(last);
                    self.shared.advance(last, None);
                }
            }
            Err(e) => {
                self.engine_failed(e.clone());
                self.shared.report_failed(&ranges(all), &e);
                self.shared.advance(last, None);
            }
        }
    }

    /// Apply and commit one group. Returns the sequences refused for quota
    /// and the number of sweeps with what they removed.
    #[allow(clippy::type_complexity)]
    fn commit(&mut self, cmds: &[Cmd], sync: bool) -> Result<(Vec<u64>, (u64, Swept)), StoreError> {
        let over = self.over_quota()?;
        let Some(engine) = self.engine.as_ref() else {
            return Err(StoreError::Closed);
        };
        let mut tx = engine.db.begin_write().map_err(map_err)?;
        let durability = if sync {
            redb::Durability::Immediate
        } else {
            redb::Durability::None
        };
        tx.set_durability(durability)
            .map_err(|e| StoreError::Io(e.to_string()))?;
        let mut rejected = Vec::new();
        let mut swept = (0u64, Swept::default());
        {
            let mut t = Tables::open(&tx)?;
            for cmd in cmds {
                match cmd {
                    Cmd::Submit { seq, ops } => {
                        if over && ops.iter().any(Op::grows) {
                            rejected.push(*seq);
                        } else {
                            t.apply(&mut self.index, ops)?;
                        }
                    }
                    Cmd::Sweep { now_unix_ms, .. } => {
                        let s = t.sweep(&mut self.index, *now_unix_ms)?;
                        swept.0 += 1;
                        swept.1.sessions += s.sessions;
                        swept.1.messages += s.messages;
                        swept.1.entries += s.entries;
                    }
                }
            }
        }
        tx.commit().map_err(map_err)?;
        Ok((rejected, swept))
    }

    /// Whether the store is over `max_bytes`: cheap file-size test first;
    /// only when the file is larger than the limit is the exact usage of
    /// live data computed (at most every [`QUOTA_RECHECK`]), since freed
    /// pages are reused and the file does not shrink.
    fn over_quota(&mut self) -> Result<bool, StoreError> {
        let Some(limit) = self.options.max_bytes else {
            return Ok(false);
        };
        let len = std::fs::metadata(self.dir.join(DB_FILE))
            .map(|m| m.len())
            .unwrap_or(0);
        if len <= limit {
            self.over_quota = None;
            return Ok(false);
        }
        if let Some((over, at)) = self.over_quota {
            if at.elapsed() < QUOTA_RECHECK {
                return Ok(over);
            }
        }
        let Some(engine) = self.engine.as_ref() else {
            return Ok(false);
        };
        let tx = engine.db.begin_write().map_err(map_err)?;
        let used = engine.used_bytes(&tx)?;
        tx.abort().map_err(map_err)?;
        let over = used > limit;
        self.over_quota = Some((over, Instant::now()));
        Ok(over)
    }
}
