//! Attack tests, family 1 (spec/trust.md): pg_custody's own work is never a hole. Its
//! management functions run SQL with the extension owner's rights: a caller's search_path,
//! operators, event triggers, triggers and index expressions must not get user code run
//! inside that work, and indexes on the log must neither run user code nor block the writer.
//!
//! Every test uses its own fresh cluster (PGDATA-<suffix>, shared port + 1..5); run with
//! `--test-threads=1`.

use pg_custody_client_tests::*;

/// A fresh cluster, stopped when dropped, and a superuser session on it.
fn own(suffix: &str, offset: u16, app: &str) -> (StopOnDrop, Client) {
    let cluster = StopOnDrop(Cluster::own(suffix, offset));
    let c = cluster.connect(app);
    (cluster, c)
}

/// Count, and md5 over seq, hash and statement, of every record up to the current head:
/// equal before and after means no stored record was removed or changed.
fn fingerprint(c: &mut Client) -> (i64, i64, String) {
    let head = query_i64(c, "SELECT max(seq) FROM custody.audit_log", &[]);
    let r = c
        .query_one(
            "SELECT count(*), md5(string_agg(seq::text || ':' || encode(hash, 'hex') || ':' \
             || coalesce(statement, ''), ',' ORDER BY seq)) FROM custody.audit_log WHERE seq <= $1",
            &[&head],
        )
        .unwrap();
    (head, r.get(0), r.get(1))
}

/// The fingerprint of records 1..head taken earlier is unchanged, and nothing below it is missing.
fn assert_fingerprint_kept(c: &mut Client, before: &(i64, i64, String), what: &str) {
    let (head, n, md5) = before;
    let r = c
        .query_one(
            "SELECT count(*), md5(string_agg(seq::text || ':' || encode(hash, 'hex') || ':' \
             || coalesce(statement, ''), ',' ORDER BY seq)) FROM custody.audit_log WHERE seq <= $1",
            &[head],
        )
        .unwrap();
    assert_eq!((r.get::<_, i64>(0), r.get::<_, String>(1)), (*n, md5.clone()), "{what}: stored records changed");
    assert_eq!(*n, *head, "{what}: records below the head {head} are missing");
}

/// Shadows, in schema alice, of functions and operators that SQL run by pg_custody could
/// resolve through the caller's search_path. Each logs its call to alice.calls and tries to
/// make alice a superuser (which only works when it runs with the owner's rights).
const SHADOWS: &str = r#"
CREATE TABLE alice.calls (fn text, by_user text DEFAULT current_user);
GRANT INSERT ON alice.calls TO PUBLIC;
CREATE FUNCTION alice.hijack(fn text) RETURNS void LANGUAGE plpgsql AS $f$
BEGIN
    INSERT INTO alice.calls (fn) VALUES (fn);
    BEGIN
        EXECUTE 'ALTER ROLE alice SUPERUSER';
    EXCEPTION WHEN OTHERS THEN NULL;
    END;
END $f$;
GRANT EXECUTE ON FUNCTION alice.hijack(text) TO PUBLIC;
CREATE FUNCTION alice.now() RETURNS timestamptz LANGUAGE plpgsql AS
    $f$BEGIN PERFORM alice.hijack('now'); RETURN pg_catalog.statement_timestamp(); END$f$;
CREATE FUNCTION alice.decode(text, text) RETURNS bytea LANGUAGE plpgsql AS
    $f$BEGIN PERFORM alice.hijack('decode'); RETURN pg_catalog.decode($1, $2); END$f$;
CREATE FUNCTION alice.encode(bytea, text) RETURNS text LANGUAGE plpgsql AS
    $f$BEGIN PERFORM alice.hijack('encode'); RETURN pg_catalog.encode($1, $2); END$f$;
CREATE FUNCTION alice.to_regclass(text) RETURNS regclass LANGUAGE plpgsql AS
    $f$BEGIN PERFORM alice.hijack('to_regclass'); RETURN pg_catalog.to_regclass($1); END$f$;
CREATE FUNCTION alice.pg_advisory_xact_lock(bigint) RETURNS void LANGUAGE plpgsql AS
    $f$BEGIN PERFORM alice.hijack('pg_advisory_xact_lock'); PERFORM pg_catalog.pg_advisory_xact_lock($1); END$f$;
-- Variants: other built-ins such SQL plausibly calls, and operators (also found by search_path).
CREATE FUNCTION alice.statement_timestamp() RETURNS timestamptz LANGUAGE plpgsql AS
    $f$BEGIN PERFORM alice.hijack('statement_timestamp'); RETURN pg_catalog.statement_timestamp(); END$f$;
CREATE FUNCTION alice.current_setting(text) RETURNS text LANGUAGE plpgsql AS
    $f$BEGIN PERFORM alice.hijack('current_setting'); RETURN pg_catalog.current_setting($1); END$f$;
CREATE FUNCTION alice.current_database() RETURNS name LANGUAGE plpgsql AS
    $f$BEGIN PERFORM alice.hijack('current_database'); RETURN pg_catalog.current_database(); END$f$;
CREATE FUNCTION alice.jsonb_build_object(text, text) RETURNS jsonb LANGUAGE plpgsql AS
    $f$BEGIN PERFORM alice.hijack('jsonb_build_object'); RETURN pg_catalog.jsonb_build_object($1, $2); END$f$;
CREATE FUNCTION alice.text_eq(text, text) RETURNS boolean LANGUAGE plpgsql AS
    $f$BEGIN PERFORM alice.hijack('= (text, text)'); RETURN pg_catalog.texteq($1, $2); END$f$;
CREATE OPERATOR alice.= (leftarg = text, rightarg = text, procedure = alice.text_eq);
CREATE FUNCTION alice.oid_eq(oid, oid) RETURNS boolean LANGUAGE plpgsql AS
    $f$BEGIN PERFORM alice.hijack('= (oid, oid)'); RETURN pg_catalog.oideq($1, $2); END$f$;
CREATE OPERATOR alice.= (leftarg = oid, rightarg = oid, procedure = alice.oid_eq);
"#;

/// Attack: a custody_admin member shadows now(), decode(), encode(), to_regclass(),
/// pg_advisory_xact_lock() (and, as variants, statement_timestamp(), current_setting(),
/// current_database(), jsonb_build_object() and the `=` operators of text and oid) in her own
/// schema, puts it before pg_catalog in search_path, and calls every pg_custody function,
/// hoping one of them resolves her function while running with the extension owner's rights.
/// Defence: pg_custody's SQL resolves only built-ins; every call behaves as normal, none of
/// her functions runs (alice.calls stays empty) and she does not become superuser.
#[test]
fn custody_admin_cannot_hijack_store_functions_with_search_path() {
    let (cluster, mut su) = own("trust_search_path", 1, "sp_setup");
    su.batch_execute(
        "CREATE ROLE alice LOGIN; GRANT custody_admin, custody_auditor TO alice; \
         CREATE SCHEMA alice AUTHORIZATION alice; CREATE ROLE sp_victim LOGIN; \
         CREATE TABLE public.sp_rows (id int, tenant text)",
    )
    .unwrap();
    let mut a = cluster.connect_as("alice", "sp_alice");
    a.batch_execute(SHADOWS).expect("alice creates her shadows");
    a.batch_execute("SET search_path = alice, pg_catalog").unwrap();

    let calls = [
        "SELECT custody.set_policy('sp_policy', 'package custody\ndeny contains \"never\" if { input.command == \"NEVER\" }')",
        "SELECT custody.enable_policy('sp_policy', false)",
        "SELECT custody.enable_policy('sp_policy', true)",
        "SELECT custody.set_attribute('sp_victim', 'k1', '1')",
        "SELECT custody.set_attribute('sp_victim', 'k2', '\"v\"', valid_from => '2020-01-01 00:00:00+00', \
         valid_until => '2999-01-01 00:00:00+00')",
        "SELECT custody.clear_attribute('sp_victim', 'k1')",
        "SELECT custody.suspend('sp_victim', 'test')",
        "SELECT custody.resume('sp_victim')",
        "SELECT custody.create_row_policy('sp_rows_policy', 'public.sp_rows', using_expr => 'true')",
        "SELECT custody.drop_row_policy('sp_rows_policy')",
        "SELECT custody.drop_policy('sp_policy')",
        "SELECT * FROM custody.verify_audit_chain()",
        "SELECT * FROM custody.audit_head()",
        "SELECT custody.audit_digest()",
        "SELECT custody.status()",
        "SELECT count(*) FROM custody.export_audit()",
        // Variants: the functions any role may call, and flush.
        "SELECT custody.current_subject()",
        "SELECT custody.attribute('k2')",
        "SELECT custody.flush()",
    ];
    let mut failed = Vec::new();
    for sql in calls {
        if let Err(e) = a.simple_query(sql) {
            failed.push(format!("{sql}: {e}"));
        }
    }

    let rolsuper: bool =
        su.query_one("SELECT rolsuper FROM pg_roles WHERE rolname = 'alice'", &[]).unwrap().get(0);
    let called: Vec<String> = su
        .query("SELECT DISTINCT fn || ' as ' || by_user FROM alice.calls ORDER BY 1", &[])
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert!(!rolsuper, "alice became superuser; her functions ran as: {called:?}");
    assert_eq!(called, Vec::<String>::new(), "pg_custody ran alice's shadows");
    assert_eq!(failed, Vec::<String>::new(), "calls that did not behave as normal");

    // The calls did their work: the attribute with an explicit validity window is stored as
    // given, the policy and row policy are gone again.
    let r = su
        .query_one(
            "SELECT value::text, valid_from = '2020-01-01 00:00:00+00', set_by FROM custody.attributes \
             WHERE role = 'sp_victim' AND key = 'k2'",
            &[],
        )
        .unwrap();
    assert_eq!((r.get::<_, String>(0), r.get::<_, bool>(1), r.get::<_, String>(2)), ("\"v\"".into(), true, "alice".into()));
    assert_eq!(query_i64(&mut su, "SELECT count(*) FROM custody.policies", &[]), 0, "policies left");
    flush(&mut a);
    assert_chain_ok(&mut su);
    drop((a, su));
}

const ROLES: &str = "SELECT (custody.current_subject()->'roles')::text";

/// mallory's shadow of `=` on (oid, oid) that answers `answer`, in her schema.
fn mallory_operator(c: &mut Client, answer: bool) {
    c.batch_execute(&format!(
        "CREATE OR REPLACE FUNCTION mallory.f(oid, oid) RETURNS bool LANGUAGE sql AS 'SELECT {answer}'"
    ))
    .unwrap();
}

/// Attack: an ordinary role whose group is suspended shadows the `=` operator on oid in its
/// own schema, first in search_path, so that the membership lookup of the gate finds no
/// membership (operator answers false) and its statements run. Variant: the operator answers
/// true, so that mallory seems to hold every role (and is denied for an unrelated role's
/// suspension, or trusted as a member of roles she is not).
/// Defence: the gate's lookups use built-in operators only: `SELECT 1` is denied (42501,
/// recorded as denied), and custody.current_subject()->'roles' lists only her real roles.
#[test]
fn operator_shadowing_does_not_lift_a_suspension() {
    let (cluster, mut su) = own("trust_operator", 2, "op_setup");
    su.batch_execute(
        "CREATE ROLE grp NOLOGIN; CREATE ROLE mallory LOGIN IN ROLE grp; CREATE ROLE bystander NOLOGIN; \
         CREATE SCHEMA mallory AUTHORIZATION mallory",
    )
    .unwrap();
    let m = marker("op");
    // search_path from the startup packet: in force before mallory's first statement, so the
    // gate's first (cached) lookup of her roles already sees it.
    let shadowed = |app: &str| {
        Client::connect(
            &format!("{} options='-c search_path=mallory,pg_catalog'", cluster.conn_str("mallory", app)),
            NoTls,
        )
        .expect("mallory connects")
    };
    let mut setup = cluster.connect_as("mallory", "op_mallory_setup");
    mallory_operator(&mut setup, false);
    setup
        .batch_execute("CREATE OPERATOR mallory.= (leftarg = oid, rightarg = oid, procedure = mallory.f)")
        .unwrap();
    drop(setup);

    // Part 1: the operator answers false; grp is suspended.
    let mut mal = shadowed("op_mallory_false");
    mal.batch_execute("SET search_path = mallory, pg_catalog").unwrap();
    su.batch_execute("SELECT custody.suspend('grp', 'test')").unwrap();
    let stmt = format!("/* {m} */ SELECT 1");
    let (code, message, _) = db_error(mal.simple_query(&stmt), "mallory, member of suspended grp");
    assert_eq!(code, "42501", "{message}");
    assert!(message.contains("statement denied by pg_custody policy"), "not a policy denial: {message}");
    su.batch_execute("SELECT custody.resume('grp')").unwrap();
    flush(&mut mal);
    drop(mal);
    assert_recorded(&mut su, &stmt, "denied", Some("42501"));

    // Her real roles, as a session without the shadow sees them.
    let mut plain = cluster.connect_as("mallory", "op_mallory_plain");
    let real: String = plain.query_one(ROLES, &[]).unwrap().get(0);
    drop(plain);
    assert_eq!(real, r#"["grp", "mallory"]"#, "mallory's roles without the shadow");

    // Part 2: the operator answers true; an unrelated role is suspended.
    mallory_operator(&mut su, true);
    su.batch_execute("SELECT custody.suspend('bystander', 'unrelated')").unwrap();
    let mut mal = shadowed("op_mallory_true");
    let stmt2 = format!("/* {m}_true */ SELECT 1");
    let r = mal.simple_query(&stmt2);
    let roles: Result<String, _> = mal.query_one(ROLES, &[]).map(|r| r.get(0));
    su.batch_execute("SELECT custody.resume('bystander')").unwrap();
    assert!(r.is_ok(), "mallory denied for the suspension of a role she is not a member of: {r:?}");
    assert_eq!(roles.expect("current_subject()"), real, "roles seen through mallory's operator");
    flush(&mut mal);
    assert_recorded(&mut su, &stmt2, "success", None);
    assert_chain_ok(&mut su);
    drop((mal, su));
}

/// The event trigger function: counts its calls in a sequence (not rolled back with the
/// statement that fired it), tries to delete the newest record, and notes the tag.
fn event_trigger_setup(m: &str) -> String {
    format!(
        "CREATE SEQUENCE public.et_fired; \
         CREATE TABLE public.et_seen (tag text, event text); \
         CREATE FUNCTION public.et_fn() RETURNS event_trigger LANGUAGE plpgsql AS $f$ \
         BEGIN \
             PERFORM pg_catalog.nextval('public.et_fired'); \
             DELETE FROM custody.audit_log /* {m}_delete */ WHERE seq = (SELECT max(seq) FROM custody.audit_log); \
             INSERT INTO public.et_seen VALUES (tg_tag, tg_event); \
         END $f$; \
         CREATE EVENT TRIGGER et ON ddl_command_end EXECUTE FUNCTION public.et_fn(); \
         CREATE EVENT TRIGGER et_start ON ddl_command_start EXECUTE FUNCTION public.et_fn(); \
         CREATE EVENT TRIGGER et_drop ON sql_drop EXECUTE FUNCTION public.et_fn()"
    )
}

fn fired(c: &mut Client) -> i64 {
    query_i64(c, "SELECT CASE WHEN is_called THEN last_value ELSE 0 END FROM public.et_fired", &[])
}

/// Attack: event triggers (ddl_command_end, and as variants ddl_command_start and sql_drop)
/// whose function deletes the newest audit record, fired by the CREATE POLICY / ALTER TABLE /
/// DROP POLICY that create_row_policy and drop_row_policy run with the owner's rights.
/// Defence: event triggers do not fire inside pg_custody's own work: both calls succeed (for
/// a superuser and for a custody_admin member), the trigger never runs, no record is
/// deleted, the chain verifies. A plain CREATE TABLE does fire it, and its DELETE is refused
/// (42501) and recorded as a nested statement.
#[test]
fn event_trigger_does_not_fire_inside_row_policy_functions() {
    let (cluster, mut su) = own("trust_event_trigger", 3, "et_setup");
    let m = marker("et");
    su.batch_execute(
        "CREATE ROLE et_admin LOGIN; GRANT custody_admin TO et_admin; \
         CREATE TABLE public.et_t1 (id int); CREATE TABLE public.et_t2 (id int)",
    )
    .unwrap();
    let mut guard = CleanupOnDrop::new(&cluster);
    for et in ["et", "et_start", "et_drop"] {
        guard.add(format!("DROP EVENT TRIGGER IF EXISTS {et}"));
    }
    su.batch_execute(&event_trigger_setup(&m)).unwrap();
    let mut admin = cluster.connect_as("et_admin", "et_admin");
    flush(&mut su);
    let before = fingerprint(&mut su);

    let calls = [
        (true, "SELECT custody.create_row_policy('et_p1', 'public.et_t1', using_expr => 'true')"),
        (false, "SELECT custody.create_row_policy('et_p2', 'public.et_t2', using_expr => 'true')"),
        (true, "SELECT custody.drop_row_policy('et_p1')"),
        (false, "SELECT custody.drop_row_policy('et_p2')"),
    ];
    let mut failed = Vec::new();
    for (as_superuser, sql) in calls {
        let c = if as_superuser { &mut su } else { &mut admin };
        let r = c.simple_query(sql);
        if let Err(e) = r {
            failed.push(format!("{sql}: {e}"));
        } else if sql.contains("create_row_policy") {
            let n = query_i64(c, "SELECT count(*) FROM pg_policy WHERE polname LIKE 'et_p%'", &[]);
            assert!(n >= 1, "{sql} created no policy");
        }
    }
    assert_eq!(failed, Vec::<String>::new(), "row policy functions failed");
    assert_eq!(fired(&mut su), 0, "an event trigger fired inside pg_custody's own DDL");
    let seen: Vec<String> =
        su.query("SELECT tag || '/' || event FROM public.et_seen", &[]).unwrap().iter().map(|r| r.get(0)).collect();
    assert_eq!(seen, Vec::<String>::new(), "event trigger calls noted");
    assert_eq!(query_i64(&mut su, "SELECT count(*) FROM pg_policy WHERE polname LIKE 'et_p%'", &[]), 0);
    flush(&mut admin);
    flush(&mut su);
    assert_fingerprint_kept(&mut su, &before, "after the row policy functions");

    // A statement of the user's own does fire it, and the DELETE inside is refused.
    let create = format!("/* {m} */ CREATE TABLE public.et_plain (id int)");
    let (code, message, _) = db_error(su.simple_query(&create), "CREATE TABLE under the event trigger");
    assert_eq!(code, "42501", "{message}");
    assert!(fired(&mut su) >= 1, "the event trigger did not fire for a plain CREATE TABLE");
    flush(&mut su);
    assert_recorded(&mut su, &create, "error", Some("42501"));
    let deletes = records_where(
        &mut su,
        "custody.audit_log",
        "statement LIKE '%' || $1 || '%' AND command = 'DELETE'",
        &[&format!("/* {m}_delete */")],
    );
    assert_eq!(deletes.len(), 1, "records of the event trigger's DELETE: {deletes:?}");
    let d = &deletes[0];
    assert_eq!((d.outcome.as_str(), d.sqlstate.as_deref()), ("error", Some("42501")), "{d:?}");
    assert!(d.nesting_level >= 1, "the DELETE is not recorded as nested: {d:?}");
    assert_fingerprint_kept(&mut su, &before, "after the plain CREATE TABLE");
    drop(guard);
    assert_chain_ok(&mut su);
    drop((admin, su));
}

/// Attack: with the library unloaded, a superuser attaches user code to pg_custody's tables:
/// a row trigger on custody.policy_store (and, as a variant, a statement trigger on
/// custody.attribute_store), and an index on custody.audit_log whose expression calls a user
/// function (IMMUTABLE for CREATE INDEX, then replaced by a VOLATILE one that writes).
/// Defence: loaded, pg_custody refuses to work on tables that are not as it created them:
/// set_policy / set_attribute fail with XX001 (naming the triggers) and the trigger never
/// runs; the writer does not insert through the index (its function never runs) and says so
/// (state 'refusing...'); dropping the index unloaded recovers.
#[test]
fn user_code_attached_to_custody_tables_is_refused() {
    let (cluster, c) = own("trust_attached", 4, "att_setup");
    drop(c);
    cluster.restart_unloaded();
    let mut u = cluster.connect("att_unloaded");
    u.batch_execute(
        "CREATE TABLE public.t_seen (what text); \
         CREATE FUNCTION public.t_fn() RETURNS trigger LANGUAGE plpgsql AS \
             $f$BEGIN INSERT INTO public.t_seen VALUES (TG_TABLE_NAME); RETURN NEW; END$f$; \
         CREATE TRIGGER t_spy BEFORE INSERT ON custody.policy_store FOR EACH ROW EXECUTE FUNCTION public.t_fn(); \
         CREATE FUNCTION public.t_stmt_fn() RETURNS trigger LANGUAGE plpgsql AS \
             $f$BEGIN INSERT INTO public.t_seen VALUES (TG_TABLE_NAME); RETURN NULL; END$f$; \
         CREATE TRIGGER t_spy_stmt AFTER INSERT ON custody.attribute_store FOR EACH STATEMENT \
             EXECUTE FUNCTION public.t_stmt_fn()",
    )
    .unwrap();
    drop(u);
    cluster.restart_loaded();
    let mut c = cluster.connect("att_loaded");
    let m = marker("att");
    let set_policy = format!("/* {m} */ SELECT custody.set_policy('att_p', 'package custody')");
    let (code, message, _) = db_error(c.simple_query(&set_policy), "set_policy with a trigger on policy_store");
    assert_eq!(code, "XX001", "{message}");
    assert!(
        message.contains("custody.policy_store is not as pg_custody created it") && message.contains("trigger"),
        "message does not name the table and its triggers: {message}"
    );
    let set_attr = format!("/* {m} */ SELECT custody.set_attribute('postgres', 'k', '1')");
    let (code, message, _) = db_error(c.simple_query(&set_attr), "set_attribute with a trigger on attribute_store");
    assert_eq!(code, "XX001", "{message}");
    assert!(message.contains("custody.attribute_store"), "{message}");
    assert_eq!(query_i64(&mut c, "SELECT count(*) FROM public.t_seen", &[]), 0, "the user's trigger ran");
    flush(&mut c);
    assert_recorded(&mut c, &set_policy, "error", Some("XX001"));
    assert_recorded(&mut c, &set_attr, "error", Some("XX001"));
    drop(c);

    // An index whose expression runs user code that writes.
    cluster.restart_unloaded();
    let mut u = cluster.connect("att_unloaded");
    u.batch_execute(
        "DROP TRIGGER t_spy ON custody.policy_store; DROP TRIGGER t_spy_stmt ON custody.attribute_store; \
         CREATE TABLE public.idx_seen (seq bigint); \
         CREATE FUNCTION public.idx_fn(bigint) RETURNS bigint LANGUAGE plpgsql IMMUTABLE AS \
             $f$BEGIN RETURN $1; END$f$; \
         CREATE INDEX audit_log_spy ON custody.audit_log (public.idx_fn(seq)); \
         CREATE OR REPLACE FUNCTION public.idx_fn(bigint) RETURNS bigint LANGUAGE plpgsql VOLATILE AS \
             $f$BEGIN INSERT INTO public.idx_seen VALUES ($1); RETURN $1; END$f$",
    )
    .unwrap();
    drop(u);
    restart_loaded_nowait(&cluster);
    let mut c = cluster.connect("att_index");
    for i in 0..5 {
        c.simple_query(&format!("SELECT {i} /* {m} activity */")).unwrap();
    }
    // Until the writer has opened the log and refused it (never appending meanwhile).
    let deadline = std::time::Instant::now() + WAIT;
    let mut state = String::new();
    while std::time::Instant::now() < deadline && !state.starts_with("refusing") {
        state = c
            .query_one("SELECT custody.status()->>'state'", &[])
            .unwrap()
            .get::<_, Option<String>>(0)
            .unwrap_or_default();
        assert_ne!(state, "appending", "the writer appends through an index that runs user code");
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
    assert!(state.starts_with("refusing"), "writer state {state:?} does not report the refusal");
    assert_eq!(query_i64(&mut c, "SELECT count(*) FROM public.idx_seen", &[]), 0, "the index function ran");
    drop(c);

    cluster.restart_unloaded();
    let mut u = cluster.connect("att_unloaded");
    u.batch_execute("DROP INDEX custody.audit_log_spy").unwrap();
    drop(u);
    cluster.restart_loaded();
    let mut c = cluster.connect("att_recovered");
    flush(&mut c);
    assert_eq!(query_i64(&mut c, "SELECT count(*) FROM public.idx_seen", &[]), 0, "the index function ran");
    assert_chain_ok(&mut c);
}

/// Attack: indexes on the log, made while loaded: one whose expression or predicate calls a
/// user function (run by the writer at every append), and, as a variant, one whose operator
/// class compares with a user function; a plain (not CONCURRENTLY) CREATE INDEX or DROP
/// INDEX, which would block the writer for as long as it takes.
/// Defence: 42501 for user code and for the blocking forms (HINT: CONCURRENTLY), each
/// recorded; CREATE / DROP INDEX CONCURRENTLY of a plain index succeed.
#[test]
fn indexes_on_the_log_run_no_user_code_and_never_block() {
    let (_cluster, mut c) = own("trust_index", 5, "idx");
    c.batch_execute(
        "CREATE FUNCTION public.idx_fn(bigint) RETURNS bigint LANGUAGE plpgsql IMMUTABLE AS $f$BEGIN RETURN $1; END$f$; \
         CREATE FUNCTION public.evil_cmp(bigint, bigint) RETURNS int LANGUAGE plpgsql IMMUTABLE AS \
             $f$BEGIN RETURN pg_catalog.btint8cmp($1, $2); END$f$; \
         CREATE OPERATOR CLASS public.evil_ops FOR TYPE bigint USING btree AS \
             OPERATOR 1 <, OPERATOR 2 <=, OPERATOR 3 =, OPERATOR 4 >=, OPERATOR 5 >, \
             FUNCTION 1 public.evil_cmp(bigint, bigint)",
    )
    .unwrap();
    let m = marker("idx");
    let refused: Vec<(String, bool)> = vec![
        (format!("/* {m} */ CREATE INDEX ON custody.audit_log (public.idx_fn(seq))"), false),
        (format!("/* {m} */ CREATE INDEX CONCURRENTLY i ON custody.audit_log (seq) WHERE public.idx_fn(seq) > 0"), false),
        (format!("/* {m} */ CREATE INDEX CONCURRENTLY i ON custody.audit_log (seq public.evil_ops)"), false),
        (format!("/* {m} */ CREATE INDEX i ON custody.audit_log (session_user_name)"), true),
    ];
    for (sql, hint_concurrently) in &refused {
        let (code, message, hint) = db_error(c.simple_query(sql), sql);
        assert_eq!(code, "42501", "{sql}: {message}");
        if *hint_concurrently {
            assert!(hint.contains("CONCURRENTLY"), "{sql}: HINT {hint:?} does not mention CONCURRENTLY");
        }
    }
    let create = format!("/* {m} */ CREATE INDEX CONCURRENTLY i ON custody.audit_log (session_user_name, event_time)");
    c.simple_query(&create).expect("CREATE INDEX CONCURRENTLY of a plain index");
    let drop_plain = format!("/* {m} */ DROP INDEX custody.i");
    let (code, message, hint) = db_error(c.simple_query(&drop_plain), &drop_plain);
    assert_eq!(code, "42501", "{message}");
    assert!(hint.contains("CONCURRENTLY"), "HINT {hint:?} does not mention CONCURRENTLY");
    let drop_conc = format!("/* {m} */ DROP INDEX CONCURRENTLY custody.i");
    c.simple_query(&drop_conc).expect("DROP INDEX CONCURRENTLY");

    let indexes: Vec<String> = c
        .query(
            "SELECT indexrelid::regclass::text FROM pg_index WHERE indrelid = 'custody.audit_log'::regclass ORDER BY 1",
            &[],
        )
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(
        indexes,
        vec!["custody.audit_log_event_time_idx".to_string(), "custody.audit_log_pkey".to_string()],
        "indexes of custody.audit_log"
    );
    flush(&mut c);
    for (sql, _) in &refused {
        assert_recorded(&mut c, sql, "error", Some("42501"));
    }
    assert_recorded(&mut c, &drop_plain, "error", Some("42501"));
    assert_recorded(&mut c, &create, "success", None);
    assert_recorded(&mut c, &drop_conc, "success", None);
    assert_chain_ok(&mut c);
}

/// Attack: a custody_admin member who does not own a table puts their own code in a row
/// policy on it (a function of their schema, or a subquery): the expression would run as
/// every role that reads the table, with that role's privileges.
/// Defence: such a member may use only built-in functions and pg_custody's own in row
/// policies, no subqueries (42501, recorded, nothing created); the table's owner and
/// superusers may use anything, as CREATE POLICY allows them.
#[test]
fn row_policies_of_custody_admins_run_no_code_of_theirs() {
    let cluster = Cluster::shared();
    let m = marker("rp_confine");
    let admin = format!("{m}_admin");
    let mut su = cluster.connect("rp_setup");
    let mut cleanup = CleanupOnDrop::new(&cluster);
    su.batch_execute(&format!(
        "CREATE ROLE {admin} LOGIN; GRANT custody_admin TO {admin}; \
         CREATE SCHEMA {admin} AUTHORIZATION {admin}; \
         CREATE TABLE public.{m}_t (tenant int); CREATE TABLE public.{m}_own (tenant int); \
         ALTER TABLE public.{m}_own OWNER TO {admin}"
    ))
    .unwrap();
    cleanup.add(format!("DROP TABLE IF EXISTS public.{m}_t, public.{m}_own"));
    cleanup.add(format!("DROP SCHEMA IF EXISTS {admin} CASCADE"));
    cleanup.add(format!("DROP ROLE IF EXISTS {admin}"));
    let mut a = cluster.connect_as(&admin, "rp_admin");
    a.batch_execute(&format!("CREATE FUNCTION {admin}.leak() RETURNS boolean LANGUAGE sql AS 'SELECT true'"))
        .unwrap();

    let refused = [
        (format!("{admin}.leak()"), "function leak"),
        ("(SELECT true)".to_string(), "a subquery"),
        (format!("tenant = 1 AND {admin}.leak()"), "function leak"),
    ];
    for (i, (expr, what)) in refused.iter().enumerate() {
        let sql = format!(
            "/* {m} */ SELECT custody.create_row_policy('{m}_p{i}', 'public.{m}_t', using_expr => $x${expr}$x$)"
        );
        let (code, message, _) = db_error(a.simple_query(&sql), &sql);
        assert_eq!(code, "42501", "{sql}: {message}");
        assert!(message.contains(what), "{sql}: message {message:?} does not name {what:?}");
        flush(&mut a);
        let n = query_i64(
            &mut su,
            "SELECT count(*) FROM pg_catalog.pg_policy WHERE polname = $1",
            &[&format!("{m}_p{i}")],
        );
        assert_eq!(n, 0, "{sql}: the policy was created");
        flush(&mut su);
        assert_recorded(&mut su, &sql, "error", Some("42501"));
    }

    // Built-in functions and pg_custody's own are fine.
    a.batch_execute(&format!(
        "SELECT custody.create_row_policy('{m}_ok', 'public.{m}_t', \
         using_expr => $x$tenant = 1 OR custody.check('read', jsonb_build_object('tenant', tenant))$x$)"
    ))
    .unwrap();
    a.batch_execute(&format!("SELECT custody.drop_row_policy('{m}_ok')")).unwrap();
    // The owner of a table may put their own function there, and so may a superuser.
    a.batch_execute(&format!(
        "SELECT custody.create_row_policy('{m}_owner', 'public.{m}_own', using_expr => $x${admin}.leak()$x$)"
    ))
    .unwrap();
    a.batch_execute(&format!("SELECT custody.drop_row_policy('{m}_owner')")).unwrap();
    su.batch_execute(&format!(
        "SELECT custody.create_row_policy('{m}_su', 'public.{m}_t', using_expr => $x${admin}.leak()$x$); \
         SELECT custody.drop_row_policy('{m}_su')"
    ))
    .unwrap();
}
