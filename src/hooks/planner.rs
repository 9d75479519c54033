//! The planner hook: planning is one statement level deeper than the statement being
//! planned, so that what a function the planner evaluates (an IMMUTABLE function with constant
//! arguments, folded) runs itself is recorded as nested in the statement, not as a statement
//! the client sent. Functions that are not built in and run while a client statement is
//! planned are recorded as that statement's (`capture::function_executes`).

use pgrx::pg_sys;

use super::guarded;
use crate::capture;

static mut PREV_PLANNER: pg_sys::planner_hook_type = None;

pub fn init() {
    // SAFETY: _PG_init; the previous hook is saved and chained to.
    unsafe {
        PREV_PLANNER = pg_sys::planner_hook;
        pg_sys::planner_hook = Some(custody_planner);
    }
}

/// planner_hook. A plain frame: an ERROR raised while planning passes through untouched, and
/// the (sub)transaction abort puts the depth back (`hooks::HookState`).
///
/// # Safety
/// Called only by PostgreSQL, as planner_hook.
unsafe extern "C-unwind" fn custody_planner(
    parse: *mut pg_sys::Query,
    query_string: *const std::ffi::c_char,
    cursor_options: std::ffi::c_int,
    bound_params: pg_sys::ParamListInfo,
) -> *mut pg_sys::PlannedStmt {
    let was = guarded(capture::planning_begin);
    // SAFETY: PREV_PLANNER is written only in _PG_init; PostgreSQL's arguments, unchanged.
    let plan = unsafe { crate::pgver::call_planner(PREV_PLANNER, parse, query_string, cursor_options, bound_params) };
    guarded(|| capture::planning_end(was));
    plan
}
