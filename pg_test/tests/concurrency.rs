//! Eight sessions write and read one table at once: the chain stays valid and gapless, and
//! every statement each session sent has exactly one record.

use pg_custody_client_tests::*;

const THREADS: usize = 8;
const STATEMENTS: usize = 50;

/// The 50 statements of one thread (each sent alone with simple_query = one record).
/// Ids are unique per thread, so the only failures are the intended ones.
fn statements(table: &str, t: usize) -> Vec<(String, bool)> {
    let mut out = Vec::new();
    let base = (t as i64 + 1) * 1_000_000;
    let mut i = 0i64;
    while out.len() < STATEMENTS {
        let id = base + i;
        let group = vec![
            (format!("INSERT INTO {table} (id, v) VALUES ({id}, 0)"), true),
            (format!("UPDATE {table} SET v = v + 1 WHERE id = {id}"), true),
            (format!("SELECT count(*) FROM {table} WHERE v >= 0"), true),
            // Fails in the executor: duplicate key (23505).
            (format!("INSERT INTO {table} (id, v) VALUES ({id}, 1)"), false),
            ("BEGIN".to_string(), true),
            (format!("INSERT INTO {table} (id, v) VALUES ({}, 2)", id + 500_000), true),
            (format!("UPDATE {table} SET v = v + 1 WHERE id = {id}"), true),
            ("COMMIT".to_string(), true),
        ];
        for s in group {
            if out.len() < STATEMENTS {
                out.push(s);
            }
        }
        i += 1;
    }
    // Never leave a transaction open at the cut: end with COMMIT if a BEGIN is pending.
    let begins = out.iter().filter(|(s, _)| s == "BEGIN").count();
    let commits = out.iter().filter(|(s, _)| s == "COMMIT").count();
    if begins > commits {
        out.pop();
        out.push(("COMMIT".to_string(), true));
    }
    assert_eq!(out.len(), STATEMENTS);
    out
}

#[test]
fn concurrency() {
    let cluster = Cluster::shared();
    let run = marker("conc");
    let table = format!("public.{run}");
    let mut admin = cluster.connect(&format!("{run}_admin"));
    admin
        .batch_execute(&format!("CREATE TABLE {table} (id bigint PRIMARY KEY, v int NOT NULL)"))
        .unwrap();

    // All sessions connect first, then start sending at the same moment.
    let barrier = std::sync::Arc::new(std::sync::Barrier::new(THREADS));
    let handles: Vec<_> = (0..THREADS)
        .map(|t| {
            let app = format!("{run}_t{t}");
            let stmts = statements(&table, t);
            let conn = cluster.conn_str("postgres", &app);
            let barrier = barrier.clone();
            std::thread::spawn(move || {
                let mut c = Client::connect(&conn, NoTls).expect("thread connect");
                barrier.wait();
                let mut sent = 0i64;
                for (sql, should_succeed) in &stmts {
                    let r = c.simple_query(sql);
                    sent += 1;
                    match (r, should_succeed) {
                        (Ok(_), true) => {}
                        (Err(e), false) => {
                            assert_eq!(e.code().map(|c| c.code()), Some("23505"), "{sql}: {e}")
                        }
                        (r, _) => panic!("{app}: {sql}: unexpected {r:?}"),
                    }
                }
                (app, sent)
            })
        })
        .collect();
    let sent: Vec<(String, i64)> = handles.into_iter().map(|h| h.join().expect("thread")).collect();

    // Other sessions' records are stored once their statements finished; wait (bounded)
    // until each application has at least what it sent, then require exact equality.
    for (app, n) in &sent {
        wait_until(
            &mut admin,
            "SELECT count(*) >= $2 FROM custody.audit_log WHERE application_name = $1 AND class <> 'login'",
            &[app, n],
            &format!("{n} records of {app}"),
        );
    }
    flush(&mut admin);
    for (app, n) in &sent {
        let got = query_i64(
            &mut admin,
            "SELECT count(*) FROM custody.audit_log WHERE application_name = $1 AND class <> 'login'",
            &[app],
        );
        assert_eq!(got, *n, "records of {app}: got {got}, sent {n}");
        let logins = query_i64(
            &mut admin,
            "SELECT count(*) FROM custody.audit_log WHERE application_name = $1 AND command = 'LOGIN'",
            &[app],
        );
        assert_eq!(logins, 1, "LOGIN records of {app}");
        let errors = query_i64(
            &mut admin,
            "SELECT count(*) FROM custody.audit_log WHERE application_name = $1 \
             AND outcome = 'error' AND sqlstate = '23505'",
            &[app],
        );
        let expected_errors = statements(&table, 0).iter().filter(|(_, ok)| !ok).count() as i64;
        assert_eq!(errors, expected_errors, "error records of {app}");
    }
    assert_chain_ok(&mut admin);
}
