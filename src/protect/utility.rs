//! Utility statements that would change pg_custody's objects, or lock them against the
//! custody writer: found before PostgreSQL runs the statement, so before it takes any lock
//! (every lookup here takes none). The caller opens the statement's record first, then
//! raises the refusal.

use std::ffi::CStr;

use pgrx::pg_sys;

use super::{covered, ids, protected, protected_index, Table};
use crate::capture::objects::cstr;
use crate::error::CustodyError;
use crate::settings;

/// The nodes of a List of pointers.
///
/// # Safety
/// `list` is NIL or a valid pointer List whose elements are `T`s.
pub unsafe fn list<T>(list: *mut pg_sys::List) -> impl Iterator<Item = *mut T> {
    // SAFETY: not NIL here, so the valid List the caller promised.
    let n = if list.is_null() { 0 } else { unsafe { (*list).length } };
    // SAFETY: i < length of a valid list (caller's contract).
    (0..n).map(move |i| unsafe { pg_sys::list_nth(list, i) as *mut T })
}

/// The OIDs of an OID List (RelationGetIndexList and the like).
///
/// # Safety
/// `list` is NIL or a valid OID List.
pub unsafe fn list_oids(list: *mut pg_sys::List) -> Vec<pg_sys::Oid> {
    // SAFETY: not NIL here, so the valid List the caller promised.
    let n = if list.is_null() { 0 } else { unsafe { (*list).length } } as usize;
    // SAFETY: i < length of a valid OID list.
    (0..n).map(|i| unsafe { (*(*list).elements.add(i)).oid_value }).collect()
}

/// The relation a RangeVar names, or InvalidOid (no lock, no error).
///
/// # Safety
/// `rv` is NULL or a valid RangeVar, in a transaction.
unsafe fn relid(rv: *mut pg_sys::RangeVar) -> pg_sys::Oid {
    if rv.is_null() {
        return pg_sys::InvalidOid;
    }
    // SAFETY: `rv` is a valid RangeVar (checked non-NULL) and we are in a transaction (caller's
    // contract); NoLock with RVR_MISSING_OK takes no lock and returns InvalidOid for a missing
    // relation; no callback is passed.
    unsafe {
        pg_sys::RangeVarGetRelidExtended(
            rv,
            pg_sys::NoLock as i32,
            pg_sys::RVROption::RVR_MISSING_OK,
            None,
            std::ptr::null_mut(),
        )
    }
}

/// Whether `relid` is in pg_custody's schema (its tables, views, indexes).
fn in_own_schema(relid: pg_sys::Oid) -> bool {
    // SAFETY: syscache lookup; an unknown relation gives InvalidOid.
    relid != pg_sys::InvalidOid && ids().is_some_and(|i| unsafe { pg_sys::get_rel_namespace(relid) } == i.nsp)
}

fn own_schema_name() -> Option<String> {
    // SAFETY: syscache lookup.
    ids().map(|i| unsafe { cstr(pg_sys::get_namespace_name(i.nsp)) })
}

/// A relation of pg_custody's (protected table, one of their indexes, or anything else in its
/// schema), named for messages.
pub fn own_relation(relid: pg_sys::Oid) -> Option<String> {
    if let Some(t) = protected(relid).or_else(|| protected_index(relid)) {
        // SAFETY: syscache lookup of an existing relation.
        let name = unsafe { cstr(pg_sys::get_rel_name(relid)) };
        return Some(format!("{}.{name}", own_schema_name().unwrap_or_else(|| super::label(t))));
    }
    in_own_schema(relid).then(|| {
        // SAFETY: syscache lookup of an existing relation.
        format!("{}.{}", own_schema_name().unwrap_or_default(), unsafe { cstr(pg_sys::get_rel_name(relid)) })
    })
}

fn is_catalog(relid: pg_sys::Oid) -> bool {
    // SAFETY: a pure test of the OID range.
    relid != pg_sys::InvalidOid && unsafe { pg_sys::IsCatalogRelationOid(relid) }
}

fn redefinition(message: String, hint: Option<&str>) -> Option<CustodyError> {
    Some(CustodyError::Redefinition { message, hint: hint.map(str::to_string) })
}

fn would_block(statement: &str, relid: pg_sys::Oid, hint: &str) -> Option<CustodyError> {
    let relation = own_relation(relid).unwrap_or_else(|| "pg_custody's tables".into());
    Some(CustodyError::WouldBlockWriter { statement: statement.into(), relation, hint: hint.into() })
}

fn protected_refusal(relid: pg_sys::Oid, action: &str) -> Option<CustodyError> {
    protected(relid).map(|t| CustodyError::Protected {
        relation: super::label(t),
        action: action.into(),
        evidence: t.is_evidence(),
    })
}

const CONCURRENTLY: &str = "Use the CONCURRENTLY form, which does not lock out the custody writer.";

/// Whether pg_custody's audit log lives in this database (VACUUM FULL, REINDEX DATABASE and
/// CLUSTER without a table list would reach it).
fn holds_the_log() -> bool {
    ids().is_some_and(|i| i.table(Table::AuditLog) != pg_sys::InvalidOid)
}

/// Whether a DefElem list has `name` set to true (VACUUM (FULL), REINDEX (CONCURRENTLY)).
///
/// # Safety
/// `options` is NIL or a valid List of DefElem.
unsafe fn option_on(options: *mut pg_sys::List, name: &str) -> bool {
    // SAFETY: the list's elements are DefElems (caller's contract); defname is NULL or a
    // string (`cstr` takes both), and defGetBoolean is called only with a non-NULL arg.
    unsafe {
        list::<pg_sys::DefElem>(options).any(|d| {
            cstr((*d).defname).eq_ignore_ascii_case(name) && ((*d).arg.is_null() || pg_sys::defGetBoolean(d))
        })
    }
}

/// The refusal of `node`, if PostgreSQL must not run it while pg_custody is loaded.
///
/// # Safety
/// `node` is a valid utility statement parse tree, in a transaction.
pub unsafe fn violation(node: *mut pg_sys::Node) -> Option<CustodyError> {
    if ids().is_none() || super::in_own_script() {
        return None;
    }
    use pg_sys::NodeTag::*;
    // SAFETY: `node` is a valid parse tree, in a transaction (caller's contract). Each cast
    // follows the node's tag; each List is read with the element type the grammar builds for
    // that statement (RangeVar, VacuumRelation, RoleSpec, ...); RangeVars that may be NULL go
    // through `relid`, strings that may be NULL through `cstr`; every catalog lookup is a
    // syscache or name lookup with missing_ok, taking no lock.
    unsafe {
        match (*node).type_ {
            T_TruncateStmt => {
                let s = &*(node as *mut pg_sys::TruncateStmt);
                list::<pg_sys::RangeVar>(s.relations).find_map(|rv| {
                    let r = relid(rv);
                    protected_refusal(r, "TRUNCATE").or_else(|| {
                        is_catalog(r).then(|| CustodyError::CatalogRow {
                            catalog: cstr(pg_sys::get_rel_name(r)),
                            what: "TRUNCATE removes every row".into(),
                        })
                    })
                })
            }
            T_CopyStmt => {
                let s = &*(node as *mut pg_sys::CopyStmt);
                if !s.is_from {
                    return None;
                }
                let r = relid(s.relation);
                if super::restoring(r) {
                    return None;
                }
                protected_refusal(r, "COPY FROM").or_else(|| {
                    is_catalog(r).then(|| CustodyError::CatalogRow {
                        catalog: cstr(pg_sys::get_rel_name(r)),
                        what: "COPY FROM adds rows that are not checked".into(),
                    })
                })
            }
            T_AlterTableStmt => alter_table(&*(node as *mut pg_sys::AlterTableStmt)),
            T_CreateStmt => create_table(&*(node as *mut pg_sys::CreateStmt)),
            T_CreateForeignTableStmt => create_table(&(*(node as *mut pg_sys::CreateForeignTableStmt)).base),
            T_RenameStmt => {
                let s = &*(node as *mut pg_sys::RenameStmt);
                if s.renameType == pg_sys::ObjectType::OBJECT_SCHEMA {
                    let name = cstr(s.subname);
                    return (Some(name.clone()) == own_schema_name()).then(|| CustodyError::Redefinition {
                        message: format!("cannot rename schema {name}: it holds pg_custody's audit log"),
                        hint: None,
                    });
                }
                let r = relid(s.relation);
                protected_refusal(r, "RENAME").or_else(|| {
                    own_relation(r).map(|r| CustodyError::Redefinition { message: format!("cannot rename {r} or its parts"), hint: None })
                })
            }
            T_AlterObjectSchemaStmt => own_relation(relid((*(node as *mut pg_sys::AlterObjectSchemaStmt)).relation))
                .map(|r| CustodyError::Redefinition { message: format!("cannot move {r} to another schema"), hint: None }),
            T_CreateTrigStmt => protected_refusal(relid((*(node as *mut pg_sys::CreateTrigStmt)).relation), "CREATE TRIGGER"),
            T_RuleStmt => protected_refusal(relid((*(node as *mut pg_sys::RuleStmt)).relation), "CREATE RULE"),
            T_CreatePolicyStmt => protected_refusal(relid((*(node as *mut pg_sys::CreatePolicyStmt)).table), "CREATE POLICY"),
            T_AlterPolicyStmt => protected_refusal(relid((*(node as *mut pg_sys::AlterPolicyStmt)).table), "ALTER POLICY"),
            T_ViewStmt => {
                let s = &*(node as *mut pg_sys::ViewStmt);
                own_relation(relid(s.view))
                    .map(|r| CustodyError::Redefinition { message: format!("cannot replace {r}"), hint: None })
            }
            T_DropStmt => drop(&*(node as *mut pg_sys::DropStmt)),
            T_IndexStmt => index(&*(node as *mut pg_sys::IndexStmt)),
            T_ClusterStmt => {
                let s = &*(node as *mut pg_sys::ClusterStmt);
                if s.relation.is_null() {
                    return None; // only tables already clustered, which ours cannot be
                }
                let r = relid(s.relation);
                covered(r).and_then(|_| would_block("CLUSTER", r, "The audit log is append-only in seq order already."))
            }
            T_VacuumStmt => {
                let s = &*(node as *mut pg_sys::VacuumStmt);
                if !s.is_vacuumcmd || !option_on(s.options, "full") {
                    return None;
                }
                if s.rels.is_null() {
                    return holds_the_log().then(|| CustodyError::WouldBlockWriter {
                        statement: "VACUUM FULL".into(),
                        relation: "every table of this database".into(),
                        hint: "This database holds pg_custody's audit log: list the tables to VACUUM FULL, or use plain VACUUM.".into(),
                    });
                }
                list::<pg_sys::VacuumRelation>(s.rels).find_map(|v| {
                    let r = if (*v).oid != pg_sys::InvalidOid { (*v).oid } else { relid((*v).relation) };
                    covered(r).and_then(|_| would_block("VACUUM FULL", r, "Use plain VACUUM."))
                })
            }
            T_ReindexStmt => reindex(&*(node as *mut pg_sys::ReindexStmt)),
            T_LockStmt => {
                let s = &*(node as *mut pg_sys::LockStmt);
                // Modes from ShareLock up conflict with the writer's RowExclusiveLock.
                if s.mode < pg_sys::ShareLock as i32 {
                    return None;
                }
                list::<pg_sys::RangeVar>(s.relations).find_map(|rv| {
                    // LOCK on a view locks the relations it reads, recursively.
                    let r = locked_through(relid(rv), 0)?;
                    would_block("LOCK TABLE", r, "Only ACCESS SHARE, ROW SHARE, ROW EXCLUSIVE and SHARE UPDATE EXCLUSIVE locks are allowed on it.")
                })
            }
            T_GrantStmt => grant(&*(node as *mut pg_sys::GrantStmt)),
            T_ReassignOwnedStmt => {
                let s = &*(node as *mut pg_sys::ReassignOwnedStmt);
                let roles: Vec<pg_sys::Oid> =
                    list::<pg_sys::RoleSpec>(s.roles).map(|r| pg_sys::get_rolespec_oid(r, true)).collect();
                let ids = ids()?;
                ids.tables.iter().copied().filter(|&t| t != pg_sys::InvalidOid).find_map(|t| {
                    let owner = rel_owner(t);
                    roles.contains(&owner).then(|| CustodyError::Redefinition {
                        message: format!("cannot reassign the ownership of {}", own_relation(t).unwrap_or_default()),
                        hint: Some("pg_custody's tables keep their owner; reassign the role's other objects one by one.".into()),
                    })
                })
            }
            T_AlterExtensionContentsStmt => {
                let s = &*(node as *mut pg_sys::AlterExtensionContentsStmt);
                (cstr(s.extname) == "pg_custody").then(|| CustodyError::Redefinition {
                    message: "cannot add objects to or remove objects from extension pg_custody".into(),
                    hint: None,
                })
            }
            T_AlterTableMoveAllStmt => {
                let s = &*(node as *mut pg_sys::AlterTableMoveAllStmt);
                let space = pg_sys::get_tablespace_oid(s.orig_tablespacename, true);
                let ids = ids()?;
                ids.tables.iter().copied().filter(|&t| t != pg_sys::InvalidOid).find_map(|t| {
                    let mut rel_space = pg_sys::get_rel_tablespace(t);
                    if rel_space == pg_sys::InvalidOid {
                        rel_space = pg_sys::MyDatabaseTableSpace;
                    }
                    (rel_space == space).then(|| would_block("ALTER ... ALL IN TABLESPACE", t, "Move the other tables one by one."))
                    .flatten()
                })
            }
            _ => None,
        }
    }
}

/// The protected table a LOCK TABLE of `relid` would lock: itself, or one a view reads
/// (PostgreSQL locks a view's base relations too).
///
/// # Safety
/// In a transaction.
unsafe fn locked_through(relid: pg_sys::Oid, depth: u32) -> Option<pg_sys::Oid> {
    if relid == pg_sys::InvalidOid || depth > 32 {
        return None;
    }
    if covered(relid).is_some() {
        return Some(relid);
    }
    // SAFETY: in a transaction (caller's contract). The relcache entry is opened (NULL
    // checked) and, being a view, has a _RETURN rule whose Query get_view_query returns; that
    // Query lives in the entry's rules, kept while we hold the reference, and its range table
    // is walked completely before RelationClose. No lock is taken, so no invalidation is
    // processed meanwhile.
    unsafe {
        if pg_sys::get_rel_relkind(relid) as u8 != pg_sys::RELKIND_VIEW {
            return None;
        }
        let rel = pg_sys::RelationIdGetRelation(relid);
        if rel.is_null() {
            return None;
        }
        let query = pg_sys::get_view_query(rel);
        let found = crate::pgver::range_table((*query).rtable, crate::pgver::query_perm_infos(&*query))
            .find_map(|rte| locked_through(rte.relid, depth + 1));
        pg_sys::RelationClose(rel);
        found
    }
}

/// The owner of a relation, or InvalidOid if it is gone.
///
/// # Safety
/// In a transaction.
unsafe fn rel_owner(relid: pg_sys::Oid) -> pg_sys::Oid {
    // SAFETY: a syscache lookup in a transaction (caller's contract); a non-NULL RELOID tuple
    // holds a FormData_pg_class, read before the tuple is released.
    unsafe {
        let tup = pg_sys::SearchSysCache1(pg_sys::SysCacheIdentifier::RELOID as i32, pg_sys::Datum::from(relid));
        if tup.is_null() {
            return pg_sys::InvalidOid;
        }
        let owner = (*pg_sys::heap_tuple_get_struct::<pg_sys::FormData_pg_class>(tup)).relowner;
        pg_sys::ReleaseSysCache(tup);
        owner
    }
}

/// ALTER TABLE of pg_custody's tables, of a catalog, or making another table a parent or
/// partition of ours.
///
/// # Safety
/// `s` is a valid parse node (its pointers valid or NULL), in a transaction.
unsafe fn alter_table(s: &pg_sys::AlterTableStmt) -> Option<CustodyError> {
    // SAFETY: the statement's RangeVar, in a transaction (caller's contract).
    let r = unsafe { relid(s.relation) };
    if let Some(t) = protected(r) {
        return Some(CustodyError::Protected {
            relation: super::label(t),
            action: "ALTER TABLE".into(),
            evidence: t.is_evidence(),
        });
    }
    if let Some(name) = own_relation(r) {
        return redefinition(format!("cannot alter {name}"), None);
    }
    if is_catalog(r) {
        return redefinition(
            // SAFETY: a syscache lookup in a transaction: NULL or a palloc'd name.
            format!("cannot alter system catalog {} while pg_custody is loaded", unsafe { cstr(pg_sys::get_rel_name(r)) }),
            None,
        );
    }
    // Another table that would become a child or parent of one of ours.
    // SAFETY: `cmds` is a List of AlterTableCmd; `def` is a RangeVar for AT_AddInherit and a
    // PartitionCmd for AT_AttachPartition, as the grammar builds them.
    unsafe {
        list::<pg_sys::AlterTableCmd>(s.cmds).find_map(|cmd| {
            let target = match (*cmd).subtype {
                pg_sys::AlterTableType::AT_AddInherit => relid((*cmd).def as *mut pg_sys::RangeVar),
                pg_sys::AlterTableType::AT_AttachPartition => relid((*((*cmd).def as *mut pg_sys::PartitionCmd)).name),
                _ => return None,
            };
            own_relation(target).map(|name| CustodyError::Redefinition {
                message: format!("{name} cannot be the parent or a partition of another table"),
                hint: Some("Rows of other tables would appear in queries of the log without being part of its chain.".into()),
            })
        })
    }
}

/// CREATE TABLE that inherits from or is a partition of one of ours.
///
/// # Safety
/// `s` is a valid parse node, in a transaction.
unsafe fn create_table(s: &pg_sys::CreateStmt) -> Option<CustodyError> {
    // SAFETY: inhRelations is NIL or a List of RangeVar (caller's contract), in a transaction.
    unsafe {
        list::<pg_sys::RangeVar>(s.inhRelations).find_map(|rv| {
            own_relation(relid(rv)).map(|name| CustodyError::Redefinition {
                message: format!("cannot create a table that inherits from or is a partition of {name}"),
                hint: Some("Rows of other tables would appear in queries of the log without being part of its chain; CREATE TABLE ... (LIKE ...) copies the definition instead.".into()),
            })
        })
    }
}

/// DROP of pg_custody's tables, or a non-concurrent DROP INDEX of their indexes.
///
/// # Safety
/// `s` is a valid parse node, in a transaction.
unsafe fn drop(s: &pg_sys::DropStmt) -> Option<CustodyError> {
    use pg_sys::ObjectType::*;
    let relation_kind = matches!(s.removeType, OBJECT_TABLE | OBJECT_VIEW | OBJECT_INDEX | OBJECT_SEQUENCE | OBJECT_FOREIGN_TABLE | OBJECT_MATVIEW);
    if !relation_kind {
        return None; // schemas, the extension, functions: the object-access hook and dependencies
    }
    // SAFETY: for relation kinds, `objects` is a List of name Lists, which is what
    // makeRangeVarFromNameList takes; in a transaction (caller's contract).
    unsafe {
        list::<pg_sys::List>(s.objects).find_map(|names| {
            let r = relid(pg_sys::makeRangeVarFromNameList(names));
            if let Some(t) = protected(r) {
                if settings::allow_drop() {
                    return None;
                }
                return Some(CustodyError::DropRefused { object: super::label(t) });
            }
            if s.removeType == OBJECT_INDEX && !s.concurrent && protected_index(r).is_some() {
                return would_block("DROP INDEX", r, CONCURRENTLY);
            }
            None
        })
    }
}

/// Columns of the log whose values have no length limit: an index that stores the value —
/// B-tree entries are limited to about a third of a page, BRIN's summary to a page — would
/// fail the writer's insert on the first long value. Hash indexes store a hash code, and GIN's
/// jsonb operator classes hash long keys.
pub const UNBOUNDED: [&str; 4] = ["statement", "message", "objects", "decision"];

/// Access methods that store indexed values as they are.
pub fn stores_values(am: &str) -> bool {
    am == "btree" || am == "brin"
}

/// CREATE INDEX on one of pg_custody's tables: plain columns only, CONCURRENTLY, with
/// built-in access methods and operator classes. Anything that can fail or run user code
/// while the writer inserts (an expression, a predicate, a uniqueness check, a user-defined
/// operator class) would stop recording or run that code inside pg_custody's own work.
///
/// # Safety
/// `s` is a valid parse node, in a transaction.
unsafe fn index(s: &pg_sys::IndexStmt) -> Option<CustodyError> {
    // SAFETY: the statement's RangeVar, in a transaction (caller's contract).
    let r = unsafe { relid(s.relation) };
    let t = protected(r)?;
    let name = super::label(t);
    if !s.concurrent {
        return would_block("CREATE INDEX", r, CONCURRENTLY);
    }
    let refuse = |why: &str| redefinition(format!("cannot create this index on {name}: {why}"), Some(
        "Indexes on pg_custody's tables are built CONCURRENTLY on plain columns, with btree, hash, brin or gin and their built-in operator classes.",
    ));
    if s.unique || s.primary || s.isconstraint || !s.excludeOpNames.is_null() {
        return refuse("a uniqueness or exclusion constraint could refuse the writer's records");
    }
    if !s.whereClause.is_null() {
        return refuse("a partial index predicate is evaluated for every record the writer stores");
    }
    // SAFETY: accessMethod is NULL or a NUL-terminated name.
    let am = unsafe { cstr(s.accessMethod) };
    if !["btree", "hash", "brin", "gin"].contains(&am.as_str()) {
        return refuse(&format!("access method {am} is not one of btree, hash, brin, gin"));
    }
    // SAFETY: syscache lookup by name, missing_ok; accessMethod is not NULL (it is one of the
    // names just checked).
    let am_oid = unsafe { pg_sys::get_index_am_oid(s.accessMethod, true) };
    // SAFETY: indexParams and indexIncludingParams are NIL or Lists of IndexElem.
    let elems = unsafe { list::<pg_sys::IndexElem>(s.indexParams).chain(list::<pg_sys::IndexElem>(s.indexIncludingParams)) };
    for e in elems {
        // SAFETY: a non-NULL element of a List of IndexElem.
        let e = unsafe { &*e };
        if !e.expr.is_null() || e.name.is_null() {
            return refuse("an index expression is evaluated for every record the writer stores");
        }
        // SAFETY: e.name is a NUL-terminated column name (checked non-NULL above).
        let col = unsafe { cstr(e.name) };
        if stores_values(&am) && UNBOUNDED.contains(&col.as_str()) {
            return refuse(&format!("column {col} has values longer than a {am} index entry can hold"));
        }
        if !e.opclass.is_null() {
            // SAFETY: catalog lookup by name; missing_ok.
            let opclass = unsafe { pg_sys::get_opclass_oid(am_oid, e.opclass, true) };
            if opclass == pg_sys::InvalidOid || u32::from(opclass) >= pg_sys::FirstNormalObjectId {
                return refuse("only built-in operator classes may be used");
            }
        }
    }
    None
}

/// A non-concurrent REINDEX that would reach pg_custody's tables.
///
/// # Safety
/// `s` is a valid parse node, in a transaction.
unsafe fn reindex(s: &pg_sys::ReindexStmt) -> Option<CustodyError> {
    use pg_sys::ReindexObjectType::*;
    // SAFETY: params is NIL or a List of DefElem (caller's contract).
    if unsafe { option_on(s.params, "concurrently") } {
        return None;
    }
    match s.kind {
        REINDEX_OBJECT_INDEX | REINDEX_OBJECT_TABLE => {
            // SAFETY: the statement's RangeVar, in a transaction (caller's contract).
            let r = unsafe { relid(s.relation) };
            covered(r).and_then(|_| would_block("REINDEX", r, CONCURRENTLY))
        }
        REINDEX_OBJECT_SCHEMA => {
            // SAFETY: the grammar always names the schema of REINDEX SCHEMA, so `name` is a
            // NUL-terminated string.
            let name = unsafe { CStr::from_ptr(s.name) }.to_string_lossy().into_owned();
            // pg_toast holds the log's TOAST table.
            let reaches_ours = Some(name.clone()) == own_schema_name() || name == "pg_toast";
            (reaches_ours && holds_the_log())
                .then(|| ids().map(|i| i.table(Table::AuditLog)))
                .flatten()
                .and_then(|r| would_block("REINDEX SCHEMA", r, CONCURRENTLY))
        }
        REINDEX_OBJECT_DATABASE => holds_the_log()
            .then(|| ids().map(|i| i.table(Table::AuditLog)))
            .flatten()
            .and_then(|r| would_block("REINDEX DATABASE", r, CONCURRENTLY)),
        _ => None,
    }
}

/// Privileges that would let someone write a protected table (only REVOKE and SELECT-like
/// grants are harmless).
///
/// # Safety
/// `s` is a valid parse node, in a transaction.
unsafe fn grant(s: &pg_sys::GrantStmt) -> Option<CustodyError> {
    if !s.is_grant || s.objtype != pg_sys::ObjectType::OBJECT_TABLE {
        return None;
    }
    // SAFETY: privileges is a List of AccessPriv (caller's contract); priv_name is NULL (ALL
    // on columns) or a string, both of which `cstr` takes.
    let writes = s.privileges.is_null()
        || unsafe {
            list::<pg_sys::AccessPriv>(s.privileges).any(|p| {
                let name = cstr((*p).priv_name).to_ascii_lowercase();
                !matches!(name.as_str(), "select")
            })
        };
    if !writes {
        return None;
    }
    let target = match s.targtype {
        // SAFETY: for tables, ACL_TARGET_OBJECT's objects are a List of RangeVar; in a transaction.
        pg_sys::GrantTargetType::ACL_TARGET_OBJECT => unsafe {
            list::<pg_sys::RangeVar>(s.objects).map(|rv| relid(rv)).find_map(protected)
        },
        pg_sys::GrantTargetType::ACL_TARGET_ALL_IN_SCHEMA => {
            let own = own_schema_name();
            // SAFETY: ALL TABLES IN SCHEMA's objects are a List of String nodes (schema names).
            let names: Vec<String> = unsafe { list::<pg_sys::String>(s.objects).map(|n| cstr((*n).sval)).collect() };
            names.iter().any(|n| Some(n) == own.as_ref()).then_some(Table::AuditLog)
        }
        _ => None,
    }?;
    redefinition(
        format!("cannot grant write privileges on {}", super::label(target)),
        Some("Only the custody writer and pg_custody's functions write pg_custody's tables; GRANT SELECT is allowed."),
    )
}
