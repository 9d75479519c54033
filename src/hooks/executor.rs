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
    // Every statement passes the policy gate (but for break-glass calls); every refusal is
    // recorded. The objects are read from the catalog caches only when the record or the
    // gate needs them.
    // SAFETY: `pstmt` is the plan ExecutorStart was given, in a transaction.
    let glass = unsafe { break_glass(pstmt) };
    if glass {
        // Not an earlier plan's (one that failed without ExecutorEnd) at the same address.
        gated().retain(|e| e.key != qd as usize);
    } else {
        // A portal can run it in chunks, each decided again if anything moved meanwhile.
        gated_push(qd as usize, tag, class);
    }
    let pending = if glass { None } else { policy::prepare() };
    if pending.is_none() && violation.is_none() && !capture::wanted(class) {
        return false;
    }
    // SAFETY: the plan's range table and permission list, alive as long as the plan.
    let info = unsafe { objects::describe(pstmt.rtable, perm_infos) };
    let objects_json = info.json;
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
            crate::error::CustodyError::Denied { reasons: v.decision.reasons.clone() }.report();
        }
    }
    true
}

/// A statement's plan while it is open: a portal runs it once per chunk (extended-protocol
/// Execute with a row limit, as JDBC's fetch size does; FETCH from a cursor), and Bind (which
/// starts it) and Execute are separate messages. A run is decided again by the policies,
/// suspensions and attributes in force then whenever the decision may have changed since it
/// was taken (`policy::still_decided`) — whether or not the gate had anything to check when
/// the plan started.
struct Gated {
    key: usize,
    subid: pg_sys::SubTransactionId,
    tag: &'static str,
    class: Class,
    /// When the last decision was taken.
    decided: policy::DecidedAt,
}

/// The plans open (few: one per open portal or nesting level).
static mut GATED: Vec<Gated> = Vec::new();

#[allow(static_mut_refs)]
fn gated() -> &'static mut Vec<Gated> {
    // SAFETY: backend-local state of a single-threaded backend; callers hold no other
    // reference across calls that could reach here.
    unsafe { &mut GATED }
}

fn gated_push(key: usize, tag: &'static str, class: Class) {
    // SAFETY: a getter of the transaction state.
    let subid = unsafe { pg_sys::GetCurrentSubTransactionId() };
    let g = gated();
    g.retain(|e| e.key != key);
    g.push(Gated { key, subid, tag, class, decided: policy::decided_now() });
}

/// At an abort of subtransaction `subid` (None: of the transaction, or its end): the plans
/// started in it are gone (a failed portal's ExecutorEnd is never called).
pub fn gated_forget_aborted(subid: Option<pg_sys::SubTransactionId>) {
    match subid {
        None => gated().clear(),
        Some(s) => gated().retain(|e| e.subid < s),
    }
}

/// Before a run of an open plan: decided again when the last decision may no longer stand;
/// recorded when refused, and the denial raised instead of fetching more.
///
/// # Safety
/// `qd` is the QueryDesc ExecutorRun was given.
unsafe fn recheck(qd: *mut pg_sys::QueryDesc) {
    let key = qd as usize;
    let g = gated();
    if g.is_empty() {
        return;
    }
    let Some(i) = g.iter().position(|e| e.key == key) else { return };
    if policy::still_decided(g[i].decided) {
        return;
    }
    g[i].decided = policy::decided_now();
    let (tag, class) = (g[i].tag, g[i].class);
    policy::statement_starts();
    let Some(pending) = policy::prepare() else { return };
    // SAFETY: the QueryDesc's plan, its range table and source text are alive while it runs
    // (caller's contract); `cstr` maps a NULL text to "".
    let (objects_json, text) = unsafe {
        let pstmt = &*(*qd).plannedstmt;
        let perm_infos = crate::pgver::plan_perm_infos(pstmt);
        let info = objects::describe(pstmt.rtable, perm_infos);
        let source = objects::cstr((*qd).sourceText);
        (info.json, capture::statement_slice(&source, pstmt.stmt_location, pstmt.stmt_len).to_owned())
    };
    let verdict = pending.decide(tag, &objects_json);
    if !verdict.refuses() {
        return;
    }
    if !capture::is_open(key) {
        capture::open(key, class, tag, objects_json, Some(&text));
    }
    capture::set_decision(key, verdict.record_json(), verdict.denies());
    if verdict.denies() {
        crate::error::CustodyError::Denied { reasons: verdict.decision.reasons.clone() }.report();
    }
}

/// pg_custody's functions that manage what the gate decides by.
const MANAGEMENT: [&str; 9] = [
    "set_policy",
    "drop_policy",
    "enable_policy",
    "set_attribute",
    "clear_attribute",
    "suspend",
    "resume",
    "create_row_policy",
    "drop_row_policy",
];

/// Break-glass: the gate never denies a superuser's or a custody_admin member's call of
/// pg_custody's management functions or of `pg_reload_conf()`, so that no policy can lock
/// out who must fix it (the call is recorded as usual). The plan must read nothing: a
/// `SELECT` of such calls, with built-in functions that change nothing for their arguments.
///
/// # Safety
/// `pstmt` is the plan ExecutorStart was given, in a transaction.
unsafe fn break_glass(pstmt: &pg_sys::PlannedStmt) -> bool {
    // SAFETY: the plan's nodes and lists are valid (caller's contract); each cast follows the
    // node's tag; catalog lookups of functions that exist (they are in the plan).
    unsafe {
        let plan = pstmt.planTree;
        if pstmt.commandType != pg_sys::CmdType::CMD_SELECT
            || plan.is_null()
            || (*plan).type_ != pg_sys::NodeTag::T_Result
            || !(*plan).lefttree.is_null()
            || !(*plan).qual.is_null()
            || !(*(plan as *mut pg_sys::Result)).resconstantqual.is_null()
            || !pstmt.subplans.is_null()
        {
            // (A FROM-less SELECT's WHERE or HAVING is the Result's constant qual: code there
            // would run without a decision.)
            return false;
        }
        // A SELECT without FROM has one range table entry, an RTE_RESULT (the planner's
        // stand-in for the empty FROM list); anything else reads a relation or a function.
        for rte in protect::utility::list::<pg_sys::RangeTblEntry>(pstmt.rtable) {
            if (*rte).rtekind != pg_sys::RTEKind::RTE_RESULT {
                return false;
            }
        }
        let mut calls = BreakGlass { management: false, other: false };
        let ctx = (&mut calls as *mut BreakGlass).cast();
        for tle in protect::utility::list::<pg_sys::TargetEntry>((*plan).targetlist) {
            if break_glass_walker((*tle).expr.cast(), ctx) {
                return false;
            }
        }
        if calls.other || !calls.management {
            return false;
        }
        let admin = pg_sys::get_role_oid(c"custody_admin".as_ptr(), true);
        pg_sys::superuser() || (admin != pg_sys::InvalidOid && pg_sys::is_member_of_role(pg_sys::GetUserId(), admin))
    }
}

struct BreakGlass {
    management: bool,
    other: bool,
}

/// check_functions_in_node's callback: true (stop) for a function break-glass does not cover.
///
/// # Safety
/// Called by check_functions_in_node with the BreakGlass of `break_glass`.
#[pgrx::pg_guard]
unsafe extern "C-unwind" fn break_glass_call(func: pg_sys::Oid, ctx: *mut std::ffi::c_void) -> bool {
    // SAFETY: `ctx` is break_glass's BreakGlass; catalog lookups of a function in the plan.
    unsafe {
        let calls = &mut *(ctx as *mut BreakGlass);
        if u32::from(func) < pg_sys::FirstNormalObjectId {
            if u32::from(func) == pg_sys::F_PG_RELOAD_CONF {
                calls.management = true;
                return false;
            }
            // built-ins that change nothing, for the arguments
            return pg_sys::func_volatile(func) as u8 == pg_sys::PROVOLATILE_VOLATILE;
        }
        let name = objects::cstr(pg_sys::get_func_name(func));
        let custody = protect::ids().map(|i| i.nsp);
        if custody == Some(pg_sys::get_func_namespace(func)) && MANAGEMENT.contains(&name.as_str()) {
            calls.management = true;
            return false;
        }
        calls.other = true;
        true
    }
}

/// Walks a break-glass candidate's expressions: every node's functions are checked.
///
/// # Safety
/// Called by expression_tree_walker with the BreakGlass of `break_glass`.
#[pgrx::pg_guard]
unsafe extern "C-unwind" fn break_glass_walker(node: *mut pg_sys::Node, ctx: *mut std::ffi::c_void) -> bool {
    if node.is_null() {
        return false;
    }
    // SAFETY: `node` is a valid expression node of the plan, `ctx` break_glass's BreakGlass.
    unsafe {
        use pg_sys::NodeTag::*;
        // Only plain values and calls: no domain (its CHECK may call anyone's code), no
        // subquery; and only built-in types, so that no built-in calls a user's cast or
        // output function on the way (to_json of a user type does).
        let plain = matches!(
            (*node).type_,
            T_Const | T_Param | T_RelabelType | T_NamedArgExpr | T_FuncExpr | T_OpExpr | T_CoerceViaIO | T_ArrayExpr
        );
        if !plain
            || u32::from(pg_sys::exprType(node)) >= pg_sys::FirstNormalObjectId
            || pg_sys::check_functions_in_node(node, Some(break_glass_call), ctx)
        {
            return true;
        }
        crate::pgver::walk_expression(node, break_glass_walker, ctx)
    }
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
    // SAFETY: the QueryDesc ExecutorRun was given (our contract).
    guarded(|| unsafe { recheck(qd) });
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
        if !gated().is_empty() {
            gated().retain(|e| e.key != key);
        }
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
