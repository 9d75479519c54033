//! The utility hook: DDL, GRANT, COPY, SET, VACUUM, transaction control... Classifies the
//! statement as pgAudit does, opens its record, refuses changes to the audit log, and always
//! records changes to `custody.*` settings.

use std::ffi::CStr;

use pgrx::pg_sys;

use super::guarded;
use crate::capture::{self, class::Class, objects};
use crate::{own, policy, protect};

static mut PREV_UTILITY: pg_sys::ProcessUtility_hook_type = None;

pub fn init() {
    // SAFETY: _PG_init; the previous hook is saved and chained to.
    unsafe {
        PREV_UTILITY = pg_sys::ProcessUtility_hook;
        pg_sys::ProcessUtility_hook = Some(custody_process_utility);
    }
}

/// Whether a SET-like statement names a custody setting (or resets all of them).
///
/// # Safety
/// `set` is NULL or a valid VariableSetStmt.
unsafe fn touches_custody_setting(set: *mut pg_sys::VariableSetStmt) -> bool {
    if set.is_null() {
        return false;
    }
    // SAFETY: not NULL, so the valid VariableSetStmt the caller promised.
    let s = unsafe { &*set };
    if s.name.is_null() {
        return s.kind == pg_sys::VariableSetKind::VAR_RESET_ALL;
    }
    // SAFETY: a parse node's name is a NUL-terminated palloc'd string (checked non-NULL).
    let name = unsafe { CStr::from_ptr(s.name) }.to_bytes();
    name.len() > 8 && name[..8].eq_ignore_ascii_case(b"custody.")
}

/// `role` or `session_authorization`, spelled in any case (GUC names are case-insensitive:
/// `SET "Role" TO bob` is SET ROLE).
fn is_identity_setting(name: &[u8]) -> bool {
    name.eq_ignore_ascii_case(b"role") || name.eq_ignore_ascii_case(b"session_authorization")
}

/// The settings an administrator may always change with ALTER SYSTEM (break-glass): the ones
/// that lift a broken policy. Not `RESET ALL`, not the others (a command setting followed by a
/// reload would run a shell command no policy decided).
///
/// # Safety
/// `set` is NULL or a valid VariableSetStmt.
unsafe fn is_break_glass_setting(set: *mut pg_sys::VariableSetStmt) -> bool {
    if set.is_null() {
        return false;
    }
    // SAFETY: not NULL, so the valid VariableSetStmt the caller promised.
    let s = unsafe { &*set };
    if s.name.is_null() || s.kind == pg_sys::VariableSetKind::VAR_RESET_ALL {
        return false;
    }
    // SAFETY: a parse node's name is a NUL-terminated palloc'd string (checked non-NULL).
    let name = unsafe { CStr::from_ptr(s.name) }.to_bytes();
    name.eq_ignore_ascii_case(b"custody.enforce") || name.eq_ignore_ascii_case(b"custody.exempt_roles")
}

/// The class of a utility statement, and whether it must be recorded whatever
/// `custody.audit` says (it changes a custody setting).
///
/// # Safety
/// `node` is a valid, non-NULL utility statement node, in a transaction.
unsafe fn classify(node: *mut pg_sys::Node) -> (Class, bool) {
    use pg_sys::NodeTag::*;
    // SAFETY: `node` is a valid parse node (caller's contract); each cast follows its tag,
    // and the `setstmt` of the ALTER ... SET statements is NULL or a VariableSetStmt, which
    // touches_custody_setting accepts; GetCommandLogLevel takes any utility node.
    unsafe {
        match (*node).type_ {
            T_VariableSetStmt => {
                let s = node as *mut pg_sys::VariableSetStmt;
                let name = if (*s).name.is_null() { &b""[..] } else { CStr::from_ptr((*s).name).to_bytes() };
                let class = if is_identity_setting(name) {
                    Class::Misc
                } else {
                    Class::MiscSet
                };
                (class, touches_custody_setting(s))
            }
            T_AlterSystemStmt => {
                let s = (*(node as *mut pg_sys::AlterSystemStmt)).setstmt;
                if touches_custody_setting(s) { (Class::System, true) } else { (Class::Misc, false) }
            }
            T_AlterRoleSetStmt => {
                let s = (*(node as *mut pg_sys::AlterRoleSetStmt)).setstmt;
                if touches_custody_setting(s) { (Class::System, true) } else { (Class::Role, false) }
            }
            T_AlterDatabaseSetStmt => {
                let s = (*(node as *mut pg_sys::AlterDatabaseSetStmt)).setstmt;
                if touches_custody_setting(s) { (Class::System, true) } else { (Class::Ddl, false) }
            }
            T_CopyStmt => {
                if (*(node as *mut pg_sys::CopyStmt)).is_from { (Class::Write, false) } else { (Class::Read, false) }
            }
            T_TruncateStmt => (Class::Write, false),
            T_GrantStmt | T_GrantRoleStmt | T_CreateRoleStmt | T_AlterRoleStmt | T_DropRoleStmt
            | T_AlterDefaultPrivilegesStmt | T_ReassignOwnedStmt => (Class::Role, false),
            T_CallStmt | T_DoStmt => (Class::Function, false),
            T_ExplainStmt => (Class::Misc, false),
            _ => match pg_sys::GetCommandLogLevel(node) {
                pg_sys::LogStmtLevel::LOGSTMT_DDL => (Class::Ddl, false),
                pg_sys::LogStmtLevel::LOGSTMT_MOD => (Class::Write, false),
                _ => (Class::Misc, false),
            },
        }
    }
}

/// Statements that are never gated (they are recorded as usual):
/// - transaction control: denying ROLLBACK protects nothing;
/// - session housekeeping: `SET`/`RESET` of settings, `RESET ALL`, `DISCARD`: they read and
///   change no data, and a connection pooler sends them on connections it switches between
///   clients (pgbouncer closes a server connection whose `SET application_name` fails, so a
///   denied pooled role would lose its connection instead of getting a 42501 on its query);
///   `SET ROLE` and `SET SESSION AUTHORIZATION` stay gated, giving a role up (`RESET ROLE`)
///   does not, so a session that assumed a suspended role can return to its own identity;
/// - break-glass: `ALTER SYSTEM` of a `custody.*` setting (superusers only), so that a broken
///   policy never locks out the administrator who must fix it.
///
/// # Safety
/// `node` is a valid, non-NULL utility statement node.
unsafe fn gate_exempt(node: *mut pg_sys::Node) -> bool {
    use pg_sys::NodeTag::*;
    // SAFETY: `node` is a valid parse node (caller's contract), cast after its tag; the name
    // is NULL (checked) or a NUL-terminated string.
    unsafe {
        match (*node).type_ {
            T_TransactionStmt | T_DiscardStmt => true,
            T_VariableSetStmt => {
                let s = &*(node as *mut pg_sys::VariableSetStmt);
                let name = if s.name.is_null() { &b""[..] } else { CStr::from_ptr(s.name).to_bytes() };
                !is_identity_setting(name) || s.kind == pg_sys::VariableSetKind::VAR_RESET
            }
            T_AlterSystemStmt => is_break_glass_setting((*(node as *mut pg_sys::AlterSystemStmt)).setstmt),
            _ => false,
        }
    }
}

/// Objects named by the few utility statements whose target is a relation being read or
/// written (COPY, TRUNCATE). DDL names its object in the statement text.
///
/// # Safety
/// `node` is a valid, non-NULL utility statement node, in a transaction.
unsafe fn utility_objects(node: *mut pg_sys::Node) -> String {
    use pg_sys::NodeTag::*;
    let mut out = Vec::new();
    // SAFETY: `node` is a valid parse node (caller's contract), cast after its tag. COPY's
    // relation is NULL for COPY (query), which from_range_var accepts; TRUNCATE's relations
    // are a List of RangeVar, indexed below its length; we are in a transaction.
    unsafe {
        match (*node).type_ {
            T_CopyStmt => {
                let s = &*(node as *mut pg_sys::CopyStmt);
                let priv_ = if s.is_from { "INSERT" } else { "SELECT" };
                out.extend(objects::from_range_var(s.relation, priv_));
            }
            T_TruncateStmt => {
                let s = &*(node as *mut pg_sys::TruncateStmt);
                let n = if s.relations.is_null() { 0 } else { (*s.relations).length };
                for i in 0..n {
                    let rv = pg_sys::list_nth(s.relations, i) as *mut pg_sys::RangeVar;
                    out.extend(objects::from_range_var(rv, "TRUNCATE"));
                }
            }
            _ => {}
        }
    }
    objects::to_json(&out)
}

/// What the hook does with a utility statement, decided (gated, refused) before it runs.
#[derive(Clone, Copy)]
enum Run {
    /// pg_custody's own DDL, run in this context (a subcommand: no event trigger fires):
    /// not recorded here.
    Own(pg_sys::ProcessUtilityContext::Type),
    /// As the client (or a function) runs it, one statement level deeper; `key` is its open
    /// record (0: not recorded); `extension`: CREATE/ALTER EXTENSION (its script runs there);
    /// `recheck`: a COPY FROM the gate let through, decided again when its rows are in.
    Recorded { key: usize, context: pg_sys::ProcessUtilityContext::Type, extension: bool, recheck: bool },
}

/// What a COPY FROM was decided by when it started, to decide it again once it has read its
/// rows (see `after`). Kept in backend state, not in the hook's frame, which an ERROR may
/// skip (see `hooks`).
struct Recheck {
    /// The statement level it runs at (capture::depth before it ran).
    depth: i32,
    class: Class,
}

/// The COPY FROMs running, innermost last (a COPY in a function called by a COPY's default).
static mut RECHECKS: Vec<Recheck> = Vec::new();

#[allow(static_mut_refs)]
fn rechecks() -> &'static mut Vec<Recheck> {
    // SAFETY: backend-local state of a single-threaded backend, borrowed briefly.
    unsafe { &mut RECHECKS }
}

/// A top-level abort: no COPY is running.
pub fn forget_rechecks() {
    rechecks().clear();
}

/// ProcessUtility_hook. A plain frame: pg_custody's parts run in `guarded`, and an ERROR of
/// the statement itself passes through untouched (see `hooks`).
///
/// # Safety
/// Called only by PostgreSQL, as ProcessUtility_hook.
#[allow(clippy::too_many_arguments)]
unsafe extern "C-unwind" fn custody_process_utility(
    pstmt: *mut pg_sys::PlannedStmt,
    query_string: *const std::ffi::c_char,
    read_only_tree: bool,
    context: pg_sys::ProcessUtilityContext::Type,
    params: pg_sys::ParamListInfo,
    query_env: *mut pg_sys::QueryEnvironment,
    dest: *mut pg_sys::DestReceiver,
    qc: *mut pg_sys::QueryCompletion,
) {
    // SAFETY: called as ProcessUtility_hook: `pstmt` is the valid utility statement PostgreSQL
    // is about to run, `query_string` its NUL-terminated text (ProcessUtility requires it).
    let run = guarded(|| unsafe { before(pstmt, query_string, context) });
    match run {
        Run::Own(own_context) => {
            // SAFETY: PREV_UTILITY is written only in _PG_init; PostgreSQL's arguments are
            // passed on unchanged but for `context`, which may be any value of the enum.
            unsafe {
                crate::pgver::call_process_utility(
                    PREV_UTILITY, pstmt, query_string, read_only_tree, own_context, params, query_env, dest, qc,
                )
            }
        }
        Run::Recorded { key, context, extension, recheck } => {
            let was_extension = guarded(|| {
                capture::depth_enter();
                extension.then(|| protect::set_extension_depth(Some(capture::depth())))
            });
            // SAFETY: as above.
            unsafe {
                crate::pgver::call_process_utility(
                    PREV_UTILITY, pstmt, query_string, read_only_tree, context, params, query_env, dest, qc,
                )
            };
            // SAFETY: `pstmt` is the caller's and still valid after the statement ran; `qc`
            // is NULL or the caller's QueryCompletion.
            guarded(|| unsafe {
                capture::depth_leave();
                if let Some(was) = was_extension {
                    protect::set_extension_depth(was);
                }
                after(pstmt, key, qc, recheck);
            });
        }
    }
}

/// The hook's part before the statement runs.
///
/// # Safety
/// The arguments PostgreSQL passed to ProcessUtility_hook, in a transaction.
unsafe fn before(
    pstmt: *mut pg_sys::PlannedStmt,
    query_string: *const std::ffi::c_char,
    context: pg_sys::ProcessUtilityContext::Type,
) -> Run {
    // SAFETY: `pstmt` is the valid utility statement PostgreSQL is about to run (its
    // utilityStmt checked for NULL), `query_string` its NUL-terminated text (our contract).
    unsafe {
        // pg_custody's own DDL (row policies) and its extension scripts: not recorded here,
        // and run as subcommands, which fire no event triggers — nothing but pg_custody's own
        // code runs inside them.
        if own::in_writer() || own::is_own_text(query_string) || protect::in_own_script() {
            let own_context = if context == pg_sys::ProcessUtilityContext::PROCESS_UTILITY_TOPLEVEL {
                context
            } else {
                pg_sys::ProcessUtilityContext::PROCESS_UTILITY_SUBCOMMAND
            };
            let scripted = protect::in_own_script() && !own::is_own_text(query_string) && !own::in_writer();
            if scripted {
                // The script's statements are recorded like any nested statement.
                return opened(pstmt, query_string, own_context);
            }
            // pg_custody's own DDL is checked like anyone's (it never targets its own tables).
            let node = (*pstmt).utilityStmt;
            if !node.is_null() {
                if let Some(refusal) = protect::utility::violation(node) {
                    refusal.report();
                }
            }
            return Run::Own(own_context);
        }
        opened(pstmt, query_string, context)
    }
}

/// A utility statement as the client (or a function) runs it: recorded, gated, protected.
///
/// # Safety
/// The arguments are those PostgreSQL passed to ProcessUtility_hook, in a transaction.
unsafe fn opened(
    pstmt: *mut pg_sys::PlannedStmt,
    query_string: *const std::ffi::c_char,
    context: pg_sys::ProcessUtilityContext::Type,
) -> Run {
    let mut key = 0usize;
    let mut recheck = false;
    // SAFETY: `pstmt` is the valid utility statement PostgreSQL is about to run and
    // `query_string` its NUL-terminated text (our contract); `node` is used only after a NULL
    // check.
    unsafe {
        let node = (*pstmt).utilityStmt;
        // Protection holds whether or not anything is being recorded.
        let violation = if node.is_null() { None } else { protect::utility::violation(node) };
        let mut verdict = None;
        // Functions that ran while the client's statement was parsed: its record stands for
        // them (or theirs is kept when it has none).
        let planned = capture::planned_for(query_string);
        policy::statement_starts();
        if capture::active() && !node.is_null() {
            let (class, forced) = classify(node);
            // Utility statements pass the same gate (DDL, GRANT, COPY, SET ROLE, ...).
            let pending = if gate_exempt(node) { None } else { policy::prepare() };
            let record = forced || violation.is_some() || capture::wanted(class);
            if pending.is_some() || record {
                let tag = objects::cstr(pg_sys::GetCommandTagName(pg_sys::CreateCommandTag(node)));
                let objects_json = utility_objects(node);
                verdict = pending.map(|p| p.decide(&tag, &objects_json));
                // A refusal is always recorded; an allowed statement as custody.audit says.
                if record || verdict.as_ref().is_some_and(|v| v.refuses()) {
                    if planned {
                        capture::settle_planned(true);
                    }
                    key = capture::utility_token();
                    let source = objects::cstr(query_string);
                    let text =
                        capture::statement_slice(&source, (*pstmt).stmt_location, (*pstmt).stmt_len);
                    capture::open(key, class, &tag, objects_json, Some(text));
                }
            }
        }
        if capture::active() && !node.is_null() && is_copy_from(node) && !verdict.as_ref().is_some_and(|v| v.denies()) {
            // Decided again once its rows are in, whether or not anything was in force when
            // it started (a first suspension may come while it reads).
            rechecks().push(Recheck { depth: capture::depth(), class: classify(node).0 });
            recheck = true;
        }
        if planned && key == 0 {
            capture::settle_planned(false);
        }
        if let Some(refusal) = violation {
            refusal.report();
        }
        if let Some(v) = verdict {
            if key != 0 {
                capture::set_decision(key, v.record_json(), v.denies());
            }
            if v.denies() {
                crate::error::CustodyError::Denied { reasons: v.decision.reasons.clone() }.report();
            }
        }
        let extension = !node.is_null()
            && matches!((*node).type_, pg_sys::NodeTag::T_CreateExtensionStmt | pg_sys::NodeTag::T_AlterExtensionStmt);
        Run::Recorded { key, context, extension, recheck }
    }
}

/// Whether `node` is a COPY ... FROM.
///
/// # Safety
/// `node` is a valid utility statement node.
unsafe fn is_copy_from(node: *mut pg_sys::Node) -> bool {
    // SAFETY: the cast follows the node's tag.
    unsafe { (*node).type_ == pg_sys::NodeTag::T_CopyStmt && (*(node as *mut pg_sys::CopyStmt)).is_from }
}

/// The hook's part once the statement ran.
///
/// # Safety
/// `pstmt` is the statement that ran; `qc` NULL or its QueryCompletion.
unsafe fn after(pstmt: *mut pg_sys::PlannedStmt, key: usize, qc: *mut pg_sys::QueryCompletion, recheck: bool) {
    // SAFETY: `pstmt` and `qc` as the caller's contract says; `qc` is checked for NULL.
    unsafe {
        // Entries of deeper COPYs an ERROR ended in a subtransaction are stale.
        let depth = capture::depth();
        rechecks().retain(|r| r.depth <= depth);
        let mine = recheck && rechecks().last().is_some_and(|r| r.depth == depth);
        if let Some(r) = mine.then(|| rechecks().pop()).flatten() {
            // A COPY FROM STDIN stays open as long as the client sends rows: decided again by
            // what is in force now, so that a suspension, a revoked attribute or a new policy
            // meanwhile keeps its rows from being committed (the denial aborts them).
            // PostgreSQL calls no hook while COPY reads, so this is at its end.
            policy::statement_starts();
            let node = (*pstmt).utilityStmt;
            if let Some(pending) = policy::prepare() {
                let tag = objects::cstr(pg_sys::GetCommandTagName(pg_sys::CreateCommandTag(node)));
                let objects_json = utility_objects(node);
                let verdict = pending.decide(&tag, &objects_json);
                if verdict.refuses() {
                    let key = if key != 0 {
                        key
                    } else {
                        let k = capture::utility_token();
                        capture::open(k, r.class, &tag, objects_json, None);
                        k
                    };
                    capture::set_decision(key, verdict.record_json(), verdict.denies());
                    if verdict.denies() {
                        crate::error::CustodyError::Denied { reasons: verdict.decision.reasons.clone() }.report();
                    }
                }
            }
        }
        let node = (*pstmt).utilityStmt;
        if !node.is_null()
            && matches!((*node).type_, pg_sys::NodeTag::T_CreateSubscriptionStmt | pg_sys::NodeTag::T_AlterSubscriptionStmt)
        {
            // Which tables a subscription fills is known once it has run.
            protect::refuse_subscription_into_protected();
        }
        if key != 0 {
            let rows = if qc.is_null() || (*qc).nprocessed == 0 { None } else { Some((*qc).nprocessed as i64) };
            capture::close(key, rows);
        }
        if !(*pstmt).utilityStmt.is_null() && (*(*pstmt).utilityStmt).type_ == pg_sys::NodeTag::T_GrantRoleStmt {
            capture::forget_role_names();
        }
    }
    capture::record_settings_change(None);
}
