//! The SQL API: `#[pg_extern]` wrappers only, with explicit volatility, strictness and
//! parallel safety. The logic they call lives in `custody_chain` (pure) and the modules above.
//!
//! A user's mistake is a `CustodyError`. The `error!("could not read custody.…: {e}")` calls
//! stay XX000 on purpose: a table missing here is refused before (sql_name), and
//! PostgreSQL's own ERRORs in the reads (a permission, say) are raised as they are, inside
//! SPI; the `spi::Error` left is pgrx's own about a query of ours (a column of another type
//! than we asked for): a bug.

use pgrx::prelude::*;
use pgrx::{pg_sys, JsonB};

use custody_chain::export::{ChainHeader, CheckpointLine, RecordLine};
use custody_chain::{parse_verifier_key, verify_export, ChainVerifier, Digest, ExportLine, Hash};

use crate::error::CustodyError;
use crate::protect::{sql_name, Table};
use crate::{capture, own, queue, writer};

/// One of the verifier's own statements, with `{audit_log}` and `{checkpoints}` replaced by
/// the tables' current qualified names (found by OID).
fn own_sql(template: &str) -> std::ffi::CString {
    let mut text = template.to_string();
    for (placeholder, t) in [("{audit_log}", Table::AuditLog), ("{checkpoints}", Table::Checkpoints)] {
        if text.contains(placeholder) {
            text = text.replace(placeholder, &sql_name(t));
        }
    }
    std::ffi::CString::new(text).expect("statement templates have no NUL")
}

/// Records per slice of the export.
const FETCH: i64 = 10_000;

/// The stored checkpoints from..=to, in seq order.
fn checkpoints(
    client: &pgrx::spi::SpiClient<'_>,
    from_seq: i64,
    to_seq: Option<i64>,
) -> Result<Vec<CheckpointLine>, pgrx::spi::Error> {
    let q = own_sql(
        "SELECT seq, hash, merkle_root, key_id, signature, \
                (EXTRACT(epoch FROM signed_at) OPERATOR(pg_catalog.*) 1000000)::pg_catalog.int8, note \
         FROM {checkpoints} WHERE seq OPERATOR(pg_catalog.>=) $1 \
           AND ($2::pg_catalog.int8 IS NULL OR seq OPERATOR(pg_catalog.<=) $2) ORDER BY seq",
    );
    let table = own::select(client, &q, &[from_seq.into(), to_seq.into()])?;
    let mut out = Vec::new();
    for row in table {
        out.push(CheckpointLine {
            seq: row.get::<i64>(1)?.unwrap_or_default(),
            hash: to_hash(row.get::<Vec<u8>>(2)?.unwrap_or_default()),
            merkle_root: to_hash(row.get::<Vec<u8>>(3)?.unwrap_or_default()),
            key_id: row.get::<String>(4)?.unwrap_or_default(),
            signature: row.get::<String>(5)?.unwrap_or_default(),
            signed_at: row.get::<i64>(6)?.unwrap_or_default(),
            note: row.get::<String>(7)?.unwrap_or_default(),
        });
    }
    Ok(out)
}

/// A stored hash of the wrong length (tampering) becomes all zeroes: it then fails to verify.
fn to_hash(v: Vec<u8>) -> Hash {
    v.try_into().unwrap_or([0u8; 32])
}

/// The chain the log here must be: this cluster's and database's (a copy kept elsewhere is
/// verified with `custody verify --dsn`, docs/operations.md). Decided by the server, never by
/// what the table holds.
fn expected_chain() -> Option<custody_chain::ChainId> {
    Some(writer::this_chain())
}

/// Whether this backend is connected to custody.database.
pub fn in_custody_database() -> bool {
    current_database_name().as_deref() == Some(crate::settings::database())
}

/// This database's name.
fn current_database_name() -> Option<String> {
    // SAFETY: MyDatabaseId is this backend's database; get_database_name returns a palloc'd
    // copy (or NULL), read before the end of the statement.
    unsafe {
        let name = pg_sys::get_database_name(pg_sys::MyDatabaseId);
        (!name.is_null()).then(|| std::ffi::CStr::from_ptr(name).to_string_lossy().into_owned())
    }
}

/// The export's header names the chain the export must end as: this cluster's and database's.
fn chain_header() -> ExportLine {
    // SAFETY: plain reads of the control file's system identifier and this database's OID.
    let (sysid, dboid) = unsafe { (pg_sys::GetSystemIdentifier(), u32::from(pg_sys::MyDatabaseId)) };
    ExportLine::Chain(ChainHeader {
        format: custody_chain::FORMAT_VERSION,
        system_identifier: sysid,
        database_oid: dboid,
        database: crate::settings::database().to_string(),
        escape: Some("\\".into()),
    })
}

/// Produces the export of records from..=to as JSON lines (a header, the records, each
/// checkpoint right after the record it covers), handing each line to `emit`.
fn export_lines(
    client: &pgrx::spi::SpiClient<'_>,
    from_seq: i64,
    to_seq: Option<i64>,
    mut emit: impl FnMut(String) -> bool,
) -> Result<(), pgrx::spi::Error> {
    let cps = checkpoints(client, from_seq, to_seq)?;
    let mut next_cp = cps.into_iter().peekable();
    if !emit(chain_header().to_json()) {
        return Ok(());
    }
    crate::scan::for_each_record(from_seq, to_seq, |record, prev, hash| {
        let seq = record.seq;
        let line = ExportLine::Record(RecordLine {
            record: record.clone(),
            prev_hash: to_hash(prev.to_vec()),
            hash: to_hash(hash.to_vec()),
        });
        if !emit(line.to_json()) {
            return false;
        }
        while next_cp.peek().is_some_and(|c| c.seq <= seq) {
            let c = next_cp.next().expect("peeked");
            if !emit(ExportLine::Checkpoint(c).to_json()) {
                return false;
            }
        }
        true
    });
    Ok(())
}

/// Recomputes every hash, checks every link and the seq sequence in constant memory; with
/// `trusted_digests` and/or `public_key`, also every checkpoint's Merkle root and signature
/// and each digest (which needs the whole chain: from_seq = 1).
#[pg_extern(volatile, parallel_unsafe, name = "verify_audit_chain")]
fn verify_audit_chain(
    from_seq: default!(i64, 1),
    to_seq: default!(Option<i64>, "NULL"),
    trusted_digests: default!(Option<JsonB>, "NULL"),
    public_key: default!(Option<String>, "NULL"),
) -> TableIterator<
    'static,
    (
        name!(ok, bool),
        name!(checked, i64),
        name!(first_bad_seq, Option<i64>),
        name!(reason, Option<String>),
    ),
> {
    let from_seq = from_seq.max(1);
    if trusted_digests.is_some() || public_key.is_some() {
        return TableIterator::once(verify_with_checkpoints(from_seq, to_seq, trusted_digests, public_key));
    }
    let start_sql = own_sql("SELECT hash FROM {audit_log} WHERE seq OPERATOR(pg_catalog.=) $1");
    let last_sql = own_sql("SELECT pg_catalog.max(seq) FROM {audit_log}");
    let result = own::pinned(|| {
        Spi::connect(|client| {
            let start: Option<Hash> = if from_seq == 1 {
                Some([0; 32]) // not used: from seq 1 the chain is known by its records
            } else {
                let t = own::select(client, &start_sql, &[(from_seq - 1).into()])?;
                if t.is_empty() {
                    None
                } else {
                    t.first().get_one::<Vec<u8>>()?.and_then(|h| h.try_into().ok())
                }
            };
            if start.is_none() {
                // The record before from_seq is not there: past the end of the log (the
                // caller's mistake), or missing from inside it (the chain is broken there).
                let last = own::select(client, &last_sql, &[])?.first().get_one::<i64>()?.unwrap_or(0);
                if from_seq - 1 > last {
                    return Ok(Err(crate::error::CustodyError::PastTheLog { from_seq, last_seq: last }));
                }
                let missing = custody_chain::verify::Failure {
                    seq: from_seq - 1,
                    kind: custody_chain::verify::FailureKind::MissingSeq { expected: from_seq - 1, found: from_seq },
                };
                return Ok(Ok((0, Some(missing))));
            }
            let mut verifier = if from_seq == 1 {
                ChainVerifier::from_genesis(expected_chain())
            } else {
                ChainVerifier::new(from_seq, start)
            };
            let mut failure = None;
            crate::scan::for_each_record(from_seq, to_seq, |rec, prev, hash| match verifier.push(rec, prev, hash) {
                Ok(()) => true,
                Err(f) => {
                    failure = Some(f);
                    false
                }
            });
            // Whose chain the log is shows at its end (a hand-over may come late): checked
            // when the whole log was read, or a range that reached its end.
            if failure.is_none() {
                let whole = match to_seq {
                    None => true,
                    Some(_) => {
                        let last = own::select(client, &last_sql, &[])?.first().get_one::<i64>()?.unwrap_or(0);
                        verifier.head().map_or(0, |(s, _)| s) >= last
                    }
                };
                if whole {
                    failure = verifier.finish().err();
                }
            }
            Ok::<_, pgrx::spi::Error>(Ok((verifier.checked(), failure)))
        })
    });
    let (checked, failure) = match result.unwrap_or_else(|e| error!("could not read custody.audit_log: {e}")) {
        Ok(r) => r,
        Err(e) => e.report(),
    };
    let row = match failure {
        None => match crate::scan::log_defect() {
            None => (true, checked, None, None),
            Some(what) => (false, checked, None, Some(what)),
        },
        Some(f) => (false, checked, Some(f.seq), Some(f.kind.to_string())),
    };
    TableIterator::once(row)
}

/// The checkpoint/digest path: the export stream of the chain fed to the same verifier the
/// command-line program uses (one implementation of the format).
fn verify_with_checkpoints(
    from_seq: i64,
    to_seq: Option<i64>,
    trusted_digests: Option<JsonB>,
    public_key: Option<String>,
) -> (bool, i64, Option<i64>, Option<String>) {
    if from_seq != 1 {
        CustodyError::InvalidArgument {
            message: "checkpoint and digest verification needs the whole chain".into(),
            hint: Some("Call custody.verify_audit_chain(1, ...) with trusted_digests or public_key."),
        }
        .report();
    }
    let verifier = public_key.map(|k| {
        parse_verifier_key(k.trim()).unwrap_or_else(|e| {
            CustodyError::InvalidArgument {
                message: format!("invalid public key: {e}"),
                hint: Some("Pass the verifier key printed by `custody keygen` (name+keyhash+base64)."),
            }
            .report()
        })
    });
    const DIGESTS_HINT: Option<&str> = Some("Pass digests as returned by custody.audit_digest().");
    let digests: Vec<Digest> = match trusted_digests.map(|j| j.0) {
        None => Vec::new(),
        Some(serde_json::Value::Array(items)) => items
            .iter()
            .map(|d| {
                Digest::parse(&d.to_string()).unwrap_or_else(|e| {
                    CustodyError::InvalidArgument { message: format!("invalid digest {d}: {e}"), hint: DIGESTS_HINT }.report()
                })
            })
            .collect(),
        Some(one @ serde_json::Value::Object(_)) => vec![Digest::parse(&one.to_string()).unwrap_or_else(|e| {
            CustodyError::InvalidArgument { message: format!("invalid digest: {e}"), hint: DIGESTS_HINT }.report()
        })],
        Some(other) => CustodyError::InvalidArgument {
            message: format!("trusted_digests must be a JSON array of digests, not {other}"),
            hint: Some("Pass an array of objects as returned by custody.audit_digest()."),
        }
        .report(),
    };
    let report = own::pinned(|| {
        Spi::connect(|client| {
            // The export is produced FETCH records at a time as the verifier reads it.
            let mut next_from = 1i64;
            let mut finished = false;
            let refill = |buf: &mut Vec<u8>| -> bool {
                if finished {
                    return false;
                }
                let to = Some(match to_seq {
                    Some(t) => t.min(next_from + FETCH - 1),
                    None => next_from + FETCH - 1,
                });
                let mut records = 0i64;
                let first = next_from == 1;
                export_lines(client, next_from, to, |l| {
                    if l.starts_with("{\"type\":\"chain\"") && !first {
                        return true; // the header once, at the top
                    }
                    if l.starts_with("{\"type\":\"record\"") {
                        records += 1;
                    }
                    buf.extend_from_slice(l.as_bytes());
                    buf.push(b'\n');
                    true
                })
                .unwrap_or_else(|e| error!("could not read custody.audit_log: {e}"));
                next_from += FETCH;
                finished = records < FETCH || to_seq.is_some_and(|t| next_from > t);
                true
            };
            let reader = LineReader { buf: Vec::new(), pos: 0, refill: Box::new(refill) };
            Ok::<_, pgrx::spi::Error>(verify_export(reader, verifier.as_ref(), &digests))
        })
    })
    .unwrap_or_else(|e| error!("could not read custody.audit_log: {e}"));
    match report {
        Ok(r) => match r.failure {
            None => match crate::scan::log_defect() {
                None => (true, r.records, None, None),
                Some(what) => (false, r.records, None, Some(what)),
            },
            Some(f) => (false, r.records, Some(f.seq), Some(format!("{}: {}", f.class.as_str(), f.reason))),
        },
        Err(e) => (false, 0, None, Some(format!("export could not be read: {e}"))),
    }
}

/// A BufRead over lines produced on demand by `refill`, which appends the next lines to the
/// buffer and returns false when there are no more.
struct LineReader<'a> {
    buf: Vec<u8>,
    pos: usize,
    refill: Refill<'a>,
}

/// Appends the next lines to the buffer; false when there are no more.
type Refill<'a> = Box<dyn FnMut(&mut Vec<u8>) -> bool + 'a>;

impl std::io::Read for LineReader<'_> {
    fn read(&mut self, out: &mut [u8]) -> std::io::Result<usize> {
        let avail = std::io::BufRead::fill_buf(self)?;
        let n = out.len().min(avail.len());
        out[..n].copy_from_slice(&avail[..n]);
        std::io::BufRead::consume(self, n);
        Ok(n)
    }
}

impl std::io::BufRead for LineReader<'_> {
    fn fill_buf(&mut self) -> std::io::Result<&[u8]> {
        while self.pos >= self.buf.len() {
            self.buf.clear();
            self.pos = 0;
            if !(self.refill)(&mut self.buf) {
                break;
            }
        }
        Ok(&self.buf[self.pos..])
    }
    fn consume(&mut self, n: usize) {
        self.pos = (self.pos + n).min(self.buf.len());
    }
}

/// One slice of the export: the records from..=to as JSON lines (with the header line first
/// when `with_header`), each checkpoint right after the record it covers. custody.export_audit()
/// (SQL) calls this for slices of 10,000 records, so an export of any size streams.
#[pg_extern(volatile, parallel_unsafe, name = "_export_chunk")]
fn export_chunk(from_seq: i64, to_seq: i64, with_header: bool) -> SetOfIterator<'static, String> {
    flush_wal();
    let lines = own::pinned(|| {
        Spi::connect(|client| {
            let mut lines = Vec::new();
            export_lines(client, from_seq.max(1), Some(to_seq), |l| {
                if with_header || !l.starts_with("{\"type\":\"chain\"") {
                    lines.push(l);
                }
                true
            })?;
            Ok::<_, pgrx::spi::Error>(lines)
        })
    })
    .unwrap_or_else(|e| error!("could not read custody.audit_log: {e}"));
    SetOfIterator::new(lines)
}

/// {seq, hash, merkle_root, signed_note} of the latest checkpoint: keep it outside the
/// database, and pass it back to verify_audit_chain(trusted_digests => ...) later.
#[pg_extern(stable, parallel_restricted)]
fn audit_digest() -> Option<JsonB> {
    flush_wal();
    // The latest only: a log's checkpoints grow with it (one per custody.checkpoint_interval).
    let last_sql = own_sql("SELECT pg_catalog.max(seq) FROM {checkpoints}");
    let cp = own::pinned(|| {
        Spi::connect(|client| {
            let Some(last) = own::select(client, &last_sql, &[])?.first().get_one::<i64>()? else {
                return Ok::<_, pgrx::spi::Error>(None);
            };
            Ok(checkpoints(client, last, Some(last))?.into_iter().next_back())
        })
    })
    .unwrap_or_else(|e| error!("could not read custody.checkpoints: {e}"))?;
    let d = Digest { seq: cp.seq, hash: cp.hash, merkle_root: cp.merkle_root, signed_note: Some(cp.note) };
    Some(JsonB(serde_json::from_str(&d.to_json()).expect("digest JSON")))
}

/// The last record of the chain.
#[pg_extern(stable, parallel_safe)]
#[allow(clippy::type_complexity)] // pgrx reads the column names from this signature
fn audit_head() -> TableIterator<
    'static,
    (name!(seq, Option<i64>), name!(hash, Option<Vec<u8>>), name!(logged_at, Option<pgrx::datum::TimestampWithTimeZone>)),
> {
    let q = own_sql("SELECT seq, hash, logged_at FROM {audit_log} ORDER BY seq DESC LIMIT 1");
    let row = own::pinned(|| {
        Spi::connect(|client| {
            let t = own::select(client, &q, &[])?.first();
            if t.is_empty() {
                return Ok::<_, pgrx::spi::Error>((None, None, None));
            }
            Ok::<_, pgrx::spi::Error>((t.get::<i64>(1)?, t.get::<Vec<u8>>(2)?, t.get::<pgrx::datum::TimestampWithTimeZone>(3)?))
        })
    })
    .unwrap_or_else(|e| error!("could not read custody.audit_log: {e}"));
    TableIterator::once(row)
}

/// Records of a hot standby's statements, shipped by its standby worker
/// (src/writer/standby.rs): queued here in the order they come, after a `STANDBY RECORDS`
/// record naming the standby, as one block, and returned once the writer has stored them;
/// each carries its pid negated (no session here has a negative pid). `lost`: records the
/// standby's sessions could not queue since the last call (a `GAP` here). Only for
/// superusers and members of custody_standby (the role a standby connects as).
#[pg_extern(volatile, parallel_unsafe)]
fn standby_records(batch: &[u8], lost: i64) -> String {
    use crate::error::CustodyError;
    // SAFETY: plain reads of this backend's identity and the server's state; the role name is
    // a NUL-terminated literal and missing_ok returns InvalidOid.
    let (allowed, standby) = unsafe {
        let me = pg_sys::GetUserId();
        let shipper = pg_sys::get_role_oid(c"custody_standby".as_ptr(), true);
        (
            pg_sys::superuser() || (shipper != pg_sys::InvalidOid && pg_sys::has_privs_of_role(me, shipper)),
            pg_sys::RecoveryInProgress(),
        )
    };
    if !allowed {
        CustodyError::NotAStandby.report();
    }
    if standby || queue::state() != queue::ChainState::Ready {
        CustodyError::NotStoringHere.report();
    }
    // A standby worker ships at most SHIP_BYTES/SHIP_RECORDS at a time; a bigger batch is not
    // one, and would crowd the primary's own sessions out of the queue.
    if batch.len() > 8 << 20 || lost < 0 {
        CustodyError::InvalidArgument { message: "not a batch of a standby's records (too large, or lost < 0)".into(), hint: None }
            .report();
    }
    let mut records = Vec::new();
    let mut rest = batch;
    while !rest.is_empty() {
        let len = rest.get(..4).map(|b| u32::from_le_bytes(b.try_into().expect("4 bytes")) as usize);
        let Some(payload) = len.and_then(|n| rest.get(4..4 + n)) else {
            CustodyError::InvalidArgument { message: "the batch of standby records is cut short".into(), hint: None }.report()
        };
        match capture::wire::Captured::decode(payload) {
            // A standby's sessions make no system records: one here is not theirs.
            Ok(mut c) if c.class() != capture::class::Class::System && records.len() < 20_000 => {
                // Marked as the standby's, in a hashed field no session of this server can
                // set: PostgreSQL's pids are positive, a standby's records carry theirs negated.
                c.backend_pid = -c.backend_pid.saturating_abs().max(1);
                let mut b = Vec::with_capacity(payload.len());
                c.encode_into(&mut b);
                records.push(b);
            }
            _ => CustodyError::InvalidArgument { message: "a standby record that is not one".into(), hint: None }.report(),
        }
        rest = &rest[4 + payload.len()..];
    }
    let who = capture::who();
    use sha2::Digest as _;
    let digest = sha2::Sha256::digest(batch);
    let mut marker = writer::system_record(
        "STANDBY RECORDS",
        Some(serde_json::json!([{
            "kind": "standby", "name": who.application_name, "role": who.session_user,
            "count": records.len(), "lost": lost,
            // The same batch shipped twice (a reply lost after it was stored) shows as two
            // markers with the same digest.
            "batch_sha256": custody_chain::hex::encode(&digest),
        }])),
    );
    marker.client_addr = who.client_addr.clone();
    let mut block = vec![Vec::new()];
    marker.encode_into(&mut block[0]);
    block.extend(records);
    if lost > 0 {
        let gap = writer::system_record(
            "GAP",
            Some(serde_json::json!([{ "kind": "gap", "name": "lost records on a standby", "count": lost, "standby": who.application_name }])),
        );
        let mut b = Vec::new();
        gap.encode_into(&mut b);
        block.push(b);
    }
    let timeout = crate::settings::failure_timeout_ms();
    // One block: the marker, then exactly its records, nothing of this server's in between.
    let parts: Vec<&[u8]> = block.iter().map(Vec::as_slice).collect();
    let pos = match queue::push_all(&parts, timeout) {
        Ok(p) => p,
        Err(queue::QueueError::TooLarge) => CustodyError::InvalidArgument {
            message: "the batch of standby records does not fit in this server's audit queue".into(),
            hint: Some("Make custody.queue_size on the primary at least that of its standbys."),
        }
        .report(),
        Err(_) => CustodyError::QueueUnavailable { timeout_ms: timeout }.report(),
    };
    if !queue::wait_flushed(pos, timeout) {
        CustodyError::NotDurable { timeout_ms: timeout }.report();
    }
    flush_wal();
    "stored".into()
}

/// Waits until every record this session queued so far is stored (for scripts and tests
/// that read their own records back). False if the writer did not catch up in time.
#[pg_extern(volatile, parallel_unsafe)]
fn flush(timeout_ms: default!(i32, 10000)) -> bool {
    let stored = queue::wait_flushed(capture::session_pos(), timeout_ms.max(0) as i64);
    flush_wal();
    stored
}

/// Flushes WAL up to the custody writer's last commit: it commits asynchronously, so
/// records it has committed reach disk here, before a caller keeps anything about them (a
/// digest, an export, "my records are stored").
fn flush_wal() {
    queue::flush_stored();
}

/// The custody writer's state: chain head, queue fill, lost records.
#[pg_extern(volatile, parallel_safe)]
fn status() -> JsonB {
    let Some(s) = queue::status() else {
        return JsonB(serde_json::json!({ "loaded": false }));
    };
    let state = match s.state {
        _ if queue::on_standby() && !s.alarm.is_empty() => s.alarm.clone(),
        _ if queue::on_standby() => "standby: shipping records to the primary".to_string(),
        queue::ChainState::Unknown => "starting".to_string(),
        queue::ChainState::Absent => "no audit log".to_string(),
        queue::ChainState::Ready if s.writer_pid == 0 => "writer restarting".to_string(),
        queue::ChainState::Ready => "appending".to_string(),
        queue::ChainState::Refusing => s.alarm.clone(),
    };
    let text = |t: &str| if t.is_empty() { serde_json::Value::Null } else { t.into() };
    JsonB(serde_json::json!({
        "signing_key": s.key_status,
        "last_checkpoint_seq": s.last_checkpoint_seq,
        "writer_pid": if s.writer_pid == 0 { serde_json::Value::Null } else { s.writer_pid.into() },
        "state": state,
        "head_seq": s.head_seq,
        "queue_bytes_used": s.used,
        "queue_bytes_capacity": s.capacity,
        "lost_records": s.lost,
        "alarm": text(&s.alarm),
        "checkpoint_archived_seq": s.archived_seq,
        "checkpoint_command_error": text(&s.archive_error),
        "writer_start_records_read": s.start.map(|(n, _)| n),
        "writer_start_seconds": s.start.map(|(_, t)| t.as_secs_f64()),
    }))
}
