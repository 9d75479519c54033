//! Storing a batch of chained records in `custody.audit_log`, the way COPY FROM does it:
//! the table AM's multi-insert (one WAL record and one buffer lock per page, not per row),
//! then the indexes, with no parser, planner or executor per batch. The table is protected
//! (no triggers, rules or policies can exist on it) and every value comes from this
//! process, so there is nothing for the executor to add.
//!
//! jsonb and inet values are built by their input functions, the costliest step per record;
//! they repeat from record to record (the same statement touches the same objects), so the
//! built values are kept in a small cache keyed by their text.

use std::collections::HashMap;
use std::ffi::CString;

use pgrx::pg_sys;

use custody_chain::columns::Column;
use custody_chain::{Hash, Record};

use crate::capture::PG_EPOCH_OFFSET_US;
use crate::lend::{JsonLender, Key};
use crate::scan::column_positions;

/// Built inet values (varlena bytes, 8-byte aligned), by their text. Emptied between
/// batches when full, never during one (the batch's datums point into it). The JSON cache
/// follows the same rule (`JsonCache::get`).
const CACHE_ENTRIES: usize = 4096;
const CACHE_MAX_TEXT: usize = 4096;
static mut INET: Option<HashMap<String, Box<[u64]>>> = None;
static mut JSON: Option<JsonCache> = None;

/// A record to store: the record as hashed, its hashes, and its JSON values in the cache.
pub struct Row<'a> {
    pub rec: &'a Record,
    pub prev: Hash,
    pub hash: Hash,
    pub objects: JsonKey,
    pub decision: Option<JsonKey>,
}

/// The JSON values of records (objects, decision), by the text the session sent; built
/// into jsonb once, from the value's own serialization (what the verifier reads back).
pub struct JsonCache(JsonLender<String>);

pub type JsonKey = Key;

impl JsonCache {
    /// The writer's cache, started over first if it has grown past its size (between
    /// batches: the previous batch's datums are no longer in use).
    pub fn get() -> &'static mut JsonCache {
        #[allow(static_mut_refs)]
        // SAFETY: the writer is single-threaded and holds no other reference across calls.
        let c = unsafe { JSON.get_or_insert_with(|| JsonCache(JsonLender::new())) };
        c.0.trim();
        c
    }

    /// The cached value of `text`, parsed and written in canonical form the first time;
    /// None when `text` is not JSON. A NUL character in a string (`\u0000`, which a policy's
    /// message may carry) becomes U+FFFD: jsonb cannot hold it, and a record jsonb refuses
    /// would stop the writer. The record is hashed as stored.
    pub fn key(&mut self, text: &str) -> Option<JsonKey> {
        let key = self.0.find(text, text.len(), || {
            let mut v: serde_json::Value = serde_json::from_str(text).ok()?;
            if text.contains("\\u0000") {
                without_nul(&mut v);
            }
            Some(v)
        })?;
        let e = self.0.entry(key);
        if e.canonical.is_none() {
            let mut out = Vec::with_capacity(text.len());
            custody_chain::write_canonical_json(e.value(), &mut out);
            e.canonical = Some(out.into_boxed_slice());
        }
        Some(key)
    }

    /// The canonical text of a value `key` returned: what the record's hash covers.
    pub fn canonical(&self, key: JsonKey) -> &[u8] {
        self.0.get(key).canonical.as_deref().expect("written by JsonCache::key")
    }

    /// The jsonb datum of a value, built on first use (inside a transaction).
    ///
    /// # Safety
    /// In a transaction; the datum points into the cache, so it is used only before the cache
    /// is trimmed (within the batch).
    unsafe fn datum(&mut self, key: JsonKey) -> pg_sys::Datum {
        let e = self.0.entry(key);
        if e.derived.is_none() {
            // SAFETY: the caller is in a transaction; the input function returns a varlena.
            e.derived = Some(unsafe { copy_varlena(build(Input::Jsonb, &e.value().to_string())) });
        }
        pg_sys::Datum::from(e.derived.as_ref().expect("just built").as_ptr())
    }
}

/// Replaces NUL characters in the strings (and keys) of a JSON value.
fn without_nul(v: &mut serde_json::Value) {
    use serde_json::Value::*;
    match v {
        String(s) if s.contains('\0') => *s = s.replace('\0', "\u{FFFD}"),
        Array(a) => a.iter_mut().for_each(without_nul),
        Object(m) => {
            if m.keys().any(|k| k.contains('\0')) {
                let old = std::mem::take(m);
                for (k, mut x) in old {
                    without_nul(&mut x);
                    m.insert(k.replace('\0', "\u{FFFD}"), x);
                }
            } else {
                m.values_mut().for_each(without_nul);
            }
        }
        _ => {}
    }
}

#[derive(Clone, Copy)]
enum Input {
    Jsonb,
    Inet,
}

/// Inserts the batch. Runs inside the writer's transaction; an ERROR aborts the batch and
/// ends the worker, whose successor resumes from the table (writer/mod.rs).
///
/// # Safety
/// In a transaction, in the database holding `custody.audit_log`.
pub unsafe fn insert(rows: &[Row<'_>], json: &mut JsonCache) {
    #[allow(static_mut_refs)]
    // SAFETY: the writer is single-threaded.
    let inet = unsafe { INET.get_or_insert_with(HashMap::new) };
    if inet.len() >= CACHE_ENTRIES {
        inet.clear();
    }
    // SAFETY: in a transaction in the log's database (the caller's contract). The slots use
    // a copy of the descriptor, their value arrays have natts entries, and `attno` holds
    // attribute numbers below natts (scan::column_positions).
    unsafe {
        let relid = crate::scan::log_oid();
        if relid == pg_sys::InvalidOid {
            pgrx::error!("pg_custody writer: custody.audit_log does not exist");
        }
        pg_sys::PushActiveSnapshot(pg_sys::GetTransactionSnapshot());
        let rel = pg_sys::table_open(relid, pg_sys::RowExclusiveLock as pg_sys::LOCKMODE);
        // Nothing but pg_custody's own code may run while it inserts: no trigger, rule,
        // index expression or user-defined operator class (added while the library was not
        // loaded). The ERROR ends this writer; the next one refuses until it is restored.
        crate::protect::table::require(crate::protect::Table::AuditLog, rel);
        // Slots over a private copy of the descriptor: slots over the relcache's own
        // descriptor each pin it in the resource owner, whose release is linear per pin.
        let desc = pg_sys::CreateTupleDescCopy((*rel).rd_att);
        let ops = pg_sys::table_slot_callbacks(rel);
        let attno = column_positions(desc);
        crate::scan::check_other_columns_nullable(desc, &attno);
        let natts = (*desc).natts as usize;

        let estate = pg_sys::CreateExecutorState();
        let rri: *mut pg_sys::ResultRelInfo =
            pg_sys::palloc0(std::mem::size_of::<pg_sys::ResultRelInfo>()).cast();
        (*rri).type_ = pg_sys::NodeTag::T_ResultRelInfo;
        pg_sys::InitResultRelInfo(rri, rel, 1, std::ptr::null_mut(), 0);
        pg_sys::ExecOpenIndices(rri, false);

        let mut slots: Vec<*mut pg_sys::TupleTableSlot> = Vec::with_capacity(rows.len());
        for row in rows {
            let slot = pg_sys::MakeSingleTupleTableSlot(desc, ops);
            pg_sys::ExecClearTuple(slot);
            let values = std::slice::from_raw_parts_mut((*slot).tts_values, natts);
            let nulls = std::slice::from_raw_parts_mut((*slot).tts_isnull, natts);
            nulls.fill(true); // columns added by a later version and unknown here stay NULL
            for c in Column::ALL {
                if let Some(v) = datum(row, c, json, inet) {
                    values[attno[c]] = v;
                    nulls[attno[c]] = false;
                }
            }
            pg_sys::ExecStoreVirtualTuple(slot);
            slots.push(slot);
        }

        let cid = pg_sys::GetCurrentCommandId(true);
        pg_sys::table_multi_insert(rel, slots.as_mut_ptr(), slots.len() as i32, cid, 0, std::ptr::null_mut());
        for &slot in &slots {
            let conflicts = crate::pgver::insert_index_tuples(rri, slot, estate);
            if !conflicts.is_null() {
                pg_sys::list_free(conflicts);
            }
            pg_sys::ExecDropSingleTupleTableSlot(slot);
        }

        pg_sys::ExecCloseIndices(rri);
        pg_sys::table_close(rel, pg_sys::NoLock as pg_sys::LOCKMODE);
        pg_sys::FreeExecutorState(estate);
        pg_sys::PopActiveSnapshot();
    }
}

/// The row's value for column `c`; None is NULL (only for the columns that may be, see
/// custody_chain::columns). Varlena values are palloc'd in the transaction's memory or point
/// into the caches (table_multi_insert copies them).
///
/// # Safety
/// In a transaction; the datum is used before either cache is trimmed or cleared.
unsafe fn datum(
    row: &Row<'_>,
    c: Column,
    json: &mut JsonCache,
    inet: &mut HashMap<String, Box<[u64]>>,
) -> Option<pg_sys::Datum> {
    let r = row.rec;
    let ts = |us: i64| Some(pg_sys::Datum::from(us - PG_EPOCH_OFFSET_US));
    // SAFETY: in the writer's transaction (insert's contract), where varlena and the input
    // functions behind cached_inet and JsonCache::datum may palloc and raise.
    unsafe {
        let text = |s: &str| Some(varlena(s.as_bytes()));
        let opt_text = |s: &Option<String>| s.as_deref().and_then(text);
        match c {
            Column::Seq => Some(pg_sys::Datum::from(r.seq)),
            Column::EventTime => ts(r.event_time),
            Column::LoggedAt => ts(r.logged_at),
            Column::DatabaseName => text(&r.database_name),
            Column::SessionUserName => text(&r.session_user_name),
            Column::CurrentUserName => text(&r.current_user_name),
            Column::ClientAddr => r.client_addr.as_deref().map(|a| cached_inet(inet, a)),
            Column::ApplicationName => opt_text(&r.application_name),
            Column::BackendPid => Some(pg_sys::Datum::from(r.backend_pid)),
            Column::NestingLevel => Some(pg_sys::Datum::from(r.nesting_level)),
            Column::Xid => r.xid.map(pg_sys::Datum::from),
            Column::Class => text(&r.class),
            Column::Command => text(&r.command),
            Column::Objects => Some(json.datum(row.objects)),
            Column::Statement => opt_text(&r.statement),
            Column::StatementSha256 => r.statement_sha256.as_deref().map(|h| varlena(h)),
            Column::Rows => r.rows.map(pg_sys::Datum::from),
            Column::Outcome => text(&r.outcome),
            Column::Sqlstate => opt_text(&r.sqlstate),
            Column::Message => opt_text(&r.message),
            Column::Decision => row.decision.map(|k| json.datum(k)),
            Column::PrevHash => Some(varlena(&row.prev)),
            Column::Hash => Some(varlena(&row.hash)),
        }
    }
}

/// A text or bytea datum (the same varlena layout).
///
/// # Safety
/// In a transaction (the datum is palloc'd in the current memory context).
unsafe fn varlena(bytes: &[u8]) -> pg_sys::Datum {
    // Record strings are far below 1 GB: statements are truncated at max_statement_length.
    // SAFETY: `bytes` is a valid slice of the length passed; the copy goes to palloc'd memory.
    unsafe { pg_sys::Datum::from(pg_sys::cstring_to_text_with_len(bytes.as_ptr().cast(), bytes.len() as i32)) }
}

/// An inet datum, from the cache or built by its input function.
///
/// # Safety
/// In a transaction; the datum may point into `cache`, so it is used only while the entry
/// stays (the cache is not cleared during a batch).
unsafe fn cached_inet(cache: &mut HashMap<String, Box<[u64]>>, text: &str) -> pg_sys::Datum {
    if let Some(v) = cache.get(text) {
        return pg_sys::Datum::from(v.as_ptr());
    }
    // SAFETY: in a transaction (caller's contract).
    let built = unsafe { build(Input::Inet, text) };
    if text.len() > CACHE_MAX_TEXT {
        return built;
    }
    // SAFETY: inet_in just returned this varlena, in its plain 4-byte-header form.
    let copy = unsafe { copy_varlena(built) };
    let d = pg_sys::Datum::from(copy.as_ptr());
    cache.insert(text.to_owned(), copy);
    d
}

/// A varlena's bytes, copied into 8-byte-aligned memory owned by Rust.
///
/// # Safety
/// `d` is a valid, detoasted varlena datum.
unsafe fn copy_varlena(d: pg_sys::Datum) -> Box<[u64]> {
    // SAFETY: `d` is a detoasted varlena just returned by an input function.
    unsafe {
        let p = d.cast_mut_ptr::<u8>();
        let len = pgrx::varlena::varsize_any(p.cast());
        let mut words = vec![0u64; len.div_ceil(8)].into_boxed_slice();
        std::ptr::copy_nonoverlapping(p, words.as_mut_ptr().cast::<u8>(), len);
        words
    }
}

/// A jsonb or inet datum from its text, by the type's input function.
///
/// # Safety
/// In a transaction.
unsafe fn build(input: Input, text: &str) -> pg_sys::Datum {
    // Text from the capture path never holds NUL (wire.rs); map one to a clear error anyway.
    let c = CString::new(text).unwrap_or_else(|_| pgrx::error!("pg_custody writer: NUL in a {} value", match input {
        Input::Jsonb => "jsonb",
        Input::Inet => "inet",
    }));
    let (func, typ) = match input {
        Input::Jsonb => (pg_sys::F_JSONB_IN, pg_sys::JSONBOID),
        Input::Inet => (pg_sys::F_INET_IN, pg_sys::INETOID),
    };
    // SAFETY: a built-in input function called with a NUL-terminated C string that outlives
    // the call, its own type and typmod -1, in a transaction (caller's contract); bad input
    // raises an ERROR.
    unsafe { pg_sys::OidInputFunctionCall(pg_sys::Oid::from(func), c.as_ptr().cast_mut(), typ, -1) }
}
