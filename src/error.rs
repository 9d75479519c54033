//! One error type for everything a user can cause, each mapped to a real SQLSTATE with a
//! message and a DETAIL/HINT that says what to do. (pgrx's `error!` and panics surface as
//! XX000: fine for bugs, wrong for a user's mistake.)

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
    fn into_report(self) -> ErrorReport {
        use CustodyError::*;
        match self {
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
    pub fn report(self) -> ! {
        self.into_report().report(PgLogLevel::ERROR);
        unreachable!("ERROR does not return")
    }
}
