//! Trust II: the gate cannot be side-stepped (time per statement, open portals and COPY
//! checked again, replication and fast-path gated, roles from the catalog whatever the
//! search_path), no lost update and no fail-open window, administrators cannot lock
//! themselves out (break-glass, conflicting sets refused), and poolers' housekeeping is not
//! denied. docs/policies.md says what is gated and why.
//!
//! Each test uses its own fresh cluster (PGDATA-gate, shared port + 20): the policies in
//! force are cluster-wide. Run with `--test-threads=1`.

use std::io::Write as _;
use std::time::{Duration, Instant};

use pg_custody_client_tests::wire::{Arg, Conn};
use pg_custody_client_tests::*;

const PORT_OFFSET: u16 = 20;

fn gate_cluster() -> (StopOnDrop, Client) {
    let cluster = StopOnDrop(Cluster::own("gate", PORT_OFFSET));
    let c = cluster.connect("gate_admin");
    (cluster, c)
}

fn one(c: &mut Client, sql: &str) -> Result<i64, postgres::Error> {
    c.query_one(sql, &[]).map(|r| r.get(0))
}

/// Outcomes of the records of `command` by `app`, in order.
fn outcomes(c: &mut Client, app: &str, command: &str) -> Vec<(String, Option<String>, Option<String>)> {
    c.query(
        "SELECT outcome, sqlstate, decision::text FROM custody.audit_log \
         WHERE application_name = $1 AND command = $2 ORDER BY seq",
        &[&app, &command],
    )
    .unwrap()
    .iter()
    .map(|r| (r.get(0), r.get(1), r.get(2)))
    .collect()
}

const CLEARANCE: &str = r#"package custody

deny contains "gate_t needs clearance" if {
    some o in input.objects
    o.name == "gate_t"
    not input.subject.attributes.clearance == "high"
}
"#;

/// Time is judged when each statement starts, nested ones included: an attribute that
/// expires while `pg_sleep` runs no longer admits the next statement of the same message,
/// nor the next statement of a DO block.
#[test]
fn time_is_per_statement() {
    let (cluster, mut b) = gate_cluster();
    b.batch_execute(
        "CREATE ROLE gate_a LOGIN; CREATE TABLE public.gate_t (id int); INSERT INTO public.gate_t VALUES (1); \
         GRANT SELECT ON public.gate_t TO gate_a",
    )
    .unwrap();
    b.execute("SELECT custody.set_policy('clearance', $1)", &[&CLEARANCE]).unwrap();
    let mut a = cluster.connect_as("gate_a", "gate_time");
    for (what, sql) in [
        ("two statements of one message", "SELECT pg_sleep(5); SELECT count(*) FROM public.gate_t"),
        ("a DO block", "DO $$ BEGIN PERFORM pg_sleep(5); PERFORM count(*) FROM public.gate_t; END $$"),
    ] {
        b.batch_execute(
            "SELECT custody.set_attribute('gate_a', 'clearance', '\"high\"', valid_until => now() + interval '4 seconds')",
        )
        .unwrap();
        assert_eq!(one(&mut a, "SELECT count(*) FROM public.gate_t").expect("valid clearance"), 1);
        let detail = assert_denied(a.batch_execute(sql), what);
        assert!(detail.contains("gate_t needs clearance"), "{what}: {detail:?}");
    }
    drop(a);
    drop(cluster);
}

/// A portal fetched in chunks (Execute with a row limit, FETCH from a cursor) and an open
/// COPY FROM STDIN are decided again by what is in force at each chunk / at their end.
#[test]
fn open_work_is_rechecked() {
    let (cluster, mut b) = gate_cluster();
    b.batch_execute(
        "CREATE ROLE gate_a LOGIN; CREATE TABLE public.gate_big AS SELECT g AS id FROM generate_series(1, 1000) g; \
         GRANT SELECT, INSERT ON public.gate_big TO gate_a; \
         SELECT custody.set_policy('nothing', 'package custody\n\ndeny contains \"never\" if input.command == \"VACUUM\"\n')",
    )
    .unwrap();
    let app = "gate_portal";
    let mut a = cluster.connect_as("gate_a", app);

    // Extended protocol, row limit 2 (what JDBC's setFetchSize does).
    // Bound (the plan starts) before the suspension, first executed after it.
    let mut tx = a.transaction().unwrap();
    let portal = tx.bind("SELECT id FROM public.gate_big ORDER BY id", &[]).unwrap();
    b.batch_execute("SELECT custody.suspend('gate_a', 'offboarded')").unwrap();
    assert_denied(tx.query_portal(&portal, 0), "first Execute of a portal bound before the suspension");
    drop(tx);
    b.batch_execute("SELECT custody.resume('gate_a')").unwrap();

    let mut tx = a.transaction().unwrap();
    let portal = tx.bind("SELECT id FROM public.gate_big ORDER BY id", &[]).unwrap();
    assert_eq!(tx.query_portal(&portal, 2).unwrap().len(), 2);
    b.batch_execute("SELECT custody.suspend('gate_a', 'offboarded')").unwrap();
    let detail = assert_denied(tx.query_portal(&portal, 2), "next chunk of a portal after the suspension");
    assert!(detail.contains("offboarded"), "{detail:?}");
    drop(tx);
    b.batch_execute("SELECT custody.resume('gate_a')").unwrap();

    // FETCH from a cursor.
    a.batch_execute("BEGIN; DECLARE c CURSOR FOR SELECT id FROM public.gate_big ORDER BY id").unwrap();
    a.simple_query("FETCH 2 FROM c").expect("FETCH before the suspension");
    b.batch_execute("SELECT custody.suspend('gate_a', 'offboarded')").unwrap();
    assert_denied(a.simple_query("FETCH 2 FROM c"), "FETCH after the suspension");
    a.batch_execute("ROLLBACK").expect("ROLLBACK is never denied");
    b.batch_execute("SELECT custody.resume('gate_a')").unwrap();

    // COPY FROM STDIN: rows sent after the suspension are never committed.
    let before = one(&mut b, "SELECT count(*) FROM public.gate_big").unwrap();
    let mut w = a.copy_in("COPY public.gate_big (id) FROM STDIN").unwrap();
    w.write_all(b"2001\n2002\n").unwrap();
    w.flush().unwrap();
    b.batch_execute("SELECT custody.suspend('gate_a', 'offboarded')").unwrap();
    w.write_all(b"2003\n").unwrap();
    let r = w.finish();
    assert_denied(r, "COPY FROM STDIN finished after the suspension");
    assert_eq!(one(&mut b, "SELECT count(*) FROM public.gate_big").unwrap(), before, "the COPY's rows were committed");
    b.batch_execute("SELECT custody.resume('gate_a')").unwrap();

    // A COPY that started while nothing at all was in force, and the first suspension ever.
    b.batch_execute("SELECT custody.drop_policy('nothing')").unwrap();
    let mut w = a.copy_in("COPY public.gate_big (id) FROM STDIN").unwrap();
    w.write_all(b"3001\n").unwrap();
    w.flush().unwrap();
    b.batch_execute("SELECT custody.suspend('gate_a', 'offboarded')").unwrap();
    assert_denied(w.finish(), "COPY started with nothing in force, finished after a suspension");
    assert_eq!(one(&mut b, "SELECT count(*) FROM public.gate_big").unwrap(), before, "the COPY's rows were committed");
    b.batch_execute("SELECT custody.resume('gate_a')").unwrap();

    // A denied statement's record is queued at the abort after the client has its error.
    wait_until(
        &mut b,
        "SELECT count(*) >= 5 FROM custody.audit_log WHERE application_name = $1 AND outcome = 'denied'",
        &[&app],
        "the denied chunks, FETCH and COPYs recorded",
    );
    let fetches = outcomes(&mut b, app, "SELECT");
    let denied = |recs: &[(String, Option<String>, Option<String>)]| {
        recs.iter()
            .filter(|(o, s, d)| o == "denied" && s.as_deref() == Some("42501") && d.as_deref().unwrap_or("").contains("offboarded"))
            .count()
    };
    assert_eq!(denied(&fetches), 2, "the portals' denied chunks are not recorded: {fetches:?}");
    let fetch = outcomes(&mut b, app, "FETCH");
    assert_eq!(denied(&fetch), 1, "the denied FETCH is not recorded: {fetch:?}");
    let copies = outcomes(&mut b, app, "COPY");
    assert_eq!(denied(&copies), 2, "the denied COPYs are not recorded: {copies:?}");
    assert_chain_ok(&mut b);
    drop(a);
    drop(cluster);
}

/// Replication commands and fast-path calls pass the gate: a suspended REPLICATION role
/// takes no base backup (the command ends with 57014 before it runs, recorded as denied), and
/// gets its fast-path call denied.
#[test]
fn replication_and_fast_path_are_gated() {
    let (cluster, mut b) = gate_cluster();
    b.batch_execute("CREATE ROLE gate_repl LOGIN REPLICATION; SELECT custody.suspend('gate_repl', 'key rotated')").unwrap();
    let target = std::env::temp_dir().join(format!("gate-basebackup-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&target);
    let out = std::process::Command::new(pg_program("pg_basebackup"))
        .args(["-h", "/tmp", "-p", &cluster.port.to_string(), "-U", "gate_repl", "-X", "none", "-c", "fast", "-D"])
        .arg(&target)
        .output()
        .expect("run pg_basebackup");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "pg_basebackup by a suspended role succeeded: {stderr}");
    let _ = std::fs::remove_dir_all(&target);
    wait_until(
        &mut b,
        "SELECT count(*) >= 1 FROM custody.audit_log WHERE session_user_name = 'gate_repl' \
         AND outcome = 'denied' AND sqlstate = '57014' AND decision::text LIKE '%key rotated%'",
        &[],
        &format!("a denied replication command of gate_repl (pg_basebackup said: {stderr})"),
    );

    // Fast-path (libpq's PQfn): pg_catalog.int4abs(-5) by the suspended role.
    b.batch_execute("CREATE ROLE gate_fp LOGIN; SELECT custody.suspend('gate_fp', 'key rotated')").unwrap();
    let oid: i64 = query_i64(&mut b, "SELECT 'pg_catalog.int4abs'::regproc::oid::int8", &[]);
    let mut fp = Conn::connect(cluster.port, "gate_fp", "postgres", "gate_fp").expect("connect");
    let e = fp.function_call(oid as u32, &[Arg::int4(-5)], 0).expect_err("fast-path call by a suspended role");
    assert_eq!(e.sqlstate, "42501", "{e}");
    drop(cluster);
}

/// The subject's roles come from the catalog: an `=` operator on oid that the session's
/// search_path puts first changes nothing (a member of a suspended group stays suspended).
#[test]
fn no_identity_tricks() {
    let (cluster, mut b) = gate_cluster();
    b.batch_execute(
        "CREATE ROLE gate_team NOLOGIN; CREATE ROLE gate_m LOGIN IN ROLE gate_team; \
         CREATE SCHEMA gate_m AUTHORIZATION gate_m; SELECT custody.suspend('gate_team', 'incident')",
    )
    .unwrap();
    b.batch_execute("SELECT custody.resume('gate_team')").unwrap();
    let mut m = cluster.connect_as("gate_m", "gate_identity");
    m.batch_execute(
        "CREATE FUNCTION gate_m.never(oid, oid) RETURNS bool LANGUAGE sql IMMUTABLE AS 'SELECT false'; \
         CREATE OPERATOR gate_m.= (LEFTARG = oid, RIGHTARG = oid, FUNCTION = gate_m.never); \
         SET search_path = gate_m, pg_catalog",
    )
    .unwrap();
    b.batch_execute("SELECT custody.suspend('gate_team', 'incident')").unwrap();
    let detail = assert_denied(one(&mut m, "SELECT 1::int8"), "member of a suspended group, own = operator first");
    assert!(detail.contains("gate_team"), "{detail:?}");
    drop(m);
    drop(cluster);
}

const DENY_ALL: &str = "package custody\n\ndeny contains \"everything is denied\" if true\n";

/// A policy set right after CREATE EXTENSION is in force for the next session; so is one set
/// while the writer starts after a restart. Publishing never replaces a newer state.
#[test]
fn no_lost_update() {
    let (cluster, mut b) = gate_cluster();
    b.batch_execute("CREATE ROLE gate_a LOGIN").unwrap();
    allow_drop(&cluster, &mut b);
    let mut b = cluster.connect("gate_admin");
    for round in 0..4 {
        // The DROP's own records cannot be stored in the log it drops: do not wait for them.
        b.batch_execute("SET custody.durability = async").unwrap();
        b.batch_execute("DROP EXTENSION pg_custody CASCADE").unwrap();
        b.batch_execute("RESET custody.durability").unwrap();
        b.batch_execute("CREATE EXTENSION pg_custody").unwrap();
        b.execute("SELECT custody.set_policy('deny_all', $1)", &[&DENY_ALL]).unwrap();
        let mut a = cluster.connect_as("gate_a", "gate_lost");
        assert_denied(one(&mut a, "SELECT 1::int8"), &format!("round {round}: first statement of a new session"));
        b.batch_execute("SELECT custody.drop_policy('deny_all')").unwrap();
    }
    // Across a restart: the change committed while the writer starts is not undone.
    drop(b);
    cluster.start();
    let mut b = cluster.connect("gate_admin");
    b.execute("SELECT custody.set_policy('deny_all', $1)", &[&DENY_ALL]).unwrap();
    std::thread::sleep(Duration::from_secs(2));
    let mut a = cluster.connect_as("gate_a", "gate_lost");
    assert_denied(one(&mut a, "SELECT 1::int8"), "after a restart");
    drop((a, b));
    drop(cluster);
}

/// Until the policy state is known after a start, statements wait (custody.failure_timeout)
/// and are then denied, not let through. Here the writer cannot start at all
/// (max_worker_processes = 0); the superuser recovers with SET custody.enforce = off, which
/// the gate never denies.
#[test]
fn fail_closed_until_the_policy_state_is_known() {
    let (cluster, mut b) = gate_cluster();
    for sql in ["CREATE ROLE gate_a LOGIN", "ALTER SYSTEM SET max_worker_processes = 0", "ALTER SYSTEM SET custody.failure_timeout = 500"] {
        b.batch_execute(sql).unwrap();
    }
    drop(b);
    cluster.start();
    let mut a = cluster.connect_as("gate_a", "gate_unknown");
    let started = Instant::now();
    let detail = assert_denied(one(&mut a, "SELECT 1::int8"), "before the policy state is known");
    assert!(detail.contains("not known yet"), "{detail:?}");
    assert!(started.elapsed() >= Duration::from_millis(400), "denied without waiting: {:?}", started.elapsed());
    let mut b = cluster.connect("gate_admin");
    for sql in ["SET custody.enforce = off", "ALTER SYSTEM RESET max_worker_processes", "ALTER SYSTEM RESET custody.failure_timeout"] {
        b.batch_execute(sql).unwrap_or_else(|e| panic!("recovery, {sql}: {e}"));
    }
    drop((a, b));
    cluster.start();
    let mut a = cluster.connect_as("gate_a", "gate_unknown");
    assert_eq!(one(&mut a, "SELECT 1::int8").expect("once the writer published"), 1);
    drop(a);
    drop(cluster);
}

/// Sets that cannot be evaluated together are refused with 22023 and change nothing; an
/// evaluation error says which rule of which policy failed.
#[test]
fn conflicting_sets_are_refused() {
    let (cluster, mut b) = gate_cluster();
    b.batch_execute("CREATE ROLE gate_a LOGIN").unwrap();
    b.execute("SELECT custody.set_policy('a_set', $1)", &[&"package custody\n\ndeny contains \"x\" if input.command == \"VACUUM\"\n"]).unwrap();
    let (code, message, _) = error_detail(
        b.execute("SELECT custody.set_policy('b_string', $1)", &[&"package custody\n\ndeny := \"not a set\"\n"]),
        "deny := string beside deny contains",
    );
    assert_eq!(code, "22023", "{message}");
    assert!(message.contains("rule deny of policy"), "{message}");
    b.execute("SELECT custody.set_policy('c_true', $1)", &[&"package custody\n\nallow := true\n"]).unwrap();
    let (code, message, _) = error_detail(
        b.execute("SELECT custody.set_policy('d_false', $1)", &[&"package custody\n\nallow := false\n"]),
        "allow := false beside allow := true",
    );
    assert_eq!(code, "22023", "{message}");
    assert!(message.contains("rule allow of policy d_false") && message.contains("conflicts"), "{message}");
    // Disabled, then enabled: the same check.
    b.execute("SELECT custody.set_policy('e_cond', $1)", &[&"package custody\n\nallow := true if input.command == \"TRUNCATE TABLE\"\n"]).unwrap();
    // Nothing refused is in force: an ordinary statement passes.
    let mut a = cluster.connect_as("gate_a", "gate_sets");
    assert_eq!(one(&mut a, "SELECT 1::int8").expect("refused policies are not in force"), 1);
    // A conflict only some statements meet is found when one is decided: the denial names
    // the rule and the policy.
    b.execute("SELECT custody.set_policy('f_cond', $1)", &[&"package custody\n\nallow := false if input.command == \"TRUNCATE TABLE\"\n"]).unwrap();
    b.batch_execute("CREATE TABLE public.gate_tr (id int); GRANT TRUNCATE ON public.gate_tr TO gate_a").unwrap();
    let detail = assert_denied(a.batch_execute("TRUNCATE public.gate_tr"), "TRUNCATE meets the conflict");
    assert!(detail.contains("rule allow of policy") && detail.contains("conflicts"), "{detail:?}");
    drop(a);
    drop(cluster);
}

/// Break-glass: under a policy that denies everything, the superuser still drops it, sets
/// custody.enforce, runs ALTER SYSTEM of custody.* and pg_reload_conf(); everything else is
/// denied, and each call is recorded.
#[test]
fn administrators_cannot_be_locked_out() {
    let (cluster, mut b) = gate_cluster();
    b.batch_execute("CREATE ROLE gate_boss LOGIN IN ROLE custody_admin; CREATE TABLE public.gate_x (id int)").unwrap();
    b.execute("SELECT custody.set_policy('deny_all', $1)", &[&DENY_ALL]).unwrap();
    let mut s = cluster.connect("gate_glass");
    assert_denied(one(&mut s, "SELECT 1::int8"), "ordinary statement under deny-all");
    assert_denied(s.batch_execute("SELECT custody.drop_policy('deny_all') FROM public.gate_x"), "a management call that reads a table");
    s.batch_execute("SELECT pg_reload_conf()").expect("pg_reload_conf is break-glass");
    s.batch_execute("ALTER SYSTEM SET custody.enforce = 'on'").expect("ALTER SYSTEM of custody.* is break-glass");
    s.batch_execute("ALTER SYSTEM RESET custody.enforce").expect("ALTER SYSTEM RESET of custody.*");
    s.batch_execute("SET custody.enforce = dry_run; RESET custody.enforce").expect("SET custody.enforce");
    // A custody_admin member too.
    let mut boss = cluster.connect_as("gate_boss", "gate_glass");
    assert_denied(one(&mut boss, "SELECT 1::int8"), "custody_admin member, ordinary statement");
    boss.batch_execute("SELECT custody.suspend('gate_boss', 'test'), custody.resume('gate_boss')").expect("custody_admin member manages");
    // Break-glass lets through the fix and nothing else: no WHERE, no domain, no user type,
    // no volatile built-in in the arguments, only the recovery settings.
    s.batch_execute("SET custody.enforce = off").unwrap();
    s.batch_execute(
        "CREATE FUNCTION public.gate_evil() RETURNS bool LANGUAGE plpgsql AS 'BEGIN RETURN true; END'; \
         CREATE DOMAIN public.gate_d AS text CHECK (public.gate_evil()); \
         CREATE TYPE public.gate_e AS ENUM ('a')",
    )
    .unwrap();
    s.batch_execute("RESET custody.enforce").unwrap();
    for (what, sql) in [
        ("WHERE with a user function", "SELECT custody.resume('nobody') WHERE public.gate_evil()"),
        ("a domain argument", "SELECT custody.resume(('x'::public.gate_d)::text)"),
        ("a user type through a built-in", "SELECT custody.resume(to_json('a'::public.gate_e)::text)"),
        ("a volatile built-in argument", "SELECT custody.resume(set_config('search_path', 'public', false))"),
        ("ALTER SYSTEM RESET ALL", "ALTER SYSTEM RESET ALL"),
        ("ALTER SYSTEM of another custody setting", "ALTER SYSTEM SET custody.failure_timeout = 1000"),
        ("SET ROLE spelled \"Role\"", "SET \"Role\" TO gate_boss"),
    ] {
        assert_denied(s.batch_execute(sql), what);
    }
    s.batch_execute("SELECT custody.drop_policy('deny_all')").expect("drop_policy is break-glass");
    assert_eq!(one(&mut s, "SELECT 1::int8").unwrap(), 1);
    flush(&mut s);
    let recorded = query_i64(
        &mut s,
        "SELECT count(*) FROM custody.audit_log WHERE application_name = 'gate_glass' \
         AND statement IN ('SELECT pg_reload_conf()', 'SELECT custody.drop_policy(''deny_all'')')",
        &[],
    );
    assert_eq!(recorded, 2, "break-glass calls are recorded");
    drop((s, boss));
    drop(cluster);
}

/// A pooler's session housekeeping (SET/RESET of settings, RESET ALL, DISCARD ALL) is
/// recorded but never denied; SET ROLE stays gated.
#[test]
fn pooler_housekeeping_is_not_denied() {
    let (cluster, mut b) = gate_cluster();
    b.batch_execute("CREATE ROLE gate_pool LOGIN; CREATE ROLE gate_other; GRANT gate_other TO gate_pool").unwrap();
    let mut p = cluster.connect_as("gate_pool", "gate_pool");
    b.batch_execute("SELECT custody.suspend('gate_pool', 'contract ended')").unwrap();
    for sql in ["SET application_name = 'gate_pool'", "RESET ALL", "DISCARD ALL", "SET statement_timeout = 0", "RESET statement_timeout", "SET SESSION work_mem = '8MB'"] {
        p.batch_execute(sql).unwrap_or_else(|e| panic!("{sql}: {e}"));
    }
    assert_denied(p.batch_execute("SET ROLE gate_other"), "SET ROLE by a suspended role");
    let detail = assert_denied(one(&mut p, "SELECT 1::int8"), "the pooled query");
    assert!(detail.contains("contract ended"), "{detail:?}");
    drop(p);
    drop(cluster);
}
