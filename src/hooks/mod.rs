//! The hooks pg_custody installs: each saves the previous hook and always chains to it
//! (or to PostgreSQL's standard function), so pg_custody composes with other extensions.
//!
//! Transparency: an ERROR raised inside the previous hook or the standard function passes
//! through pg_custody's hooks untouched — position, context, internal query, the name fields
//! and the SQLSTATE reach the client, the server log and PL/pgSQL's EXCEPTION handlers exactly
//! as PostgreSQL raised them. That is why the hooks are not `#[pg_guard]` functions (pgrx would
//! catch the ERROR and raise a copy of its message, detail and hint): each is a plain frame
//! that runs pg_custody's own parts inside [`guarded`] and calls into PostgreSQL outside it,
//! through `pgver`'s unwrapped calls. What a hook sets around such a call and puts back after
//! it (statement depth, ExecutorStart in progress, an own statement's range table, an
//! extension script's depth) is put back by the (sub)transaction abort when an ERROR skips
//! that (`xact`, [`HookState`]). The records of failed statements are closed there too.

pub mod executor;
mod object_access;
mod planner;
mod session;
mod utility;
mod xact;

pub fn init() {
    executor::init();
    object_access::init();
    planner::init();
    session::init();
    utility::init();
    xact::init();
}

/// Runs pg_custody's own part of a hook as `#[pg_guard]` would: a Rust panic, or a PostgreSQL
/// ERROR raised by a function `f` calls, becomes a PostgreSQL ERROR when it reaches C.
#[inline(always)]
pub fn guarded<R>(f: impl FnOnce() -> R) -> R {
    // SAFETY: called only from the top level of a hook PostgreSQL calls, whose frame holds
    // nothing with a destructor (what pgrx_extern_c_guard requires of its caller); `R` is
    // always a plain value here.
    unsafe { pgrx::pg_sys::panic::pgrx_extern_c_guard(f) }
}

/// What the hooks keep in backend state around their calls into PostgreSQL, as a
/// subtransaction found it: restored when it aborts (an ERROR skipped the hooks' own
/// restoring), reset at a top-level abort.
#[derive(Clone, Copy)]
pub struct HookState {
    depth: i32,
    planning_top: bool,
    extension_depth: Option<i32>,
}

impl HookState {
    pub fn now() -> HookState {
        HookState {
            depth: crate::capture::depth(),
            planning_top: crate::capture::planning_top(),
            extension_depth: crate::protect::extension_depth(),
        }
    }

    /// After an abort back to where `self` was taken: nothing is being started (ExecutorStart
    /// calls no code that could open a subtransaction), no own statement is starting.
    pub fn restore(self) {
        crate::capture::set_depth(self.depth);
        crate::capture::set_planning_top(self.planning_top);
        crate::capture::end_start(false);
        crate::own::set_starting(std::ptr::null_mut());
        crate::protect::set_extension_depth(self.extension_depth);
    }

    /// A top-level abort: nothing is running.
    pub fn reset() {
        HookState { depth: 0, planning_top: false, extension_depth: None }.restore();
    }
}
