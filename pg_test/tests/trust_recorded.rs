//! Attack tests, family 4 (spec/trust.md): nothing runs unrecorded, with the default
//! custody.audit_catalog = off. Catalog writes, catalog-only reads that call functions with
//! effects, fast-path function calls, replication commands and logins (failed ones
//! included) all leave a record.
//!
//! These run on the shared cluster and clean up what they create; run with `--test-threads=1`.

use std::time::Duration;

use pg_custody_client_tests::wire::{Arg, Conn};
use pg_custody_client_tests::*;

/// Attack: change a role through its catalog row (pg_authid), which touches only pg_catalog
/// and so escaped the record; as variants, grant a role by inserting into pg_auth_members,
/// and the same UPDATE hidden in a CTE under a SELECT.
/// Defence: each is recorded, with the outcome the client saw (refused or not).
#[test]
fn catalog_writes_are_recorded() {
    let cluster = Cluster::shared();
    let m = marker("rec_authid");
    let role = format!("{m}_role");
    let mut c = cluster.connect(&m);
    let mut guard = CleanupOnDrop::new(&cluster);
    guard.add(format!("DROP ROLE IF EXISTS {role}"));
    c.batch_execute(&format!("CREATE ROLE {role} NOLOGIN")).unwrap();
    let attempts = [
        format!("/* {m} */ UPDATE pg_catalog.pg_authid SET rolsuper = true WHERE rolname = '{role}'"),
        format!(
            "/* {m} */ INSERT INTO pg_catalog.pg_auth_members \
             VALUES ('pg_read_server_files'::regrole, '{role}'::regrole, 10, false)"
        ),
        format!(
            "/* {m} */ WITH x AS (UPDATE pg_catalog.pg_authid SET rolcreaterole = true WHERE rolname = '{role}' \
             RETURNING 1) SELECT count(*) FROM x"
        ),
    ];
    let outcomes: Vec<Option<String>> = attempts
        .iter()
        .map(|sql| c.simple_query(sql).err().map(|e| e.code().map(|s| s.code().to_string()).unwrap_or_default()))
        .collect();
    flush(&mut c);
    for (sql, got) in attempts.iter().zip(&outcomes) {
        let outcome = if got.is_some() { "error" } else { "success" };
        assert_recorded(&mut c, sql, outcome, got.as_deref());
    }
    drop(guard);
}

/// Attack: statements whose range table holds only catalogs (not recorded with
/// audit_catalog = off) but whose functions read files, end sessions, move sequences, import
/// files, run user code or reload the configuration; variants: pg_ls_dir, a read through
/// information_schema, a user operator in WHERE, pg_stat_reset, a call without FROM.
/// Defence: each is recorded; a plain catalog read is not, until audit_catalog = on.
#[test]
fn catalog_only_reads_calling_unsafe_functions_are_recorded() {
    let cluster = Cluster::shared();
    let m = marker("rec_unsafe");
    let mut c = cluster.connect(&m);
    let mut guard = CleanupOnDrop::new(&cluster);
    guard.add(format!("DROP SEQUENCE IF EXISTS public.{m}_seq"));
    guard.add(format!("DROP FUNCTION IF EXISTS public.{m}_fn()"));
    guard.add("DROP OPERATOR IF EXISTS public.%%% (text, text)");
    guard.add(format!("DROP FUNCTION IF EXISTS public.{m}_op(text, text)"));
    c.batch_execute(&format!(
        "CREATE SEQUENCE public.{m}_seq; \
         CREATE FUNCTION public.{m}_fn() RETURNS int LANGUAGE sql AS 'SELECT 1'; \
         CREATE FUNCTION public.{m}_op(text, text) RETURNS bool LANGUAGE sql AS 'SELECT $1 = $2'; \
         DROP OPERATOR IF EXISTS public.%%% (text, text); \
         CREATE OPERATOR public.%%% (leftarg = text, rightarg = text, procedure = public.{m}_op)"
    ))
    .unwrap();
    let statements: Vec<String> = [
        "SELECT pg_catalog.pg_read_file('postgresql.conf', 0, 10) FROM pg_catalog.pg_class LIMIT 1".to_string(),
        "SELECT pg_catalog.pg_terminate_backend(pid) FROM pg_catalog.pg_stat_activity WHERE pid = -1".to_string(),
        format!("SELECT pg_catalog.setval('public.{m}_seq', 5) FROM pg_catalog.pg_class LIMIT 1"),
        "SELECT pg_catalog.lo_import('/etc/hostname') FROM pg_catalog.pg_class LIMIT 1".to_string(),
        format!("SELECT public.{m}_fn() FROM pg_catalog.pg_class LIMIT 1"),
        "SELECT pg_catalog.pg_reload_conf() FROM pg_catalog.pg_class LIMIT 1".to_string(),
        // Variants.
        "SELECT pg_catalog.pg_ls_dir('.') FROM pg_catalog.pg_class LIMIT 1".to_string(),
        "SELECT pg_catalog.pg_read_binary_file('postgresql.conf', 0, 10) FROM information_schema.schemata LIMIT 1"
            .to_string(),
        "SELECT count(*) FROM pg_catalog.pg_class WHERE relname::text OPERATOR(public.%%%) 'pg_class'".to_string(),
        "SELECT pg_catalog.pg_stat_reset() FROM pg_catalog.pg_class LIMIT 1".to_string(),
        "SELECT pg_catalog.pg_terminate_backend(-1)".to_string(),
    ]
    .iter()
    .map(|s| format!("/* {m} */ {s}"))
    .collect();
    for sql in &statements {
        let rows = c.simple_query(sql).unwrap_or_else(|e| panic!("{sql}: {e}"));
        if sql.contains("lo_import") {
            for msg in rows {
                if let postgres::SimpleQueryMessage::Row(r) = msg {
                    guard.add(format!("SELECT pg_catalog.lo_unlink({})", r.get(0).unwrap_or("0")));
                }
            }
        }
    }
    let plain_off = format!("SELECT relname FROM pg_catalog.pg_class LIMIT 1 /* {m} off */");
    let plain_on = format!("SELECT relname FROM pg_catalog.pg_class LIMIT 1 /* {m} on */");
    c.simple_query(&plain_off).unwrap();
    c.batch_execute("SET custody.audit_catalog = on").unwrap();
    c.simple_query(&plain_on).unwrap();
    c.batch_execute("RESET custody.audit_catalog").unwrap();
    flush(&mut c);

    let missing: Vec<&String> = statements.iter().filter(|s| records_of_statement(&mut c, s).is_empty()).collect();
    assert_eq!(missing, Vec::<&String>::new(), "catalog-only statements with effects not recorded");
    for sql in &statements {
        assert_recorded(&mut c, sql, "success", None);
    }
    assert_eq!(records_of_statement(&mut c, &plain_off).len(), 0, "plain catalog read recorded with audit_catalog = off");
    assert_recorded(&mut c, &plain_on, "success", None);
    drop(guard);
}

/// Count of records sent by `app` with this class, command and outcome whose objects name
/// `schema.name` as a function.
fn function_records(c: &mut Client, app: &str, outcome: &str, schema: &str, name: &str) -> i64 {
    query_i64(
        c,
        "SELECT count(*) FROM custody.audit_log WHERE application_name = $1 AND class = 'function' \
         AND command = 'FUNCTION CALL' AND outcome = $2 \
         AND objects @> jsonb_build_array(jsonb_build_object('kind', 'function', 'schema', $3::text, 'name', $4::text))",
        &[&app, &outcome, &schema, &name],
    )
}

/// Attack: the fast-path interface (protocol message FunctionCall) calls a function by OID
/// without any statement, so neither the executor nor the utility hooks see it: setval() on
/// a user sequence, lo_creat(), and (variant) a user function with a binary argument, as
/// superuser; lo_import() as an ordinary role, which PostgreSQL refuses.
/// Defence: each call is recorded: class 'function', command 'FUNCTION CALL', the function
/// in objects, outcome success; the refused call as error / 42501.
#[test]
fn fast_path_function_calls_are_recorded() {
    let cluster = Cluster::shared();
    let m = marker("rec_fp");
    let role = format!("{m}_r");
    let mut c = cluster.connect(&format!("{m}_admin"));
    let mut guard = CleanupOnDrop::new(&cluster);
    guard.add(format!("DROP SEQUENCE IF EXISTS public.{m}_seq"));
    guard.add(format!("DROP FUNCTION IF EXISTS public.{m}_fn(int)"));
    guard.add(format!("DROP ROLE IF EXISTS {role}"));
    c.batch_execute(&format!(
        "CREATE SEQUENCE public.{m}_seq; CREATE ROLE {role} LOGIN; \
         CREATE FUNCTION public.{m}_fn(int) RETURNS int LANGUAGE sql AS 'SELECT $1 + 1'"
    ))
    .unwrap();
    let fn_oid = query_i64(&mut c, &format!("SELECT 'public.{m}_fn(int)'::regprocedure::oid::int8"), &[]) as u32;

    let app = format!("{m}_fastpath");
    let mut w = Conn::connect(cluster.port, "postgres", "postgres", &app).expect("raw connection");
    let r = w.function_call(1576, &[Arg::text(&format!("public.{m}_seq")), Arg::text("42")], 0).expect("setval");
    assert_eq!(r.as_deref(), Some(&b"42"[..]), "setval result");
    let lo = w.function_call(957, &[Arg::int4(-1)], 0).expect("lo_creat").expect("lo_creat returns an oid");
    guard.add(format!("SELECT pg_catalog.lo_unlink({})", String::from_utf8_lossy(&lo)));
    let r = w.function_call(fn_oid, &[Arg::int4(41)], 1).expect("user function");
    assert_eq!(r, Some(42i32.to_be_bytes().to_vec()), "user function result (binary)");
    let seq_now = query_i64(&mut c, &format!("SELECT last_value FROM public.{m}_seq"), &[]);
    assert_eq!(seq_now, 42, "setval over fast path did not run");
    w.simple("SELECT custody.flush()").expect("flush over the raw connection");
    drop(w);

    let app_r = format!("{m}_fastpath_r");
    let mut w = Conn::connect(cluster.port, &role, "postgres", &app_r).expect("raw connection as ordinary role");
    let e = w.function_call(764, &[Arg::text("/etc/hostname")], 0).expect_err("lo_import as an ordinary role");
    assert_eq!(e.sqlstate, "42501", "{e}");
    w.simple("SELECT custody.flush()").expect("flush over the raw connection");
    drop(w);

    for (schema, name) in [("pg_catalog", "setval"), ("pg_catalog", "lo_creat"), ("public", format!("{m}_fn").as_str())] {
        assert_eq!(function_records(&mut c, &app, "success", schema, name), 1, "fast-path call of {schema}.{name}");
    }
    let refused = query_i64(
        &mut c,
        "SELECT count(*) FROM custody.audit_log WHERE application_name = $1 AND session_user_name = $2 \
         AND outcome = 'error' AND sqlstate = '42501'",
        &[&app_r, &role],
    );
    assert_eq!(refused, 1, "refused fast-path call of lo_import");
    drop(guard);
}

/// Attack: the replication protocol (walsender) runs its own commands, outside the executor
/// and utility hooks: IDENTIFY_SYSTEM, and a whole base backup of the cluster.
/// Defence: each command is recorded with its command tag, the replication role, the text.
#[test]
fn replication_commands_are_recorded() {
    let cluster = Cluster::shared();
    let m = marker("rec_repl");
    let role = format!("{m}_r");
    let mut c = cluster.connect(&m);
    let mut guard = CleanupOnDrop::new(&cluster);
    guard.add(format!("DROP ROLE IF EXISTS {role}"));
    c.batch_execute(&format!("CREATE ROLE {role} LOGIN REPLICATION")).unwrap();
    let port = cluster.port.to_string();
    let conn = format!("host=/tmp port={port} user={role} replication=true dbname=postgres");
    let (code, out, err) = psql(&[&conn, "-c", "IDENTIFY_SYSTEM"]);
    assert_eq!(code, 0, "IDENTIFY_SYSTEM: {out}{err}");
    wait_until(
        &mut c,
        "SELECT count(*) >= 1 FROM custody.audit_log WHERE command = 'IDENTIFY_SYSTEM' \
         AND session_user_name = $1 AND statement = 'IDENTIFY_SYSTEM'",
        &[&role],
        "record of IDENTIFY_SYSTEM",
    );

    let dir = std::path::PathBuf::from("/tmp").join(&m);
    std::fs::create_dir_all(&dir).unwrap();
    chown_postgres(&dir);
    let target = dir.join("backup");
    let pg_basebackup = pg_program("pg_basebackup");
    let (code, out, err) = as_postgres(
        pg_basebackup.to_str().unwrap(),
        &["-D", target.to_str().unwrap(), "-h", "/tmp", "-p", &port, "-U", &role, "-X", "none", "-c", "fast"],
    );
    let _ = std::fs::remove_dir_all(&dir);
    assert_eq!(code, 0, "pg_basebackup: {out}{err}");
    wait_until(
        &mut c,
        "SELECT count(*) >= 1 FROM custody.audit_log WHERE command = 'BASE_BACKUP' AND session_user_name = $1",
        &[&role],
        "record of BASE_BACKUP",
    );
    drop(guard);
}

/// Restores pg_hba.conf and reloads when dropped.
struct HbaGuard {
    path: std::path::PathBuf,
    original: String,
    port: u16,
}

impl Drop for HbaGuard {
    fn drop(&mut self) {
        if let Err(e) = std::fs::write(&self.path, &self.original) {
            eprintln!("restore {}: {e}", self.path.display());
        }
        let conn = format!("host=/tmp port={} user=postgres dbname=postgres", self.port);
        if let Ok(mut c) = Client::connect(&conn, NoTls) {
            let _ = c.simple_query("SELECT pg_reload_conf()");
        }
    }
}

/// (outcome, sqlstate, database_name, host(client_addr), message) of the LOGIN records
/// matching `condition` ($1 = `value`).
fn login_records(c: &mut Client, condition: &str, value: &str) -> Vec<(String, Option<String>, String, Option<String>, Option<String>)> {
    c.query(
        &format!(
            "SELECT outcome, sqlstate, database_name, host(client_addr), message FROM custody.audit_log \
             WHERE class = 'login' AND command = 'LOGIN' AND {condition} ORDER BY seq"
        ),
        &[&value],
    )
    .unwrap()
    .iter()
    .map(|r| (r.get(0), r.get(1), r.get(2), r.get(3), r.get(4)))
    .collect()
}

fn wait_login(c: &mut Client, condition: &str, value: &str, what: &str) {
    wait_until(
        c,
        &format!("SELECT count(*) >= 1 FROM custody.audit_log WHERE class = 'login' AND command = 'LOGIN' AND {condition}"),
        &[&value],
        what,
    );
}

/// Attack: connections are not statements: a login, and failed ones (a role that does not
/// exist, a database that does not exist, a wrong password over TCP) leave no trace.
/// Defence: each connection attempt is recorded, class 'login', command 'LOGIN': the success
/// under the role and database; the failures with outcome error and their SQLSTATE (28000,
/// 3D000, 28P01), the name tried, the client address and the message.
#[test]
fn logins_and_failed_logins_are_recorded() {
    let cluster = Cluster::shared();
    let m = marker("rec_login");
    let (user, nouser, nodb, pw_user) = (format!("{m}_u"), format!("{m}_nouser"), format!("{m}_nodb"), format!("{m}_pw"));
    let mut c = cluster.connect(&m);
    let mut guard = CleanupOnDrop::new(&cluster);
    guard.add(format!("DROP ROLE IF EXISTS {user}"));
    guard.add(format!("DROP ROLE IF EXISTS {pw_user}"));
    c.batch_execute(&format!("CREATE ROLE {user} LOGIN; CREATE ROLE {pw_user} LOGIN PASSWORD 'right'")).unwrap();

    let mut u = cluster.connect_as(&user, &format!("{m}_login"));
    flush(&mut u);
    drop(u);
    let recs = login_records(&mut c, "session_user_name = $1", &user);
    assert_eq!(recs.len(), 1, "LOGIN records of {user}: {recs:?}");
    assert_eq!((recs[0].0.as_str(), recs[0].1.as_deref(), recs[0].2.as_str()), ("success", None, "postgres"), "{recs:?}");

    let e = cluster.try_connect(&nouser, &m).err().expect("a role that does not exist connected");
    assert_eq!(e.code().map(|s| s.code()), Some("28000"), "{e}");
    wait_login(&mut c, "session_user_name = $1", &nouser, "LOGIN record of a role that does not exist");
    let recs = login_records(&mut c, "session_user_name = $1", &nouser);
    assert_eq!(recs.len(), 1, "{recs:?}");
    assert_eq!((recs[0].0.as_str(), recs[0].1.as_deref()), ("error", Some("28000")), "{recs:?}");

    let e = Client::connect(&format!("host=/tmp port={} user=postgres dbname={nodb}", cluster.port), NoTls)
        .err()
        .expect("a database that does not exist accepted a connection");
    assert_eq!(e.code().map(|s| s.code()), Some("3D000"), "{e}");
    let cond = "audit_log::text LIKE '%' || $1 || '%'";
    wait_login(&mut c, cond, &nodb, "LOGIN record of a database that does not exist");
    let recs = login_records(&mut c, cond, &nodb);
    assert_eq!(recs.len(), 1, "{recs:?}");
    assert_eq!((recs[0].0.as_str(), recs[0].1.as_deref()), ("error", Some("3D000")), "{recs:?}");

    // A wrong password over TCP: scram-sha-256 for this role only, first line of pg_hba.conf.
    let hba = cluster.dir.join("pg_hba.conf");
    let original = std::fs::read_to_string(&hba).unwrap();
    let _hba = HbaGuard { path: hba.clone(), original: original.clone(), port: cluster.port };
    std::fs::write(&hba, format!("host all {pw_user} 127.0.0.1/32 scram-sha-256\n{original}")).unwrap();
    c.simple_query("SELECT pg_reload_conf()").unwrap();
    let tcp = |password: &str| {
        Client::connect(
            &format!("host=127.0.0.1 port={} user={pw_user} password={password} dbname=postgres", cluster.port),
            NoTls,
        )
    };
    // Until the postmaster has reloaded, the old trust line accepts any password.
    let deadline = std::time::Instant::now() + WAIT;
    let e = loop {
        match tcp("wrong") {
            Err(e) => break e,
            Ok(_) => {
                assert!(std::time::Instant::now() < deadline, "pg_hba.conf not reloaded within {WAIT:?}");
                std::thread::sleep(Duration::from_millis(100));
            }
        }
    };
    assert_eq!(e.code().map(|s| s.code()), Some("28P01"), "{e}");
    tcp("right").expect("the right password over TCP");
    let cond = "session_user_name = $1 AND outcome = 'error'";
    wait_login(&mut c, cond, &pw_user, "LOGIN record of a wrong password");
    let recs = login_records(&mut c, cond, &pw_user);
    assert_eq!(recs.len(), 1, "{recs:?}");
    let r = &recs[0];
    assert_eq!((r.1.as_deref(), r.3.as_deref()), (Some("28P01"), Some("127.0.0.1")), "{r:?}");
    assert!(r.4.as_deref().unwrap_or("").contains("password authentication"), "message: {r:?}");
    drop(_hba);
    drop(guard);
}

/// Attack: act right after `CREATE EXTENSION pg_custody` commits, before the custody writer
/// next looks for the log (every 100 ms): another session's statements, and a write, ran
/// unrecorded.
/// Defence: the creating session says at its commit that the extension is there (and
/// publishes the empty policy store), so statements that start once its COMMIT has answered
/// are queued and stored when the writer opens the chain.
/// Also: `DROP EXTENSION` (custody.allow_drop) with the default `durability = commit` commits
/// at once; it waited for records the writer cannot store while the drop holds the log's
/// lock, and failed with 53000 after custody.failure_timeout.
#[test]
fn statements_right_after_create_extension_are_recorded() {
    let cluster = StopOnDrop(Cluster::own("rec_create", 54));
    let mut c = cluster.connect("rec_create");
    allow_drop(&cluster, &mut c);
    let mut c = cluster.connect("rec_create");
    let mut other = cluster.connect("rec_create_other");
    other.batch_execute("CREATE TABLE public.rc_t (v int)").unwrap();
    for round in 0..3 {
        c.batch_execute("DROP EXTENSION pg_custody CASCADE").unwrap();
        c.batch_execute("DROP SCHEMA IF EXISTS custody").unwrap();
        // The writer has seen the drop: nothing is recorded now.
        std::thread::sleep(Duration::from_millis(300));
        c.batch_execute("CREATE EXTENSION pg_custody").unwrap();
        let m = marker(&format!("rec_create_{round}"));
        other.batch_execute(&format!("SELECT 1 /* {m} read */")).unwrap();
        other.batch_execute(&format!("INSERT INTO public.rc_t VALUES ({round}) /* {m} write */")).unwrap();
        wait_ready(&mut c);
        // The last record may be queued just after the client got its answer: wait (bounded)
        // for it, then require exactly one of each.
        wait_until(
            &mut c,
            "SELECT count(*) >= 1 FROM custody.audit_log WHERE statement LIKE $1",
            &[&format!("%{m} write%")],
            &format!("round {round}: the record of the write"),
        );
        flush(&mut c);
        for what in ["read", "write"] {
            let n = query_i64(
                &mut c,
                "SELECT count(*) FROM custody.audit_log WHERE statement LIKE $1",
                &[&format!("%{m} {what}%")],
            );
            assert_eq!(n, 1, "round {round}: the {what} right after CREATE EXTENSION has {n} records");
        }
        assert_chain_ok(&mut c);
    }
}
