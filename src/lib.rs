//! pg_custody: tamper-evident audit logs for PostgreSQL.
//!
//! Every statement of every database is captured by hooks (`hooks`, `capture`), handed to
//! one background worker through a bounded shared queue (`queue`), and appended by that
//! worker (`writer`) as SHA-256 hash-chained rows to `custody.audit_log`, which nobody may
//! alter while the library is loaded (`protect`). The chain format itself is pure code in
//! the `custody-chain` crate, shared with the `custody` command-line verifier.

// Every unsafe operation sits in its own `unsafe {}` block with a `// SAFETY:` line saying
// why it is sound, as plrust does; inside an `unsafe fn` too.
#![deny(unsafe_op_in_unsafe_fn)]
#![deny(clippy::undocumented_unsafe_blocks)]

use pgrx::prelude::*;

mod api;
mod capture;
mod error;
mod hooks;
mod lend;
mod own;
mod pgver;
mod policy;
mod protect;
mod queue;
mod scan;
mod settings;
mod shmem;
mod varlena;
mod writer;

pgrx::pg_module_magic!();

pgrx::extension_sql_file!("../sql/bootstrap.sql", name = "bootstrap", bootstrap);
pgrx::extension_sql_file!("../sql/finalize.sql", name = "finalize", finalize);

#[pg_guard]
pub extern "C-unwind" fn _PG_init() {
    // A server pg_upgrade runs (-b) restores the schema and copies the data files: nothing
    // there is a user's statement, and pg_custody's own objects are restored as they were.
    // The library stays passive (no hooks, no writer); the first normal start after the
    // upgrade continues the chain with a hand-over (docs/operations.md).
    // SAFETY: reading a flag the postmaster sets from its command line.
    if unsafe { pg_sys::IsBinaryUpgrade } {
        return;
    }
    // SAFETY: reading a flag the postmaster sets while loading preload libraries.
    if unsafe { !pg_sys::process_shared_preload_libraries_in_progress } {
        error::CustodyError::NotPreloaded.report();
    }
    settings::init();
    shmem::init();
    policy::init();
    hooks::init();
    protect::init();
    capture::init();
    writer::init();
}

#[cfg(any(test, feature = "pg_test"))]
#[pg_schema]
mod tests {
    use pgrx::prelude::*;

    /// Waits until the writer has found the table created by the test framework.
    fn wait_appending() {
        for _ in 0..200 {
            let s = Spi::get_one::<String>("SELECT custody.status()->>'state'").unwrap();
            if s.as_deref() == Some("appending") {
                return;
            }
            Spi::run("SELECT pg_sleep(0.05)").unwrap();
        }
        panic!("the custody writer did not start appending");
    }

    #[pg_test]
    fn library_is_preloaded_and_settings_exist() {
        let db = Spi::get_one::<String>("SELECT current_setting('custody.database')").unwrap();
        assert_eq!(db.as_deref(), Some("pgrx_tests"));
        let audit = Spi::get_one::<String>("SHOW custody.audit").unwrap();
        assert_eq!(audit.as_deref(), Some("all, -misc_set"));
    }

    #[pg_test]
    fn statements_run_in_this_backend_are_recorded_and_chained() {
        wait_appending();
        Spi::run("SELECT 'pg_test marker 7f3a' AS marker").unwrap();
        assert_eq!(Spi::get_one::<bool>("SELECT custody.flush()").unwrap(), Some(true));
        let (class, outcome) = Spi::get_two::<String, String>(
            "SELECT class, outcome FROM custody.audit_log \
             WHERE statement = 'SELECT ''pg_test marker 7f3a'' AS marker' \
             AND backend_pid = pg_backend_pid()",
        )
        .unwrap();
        assert_eq!(class.as_deref(), Some("read"));
        assert_eq!(outcome.as_deref(), Some("success"));
        let ok = Spi::get_one::<bool>("SELECT ok FROM custody.verify_audit_chain()").unwrap();
        assert_eq!(ok, Some(true));
    }

    #[pg_test(error = "DELETE on custody.audit_log is not allowed: it is append-only")]
    fn superuser_cannot_delete_from_the_log() {
        Spi::run("DELETE FROM custody.audit_log").unwrap();
    }

    #[pg_test(error = "invalid value for parameter \"custody.audit\": \"read, bogus\"")]
    fn unknown_audit_class_is_refused() {
        Spi::run("SET custody.audit = 'read, bogus'").unwrap();
    }

    #[pg_test(error = "invalid configuration parameter name \"custody.no_such_setting\"")]
    fn custody_prefix_is_reserved() {
        Spi::run("SET custody.no_such_setting = 1").unwrap();
    }
}

/// Required by `cargo pgrx test`.
#[cfg(test)]
pub mod pg_test {
    pub fn setup(_options: Vec<&str>) {}

    pub fn postgresql_conf_options() -> Vec<&'static str> {
        // pgrx creates the extension in its own database, pgrx_tests.
        vec!["shared_preload_libraries = 'pg_custody'", "custody.database = 'pgrx_tests'"]
    }
}
