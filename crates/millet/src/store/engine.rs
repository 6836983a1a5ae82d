//! The redb side: table layout, open + recovery scan, applying ops, sweeping.
//!
//! Tables (keys are raw bytes so that a damaged key can never make the engine
//! panic while decoding it; strings are UTF-8 client ids / topics):
//!
//! | table          | key                         | value                  |
//! |----------------|-----------------------------|------------------------|
//! | `meta`         | name                        | `MetaRecord`           |
//! | `sessions`     | client id                   | `SessionRecord`        |
//! | `messages`     | message id (u64)            | `MessageRecord`        |
//! | `queue`        | (client id, seq u64)        | `QueueEntry`           |
//! | `inflight`     | (client id, packet id u16)  | `InflightEntry`        |
//! | `awaiting_rel` | (client id, packet id u16)  | `()`                   |
//! | `retained`     | topic                       | message id (u64)       |

use std::collections::{HashMap, HashSet};

use rustc_hash::FxHashMap;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::Path;
use std::sync::Arc;

use redb::{
    ReadableDatabase, ReadableTable, ReadableTableMetadata, TableDefinition, WriteTransaction,
};

use super::records::{
    InflightEntry, MessageRecord, MetaRecord, QueueEntry, Record, SessionRecord, FORMAT_VERSION,
};
use super::{Op, Recovered, RecoveredSession, StoreError, DB_FILE};

const META: TableDefinition<&[u8], &[u8]> = TableDefinition::new("meta");
const SESSIONS: TableDefinition<&[u8], &[u8]> = TableDefinition::new("sessions");
const MESSAGES: TableDefinition<u64, &[u8]> = TableDefinition::new("messages");
const QUEUE: TableDefinition<(&[u8], u64), &[u8]> = TableDefinition::new("queue");
const INFLIGHT: TableDefinition<(&[u8], u16), &[u8]> = TableDefinition::new("inflight");
const AWAITING_REL: TableDefinition<(&[u8], u16), ()> = TableDefinition::new("awaiting_rel");
const RETAINED: TableDefinition<&[u8], u64> = TableDefinition::new("retained");

/// Map an engine error to a store error (disk full is told apart).
pub(crate) fn map_err(e: impl Into<redb::Error>) -> StoreError {
    let e: redb::Error = e.into();
    match e {
        redb::Error::Io(io) => map_io(&io),
        redb::Error::Corrupted(s) => StoreError::Corrupt(s),
        other => StoreError::Io(other.to_string()),
    }
}

pub(crate) fn map_io(io: &std::io::Error) -> StoreError {
    // ENOSPC = 28, EDQUOT = 122 on Linux.
    if io.kind() == std::io::ErrorKind::StorageFull
        || io.kind() == std::io::ErrorKind::QuotaExceeded
        || matches!(io.raw_os_error(), Some(28) | Some(122))
    {
        StoreError::DiskFull(io.to_string())
    } else {
        StoreError::Io(io.to_string())
    }
}

fn panic_msg(p: &(dyn std::any::Any + Send)) -> String {
    if let Some(s) = p.downcast_ref::<&str>() {
        (*s).to_owned()
    } else if let Some(s) = p.downcast_ref::<String>() {
        s.clone()
    } else {
        "engine panicked".to_owned()
    }
}

/// Reference count and expiry of a stored message (writer's memory).
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct MsgMeta {
    pub refs: u32,
    pub expires_at_ms: Option<u64>,
}

/// What the writer keeps in memory about the stored state.
#[derive(Debug, Default)]
pub(crate) struct Index {
    /// FxHash: the writer looks up every message id of every op; SipHash
    /// was 6-8% of the writer's time (perf, qos1-persistent).
    pub msgs: FxHashMap<u64, MsgMeta>,
    /// The next sweep scans every table (set after a recovery that dropped
    /// records, so that what it skipped is removed from disk too).
    pub full_sweep: bool,
}

pub(crate) struct Loaded {
    pub recovered: Recovered,
    pub index: Index,
    pub next_message_id: u64,
}

pub(crate) struct Engine {
    pub db: redb::Database,
}

fn open_error(path: &Path, e: impl std::error::Error + Send + Sync + 'static) -> StoreError {
    StoreError::Open {
        path: path.to_path_buf(),
        source: Arc::new(e),
    }
}

impl Engine {
    /// Open the engine file in `dir` (creating dir and file) without loading.
    /// Errors are [`StoreError::Open`] naming the path.
    pub fn open(dir: &Path) -> Result<Engine, StoreError> {
        std::fs::create_dir_all(dir).map_err(|e| open_error(dir, e))?;
        Engine::reopen(dir).map_err(|e| open_error(&dir.join(DB_FILE), e))
    }

    /// Open the engine file of an existing store (after an I/O error), with
    /// the error kept distinguishable (disk full stays [`StoreError::DiskFull`]).
    pub fn reopen(dir: &Path) -> Result<Engine, StoreError> {
        let file = dir.join(DB_FILE);
        let db = match catch_unwind(AssertUnwindSafe(|| redb::Database::create(&file))) {
            Ok(r) => r.map_err(map_err)?,
            Err(p) => return Err(StoreError::Corrupt(panic_msg(&*p))),
        };
        let engine = Engine { db };
        engine.init()?;
        Ok(engine)
    }

    /// [`Engine::init`], with a panic inside redb (seen on damaged pages)
    /// turned into [`StoreError::Corrupt`] instead of taking the server down.
    fn init(&self) -> Result<(), StoreError> {
        match catch_unwind(AssertUnwindSafe(|| self.init_unguarded())) {
            Ok(r) => r,
            Err(p) => Err(StoreError::Corrupt(panic_msg(&*p))),
        }
    }

    /// Create the tables and check the format marker.
    fn init_unguarded(&self) -> Result<(), StoreError> {
        let tx = self.db.begin_write().map_err(map_err)?;
        {
            let mut meta = tx.open_table(META).map_err(map_err)?;
            let existing = meta
                .get(b"format".as_slice())
                .map_err(map_err)?
                .map(|v| MetaRecord::decode(v.value()));
            match existing {
                None => {
                    let rec = MetaRecord {
                        format: FORMAT_VERSION,
                    };
                    meta.insert(b"format".as_slice(), rec.encode().as_slice())
                        .map_err(map_err)?;
                }
                Some(Ok(m)) if m.format == FORMAT_VERSION => {}
                Some(Ok(m)) => {
                    return Err(StoreError::Corrupt(format!(
                        "store format {} is not supported (this build reads {FORMAT_VERSION})",
                        m.format
                    )))
                }
                Some(Err(e)) => {
                    return Err(StoreError::Corrupt(format!("format marker: {e}")));
                }
            }
            tx.open_table(SESSIONS).map_err(map_err)?;
            tx.open_table(MESSAGES).map_err(map_err)?;
            tx.open_table(QUEUE).map_err(map_err)?;
            tx.open_table(INFLIGHT).map_err(map_err)?;
            tx.open_table(AWAITING_REL).map_err(map_err)?;
            tx.open_table(RETAINED).map_err(map_err)?;
        }
        tx.commit().map_err(map_err)
    }

    /// Open and read everything back. With `quarantine`, a file that fails to
    /// open is moved aside and an empty store is started instead.
    pub fn open_and_load(dir: &Path, quarantine: bool) -> Result<(Engine, Loaded), StoreError> {
        let first = Engine::open(dir).and_then(|e| {
            let loaded = e.load_guarded(dir)?;
            Ok((e, loaded))
        });
        match first {
            Ok(v) => Ok(v),
            Err(err) if quarantine && Self::is_corruption(&err) => {
                let file = dir.join(DB_FILE);
                let aside = dir.join(format!("{DB_FILE}.corrupt-{}", super::unix_now_ms()));
                tracing::error!(path = %file.display(), moved_to = %aside.display(), error = %err,
                    "store cannot be opened; moving it aside and starting with an empty store");
                std::fs::rename(&file, &aside).map_err(|e| open_error(&file, e))?;
                let e = Engine::open(dir)?;
                let loaded = e.load_guarded(dir)?;
                Ok((e, loaded))
            }
            Err(e) => Err(e),
        }
    }

    /// Errors that a fresh file would cure (not permissions, locks, ENOSPC).
    fn is_corruption(err: &StoreError) -> bool {
        match err {
            StoreError::Corrupt(_) => true,
            StoreError::Open { source, .. } => {
                let s = source.to_string().to_ascii_lowercase();
                !(s.contains("already open")
                    || s.contains("permission")
                    || s.contains("no space")
                    || s.contains("lock"))
            }
            _ => false,
        }
    }

    pub fn load_guarded(&self, dir: &Path) -> Result<Loaded, StoreError> {
        let file = dir.join(DB_FILE);
        match catch_unwind(AssertUnwindSafe(|| self.load())) {
            Ok(Ok(l)) => Ok(l),
            Ok(Err(e)) => Err(open_error(&file, e)),
            Err(p) => Err(open_error(&file, std::io::Error::other(panic_msg(&*p)))),
        }
    }

    /// Read the whole store. Undecodable records and entries pointing at
    /// missing sessions / messages are skipped and counted in `dropped`.
    pub fn load(&self) -> Result<Loaded, StoreError> {
        let tx = self.db.begin_read().map_err(map_err)?;
        let mut dropped = 0usize;
        let mut index = Index::default();

        let mut sessions: Vec<RecoveredSession> = Vec::new();
        let mut by_client: HashMap<Vec<u8>, usize> = HashMap::new();
        let t = tx.open_table(SESSIONS).map_err(map_err)?;
        for row in t.iter().map_err(map_err)? {
            let (k, v) = row.map_err(map_err)?;
            match SessionRecord::decode(v.value()) {
                Ok(s) if s.client_id.as_bytes() == k.value() => {
                    by_client.insert(k.value().to_vec(), sessions.len());
                    sessions.push(RecoveredSession {
                        session: s,
                        queue: Vec::new(),
                        inflight: Vec::new(),
                        awaiting_rel: Vec::new(),
                    });
                }
                _ => dropped += 1,
            }
        }

        let mut messages: HashMap<u64, MessageRecord> = HashMap::new();
        let mut max_id = 0u64;
        let t = tx.open_table(MESSAGES).map_err(map_err)?;
        for row in t.iter().map_err(map_err)? {
            let (k, v) = row.map_err(map_err)?;
            max_id = max_id.max(k.value());
            match MessageRecord::decode(v.value()) {
                Ok(m) => {
                    index.msgs.insert(
                        k.value(),
                        MsgMeta {
                            refs: 0,
                            expires_at_ms: m.properties.expires_at_ms,
                        },
                    );
                    messages.insert(k.value(), m);
                }
                Err(_) => dropped += 1,
            }
        }

        let mut referenced: HashSet<u64> = HashSet::new();
        let add_ref = |index: &mut Index, id: u64| {
            if let Some(m) = index.msgs.get_mut(&id) {
                m.refs = m.refs.saturating_add(1);
            }
        };

        let t = tx.open_table(QUEUE).map_err(map_err)?;
        for row in t.iter().map_err(map_err)? {
            let (k, v) = row.map_err(map_err)?;
            let (cid, seq) = k.value();
            let Ok(e) = QueueEntry::decode(v.value()) else {
                dropped += 1;
                continue;
            };
            add_ref(&mut index, e.message_id);
            match (by_client.get(cid), messages.contains_key(&e.message_id)) {
                (Some(&i), true) => {
                    referenced.insert(e.message_id);
                    sessions[i].queue.push((seq, e));
                }
                _ => dropped += 1,
            }
        }

        let t = tx.open_table(INFLIGHT).map_err(map_err)?;
        for row in t.iter().map_err(map_err)? {
            let (k, v) = row.map_err(map_err)?;
            let (cid, pid) = k.value();
            let Ok(e) = InflightEntry::decode(v.value()) else {
                dropped += 1;
                continue;
            };
            add_ref(&mut index, e.message_id);
            match (by_client.get(cid), messages.contains_key(&e.message_id)) {
                (Some(&i), true) => {
                    referenced.insert(e.message_id);
                    sessions[i].inflight.push((pid, e));
                }
                _ => dropped += 1,
            }
        }

        let t = tx.open_table(AWAITING_REL).map_err(map_err)?;
        for row in t.iter().map_err(map_err)? {
            let (k, _) = row.map_err(map_err)?;
            let (cid, pid) = k.value();
            match by_client.get(cid) {
                Some(&i) => sessions[i].awaiting_rel.push(pid),
                None => dropped += 1,
            }
        }

        let mut retained = Vec::new();
        let t = tx.open_table(RETAINED).map_err(map_err)?;
        for row in t.iter().map_err(map_err)? {
            let (k, v) = row.map_err(map_err)?;
            let id = v.value();
            add_ref(&mut index, id);
            match (
                String::from_utf8(k.value().to_vec()),
                messages.contains_key(&id),
            ) {
                (Ok(topic), true) => {
                    referenced.insert(id);
                    retained.push((topic, id));
                }
                _ => dropped += 1,
            }
        }

        index.full_sweep = dropped > 0 || index.msgs.values().any(|m| m.refs == 0);
        for s in &mut sessions {
            // queue is already in seq order (key order); awaiting_rel too.
            s.inflight.sort_by_key(|(pid, e)| (e.order, *pid));
        }
        let orphaned_messages = messages.len() - referenced.len().min(messages.len());
        messages.retain(|id, _| referenced.contains(id));

        Ok(Loaded {
            recovered: Recovered {
                sessions,
                messages,
                retained,
                dropped,
                orphaned_messages,
            },
            index,
            next_message_id: max_id.saturating_add(1),
        })
    }

    /// Run `f` on the tables in one write transaction committed with an
    /// fsync (checkpoints, sweeps, replay).
    pub fn write_durably<T>(
        &self,
        index: &mut Index,
        f: impl FnOnce(&mut Tables<'_>, &mut Index) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        let mut tx = self.db.begin_write().map_err(map_err)?;
        tx.set_durability(redb::Durability::Immediate)
            .map_err(|e| StoreError::Io(e.to_string()))?;
        let out = {
            let mut t = Tables::open(&tx)?;
            f(&mut t, index)?
        };
        tx.commit().map_err(map_err)?;
        Ok(out)
    }

    /// Apply groups read back from the write-ahead log, in one durable
    /// transaction (a panic inside redb on a damaged page becomes
    /// [`StoreError::Corrupt`]).
    pub fn replay(&self, index: &mut Index, groups: &[Vec<Op>]) -> Result<u64, StoreError> {
        let refs: Vec<&[Op]> = groups.iter().map(Vec::as_slice).collect();
        let run = || self.write_durably(index, |t, index| t.apply_group(index, &refs));
        match catch_unwind(AssertUnwindSafe(run)) {
            Ok(r) => r,
            Err(p) => Err(StoreError::Corrupt(panic_msg(&*p))),
        }
    }

    /// Logical bytes in use (live records + engine metadata).
    pub fn used_bytes(&self, tx: &WriteTransaction) -> Result<u64, StoreError> {
        let s = tx.stats().map_err(map_err)?;
        Ok(s.stored_bytes() + s.metadata_bytes())
    }
}

/// Write absorption before logging: whether each op of `groups` (flattened,
/// in order) still matters once the whole batch is applied, and how many do
/// not.
/// An entry created and deleted within the batch leaves nothing; otherwise
/// only the last op on a key counts; a message stored in the batch is kept
/// only if a surviving op references it. Applying the survivors in order
/// gives the same state as applying everything (see `Tables::apply_group`,
/// which does the same while applying).
pub(crate) fn absorb<'a>(groups: &[&'a [Op]]) -> (Vec<bool>, u64) {
    let n: usize = groups.iter().map(|g| g.len()).sum();
    let mut keys: FxHashMap<EntryKey<'a>, (bool, (usize, usize))> = FxHashMap::default();
    for (g, ops) in groups.iter().enumerate() {
        for (i, op) in ops.iter().enumerate() {
            if let Some(k) = op.entry_key() {
                keys.entry(k)
                    .and_modify(|(_, at)| *at = (g, i))
                    .or_insert((op.creates(), (g, i)));
            }
        }
    }
    let mut keep = Vec::with_capacity(n);
    let mut referenced: rustc_hash::FxHashSet<u64> = Default::default();
    let mut dropped = 0u64;
    for (g, ops) in groups.iter().enumerate() {
        for (i, op) in ops.iter().enumerate() {
            if let Some(k) = op.entry_key() {
                let vanishes = keys.get(&k).is_none_or(|&(creates, last)| {
                    let (lg, li) = last;
                    (creates && groups[lg][li].is_delete()) || last != (g, i)
                });
                if vanishes {
                    dropped += 1;
                    keep.push(false);
                    continue;
                }
            }
            if let Some(id) = op.references() {
                referenced.insert(id);
            }
            keep.push(true);
        }
    }
    // Messages nobody references any more were never needed on disk.
    let all = groups.iter().flat_map(|g| g.iter());
    for (k, op) in keep.iter_mut().zip(all) {
        if let (true, Op::PutMessage { id, .. }) = (*k, op) {
            if !referenced.contains(id) {
                *k = false;
                dropped += 1;
            }
        }
    }
    (keep, dropped)
}

/// Absorb the deletes of the newest submit `ack` (an acknowledgement, a
/// delivery from a queue) into the submits still waiting before it
/// (`waiting`, oldest first), as [`absorb`] would absorb them all, given
/// that what waits was absorbed already at the earlier submits: only the
/// keys `ack` deletes and the messages their ops referenced can change, so
/// the work is linear in what waits, with nothing allocated for the usual
/// few. Returns how many
/// ops were dropped. Where what waits was not absorbed before (a submit
/// made when this was skipped), less is absorbed here than [`absorb`]
/// would: the writer's round absorbs the rest.
///
/// An exchange's three submits (a message queued for a connected
/// persistent session, its delivery, its acknowledgement) so leave nothing
/// at the acknowledgement: `Queue::absorb_waiting`. Absorbing everything
/// waiting again at every acknowledgement instead was 10% of the event
/// loop's time in an 18,000-device fleet (session 23's profile).
pub(crate) fn absorb_deletes(waiting: &mut [&mut Vec<Op>], ack: &mut Vec<Op>) -> u64 {
    // Positions dropped in `waiting` and in `ack`, and the messages whose
    // references went with them.
    let mut gone: smallvec::SmallVec<[(usize, usize); 8]> = Default::default();
    let mut ack_gone: smallvec::SmallVec<[usize; 4]> = Default::default();
    let mut messages: smallvec::SmallVec<[u64; 4]> = Default::default();
    for (d, del) in ack.iter().enumerate() {
        let Some(k) = del.entry_key().filter(|_| del.is_delete()) else {
            continue;
        };
        let mut first_creates = None;
        for (g, ops) in waiting.iter().enumerate() {
            for (i, op) in ops.iter().enumerate() {
                if !op.entry_key().is_some_and(|o| same_entry(&o, &k)) || gone.contains(&(g, i)) {
                    continue;
                }
                // Superseded by the delete; and when the first op on the
                // key created the entry, the delete has nothing to delete.
                first_creates.get_or_insert(op.creates());
                gone.push((g, i));
                if let Some(m) = op.references() {
                    if !messages.contains(&m) {
                        messages.push(m);
                    }
                }
            }
        }
        // Earlier ops of the same submit on the key (a record updated and
        // deleted within one turn) go the same way.
        for (i, op) in ack[..d].iter().enumerate() {
            if op.entry_key().is_some_and(|o| same_entry(&o, &k)) && !ack_gone.contains(&i) {
                first_creates.get_or_insert(op.creates());
                ack_gone.push(i);
                if let Some(m) = op.references() {
                    if !messages.contains(&m) {
                        messages.push(m);
                    }
                }
            }
        }
        if first_creates == Some(true) {
            ack_gone.push(d);
        }
    }
    // A message stored while waiting, that nothing waiting references any
    // more, need not be written.
    for m in messages {
        let referenced = waiting.iter().enumerate().any(|(g, ops)| {
            ops.iter()
                .enumerate()
                .any(|(i, op)| op.references() == Some(m) && !gone.contains(&(g, i)))
        }) || ack
            .iter()
            .enumerate()
            .any(|(i, op)| op.references() == Some(m) && !ack_gone.contains(&i));
        if referenced {
            continue;
        }
        for (g, ops) in waiting.iter().enumerate() {
            for (i, op) in ops.iter().enumerate() {
                if matches!(op, Op::PutMessage { id, .. } if *id == m) && !gone.contains(&(g, i)) {
                    gone.push((g, i));
                }
            }
        }
        for (i, op) in ack.iter().enumerate() {
            if matches!(op, Op::PutMessage { id, .. } if *id == m) && !ack_gone.contains(&i) {
                ack_gone.push(i);
            }
        }
    }
    let dropped = (gone.len() + ack_gone.len()) as u64;
    for (g, ops) in waiting.iter_mut().enumerate() {
        if gone.iter().any(|&(h, _)| h == g) {
            let mut i = 0;
            ops.retain(|_| {
                i += 1;
                !gone.contains(&(g, i - 1))
            });
        }
    }
    if !ack_gone.is_empty() {
        let mut i = 0;
        ack.retain(|_| {
            i += 1;
            !ack_gone.contains(&(i - 1))
        });
    }
    dropped
}

/// Whether two keys name the same entry (the numbers compared first).
fn same_entry(a: &EntryKey<'_>, b: &EntryKey<'_>) -> bool {
    match (a, b) {
        (EntryKey::Queue(c, s), EntryKey::Queue(d, t)) => s == t && c == d,
        (EntryKey::Inflight(c, p), EntryKey::Inflight(d, q))
        | (EntryKey::AwaitingRel(c, p), EntryKey::AwaitingRel(d, q)) => p == q && c == d,
        _ => false,
    }
}

/// The table key an op writes, for write absorption within a group.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum EntryKey<'a> {
    Queue(&'a str, u64),
    Inflight(&'a str, u16),
    AwaitingRel(&'a str, u16),
}

impl Op {
    /// Creates an entry that cannot exist in the engine yet: a queue entry
    /// (positions are never reused within a session) or a fresh in-flight
    /// record (a packet id is only reused after its previous record was
    /// deleted). See the contracts on [`Op::PutQueueEntry`] and
    /// [`Op::PutInflight`].
    fn creates(&self) -> bool {
        match self {
            Op::PutQueueEntry { .. } => true,
            Op::PutInflight { entry, .. } => entry.state == super::InflightState::AwaitAck,
            _ => false,
        }
    }

    /// The message a surviving op keeps alive (see [`absorb`]).
    fn references(&self) -> Option<u64> {
        match self {
            Op::PutQueueEntry { entry, .. } => Some(entry.message_id),
            Op::PutInflight { entry, .. } => Some(entry.message_id),
            Op::PutRetained { message_id, .. } => Some(*message_id),
            _ => None,
        }
    }

    pub(crate) fn is_delete(&self) -> bool {
        matches!(
            self,
            Op::DeleteQueueEntry { .. } | Op::DeleteInflight { .. } | Op::DeleteAwaitingRel { .. }
        )
    }

    /// The single entry a queue / in-flight / awaiting op writes (other ops
    /// are never absorbed).
    fn entry_key(&self) -> Option<EntryKey<'_>> {
        match self {
            Op::PutQueueEntry { client_id, seq, .. } | Op::DeleteQueueEntry { client_id, seq } => {
                Some(EntryKey::Queue(client_id, *seq))
            }
            Op::PutInflight {
                client_id,
                packet_id,
                ..
            }
            | Op::DeleteInflight {
                client_id,
                packet_id,
            } => Some(EntryKey::Inflight(client_id, *packet_id)),
            Op::PutAwaitingRel {
                client_id,
                packet_id,
            }
            | Op::DeleteAwaitingRel {
                client_id,
                packet_id,
            } => Some(EntryKey::AwaitingRel(client_id, *packet_id)),
            Op::PutSession(_)
            | Op::DeleteSession { .. }
            | Op::PutMessage { .. }
            | Op::PutRetained { .. }
            | Op::DeleteRetained { .. } => None,
        }
    }
}

/// The tables of one write transaction.
pub(crate) struct Tables<'t> {
    sessions: redb::Table<'t, &'static [u8], &'static [u8]>,
    messages: redb::Table<'t, u64, &'static [u8]>,
    queue: redb::Table<'t, (&'static [u8], u64), &'static [u8]>,
    inflight: redb::Table<'t, (&'static [u8], u16), &'static [u8]>,
    awaiting: redb::Table<'t, (&'static [u8], u16), ()>,
    retained: redb::Table<'t, &'static [u8], u64>,
}

/// Counts of what a sweep removed.
#[derive(Debug, Default)]
pub(crate) struct Swept {
    pub sessions: u64,
    pub messages: u64,
    pub entries: u64,
}

impl<'t> Tables<'t> {
    pub fn open(tx: &'t WriteTransaction) -> Result<Tables<'t>, StoreError> {
        Ok(Tables {
            sessions: tx.open_table(SESSIONS).map_err(map_err)?,
            messages: tx.open_table(MESSAGES).map_err(map_err)?,
            queue: tx.open_table(QUEUE).map_err(map_err)?,
            inflight: tx.open_table(INFLIGHT).map_err(map_err)?,
            awaiting: tx.open_table(AWAITING_REL).map_err(map_err)?,
            retained: tx.open_table(RETAINED).map_err(map_err)?,
        })
    }

    /// Apply the ops of several submits committed together (one group,
    /// with no sweep in between), in order, then delete the messages they
    /// left without references. Returns how many ops were absorbed.
    ///
    /// Write absorption ([`absorb`]): the group lands in one transaction,
    /// so only its final state matters. An entry created and deleted within
    /// the group leaves nothing; otherwise only the group's last op on a
    /// key is applied; the reference counts stay exact because every
    /// absorbed put is matched by the later op that replaced or removed it.
    /// A message stored in the group is only written if something still
    /// references it at the end. A message that an online persistent
    /// subscriber acknowledges within the group so never touches the B-tree
    /// (see docs/STORE.md, "The write-ahead log, checkpoints and write
    /// absorption").
    pub fn apply_group(&mut self, index: &mut Index, group: &[&[Op]]) -> Result<u64, StoreError> {
        // Which ops still matter once the whole group is applied.
        let (keep, mut absorbed) = absorb(group);
        let mut keep = keep.into_iter();
        let mut touched: Vec<u64> = Vec::new();
        // Messages put in this group: (id, record, existed before).
        let mut deferred: Vec<(u64, &MessageRecord, bool)> = Vec::new();
        for ops in group {
            for op in ops.iter() {
                if !keep.next().unwrap_or(true) {
                    continue;
                }
                if let Op::PutMessage { id, message } = op {
                    let existed = index.msgs.contains_key(id);
                    let m = index.msgs.entry(*id).or_default();
                    m.expires_at_ms = message.properties.expires_at_ms;
                    touched.push(*id);
                    deferred.push((*id, message, existed));
                    continue;
                }
                self.apply_one(index, op, &mut touched)?;
            }
        }
        for (id, message, existed) in deferred {
            if index.msgs.get(&id).is_some_and(|m| m.refs > 0) {
                self.messages
                    .insert(id, message.encode().as_slice())
                    .map_err(map_err)?;
            } else if !existed {
                // Never written: nothing to delete either.
                index.msgs.remove(&id);
                absorbed += 1;
            }
        }
        self.collect(index, touched)?;
        Ok(absorbed)
    }

    fn collect(&mut self, index: &mut Index, touched: Vec<u64>) -> Result<u64, StoreError> {
        let mut n = 0;
        for id in touched {
            if index.msgs.get(&id).is_some_and(|m| m.refs == 0) {
                index.msgs.remove(&id);
                self.messages.remove(id).map_err(map_err)?;
                n += 1;
            }
        }
        Ok(n)
    }

    fn apply_one(
        &mut self,
        index: &mut Index,
        op: &Op,
        touched: &mut Vec<u64>,
    ) -> Result<(), StoreError> {
        let unref = |index: &mut Index, id: u64, touched: &mut Vec<u64>| {
            if let Some(m) = index.msgs.get_mut(&id) {
                m.refs = m.refs.saturating_sub(1);
                touched.push(id);
            }
        };
        let add_ref = |index: &mut Index, id: u64| {
            // A reference to a message not (yet) stored is kept; recovery
            // drops it if the message never arrives.
            if let Some(m) = index.msgs.get_mut(&id) {
                m.refs = m.refs.saturating_add(1);
            }
        };
        match op {
            Op::PutSession(s) => {
                self.sessions
                    .insert(s.client_id.as_bytes(), s.encode().as_slice())
                    .map_err(map_err)?;
            }
            Op::DeleteSession { client_id } => {
                let ids = self.delete_session(client_id.as_bytes())?;
                for id in ids {
                    unref(index, id, touched);
                }
            }
            Op::PutMessage { id, message } => {
                self.messages
                    .insert(*id, message.encode().as_slice())
                    .map_err(map_err)?;
                let m = index.msgs.entry(*id).or_default();
                m.expires_at_ms = message.properties.expires_at_ms;
                touched.push(*id);
            }
            Op::PutQueueEntry {
                client_id,
                seq,
                entry,
            } => {
                let old = self
                    .queue
                    .insert((str::as_bytes(client_id), *seq), entry.encode().as_slice())
                    .map_err(map_err)?
                    .and_then(|g| QueueEntry::decode(g.value()).ok());
                add_ref(index, entry.message_id);
                if let Some(o) = old {
                    unref(index, o.message_id, touched);
                }
            }
            Op::DeleteQueueEntry { client_id, seq } => {
                let old = self
                    .queue
                    .remove((str::as_bytes(client_id), *seq))
                    .map_err(map_err)?
                    .and_then(|g| QueueEntry::decode(g.value()).ok());
                if let Some(o) = old {
                    unref(index, o.message_id, touched);
                }
            }
            Op::PutInflight {
                client_id,
                packet_id,
                entry,
            } => {
                let old = self
                    .inflight
                    .insert(
                        (str::as_bytes(client_id), *packet_id),
                        entry.encode().as_slice(),
                    )
                    .map_err(map_err)?
                    .and_then(|g| InflightEntry::decode(g.value()).ok());
                add_ref(index, entry.message_id);
                if let Some(o) = old {
                    unref(index, o.message_id, touched);
                }
            }
            Op::DeleteInflight {
                client_id,
                packet_id,
            } => {
                let old = self
                    .inflight
                    .remove((str::as_bytes(client_id), *packet_id))
                    .map_err(map_err)?
                    .and_then(|g| InflightEntry::decode(g.value()).ok());
                if let Some(o) = old {
                    unref(index, o.message_id, touched);
                }
            }
            Op::PutAwaitingRel {
                client_id,
                packet_id,
            } => {
                self.awaiting
                    .insert((str::as_bytes(client_id), *packet_id), ())
                    .map_err(map_err)?;
            }
            Op::DeleteAwaitingRel {
                client_id,
                packet_id,
            } => {
                self.awaiting
                    .remove((str::as_bytes(client_id), *packet_id))
                    .map_err(map_err)?;
            }
            Op::PutRetained { topic, message_id } => {
                let old = self
                    .retained
                    .insert(topic.as_bytes(), *message_id)
                    .map_err(map_err)?
                    .map(|g| g.value());
                add_ref(index, *message_id);
                if let Some(o) = old {
                    unref(index, o, touched);
                }
            }
            Op::DeleteRetained { topic } => {
                let old = self
                    .retained
                    .remove(topic.as_bytes())
                    .map_err(map_err)?
                    .map(|g| g.value());
                if let Some(o) = old {
                    unref(index, o, touched);
                }
            }
        }
        Ok(())
    }

    /// Remove a session and everything it owns; returns the message ids its
    /// entries referenced.
    fn delete_session(&mut self, cid: &[u8]) -> Result<Vec<u64>, StoreError> {
        self.sessions.remove(cid).map_err(map_err)?;
        let mut ids = Vec::new();
        for row in self
            .queue
            .extract_from_if((cid, 0u64)..=(cid, u64::MAX), |_, _| true)
            .map_err(map_err)?
        {
            let (_, v) = row.map_err(map_err)?;
            if let Ok(e) = QueueEntry::decode(v.value()) {
                ids.push(e.message_id);
            }
        }
        for row in self
            .inflight
            .extract_from_if((cid, 0u16)..=(cid, u16::MAX), |_, _| true)
            .map_err(map_err)?
        {
            let (_, v) = row.map_err(map_err)?;
            if let Ok(e) = InflightEntry::decode(v.value()) {
                ids.push(e.message_id);
            }
        }
        self.awaiting
            .retain_in((cid, 0u16)..=(cid, u16::MAX), |_, _| false)
            .map_err(map_err)?;
        Ok(ids)
    }

    /// See [`super::Store::sweep`].
    pub fn sweep(&mut self, index: &mut Index, now_ms: u64) -> Result<Swept, StoreError> {
        let mut swept = Swept::default();
        let mut touched: Vec<u64> = Vec::new();

        // Expired sessions (and undecodable session records: they would be
        // dropped at every recovery anyway).
        let mut live: HashSet<Vec<u8>> = HashSet::new();
        let mut dead: Vec<Vec<u8>> = Vec::new();
        for row in self.sessions.iter().map_err(map_err)? {
            let (k, v) = row.map_err(map_err)?;
            match SessionRecord::decode(v.value()) {
                Ok(s) if s.expires_at_ms.is_none_or(|t| t > now_ms) => {
                    live.insert(k.value().to_vec());
                }
                _ => dead.push(k.value().to_vec()),
            }
        }
        for cid in dead {
            for id in self.delete_session(&cid)? {
                if let Some(m) = index.msgs.get_mut(&id) {
                    m.refs = m.refs.saturating_sub(1);
                    touched.push(id);
                }
            }
            swept.sessions += 1;
        }

        let expired: HashSet<u64> = index
            .msgs
            .iter()
            .filter(|(_, m)| m.expires_at_ms.is_some_and(|t| t <= now_ms))
            .map(|(id, _)| *id)
            .collect();
        let full = std::mem::take(&mut index.full_sweep);
        if expired.is_empty() && !full {
            // Nothing can have become unreferenced or orphaned but through
            // expired sessions, whose entries were removed above.
            swept.messages += self.collect(index, touched)?;
            return Ok(swept);
        }

        // Queue entries of expired messages or of sessions that are gone.
        let mut unref_ids = Vec::new();
        for row in self
            .queue
            .extract_if(|(cid, _), v| {
                !live.contains(cid)
                    || QueueEntry::decode(v).map_or(true, |e| expired.contains(&e.message_id))
            })
            .map_err(map_err)?
        {
            let (_, v) = row.map_err(map_err)?;
            swept.entries += 1;
            if let Ok(e) = QueueEntry::decode(v.value()) {
                unref_ids.push(e.message_id);
            }
        }
        // In-flight entries survive message expiry, but not their session.
        for row in self
            .inflight
            .extract_if(|(cid, _), v| !live.contains(cid) || InflightEntry::decode(v).is_err())
            .map_err(map_err)?
        {
            let (_, v) = row.map_err(map_err)?;
            swept.entries += 1;
            if let Ok(e) = InflightEntry::decode(v.value()) {
                unref_ids.push(e.message_id);
            }
        }
        let before = self.awaiting.len().map_err(map_err)?;
        self.awaiting
            .retain(|(cid, _), _| live.contains(cid))
            .map_err(map_err)?;
        swept.entries += before - self.awaiting.len().map_err(map_err)?;
        for row in self
            .retained
            .extract_if(|_, id| expired.contains(&id))
            .map_err(map_err)?
        {
            let (_, v) = row.map_err(map_err)?;
            swept.entries += 1;
            unref_ids.push(v.value());
        }
        for id in unref_ids {
            if let Some(m) = index.msgs.get_mut(&id) {
                m.refs = m.refs.saturating_sub(1);
                touched.push(id);
            }
        }
        swept.messages += self.collect(index, touched)?;

        // Messages nothing references (left by a crash between versions, or
        // whose references were undecodable) and undecodable messages.
        let orphans: Vec<u64> = index
            .msgs
            .iter()
            .filter(|(_, m)| m.refs == 0)
            .map(|(id, _)| *id)
            .collect();
        for id in orphans {
            index.msgs.remove(&id);
            self.messages.remove(id).map_err(map_err)?;
            swept.messages += 1;
        }
        if !full {
            return Ok(swept);
        }
        let undecodable: Vec<u64> = {
            let mut v = Vec::new();
            for row in self.messages.iter().map_err(map_err)? {
                let (k, _) = row.map_err(map_err)?;
                if !index.msgs.contains_key(&k.value()) {
                    v.push(k.value());
                }
            }
            v
        };
        for id in undecodable {
            self.messages.remove(id).map_err(map_err)?;
            swept.messages += 1;
        }
        Ok(swept)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::records::{
        InflightEntry, InflightState, MessageProperties, MessageRecord, QueueEntry,
    };

    fn message() -> Box<MessageRecord> {
        Box::new(MessageRecord {
            topic: "t".into(),
            payload: bytes::Bytes::from_static(b"p"),
            qos: 1,
            retain: false,
            properties: MessageProperties::default(),
            publisher: None,
        })
    }

    fn queue_put(client_id: &str, seq: u64, message_id: u64) -> Op {
        Op::PutQueueEntry {
            client_id: client_id.into(),
            seq,
            entry: QueueEntry {
                message_id,
                qos: 1,
                retain: false,
                subscription_ids: vec![],
                share: None,
            },
        }
    }

    fn inflight_put(client_id: &str, packet_id: u16, message_id: u64, first: bool) -> Op {
        Op::PutInflight {
            client_id: client_id.into(),
            packet_id,
            entry: InflightEntry {
                message_id,
                qos: 2,
                retain: false,
                subscription_ids: vec![],
                state: if first {
                    InflightState::AwaitAck
                } else {
                    InflightState::AwaitComp
                },
                order: 0,
            },
        }
    }

    /// Every submit with a delete absorbed into what waits as it comes
    /// (`absorb_deletes`), then the round's absorption over what is left:
    /// the same entry ops survive as from the round's absorption over
    /// everything. The submits keep the store's contracts (a queue position
    /// is never reused, an in-flight id is created only when free, an entry
    /// is deleted or updated only while it exists).
    #[test]
    fn deletes_absorbed_as_they_come_leave_what_a_round_would() {
        let mut r = 0x2545_F491_4F6C_DD1Du64;
        let mut next = move |m: u64| {
            r ^= r << 13;
            r ^= r >> 7;
            r ^= r << 17;
            r % m
        };
        let mut emptied = 0;
        for _ in 0..20_000 {
            // Entries that exist (in the engine or waiting): queue
            // positions, in-flight ids, awaiting ids; per client "a"/"b".
            let mut queued: Vec<(&str, u64)> = Vec::new();
            let mut inflight: Vec<(&str, u16)> = Vec::new();
            let mut next_seq = 0u64;
            let mut submits: Vec<Vec<Op>> = Vec::new();
            for _ in 0..1 + next(8) {
                let mut ops = Vec::new();
                for _ in 0..1 + next(3) {
                    let client: &'static str = if next(2) == 0 { "a" } else { "b" };
                    let message_id = next(3);
                    let put_message = |ops: &mut Vec<Op>| {
                        ops.push(Op::PutMessage {
                            id: message_id,
                            message: message(),
                        })
                    };
                    match next(6) {
                        0 | 1 => {
                            next_seq += 1;
                            queued.push((client, next_seq));
                            put_message(&mut ops);
                            ops.push(queue_put(client, next_seq, message_id));
                        }
                        2 if !queued.is_empty() => {
                            let (c, seq) = queued.remove(next(queued.len() as u64) as usize);
                            ops.push(Op::DeleteQueueEntry {
                                client_id: c.into(),
                                seq,
                            });
                        }
                        3 => {
                            let id = next(4) as u16;
                            let exists = inflight.contains(&(client, id));
                            if !exists {
                                inflight.push((client, id));
                            }
                            put_message(&mut ops);
                            ops.push(inflight_put(client, id, message_id, !exists));
                        }
                        4 if !inflight.is_empty() => {
                            let (c, id) = inflight.remove(next(inflight.len() as u64) as usize);
                            ops.push(Op::DeleteInflight {
                                client_id: c.into(),
                                packet_id: id,
                            });
                        }
                        _ => {
                            put_message(&mut ops);
                            ops.push(Op::PutRetained {
                                topic: "r".into(),
                                message_id,
                            });
                        }
                    }
                }
                submits.push(ops);
            }
            let survivors = |groups: &[Vec<Op>]| -> Vec<Op> {
                let refs: Vec<&[Op]> = groups.iter().map(Vec::as_slice).collect();
                let (keep, _) = absorb(&refs);
                refs.iter()
                    .flat_map(|g| g.iter())
                    .zip(keep)
                    .filter(|(_, k)| *k)
                    .map(|(op, _)| op.clone())
                    .collect()
            };
            let mut waiting: Vec<Vec<Op>> = Vec::new();
            for s in &submits {
                let mut ack = s.clone();
                if ack.iter().any(Op::is_delete) {
                    let mut before: Vec<&mut Vec<Op>> = waiting.iter_mut().collect();
                    absorb_deletes(&mut before, &mut ack);
                }
                waiting.push(ack);
            }
            if waiting.iter().all(Vec::is_empty) {
                emptied += 1;
            }
            // The same entry ops survive, and each message they reference
            // is stored by both or by neither (a duplicate put of a message
            // stored again later may go).
            let split = |ops: Vec<Op>| {
                let stored: HashSet<u64> = ops
                    .iter()
                    .filter_map(|op| match op {
                        Op::PutMessage { id, .. } => Some(*id),
                        _ => None,
                    })
                    .collect();
                let entries: Vec<Op> = ops
                    .into_iter()
                    .filter(|op| !matches!(op, Op::PutMessage { .. }))
                    .collect();
                (entries, stored)
            };
            let (left, left_stored) = split(survivors(&waiting));
            let (right, right_stored) = split(survivors(&submits));
            assert_eq!(left, right, "{submits:?}");
            for m in left.iter().filter_map(Op::references) {
                assert_eq!(
                    left_stored.contains(&m),
                    right_stored.contains(&m),
                    "message {m}: {submits:?}"
                );
            }
        }
        assert!(emptied > 100, "some batches leave nothing: {emptied}");
    }
}
