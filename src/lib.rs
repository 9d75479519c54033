//! pg_custody: tamper-evident audit logs for PostgreSQL.
//!
//! Every statement of every database is captured by hooks (`hooks`, `capture`), handed to
//! one background worker through a bounded shared queue (`queue`), and appended by that
//! worker (`writer`) as SHA-256 hash-chained rows to `custody.audit_log`, which nobody may
//! alter while the library is loaded (`protect`). The chain format itself is pure code in
//! the `custody-chain` crate, shared with the `custody` command-line verifier.

use pgrx::prelude::*;

mod api;
mod capture;
mod error;
mod hooks;
mod protect;
mod queue;
mod settings;
mod writer;

pgrx::pg_module_magic!();

pgrx::extension_sql_file!("../sql/bootstrap.sql", name = "bootstrap", bootstrap);
pgrx::extension_sql_file!("../sql/finalize.sql", name = "finalize", finalize);

#[pg_guard]
pub extern "C-unwind" fn _PG_init() {
    // SAFETY: reading a flag the postmaster sets while loading preload libraries.
    if unsafe { !pg_sys::process_shared_preload_libraries_in_progress } {
        error::CustodyError::NotPreloaded.report();
    }
    settings::init();
    queue::init();
    hooks::init();
    protect::init();
    capture::init();
    writer::init();
}

#[cfg(any(test, feature = "pg_test"))]
#[pg_schema]
mod tests {
    use pgrx::prelude::*;

    #[pg_test]
    fn library_is_preloaded_and_settings_exist() {
        let db = Spi::get_one::<String>("SELECT current_setting('custody.database')").unwrap();
        assert_eq!(db.as_deref(), Some("postgres"));
        let audit = Spi::get_one::<String>("SHOW custody.audit").unwrap();
        assert_eq!(audit.as_deref(), Some("all, -misc_set"));
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
        vec!["shared_preload_libraries = 'pg_custody'"]
    }
}
