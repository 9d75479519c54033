//! Records that say what happened (issue 13): rows of results fetched in chunks, the nesting
//! of statements a planner-evaluated function runs, no SETTINGS CHANGED record without a
//! changed value, COPY TO as a read, and a policy in force that does not override what
//! custody.audit and custody.audit_catalog say (a denial is always recorded).

use pg_custody_client_tests::*;
use postgres::Client;

/// Records of `command` by sessions with application_name `app`.
fn records_of_app(c: &mut Client, app: &str, command: &str) -> Vec<Rec> {
    records_where(c, "custody.audit_log", "application_name = $1 AND command = $2", &[&app, &command])
}

#[test]
fn rows_of_a_result_fetched_in_chunks_are_all_counted() {
    let cluster = Cluster::shared();
    let m = marker("rr_rows");
    let mut c = cluster.connect(&m);
    let mut cleanup = CleanupOnDrop::new(&cluster);
    cleanup.add(format!("DROP TABLE IF EXISTS public.{m}"));
    c.batch_execute(&format!("CREATE TABLE public.{m} AS SELECT g AS id FROM generate_series(1, 20) g")).unwrap();
    // A portal fetched 5 rows at a time (JDBC's setFetchSize, Execute with a row limit).
    let sql = format!("SELECT id FROM public.{m} ORDER BY id /* portal */");
    let mut tx = c.transaction().unwrap();
    let st = tx.prepare(&sql).unwrap();
    let portal = tx.bind(&st, &[]).unwrap();
    let mut fetched = 0;
    loop {
        let rows = tx.query_portal(&portal, 5).unwrap();
        if rows.is_empty() {
            break;
        }
        fetched += rows.len();
    }
    drop(portal);
    tx.commit().unwrap();
    assert_eq!(fetched, 20);
    // A cursor fetched with FETCH n.
    let cursor_sql = format!("SELECT id FROM public.{m} ORDER BY id /* cursor */");
    c.batch_execute(&format!("BEGIN; DECLARE {m}_c CURSOR FOR {cursor_sql}")).unwrap();
    for _ in 0..3 {
        c.batch_execute(&format!("FETCH 7 FROM {m}_c")).unwrap();
    }
    c.batch_execute("COMMIT").unwrap();
    flush(&mut c);
    let portal_rec = assert_recorded(&mut c, &sql, "success", None);
    assert_eq!(portal_rec.rows, Some(20), "rows of the portal fetched 5 at a time: {portal_rec:?}");
    let declared = format!("DECLARE {m}_c CURSOR FOR {cursor_sql}");
    let recs = records_where(&mut c, "custody.audit_log", "strpos(statement, $1) > 0 AND command = 'SELECT'", &[&"/* cursor */"]);
    let cursor: Vec<&Rec> = recs.iter().filter(|r| r.statement.as_deref().is_some_and(|s| s.contains(&m))).collect();
    assert_eq!(cursor.len(), 1, "one record of the cursor's query ({declared}): {recs:?}");
    assert_eq!(cursor[0].rows, Some(20), "rows of the cursor fetched 7 at a time: {:?}", cursor[0]);
}

#[test]
fn statements_a_folded_function_runs_are_nested() {
    let cluster = Cluster::shared();
    let m = marker("rr_nest");
    let mut c = cluster.connect(&m);
    let mut cleanup = CleanupOnDrop::new(&cluster);
    cleanup.add(format!("DROP SCHEMA IF EXISTS {m} CASCADE"));
    c.batch_execute(&format!(
        "CREATE SCHEMA {m}; CREATE TABLE {m}.t (v int); \
         CREATE FUNCTION {m}.imm(v int) RETURNS int LANGUAGE plpgsql IMMUTABLE AS \
         $f$ BEGIN PERFORM count(*) FROM {m}.t; RETURN v; END $f$"
    ))
    .unwrap();
    // Folded while the statement is planned: its query runs before the SELECT's executor.
    let sql = format!("SELECT {m}.imm(7) AS folded");
    c.batch_execute(&sql).unwrap();
    flush(&mut c);
    let select = assert_recorded(&mut c, &sql, "success", None);
    assert_eq!(select.nesting_level, 0);
    let nested = records_where(&mut c, "custody.audit_log", "strpos(objects::text, $1) > 0", &[&format!("\"{m}\"").as_str()]);
    assert_eq!(nested.len(), 1, "{nested:?}");
    assert!(nested[0].nesting_level >= 1, "the query the folded function ran is recorded as the client's: {:?}", nested[0]);
}

#[test]
fn settings_changed_only_when_a_value_changed() {
    let cluster = Cluster::shared();
    let m = marker("rr_set");
    let mut su = cluster.connect("rr_set_setup");
    // A session whose first statement is BEGIN; parallel workers (forced); a reload that
    // changes nothing for a new session.
    let mut c = cluster.connect(&m);
    c.batch_execute("BEGIN; SELECT 1; COMMIT").unwrap();
    c.batch_execute(
        "SET max_parallel_workers_per_gather = 2; SET parallel_setup_cost = 0; SET parallel_tuple_cost = 0; \
         SET min_parallel_table_scan_size = 0",
    )
    .unwrap();
    c.batch_execute(if cluster_major(&mut su) >= 16 { "SET debug_parallel_query = on" } else { "SET force_parallel_mode = on" })
        .unwrap();
    c.batch_execute("SELECT count(*) FROM pg_catalog.pg_class").unwrap();
    su.batch_execute("SELECT pg_reload_conf()").unwrap();
    std::thread::sleep(std::time::Duration::from_millis(300));
    let mut fresh = cluster.connect(&m);
    fresh.batch_execute("SELECT 1").unwrap();
    flush(&mut c);
    flush(&mut fresh);
    let spurious = records_of_app(&mut su, &m, "SETTINGS CHANGED");
    assert!(spurious.is_empty(), "SETTINGS CHANGED records without a changed value: {spurious:?}");
    // A real change is recorded.
    c.batch_execute("SET custody.audit_statement = none").unwrap();
    c.batch_execute("SELECT 2").unwrap();
    flush(&mut c);
    let changed = records_of_app(&mut su, &m, "SETTINGS CHANGED");
    assert_eq!(changed.len(), 1, "{changed:?}");
}

fn cluster_major(c: &mut Client) -> i64 {
    query_i64(c, "SELECT current_setting('server_version_num')::int8 / 10000", &[])
}

#[test]
fn copy_to_is_a_read() {
    let cluster = Cluster::shared();
    let m = marker("rr_copy");
    let mut c = cluster.connect(&m);
    let mut cleanup = CleanupOnDrop::new(&cluster);
    cleanup.add(format!("DROP TABLE IF EXISTS public.{m}"));
    c.batch_execute(&format!("CREATE TABLE public.{m} (v int); INSERT INTO public.{m} VALUES (1)")).unwrap();
    let out = format!("COPY public.{m} TO STDOUT");
    let mut reader = c.copy_out(out.as_str()).unwrap();
    std::io::copy(&mut reader, &mut std::io::sink()).unwrap();
    drop(reader);
    // A COPY TO that fails before PostgreSQL could parse it is classified from its text.
    let bad = format!("COPY public.{m} TO STDOUT WITH WITH");
    assert!(c.batch_execute(&bad).is_err());
    let input = format!("COPY public.{m} FROM STDIN");
    let mut w = c.copy_in(input.as_str()).unwrap();
    std::io::Write::write_all(&mut w, b"2\n").unwrap();
    w.finish().unwrap();
    flush(&mut c);
    let r = assert_recorded(&mut c, &out, "success", None);
    assert_eq!(r.class, "read", "{r:?}");
    let r = assert_recorded(&mut c, &bad, "error", Some("42601"));
    assert_eq!(r.class, "read", "{r:?}");
    let r = assert_recorded(&mut c, &input, "success", None);
    assert_eq!(r.class, "write", "{r:?}");
}

#[test]
fn a_policy_in_force_does_not_override_what_custody_audit_records() {
    let cluster = Cluster::shared();
    let m = marker("rr_pol");
    let mut su = cluster.connect("rr_pol_setup");
    let mut cleanup = CleanupOnDrop::new(&cluster);
    cleanup.add(format!("SELECT custody.drop_policy('{m}')"));
    cleanup.add(format!("DROP TABLE IF EXISTS public.{m}_open, public.{m}_closed"));
    su.batch_execute(&format!("CREATE TABLE public.{m}_open (v int); CREATE TABLE public.{m}_closed (v int)")).unwrap();
    su.batch_execute(&format!(
        "SELECT custody.set_policy('{m}', $rego$
package custody
deny contains \"closed\" if {{
    some o in input.objects
    o.name == \"{m}_closed\"
}}
$rego$)"
    ))
    .unwrap();
    let mut c = cluster.connect(&m);
    c.batch_execute("SET custody.audit = 'write'").unwrap();
    let allowed = format!("SELECT v FROM public.{m}_open");
    let denied = format!("SELECT v FROM public.{m}_closed");
    let catalog = format!("SELECT relname FROM pg_catalog.pg_class WHERE relname = '{m}_open'");
    c.batch_execute(&allowed).unwrap();
    assert_eq!(sqlstate(c.batch_execute(&denied)), "42501");
    c.batch_execute("RESET custody.audit").unwrap();
    c.batch_execute(&catalog).unwrap();
    flush(&mut c);
    assert!(records_of_statement(&mut su, &allowed).is_empty(), "an allowed read was recorded with custody.audit = 'write'");
    assert_recorded(&mut su, &denied, "denied", Some("42501"));
    assert!(
        records_of_statement(&mut su, &catalog).is_empty(),
        "a read of the catalogs was recorded with custody.audit_catalog = off"
    );
}

/// The objects of a record are what the catalogs say when the statement runs (issue 16's
/// per-backend memo of range-table descriptions must not keep a name): a table, a column and
/// a schema renamed — by another session and by this one — are named anew in the next
/// record of the same relation and columns.
#[test]
fn objects_follow_renames() {
    let cluster = Cluster::shared();
    let m = marker("rr_rename");
    let mut c = cluster.connect(&m);
    let mut other = cluster.connect(&format!("{m}_other"));
    let mut cleanup = CleanupOnDrop::new(&cluster);
    for s in ["", "_s2", "_s3"] {
        cleanup.add(format!("DROP SCHEMA IF EXISTS {m}{s} CASCADE"));
    }
    c.batch_execute(&format!("CREATE SCHEMA {m}; CREATE TABLE {m}.t (a int, b int); INSERT INTO {m}.t VALUES (1, 2)")).unwrap();
    let objects_of = |c: &mut Client, sql: &str| -> serde_json::Value {
        c.simple_query(sql).unwrap();
        flush(c);
        let recs = records_of_statement(c, sql);
        assert_eq!(recs.len(), 1, "one record of {sql}");
        serde_json::from_str(&recs[0].objects).unwrap()
    };
    let names = |v: &serde_json::Value| -> (String, String, Vec<String>) {
        let o = &v[0];
        let mut cols: Vec<String> = o["columns"].as_array().unwrap().iter().map(|c| c.as_str().unwrap().to_string()).collect();
        cols.sort();
        (o["schema"].as_str().unwrap().to_string(), o["name"].as_str().unwrap().to_string(), cols)
    };
    let q1 = format!("SELECT b FROM {m}.t WHERE a = 1 /* 1 */");
    assert_eq!(names(&objects_of(&mut c, &q1)), (m.clone(), "t".into(), vec!["a".into(), "b".into()]));
    // Run twice: the second is described from the memo, and must say the same.
    let q1b = format!("SELECT b FROM {m}.t WHERE a = 1 /* 1b */");
    assert_eq!(names(&objects_of(&mut c, &q1b)), (m.clone(), "t".into(), vec!["a".into(), "b".into()]));

    // Another session renames the table and a column: the same relation and column numbers.
    other.batch_execute(&format!("ALTER TABLE {m}.t RENAME TO u; ALTER TABLE {m}.u RENAME COLUMN b TO c")).unwrap();
    let q2 = format!("SELECT c FROM {m}.u WHERE a = 1 /* 2 */");
    assert_eq!(names(&objects_of(&mut c, &q2)), (m.clone(), "u".into(), vec!["a".into(), "c".into()]));

    // ... and the schema.
    other.batch_execute(&format!("ALTER SCHEMA {m} RENAME TO {m}_s2")).unwrap();
    let q3 = format!("SELECT c FROM {m}_s2.u WHERE a = 1 /* 3 */");
    assert_eq!(names(&objects_of(&mut c, &q3)), (format!("{m}_s2"), "u".into(), vec!["a".into(), "c".into()]));

    // This session renames them itself, inside one transaction with the statement.
    let q4 = format!("SELECT d FROM {m}_s3.v WHERE a = 1 /* 4 */");
    c.batch_execute(&format!(
        "BEGIN; ALTER SCHEMA {m}_s2 RENAME TO {m}_s3; ALTER TABLE {m}_s3.u RENAME TO v; \
         ALTER TABLE {m}_s3.v RENAME COLUMN c TO d; {q4}; COMMIT"
    ))
    .unwrap();
    flush(&mut c);
    let recs = records_where(&mut c, "custody.audit_log", "statement = $1", &[&q4]);
    assert_eq!(recs.len(), 1, "one record of {q4}: {recs:?}");
    let v: serde_json::Value = serde_json::from_str(&recs[0].objects).unwrap();
    assert_eq!(names(&v), (format!("{m}_s3"), "v".into(), vec!["a".into(), "d".into()]));
}
