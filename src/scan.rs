//! Reading the audit log in seq order for the verifier and the export: an index scan of the
//! primary key, values taken from the tuples as they are. The SQL route (a cursor that turns
//! timestamps, jsonb and inet into text and back) cost more than the hashing it fed.
//!
//! jsonb values repeat from record to record, so their JSON form is kept in a small cache
//! keyed by the stored jsonb bytes (crate::lend); every record is still hashed in full.

use pgrx::pg_sys;

use custody_chain::columns::{Column, SqlType, COLUMNS, NCOLUMNS};
use custody_chain::Record;

use crate::capture::PG_EPOCH_OFFSET_US;
use crate::error::CustodyError;
use crate::lend::{JsonLender, Lent};
use crate::varlena::bytes;

/// Calls `f` with each record from..=to (to = None: to the end) in seq order, with its
/// stored prev_hash and hash, until `f` returns false. The caller needs SELECT on the table.
/// One `Record` is reused from row to row (its strings keep their buffers), and each JSON
/// value is lent to it from the cache while `f` runs.
pub fn for_each_record(from_seq: i64, to_seq: Option<i64>, mut f: impl FnMut(&Record, &[u8], &[u8]) -> bool) {
    // From the start of the chain, rows below seq 1 are read too: they are not part of the
    // chain, but queries of the log show them, so the verifier must see (and refuse) them.
    let from_seq = if from_seq <= 1 { i64::MIN } else { from_seq };
    // SAFETY: called from SQL functions, inside a transaction with an active snapshot. The
    // relation and index stay locked (AccessShareLock) until the end of the transaction.
    unsafe {
        let relid = log_oid();
        if relid == pg_sys::InvalidOid {
            CustodyError::NotInThisDatabase { table: "audit_log".into() }.report();
        }
        if pg_sys::pg_class_aclcheck(relid, pg_sys::GetUserId(), pg_sys::ACL_SELECT as pg_sys::AclMode)
            != pg_sys::AclResult::ACLCHECK_OK
        {
            CustodyError::LogNotReadable.report();
        }
        let lock = pg_sys::AccessShareLock as pg_sys::LOCKMODE;
        let rel = pg_sys::table_open(relid, lock);
        let desc = (*rel).rd_att;
        let col = column_positions(desc);
        let slot = pg_sys::table_slot_create(rel, std::ptr::null_mut());
        let row_cxt = pg_sys::AllocSetContextCreateInternal(
            pg_sys::CurrentMemoryContext,
            c"custody audit_log row".as_ptr(),
            0,
            pg_sys::ALLOCSET_DEFAULT_INITSIZE as usize,
            pg_sys::ALLOCSET_DEFAULT_MAXSIZE as usize,
        );
        let mut json_cache: JsonLender<Vec<u8>> = JsonLender::new();
        let mut rec = Record::default(); // reused: its strings keep their buffers
        let (mut prev, mut hash) = (Vec::with_capacity(32), Vec::with_capacity(32));

        // One record from the slot to `f`; false: stop.
        let mut handle = |slot: *mut pg_sys::TupleTableSlot| -> bool {
            pg_sys::slot_getallattrs(slot);
            let natts = (*desc).natts as usize;
            let values = std::slice::from_raw_parts((*slot).tts_values, natts);
            let nulls = std::slice::from_raw_parts((*slot).tts_isnull, natts);
            let v = |c: Column| (!nulls[col[c]]).then(|| values[col[c]]);
            let seq = v(Column::Seq).map_or(0, |d| d.value() as i64);
            if to_seq.is_some_and(|t| seq > t) {
                return false;
            }
            let old = pg_sys::CurrentMemoryContext;
            pg_sys::CurrentMemoryContext = row_cxt;
            // Wrapping: an infinite timestamp (tampering) then fails the hash, not the backend.
            let ts = |c: Column| v(c).map_or(0, |d| (d.value() as i64).wrapping_add(PG_EPOCH_OFFSET_US));
            let text = |c: Column, out: &mut String| set_text(out, v(c).map(|d| bytes(d)));
            let opt_text = |c: Column, out: &mut Option<String>| match v(c) {
                Some(d) => set_text(out.get_or_insert_with(String::new), Some(bytes(d))),
                None => *out = None,
            };
            rec.seq = seq;
            rec.event_time = ts(Column::EventTime);
            rec.logged_at = ts(Column::LoggedAt);
            text(Column::DatabaseName, &mut rec.database_name);
            text(Column::SessionUserName, &mut rec.session_user_name);
            text(Column::CurrentUserName, &mut rec.current_user_name);
            rec.client_addr = v(Column::ClientAddr).map(|d| {
                let host = pg_sys::OidFunctionCall1Coll(pg_sys::Oid::from(pg_sys::F_HOST), pg_sys::InvalidOid, d);
                String::from_utf8_lossy(bytes(host)).into_owned()
            });
            opt_text(Column::ApplicationName, &mut rec.application_name);
            rec.backend_pid = v(Column::BackendPid).map_or(0, |d| d.value() as i32);
            rec.nesting_level = v(Column::NestingLevel).map_or(0, |d| d.value() as i32);
            rec.xid = v(Column::Xid).map(|d| d.value() as i64);
            text(Column::Class, &mut rec.class);
            text(Column::Command, &mut rec.command);
            json_cache.trim(); // nothing is lent between rows
            let objects = v(Column::Objects).map(|d| lend_json(&mut json_cache, d, &mut rec.objects));
            if objects.is_none() {
                rec.objects = serde_json::Value::Null;
            }
            opt_text(Column::Statement, &mut rec.statement);
            rec.statement_sha256 = v(Column::StatementSha256).map(|d| bytes(d).to_vec());
            rec.rows = v(Column::Rows).map(|d| d.value() as i64);
            text(Column::Outcome, &mut rec.outcome);
            opt_text(Column::Sqlstate, &mut rec.sqlstate);
            opt_text(Column::Message, &mut rec.message);
            let decision = v(Column::Decision).map(|d| {
                let mut value = serde_json::Value::Null;
                let key = lend_json(&mut json_cache, d, &mut value);
                rec.decision = Some(value);
                key
            });
            if decision.is_none() {
                rec.decision = None;
            }
            prev.clear();
            prev.extend_from_slice(v(Column::PrevHash).map_or(&[][..], |d| bytes(d)));
            hash.clear();
            hash.extend_from_slice(v(Column::Hash).map_or(&[][..], |d| bytes(d)));
            pg_sys::CurrentMemoryContext = old;
            pg_sys::MemoryContextReset(row_cxt);
            let go_on = f(&rec, &prev, &hash);
            if let Some(key) = objects {
                json_cache.give_back(key, &mut rec.objects);
            }
            if let (Some(key), Some(value)) = (decision, rec.decision.as_mut()) {
                json_cache.give_back(key, value);
            }
            go_on
        };

        let snapshot = pg_sys::GetActiveSnapshot();
        let pk = seq_index(rel, col[Column::Seq]);
        if pk != pg_sys::InvalidOid {
            let irel = pg_sys::index_open(pk, lock);
            let mut key: pg_sys::ScanKeyData = std::mem::zeroed();
            pg_sys::ScanKeyInit(
                &mut key,
                1,
                pg_sys::BTGreaterEqualStrategyNumber as pg_sys::StrategyNumber,
                pg_sys::Oid::from(pg_sys::F_INT8GE),
                pg_sys::Datum::from(from_seq),
            );
            let scan = crate::pgver::index_beginscan(rel, irel, snapshot, 1);
            pg_sys::index_rescan(scan, &mut key, 1, std::ptr::null_mut(), 0);
            while pg_sys::index_getnext_slot(scan, pg_sys::ScanDirection::ForwardScanDirection, slot) {
                if !handle(slot) {
                    break;
                }
            }
            pg_sys::index_endscan(scan);
            pg_sys::index_close(irel, lock);
        } else {
            // The primary key is gone (dropped with the library unloaded: tampering, which is
            // what is being looked for). Let the planner order the row versions by seq and
            // fetch each by its ctid.
            let q = std::ffi::CString::new(format!(
                "SELECT ctid FROM {} WHERE seq OPERATOR(pg_catalog.>=) $1 ORDER BY seq, ctid",
                crate::protect::sql_name(crate::protect::Table::AuditLog)
            ))
            .expect("no NUL");
            crate::own::pinned(|| {
                pgrx::Spi::connect(|client| {
                    let mut cursor = crate::own::cursor(client, &q, &[from_seq.into()]);
                    'rows: loop {
                        let table = cursor.fetch(10_000)?;
                        if table.is_empty() {
                            break;
                        }
                        // The cursor may run under a newer snapshot than the one above: fetch
                        // with the latest, which sees every row version the cursor saw (the
                        // log is append-only while the library is loaded).
                        let latest = pg_sys::GetLatestSnapshot();
                        for row in table {
                            let Some(mut tid) = row.get::<pg_sys::ItemPointerData>(1)? else { continue };
                            if !pg_sys::table_tuple_fetch_row_version(rel, &mut tid, latest, slot) {
                                // Cannot happen while the library is loaded: the log is
                                // append-only, so a row version the cursor saw stays
                                // visible to a later snapshot. A bug: XX000.
                                pgrx::error!("custody.audit_log changed while it was being verified");
                            }
                            if !handle(slot) {
                                break 'rows;
                            }
                        }
                    }
                    Ok::<_, pgrx::spi::Error>(())
                })
            })
            // PostgreSQL's ERRORs are raised as they are; a spi::Error is pgrx's own (the
            // query is ours, its column a tid): a bug, XX000.
            .unwrap_or_else(|e| pgrx::error!("could not read custody.audit_log: {e}"));
        }

        pg_sys::MemoryContextDelete(row_cxt);
        pg_sys::ExecDropSingleTupleTableSlot(slot);
        pg_sys::table_close(rel, lock);
    }
}

/// custody.audit_log's OID (InvalidOid when pg_custody has no audit log in this database).
pub fn log_oid() -> pg_sys::Oid {
    crate::protect::ids().map(|i| i.table(crate::protect::Table::AuditLog)).unwrap_or(pg_sys::InvalidOid)
}

/// Why custody.audit_log is not as pg_custody created it, if it is not (inheritance children
/// whose rows appear in queries of it, row security hiding rows from auditors, triggers...):
/// verification reports it, since the records alone may verify.
pub fn log_defect() -> Option<String> {
    let relid = log_oid();
    if relid == pg_sys::InvalidOid {
        return None;
    }
    // SAFETY: opened and closed here, in a transaction.
    unsafe {
        let rel = pg_sys::table_open(relid, pg_sys::AccessShareLock as pg_sys::LOCKMODE);
        let why = crate::protect::table::defect(crate::protect::Table::AuditLog, rel);
        pg_sys::table_close(rel, pg_sys::AccessShareLock as pg_sys::LOCKMODE);
        why.map(|w| format!("{} is not as pg_custody created it: {w}", crate::protect::label(crate::protect::Table::AuditLog)))
    }
}

/// The table's primary key if it is what pg_custody created: a valid B-tree on `seq` alone
/// (0-based attribute `seq_att`) with int8's own ordering and no predicate; else InvalidOid.
/// Anything else (a key rebuilt while the library was unloaded with another operator class,
/// or made partial by editing the catalog, could order or hide rows) sends the verifier to
/// the fallback path, which reads every row and orders them itself.
///
/// # Safety
/// `rel` is an open relation, in a transaction.
unsafe fn seq_index(rel: pg_sys::Relation, seq_att: usize) -> pg_sys::Oid {
    // SAFETY: `rel` is open (caller's contract); the index is opened here and its relcache
    // fields read before it is closed (the lock kept to the end of the transaction). indkey,
    // rd_opcintype and rd_opfamily are read at position 0 only after `indnatts == 1` held
    // (the && chain stops first), and an index has at least one key column.
    unsafe {
        let pk = crate::pgver::primary_key_index(rel);
        if pk == pg_sys::InvalidOid {
            return pk;
        }
        let irel = pg_sys::index_open(pk, pg_sys::AccessShareLock as pg_sys::LOCKMODE);
        let index = &*(*irel).rd_index;
        let ok = (*(*irel).rd_rel).relam == pg_sys::BTREE_AM_OID
            && index.indisvalid
            && index.indisready
            && index.indislive
            && index.indisunique
            && index.indnatts == 1
            && *index.indkey.values.as_ptr() as usize == seq_att + 1
            && *(*irel).rd_opcintype == pg_sys::INT8OID
            && *(*irel).rd_opfamily == pg_sys::INTEGER_BTREE_FAM_OID
            && pg_sys::RelationGetIndexPredicate(irel).is_null();
        pg_sys::index_close(irel, pg_sys::NoLock as pg_sys::LOCKMODE);
        if ok { pk } else { pg_sys::InvalidOid }
    }
}

/// A text datum's bytes into `out`, reusing its buffer (invalid UTF-8 is replaced, which
/// then fails the hash: the writer stored valid text).
fn set_text(out: &mut String, bytes: Option<&[u8]>) {
    out.clear();
    if let Some(b) = bytes {
        match std::str::from_utf8(b) {
            Ok(t) => out.push_str(t),
            Err(_) => out.push_str(&String::from_utf8_lossy(b)),
        }
    }
}

/// The JSON value of a jsonb datum, through its text form.
///
/// # Safety
/// `d` is a non-NULL jsonb datum, in a transaction.
unsafe fn json_of(d: pg_sys::Datum) -> serde_json::Value {
    // SAFETY: jsonb_out of a jsonb datum returns a palloc'd C string.
    let text = unsafe {
        let c = pg_sys::OidOutputFunctionCall(pg_sys::Oid::from(pg_sys::F_JSONB_OUT), d);
        std::ffi::CStr::from_ptr(c).to_string_lossy().into_owned()
    };
    // A value that is not JSON cannot come from jsonb; keep it as a string so the hash fails.
    serde_json::from_str(&text).unwrap_or(serde_json::Value::String(text))
}

/// Lends the JSON value of a jsonb datum, by its stored bytes.
///
/// # Safety
/// `d` is a non-NULL jsonb datum valid while this runs, in a transaction.
unsafe fn lend_json(cache: &mut JsonLender<Vec<u8>>, d: pg_sys::Datum, out: &mut serde_json::Value) -> Lent {
    // SAFETY: `d` is a non-NULL varlena datum, valid while this runs (caller's contract).
    let raw = unsafe { bytes(d) };
    cache
        // SAFETY: the same jsonb datum, in a transaction (caller's contract).
        .lend(raw, raw.len(), out, || Some(unsafe { json_of(d) }))
        .expect("json_of always gives a value")
}

/// The type OID of a column type of the log (custody_chain::columns::SqlType).
fn type_oid(t: SqlType) -> pg_sys::Oid {
    match t {
        SqlType::Int8 => pg_sys::INT8OID,
        SqlType::Int4 => pg_sys::INT4OID,
        SqlType::Text => pg_sys::TEXTOID,
        SqlType::Bytea => pg_sys::BYTEAOID,
        SqlType::Jsonb => pg_sys::JSONBOID,
        SqlType::Inet => pg_sys::INETOID,
        SqlType::TimestampTz => pg_sys::TIMESTAMPTZOID,
    }
}

/// Where each column of the log (custody_chain::columns) is in a tuple descriptor of the
/// table: 0-based attribute numbers, indexed by `Column`. They differ from the columns'
/// own positions only if columns were dropped or added.
pub struct Positions([usize; NCOLUMNS]);

impl std::ops::Index<Column> for Positions {
    type Output = usize;
    fn index(&self, c: Column) -> &usize {
        &self.0[c.index()]
    }
}

impl Positions {
    /// Whether attribute `att` (0-based) holds one of the log's columns.
    fn holds(&self, att: usize) -> bool {
        self.0.contains(&att)
    }
}

/// The attribute of each column of the log. An ERROR if one is missing or has another type
/// (possible only if the table was altered while the library was not loaded): values are
/// read and written by their type, without the SQL layer's checks.
///
/// # Safety
/// `desc` is a valid tuple descriptor.
pub unsafe fn column_positions(desc: pg_sys::TupleDesc) -> Positions {
    // SAFETY: `desc` is valid (the caller's contract).
    match unsafe { positions(desc) } {
        Ok(pos) => pos,
        Err(what) => CustodyError::LogAltered { what }.report(),
    }
}

/// What is wrong with the log's columns, if anything (protect::table reports it).
///
/// # Safety
/// `desc` is a valid tuple descriptor.
pub unsafe fn column_defect(desc: pg_sys::TupleDesc) -> Option<String> {
    // SAFETY: `desc` is valid (the caller's contract), and so are the positions found in it.
    match unsafe { positions(desc) } {
        // SAFETY: the same descriptor, and `pos` came from it.
        Ok(pos) => unsafe { other_columns_defect(desc, &pos) },
        Err(what) => Some(what),
    }
}

/// The columns are found by name, so a table whose columns were reordered (dropped and
/// added again) is still read correctly; their types must be the ones pg_custody created.
///
/// # Safety
/// `desc` is a valid tuple descriptor.
unsafe fn positions(desc: pg_sys::TupleDesc) -> Result<Positions, String> {
    let mut pos = [usize::MAX; NCOLUMNS];
    // SAFETY: `desc` is valid (caller's contract) and i < natts; the attribute's name is a
    // NUL-terminated NameData.
    unsafe {
        for i in 0..(*desc).natts as usize {
            let att = crate::pgver::attr(desc, i);
            if att.attisdropped {
                continue;
            }
            let name = std::ffi::CStr::from_ptr(att.attname.data.as_ptr());
            if let Some(c) = Column::by_name(name.to_bytes()) {
                let want = type_oid(c.sql_type());
                if att.atttypid != want {
                    return Err(format!("column {} has type {}, not {}", c.name(), u32::from(att.atttypid), u32::from(want)));
                }
                pos[c.index()] = i;
            }
        }
    }
    if let Some(k) = pos.iter().position(|&p| p == usize::MAX) {
        return Err(format!("it has no column {}", COLUMNS[k].name));
    }
    Ok(Positions(pos))
}

/// Columns other than the log's own (added by a later version, or by someone with the
/// library unloaded) are left NULL by the writer: refuse to write if that would break a
/// constraint.
///
/// # Safety
/// `desc` is a valid tuple descriptor; `pos` came from `column_positions(desc)`.
pub unsafe fn check_other_columns_nullable(desc: pg_sys::TupleDesc, pos: &Positions) {
    // SAFETY: `desc` is valid and `pos` was found in it (the caller's contract).
    if let Some(what) = unsafe { other_columns_defect(desc, pos) } {
        CustodyError::LogAltered { what }.report();
    }
}

/// The first column the writer leaves NULL that may not be NULL, if any.
///
/// # Safety
/// `desc` is a valid tuple descriptor and `pos` was found in it.
unsafe fn other_columns_defect(desc: pg_sys::TupleDesc, pos: &Positions) -> Option<String> {
    // SAFETY: `desc` is valid (caller's contract) and i < natts; the attribute's name is a
    // NUL-terminated NameData.
    unsafe {
        for i in 0..(*desc).natts as usize {
            let att = crate::pgver::attr(desc, i);
            if !att.attisdropped && !pos.holds(i) && (att.attnotnull || att.atthasdef || att.attgenerated != 0) {
                let name = std::ffi::CStr::from_ptr(att.attname.data.as_ptr()).to_string_lossy();
                return Some(format!("column {name} is not one pg_custody writes, and it is NOT NULL, has a default or is generated"));
            }
        }
    }
    None
}

#[cfg(any(test, feature = "pg_test"))]
#[pgrx::pg_schema]
mod tests {
    use custody_chain::columns::{Column, COLUMNS};
    use pgrx::prelude::*;

    /// The table sql/bootstrap.sql created has exactly the columns of custody_chain::columns:
    /// the same names, types and nullability, in the same order; and the server-side lookup
    /// finds each column at its own position, with nothing to report.
    #[pg_test]
    fn audit_log_is_created_as_the_row_definition_says() {
        let got: Vec<(String, String, bool)> = Spi::connect(|client| {
            client
                .select(
                    "SELECT attname::text, pg_catalog.format_type(atttypid, atttypmod), NOT attnotnull \
                     FROM pg_catalog.pg_attribute \
                     WHERE attrelid = 'custody.audit_log'::pg_catalog.regclass AND attnum > 0 AND NOT attisdropped \
                     ORDER BY attnum",
                    None,
                    &[],
                )?
                .map(|row| {
                    Ok((
                        row.get::<String>(1)?.unwrap_or_default(),
                        row.get::<String>(2)?.unwrap_or_default(),
                        row.get::<bool>(3)?.unwrap_or_default(),
                    ))
                })
                .collect::<Result<_, pgrx::spi::Error>>()
        })
        .unwrap();
        let want: Vec<(String, String, bool)> =
            COLUMNS.iter().map(|c| (c.name.to_string(), c.sql_type.name().to_string(), c.nullable)).collect();
        assert_eq!(got, want);

        let relid = super::log_oid();
        assert_ne!(relid, pg_sys::InvalidOid);
        // SAFETY: in the test's transaction; the relation is opened and closed here.
        unsafe {
            let lock = pg_sys::AccessShareLock as pg_sys::LOCKMODE;
            let rel = pg_sys::table_open(relid, lock);
            let desc = (*rel).rd_att;
            assert_eq!((*desc).natts as usize, COLUMNS.len());
            let pos = super::column_positions(desc);
            for c in Column::ALL {
                assert_eq!(pos[c], c.index(), "{}", c.name());
            }
            assert_eq!(super::column_defect(desc), None);
            pg_sys::table_close(rel, lock);
        }
    }
}
