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

/// The relation entries (RTE_RELATION) of a range table, in order.
///
/// # Safety
/// `rtable` must be a valid List of RangeTblEntry, or NIL, alive while the iterator is used.
pub unsafe fn range_table(rtable: *mut pg_sys::List) -> impl Iterator<Item = RelationEntry> {
    let n = if rtable.is_null() { 0 } else { unsafe { (*rtable).length } };
    (0..n).filter_map(move |i| {
        // SAFETY: i < length of a valid list of RangeTblEntry (caller's contract).
        let rte = unsafe { &*(pg_sys::list_nth(rtable, i) as *mut pg_sys::RangeTblEntry) };
        (rte.rtekind == pg_sys::RTEKind::RTE_RELATION).then(|| RelationEntry {
            relid: rte.relid,
            relkind: rte.relkind as u8,
            perms: rte.requiredPerms as u64,
            selected: rte.selectedCols,
            inserted: rte.insertedCols,
            updated: rte.updatedCols,
        })
    })
}

/// The start of libpq's `Port` (libpq/libpq-be.h), which pgrx does not bind: the fields
/// pg_custody reads to record a login, laid out as PostgreSQL 15 declares them.
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
    can_accept_connections: std::ffi::c_int,
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

extern "C-unwind" {
    // Not in pgrx's bindings for PostgreSQL 15 (nodes/nodeFuncs.h); renamed
    // expression_tree_walker_impl, behind a macro, from 16 on.
    fn expression_tree_walker(node: *mut pg_sys::Node, walker: Walker, context: *mut std::ffi::c_void) -> bool;
}

/// PostgreSQL's expression_tree_walker: calls `walker` on each direct child of `node`.
///
/// # Safety
/// `node` is a valid expression tree (or NULL); `walker` follows the walker protocol.
pub unsafe fn walk_expression(node: *mut pg_sys::Node, walker: Walker, context: *mut std::ffi::c_void) -> bool {
    // SAFETY: forwarded under the caller's contract; the boundary turns an ERROR raised in
    // the walk into a Rust panic here, as for every call pgrx makes into PostgreSQL.
    unsafe { pg_sys::ffi::pg_guard_ffi_boundary(|| expression_tree_walker(node, walker, context)) }
}
