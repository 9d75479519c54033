//! pg_custody's own work: the SQL it runs itself (the policy store functions, the role lookup
//! on the statement path, the verifier and the export, the writer) and how the hooks tell it
//! apart from everything else.
//!
//! Two rules make that work safe whoever calls it and however their session is set up:
//! - every statement of pg_custody's own runs with `search_path = pg_catalog, pg_temp`, so no
//!   user-defined function, operator, type or table is ever resolved inside it (`pinned`);
//! - "own" means exactly the statements pg_custody hands to SPI, recognised by their text
//!   (`select`, `update`, `cursor`): only those go unrecorded and ungated, and only they may
//!   change the policy store. Anything they run in turn — a function the planner folds, a
//!   trigger, an event trigger, a user function inside a built-in someone rewrote — has
//!   another text, and is recorded, gated and protected like any other statement.
//!
//! The custody writer is the one process where everything is pg_custody's own (`in_writer`):
//! it runs no user code (the tables it writes are checked for triggers, rules and index
//! expressions first, see `protect::check_table`).

use std::ffi::{c_char, CStr};

use pgrx::datum::DatumWithOid;
use pgrx::pg_sys;
use pgrx::spi::{SpiClient, SpiCursor, SpiResult, SpiTupleTable};

/// A statement text pg_custody is running right now. `exact`: recognised by its address only
/// (what SPI passes on unchanged for one-shot statements); otherwise also by its contents
/// (a cursor's text is copied by PostgreSQL) — used for reads only.
struct OwnText {
    ptr: *const c_char,
    exact: bool,
}

struct State {
    texts: Vec<OwnText>,
    /// The range table of the own statement whose ExecutorStart is running, if any: its
    /// permission check may allow writes to the policy store (`protect`).
    rtable: *mut pg_sys::List,
    /// > 0 while search_path is pinned by `pinned`.
    pinned: u32,
    writer: bool,
}

static mut STATE: State =
    State { texts: Vec::new(), rtable: std::ptr::null_mut(), pinned: 0, writer: false };

#[allow(static_mut_refs)]
fn state() -> &'static mut State {
    // SAFETY: backends are single-threaded; no reference returned here is held across a call
    // that could come back into this module.
    unsafe { &mut STATE }
}

/// Marks this process as the custody writer: all of its work is pg_custody's own.
pub fn set_writer() {
    state().writer = true;
}

/// Whether this process is the custody writer.
pub fn in_writer() -> bool {
    state().writer
}

/// Whether pg_custody's own work is running (the writer, or a statement of its own being
/// prepared or run through SPI): functions it runs are not the client's.
pub fn running() -> bool {
    let st = state();
    st.writer || !st.texts.is_empty() || st.pinned > 0
}

/// Runs `f` with `search_path = pg_catalog, pg_temp`, restored when `f` returns (after an
/// ERROR the (sub)transaction abort restores it, as it does for a function's SET clause).
pub fn pinned<R>(f: impl FnOnce() -> R) -> R {
    if state().pinned > 0 || in_writer() {
        return f(); // already pinned (the writer pins it for its whole life)
    }
    // SAFETY: the documented way to set a GUC for a nested scope (what fmgr_security_definer
    // does for SET clauses); GUC_ACTION_SAVE settings are allowed in parallel workers too.
    let level = unsafe {
        let level = pg_sys::NewGUCNestLevel();
        pg_sys::set_config_option(
            c"search_path".as_ptr(),
            c"pg_catalog, pg_temp".as_ptr(),
            pg_sys::GucContext::PGC_USERSET,
            pg_sys::GucSource::PGC_S_SESSION,
            pg_sys::GucAction::GUC_ACTION_SAVE,
            true,
            0,
            false,
        );
        level
    };
    struct Level;
    impl Drop for Level {
        fn drop(&mut self) {
            state().pinned -= 1;
        }
    }
    state().pinned += 1;
    let guard = Level;
    let r = f();
    drop(guard);
    // SAFETY: pops the nest level pushed above (only on the normal path; see above).
    unsafe { pg_sys::AtEOXact_GUC(true, level) };
    r
}

/// Runs `f`, which hands `sql` to SPI, with `sql` registered as one of pg_custody's own
/// statements (and search_path pinned).
fn registered<R>(sql: &CStr, exact: bool, f: impl FnOnce() -> R) -> R {
    struct Registration;
    impl Drop for Registration {
        fn drop(&mut self) {
            state().texts.pop();
        }
    }
    pinned(|| {
        state().texts.push(OwnText { ptr: sql.as_ptr(), exact });
        let _registration = Registration;
        f()
    })
}

/// A read-only statement of pg_custody's own.
pub fn select<'c>(client: &SpiClient<'c>, sql: &CStr, args: &[DatumWithOid<'_>]) -> SpiResult<SpiTupleTable<'c>> {
    registered(sql, true, || client.select(sql, None, args))
}

/// A statement of pg_custody's own that changes data (or runs DDL).
pub fn update<'c>(client: &mut SpiClient<'c>, sql: &CStr, args: &[DatumWithOid<'_>]) -> SpiResult<SpiTupleTable<'c>> {
    registered(sql, true, || client.update(sql, None, args))
}

/// A read-only cursor of pg_custody's own (PostgreSQL copies a cursor's text, so it is
/// recognised by its contents while it opens).
pub fn cursor<'c>(client: &SpiClient<'c>, sql: &CStr, args: &[DatumWithOid<'_>]) -> SpiCursor<'c> {
    registered(sql, false, || client.open_cursor(sql, args))
}

/// Whether `text` — a QueryDesc's sourceText or a utility statement's query string — is a
/// statement pg_custody itself is running. One load on the statement path when none is.
///
/// # Safety
/// `text` is NULL or a NUL-terminated string.
pub unsafe fn is_own_text(text: *const c_char) -> bool {
    let texts = &state().texts;
    if texts.is_empty() || text.is_null() {
        return false;
    }
    texts.iter().any(|t| {
        // SAFETY: `t.ptr` is a registered &CStr, kept alive until its Registration is dropped;
        // `text` is not NULL here, so NUL-terminated (caller's contract).
        t.ptr == text || (!t.exact && unsafe { CStr::from_ptr(t.ptr) == CStr::from_ptr(text) })
    })
}

/// Marks `rtable` as the range table of the own statement whose ExecutorStart is about to
/// run (NULL: none), for the permission check inside it; returns the previous one, to put
/// back when it returned (an ERROR leaves that to the abort, `hooks::HookState`).
pub fn set_starting(rtable: *mut pg_sys::List) -> *mut pg_sys::List {
    std::mem::replace(&mut state().rtable, rtable)
}

/// Whether `rtable` is the range table of the own statement being started.
pub fn is_own_rtable(rtable: *mut pg_sys::List) -> bool {
    let own = state().rtable;
    !own.is_null() && own == rtable
}

/// Runs `f` with the rights of the bootstrap superuser, who owns the policy store, after the
/// caller was checked (superuser or custody_admin): the store's tables are not writable by
/// custody_admin directly, only through the functions that record every change. On ERROR the
/// transaction abort restores the caller's identity.
pub fn as_owner<R>(f: impl FnOnce() -> R) -> R {
    let mut user = pg_sys::InvalidOid;
    let mut context: i32 = 0;
    // SAFETY: the save/switch/restore pattern PostgreSQL's own SECURITY_LOCAL_USERID_CHANGE
    // users follow.
    unsafe {
        pg_sys::GetUserIdAndSecContext(&mut user, &mut context);
        pg_sys::SetUserIdAndSecContext(
            pg_sys::Oid::from(pg_sys::BOOTSTRAP_SUPERUSERID),
            context | pg_sys::SECURITY_LOCAL_USERID_CHANGE as i32,
        );
    }
    let r = f();
    // SAFETY: restores what was saved above.
    unsafe { pg_sys::SetUserIdAndSecContext(user, context) };
    r
}

/// After a transaction abort nothing of pg_custody's own is running any more (the drop guards
/// have run while the ERROR unwound; this is the backstop).
pub fn reset_after_abort() {
    let s = state();
    s.texts.clear();
    s.rtable = std::ptr::null_mut();
    s.pinned = 0;
}
