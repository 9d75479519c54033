//! Attack tests, family 6 (spec/trust.md): secrets are not kept forever. The audit log is
//! append-only and kept for years, so a password in a statement, in an error message or in a
//! bind parameter would stay readable by every auditor for as long: they are redacted
//! before the record is queued.
//!
//! These run on the shared cluster and clean up what they create; run with `--test-threads=1`.

use pg_custody_client_tests::wire::{Arg, Conn};
use pg_custody_client_tests::*;

/// Records anywhere in the log containing `secret`, in any column.
fn leaks(c: &mut Client, secret: &str) -> Vec<String> {
    c.query(
        "SELECT seq || ': ' || audit_log::text FROM custody.audit_log WHERE audit_log::text LIKE '%' || $1 || '%'",
        &[&secret],
    )
    .unwrap()
    .iter()
    .map(|r| r.get(0))
    .collect()
}

/// Index in the attempts of 6a of the password given as a bare word (a syntax error).
const BARE_WORD: usize = 3;

/// What a statement of 6a must give: success, an error with this SQLSTATE, or either.
#[derive(Clone, Copy, PartialEq, Debug)]
enum Expect {
    Ok,
    Fails(&'static str),
    Either,
}

/// Attack: passwords in role DDL (quoted, dollar-quoted, E'' string, bare word that is a
/// syntax error whose message quotes it, followed by a syntax error, with a failing IN ROLE),
/// in foreign-server and user-mapping options and in subscription connection strings, also
/// sent as several statements in one query and through the extended protocol.
/// Defence: the stored statement has `<redacted>` where the secret was (exactly
/// `CREATE ROLE r PASSWORD <redacted>`), an error message quoting it is redacted too, the
/// rest stays readable (host=localhost), and the secret appears in no column of any record.
#[test]
fn passwords_and_connection_secrets_are_redacted() {
    let cluster = Cluster::shared();
    let m = marker("sec");
    let s = format!("S3cr3t_{m}");
    let (r1, r2, r3, r4) = (format!("{m}_r1"), format!("{m}_r2"), format!("{m}_r3"), format!("{m}_r4"));
    let (srv, srv_bad, sub) = (format!("{m}_srv"), format!("{m}_srv_bad"), format!("{m}_sub"));
    let mut c = cluster.connect(&m);
    let mut guard = CleanupOnDrop::new(&cluster);
    guard.add(format!("DROP USER MAPPING IF EXISTS FOR {r1} SERVER {srv}"));
    guard.add(format!("DROP SERVER IF EXISTS {srv}"));
    guard.add(format!("DROP SERVER IF EXISTS {srv_bad}"));
    guard.add(format!("ALTER SUBSCRIPTION {sub} DISABLE"));
    guard.add(format!("ALTER SUBSCRIPTION {sub} SET (slot_name = NONE)"));
    guard.add(format!("DROP SUBSCRIPTION IF EXISTS {sub}"));
    for r in [&r1, &r2, &r3, &r4] {
        guard.add(format!("DROP ROLE IF EXISTS {r}"));
    }

    // The exact form first: no marker comment, the role name carries the marker.
    let exact = format!("CREATE ROLE {r1} PASSWORD '{s}'");
    c.simple_query(&exact).expect(&exact);
    c.batch_execute(&format!(
        "CREATE EXTENSION IF NOT EXISTS postgres_fdw; \
         CREATE SERVER {srv} FOREIGN DATA WRAPPER postgres_fdw OPTIONS (host 'localhost')"
    ))
    .unwrap();
    let attempts: Vec<(String, Expect)> = vec![
        (format!("ALTER ROLE {r1} WITH ENCRYPTED PASSWORD '{s}'"), Expect::Ok),
        (format!("ALTER USER {r1} PASSWORD $${s}$$"), Expect::Ok),
        (format!("CREATE USER {r2} PASSWORD '{s}' BOGUS"), Expect::Fails("42601")),
        (format!("ALTER ROLE {r1} PASSWORD {s}"), Expect::Fails("42601")),
        (
            format!("CREATE SERVER {srv_bad} FOREIGN DATA WRAPPER postgres_fdw OPTIONS (host 'localhost', password '{s}')"),
            Expect::Either,
        ),
        (format!("CREATE USER MAPPING FOR {r1} SERVER {srv} OPTIONS (user 'u', password '{s}')"), Expect::Ok),
        (format!("ALTER USER MAPPING FOR {r1} SERVER {srv} OPTIONS (SET password '{s}_2')"), Expect::Ok),
        (
            format!(
                "CREATE SUBSCRIPTION {sub} CONNECTION 'host=localhost dbname=x password={s}' PUBLICATION p \
                 WITH (connect = false)"
            ),
            Expect::Either,
        ),
        // Variants.
        (format!("CREATE ROLE {r3} WITH LOGIN PASSWORD '{s}' VALID UNTIL 'infinity'"), Expect::Ok),
        (format!("ALTER ROLE {r3} PASSWORD E'{s}'"), Expect::Ok),
        (format!("CREATE ROLE {r4} PASSWORD '{s}' IN ROLE {m}_no_such_role"), Expect::Fails("42704")),
        (format!("ALTER SUBSCRIPTION {sub} CONNECTION 'host=localhost password={s}'"), Expect::Either),
    ];
    let mut wrong = Vec::new();
    let tagged: Vec<(String, String, Expect)> = attempts
        .iter()
        .enumerate()
        .map(|(i, (sql, e))| (format!("{m}_{i}"), format!("/* {m}_{i} */ {sql}"), *e))
        .collect();
    for (_, sql, expect) in &tagged {
        let got = c.simple_query(sql).err().map(|e| e.code().map(|s| s.code().to_string()).unwrap_or_default());
        let ok = match expect {
            Expect::Ok => got.is_none(),
            Expect::Fails(code) => got.as_deref() == Some(*code),
            Expect::Either => true,
        };
        if !ok {
            wrong.push(format!("{sql}: got {got:?}, want {expect:?}"));
        }
    }
    // Several statements in one query string, and the extended protocol.
    let multi_tag = format!("{m}_multi");
    let multi = format!("/* {multi_tag} */ SELECT 1; ALTER ROLE {r3} PASSWORD '{s}'");
    c.simple_query(&multi).expect("multi-statement query");
    let ext_tag = format!("{m}_ext");
    c.execute(format!("/* {ext_tag} */ ALTER ROLE {r3} PASSWORD '{s}'").as_str(), &[]).expect("extended protocol");
    flush(&mut c);
    assert_eq!(wrong, Vec::<String>::new(), "statements did not succeed or fail as expected");

    let leaked = leaks(&mut c, &s);
    assert_eq!(leaked, Vec::<String>::new(), "the secret is stored in the log");
    let stored: Vec<Option<String>> =
        records_of_statement(&mut c, &format!("CREATE ROLE {r1} PASSWORD <redacted>")).into_iter().map(|r| r.statement).collect();
    assert_eq!(stored.len(), 1, "no record stored as `CREATE ROLE {r1} PASSWORD <redacted>`");
    let mut checks: Vec<(String, Expect)> = tagged.iter().map(|(t, _, e)| (t.clone(), *e)).collect();
    checks.push((ext_tag.clone(), Expect::Ok));
    for (i, (tag, expect)) in checks.iter().enumerate() {
        let recs = records_where(&mut c, "custody.audit_log", "statement LIKE '%' || $1 || ' */%'", &[tag]);
        assert_eq!(recs.len(), 1, "records of {tag}: {recs:?}");
        let r = &recs[0];
        let text = r.statement.clone().unwrap_or_default();
        assert!(text.contains("<redacted>"), "{tag}: stored without <redacted>: {text}");
        match expect {
            Expect::Ok => assert_eq!((r.outcome.as_str(), r.sqlstate.as_deref()), ("success", None), "{r:?}"),
            Expect::Fails(code) => assert_eq!((r.outcome.as_str(), r.sqlstate.as_deref()), ("error", Some(*code)), "{r:?}"),
            Expect::Either => {}
        }
        if text.contains("SUBSCRIPTION") {
            assert!(text.contains("host=localhost"), "{tag}: the connection string is no longer readable: {text}");
        }
        if i == BARE_WORD {
            // The syntax error's message quoted the secret.
            let msg = r.message.clone().unwrap_or_default();
            assert!(msg.contains("<redacted>"), "{tag}: message not redacted: {msg:?}");
        }
    }
    let multi_recs = records_where(&mut c, "custody.audit_log", "statement LIKE '%' || $1 || '%'", &[&multi_tag]);
    assert!(!multi_recs.is_empty(), "the multi-statement query is not recorded");
    drop(guard);
}

/// Attack: a secret sent as a bind parameter whose conversion fails: PostgreSQL's error
/// message quotes the value (invalid input syntax for type integer: "..."), with the
/// `postgres` crate (error at execution) and with a raw Parse/Bind (error at Bind); as a
/// variant, a unique violation whose DETAIL quotes the key sent as a parameter.
/// Defence: each failed statement is recorded (statement text with $1, its SQLSTATE), and
/// the secret appears in no column of any record.
#[test]
fn bind_parameter_values_never_reach_the_log() {
    let cluster = Cluster::shared();
    let m = marker("bind");
    let app = format!("{m}_pg");
    let mut c = cluster.connect(&app);
    let mut guard = CleanupOnDrop::new(&cluster);
    guard.add(format!("DROP TABLE IF EXISTS public.{m}_t"));

    let s1 = format!("S3cr3t_{m}_1");
    let (code, msg, _) = db_error(c.query("SELECT $1::text::int", &[&s1]), "SELECT $1::text::int");
    assert_eq!(code, "22P02", "{msg}");
    c.batch_execute(&format!("CREATE TABLE public.{m}_t (k text PRIMARY KEY)")).unwrap();
    let s3 = format!("S3cr3t_{m}_3");
    let insert = format!("INSERT INTO public.{m}_t VALUES ($1)");
    c.execute(insert.as_str(), &[&s3]).expect("first insert");
    let (code, msg, _) = db_error(c.execute(insert.as_str(), &[&s3]), "duplicate insert");
    assert_eq!(code, "23505", "{msg}");
    flush(&mut c);

    let app_raw = format!("{m}_raw");
    let s2 = format!("S3cr3t_{m}_2");
    let mut w = Conn::connect(cluster.port, "postgres", "postgres", &app_raw).expect("raw connection");
    let e = w.extended("SELECT $1", &[23], &[Arg::text(&s2)]).expect_err("Bind of a non-integer as int4");
    assert_eq!(e.sqlstate, "22P02", "{e}");
    w.simple("SELECT custody.flush()").expect("flush over the raw connection");
    drop(w);

    let of = |c: &mut Client, app: &str, stmt: &str| {
        records_where(c, "custody.audit_log", "application_name = $1 AND statement = $2", &[&app, &stmt])
    };
    let recs = of(&mut c, &app, "SELECT $1::text::int");
    assert_eq!(recs.len(), 1, "records of SELECT $1::text::int: {recs:?}");
    assert_eq!((recs[0].outcome.as_str(), recs[0].sqlstate.as_deref()), ("error", Some("22P02")), "{recs:?}");
    let recs = of(&mut c, &app, &insert);
    let failed: Vec<_> = recs.iter().filter(|r| r.outcome == "error").collect();
    assert_eq!(failed.len(), 1, "records of the duplicate insert: {recs:?}");
    assert_eq!(failed[0].sqlstate.as_deref(), Some("23505"), "{recs:?}");
    let recs = of(&mut c, &app_raw, "SELECT $1");
    assert_eq!(recs.len(), 1, "records of the raw SELECT $1 that failed at Bind: {recs:?}");
    assert_eq!((recs[0].outcome.as_str(), recs[0].sqlstate.as_deref()), ("error", Some("22P02")), "{recs:?}");
    for s in [&s1, &s2, &s3] {
        assert_eq!(leaks(&mut c, s), Vec::<String>::new(), "a bind parameter value is stored in the log");
    }
    drop(guard);
}
