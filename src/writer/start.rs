//! What the writer finds when it starts: no audit log here, a log it must not write to, or
//! the chain to append to — read back from the table and compared with the head the writer
//! remembers (`head`), with the records that say so to append first.

use pgrx::prelude::*;

use custody_chain::{hex, Hash, MerkleBuilder};

use super::head::{self, Check, Head};
use super::{genesis, system_record, Chain};
use crate::capture::wire::{Captured, Outcome};
use crate::protect::{self, sql_name, Table};
use crate::queue::Consumer;

pub enum Start {
    /// pg_custody is not created in custody.database.
    Absent,
    /// The log, its checkpoints or keys are not as pg_custody made them: nothing is written.
    Refusing(String),
    /// Append after this head; these records first (an alarm, then WRITER START). The third
    /// field is the head to remember until those are on disk (with the Merkle tree up to it,
    /// when the writer has that). The last: how many records of the log were read to
    /// resume (custody.status()).
    Ready(Chain, Vec<Captured>, (Head, Option<MerkleBuilder>), u64),
}

/// Inside a transaction of the writer.
pub fn open(queue: &Consumer) -> Start {
    let log = protect::ids().map(|i| i.table(Table::AuditLog)).unwrap_or(pg_sys::InvalidOid);
    if log == pg_sys::InvalidOid {
        // No chain here. If the writer kept one, it was dropped or renamed with the library
        // unloaded (a DROP EXTENSION made while loaded removes the file): fail closed.
        return match head::read() {
            None => Start::Absent,
            Some(r) => Start::Refusing(format!(
                "the audit chain this server kept (head seq {}) is gone: pg_custody's extension or \
                 custody.audit_log was dropped or renamed while the library was not loaded",
                r.head.seq
            )),
        };
    }
    let ids = protect::ids().expect("found above");
    for t in [Table::AuditLog, Table::Checkpoints, Table::PublicKeys] {
        // SAFETY: opened and closed here, in the writer's transaction.
        let defect = unsafe {
            let rel = pg_sys::table_open(ids.table(t), pg_sys::AccessShareLock as pg_sys::LOCKMODE);
            let d = protect::table::defect(t, rel);
            pg_sys::table_close(rel, pg_sys::AccessShareLock as pg_sys::LOCKMODE);
            d
        };
        if let Some(what) = defect {
            return Start::Refusing(format!("{} is not as pg_custody created it: {what}", protect::label(t)));
        }
    }
    if let Some(sub) = protect::subscription_feeding(ids.table(Table::AuditLog)) {
        return Start::Refusing(format!(
            "custody.audit_log receives another server's records by logical replication (subscription \"{sub}\"): \
             it is a copy, and the writer does not append to a copy (docs/operations.md)"
        ));
    }
    // The head committed by the writer before this one (same server run), else the one the
    // file says was flushed; the former is never behind the latter. With it comes the Merkle
    // tree up to that head, so only the records after it are read.
    let (generation, committed) = queue.committed_head();
    let remembered = committed
        .map(|(seq, hash, merkle)| (Head { seq, hash }, true, merkle))
        .or_else(|| head::read().map(|r| (r.head, r.clean, r.merkle)));
    let resume = remembered.as_ref().and_then(|(h, _, m)| Some((*h, m.clone()?)));
    let (mut chain, last_command, read) = read_chain(resume);
    chain.generation = generation;
    pgrx::log!(
        "pg_custody writer: the chain head is seq {} ({read} records of custody.audit_log read to resume it)",
        chain.seq
    );
    let remembered = remembered.map(|(h, exact, m)| ((h, m), exact));
    let table = Head { seq: chain.seq, hash: chain.hash };
    let mut records = Vec::new();
    // A log that holds records and no head this writer remembers — a restore, a pg_upgrade,
    // a log created again after DROP EXTENSION, a head file removed — is adopted with a
    // record that says so, and names the previous chain (another cluster's or database's, or
    // this one's) and, when one was dropped here, where the dropped chain ended. With a
    // remembered head the check below raises its alarm instead, and a foreign log stays the
    // foreign chain it is (verification says so).
    let here = super::this_chain();
    let dropped = head::dropped();
    if remembered.is_none() && chain.seq > 0 {
        let from = super::log_chain().unwrap_or_else(|| here.clone());
        let h = handover_record(&from, &table, &here, dropped.as_ref());
        pgrx::log!("pg_custody writer: {}", h.message.as_deref().unwrap_or_default());
        records.push(h);
    } else if let Some(d) = dropped.as_ref().filter(|_| remembered.is_none()) {
        // A new chain where one was dropped: its first record says how the dropped one ended.
        records.push(system_record(
            CHAIN_DROPPED,
            Some(serde_json::json!([{
                "kind": "chain",
                "name": "dropped",
                "head_seq": d.head.seq,
                "head_hash": hex::encode(&d.head.hash),
            }])),
        ));
    }
    // The head the file names while this writer runs, until its own records are flushed:
    // the table's, or — when records are missing or rewritten — the remembered one, so that a
    // crash before the alarm is on disk raises it again.
    let mut keep = (table, Some(chain.merkle.clone()));
    if let Some(((r, merkle), exact)) = remembered {
        let check = head::compare(&r, &table, exact, hash_at);
        if matches!(check, Check::Missing { .. } | Check::Rewritten { .. }) {
            keep = (r, merkle);
        }
        if let Some(alarm) = alarm_record(&check, &table) {
            pgrx::warning!("pg_custody writer: {}", alarm.message.as_deref().unwrap_or_default());
            queue.set_text(crate::queue::Text::Alarm, alarm.message.as_deref().unwrap_or_default());
            records.push(alarm);
        }
        // Never reuse a seq the writer once stored: the missing ones stay missing.
        chain.seq = chain.seq.max(r.seq);
    }
    let previous = match last_command.as_deref() {
        None => "none",
        Some("WRITER STOP") => "stopped",
        Some(_) => "ended without WRITER STOP (server crash, or an error in the writer): records queued then may be lost",
    };
    let (system_identifier, database_oid) = identity();
    records.push(system_record(
        custody_chain::WRITER_START,
        Some(serde_json::json!([{
            "kind": "writer",
            "name": "start",
            "previous": previous,
            "system_identifier": system_identifier.to_string(),
            "database_oid": database_oid,
        }])),
    ));
    Start::Ready(chain, records, keep, read)
}

/// This cluster's system identifier and this database's OID.
fn identity() -> (u64, u32) {
    // SAFETY: plain reads of the control file's system identifier and this database's OID.
    unsafe { (pg_sys::GetSystemIdentifier(), u32::from(pg_sys::MyDatabaseId)) }
}


/// The CHAIN HANDOVER record: the chain `from`, whose head the table holds, goes on as the
/// chain of this cluster and database (docs/chain-format.md, "Hand-over").
/// Command of the record that starts a chain where one was dropped (custody.allow_drop).
pub const CHAIN_DROPPED: &str = "PREVIOUS CHAIN DROPPED";

fn handover_record(
    from: &custody_chain::ChainId,
    head: &Head,
    here: &custody_chain::ChainId,
    dropped: Option<&head::Remembered>,
) -> Captured {
    let (system_identifier, database_oid) = identity();
    let mut claim = serde_json::json!({
        "kind": "chain",
        "name": "handover",
        "from_genesis": hex::encode(&from.genesis),
        "from_head_seq": head.seq,
        "from_head_hash": hex::encode(&head.hash),
        "system_identifier": system_identifier.to_string(),
        "database_oid": database_oid,
    });
    if let Some((sys, db)) = from.origin.as_deref().and_then(custody_chain::note::parse_origin) {
        claim["from_system_identifier"] = serde_json::Value::String(sys.to_string());
        claim["from_database_oid"] = db.into();
    }
    if let Some(d) = dropped {
        claim["dropped_head_seq"] = d.head.seq.into();
        claim["dropped_head_hash"] = hex::encode(&d.head.hash).into();
    }
    let mut r = system_record(custody_chain::CHAIN_HANDOVER, Some(serde_json::json!([claim])));
    let why = if from.genesis == here.genesis {
        "the log holds this cluster's own chain, yet this server remembers no head of it: a restore of \
         its own dump, a log created again after DROP EXTENSION, or a head file removed"
    } else {
        "a restore or an upgrade: the log holds another cluster's or database's chain, and this \
         server remembers no head of its own"
    };
    let mut message = format!("{} continues the audit chain of {} after its record {} ({why})", here.label(), from.label(), head.seq);
    if let Some(d) = dropped {
        message += &format!("; a chain dropped here before ended at seq {}", d.head.seq);
    }
    r.message = Some(message);
    r
}

/// The chain as the table holds it: head, Merkle tree over every record hash, last
/// checkpoint, the command of the last record, and how many records were read for it.
///
/// `resume`: a head the writer remembers and the tree up to it. When the table still holds
/// that head (and the tree gives the root the latest checkpoint signed, checked at that
/// checkpoint's record whether it is at the head or after it), only the records after it are
/// read: a start costs what was stored since, not the whole log. Else the whole log is read. A frontier that does not match the records (a file edited by hand) can
/// only make later checkpoints' roots wrong, which verification reports; it hides nothing.
fn read_chain(resume: Option<(Head, MerkleBuilder)>) -> (Chain, Option<String>, u64) {
    // Bounded slices (read_slices): a log never analyzed yet estimates a third of itself for
    // `seq > $1`, and would be read by a sequential scan.
    let after = std::ffi::CString::new(format!(
        "SELECT seq, hash FROM {} WHERE seq OPERATOR(pg_catalog.>) $1 AND seq OPERATOR(pg_catalog.<=) $2 ORDER BY seq",
        sql_name(Table::AuditLog)
    ))
    .expect("no NUL");
    let max = std::ffi::CString::new(format!("SELECT pg_catalog.max(seq) FROM {}", sql_name(Table::AuditLog))).expect("no NUL");
    let next = std::ffi::CString::new(format!(
        "SELECT pg_catalog.min(seq) FROM {} WHERE seq OPERATOR(pg_catalog.>) $1",
        sql_name(Table::AuditLog)
    ))
    .expect("no NUL");
    let last = std::ffi::CString::new(format!("SELECT command FROM {} ORDER BY seq DESC LIMIT 1", sql_name(Table::AuditLog)))
        .expect("no NUL");
    let checkpointed = std::ffi::CString::new(format!(
        "SELECT seq, merkle_root FROM {} ORDER BY seq DESC LIMIT 1",
        sql_name(Table::Checkpoints)
    ))
    .expect("no NUL");
    let held = resume.as_ref().is_some_and(|(h, _)| h.seq == 0 || hash_at(h.seq) == Some(h.hash));
    Spi::connect(|client| {
        let log = protect::ids().map(|i| i.table(Table::AuditLog)).unwrap_or(pg_sys::InvalidOid);
        let (checkpoint_seq, checkpoint_root) = client
            .select(&*checkpointed, None, &[])
            .ok()
            .filter(|t| !t.is_empty())
            .map(|t| {
                let row = t.first();
                let seq = row.get::<i64>(1).ok().flatten().unwrap_or(0);
                let root = row.get::<Vec<u8>>(2).ok().flatten().unwrap_or_default();
                (seq, root)
            })
            .unwrap_or((0, Vec::new()));
        let resume = resume.filter(|_| held);
        let resumed = resume.is_some();
        let (from, mut chain) = match resume {
            Some((h, merkle)) => (h.seq, Chain { seq: h.seq, hash: h.hash, merkle, checkpointed: 0, log, generation: 0, pool: Default::default() }),
            None => (0, fresh(log)),
        };
        let last_seq = crate::own::select(client, &max, &[])
            .expect("read custody.audit_log")
            .first()
            .get_one::<i64>()
            .expect("read custody.audit_log")
            .unwrap_or(0);
        // A resumed tree that does not give the root the latest checkpoint signed, at the head
        // or after it (a head file edited by hand, maybe lagging behind the table after a
        // crash), is dropped for a full read.
        let signed = (checkpoint_seq, checkpoint_root.as_slice());
        let read = match read_slices(client, &after, &next, from, last_seq, &mut chain, resumed.then_some(signed)) {
            Ok(n) => n,
            Err(at) => {
                pgrx::warning!(
                    "pg_custody writer: the Merkle tree remembered at seq {from} does not give the root checkpoint {at} signed; reading the whole log"
                );
                chain = fresh(log);
                read_slices(client, &after, &next, 0, last_seq, &mut chain, None).expect("no check")
            }
        };
        let last = crate::own::select(client, &last, &[])
            .ok()
            .filter(|t| !t.is_empty())
            .and_then(|t| t.first().get_one::<String>().ok().flatten());
        chain.checkpointed = checkpoint_seq;
        (chain, last, read)
    })
}

/// An empty chain: genesis, no records.
fn fresh(log: pg_sys::Oid) -> Chain {
    Chain { seq: 0, hash: genesis(), merkle: MerkleBuilder::new(), checkpointed: 0, log, generation: 0, pool: Default::default() }
}

/// Pushes the records after `from` (up to `last_seq`, in seq order; records at seq 0 or below
/// are not part of the chain, which starts at 1) onto `chain`; how many were read. With
/// `signed` = (seq, root) of a checkpoint: Err(seq) when the tree does not give that root
/// once its record is pushed (or at once, when the checkpoint is at `from`).
fn read_slices(
    client: &pgrx::spi::SpiClient<'_>,
    after: &std::ffi::CStr,
    next: &std::ffi::CStr,
    from: i64,
    last_seq: i64,
    chain: &mut Chain,
    signed: Option<(i64, &[u8])>,
) -> Result<u64, i64> {
    // In slices of seq with both bounds: the planner takes the primary key for those whatever
    // the statistics say.
    const SLICE: i64 = 50_000;
    let check = |chain: &Chain, seq: i64| match signed {
        Some((at, root)) if at == seq && chain.merkle.root().as_slice() != root => Err(at),
        _ => Ok(()),
    };
    if from > 0 {
        check(chain, from)?;
    }
    let mut read = 0u64;
    let mut lo = from.max(0);
    while lo < last_seq {
        let hi = lo.saturating_add(SLICE).min(last_seq);
        let table = crate::own::select(client, after, &[lo.into(), hi.into()]).expect("read custody.audit_log");
        if table.is_empty() {
            // A stretch without records (seqs far apart, from a log edited by hand): on to
            // the next record there is, not slice by slice.
            let at = crate::own::select(client, next, &[hi.into()])
                .expect("read custody.audit_log")
                .first()
                .get_one::<i64>()
                .expect("read custody.audit_log");
            lo = at.map_or(last_seq, |s| s - 1);
            continue;
        }
        lo = hi;
        for row in table {
            let seq = row.get::<i64>(1).ok().flatten().unwrap_or_default();
            let h = row.get::<Vec<u8>>(2).ok().flatten().unwrap_or_default();
            let hash: Hash = h.try_into().unwrap_or([0u8; 32]);
            chain.merkle.push(&hash);
            chain.seq = seq;
            chain.hash = hash;
            read += 1;
            check(chain, seq)?;
        }
    }
    Ok(read)
}

/// The stored hash of record `seq`, if the table has it.
fn hash_at(seq: i64) -> Option<Hash> {
    let q = std::ffi::CString::new(format!("SELECT hash FROM {} WHERE seq OPERATOR(pg_catalog.=) $1", sql_name(Table::AuditLog)))
        .expect("no NUL");
    Spi::connect(|client| {
        client.select(&*q, None, &[seq.into()]).ok()?.first().get_one::<Vec<u8>>().ok().flatten()?.try_into().ok()
    })
}

/// The HEAD MISMATCH record for a table that does not hold what the writer stored.
fn alarm_record(check: &Check, table: &Head) -> Option<Captured> {
    let (from, to, expected, found, message) = match check {
        Check::Consistent => return None,
        Check::Missing { from, to, expected } => (
            *from,
            *to,
            *expected,
            table.hash,
            format!(
                "records {from}..{to} stored by the custody writer are missing from custody.audit_log \
                 (its head went back to seq {})",
                table.seq
            ),
        ),
        Check::Rewritten { expected, found } => (
            expected.seq,
            expected.seq,
            *expected,
            *found,
            format!("record {} of custody.audit_log is not the one the custody writer stored", expected.seq),
        ),
        Check::Appended { from, to, expected } => (
            *from,
            *to,
            *expected,
            table.hash,
            format!(
                "records {from}..{to} of custody.audit_log were added after seq {} while no custody writer ran",
                expected.seq
            ),
        ),
    };
    let mut r = system_record(
        "HEAD MISMATCH",
        Some(serde_json::json!([{
            "kind": "chain",
            "name": "head",
            "from": from,
            "to": to,
            "expected_seq": expected.seq,
            "expected_hash": hex::encode(&expected.hash),
            "found_seq": table.seq,
            "found_hash": hex::encode(&found),
        }])),
    );
    r.outcome = Outcome::Error;
    r.message = Some(message);
    Some(r)
}
