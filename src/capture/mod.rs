//! Capture: what a session knows about each statement, from its start to its outcome, and
//! handing finished records to the queue.
//!
//! A record is *opened* when a statement starts (before PostgreSQL's own permission checks,
//! so denials are seen), kept on a per-backend stack, and *closed* when the statement ends
//! (success) or when its (sub)transaction aborts (error). Closed records go straight to the
//! shared queue, outside any transaction, so a rollback cannot take them back.

pub mod class;
pub mod objects;
pub mod session;
pub mod sqltext;
pub mod wire;

use std::ffi::CStr;

use pgrx::pg_sys;
use sha2::{Digest, Sha256};

use crate::queue::{self, ChainState, QueueError};
use crate::settings::{self, OnFailure, StatementText};
use class::Class;
use wire::{Captured, Outcome};

/// Seconds between the Unix epoch and PostgreSQL's epoch (2000-01-01), in µs.
pub const PG_EPOCH_OFFSET_US: i64 = 946_684_800_000_000;

/// A record opened by a statement that has not finished yet.
struct Open {
    /// Identifies the statement: the QueryDesc pointer, or a token for utility statements.
    key: usize,
    /// Subtransaction the statement started in: its abort closes the record as an error.
    subid: pg_sys::SubTransactionId,
    rec: Captured,
    /// Secrets redacted from the statement text: scrubbed from its error message too.
    secrets: Vec<String>,
    /// A read of the catalogs only that custody.audit_catalog = off skips: dropped when it
    /// finishes unless it called a function that is not safe (see `function_executes`).
    tentative: bool,
}

/// A record not tied to an executing statement: a fast-path function call, or a function
/// that is not built in running while a client statement was parsed or planned. It is
/// closed when the next message starts, at commit, or as an error by the abort.
struct Loose {
    /// FASTPATH_KEY or PLANNED_KEY.
    key: usize,
    /// The statement start (message) it was opened in.
    start: i64,
    /// PLANNED_KEY: the client's query string (address and text) that was being prepared,
    /// so that the statement's own record can stand for it once it executes.
    source: Option<(usize, Box<[u8]>)>,
}

/// Per-backend capture state. Backends are single-threaded; see `state()`.
struct State {
    open: Vec<Open>,
    /// Nesting of statements currently executing (0 = top level).
    depth: i32,
    /// Inside ExecutorStart (expressions are being initialized, not run).
    in_start: bool,
    /// A client statement (depth 0) is being planned, one level deeper (`planning_begin`).
    planning_top: bool,
    /// The client's current statement came with bind parameters: error messages are
    /// recorded as their templates, which cannot contain the values.
    client_params: bool,
    /// The loose record that is open, if any.
    loose: Option<Loose>,
    /// Queue position after this transaction's last record (for durability = commit).
    last_pos: u64,
    /// Queue position after this session's last record (for custody.flush()).
    session_pos: u64,
    /// Settings generation last looked at (see settings::generation()).
    settings_seen: u64,
    /// The values of the recorded settings this session started with or last recorded.
    settings_values: Option<Vec<(String, String)>>,
    /// The last ERROR reported by this backend, seen in emit_log_hook.
    last_error: Option<ReportedError>,
    session: Option<Session>,
    users: Vec<(pg_sys::Oid, String)>,
    next_token: usize,
    buf: Vec<u8>,
}

/// An ERROR as emit_log_hook saw it, with the query it interrupted (PostgreSQL forgets
/// `debug_query_string` before the abort callbacks run).
pub struct ReportedError {
    pub sqlstate: String,
    pub message: String,
    /// The message before its values were filled in (errmsg's untranslated format).
    pub template: Option<String>,
    pub query: Option<String>,
}

/// Facts about the session that do not change while it lives.
struct Session {
    database_name: String,
    client_addr: Option<String>,
    pid: i32,
}

static mut STATE: State = State {
    open: Vec::new(),
    depth: 0,
    in_start: false,
    planning_top: false,
    client_params: false,
    loose: None,
    last_pos: 0,
    session_pos: 0,
    settings_seen: 0,
    settings_values: None,
    last_error: None,
    session: None,
    users: Vec::new(),
    next_token: 1,
    buf: Vec::new(),
};

#[allow(static_mut_refs)]
fn state() -> &'static mut State {
    // SAFETY: PostgreSQL backends are single-threaded and the hooks never run concurrently;
    // no reference returned here is held across a call that could re-enter capture.
    unsafe { &mut STATE }
}

/// The session has logged in (its role's and database's settings are applied): what it
/// starts with is what later changes are compared with.
pub fn settings_baseline() {
    let st = state();
    st.settings_seen = settings::generation();
    st.settings_values = Some(settings::snapshot());
}

/// Called once the library is loaded, so that the boot-time assignment of settings is not
/// mistaken for a change made in the session.
pub fn init() {
    state().settings_seen = settings::generation();
    objects::init();
}

// ---- should this statement be recorded? -------------------------------------------------

/// Whether statements are being captured at all in this process right now.
pub fn active() -> bool {
    // On a standby the standby worker publishes the store and ships the records to the
    // primary (src/writer/standby.rs).
    if crate::own::in_writer() || queue::state() == ChainState::Absent {
        return false;
    }
    // Parallel workers run parts of a plan whose statement the leader records.
    // SAFETY: reading a process-global set at worker start.
    unsafe { pg_sys::ParallelWorkerNumber < 0 }
}

pub fn wanted(class: Class) -> bool {
    settings::audit_classes().contains(class)
}

// ---- opening and closing records --------------------------------------------------------

/// Opens a record for a statement that is starting. `text` is the statement's own text.
pub fn open(key: usize, class: Class, command: &str, objects: String, text: Option<&str>) {
    close_loose_if_returned();
    let st = state();
    let stored = statement_text(text);
    // A function run while a client statement was prepared has its record at the client's
    // level; a statement at the top level while that function's record is open is one the
    // function runs (parsing has no hook of its own to count the level).
    let nesting_level = if key == PLANNED_KEY {
        0
    } else if st.depth == 0 && st.loose.as_ref().is_some_and(|l| l.key == PLANNED_KEY) {
        1
    } else {
        st.depth
    };
    let rec = Captured {
        event_time: now_unix_us(),
        nesting_level,
        class: class as u8,
        command: command.to_string(),
        objects,
        statement: stored.text,
        statement_sha256: stored.sha256,
        ..Default::default()
    };
    let rec = fill_who(rec);
    // SAFETY: plain read of the current subtransaction id.
    let subid = unsafe { pg_sys::GetCurrentSubTransactionId() };
    st.open.push(Open { key, subid, rec, secrets: stored.secrets, tentative: false });
}

/// Marks the open record `key` as a read of the catalogs that is dropped when it finishes
/// unless it calls a function that is not safe.
pub fn set_tentative(key: usize) {
    if let Some(o) = state().open.iter_mut().rev().find(|o| o.key == key) {
        o.tentative = true;
    }
}

/// A fresh key for a utility statement's record.
pub fn utility_token() -> usize {
    let st = state();
    st.next_token = st.next_token.wrapping_add(2);
    // odd numbers never collide with (aligned) QueryDesc pointers; 1 is the fast path's
    (st.next_token | 1).max(3)
}

/// The key of a fast-path function call's record.
const FASTPATH_KEY: usize = 1;
/// The key of the record of functions run while a client statement was parsed or planned
/// (QueryDesc pointers are aligned, utility tokens odd).
const PLANNED_KEY: usize = 2;

pub fn is_open(key: usize) -> bool {
    state().open.iter().rev().any(|o| o.key == key)
}

/// Closes the record opened under `key` as a success and queues it.
pub fn close(key: usize, rows: Option<i64>) {
    let st = state();
    let Some(i) = st.open.iter().rposition(|o| o.key == key) else { return };
    let o = st.open.remove(i);
    if o.tentative {
        return; // a read of the catalogs only, which called nothing unsafe
    }
    let mut rec = o.rec;
    // Rows counted while it ran (`add_rows`) come first.
    rec.rows = rec.rows.or(rows);
    rec.xid = current_xid();
    submit(rec, false);
}

/// The statement `key` processed `n` more rows in one run of its plan (a portal fetched in
/// chunks, a cursor, runs once per chunk).
pub fn add_rows(key: usize, n: i64) {
    if let Some(o) = state().open.iter_mut().rev().find(|o| o.key == key) {
        o.rec.rows = Some(o.rec.rows.unwrap_or(0) + n);
    }
}


/// The statement `key` runs with bind parameters. When it is the client's statement, its
/// error messages are recorded as templates (the values may be in them).
pub fn mark_bind_parameters(key: usize) {
    let st = state();
    if st.open.iter().rev().find(|o| o.key == key).is_some_and(|o| o.rec.nesting_level == 0) {
        st.client_params = true;
    }
}

/// Closes, as errors, every record opened in subtransaction `subid` or later (all of them
/// when `subid` is None: top-level abort). Called from the abort callbacks.
pub fn fail_open(subid: Option<pg_sys::SubTransactionId>) {
    // A fast-path call whose message is over succeeded; only one still running failed (and
    // so for functions run while a statement was prepared).
    close_loose_if_returned();
    let st = state();
    let reported = st.last_error.take();
    let reported_any = reported.is_some();
    let client_params = std::mem::take(&mut st.client_params);
    let query = reported.as_ref().and_then(|e| e.query.clone());
    // Bind parameter values can be in an error message (22P02 quotes the text it could not
    // read): for a statement that had them, the message's template is kept instead.
    let params = client_params || query.as_deref().is_some_and(sqltext::has_bind_params);
    let (sqlstate, message) = match reported {
        Some(e) => {
            let m = if params { e.template.unwrap_or_else(|| "(message withheld: the statement had bind parameters)".into()) } else { e.message };
            (Some(e.sqlstate), Some(m))
        }
        None => (None, Some("statement aborted by an error that was handled by an exception \
                             block or not reported to the server log".into())),
    };
    let xid = current_xid();
    let mut failed = Vec::new();
    st.open.retain_mut(|o| {
        if subid.is_none_or(|s| o.subid >= s) {
            failed.push((std::mem::take(&mut o.rec), std::mem::take(&mut o.secrets)));
            false
        } else {
            true
        }
    });
    if st.loose.as_ref().is_some_and(|l| st.open.iter().all(|o| o.key != l.key)) {
        st.loose = None;
    }
    // A statement that failed before its record opened is the client's when the whole
    // transaction aborts (its text is the client's query; the depth may still count the
    // planning of it), a nested one's otherwise.
    let level = if subid.is_none() { 0 } else { st.depth };
    if failed.is_empty() {
        // Nothing was open, yet an error was reported: the statement failed before it could
        // start (syntax error, unknown table, an error while planning, bind parameters that
        // do not parse), at commit, or a fast-path call was refused before it started.
        if query.is_none() && reported_any && in_fastpath() && wanted(Class::Function) && active() {
            let mut rec = fill_who(Captured {
                event_time: now_unix_us(),
                class: Class::Function as u8,
                command: "FUNCTION CALL".into(),
                objects: "[]".into(),
                nesting_level: level,
                ..Default::default()
            });
            rec.outcome = Outcome::Error;
            rec.sqlstate = sqlstate;
            rec.message = message;
            rec.xid = xid;
            submit(rec, true);
            return;
        }
        if let Some(text) = query {
            let (class, command) = class::classify_text(&text);
            if wanted(class) && !crate::own::in_writer() {
                let stored = statement_text(Some(&text));
                let mut rec = fill_who(Captured {
                    event_time: now_unix_us(),
                    class: class as u8,
                    command: command.to_string(),
                    objects: "[]".into(),
                    statement: stored.text,
                    statement_sha256: stored.sha256,
                    nesting_level: level,
                    ..Default::default()
                });
                rec.outcome = Outcome::Error;
                rec.sqlstate = sqlstate;
                rec.message = message.map(|m| sqltext::scrub(&m, &stored.secrets).into_owned());
                rec.xid = xid;
                submit(rec, true);
            }
        }
        return;
    }
    // Secrets of any failed statement are scrubbed from the message all of them share.
    let secrets: Vec<String> = failed.iter().flat_map(|(_, s)| s.iter().cloned()).collect();
    let message = message.map(|m| sqltext::scrub(&m, &secrets).into_owned());
    // innermost first, as they finished
    for (mut rec, _) in failed.into_iter().rev() {
        // A policy denial keeps its outcome; everything else failed with the error.
        if rec.outcome != Outcome::Denied {
            rec.outcome = Outcome::Error;
        }
        rec.sqlstate = sqlstate.clone();
        rec.message = message.clone();
        rec.xid = xid;
        submit(rec, true);
    }
}

fn statement_start() -> i64 {
    // SAFETY: a getter of the transaction state.
    unsafe { pg_sys::GetCurrentStatementStartTimestamp() }
}

// ---- the executor starting, and the functions it will call ------------------------------

/// ExecutorStart is about to run: expressions are being initialized, not run. Returns what
/// to hand to `end_start` when it returned (an ERROR leaves that to the abort, `HookState`).
pub fn begin_start() -> bool {
    std::mem::replace(&mut state().in_start, true)
}

/// ExecutorStart returned; `was` is what `begin_start` returned.
pub fn end_start(was: bool) {
    state().in_start = was;
}

/// Volatile built-in functions a read of the catalogs may call and still be skipped with
/// custody.audit_catalog = off: they read the clock or a random number and change nothing.
const SAFE_VOLATILE: [&str; 3] = ["clock_timestamp", "timeofday", "random"];

/// A function PostgreSQL is about to execute (OAT_FUNCTION_EXECUTE): while a tentative read
/// of the catalogs runs, whether the function is safe; outside any executing statement, a
/// fast-path call, or code running while a client statement is parsed or planned (a
/// domain's CHECK on a literal, an IMMUTABLE function the planner folds).
pub fn function_executes(func: pg_sys::Oid) {
    let st = state();
    if st.open.iter().any(|o| o.tentative) && !safe_function(func) {
        st.open.iter_mut().for_each(|o| o.tentative = false);
    }
    // Outside any executing statement: at the top level, or planning a client statement.
    if st.in_start || !(st.depth == 0 || (st.depth == 1 && st.planning_top)) {
        return;
    }
    if in_fastpath() {
        fastpath_call(func);
    } else if u32::from(func) >= pg_sys::FirstNormalObjectId {
        planned_call(func);
    }
}

/// Built in, and not volatile (or on the short list above): reads, computes, changes nothing.
fn safe_function(func: pg_sys::Oid) -> bool {
    if u32::from(func) >= pg_sys::FirstNormalObjectId {
        return false;
    }
    // SAFETY: syscache lookups of an existing function.
    unsafe {
        pg_sys::func_volatile(func) as u8 != pg_sys::PROVOLATILE_VOLATILE
            || SAFE_VOLATILE.contains(&objects::cstr(pg_sys::get_func_name(func)).as_str())
    }
}

/// Whether the backend is serving a fast-path function call (libpq's PQfn: the large-object
/// functions, or any function called by OID). PostgreSQL reports the state where activity
/// tracking is on; without it, a client backend running a function outside any statement
/// and any query text is one.
fn in_fastpath() -> bool {
    // SAFETY: plain reads of process globals set at backend start and per message.
    unsafe {
        if pg_sys::MyBackendType != pg_sys::BackendType::B_BACKEND
            || !pg_sys::debug_query_string.is_null()
            || !session::logged_in()
        {
            return false;
        }
        let be = pg_sys::MyBEEntry;
        if !be.is_null() && (*be).st_state != pg_sys::BackendState::STATE_DISABLED {
            return (*be).st_state == pg_sys::BackendState::STATE_FASTPATH;
        }
        true
    }
}

/// Opens (and gates) the record of a fast-path call of `func`: class function, command
/// FUNCTION CALL, the function as the object, no statement text. It is closed when the next
/// message starts, at commit, or as an error by the abort.
fn fastpath_call(func: pg_sys::Oid) {
    if !active() {
        return;
    }
    close_loose();
    function_record(func, FASTPATH_KEY, None);
}

/// Opens (and gates) the record of a function that is not built in running while the
/// client's statement is parsed or planned, before the statement's own record opens (or
/// without it ever opening: Bind without Execute, a plan that is never run). Class function,
/// command FUNCTION CALL, the function as the object, the client's statement as the text;
/// one per message. When the statement then executes with a record of its own, that record
/// stands for it (`statement_executes`).
fn planned_call(func: pg_sys::Oid) {
    // SAFETY: plain reads of process globals.
    let (backend, query) = unsafe { (pg_sys::MyBackendType, pg_sys::debug_query_string) };
    if backend != pg_sys::BackendType::B_BACKEND
        || query.is_null()
        || !session::logged_in()
        || !active()
        || crate::own::running()
    {
        return;
    }
    let start = statement_start();
    if state().loose.as_ref().is_some_and(|l| l.key == PLANNED_KEY && l.start == start) {
        return; // this message already has its record
    }
    close_loose();
    // SAFETY: debug_query_string is the NUL-terminated text of the client's query.
    let bytes: Box<[u8]> = unsafe { CStr::from_ptr(query) }.to_bytes().into();
    let text = current_query_text();
    function_record(func, PLANNED_KEY, Some((query as usize, bytes, text)));
}

/// The loose record of a call of `func` under `key`, gated; `planned`: the query string it
/// was prepared from, and its text for the record.
fn function_record(func: pg_sys::Oid, key: usize, planned: Option<(usize, Box<[u8]>, Option<String>)>) {
    crate::policy::statement_starts();
    // SAFETY: syscache lookups of the function being called.
    let object = unsafe {
        objects::ObjectRef {
            columns: Vec::new(),
            kind: "function",
            name: objects::cstr(pg_sys::get_func_name(func)),
            privileges: vec!["EXECUTE"],
            schema: objects::cstr(pg_sys::get_namespace_name(pg_sys::get_func_namespace(func))),
        }
    };
    let objects_json = objects::to_json(&[object]);
    let pending = crate::policy::prepare();
    if pending.is_none() && !wanted(Class::Function) {
        return;
    }
    let verdict = pending.map(|p| p.decide("FUNCTION CALL", &objects_json));
    // A refusal is always recorded; an allowed call as custody.audit says.
    if !wanted(Class::Function) && !verdict.as_ref().is_some_and(|v| v.refuses()) {
        return;
    }
    let (source, text) = match planned {
        Some((ptr, bytes, text)) => (Some((ptr, bytes)), text),
        None => (None, None),
    };
    open(key, Class::Function, "FUNCTION CALL", objects_json, text.as_deref());
    state().loose = Some(Loose { key, start: statement_start(), source });
    if let Some(v) = verdict {
        set_decision(key, v.record_json(), v.denies());
        if v.denies() {
            crate::error::CustodyError::Denied { reasons: v.decision.reasons.clone() }.report();
        }
    }
}

/// Closes the loose record once the next message has started (statements a fast-path call
/// runs itself belong to the call, which is still running).
fn close_loose_if_returned() {
    if state().loose.as_ref().is_some_and(|l| l.start != statement_start()) {
        close_loose();
    }
}

/// Closes the loose record: the call returned, or the transaction commits.
pub fn close_loose() {
    if let Some(l) = state().loose.take() {
        close(l.key, None);
    }
}

/// A client statement (depth 0) starts executing from `source`: whether functions ran while
/// it was parsed or planned (the open PLANNED_KEY record is this statement's). Then
/// `settle_planned(recorded)`.
///
/// # Safety
/// `source` is NULL or a NUL-terminated string.
pub unsafe fn planned_for(source: *const std::ffi::c_char) -> bool {
    let st = state();
    let Some(Loose { key: PLANNED_KEY, source: Some((ptr, text)), .. }) = &st.loose else { return false };
    // SAFETY: `source` is not NULL here, so NUL-terminated (caller's contract).
    st.depth == 0 && !source.is_null() && *ptr == source as usize && unsafe { CStr::from_ptr(source) }.to_bytes() == &text[..]
}

/// After `planned_for` said yes: with `recorded`, the statement's own record stands for the
/// functions that ran while it was prepared (the loose record is dropped); otherwise the
/// loose record is kept, closed now.
pub fn settle_planned(recorded: bool) {
    let st = state();
    if !recorded {
        close_loose();
        return;
    }
    if let Some(l) = st.loose.take() {
        if let Some(i) = st.open.iter().rposition(|o| o.key == l.key) {
            st.open.remove(i);
        }
    }
}

/// The text of the query being run by the client, if any.
pub fn current_query_text() -> Option<String> {
    // SAFETY: debug_query_string is NULL or the current query string.
    let p = unsafe { pg_sys::debug_query_string };
    if p.is_null() {
        return None;
    }
    // SAFETY: not NULL, so the NUL-terminated text of the query being run, which stays
    // alive while it runs.
    let t = objects::lossy(unsafe { CStr::from_ptr(p) });
    let t = t.trim().trim_end_matches(';').trim_end().to_string();
    (!t.is_empty()).then_some(t)
}

/// Attaches an authorization decision to the open record `key`; `denied` marks it so that
/// the error raised next closes it as `denied` rather than `error`.
pub fn set_decision(key: usize, decision: String, denied: bool) {
    if let Some(o) = state().open.iter_mut().rev().find(|o| o.key == key) {
        o.rec.decision = Some(decision);
        if denied {
            o.rec.outcome = Outcome::Denied;
        }
    }
}

/// Queues a record of something pg_custody itself did in this session (a policy change).
pub fn record_event(class: Class, command: &str, objects: &str) {
    if queue::state() == ChainState::Absent {
        return;
    }
    let mut rec = fill_who(Captured {
        event_time: now_unix_us(),
        class: class as u8,
        command: command.to_string(),
        objects: objects.to_string(),
        nesting_level: state().depth,
        ..Default::default()
    });
    rec.xid = current_xid();
    submit(rec, false);
}

/// Who is running the current statement, as the records name them.
#[derive(Clone)]
pub struct Who {
    pub database_name: String,
    pub session_user: String,
    pub current_user: String,
    pub client_addr: Option<String>,
    pub application_name: Option<String>,
    pub pid: i32,
}

pub fn who() -> Who {
    let r = fill_who(Captured::default());
    Who {
        database_name: r.database_name,
        session_user: r.session_user_name,
        current_user: r.current_user_name,
        client_addr: r.client_addr,
        application_name: r.application_name,
        pid: r.backend_pid,
    }
}

/// Remembers the error being reported (from emit_log_hook: copy only, never raise).
pub fn note_error(e: ReportedError) {
    state().last_error = Some(e);
}

/// The planner is about to plan a statement: it plans one level deeper, so that what the
/// functions it evaluates run is nested in the statement. Returns what `planning_end` needs.
pub fn planning_begin() -> bool {
    let st = state();
    let was = st.planning_top;
    st.planning_top |= st.depth == 0;
    st.depth += 1;
    was
}

/// The planner returned; `was` is what `planning_begin` returned.
pub fn planning_end(was: bool) {
    let st = state();
    st.depth = (st.depth - 1).max(0);
    st.planning_top = was;
}

pub fn planning_top() -> bool {
    state().planning_top
}

pub fn set_planning_top(planning: bool) {
    state().planning_top = planning;
}

pub fn depth_enter() {
    state().depth += 1;
}

pub fn depth_leave() {
    let st = state();
    st.depth = (st.depth - 1).max(0);
}

/// After a top-level abort: nothing is executing.
pub fn reset_after_abort() {
    let st = state();
    st.depth = 0;
    st.in_start = false;
    st.last_error = None;
    st.client_params = false;
}

pub fn set_depth(d: i32) {
    state().depth = d;
}

pub fn depth() -> i32 {
    state().depth
}

/// Queue position after this session's last record.
pub fn session_pos() -> u64 {
    state().session_pos
}

/// Queue position after this transaction's last record; reset at transaction end.
pub fn take_last_pos() -> u64 {
    std::mem::take(&mut state().last_pos)
}

// ---- settings changes -------------------------------------------------------------------

/// Records the custody settings in force if any changed since the last check, whatever
/// `custody.audit` says: nobody turns auditing off quietly.
pub fn record_settings_change(statement: Option<&str>) {
    let st = state();
    let generation = settings::generation();
    if generation == st.settings_seen {
        return;
    }
    st.settings_seen = generation;
    // Parallel workers restore the leader's settings (the leader records its own), the writer
    // records reloads itself; a session that has not logged in has nothing to compare with.
    if !active() || st.settings_values.is_none() {
        return;
    }
    // A setting assigned again to the value it had (a transaction start, a reload that
    // changed nothing for this session) is no change.
    let now = settings::snapshot();
    if st.settings_values.as_ref() == Some(&now) {
        return;
    }
    st.settings_values = Some(now.clone());
    let values: serde_json::Map<String, serde_json::Value> =
        now.into_iter().map(|(k, v)| (k, serde_json::Value::String(v))).collect();
    let objects = serde_json::to_string(&[serde_json::json!({
        "kind": "settings",
        "name": "custody",
        "settings": values,
    })])
    .unwrap_or_else(|_| "[]".into());
    let mut rec = Captured {
        event_time: now_unix_us(),
        class: Class::System as u8,
        command: "SETTINGS CHANGED".into(),
        objects,
        statement: statement.and_then(|s| statement_text(Some(s)).text),
        nesting_level: state().depth,
        ..Default::default()
    };
    rec = fill_who(rec);
    rec.xid = current_xid();
    submit(rec, false);
}

// ---- queueing ---------------------------------------------------------------------------

/// Hands a finished record to the writer. `in_abort`: we are inside transaction abort and
/// must not raise; a record that cannot be queued is then counted as lost (the writer
/// records the gap) and a WARNING is logged.
fn submit(mut rec: Captured, in_abort: bool) {
    fit(&mut rec);
    let st = state();
    st.buf.clear();
    st.buf.reserve(rec.encoded_len_hint());
    rec.encode_into(&mut st.buf);
    let timeout = settings::failure_timeout_ms();
    match queue::push(&st.buf, timeout) {
        Ok(pos) => {
            st.last_pos = pos;
            st.session_pos = pos;
        }
        Err(QueueError::NoQueue) => {}
        Err(e) => {
            if in_abort || settings::on_failure() == OnFailure::Continue {
                queue::note_lost();
                pgrx::warning!(
                    "pg_custody: audit record for \"{}\" could not be queued ({e:?}); the gap \
                     will be recorded",
                    rec.command
                );
            } else {
                crate::error::CustodyError::QueueUnavailable { timeout_ms: timeout }.report();
            }
        }
    }
}

/// The longest error message kept (a statement can raise one of any size).
const MAX_MESSAGE: usize = 16 * 1024;

/// Makes a record fit the queue, so that no statement turns into an anonymous gap because of
/// its size: the message is cut at MAX_MESSAGE; a record still too large loses the rest of its
/// statement text (its SHA-256 is kept) and then its object list (replaced by their count).
fn fit(rec: &mut Captured) {
    if let Some(m) = rec.message.as_mut() {
        if m.len() > MAX_MESSAGE {
            let end = floor_char_boundary(m, MAX_MESSAGE);
            m.truncate(end);
            m.push_str("… (message truncated)");
        }
    }
    let limit = queue::max_record_len().saturating_sub(256);
    if limit == 0 || rec.encoded_len_hint() <= limit {
        return;
    }
    if let Some(text) = rec.statement.take() {
        let keep = limit.saturating_sub(rec.encoded_len_hint()).min(text.len());
        if rec.statement_sha256.is_none() {
            rec.statement_sha256 = Some(Sha256::digest(text.as_bytes()).into());
        }
        rec.statement = Some(text[..floor_char_boundary(&text, keep)].to_string());
    }
    if rec.encoded_len_hint() > limit {
        let n = serde_json::from_str::<serde_json::Value>(&rec.objects).ok().and_then(|v| v.as_array().map(|a| a.len())).unwrap_or(0);
        rec.objects = serde_json::json!([{ "kind": "objects", "name": "omitted: too many to record", "count": n }]).to_string();
    }
}

fn floor_char_boundary(s: &str, mut i: usize) -> usize {
    i = i.min(s.len());
    while i > 0 && !s.is_char_boundary(i) {
        i -= 1;
    }
    i
}

/// A name as PostgreSQL keeps names (NAMEDATALEN - 1 bytes, cut at a character boundary).
pub fn truncate_name(s: &str) -> String {
    s[..floor_char_boundary(s, pg_sys::NAMEDATALEN as usize - 1)].to_string()
}

/// Hands a record to the writer from where nothing may wait or raise (error reporting): a
/// record that does not fit now is counted as lost, and the writer records the gap.
fn submit_nowait(mut rec: Captured) {
    fit(&mut rec);
    let mut buf = Vec::with_capacity(rec.encoded_len_hint());
    rec.encode_into(&mut buf);
    match queue::push(&buf, 0) {
        Ok(pos) => state().session_pos = pos,
        Err(QueueError::NoQueue) => {}
        Err(_) => queue::note_lost(),
    }
}

// ---- who, when, where -------------------------------------------------------------------

fn fill_who(mut rec: Captured) -> Captured {
    let st = state();
    if st.session.is_none() {
        st.session = Some(load_session());
    }
    let s = st.session.as_ref().expect("just set");
    rec.database_name = s.database_name.clone();
    rec.client_addr = s.client_addr.clone();
    rec.backend_pid = s.pid;
    // SAFETY: plain reads of the session's user ids and the application_name GUC.
    unsafe {
        rec.session_user_name = user_name(pg_sys::GetSessionUserId());
        rec.current_user_name = user_name(pg_sys::GetUserId());
        let app = pg_sys::application_name;
        rec.application_name = if app.is_null() || *app == 0 {
            None
        } else {
            Some(CStr::from_ptr(app).to_string_lossy().into_owned())
        };
    }
    rec
}

/// `fill_who` without catalog access, for records made outside transactions (replication
/// commands): names come from what this backend looked up before.
fn fill_who_cached(mut rec: Captured) -> Captured {
    let st = state();
    if let Some(s) = st.session.as_ref() {
        rec.database_name = s.database_name.clone();
        rec.client_addr = s.client_addr.clone();
    }
    // SAFETY: plain reads of the session's user ids, pid and the application_name GUC.
    unsafe {
        rec.backend_pid = pg_sys::MyProcPid;
        let name = |oid: pg_sys::Oid| {
            st.users.iter().find(|(o, _)| *o == oid).map(|(_, n)| n.clone()).unwrap_or_else(|| format!("oid:{}", u32::from(oid)))
        };
        rec.session_user_name = name(pg_sys::GetSessionUserId());
        rec.current_user_name = name(pg_sys::GetUserId());
        let app = pg_sys::application_name;
        rec.application_name = if app.is_null() || *app == 0 { None } else { Some(CStr::from_ptr(app).to_string_lossy().into_owned()) };
    }
    rec
}

fn user_name(oid: pg_sys::Oid) -> String {
    let st = state();
    if let Some((_, n)) = st.users.iter().find(|(o, _)| *o == oid) {
        return n.clone();
    }
    // SAFETY: GetUserNameFromId with noerr returns NULL for a dropped role.
    let name = unsafe {
        let p = pg_sys::GetUserNameFromId(oid, true);
        if p.is_null() {
            format!("oid:{}", u32::from(oid))
        } else {
            CStr::from_ptr(p).to_string_lossy().into_owned()
        }
    };
    if st.users.len() < 64 {
        st.users.push((oid, name.clone()));
    }
    name
}

/// Forgets cached role names (a role may be renamed).
pub fn forget_role_names() {
    state().users.clear();
}

fn load_session() -> Session {
    // SAFETY: MyDatabaseId/MyProcPid/MyBEEntry are set before any statement runs.
    unsafe {
        let db = pg_sys::get_database_name(pg_sys::MyDatabaseId);
        let database_name = if db.is_null() {
            String::new()
        } else {
            CStr::from_ptr(db).to_string_lossy().into_owned()
        };
        let client_addr = if pg_sys::MyBEEntry.is_null() {
            None
        } else {
            sockaddr_to_ip(&(*pg_sys::MyBEEntry).st_clientaddr.addr)
        };
        Session { database_name, client_addr, pid: pg_sys::MyProcPid }
    }
}

/// The client's IP address, or None for a Unix socket or a background process.
fn sockaddr_to_ip(ss: &pg_sys::sockaddr_storage) -> Option<String> {
    const AF_INET: u16 = 2;
    const AF_INET6: u16 = 10;
    let raw = ss as *const pg_sys::sockaddr_storage as *const u8;
    // SAFETY: sockaddr_storage is large enough for both layouts read here.
    unsafe {
        match ss.ss_family {
            AF_INET => {
                let a = std::slice::from_raw_parts(raw.add(4), 4);
                Some(std::net::Ipv4Addr::new(a[0], a[1], a[2], a[3]).to_string())
            }
            AF_INET6 => {
                let mut b = [0u8; 16];
                b.copy_from_slice(std::slice::from_raw_parts(raw.add(8), 16));
                Some(std::net::Ipv6Addr::from(b).to_string())
            }
            _ => None,
        }
    }
}

fn current_xid() -> Option<i64> {
    // SAFETY: reads the top-level transaction's id if one was assigned.
    let x = unsafe { pg_sys::GetTopFullTransactionIdIfAny() };
    if x.value == 0 {
        None
    } else {
        Some(x.value as i64)
    }
}

pub fn now_unix_us() -> i64 {
    // SAFETY: GetCurrentTimestamp only reads the clock.
    unsafe { pg_sys::GetCurrentTimestamp() + PG_EPOCH_OFFSET_US }
}

/// Applies the redaction of secrets, `custody.audit_statement` and
/// `custody.max_statement_length`: the text to store and, when truncated, the SHA-256 of the
/// full (redacted) text. Truncation respects UTF-8 boundaries.
fn statement_text(text: Option<&str>) -> Stored {
    let Some(text) = text else { return Stored::default() };
    // Secrets go before anything is kept or hashed: the log is permanent.
    let redacted = sqltext::redact(text);
    if settings::statement_text() == StatementText::None {
        return Stored { secrets: redacted.secrets, ..Stored::default() };
    }
    let limit = settings::max_statement_length().min(queue::max_record_len().saturating_sub(4096));
    let (text, sha256) = truncate_statement(&redacted.text, limit);
    Stored { text, sha256, secrets: redacted.secrets }
}

/// A statement's text as it is recorded.
#[derive(Default)]
struct Stored {
    /// Redacted, truncated at custody.max_statement_length; None when not recorded.
    text: Option<String>,
    /// SHA-256 of the whole redacted text, when it was truncated.
    sha256: Option<[u8; 32]>,
    /// The secrets redacted (to scrub them from error messages too).
    secrets: Vec<String>,
}

pub fn truncate_statement(text: &str, limit: usize) -> (Option<String>, Option<[u8; 32]>) {
    if text.len() <= limit {
        return (Some(text.to_string()), None);
    }
    let mut end = limit;
    while end > 0 && !text.is_char_boundary(end) {
        end -= 1;
    }
    let digest: [u8; 32] = Sha256::digest(text.as_bytes()).into();
    (Some(text[..end].to_string()), Some(digest))
}

/// The text of one statement inside a (possibly multi-statement) query string.
/// `location`/`len` are PlannedStmt's stmt_location/stmt_len (-1 / 0 meaning unknown / rest).
pub fn statement_slice(source: &str, location: i32, len: i32) -> &str {
    if location < 0 {
        return source;
    }
    let at = (location as usize).min(source.len());
    let end = if len <= 0 { source.len() } else { (at + len as usize).min(source.len()) };
    // The statement's leading comments are its own (a client's marker, a pooler's tag) on
    // every version.
    let start = if crate::pgver::STMT_LOCATION_AT_FIRST_TOKEN && at < source.len() { sqltext::statement_start(source, at) } else { at };
    match source.get(start..end) {
        Some(s) => s.trim(),
        None => source,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn truncation_keeps_char_boundaries_and_hashes_full_text() {
        let text = "SELECT 'ééé'";
        let (s, h) = truncate_statement(text, 100);
        assert_eq!(s.as_deref(), Some(text));
        assert!(h.is_none());
        // cut in the middle of the two-byte 'é'
        let (s, h) = truncate_statement(text, 9);
        assert_eq!(s.as_deref(), Some("SELECT '"));
        let full: [u8; 32] = Sha256::digest(text.as_bytes()).into();
        assert_eq!(h, Some(full));
    }

    #[test]
    fn statement_slices() {
        let q = "SELECT 1; UPDATE t SET a = 2";
        assert_eq!(statement_slice(q, 0, 8), "SELECT 1");
        assert_eq!(statement_slice(q, 9, 0), "UPDATE t SET a = 2");
        assert_eq!(statement_slice(q, -1, 0), q);
        assert_eq!(statement_slice(q, 500, 4), "");
        // Leading comments belong to the statement, wherever the version puts stmt_location.
        let q = "/* m */ SELECT 1; /* n; */ SELECT 2";
        let ((l1, n1), (l2, n2)) =
            if crate::pgver::STMT_LOCATION_AT_FIRST_TOKEN { ((8, 8), (27, 0)) } else { ((0, 16), (17, 0)) };
        assert_eq!(statement_slice(q, l1, n1), "/* m */ SELECT 1");
        assert_eq!(statement_slice(q, l2, n2), "/* n; */ SELECT 2");
    }
}
