//! The policy store in `custody.database` and the functions that manage it: Rego policies,
//! attributes that expire, suspensions. Each change is versioned, recorded in the audit chain
//! (class `policy`) and, at commit, published to every backend of the cluster.

use pgrx::prelude::*;
use pgrx::{pg_sys, JsonB};
use sha2::{Digest as _, Sha256};

use custody_policy::{compile_check, Attribute, Gate, PolicySource, Snapshot, Suspension};

use std::ffi::{CStr, CString};

use crate::capture::{self, class::Class};
use crate::error::CustodyError;
use crate::protect::{sql_name, Table};

/// Changes made by this transaction: publish at commit, record before it.
struct Pending {
    dirty: bool,
    events: Vec<(String, serde_json::Value)>,
    snapshot: Option<Snapshot>,
    /// Extensions this transaction created (object-access hook), looked at before commit.
    created: Vec<pg_sys::Oid>,
}

static mut PENDING: Pending = Pending { dirty: false, events: Vec::new(), snapshot: None, created: Vec::new() };

#[allow(static_mut_refs)]
fn pending() -> &'static mut Pending {
    // SAFETY: single-threaded backend.
    unsafe { &mut PENDING }
}


/// Refuses callers that are neither superuser nor members of custody_admin (`what` names
/// what they tried to manage). The refused call is recorded like any failed statement.
pub(super) fn require_manager(what: &str) {
    // SAFETY: catalog lookups in a transaction.
    let allowed = unsafe {
        let admin = pg_sys::get_role_oid(c"custody_admin".as_ptr(), true);
        pg_sys::superuser()
            || (admin != pg_sys::InvalidOid && pg_sys::is_member_of_role(pg_sys::GetUserId(), admin))
    };
    if !allowed {
        CustodyError::NotManager { what: what.into() }.report();
    }
}

/// The checks of every store change: the caller may manage, we are in custody.database,
/// and changes are serialized (each reads the store back at commit).
fn check_manager(writes: Table) {
    require_manager("policies");
    let here = capture::who().database_name;
    if here != crate::settings::database() {
        CustodyError::PolicyDatabase { database: crate::settings::database().into() }.report();
    }
    // Changes are serialized by a lock on policy_store that nobody else can take (an advisory
    // lock any role could hold forever, and nobody could suspend anyone meanwhile): SHARE
    // UPDATE EXCLUSIVE conflicts with itself, not with readers, and LOCK TABLE in that mode
    // needs privileges only the owner has (and pg_custody refuses stronger ones).
    // The same lock orders publications: a change publishes at commit, before its locks are
    // released, and the writer publishes what it reads under this lock, so the store that is
    // published last is always the newest one.
    let store = crate::protect::ids().map(|i| i.table(Table::PolicyStore)).unwrap_or(pg_sys::InvalidOid);
    if store != pg_sys::InvalidOid {
        // SAFETY: a heavyweight lock held until the end of the transaction.
        unsafe { pg_sys::LockRelationOid(store, pg_sys::ShareUpdateExclusiveLock as pg_sys::LOCKMODE) };
    }
    // At commit the store is read back and published. Under a snapshot older than the lock
    // (REPEATABLE READ, SERIALIZABLE) that read would miss a change another session
    // committed meanwhile, and publishing it would undo that change for every backend.
    // SAFETY: a plain read of the transaction's isolation level.
    if unsafe { pg_sys::XactIsoLevel } >= pg_sys::XACT_REPEATABLE_READ as i32 {
        CustodyError::ReadCommittedOnly.report();
    }
    // Nothing of anyone else's may run when pg_custody writes its store.
    crate::protect::table::require_oid(writes);
}

/// One of the store's own statements, run with the store owner's rights (search_path pinned,
/// recognised by the hooks as pg_custody's own): the first column of its first row.
///
/// An ERROR of PostgreSQL's in the statement (a constraint, say) is raised as it is; the
/// `spi::Error`s left are pgrx's own (a column of another type than ours), bugs: XX000.
fn own_sql<T: pgrx::FromDatum + pgrx::IntoDatum>(sql: std::borrow::Cow<'_, CStr>, args: &[pgrx::datum::DatumWithOid]) -> Option<T> {
    crate::own::as_owner(|| {
        Spi::connect_mut(|client| {
            let t = crate::own::update(client, &sql, args)?;
            if t.is_empty() {
                return Ok::<_, pgrx::spi::Error>(None);
            }
            t.first().get::<T>(1)
        })
    })
    .unwrap_or_else(|e| error!("{e}"))
}

/// One of the store's own statements whose result is not needed (see `own_sql`, also for
/// why its `error!` is XX000).
fn own_exec(sql: std::borrow::Cow<'_, CStr>, args: &[pgrx::datum::DatumWithOid]) {
    crate::own::as_owner(|| Spi::connect_mut(|client| crate::own::update(client, &sql, args).map(|_| ())))
        .unwrap_or_else(|e| error!("{e}"))
}

/// A statement over the store's tables, with `{policy_store}`, `{attribute_store}` and
/// `{suspensions}` replaced by their current qualified names (found by OID).
pub(super) fn sql(template: &str) -> std::borrow::Cow<'static, CStr> {
    let mut text = template.to_string();
    for (placeholder, t) in [
        ("{policy_store}", Table::PolicyStore),
        ("{attribute_store}", Table::AttributeStore),
        ("{suspensions}", Table::Suspensions),
        ("{row_policies}", Table::RowPolicies),
    ] {
        if text.contains(placeholder) {
            text = text.replace(placeholder, &sql_name(t));
        }
    }
    std::borrow::Cow::Owned(CString::new(text).expect("statement templates have no NUL"))
}

fn changed(command: &str, object: serde_json::Value) {
    let p = pending();
    p.dirty = true;
    p.events.push((command.to_string(), object));
}

/// Records a `policy` event at commit without republishing the store (row policies live in
/// their own database, not in the store).
pub fn event(_class: Class, command: &str, object: serde_json::Value) {
    pending().events.push((command.to_string(), object));
}

/// The first row of a store statement that returns at most one (None when it returns none).
/// A `spi::Error` is a bug, XX000 (see `own_sql`).
pub(super) fn first_row<A, B>(template: &str, args: &[pgrx::datum::DatumWithOid]) -> Option<(Option<A>, Option<B>)>
where
    A: pgrx::FromDatum + pgrx::IntoDatum,
    B: pgrx::FromDatum + pgrx::IntoDatum,
{
    let q = sql(template);
    crate::own::as_owner(|| {
        Spi::connect_mut(|client| {
            let t = crate::own::update(client, &q, args)?;
            if t.is_empty() {
                return Ok::<_, pgrx::spi::Error>(None);
            }
            let t = t.first();
            Ok(Some((t.get::<A>(1)?, t.get::<B>(2).unwrap_or(None))))
        })
    })
    .unwrap_or_else(|e| error!("{e}"))
}

fn sha256_hex(text: &str) -> String {
    custody_chain::hex::encode(&Sha256::digest(text.as_bytes()))
}

/// Compiles a Rego module (package custody) and stores it as the next version of `name`.
#[pg_extern(volatile, parallel_unsafe)]
fn set_policy(name: &str, source: &str) {
    check_manager(Table::PolicyStore);
    if let Err(e) = compile_check(name, source) {
        CustodyError::InvalidPolicy {
            message: format!("policy \"{name}\" does not compile: {e}"),
            detail: None,
            hint: Some("Policies are Rego modules in package custody; the policies in force are unchanged."),
        }
        .report();
    }
    // The new module must also compile together with the others in force.
    let mut snap = latest_snapshot();
    snap.policies.retain(|p| p.name != name);
    snap.policies.push(PolicySource { name: name.into(), version: 0, source: source.into(), enabled: true });
    check_together(name, &snap);
    let sha = sha256_hex(source);
    let version = own_sql::<i32>(
        sql("INSERT INTO {policy_store} AS p (name, source, version, sha256, enabled, updated_at, updated_by) \
             VALUES ($1, $2, 1, pg_catalog.decode($3, 'hex'), true, pg_catalog.now(), session_user) \
             ON CONFLICT (name) DO UPDATE SET source = excluded.source, version = p.version OPERATOR(pg_catalog.+) 1, \
               sha256 = excluded.sha256, enabled = true, updated_at = pg_catalog.now(), updated_by = session_user \
             RETURNING version"),
        &[name.into(), source.into(), sha.as_str().into()],
    )
    .unwrap_or(0);
    changed("SET POLICY", serde_json::json!({"kind": "policy", "name": name, "version": version, "sha256": sha}));
}

/// Refuses (22023) a policy set, `name` changed in it, that does not compile together or
/// cannot be evaluated together: in force it would deny every gated statement with an
/// evaluation error, the administrator's included.
fn check_together(name: &str, snap: &Snapshot) {
    let problem = match Gate::build(snap) {
        Err(e) => Some(format!("policy \"{name}\" conflicts with the policies in force: {e}")),
        Ok(mut gate) => gate
            .check_evaluates()
            .err()
            .map(|e| format!("policy \"{name}\" cannot be evaluated with the policies in force: {e}")),
    };
    if let Some(message) = problem {
        CustodyError::InvalidArgument { message, hint: Some("The policies in force are unchanged.") }.report();
    }
}

/// Removes a policy.
#[pg_extern(volatile, parallel_unsafe)]
fn drop_policy(name: &str) {
    check_manager(Table::PolicyStore);
    let dropped = first_row::<String, String>(
        "DELETE FROM {policy_store} WHERE name OPERATOR(pg_catalog.=) $1 RETURNING pg_catalog.encode(sha256, 'hex'), name",
        &[name.into()],
    );
    let Some((Some(sha), _)) = dropped else {
        CustodyError::UndefinedObject { message: format!("policy \"{name}\" does not exist"), hint: "See custody.policies." }.report();
    };
    changed("DROP POLICY", serde_json::json!({"kind": "policy", "name": name, "sha256": sha}));
}

/// Turns a policy on or off (a new version either way).
#[pg_extern(volatile, parallel_unsafe)]
fn enable_policy(name: &str, on: bool) {
    check_manager(Table::PolicyStore);
    let row = first_row::<i32, String>(
        "UPDATE {policy_store} SET enabled = $2, version = version OPERATOR(pg_catalog.+) 1, updated_at = pg_catalog.now(), \
         updated_by = session_user WHERE name OPERATOR(pg_catalog.=) $1 RETURNING version, pg_catalog.encode(sha256, 'hex')",
        &[name.into(), on.into()],
    );
    let Some((Some(version), Some(sha))) = row else {
        CustodyError::UndefinedObject { message: format!("policy \"{name}\" does not exist"), hint: "See custody.policies." }.report();
    };
    if on {
        check_together(name, &latest_snapshot());
    }
    let command = if on { "ENABLE POLICY" } else { "DISABLE POLICY" };
    changed(command, serde_json::json!({"kind": "policy", "name": name, "version": version, "sha256": sha}));
}

fn check_role(role: &str) {
    let c = std::ffi::CString::new(role).unwrap_or_default();
    // SAFETY: syscache lookup; missing_ok.
    if unsafe { pg_sys::get_role_oid(c.as_ptr(), true) } == pg_sys::InvalidOid {
        CustodyError::UndefinedObject {
            message: format!("role \"{role}\" does not exist"),
            hint: "Attributes and suspensions name existing roles.",
        }
        .report();
    }
}

/// Gives `role` the attribute `key` = `value`, valid from `valid_from` until `valid_until`.
#[pg_extern(volatile, parallel_unsafe)]
fn set_attribute(
    role: &str,
    key: &str,
    value: JsonB,
    valid_from: default!(pgrx::datum::TimestampWithTimeZone, "now()"),
    valid_until: default!(Option<pgrx::datum::TimestampWithTimeZone>, "NULL"),
) {
    check_manager(Table::AttributeStore);
    check_role(role);
    if let Some(until) = valid_until {
        if until <= valid_from {
            CustodyError::InvalidArgument {
                message: "valid_until must be after valid_from".into(),
                hint: Some("Pass NULL for an attribute that does not expire."),
            }
            .report();
        }
    }
    own_exec(
        sql("INSERT INTO {attribute_store} (role, key, value, valid_from, valid_until, set_at, set_by) \
             VALUES ($1, $2, $3, $4, $5, pg_catalog.now(), session_user) \
             ON CONFLICT (role, key) DO UPDATE SET value = excluded.value, valid_from = excluded.valid_from, \
               valid_until = excluded.valid_until, set_at = pg_catalog.now(), set_by = session_user"),
        &[role.into(), key.into(), JsonB(value.0.clone()).into(), valid_from.into(), valid_until.into()],
    );
    changed(
        "SET ATTRIBUTE",
        serde_json::json!({"kind": "attribute", "role": role, "name": key, "value": value.0,
                           "valid_from": valid_from.to_iso_string(), "valid_until": valid_until.map(|u| u.to_iso_string())}),
    );
}

/// Removes an attribute.
#[pg_extern(volatile, parallel_unsafe)]
fn clear_attribute(role: &str, key: &str) {
    check_manager(Table::AttributeStore);
    let n = own_sql::<i64>(
        sql("WITH d AS (DELETE FROM {attribute_store} WHERE role OPERATOR(pg_catalog.=) $1 \
             AND key OPERATOR(pg_catalog.=) $2 RETURNING 1) SELECT pg_catalog.count(*) FROM d"),
        &[role.into(), key.into()],
    )
    .unwrap_or(0);
    if n == 0 {
        CustodyError::UndefinedObject { message: format!("role \"{role}\" has no attribute \"{key}\""), hint: "See custody.attributes." }
            .report();
    }
    changed("CLEAR ATTRIBUTE", serde_json::json!({"kind": "attribute", "role": role, "name": key}));
}

/// Denies every statement of `role` (and of roles acting through it) until resumed.
#[pg_extern(volatile, parallel_unsafe)]
fn suspend(role: &str, reason: &str) {
    check_manager(Table::Suspensions);
    check_role(role);
    own_exec(
        sql("INSERT INTO {suspensions} (role, reason, suspended_at, suspended_by) VALUES ($1, $2, pg_catalog.now(), session_user) \
             ON CONFLICT (role) DO UPDATE SET reason = excluded.reason, suspended_at = pg_catalog.now(), suspended_by = session_user"),
        &[role.into(), reason.into()],
    );
    changed("SUSPEND", serde_json::json!({"kind": "role", "name": role, "reason": reason}));
}

/// Lifts a suspension.
#[pg_extern(volatile, parallel_unsafe)]
fn resume(role: &str) {
    check_manager(Table::Suspensions);
    let n = own_sql::<i64>(
        sql("WITH d AS (DELETE FROM {suspensions} WHERE role OPERATOR(pg_catalog.=) $1 RETURNING 1) SELECT pg_catalog.count(*) FROM d"),
        &[role.into()],
    )
    .unwrap_or(0);
    if n == 0 {
        CustodyError::UndefinedObject { message: format!("role \"{role}\" is not suspended"), hint: "See custody.suspensions." }.report();
    }
    changed("RESUME", serde_json::json!({"kind": "role", "name": role}));
}

/// What the writer's publication of the store did.
pub enum Published {
    /// Published (false: it does not fit in shared memory).
    Done(bool),
    /// No store here (the extension is not created), or a change holds the store's lock (it
    /// publishes at its commit; try again).
    NotNow,
}

/// The writer's publication of the store, at its start: read under the lock store changes
/// take, with a snapshot taken after it, so that it never replaces a newer state published
/// by a change that committed meanwhile. The lock is only tried: a change waits at its
/// commit for the writer to store its records.
/// Runs in a transaction of the writer.
pub fn publish_from_writer() -> Published {
    let store = crate::protect::ids().map(|i| i.table(Table::PolicyStore)).unwrap_or(pg_sys::InvalidOid);
    if store == pg_sys::InvalidOid {
        return Published::NotNow;
    }
    // SAFETY: a heavyweight lock held until the writer's transaction ends; the snapshot push
    // and pop pair around the reads, in that transaction.
    unsafe {
        if !pg_sys::ConditionalLockRelationOid(store, pg_sys::ShareUpdateExclusiveLock as pg_sys::LOCKMODE) {
            return Published::NotNow;
        }
        pg_sys::PushActiveSnapshot(pg_sys::GetLatestSnapshot());
        let snap = load_snapshot();
        pg_sys::PopActiveSnapshot();
        Published::Done(super::publish(&snap))
    }
}

/// The store as this transaction leaves it, with every change committed so far (the caller
/// holds the store's lock, so none is in between): the statement's snapshot predates the
/// lock.
fn latest_snapshot() -> Snapshot {
    // SAFETY: makes this transaction's own changes visible, then a push/pop pair around the
    // reads, inside the transaction.
    unsafe {
        pg_sys::CommandCounterIncrement();
        pg_sys::PushActiveSnapshot(pg_sys::GetLatestSnapshot());
        let snap = load_snapshot();
        pg_sys::PopActiveSnapshot();
        snap
    }
}

/// Reads policies, attributes and suspensions from the store (in custody.database).
pub fn load_snapshot() -> Snapshot {
    let here = crate::protect::ids().map(|i| i.table(Table::PolicyStore) != pg_sys::InvalidOid).unwrap_or(false);
    if !here {
        return Snapshot::default();
    }
    let (policies, attributes, suspensions) = (
        sql("SELECT name, version::pg_catalog.int8, source, enabled FROM {policy_store} ORDER BY name"),
        sql("SELECT role, key, value::pg_catalog.text, \
                    (EXTRACT(epoch FROM valid_from) OPERATOR(pg_catalog.*) 1000000)::pg_catalog.int8, \
                    (EXTRACT(epoch FROM valid_until) OPERATOR(pg_catalog.*) 1000000)::pg_catalog.int8 \
             FROM {attribute_store} ORDER BY role, key"),
        sql("SELECT role, reason FROM {suspensions} ORDER BY role"),
    );
    crate::own::as_owner(|| {
        Spi::connect(|client| {
            let mut snap = Snapshot::default();
            for row in crate::own::select(client, &policies, &[])? {
                snap.policies.push(PolicySource {
                    name: row.get::<String>(1)?.unwrap_or_default(),
                    version: row.get::<i64>(2)?.unwrap_or_default(),
                    source: row.get::<String>(3)?.unwrap_or_default(),
                    enabled: row.get::<bool>(4)?.unwrap_or(false),
                });
            }
            for row in crate::own::select(client, &attributes, &[])? {
                snap.attributes.push(Attribute {
                    role: row.get::<String>(1)?.unwrap_or_default(),
                    key: row.get::<String>(2)?.unwrap_or_default(),
                    value: serde_json::from_str(&row.get::<String>(3)?.unwrap_or_default()).unwrap_or_default(),
                    valid_from: row.get::<i64>(4)?.unwrap_or_default(),
                    valid_until: row.get::<i64>(5)?,
                });
            }
            for row in crate::own::select(client, &suspensions, &[])? {
                snap.suspensions.push(Suspension {
                    role: row.get::<String>(1)?.unwrap_or_default(),
                    reason: row.get::<String>(2)?.unwrap_or_default(),
                });
            }
            Ok::<_, pgrx::spi::Error>(snap)
        })
    })
    // PostgreSQL's own ERRORs are raised as they are; a spi::Error is pgrx's (a column of
    // another type than the store's own definition, checked by require_oid): a bug, XX000.
    .unwrap_or_else(|e| error!("could not read the pg_custody policy store: {e}"))
}

/// Before commit: read the store as this transaction leaves it, refuse what cannot be
/// published, and queue the `policy` records (so they are stored before COMMIT returns).
pub fn pre_commit() {
    let p = pending();
    if std::mem::take(&mut p.created).into_iter().any(is_pg_custody) && crate::api::in_custody_database() {
        // CREATE EXTENSION pg_custody: the store is published at commit like any change
        // (empty, or as a restore in the same transaction filled it), which also says the
        // extension is there: sessions record from then on, not from the writer's next look
        // for the log (every 100 ms).
        p.dirty = true;
    }
    if !p.dirty {
        for (command, object) in p.events.drain(..) {
            capture::record_event(Class::Policy, &command, &serde_json::json!([object]).to_string());
        }
        return;
    }
    // At PRE_COMMIT the statement's snapshot is gone: read the store under a fresh one,
    // which sees this transaction's own changes.
    // SAFETY: push/pop pair around the SPI reads, inside the still-open transaction.
    let snap = unsafe {
        pg_sys::PushActiveSnapshot(pg_sys::GetTransactionSnapshot());
        let s = load_snapshot();
        pg_sys::PopActiveSnapshot();
        s
    };
    if !super::fits(&snap) {
        p.dirty = false;
        p.events.clear();
        CustodyError::StoreTooLarge { limit: super::SNAPSHOT_CAPACITY }.report();
    }
    p.snapshot = Some(snap);
    for (command, object) in p.events.drain(..) {
        capture::record_event(Class::Policy, &command, &serde_json::json!([object]).to_string());
    }
}

/// PREPARE TRANSACTION cannot carry a policy change: it would be published (or not) long
/// after the decision to commit was taken elsewhere.
pub fn pre_prepare() {
    let p = pending();
    // A prepared CREATE EXTENSION is found by the writer's look after COMMIT PREPARED.
    p.created.clear();
    if p.dirty || !p.events.is_empty() {
        abort();
        CustodyError::CannotPrepare.report();
    }
}

/// CREATE EXTENSION ran in this transaction (object-access hook, before the new row is
/// visible): if it was pg_custody's, in custody.database, the commit publishes the store and
/// says the extension is there.
pub fn extension_created(extension: pg_sys::Oid) {
    pending().created.push(extension);
}

/// Whether `extension` is pg_custody (looked up at PRE_COMMIT, when this transaction's
/// catalog rows are visible to it).
fn is_pg_custody(extension: pg_sys::Oid) -> bool {
    // SAFETY: a catalog lookup inside the transaction; the name is a palloc'd copy or NULL.
    unsafe {
        let name = pg_sys::get_extension_name(extension);
        !name.is_null() && std::ffi::CStr::from_ptr(name) == c"pg_custody"
    }
}

/// After commit: every backend sees the change from its next statement on.
pub fn commit() {
    let p = pending();
    if let Some(snap) = p.snapshot.take() {
        crate::queue::extension_is_there();
        super::publish(&snap);
    }
    p.dirty = false;
}

pub fn abort() {
    let p = pending();
    p.created.clear();
    p.dirty = false;
    p.events.clear();
    p.snapshot = None;
}
