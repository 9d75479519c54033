//! Direct DML on system catalogs (`UPDATE pg_class ...`, `DELETE FROM pg_depend ...`),
//! checked row by row once the statement has run and before anything else can see it.
//!
//! A row may not be inserted, updated or deleted when it (old or new version) describes
//! - a built-in object: its own OID is below FirstNormalObjectId (the functions, operators,
//!   types and catalogs every pinned query of pg_custody resolves to), or
//! - one of pg_custody's objects: any of its OID columns names the extension, its schema, a
//!   member object, or a protected table's index, TOAST table or row type.
//!
//! Rows of users' objects stay editable, as PostgreSQL's own regression suite edits them, and so
//! do the statistics columns of a built-in relation's pg_class row (relpages, reltuples,
//! relallvisible: an UPDATE that changes nothing else), which the suite also sets directly.
//!
//! The check reads the catalog with SnapshotAny for the row versions the statement's command
//! created or deleted (their xmin or xmax is this transaction, their cmin or cmax the
//! command). Catalog DML is rare; the scan is paid only by it.

use pgrx::pg_sys;

use super::{ids, Ids, TABLES};
use crate::capture::objects::cstr;
use crate::error::CustodyError;

/// Catalog OIDs pgrx 0.18 does not bind (catalog/pg_depend.h, pg_shdepend.h).
const DEPEND_RELATION: pg_sys::Oid = pg_sys::Oid::from_u32(2608);
const SHARED_DEPEND_RELATION: pg_sys::Oid = pg_sys::Oid::from_u32(1214);
/// pg_depend's index on (refclassid, refobjid, refobjsubid).
const DEPEND_REFERENCE_INDEX: u32 = 2674;
/// pg_depend's attributes read here.
const ANUM_OBJID: i32 = 2;
const ANUM_DEPTYPE: i32 = 7;

/// Types whose values are object OIDs.
const OID_TYPES: [pg_sys::Oid; 12] = [
    pg_sys::OIDOID,
    pg_sys::REGPROCOID,
    pg_sys::REGPROCEDUREOID,
    pg_sys::REGOPEROID,
    pg_sys::REGOPERATOROID,
    pg_sys::REGCLASSOID,
    pg_sys::REGTYPEOID,
    pg_sys::REGCONFIGOID,
    pg_sys::REGDICTIONARYOID,
    pg_sys::REGROLEOID,
    pg_sys::REGNAMESPACEOID,
    pg_sys::REGCOLLATIONOID,
];

/// Whether the statement's range table modifies a system catalog: then `check` runs when it
/// finishes. Returns the catalogs.
///
/// # Safety
/// `rtable` is a valid List of RangeTblEntry or NIL, and `perm_infos` its permission list.
pub unsafe fn modified_catalogs(rtable: *mut pg_sys::List, perm_infos: crate::pgver::PermInfos) -> Vec<pg_sys::Oid> {
    let modify = (pg_sys::ACL_INSERT | pg_sys::ACL_UPDATE | pg_sys::ACL_DELETE) as u64;
    let mut out = Vec::new();
    // SAFETY: the caller's contract is range_table's.
    for rte in unsafe { crate::pgver::range_table(rtable, perm_infos) } {
        // SAFETY: a pure test of the OID range.
        if rte.perms & modify != 0 && unsafe { pg_sys::IsCatalogRelationOid(rte.relid) } && !out.contains(&rte.relid) {
            out.push(rte.relid);
        }
    }
    out
}

/// Every OID that describes one of pg_custody's objects, as the catalog stood before the
/// command now finishing (the catalog snapshot does not see its changes yet).
///
/// # Safety
/// In a transaction.
unsafe fn own_oids(ids: &Ids) -> Vec<pg_sys::Oid> {
    let mut oids = vec![ids.ext, ids.nsp];
    // SAFETY: in a transaction (caller's contract). pg_depend is opened and closed with the
    // same lock; the scan keys outlive the scan; each tuple is read with pg_depend's own
    // descriptor before the next getnext (deptype and objid are NOT NULL, by value). The
    // relcache entries are NULL-checked and closed after their fields and index lists (fresh
    // palloc'd OID lists) are read.
    unsafe {
        // The extension's members: tables, views, functions, types.
        let dep = pg_sys::table_open(DEPEND_RELATION, pg_sys::AccessShareLock as pg_sys::LOCKMODE);
        let mut keys: [pg_sys::ScanKeyData; 2] = std::mem::zeroed();
        pg_sys::ScanKeyInit(&mut keys[0], 4, pg_sys::BTEqualStrategyNumber as u16, pg_sys::Oid::from(pg_sys::F_OIDEQ), pg_sys::Datum::from(pg_sys::ExtensionRelationId));
        pg_sys::ScanKeyInit(&mut keys[1], 5, pg_sys::BTEqualStrategyNumber as u16, pg_sys::Oid::from(pg_sys::F_OIDEQ), pg_sys::Datum::from(ids.ext));
        let scan = pg_sys::systable_beginscan(dep, pg_sys::Oid::from(DEPEND_REFERENCE_INDEX), true, std::ptr::null_mut(), 2, keys.as_mut_ptr());
        loop {
            let tup = pg_sys::systable_getnext(scan);
            if tup.is_null() {
                break;
            }
            let desc = (*dep).rd_att;
            let mut isnull = false;
            let deptype = pg_sys::heap_getattr(tup, ANUM_DEPTYPE, desc, &mut isnull).value() as u8;
            if deptype == b'e' {
                oids.push(pg_sys::Oid::from(pg_sys::heap_getattr(tup, ANUM_OBJID, desc, &mut isnull).value() as u32));
            }
        }
        pg_sys::systable_endscan(scan);
        pg_sys::table_close(dep, pg_sys::AccessShareLock as pg_sys::LOCKMODE);
        // What belongs to each protected table without being a member itself.
        for t in TABLES {
            let relid = ids.table(t);
            if relid == pg_sys::InvalidOid {
                continue;
            }
            oids.push(relid);
            let rel = pg_sys::RelationIdGetRelation(relid);
            if rel.is_null() {
                continue;
            }
            oids.push((*(*rel).rd_rel).reltype);
            let toast = (*(*rel).rd_rel).reltoastrelid;
            if toast != pg_sys::InvalidOid {
                oids.push(toast);
                oids.push(pg_sys::get_rel_type_id(toast));
                let trel = pg_sys::RelationIdGetRelation(toast);
                if !trel.is_null() {
                    oids.extend(super::utility::list_oids(pg_sys::RelationGetIndexList(trel)));
                    pg_sys::RelationClose(trel);
                }
            }
            oids.extend(super::utility::list_oids(pg_sys::RelationGetIndexList(rel)));
            pg_sys::RelationClose(rel);
        }
    }
    oids.retain(|&o| o != pg_sys::InvalidOid);
    oids.sort_by_key(|o| u32::from(*o));
    oids.dedup();
    oids
}

/// Checks the rows of `catalog` that command `cid` of this transaction inserted, updated or
/// deleted; raises the refusal for the first one that may not change.
///
/// # Safety
/// In the transaction that ran the command, after it ran and before the next command.
pub unsafe fn check(catalog: pg_sys::Oid, cid: pg_sys::CommandId) {
    let own = match ids() {
        // SAFETY: in a transaction (caller's contract).
        Some(i) => unsafe { own_oids(&i) },
        None => Vec::new(),
    };
    // SAFETY: in the command's transaction (caller's contract); `catalog` is a catalog the
    // statement just modified, opened here with AccessShareLock and closed after the scan. Each
    // tuple from heap_getnext stays valid (its buffer pinned) until the next call, and is
    // deformed into arrays of the descriptor's `natts` entries. SnapshotAnyData is a static
    // PostgreSQL never frees.
    unsafe {
        let rel = pg_sys::table_open(catalog, pg_sys::AccessShareLock as pg_sys::LOCKMODE);
        let desc = (*rel).rd_att;
        let natts = (*desc).natts as usize;
        let identity = identity_column(catalog, desc);
        let scan = pg_sys::heap_beginscan(
            rel,
            std::ptr::addr_of_mut!(pg_sys::SnapshotAnyData),
            0,
            std::ptr::null_mut(),
            std::ptr::null_mut(),
            pg_sys::ScanOptions::SO_TYPE_SEQSCAN | pg_sys::ScanOptions::SO_ALLOW_PAGEMODE,
        );
        let mut values = vec![pg_sys::Datum::from(0); natts];
        let mut nulls = vec![false; natts];
        let mut refusal = None;
        // pg_class rows of built-in relations whose statistics alone may have changed: (OID,
        // old or new version, what else the row says, the refusal if not).
        let statistics = if catalog == pg_sys::RelationRelationId { statistics_columns(desc) } else { Vec::new() };
        let mut stats_only: Vec<(u32, bool, Vec<u8>, String)> = Vec::new();
        loop {
            let tup = pg_sys::heap_getnext(scan, pg_sys::ScanDirection::ForwardScanDirection);
            if tup.is_null() {
                break;
            }
            let Some(created) = changed_by(&*(*tup).t_data, cid) else { continue };
            pg_sys::heap_deform_tuple(tup, desc, values.as_mut_ptr(), nulls.as_mut_ptr());
            match row_refusal(desc, &values, &nulls, identity, &own) {
                None => {}
                Some(Refusal::BuiltIn(oid, why)) if !statistics.is_empty() => {
                    stats_only.push((oid, created, row_bytes(desc, &values, &nulls, &statistics), why));
                }
                Some(Refusal::BuiltIn(_, why) | Refusal::Own(why)) => {
                    refusal = Some(why);
                    break;
                }
            }
        }
        pg_sys::heap_endscan(scan);
        if refusal.is_none() {
            refusal = statistics_refusal(stats_only);
        }
        let name = cstr(pg_sys::get_rel_name(catalog));
        pg_sys::table_close(rel, pg_sys::AccessShareLock as pg_sys::LOCKMODE);
        if let Some(what) = refusal {
            CustodyError::CatalogRow { catalog: format!("pg_catalog.{name}"), what }.report();
        }
    }
}

/// pg_class's statistics columns (ANALYZE and VACUUM maintain them; PostgreSQL's regression
/// suite sets them directly): a built-in relation's row may change in them and nothing else.
/// Their positions in `desc`.
///
/// # Safety
/// `desc` is pg_class's valid tuple descriptor.
unsafe fn statistics_columns(desc: pg_sys::TupleDesc) -> Vec<usize> {
    const NAMES: [&str; 4] = ["relpages", "reltuples", "relallvisible", "relallfrozen"];
    // SAFETY: `desc` is valid (caller's contract) and i < natts; attname is a NameData,
    // NUL-terminated within its NAMEDATALEN bytes.
    (0..unsafe { (*desc).natts } as usize)
        .filter(|&i| NAMES.contains(&unsafe { cstr(crate::pgver::attr(desc, i).attname.data.as_ptr()) }.as_str()))
        .collect()
}

/// Everything a row version says but the columns `skip`, as bytes (equal bytes: equal rows).
///
/// # Safety
/// `desc` is the descriptor `values`/`nulls` were deformed with, the tuple still pinned.
unsafe fn row_bytes(desc: pg_sys::TupleDesc, values: &[pg_sys::Datum], nulls: &[bool], skip: &[usize]) -> Vec<u8> {
    let mut out = Vec::new();
    for i in (0..values.len()).filter(|i| !skip.contains(i)) {
        // SAFETY: i < natts of `desc` (caller's contract).
        let a = unsafe { crate::pgver::attr(desc, i) };
        out.push(u8::from(nulls[i]));
        if nulls[i] {
            continue;
        }
        let d = values[i];
        if a.attbyval {
            out.extend_from_slice(&d.value().to_ne_bytes());
        } else {
            let p = d.cast_mut_ptr::<u8>();
            // SAFETY: a by-reference datum of the pinned tuple: `attlen` bytes, a varlena of
            // its own size (VARSIZE_ANY), or a NUL-terminated cstring.
            let len = unsafe {
                match a.attlen {
                    -1 => pgrx::varlena::varsize_any(p.cast()),
                    -2 => std::ffi::CStr::from_ptr(p.cast()).to_bytes().len(),
                    n => n as usize,
                }
            };
            out.extend_from_slice(&(len as u64).to_ne_bytes());
            // SAFETY: `len` bytes at `p`, as computed above.
            out.extend_from_slice(unsafe { std::slice::from_raw_parts(p, len) });
        }
    }
    out
}

/// pg_class rows of built-in relations that changed: allowed only when each is one update
/// (its old and new version) that changed nothing but statistics.
fn statistics_refusal(mut rows: Vec<(u32, bool, Vec<u8>, String)>) -> Option<String> {
    rows.sort_by_key(|r| (r.0, r.1));
    let mut i = 0;
    while i < rows.len() {
        let same_oid = rows[i..].iter().take_while(|r| r.0 == rows[i].0).count();
        let pair = &rows[i..i + same_oid];
        let statistics_only = same_oid == 2 && !pair[0].1 && pair[1].1 && pair[0].2 == pair[1].2;
        if !statistics_only {
            return Some(pair[0].3.clone());
        }
        i += same_oid;
    }
    None
}

/// Whether a row version was created (`Some(true)`) or deleted (`Some(false)`) by command
/// `cid` of this transaction.
///
/// # Safety
/// `h` is the header of a heap tuple read in a transaction, its buffer pinned.
unsafe fn changed_by(h: &pg_sys::HeapTupleHeaderData, cid: pg_sys::CommandId) -> Option<bool> {
    // SAFETY: `h` is a live tuple header in a transaction (caller's contract).
    // HeapTupleHeaderGetCmin/Cmax are only asked once xmin/xmax is known to be this
    // transaction's, as they require; HeapTupleGetUpdateXid only for a multixact xmax.
    unsafe {
        let mask = h.t_infomask as u32;
        // HeapTupleHeaderGetRawXmin / HeapTupleHeaderXminInvalid (access/htup_details.h).
        let xmin = h.t_choice.t_heap.t_xmin;
        let xmin_invalid = mask & (pg_sys::HEAP_XMIN_COMMITTED | pg_sys::HEAP_XMIN_INVALID) == pg_sys::HEAP_XMIN_INVALID;
        if !xmin_invalid
            && pg_sys::TransactionIdIsCurrentTransactionId(xmin)
            && pg_sys::HeapTupleHeaderGetCmin(h as *const _ as *mut _) == cid
        {
            return Some(true);
        }
        if mask & pg_sys::HEAP_XMAX_INVALID != 0 || locked_only(mask) {
            return None;
        }
        let xmax = if mask & pg_sys::HEAP_XMAX_IS_MULTI != 0 {
            pg_sys::HeapTupleGetUpdateXid(h as *const _ as *mut _)
        } else {
            h.t_choice.t_heap.t_xmax
        };
        (xmax != pg_sys::InvalidTransactionId
            && pg_sys::TransactionIdIsCurrentTransactionId(xmax)
            && pg_sys::HeapTupleHeaderGetCmax(h as *const _ as *mut _) == cid)
            .then_some(false)
    }
}

/// HEAP_XMAX_IS_LOCKED_ONLY (access/htup_details.h): xmax only locks the row.
fn locked_only(mask: u32) -> bool {
    mask & pg_sys::HEAP_XMAX_LOCK_ONLY != 0
        || mask & (pg_sys::HEAP_XMAX_IS_MULTI | pg_sys::HEAP_LOCK_MASK) == pg_sys::HEAP_XMAX_EXCL_LOCK
}

/// The column holding the OID of the object a row describes: `oid` where the catalog has
/// one, else the first OID column (pg_attribute.attrelid, pg_index.indexrelid, ...), except
/// the dependency catalogs, whose first column is a catalog's OID.
///
/// # Safety
/// `desc` is the valid tuple descriptor of an open relation.
unsafe fn identity_column(catalog: pg_sys::Oid, desc: pg_sys::TupleDesc) -> Option<usize> {
    // SAFETY: `desc` is a valid tuple descriptor (caller's contract).
    let natts = unsafe { (*desc).natts } as usize;
    // SAFETY: called only with i < natts of the valid descriptor.
    let att = |i: usize| unsafe { crate::pgver::attr(desc, i) };
    // SAFETY: attname is a NameData, NUL-terminated within its NAMEDATALEN bytes.
    let named = |n: &str| (0..natts).find(|&i| unsafe { cstr(att(i).attname.data.as_ptr()) } == n);
    if let Some(i) = named("oid") {
        return Some(i);
    }
    if catalog == DEPEND_RELATION || catalog == SHARED_DEPEND_RELATION {
        return named("objid");
    }
    (0..natts).find(|&i| OID_TYPES.contains(&att(i).atttypid))
}

/// Why a row may not change.
enum Refusal {
    /// It describes the built-in object with this OID.
    BuiltIn(u32, String),
    /// It names one of pg_custody's objects.
    Own(String),
}

/// Why this row may not change, if it may not.
///
/// # Safety
/// `desc` is the valid tuple descriptor `values` and `nulls` (of its `natts` length) were
/// deformed with, and the deformed tuple is still pinned.
unsafe fn row_refusal(
    desc: pg_sys::TupleDesc,
    values: &[pg_sys::Datum],
    nulls: &[bool],
    identity: Option<usize>,
    own: &[pg_sys::Oid],
) -> Option<Refusal> {
    if let Some(i) = identity {
        let oid = pg_sys::Oid::from(values[i].value() as u32);
        if !nulls[i] && u32::from(oid) < pg_sys::FirstNormalObjectId {
            let why = format!("the row describes built-in object {} (OID below {})", u32::from(oid), pg_sys::FirstNormalObjectId);
            // A built-in row that also names pg_custody's objects is refused as such.
            // SAFETY: the caller's contract is own_column's.
            return Some(match unsafe { own_column(desc, values, nulls, own) } {
                Some(own_why) => Refusal::Own(own_why),
                None => Refusal::BuiltIn(u32::from(oid), why),
            });
        }
    }
    // SAFETY: the caller's contract is own_column's.
    unsafe { own_column(desc, values, nulls, own) }.map(Refusal::Own)
}

/// The first column of this row that names one of pg_custody's objects, as a refusal.
///
/// # Safety
/// As `row_refusal`.
unsafe fn own_column(desc: pg_sys::TupleDesc, values: &[pg_sys::Datum], nulls: &[bool], own: &[pg_sys::Oid]) -> Option<String> {
    // SAFETY: called only with i < values.len(), which is `desc`'s natts (caller's contract).
    let att = |i: usize| unsafe { crate::pgver::attr(desc, i) };
    for i in 0..values.len() {
        let a = att(i);
        if nulls[i] || a.attisdropped {
            continue;
        }
        let hit = if OID_TYPES.contains(&a.atttypid) {
            own.binary_search_by_key(&(values[i].value() as u32), |o| u32::from(*o)).is_ok()
        } else if a.atttypid == pg_sys::OIDVECTOROID {
            // SAFETY: oidvector is stored plain (never toasted or packed) in catalogs.
            let v = unsafe { &*(values[i].cast_mut_ptr::<pg_sys::oidvector>()) };
            let n = v.dim1.max(0) as usize;
            // SAFETY: an oidvector holds dim1 OIDs right after its header.
            let elems = unsafe { v.values.as_slice(n) };
            elems.iter().any(|e| own.binary_search_by_key(&u32::from(*e), |o| u32::from(*o)).is_ok())
        } else {
            false
        };
        if hit {
            // SAFETY: attname is a NameData, NUL-terminated within its NAMEDATALEN bytes.
            let col = unsafe { cstr(a.attname.data.as_ptr()) };
            return Some(format!("column {col} names one of pg_custody's objects"));
        }
    }
    None
}

/// Statements running that modify catalogs: (QueryDesc key, command id, catalogs).
static mut WATCHED: Vec<(usize, pg_sys::CommandId, Vec<pg_sys::Oid>)> = Vec::new();

/// Remembers that the statement `key` (command `cid`) modifies `catalogs`.
#[allow(static_mut_refs)]
pub fn watch(key: usize, cid: pg_sys::CommandId, catalogs: Vec<pg_sys::Oid>) {
    // SAFETY: single-threaded backend.
    unsafe { WATCHED.push((key, cid, catalogs)) };
}

/// The statement `key` has run (ExecutorFinish): check what it changed.
#[allow(static_mut_refs)]
pub fn finished(key: usize) {
    // SAFETY: single-threaded backend; the entry is taken out before checking, so an ERROR
    // leaves nothing behind.
    let entry = unsafe {
        if WATCHED.is_empty() {
            return;
        }
        let Some(i) = WATCHED.iter().position(|w| w.0 == key) else { return };
        WATCHED.swap_remove(i)
    };
    for catalog in entry.2 {
        // SAFETY: right after the command ran, in its transaction.
        unsafe { check(catalog, entry.1) };
    }
}

/// The statement `key` ends (ExecutorEnd), finished or not.
#[allow(static_mut_refs)]
pub fn forget(key: usize) {
    // SAFETY: single-threaded backend.
    unsafe {
        if !WATCHED.is_empty() {
            WATCHED.retain(|w| w.0 != key);
        }
    }
}

/// After a transaction abort nothing is running.
#[allow(static_mut_refs)]
pub fn reset() {
    // SAFETY: single-threaded backend.
    unsafe { WATCHED.clear() };
}
