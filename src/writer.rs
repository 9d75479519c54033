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
use pgrx::spi::OwnedPreparedStatement;
use pgrx::datum::{DatumWithOid, TimestampWithTimeZone};
use pgrx::{pg_sys, PgOid};

use custody_chain::export::CheckpointLine;
use custody_chain::{checkpoint_origin, genesis_hash, parse_private_key, Hash, MerkleBuilder, PrivateKey, Record};

use crate::capture::class::Class;
use crate::capture::wire::{Captured, Outcome};
use crate::capture::{self, now_unix_us, PG_EPOCH_OFFSET_US};
use crate::queue::{ChainState, Consumer};
use crate::{protect, settings};

/// Records per batch (one transaction).
const BATCH_RECORDS: usize = 2000;
const BATCH_BYTES: usize = 8 * 1024 * 1024;

pub fn init() {
    BackgroundWorkerBuilder::new("pg_custody writer")
        .set_type("pg_custody writer")
        .set_function("custody_writer_main")
        .set_library("pg_custody")
        .enable_spi_access()
        .set_start_time(pgrx::bgworkers::BgWorkerStartTime::RecoveryFinished)
        .set_restart_time(Some(Duration::from_secs(1)))
        .load();
}

struct Chain {
    seq: i64,
    hash: Hash,
    /// RFC 6962 Merkle tree over every record hash, 1..=seq (O(log n) state).
    merkle: MerkleBuilder,
    /// seq of the last checkpoint (0: none).
    checkpointed: i64,
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
                queue.set_key_status("none: custody.signing_key_file is not set; checkpoints are not written");
                None
            }
            Some(path) => match std::fs::read_to_string(&path)
                .map_err(|e| e.to_string())
                .and_then(|t| parse_private_key(t.trim()).map_err(|e| e.to_string()))
            {
                Ok(k) => {
                    let id = custody_chain::hex::encode(&k.key_id());
                    queue.set_key_status(&format!("loaded: key {} ({id}) from {path}", k.name()));
                    log!("pg_custody writer: signing checkpoints with key {} ({id})", k.name());
                    Some(k)
                }
                Err(e) => {
                    let msg = format!("error: cannot use custody.signing_key_file \"{path}\": {e}; the chain is written unsigned");
                    warning!("pg_custody writer: {msg}");
                    queue.set_key_status(&msg);
                    None
                }
            },
        };
        Signer { key, origin }
    }
}

static mut INSERT: Option<OwnedPreparedStatement> = None;

const INSERT_SQL: &str = "INSERT INTO custody.audit_log (seq, event_time, logged_at, \
    database_name, session_user_name, current_user_name, client_addr, application_name, \
    backend_pid, nesting_level, xid, class, command, objects, statement, statement_sha256, \
    rows, outcome, sqlstate, message, decision, prev_hash, hash) \
    SELECT seq, event_time, logged_at, database_name, session_user_name, current_user_name, \
    client_addr::inet, application_name, backend_pid, nesting_level, xid, class, command, \
    objects::jsonb, statement, statement_sha256, rows, outcome, sqlstate, message, \
    decision::jsonb, prev_hash, hash \
    FROM unnest($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16, $17, \
    $18, $19, $20, $21, $22, $23) AS r(seq, event_time, logged_at, database_name, \
    session_user_name, current_user_name, client_addr, application_name, backend_pid, \
    nesting_level, xid, class, command, objects, statement, statement_sha256, rows, outcome, \
    sqlstate, message, decision, prev_hash, hash)";

#[pg_guard]
#[unsafe(no_mangle)]
pub extern "C-unwind" fn custody_writer_main(_arg: pg_sys::Datum) {
    BackgroundWorker::attach_signal_handlers(SignalWakeFlags::SIGHUP | SignalWakeFlags::SIGTERM);
    protect::set_writer();
    // The writer's own queries are never recorded.
    capture::internal(|| run());
}

fn run() {
    BackgroundWorker::connect_worker_to_spi(Some(settings::database()), None);
    // SAFETY: setting a GUC for this process only: every batch commit is flushed to disk.
    unsafe {
        pg_sys::SetConfigOption(
            c"synchronous_commit".as_ptr(),
            c"on".as_ptr(),
            pg_sys::GucContext::PGC_SUSET,
            pg_sys::GucSource::PGC_S_OVERRIDE,
        );
    }
    let Some(queue) = Consumer::attach() else { return };
    let mut chain: Option<Chain> = None;
    let mut lost_recorded = queue.lost();
    let mut batch: Vec<Vec<u8>> = Vec::with_capacity(BATCH_RECORDS);
    let mut last_settings = settings::generation();
    let mut signer = Signer::load(&queue);
    let mut last_checkpoint = std::time::Instant::now();

    loop {
        if chain.is_none() {
            chain = BackgroundWorker::transaction(load_head);
            match &chain {
                Some(c) => {
                    queue.set_state(ChainState::Ready);
                    queue.set_head_seq(c.seq);
                    queue.set_last_checkpoint(c.checkpointed);
                    log!("pg_custody writer: appending to custody.audit_log after seq {}", c.seq);
                    let c = chain.as_mut().expect("just set");
                    append(c, vec![system_record("WRITER START", None)]);
                    // Policies, attributes and suspensions in force for every backend.
                    let snap = BackgroundWorker::transaction(crate::policy::store::load_snapshot);
                    if !crate::policy::publish(&snap) {
                        warning!("pg_custody writer: the policy store does not fit in shared memory");
                    }
                    queue.set_head_seq(c.seq);
                }
                None => {
                    queue.set_state(ChainState::Absent);
                    queue.discard_all();
                }
            }
        }

        if BackgroundWorker::sighup_received() {
            // SAFETY: re-reading postgresql.conf in this process, as every worker does.
            unsafe { pg_sys::ProcessConfigFile(pg_sys::GucContext::PGC_SIGHUP) };
            signer = Signer::load(&queue);
        }

        let Some(c) = chain.as_mut() else {
            // Not created yet: look again soon (CREATE EXTENSION pg_custody). Statements are
            // not recorded until then, so keep the window short; the check is one lookup.
            if !BackgroundWorker::wait_latch(Some(Duration::from_millis(100))) {
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
        }

        // Records that sessions could not queue: a gap marker, never silence.
        let lost = queue.lost();
        if lost > lost_recorded {
            let n = lost - lost_recorded;
            let objects = serde_json::json!([{ "kind": "gap", "name": "lost records", "count": n }]);
            append(c, vec![system_record("GAP", Some(objects))]);
            lost_recorded = lost;
        }

        if c.seq > c.checkpointed && last_checkpoint.elapsed() >= settings::checkpoint_interval() {
            checkpoint(c, &signer, &queue);
            last_checkpoint = std::time::Instant::now();
        }

        batch.clear();
        let end = queue.peek(BATCH_RECORDS, BATCH_BYTES, &mut batch);
        if !batch.is_empty() {
            let records = batch
                .iter()
                .map(|b| Captured::decode(b).unwrap_or_else(|_| undecodable()))
                .collect();
            append(c, records);
            queue.advance(end);
            queue.set_head_seq(c.seq);
            continue;
        }

        let stop = !BackgroundWorker::wait_latch(Some(Duration::from_millis(
            settings::checkpoint_interval().as_millis().min(1000) as u64,
        )));
        if stop {
            // Clean shutdown: drain what is queued, then say so in the chain.
            batch.clear();
            let end = queue.peek(usize::MAX, usize::MAX, &mut batch);
            let mut records: Vec<Captured> = batch
                .iter()
                .map(|b| Captured::decode(b).unwrap_or_else(|_| undecodable()))
                .collect();
            records.push(system_record("WRITER STOP", None));
            append(c, records);
            queue.advance(end);
            checkpoint(c, &signer, &queue);
            return;
        }
    }
}

/// A record the writer cannot read (a bug, not user input): kept as a visible gap.
fn undecodable() -> Captured {
    let mut r = system_record("GAP", Some(serde_json::json!([{ "kind": "gap", "name": "undecodable record", "count": 1 }])));
    r.outcome = Outcome::Error;
    r
}

fn system_record(command: &str, objects: Option<serde_json::Value>) -> Captured {
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

/// Reads the chain head and rebuilds the Merkle tree over every record hash, or None when
/// the audit log does not exist in this database.
fn load_head() -> Option<Chain> {
    Spi::connect(|client| {
        let exists = client
            .select("SELECT to_regclass('custody.audit_log') IS NOT NULL", None, &[])
            .ok()?
            .first()
            .get_one::<bool>()
            .ok()
            .flatten()
            .unwrap_or(false);
        if !exists {
            return None;
        }
        let mut chain = Chain { seq: 0, hash: genesis(), merkle: MerkleBuilder::new(), checkpointed: 0 };
        let mut cursor = client.open_cursor("SELECT seq, hash FROM custody.audit_log ORDER BY seq", &[]);
        loop {
            let table = cursor.fetch(10_000).expect("read custody.audit_log");
            if table.is_empty() {
                break;
            }
            for row in table {
                let seq = row.get::<i64>(1).ok().flatten().unwrap_or_default();
                let h = row.get::<Vec<u8>>(2).ok().flatten().unwrap_or_default();
                let hash: Hash = h.try_into().unwrap_or([0u8; 32]);
                chain.merkle.push(&hash);
                chain.seq = seq;
                chain.hash = hash;
            }
        }
        chain.checkpointed = client
            .select("SELECT coalesce(max(seq), 0)::int8 FROM custody.checkpoints", None, &[])
            .ok()
            .and_then(|t| t.first().get_one::<i64>().ok().flatten())
            .unwrap_or(0);
        Some(chain)
    })
}

/// Signs and stores a checkpoint of the chain as it stands (when a key is loaded and
/// there is something new to cover).
fn checkpoint(chain: &mut Chain, signer: &Signer, queue: &Consumer) {
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
        Spi::connect_mut(|client| {
            let ts = |us: i64| unsafe { DatumWithOid::new(us - PG_EPOCH_OFFSET_US, pg_sys::TIMESTAMPTZOID) };
            client
                .update(
                    "INSERT INTO custody.checkpoints (seq, hash, merkle_root, key_id, signature, signed_at, note) \
                     VALUES ($1, $2, $3, $4, $5, $6, $7)",
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
                    "INSERT INTO custody.public_keys (key_id, public_key, first_used, last_used) \
                     VALUES ($1, $2, $3, $3) \
                     ON CONFLICT (key_id) DO UPDATE SET last_used = excluded.last_used",
                    None,
                    &[line.key_id.as_str().into(), verifier.as_str().into(), ts(now)],
                )
                .expect("record public key");
        })
    }));
    chain.checkpointed = chain.seq;
    queue.set_last_checkpoint(chain.seq);
}

/// The prev_hash of record 1: binds the chain to this cluster and database.
pub fn genesis() -> Hash {
    // SAFETY: plain reads of the control file's system identifier and this database's OID.
    unsafe { genesis_hash(pg_sys::GetSystemIdentifier(), u32::from(pg_sys::MyDatabaseId)) }
}

/// Hashes and inserts `records` after the head in one transaction; advances the head only
/// after the commit. An ERROR here ends the worker (restarted in 1 s, resuming from the
/// table), which is the safe answer to anything unexpected.
fn append(chain: &mut Chain, records: Vec<Captured>) {
    let logged_at = now_unix_us();
    let (mut seq, mut prev) = (chain.seq, chain.hash);
    let mut hashes: Vec<Hash> = Vec::with_capacity(records.len());
    let mut buf = Vec::with_capacity(1024);
    let mut cols = Columns::with_capacity(records.len());
    for c in records {
        seq += 1;
        let rec = to_record(seq, logged_at, c);
        let hash = rec.chain_hash_with(&prev, &mut buf);
        cols.push(rec, prev, hash);
        hashes.push(hash);
        prev = hash;
    }
    BackgroundWorker::transaction(std::panic::AssertUnwindSafe(|| {
        Spi::connect_mut(|client| {
            #[allow(static_mut_refs)]
            // SAFETY: the writer is single-threaded; the plan is kept across transactions.
            let stmt = unsafe {
                if INSERT.is_none() {
                    let types: Vec<PgOid> = Columns::TYPES.into_iter().map(PgOid::from).collect();
                    let p = client.prepare_mut(INSERT_SQL, &types).expect("prepare insert");
                    INSERT = Some(p.keep());
                }
                INSERT.as_ref().expect("just prepared")
            };
            // One INSERT ... SELECT FROM unnest(arrays) per batch: one executor run instead
            // of one per record.
            client.update(stmt, None, &cols.into_args()).expect("insert audit records");
        })
    }));
    chain.seq = seq;
    chain.hash = prev;
    for h in &hashes {
        chain.merkle.push(h);
    }
}

/// A batch of records, column by column, for the unnest() insert.
struct Columns {
    seq: Vec<i64>,
    event_time: Vec<TimestampWithTimeZone>,
    logged_at: Vec<TimestampWithTimeZone>,
    database_name: Vec<String>,
    session_user_name: Vec<String>,
    current_user_name: Vec<String>,
    client_addr: Vec<Option<String>>,
    application_name: Vec<Option<String>>,
    backend_pid: Vec<i32>,
    nesting_level: Vec<i32>,
    xid: Vec<Option<i64>>,
    class: Vec<String>,
    command: Vec<String>,
    objects: Vec<String>,
    statement: Vec<Option<String>>,
    statement_sha256: Vec<Option<Vec<u8>>>,
    rows: Vec<Option<i64>>,
    outcome: Vec<String>,
    sqlstate: Vec<Option<String>>,
    message: Vec<Option<String>>,
    decision: Vec<Option<String>>,
    prev_hash: Vec<Vec<u8>>,
    hash: Vec<Vec<u8>>,
}

fn pg_timestamp(unix_us: i64) -> TimestampWithTimeZone {
    // A timestamptz is µs since 2000-01-01; every value we produce is in range.
    TimestampWithTimeZone::try_from(unix_us - PG_EPOCH_OFFSET_US).expect("timestamp in range")
}

impl Columns {
    const TYPES: [pg_sys::Oid; 23] = [
        pg_sys::INT8ARRAYOID, pg_sys::TIMESTAMPTZARRAYOID, pg_sys::TIMESTAMPTZARRAYOID,
        pg_sys::TEXTARRAYOID, pg_sys::TEXTARRAYOID, pg_sys::TEXTARRAYOID, pg_sys::TEXTARRAYOID,
        pg_sys::TEXTARRAYOID, pg_sys::INT4ARRAYOID, pg_sys::INT4ARRAYOID, pg_sys::INT8ARRAYOID,
        pg_sys::TEXTARRAYOID, pg_sys::TEXTARRAYOID, pg_sys::TEXTARRAYOID, pg_sys::TEXTARRAYOID,
        pg_sys::BYTEAARRAYOID, pg_sys::INT8ARRAYOID, pg_sys::TEXTARRAYOID, pg_sys::TEXTARRAYOID,
        pg_sys::TEXTARRAYOID, pg_sys::TEXTARRAYOID, pg_sys::BYTEAARRAYOID, pg_sys::BYTEAARRAYOID,
    ];

    fn with_capacity(n: usize) -> Columns {
        Columns {
            seq: Vec::with_capacity(n),
            event_time: Vec::with_capacity(n),
            logged_at: Vec::with_capacity(n),
            database_name: Vec::with_capacity(n),
            session_user_name: Vec::with_capacity(n),
            current_user_name: Vec::with_capacity(n),
            client_addr: Vec::with_capacity(n),
            application_name: Vec::with_capacity(n),
            backend_pid: Vec::with_capacity(n),
            nesting_level: Vec::with_capacity(n),
            xid: Vec::with_capacity(n),
            class: Vec::with_capacity(n),
            command: Vec::with_capacity(n),
            objects: Vec::with_capacity(n),
            statement: Vec::with_capacity(n),
            statement_sha256: Vec::with_capacity(n),
            rows: Vec::with_capacity(n),
            outcome: Vec::with_capacity(n),
            sqlstate: Vec::with_capacity(n),
            message: Vec::with_capacity(n),
            decision: Vec::with_capacity(n),
            prev_hash: Vec::with_capacity(n),
            hash: Vec::with_capacity(n),
        }
    }

    fn push(&mut self, rec: Record, prev: Hash, hash: Hash) {
        self.seq.push(rec.seq);
        self.event_time.push(pg_timestamp(rec.event_time));
        self.logged_at.push(pg_timestamp(rec.logged_at));
        self.database_name.push(rec.database_name);
        self.session_user_name.push(rec.session_user_name);
        self.current_user_name.push(rec.current_user_name);
        self.client_addr.push(rec.client_addr);
        self.application_name.push(rec.application_name);
        self.backend_pid.push(rec.backend_pid);
        self.nesting_level.push(rec.nesting_level);
        self.xid.push(rec.xid);
        self.class.push(rec.class);
        self.command.push(rec.command);
        self.objects.push(rec.objects.to_string());
        self.statement.push(rec.statement);
        self.statement_sha256.push(rec.statement_sha256);
        self.rows.push(rec.rows);
        self.outcome.push(rec.outcome);
        self.sqlstate.push(rec.sqlstate);
        self.message.push(rec.message);
        self.decision.push(rec.decision.map(|d| d.to_string()));
        self.prev_hash.push(prev.to_vec());
        self.hash.push(hash.to_vec());
    }

    fn into_args(self) -> Vec<DatumWithOid<'static>> {
        vec![
            self.seq.into(),
            self.event_time.into(),
            self.logged_at.into(),
            self.database_name.into(),
            self.session_user_name.into(),
            self.current_user_name.into(),
            self.client_addr.into(),
            self.application_name.into(),
            self.backend_pid.into(),
            self.nesting_level.into(),
            self.xid.into(),
            self.class.into(),
            self.command.into(),
            self.objects.into(),
            self.statement.into(),
            self.statement_sha256.into(),
            self.rows.into(),
            self.outcome.into(),
            self.sqlstate.into(),
            self.message.into(),
            self.decision.into(),
            self.prev_hash.into(),
            self.hash.into(),
        ]
    }
}

fn to_record(seq: i64, logged_at: i64, c: Captured) -> Record {
    let class = c.class().name().to_string();
    Record {
        seq,
        event_time: c.event_time,
        logged_at,
        database_name: c.database_name,
        session_user_name: c.session_user_name,
        current_user_name: c.current_user_name,
        client_addr: c.client_addr,
        application_name: c.application_name,
        backend_pid: c.backend_pid,
        nesting_level: c.nesting_level,
        xid: c.xid,
        class,
        command: c.command,
        objects: serde_json::from_str(&c.objects).unwrap_or_else(|_| serde_json::json!([])),
        statement: c.statement,
        statement_sha256: c.statement_sha256.map(|h| h.to_vec()),
        rows: c.rows,
        outcome: c.outcome.name().to_string(),
        sqlstate: c.sqlstate,
        message: c.message,
        decision: c.decision.and_then(|d| serde_json::from_str(&d).ok()),
    }
}
