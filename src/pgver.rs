//! Differences between PostgreSQL versions, in one place: everything else reads the server's
//! structures through these helpers.

use pgrx::pg_sys;

/// What pg_custody reads of one relation entry of a range table: the relation, the
/// privileges the statement needs on it, and the columns it reads and writes.
pub struct RelationEntry {
    pub relid: pg_sys::Oid,
    pub relkind: u8,
    /// ACL_* bits (`requiredPerms`).
    pub perms: u64,
    pub selected: *mut pg_sys::Bitmapset,
    pub inserted: *mut pg_sys::Bitmapset,
    pub updated: *mut pg_sys::Bitmapset,
}

/// The list a range table's entries take their permissions from: PostgreSQL 16 moved them
/// to `RTEPermissionInfo`s (`PlannedStmt.permInfos`, the permission hook's `rtePermInfos`);
/// NIL on 15, where each entry carries its own.
pub type PermInfos = *mut pg_sys::List;

/// A plan's permission list (see `PermInfos`).
///
/// # Safety
/// `pstmt` is a valid PlannedStmt.
pub unsafe fn plan_perm_infos(pstmt: &pg_sys::PlannedStmt) -> PermInfos {
    #[cfg(feature = "pg15")]
    {
        let _ = pstmt;
        std::ptr::null_mut()
    }
    #[cfg(not(feature = "pg15"))]
    {
        pstmt.permInfos
    }
}

/// A parsed query's permission list (see `PermInfos`).
///
/// # Safety
/// `query` is a valid Query.
pub unsafe fn query_perm_infos(query: &pg_sys::Query) -> PermInfos {
    #[cfg(feature = "pg15")]
    {
        let _ = query;
        std::ptr::null_mut()
    }
    #[cfg(not(feature = "pg15"))]
    {
        query.rteperminfos
    }
}

/// The relation entries (RTE_RELATION) of a range table, in order.
///
/// # Safety
/// `rtable` must be a valid List of RangeTblEntry, or NIL, and `perm_infos` its permission
/// list, both alive while the iterator is used.
pub unsafe fn range_table(rtable: *mut pg_sys::List, perm_infos: PermInfos) -> impl Iterator<Item = RelationEntry> {
    // SAFETY: `rtable` is not NIL here, so it is the valid List the caller promised.
    let n = if rtable.is_null() { 0 } else { unsafe { (*rtable).length } };
    (0..n).filter_map(move |i| {
        // SAFETY: i < length of a valid list of RangeTblEntry (caller's contract).
        let rte = unsafe { &*(pg_sys::list_nth(rtable, i) as *mut pg_sys::RangeTblEntry) };
        if rte.rtekind != pg_sys::RTEKind::RTE_RELATION {
            return None;
        }
        // SAFETY: the entry and its permission list belong together (caller's contract).
        let (perms, selected, inserted, updated) = unsafe { permissions(rte, perm_infos) };
        Some(RelationEntry { relid: rte.relid, relkind: rte.relkind as u8, perms, selected, inserted, updated })
    })
}

type Permissions = (u64, *mut pg_sys::Bitmapset, *mut pg_sys::Bitmapset, *mut pg_sys::Bitmapset);

/// The required privileges and column sets of one relation entry.
///
/// # Safety
/// `perm_infos` is NIL or the valid RTEPermissionInfo list of the statement `rte` belongs to.
#[cfg(feature = "pg15")]
unsafe fn permissions(rte: &pg_sys::RangeTblEntry, _perm_infos: PermInfos) -> Permissions {
    (rte.requiredPerms as u64, rte.selectedCols, rte.insertedCols, rte.updatedCols)
}

/// The required privileges and column sets of one relation entry.
///
/// # Safety
/// `perm_infos` is NIL or the valid RTEPermissionInfo list of the statement `rte` belongs to.
#[cfg(not(feature = "pg15"))]
unsafe fn permissions(rte: &pg_sys::RangeTblEntry, perm_infos: PermInfos) -> Permissions {
    let k = rte.perminfoindex as i32;
    // SAFETY: `perm_infos` is not NIL here, so it is the valid List the caller promised.
    if k == 0 || perm_infos.is_null() || k > unsafe { (*perm_infos).length } {
        return (0, std::ptr::null_mut(), std::ptr::null_mut(), std::ptr::null_mut());
    }
    // SAFETY: perminfoindex is 1-based into the statement's RTEPermissionInfo list and was
    // just checked to be within its length.
    let p = unsafe { &*(pg_sys::list_nth(perm_infos, k - 1) as *mut pg_sys::RTEPermissionInfo) };
    (p.requiredPerms as u64, p.selectedCols, p.insertedCols, p.updatedCols)
}

/// ExecutorCheckPerms_hook: PostgreSQL 16 added the permission list to its arguments. Both
/// forms call `crate::hooks::executor::check_perms`, a plain frame that guards its own parts
/// (`crate::hooks::guarded`) and lets an ERROR of the previous hook pass through.
///
/// # Safety
/// Called only by PostgreSQL, as ExecutorCheckPerms_hook.
#[cfg(feature = "pg15")]
pub unsafe extern "C-unwind" fn check_perms_hook(rtable: *mut pg_sys::List, ereport: bool) -> bool {
    // SAFETY: called as ExecutorCheckPerms_hook, so `rtable` is PostgreSQL's range table, as
    // check_perms requires; 15 has no permission list (NIL).
    unsafe { crate::hooks::executor::check_perms(rtable, std::ptr::null_mut(), ereport) }
}

/// ExecutorCheckPerms_hook, PostgreSQL 16 and later.
///
/// # Safety
/// Called only by PostgreSQL, as ExecutorCheckPerms_hook.
#[cfg(not(feature = "pg15"))]
pub unsafe extern "C-unwind" fn check_perms_hook(rtable: *mut pg_sys::List, perm_infos: PermInfos, ereport: bool) -> bool {
    // SAFETY: called as ExecutorCheckPerms_hook, so the range table and its permission list
    // are PostgreSQL's own, as check_perms requires.
    unsafe { crate::hooks::executor::check_perms(rtable, perm_infos, ereport) }
}

/// Calls a previous ExecutorCheckPerms_hook.
///
/// # Safety
/// The arguments PostgreSQL passed to the hook.
pub unsafe fn call_check_perms(
    prev: pg_sys::ExecutorCheckPerms_hook_type,
    rtable: *mut pg_sys::List,
    perm_infos: PermInfos,
    ereport: bool,
) -> bool {
    let Some(prev) = prev else { return true };
    #[cfg(feature = "pg15")]
    {
        let _ = perm_infos;
        // SAFETY: `prev` is the hook installed before ours, called with the arguments
        // PostgreSQL passed to our hook (caller's contract).
        unsafe { prev(rtable, ereport) }
    }
    // SAFETY: `prev` is the hook installed before ours, called with the arguments PostgreSQL
    // passed to our hook (caller's contract).
    #[cfg(not(feature = "pg15"))]
    unsafe {
        prev(rtable, perm_infos, ereport)
    }
}

/// ExecInsertIndexTuples (PostgreSQL 16 added `onlySummarizing`), for a plain insert.
///
/// # Safety
/// As ExecInsertIndexTuples.
pub unsafe fn insert_index_tuples(
    rri: *mut pg_sys::ResultRelInfo,
    slot: *mut pg_sys::TupleTableSlot,
    estate: *mut pg_sys::EState,
) -> *mut pg_sys::List {
    // SAFETY: the caller meets ExecInsertIndexTuples' contract (open result relation with
    // its indexes opened, a slot holding the just-inserted tuple, the executor state).
    unsafe {
        #[cfg(feature = "pg15")]
        {
            pg_sys::ExecInsertIndexTuples(rri, slot, estate, false, false, std::ptr::null_mut(), std::ptr::null_mut())
        }
        #[cfg(not(feature = "pg15"))]
        {
            pg_sys::ExecInsertIndexTuples(rri, slot, estate, false, false, std::ptr::null_mut(), std::ptr::null_mut(), false)
        }
    }
}

/// The start of libpq's `Port` (libpq/libpq-be.h), which pgrx does not bind: the fields
/// pg_custody reads to record a login, laid out as each version declares them.
#[repr(C)]
struct PortPrefix {
    sock: std::ffi::c_int,
    noblock: bool,
    proto: u32,
    laddr: pg_sys::SockAddr,
    raddr: pg_sys::SockAddr,
    remote_host: *mut std::ffi::c_char,
    remote_hostname: *mut std::ffi::c_char,
    remote_hostname_resolv: std::ffi::c_int,
    remote_hostname_errcode: std::ffi::c_int,
    remote_port: *mut std::ffi::c_char,
    // 15 and 16: CAC_state canAcceptConnections; 17: nothing; 18: char local_host[64].
    #[cfg(any(feature = "pg15", feature = "pg16"))]
    can_accept_connections: std::ffi::c_int,
    #[cfg(feature = "pg18")]
    local_host: [std::ffi::c_char; 64],
    database_name: *mut std::ffi::c_char,
    user_name: *mut std::ffi::c_char,
    cmdline_options: *mut std::ffi::c_char,
    guc_options: *mut pg_sys::List,
    application_name: *mut std::ffi::c_char,
}

/// Who a connection says it is, from its startup packet.
pub struct ClientPort<'a> {
    pub user_name: Option<&'a std::ffi::CStr>,
    pub database_name: Option<&'a std::ffi::CStr>,
    pub application_name: Option<&'a std::ffi::CStr>,
    pub raddr: &'a pg_sys::sockaddr_storage,
}

/// The connection's startup-packet facts, or None outside a client connection.
///
/// # Safety
/// `port` is NULL or MyProcPort.
pub unsafe fn client_port<'a>(port: *mut pg_sys::Port) -> Option<ClientPort<'a>> {
    if port.is_null() {
        return None;
    }
    // SAFETY: `port` points to a live Port whose leading fields are PortPrefix.
    unsafe {
        let p = &*(port as *const PortPrefix);
        let s = |c: *mut std::ffi::c_char| (!c.is_null()).then(|| std::ffi::CStr::from_ptr(c));
        Some(ClientPort {
            user_name: s(p.user_name),
            database_name: s(p.database_name),
            application_name: s(p.application_name),
            raddr: &p.raddr.addr,
        })
    }
}

/// A tree walker (PostgreSQL calls it with each node and the context). It must be
/// `#[pg_guard]`: an ERROR raised inside it has to cross the C frames as an ERROR.
pub type Walker = unsafe extern "C-unwind" fn(*mut pg_sys::Node, *mut std::ffi::c_void) -> bool;

#[cfg(feature = "pg15")]
extern "C-unwind" {
    // Not in pgrx's bindings for PostgreSQL 15 (nodes/nodeFuncs.h). From 16 on it is
    // expression_tree_walker_impl behind a macro, which pgrx binds.
    fn expression_tree_walker(node: *mut pg_sys::Node, walker: Walker, context: *mut std::ffi::c_void) -> bool;
}

/// PostgreSQL's expression_tree_walker: calls `walker` on each direct child of `node`.
///
/// # Safety
/// `node` is a valid expression tree (or NULL); `walker` follows the walker protocol.
pub unsafe fn walk_expression(node: *mut pg_sys::Node, walker: Walker, context: *mut std::ffi::c_void) -> bool {
    // SAFETY: forwarded under the caller's contract; the boundary turns an ERROR raised in
    // the walk into a Rust panic here, as for every call pgrx makes into PostgreSQL.
    unsafe {
        #[cfg(feature = "pg15")]
        {
            pg_sys::ffi::pg_guard_ffi_boundary(|| expression_tree_walker(node, walker, context))
        }
        #[cfg(not(feature = "pg15"))]
        {
            pg_sys::expression_tree_walker_impl(node, Some(walker), context)
        }
    }
}

/// Attribute `i` (0-based) of a tuple descriptor (PostgreSQL 18 replaced `attrs` by compact
/// attributes and a `TupleDescAttr` accessor).
///
/// # Safety
/// `desc` is a valid tuple descriptor and `i < natts`.
pub unsafe fn attr<'a>(desc: pg_sys::TupleDesc, i: usize) -> &'a pg_sys::FormData_pg_attribute {
    // SAFETY: `desc` is valid and `i < natts` (caller's contract), so attribute `i` lies
    // inside the descriptor's attribute array.
    unsafe {
        #[cfg(feature = "pg18")]
        {
            &*pg_sys::TupleDescAttr(desc, i as i32)
        }
        #[cfg(not(feature = "pg18"))]
        {
            &*(*desc).attrs.as_ptr().add(i)
        }
    }
}

/// index_beginscan without instrumentation (PostgreSQL 18 added it) or ORDER BY keys.
///
/// # Safety
/// As index_beginscan.
pub unsafe fn index_beginscan(
    heap: pg_sys::Relation,
    index: pg_sys::Relation,
    snapshot: pg_sys::Snapshot,
    nkeys: i32,
) -> pg_sys::IndexScanDesc {
    // SAFETY: the caller meets index_beginscan's contract (open heap and index relations, a
    // registered snapshot, `nkeys` keys to follow); no ORDER BY keys are passed.
    unsafe {
        #[cfg(feature = "pg18")]
        {
            pg_sys::index_beginscan(heap, index, snapshot, std::ptr::null_mut(), nkeys, 0)
        }
        #[cfg(not(feature = "pg18"))]
        {
            pg_sys::index_beginscan(heap, index, snapshot, nkeys, 0)
        }
    }
}

/// The relation's primary key index (PostgreSQL 18 asks whether a deferrable one will do:
/// pg_custody's is not deferrable, and one that is would not be its own).
///
/// # Safety
/// `rel` is an open relation.
pub unsafe fn primary_key_index(rel: pg_sys::Relation) -> pg_sys::Oid {
    // SAFETY: `rel` is an open relation (caller's contract), which is all
    // RelationGetPrimaryKeyIndex reads.
    unsafe {
        #[cfg(feature = "pg18")]
        {
            pg_sys::RelationGetPrimaryKeyIndex(rel, false)
        }
        #[cfg(not(feature = "pg18"))]
        {
            pg_sys::RelationGetPrimaryKeyIndex(rel)
        }
    }
}

/// ExecutorRun_hook: PostgreSQL 18 dropped `execute_once`. Both forms call
/// `crate::hooks::executor::run`, a plain frame that guards its own parts.
///
/// # Safety
/// Called only by PostgreSQL, as ExecutorRun_hook.
#[cfg(not(feature = "pg18"))]
pub unsafe extern "C-unwind" fn executor_run_hook(
    qd: *mut pg_sys::QueryDesc,
    direction: pg_sys::ScanDirection::Type,
    count: u64,
    execute_once: bool,
) {
    // SAFETY: called as ExecutorRun_hook, so these are PostgreSQL's own arguments, as run
    // requires.
    unsafe { crate::hooks::executor::run(qd, direction, count, execute_once) }
}

/// ExecutorRun_hook, PostgreSQL 18 and later.
///
/// # Safety
/// Called only by PostgreSQL, as ExecutorRun_hook.
#[cfg(feature = "pg18")]
pub unsafe extern "C-unwind" fn executor_run_hook(qd: *mut pg_sys::QueryDesc, direction: pg_sys::ScanDirection::Type, count: u64) {
    // SAFETY: called as ExecutorRun_hook, so these are PostgreSQL's own arguments, as run
    // requires; 18 always runs a plan to completion once.
    unsafe { crate::hooks::executor::run(qd, direction, count, true) }
}

/// PostgreSQL's standard executor and utility functions, declared here again so that they are
/// called without pgrx's FFI boundary. pgrx wraps every function it binds: an ERROR raised
/// inside is caught, copied into a Rust panic and raised again at the hook's edge — with its
/// message, detail and hint only, so the client would lose the error's position, context,
/// internal query, schema/table/column/datatype/constraint fields and any SQLSTATE pgrx does
/// not know. Called directly, the ERROR longjmps through the hook to PostgreSQL's own handler
/// exactly as it was raised. A hook that calls them must be a plain frame: nothing with a
/// destructor alive across the call (`crate::hooks::guarded` runs its own parts).
mod raw {
    use pgrx::pg_sys;
    extern "C-unwind" {
        pub fn standard_ExecutorStart(qd: *mut pg_sys::QueryDesc, eflags: std::ffi::c_int);
        pub fn standard_planner(
            parse: *mut pg_sys::Query,
            query_string: *const std::ffi::c_char,
            cursor_options: std::ffi::c_int,
            bound_params: pg_sys::ParamListInfo,
        ) -> *mut pg_sys::PlannedStmt;
        #[cfg(not(feature = "pg18"))]
        pub fn standard_ExecutorRun(qd: *mut pg_sys::QueryDesc, direction: pg_sys::ScanDirection::Type, count: u64, execute_once: bool);
        #[cfg(feature = "pg18")]
        pub fn standard_ExecutorRun(qd: *mut pg_sys::QueryDesc, direction: pg_sys::ScanDirection::Type, count: u64);
        pub fn standard_ExecutorFinish(qd: *mut pg_sys::QueryDesc);
        pub fn standard_ExecutorEnd(qd: *mut pg_sys::QueryDesc);
        #[allow(clippy::too_many_arguments)]
        pub fn standard_ProcessUtility(
            pstmt: *mut pg_sys::PlannedStmt,
            query_string: *const std::ffi::c_char,
            read_only_tree: bool,
            context: pg_sys::ProcessUtilityContext::Type,
            params: pg_sys::ParamListInfo,
            query_env: *mut pg_sys::QueryEnvironment,
            dest: *mut pg_sys::DestReceiver,
            qc: *mut pg_sys::QueryCompletion,
        );
    }
}

/// Calls the previous planner_hook, or standard_planner; an ERROR passes through.
///
/// # Safety
/// The arguments PostgreSQL passed to the hook; the caller is a plain frame (see `raw`).
#[inline(always)]
pub unsafe fn call_planner(
    prev: pg_sys::planner_hook_type,
    parse: *mut pg_sys::Query,
    query_string: *const std::ffi::c_char,
    cursor_options: i32,
    bound_params: pg_sys::ParamListInfo,
) -> *mut pg_sys::PlannedStmt {
    // SAFETY: `prev` is the hook installed before ours (standard_planner when none), called
    // with the arguments PostgreSQL passed to our hook (caller's contract).
    unsafe {
        match prev {
            Some(prev) => prev(parse, query_string, cursor_options, bound_params),
            None => raw::standard_planner(parse, query_string, cursor_options, bound_params),
        }
    }
}

/// Calls the previous ExecutorStart_hook, or standard_ExecutorStart; an ERROR passes through.
///
/// # Safety
/// The arguments PostgreSQL passed to the hook; the caller is a plain frame (see `raw`).
#[inline(always)]
pub unsafe fn call_executor_start(prev: pg_sys::ExecutorStart_hook_type, qd: *mut pg_sys::QueryDesc, eflags: i32) {
    // SAFETY: `prev` is the hook installed before ours (standard_ExecutorStart when none),
    // called with the arguments PostgreSQL passed to our hook (caller's contract).
    unsafe {
        match prev {
            Some(prev) => prev(qd, eflags),
            None => raw::standard_ExecutorStart(qd, eflags),
        }
    }
}

/// Calls the previous ExecutorRun_hook, or standard_ExecutorRun; an ERROR passes through.
///
/// # Safety
/// The arguments PostgreSQL passed to the hook; the caller is a plain frame (see `raw`).
#[inline(always)]
pub unsafe fn call_executor_run(
    prev: pg_sys::ExecutorRun_hook_type,
    qd: *mut pg_sys::QueryDesc,
    direction: pg_sys::ScanDirection::Type,
    count: u64,
    execute_once: bool,
) {
    // SAFETY: `prev` is the hook installed before ours (standard_ExecutorRun when none), called
    // with the QueryDesc and arguments PostgreSQL passed to our hook (caller's contract).
    unsafe {
        #[cfg(not(feature = "pg18"))]
        match prev {
            Some(prev) => prev(qd, direction, count, execute_once),
            None => raw::standard_ExecutorRun(qd, direction, count, execute_once),
        }
        #[cfg(feature = "pg18")]
        {
            let _ = execute_once;
            match prev {
                Some(prev) => prev(qd, direction, count),
                None => raw::standard_ExecutorRun(qd, direction, count),
            }
        }
    }
}

/// Calls the previous ExecutorFinish_hook, or standard_ExecutorFinish; an ERROR passes through.
///
/// # Safety
/// The QueryDesc PostgreSQL passed to the hook; the caller is a plain frame (see `raw`).
#[inline(always)]
pub unsafe fn call_executor_finish(prev: pg_sys::ExecutorFinish_hook_type, qd: *mut pg_sys::QueryDesc) {
    // SAFETY: `prev` is the hook installed before ours (the standard function when none),
    // called with the QueryDesc PostgreSQL passed to our hook (caller's contract).
    unsafe {
        match prev {
            Some(prev) => prev(qd),
            None => raw::standard_ExecutorFinish(qd),
        }
    }
}

/// Calls the previous ExecutorEnd_hook, or standard_ExecutorEnd; an ERROR passes through.
///
/// # Safety
/// The QueryDesc PostgreSQL passed to the hook; the caller is a plain frame (see `raw`).
#[inline(always)]
pub unsafe fn call_executor_end(prev: pg_sys::ExecutorEnd_hook_type, qd: *mut pg_sys::QueryDesc) {
    // SAFETY: `prev` is the hook installed before ours (the standard function when none),
    // called with the QueryDesc PostgreSQL passed to our hook (caller's contract).
    unsafe {
        match prev {
            Some(prev) => prev(qd),
            None => raw::standard_ExecutorEnd(qd),
        }
    }
}

/// Calls the previous ProcessUtility_hook, or standard_ProcessUtility; an ERROR passes through.
///
/// # Safety
/// The arguments PostgreSQL passed to the hook (`context` may be any value of its enum); the
/// caller is a plain frame (see `raw`).
#[allow(clippy::too_many_arguments)]
#[inline(always)]
pub unsafe fn call_process_utility(
    prev: pg_sys::ProcessUtility_hook_type,
    pstmt: *mut pg_sys::PlannedStmt,
    query_string: *const std::ffi::c_char,
    read_only_tree: bool,
    context: pg_sys::ProcessUtilityContext::Type,
    params: pg_sys::ParamListInfo,
    query_env: *mut pg_sys::QueryEnvironment,
    dest: *mut pg_sys::DestReceiver,
    qc: *mut pg_sys::QueryCompletion,
) {
    // SAFETY: `prev` is the hook installed before ours (the standard function when none),
    // called with the arguments PostgreSQL passed to our hook (caller's contract).
    unsafe {
        match prev {
            Some(prev) => prev(pstmt, query_string, read_only_tree, context, params, query_env, dest, qc),
            None => raw::standard_ProcessUtility(pstmt, query_string, read_only_tree, context, params, query_env, dest, qc),
        }
    }
}

/// pg_statistic_ext's OID (pgrx 0.18 binds it for 15 to 17 only).
pub const STATISTIC_EXT_RELATION: pg_sys::Oid = pg_sys::Oid::from_u32(3381);

/// Memory for a GUC check hook's `extra`, from the allocator PostgreSQL releases it with:
/// libc's on 15 (free()), the GUC memory context from 16 on (guc_free()).
///
/// # Safety
/// As malloc; NULL when out of memory.
pub unsafe fn guc_extra_alloc(size: usize) -> *mut std::ffi::c_void {
    #[cfg(feature = "pg15")]
    {
        extern "C" {
            fn malloc(size: usize) -> *mut std::ffi::c_void;
        }
        // SAFETY: malloc has no precondition; the caller handles NULL.
        unsafe { malloc(size) }
    }
    // SAFETY: guc_malloc at elevel LOG has no precondition beyond running in a backend or the
    // postmaster, where GUC check hooks run; it returns NULL instead of raising.
    #[cfg(not(feature = "pg15"))]
    unsafe {
        pg_sys::guc_malloc(pg_sys::LOG as i32, size)
    }
}

/// Whether a statement's `stmt_location` points at its first token (18: leading comments
/// are not part of it) rather than right after the previous statement's `;` (15 to 17).
pub const STMT_LOCATION_AT_FIRST_TOKEN: bool = cfg!(feature = "pg18");

/// pg_auth_members.roleid's attribute number: 16 gave the catalog an `oid` column first.
pub const AUTH_MEMBERS_ROLEID: i16 = if cfg!(feature = "pg15") { 1 } else { 2 };

/// A connection from this server to another through libpqwalreceiver (PostgreSQL's own libpq
/// wrapper, loaded on first use), able to run SQL: a logical replication connection
/// (`replication=database`) on 15 and 16, a plain one from 17 on. NULL and the error text
/// when it cannot connect.
///
/// # Safety
/// In a process connected to a database (MyDatabaseId is set), outside a critical section.
pub unsafe fn walrcv_connect(conninfo: &std::ffi::CStr, appname: &std::ffi::CStr) -> Result<*mut pg_sys::WalReceiverConn, String> {
    // SAFETY: load_file loads the library once (its _PG_init fills WalReceiverFunctions); the
    // function pointers are then PostgreSQL's, called with NUL-terminated strings that
    // outlive the call and an error out-pointer it fills on failure.
    unsafe {
        if pg_sys::WalReceiverFunctions.is_null() {
            pg_sys::load_file(c"libpqwalreceiver".as_ptr(), false);
        }
        let f = (*pg_sys::WalReceiverFunctions).walrcv_connect.ok_or("libpqwalreceiver has no walrcv_connect")?;
        let mut err: *mut std::ffi::c_char = std::ptr::null_mut();
        #[cfg(feature = "pg15")]
        let conn = f(conninfo.as_ptr(), true, appname.as_ptr(), &mut err);
        #[cfg(feature = "pg16")]
        let conn = f(conninfo.as_ptr(), true, false, appname.as_ptr(), &mut err);
        #[cfg(any(feature = "pg17", feature = "pg18"))]
        let conn = f(conninfo.as_ptr(), false, false, false, appname.as_ptr(), &mut err);
        if conn.is_null() {
            let why = if err.is_null() { "could not connect".to_string() } else { std::ffi::CStr::from_ptr(err).to_string_lossy().into_owned() };
            return Err(why);
        }
        Ok(conn)
    }
}

/// Runs `sql` (returning one text column) on a connection from `walrcv_connect`; its error
/// text when it failed.
///
/// # Safety
/// `conn` is a live connection from `walrcv_connect`; in a transaction (the result is
/// allocated in the current memory context).
pub unsafe fn walrcv_exec(conn: *mut pg_sys::WalReceiverConn, sql: &std::ffi::CStr) -> Result<(), String> {
    // SAFETY: PostgreSQL's function pointer, called on a live connection with a
    // NUL-terminated query; the result is read, then freed with walrcv_clear_result.
    unsafe {
        let f = (*pg_sys::WalReceiverFunctions).walrcv_exec.ok_or("libpqwalreceiver has no walrcv_exec")?;
        let types = [pg_sys::TEXTOID];
        let res = f(conn, sql.as_ptr(), 1, types.as_ptr());
        if res.is_null() {
            return Err("no result".into());
        }
        let out = match (*res).status {
            pg_sys::WalRcvExecStatus::WALRCV_OK_TUPLES | pg_sys::WalRcvExecStatus::WALRCV_OK_COMMAND => Ok(()),
            _ if (*res).err.is_null() => Err("the query failed".into()),
            _ => Err(std::ffi::CStr::from_ptr((*res).err).to_string_lossy().into_owned()),
        };
        pg_sys::walrcv_clear_result(res);
        out
    }
}

/// Closes a connection from `walrcv_connect`.
///
/// # Safety
/// `conn` is a live connection from `walrcv_connect`, not used afterwards.
pub unsafe fn walrcv_disconnect(conn: *mut pg_sys::WalReceiverConn) {
    // SAFETY: PostgreSQL's function pointer on a live connection (caller's contract).
    unsafe {
        if let Some(f) = (*pg_sys::WalReceiverFunctions).walrcv_disconnect {
            f(conn);
        }
    }
}
