//! One error type for everything a user can cause, each mapped to a real SQLSTATE with a
//! message and a DETAIL/HINT that says what to do. (pgrx's `error!` and panics surface as
//! XX000: fine for bugs, wrong for a user's mistake.) Every error a user can cause — a bad
//! argument, a missing object, a refused statement, a table in a state pg_custody does not
//! write to — is raised as one of these; `error!` remains only for what cannot happen (each
//! such site says why).

use pgrx::pg_sys::panic::ErrorReport;
use pgrx::{PgLogLevel, PgSqlErrorCode};

#[derive(Debug)]
pub enum CustodyError {
    /// The library was loaded some other way than shared_preload_libraries.
    NotPreloaded,
    /// A record could not be queued within custody.failure_timeout (on_failure = block).
    QueueUnavailable { timeout_ms: i64 },
    /// The writer did not store this transaction's records in time (durability = commit).
    NotDurable { timeout_ms: i64 },
    /// A forbidden operation on a protected relation. `evidence`: the audit log, its
    /// checkpoints or keys (append-only); otherwise the policy store.
    Protected { relation: String, action: String, evidence: bool },
    /// DROP of the extension or its tables while custody.allow_drop is off.
    DropRefused { object: String },
    /// A statement that would change what one of pg_custody's objects is (its schema, its
    /// definition, what inherits from it, who may write it), refused while loaded.
    Redefinition { message: String, hint: Option<String> },
    /// A statement that would hold a lock the custody writer waits for (it would turn every
    /// writing COMMIT in the cluster into a failure after custody.failure_timeout).
    WouldBlockWriter { statement: String, relation: String, hint: String },
    /// Direct DML on a system catalog that changed rows describing built-in objects or
    /// pg_custody's objects.
    CatalogRow { catalog: String, what: String },
    /// One of pg_custody's tables is not as pg_custody created it (changed while the library
    /// was not loaded); nothing is written to it.
    NotAsCreated { relation: String, what: String },
    /// verify_audit_chain(from_seq, ...) with from_seq past the end of the log.
    PastTheLog { from_seq: i64, last_seq: i64 },
    /// custody.standby_records called by a role that is neither superuser nor custody_standby.
    NotAStandby,
    /// custody.standby_records where no writer appends (a standby, or no chain here).
    NotStoringHere,
    /// An argument of one of pg_custody's functions that it cannot take (22023).
    InvalidArgument { message: String, hint: Option<&'static str> },
    /// An argument of custody.check that is not valid UTF-8 (`what`: which).
    NotUtf8 { what: &'static str },
    /// Text spliced into a statement that holds a NUL character (PostgreSQL's text never
    /// does; refused all the same).
    NulCharacter { what: &'static str },
    /// A policy (a Rego module) or row policy expression that does not parse as one.
    InvalidPolicy { message: String, detail: Option<&'static str>, hint: Option<&'static str> },
    /// A policy, role, attribute, suspension or row policy named by a management call that
    /// is not there.
    UndefinedObject { message: String, hint: &'static str },
    /// A relation passed by OID that does not exist.
    NoSuchRelation { relid: u32 },
    /// A management call by a role that is neither superuser nor a member of custody_admin.
    NotManager { what: String },
    /// A change of the policy store outside custody.database.
    PolicyDatabase { database: String },
    /// One of pg_custody's tables is not in this database (it lives in custody.database).
    NotInThisDatabase { table: String },
    /// A change of the policy store under a REPEATABLE READ or SERIALIZABLE snapshot.
    ReadCommittedOnly,
    /// PREPARE TRANSACTION of a transaction that changed the policy store.
    CannotPrepare,
    /// The policy store no longer fits in the shared memory reserved for it.
    StoreTooLarge { limit: usize },
    /// A statement denied by the policies in force (`reasons`: why; none: nothing allowed it).
    Denied { reasons: Vec<String> },
    /// create_row_policy on one of pg_custody's own tables.
    RowPolicyOnOwnTable,
    /// A row policy expression of a custody_admin member who does not own the table, using
    /// `what` (a subquery, a function, a type that is not built in).
    UnconfinedExpression { what: String },
    /// custody.check could not evaluate data.custody.row_allow (`error`: why).
    RowCheckFailed { error: String },
    /// Reading the audit log without SELECT on it.
    LogNotReadable,
    /// custody.audit_log's columns are not as pg_custody created them (altered while the
    /// library was not loaded), found when the log is read or written.
    LogAltered { what: String },
}

impl From<CustodyError> for ErrorReport {
    /// The report of `e`, located where it is raised (each function from the raising site to
    /// `ErrorReport::new` is `#[track_caller]`).
    #[track_caller]
    fn from(e: CustodyError) -> Self {
        e.into_report()
    }
}

/// `ErrorReport` with pg_custody as the function name and, when given, a detail and a hint.
#[track_caller]
fn new_report(
    code: PgSqlErrorCode,
    message: impl Into<std::borrow::Cow<'static, str>>,
    detail: Option<String>,
    hint: Option<String>,
) -> ErrorReport {
    let mut e = ErrorReport::new(code, message, "pg_custody");
    if let Some(d) = detail {
        e = e.set_detail(d);
    }
    if let Some(h) = hint {
        e = e.set_hint(h);
    }
    e
}

/// For a refused INSERT or COPY FROM (a restore, most often): how a dump is restored.
fn with_restore_hint(e: ErrorReport, action: &str) -> ErrorReport {
    if action == "INSERT" || action == "COPY FROM" {
        e.set_hint(
            "To restore a dump, restore it in one transaction (pg_restore --single-transaction, psql -1): \
             pg_custody's tables accept rows in the transaction that creates them (docs/operations.md).",
        )
    } else {
        e
    }
}

impl CustodyError {
    #[track_caller]
    fn into_report(self) -> ErrorReport {
        use CustodyError::*;
        use PgSqlErrorCode::*;
        match self {
            InvalidArgument { message, hint } => {
                new_report(ERRCODE_INVALID_PARAMETER_VALUE, message, None, hint.map(str::to_string))
            }
            NotUtf8 { what } => {
                new_report(ERRCODE_CHARACTER_NOT_IN_REPERTOIRE, format!("custody.check: {what} is not valid UTF-8"), None, None)
            }
            NulCharacter { what } => {
                new_report(ERRCODE_CHARACTER_NOT_IN_REPERTOIRE, format!("{what} cannot contain NUL characters"), None, None)
            }
            InvalidPolicy { message, detail, hint } => {
                new_report(ERRCODE_SYNTAX_ERROR, message, detail.map(str::to_string), hint.map(str::to_string))
            }
            UndefinedObject { message, hint } => new_report(ERRCODE_UNDEFINED_OBJECT, message, None, Some(hint.into())),
            NoSuchRelation { relid } => {
                new_report(ERRCODE_UNDEFINED_TABLE, format!("relation with OID {relid} does not exist"), None, None)
            }
            NotManager { what } => new_report(
                ERRCODE_INSUFFICIENT_PRIVILEGE,
                format!("permission denied to manage pg_custody {what}"),
                Some(format!(
                    "Only superusers and members of custody_admin may manage pg_custody {what}. This attempt is recorded."
                )),
                None,
            ),
            PolicyDatabase { database } => new_report(
                ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE,
                format!("pg_custody policies are managed in database {database}"),
                None,
                Some("Connect to the database named by custody.database; policies there govern every database.".into()),
            ),
            NotInThisDatabase { table } => new_report(
                ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE,
                format!("pg_custody's table {table} does not exist in this database"),
                None,
                Some("The audit log and the policy store live in the database named by custody.database.".into()),
            ),
            ReadCommittedOnly => new_report(
                ERRCODE_FEATURE_NOT_SUPPORTED,
                "pg_custody policies, attributes and suspensions are changed in READ COMMITTED transactions",
                Some("A REPEATABLE READ or SERIALIZABLE snapshot could publish the store without another session's change.".into()),
                None,
            ),
            CannotPrepare => new_report(
                ERRCODE_FEATURE_NOT_SUPPORTED,
                "cannot PREPARE a transaction that changed pg_custody policies",
                None,
                None,
            ),
            StoreTooLarge { limit } => new_report(
                ERRCODE_PROGRAM_LIMIT_EXCEEDED,
                "pg_custody policies, attributes and suspensions exceed the shared memory reserved for them",
                Some(format!("The limit is {limit} bytes.")),
                Some("Remove unused policies or attributes.".into()),
            ),
            Denied { reasons } => new_report(
                ERRCODE_INSUFFICIENT_PRIVILEGE,
                "statement denied by pg_custody policy",
                Some(if reasons.is_empty() { "no policy allowed it".to_string() } else { reasons.join("; ") }),
                Some("The decision is recorded in custody.audit_log (outcome denied).".into()),
            ),
            RowPolicyOnOwnTable => new_report(
                ERRCODE_INSUFFICIENT_PRIVILEGE,
                "row policies cannot be created on pg_custody's own tables",
                None,
                None,
            ),
            UnconfinedExpression { what } => new_report(
                ERRCODE_INSUFFICIENT_PRIVILEGE,
                format!("row policy expressions may not use {what} here"),
                Some(
                    "A row policy's expressions run as whoever reads the table. Members of custody_admin \
                     who do not own the table may use built-in functions that change nothing and run no \
                     SQL, and pg_custody's row-policy functions; no subqueries, and no types that are not \
                     built in."
                        .into(),
                ),
                Some("Ask the table's owner or a superuser to create this row policy.".into()),
            ),
            RowCheckFailed { error } => new_report(
                ERRCODE_INSUFFICIENT_PRIVILEGE,
                "custody.check could not evaluate data.custody.row_allow",
                Some(error),
                None,
            ),
            LogNotReadable => new_report(
                ERRCODE_INSUFFICIENT_PRIVILEGE,
                "permission denied for table audit_log",
                None,
                Some("Reading the audit log takes membership in custody_auditor.".into()),
            ),
            LogAltered { what } => new_report(
                ERRCODE_DATA_CORRUPTED,
                format!("custody.audit_log is not as pg_custody created it: {what}"),
                None,
                Some(
                    "The table was altered while pg_custody was not loaded. Verify the chain from an export, \
                     and restore the table's definition."
                        .into(),
                ),
            ),
            NotAStandby => ErrorReport::new(
                PgSqlErrorCode::ERRCODE_INSUFFICIENT_PRIVILEGE,
                "permission denied to ship a standby's audit records",
                "pg_custody",
            )
            .set_detail("Only superusers and members of custody_standby (the role a standby connects as) may. This attempt is recorded."),
            NotStoringHere => ErrorReport::new(
                PgSqlErrorCode::ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE,
                "this server does not store audit records: it is a standby, or its custody writer is not appending",
                "pg_custody",
            )
            .set_hint("A standby ships its records to its primary (primary_conninfo); see custody.status()."),
            PastTheLog { from_seq, last_seq } => ErrorReport::new(
                PgSqlErrorCode::ERRCODE_INVALID_PARAMETER_VALUE,
                format!("from_seq {from_seq} is past the end of custody.audit_log"),
                "pg_custody",
            )
            .set_detail(if last_seq == 0 {
                "The log holds no records.".to_string()
            } else {
                format!("Its last record is seq {last_seq}.")
            })
            .set_hint("Verify from seq 1 (the whole chain), or from a seq the log holds."),
            NotPreloaded => ErrorReport::new(
                PgSqlErrorCode::ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE,
                "pg_custody must be loaded via shared_preload_libraries",
                "pg_custody",
            )
            .set_hint(
                "Add pg_custody to shared_preload_libraries in postgresql.conf and restart the \
                 server.",
            ),
            QueueUnavailable { timeout_ms } => ErrorReport::new(
                PgSqlErrorCode::ERRCODE_INSUFFICIENT_RESOURCES,
                "audit record could not be queued: the custody writer is not taking records",
                "pg_custody",
            )
            .set_detail(format!(
                "The shared audit queue stayed full for {timeout_ms} ms \
                 (custody.failure_timeout); the statement was not allowed to run unrecorded."
            ))
            .set_hint(
                "Check the server log and custody.status() for the custody writer; \
                 custody.on_failure = continue trades this error for a recorded gap.",
            ),
            NotDurable { timeout_ms } => ErrorReport::new(
                PgSqlErrorCode::ERRCODE_INSUFFICIENT_RESOURCES,
                "transaction not committed: its audit records were not stored in time",
                "pg_custody",
            )
            .set_detail(format!(
                "custody.durability = commit waited {timeout_ms} ms (custody.failure_timeout) \
                 for the custody writer."
            ))
            .set_hint("Check the server log and custody.status() for the custody writer."),
            Protected { relation, action, evidence: true } => with_restore_hint(ErrorReport::new(
                PgSqlErrorCode::ERRCODE_INSUFFICIENT_PRIVILEGE,
                format!("{action} on {relation} is not allowed: it is append-only"),
                "pg_custody",
            )
            .set_detail(
                "Only the custody writer appends to the audit log and its checkpoints, and \
                 nobody, superusers included, may change them while pg_custody is loaded. This \
                 attempt is recorded.",
            ),
                &action,
            ),
            Protected { relation, action, evidence: false } => with_restore_hint(ErrorReport::new(
                PgSqlErrorCode::ERRCODE_INSUFFICIENT_PRIVILEGE,
                format!("{action} on {relation} is not allowed: it is changed only by pg_custody's functions"),
                "pg_custody",
            )
            .set_detail(
                "Policies, attributes, suspensions and row policies are changed through the \
                 custody.* management functions, which record every change. This attempt is \
                 recorded.",
            ),
                &action,
            ),
            Redefinition { message, hint } => {
                let e = ErrorReport::new(PgSqlErrorCode::ERRCODE_INSUFFICIENT_PRIVILEGE, message, "pg_custody")
                    .set_detail(
                        "pg_custody's objects cannot be redefined while the library is loaded, \
                         superusers included. This attempt is recorded.",
                    );
                match hint {
                    Some(h) => e.set_hint(h),
                    None => e,
                }
            }
            WouldBlockWriter { statement, relation, hint } => ErrorReport::new(
                PgSqlErrorCode::ERRCODE_INSUFFICIENT_PRIVILEGE,
                format!("{statement} on {relation} is not allowed while pg_custody is loaded"),
                "pg_custody",
            )
            .set_detail(
                "It would lock the table against the custody writer, and every transaction in the \
                 cluster that must wait for its audit records would fail meanwhile. This attempt \
                 is recorded.",
            )
            .set_hint(hint),
            CatalogRow { catalog, what } => ErrorReport::new(
                PgSqlErrorCode::ERRCODE_INSUFFICIENT_PRIVILEGE,
                format!("direct modification of {catalog} is not allowed here: {what}"),
                "pg_custody",
            )
            .set_detail(
                "While pg_custody is loaded, system catalog rows that describe built-in objects or \
                 pg_custody's own objects cannot be inserted, updated or deleted directly, \
                 superusers included. This attempt is recorded.",
            )
            .set_hint("Use the SQL command that makes the change instead of editing the catalog."),
            NotAsCreated { relation, what } => ErrorReport::new(
                PgSqlErrorCode::ERRCODE_DATA_CORRUPTED,
                format!("{relation} is not as pg_custody created it: {what}"),
                "pg_custody",
            )
            .set_hint(
                "It was changed while pg_custody was not loaded. pg_custody does not write to it \
                 until it is restored; verify the chain from an export.",
            ),
            DropRefused { object } => ErrorReport::new(
                PgSqlErrorCode::ERRCODE_INSUFFICIENT_PRIVILEGE,
                format!("cannot drop {object} while pg_custody is loaded"),
                "pg_custody",
            )
            .set_detail("Dropping it would destroy audit records. This attempt is recorded.")
            .set_hint(
                "Set custody.allow_drop = on in postgresql.conf and reload, after exporting \
                 the log (for example with COPY custody.audit_log TO ...).",
            ),
        }
    }

    /// Raises this error (never returns).
    #[track_caller]
    pub fn report(self) -> ! {
        ErrorReport::from(self).report(PgLogLevel::ERROR);
        unreachable!("ERROR does not return")
    }
}

#[cfg(any(test, feature = "pg_test"))]
#[pgrx::pg_schema]
mod tests {
    use pgrx::prelude::*;

    /// The SQLSTATE `sql` fails with (None: it succeeds), caught by PL/pgSQL as a client would
    /// see it.
    fn sqlstate_of(sql: &str) -> Option<String> {
        Spi::run(
            "CREATE OR REPLACE FUNCTION pg_temp.sqlstate_of(q text) RETURNS text LANGUAGE plpgsql AS $$ \
             BEGIN EXECUTE q; RETURN NULL; EXCEPTION WHEN OTHERS THEN RETURN SQLSTATE; END $$",
        )
        .unwrap();
        Spi::get_one_with_args::<String>("SELECT pg_temp.sqlstate_of($1)", &[sql.into()]).unwrap()
    }

    /// Mistakes in management calls carry their own SQLSTATE, not XX000.
    #[pg_test]
    fn user_errors_have_their_sqlstate() {
        for (sql, want) in [
            ("SELECT custody._create_row_policy('p', 4294967295::oid, 'all', 'true')", "42P01"),
            ("SELECT custody._create_row_policy('p', 'pg_class'::regclass, 'merge', 'true')", "22023"),
            ("SELECT custody.drop_policy('no_such_policy')", "42704"),
            ("SELECT custody.drop_row_policy('no_such_row_policy')", "42704"),
            ("SELECT custody.set_policy('p', 'this is not rego')", "42601"),
            ("SELECT custody.set_attribute('postgres', 'k', '1', now(), now() - interval '1 day')", "22023"),
            ("SELECT custody.resume('postgres')", "42704"),
            ("SELECT * FROM custody.verify_audit_chain(2, NULL, '[]'::jsonb)", "22023"),
            ("SELECT * FROM custody.verify_audit_chain(1, NULL, '7'::jsonb)", "22023"),
        ] {
            assert_eq!(sqlstate_of(sql).as_deref(), Some(want), "{sql}");
        }
    }
}
