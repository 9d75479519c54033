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

/// The queue's ring is only 1 MB here and four sessions push about 9 MB of records of many
/// lengths through it at once, so it wraps around several times, fills up (pushes wait for
/// room), and records straddle its end. Every statement has exactly one record, with the text
/// it was sent with, in the order its session sent them, and the chain verifies: no record is
/// lost, torn, duplicated or read before it was completely written.
#[test]
fn a_small_queue_wrapped_by_concurrent_sessions_loses_and_tears_nothing() {
    const SESSIONS: usize = 4;
    const EACH: usize = 2_000;
    let cluster = own_with("conc_ring", 53, &["custody.queue_size = '1MB'"]);
    let mut admin = cluster.connect("ring_admin");
    let capacity = query_i64(&mut admin, "SELECT (custody.status()->>'queue_bytes_capacity')::int8", &[]);
    assert!(capacity <= 1 << 21, "queue_size not applied: capacity {capacity}");
    let run = marker("ring");
    let table = format!("public.{run}");
    admin.batch_execute(&format!("CREATE TABLE {table} (id bigint PRIMARY KEY, pad text)")).unwrap();

    // Statement i of session t: lengths from ~60 to ~4,000 bytes (slots of every padding),
    // every third one a write whose COMMIT waits for its record.
    let statement = |t: usize, i: usize| -> String {
        let pad = "x".repeat((i * 37 + t * 11) % 4_000);
        if i % 3 == 0 {
            format!("INSERT INTO {table} VALUES ({}, '{pad}') /* {run} {t} {i} */", t * 1_000_000 + i)
        } else {
            format!("SELECT {i} AS n, '{pad}' AS pad /* {run} {t} {i} */")
        }
    };
    let barrier = std::sync::Arc::new(std::sync::Barrier::new(SESSIONS));
    let handles: Vec<_> = (0..SESSIONS)
        .map(|t| {
            let conn = cluster.conn_str("postgres", &format!("{run}_s{t}"));
            let barrier = barrier.clone();
            let stmts: Vec<String> = (0..EACH).map(|i| statement(t, i)).collect();
            std::thread::spawn(move || {
                let mut s = Client::connect(&conn, NoTls).expect("session connect");
                barrier.wait();
                for sql in &stmts {
                    s.simple_query(sql).unwrap_or_else(|e| panic!("{sql:.80}: {e}"));
                }
                stmts
            })
        })
        .collect();
    let sent: Vec<Vec<String>> = handles.into_iter().map(|h| h.join().expect("session")).collect();
    let bytes: usize = sent.iter().flatten().map(String::len).sum();
    assert!(bytes as i64 > 4 * capacity, "{bytes} bytes sent do not wrap the {capacity}-byte ring several times");

    // A session's last record may be queued just after its client got the answer: wait
    // (bounded) until each session has as many records as statements, then compare them.
    for (t, stmts) in sent.iter().enumerate() {
        let n = stmts.len() as i64;
        let app = format!("{run}_s{t}");
        wait_until(
            &mut admin,
            "SELECT count(*) >= $2 FROM custody.audit_log WHERE application_name = $1 AND class <> 'login'",
            &[&app, &n],
            &format!("{n} records of {app}"),
        );
    }
    flush(&mut admin);
    for (t, stmts) in sent.iter().enumerate() {
        let got: Vec<String> = admin
            .query(
                "SELECT statement FROM custody.audit_log \
                 WHERE application_name = $1 AND class <> 'login' ORDER BY seq",
                &[&format!("{run}_s{t}")],
            )
            .unwrap()
            .iter()
            .map(|r| r.get(0))
            .collect();
        assert_eq!(got.len(), stmts.len(), "records of session {t}");
        for (i, (g, s)) in got.iter().zip(stmts).enumerate() {
            assert_eq!(g, s, "record {i} of session {t} is not the statement it sent");
        }
    }
    assert_chain_ok(&mut admin);
}
