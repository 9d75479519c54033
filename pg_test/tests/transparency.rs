//! Loading pg_custody changes nothing a client sees but what it adds (issue 13). The same
//! statements, run on one cluster with the library loaded and again with it unloaded, must
//! give the same outcome: for an error its severity, SQLSTATE, message, detail, hint,
//! position (in the statement, or internal with its query), context, the schema, table,
//! column, datatype and constraint fields, and where PostgreSQL raised it; for a success the
//! same rows. PL/pgSQL EXCEPTION handlers catch what they were written for. With the library
//! loaded, each failed statement's record carries the error's real SQLSTATE.

use pg_custody_client_tests::*;
use postgres::error::ErrorPosition;
use postgres::{Client, SimpleQueryMessage};

const SETUP: &str = r#"
CREATE SCHEMA tr;
CREATE TABLE tr.t (id int PRIMARY KEY, v int NOT NULL CONSTRAINT v_positive CHECK (v > 0));
CREATE TABLE tr.child (id int REFERENCES tr.t (id));
CREATE TABLE tr.trig (v int);
CREATE DOMAIN tr.positive AS int CHECK (VALUE > 0);
CREATE FUNCTION tr.raise_custom() RETURNS int LANGUAGE plpgsql AS $f$
BEGIN
  RAISE EXCEPTION 'custom failure %', 42 USING ERRCODE = 'P1234', DETAIL = 'the detail', HINT = 'the hint';
END $f$;
CREATE FUNCTION tr.trig_fn() RETURNS trigger LANGUAGE plpgsql AS $f$
BEGIN
  RAISE SQLSTATE 'U9999' USING MESSAGE = 'trigger says no', TABLE = 'trig', COLUMN = 'v';
END $f$;
CREATE TRIGGER trig_no BEFORE INSERT ON tr.trig FOR EACH ROW EXECUTE FUNCTION tr.trig_fn();
CREATE FUNCTION tr.dynamic() RETURNS int LANGUAGE plpgsql AS $f$
BEGIN
  EXECUTE 'SELECT count(*) FROM tr.no_such_table';
  RETURN 1;
END $f$;
CREATE FUNCTION tr.nested_insert() RETURNS int LANGUAGE plpgsql AS $f$
BEGIN
  INSERT INTO tr.t VALUES (1, 1);
  RETURN 1;
END $f$;
CREATE FUNCTION tr.catches() RETURNS text LANGUAGE plpgsql AS $f$
DECLARE r text := ''; k text;
BEGIN
  BEGIN
    PERFORM tr.raise_custom();
  EXCEPTION WHEN SQLSTATE 'P1234' THEN
    r := r || 'caught P1234;';
  END;
  BEGIN
    INSERT INTO tr.trig VALUES (1);
  EXCEPTION WHEN SQLSTATE 'U9999' THEN
    r := r || 'caught U9999;';
  END;
  BEGIN
    INSERT INTO tr.t VALUES (1, 1);
  EXCEPTION WHEN unique_violation THEN
    GET STACKED DIAGNOSTICS k = CONSTRAINT_NAME;
    r := r || 'caught 23505 on ' || k || ';';
  END;
  BEGIN
    EXECUTE 'SELECT count(*) FROM tr.no_such_table';
  EXCEPTION WHEN undefined_table THEN
    r := r || 'caught 42P01;';
  END;
  RETURN r;
END $f$;
"#;

/// The statements, each run on its own (simple protocol); `tr.t` holds (1, 1) before each.
const STATEMENTS: &[&str] = &[
    // executor errors with name fields
    "INSERT INTO tr.t VALUES (1, 1)",
    "INSERT INTO tr.t VALUES (2, -1)",
    "INSERT INTO tr.t VALUES (3, NULL)",
    "INSERT INTO tr.child VALUES (99)",
    "UPDATE tr.t SET v = 0",
    "SELECT 1/0",
    // PL/pgSQL: custom SQLSTATEs, context lines, internal queries
    "SELECT tr.raise_custom()",
    "INSERT INTO tr.trig VALUES (1)",
    "SELECT tr.dynamic()",
    "SELECT tr.nested_insert()",
    "SELECT tr.catches()",
    "DO $$ BEGIN RAISE EXCEPTION 'from DO' USING ERRCODE = 'P0042', DETAIL = 'd', HINT = 'h', \
     SCHEMA = 's', TABLE = 't', COLUMN = 'c', DATATYPE = 'dt', CONSTRAINT = 'k'; END $$",
    "DO $$ BEGIN PERFORM tr.raise_custom(); END $$",
    // utility statements: positions
    "CREATE TABLE tr.bad (a no_such_type)",
    "ALTER TABLE tr.t ADD COLUMN w no_such_type",
    "CREATE INDEX ON tr.t (no_such_column)",
    "COMMENT ON TABLE tr.no_such_table IS 'x'",
    // parse-time errors (never inside a hook: the control group)
    "SELECT no_such_column FROM tr.t",
    "SELECT 'x'::tr.positive",
    "SELECT -1::tr.positive",
    // successes
    "SELECT id, v FROM tr.t",
    "SELECT tr.catches() AS again",
];

/// Everything a client can see of an outcome, as text.
fn outcome(c: &mut Client, sql: &str) -> String {
    match c.simple_query(sql) {
        Ok(msgs) => {
            let rows: Vec<String> = msgs
                .iter()
                .filter_map(|m| match m {
                    SimpleQueryMessage::Row(r) => {
                        Some((0..r.len()).map(|i| r.get(i).unwrap_or("NULL").to_string()).collect::<Vec<_>>().join("|"))
                    }
                    SimpleQueryMessage::CommandComplete(n) => Some(format!("complete {n}")),
                    _ => None,
                })
                .collect();
            format!("ok {rows:?}")
        }
        Err(e) => match e.as_db_error() {
            Some(d) => {
                let position = match d.position() {
                    Some(ErrorPosition::Original(p)) => format!("at {p}"),
                    Some(ErrorPosition::Internal { position, query }) => format!("internal at {position} of {query:?}"),
                    None => "none".into(),
                };
                format!(
                    "{} {} {:?}\n  detail {:?}\n  hint {:?}\n  position {position}\n  context {:?}\n  \
                     schema {:?} table {:?} column {:?} datatype {:?} constraint {:?}\n  raised in {:?} {:?}",
                    d.severity(),
                    d.code().code(),
                    d.message(),
                    d.detail(),
                    d.hint(),
                    d.where_(),
                    d.schema(),
                    d.table(),
                    d.column(),
                    d.datatype(),
                    d.constraint(),
                    d.file(),
                    d.routine(),
                )
            }
            None => format!("client error {e}"),
        },
    }
}

fn run_all(c: &mut Client) -> Vec<String> {
    STATEMENTS
        .iter()
        .map(|sql| {
            c.batch_execute("DELETE FROM tr.child; DELETE FROM tr.t; INSERT INTO tr.t VALUES (1, 1)").unwrap();
            outcome(c, sql)
        })
        .collect()
}

#[test]
fn errors_and_results_are_the_same_with_and_without_pg_custody() {
    let cluster = StopOnDrop(Cluster::own("transparency", 70));
    let mut c = cluster.connect("transparency_setup");
    c.batch_execute(SETUP).unwrap();
    drop(c);

    let mut c = cluster.connect("transparency_loaded");
    let loaded = run_all(&mut c);
    flush(&mut c);
    // The records carry the errors' own SQLSTATEs.
    let mut wrong_records = Vec::new();
    for (sql, code) in [
        ("SELECT tr.raise_custom()", "P1234"),
        ("INSERT INTO tr.trig VALUES (1)", "U9999"),
        ("INSERT INTO tr.t VALUES (1, 1)", "23505"),
        ("SELECT tr.dynamic()", "42P01"),
        ("CREATE TABLE tr.bad (a no_such_type)", "42704"),
    ] {
        // The client's statement (nested statements of the same text run in tr.catches()).
        let recs: Vec<Rec> = records_of_statement(&mut c, sql)
            .into_iter()
            .filter(|r| r.nesting_level == 0 && r.outcome == "error")
            .collect();
        if recs.len() != 1 || recs[0].sqlstate.as_deref() != Some(code) {
            wrong_records.push(format!("{sql}: want one failed record with {code}, got {recs:?}"));
        }
    }
    drop(c);

    cluster.restart_unloaded();
    let mut c = cluster.connect("transparency_unloaded");
    let unloaded = run_all(&mut c);
    drop(c);

    let differences: Vec<String> = STATEMENTS
        .iter()
        .zip(loaded.iter().zip(&unloaded))
        .filter(|(_, (l, u))| l != u)
        .map(|(sql, (l, u))| format!("{sql}\n without pg_custody: {u}\n with pg_custody:    {l}"))
        .collect();
    assert!(differences.is_empty(), "pg_custody changed what clients see:\n{}", differences.join("\n\n"));
    assert!(wrong_records.is_empty(), "records with the wrong SQLSTATE:\n{}", wrong_records.join("\n"));
    // The comparison means something only if the cases do what they are for.
    let get = |sql: &str| &unloaded[STATEMENTS.iter().position(|s| *s == sql).unwrap()];
    assert!(get("SELECT tr.catches()").contains("caught P1234;caught U9999;caught 23505 on t_pkey;caught 42P01;"), "{}", get("SELECT tr.catches()"));
    assert!(get("SELECT tr.dynamic()").contains("internal at"), "{}", get("SELECT tr.dynamic()"));
    assert!(get("CREATE TABLE tr.bad (a no_such_type)").contains("position at"), "{}", get("CREATE TABLE tr.bad (a no_such_type)"));
    assert!(get("INSERT INTO tr.t VALUES (1, 1)").contains("constraint Some(\"t_pkey\")"));
}

/// With a policy in force, deciding a statement reads the subject's roles. Doing that with a
/// query took the transaction's snapshot, so `SET TRANSACTION ISOLATION LEVEL` right after
/// BEGIN failed ("must be called before any query") whenever the backend's cache of roles
/// was empty: a session's first transaction, or after any role change in the cluster.
#[test]
fn set_transaction_right_after_begin_with_a_policy_in_force() {
    let cluster = Cluster::shared();
    let m = marker("tr_iso");
    let mut su = cluster.connect("tr_iso_setup");
    let mut cleanup = CleanupOnDrop::new(&cluster);
    cleanup.add(format!("SELECT custody.drop_policy('{m}')"));
    su.batch_execute(&format!(
        "SELECT custody.set_policy('{m}', 'package custody\ndeny contains \"never\" if input.subject.session_user == \"nobody_{m}\"')"
    ))
    .unwrap();
    for _ in 0..3 {
        let mut c = cluster.connect(&m);
        c.batch_execute("BEGIN; SET TRANSACTION ISOLATION LEVEL SERIALIZABLE, READ ONLY, DEFERRABLE; SELECT 1; COMMIT")
            .unwrap();
        // A role change anywhere empties every backend's cache of roles.
        su.batch_execute(&format!("CREATE ROLE {m}_r; DROP ROLE {m}_r")).unwrap();
        c.batch_execute("BEGIN; SET TRANSACTION READ ONLY; SELECT 1; COMMIT").unwrap();
    }
}
