//! Protection of the audit log: while the library is loaded nobody, superusers included,
//! may change `custody.audit_log` except the custody writer appending to it.
//!
//! Three layers, each closing a path the others cannot see: the permission-check hook
//! (hooks/executor.rs) refuses INSERT/UPDATE/DELETE/MERGE/SELECT FOR UPDATE; the utility hook refuses TRUNCATE, COPY FROM,
//! ALTER, RENAME, triggers, rules and policies; the object-access hook refuses every DROP,
//! however it is reached (DROP TABLE, DROP SCHEMA ... CASCADE, DROP EXTENSION, DROP OWNED).
//! Anything done with the library unloaded is what the hash chain detects.

use std::ffi::CStr;

use pgrx::pg_sys;

use crate::error::CustodyError;
use crate::settings;

/// Tables pg_custody protects, in schema `custody`.
/// The first three are the evidence (only the writer appends); the others are changed only
/// by pg_custody's own functions (which run as internal work).
const PROTECTED: [&CStr; 7] = [
    c"audit_log",
    c"checkpoints",
    c"public_keys",
    c"policy_store",
    c"attribute_store",
    c"suspensions",
    c"row_policies",
];

static mut IS_WRITER: bool = false;
/// Cached OIDs of the protected tables in this database (None = not looked up yet).
static mut CACHE: Option<[pg_sys::Oid; 7]> = None;
static mut PREV_OBJECT_ACCESS: pg_sys::object_access_hook_type = None;

/// Marks this process as the custody writer, the one allowed to append.
pub fn set_writer() {
    // SAFETY: single-threaded process; set once at writer start.
    unsafe { IS_WRITER = true };
}

/// The writer, and pg_custody's own functions, may change the protected tables.
pub fn is_writer() -> bool {
    (unsafe { IS_WRITER }) || crate::capture::is_internal()
}

pub fn init() {
    // SAFETY: _PG_init; chaining the previous hook.
    unsafe {
        PREV_OBJECT_ACCESS = pg_sys::object_access_hook;
        pg_sys::object_access_hook = Some(object_access);
        pg_sys::CacheRegisterRelcacheCallback(Some(relcache_callback), pg_sys::Datum::from(0));
    }
}

#[pgrx::pg_guard]
unsafe extern "C-unwind" fn relcache_callback(_arg: pg_sys::Datum, _relid: pg_sys::Oid) {
    // Any relcache invalidation may be a drop or rename: look the OIDs up again next time.
    unsafe { CACHE = None };
}

fn protected_oids() -> [pg_sys::Oid; 7] {
    // SAFETY: syscache lookups inside a transaction; missing objects give InvalidOid.
    unsafe {
        if let Some(c) = CACHE {
            return c;
        }
        let nsp = pg_sys::get_namespace_oid(c"custody".as_ptr(), true);
        let oids = if nsp == pg_sys::InvalidOid {
            [pg_sys::InvalidOid; 7]
        } else {
            PROTECTED.map(|name| pg_sys::get_relname_relid(name.as_ptr(), nsp))
        };
        CACHE = Some(oids);
        oids
    }
}

/// Whether `relid` is one of the protected tables.
pub fn is_protected(relid: pg_sys::Oid) -> bool {
    relid != pg_sys::InvalidOid && protected_oids().contains(&relid)
}

fn relation_label(relid: pg_sys::Oid) -> String {
    // SAFETY: syscache lookup in a transaction.
    unsafe {
        let name = crate::capture::objects::cstr(pg_sys::get_rel_name(relid));
        format!("custody.{name}")
    }
}

/// Raises the refusal for `action` on the protected table `relid`.
pub fn refuse(relid: pg_sys::Oid, action: &str) -> ! {
    CustodyError::Protected { relation: relation_label(relid), action: action.into() }.report()
}

/// Executor check: a modification (or row lock) of a protected table, if any.
///
/// # Safety
/// `rtable` must be a valid List of RangeTblEntry or NIL.
pub unsafe fn range_table_violation(rtable: *mut pg_sys::List) -> Option<(pg_sys::Oid, &'static str)> {
    if is_writer() || rtable.is_null() {
        return None;
    }
    let modify = (pg_sys::ACL_INSERT | pg_sys::ACL_UPDATE | pg_sys::ACL_DELETE) as u64;
    let n = unsafe { (*rtable).length };
    for i in 0..n {
        let rte = unsafe { &*(pg_sys::list_nth(rtable, i) as *mut pg_sys::RangeTblEntry) };
        if rte.rtekind == pg_sys::RTEKind::RTE_RELATION
            && (rte.requiredPerms as u64) & modify != 0
            && is_protected(rte.relid)
        {
            let perms = rte.requiredPerms as u64;
            let action = if perms & pg_sys::ACL_DELETE as u64 != 0 {
                "DELETE"
            } else if perms & pg_sys::ACL_UPDATE as u64 != 0 {
                "UPDATE"
            } else {
                "INSERT"
            };
            return Some((rte.relid, action));
        }
    }
    None
}

unsafe fn rv_oid(rv: *mut pg_sys::RangeVar) -> pg_sys::Oid {
    if rv.is_null() {
        return pg_sys::InvalidOid;
    }
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

unsafe fn check_rv(rv: *mut pg_sys::RangeVar, action: &'static str) -> Option<(pg_sys::Oid, &'static str)> {
    let oid = unsafe { rv_oid(rv) };
    is_protected(oid).then_some((oid, action))
}

/// Utility check: a statement that would change a protected table, if this is one.
///
/// # Safety
/// `node` must be a valid parse tree node.
pub unsafe fn utility_violation(node: *mut pg_sys::Node) -> Option<(pg_sys::Oid, &'static str)> {
    if is_writer() || node.is_null() || protected_oids() == [pg_sys::InvalidOid; 7] {
        return None;
    }
    // Our own extension scripts (CREATE/ALTER EXTENSION pg_custody) may alter the tables.
    unsafe {
        if pg_sys::creating_extension
            && pg_sys::CurrentExtensionObject
                == pg_sys::get_extension_oid(c"pg_custody".as_ptr(), true)
        {
            return None;
        }
    }
    use pg_sys::NodeTag::*;
    unsafe {
        match (*node).type_ {
            T_TruncateStmt => {
                let s = &*(node as *mut pg_sys::TruncateStmt);
                (0..list_len(s.relations)).find_map(|i| {
                    check_rv(pg_sys::list_nth(s.relations, i) as *mut pg_sys::RangeVar, "TRUNCATE")
                })
            }
            T_CopyStmt => {
                let s = &*(node as *mut pg_sys::CopyStmt);
                if s.is_from { check_rv(s.relation, "COPY FROM") } else { None }
            }
            T_AlterTableStmt => {
                check_rv((*(node as *mut pg_sys::AlterTableStmt)).relation, "ALTER TABLE")
            }
            T_RenameStmt => check_rv((*(node as *mut pg_sys::RenameStmt)).relation, "RENAME"),
            T_AlterObjectSchemaStmt => check_rv(
                (*(node as *mut pg_sys::AlterObjectSchemaStmt)).relation,
                "ALTER ... SET SCHEMA",
            ),
            T_CreateTrigStmt => {
                check_rv((*(node as *mut pg_sys::CreateTrigStmt)).relation, "CREATE TRIGGER")
            }
            T_RuleStmt => check_rv((*(node as *mut pg_sys::RuleStmt)).relation, "CREATE RULE"),
            T_CreatePolicyStmt => {
                check_rv((*(node as *mut pg_sys::CreatePolicyStmt)).table, "CREATE POLICY")
            }
            T_AlterPolicyStmt => {
                check_rv((*(node as *mut pg_sys::AlterPolicyStmt)).table, "ALTER POLICY")
            }
            _ => None,
        }
    }
}

unsafe fn list_len(l: *mut pg_sys::List) -> i32 {
    if l.is_null() { 0 } else { unsafe { (*l).length } }
}

#[pgrx::pg_guard]
unsafe extern "C-unwind" fn object_access(
    access: pg_sys::ObjectAccessType::Type,
    class_id: pg_sys::Oid,
    object_id: pg_sys::Oid,
    sub_id: std::ffi::c_int,
    arg: *mut std::ffi::c_void,
) {
    unsafe {
        if let Some(prev) = PREV_OBJECT_ACCESS {
            prev(access, class_id, object_id, sub_id, arg);
        }
    }
    if access != pg_sys::ObjectAccessType::OAT_DROP || settings::allow_drop() {
        return;
    }
    if class_id == pg_sys::RelationRelationId && is_protected(object_id) {
        let what = if sub_id != 0 { "a column of" } else { "" };
        CustodyError::DropRefused { object: format!("{what} {}", relation_label(object_id)).trim().to_string() }
            .report();
    }
}
