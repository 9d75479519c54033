//! Whether one of pg_custody's tables is as pg_custody made it, checked before pg_custody
//! writes to it or reports on it. While the library is loaded nothing can change that; with
//! it unloaded, a superuser could add what would run inside pg_custody's own work (a
//! trigger, a rule, an index expression or operator class calling user code, a uniqueness
//! check that refuses records) or change what readers of the table see (row security,
//! inheritance children). pg_custody then refuses to write there rather than run it.

use pgrx::pg_sys;

use super::{label, Table};
use crate::error::CustodyError;

/// Why the table `relid` (protected table `t`) is not as pg_custody made it, if it is not.
///
/// # Safety
/// `rel` is an open relation (any lock), in a transaction.
pub unsafe fn defect(t: Table, rel: pg_sys::Relation) -> Option<String> {
    // SAFETY: `rel` is an open relation in a transaction (caller's contract), so its rd_rel
    // and rd_att are valid; its index list is a fresh OID list, and each index is opened and
    // closed here with the same lock.
    unsafe {
        let form = &*(*rel).rd_rel;
        if form.relkind as u8 != pg_sys::RELKIND_RELATION {
            return Some("it is not a plain table".into());
        }
        if form.relhastriggers {
            return Some("it has triggers".into());
        }
        if form.relhasrules {
            return Some("it has rules".into());
        }
        if form.relrowsecurity || form.relforcerowsecurity {
            return Some("row level security is enabled on it".into());
        }
        if form.relhassubclass {
            return Some("other tables inherit from it (their rows appear in queries of it)".into());
        }
        if form.relispartition {
            return Some("it is a partition of another table".into());
        }
        if t == Table::AuditLog {
            // Every column of custody_chain::columns, by name, with its type; no other
            // column the writer's NULLs would violate (scan::column_defect).
            if let Some(what) = crate::scan::column_defect((*rel).rd_att) {
                return Some(what);
            }
        }
        let indexes = pg_sys::RelationGetIndexList(rel);
        for index in super::utility::list_oids(indexes) {
            let irel = pg_sys::index_open(index, pg_sys::AccessShareLock as pg_sys::LOCKMODE);
            let why = index_defect(t, irel);
            pg_sys::index_close(irel, pg_sys::AccessShareLock as pg_sys::LOCKMODE);
            if let Some(w) = why {
                return Some(format!("index {}: {w}", crate::capture::objects::cstr(pg_sys::get_rel_name(index))));
            }
        }
        None
    }
}

/// What an index of a protected table may not have (the rules CREATE INDEX follows there,
/// protect::utility::index).
///
/// # Safety
/// `irel` is an open index relation, in a transaction.
unsafe fn index_defect(t: Table, irel: pg_sys::Relation) -> Option<String> {
    // SAFETY: `irel` is an open index (caller's contract): rd_index and rd_rel are set,
    // rd_opfamily has indnkeyatts entries and indkey indnatts; the syscache lookup runs in a
    // transaction with missing_ok.
    unsafe {
        let index = &*(*irel).rd_index;
        let am = (*(*irel).rd_rel).relam;
        if ![pg_sys::BTREE_AM_OID, pg_sys::HASH_AM_OID, pg_sys::BRIN_AM_OID, pg_sys::GIN_AM_OID].contains(&am) {
            return Some("its access method is not btree, hash, brin or gin".into());
        }
        if !pg_sys::RelationGetIndexExpressions(irel).is_null() {
            return Some("it indexes an expression".into());
        }
        if !pg_sys::RelationGetIndexPredicate(irel).is_null() {
            return Some("it has a predicate".into());
        }
        if (index.indisunique || index.indisexclusion) && !index.indisprimary {
            return Some("it is unique or an exclusion constraint".into());
        }
        let nkeys = index.indnkeyatts as usize;
        for k in 0..nkeys {
            let family = *(*irel).rd_opfamily.add(k);
            if u32::from(family) >= pg_sys::FirstNormalObjectId {
                return Some("it uses an operator family that is not built in".into());
            }
        }
        if t == Table::AuditLog && (am == pg_sys::BTREE_AM_OID || am == pg_sys::BRIN_AM_OID) {
            let heap = index.indrelid;
            for k in 0..index.indnatts as usize {
                let attnum = *index.indkey.values.as_ptr().add(k);
                let col = crate::capture::objects::cstr(pg_sys::get_attname(heap, attnum, true));
                if super::utility::UNBOUNDED.contains(&col.as_str()) {
                    return Some(format!("column {col} has values longer than an index entry can hold"));
                }
            }
        }
        None
    }
}

/// Raises XX001 unless the protected table `t` (open as `rel`) is as pg_custody made it.
///
/// # Safety
/// As `defect`.
pub unsafe fn require(t: Table, rel: pg_sys::Relation) {
    // SAFETY: the caller's contract is defect's.
    if let Some(what) = unsafe { defect(t, rel) } {
        CustodyError::NotAsCreated { relation: label(t), what }.report();
    }
}

/// `require` for a protected table by OID (skipped when it does not exist here).
pub fn require_oid(t: Table) {
    let Some(relid) = super::ids().map(|i| i.table(t)).filter(|&r| r != pg_sys::InvalidOid) else { return };
    // SAFETY: opened and closed here, in a transaction.
    unsafe {
        let rel = pg_sys::table_open(relid, pg_sys::AccessShareLock as pg_sys::LOCKMODE);
        let why = defect(t, rel);
        pg_sys::table_close(rel, pg_sys::AccessShareLock as pg_sys::LOCKMODE);
        if let Some(what) = why {
            CustodyError::NotAsCreated { relation: label(t), what }.report();
        }
    }
}
