//! The custody writer: one background worker that owns the chain head, takes records from
//! the shared queue in order, hashes them and appends them in batches in its own
//! transactions. It is the only process that inserts into `custody.audit_log`.
//!
//! Crash safety: records leave the queue only after the batch that stored them committed
//! (with synchronous_commit = on). If the writer dies, its successor re-reads the chain head
//! from the table and the same queued bytes, so nothing is lost or written twice.

use std::time::Duration;

use pgrx::bgworkers::{BackgroundWorker, BackgroundWorkerBuilder, SignalWakeFlags};
use pgrx::prelude::*;
use pgrx::datum::DatumWithOid;
use pgrx::pg_sys;

use custody_chain::export::CheckpointLine;
use custody_chain::{checkpoint_origin, genesis_hash, parse_private_key, ChainId, Hash, Json, MerkleBuilder, PrivateKey, Record};

use crate::capture::class::Class;
use crate::capture::wire::{Captured, Outcome};
use crate::capture::{now_unix_us, PG_EPOCH_OFFSET_US};
use crate::queue::{ChainState, Consumer};
use crate::protect::{sql_name, Table};
use crate::{own, settings};

mod archive;
pub mod head;
mod rows;
mod spool;
pub mod standby;
mod start;

/// Records per batch (one transaction).
const BATCH_RECORDS: usize = 2000;
const BATCH_BYTES: usize = 8 * 1024 * 1024;
/// Group commit: a batch smaller than this waits up to GATHER_DELAY for more records, unless
/// a session is waiting for its records or GATHER_BYTES more arrive.
const GATHER_RECORDS: usize = 500;
const GATHER_BYTES: u64 = 256 * 1024;
const GATHER_DELAY: Duration = Duration::from_millis(10);

pub fn init() {
    BackgroundWorkerBuilder::new("pg_custody writer")
        .set_type("pg_custody writer")
        .set_function("custody_writer_main")
        .set_library("pg_custody")
        .enable_spi_access()
        .set_start_time(pgrx::bgworkers::BgWorkerStartTime::RecoveryFinished)
        .set_restart_time(Some(Duration::from_secs(1)))
        .load();
    standby::init();
}

pub struct Chain {
    seq: i64,
    hash: Hash,
    /// RFC 6962 Merkle tree over every record hash, 1..=seq (O(log n) state).
    merkle: MerkleBuilder,
    /// seq of the last checkpoint (0: none).
    checkpointed: i64,
    /// The table the chain was read from.
    log: pg_sys::Oid,
    /// The chain generation of shared memory it was opened in (`crate::queue::writer_committed`).
    generation: u64,
    /// Memory one batch leaves for the next (boxed: Chain moves by value).
    pool: Box<Pool>,
}

/// The records of the last batch, decoded and as hashed, kept for the next one to decode
/// and build into: their strings' memory is reused instead of allocated and freed for every
/// field of every record (a dozen allocations per record were ≈ 9 % of the writer's time).
#[derive(Default)]
struct Pool {
    decoded: Vec<Captured>,
    records: Vec<Record>,
    encoding: Vec<u8>,
}

/// What the pool may keep in its records' strings after a batch; past it the pool starts
/// over (a batch of large statements does not leave that memory held for ever).
const POOL_KEEP_BYTES: usize = 16 * 1024 * 1024;

impl Pool {
    /// Empties the pool if its records hold more than POOL_KEEP_BYTES.
    fn trim(&mut self) {
        let opt = |s: &Option<String>| s.as_ref().map_or(0, String::capacity);
        let decoded: usize = self
            .decoded
            .iter()
            .map(|c| c.objects.capacity() + opt(&c.statement) + opt(&c.message) + opt(&c.decision))
            .sum();
        let records: usize = self.records.iter().map(|r| opt(&r.statement) + opt(&r.message)).sum();
        if decoded + records > POOL_KEEP_BYTES {
            *self = Pool::default();
        }
    }
}

/// The signing key, loaded from custody.signing_key_file at start and on reload.
struct Signer {
    key: Option<PrivateKey>,
    origin: String,
}

impl Signer {
    fn load(queue: &Consumer) -> Signer {
        // SAFETY: plain reads of the control file's system identifier and this database's OID.
        let origin = unsafe {
            checkpoint_origin(pg_sys::GetSystemIdentifier(), u32::from(pg_sys::MyDatabaseId))
        };
        let key = match settings::signing_key_file() {
            None => {
                queue.set_text(crate::queue::Text::Key, "none: custody.signing_key_file is not set; checkpoints are not written");
                None
            }
            Some(path) => match std::fs::read_to_string(&path)
                .map_err(|e| e.to_string())
                .and_then(|t| parse_private_key(t.trim()).map_err(|e| e.to_string()))
            {
                Ok(k) => {
                    let id = custody_chain::hex::encode(&k.key_id());
                    queue.set_text(crate::queue::Text::Key, &format!("loaded: key {} ({id}) from {path}", k.name()));
                    log!("pg_custody writer: signing checkpoints with key {} ({id})", k.name());
                    Some(k)
                }
                Err(e) => {
                    let msg = format!("error: cannot use custody.signing_key_file \"{path}\": {e}; the chain is written unsigned");
                    warning!("pg_custody writer: {msg}");
                    queue.set_text(crate::queue::Text::Key, &msg);
                    None
                }
            },
        };
        Signer { key, origin }
    }
}

#[pg_guard]
#[unsafe(no_mangle)]
pub extern "C-unwind" fn custody_writer_main(_arg: pg_sys::Datum) {
    BackgroundWorker::attach_signal_handlers(SignalWakeFlags::SIGHUP | SignalWakeFlags::SIGTERM);
    // Everything this process runs is pg_custody's own: never recorded, never gated.
    own::set_writer();
    keep_freed_memory();
    run();
    // Exit code 1: the postmaster starts a new writer after restart_time, whatever ended this
    // one (pg_terminate_backend included); at server shutdown it starts none. An ERROR ends
    // the process the same way.
    // SAFETY: the documented way for a background worker to end.
    unsafe { pg_sys::proc_exit(1) };
}

/// Settings pinned for the writer's whole life, whatever postgresql.conf, ALTER DATABASE or
/// ALTER ROLE set for its database and role: nothing user-defined is resolved in its SQL, and
/// no timeout or read-only default can make its writes fail.
const PINNED: [(&std::ffi::CStr, &std::ffi::CStr); 8] = [
    (c"search_path", c"pg_catalog, pg_temp"),
    // Its commits do not wait for their WAL flush: a session that waits for its records at
    // COMMIT (durability = commit) writes its own commit record after the writer's and
    // flushes WAL up to it, which stores both with one flush instead of two in a row. Other
    // records are flushed by the WAL writer within three times wal_writer_delay
    // (docs/audit-trail.md, section 4).
    (c"synchronous_commit", c"off"),
    (c"default_transaction_read_only", c"off"),
    (c"default_transaction_isolation", c"read committed"),
    (c"statement_timeout", c"0"),
    (c"lock_timeout", c"0"),
    (c"idle_in_transaction_session_timeout", c"0"),
    (c"session_replication_role", c"origin"),
];

fn run() {
    BackgroundWorker::connect_worker_to_spi(Some(settings::database()), None);
    for (name, value) in PINNED {
        // SAFETY: setting GUCs for this process only, above every other source.
        unsafe {
            pg_sys::SetConfigOption(name.as_ptr(), value.as_ptr(), pg_sys::GucContext::PGC_SUSET, pg_sys::GucSource::PGC_S_OVERRIDE)
        };
    }
    // A standby promoted just now: its standby worker may still be shipping; the queue and
    // the spool are this writer's once it has ended (or after 30 s, if it hangs).
    for _ in 0..300 {
        match crate::queue::shipping_pid() {
            // SAFETY: kill with signal 0 only checks that the process exists.
            Some(pid) if unsafe { libc_kill(pid, 0) } == 0 => {
                if !BackgroundWorker::wait_latch(Some(Duration::from_millis(100))) {
                    return;
                }
            }
            _ => break,
        }
    }
    let Some(queue) = Consumer::attach() else { return };
    let mut chain: Option<Chain> = None;
    let mut batch = crate::queue::Records::default();
    let mut last_settings = settings::generation();
    let mut signer = Signer::load(&queue);
    let mut last_checkpoint = std::time::Instant::now();
    let mut durable = head::Durable::new();
    let mut archiver = archive::Archiver::new();
    let mut refusing_since: Option<std::time::Instant> = None;
    let (mut gathered, mut stopping) = (false, false);
    // Whether the policy store is published. Backends wait for it before they gate (fail
    // closed), so it goes first, before the chain is opened (which reads the log's head and
    // can take long).
    let mut policies_published = false;

    loop {
        if !policies_published {
            policies_published = publish_policies();
        }
        if chain.is_none() {
            let mark = queue.mark();
            let opening = std::time::Instant::now();
            match BackgroundWorker::transaction(std::panic::AssertUnwindSafe(|| start::open(&queue))) {
                start::Start::Ready(mut c, first, on_disk, read) => {
                    queue.set_started(read, opening.elapsed());
                    if refusing_since.take().is_some() {
                        queue.set_text(crate::queue::Text::Alarm, "");
                    }
                    queue.set_state(ChainState::Ready);
                    queue.set_last_checkpoint(c.checkpointed);
                    log!("pg_custody writer: appending to custody.audit_log after seq {}", c.seq);
                    // The file says a writer runs (not a clean stop) from now on, naming a head
                    // that is on disk already; the first records follow like any others.
                    durable.start(c.generation, on_disk.0, on_disk.1);
                    let handed_over = first.iter().any(|r| r.command == custody_chain::CHAIN_HANDOVER);
                    let says_dropped = handed_over || first.iter().any(|r| r.command == start::CHAIN_DROPPED);
                    append(&mut c, first);
                    committed(&c, &queue, &mut durable);
                    if says_dropped {
                        // The chain says where the dropped one ended: the tombstone can go.
                        head::clear_dropped();
                    }
                    // A promoted standby: what it could not ship to its primary is stored here.
                    store_spool(&mut c, &queue, &mut durable);
                    if handed_over {
                        // A signed checkpoint of the hand-over leaves the server at once.
                        checkpoint(&mut c, &signer, &queue, &mut archiver);
                        last_checkpoint = std::time::Instant::now();
                    }
                    // Policies, attributes and suspensions in force for every backend, read
                    // again now that the extension is known to be there (it may have been
                    // dropped and created again meanwhile).
                    policies_published = publish_policies();
                    chain = Some(c);
                }
                start::Start::Absent => queue.absent(mark),
                start::Start::Refusing(why) => {
                    // Records stay queued (sessions block or mark gaps, custody.on_failure)
                    // until the table is restored; say why now and then.
                    if refusing_since.is_none_or(|t| t.elapsed() >= Duration::from_secs(60)) {
                        warning!("pg_custody writer: not appending: {why}");
                        refusing_since = Some(std::time::Instant::now());
                    }
                    queue.set_text(crate::queue::Text::Alarm, &format!("refusing: {why}"));
                    queue.set_state(ChainState::Refusing);
                }
            }
        }

        if BackgroundWorker::sighup_received() {
            // SAFETY: re-reading postgresql.conf in this process, as every worker does.
            unsafe { pg_sys::ProcessConfigFile(pg_sys::GucContext::PGC_SIGHUP) };
            signer = Signer::load(&queue);
        }

        let Some(c) = chain.as_mut() else {
            // Not created yet, or refusing: look again soon (CREATE EXTENSION pg_custody).
            // Statements are not recorded until then, so keep the window short; the check is
            // one lookup.
            let wait = if queue_state_refusing(&queue) { 1000 } else { 100 };
            if !BackgroundWorker::wait_latch(Some(Duration::from_millis(wait))) {
                return;
            }
            continue;
        };

        // Settings changed by a reload: recorded by the writer for the cluster.
        let generation = settings::generation();
        if generation != last_settings {
            last_settings = generation;
            let values: serde_json::Map<String, serde_json::Value> = settings::snapshot()
                .into_iter()
                .map(|(k, v)| (k, serde_json::Value::String(v)))
                .collect();
            let objects = serde_json::json!([{ "kind": "settings", "name": "custody", "settings": values }]);
            append(c, vec![system_record("SETTINGS RELOADED", Some(objects))]);
            committed(c, &queue, &mut durable);
        }

        record_gap(c, &queue, &mut durable);

        if c.seq > c.checkpointed && last_checkpoint.elapsed() >= settings::checkpoint_interval() {
            checkpoint(c, &signer, &queue, &mut archiver);
            last_checkpoint = std::time::Instant::now();
        }
        archiver.poll(&queue);
        durable.sync(false, false);

        batch.clear();
        let end = queue.peek(BATCH_RECORDS, BATCH_BYTES, &mut batch);
        if !batch.is_empty() {
            // Group commit: when few records are queued and no session waits for them, let
            // more arrive before paying for a transaction. A session that starts waiting, or
            // GATHER_BYTES more records, end the wait early.
            if !gathered && !stopping && batch.len() < GATHER_RECORDS && !queue.has_waiters() {
                gathered = true;
                queue.set_wake_at(end + GATHER_BYTES);
                if !BackgroundWorker::wait_latch(Some(GATHER_DELAY)) {
                    stopping = true;
                }
                continue;
            }
            gathered = false;
            append_from_queue(c, &batch);
            queue.advance(end);
            committed(c, &queue, &mut durable);
            continue;
        }

        // Idle: the next push wakes the writer (checked again after saying so, in case one
        // came in between).
        queue.set_wake_at(0);
        if !stopping && queue.pending() {
            continue;
        }
        let stop = stopping
            || !BackgroundWorker::wait_latch(Some(Duration::from_millis(
                settings::checkpoint_interval().as_millis().min(1000) as u64,
            )));
        if stop {
            // Stopping (server shutdown or pg_terminate_backend): drain what is queued, then
            // say so in the chain; the next writer, if any, says it started. A session that
            // has reserved room but not written its record yet (microseconds) is waited for,
            // so that records published after it are drained too.
            queue.wait_published(queue.reserved(), Duration::from_millis(500));
            batch.clear();
            let end = queue.peek(usize::MAX, usize::MAX, &mut batch);
            append_from_queue(c, &batch);
            append(c, vec![system_record(
                "WRITER STOP",
                Some(serde_json::json!([{ "kind": "writer", "name": "stop", "reason": "SIGTERM (server shutdown or pg_terminate_backend)" }])),
            )]);
            queue.advance(end);
            committed(c, &queue, &mut durable);
            record_gap(c, &queue, &mut durable);
            checkpoint(c, &signer, &queue, &mut archiver);
            // What the head file names must be on disk.
            crate::queue::flush_stored();
            durable.sync(true, true);
            archiver.finish(&queue, Duration::from_secs(5));
            return;
        }
    }
}

/// Publishes the policy store for every backend; false when it must be tried again (no
/// store yet, or a change holds its lock and publishes at its own commit).
fn publish_policies() -> bool {
    match BackgroundWorker::transaction(crate::policy::store::publish_from_writer) {
        crate::policy::store::Published::Done(fits) => {
            if !fits {
                // Nothing is published: statements are denied (fail closed) until a change
                // makes the store fit and publishes it at its commit.
                warning!("pg_custody writer: the policy store does not fit in shared memory; gated statements are denied until it does");
            }
            true
        }
        crate::policy::store::Published::NotNow => false,
    }
}

unsafe extern "C" {
    #[link_name = "kill"]
    fn libc_kill(pid: i32, sig: i32) -> i32;
}

/// Every batch allocates about as much as the last (its transaction's memory, the records'
/// Rust values) and frees it at its commit. With glibc's defaults the freed memory goes back
/// to the kernel (large blocks are unmapped, the heap's top is trimmed), and the next batch
/// takes it again page by page, each page faulted in and zeroed by the kernel: ≈ 4 % of the
/// writer's CPU on pgbench select-only (docs/benchmarks.md). This process keeps what it
/// freed instead, up to its peak use (which BATCH_RECORDS and BATCH_BYTES bound), and reuses
/// it. Elsewhere than glibc, nothing changes.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn keep_freed_memory() {
    const M_TRIM_THRESHOLD: i32 = -1;
    const M_MMAP_THRESHOLD: i32 = -3;
    unsafe extern "C" {
        fn mallopt(param: i32, value: i32) -> i32;
    }
    // SAFETY: mallopt only changes this process's allocator thresholds; called before the
    // writer allocates for its batches, from its only thread. 32 MB is the largest mmap
    // threshold glibc takes on 64-bit (larger requests are still mapped, and unmapped when
    // freed); the trim threshold keeps up to 256 MB of free heap top.
    unsafe {
        mallopt(M_MMAP_THRESHOLD, 32 * 1024 * 1024);
        mallopt(M_TRIM_THRESHOLD, 256 * 1024 * 1024);
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn keep_freed_memory() {}

/// Records a standby kept in its spool (src/writer/spool.rs) and never shipped: the server
/// was promoted since, and they are stored in this chain after a record that says so. Only
/// a spool this server kept while it was a standby in this run, and of this cluster: a file
/// found otherwise is left where it is, with a warning.
fn store_spool(c: &mut Chain, queue: &Consumer, durable: &mut head::Durable) {
    if !spool::pending() {
        return;
    }
    if !crate::queue::was_standby() {
        warning!("pg_custody writer: ignoring a standby spool this server did not keep while it was a standby in this run");
        return;
    }
    if let Err(e) = spool::recover() {
        warning!("pg_custody writer: the standby spool: {e}");
        return;
    }
    while spool::pending() {
        let (batch, pos) = match spool::next(BATCH_BYTES) {
            Ok(b) => b,
            Err(e) => {
                warning!("pg_custody writer: cannot read the standby spool: {e}");
                return;
            }
        };
        if batch.is_empty() {
            // Only a record cut short by a crash while it was kept is left.
            let _ = spool::shipped_to(u64::MAX);
            return;
        }
        append(c, vec![system_record(
            "STANDBY RECORDS",
            Some(serde_json::json!([{ "kind": "standby", "name": "spool", "count": batch.len(), "lost": 0 }])),
        )]);
        append_from_queue(c, &batch);
        committed(c, queue, durable);
        crate::queue::flush_stored();
        if let Err(e) = spool::shipped_to(pos) {
            warning!("pg_custody writer: cannot note what it stored from the standby spool: {e}");
            return;
        }
    }
}

fn queue_state_refusing(_queue: &Consumer) -> bool {
    crate::queue::state() == ChainState::Refusing
}

/// After a batch committed: the head for the file (shared memory has it already).
fn committed(c: &Chain, _queue: &Consumer, durable: &mut head::Durable) {
    durable.committed(head::Head { seq: c.seq, hash: c.hash }, &c.merkle);
}

/// Records that sessions could not queue — while this writer ran or before it started (the
/// count of those recorded survives writer restarts): a gap marker, never silence.
fn record_gap(c: &mut Chain, queue: &Consumer, durable: &mut head::Durable) {
    let lost = queue.lost();
    let recorded = queue.lost_recorded();
    if lost > recorded {
        let objects = serde_json::json!([{ "kind": "gap", "name": "lost records", "count": lost - recorded }]);
        append(c, vec![system_record("GAP", Some(objects))]);
        queue.set_lost_recorded(lost);
        committed(c, queue, durable);
    }
}

/// A record the writer cannot read (a bug, not user input): kept as a visible gap.
fn undecodable() -> Captured {
    let mut r = system_record("GAP", Some(serde_json::json!([{ "kind": "gap", "name": "undecodable record", "count": 1 }])));
    r.outcome = Outcome::Error;
    r
}

pub(crate) fn system_record(command: &str, objects: Option<serde_json::Value>) -> Captured {
    Captured {
        event_time: now_unix_us(),
        database_name: settings::database().to_string(),
        session_user_name: "pg_custody".into(),
        current_user_name: "pg_custody".into(),
        // SAFETY: reading this process's pid.
        backend_pid: unsafe { pg_sys::MyProcPid },
        class: Class::System as u8,
        command: command.into(),
        objects: objects.map_or_else(|| "[]".into(), |v| v.to_string()),
        ..Default::default()
    }
}

/// Signs and stores a checkpoint of the chain as it stands (when a key is loaded and
/// there is something new to cover).
fn checkpoint(chain: &mut Chain, signer: &Signer, queue: &Consumer, archiver: &mut archive::Archiver) {
    let Some(key) = &signer.key else { return };
    if chain.seq <= chain.checkpointed {
        return;
    }
    let now = now_unix_us();
    let line = match CheckpointLine::sign(&signer.origin, chain.seq, chain.hash, chain.merkle.root(), key, now) {
        Ok(l) => l,
        Err(e) => {
            warning!("pg_custody writer: could not sign a checkpoint: {e}");
            return;
        }
    };
    let verifier = key.verifier().to_text();
    BackgroundWorker::transaction(std::panic::AssertUnwindSafe(|| {
        let (checkpoints, keys) = (sql_name(Table::Checkpoints), sql_name(Table::PublicKeys));
        let insert_checkpoint = std::ffi::CString::new(format!(
            "INSERT INTO {checkpoints} (seq, hash, merkle_root, key_id, signature, signed_at, note) \
             VALUES ($1, $2, $3, $4, $5, $6, $7)"
        ))
        .expect("no NUL");
        let insert_key = std::ffi::CString::new(format!(
            "INSERT INTO {keys} (key_id, public_key, first_used, last_used) VALUES ($1, $2, $3, $3) \
             ON CONFLICT (key_id) DO UPDATE SET last_used = excluded.last_used"
        ))
        .expect("no NUL");
        Spi::connect_mut(|client| {
            // SAFETY: a timestamptz is an int8 passed by value: any i64 is a valid datum of it.
            let ts = |us: i64| unsafe { DatumWithOid::new(us - PG_EPOCH_OFFSET_US, pg_sys::TIMESTAMPTZOID) };
            client
                .update(
                    &*insert_checkpoint,
                    None,
                    &[
                        line.seq.into(),
                        line.hash.to_vec().into(),
                        line.merkle_root.to_vec().into(),
                        line.key_id.as_str().into(),
                        line.signature.as_str().into(),
                        ts(now),
                        line.note.as_str().into(),
                    ],
                )
                .expect("insert checkpoint");
            client
                .update(
                    &*insert_key,
                    None,
                    &[line.key_id.as_str().into(), verifier.as_str().into(), ts(now)],
                )
                .expect("record public key");
        })
    }));
    // The writer commits asynchronously; a checkpoint is what auditors copy out, so it is on
    // disk before anyone can read it as the latest (and the records it covers with it).
    // SAFETY: set by the commit of the checkpoint's transaction just above.
    remember_committed(chain);
    crate::queue::flush_stored();
    chain.checkpointed = chain.seq;
    queue.set_last_checkpoint(chain.seq);
    // ... and a copy leaves the database right away.
    let digest = custody_chain::Digest {
        seq: line.seq,
        hash: line.hash,
        merkle_root: line.merkle_root,
        signed_note: Some(line.note.clone()),
    };
    archiver.checkpoint(line.seq, &digest.to_json(), queue);
}

/// The prev_hash of record 1: binds the chain to this cluster and database.
pub fn genesis() -> Hash {
    // SAFETY: plain reads of the control file's system identifier and this database's OID.
    unsafe { genesis_hash(pg_sys::GetSystemIdentifier(), u32::from(pg_sys::MyDatabaseId)) }
}

/// This cluster and database: the chain a writer here starts, or continues after a hand-over.
pub fn this_chain() -> ChainId {
    // SAFETY: plain reads of the control file's system identifier and this database's OID.
    unsafe { ChainId::of(pg_sys::GetSystemIdentifier(), u32::from(pg_sys::MyDatabaseId)) }
}

/// The chain the log in this database is, by what its records say (docs/chain-format.md,
/// "Hand-over"): the last hand-over's new chain, else the chain its writers name, else the
/// chain record 1 starts. None: the log is empty. Inside a transaction; the caller pins
/// search_path (the writer always does; SQL functions through `own::pinned`).
pub fn log_chain() -> Option<ChainId> {
    let claims = std::ffi::CString::new(format!(
        "SELECT command, objects::pg_catalog.text FROM {} WHERE class OPERATOR(pg_catalog.=) 'system' \
           AND (command OPERATOR(pg_catalog.=) '{}' OR command OPERATOR(pg_catalog.=) '{}') ORDER BY seq DESC",
        sql_name(Table::AuditLog),
        custody_chain::WRITER_START,
        custody_chain::CHAIN_HANDOVER,
    ))
    .expect("no NUL");
    let first = std::ffi::CString::new(format!(
        "SELECT prev_hash FROM {} ORDER BY seq LIMIT 1",
        sql_name(Table::AuditLog)
    ))
    .expect("no NUL");
    Spi::connect(|client| {
        let mut cursor = crate::own::cursor(client, &claims, &[]);
        loop {
            let table = cursor.fetch(1000).ok()?;
            if table.is_empty() {
                break;
            }
            for row in table {
                let rec = Record {
                    class: "system".into(),
                    command: row.get::<String>(1).ok().flatten().unwrap_or_default(),
                    objects: row
                        .get::<String>(2)
                        .ok()
                        .flatten()
                        .and_then(|t| serde_json::from_str(&t).ok())
                        .unwrap_or(serde_json::Value::Null),
                    ..Default::default()
                };
                match custody_chain::lineage_of(&rec) {
                    Some(custody_chain::Lineage::Writer(id)) => return Some(id),
                    Some(custody_chain::Lineage::Handover { to, .. }) => return Some(to),
                    _ => {}
                }
            }
        }
        drop(cursor);
        let genesis: Hash = crate::own::select(client, &first, &[])
            .ok()?
            .first()
            .get_one::<Vec<u8>>()
            .ok()
            .flatten()?
            .try_into()
            .ok()?;
        Some(ChainId { genesis, origin: None })
    })
}

/// Hashes and inserts `records` after the head in one transaction; advances the head only
/// after the commit. An ERROR here ends the worker (restarted in 1 s, resuming from the
/// table): the writer's own records cannot be left out.
fn append(chain: &mut Chain, mut records: Vec<Captured>) {
    if let Err(e) = try_append(chain, &mut records) {
        error!("pg_custody writer: could not store its records: {e}");
    }
}

/// Records from the queue: stored together, or — when that fails — one by one, each record
/// that cannot be stored (one that some index of the log refuses, say) replaced by an
/// `UNSTORABLE RECORD` marker that says what it was. One bad record never stops recording.
fn append_from_queue(chain: &mut Chain, batch: &crate::queue::Records) {
    let mut decoded = std::mem::take(&mut chain.pool.decoded);
    decoded.truncate(BATCH_RECORDS);
    for (i, b) in batch.iter().enumerate() {
        if i == decoded.len() {
            decoded.push(Captured::default());
        }
        if decoded[i].decode_into(b).is_err() {
            decoded[i] = undecodable();
        }
    }
    let stored = try_append(chain, &mut decoded[..batch.len()]);
    chain.pool.decoded = decoded;
    chain.pool.trim();
    let Err(e) = stored else { return };
    // A table pg_custody does not write to (changed while unloaded) is not a bad record:
    // end, and let the next writer refuse with the reason.
    // SAFETY: inside a transaction; the relation is opened and closed there.
    if let Some(what) = BackgroundWorker::transaction(crate::scan::log_defect) {
        error!("pg_custody writer: {what}");
    }
    warning!("pg_custody writer: a batch of {} records could not be stored ({e}); storing them one at a time", batch.len());
    let decode = |b: &[u8]| Captured::decode(b).unwrap_or_else(|_| undecodable());
    for b in batch.iter() {
        let c = decode(b);
        let marker = unstorable(&c, b);
        if let Err(e) = try_append(chain, &mut [c]) {
            warning!("pg_custody writer: a record could not be stored ({e}); an UNSTORABLE RECORD marker takes its seq");
            let mut m = marker;
            m.message = Some(format!("the record could not be stored: {e}"));
            append(chain, vec![m]);
        }
    }
}

/// The marker that takes the seq of a record the table refuses: who, what and when it was,
/// and the SHA-256 of its queued bytes.
fn unstorable(c: &Captured, bytes: &[u8]) -> Captured {
    use sha2::Digest as _;
    let sha = custody_chain::hex::encode(&sha2::Sha256::digest(bytes));
    let objects = serde_json::json!([{
        "kind": "record",
        "name": "unstorable",
        "class": c.class().name(),
        "command": c.command,
        "session_user_name": c.session_user_name,
        "backend_pid": c.backend_pid,
        "event_time": c.event_time,
        "sha256": sha,
    }]);
    let mut r = system_record("UNSTORABLE RECORD", Some(objects));
    r.outcome = Outcome::Error;
    r
}

/// Runs `f` in a transaction of its own; an ERROR rolls it back and comes back as Err.
fn try_transaction<R>(f: impl FnOnce() -> R) -> Result<R, String> {
    // SAFETY: the transaction-control calls BackgroundWorker::transaction makes; after a
    // caught ERROR (pgrx has flushed PostgreSQL's error state) the transaction is aborted.
    unsafe {
        pg_sys::SetCurrentStatementStartTimestamp();
        pg_sys::StartTransactionCommand();
        pg_sys::PushActiveSnapshot(pg_sys::GetTransactionSnapshot());
    }
    let body = std::panic::AssertUnwindSafe(|| Ok(f()));
    let result = pgrx::PgTryBuilder::new(body)
        .catch_others(|e| {
            Err(match e {
                pgrx::pg_sys::panic::CaughtError::PostgresError(r) | pgrx::pg_sys::panic::CaughtError::ErrorReport(r) => {
                    r.message().to_string()
                }
                pgrx::pg_sys::panic::CaughtError::RustPanic { ereport, .. } => ereport.message().to_string(),
            })
        })
        .execute();
    // SAFETY: the transaction started above is still current: on success its snapshot is
    // popped and it commits; after a caught ERROR (pgrx has flushed PostgreSQL's error state)
    // AbortCurrentTransaction rolls it back and releases the snapshot with it.
    unsafe {
        match &result {
            Ok(_) => {
                pg_sys::PopActiveSnapshot();
                pg_sys::CommitTransactionCommand();
            }
            Err(_) => pg_sys::AbortCurrentTransaction(),
        }
    }
    result
}

/// Hashes `records` after the head and inserts them in one transaction; advances the head
/// only after the commit. Err (and nothing stored, the head unchanged) if the insert failed.
/// The records' strings are left with what the pool had (`fill_record`).
fn try_append(chain: &mut Chain, records: &mut [Captured]) -> Result<(), String> {
    let logged_at = now_unix_us();
    let (mut seq, mut prev) = (chain.seq, chain.hash);
    let mut built = std::mem::take(&mut chain.pool.records);
    built.truncate(BATCH_RECORDS.max(records.len()));
    built.resize_with(built.len().max(records.len()), Record::default);
    let buf = &mut chain.pool.encoding;
    let mut rows = Vec::with_capacity(records.len());
    let json = rows::JsonCache::get();
    for (c, rec) in records.iter_mut().zip(built.iter_mut()) {
        seq += 1;
        fill_record(rec, seq, logged_at, c);
        // The JSON values are parsed and written in canonical form once per distinct text;
        // the record is hashed with that text, and the row stores the jsonb built from the
        // same value. Text that is not JSON (a bug, not user input) is stored as [] and NULL.
        let objects = json.key(&c.objects).unwrap_or_else(|| json.key("[]").expect("[] is JSON"));
        let decision = c.decision.as_deref().and_then(|t| json.key(t));
        let hash = rec.chain_hash_parts(
            &prev,
            buf,
            Json::Canonical(json.canonical(objects)),
            decision.map(|k| Json::Canonical(json.canonical(k))),
        );
        rows.push(rows::Row { rec, prev, hash, objects, decision });
        prev = hash;
    }
    let log = chain.log;
    let stored = try_transaction(|| {
        // The log this chain was read from: one dropped and created again meanwhile (in one
        // transaction, say) is another table, and is opened afresh by the next writer.
        let now = crate::protect::ids().map(|i| i.table(Table::AuditLog)).unwrap_or(pg_sys::InvalidOid);
        if now != log {
            error!("pg_custody writer: custody.audit_log is not the table this chain was read from any more; starting again");
        }
        // SAFETY: inside the transaction try_transaction starts; the writer is the only
        // inserter.
        unsafe { rows::insert(&rows, json) }
    });
    if stored.is_ok() {
        for r in &rows {
            chain.merkle.push(&r.hash);
        }
    }
    drop(rows);
    chain.pool.records = built;
    stored?;
    chain.seq = seq;
    chain.hash = prev;
    remember_committed(chain);
    Ok(())
}

/// Right after a commit of the writer: shared memory remembers the head (unless the chain
/// was dropped meanwhile: then the tombstone names it).
fn remember_committed(chain: &Chain) {
    let head = head::Head { seq: chain.seq, hash: chain.hash };
    crate::queue::writer_committed(chain.generation, chain.seq, &chain.hash, &chain.merkle, || head::dropped_at(head));
}

/// Makes `r` the record of `c` at `seq`, except its JSON values (hashed and stored from the
/// JSON cache, `try_append`): the strings are swapped, not copied, so `c` is left with the
/// memory `r` had, for the next decode into it.
fn fill_record(r: &mut Record, seq: i64, logged_at: i64, c: &mut Captured) {
    use std::mem::swap;
    let set = |out: &mut String, s: &str| {
        out.clear();
        out.push_str(s);
    };
    r.seq = seq;
    r.event_time = c.event_time;
    r.logged_at = logged_at;
    swap(&mut r.database_name, &mut c.database_name);
    swap(&mut r.session_user_name, &mut c.session_user_name);
    swap(&mut r.current_user_name, &mut c.current_user_name);
    swap(&mut r.client_addr, &mut c.client_addr);
    swap(&mut r.application_name, &mut c.application_name);
    r.backend_pid = c.backend_pid;
    r.nesting_level = c.nesting_level;
    r.xid = c.xid;
    set(&mut r.class, c.class().name());
    swap(&mut r.command, &mut c.command);
    r.objects = serde_json::Value::Null;
    swap(&mut r.statement, &mut c.statement);
    match &c.statement_sha256 {
        Some(h) => {
            let v = r.statement_sha256.get_or_insert_with(Vec::new);
            v.clear();
            v.extend_from_slice(h);
        }
        None => r.statement_sha256 = None,
    }
    r.rows = c.rows;
    set(&mut r.outcome, c.outcome.name());
    swap(&mut r.sqlstate, &mut c.sqlstate);
    swap(&mut r.message, &mut c.message);
    r.decision = None;
}
