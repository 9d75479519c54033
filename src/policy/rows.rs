//! Row policies written as SQL: native RESTRICTIVE row-security policies created, versioned
//! and audited by pg_custody in the table's own database, and the functions usable in their
//! expressions (custody.attribute, custody.current_subject, custody.check).

use pgrx::prelude::*;
use pgrx::{pg_sys, JsonB};
use sha2::{Digest as _, Sha256};

use crate::capture::{self, class::Class};
use crate::error::CustodyError;

/// Superusers and members of custody_admin only; the refused call is recorded.
fn check_row_manager() {
    super::store::require_manager("row policies");
    crate::protect::table::require_oid(crate::protect::Table::RowPolicies);
}

/// Runs DDL on the caller's behalf as one of pg_custody's own statements: search_path
/// pinned, and run as a subcommand, so no event trigger fires inside it. `elevated`: with the
/// extension owner's rights (the caller was checked: superuser or custody_admin, and what
/// the DDL parses was confined); otherwise with the caller's own. PostgreSQL's own errors
/// still abort the call, as they are; a `spi::Error` left is pgrx's own (SPI refusing a
/// statement it was given), a bug: XX000.
fn run_as(sql: &str, elevated: bool) {
    let q = std::ffi::CString::new(sql).unwrap_or_else(|_| CustodyError::NulCharacter { what: "row policy statements" }.report());
    let ddl = || Spi::connect_mut(|client| crate::own::update(client, &q, &[]).map(|_| ()));
    if elevated { crate::own::as_owner(ddl) } else { ddl() }.unwrap_or_else(|e| error!("{e}"));
}

/// `run_as` with the extension owner's rights, for DDL that parses no expression of the caller.
fn run(sql: &str) {
    run_as(sql, true);
}

/// `schema.table` of a relation, quoted, whatever the session's search_path.
fn qualified_name(relid: pg_sys::Oid) -> String {
    // SAFETY: syscache lookups; a missing relation (an OID passed to _create_row_policy
    // directly, not through the regclass cast) is refused before its namespace is read.
    unsafe {
        let rel = pg_sys::get_rel_name(relid);
        if rel.is_null() {
            CustodyError::NoSuchRelation { relid: u32::from(relid) }.report();
        }
        let nsp = pg_sys::get_namespace_name(pg_sys::get_rel_namespace(relid));
        capture::objects::cstr(pg_sys::quote_qualified_identifier(nsp, rel))
    }
}

/// Refuses `sql` unless it parses as exactly one CREATE POLICY statement.
fn single_create_policy(sql: &str) {
    let c = std::ffi::CString::new(sql).unwrap_or_else(|_| CustodyError::NulCharacter { what: "row policy expressions" }.report());
    // SAFETY: raw_parser only parses (a syntax error raises PostgreSQL's own ERROR).
    let ok = unsafe {
        let list = pg_sys::raw_parser(c.as_ptr(), pg_sys::RawParseMode::RAW_PARSE_DEFAULT);
        !list.is_null() && (*list).length == 1 && {
            let raw = pg_sys::list_nth(list, 0) as *mut pg_sys::RawStmt;
            !(*raw).stmt.is_null() && (*(*raw).stmt).type_ == pg_sys::NodeTag::T_CreatePolicyStmt
        }
    };
    if !ok {
        CustodyError::InvalidPolicy {
            message: "a row policy expression must be a single SQL expression".into(),
            detail: Some("The expressions do not form exactly one CREATE POLICY statement."),
            hint: None,
        }
        .report();
    }
}

/// Creates a RESTRICTIVE row-security policy on `tbl` and forces row security there.
/// (SQL: custody.create_row_policy(name, tbl regclass, ...) calls this with the OID.)
#[pg_extern(volatile, parallel_unsafe, name = "_create_row_policy")]
fn create_row_policy(
    name: &str,
    tbl: pg_sys::Oid,
    command: default!(&str, "'all'"),
    using_expr: default!(Option<&str>, "NULL"),
    check_expr: default!(Option<&str>, "NULL"),
) {
    check_row_manager();
    let cmd = command.trim().to_ascii_lowercase();
    if !["all", "select", "insert", "update", "delete"].contains(&cmd.as_str()) {
        CustodyError::InvalidArgument {
            message: format!("invalid command \"{command}\" for a row policy"),
            hint: Some("Use all, select, insert, update or delete."),
        }
        .report();
    }
    if using_expr.is_none() && check_expr.is_none() {
        CustodyError::InvalidArgument { message: "a row policy needs using_expr, check_expr or both".into(), hint: None }.report();
    }
    if crate::protect::utility::own_relation(tbl).is_some() {
        CustodyError::RowPolicyOnOwnTable.report();
    }
    let table = qualified_name(tbl);
    let mut sql = format!(
        "CREATE POLICY {} ON {table} AS RESTRICTIVE FOR {cmd} TO PUBLIC",
        pgrx::spi::quote_identifier(name)
    );
    if let Some(u) = using_expr {
        sql.push_str(&format!(" USING ({u})"));
    }
    if let Some(c) = check_expr {
        sql.push_str(&format!(" WITH CHECK ({c})"));
    }
    // The expressions are SQL text spliced into DDL that runs with the owner's rights: it
    // must parse as exactly one CREATE POLICY, or an expression like `true); DROP ...` would
    // smuggle in a second statement.
    single_create_policy(&sql);
    // Parsed as the caller first, and confined, before anything is parsed with the owner's
    // rights: parsing alone can run code (a literal of a composite type with a domain runs
    // the domain's CHECK).
    // A caller who may create the policy herself (a superuser, the table's owner) runs it with
    // her own rights, so that whatever parsing her expressions runs, runs as her; the others'
    // expressions are confined, and only then parsed with the owner's rights.
    let trusted = confine_expressions(tbl, &table, &[using_expr, check_expr]);
    // RLS already on with no permissive policy: the table shows nothing to those it applies
    // to, and a restrictive policy narrows nothing further — adding the permit-all policy
    // below would open it.
    // SAFETY: syscache lookup of the table (it exists: the regclass cast found it).
    let deny_by_default = unsafe { row_security_enabled(tbl) };
    // PostgreSQL's own errors (an invalid expression) abort the whole call: nothing remains.
    run_as(&sql, !trusted);
    // Restrictive policies only narrow what permissive ones allow: without any permissive
    // policy every row would be hidden, so add one that allows all if the table has none
    // (unless it was deny-by-default already).
    let has_permissive = Spi::connect(|client| {
        crate::own::select(
            client,
            c"SELECT EXISTS (SELECT FROM pg_catalog.pg_policy WHERE polrelid OPERATOR(pg_catalog.=) $1 AND polpermissive)",
            &[tbl.into()],
        )?
        .first()
        .get_one::<bool>()
    })
    // A spi::Error is pgrx's own (the catalog query is ours): a bug, XX000.
    .unwrap_or_else(|e| error!("{e}"))
    .unwrap_or(false);
    if !has_permissive && !deny_by_default {
        run(&format!(
            "CREATE POLICY custody_permit_all ON {table} AS PERMISSIVE FOR ALL TO PUBLIC USING (true) WITH CHECK (true)"
        ));
    }
    run(&format!("ALTER TABLE {table} ENABLE ROW LEVEL SECURITY"));
    run(&format!("ALTER TABLE {table} FORCE ROW LEVEL SECURITY"));
    let definition = format!("{cmd}|{}|{}", using_expr.unwrap_or(""), check_expr.unwrap_or(""));
    let sha = custody_chain::hex::encode(&Sha256::digest(definition.as_bytes()));
    let version = super::store::first_row::<i32, i32>(
        "INSERT INTO {row_policies} AS p (name, table_name, command, using_expr, check_expr, version, sha256, updated_at, updated_by) \
         VALUES ($1, $2, $3, $4, $5, 1, pg_catalog.decode($6, 'hex'), pg_catalog.now(), session_user) \
         ON CONFLICT (name) DO UPDATE SET table_name = excluded.table_name, command = excluded.command, \
           using_expr = excluded.using_expr, check_expr = excluded.check_expr, version = p.version OPERATOR(pg_catalog.+) 1, \
           sha256 = excluded.sha256, updated_at = pg_catalog.now(), updated_by = session_user \
         RETURNING version",
        &[name.into(), table.as_str().into(), cmd.as_str().into(), using_expr.into(), check_expr.into(), sha.as_str().into()],
    )
    .and_then(|(v, _)| v)
    .unwrap_or(0);
    super::store::event(
        Class::Policy,
        "CREATE ROW POLICY",
        serde_json::json!({"kind": "row policy", "name": name, "table": table, "command": cmd,
                           "using": using_expr, "check": check_expr, "version": version, "sha256": sha}),
    );
}

/// A row policy's expressions run with the rights of whoever reads the table. A custody_admin
/// member who neither is a superuser nor owns the table may therefore use only built-in
/// functions that do not change anything or run SQL, and pg_custody's row-policy functions
/// (custody.check, custody.attribute, custody.current_subject); no subqueries, no literals,
/// casts or domains of types that are not built in. The expressions are parsed as the caller
/// (search_path pinned, as CREATE POLICY will parse them), so whatever parsing runs, runs
/// with the caller's rights; a refusal aborts the whole call. Returns whether the caller is
/// trusted with any expression (a superuser, or she has the table owner's privileges): she
/// could create the policy herself.
fn confine_expressions(tbl: pg_sys::Oid, table: &str, exprs: &[Option<&str>]) -> bool {
    // SAFETY: plain reads of the current user and the table's owner.
    let trusted = unsafe { pg_sys::superuser() || pg_sys::has_privs_of_role(pg_sys::GetUserId(), table_owner(tbl)) };
    if trusted {
        return true;
    }
    let list: Vec<&str> = exprs.iter().flatten().copied().collect();
    let select = format!(
        "SELECT {} FROM ONLY {table}",
        list.iter().map(|e| format!("({e})")).collect::<Vec<_>>().join(", ")
    );
    let c = std::ffi::CString::new(select).unwrap_or_else(|_| CustodyError::NulCharacter { what: "row policy expressions" }.report());
    let own_schema = crate::protect::ids().map(|i| i.nsp).unwrap_or(pg_sys::InvalidOid);
    let offending = crate::own::pinned(|| {
        Spi::connect(|_client| {
            // SAFETY: SPI is connected; SPI_prepare parses and analyzes (as the current user),
            // plans nothing; the plan and its query trees live in SPI's memory until the
            // connection ends, after the walk.
            unsafe {
                let plan = pg_sys::SPI_prepare(c.as_ptr(), 0, std::ptr::null_mut());
                if plan.is_null() {
                    // Cannot happen: an expression that does not parse or analyze raises
                    // PostgreSQL's own ERROR inside SPI_prepare; NULL is SPI refusing its
                    // arguments (not connected, a NULL string), a bug: XX000.
                    error!("row policy expressions could not be parsed");
                }
                let mut ctx = Confine { own_schema, bad: None };
                for source in crate::protect::utility::list::<pg_sys::CachedPlanSource>(pg_sys::SPI_plan_get_plan_sources(plan)) {
                    for query in crate::protect::utility::list::<pg_sys::Query>((*source).query_list) {
                        for tle in crate::protect::utility::list::<pg_sys::TargetEntry>((*query).targetList) {
                            confine_walker((*tle).expr as *mut pg_sys::Node, (&mut ctx as *mut Confine).cast());
                        }
                    }
                }
                ctx.bad
            }
        })
    });
    if let Some(what) = offending {
        CustodyError::UnconfinedExpression { what }.report();
    }
    false
}

/// Whether row level security is enabled on the table.
///
/// # Safety
/// In a transaction.
unsafe fn row_security_enabled(tbl: pg_sys::Oid) -> bool {
    // SAFETY: a syscache lookup in a transaction (caller's contract); a non-NULL RELOID tuple
    // holds a FormData_pg_class, read before the tuple is released.
    unsafe {
        let tup = pg_sys::SearchSysCache1(pg_sys::SysCacheIdentifier::RELOID as i32, pg_sys::Datum::from(tbl));
        if tup.is_null() {
            return false;
        }
        let on = (*pg_sys::heap_tuple_get_struct::<pg_sys::FormData_pg_class>(tup)).relrowsecurity;
        pg_sys::ReleaseSysCache(tup);
        on
    }
}

/// Built-in functions that run SQL given as text (or read whole tables and views as the
/// caller): as harmless-looking as any STABLE function, and a way to run anything.
const RUNS_SQL: [&str; 16] = [
    "query_to_xml", "query_to_xmlschema", "query_to_xml_and_xmlschema",
    "cursor_to_xml", "cursor_to_xmlschema",
    "table_to_xml", "table_to_xmlschema", "table_to_xml_and_xmlschema",
    "schema_to_xml", "schema_to_xmlschema", "schema_to_xml_and_xmlschema",
    "database_to_xml", "database_to_xmlschema", "database_to_xml_and_xmlschema",
    "ts_stat", "ts_rewrite",
];

/// pg_custody's functions meant for row policies.
const ROW_FUNCTIONS: [&str; 4] = ["check", "_check_fields", "attribute", "current_subject"];

fn table_owner(tbl: pg_sys::Oid) -> pg_sys::Oid {
    // SAFETY: syscache lookup, released before returning.
    unsafe {
        let tup = pg_sys::SearchSysCache1(pg_sys::SysCacheIdentifier::RELOID as i32, pg_sys::Datum::from(tbl));
        if tup.is_null() {
            return pg_sys::InvalidOid;
        }
        let owner = (*pg_sys::heap_tuple_get_struct::<pg_sys::FormData_pg_class>(tup)).relowner;
        pg_sys::ReleaseSysCache(tup);
        owner
    }
}

struct Confine {
    own_schema: pg_sys::Oid,
    bad: Option<String>,
}

/// Whether a node's type is one a custody_admin member may put in a row policy: built in, or
/// the table's own columns' (a Var).
///
/// # Safety
/// `node` is a valid, non-NULL expression node.
unsafe fn foreign_type(node: *mut pg_sys::Node) -> bool {
    use pg_sys::NodeTag::*;
    // SAFETY: `node` is a valid node (caller's contract), cast only to the struct its tag names.
    unsafe {
        let t = match (*node).type_ {
            // A domain's CHECK runs code; a literal or coercion of a type that is not built
            // in runs its I/O functions (and a composite's domains).
            T_CoerceToDomain => return true,
            T_Const => (*(node as *mut pg_sys::Const)).consttype,
            T_CoerceViaIO => (*(node as *mut pg_sys::CoerceViaIO)).resulttype,
            T_RelabelType => (*(node as *mut pg_sys::RelabelType)).resulttype,
            T_ArrayCoerceExpr => (*(node as *mut pg_sys::ArrayCoerceExpr)).resulttype,
            T_ConvertRowtypeExpr => (*(node as *mut pg_sys::ConvertRowtypeExpr)).resulttype,
            T_RowExpr => (*(node as *mut pg_sys::RowExpr)).row_typeid,
            _ => return false,
        };
        u32::from(t) >= pg_sys::FirstNormalObjectId
    }
}

/// The expression walker of confine_expressions: stops at the first thing not allowed.
///
/// # Safety
/// Called only by expression_tree_walker, with `ctx` the Confine of confine_expressions.
#[pg_guard]
unsafe extern "C-unwind" fn confine_walker(node: *mut pg_sys::Node, ctx: *mut std::ffi::c_void) -> bool {
    if node.is_null() {
        return false;
    }
    // SAFETY: ctx is the Confine passed by confine_expressions; node a valid expression node.
    unsafe {
        let c = &mut *(ctx as *mut Confine);
        if (*node).type_ == pg_sys::NodeTag::T_SubLink {
            c.bad = Some("a subquery".into());
            return true;
        }
        if foreign_type(node) {
            c.bad = Some("a type or domain that is not built in".into());
            return true;
        }
        if pg_sys::check_functions_in_node(node, Some(not_allowed), ctx) {
            return true;
        }
        crate::pgver::walk_expression(node, confine_walker, ctx)
    }
}

/// check_functions_in_node's callback: whether function `func` may not be used.
///
/// # Safety
/// Called only by check_functions_in_node, with `ctx` the Confine of confine_expressions.
#[pg_guard]
unsafe extern "C-unwind" fn not_allowed(func: pg_sys::Oid, ctx: *mut std::ffi::c_void) -> bool {
    // SAFETY: ctx is the Confine passed by confine_expressions.
    let c = unsafe { &mut *(ctx as *mut Confine) };
    // SAFETY: syscache lookups of an existing function.
    let (name, allowed) = unsafe {
        let name = capture::objects::cstr(pg_sys::get_func_name(func));
        let allowed = if pg_sys::get_func_namespace(func) == c.own_schema {
            ROW_FUNCTIONS.contains(&name.as_str())
        } else {
            u32::from(func) < pg_sys::FirstNormalObjectId
                && pg_sys::func_volatile(func) as u8 != pg_sys::PROVOLATILE_VOLATILE
                && !RUNS_SQL.contains(&name.as_str())
        };
        (name, allowed)
    };
    if !allowed {
        c.bad = Some(format!("function {name}"));
    }
    !allowed
}

/// Drops a row policy created by create_row_policy.
#[pg_extern(volatile, parallel_unsafe)]
fn drop_row_policy(name: &str) {
    check_row_manager();
    let table = super::store::first_row::<String, String>(
        "DELETE FROM {row_policies} WHERE name OPERATOR(pg_catalog.=) $1 RETURNING table_name, name",
        &[name.into()],
    );
    let Some((Some(table), _)) = table else {
        CustodyError::UndefinedObject { message: format!("row policy \"{name}\" does not exist"), hint: "See custody.row_policies." }
            .report();
    };
    run(&format!("DROP POLICY IF EXISTS {} ON {table}", pgrx::spi::quote_identifier(name)));
    super::store::event(Class::Policy, "DROP ROW POLICY", serde_json::json!({"kind": "row policy", "name": name, "table": table}));
}

// The functions below are PARALLEL SAFE: in a parallel worker they read what the leader
// would — the policy set from shared memory, the user the worker runs as, the statement's
// start time (which workers share) — and record nothing (capture is off in workers).
// A row policy that calls them can then be evaluated by a Parallel Seq Scan, as a plain
// predicate is.

/// The current user's attribute `key`, if valid at the statement's start.
#[pg_extern(stable, parallel_safe)]
fn attribute(key: &str) -> Option<JsonB> {
    let gate = super::gate_for_functions()?;
    let who = capture::who();
    let attrs = gate.attributes_of(&who.current_user, super::statement_start_unix_us());
    attrs.get(key).cloned().map(JsonB)
}

/// {session_user, current_user, roles, attributes} as policies see them.
#[pg_extern(stable, parallel_safe)]
fn current_subject() -> JsonB {
    let s = super::current_subject();
    let attributes = super::gate_for_functions()
        .map(|g| g.attributes_of(&s.current_user, super::statement_start_unix_us()))
        .unwrap_or_else(|| serde_json::json!({}));
    JsonB(serde_json::json!({
        "session_user": s.session_user,
        "current_user": s.current_user,
        "roles": s.roles,
        "attributes": attributes,
    }))
}

/// Evaluates data.custody.row_allow for {subject, action, resource}; memoized within a
/// statement for identical inputs. False when no policy defines it.
///
/// The argument arrives as its stored jsonb bytes: within a statement the answer for the
/// same user, action and bytes is remembered, so a scan over many rows with few distinct
/// resources converts and evaluates each resource once. Converting the jsonb to JSON on
/// every row cost far more than the decision itself.
///
/// When the resource is written `jsonb_build_object('key', column, ...)`, the planner asks
/// `custody_check_support` and the call becomes `custody._check_fields(action, 'key',
/// column, ...)`, which does not build the jsonb at all (see there).
#[pg_extern(stable, parallel_safe)]
fn check(action: &str, resource: JsonbBytes) -> bool {
    let Some(gate) = super::gate_for_functions() else { return false };
    let memo = super::row_memo();
    let key = &mut memo.key;
    start_row_key(key, MemoKind::Jsonb, action);
    // SAFETY: the bytes of the detoasted argument, valid for this call.
    key.extend_from_slice(unsafe { resource.bytes() });
    if let Some(&allowed) = memo.decisions.get(key.as_slice()) {
        return allowed;
    }
    // SAFETY: the argument is a jsonb datum (the function's declared type).
    let value = unsafe { resource.to_json() };
    decide_row(gate, action, &value)
}

/// The first byte of a row memo key: the two ways a resource arrives (stored jsonb bytes,
/// or jsonb_build_object's fields) must never share a key.
#[derive(Clone, Copy)]
enum MemoKind {
    Jsonb = 0,
    Fields = 1,
}

/// kind, current user, action: the part of a row memo key before the resource.
fn start_row_key(key: &mut Vec<u8>, kind: MemoKind, action: &str) {
    // SAFETY: plain read of the current user id.
    let user = unsafe { pg_sys::GetUserId() };
    key.clear();
    key.push(kind as u8);
    key.extend_from_slice(&u32::from(user).to_le_bytes());
    key.extend_from_slice(&(action.len() as u32).to_le_bytes());
    key.extend_from_slice(action.as_bytes());
}

/// A memo miss: evaluates row_allow and remembers the answer under the key just built.
fn decide_row(gate: &mut custody_policy::Gate, action: &str, resource: &serde_json::Value) -> bool {
    let subject = super::current_subject();
    match gate.row_allow(&subject, super::statement_start_unix_us(), action, resource) {
        Ok(allowed) => {
            let memo = super::row_memo();
            let key = memo.key.clone();
            memo.remember(key, allowed);
            allowed
        }
        Err(e) => CustodyError::RowCheckFailed { error: e.to_string() }.report(),
    }
}

/// Value types `custody._check_fields` reads directly, each turned into JSON exactly as
/// `jsonb_build_object` turns it (numbers, booleans, strings); any other type leaves the
/// call as written.
const FIELD_TYPES: [pg_sys::Oid; 6] = [
    pg_sys::INT2OID,
    pg_sys::INT4OID,
    pg_sys::INT8OID,
    pg_sys::BOOLOID,
    pg_sys::TEXTOID,
    pg_sys::VARCHAROID,
];

#[unsafe(no_mangle)]
#[doc(hidden)]
pub extern "C" fn pg_finfo_custody_check_support() -> &'static pg_sys::Pg_finfo_record {
    const V1: pg_sys::Pg_finfo_record = pg_sys::Pg_finfo_record { api_version: 1 };
    &V1
}

/// Planner support for `custody.check` (SQL: `custody._check_support(internal)`).
///
/// A row policy passes its resource as `jsonb_build_object('tenant', tenant, ...)`. Built
/// per row, that jsonb costs more than everything else the policy does. On
/// SupportRequestSimplify, a call whose resource is `jsonb_build_object` with distinct
/// constant text keys and values of the types in FIELD_TYPES becomes
/// `custody._check_fields(action, 'tenant', tenant, ...)`: the same arguments, without the
/// jsonb. Anything else is left as written.
///
/// # Safety
/// Called only by PostgreSQL through fmgr, as custody.check's support function.
#[pg_guard]
#[unsafe(no_mangle)]
pub unsafe extern "C-unwind" fn custody_check_support(fcinfo: pg_sys::FunctionCallInfo) -> pg_sys::Datum {
    // SAFETY: the planner calls support functions with one internal argument, a request
    // node; only SupportRequestSimplify is read, and only nodes whose tags were checked.
    unsafe {
        let req = pgrx::fcinfo::pg_getarg_datum_raw(fcinfo, 0).cast_mut_ptr::<pg_sys::Node>();
        if !pgrx::is_a(req, pg_sys::NodeTag::T_SupportRequestSimplify) {
            return pg_sys::Datum::from(0);
        }
        let call = (*req.cast::<pg_sys::SupportRequestSimplify>()).fcall;
        match check_fields_call(call) {
            Some(simpler) => pg_sys::Datum::from(simpler),
            None => pg_sys::Datum::from(0),
        }
    }
}

/// `custody._check_fields(action, k1, v1, ...)` for `custody.check(action,
/// jsonb_build_object(k1, v1, ...))`, or None.
///
/// # Safety
/// `call` is the planner's FuncExpr of custody.check.
unsafe fn check_fields_call(call: *mut pg_sys::FuncExpr) -> Option<*mut pg_sys::FuncExpr> {
    // SAFETY: `call` is a valid FuncExpr (caller's contract) whose args are a List of
    // expression nodes; each node is cast only after its tag was checked; a key Const is read
    // only when it is not NULL and of a KEY_TYPES type, which is what key_bytes reads; the new
    // FuncExpr and list are palloc'd in the planner's current memory context.
    unsafe {
        let args = pgrx::PgList::<pg_sys::Node>::from_pg((*call).args);
        let resource = args.get_ptr(1)?;
        if args.len() != 2 || !pgrx::is_a(resource, pg_sys::NodeTag::T_FuncExpr) {
            return None;
        }
        let build = resource.cast::<pg_sys::FuncExpr>();
        if (*build).funcid != pg_sys::Oid::from(pg_sys::F_JSONB_BUILD_OBJECT_ANY) || (*build).funcvariadic {
            return None;
        }
        let pairs = pgrx::PgList::<pg_sys::Node>::from_pg((*build).args);
        if pairs.is_empty() || !pairs.len().is_multiple_of(2) {
            return None;
        }
        let mut keys: Vec<&[u8]> = Vec::with_capacity(pairs.len() / 2);
        for i in (0..pairs.len()).step_by(2) {
            let key = pairs.get_ptr(i)?;
            if !pgrx::is_a(key, pg_sys::NodeTag::T_Const) {
                return None;
            }
            let key = key.cast::<pg_sys::Const>();
            // A quoted literal stays of type unknown (a C string): jsonb_build_object
            // takes "any" and converts it to text itself.
            if !KEY_TYPES.contains(&(*key).consttype) || (*key).constisnull {
                return None;
            }
            let bytes = key_bytes((*key).consttype, (*key).constvalue);
            if keys.contains(&bytes) {
                return None; // duplicate keys: jsonb keeps the last; not worth following
            }
            keys.push(bytes);
            if !FIELD_TYPES.contains(&pg_sys::exprType(pairs.get_ptr(i + 1)?)) {
                return None;
            }
        }
        let target = check_fields_oid()?;
        let mut new_args = pgrx::PgList::<pg_sys::Node>::new();
        new_args.push(args.get_ptr(0)?);
        for i in 0..pairs.len() {
            new_args.push(pairs.get_ptr(i)?);
        }
        Some(pg_sys::makeFuncExpr(
            target,
            pg_sys::BOOLOID,
            new_args.into_pg(),
            pg_sys::InvalidOid,
            (*call).inputcollid,
            pg_sys::CoercionForm::COERCE_EXPLICIT_CALL,
        ))
    }
}

/// Types of jsonb_build_object's keys that custody._check_fields reads.
const KEY_TYPES: [pg_sys::Oid; 2] = [pg_sys::TEXTOID, pg_sys::UNKNOWNOID];

/// The bytes of a key: text, or the C string of an unknown-type literal.
///
/// # Safety
/// `datum` is a non-null datum of type `oid`: unknown, or a varlena type (text, varchar), valid
/// for the returned lifetime.
unsafe fn key_bytes<'a>(oid: pg_sys::Oid, datum: pg_sys::Datum) -> &'a [u8] {
    // SAFETY: an unknown-type datum is a pointer to a NUL-terminated C string; any other is a
    // varlena (caller's contract).
    unsafe {
        if oid == pg_sys::UNKNOWNOID {
            std::ffi::CStr::from_ptr(datum.cast_mut_ptr::<std::ffi::c_char>()).to_bytes()
        } else {
            crate::varlena::bytes(datum)
        }
    }
}

/// OID of custody._check_fields(text, VARIADIC "any"), if it exists.
fn check_fields_oid() -> Option<pg_sys::Oid> {
    let mut names = pgrx::PgList::<pg_sys::String>::new();
    for part in [c"custody", c"_check_fields"] {
        // SAFETY: makeString keeps the palloc'd copy made by pstrdup.
        names.push(unsafe { pg_sys::makeString(pg_sys::pstrdup(part.as_ptr())) });
    }
    let types = [pg_sys::TEXTOID, pg_sys::ANYOID];
    // SAFETY: a qualified name list and two argument types; missing_ok.
    let oid = unsafe { pg_sys::LookupFuncName(names.into_pg(), 2, types.as_ptr(), true) };
    (oid != pg_sys::InvalidOid).then_some(oid)
}

#[unsafe(no_mangle)]
#[doc(hidden)]
pub extern "C" fn pg_finfo_custody_check_fields() -> &'static pg_sys::Pg_finfo_record {
    const V1: pg_sys::Pg_finfo_record = pg_sys::Pg_finfo_record { api_version: 1 };
    &V1
}

/// `custody._check_fields(action text, VARIADIC "any")`: custody.check with the resource
/// given as key/value pairs, `jsonb_build_object`'s arguments, instead of the jsonb it
/// would build. The memo key is made of the keys and the values' own bytes; only on a miss
/// is the resource built, as JSON, the way jsonb_build_object builds it.
///
/// # Safety
/// Called only by PostgreSQL through fmgr, as custody._check_fields(text, VARIADIC "any").
#[pg_guard]
#[unsafe(no_mangle)]
pub unsafe extern "C-unwind" fn custody_check_fields(fcinfo: pg_sys::FunctionCallInfo) -> pg_sys::Datum {
    // SAFETY: the arguments are read within their count, with the types the call site gives
    // them (get_fn_expr_argtype), which are checked before a value is read.
    unsafe {
        let nargs = (*fcinfo).nargs as usize;
        if pgrx::fcinfo::pg_arg_is_null(fcinfo, 0) {
            return pgrx::fcinfo::pg_return_null(fcinfo);
        }
        if nargs < 3 || !(nargs - 1).is_multiple_of(2) {
            CustodyError::InvalidArgument {
                message: "custody._check_fields takes an action and key/value pairs".into(),
                hint: None,
            }
            .report();
        }
        let action = std::str::from_utf8(crate::varlena::bytes(pgrx::fcinfo::pg_getarg_datum_raw(fcinfo, 0)))
            .unwrap_or_else(|_| CustodyError::NotUtf8 { what: "the action" }.report());
        let Some(gate) = super::gate_for_functions() else {
            return pg_sys::Datum::from(false);
        };
        let flinfo = (*fcinfo).flinfo;
        let types = arg_types(flinfo, nargs);
        let memo = super::row_memo();
        let key = &mut memo.key;
        start_row_key(key, MemoKind::Fields, action);
        for (i, &oid) in types.iter().enumerate().skip(1) {
            key.extend_from_slice(&u32::from(oid).to_le_bytes());
            if pgrx::fcinfo::pg_arg_is_null(fcinfo, i) {
                key.push(0);
                continue;
            }
            key.push(1);
            let datum = pgrx::fcinfo::pg_getarg_datum_raw(fcinfo, i);
            match oid {
                pg_sys::INT2OID | pg_sys::INT4OID | pg_sys::INT8OID | pg_sys::BOOLOID => {
                    key.extend_from_slice(&field_int(oid, datum).to_le_bytes());
                }
                _ => {
                    let bytes = key_bytes(oid, datum);
                    key.extend_from_slice(&(bytes.len() as u32).to_le_bytes());
                    key.extend_from_slice(bytes);
                }
            }
        }
        if let Some(&allowed) = memo.decisions.get(key.as_slice()) {
            return pg_sys::Datum::from(allowed);
        }
        let mut resource = serde_json::Map::new();
        for i in (1..nargs).step_by(2) {
            if pgrx::fcinfo::pg_arg_is_null(fcinfo, i) {
                // jsonb_build_object's own error (its argument i is ours i + 1)
                CustodyError::InvalidArgument { message: format!("argument {i}: key must not be null"), hint: None }.report();
            }
            let name = std::str::from_utf8(key_bytes(types[i], pgrx::fcinfo::pg_getarg_datum_raw(fcinfo, i)))
                .unwrap_or_else(|_| CustodyError::NotUtf8 { what: "a resource key" }.report())
                .to_string();
            let value = if pgrx::fcinfo::pg_arg_is_null(fcinfo, i + 1) {
                serde_json::Value::Null
            } else {
                let datum = pgrx::fcinfo::pg_getarg_datum_raw(fcinfo, i + 1);
                match types[i + 1] {
                    pg_sys::BOOLOID => serde_json::Value::Bool(datum.value() != 0),
                    pg_sys::TEXTOID | pg_sys::VARCHAROID => serde_json::Value::String(
                        std::str::from_utf8(crate::varlena::bytes(datum))
                            .unwrap_or_else(|_| CustodyError::NotUtf8 { what: "a resource value" }.report())
                            .to_string(),
                    ),
                    oid => serde_json::Value::from(field_int(oid, datum)),
                }
            };
            // Later keys win, as in jsonb_build_object.
            resource.insert(name, value);
        }
        pg_sys::Datum::from(decide_row(gate, action, &serde_json::Value::Object(resource)))
    }
}

/// The argument types of a `custody._check_fields` call site, checked and kept in
/// `fn_extra` (in the call's own memory context) on its first row.
///
/// # Safety
/// `flinfo` is the call's FmgrInfo and `nargs` its argument count.
unsafe fn arg_types<'a>(flinfo: *mut pg_sys::FmgrInfo, nargs: usize) -> &'a [pg_sys::Oid] {
    // SAFETY: `flinfo` is the call's FmgrInfo (caller's contract). fn_extra is NULL until
    // filled here with `nargs` OIDs allocated in fn_mcxt, which lives as long as the FmgrInfo,
    // so the slice read back has exactly the length written; format_type_be returns a palloc'd
    // C string.
    unsafe {
        if (*flinfo).fn_extra.is_null() {
            let types = pg_sys::MemoryContextAlloc((*flinfo).fn_mcxt, nargs * size_of::<pg_sys::Oid>())
                .cast::<pg_sys::Oid>();
            for i in 0..nargs {
                let oid = pg_sys::get_fn_expr_argtype(flinfo, i as i32);
                let is_key = i % 2 == 1;
                let readable = match i {
                    0 => oid == pg_sys::TEXTOID,
                    _ if is_key => KEY_TYPES.contains(&oid),
                    _ => FIELD_TYPES.contains(&oid),
                };
                if !readable {
                    CustodyError::InvalidArgument {
                        message: format!(
                            "custody._check_fields: argument {} is of type {}, which it does not read",
                            i + 1,
                            std::ffi::CStr::from_ptr(pg_sys::format_type_be(oid)).to_string_lossy()
                        ),
                        hint: None,
                    }
                    .report();
                }
                types.add(i).write(oid);
            }
            (*flinfo).fn_extra = types.cast();
        }
        std::slice::from_raw_parts((*flinfo).fn_extra.cast::<pg_sys::Oid>(), nargs)
    }
}

/// An int2/int4/int8/bool datum as i64.
fn field_int(oid: pg_sys::Oid, datum: pg_sys::Datum) -> i64 {
    match oid {
        pg_sys::INT2OID => i64::from(datum.value() as i16),
        pg_sys::INT4OID => i64::from(datum.value() as i32),
        pg_sys::BOOLOID => i64::from(datum.value() != 0),
        _ => datum.value() as i64,
    }
}

/// A jsonb argument as it is stored, not converted: `custody.check` only needs its bytes
/// unless they are new.
pub struct JsonbBytes {
    datum: pg_sys::Datum,
}

impl JsonbBytes {
    /// # Safety
    /// Only during the call that received the argument.
    unsafe fn bytes(&self) -> &[u8] {
        // SAFETY: during the call (caller's contract) the datum is the non-NULL varlena
        // argument it was unboxed from.
        unsafe { crate::varlena::bytes(self.datum) }
    }

    /// # Safety
    /// Only during the call that received the argument, which must be a jsonb.
    unsafe fn to_json(&self) -> serde_json::Value {
        // SAFETY: during the call the datum is the non-NULL jsonb argument (caller's contract).
        unsafe { JsonB::from_datum(self.datum, false) }.map_or(serde_json::Value::Null, |j| j.0)
    }
}

impl FromDatum for JsonbBytes {
    unsafe fn from_polymorphic_datum(datum: pg_sys::Datum, is_null: bool, _: pg_sys::Oid) -> Option<Self> {
        (!is_null).then_some(JsonbBytes { datum })
    }
}

// SAFETY: unboxed through FromDatum, like pgrx's own by-reference types; never null here
// (the function is strict).
unsafe impl<'fcx> pgrx::callconv::ArgAbi<'fcx> for JsonbBytes {
    unsafe fn unbox_arg_unchecked(arg: pgrx::callconv::Arg<'_, 'fcx>) -> Self {
        let index = arg.index();
        // SAFETY: pgrx calls this with the argument of a jsonb parameter, which FromDatum above
        // reads by its datum alone.
        unsafe { arg.unbox_arg_using_from_datum() }.unwrap_or_else(|| panic!("argument {index} must not be null"))
    }
}

// SAFETY: the SQL type is jsonb, whose datums FromDatum above reads.
unsafe impl pgrx::pgrx_sql_entity_graph::metadata::SqlTranslatable for JsonbBytes {
    const TYPE_IDENT: &'static str = pgrx::pgrx_resolved_type!(JsonbBytes);
    const TYPE_ORIGIN: pgrx::pgrx_sql_entity_graph::metadata::TypeOrigin =
        pgrx::pgrx_sql_entity_graph::metadata::TypeOrigin::External;
    const ARGUMENT_SQL: Result<
        pgrx::pgrx_sql_entity_graph::metadata::SqlMappingRef,
        pgrx::pgrx_sql_entity_graph::metadata::ArgumentError,
    > = Ok(pgrx::pgrx_sql_entity_graph::metadata::SqlMappingRef::literal("jsonb"));
    const RETURN_SQL: Result<
        pgrx::pgrx_sql_entity_graph::metadata::ReturnsRef,
        pgrx::pgrx_sql_entity_graph::metadata::ReturnsError,
    > = Ok(pgrx::pgrx_sql_entity_graph::metadata::ReturnsRef::One(
        pgrx::pgrx_sql_entity_graph::metadata::SqlMappingRef::literal("jsonb"),
    ));
}
