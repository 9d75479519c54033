//! An immediate shutdown (crash) in the middle of a write load: after restart the chain is
//! valid and every INSERT the client saw acknowledged has both its row and its record.

use pg_custody_client_tests::*;
use std::time::{Duration, Instant};

const THREADS: i64 = 4;

#[test]
fn crash_durability() {
    let cluster = StopOnDrop(Cluster::own("crash", 2));
    let mut c = cluster.connect("crash_setup");
    c.batch_execute("CREATE TABLE crash_t (id bigint PRIMARY KEY)").unwrap();
    drop(c);

    let handles: Vec<_> = (0..THREADS)
        .map(|t| {
            let conn = cluster.conn_str("postgres", &format!("crash_t{t}"));
            std::thread::spawn(move || {
                let mut acked = Vec::new();
                let Ok(mut c) = Client::connect(&conn, NoTls) else { return acked };
                let end = Instant::now() + Duration::from_secs(3);
                let mut id = (t + 1) * 10_000_000;
                while Instant::now() < end {
                    id += 1;
                    match c.simple_query(&format!("INSERT INTO crash_t VALUES ({id})")) {
                        Ok(_) => acked.push(id),
                        Err(_) => break, // the crash: connection gone
                    }
                }
                acked
            })
        })
        .collect();
    // Not an assertion: let the load run, then crash in the middle of it.
    std::thread::sleep(Duration::from_millis(1500));
    cluster.stop("immediate");
    let acked: Vec<i64> = handles.into_iter().flat_map(|h| h.join().expect("thread")).collect();
    eprintln!("crash_durability: {} acknowledged inserts before the crash", acked.len());
    assert!(acked.len() > 10, "load too small to mean anything: {} inserts", acked.len());

    cluster.start();
    let mut c = cluster.connect("crash_check");
    wait_ready(&mut c);
    assert_chain_ok(&mut c);

    // Every acknowledged id: a row, and a success record of exactly that INSERT.
    let missing_rows = query_i64(
        &mut c,
        "SELECT count(*) FROM unnest($1::int8[]) a(id) WHERE NOT EXISTS (SELECT 1 FROM crash_t t WHERE t.id = a.id)",
        &[&acked],
    );
    assert_eq!(missing_rows, 0, "acknowledged inserts lost their rows");
    let missing: Vec<i64> = c
        .query(
            "SELECT a.id FROM unnest($1::int8[]) a(id) WHERE NOT EXISTS ( \
               SELECT 1 FROM custody.audit_log l WHERE l.command = 'INSERT' AND l.outcome = 'success' \
               AND l.statement = 'INSERT INTO crash_t VALUES (' || a.id || ')') ORDER BY a.id",
            &[&acked],
        )
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert!(
        missing.is_empty(),
        "{} of {} acknowledged INSERTs have no record, e.g. {:?}",
        missing.len(),
        acked.len(),
        &missing[..missing.len().min(10)]
    );
    drop(c);
    cluster.stop("fast");
}
