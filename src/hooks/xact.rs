//! Transaction callbacks and the error hook: close the records of failed statements when
//! their (sub)transaction aborts, and hold COMMIT until the transaction's records are durable.

use std::ffi::CStr;

use pgrx::pg_sys;

use crate::capture;
use crate::error::CustodyError;
use crate::queue;
use crate::settings::{self, Durability, OnFailure};

static mut PREV_EMIT_LOG: pg_sys::emit_log_hook_type = None;
/// The hooks' state at the start of each open subtransaction, to restore it on abort.
static mut SUB_STATES: Vec<(pg_sys::SubTransactionId, super::HookState)> = Vec::new();

pub fn init() {
    // SAFETY: _PG_init; the previous emit_log_hook is chained to.
    unsafe {
        pg_sys::RegisterXactCallback(Some(custody_xact_callback), std::ptr::null_mut());
        pg_sys::RegisterSubXactCallback(Some(custody_subxact_callback), std::ptr::null_mut());
        PREV_EMIT_LOG = pg_sys::emit_log_hook;
        pg_sys::emit_log_hook = Some(custody_emit_log);
    }
}

/// Remembers the SQLSTATE and message of an ERROR being reported, for the record of the
/// statement that raised it. Never raises, never touches shared memory or the catalog.
/// (A plain frame: the previous hook is called outside `guarded`.)
///
/// # Safety
/// Called only by PostgreSQL, as emit_log_hook.
unsafe extern "C-unwind" fn custody_emit_log(edata: *mut pg_sys::ErrorData) {
    // SAFETY: called as emit_log_hook: EmitErrorReport passes its current, non-NULL ErrorData.
    super::guarded(|| unsafe { note_reported(edata) });
    // SAFETY: PREV_EMIT_LOG is written only in _PG_init; it gets the ErrorData we got.
    unsafe {
        if let Some(prev) = PREV_EMIT_LOG {
            prev(edata);
        }
    }
}

/// emit_log_hook's own part.
///
/// # Safety
/// `edata` is the ErrorData EmitErrorReport passed to the hook.
unsafe fn note_reported(edata: *mut pg_sys::ErrorData) {
    // SAFETY: `edata` is EmitErrorReport's current, non-NULL ErrorData, which nothing else
    // touches while the hook runs; its message and message_id are NULL (checked) or
    // NUL-terminated; am_walsender is a plain flag of this single-threaded backend.
    unsafe {
        let e = &mut *edata;
        if e.elevel == pgrx::PgLogLevel::LOG as i32 && pg_sys::am_walsender {
            // A replication command being reported (see capture::session).
            capture::session::reported(e, "", "");
        }
        if e.elevel >= pgrx::PgLogLevel::ERROR as i32 {
            let code = e.sqlerrcode;
            let mut sqlstate = String::with_capacity(5);
            for i in 0..5 {
                // PGUNSIXBIT: six bits per character, offset from '0'.
                sqlstate.push((((code >> (6 * i)) & 0x3F) as u8 + b'0') as char);
            }
            let message = if e.message.is_null() {
                String::new()
            } else {
                CStr::from_ptr(e.message).to_string_lossy().into_owned()
            };
            // The untranslated format, before values were filled in (for statements whose
            // bind parameter values must not be recorded).
            let template = (!e.message_id.is_null()).then(|| CStr::from_ptr(e.message_id).to_string_lossy().into_owned());
            let query = capture::current_query_text();
            capture::session::reported(e, &sqlstate, &message);
            capture::note_error(capture::ReportedError { sqlstate, message, template, query });
        }
    }
}

/// The transaction callback.
///
/// # Safety
/// Called only by PostgreSQL, as a registered XactCallback.
#[allow(static_mut_refs)]
#[pgrx::pg_guard]
unsafe extern "C-unwind" fn custody_xact_callback(event: pg_sys::XactEvent::Type, _arg: *mut std::ffi::c_void) {
    use pg_sys::XactEvent::*;
    match event {
        XACT_EVENT_PRE_COMMIT => {
            capture::session::startup_committing();
            capture::close_loose();
            crate::policy::store::pre_commit();
            wait_durable();
        }
        XACT_EVENT_PRE_PREPARE => {
            capture::close_loose();
            crate::policy::store::pre_prepare();
            wait_durable();
        }
        XACT_EVENT_ABORT | XACT_EVENT_PARALLEL_ABORT => {
            crate::policy::store::abort();
            capture::fail_open(None);
            super::executor::gated_forget_aborted(None);
            super::utility::forget_rechecks();
            capture::reset_after_abort();
            crate::own::reset_after_abort();
            super::HookState::reset();
            crate::protect::catalog::reset();
            crate::protect::take_extension_dropped();
            capture::take_last_pos();
            // SAFETY: SUB_STATES is backend-local (single-threaded) and not borrowed elsewhere
            // while a transaction callback runs.
            unsafe { SUB_STATES.clear() };
        }
        XACT_EVENT_COMMIT | XACT_EVENT_PREPARE => {
            crate::policy::store::commit();
            super::executor::gated_forget_aborted(None);
            // Only at COMMIT: a prepared DROP may still be rolled back (COMMIT PREPARED later
            // leaves the head file, and the next chain there is a HEAD MISMATCH: fail safe).
            if let Some(in_chain_database) = crate::protect::take_extension_dropped() {
                if event == XACT_EVENT_COMMIT {
                    crate::writer::head::forget(in_chain_database);
                }
            }
            // SAFETY: as above: backend-local and not borrowed elsewhere.
            unsafe { SUB_STATES.clear() };
        }
        _ => {}
    }
}

/// durability = commit: a transaction that wrote data does not commit before its audit
/// records are stored. Runs before the commit record is written, so a failure here aborts
/// the transaction instead of committing an unrecorded write.
fn wait_durable() {
    let pos = capture::take_last_pos();
    if pos == 0 || settings::durability() == Durability::Async || crate::own::in_writer() {
        return;
    }
    // DROP EXTENSION pg_custody in custody.database holds the log's lock until it commits, so
    // the writer cannot store anything before then, and the log is gone after: waiting
    // would only fail the DROP after custody.failure_timeout. The dropped chain ends with
    // what was stored before it (the tombstone names that head).
    if crate::protect::drops_the_log() {
        return;
    }
    // SAFETY: reads whether this transaction has an xid (i.e. wrote something).
    let wrote = unsafe { pg_sys::GetTopFullTransactionIdIfAny().value != 0 };
    if !wrote {
        return;
    }
    let timeout = settings::failure_timeout_ms();
    if !queue::wait_flushed(pos, timeout) {
        if settings::on_failure() == OnFailure::Continue {
            pgrx::warning!(
                "pg_custody: committing before the audit records of this transaction were stored \
                 (custody.on_failure = continue)"
            );
        } else {
            CustodyError::NotDurable { timeout_ms: timeout }.report();
        }
    }
}

/// The subtransaction callback.
///
/// # Safety
/// Called only by PostgreSQL, as a registered SubXactCallback.
#[allow(static_mut_refs)]
#[pgrx::pg_guard]
unsafe extern "C-unwind" fn custody_subxact_callback(
    event: pg_sys::SubXactEvent::Type,
    my_subid: pg_sys::SubTransactionId,
    _parent: pg_sys::SubTransactionId,
    _arg: *mut std::ffi::c_void,
) {
    use pg_sys::SubXactEvent::*;
    // SAFETY: SUB_STATES is backend-local (single-threaded backend); each use below is a
    // short borrow, and the capture functions called meanwhile never touch it.
    unsafe {
        match event {
            SUBXACT_EVENT_START_SUB => SUB_STATES.push((my_subid, super::HookState::now())),
            SUBXACT_EVENT_COMMIT_SUB => SUB_STATES.retain(|(s, _)| *s < my_subid),
            SUBXACT_EVENT_ABORT_SUB => {
                capture::fail_open(Some(my_subid));
                super::executor::gated_forget_aborted(Some(my_subid));
                if let Some(&(_, state)) = SUB_STATES.iter().find(|(s, _)| *s == my_subid) {
                    state.restore();
                }
                SUB_STATES.retain(|(s, _)| *s < my_subid);
            }
            _ => {}
        }
    }
}
