//! Continuous authorization on the statement path: the policy snapshot every backend of the
//! cluster shares (published in shared memory at commit of a change), the compiled gate each
//! backend keeps until the snapshot's generation changes, and the decision for a statement.
//!
//! The per-statement path never reads the catalog: policies, attributes and suspensions come
//! from shared memory; the roles of the current user are cached per backend and looked up
//! again only after a change to role memberships (a syscache invalidation).

pub mod rows;
pub mod store;

use std::ffi::CStr;
use std::ptr::{addr_of_mut, null_mut};
use std::sync::atomic::{AtomicU64, Ordering};

use pgrx::pg_sys;
use pgrx::prelude::*;

use custody_policy::{Decision, Gate, Snapshot, StatementInput, SubjectInput};

use crate::capture;
use crate::settings::{self, Enforce};

/// Bytes of shared memory for the published snapshot (policies, attributes, suspensions).
pub const SNAPSHOT_CAPACITY: usize = 2 * 1024 * 1024;
pub const TRANCHE: &CStr = c"pg_custody policy";

#[repr(C)]
struct Shared {
    lock: *mut pg_sys::LWLock,
    generation: AtomicU64,
    len: usize,
    // SNAPSHOT_CAPACITY bytes follow
}

static mut SHARED: *mut Shared = null_mut();
/// Bytes of shared memory for the published snapshot.
pub fn shmem_size() -> usize {
    std::mem::size_of::<Shared>() + SNAPSHOT_CAPACITY
}

pub fn init() {
    // SAFETY: _PG_init; cache callbacks live for the process.
    unsafe {
        pg_sys::CacheRegisterSyscacheCallback(
            pg_sys::SysCacheIdentifier::AUTHMEMMEMROLE as i32,
            Some(roles_changed),
            pg_sys::Datum::from(0),
        );
        pg_sys::CacheRegisterSyscacheCallback(
            pg_sys::SysCacheIdentifier::AUTHOID as i32,
            Some(roles_changed),
            pg_sys::Datum::from(0),
        );
    }
}

/// Creates or attaches the snapshot area. Called by `shmem` with AddinShmemInitLock held.
///
/// # Safety
/// Only from the shared-memory startup hook.
pub unsafe fn attach_shmem() {
    // SAFETY: ShmemInitStruct returns memory of the requested size, zeroed here on creation.
    unsafe {
        let mut found = false;
        let p = pg_sys::ShmemInitStruct(c"pg_custody policy".as_ptr(), shmem_size(), &mut found)
            as *mut Shared;
        if !found {
            std::ptr::write_bytes(p as *mut u8, 0, std::mem::size_of::<Shared>());
            (*p).lock = addr_of_mut!((*pg_sys::GetNamedLWLockTranche(TRANCHE.as_ptr())).lock);
        }
        SHARED = p;
    }
}

fn shared() -> Option<&'static Shared> {
    // SAFETY: set once in shmem_startup before any backend forks.
    unsafe { SHARED.as_ref() }
}

/// Publishes a snapshot for every backend; bumps the generation they compare against.
/// Returns false if it does not fit (the caller refuses the change before commit).
pub fn publish(snapshot: &Snapshot) -> bool {
    let Some(s) = shared() else { return false };
    let sp = s as *const Shared as *mut Shared;
    let mut snap = snapshot.clone();
    // SAFETY: the lock serializes writers and readers of the bytes.
    unsafe {
        pg_sys::LWLockAcquire(s.lock, pg_sys::LWLockMode::LW_EXCLUSIVE);
        snap.generation = s.generation.load(Ordering::Acquire) + 1;
        let bytes = snap.encode();
        let fits = bytes.len() <= SNAPSHOT_CAPACITY;
        if fits {
            let dst = (sp as *mut u8).add(std::mem::size_of::<Shared>());
            std::ptr::copy_nonoverlapping(bytes.as_ptr(), dst, bytes.len());
            (*sp).len = bytes.len();
            s.generation.store(snap.generation, Ordering::Release);
        }
        pg_sys::LWLockRelease(s.lock);
        fits
    }
}

/// Whether a snapshot of this size can be published.
pub fn fits(snapshot: &Snapshot) -> bool {
    snapshot.encode().len() <= SNAPSHOT_CAPACITY
}

fn published_generation() -> u64 {
    shared().map_or(0, |s| s.generation.load(Ordering::Acquire))
}

fn read_published() -> Option<Snapshot> {
    let s = shared()?;
    let sp = s as *const Shared;
    // SAFETY: copy under the lock, decode outside it.
    let bytes = unsafe {
        pg_sys::LWLockAcquire(s.lock, pg_sys::LWLockMode::LW_SHARED);
        let src = (sp as *const u8).add(std::mem::size_of::<Shared>());
        let v = std::slice::from_raw_parts(src, (*sp).len).to_vec();
        pg_sys::LWLockRelease(s.lock);
        v
    };
    if bytes.is_empty() {
        return None;
    }
    Snapshot::decode(&bytes).ok()
}

// ---- the per-backend gate ---------------------------------------------------------------

struct Local {
    gate: Option<Gate>,
    /// Generation the gate was built from (0: none yet).
    generation: u64,
    /// Roles of a user (transitively), cached until role memberships change.
    roles: Option<(pg_sys::Oid, Vec<String>)>,
    statements: u64,
    build_error: Option<String>,
    /// Bumped for every statement that passes the hooks: custody.check() reuses the
    /// subject it built for the same statement and user instead of rebuilding it per row.
    epoch: u64,
    /// PostgreSQL's statement start when the epoch last moved (see `sync_statement`).
    statement_start: i64,
    /// When the current statement started, nested ones included (Unix µs): what policies
    /// and attribute validity judge it by.
    now_us: i64,
    subject: Option<(u64, pg_sys::Oid, std::rc::Rc<SubjectInput>)>,
    /// A walsender's subject, taken when its login committed: its replication commands are
    /// decided where no catalog can be read (see `replication_verdict`).
    walsender: Option<(capture::Who, std::rc::Rc<SubjectInput>)>,
    /// custody.check() answers of the current statement (see rows.rs).
    row_memo: Option<RowMemo>,
    /// The record JSON of an allowed decision: the same for every allowed statement of one
    /// policy set and enforce mode, so it is serialized once (generation, enforce, text).
    allowed_json: Option<(u64, Enforce, String)>,
}

static mut LOCAL: Local =
    Local {
        gate: None,
        generation: 0,
        roles: None,
        statements: 0,
        build_error: None,
        epoch: 0,
        statement_start: 0,
        now_us: 0,
        subject: None,
        walsender: None,
        row_memo: None,
        allowed_json: None,
    };

#[allow(static_mut_refs)]
fn local() -> &'static mut Local {
    // SAFETY: backends are single-threaded; no reference is held across re-entry.
    unsafe { &mut LOCAL }
}

/// Syscache callback: role memberships or attributes changed.
///
/// # Safety
/// Called only by PostgreSQL, as a registered syscache callback.
#[pg_guard]
unsafe extern "C-unwind" fn roles_changed(_arg: pg_sys::Datum, _cache: i32, _hash: u32) {
    local().roles = None;
    capture::forget_role_names();
}

/// custody.check() answers within one statement, by (user, action, resource bytes).
pub struct RowMemo {
    epoch: u64,
    generation: u64,
    pub key: Vec<u8>,
    /// foldhash: the keys are short and hashed on every row of a scan. FNV (byte at a
    /// time) was 39 % of a 1M-row scan's time; SipHash costs more than the seeded
    /// foldhash, whose collisions an attacker writing rows cannot aim at cheaply.
    pub decisions: std::collections::HashMap<Vec<u8>, bool, foldhash::fast::RandomState>,
}

impl RowMemo {
    /// Most answers kept for one statement; a statement with more distinct resources
    /// starts over (it still evaluates each resource, only more than once).
    const LIMIT: usize = 4096;

    pub fn remember(&mut self, key: Vec<u8>, allowed: bool) {
        if self.decisions.len() >= Self::LIMIT {
            self.decisions.clear();
        }
        self.decisions.insert(key, allowed);
    }
}

/// A statement starts (ExecutorStart or ProcessUtility of anything but pg_custody's own
/// queries): what custody.check() remembered belongs to the previous one. Called whether or
/// not the statement is recorded or gated, so that the memo never outlives its statement.
pub fn statement_starts() {
    let l = local();
    l.epoch += 1;
    // SAFETY: a getter of the transaction state.
    l.statement_start = unsafe { GetCurrentStatementStartTimestamp() };
    // Read when the statement is first judged (its gate decision, as it starts), not here:
    // most statements are judged by nothing.
    l.now_us = 0;
}

/// The time now, Unix µs. Statements are judged when each starts, not when the client's
/// message arrived (PostgreSQL's statement start): `SELECT pg_sleep(3); SELECT ...` or a
/// loop in a DO block must not ride on an attribute that expired meanwhile.
fn clock_unix_us() -> i64 {
    // SAFETY: reads the clock.
    (unsafe { pg_sys::GetCurrentTimestamp() }) + capture::PG_EPOCH_OFFSET_US
}

extern "C" {
    // Declared here as well, without pgrx's setjmp guard: it cannot raise an ERROR, and
    // custody.check() reads it on every row of a scan.
    fn GetCurrentStatementStartTimestamp() -> pg_sys::TimestampTz;
}

/// A statement can also start without passing the hooks: a fast-path function call, or
/// another Execute of a suspended portal fetching more rows. PostgreSQL moves the statement
/// start for those; so does the epoch here.
fn sync_statement(l: &mut Local) {
    // SAFETY: a getter of the transaction state.
    let now = unsafe { GetCurrentStatementStartTimestamp() };
    if now != l.statement_start {
        l.statement_start = now;
        l.epoch += 1;
        l.now_us = 0;
    }
}

/// The memo of the current statement (emptied when a new statement starts or another
/// policy set comes into force, together with the gate's own memo of row decisions).
pub fn row_memo() -> &'static mut RowMemo {
    let l = local();
    sync_statement(l);
    let (epoch, generation) = (l.epoch, l.generation);
    let m = l.row_memo.get_or_insert_with(|| RowMemo { epoch, generation, key: Vec::new(), decisions: Default::default() });
    if m.epoch != epoch || m.generation != generation {
        (m.epoch, m.generation) = (epoch, generation);
        m.decisions.clear();
        if let Some(g) = l.gate.as_mut() {
            g.new_statement();
        }
    }
    m
}

/// The compiled gate for the snapshot in force, rebuilt when a change was published.
fn current_gate() -> Option<&'static mut Gate> {
    let l = local();
    let generation = published_generation();
    if generation != l.generation {
        l.generation = generation;
        l.gate = None;
        l.build_error = None;
        if let Some(snap) = read_published() {
            match Gate::build(&snap) {
                Ok(g) => l.gate = Some(g),
                Err(e) => l.build_error = Some(e),
            }
        }
    }
    l.gate.as_mut()
}

/// Every role `user` is a member of, transitively, itself included. Cached; a cache miss
/// (first statement, or after GRANT/REVOKE of a role) reads the catalog caches.
fn roles_of(user: pg_sys::Oid) -> Vec<String> {
    let l = local();
    if let Some((u, r)) = &l.roles {
        if *u == user {
            return r.clone();
        }
    }
    // SAFETY: in a transaction (every statement path is).
    let roles = unsafe { granted_roles(user) };
    local().roles = Some((user, roles.clone()));
    roles
}

/// Granted memberships of `user`, transitively, by name: not pg_has_role(), which makes a
/// superuser a member of every role (and so of every suspended one). Read from the catalog
/// caches, not by a query: nothing user-defined can be resolved in it, and it takes no
/// snapshot, which would make a following `SET TRANSACTION ISOLATION LEVEL` fail as "called
/// after a query" in a transaction that has run none.
///
/// # Safety
/// In a transaction.
unsafe fn granted_roles(user: pg_sys::Oid) -> Vec<String> {
    let mut oids = vec![user];
    let mut i = 0;
    while i < oids.len() {
        let member = oids[i];
        i += 1;
        // SAFETY: a catcache list of pg_auth_members rows by member (caller's contract: in a
        // transaction), each tuple a pg_auth_members row, released before the next lookup.
        unsafe {
            let list = pg_sys::SearchSysCacheList(
                pg_sys::SysCacheIdentifier::AUTHMEMMEMROLE as i32,
                1,
                pg_sys::Datum::from(member),
                pg_sys::Datum::from(0),
                pg_sys::Datum::from(0),
            );
            for &ct in (*list).members.as_slice((*list).n_members as usize) {
                let mut isnull = false;
                let role = pg_sys::Oid::from(
                    pg_sys::SysCacheGetAttr(
                        pg_sys::SysCacheIdentifier::AUTHMEMMEMROLE as i32,
                        &mut (*ct).tuple,
                        crate::pgver::AUTH_MEMBERS_ROLEID,
                        &mut isnull,
                    )
                    .value() as u32,
                );
                if !isnull && !oids.contains(&role) {
                    oids.push(role);
                }
            }
            pg_sys::ReleaseCatCacheList(list);
        }
    }
    let mut names: Vec<String> = oids
        .into_iter()
        // SAFETY: GetUserNameFromId with noerr returns NULL for a role that is gone, else a
        // palloc'd NUL-terminated name.
        .filter_map(|o| unsafe {
            let n = pg_sys::GetUserNameFromId(o, true);
            (!n.is_null()).then(|| CStr::from_ptr(n).to_string_lossy().into_owned())
        })
        .collect();
    names.sort();
    names
}

/// What the gate said about a statement, for its record and for raising the denial.
pub struct Verdict {
    pub decision: Decision,
    pub enforce: Enforce,
}

impl Verdict {
    pub fn denies(&self) -> bool {
        !self.decision.allowed && self.enforce == Enforce::On
    }

    /// A refusal, enforced or (custody.enforce = dry_run) not: always recorded. An allowed
    /// statement is recorded as custody.audit and custody.audit_catalog say, with its decision.
    pub fn refuses(&self) -> bool {
        !self.decision.allowed
    }

    pub fn record_json(&self) -> String {
        let d = &self.decision;
        if !(d.allowed && d.reasons.is_empty() && d.suspended_role.is_none()) {
            return self.build_json();
        }
        let l = local();
        match &l.allowed_json {
            Some((g, e, text)) if *g == l.generation && *e == self.enforce => text.clone(),
            _ => {
                let text = self.build_json();
                l.allowed_json = Some((l.generation, self.enforce, text.clone()));
                text
            }
        }
    }

    fn build_json(&self) -> String {
        let mut j = self.decision.to_json();
        if let serde_json::Value::Object(m) = &mut j {
            m.insert("enforce".into(), self.enforce.name().into());
        }
        j.to_string()
    }
}

/// A statement the gate will decide: everything but its objects, which the hooks compute
/// only when someone needs them.
pub struct Pending {
    enforce: Enforce,
    /// The snapshot in force failed to compile: fail closed.
    failed: Option<String>,
    who: capture::Who,
    subject: std::rc::Rc<SubjectInput>,
}

/// Starts deciding a statement, or None when nothing is to be checked (enforce = off, an
/// exempt role, no policy and no suspension in force). Called once per statement.
pub fn prepare() -> Option<Pending> {
    let enforce = settings::enforce();
    if enforce == Enforce::Off {
        return None;
    }
    let mut gate = current_gate();
    let unknown = local().generation == 0;
    if !unknown && local().build_error.is_none() && gate.as_ref().is_none_or(|g| g.is_trivial()) {
        return None;
    }
    let who = capture::who();
    if settings::is_exempt(&who.session_user) || settings::is_exempt(&who.current_user) {
        return None;
    }
    let mut failed = None;
    if unknown {
        // Fail closed: until the writer has published the store after the server started,
        // nobody knows which policies and suspensions are in force.
        let waited = wait_for_publication();
        gate = current_gate();
        if local().generation == 0 {
            if crate::queue::state() == crate::queue::ChainState::Absent {
                return None;
            }
            failed = Some(format!(
                "the policies in force are not known yet: the custody writer has not published them (waited {waited} ms, custody.failure_timeout)"
            ));
        } else if local().build_error.is_none() && gate.as_ref().is_none_or(|g| g.is_trivial()) {
            return None;
        }
    }
    let l = local();
    if failed.is_none() {
        failed = l.build_error.as_ref().map(|e| format!("policies in force could not be compiled: {e}"));
    }
    // SAFETY: plain read of the current user id.
    let user = unsafe { pg_sys::GetUserId() };
    let subject = std::rc::Rc::new(SubjectInput {
        session_user: who.session_user.clone(),
        current_user: who.current_user.clone(),
        roles: roles_of(user),
    });
    // custody.check() calls made while this statement runs reuse the subject.
    l.subject = Some((l.epoch, user, subject.clone()));
    l.statements += 1;
    Some(Pending { enforce, failed, who, subject })
}

/// When (Unix µs) and under which published generation a statement was decided.
pub type DecidedAt = (u64, i64);

/// Now, for `still_decided` (the clock is read only when a gate has something to check:
/// before that, only a new generation can change a decision).
pub fn decided_now() -> DecidedAt {
    let generation = published_generation();
    let checks = current_gate().is_some_and(|g| !g.is_trivial());
    (generation, if checks { clock_unix_us() } else { 0 })
}

/// Whether a decision taken at `then` still stands now: the same generation is published
/// and the gate's decisions hold over the time in between (no attribute started or ended,
/// the set reads no clock). Nothing but an atomic load and a clock read when no policy is
/// in force.
pub fn still_decided(then: DecidedAt) -> bool {
    let (generation, at) = then;
    if published_generation() != generation {
        return false;
    }
    match current_gate() {
        None => true,
        Some(g) => g.is_trivial() || (at != 0 && g.decisions_hold(at, clock_unix_us())),
    }
}

/// A walsender's login commits: who its replication commands are decided for.
pub fn remember_replication_subject() {
    let who = capture::who();
    // SAFETY: plain read of the current user id.
    let user = unsafe { pg_sys::GetUserId() };
    let subject = std::rc::Rc::new(SubjectInput {
        session_user: who.session_user.clone(),
        current_user: who.current_user.clone(),
        roles: roles_of(user),
    });
    local().walsender = Some((who, subject));
}

/// The decision on a walsender's replication command (`BASE_BACKUP`, `START_REPLICATION`,
/// `IDENTIFY_SYSTEM`, ...; objects `[]`), or None when nothing is to be checked. Decided
/// while PostgreSQL reports the command, where nothing may wait or read a catalog: the
/// subject is the one taken at login, and a policy state not published yet denies at once.
pub fn replication_verdict(command: &str) -> Option<Verdict> {
    let enforce = settings::enforce();
    if enforce == Enforce::Off {
        return None;
    }
    let gate = current_gate();
    let l = local();
    let (who, subject) = l.walsender.clone()?;
    if settings::is_exempt(&who.session_user) || settings::is_exempt(&who.current_user) {
        return None;
    }
    if l.generation == 0 && crate::queue::state() == crate::queue::ChainState::Absent {
        return None;
    }
    let failed = if l.generation == 0 {
        Some("the policies in force are not known yet: the custody writer has not published them".to_string())
    } else {
        l.build_error.as_ref().map(|e| format!("policies in force could not be compiled: {e}"))
    };
    if failed.is_none() && gate.is_none_or(|g| g.is_trivial()) {
        return None;
    }
    statement_starts();
    local().statements += 1;
    Some(Pending { enforce, failed, who, subject }.decide(command, "[]"))
}

/// Waits (up to custody.failure_timeout) for the first publication of the policy store, or
/// for the writer to find pg_custody absent; the milliseconds waited.
fn wait_for_publication() -> i64 {
    let timeout = settings::failure_timeout_ms();
    let start = std::time::Instant::now();
    loop {
        let waited = start.elapsed().as_millis() as i64;
        if published_generation() != 0
            || crate::queue::state() == crate::queue::ChainState::Absent
            || waited >= timeout
        {
            return waited;
        }
        // SAFETY: a timed wait on this backend's own latch, as any wait loop in a backend;
        // interrupts (cancel, terminate) are served after each wake.
        unsafe {
            pg_sys::WaitLatch(
                pg_sys::MyLatch,
                (pg_sys::WL_LATCH_SET | pg_sys::WL_TIMEOUT | pg_sys::WL_EXIT_ON_PM_DEATH) as i32,
                (timeout - waited).clamp(1, 10),
                pg_sys::PG_WAIT_EXTENSION,
            );
            pg_sys::ResetLatch(pg_sys::MyLatch);
        }
        pgrx::check_for_interrupts!();
    }
}

impl Pending {
    pub fn decide(self, command: &str, objects_json: &str) -> Verdict {
        let enforce = self.enforce;
        let gate = match (self.failed, current_gate()) {
            (None, Some(g)) => g,
            (failed, _) => {
                // Not published yet (see prepare), or a snapshot that does not compile (it
                // cannot be published, set_policy checks first, but fail closed if it ever
                // happens).
                let reason = failed.unwrap_or_else(|| "no policy set in force".into());
                return Verdict {
                    decision: Decision {
                        allowed: false,
                        reasons: vec![reason],
                        policies: Vec::new(),
                        suspended_role: None,
                        policy_set: String::new(),
                    },
                    enforce,
                };
            }
        };
        let who = &self.who;
        let input = StatementInput {
            subject: &self.subject,
            command,
            objects_json,
            client_addr: who.client_addr.as_deref(),
            application_name: who.application_name.as_deref(),
            now_unix_us: statement_start_unix_us(),
            pid: who.pid,
            // SAFETY: set at backend start.
            backend_start_unix_us: unsafe { pg_sys::MyStartTimestamp } + capture::PG_EPOCH_OFFSET_US,
            statements: local().statements,
        };
        Verdict { decision: gate.decide(&input), enforce }
    }
}

/// When the current statement (nested ones included) started: policies judge it by the
/// attributes valid then, and `time` in the input is that instant.
pub fn statement_start_unix_us() -> i64 {
    let l = local();
    sync_statement(l);
    if l.now_us == 0 {
        l.now_us = clock_unix_us();
    }
    l.now_us
}

/// The subject of the current statement, for custody.current_subject() and custody.check().
pub fn current_subject() -> std::rc::Rc<SubjectInput> {
    // SAFETY: plain read of the current user id.
    let user = unsafe { pg_sys::GetUserId() };
    let l = local();
    sync_statement(l);
    if let Some((epoch, u, s)) = &l.subject {
        if *epoch == l.epoch && *u == user {
            return s.clone();
        }
    }
    let who = capture::who();
    let s = std::rc::Rc::new(SubjectInput {
        session_user: who.session_user,
        current_user: who.current_user,
        roles: roles_of(user),
    });
    local().subject = Some((local().epoch, user, s.clone()));
    s
}

/// The gate for row checks and attribute lookups (None: no snapshot published yet).
pub fn gate_for_functions() -> Option<&'static mut Gate> {
    current_gate()
}

