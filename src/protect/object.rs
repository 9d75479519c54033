//! Objects created or altered in pg_custody's schema, or attached to its tables, however the
//! statement reached them (CREATE OR REPLACE FUNCTION custody.verify_audit_chain, ALTER
//! SCHEMA custody RENAME, ALTER ... SET SCHEMA custody, CREATE EXTENSION x SCHEMA custody,
//! a foreign key that puts triggers on the log): refused from the object-access hook, which
//! PostgreSQL calls right after it wrote the catalog row, before the statement can use it.
//!
//! The new row is not visible to catalog snapshots yet (no CommandCounterIncrement since),
//! so it is read with SnapshotSelf.

use pgrx::pg_sys;

use super::{ids, in_own_script, protected};
use crate::capture::objects::cstr;
use crate::error::CustodyError;

/// Catalog OIDs pgrx 0.18 does not bind for every version (catalog/pg_*.h; unchanged for
/// decades).
const REWRITE_RELATION: pg_sys::Oid = pg_sys::Oid::from_u32(2618);
const POLICY_RELATION: pg_sys::Oid = pg_sys::Oid::from_u32(3256);
const CONSTRAINT_RELATION: pg_sys::Oid = pg_sys::Oid::from_u32(2606);
const CAST_RELATION: pg_sys::Oid = pg_sys::Oid::from_u32(2605);
const LANGUAGE_RELATION: pg_sys::Oid = pg_sys::Oid::from_u32(2612);
const CONVERSION_RELATION: pg_sys::Oid = pg_sys::Oid::from_u32(2607);
const TS_CONFIG_RELATION: pg_sys::Oid = pg_sys::Oid::from_u32(3602);
const TS_DICTIONARY_RELATION: pg_sys::Oid = pg_sys::Oid::from_u32(3600);
const TS_PARSER_RELATION: pg_sys::Oid = pg_sys::Oid::from_u32(3601);
const TS_TEMPLATE_RELATION: pg_sys::Oid = pg_sys::Oid::from_u32(3764);

/// Catalogs of the code every query resolves to — pg_custody's pinned ones included: a
/// built-in row there (OID below FirstNormalObjectId) may not be replaced or altered, since
/// `CREATE OR REPLACE FUNCTION pg_catalog.extract(...)` would run someone's code inside
/// pg_custody's own work (the writer's, say).
const CODE: [pg_sys::Oid; 16] = [
    pg_sys::ProcedureRelationId,
    pg_sys::OperatorRelationId,
    pg_sys::TypeRelationId,
    CAST_RELATION,
    pg_sys::OperatorClassRelationId,
    pg_sys::OperatorFamilyRelationId,
    pg_sys::AccessMethodRelationId,
    pg_sys::AccessMethodOperatorRelationId,
    pg_sys::AccessMethodProcedureRelationId,
    LANGUAGE_RELATION,
    pg_sys::CollationRelationId,
    CONVERSION_RELATION,
    TS_CONFIG_RELATION,
    TS_DICTIONARY_RELATION,
    TS_PARSER_RELATION,
    TS_TEMPLATE_RELATION,
];

/// Catalogs whose objects live in a schema (checked for pg_custody's schema).
const IN_SCHEMA: [pg_sys::Oid; 8] = [
    pg_sys::RelationRelationId,
    pg_sys::ProcedureRelationId,
    pg_sys::TypeRelationId,
    pg_sys::OperatorRelationId,
    pg_sys::CollationRelationId,
    pg_sys::OperatorClassRelationId,
    pg_sys::OperatorFamilyRelationId,
    crate::pgver::STATISTIC_EXT_RELATION,
];

/// Catalogs whose objects attach to a relation, and the columns naming it.
const ATTACHED: [(pg_sys::Oid, &str, &[&str]); 4] = [
    (pg_sys::TriggerRelationId, "trigger", &["tgrelid"]),
    (REWRITE_RELATION, "rule", &["ev_class"]),
    (POLICY_RELATION, "policy", &["polrelid"]),
    (CONSTRAINT_RELATION, "constraint", &["conrelid", "confrelid"]),
];

/// OAT_POST_CREATE / OAT_POST_ALTER of object (class_id, object_id, sub_id). `internal`: the
/// server made the change itself (an index copied by REINDEX CONCURRENTLY, say).
pub fn check(created: bool, class_id: pg_sys::Oid, object_id: pg_sys::Oid, sub_id: i32, internal: bool) {
    if sub_id != 0 {
        return; // a column: the statements that add or alter columns of ours are refused first
    }
    let Some(ids) = ids() else { return };
    if in_own_script() {
        return;
    }
    let verb = if created { "create" } else { "alter" };
    if !internal {
        // SAFETY: catalog reads inside the statement that wrote the row.
        unsafe { check_builtin(created, class_id, object_id) };
    }
    if class_id == pg_sys::NamespaceRelationId {
        if object_id == ids.nsp {
            CustodyError::Redefinition {
                message: format!("cannot {verb} schema {}: it holds pg_custody's objects", own_schema()),
                hint: None,
            }
            .report();
        }
        return;
    }
    if IN_SCHEMA.contains(&class_id) {
        // SAFETY: catalog read inside the statement that wrote the row.
        let Some((nsp, relkind)) = (unsafe { namespace_of(class_id, object_id) }) else { return };
        if nsp != ids.nsp {
            return;
        }
        // Indexes of pg_custody's tables: CREATE INDEX was checked by the utility hook
        // (plain columns, CONCURRENTLY), and the server's own copies (REINDEX CONCURRENTLY).
        let index = relkind == Some(pg_sys::RELKIND_INDEX);
        if class_id == pg_sys::RelationRelationId && index && (created || internal) {
            return;
        }
        CustodyError::Redefinition {
            message: format!("cannot {verb} objects in schema {}: it belongs to pg_custody", own_schema()),
            hint: Some("Create your objects in another schema.".into()),
        }
        .report();
    }
    if let Some(&(_, kind, cols)) = ATTACHED.iter().find(|(c, _, _)| *c == class_id) {
        // SAFETY: as above.
        let relations = unsafe { relations_of(class_id, object_id, cols) };
        if let Some(t) = relations.into_iter().find_map(protected) {
            CustodyError::Redefinition {
                message: format!("cannot {verb} a {kind} on {}", super::label(t)),
                hint: Some("Nothing may run when pg_custody's tables are written, or refuse what is written to them.".into()),
            }
            .report();
        }
    }
}

/// Built-in code is not redefined (CREATE OR REPLACE and ALTER of a built-in function,
/// operator, type, cast, operator class or family...), nothing new goes into pg_catalog but
/// from an extension's own script, no cast between built-in types and no member of a
/// built-in operator family is added: each would change what pg_custody's pinned queries —
/// and everyone's — resolve to.
///
/// # Safety
/// In the transaction whose command just wrote the catalog row (class_id, object_id).
unsafe fn check_builtin(created: bool, class_id: pg_sys::Oid, object_id: pg_sys::Oid) {
    if !CODE.contains(&class_id) && class_id != pg_sys::NamespaceRelationId {
        return;
    }
    // An extension's own script (from the server's file system) may: plpgsql, adminpack and
    // others install into pg_catalog. Not what runs nested in it (event triggers, DO).
    if crate::protect::extension_script_statement() {
        return;
    }
    let refuse = |what: String| -> ! {
        CustodyError::Redefinition { message: what, hint: Some("Built-in objects cannot be redefined while pg_custody is loaded.".into()) }
            .report()
    };
    if u32::from(object_id) < pg_sys::FirstNormalObjectId {
        let verb = if created { "replace" } else { "alter" };
        refuse(format!("cannot {verb} built-in object {} of {}", u32::from(object_id), catalog_name(class_id)));
    }
    if !created {
        return;
    }
    if IN_SCHEMA.contains(&class_id) {
        // SAFETY: in the transaction that wrote the row (our contract).
        if let Some((nsp, _)) = unsafe { namespace_of(class_id, object_id) } {
            if nsp == pg_sys::Oid::from(pg_sys::PG_CATALOG_NAMESPACE) {
                refuse("cannot create objects in schema pg_catalog while pg_custody is loaded".into());
            }
        }
    }
    let builtin = |o: Option<pg_sys::Oid>| o.is_some_and(|o| u32::from(o) < pg_sys::FirstNormalObjectId);
    // SAFETY: in the transaction that wrote the row (our contract); `oid_column` gets the
    // tuple and descriptor with_row passes, while the scan holds the tuple.
    let row = |cols: &[&str]| unsafe { with_row(class_id, object_id, |t, d| cols.iter().map(|c| oid_column(t, d, c)).collect::<Vec<_>>()) }
        .unwrap_or_default();
    if class_id == CAST_RELATION {
        let r = row(&["castsource", "casttarget"]);
        if r.len() == 2 && builtin(r[0]) && builtin(r[1]) {
            refuse("cannot create a cast between built-in types while pg_custody is loaded".into());
        }
    } else if class_id == pg_sys::AccessMethodOperatorRelationId || class_id == pg_sys::AccessMethodProcedureRelationId {
        let family = if class_id == pg_sys::AccessMethodOperatorRelationId { "amopfamily" } else { "amprocfamily" };
        if builtin(row(&[family]).first().copied().flatten()) {
            refuse("cannot add members to a built-in operator family while pg_custody is loaded".into());
        }
    }
}

fn catalog_name(class_id: pg_sys::Oid) -> String {
    // SAFETY: syscache lookup of a catalog relation.
    unsafe { cstr(pg_sys::get_rel_name(class_id)) }
}

fn own_schema() -> String {
    // SAFETY: syscache lookup.
    ids().map(|i| unsafe { cstr(pg_sys::get_namespace_name(i.nsp)) }).unwrap_or_else(|| "custody".into())
}

/// Runs `f` on the catalog row of (class_id, object_id) as this command wrote it.
///
/// # Safety
/// In a transaction; `class_id` is a catalog's OID. `f` gets a tuple and descriptor valid only
/// while it runs.
unsafe fn with_row<R>(class_id: pg_sys::Oid, object_id: pg_sys::Oid, f: impl FnOnce(pg_sys::HeapTuple, pg_sys::TupleDesc) -> R) -> Option<R> {
    // SAFETY: in a transaction (caller's contract). The object-property lookups raise an ERROR
    // for a class they do not know; the catalog is opened and closed with the same lock; the
    // scan key outlives the scan; SnapshotSelfData is a static PostgreSQL never frees; the
    // tuple is used by `f` before systable_endscan releases it.
    unsafe {
        let index = pg_sys::get_object_oid_index(class_id);
        let oidcol = pg_sys::get_object_attnum_oid(class_id);
        if index == pg_sys::InvalidOid || oidcol <= 0 {
            return None;
        }
        let rel = pg_sys::table_open(class_id, pg_sys::AccessShareLock as pg_sys::LOCKMODE);
        let mut key: pg_sys::ScanKeyData = std::mem::zeroed();
        pg_sys::ScanKeyInit(&mut key, oidcol, pg_sys::BTEqualStrategyNumber as u16, pg_sys::Oid::from(pg_sys::F_OIDEQ), pg_sys::Datum::from(object_id));
        let scan = pg_sys::systable_beginscan(rel, index, true, std::ptr::addr_of_mut!(pg_sys::SnapshotSelfData), 1, &mut key);
        let tup = pg_sys::systable_getnext(scan);
        let r = (!tup.is_null()).then(|| f(tup, (*rel).rd_att));
        pg_sys::systable_endscan(scan);
        pg_sys::table_close(rel, pg_sys::AccessShareLock as pg_sys::LOCKMODE);
        r
    }
}

/// An OID column of a catalog row, by name.
///
/// # Safety
/// `tup` is a valid tuple of the relation whose descriptor is `desc`.
unsafe fn oid_column(tup: pg_sys::HeapTuple, desc: pg_sys::TupleDesc, name: &str) -> Option<pg_sys::Oid> {
    // SAFETY: `desc` is valid and `i < natts`; attname is a NUL-terminated NameData; `tup` is
    // a tuple of that descriptor, read at an attribute number it has (caller's contract).
    unsafe {
        let attno = (0..(*desc).natts as usize).find(|&i| cstr(crate::pgver::attr(desc, i).attname.data.as_ptr()) == name)?;
        let mut isnull = false;
        let d = pg_sys::heap_getattr(tup, attno as i32 + 1, desc, &mut isnull);
        (!isnull).then(|| pg_sys::Oid::from(d.value() as u32))
    }
}

/// The schema of an object and, for a relation, its relkind.
///
/// # Safety
/// In a transaction; `class_id` is a catalog's OID.
unsafe fn namespace_of(class_id: pg_sys::Oid, object_id: pg_sys::Oid) -> Option<(pg_sys::Oid, Option<u8>)> {
    // SAFETY: in a transaction (caller's contract); the namespace column is read from the row
    // with_row found, with its catalog's descriptor (a NULL reads as InvalidOid), and a
    // pg_class row is a FormData_pg_class.
    unsafe {
        let nspcol = pg_sys::get_object_attnum_namespace(class_id);
        if nspcol <= 0 {
            return None;
        }
        with_row(class_id, object_id, |tup, desc| {
            let mut isnull = false;
            let nsp = pg_sys::Oid::from(pg_sys::heap_getattr(tup, nspcol as i32, desc, &mut isnull).value() as u32);
            let relkind = (class_id == pg_sys::RelationRelationId)
                .then(|| (*pg_sys::heap_tuple_get_struct::<pg_sys::FormData_pg_class>(tup)).relkind as u8);
            (nsp, relkind)
        })
    }
}

/// The relations an attached object (trigger, rule, policy, constraint) names.
///
/// # Safety
/// In a transaction; `class_id` is a catalog's OID.
unsafe fn relations_of(class_id: pg_sys::Oid, object_id: pg_sys::Oid, cols: &[&str]) -> Vec<pg_sys::Oid> {
    // SAFETY: in a transaction (caller's contract); oid_column reads the tuple with_row passes
    // with its descriptor, while the scan holds it.
    unsafe {
        with_row(class_id, object_id, |tup, desc| cols.iter().filter_map(|c| oid_column(tup, desc, c)).collect())
            .unwrap_or_default()
    }
}
