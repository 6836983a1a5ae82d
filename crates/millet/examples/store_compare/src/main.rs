//! Engine comparison for Millet's durable store: fjall vs redb.
//!
//! Workload (what the broker does under QoS 1 load with `sync` durability):
//! each message is one `msg/{id}` record (64-byte payload plus ~40 bytes of
//! topic and header) and one queue record `q/{session}/{seq}` pointing at it;
//! writes are grouped into batches of `BATCH` messages with one fsync per batch
//! (group commit). Then every queue entry is deleted again (the acks), in the
//! same batching. Finally recovery time is measured twice: after a clean close
//! and after a SIGKILL-like abort of a child process that was writing.
//!
//! Run: `cargo run --release --manifest-path crates/millet/examples/store_compare/Cargo.toml`
//! Optional args: `[messages] [batch]` (defaults 200000 and 100).

use std::path::{Path, PathBuf};
use std::time::Instant;

const PAYLOAD: [u8; 64] = [0x5a; 64];

fn msg_value() -> Vec<u8> {
    let mut v = Vec::with_capacity(110);
    v.extend_from_slice(b"\x01sensors/building-7/floor-3/temperature");
    v.extend_from_slice(&PAYLOAD);
    v
}

fn msg_key(id: u64) -> [u8; 8] {
    id.to_be_bytes()
}

fn queue_key(id: u64) -> [u8; 16] {
    let mut k = [0u8; 16];
    k[..8].copy_from_slice(&(id % 64).to_be_bytes());
    k[8..].copy_from_slice(&id.to_be_bytes());
    k
}

trait Engine {
    fn name() -> &'static str;
    fn open(dir: &Path) -> Self;
    /// Write `ids` (message + queue entry) in one batch and fsync.
    fn put_batch(&mut self, ids: std::ops::Range<u64>);
    /// Delete the queue entries and messages of `ids` in one batch and fsync.
    fn del_batch(&mut self, ids: std::ops::Range<u64>);
    /// Count all records (what recovery has to read).
    fn scan(&self) -> usize;
    fn disk_bytes(dir: &Path) -> u64 {
        dir_size(dir)
    }
}

fn dir_size(p: &Path) -> u64 {
    let mut total = 0;
    if let Ok(rd) = std::fs::read_dir(p) {
        for e in rd.flatten() {
            let Ok(md) = e.metadata() else { continue };
            if md.is_dir() {
                total += dir_size(&e.path());
            } else {
                total += md.len();
            }
        }
    }
    total
}

struct Fjall {
    db: fjall::Database,
    msgs: fjall::Keyspace,
    queue: fjall::Keyspace,
}

impl Engine for Fjall {
    fn name() -> &'static str {
        "fjall"
    }
    fn open(dir: &Path) -> Self {
        let db = fjall::Database::builder(dir).open().unwrap();
        let msgs = db
            .keyspace("msgs", fjall::KeyspaceCreateOptions::default)
            .unwrap();
        let queue = db
            .keyspace("queue", fjall::KeyspaceCreateOptions::default)
            .unwrap();
        Fjall { db, msgs, queue }
    }
    fn put_batch(&mut self, ids: std::ops::Range<u64>) {
        let mut b = self
            .db
            .batch()
            .durability(Some(fjall::PersistMode::SyncAll));
        let v = msg_value();
        for id in ids {
            b.insert(&self.msgs, msg_key(id), v.clone());
            b.insert(&self.queue, queue_key(id), msg_key(id));
        }
        b.commit().unwrap();
    }
    fn del_batch(&mut self, ids: std::ops::Range<u64>) {
        let mut b = self
            .db
            .batch()
            .durability(Some(fjall::PersistMode::SyncAll));
        for id in ids {
            b.remove(&self.queue, queue_key(id));
            b.remove(&self.msgs, msg_key(id));
        }
        b.commit().unwrap();
    }
    fn scan(&self) -> usize {
        self.msgs.iter().count() + self.queue.iter().count()
    }
}

struct Redb {
    db: redb::Database,
}

const R_MSGS: redb::TableDefinition<u64, &[u8]> = redb::TableDefinition::new("msgs");
const R_QUEUE: redb::TableDefinition<&[u8], u64> = redb::TableDefinition::new("queue");

impl Engine for Redb {
    fn name() -> &'static str {
        "redb"
    }
    fn open(dir: &Path) -> Self {
        std::fs::create_dir_all(dir).unwrap();
        let db = redb::Database::create(dir.join("store.redb")).unwrap();
        Redb { db }
    }
    fn put_batch(&mut self, ids: std::ops::Range<u64>) {
        let tx = self.db.begin_write().unwrap();
        {
            let mut m = tx.open_table(R_MSGS).unwrap();
            let mut q = tx.open_table(R_QUEUE).unwrap();
            let v = msg_value();
            for id in ids {
                m.insert(id, v.as_slice()).unwrap();
                q.insert(queue_key(id).as_slice(), id).unwrap();
            }
        }
        tx.commit().unwrap(); // Durability::Immediate is the default: fsync
    }
    fn del_batch(&mut self, ids: std::ops::Range<u64>) {
        let tx = self.db.begin_write().unwrap();
        {
            let mut m = tx.open_table(R_MSGS).unwrap();
            let mut q = tx.open_table(R_QUEUE).unwrap();
            for id in ids {
                q.remove(queue_key(id).as_slice()).unwrap();
                m.remove(id).unwrap();
            }
        }
        tx.commit().unwrap();
    }
    fn scan(&self) -> usize {
        use redb::{ReadableDatabase, ReadableTableMetadata};
        let tx = self.db.begin_read().unwrap();
        let m = tx.open_table(R_MSGS).map(|t| t.len().unwrap()).unwrap_or(0);
        let q = tx
            .open_table(R_QUEUE)
            .map(|t| t.len().unwrap())
            .unwrap_or(0);
        // len() is O(1) in redb; iterate to make it comparable with fjall.
        use redb::ReadableTable;
        let mt = tx.open_table(R_MSGS).unwrap();
        let n = mt.iter().unwrap().count();
        assert_eq!(n as u64, m);
        (m + q) as usize
    }
}

fn run<E: Engine>(base: &Path, n: u64, batch: u64) {
    let dir = base.join(E::name());
    let _ = std::fs::remove_dir_all(&dir);
    let mut e = E::open(&dir);
    let t = Instant::now();
    let mut id = 0;
    while id < n {
        let end = (id + batch).min(n);
        e.put_batch(id..end);
        id = end;
    }
    let put = t.elapsed();
    let size_full = E::disk_bytes(&dir);
    drop(e);
    // clean recovery with n live messages
    let t = Instant::now();
    let e = E::open(&dir);
    let open_full = t.elapsed();
    let t = Instant::now();
    let recs = e.scan();
    let scan_full = t.elapsed();
    let mut e = e;
    let t = Instant::now();
    let mut id = 0;
    while id < n {
        let end = (id + batch).min(n);
        e.del_batch(id..end);
        id = end;
    }
    let del = t.elapsed();
    drop(e);
    let size_after_del = E::disk_bytes(&dir);

    // unclean recovery: a child writes n/2 messages then aborts (no Drop).
    let _ = std::fs::remove_dir_all(&dir);
    let status = std::process::Command::new(std::env::current_exe().unwrap())
        .args([
            "child",
            E::name(),
            dir.to_str().unwrap(),
            &(n / 2).to_string(),
            &batch.to_string(),
        ])
        .status()
        .unwrap();
    assert!(!status.success(), "child should abort");
    let t = Instant::now();
    let e = E::open(&dir);
    let open_crash = t.elapsed();
    let t = Instant::now();
    let recs_crash = e.scan();
    let scan_crash = t.elapsed();
    println!(
        "{:6} put {n} msgs in batches of {batch}: {:.2?} = {:>7.0} msg/s ({:.0} fsync/s) | disk {:.1} MiB | \
         reopen {:.2?} + scan {recs} recs {:.2?} | delete all: {:.2?} = {:.0} msg/s, disk after {:.1} MiB | \
         after abort: reopen {:.2?} + scan {recs_crash} recs {:.2?}",
        E::name(),
        put,
        n as f64 / put.as_secs_f64(),
        (n / batch) as f64 / put.as_secs_f64(),
        size_full as f64 / 1048576.0,
        open_full,
        scan_full,
        del,
        n as f64 / del.as_secs_f64(),
        size_after_del as f64 / 1048576.0,
        open_crash,
        scan_crash,
    );
}

fn child<E: Engine>(dir: &Path, n: u64, batch: u64) {
    let mut e = E::open(dir);
    let mut id = 0;
    while id < n {
        let end = (id + batch).min(n);
        e.put_batch(id..end);
        id = end;
    }
    std::process::abort();
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.get(1).map(String::as_str) == Some("child") {
        let dir = PathBuf::from(&args[3]);
        let n: u64 = args[4].parse().unwrap();
        let batch: u64 = args[5].parse().unwrap();
        match args[2].as_str() {
            "fjall" => child::<Fjall>(&dir, n, batch),
            _ => child::<Redb>(&dir, n, batch),
        }
        return;
    }
    let n: u64 = args.get(1).and_then(|s| s.parse().ok()).unwrap_or(200_000);
    let batch: u64 = args.get(2).and_then(|s| s.parse().ok()).unwrap_or(100);
    let base = std::env::var_os("STORE_COMPARE_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| std::env::temp_dir().join("millet-store-compare"));
    run::<Fjall>(&base, n, batch);
    run::<Redb>(&base, n, batch);
    let _ = std::fs::remove_dir_all(&base);
}
