//! Tampering with stored records while the library is not loaded (the only way to change
//! them) is found by verify_audit_chain(), at the first damaged seq, for each kind of damage;
//! restoring the saved records makes the chain verify again.

use pg_custody_client_tests::*;

struct Case {
    name: &'static str,
    k: i64,
    sql: Vec<String>,
    drops_pk: bool,
    reason_prefix: Option<&'static str>,
}

fn cases() -> Vec<Case> {
    vec![
        Case {
            name: "edit",
            k: 10,
            sql: vec!["UPDATE custody.audit_log SET statement = statement || ' -- edited' WHERE seq = 10".into()],
            drops_pk: false,
            reason_prefix: Some("hash mismatch"),
        },
        Case {
            name: "delete",
            k: 12,
            sql: vec!["DELETE FROM custody.audit_log WHERE seq = 12".into()],
            drops_pk: false,
            reason_prefix: Some("missing record"),
        },
        Case {
            name: "duplicate",
            k: 14,
            sql: vec![
                "ALTER TABLE custody.audit_log DROP CONSTRAINT audit_log_pkey".into(),
                "INSERT INTO custody.audit_log SELECT * FROM custody.audit_log WHERE seq = 14".into(),
            ],
            drops_pk: true,
            reason_prefix: Some("duplicate"),
        },
        Case {
            name: "reorder",
            k: 16,
            sql: vec![
                "UPDATE custody.audit_log SET seq = -16 WHERE seq = 16".into(),
                "UPDATE custody.audit_log SET seq = 16 WHERE seq = 17".into(),
                "UPDATE custody.audit_log SET seq = 17 WHERE seq = -16".into(),
            ],
            drops_pk: false,
            reason_prefix: None,
        },
    ]
}

#[test]
fn tamper() {
    let cluster = StopOnDrop(Cluster::own("tamper", 1));
    let mut c = cluster.connect("tamper_setup");
    c.batch_execute("CREATE TABLE tamper_t (id int PRIMARY KEY, note text)").unwrap();
    for i in 0..30 {
        c.simple_query(&format!("INSERT INTO tamper_t VALUES ({i}, 'row {i}')")).unwrap();
    }
    flush(&mut c);
    assert_chain_ok(&mut c);
    let head = query_i64(&mut c, "SELECT max(seq) FROM custody.audit_log", &[]);
    assert!(head >= 20, "too few records to tamper with: {head}");
    drop(c);

    cluster.restart_unloaded();
    let mut c = cluster.connect("tamper_unloaded");
    c.batch_execute("CREATE TABLE public.backup AS SELECT * FROM custody.audit_log").unwrap();
    drop(c);

    for case in cases() {
        // Unloaded: damage.
        let mut c = cluster.connect("tamper_unloaded");
        for sql in &case.sql {
            let n = c.execute(sql.as_str(), &[]).unwrap_or_else(|e| panic!("{}: {sql}: {e}", case.name));
            assert!(sql.starts_with("ALTER") || n == 1, "{}: {sql} touched {n} rows", case.name);
        }
        drop(c);

        // Loaded: the damage is found at seq k.
        cluster.restart_loaded();
        let mut c = cluster.connect("tamper_verify");
        let v = verify(&mut c);
        eprintln!("tamper {}: {v:?}", case.name);
        assert!(!v.ok, "{}: damage not detected: {v:?}", case.name);
        assert_eq!(v.first_bad_seq, Some(case.k), "{}: wrong first_bad_seq: {v:?}", case.name);
        if let Some(p) = case.reason_prefix {
            let reason = v.reason.clone().unwrap_or_default();
            assert!(reason.starts_with(p), "{}: reason {reason:?} does not start with {p:?}", case.name);
        }
        // Records before the damage still verify.
        let r = c
            .query_one("SELECT ok FROM custody.verify_audit_chain(1, $1)", &[&(case.k - 1)])
            .unwrap();
        assert!(r.get::<_, bool>(0), "{}: prefix 1..{} does not verify", case.name, case.k - 1);
        drop(c);

        // Unloaded: restore the saved records. This drops what was appended meanwhile, which
        // the writer would rightly report as cut off (trust_head.rs): the test also removes
        // the head the writer remembers, with the file-system access nothing in the database
        // can stop.
        cluster.restart_unloaded();
        cluster.remove_head_files();
        let mut c = cluster.connect("tamper_unloaded");
        c.batch_execute("TRUNCATE custody.audit_log; INSERT INTO custody.audit_log SELECT * FROM public.backup")
            .unwrap();
        if case.drops_pk {
            c.batch_execute("ALTER TABLE custody.audit_log ADD CONSTRAINT audit_log_pkey PRIMARY KEY (seq)")
                .unwrap();
        }
        drop(c);

        // Loaded: valid again, and the writer appends after the restored head.
        cluster.restart_loaded();
        let mut c = cluster.connect("tamper_verify");
        flush(&mut c);
        assert_chain_ok(&mut c);
        let new_head = query_i64(&mut c, "SELECT max(seq) FROM custody.audit_log", &[]);
        assert!(new_head > head, "{}: nothing appended after restore", case.name);
        drop(c);
        if case.name != "reorder" {
            cluster.restart_unloaded();
        }
    }

    // A column's type changed with the library unloaded: the verifier reads values by their
    // type, so it refuses with a clear error (XX001) instead of misreading them.
    cluster.restart_unloaded();
    let mut c = cluster.connect("tamper_unloaded");
    c.batch_execute("ALTER TABLE custody.audit_log ALTER COLUMN rows TYPE numeric").unwrap();
    drop(c);
    restart_loaded_nowait(&cluster);
    let mut c = cluster.connect("tamper_verify");
    // The writer does not write to a table it did not make this way; it says why.
    wait_until(
        &mut c,
        "SELECT coalesce(custody.status()->>'state' LIKE 'refusing: %column rows has type%', false)",
        &[],
        "the writer to refuse the altered log",
    );
    let err = c
        .query_one("SELECT ok FROM custody.verify_audit_chain()", &[])
        .expect_err("verification of an altered table must fail");
    let db = err.as_db_error().expect("a server error");
    assert_eq!(db.code().code(), "XX001", "{db:?}");
    assert!(db.message().contains("column rows has type"), "{db:?}");
    drop(c);
    cluster.stop("fast");
}
