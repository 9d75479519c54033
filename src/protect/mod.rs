//! Protection of pg_custody's objects while the library is loaded: nobody, superusers
//! included, may change the audit log, its checkpoints and keys (only the custody writer
//! appends), nor the policy store (only pg_custody's own statements write it), nor what those
//! objects are (their schema, definition, indexes, inheritance, catalog rows).
//!
//! Objects are recognised by OID, found once from the extension and then kept: renaming the
//! schema, a table or the extension — by DDL or by editing the catalog — hides nothing. The
//! layers, each closing a path the others cannot see:
//! - the permission-check hook refuses DML on the protected tables (`range_table_violation`);
//! - the utility hook refuses DDL, locks and maintenance that would change them or block the
//!   writer, before any lock is taken (`utility`);
//! - the object-access hook refuses creating, altering or dropping objects in the extension's
//!   schema however that is reached (`object_access`);
//! - direct DML on system catalogs is checked row by row after it ran (`catalog`);
//! - the writer and the store functions check their tables are as pg_custody made them
//!   before they write (`table`), since triggers or index expressions added while the library
//!   was unloaded would otherwise run inside pg_custody's own work.
//!
//! What is done with the library unloaded is what the hash chain and the head the writer
//! remembers detect.

pub mod catalog;
pub mod object;
pub mod table;
pub mod utility;

use std::ffi::CStr;

use pgrx::pg_sys;

use crate::error::CustodyError;
use crate::{own, settings};

/// The tables pg_custody protects, in the extension's schema.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Table {
    AuditLog,
    Checkpoints,
    PublicKeys,
    PolicyStore,
    AttributeStore,
    Suspensions,
    RowPolicies,
}

pub const TABLES: [Table; 7] = [
    Table::AuditLog,
    Table::Checkpoints,
    Table::PublicKeys,
    Table::PolicyStore,
    Table::AttributeStore,
    Table::Suspensions,
    Table::RowPolicies,
];

impl Table {
    pub fn name(self) -> &'static CStr {
        match self {
            Table::AuditLog => c"audit_log",
            Table::Checkpoints => c"checkpoints",
            Table::PublicKeys => c"public_keys",
            Table::PolicyStore => c"policy_store",
            Table::AttributeStore => c"attribute_store",
            Table::Suspensions => c"suspensions",
            Table::RowPolicies => c"row_policies",
        }
    }

    /// The evidence: only the custody writer appends to these.
    pub fn is_evidence(self) -> bool {
        matches!(self, Table::AuditLog | Table::Checkpoints | Table::PublicKeys)
    }
}

/// pg_custody's objects in this database, by OID.
#[derive(Clone, Copy)]
pub struct Ids {
    pub ext: pg_sys::Oid,
    pub nsp: pg_sys::Oid,
    /// Indexed like `TABLES`; InvalidOid where the table does not exist (outside
    /// custody.database only row_policies does).
    pub tables: [pg_sys::Oid; 7],
}

impl Ids {
    pub fn table(&self, t: Table) -> pg_sys::Oid {
        self.tables[t as usize]
    }
}

static mut IDS: Option<Ids> = None;
/// This transaction dropped pg_custody's extension (custody.allow_drop), and whether in
/// custody.database: at commit the writer's head becomes a tombstone (`head::forget`).
static mut EXTENSION_DROPPED: Option<bool> = None;

/// Whether this transaction dropped the extension, and whether in custody.database (and
/// forgets it: call at commit, prepare or abort).
pub fn take_extension_dropped() -> Option<bool> {
    // SAFETY: single-threaded backend.
    unsafe {
        let dropped = EXTENSION_DROPPED;
        EXTENSION_DROPPED = None;
        dropped
    }
}
/// Whether this transaction drops the audit log (pg_custody's extension in custody.database).
pub fn drops_the_log() -> bool {
    // SAFETY: single-threaded backend.
    unsafe { EXTENSION_DROPPED == Some(true) }
}

/// A relcache invalidation arrived since the last look: the extension may have been created
/// or dropped and re-created since.
static mut STALE: bool = true;

pub fn init() {
    // SAFETY: _PG_init; the callback lives for the process.
    unsafe { pg_sys::CacheRegisterRelcacheCallback(Some(relcache_callback), pg_sys::Datum::from(0)) };
}

/// The relcache invalidation callback.
///
/// # Safety
/// Called only by PostgreSQL, as a registered relcache callback.
#[pgrx::pg_guard]
unsafe extern "C-unwind" fn relcache_callback(_arg: pg_sys::Datum, _relid: pg_sys::Oid) {
    // No catalog access here (we are inside invalidation processing): look again next time.
    // SAFETY: a plain store to a flag of this single-threaded backend; nothing holds a
    // reference to it.
    unsafe { STALE = true };
}

/// pg_custody's objects in this database, or None when the extension was never found here.
///
/// Found by the extension's name once; afterwards the OIDs are kept, and a new look only
/// replaces them when the extension they belong to is gone (dropped and created again). So a
/// rename of the extension, its schema or its tables — even one made by editing the catalog
/// inside the statement now running — cannot make pg_custody forget what it protects.
#[allow(static_mut_refs)]
pub fn ids() -> Option<Ids> {
    // SAFETY: single-threaded backend; catalog lookups happen inside a transaction (callers
    // are hooks and functions running in one).
    unsafe {
        if STALE && pg_sys::IsTransactionState() {
            STALE = false;
            if let Some(found) = lookup() {
                let keep = IDS.is_some_and(|old| old.ext != found.ext && extension_exists(old.ext));
                if !keep {
                    IDS = Some(found);
                }
            }
        }
        IDS
    }
}

/// Forgets the OIDs after pg_custody's extension was dropped (custody.allow_drop).
pub fn forget() {
    // SAFETY: single-threaded backend.
    unsafe {
        IDS = None;
        STALE = true;
    }
}

/// (oid, extnamespace) of the pg_catalog.pg_extension row named `name`, read with `snapshot`
/// (NULL: the catalog snapshot).
///
/// # Safety
/// In a transaction; `snapshot` is NULL or a registered snapshot.
unsafe fn extension_row(key: ExtKey, snapshot: pg_sys::Snapshot) -> Option<(pg_sys::Oid, pg_sys::Oid)> {
    // SAFETY: in a transaction (caller's contract): pg_extension is opened and closed with the
    // same lock; the scan key is initialised before use and outlives the scan; a name key's
    // datum points to a NUL-terminated &CStr that outlives the scan (as get_extension_oid
    // passes a C string for the name column); a non-NULL tuple from the scan is a
    // pg_extension row, read before systable_endscan releases it.
    unsafe {
        let rel = pg_sys::table_open(pg_sys::ExtensionRelationId, pg_sys::AccessShareLock as pg_sys::LOCKMODE);
        let mut skey: pg_sys::ScanKeyData = std::mem::zeroed();
        let (index, attno, proc_, datum) = match key {
            ExtKey::Name(name) => (
                pg_sys::ExtensionNameIndexId,
                2, // extname
                pg_sys::F_NAMEEQ,
                pg_sys::Datum::from(name.as_ptr()),
            ),
            ExtKey::Oid(oid) => (pg_sys::ExtensionOidIndexId, 1, pg_sys::F_OIDEQ, pg_sys::Datum::from(oid)),
        };
        pg_sys::ScanKeyInit(
            &mut skey,
            attno,
            pg_sys::BTEqualStrategyNumber as pg_sys::StrategyNumber,
            pg_sys::Oid::from(proc_),
            datum,
        );
        let scan = pg_sys::systable_beginscan(rel, pg_sys::Oid::from(index), true, snapshot, 1, &mut skey);
        let tup = pg_sys::systable_getnext(scan);
        let found = (!tup.is_null()).then(|| {
            let form = &*(pg_sys::heap_tuple_get_struct::<pg_sys::FormData_pg_extension>(tup));
            (form.oid, form.extnamespace)
        });
        pg_sys::systable_endscan(scan);
        pg_sys::table_close(rel, pg_sys::AccessShareLock as pg_sys::LOCKMODE);
        found
    }
}

enum ExtKey<'a> {
    Name(&'a CStr),
    Oid(pg_sys::Oid),
}

fn extension_exists(ext: pg_sys::Oid) -> bool {
    // SAFETY: catalog scan with the catalog snapshot; its one caller, `ids`, checked
    // IsTransactionState first.
    unsafe { extension_row(ExtKey::Oid(ext), std::ptr::null_mut()).is_some() }
}

/// The extension's OID by name (None: not created in this database).
pub fn extension_oid() -> Option<pg_sys::Oid> {
    // SAFETY: catalog scan with the catalog snapshot, inside a transaction: callers are hooks
    // and functions running in one (`in_own_script` only while an extension is being created).
    unsafe { extension_row(ExtKey::Name(c"pg_custody"), std::ptr::null_mut()).map(|(o, _)| o) }
}

/// pg_custody's OIDs as the catalog has them now.
///
/// # Safety
/// In a transaction.
unsafe fn lookup() -> Option<Ids> {
    // SAFETY: catalog scan and syscache lookups in a transaction (caller's contract); the table
    // names are NUL-terminated &'static CStr.
    unsafe {
        let (ext, nsp) = extension_row(ExtKey::Name(c"pg_custody"), std::ptr::null_mut())?;
        let tables = TABLES.map(|t| pg_sys::get_relname_relid(t.name().as_ptr(), nsp));
        Some(Ids { ext, nsp, tables })
    }
}

/// Which protected table `relid` is, if any.
pub fn protected(relid: pg_sys::Oid) -> Option<Table> {
    if relid == pg_sys::InvalidOid {
        return None;
    }
    let ids = ids()?;
    TABLES.into_iter().find(|&t| ids.table(t) == relid)
}

/// Whether `relid` is an index of a protected table.
pub fn protected_index(relid: pg_sys::Oid) -> Option<Table> {
    if relid == pg_sys::InvalidOid || ids().is_none() {
        return None;
    }
    // SAFETY: syscache lookups; an unknown relation gives InvalidOid.
    unsafe {
        if pg_sys::get_rel_relkind(relid) as u8 != pg_sys::RELKIND_INDEX
            && pg_sys::get_rel_relkind(relid) as u8 != pg_sys::RELKIND_PARTITIONED_INDEX
        {
            return None;
        }
        protected(pg_sys::IndexGetRelation(relid, true))
    }
}

/// Which protected table `relid` belongs to: the table itself, one of its indexes, its TOAST
/// table or the TOAST table's index (locking any of them locks the writer out).
pub fn covered(relid: pg_sys::Oid) -> Option<Table> {
    if let Some(t) = protected(relid).or_else(|| protected_index(relid)) {
        return Some(t);
    }
    let ids = ids()?;
    // SAFETY: syscache and relcache lookups; unknown relations give InvalidOid / NULL.
    unsafe {
        let toast = match pg_sys::get_rel_relkind(relid) as u8 {
            pg_sys::RELKIND_TOASTVALUE => relid,
            pg_sys::RELKIND_INDEX => pg_sys::IndexGetRelation(relid, true),
            _ => return None,
        };
        TABLES.into_iter().find(|&t| {
            let r = ids.table(t);
            r != pg_sys::InvalidOid && {
                let rel = pg_sys::RelationIdGetRelation(r);
                let hit = !rel.is_null() && (*(*rel).rd_rel).reltoastrelid == toast && toast != pg_sys::InvalidOid;
                if !rel.is_null() {
                    pg_sys::RelationClose(rel);
                }
                hit
            }
        })
    }
}

/// Whether this backend is running pg_custody's own extension script (CREATE or ALTER
/// EXTENSION pg_custody): its statements may define the protected tables. Event triggers do
/// not fire there (`utility::context`), so nothing but the script runs in it.
pub fn in_own_script() -> bool {
    // SAFETY: plain reads of the extension-creation globals; the lookup only while set.
    unsafe {
        pg_sys::creating_extension
            && Some(pg_sys::CurrentExtensionObject) == extension_oid()
    }
}

/// The statement depth of a CREATE or ALTER EXTENSION being run (its script's statements run
/// one level deeper).
static mut EXTENSION_DEPTH: Option<i32> = None;

/// The statement depth of the CREATE or ALTER EXTENSION PostgreSQL is running, if any.
pub fn extension_depth() -> Option<i32> {
    // SAFETY: single-threaded backend; a plain read.
    unsafe { EXTENSION_DEPTH }
}

/// Notes (Some) or forgets (None) the depth of a CREATE/ALTER EXTENSION about to run or that
/// returned; returns the previous value, to put back when it returned (an ERROR leaves that
/// to the abort, `hooks::HookState`).
pub fn set_extension_depth(depth: Option<i32>) -> Option<i32> {
    // SAFETY: single-threaded backend; no reference to the static is held.
    unsafe { std::mem::replace(&mut *std::ptr::addr_of_mut!(EXTENSION_DEPTH), depth) }
}

/// Whether the object being created or altered comes from a statement of an extension's own
/// script (installed on the server's file system), not from anything that runs nested in it
/// (an event trigger, a DO block).
pub fn extension_script_statement() -> bool {
    // SAFETY: plain reads of single-threaded backend state.
    unsafe { pg_sys::creating_extension && EXTENSION_DEPTH.is_some_and(|d| crate::capture::depth() == d + 1) }
}

/// `schema.name` of a protected table, for messages.
pub fn label(t: Table) -> String {
    let nsp = ids().map(|i| i.nsp).unwrap_or(pg_sys::InvalidOid);
    // SAFETY: syscache lookup; a missing schema gives NULL.
    let schema = unsafe { crate::capture::objects::cstr(pg_sys::get_namespace_name(nsp)) };
    let schema = if schema.is_empty() { "custody".to_string() } else { schema };
    format!("{schema}.{}", t.name().to_string_lossy())
}

/// A restore of pg_custody's tables in the transaction that creates them (`pg_restore
/// --single-transaction`, `psql -1`): a superuser may add rows to a table this very
/// transaction created. Nothing else can have seen it — no writer appended to the log, no
/// session was gated by the store — and the writer that finds it after the commit continues
/// the restored chain with a hand-over (docs/operations.md).
pub fn restoring(relid: pg_sys::Oid) -> bool {
    // SAFETY: superuser() reads this backend's identity; the relcache entry is opened and
    // closed here (a missing relation gives NULL), and rd_createSubid is a plain field.
    unsafe {
        // Not in a transaction that dropped pg_custody: a log dropped and created again in
        // one transaction is not a restore, it is a rewrite.
        if relid == pg_sys::InvalidOid || !pg_sys::superuser() || { let d = EXTENSION_DROPPED; d.is_some() } {
            return false;
        }
        let rel = pg_sys::RelationIdGetRelation(relid);
        if rel.is_null() {
            return false;
        }
        let created_here = (*rel).rd_createSubid != 0; // InvalidSubTransactionId
        pg_sys::RelationClose(rel);
        created_here
    }
}

/// After CREATE or ALTER SUBSCRIPTION: a subscription that would replicate into one of
/// pg_custody's tables (their rows come from the writer and pg_custody's functions only; a
/// log a subscription fills is one the writer refuses to append to) is refused.
pub fn refuse_subscription_into_protected() {
    let Some(ids) = ids() else { return };
    for t in TABLES {
        let oid = ids.table(t);
        if oid != pg_sys::InvalidOid && subscription_feeding(oid).is_some() {
            refuse(t, "logical replication into");
        }
    }
}

/// The subscription that replicates into `relid`, if one does (pg_subscription_rel).
pub fn subscription_feeding(relid: pg_sys::Oid) -> Option<String> {
    let q = c"SELECT s.subname::pg_catalog.text FROM pg_catalog.pg_subscription_rel r \
              JOIN pg_catalog.pg_subscription s ON s.oid OPERATOR(pg_catalog.=) r.srsubid \
              WHERE r.srrelid OPERATOR(pg_catalog.=) $1 LIMIT 1";
    own::pinned(|| {
        pgrx::spi::Spi::connect(|client| own::select(client, q, &[relid.into()]).ok()?.first().get_one::<String>().ok().flatten())
    })
}

/// Raises the refusal of `action` on the protected table `t`.
pub fn refuse(t: Table, action: &str) -> ! {
    CustodyError::Protected { relation: label(t), action: action.into(), evidence: t.is_evidence() }.report()
}

/// Executor check: a modification (or row lock) of a protected table that this statement may
/// not make, if any. The writer appends to the evidence; pg_custody's own statement being
/// started (`own::is_own_rtable`) may change the policy store; nobody else changes either.
///
/// # Safety
/// `rtable` must be a valid List of RangeTblEntry or NIL, and `perm_infos` its permission list.
pub unsafe fn range_table_violation(rtable: *mut pg_sys::List, perm_infos: crate::pgver::PermInfos) -> Option<(Table, &'static str)> {
    if own::in_writer() || rtable.is_null() {
        return None;
    }
    let own_statement = own::is_own_rtable(rtable);
    let modify = (pg_sys::ACL_INSERT | pg_sys::ACL_UPDATE | pg_sys::ACL_DELETE) as u64;
    // SAFETY: `rtable` is a valid List of RangeTblEntry and `perm_infos` its permission list
    // (caller's contract), walked while both are alive.
    for rte in unsafe { crate::pgver::range_table(rtable, perm_infos) } {
        if rte.perms & modify == 0 {
            continue;
        }
        let Some(t) = protected(rte.relid) else { continue };
        if own_statement && !t.is_evidence() {
            continue;
        }
        if rte.perms & modify == pg_sys::ACL_INSERT as u64 && restoring(rte.relid) {
            continue;
        }
        let action = if rte.perms & pg_sys::ACL_DELETE as u64 != 0 {
            "DELETE"
        } else if rte.perms & pg_sys::ACL_UPDATE as u64 != 0 {
            "UPDATE"
        } else {
            "INSERT"
        };
        return Some((t, action));
    }
    None
}

/// DROP of one of pg_custody's objects, however it was reached (DROP TABLE, DROP SCHEMA ...
/// CASCADE, DROP EXTENSION, DROP OWNED): refused unless custody.allow_drop.
pub fn check_drop(class_id: pg_sys::Oid, object_id: pg_sys::Oid, sub_id: i32) {
    let Some(ids) = ids() else { return };
    let what = if class_id == pg_sys::RelationRelationId {
        protected(object_id).map(|t| {
            let col = if sub_id != 0 { "a column of " } else { "" };
            format!("{col}{}", label(t))
        })
    } else if class_id == pg_sys::NamespaceRelationId && object_id == ids.nsp {
        Some(format!("schema {}", label(Table::AuditLog).split('.').next().unwrap_or("custody")))
    } else if class_id == pg_sys::ExtensionRelationId && object_id == ids.ext {
        Some("extension pg_custody".to_string())
    } else {
        None
    };
    let Some(what) = what else { return };
    if settings::allow_drop() {
        if class_id == pg_sys::ExtensionRelationId {
            forget();
            // SAFETY: single-threaded backend.
            unsafe { EXTENSION_DROPPED = Some(crate::api::in_custody_database()) };
        }
        return;
    }
    CustodyError::DropRefused { object: what }.report()
}

/// The quoted, schema-qualified name of a protected table as it is now, for pg_custody's
/// own SQL (found by OID: a schema renamed while the library was unloaded is followed, and
/// another schema called custody is never written). ERROR when the table does not exist.
pub fn sql_name(t: Table) -> String {
    let relid = ids().map(|i| i.table(t)).unwrap_or(pg_sys::InvalidOid);
    // SAFETY: syscache lookups; quote_qualified_identifier returns a palloc'd string.
    unsafe {
        let rel = pg_sys::get_rel_name(relid);
        if relid == pg_sys::InvalidOid || rel.is_null() {
            CustodyError::NotInThisDatabase { table: t.name().to_string_lossy().into_owned() }.report();
        }
        let nsp = pg_sys::get_namespace_name(pg_sys::get_rel_namespace(relid));
        crate::capture::objects::cstr(pg_sys::quote_qualified_identifier(nsp, rel))
    }
}
