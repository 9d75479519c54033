//! A rolled-back transaction does not erase its records: the read it did and the statement
//! that failed in it are both in the audit log.

use pg_custody_client_tests::*;

#[test]
fn rollback_keeps_read_record() {
    let cluster = Cluster::shared();
    let m = marker("rb");
    let mut c = cluster.connect(&m);
    c.batch_execute(&format!(
        "CREATE TABLE public.{m} (id int PRIMARY KEY, note text); INSERT INTO public.{m} VALUES (1, 'x')"
    ))
    .unwrap();

    // A read in a transaction that is rolled back.
    let select = format!("SELECT * FROM public.{m} WHERE note <> 'read-{m}'");
    c.simple_query("BEGIN").unwrap();
    c.simple_query(&select).unwrap();
    c.simple_query("ROLLBACK").unwrap();

    // A statement that fails in the executor inside a transaction that is rolled back.
    let failing = format!("INSERT INTO public.{m} VALUES (1, 'dup-{m}')");
    c.simple_query("BEGIN").unwrap();
    assert_eq!(sqlstate(c.simple_query(&failing)), "23505");
    c.simple_query("ROLLBACK").unwrap();

    flush(&mut c);
    let rows = c
        .query(
            "SELECT command, outcome, sqlstate FROM custody.audit_log WHERE statement = $1",
            &[&select],
        )
        .unwrap();
    assert_eq!(rows.len(), 1, "expected one record of the rolled-back SELECT");
    assert_eq!(rows[0].get::<_, String>(0), "SELECT");
    assert_eq!(rows[0].get::<_, String>(1), "success");
    assert_eq!(rows[0].get::<_, Option<String>>(2), None);

    let rows = c
        .query(
            "SELECT command, outcome, sqlstate, message FROM custody.audit_log WHERE statement = $1",
            &[&failing],
        )
        .unwrap();
    assert_eq!(rows.len(), 1, "expected one record of the failed INSERT");
    assert_eq!(rows[0].get::<_, String>(0), "INSERT");
    assert_eq!(rows[0].get::<_, String>(1), "error");
    assert_eq!(rows[0].get::<_, Option<String>>(2).as_deref(), Some("23505"));
    assert!(rows[0].get::<_, Option<String>>(3).is_some_and(|s| s.contains("duplicate key")));

    // Both ROLLBACKs of this session are records too.
    let rollbacks = query_i64(
        &mut c,
        "SELECT count(*) FROM custody.audit_log WHERE application_name = $1 AND command = 'ROLLBACK'",
        &[&m],
    );
    assert_eq!(rollbacks, 2);
    assert_chain_ok(&mut c);
}
