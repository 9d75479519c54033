//! The `custody.*` settings: one documented static per setting, typed accessors, and the
//! bookkeeping that lets every change to a custody setting be recorded.
//!
//! The values live in plain statics that PostgreSQL's GUC machinery writes through the
//! pointers handed to `DefineCustom*Variable`. Reading them is a load, so the per-statement
//! path can consult them freely. Everything that weakens auditing is superuser-only
//! (`PGC_SUSET`) or fixed at server start.

use std::ffi::{c_char, c_int, c_void, CStr};
use std::ptr::addr_of_mut;

use pgrx::pg_sys;

use crate::capture::class::{ClassSet, CLASS_NAMES};

/// `custody.database` — the database that holds the audit chain (postmaster).
static mut DATABASE: *mut c_char = std::ptr::null_mut();
/// `custody.audit` — the statement classes to record (text form).
static mut AUDIT: *mut c_char = std::ptr::null_mut();
/// `custody.audit` parsed into a bit set by the check hook.
static mut AUDIT_CLASSES: ClassSet = ClassSet::DEFAULT;
/// `custody.audit_catalog` — also record statements touching only system catalogs.
static mut AUDIT_CATALOG: bool = false;
/// `custody.audit_statement` — record the statement text (`full`) or not (`none`).
static mut AUDIT_STATEMENT: c_int = StatementText::Full as c_int;
/// `custody.max_statement_length` — longest statement text stored, in bytes.
static mut MAX_STATEMENT_LENGTH: c_int = 1024 * 1024;
/// `custody.queue_size` — shared queue size in kB (postmaster).
static mut QUEUE_SIZE_KB: c_int = 16 * 1024;
/// `custody.durability` — wait for records at commit (`commit`) or not (`async`).
static mut DURABILITY: c_int = Durability::Commit as c_int;
/// `custody.failure_timeout` — how long to wait for the writer, in ms.
static mut FAILURE_TIMEOUT_MS: c_int = 5000;
/// `custody.on_failure` — `block` (fail the statement) or `continue` (warn, mark a gap).
static mut ON_FAILURE: c_int = OnFailure::Block as c_int;
/// `custody.allow_drop` — allow dropping the audit log (postgresql.conf only).
static mut ALLOW_DROP: bool = false;
/// `custody.signing_key_file` — Ed25519 private key the writer signs checkpoints with.
static mut SIGNING_KEY_FILE: *mut c_char = std::ptr::null_mut();
/// `custody.checkpoint_command` — shell command each signed checkpoint is handed to.
static mut CHECKPOINT_COMMAND: *mut c_char = std::ptr::null_mut();
/// `custody.checkpoint_interval` — seconds between signed checkpoints.
static mut CHECKPOINT_INTERVAL_S: c_int = 60;
/// `custody.enforce` — on, dry_run or off.
static mut ENFORCE: c_int = Enforce::On as c_int;
/// `custody.exempt_roles` — roles not gated (still audited), text form.
static mut EXEMPT_ROLES: *mut c_char = std::ptr::null_mut();
/// `custody.exempt_roles` parsed by its assign hook.
static mut EXEMPT_LIST: Vec<String> = Vec::new();

/// Bumped by every custody setting's assign hook; compared at statement boundaries so that
/// any change of a custody setting in a session is recorded (see `capture::settings_changed`).
static mut SETTINGS_GENERATION: u64 = 0;

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
#[repr(i32)]
pub enum StatementText {
    Full = 0,
    None = 1,
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
#[repr(i32)]
pub enum Durability {
    Commit = 0,
    Async = 1,
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
#[repr(i32)]
pub enum Enforce {
    On = 0,
    DryRun = 1,
    Off = 2,
}

impl Enforce {
    pub fn name(self) -> &'static str {
        match self {
            Enforce::On => "on",
            Enforce::DryRun => "dry_run",
            Enforce::Off => "off",
        }
    }
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
#[repr(i32)]
pub enum OnFailure {
    Block = 0,
    Continue = 1,
}

/// Every custody setting that is recorded when it changes, in the order they are listed.
pub const RECORDED_SETTINGS: &[&str] = &[
    "custody.audit",
    "custody.audit_catalog",
    "custody.audit_statement",
    "custody.max_statement_length",
    "custody.durability",
    "custody.failure_timeout",
    "custody.on_failure",
    "custody.allow_drop",
    "custody.signing_key_file",
    "custody.checkpoint_interval",
    "custody.checkpoint_command",
    "custody.enforce",
    "custody.exempt_roles",
];

// The enum option tables must outlive the GUCs: statics of raw pointers to C strings.
struct EnumTable<const N: usize>([pg_sys::config_enum_entry; N]);
// SAFETY: the tables are immutable after construction and only read by PostgreSQL.
unsafe impl<const N: usize> Sync for EnumTable<N> {}

const fn entry(name: &'static CStr, val: c_int) -> pg_sys::config_enum_entry {
    pg_sys::config_enum_entry { name: name.as_ptr(), val, hidden: false }
}
const END: pg_sys::config_enum_entry =
    pg_sys::config_enum_entry { name: std::ptr::null(), val: 0, hidden: false };

static STATEMENT_OPTIONS: EnumTable<3> = EnumTable([
    entry(c"full", StatementText::Full as c_int),
    entry(c"none", StatementText::None as c_int),
    END,
]);
static DURABILITY_OPTIONS: EnumTable<3> = EnumTable([
    entry(c"commit", Durability::Commit as c_int),
    entry(c"async", Durability::Async as c_int),
    END,
]);
static ENFORCE_OPTIONS: EnumTable<4> = EnumTable([
    entry(c"on", Enforce::On as c_int),
    entry(c"dry_run", Enforce::DryRun as c_int),
    entry(c"off", Enforce::Off as c_int),
    END,
]);
static ON_FAILURE_OPTIONS: EnumTable<3> = EnumTable([
    entry(c"block", OnFailure::Block as c_int),
    entry(c"continue", OnFailure::Continue as c_int),
    END,
]);

/// Registers every setting and reserves the `custody.` prefix. Called once from `_PG_init`.
pub fn init() {
    use pg_sys::GucContext::*;
    let su = pg_sys::GUC_SUPERUSER_ONLY as c_int;
    // SAFETY: called from _PG_init in the postmaster (or a backend loading the library), the
    // only place GUCs may be defined; every pointer handed over is a 'static.
    unsafe {
        pg_sys::DefineCustomStringVariable(
            c"custody.database".as_ptr(),
            c"Database that holds the audit chain for the whole cluster.".as_ptr(),
            c"Statements of every database are recorded in custody.audit_log there.".as_ptr(),
            addr_of_mut!(DATABASE),
            c"postgres".as_ptr(),
            PGC_POSTMASTER,
            su,
            None,
            None,
            None,
        );
        pg_sys::DefineCustomStringVariable(
            c"custody.audit".as_ptr(),
            c"Statement classes to record.".as_ptr(),
            c"Comma-separated list of read, write, function, role, ddl, misc, misc_set, policy, \
              system, or all / none; a class prefixed with - is subtracted."
                .as_ptr(),
            addr_of_mut!(AUDIT),
            c"all, -misc_set".as_ptr(),
            PGC_SUSET,
            su | pg_sys::GUC_LIST_INPUT as c_int,
            Some(check_audit),
            Some(assign_audit),
            None,
        );
        pg_sys::DefineCustomBoolVariable(
            c"custody.audit_catalog".as_ptr(),
            c"Also record statements that touch only pg_catalog or information_schema.".as_ptr(),
            std::ptr::null(),
            addr_of_mut!(AUDIT_CATALOG),
            false,
            PGC_SUSET,
            su,
            None,
            Some(assign_bool),
            None,
        );
        pg_sys::DefineCustomEnumVariable(
            c"custody.audit_statement".as_ptr(),
            c"Record the statement text (full) or not (none).".as_ptr(),
            c"Bind parameters are never recorded in this version.".as_ptr(),
            addr_of_mut!(AUDIT_STATEMENT),
            StatementText::Full as c_int,
            STATEMENT_OPTIONS.0.as_ptr(),
            PGC_SUSET,
            su,
            None,
            Some(assign_enum),
            None,
        );
        pg_sys::DefineCustomIntVariable(
            c"custody.max_statement_length".as_ptr(),
            c"Longest statement text stored in a record, in bytes.".as_ptr(),
            c"Longer statements are truncated; the record keeps the SHA-256 of the full text."
                .as_ptr(),
            addr_of_mut!(MAX_STATEMENT_LENGTH),
            1024 * 1024,
            64,
            64 * 1024 * 1024,
            PGC_SUSET,
            su | pg_sys::GUC_UNIT_BYTE as c_int,
            None,
            Some(assign_int),
            None,
        );
        pg_sys::DefineCustomIntVariable(
            c"custody.queue_size".as_ptr(),
            c"Size of the shared queue between sessions and the custody writer.".as_ptr(),
            std::ptr::null(),
            addr_of_mut!(QUEUE_SIZE_KB),
            16 * 1024,
            1024,
            1024 * 1024,
            PGC_POSTMASTER,
            su | pg_sys::GUC_UNIT_KB as c_int,
            None,
            None,
            None,
        );
        pg_sys::DefineCustomEnumVariable(
            c"custody.durability".as_ptr(),
            c"commit: a transaction that wrote data waits at commit until its audit records \
              are durably stored; async: no wait."
                .as_ptr(),
            std::ptr::null(),
            addr_of_mut!(DURABILITY),
            Durability::Commit as c_int,
            DURABILITY_OPTIONS.0.as_ptr(),
            PGC_SUSET,
            su,
            None,
            Some(assign_enum),
            None,
        );
        pg_sys::DefineCustomIntVariable(
            c"custody.failure_timeout".as_ptr(),
            c"How long a session waits for the custody writer before custody.on_failure applies."
                .as_ptr(),
            std::ptr::null(),
            addr_of_mut!(FAILURE_TIMEOUT_MS),
            5000,
            10,
            3_600_000,
            PGC_SUSET,
            su | pg_sys::GUC_UNIT_MS as c_int,
            None,
            Some(assign_int),
            None,
        );
        pg_sys::DefineCustomEnumVariable(
            c"custody.on_failure".as_ptr(),
            c"block: a statement whose record cannot be queued fails; continue: it proceeds with \
              a WARNING and the gap is recorded."
                .as_ptr(),
            std::ptr::null(),
            addr_of_mut!(ON_FAILURE),
            OnFailure::Block as c_int,
            ON_FAILURE_OPTIONS.0.as_ptr(),
            PGC_SUSET,
            su,
            None,
            Some(assign_enum),
            None,
        );
        pg_sys::DefineCustomBoolVariable(
            c"custody.allow_drop".as_ptr(),
            c"Allow DROP EXTENSION pg_custody (and so the audit log) while the library is loaded."
                .as_ptr(),
            c"Can only be set in postgresql.conf.".as_ptr(),
            addr_of_mut!(ALLOW_DROP),
            false,
            PGC_SIGHUP,
            su,
            None,
            Some(assign_bool),
            None,
        );
        pg_sys::DefineCustomStringVariable(
            c"custody.signing_key_file".as_ptr(),
            c"File holding the Ed25519 private key that signs audit checkpoints.".as_ptr(),
            c"Read by the custody writer at start and on reload; never stored in the database. \
              Empty: checkpoints are not written."
                .as_ptr(),
            addr_of_mut!(SIGNING_KEY_FILE),
            c"".as_ptr(),
            PGC_SIGHUP,
            su,
            None,
            Some(assign_string),
            None,
        );
        pg_sys::DefineCustomIntVariable(
            c"custody.checkpoint_interval".as_ptr(),
            c"Time between signed checkpoints of the audit chain (when new records exist).".as_ptr(),
            std::ptr::null(),
            addr_of_mut!(CHECKPOINT_INTERVAL_S),
            60,
            1,
            86_400,
            PGC_SIGHUP,
            su | pg_sys::GUC_UNIT_S as c_int,
            None,
            Some(assign_int),
            None,
        );
        pg_sys::DefineCustomStringVariable(
            c"custody.checkpoint_command".as_ptr(),
            c"Shell command each signed checkpoint is handed to, so that a copy leaves the database.".as_ptr(),
            c"Run by the custody writer like archive_command: %p is a file holding the checkpoint's \
              digest (JSON), %s its seq, %% a percent sign. Empty: checkpoints leave only as LOG lines."
                .as_ptr(),
            addr_of_mut!(CHECKPOINT_COMMAND),
            c"".as_ptr(),
            PGC_SIGHUP,
            su,
            None,
            Some(assign_string),
            None,
        );
        pg_sys::DefineCustomEnumVariable(
            c"custody.enforce".as_ptr(),
            c"on: statements denied by policy fail; dry_run: they run and the would-be denial is \
              recorded; off: no policy is evaluated."
                .as_ptr(),
            std::ptr::null(),
            addr_of_mut!(ENFORCE),
            Enforce::On as c_int,
            ENFORCE_OPTIONS.0.as_ptr(),
            PGC_SUSET,
            su,
            None,
            Some(assign_enum),
            None,
        );
        pg_sys::DefineCustomStringVariable(
            c"custody.exempt_roles".as_ptr(),
            c"Roles whose statements are not gated by policies (they are still audited).".as_ptr(),
            c"Comma-separated role names; a statement is exempt when its session user or current \
              user is listed. Superusers are gated unless listed."
                .as_ptr(),
            addr_of_mut!(EXEMPT_ROLES),
            c"".as_ptr(),
            PGC_SIGHUP,
            su | pg_sys::GUC_LIST_INPUT as c_int,
            None,
            Some(assign_exempt),
            None,
        );
        pg_sys::MarkGUCPrefixReserved(c"custody".as_ptr());
    }
}

// ---- check and assign hooks -------------------------------------------------------------

/// Check hook of custody.audit: parses the class list into `extra`.
///
/// # Safety
/// Called only by PostgreSQL, as custody.audit's GUC check hook.
#[pgrx::pg_guard]
unsafe extern "C-unwind" fn check_audit(
    newval: *mut *mut c_char,
    extra: *mut *mut c_void,
    _source: pg_sys::GucSource::Type,
) -> bool {
    // SAFETY: PostgreSQL passes a valid C string for a string GUC's new value (never NULL
    // here: custody.audit's boot value is not NULL).
    let text = unsafe { CStr::from_ptr(*newval) }.to_string_lossy();
    match ClassSet::parse(&text) {
        Ok(set) => {
            // SAFETY: the allocator PostgreSQL frees GUC "extra" with; aligned for any
            // scalar type, or NULL.
            let p = unsafe { crate::pgver::guc_extra_alloc(std::mem::size_of::<ClassSet>()) } as *mut ClassSet;
            if p.is_null() {
                return false;
            }
            // SAFETY: p points to a fresh allocation of the right size.
            unsafe {
                p.write(set);
                *extra = p.cast();
            }
            true
        }
        Err(bad) => {
            let msg = format!(
                "unrecognized class \"{bad}\"; valid classes: {}, all, none",
                CLASS_NAMES.join(", ")
            );
            let c = std::ffi::CString::new(msg).unwrap_or_default();
            // SAFETY: GUC_check_errdetail_string is the documented way for a check hook to
            // explain a refusal; it copies the string.
            unsafe {
                pg_sys::GUC_check_errcode(pgrx::PgSqlErrorCode::ERRCODE_INVALID_PARAMETER_VALUE as c_int);
                pg_sys::GUC_check_errdetail_string = pg_sys::pstrdup(c.as_ptr());
            }
            false
        }
    }
}

/// Assign hook of custody.audit: takes the parsed classes from `extra`.
///
/// # Safety
/// Called only by PostgreSQL, as custody.audit's GUC assign hook.
#[pgrx::pg_guard]
unsafe extern "C-unwind" fn assign_audit(_newval: *const c_char, extra: *mut c_void) {
    if !extra.is_null() {
        // SAFETY: extra was produced by check_audit for this value.
        unsafe { AUDIT_CLASSES = *(extra as *const ClassSet) };
    }
    bump();
}

/// Assign hook of the bool custody settings: counts the change (`bump`).
///
/// # Safety
/// Called only by PostgreSQL, as a GUC assign hook.
#[pgrx::pg_guard]
unsafe extern "C-unwind" fn assign_bool(_newval: bool, _extra: *mut c_void) {
    bump();
}

/// Assign hook of the int custody settings: counts the change (`bump`).
///
/// # Safety
/// Called only by PostgreSQL, as a GUC assign hook.
#[pgrx::pg_guard]
unsafe extern "C-unwind" fn assign_int(_newval: c_int, _extra: *mut c_void) {
    bump();
}

/// Assign hook of the string custody settings: counts the change (`bump`).
///
/// # Safety
/// Called only by PostgreSQL, as a GUC assign hook.
#[pgrx::pg_guard]
unsafe extern "C-unwind" fn assign_string(_newval: *const c_char, _extra: *mut c_void) {
    bump();
}

/// Assign hook of custody.exempt_roles: parses the role list.
///
/// # Safety
/// Called only by PostgreSQL, as custody.exempt_roles's GUC assign hook.
#[allow(static_mut_refs)]
#[pgrx::pg_guard]
unsafe extern "C-unwind" fn assign_exempt(newval: *const c_char, _extra: *mut c_void) {
    let text = if newval.is_null() {
        String::new()
    } else {
        // SAFETY: a string GUC's new value, not NULL, is a NUL-terminated string.
        unsafe { CStr::from_ptr(newval) }.to_string_lossy().into_owned()
    };
    // SAFETY: single-threaded; assign hooks may not fail, and parsing cannot.
    unsafe {
        EXEMPT_LIST = text
            .split(',')
            .map(|r| r.trim().trim_matches('"').to_string())
            .filter(|r| !r.is_empty())
            .collect();
    }
    bump();
}

/// Assign hook of the enum custody settings: counts the change (`bump`).
///
/// # Safety
/// Called only by PostgreSQL, as a GUC assign hook.
#[pgrx::pg_guard]
unsafe extern "C-unwind" fn assign_enum(_newval: c_int, _extra: *mut c_void) {
    bump();
}

fn bump() {
    // SAFETY: backends are single-threaded; GUC hooks run on the main thread.
    unsafe { SETTINGS_GENERATION = SETTINGS_GENERATION.wrapping_add(1) };
}

// ---- typed accessors --------------------------------------------------------------------
// The statics are written only by PostgreSQL's GUC code on this backend's single thread;
// reads are plain loads. String values are copied before anything can assign a new one.

pub fn database() -> &'static str {
    // SAFETY: a plain load of a static that only PostgreSQL's GUC code writes, on this thread.
    let p = unsafe { DATABASE };
    if p.is_null() {
        return "postgres";
    }
    // SAFETY: not NULL, so a NUL-terminated GUC string; custody.database is PGC_POSTMASTER, so
    // the value is never replaced (nor freed) while the process lives, hence 'static.
    unsafe { CStr::from_ptr(p) }.to_str().unwrap_or("postgres")
}

pub fn audit_classes() -> ClassSet {
    // SAFETY: a plain load of a static that only PostgreSQL's GUC code writes, on this thread.
    unsafe { AUDIT_CLASSES }
}

pub fn audit_catalog() -> bool {
    // SAFETY: a plain load of a static that only PostgreSQL's GUC code writes, on this thread.
    unsafe { AUDIT_CATALOG }
}

pub fn statement_text() -> StatementText {
    // SAFETY: a plain load of a static that only PostgreSQL's GUC code writes, on this thread.
    if unsafe { AUDIT_STATEMENT } == StatementText::None as c_int {
        StatementText::None
    } else {
        StatementText::Full
    }
}

pub fn max_statement_length() -> usize {
    // SAFETY: a plain load of a static that only PostgreSQL's GUC code writes, on this thread.
    unsafe { MAX_STATEMENT_LENGTH }.max(0) as usize
}

pub fn queue_size_bytes() -> usize {
    // SAFETY: a plain load of a static that only PostgreSQL's GUC code writes, on this thread.
    unsafe { QUEUE_SIZE_KB }.max(1024) as usize * 1024
}

pub fn durability() -> Durability {
    // SAFETY: a plain load of a static that only PostgreSQL's GUC code writes, on this thread.
    if unsafe { DURABILITY } == Durability::Async as c_int {
        Durability::Async
    } else {
        Durability::Commit
    }
}

pub fn failure_timeout_ms() -> i64 {
    // SAFETY: a plain load of a static that only PostgreSQL's GUC code writes, on this thread.
    (unsafe { FAILURE_TIMEOUT_MS }) as i64
}

pub fn on_failure() -> OnFailure {
    // SAFETY: a plain load of a static that only PostgreSQL's GUC code writes, on this thread.
    if unsafe { ON_FAILURE } == OnFailure::Continue as c_int {
        OnFailure::Continue
    } else {
        OnFailure::Block
    }
}

pub fn allow_drop() -> bool {
    // SAFETY: a plain load of a static that only PostgreSQL's GUC code writes, on this thread.
    unsafe { ALLOW_DROP }
}

/// The signing key file, or None when unset.
pub fn signing_key_file() -> Option<String> {
    // SAFETY: a plain load of a static that only PostgreSQL's GUC code writes, on this thread.
    let p = unsafe { SIGNING_KEY_FILE };
    if p.is_null() {
        return None;
    }
    // SAFETY: not NULL, so a NUL-terminated GUC string, copied before anything can replace it.
    let s = unsafe { CStr::from_ptr(p) }.to_string_lossy().trim().to_string();
    (!s.is_empty()).then_some(s)
}

/// custody.checkpoint_command, or None when unset.
pub fn checkpoint_command() -> Option<String> {
    // SAFETY: a plain load of a static that only PostgreSQL's GUC code writes, on this thread.
    let p = unsafe { CHECKPOINT_COMMAND };
    if p.is_null() {
        return None;
    }
    // SAFETY: not NULL, so a NUL-terminated GUC string, copied before anything can replace it.
    let s = unsafe { CStr::from_ptr(p) }.to_string_lossy().trim().to_string();
    (!s.is_empty()).then_some(s)
}

pub fn checkpoint_interval() -> std::time::Duration {
    // SAFETY: a plain load of a static that only PostgreSQL's GUC code writes, on this thread.
    std::time::Duration::from_secs(unsafe { CHECKPOINT_INTERVAL_S }.max(1) as u64)
}

pub fn enforce() -> Enforce {
    // SAFETY: a plain load of a static that only PostgreSQL's GUC code writes, on this thread.
    match unsafe { ENFORCE } {
        1 => Enforce::DryRun,
        2 => Enforce::Off,
        _ => Enforce::On,
    }
}

/// Whether `role` is listed in custody.exempt_roles.
#[allow(static_mut_refs)]
pub fn is_exempt(role: &str) -> bool {
    // SAFETY: EXEMPT_LIST is written only by assign_exempt on this thread, never while this
    // borrow is alive (the comparison calls nothing that could assign a setting).
    unsafe { EXEMPT_LIST.iter().any(|r| r == role) }
}

pub fn generation() -> u64 {
    // SAFETY: a plain load of a static that only PostgreSQL's GUC code writes, on this thread.
    unsafe { SETTINGS_GENERATION }
}

/// Current values of the recorded settings, as `name=value` pairs, via GetConfigOption so
/// the text is exactly what SHOW prints.
pub fn snapshot() -> Vec<(String, String)> {
    RECORDED_SETTINGS
        .iter()
        .map(|name| {
            let c = std::ffi::CString::new(*name).expect("setting names have no NUL");
            // SAFETY: GetConfigOption returns a pointer into GUC storage or NULL; we copy it.
            let v = unsafe { pg_sys::GetConfigOption(c.as_ptr(), true, false) };
            let value = if v.is_null() {
                String::new()
            } else {
                // SAFETY: not NULL, so a NUL-terminated value in GUC storage, copied at once.
                unsafe { CStr::from_ptr(v) }.to_string_lossy().into_owned()
            };
            (name.to_string(), value)
        })
        .collect()
}
