//! Errors a user can cause carry a real SQLSTATE (operations issue): verifying a range past
//! the end of the log, verifying in a database that holds no log, a flush right after a WAL
//! segment switch. Each once failed with XX000.

use pg_custody_client_tests::*;

#[test]
fn verify_past_the_end_of_the_log_is_a_usage_error() {
    let cluster = Cluster::shared();
    let mut c = cluster.connect("ops_errors");
    flush(&mut c);
    let last: i64 = query_i64(&mut c, "SELECT max(seq) FROM custody.audit_log", &[]);
    let from = last + 1000;
    let e = c
        .query_one("SELECT ok FROM custody.verify_audit_chain($1, $2)", &[&from, &(from + 1000)])
        .expect_err("a range past the end of the log");
    let db = e.as_db_error().expect("a server error");
    assert_eq!(db.code().code(), "22023", "{db:?}");
    assert_eq!(db.message(), format!("from_seq {from} is past the end of custody.audit_log"));
    assert!(db.detail().unwrap_or("").contains("Its last record is seq"), "{db:?}");
    // An empty range is verified (nothing to check).
    let row = c.query_one("SELECT ok, checked FROM custody.verify_audit_chain(2, 1)", &[]).unwrap();
    assert!(row.get::<_, bool>(0));
    // A range inside the log, and to_seq past its end, are fine.
    let row = c.query_one("SELECT ok FROM custody.verify_audit_chain(2, $1)", &[&from]).unwrap();
    assert!(row.get::<_, bool>(0));
}

#[test]
fn verify_where_there_is_no_log_says_where_it_is() {
    let cluster = Cluster::shared();
    let mut c = cluster.connect("ops_errors");
    c.batch_execute("DROP DATABASE IF EXISTS ops_other").unwrap();
    c.batch_execute("CREATE DATABASE ops_other").unwrap();
    let mut o = Client::connect(
        &format!("host=/tmp port={} user=postgres dbname=ops_other application_name=ops_errors", cluster.port),
        NoTls,
    )
    .unwrap();
    o.batch_execute("CREATE EXTENSION pg_custody").unwrap();
    let e = o.query_one("SELECT ok FROM custody.verify_audit_chain()", &[]).expect_err("no log in this database");
    let db = e.as_db_error().expect("a server error");
    assert_ne!(db.code().code(), "XX000", "{db:?}");
    assert!(db.hint().unwrap_or("").contains("custody.database"), "{db:?}");
    drop(o);
    c.batch_execute("DROP DATABASE ops_other").unwrap();
}

#[test]
fn flush_right_after_a_wal_switch() {
    let cluster = Cluster::shared();
    let mut c = cluster.connect("ops_errors");
    for _ in 0..3 {
        let row = c.query_one("SELECT pg_switch_wal() IS NOT NULL, custody.flush()", &[]).expect("flush after a WAL switch");
        assert!(row.get::<_, bool>(1));
    }
}
