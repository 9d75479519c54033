//! The object-access hook: PostgreSQL calls it after it created, altered or is about to drop an
//! object, and before it executes a function (when an expression using it is initialized,
//! and for a fast-path call). Protection uses the first three (`protect`); capture uses the
//! last for fast-path calls and for reads of the catalogs that call unsafe functions
//! (`capture::function_executes`).

use pgrx::pg_sys;

use crate::{capture, protect};

static mut PREV_OBJECT_ACCESS: pg_sys::object_access_hook_type = None;

pub fn init() {
    // SAFETY: _PG_init; the previous hook is saved and chained to.
    unsafe {
        PREV_OBJECT_ACCESS = pg_sys::object_access_hook;
        pg_sys::object_access_hook = Some(custody_object_access);
    }
}

/// object_access_hook. A plain frame: an ERROR of the previous hook passes through.
///
/// # Safety
/// Called only by PostgreSQL, as object_access_hook.
unsafe extern "C-unwind" fn custody_object_access(
    access: pg_sys::ObjectAccessType::Type,
    class_id: pg_sys::Oid,
    object_id: pg_sys::Oid,
    sub_id: std::ffi::c_int,
    arg: *mut std::ffi::c_void,
) {
    // SAFETY: PREV_OBJECT_ACCESS is written only in _PG_init; it is called with the arguments
    // PostgreSQL passed to us, unchanged.
    unsafe {
        if let Some(prev) = PREV_OBJECT_ACCESS {
            prev(access, class_id, object_id, sub_id, arg);
        }
    }
    // SAFETY: PostgreSQL's arguments (our contract).
    super::guarded(|| unsafe { accessed(access, class_id, object_id, sub_id, arg) });
}

/// object_access_hook's own part.
///
/// # Safety
/// The arguments PostgreSQL passed to object_access_hook.
unsafe fn accessed(
    access: pg_sys::ObjectAccessType::Type,
    class_id: pg_sys::Oid,
    object_id: pg_sys::Oid,
    sub_id: std::ffi::c_int,
    arg: *mut std::ffi::c_void,
) {
    use pg_sys::ObjectAccessType::*;
    match access {
        // Every function of every expression passes here: keep it to a few loads.
        OAT_FUNCTION_EXECUTE => capture::function_executes(object_id),
        OAT_DROP => protect::check_drop(class_id, object_id, sub_id),
        OAT_POST_CREATE => {
            // SAFETY: for OAT_POST_CREATE `arg` is NULL or an ObjectAccessPostCreate.
            let internal = !arg.is_null() && unsafe { (*(arg as *mut pg_sys::ObjectAccessPostCreate)).is_internal };
            protect::object::check(true, class_id, object_id, sub_id, internal);
            if class_id == pg_sys::ExtensionRelationId {
                crate::policy::store::extension_created(object_id);
            }
        }
        OAT_POST_ALTER => {
            // SAFETY: for OAT_POST_ALTER `arg` is NULL or an ObjectAccessPostAlter.
            let internal = !arg.is_null() && unsafe { (*(arg as *mut pg_sys::ObjectAccessPostAlter)).is_internal };
            protect::object::check(false, class_id, object_id, sub_id, internal);
        }
        _ => {}
    }
}
