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
    /// A forbidden operation on a protected relation (the audit log).
    Protected { relation: String, action: String },
    /// DROP of the extension or its tables while custody.allow_drop is off.
    DropRefused { object: String },
}

impl CustodyError {
    fn into_report(self) -> ErrorReport {
        use CustodyError::*;
        match self {
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
            Protected { relation, action } => ErrorReport::new(
                PgSqlErrorCode::ERRCODE_INSUFFICIENT_PRIVILEGE,
                format!("{action} on {relation} is not allowed: it is append-only"),
                "pg_custody",
            )
            .set_detail(
                "Only the custody writer appends to the audit log and its checkpoints, and \
                 nobody, superusers included, may change them while pg_custody is loaded. This \
                 attempt is recorded.",
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
