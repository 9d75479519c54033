//! Attack tests, family 2 (spec/trust.md): protection by identity, not by name. The log,
//! its checkpoints and the policy store are protected as the objects pg_custody created
//! (their OIDs), whatever they are called and however they are reached: renames, catalog
//! edits, inheritance and partitions, maintenance commands and locks that would block the
//! writer.
//!
//! Every test uses its own fresh cluster (PGDATA-<suffix>, shared port + 6..10); run with
//! `--test-threads=1`.

use std::time::Duration;

use pg_custody_client_tests::*;

/// A fresh cluster, stopped when dropped, and a superuser session on it.
fn own(suffix: &str, offset: u16, app: &str) -> (StopOnDrop, Client) {
    let cluster = StopOnDrop(Cluster::own(suffix, offset));
    let c = cluster.connect(app);
    (cluster, c)
}

/// Runs each (statement, expected SQLSTATE or None for success) and collects mismatches.
/// Statements expected to fail run inside BEGIN ... ROLLBACK: should one succeed after all
/// (a build without the defence), it changes nothing the next attempts depend on.
fn run_expecting(c: &mut Client, attempts: &[(String, Option<&str>)]) -> Vec<String> {
    let mut wrong = Vec::new();
    for (sql, want) in attempts {
        if want.is_some() {
            c.batch_execute("BEGIN").unwrap();
        }
        let got = match c.simple_query(sql) {
            Ok(_) => None,
            Err(e) => Some(e.code().map(|s| s.code().to_string()).unwrap_or_else(|| format!("{e}"))),
        };
        if want.is_some() {
            c.batch_execute("ROLLBACK").unwrap();
        }
        if got.as_deref() != *want {
            wrong.push(format!("{sql}: got {got:?}, want {want:?}"));
        }
    }
    wrong
}

/// Asserts each attempt has exactly one record in `table` with the expected outcome.
fn assert_all_recorded(c: &mut Client, table: &str, attempts: &[(String, Option<&str>)]) {
    for (sql, want) in attempts {
        let recs = records_where(c, table, "statement = $1", &[sql]);
        assert_eq!(recs.len(), 1, "expected one record of {sql:?} in {table}: {recs:?}");
        let r = &recs[0];
        let outcome = if want.is_some() { "error" } else { "success" };
        assert_eq!((r.outcome.as_str(), r.sqlstate.as_deref()), (outcome, *want), "record of {sql:?}: {r:?}");
    }
}

/// The catalog edits of 2a, each carrying `m`.
fn catalog_attempts(m: &str) -> Vec<(String, Option<&'static str>)> {
    let deny = Some("42501");
    vec![
        (format!("/* {m} */ ALTER SCHEMA custody RENAME TO x"), deny),
        (format!("/* {m} */ ALTER SCHEMA custody OWNER TO ident_someone"), deny),
        (format!("/* {m} */ UPDATE pg_catalog.pg_namespace SET nspname = 'x' WHERE nspname = 'custody'"), deny),
        (format!("/* {m} */ UPDATE pg_catalog.pg_class SET relname = 'x' WHERE oid = 'custody.audit_log'::regclass"), deny),
        (format!("/* {m} */ DELETE FROM pg_catalog.pg_trigger WHERE false"), None),
        (format!("/* {m} */ UPDATE pg_catalog.pg_class SET reltuples = 10 WHERE oid = 'public.ident_t'::regclass"), None),
        (format!("/* {m} */ UPDATE pg_catalog.pg_proc SET procost = 2 WHERE proname = 'now'"), deny),
        // A built-in relation's statistics may be set (PostgreSQL's regression suite does),
        // nothing else of its row, and not pg_custody's tables' statistics either.
        (format!("/* {m} */ UPDATE pg_catalog.pg_class SET reltuples = reltuples + 1 WHERE oid = 'pg_catalog.pg_depend'::regclass"), None),
        (format!("/* {m} */ UPDATE pg_catalog.pg_class SET relpages = relpages + 1, relkind = 'v' WHERE oid = 'pg_catalog.pg_depend'::regclass"), deny),
        (format!("/* {m} */ UPDATE pg_catalog.pg_class SET relname = 'pg_dep' WHERE oid = 'pg_catalog.pg_depend'::regclass"), deny),
        (format!("/* {m} */ DELETE FROM pg_catalog.pg_class WHERE oid = 'pg_catalog.pg_depend'::regclass"), deny),
        (format!("/* {m} */ UPDATE pg_catalog.pg_class SET reltuples = 1 WHERE oid = 'custody.audit_log'::regclass"), deny),
        (
            format!(
                "/* {m} */ INSERT INTO pg_catalog.pg_inherits \
                 VALUES ('public.ident_t'::regclass, 'custody.audit_log'::regclass, 1, false)"
            ),
            deny,
        ),
        (
            format!("/* {m} */ UPDATE pg_catalog.pg_index SET indisvalid = false WHERE indrelid = 'custody.audit_log'::regclass"),
            deny,
        ),
        (
            format!(
                "/* {m} */ DELETE FROM pg_catalog.pg_depend \
                 WHERE refobjid = (SELECT oid FROM pg_extension WHERE extname = 'pg_custody')"
            ),
            deny,
        ),
        // Variants: other catalogs that describe pg_custody's objects.
        (
            format!(
                "/* {m} */ UPDATE pg_catalog.pg_attribute SET attname = 'x' \
                 WHERE attrelid = 'custody.audit_log'::regclass AND attname = 'statement'"
            ),
            deny,
        ),
        (format!("/* {m} */ DELETE FROM pg_catalog.pg_constraint WHERE conrelid = 'custody.audit_log'::regclass"), deny),
        (format!("/* {m} */ UPDATE pg_catalog.pg_extension SET extname = 'x' WHERE extname = 'pg_custody'"), deny),
        (format!("/* {m} */ UPDATE pg_catalog.pg_proc SET provolatile = 'i' WHERE oid = 'custody.status'::regproc"), deny),
        (format!("/* {m} */ DELETE FROM pg_catalog.pg_class WHERE oid = 'custody.checkpoints'::regclass"), deny),
    ]
}

/// What the catalog says about pg_custody's objects, to compare before and after.
const CATALOG_STATE: &str = "SELECT n.nspname::text || '.' || c.relname::text || ' owner ' || n.nspowner::regrole::text \
    || ' deps ' || (SELECT count(*) FROM pg_depend WHERE refobjid = (SELECT oid FROM pg_extension WHERE extname = 'pg_custody')) \
    || ' inh ' || (SELECT count(*) FROM pg_inherits WHERE inhparent = c.oid OR inhrelid = c.oid) \
    || ' valid ' || (SELECT bool_and(indisvalid)::text FROM pg_index WHERE indrelid = c.oid) \
    || ' cons ' || (SELECT count(*) FROM pg_constraint WHERE conrelid = c.oid) \
    || ' now ' || (SELECT procost::text FROM pg_proc WHERE oid = 'pg_catalog.now'::regproc) \
    || ' status ' || (SELECT provolatile::text FROM pg_proc WHERE proname = 'status' AND pronamespace = n.oid) \
    || ' attr ' || (SELECT count(*) FROM pg_attribute WHERE attrelid = c.oid AND attname = 'statement') \
    || ' ext ' || (SELECT count(*) FROM pg_extension WHERE extname = 'pg_custody') \
    FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace WHERE c.relname = 'audit_log'";

/// Attack: rename or re-own schema custody, or edit the catalog rows that describe
/// pg_custody's objects directly (pg_namespace, pg_class, pg_inherits, pg_index, pg_depend;
/// variants: pg_attribute, pg_constraint, pg_extension, pg_proc, a DELETE from pg_class),
/// or those of built-in objects (pg_proc of now()), also with allow_system_table_mods = on.
/// Defence: 42501 for each, recorded (even with custody.audit_catalog = off); edits that
/// touch no protected row (DELETE ... WHERE false, reltuples of a user table) succeed and
/// are recorded; names, dependencies and indexes unchanged; the chain verifies.
#[test]
fn catalog_edits_of_custody_objects_are_refused() {
    let (_cluster, mut c) = own("trust_catalog", 6, "cat");
    c.batch_execute("CREATE ROLE ident_someone; CREATE TABLE public.ident_t (id int)").unwrap();
    let before: String = c.query_one(CATALOG_STATE, &[]).unwrap().get(0);
    let m = marker("cat");
    let off = catalog_attempts(&m);
    let wrong_off = run_expecting(&mut c, &off);
    c.batch_execute("SET allow_system_table_mods = on").unwrap();
    let on = catalog_attempts(&format!("{m}_asm"));
    let wrong_on = run_expecting(&mut c, &on);
    c.batch_execute("RESET allow_system_table_mods").unwrap();
    let after: String = c.query_one(CATALOG_STATE, &[]).unwrap().get(0);
    assert_eq!(wrong_off, Vec::<String>::new(), "unexpected results, allow_system_table_mods = off");
    assert_eq!(wrong_on, Vec::<String>::new(), "unexpected results, allow_system_table_mods = on");
    assert_eq!(after, before, "pg_custody's catalog entries changed");
    assert!(before.starts_with("custody.audit_log owner "), "{before}");
    flush(&mut c);
    assert_all_recorded(&mut c, "custody.audit_log", &off);
    assert_all_recorded(&mut c, "custody.audit_log", &on);
    assert_chain_ok(&mut c);
}

/// Polls `<schema>.status()->>'state'` until 'appending'.
fn wait_appending_in(c: &mut Client, schema: &str) {
    wait_until(
        c,
        &format!("SELECT coalesce({schema}.status()->>'state' = 'appending', false)"),
        &[],
        &format!("{schema}.status() appending"),
    );
}

/// Attack: with the library unloaded, rename schema custody to `hidden`: the protection
/// and the writer look for "custody.audit_log" and find nothing. Then create a decoy
/// custody.audit_log for the writer to fill instead.
/// Defence: the objects are known by OID: DELETE / TRUNCATE (and, as variants, UPDATE and
/// ALTER TABLE) of hidden.audit_log are refused with 42501 and recorded there; the writer
/// keeps appending to hidden.audit_log (the chain verifies) and never writes to the decoy.
#[test]
fn renamed_schema_keeps_its_protection_and_its_writer() {
    let (cluster, c) = own("trust_rename", 7, "ren_setup");
    drop(c);
    cluster.restart_unloaded();
    let mut u = cluster.connect("ren_unloaded");
    u.batch_execute("ALTER SCHEMA custody RENAME TO hidden").unwrap();
    drop(u);
    restart_loaded_nowait(&cluster);
    let mut c = cluster.connect("ren_loaded");
    let m = marker("ren");
    let attempts: Vec<(String, Option<&str>)> = vec![
        (format!("/* {m} */ DELETE FROM hidden.audit_log"), Some("42501")),
        (format!("/* {m} */ TRUNCATE hidden.audit_log"), Some("42501")),
        (format!("/* {m} */ UPDATE hidden.audit_log SET statement = 'forged' WHERE seq = 1"), Some("42501")),
        (format!("/* {m} */ ALTER TABLE hidden.audit_log ADD COLUMN forged int"), Some("42501")),
    ];
    let wrong = run_expecting(&mut c, &attempts);
    assert_eq!(wrong, Vec::<String>::new(), "attempts on hidden.audit_log");
    assert!(query_i64(&mut c, "SELECT count(*) FROM hidden.audit_log", &[]) > 0, "hidden.audit_log was emptied");

    wait_appending_in(&mut c, "hidden");
    let marked = format!("SELECT '{m} still recorded'");
    c.simple_query(&marked).unwrap();
    let ok: bool = c.query_one("SELECT hidden.flush()", &[]).unwrap().get(0);
    assert!(ok, "hidden.flush() timed out");
    assert_eq!(records_where(&mut c, "hidden.audit_log", "statement = $1", &[&marked]).len(), 1, "{marked} not stored");
    assert_all_recorded(&mut c, "hidden.audit_log", &attempts);
    let v = c.query_one("SELECT ok, reason FROM hidden.verify_audit_chain()", &[]).unwrap();
    assert!(v.get::<_, bool>(0), "hidden.verify_audit_chain(): {:?}", v.get::<_, Option<String>>(1));

    // A decoy under the old name: allowed, but never written.
    c.batch_execute("CREATE SCHEMA custody; CREATE TABLE custody.audit_log (LIKE hidden.audit_log)")
        .expect("a decoy custody.audit_log may be created");
    let after_decoy = format!("SELECT '{m} after the decoy'");
    c.simple_query(&after_decoy).unwrap();
    c.batch_execute("CREATE TABLE public.ren_activity (id int); INSERT INTO public.ren_activity VALUES (1)").unwrap();
    let ok: bool = c.query_one("SELECT hidden.flush()", &[]).unwrap().get(0);
    assert!(ok, "hidden.flush() timed out after the decoy");
    assert_eq!(query_i64(&mut c, "SELECT count(*) FROM custody.audit_log", &[]), 0, "the writer wrote to the decoy");
    assert_eq!(
        records_where(&mut c, "hidden.audit_log", "statement = $1", &[&after_decoy]).len(),
        1,
        "{after_decoy} not stored in hidden.audit_log"
    );
    let v = c.query_one("SELECT ok, reason FROM hidden.verify_audit_chain()", &[]).unwrap();
    assert!(v.get::<_, bool>(0), "hidden.verify_audit_chain() after the decoy: {:?}", v.get::<_, Option<String>>(1));
}

/// The inheritance and partition attempts of 2c on `custody.<table>` (partition key `key`).
fn inheritance_attempts(m: &str, table: &str, key: &str, lo: &str, hi: &str) -> Vec<(String, Option<&'static str>)> {
    let s = table;
    let deny = Some("42501");
    vec![
        (format!("/* {m} */ CREATE TABLE public.c1_{s} () INHERITS (custody.{table})"), deny),
        (format!("/* {m} */ CREATE TABLE public.p1_{s} (LIKE custody.{table}) PARTITION BY RANGE ({key})"), None),
        (
            format!("/* {m} */ ALTER TABLE public.p1_{s} ATTACH PARTITION custody.{table} FOR VALUES FROM (MINVALUE) TO (MAXVALUE)"),
            deny,
        ),
        (format!("/* {m} */ CREATE TABLE public.c2_{s} PARTITION OF custody.{table} FOR VALUES FROM ({lo}) TO ({hi})"), deny),
        (format!("/* {m} */ CREATE TABLE public.t3_{s} (LIKE custody.{table})"), None),
        (format!("/* {m} */ ALTER TABLE public.t3_{s} INHERIT custody.{table}"), deny),
        (format!("/* {m} */ ALTER TABLE custody.{table} INHERIT public.t3_{s}"), deny),
        // Variant: the protected table second among several parents.
        (format!("/* {m} */ CREATE TABLE public.c5_{s} () INHERITS (public.t3_{s}, custody.{table})"), deny),
    ]
}

/// Attack: make a protected table a parent (its scans then include forged rows of a child),
/// a partition of a user table, or a child of one, as superuser while loaded; for the log,
/// its checkpoints, the policy store and (variant) the attribute store.
/// Defence: 42501 for each, recorded; `CREATE TABLE ... (LIKE custody.x)` (a copy) is allowed;
/// no pg_inherits row involves a protected table afterwards.
#[test]
fn inheritance_and_partitions_of_custody_tables_are_refused() {
    let (_cluster, mut c) = own("trust_inherit", 8, "inh");
    let m = marker("inh");
    let mut all = Vec::new();
    for (table, key, lo, hi) in [
        ("audit_log", "seq", "0", "10"),
        ("checkpoints", "seq", "0", "10"),
        ("policy_store", "name", "'a'", "'b'"),
        ("attribute_store", "role", "'a'", "'b'"),
    ] {
        let attempts = inheritance_attempts(&m, table, key, lo, hi);
        let wrong = run_expecting(&mut c, &attempts);
        assert_eq!(wrong, Vec::<String>::new(), "inheritance attempts on custody.{table}");
        all.extend(attempts);
    }
    let n = query_i64(
        &mut c,
        "SELECT count(*) FROM pg_inherits i JOIN pg_class r ON r.oid IN (i.inhrelid, i.inhparent) \
         WHERE r.relnamespace = 'custody'::regnamespace",
        &[],
    );
    assert_eq!(n, 0, "pg_inherits rows involve custody tables");
    flush(&mut c);
    assert_all_recorded(&mut c, "custody.audit_log", &all);
    assert_chain_ok(&mut c);
}

/// Attack: with the library unloaded, create an inheritance child of custody.audit_log and
/// put a forged copy of the newest record in it: while loaded, every plain scan of the log
/// (count(*), the auditors' queries) shows the forged row.
/// Defence: custody.verify_audit_chain() fails (ok = false) and says why: the log has an
/// inheritance child.
#[test]
fn inheritance_child_with_forged_rows_fails_verification() {
    let (cluster, mut c) = own("trust_forged_child", 9, "forge_setup");
    for i in 0..10 {
        c.simple_query(&format!("SELECT {i} AS forge_activity")).unwrap();
    }
    flush(&mut c);
    drop(c);
    cluster.restart_unloaded();
    let mut u = cluster.connect("forge_unloaded");
    u.batch_execute(
        "CREATE TABLE public.forged () INHERITS (custody.audit_log); \
         INSERT INTO public.forged SELECT * FROM ONLY custody.audit_log \
             WHERE seq = (SELECT max(seq) FROM ONLY custody.audit_log); \
         UPDATE public.forged SET statement = 'SELECT ''forged'''",
    )
    .unwrap();
    drop(u);
    restart_loaded_nowait(&cluster);
    let mut c = cluster.connect("forge_loaded");
    let extra = query_i64(
        &mut c,
        "SELECT (SELECT count(*) FROM custody.audit_log) - (SELECT count(*) FROM ONLY custody.audit_log)",
        &[],
    );
    assert_eq!(extra, 1, "the forged row is not visible through custody.audit_log");
    let v = verify(&mut c);
    eprintln!("verify with a forged child: {v:?}");
    assert!(!v.ok, "verify_audit_chain() accepts a log with a forged inheritance child: {v:?}");
    let reason = v.reason.clone().unwrap_or_default().to_lowercase();
    assert!(reason.contains("inherit"), "reason does not mention inheritance: {v:?}");
}

/// Runs `sql` (inside BEGIN ... ROLLBACK when `in_tx`) expecting a quick 42501; returns the
/// HINT, or a description of what went wrong.
fn refused_quickly(c: &mut Client, sql: &str, in_tx: bool) -> Result<String, String> {
    if in_tx {
        c.batch_execute("BEGIN").unwrap();
    }
    let (r, took) = timed(|| c.simple_query(sql));
    if in_tx {
        c.batch_execute("ROLLBACK").unwrap();
    }
    let code = match &r {
        Ok(_) => return Err(format!("{sql}: succeeded in {took:?}")),
        Err(e) => e.code().map(|s| s.code().to_string()).unwrap_or_else(|| format!("{e}")),
    };
    // Below lock_timeout (5 s), what a statement that waited for the lock takes.
    if code != "42501" || took >= Duration::from_secs(4) {
        return Err(format!("{sql}: {code} after {took:?}: {}", r.unwrap_err()));
    }
    Ok(r.unwrap_err().as_db_error().and_then(|d| d.hint()).unwrap_or_default().to_string())
}

/// Attack: maintenance commands and locks that rewrite the log or hold locks the writer's
/// appends wait for (CLUSTER, VACUUM FULL, REINDEX, LOCK in SHARE or stronger modes — as
/// variants EXCLUSIVE, SHARE ROW EXCLUSIVE, through a view, on custody.checkpoints, REINDEX
/// SCHEMA, VACUUM (FULL, ANALYZE)), row security and policies on the log, grants of write
/// privileges, and a database-wide VACUUM FULL. A reader holds ACCESS SHARE meanwhile, so
/// anything that takes the lock first waits (lock_timeout 5 s).
/// Defence: 42501 for each, in well under 2 s (refused before any lock is taken), recorded;
/// REINDEX CONCURRENTLY and GRANT SELECT succeed.
#[test]
fn maintenance_and_locks_on_the_log_are_refused_quickly() {
    let (cluster, mut c) = own("trust_maintenance", 10, "maint");
    c.batch_execute("CREATE ROLE ident_r LOGIN; CREATE VIEW public.log_view AS SELECT seq FROM custody.audit_log")
        .unwrap();
    let m = marker("maint");
    let mut holder = cluster.connect("maint_holder");
    holder.batch_execute("BEGIN; SELECT count(*) FROM custody.audit_log").unwrap();
    c.batch_execute("SET lock_timeout = '5s'").unwrap();

    let refused: Vec<(String, bool)> = [
        ("CLUSTER custody.audit_log USING audit_log_pkey", false),
        ("VACUUM FULL custody.audit_log", false),
        ("VACUUM (FULL, ANALYZE) custody.audit_log", false),
        ("REINDEX TABLE custody.audit_log", false),
        ("REINDEX INDEX custody.audit_log_pkey", false),
        ("REINDEX SCHEMA custody", false),
        ("LOCK TABLE custody.audit_log IN ACCESS EXCLUSIVE MODE", true),
        ("LOCK TABLE custody.audit_log IN SHARE MODE", true),
        ("LOCK TABLE custody.audit_log IN EXCLUSIVE MODE", true),
        ("LOCK TABLE custody.audit_log IN SHARE ROW EXCLUSIVE MODE", true),
        ("LOCK TABLE public.log_view IN ACCESS EXCLUSIVE MODE", true),
        ("LOCK TABLE custody.checkpoints IN ACCESS EXCLUSIVE MODE", true),
        ("ALTER TABLE custody.audit_log ENABLE ROW LEVEL SECURITY", false),
        ("CREATE POLICY p ON custody.audit_log USING (false)", false),
        ("GRANT INSERT ON custody.audit_log TO ident_r", false),
        ("GRANT UPDATE, DELETE ON ALL TABLES IN SCHEMA custody TO ident_r", false),
    ]
    .iter()
    .map(|(s, tx)| (format!("/* {m} */ {s}"), *tx))
    .collect();
    let mut wrong = Vec::new();
    for (sql, in_tx) in &refused {
        if let Err(e) = refused_quickly(&mut c, sql, *in_tx) {
            wrong.push(e);
        }
    }
    let vacuum_all = format!("/* {m} */ VACUUM FULL");
    match refused_quickly(&mut c, &vacuum_all, false) {
        Ok(hint) if hint.is_empty() => wrong.push(format!("{vacuum_all}: 42501 without a HINT")),
        Ok(_) => {}
        Err(e) => wrong.push(e),
    }
    holder.batch_execute("COMMIT").unwrap();
    assert_eq!(wrong, Vec::<String>::new(), "not refused, or not quickly");

    let allowed: Vec<String> = [
        "REINDEX TABLE CONCURRENTLY custody.audit_log",
        "GRANT SELECT ON custody.audit_log TO ident_r",
        "REVOKE SELECT ON custody.audit_log FROM ident_r",
    ]
    .iter()
    .map(|s| format!("/* {m} */ {s}"))
    .collect();
    for sql in &allowed {
        c.simple_query(sql).unwrap_or_else(|e| panic!("{sql}: {e}"));
    }
    let state: String = c
        .query_one(
            "SELECT relrowsecurity || ' ' || (SELECT count(*) FROM pg_policy WHERE polrelid = c.oid) || ' ' \
             || has_table_privilege('ident_r', c.oid, 'INSERT') || ' ' \
             || has_table_privilege('ident_r', 'custody.checkpoints', 'UPDATE') || ' ' \
             || has_table_privilege('ident_r', c.oid, 'SELECT') \
             FROM pg_class c WHERE c.oid = 'custody.audit_log'::regclass",
            &[],
        )
        .unwrap()
        .get(0);
    assert_eq!(state, "false 0 false false false", "row security, policies, ident_r's privileges");
    flush(&mut c);
    for (sql, _) in &refused {
        assert_recorded(&mut c, sql, "error", Some("42501"));
    }
    assert_recorded(&mut c, &vacuum_all, "error", Some("42501"));
    for sql in &allowed {
        assert_recorded(&mut c, sql, "success", None);
    }
    assert_chain_ok(&mut c);
}
