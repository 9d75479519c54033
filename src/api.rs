//! The SQL API: `#[pg_extern]` wrappers only, with explicit volatility, strictness and
//! parallel safety. The logic they call lives in `custody_chain` (pure) and the modules above.

use pgrx::prelude::*;
use pgrx::JsonB;

use custody_chain::{ChainVerifier, Hash, Record};

use crate::{capture, queue, writer};

/// Columns of custody.audit_log in hashing form: timestamps as µs since the Unix epoch
/// (exact, via numeric), the address as host text, JSON as text.
const SELECT_RECORDS: &str = "SELECT seq, \
    (extract(epoch FROM event_time) * 1000000)::int8, \
    (extract(epoch FROM logged_at) * 1000000)::int8, \
    database_name, session_user_name, current_user_name, host(client_addr), application_name, \
    backend_pid, nesting_level, xid, class, command, objects::text, statement, statement_sha256, \
    rows, outcome, sqlstate, message, decision::text, prev_hash, hash \
    FROM custody.audit_log WHERE seq >= $1 AND ($2::int8 IS NULL OR seq <= $2) ORDER BY seq";

const FETCH: i64 = 10_000;

fn json(text: Option<String>) -> Option<serde_json::Value> {
    // A value that is not JSON cannot come from jsonb; keep it as a string so the hash fails.
    text.map(|t| serde_json::from_str(&t).unwrap_or(serde_json::Value::String(t)))
}

/// Recomputes every hash, checks every link and the seq sequence, in constant memory.
#[pg_extern(volatile, parallel_unsafe, name = "verify_audit_chain")]
fn verify_audit_chain(
    from_seq: default!(i64, 1),
    to_seq: default!(Option<i64>, "NULL"),
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
    let result = capture::internal(|| {
        Spi::connect(|client| {
            let start: Option<Hash> = if from_seq == 1 {
                Some(writer::genesis())
            } else {
                client
                    .select(
                        "SELECT hash FROM custody.audit_log WHERE seq = $1",
                        None,
                        &[(from_seq - 1).into()],
                    )?
                    .first()
                    .get_one::<Vec<u8>>()?
                    .and_then(|h| h.try_into().ok())
            };
            let mut verifier = ChainVerifier::new(from_seq, start);
            let mut cursor = client.open_cursor(SELECT_RECORDS, &[from_seq.into(), to_seq.into()]);
            let mut failure = None;
            'outer: loop {
                let table = cursor.fetch(FETCH)?;
                if table.is_empty() {
                    break;
                }
                for row in table {
                    let rec = Record {
                        seq: row.get::<i64>(1)?.unwrap_or_default(),
                        event_time: row.get::<i64>(2)?.unwrap_or_default(),
                        logged_at: row.get::<i64>(3)?.unwrap_or_default(),
                        database_name: row.get::<String>(4)?.unwrap_or_default(),
                        session_user_name: row.get::<String>(5)?.unwrap_or_default(),
                        current_user_name: row.get::<String>(6)?.unwrap_or_default(),
                        client_addr: row.get::<String>(7)?,
                        application_name: row.get::<String>(8)?,
                        backend_pid: row.get::<i32>(9)?.unwrap_or_default(),
                        nesting_level: row.get::<i32>(10)?.unwrap_or_default(),
                        xid: row.get::<i64>(11)?,
                        class: row.get::<String>(12)?.unwrap_or_default(),
                        command: row.get::<String>(13)?.unwrap_or_default(),
                        objects: json(row.get::<String>(14)?).unwrap_or(serde_json::Value::Null),
                        statement: row.get::<String>(15)?,
                        statement_sha256: row.get::<Vec<u8>>(16)?,
                        rows: row.get::<i64>(17)?,
                        outcome: row.get::<String>(18)?.unwrap_or_default(),
                        sqlstate: row.get::<String>(19)?,
                        message: row.get::<String>(20)?,
                        decision: json(row.get::<String>(21)?),
                    };
                    let prev = row.get::<Vec<u8>>(22)?.unwrap_or_default();
                    let hash = row.get::<Vec<u8>>(23)?.unwrap_or_default();
                    if let Err(f) = verifier.push(&rec, &prev, &hash) {
                        failure = Some(f);
                        break 'outer;
                    }
                }
            }
            Ok::<_, pgrx::spi::Error>((verifier.checked(), failure))
        })
    });
    let (checked, failure) = result.unwrap_or_else(|e| error!("could not read custody.audit_log: {e}"));
    let row = match failure {
        None => (true, checked, None, None),
        Some(f) => (false, checked, Some(f.seq), Some(f.kind.to_string())),
    };
    TableIterator::once(row)
}

/// The last record of the chain.
#[pg_extern(stable, parallel_safe)]
fn audit_head() -> TableIterator<
    'static,
    (name!(seq, Option<i64>), name!(hash, Option<Vec<u8>>), name!(logged_at, Option<pgrx::datum::TimestampWithTimeZone>)),
> {
    let row = capture::internal(|| {
        Spi::connect(|client| {
            let t = client
                .select(
                    "SELECT seq, hash, logged_at FROM custody.audit_log ORDER BY seq DESC LIMIT 1",
                    None,
                    &[],
                )?
                .first();
            if t.is_empty() {
                return Ok::<_, pgrx::spi::Error>((None, None, None));
            }
            Ok((t.get::<i64>(1)?, t.get::<Vec<u8>>(2)?, t.get::<pgrx::datum::TimestampWithTimeZone>(3)?))
        })
    })
    .unwrap_or_else(|e| error!("could not read custody.audit_log: {e}"));
    TableIterator::once(row)
}

/// Waits until every record this session queued so far is stored (for scripts and tests
/// that read their own records back). False if the writer did not catch up in time.
#[pg_extern(volatile, parallel_unsafe)]
fn flush(timeout_ms: default!(i32, 10000)) -> bool {
    queue::wait_flushed(capture::session_pos(), timeout_ms.max(0) as i64)
}

/// The custody writer's state: chain head, queue fill, lost records.
#[pg_extern(volatile, parallel_safe)]
fn status() -> JsonB {
    let Some(s) = queue::status() else {
        return JsonB(serde_json::json!({ "loaded": false }));
    };
    let state = match s.state {
        queue::ChainState::Unknown => "starting",
        queue::ChainState::Absent => "no audit log",
        queue::ChainState::Ready => "appending",
    };
    JsonB(serde_json::json!({
        "writer_pid": if s.writer_pid == 0 { serde_json::Value::Null } else { s.writer_pid.into() },
        "state": state,
        "head_seq": s.head_seq,
        "queue_bytes_used": s.used,
        "queue_bytes_capacity": s.capacity,
        "lost_records": s.lost,
    }))
}
