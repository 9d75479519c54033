//! Executor hooks: open a record when a plannable statement starts — before PostgreSQL's own
//! permission check, so a denied statement still has its record — and close it at the end;
//! refuse changes to pg_custody's tables; check direct catalog DML once it ran.

use pgrx::pg_sys;

use crate::capture::{self, class::Class, objects};
use super::guarded;
use crate::{own, policy, protect, settings};

static mut PREV_START: pg_sys::ExecutorStart_hook_type = None;
static mut PREV_RUN: pg_sys::ExecutorRun_hook_type = None;
static mut PREV_FINISH: pg_sys::ExecutorFinish_hook_type = None;
static mut PREV_END: pg_sys::ExecutorEnd_hook_type = None;
static mut PREV_CHECK_PERMS: pg_sys::ExecutorCheckPerms_hook_type = None;

pub fn init() {
    // SAFETY: _PG_init; each previous hook is saved and chained to.
    unsafe {
        PREV_START = pg_sys::ExecutorStart_hook;
        pg_sys::ExecutorStart_hook = Some(custody_executor_start);
        PREV_RUN = pg_sys::ExecutorRun_hook;
        pg_sys::ExecutorRun_hook = Some(crate::pgver::executor_run_hook);
        PREV_FINISH = pg_sys::ExecutorFinish_hook;
        pg_sys::ExecutorFinish_hook = Some(custody_executor_finish);
        PREV_END = pg_sys::ExecutorEnd_hook;
        pg_sys::ExecutorEnd_hook = Some(custody_executor_end);
        PREV_CHECK_PERMS = pg_sys::ExecutorCheckPerms_hook;
        pg_sys::ExecutorCheckPerms_hook = Some(crate::pgver::check_perms_hook);
    }
}

fn command_tag(op: pg_sys::CmdType::Type) -> (&'static str, Class) {
    use pg_sys::CmdType::*;
    match op {
        CMD_SELECT => ("SELECT", Class::Read),
        CMD_INSERT => ("INSERT", Class::Write),
        CMD_UPDATE => ("UPDATE", Class::Write),
        CMD_DELETE => ("DELETE", Class::Write),
        CMD_MERGE => ("MERGE", Class::Write),
        _ => ("UNKNOWN", Class::Misc),
    }
}

/// Opens the statement's record if it is to be recorded; gates it; refuses changes to the
/// protected tables (after the record is open, so the attempt is recorded).
///
/// # Safety
/// `qd` must be the QueryDesc passed to ExecutorStart.
unsafe fn open_record(qd: *mut pg_sys::QueryDesc, eflags: i32) {
    if eflags & pg_sys::EXEC_FLAG_EXPLAIN_ONLY as i32 != 0 {
        return;
    }
    // Functions that ran while the client's statement was parsed or planned: its record
    // stands for them, and it is not one a read of the catalogs may skip.
    // SAFETY: `qd` is the live QueryDesc PostgreSQL passed to ExecutorStart (our contract);
    // its sourceText is NULL or the statement's NUL-terminated text.
    let planned = unsafe { capture::planned_for((*qd).sourceText) };
    // SAFETY: the same QueryDesc, under the same contract.
    let opened = unsafe { open_record_as(qd, planned) };
    if planned && !opened {
        capture::settle_planned(false);
    }
}

/// `open_record`; whether the record was opened. `planned`: functions ran while the
/// statement was prepared.
///
/// # Safety
/// `qd` must be the QueryDesc passed to ExecutorStart.
unsafe fn open_record_as(qd: *mut pg_sys::QueryDesc, planned: bool) -> bool {
    policy::statement_starts();
    // SAFETY: `qd` is the live QueryDesc PostgreSQL passed to ExecutorStart (our contract);
    // nothing writes to it while these references are used.
    let qd_ref = unsafe { &*qd };
    // SAFETY: CreateQueryDesc always sets plannedstmt, and the plan outlives the QueryDesc.
    let pstmt = unsafe { &*qd_ref.plannedstmt };
    // A change to a protected table is refused by the permission-check hook below, inside
    // standard_ExecutorStart; the attempt's record must be open by then.
    // SAFETY: `pstmt` is the valid plan just borrowed.
    let perm_infos = unsafe { crate::pgver::plan_perm_infos(pstmt) };
    // SAFETY: the plan's range table and permission list, alive as long as the plan.
    let violation = unsafe { protect::range_table_violation(pstmt.rtable, perm_infos) };
    let (tag, class) = command_tag(qd_ref.operation);
    if !capture::active() {
        return false;
    }
    // Every statement passes the policy gate; every decision is recorded. The objects are
    // read from the catalog caches only when the record or the gate needs them.
    let pending = policy::prepare();
    if pending.is_none() && violation.is_none() && !capture::wanted(class) {
        return false;
    }
    // SAFETY: the plan's range table and permission list, alive as long as the plan.
    let info = unsafe { objects::from_range_table(pstmt.rtable, perm_infos) };
    let objects_json = objects::to_json(&info.objects);
    let verdict = pending.map(|p| p.decide(tag, &objects_json));
    // A refusal is always recorded; an allowed statement as custody.audit says.
    let refused = verdict.as_ref().is_some_and(|v| v.refuses());
    if violation.is_none() && !refused && !capture::wanted(class) {
        return false;
    }
    // custody.audit_catalog = off skips reads of the catalogs only: never a write (a catalog
    // write has privileges other than SELECT), never a decision or a refusal, and never a
    // read that calls an unsafe function (decided when it finishes) or that ran code while it
    // was prepared. (A plan that depends on a function or domain that is not built in — one
    // the planner inlined leaves only this trace — is not skipped either.)
    let catalog_read = info.catalog_only
        && !planned
        && pstmt.invalItems.is_null()
        && qd_ref.operation == pg_sys::CmdType::CMD_SELECT
        && !info.writes
        && !refused
        && violation.is_none()
        && !settings::audit_catalog();
    // SAFETY: sourceText is NULL or the statement's NUL-terminated text, which outlives the
    // QueryDesc; `cstr` maps NULL to "".
    let source = unsafe { objects::cstr(qd_ref.sourceText) };
    let text = capture::statement_slice(&source, pstmt.stmt_location, pstmt.stmt_len);
    if planned {
        capture::settle_planned(true);
    }
    capture::open(qd as usize, class, tag, objects_json, Some(text));
    if catalog_read {
        capture::set_tentative(qd as usize);
    }
    // SAFETY: params, when not NULL, is the ParamListInfo the statement runs with.
    if !qd_ref.params.is_null() && unsafe { (*qd_ref.params).numParams } > 0 {
        capture::mark_bind_parameters(qd as usize);
    }
    if let Some(v) = verdict {
        capture::set_decision(qd as usize, v.record_json(), v.denies());
        if v.denies() {
            policy::raise_denied(&v);
        }
    }
    true
}

/// The permission check PostgreSQL runs after its own ACL check passed (in the executor, and
/// outside it for RI checks and COPY): nobody but the custody writer may change the audit
/// log, and nobody but pg_custody's own statements the policy store, superusers included.
/// (The hook itself, whose arguments differ between versions, is `pgver::check_perms_hook`.)
/// A plain frame: an ERROR of the previous hook passes through.
///
/// # Safety
/// The arguments PostgreSQL passed to the hook.
pub unsafe fn check_perms(rtable: *mut pg_sys::List, perm_infos: crate::pgver::PermInfos, ereport: bool) -> bool {
    // SAFETY: PREV_CHECK_PERMS is written only in _PG_init, before any query, and read in
    // this single-threaded backend; `rtable` and `perm_infos` are the valid lists
    // PostgreSQL passed to the hook (our contract), forwarded unchanged.
    if !unsafe { crate::pgver::call_check_perms(PREV_CHECK_PERMS, rtable, perm_infos, ereport) } {
        return false;
    }
    // SAFETY: the same lists, read only.
    guarded(|| match unsafe { protect::range_table_violation(rtable, perm_infos) } {
        None => true,
        Some((t, action)) if ereport => protect::refuse(t, action),
        Some(_) => false,
    })
}

/// ExecutorStart_hook. A plain frame: pg_custody's parts run in `guarded`, and an ERROR of
/// ExecutorStart itself passes through untouched (see `hooks`).
///
/// # Safety
/// Called only by PostgreSQL, as ExecutorStart_hook.
unsafe extern "C-unwind" fn custody_executor_start(qd: *mut pg_sys::QueryDesc, eflags: i32) {
    // SAFETY: called as ExecutorStart_hook with the QueryDesc PostgreSQL passed: it and its
    // plannedstmt (always set by CreateQueryDesc) are valid, its source text NULL or
    // NUL-terminated.
    let own_statement = guarded(|| unsafe { own::in_writer() || own::is_own_text((*qd).sourceText) });
    if own_statement {
        // pg_custody's own statement: neither recorded nor gated; it may change the policy
        // store (the permission check recognises its range table).
        // SAFETY: as above.
        let (was_own, was_starting) =
            guarded(|| unsafe { (own::set_starting((*(*qd).plannedstmt).rtable), capture::begin_start()) });
        // SAFETY: PREV_START is written only in _PG_init; PostgreSQL's arguments, unchanged.
        unsafe { crate::pgver::call_executor_start(PREV_START, qd, eflags) };
        guarded(|| {
            capture::end_start(was_starting);
            own::set_starting(was_own);
        });
        return;
    }
    // SAFETY: as above.
    let was_starting = guarded(|| unsafe {
        open_record(qd, eflags);
        capture::begin_start()
    });
    // SAFETY: PREV_START is written only in _PG_init; PostgreSQL's arguments, unchanged.
    unsafe { crate::pgver::call_executor_start(PREV_START, qd, eflags) };
    // SAFETY: standard_ExecutorStart returned, so `estate` is set.
    guarded(|| unsafe {
        capture::end_start(was_starting);
        if eflags & pg_sys::EXEC_FLAG_EXPLAIN_ONLY as i32 == 0 {
            let pstmt = &*(*qd).plannedstmt;
            let catalogs = protect::catalog::modified_catalogs(pstmt.rtable, crate::pgver::plan_perm_infos(pstmt));
            if !catalogs.is_empty() {
                protect::catalog::watch(qd as usize, (*(*qd).estate).es_output_cid, catalogs);
            }
        }
    });
}

/// ExecutorRun (the hook itself, whose arguments differ between versions, is
/// `pgver::executor_run_hook`). A plain frame: an ERROR passes through.
///
/// # Safety
/// The arguments PostgreSQL passed to the hook.
pub unsafe fn run(qd: *mut pg_sys::QueryDesc, direction: pg_sys::ScanDirection::Type, count: u64, execute_once: bool) {
    // Statements run from inside this one (functions, triggers) are one level deeper.
    // On ERROR the decrement is skipped; the abort callbacks restore the depth.
    guarded(capture::depth_enter);
    // SAFETY: PREV_RUN is written only in _PG_init; the arguments are those PostgreSQL passed
    // to the hook (our contract), passed on unchanged.
    unsafe { crate::pgver::call_executor_run(PREV_RUN, qd, direction, count, execute_once) };
    // SAFETY: the QueryDesc ExecutorRun ran: its estate is set.
    guarded(|| unsafe {
        capture::depth_leave();
        // A portal fetched in chunks runs once per chunk (es_processed counts one run).
        capture::add_rows(qd as usize, (*(*qd).estate).es_processed as i64);
    });
}

/// ExecutorFinish_hook. A plain frame: an ERROR passes through.
///
/// # Safety
/// Called only by PostgreSQL, as ExecutorFinish_hook.
unsafe extern "C-unwind" fn custody_executor_finish(qd: *mut pg_sys::QueryDesc) {
    guarded(capture::depth_enter);
    // SAFETY: called as ExecutorFinish_hook: `qd` is PostgreSQL's QueryDesc, passed on
    // unchanged; PREV_FINISH is written only in _PG_init.
    unsafe { crate::pgver::call_executor_finish(PREV_FINISH, qd) };
    guarded(|| {
        capture::depth_leave();
        // Direct catalog DML ran: refuse it now if it changed rows it may not (the ERROR
        // undoes it before anything else sees it).
        protect::catalog::finished(qd as usize);
    });
}

/// ExecutorEnd_hook. A plain frame: an ERROR passes through.
///
/// # Safety
/// Called only by PostgreSQL, as ExecutorEnd_hook.
unsafe extern "C-unwind" fn custody_executor_end(qd: *mut pg_sys::QueryDesc) {
    // SAFETY: called as ExecutorEnd_hook with PostgreSQL's QueryDesc; its estate, when set,
    // is still alive until standard_ExecutorEnd below frees it.
    guarded(|| unsafe {
        let key = qd as usize;
        protect::catalog::forget(key);
        if capture::is_open(key) {
            // Rows counted run by run; a plan that never ran processed none.
            let es = (*qd).estate;
            capture::close(key, if es.is_null() { None } else { Some((*es).es_processed as i64) });
        }
    });
    // SAFETY: `qd` is PostgreSQL's QueryDesc, passed on unchanged; PREV_END is written only in
    // _PG_init.
    unsafe { crate::pgver::call_executor_end(PREV_END, qd) };
    guarded(|| capture::record_settings_change(None));
}
