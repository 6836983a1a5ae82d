//! The write-ahead log in front of the engine.
//!
//! Every group the writer takes is appended to the current log segment
//! (`millet.wal.<generation>`) as one record and, under
//! [`super::Durability::Sync`], made durable with one `fdatasync` before its
//! sequences are reported durable. The engine (redb) only receives the ops at
//! a *checkpoint*: the writer starts a new segment and hands the groups of
//! the old one to the checkpoint thread, which applies them in one
//! transaction with write absorption (see `Tables::apply_group`), commits
//! with an fsync and deletes the old segment. Logging never waits for a
//! checkpoint.
//! Most messages to online subscribers are published, delivered and
//! acknowledged between two checkpoints, so their queue and in-flight entries
//! never reach the B-tree: the log turns six B-tree mutations per message
//! into one sequential append (measured in docs/STORE.md).
//!
//! Segment layout: an 8-byte magic (`MLTWAL01`), then records
//! `[payload length: u32 LE][CRC-32 of payload: u32 LE][payload]`, where the
//! payload is `postcard(Vec<Op>)`. On open the segments are read back in
//! generation order until the end or the first record that is torn (shorter
//! than its length), fails its checksum or does not decode; that record and
//! everything after it, later segments included, are dropped (they were
//! never reported durable if the tear is the crash itself) and logged, so
//! what is replayed is always a prefix of the history.
//!
//! Segments are recycled: a checkpointed segment is not deleted but renamed
//! aside (`millet.wal-spare`), zeroed and synced by the checkpoint thread,
//! and the next rotation renames it into place. Records are then written
//! inside a file that already has its blocks, so the `fdatasync` after each
//! round writes the data and the flush but no inode (the file size does not
//! change): measured here, 40 µs of CPU and 110 µs of wall time per fsync
//! instead of 70 and 190. A zero record header (length 0; a real record is
//! never empty) is the clean end of a segment, and the zeros after it are
//! not counted as dropped.
//!
//! Replaying a log onto an engine that already holds some of its groups (a
//! crash between a checkpoint's commit and the log reset) gives the same
//! state: every op sets or removes one key (or a session's keys), so applying
//! a suffix of the history twice ends where applying it once does.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use super::engine::map_io;
use super::{Op, StoreError};

/// Log segments are the files `millet.wal.<generation>` (20 digits) of
/// the store directory.
pub const WAL_PREFIX: &str = "millet.wal.";
const MAGIC: &[u8; 8] = b"MLTWAL01";
const HEADER: usize = 8;
/// A checkpointed segment, zeroed and synced, waiting to become the next
/// segment (not a segment: its name does not parse as one).
const SPARE: &str = "millet.wal-spare";
/// A checkpointed segment being zeroed (becomes [`SPARE`] when done).
const ZEROING: &str = "millet.wal-zeroing";
/// A record larger than this is treated as corrupt on read (a length field
/// damaged into something huge must not make recovery allocate it).
const MAX_RECORD: usize = 1 << 30;

pub(crate) struct Wal {
    dir: PathBuf,
    /// The current segment.
    file: File,
    path: PathBuf,
    generation: u64,
    /// Bytes of valid log in the current segment (magic + whole records).
    len: u64,
    buf: Vec<u8>,
}

/// What [`Wal::open`] read back.
pub(crate) struct Replay {
    /// Every segment read, oldest first, with the groups to replay from it
    /// (none after a torn or corrupt record); each is deleted once its
    /// groups are in the engine.
    pub segments: Vec<(PathBuf, Vec<Vec<Op>>)>,
    /// Bytes dropped at the tail (torn or corrupt).
    pub dropped_bytes: u64,
}

impl Replay {
    pub fn groups(&self) -> usize {
        self.segments.iter().map(|(_, g)| g.len()).sum()
    }
}

impl Wal {
    /// Read back every segment in `dir` (see the module documentation),
    /// then start a new, empty segment. The old segments stay until
    /// [`Wal::remove_segments`] once their groups are in the engine.
    pub fn open(dir: &Path) -> Result<(Wal, Replay), StoreError> {
        let segments = segments(dir).map_err(|e| open_io(dir, e))?;
        let mut replay = Replay {
            segments: Vec::new(),
            dropped_bytes: 0,
        };
        let mut broken = false;
        let mut last_gen = 0;
        for (generation, path) in segments {
            last_gen = generation;
            let data = std::fs::read(&path).map_err(|e| open_io(&path, e))?;
            replay.segments.push((path.clone(), Vec::new()));
            let groups = &mut replay.segments.last_mut().map(|(_, g)| g);
            let Some(groups) = groups else { continue };
            if broken {
                replay.dropped_bytes += data.len() as u64;
                continue;
            }
            if data.len() < HEADER || &data[..HEADER] != MAGIC {
                if !data.is_empty() {
                    broken = true;
                    replay.dropped_bytes += data.len() as u64;
                }
                continue;
            }
            let mut pos = HEADER;
            while let Some((ops, next)) = read_record(&data, pos) {
                groups.push(ops);
                pos = next;
            }
            // A recycled segment: zeros after its last record.
            if data[pos..].iter().all(|b| *b == 0) {
                pos = data.len();
            }
            if pos < data.len() {
                broken = true;
                replay.dropped_bytes += (data.len() - pos) as u64;
            }
        }
        if replay.dropped_bytes > 0 {
            tracing::warn!(path = %dir.display(), dropped_bytes = replay.dropped_bytes,
                recovered_groups = replay.groups(),
                "store log ends with a torn or corrupt record; it and what follows are dropped");
        }
        let wal = Wal::create(dir, last_gen + 1).map_err(|e| open_io(dir, e))?;
        Ok((wal, replay))
    }

    fn create(dir: &Path, generation: u64) -> std::io::Result<Wal> {
        let path = segment_path(dir, generation);
        // A recycled segment if one is ready (zeroed and synced: only its
        // magic changes), else a new file.
        let recycled = std::fs::rename(dir.join(SPARE), &path).is_ok();
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(!recycled)
            .open(&path)?;
        file.write_all_at(MAGIC, 0)?;
        if recycled {
            file.sync_data()?;
        } else {
            file.sync_all()?;
        }
        // The name must be durable before any record in it is reported
        // durable.
        sync_dir(dir)?;
        Ok(Wal {
            dir: dir.to_path_buf(),
            file,
            path,
            generation,
            len: HEADER as u64,
            buf: Vec::new(),
        })
    }

    /// Start a new segment; returns the path of the one just closed (synced
    /// first, so that it can be replayed whatever happens next).
    pub fn rotate(&mut self) -> Result<PathBuf, StoreError> {
        self.sync()?;
        let next = Wal::create(&self.dir, self.generation + 1).map_err(|e| map_io(&e))?;
        let old = std::mem::replace(self, next);
        Ok(old.path)
    }

    /// Recycle (see the module documentation) or delete segments whose
    /// groups are durable in the engine: the first becomes the spare when
    /// there is none, the others are deleted. Renamed away (and the rename
    /// synced) before it is zeroed, so that a crash never leaves a
    /// half-zeroed file under a segment's name.
    pub fn retire_segments(dir: &Path, paths: &[PathBuf]) -> Result<(), StoreError> {
        let Some((first, rest)) = paths.split_first() else {
            return Ok(());
        };
        if dir.join(SPARE).exists() || !first.exists() {
            return Wal::remove_segments(dir, paths);
        }
        let zeroing = dir.join(ZEROING);
        std::fs::rename(first, &zeroing).map_err(|e| map_io(&e))?;
        Wal::remove_segments(dir, rest)?; // syncs the directory
        let zeroed = (|| -> std::io::Result<()> {
            let f = OpenOptions::new().write(true).open(&zeroing)?;
            let len = f.metadata()?.len();
            let zeros = vec![0u8; (64 << 10).min(len as usize)];
            let mut at = 0u64;
            while at < len {
                let n = zeros.len().min((len - at) as usize);
                f.write_all_at(&zeros[..n], at)?;
                at += n as u64;
            }
            f.sync_data()?;
            std::fs::rename(&zeroing, dir.join(SPARE))
        })();
        if let Err(e) = zeroed {
            let _ = std::fs::remove_file(&zeroing);
            return Err(map_io(&e));
        }
        Ok(())
    }

    /// Delete segments whose groups are durable in the engine.
    pub fn remove_segments(dir: &Path, paths: &[PathBuf]) -> Result<(), StoreError> {
        for p in paths {
            match std::fs::remove_file(p) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(map_io(&e)),
            }
        }
        sync_dir(dir).map_err(|e| map_io(&e))
    }

    /// Bytes in the current segment (header included).
    pub fn len(&self) -> u64 {
        self.len
    }

    /// Append one record holding `ops` (in order). Not synced. On error
    /// the log is cut back to where it was, so a failed append leaves no
    /// partial record behind.
    pub fn append(&mut self, ops: &[&Op]) -> Result<(), StoreError> {
        self.buf.clear();
        self.buf.extend_from_slice(&[0u8; 8]);
        let buf = std::mem::take(&mut self.buf);
        let mut buf = postcard::to_extend(ops, buf)
            .map_err(|e| StoreError::Io(format!("cannot encode a log record: {e}")))?;
        let payload_len = buf.len() - 8;
        let len = u32::try_from(payload_len)
            .ok()
            .filter(|n| (*n as usize) <= MAX_RECORD)
            .ok_or_else(|| {
                StoreError::Io(format!("log record of {payload_len} bytes is too large"))
            })?;
        let crc = crc32fast::hash(&buf[8..]);
        buf[..4].copy_from_slice(&len.to_le_bytes());
        buf[4..8].copy_from_slice(&crc.to_le_bytes());
        let r = self.file.write_all_at(&buf, self.len);
        let n = buf.len() as u64;
        self.buf = buf;
        match r {
            Ok(()) => {
                self.len += n;
                Ok(())
            }
            Err(e) => {
                let _ = self.file.set_len(self.len);
                Err(map_io(&e))
            }
        }
    }

    /// Make everything appended durable.
    pub fn sync(&mut self) -> Result<(), StoreError> {
        self.file.sync_data().map_err(|e| map_io(&e))
    }

    /// Cut the log back to `len` bytes (a record whose fsync failed).
    pub fn truncate(&mut self, len: u64) -> Result<(), StoreError> {
        self.file.set_len(len).map_err(|e| map_io(&e))?;
        self.len = len;
        Ok(())
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// The record at `pos`, and where the next one starts; `None` at the end or
/// at a torn or corrupt record.
fn read_record(data: &[u8], pos: usize) -> Option<(Vec<Op>, usize)> {
    let head = data.get(pos..pos.checked_add(8)?)?;
    let len = u32::from_le_bytes(head[..4].try_into().ok()?) as usize;
    let crc = u32::from_le_bytes(head[4..8].try_into().ok()?);
    if len > MAX_RECORD {
        return None;
    }
    let start = pos + 8;
    let payload = data.get(start..start.checked_add(len)?)?;
    if crc32fast::hash(payload) != crc {
        return None;
    }
    let ops: Vec<Op> = postcard::from_bytes(payload).ok()?;
    Some((ops, start + len))
}

/// Segment path for a generation.
fn segment_path(dir: &Path, generation: u64) -> PathBuf {
    dir.join(format!("{WAL_PREFIX}{generation:020}"))
}

/// The log segments in `dir`, oldest first.
fn segments(dir: &Path) -> std::io::Result<Vec<(u64, PathBuf)>> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir)? {
        let e = e?;
        let name = e.file_name();
        let Some(generation) = name
            .to_str()
            .and_then(|n| n.strip_prefix(WAL_PREFIX))
            .and_then(|g| g.parse::<u64>().ok())
        else {
            continue;
        };
        out.push((generation, e.path()));
    }
    out.sort_unstable();
    Ok(out)
}

/// Make a file creation or removal in `dir` durable.
fn sync_dir(dir: &Path) -> std::io::Result<()> {
    File::open(dir)?.sync_all()
}

fn open_io(path: &Path, e: std::io::Error) -> StoreError {
    StoreError::Open {
        path: path.to_path_buf(),
        source: std::sync::Arc::new(e),
    }
}

/// A file of zeros kept in the store directory (`millet.reserve`): when a
/// checkpoint or a replay finds the disk full, it is deleted to give the
/// engine room to take what the log holds, so that a store whose disk filled
/// up can always be checkpointed and reopened; it is recreated once there is
/// room again.
pub(crate) struct Reserve {
    path: PathBuf,
    bytes: u64,
}

/// Name of the reserve file.
pub const RESERVE_FILE: &str = "millet.reserve";

impl Reserve {
    pub fn new(dir: &Path, bytes: u64) -> Reserve {
        Reserve {
            path: dir.join(RESERVE_FILE),
            bytes,
        }
    }

    /// Create the file if it is missing (best effort: on a full disk it is
    /// simply not there).
    pub fn ensure(&self) {
        if self.bytes == 0 || self.path.metadata().is_ok_and(|m| m.len() == self.bytes) {
            return;
        }
        let zeros = vec![0u8; 64 << 10];
        let r = (|| -> std::io::Result<()> {
            let f = File::create(&self.path)?;
            let mut at = 0u64;
            while at < self.bytes {
                let n = zeros.len().min((self.bytes - at) as usize);
                f.write_all_at(&zeros[..n], at)?;
                at += n as u64;
            }
            f.sync_all()
        })();
        if r.is_err() {
            let _ = std::fs::remove_file(&self.path);
        }
    }

    /// Delete the file; true if there was one (room was made).
    pub fn release(&self) -> bool {
        let had = std::fs::remove_file(&self.path).is_ok();
        if had {
            tracing::warn!(path = %self.path.display(), bytes = self.bytes,
                "store: disk full; released the reserve so that the log can be checkpointed");
        }
        had
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn op(packet_id: u16) -> Op {
        Op::DeleteInflight {
            client_id: "s".into(),
            packet_id,
        }
    }

    fn append(wal: &mut Wal, ids: std::ops::Range<u16>) {
        for id in ids {
            wal.append(&[&op(id)]).unwrap();
        }
        wal.sync().unwrap();
    }

    #[test]
    fn checkpointed_segments_are_recycled_and_replay_stops_cleanly_at_their_zeros() {
        let dir = tempfile::tempdir().unwrap();
        let (mut wal, replay) = Wal::open(dir.path()).unwrap();
        assert_eq!(replay.groups(), 0);
        append(&mut wal, 0..500);
        let big = wal.len();
        let first = wal.rotate().unwrap();
        // Checkpointed: renamed aside, zeroed, kept as the spare.
        Wal::retire_segments(dir.path(), std::slice::from_ref(&first)).unwrap();
        assert!(!first.exists());
        let spare = std::fs::read(dir.path().join(SPARE)).unwrap();
        assert_eq!(spare.len() as u64, big);
        assert!(spare.iter().all(|b| *b == 0));
        append(&mut wal, 500..510); // the second segment is a new file
        let second = wal.rotate().unwrap();
        // The third is the recycled one: its blocks are already there.
        assert!(!dir.path().join(SPARE).exists());
        assert_eq!(std::fs::metadata(wal.path()).unwrap().len(), big);
        append(&mut wal, 510..513);
        let third = wal.path().to_path_buf();
        drop(wal); // a crash: nothing is closed
        let (wal, replay) = Wal::open(dir.path()).unwrap();
        assert_eq!(
            replay.dropped_bytes, 0,
            "zeros after the last record are not a tear"
        );
        let got: Vec<(PathBuf, usize)> = replay
            .segments
            .iter()
            .map(|(p, g)| (p.clone(), g.len()))
            .collect();
        assert_eq!(got, vec![(second, 10), (third.clone(), 3)]);
        drop(wal);

        // Damage after the last record of a recycled segment is a tear
        // (counted and logged), not a clean end.
        let f = OpenOptions::new().write(true).open(&third).unwrap();
        f.write_all_at(b"junk", big - 100).unwrap();
        drop(f);
        let (_wal, replay) = Wal::open(dir.path()).unwrap();
        assert!(replay.dropped_bytes > 0);
        let third_groups = replay.segments.iter().find(|(p, _)| *p == third);
        assert_eq!(third_groups.map(|(_, g)| g.len()), Some(3));
    }

    #[test]
    fn a_second_retired_segment_is_deleted_when_a_spare_exists() {
        let dir = tempfile::tempdir().unwrap();
        let (mut wal, _) = Wal::open(dir.path()).unwrap();
        append(&mut wal, 0..5);
        let a = wal.rotate().unwrap();
        append(&mut wal, 5..10);
        let b = wal.rotate().unwrap();
        Wal::retire_segments(dir.path(), &[a.clone(), b.clone()]).unwrap();
        assert!(!a.exists() && !b.exists());
        assert!(dir.path().join(SPARE).exists());
        append(&mut wal, 10..12);
        let c = wal.rotate().unwrap();
        Wal::retire_segments(dir.path(), std::slice::from_ref(&c)).unwrap();
        assert!(!c.exists(), "one spare is enough");
    }
}
