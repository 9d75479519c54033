//! Even a superuser cannot change, remove or bypass custody.audit_log while the library is
//! loaded; each refused attempt leaves the stored records unchanged and is itself recorded.

use pg_custody_client_tests::*;

#[test]
fn protection() {
    let cluster = Cluster::shared();
    let m = marker("prot");
    let mut c = cluster.connect(&m);
    c.batch_execute(&format!(
        "CREATE FUNCTION public.{m}_trg() RETURNS trigger LANGUAGE plpgsql AS $$BEGIN RETURN NEW; END$$"
    ))
    .unwrap();
    flush(&mut c);

    // Fingerprint of everything stored so far.
    let fingerprint = "SELECT count(*), md5(string_agg(seq::text || ':' || encode(hash, 'hex') || ':' \
                       || coalesce(statement, ''), ',' ORDER BY seq)) \
                       FROM custody.audit_log WHERE seq <= $1";
    let head = query_i64(&mut c, "SELECT max(seq) FROM custody.audit_log", &[]);
    let before = c.query_one(fingerprint, &[&head]).unwrap();
    let (n0, md0): (i64, String) = (before.get(0), before.get(1));

    // Each attempt carries the run marker in a comment so its record is found by text.
    let attempts: Vec<(String, &str)> = vec![
        (format!("/* {m} */ UPDATE custody.audit_log SET statement = 'forged' WHERE seq = 1"), "42501"),
        (format!("/* {m} */ DELETE FROM custody.audit_log WHERE seq = 1"), "42501"),
        (format!("/* {m} */ INSERT INTO custody.audit_log SELECT * FROM custody.audit_log WHERE seq = 1"), "42501"),
        (format!("/* {m} */ TRUNCATE custody.audit_log"), "42501"),
        (format!("/* {m} */ ALTER TABLE custody.audit_log ADD COLUMN forged int"), "42501"),
        (format!("/* {m} */ COPY custody.audit_log FROM '/dev/null'"), "42501"),
        (
            format!(
                "/* {m} */ CREATE TRIGGER {m}_t BEFORE INSERT ON custody.audit_log \
                 FOR EACH ROW EXECUTE FUNCTION public.{m}_trg()"
            ),
            "42501",
        ),
        (format!("/* {m} */ CREATE RULE {m}_r AS ON INSERT TO custody.audit_log DO INSTEAD NOTHING"), "42501"),
        // Refused before PostgreSQL locks the table (the writer would wait behind the lock).
        (format!("/* {m} */ DROP TABLE custody.audit_log"), "42501"),
        (format!("/* {m} */ DROP EXTENSION pg_custody"), "42501"),
    ];
    for (sql, want) in &attempts {
        let got = sqlstate(c.simple_query(sql));
        assert_eq!(&got, want, "{sql}");
    }

    // Table, extension, trigger set and rules are as before.
    let exists: bool = c
        .query_one(
            "SELECT to_regclass('custody.audit_log') IS NOT NULL \
             AND EXISTS (SELECT 1 FROM pg_extension WHERE extname = 'pg_custody')",
            &[],
        )
        .unwrap()
        .get(0);
    assert!(exists, "custody.audit_log or the extension is gone");
    let extra: i64 = query_i64(
        &mut c,
        "SELECT (SELECT count(*) FROM pg_trigger WHERE tgname = $1) \
              + (SELECT count(*) FROM pg_rules WHERE rulename = $2) \
              + (SELECT count(*) FROM information_schema.columns \
                 WHERE table_schema = 'custody' AND table_name = 'audit_log' AND column_name = 'forged')",
        &[&format!("{m}_t"), &format!("{m}_r")],
    );
    assert_eq!(extra, 0, "a trigger, rule or column was added to custody.audit_log");

    flush(&mut c);
    let after = c.query_one(fingerprint, &[&head]).unwrap();
    assert_eq!((after.get::<_, i64>(0), after.get::<_, String>(1)), (n0, md0), "stored records changed");
    assert_eq!(n0, head, "records below the head are missing");

    for (sql, want) in &attempts {
        let rows = c
            .query("SELECT outcome, sqlstate FROM custody.audit_log WHERE statement = $1", &[sql])
            .unwrap();
        assert_eq!(rows.len(), 1, "expected one record of: {sql}");
        assert_eq!(rows[0].get::<_, String>(0), "error", "{sql}");
        assert_eq!(rows[0].get::<_, Option<String>>(1).as_deref(), Some(*want), "{sql}");
    }
    assert_chain_ok(&mut c);
}
