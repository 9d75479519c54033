//! What connections do outside SQL statements: logging in (class `login`, successful and
//! failed authentication, PCI DSS 10.2.1.4) and the replication protocol's commands
//! (IDENTIFY_SYSTEM, BASE_BACKUP, CREATE_REPLICATION_SLOT, START_REPLICATION, ...).
//!
//! A login succeeds when the backend commits its startup transaction (every check — password,
//! role, database, CONNECT privilege, connection limits — is behind it); it fails with the
//! FATAL PostgreSQL reports before that. Replication commands pass no hook of their own: the
//! walsender reports each one as a LOG message ("received replication command"), which this
//! module makes PostgreSQL emit in walsenders and records from the error-reporting hook.
//!
//! Records queued from inside error reporting never wait and never raise: a full queue turns
//! them into a counted gap, like any record lost in an abort.

use std::ffi::CStr;

use pgrx::pg_sys;

use super::class::Class;
use super::wire::{Captured, Outcome};
use super::{active, fill_who, now_unix_us, sockaddr_to_ip, state, statement_text, submit_nowait};

/// The state of this connection's login.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Login {
    /// Not a client connection, or not yet authenticating.
    None,
    /// Authenticating or starting up: the outcome is not known yet.
    Pending,
    /// Recorded (success or failure): nothing more to say about it.
    Done,
}

static mut LOGIN: Login = Login::None;
/// Whether the operator asked for log_replication_commands themselves (otherwise the LOG
/// lines pg_custody makes the walsender emit are not written to the server log).
static mut OPERATOR_LOGS_REPLICATION: bool = false;
/// A replication command's record is open (closed by the next command, an ERROR or exit).
static mut REPLICATION_OPEN: bool = false;
/// The operator's log_min_messages, when it is above LOG and pg_custody lowered it in a
/// walsender to see replication commands (it then writes only what the operator asked for).
static mut OPERATOR_LOG_MIN: Option<i32> = None;

/// PostgreSQL's is_log_level_output (utils/error/elog.c): LOG sorts between ERROR and FATAL
/// for the server log.
fn server_logs(elevel: i32, min: i32) -> bool {
    let (log, log_server_only, error, fatal) =
        (pg_sys::LOG as i32, pg_sys::LOG_SERVER_ONLY as i32, pgrx::PgLogLevel::ERROR as i32, pg_sys::FATAL as i32);
    if elevel == log || elevel == log_server_only {
        min == log || min <= error
    } else if elevel == pg_sys::WARNING_CLIENT_ONLY as i32 {
        false
    } else if min == log {
        elevel >= fatal
    } else {
        elevel >= min
    }
}

/// The key of a replication command's record (utility tokens are odd and at least 3,
/// QueryDesc pointers aligned: small even numbers are free).
const REPLICATION_KEY: usize = 4;

fn login() -> Login {
    // SAFETY: single-threaded backend.
    unsafe { LOGIN }
}

fn set_login(l: Login) {
    // SAFETY: single-threaded backend.
    unsafe { LOGIN = l };
}

/// Whether this backend has finished logging in (fast-path detection needs a session).
pub fn logged_in() -> bool {
    login() != Login::Pending
}

/// ClientAuthentication_hook ran (whatever its outcome): a client is logging in.
pub fn authenticating() {
    // SAFETY: plain reads of process globals.
    unsafe {
        if pg_sys::MyProcPort.is_null() {
            return;
        }
        if pg_sys::am_walsender {
            // The walsender reports each replication command at DEBUG1, which no hook sees
            // unless it is emitted; LOG is, and an OVERRIDE source outranks whatever the
            // client or the role set.
            OPERATOR_LOGS_REPLICATION = pg_sys::log_replication_commands;
            pg_sys::SetConfigOption(
                c"log_replication_commands".as_ptr(),
                c"on".as_ptr(),
                pg_sys::GucContext::PGC_SUSET,
                pg_sys::GucSource::PGC_S_OVERRIDE,
            );
            // A LOG line (and the ERROR that ends a command) is only reported, and seen here,
            // if log_min_messages lets it through: `error` is the lowest level that lets both.
            // Pinned with an OVERRIDE source too (to the operator's value when it lets them
            // through), so that the client's startup options (`-c log_min_messages=fatal`,
            // applied after this hook) or the role's settings cannot blind it. (The value of
            // an enum setting is the static name in its options table.)
            let operator = pg_sys::GetConfigOption(c"log_min_messages".as_ptr(), false, false);
            let pinned = if server_logs(pg_sys::LOG as i32, pg_sys::log_min_messages) {
                operator
            } else {
                OPERATOR_LOG_MIN = Some(pg_sys::log_min_messages);
                c"error".as_ptr()
            };
            pg_sys::SetConfigOption(
                c"log_min_messages".as_ptr(),
                pinned,
                pg_sys::GucContext::PGC_SUSET,
                pg_sys::GucSource::PGC_S_OVERRIDE,
            );
        }
        pg_sys::before_shmem_exit(Some(custody_session_exit), pg_sys::Datum::from(0));
    }
    set_login(Login::Pending);
}

/// A backend's first commit is its startup transaction's: the login succeeded.
pub fn startup_committing() {
    if login() != Login::Pending {
        return;
    }
    set_login(Login::Done);
    super::settings_baseline();
    // SAFETY: a plain read of a process global.
    if unsafe { pg_sys::am_walsender } {
        crate::policy::remember_replication_subject();
    }
    if !active() || !super::wanted(Class::Login) {
        return;
    }
    let mut rec = fill_who(Captured {
        event_time: now_unix_us(),
        class: Class::Login as u8,
        command: "LOGIN".into(),
        objects: login_objects(),
        ..Default::default()
    });
    rec.outcome = Outcome::Success;
    super::submit(rec, false);
}

fn login_objects() -> String {
    // SAFETY: plain reads of process globals.
    let kind = unsafe {
        match (pg_sys::am_walsender, pg_sys::am_db_walsender) {
            (false, _) => "session",
            (true, false) => "physical replication",
            (true, true) => "logical replication",
        }
    };
    serde_json::json!([{ "kind": "connection", "name": kind }]).to_string()
}

/// An ERROR or FATAL, or a replication command's LOG line, is being reported
/// (emit_log_hook: no catalog access, no waiting, no raising).
///
/// # Safety
/// `e` is the ErrorData being emitted.
pub unsafe fn reported(e: &mut pg_sys::ErrorData, sqlstate: &str, message: &str) {
    // What the operator's own log_min_messages would not have written stays out of the log.
    // SAFETY: single-threaded backend.
    if let Some(min) = unsafe { OPERATOR_LOG_MIN } {
        if !server_logs(e.elevel, min) {
            e.output_to_server = false;
        }
    }
    let fatal = e.elevel >= pgrx::PgLogLevel::FATAL as i32;
    if fatal && login() != Login::Done {
        // SAFETY: we run in a backend (emit_log_hook), where MyProcPort is NULL or this
        // connection's Port.
        unsafe { failed_login(sqlstate, message) };
        return;
    }
    // SAFETY: a plain read of a process global.
    if !unsafe { pg_sys::am_walsender } {
        return;
    }
    if e.elevel >= pgrx::PgLogLevel::ERROR as i32 {
        close_replication(Some((sqlstate, message)));
        return;
    }
    // SAFETY: `e` is the ErrorData being emitted, whose message_id is NULL or a format string.
    if e.elevel == pgrx::PgLogLevel::LOG as i32 && unsafe { is_replication_command(e) } {
        // SAFETY: debug_query_string is the command, set right before the report.
        let text = unsafe { cstr_opt(pg_sys::debug_query_string) }.unwrap_or_default();
        close_replication(None);
        open_replication(&text);
        // SAFETY: single-threaded backend.
        if !unsafe { OPERATOR_LOGS_REPLICATION } {
            e.output_to_server = false; // pg_custody asked for the line, not the operator
        }
    }
}

/// Whether the LOG line being emitted is walsender's "received replication command".
///
/// # Safety
/// `e.message_id` is NULL or a NUL-terminated string (as in any ErrorData being emitted).
unsafe fn is_replication_command(e: &pg_sys::ErrorData) -> bool {
    // SAFETY: message_id is not NULL here, so NUL-terminated (caller's contract).
    !e.message_id.is_null() && unsafe { CStr::from_ptr(e.message_id) }.to_bytes() == b"received replication command: %s"
}

/// Copies a possibly-NULL C string.
///
/// # Safety
/// `p` is NULL or a valid NUL-terminated string.
unsafe fn cstr_opt(p: *const std::ffi::c_char) -> Option<String> {
    // SAFETY: run only when `p` is not NULL, so the valid string the caller promised.
    (!p.is_null()).then(|| unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned())
}

/// A FATAL before the login completed: the connection attempt failed (wrong password, no
/// pg_hba.conf entry, unknown role or database, no CONNECT privilege, too many
/// connections...). Recorded with what the client claimed, from its startup packet.
///
/// # Safety
/// Called in a backend, where MyProcPort is NULL or this connection's Port, which stays alive
/// until the process exits.
unsafe fn failed_login(sqlstate: &str, message: &str) {
    set_login(Login::Done);
    // A push may wait for room on the queue's condition variable, which needs the process
    // to have its PGPROC.
    // SAFETY: plain reads of process globals of this single-threaded backend; MyProcPort is
    // NULL or the connection's Port (our contract), which is what client_port accepts.
    let (port, pid) = unsafe {
        if pg_sys::MyProc.is_null() || !active() || !super::wanted(Class::Login) {
            return;
        }
        (crate::pgver::client_port(pg_sys::MyProcPort), pg_sys::MyProcPid)
    };
    let Some(port) = port else { return };
    let Some(user) = port.user_name.map(|u| u.to_string_lossy().into_owned()) else { return };
    let rec = Captured {
        event_time: now_unix_us(),
        database_name: port.database_name.map(|d| d.to_string_lossy().into_owned()).unwrap_or_default(),
        session_user_name: user.clone(),
        current_user_name: user,
        client_addr: sockaddr_to_ip(port.raddr),
        // What the startup packet claims, cut to a name's length as PostgreSQL's own
        // application_name setting is (an 8 kB one must not make the record unstorable).
        application_name: port.application_name.map(|a| super::truncate_name(&a.to_string_lossy())),
        backend_pid: pid,
        class: Class::Login as u8,
        command: "LOGIN".into(),
        objects: login_objects(),
        outcome: Outcome::Error,
        sqlstate: Some(sqlstate.to_string()),
        message: Some(message.to_string()),
        ..Default::default()
    };
    submit_nowait(rec);
}

fn replication_class(command: &str) -> (Class, &'static str) {
    let word: String = command.trim_start().chars().take_while(|c| c.is_ascii_alphanumeric() || *c == '_').collect();
    match word.to_ascii_uppercase().as_str() {
        "BASE_BACKUP" => (Class::Read, "BASE_BACKUP"),
        "START_REPLICATION" => (Class::Read, "START_REPLICATION"),
        "TIMELINE_HISTORY" => (Class::Read, "TIMELINE_HISTORY"),
        "READ_REPLICATION_SLOT" => (Class::Read, "READ_REPLICATION_SLOT"),
        "CREATE_REPLICATION_SLOT" => (Class::Ddl, "CREATE_REPLICATION_SLOT"),
        "DROP_REPLICATION_SLOT" => (Class::Ddl, "DROP_REPLICATION_SLOT"),
        "IDENTIFY_SYSTEM" => (Class::Misc, "IDENTIFY_SYSTEM"),
        "SHOW" => (Class::Misc, "SHOW"),
        _ => (Class::Misc, "REPLICATION COMMAND"),
    }
}

/// Opens the record of a replication command (without catalog access: the walsender runs
/// commands outside transactions; who it is was looked up at login).
fn open_replication(text: &str) {
    if !active() {
        return;
    }
    let (class, command) = replication_class(text);
    // Replication commands pass the gate like statements (a suspended REPLICATION role runs
    // no BASE_BACKUP). PostgreSQL reports the command right before it checks for interrupts
    // and runs it, and nothing may be raised while a report is emitted: a denial is a cancel
    // request, so the command ends with 57014 before it does anything (the record says
    // denied, and why), and the connection stays.
    let verdict = crate::policy::replication_verdict(command);
    if !super::wanted(class) && !verdict.as_ref().is_some_and(|v| v.refuses()) {
        return;
    }
    let stored = statement_text(Some(text));
    let rec = super::fill_who_cached(Captured {
        event_time: now_unix_us(),
        class: class as u8,
        command: command.into(),
        objects: "[]".into(),
        statement: stored.text,
        statement_sha256: stored.sha256,
        ..Default::default()
    });
    state().open.push(super::Open { key: REPLICATION_KEY, subid: 0, rec, secrets: stored.secrets, tentative: false });
    // SAFETY: single-threaded backend.
    unsafe { REPLICATION_OPEN = true };
    if let Some(v) = verdict {
        super::set_decision(REPLICATION_KEY, v.record_json(), v.denies());
        if v.denies() {
            // SAFETY: the interrupt flags, set as a signal handler sets them; served by the
            // CHECK_FOR_INTERRUPTS that follows the report.
            unsafe {
                pg_sys::QueryCancelPending = 1;
                pg_sys::InterruptPending = 1;
            }
        }
    }
}

/// Closes the open replication command's record: as a success, or with the error that ends it.
fn close_replication(error: Option<(&str, &str)>) {
    // SAFETY: single-threaded backend.
    unsafe {
        if !REPLICATION_OPEN {
            return;
        }
        REPLICATION_OPEN = false;
    }
    let st = state();
    let Some(i) = st.open.iter().rposition(|o| o.key == REPLICATION_KEY) else { return };
    let mut rec = st.open.remove(i).rec;
    if let Some((sqlstate, message)) = error {
        if rec.outcome != Outcome::Denied {
            rec.outcome = Outcome::Error;
        }
        rec.sqlstate = Some(sqlstate.into());
        rec.message = Some(message.into());
    }
    submit_nowait(rec);
}

/// The connection ends: a replication command still running (START_REPLICATION until the
/// standby disconnects) ends with it.
///
/// # Safety
/// Called only by PostgreSQL, as a before_shmem_exit callback.
#[pgrx::pg_guard]
unsafe extern "C-unwind" fn custody_session_exit(_code: std::ffi::c_int, _arg: pg_sys::Datum) {
    close_replication(None);
}
