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
    /// field is the head to remember until those are on disk.
    Ready(Chain, Vec<Captured>, Head),
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
    let (mut chain, last_command) = read_chain();
    let table = Head { seq: chain.seq, hash: chain.hash };
    // The head committed by the writer before this one (same server run), else the one the
    // file says was flushed; the former is never behind the latter.
    let remembered = queue
        .committed_head()
        .map(|(seq, hash)| (Head { seq, hash }, true))
        .or_else(|| head::read().map(|r| (r.head, r.clean)));
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
    let mut keep = table;
    if let Some((r, exact)) = remembered {
        let check = head::compare(&r, &table, exact, hash_at);
        if matches!(check, Check::Missing { .. } | Check::Rewritten { .. }) {
            keep = r;
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
    Start::Ready(chain, records, keep)
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
/// checkpoint, and the command of the last record.
fn read_chain() -> (Chain, Option<String>) {
    let heads = std::ffi::CString::new(format!("SELECT seq, hash, command FROM {} ORDER BY seq", sql_name(Table::AuditLog)))
        .expect("no NUL");
    let checkpointed = std::ffi::CString::new(format!(
        "SELECT coalesce(pg_catalog.max(seq), 0)::pg_catalog.int8 FROM {}",
        sql_name(Table::Checkpoints)
    ))
    .expect("no NUL");
    Spi::connect(|client| {
        let log = protect::ids().map(|i| i.table(Table::AuditLog)).unwrap_or(pg_sys::InvalidOid);
        let mut chain = Chain { seq: 0, hash: genesis(), merkle: MerkleBuilder::new(), checkpointed: 0, log };
        let mut last = None;
        let mut cursor = client.open_cursor(&*heads, &[]);
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
                last = row.get::<String>(3).ok().flatten();
            }
        }
        chain.checkpointed = client
            .select(&*checkpointed, None, &[])
            .ok()
            .and_then(|t| t.first().get_one::<i64>().ok().flatten())
            .unwrap_or(0);
        (chain, last)
    })
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
