//! Row policies written as SQL: native RESTRICTIVE row-security policies created, versioned
//! and audited by pg_custody in the table's own database, and the functions usable in their
//! expressions (custody.attribute, custody.current_subject, custody.check).

use pgrx::prelude::*;
use pgrx::{pg_sys, JsonB};
use sha2::{Digest as _, Sha256};

use crate::capture::{self, class::Class};

/// Superusers and members of custody_admin only; the refused call is recorded.
fn check_row_manager() {
    super::store::require_manager("row policies");
}

/// Runs DDL on the caller's behalf with the extension owner's rights (the caller was
/// checked: superuser or custody_admin); PostgreSQL's own errors still abort the call.
fn run(sql: &str) {
    super::with_owner_rights(|| Spi::run(sql)).unwrap_or_else(|e| error!("{e}"));
}

/// Refuses `sql` unless it parses as exactly one CREATE POLICY statement.
fn single_create_policy(sql: &str) {
    let c = std::ffi::CString::new(sql).unwrap_or_else(|_| {
        error!("row policy expressions cannot contain NUL characters")
    });
    // SAFETY: raw_parser only parses (a syntax error raises PostgreSQL's own ERROR).
    let ok = unsafe {
        let list = pg_sys::raw_parser(c.as_ptr(), pg_sys::RawParseMode::RAW_PARSE_DEFAULT);
        !list.is_null() && (*list).length == 1 && {
            let raw = pg_sys::list_nth(list, 0) as *mut pg_sys::RawStmt;
            !(*raw).stmt.is_null() && (*(*raw).stmt).type_ == pg_sys::NodeTag::T_CreatePolicyStmt
        }
    };
    if !ok {
        pgrx::pg_sys::panic::ErrorReport::new(
            PgSqlErrorCode::ERRCODE_SYNTAX_ERROR,
            "a row policy expression must be a single SQL expression",
            "pg_custody",
        )
        .set_detail("The expressions do not form exactly one CREATE POLICY statement.")
        .report(PgLogLevel::ERROR);
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
        pgrx::pg_sys::panic::ErrorReport::new(
            PgSqlErrorCode::ERRCODE_INVALID_PARAMETER_VALUE,
            format!("invalid command \"{command}\" for a row policy"),
            "pg_custody",
        )
        .set_hint("Use all, select, insert, update or delete.")
        .report(PgLogLevel::ERROR);
    }
    if using_expr.is_none() && check_expr.is_none() {
        pgrx::pg_sys::panic::ErrorReport::new(
            PgSqlErrorCode::ERRCODE_INVALID_PARAMETER_VALUE,
            "a row policy needs using_expr, check_expr or both",
            "pg_custody",
        )
        .report(PgLogLevel::ERROR);
    }
    let table = capture::internal(|| {
        Spi::get_one_with_args::<String>("SELECT $1::regclass::text", &[tbl.into()])
    })
    .unwrap_or_else(|e| error!("{e}"))
    .unwrap_or_default();
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
    // PostgreSQL's own errors (an invalid expression) abort the whole call: nothing remains.
    run(&sql);
    // Restrictive policies only narrow what permissive ones allow: without any permissive
    // policy every row would be hidden, so add one that allows all if the table has none.
    let has_permissive = capture::internal(|| {
        Spi::get_one_with_args::<bool>(
            "SELECT EXISTS (SELECT FROM pg_catalog.pg_policy WHERE polrelid = $1 AND polpermissive)",
            &[tbl.into()],
        )
    })
    .unwrap_or_else(|e| error!("{e}"))
    .unwrap_or(false);
    if !has_permissive {
        run(&format!(
            "CREATE POLICY custody_permit_all ON {table} AS PERMISSIVE FOR ALL TO PUBLIC USING (true) WITH CHECK (true)"
        ));
    }
    run(&format!("ALTER TABLE {table} ENABLE ROW LEVEL SECURITY"));
    run(&format!("ALTER TABLE {table} FORCE ROW LEVEL SECURITY"));
    let definition = format!("{cmd}|{}|{}", using_expr.unwrap_or(""), check_expr.unwrap_or(""));
    let sha = custody_chain::hex::encode(&Sha256::digest(definition.as_bytes()));
    let version = super::with_owner_rights(|| {
        Spi::get_one_with_args::<i32>(
            "INSERT INTO custody.row_policies AS p (name, table_name, command, using_expr, check_expr, version, sha256, updated_at, updated_by) \
             VALUES ($1, $2, $3, $4, $5, 1, decode($6, 'hex'), now(), session_user) \
             ON CONFLICT (name) DO UPDATE SET table_name = excluded.table_name, command = excluded.command, \
               using_expr = excluded.using_expr, check_expr = excluded.check_expr, version = p.version + 1, \
               sha256 = excluded.sha256, updated_at = now(), updated_by = session_user \
             RETURNING version",
            &[name.into(), table.as_str().into(), cmd.as_str().into(), using_expr.into(), check_expr.into(), sha.as_str().into()],
        )
    })
    .unwrap_or_else(|e| error!("{e}"))
    .unwrap_or(0);
    super::store::event(
        Class::Policy,
        "CREATE ROW POLICY",
        serde_json::json!({"kind": "row policy", "name": name, "table": table, "command": cmd,
                           "using": using_expr, "check": check_expr, "version": version, "sha256": sha}),
    );
}

/// Drops a row policy created by create_row_policy.
#[pg_extern(volatile, parallel_unsafe)]
fn drop_row_policy(name: &str) {
    check_row_manager();
    let table = super::store::first_row::<String, String>(
        "DELETE FROM custody.row_policies WHERE name = $1 RETURNING table_name, name",
        &[name.into()],
    );
    let Some((Some(table), _)) = table else {
        pgrx::pg_sys::panic::ErrorReport::new(
            PgSqlErrorCode::ERRCODE_UNDEFINED_OBJECT,
            format!("row policy \"{name}\" does not exist"),
            "pg_custody",
        )
        .set_hint("See custody.row_policies.")
        .report(PgLogLevel::ERROR);
        unreachable!()
    };
    run(&format!("DROP POLICY IF EXISTS {} ON {table}", pgrx::spi::quote_identifier(name)));
    super::store::event(Class::Policy, "DROP ROW POLICY", serde_json::json!({"kind": "row policy", "name": name, "table": table}));
}

/// The current user's attribute `key`, if valid at the statement's start.
#[pg_extern(stable, parallel_restricted)]
fn attribute(key: &str) -> Option<JsonB> {
    let gate = super::gate_for_functions()?;
    let who = capture::who();
    let attrs = gate.attributes_of(&who.current_user, super::statement_start_unix_us());
    attrs.get(key).cloned().map(JsonB)
}

/// {session_user, current_user, roles, attributes} as policies see them.
#[pg_extern(stable, parallel_restricted)]
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
#[pg_extern(stable, parallel_restricted)]
fn check(action: &str, resource: JsonbBytes) -> bool {
    let Some(gate) = super::gate_for_functions() else { return false };
    // SAFETY: plain read of the current user id.
    let user = unsafe { pg_sys::GetUserId() };
    let memo = super::row_memo();
    let key = &mut memo.key;
    key.clear();
    key.extend_from_slice(&u32::from(user).to_le_bytes());
    key.extend_from_slice(&(action.len() as u32).to_le_bytes());
    key.extend_from_slice(action.as_bytes());
    // SAFETY: the bytes of the detoasted argument, valid for this call.
    key.extend_from_slice(unsafe { resource.bytes() });
    if let Some(&allowed) = memo.decisions.get(key.as_slice()) {
        return allowed;
    }
    // SAFETY: the argument is a jsonb datum (the function's declared type).
    let value = unsafe { resource.to_json() };
    let subject = super::current_subject();
    match gate.row_allow(&subject, super::statement_start_unix_us(), action, &value) {
        Ok(allowed) => {
            let memo = super::row_memo();
            let key = memo.key.clone();
            memo.remember(key, allowed);
            allowed
        }
        Err(e) => {
            pgrx::pg_sys::panic::ErrorReport::new(
                PgSqlErrorCode::ERRCODE_INSUFFICIENT_PRIVILEGE,
                "custody.check could not evaluate data.custody.row_allow",
                "pg_custody",
            )
            .set_detail(e)
            .report(PgLogLevel::ERROR);
            false
        }
    }
}

/// A jsonb argument as it is stored (detoasted), not converted: `custody.check` only needs
/// its bytes unless they are new.
pub struct JsonbBytes {
    datum: pg_sys::Datum,
    varlena: *const pg_sys::varlena,
}

impl JsonbBytes {
    /// # Safety
    /// Only during the call that received the argument.
    unsafe fn bytes(&self) -> &[u8] {
        unsafe {
            std::slice::from_raw_parts(
                pgrx::varlena::vardata_any(self.varlena).cast::<u8>(),
                pgrx::varlena::varsize_any_exhdr(self.varlena),
            )
        }
    }

    /// # Safety
    /// Only during the call that received the argument, which must be a jsonb.
    unsafe fn to_json(&self) -> serde_json::Value {
        unsafe { JsonB::from_datum(self.datum, false) }.map_or(serde_json::Value::Null, |j| j.0)
    }
}

impl FromDatum for JsonbBytes {
    unsafe fn from_polymorphic_datum(datum: pg_sys::Datum, is_null: bool, _: pg_sys::Oid) -> Option<Self> {
        if is_null {
            return None;
        }
        // SAFETY: a non-null jsonb datum; detoasting a packed or short value returns it as is.
        let varlena = unsafe { pg_sys::pg_detoast_datum_packed(datum.cast_mut_ptr()) };
        Some(JsonbBytes { datum: pg_sys::Datum::from(varlena), varlena })
    }
}

// SAFETY: unboxed through FromDatum, like pgrx's own by-reference types; never null here
// (the function is strict).
unsafe impl<'fcx> pgrx::callconv::ArgAbi<'fcx> for JsonbBytes {
    unsafe fn unbox_arg_unchecked(arg: pgrx::callconv::Arg<'_, 'fcx>) -> Self {
        let index = arg.index();
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
