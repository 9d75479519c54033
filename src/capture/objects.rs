//! The `objects` of a record: which relations and columns a statement touches, with the
//! privileges it needs on each, read from the range table and the catalog caches.

use std::ffi::CStr;

use pgrx::pg_sys;
use serde::Serialize;

/// One touched object. Fields are declared in alphabetical order so that serde writes the
/// canonical JSON form (sorted keys, no spaces) directly.
#[derive(Serialize, Debug, PartialEq)]
pub struct ObjectRef {
    pub columns: Vec<String>,
    pub kind: &'static str,
    pub name: String,
    pub privileges: Vec<&'static str>,
    pub schema: String,
}

/// What a range table says about a statement.
pub struct RangeInfo {
    pub objects: Vec<ObjectRef>,
    /// Every relation is in pg_catalog or information_schema (and there is at least one).
    pub catalog_only: bool,
    /// Some relation needs a privilege other than SELECT (the statement writes or locks).
    pub writes: bool,
}

pub fn to_json(objects: &[ObjectRef]) -> String {
    serde_json::to_string(objects).unwrap_or_else(|_| "[]".into())
}

/// What `describe` returns: the objects' JSON and the two flags of `RangeInfo`.
#[derive(Clone)]
pub struct Described {
    pub json: String,
    pub catalog_only: bool,
    pub writes: bool,
}

/// Range tables already described in this backend, by what the description depends on: the
/// relations' OIDs and kinds, the privileges and the column numbers. The names come from the
/// catalogs, so any relcache invalidation (a relation or column renamed, dropped or created;
/// PostgreSQL sends one for every change of pg_class or pg_attribute) and any change of a
/// schema forgets them all: what is returned is what the catalog caches say at that moment.
/// A statement run again (a prepared statement, a loop in a function) is described once.
type MemoMap = std::collections::HashMap<Vec<u64>, Described, foldhash::fast::RandomState>;
static mut MEMO: Option<MemoMap> = None;
/// Bumped by every `forget`: a description read while an invalidation arrived (catalog
/// lookups accept them) is returned but not kept.
static mut FORGOTTEN: u64 = 0;
const MEMO_ENTRIES: usize = 512;
/// Bytes the memo may hold (keys and JSON); a description larger than MEMO_LARGEST (a wide
/// partitioned table) is not kept: the memo is for the statements that run again and again.
const MEMO_BYTES: usize = 1 << 20;
const MEMO_LARGEST: usize = 16 << 10;
static mut MEMO_USED: usize = 0;

pub fn init() {
    // SAFETY: _PG_init; the callbacks live for the process.
    unsafe {
        pg_sys::CacheRegisterRelcacheCallback(Some(relcache_changed), pg_sys::Datum::from(0));
        pg_sys::CacheRegisterSyscacheCallback(
            pg_sys::SysCacheIdentifier::NAMESPACEOID as i32,
            Some(namespace_changed),
            pg_sys::Datum::from(0),
        );
    }
}

/// Forgets every description (names may have changed).
pub fn forget() {
    // SAFETY: single-threaded backend; no reference into the memo outlives a call of `describe`.
    #[allow(static_mut_refs)]
    unsafe {
        FORGOTTEN += 1;
        MEMO_USED = 0;
        if let Some(m) = MEMO.as_mut() {
            m.clear();
        }
    }
}

/// The relcache invalidation callback.
///
/// # Safety
/// Called only by PostgreSQL, as a registered relcache callback.
#[pgrx::pg_guard]
unsafe extern "C-unwind" fn relcache_changed(_arg: pg_sys::Datum, _relid: pg_sys::Oid) {
    forget();
}

/// The pg_namespace syscache callback.
///
/// # Safety
/// Called only by PostgreSQL, as a registered syscache callback.
#[pgrx::pg_guard]
unsafe extern "C-unwind" fn namespace_changed(_arg: pg_sys::Datum, _cache: i32, _hash: u32) {
    forget();
}

/// `from_range_table` as JSON, from the memo when this range table was described before.
///
/// # Safety
/// As `from_range_table`.
pub unsafe fn describe(rtable: *mut pg_sys::List, perm_infos: crate::pgver::PermInfos) -> Described {
    let mut key: Vec<u64> = Vec::with_capacity(16);
    // SAFETY: the caller's contract is range_table's.
    for rte in unsafe { crate::pgver::range_table(rtable, perm_infos) } {
        key.push(u64::from(u32::from(rte.relid)) | (u64::from(rte.relkind) << 32));
        key.push(rte.perms);
        for set in [rte.selected, rte.inserted, rte.updated] {
            // SAFETY: a Bitmapset of the statement's range table entry, or NULL.
            key.extend(unsafe { members(set) }.map(|m| m as u64));
            key.push(u64::MAX); // end of the set
        }
    }
    #[allow(static_mut_refs)]
    // SAFETY: single-threaded backend. The catalog lookups of from_range_table run before the
    // memo is touched: an invalidation they accept (clearing the memo) finds no borrow of it.
    unsafe {
        if let Some(d) = MEMO.as_ref().and_then(|m| m.get(&key)) {
            return d.clone();
        }
        let before = FORGOTTEN;
        let info = from_range_table(rtable, perm_infos);
        let d = Described { json: to_json(&info.objects), catalog_only: info.catalog_only, writes: info.writes };
        let size = d.json.len() + key.len() * 8;
        if FORGOTTEN != before || size > MEMO_LARGEST {
            return d;
        }
        let memo = MEMO.get_or_insert_with(MemoMap::default);
        if memo.len() >= MEMO_ENTRIES || MEMO_USED + size > MEMO_BYTES {
            memo.clear();
            MEMO_USED = 0;
        }
        MEMO_USED += size;
        memo.insert(key, d.clone());
        d
    }
}

const PRIVILEGES: [(u64, &str); 7] = [
    (pg_sys::ACL_SELECT as u64, "SELECT"),
    (pg_sys::ACL_INSERT as u64, "INSERT"),
    (pg_sys::ACL_UPDATE as u64, "UPDATE"),
    (pg_sys::ACL_DELETE as u64, "DELETE"),
    (pg_sys::ACL_TRUNCATE as u64, "TRUNCATE"),
    (pg_sys::ACL_REFERENCES as u64, "REFERENCES"),
    (pg_sys::ACL_TRIGGER as u64, "TRIGGER"),
];

pub fn relkind_name(relkind: u8) -> &'static str {
    match relkind {
        b'r' => "table",
        b'p' => "partitioned table",
        b'v' => "view",
        b'm' => "materialized view",
        b'f' => "foreign table",
        b'S' => "sequence",
        b'i' | b'I' => "index",
        b'c' => "composite type",
        b't' => "toast table",
        _ => "relation",
    }
}

/// Catalogs that hold data, not descriptions of objects: a read of them is never skipped as
/// a read of the catalogs (pg_authid's password hashes, large objects' contents, the column
/// values pg_statistic samples, user mappings' and subscriptions' connection passwords).
const DATA_CATALOGS: [u32; 6] = [
    1260, // pg_authid
    2613, // pg_largeobject
    2619, // pg_statistic
    3429, // pg_statistic_ext_data
    1418, // pg_user_mapping
    6100, // pg_subscription
];

/// The members of a Bitmapset, in ascending order.
///
/// # Safety
/// `set` is NULL (empty) or a valid Bitmapset that outlives the iterator.
unsafe fn members(set: *const pg_sys::Bitmapset) -> impl Iterator<Item = i32> {
    let mut m = -1;
    std::iter::from_fn(move || {
        // SAFETY: the caller's contract; bms_next_member only reads the set.
        m = unsafe { pg_sys::bms_next_member(set, m) };
        (m >= 0).then_some(m)
    })
}

/// Reads the relations of a range table.
///
/// # Safety
/// `rtable` must be a valid List of RangeTblEntry (or NIL) and `perm_infos` its permission
/// list, in a transaction.
pub unsafe fn from_range_table(rtable: *mut pg_sys::List, perm_infos: crate::pgver::PermInfos) -> RangeInfo {
    let mut objects = Vec::new();
    let mut catalog_only = true;
    let mut seen_relation = false;
    let mut writes = false;
    // SAFETY: the caller's contract is range_table's.
    for rte in unsafe { crate::pgver::range_table(rtable, perm_infos) } {
        seen_relation = true;
        // SAFETY: a syscache lookup in a transaction (caller's contract); a relation dropped
        // meanwhile gives InvalidOid, not an error.
        let nsp = unsafe { pg_sys::get_rel_namespace(rte.relid) };
        // SAFETY: a syscache lookup in a transaction; NULL for a missing schema (InvalidOid
        // included) or a palloc'd string, both of which `cstr` accepts.
        let schema = unsafe { cstr(pg_sys::get_namespace_name(nsp)) };
        if (nsp != pg_sys::Oid::from(pg_sys::PG_CATALOG_NAMESPACE) && schema != "information_schema")
            || DATA_CATALOGS.contains(&u32::from(rte.relid))
        {
            catalog_only = false;
        }
        // SAFETY: a syscache lookup in a transaction; NULL (relation gone) or a palloc'd string.
        let name = unsafe { cstr(pg_sys::get_rel_name(rte.relid)) };
        let mut privileges = Vec::new();
        let perms = rte.perms;
        writes |= perms & !(pg_sys::ACL_SELECT as u64) != 0;
        for (bit, label) in PRIVILEGES {
            if perms & bit != 0 {
                privileges.push(label);
            }
        }
        let mut columns = Vec::new();
        for set in [rte.selected, rte.inserted, rte.updated] {
            // SAFETY: a Bitmapset of the statement's range table entry, or NULL.
            for m in unsafe { members(set) } {
                let attnum = m + pg_sys::FirstLowInvalidHeapAttributeNumber;
                if attnum <= 0 {
                    continue; // whole-row or system column
                }
                // SAFETY: a syscache lookup in a transaction with missing_ok: NULL when the
                // column is gone, else a palloc'd string.
                let col = unsafe { cstr(pg_sys::get_attname(rte.relid, attnum as i16, true)) };
                if !col.is_empty() && !columns.contains(&col) {
                    columns.push(col);
                }
            }
        }
        // The same relation may appear several times (self-join): merge.
        if let Some(o) = objects
            .iter_mut()
            .find(|o: &&mut ObjectRef| o.schema == schema && o.name == name)
        {
            for p in privileges {
                if !o.privileges.contains(&p) {
                    o.privileges.push(p);
                }
            }
            for c in columns {
                if !o.columns.contains(&c) {
                    o.columns.push(c);
                }
            }
            continue;
        }
        objects.push(ObjectRef {
            columns,
            kind: relkind_name(rte.relkind),
            name,
            privileges,
            schema,
        });
    }
    RangeInfo { objects, catalog_only: seen_relation && catalog_only, writes }
}

/// The object a RangeVar names, if it exists (no lock taken, no error raised).
///
/// # Safety
/// `rv` must be a valid RangeVar or NULL, in a transaction.
pub unsafe fn from_range_var(rv: *mut pg_sys::RangeVar, privilege: &'static str) -> Option<ObjectRef> {
    if rv.is_null() {
        return None;
    }
    // SAFETY: `rv` is a valid RangeVar (checked non-NULL) and we are in a transaction (caller's
    // contract); NoLock with RVR_MISSING_OK returns InvalidOid for a missing relation and takes
    // no lock, and no callback is passed.
    let relid = unsafe {
        pg_sys::RangeVarGetRelidExtended(rv, pg_sys::NoLock as i32, pg_sys::RVROption::RVR_MISSING_OK, None, std::ptr::null_mut())
    };
    if relid == pg_sys::InvalidOid {
        // SAFETY: `rv` is a valid RangeVar, checked non-NULL above.
        let rv = unsafe { &*rv };
        return Some(ObjectRef {
            columns: Vec::new(),
            kind: "relation",
            // SAFETY: a RangeVar's relname and schemaname are NULL or NUL-terminated strings.
            name: unsafe { cstr(rv.relname) },
            privileges: vec![privilege],
            // SAFETY: as for relname.
            schema: unsafe { cstr(rv.schemaname) },
        });
    }
    // SAFETY: syscache lookups in a transaction (caller's contract) of a relation that existed
    // a moment ago; if it was dropped since, they return NULL / InvalidOid / '\0', which `cstr`
    // and get_namespace_name accept.
    unsafe {
        Some(ObjectRef {
            columns: Vec::new(),
            kind: relkind_name(pg_sys::get_rel_relkind(relid) as u8),
            name: cstr(pg_sys::get_rel_name(relid)),
            privileges: vec![privilege],
            schema: cstr(pg_sys::get_namespace_name(pg_sys::get_rel_namespace(relid))),
        })
    }
}

/// Copies a possibly-NULL C string.
///
/// # Safety
/// `p` must be NULL or a valid NUL-terminated string.
pub unsafe fn cstr(p: *const std::ffi::c_char) -> String {
    if p.is_null() {
        String::new()
    } else {
        // SAFETY: `p` is not NULL, so it is the NUL-terminated string the caller promised.
        lossy(unsafe { CStr::from_ptr(p) }).into_owned()
    }
}

/// A C string as text, invalid UTF-8 replaced by U+FFFD. Statement texts pass here on every
/// statement: `to_str` validates them at memory speed (its ASCII fast path), where
/// `to_string_lossy` alone walks them a byte at a time (3.6 % of the whole machine's samples
/// with 5.5 kB statements, docs/benchmarks.md); it runs only for text that is not UTF-8.
pub fn lossy(c: &CStr) -> std::borrow::Cow<'_, str> {
    match c.to_str() {
        Ok(s) => std::borrow::Cow::Borrowed(s),
        Err(_) => c.to_string_lossy(),
    }
}
