//! Attack tests, family 5 (spec/trust.md): the writer cannot be stopped quietly. A
//! terminated writer is replaced and says so in the chain; records lost while it could not
//! take them are marked by a GAP record, also when the writer that lost them is gone.
//!
//! Both tests use their own fresh cluster (PGDATA-<suffix>, shared port + 14..15); run with
//! `--test-threads=1`.

use std::process::Command;
use std::time::Duration;

use pg_custody_client_tests::*;

/// seq of the system records `command` written by the process `pid`.
fn system_records(c: &mut Client, command: &str, pid: i32) -> Vec<i64> {
    c.query(
        "SELECT seq FROM custody.audit_log WHERE class = 'system' AND command = $1 AND backend_pid = $2 ORDER BY seq",
        &[&command, &pid],
    )
    .unwrap()
    .iter()
    .map(|r| r.get(0))
    .collect()
}

/// Attack: `SELECT pg_terminate_backend(<writer pid>)`, twice: without a writer nothing is
/// stored any more, and nobody is told.
/// Defence: within 10 s a new writer (another pid) appends; the chain shows the old writer's
/// WRITER STOP followed by the new one's WRITER START; a statement run right after the
/// termination, before the new writer, is stored; the chain verifies.
#[test]
fn terminated_writer_comes_back_and_loses_nothing() {
    let cluster = StopOnDrop(Cluster::own("trust_writer_term", 14));
    let mut c = cluster.connect("wt");
    let m = marker("wt");
    for round in 0..2 {
        let old = writer_pid(&mut c).expect("a writer runs");
        let ok: bool = c.query_one("SELECT pg_terminate_backend($1)", &[&old]).unwrap().get(0);
        assert!(ok, "round {round}: pg_terminate_backend({old})");
        let stmt = format!("SELECT '{m} round {round}'");
        c.simple_query(&stmt).unwrap();
        let new = wait_new_writer(&mut c, old, Duration::from_secs(10));
        flush(&mut c);
        assert_recorded(&mut c, &stmt, "success", None);
        let stop = system_records(&mut c, "WRITER STOP", old);
        let start = system_records(&mut c, "WRITER START", new);
        assert_eq!((stop.len(), start.len()), (1, 1), "round {round}: WRITER STOP of {old} {stop:?}, WRITER START of {new} {start:?}");
        assert!(stop[0] < start[0], "round {round}: WRITER STOP at {} not before WRITER START at {}", stop[0], start[0]);
    }
    assert_chain_ok(&mut c);
}

/// Sends SIGCONT to a process when dropped (a test failing while the writer is stopped must
/// not leave it stopped: the cluster could not shut down).
struct ContOnDrop(i32);

impl Drop for ContOnDrop {
    fn drop(&mut self) {
        let _ = Command::new("kill").args(["-CONT", &self.0.to_string()]).status();
    }
}

fn signal(sig: &str, pid: i32) {
    let st = Command::new("kill").args([sig, &pid.to_string()]).status().expect("kill");
    assert!(st.success(), "kill {sig} {pid}");
}

/// Attack: stop the writer (SIGSTOP) so that the 1 MB queue overflows and records are lost
/// (on_failure = continue: the statements succeed with a WARNING), then terminate it, so that
/// the writer that counted the loss is gone before it could write the GAP record.
/// Defence: the new writer writes the GAP: a system GAP record whose count is at least 1; the
/// GAP counts add up to custody.status()->>'lost_records'; stored and lost records together
/// account for every statement; the chain verifies.
#[test]
fn lost_records_across_a_writer_restart_leave_a_gap_record() {
    let cluster = own_with("trust_writer_gap", 15, &["custody.queue_size = '1MB'"]);
    let mut c = cluster.connect("gap");
    let capacity = query_i64(&mut c, "SELECT (custody.status()->>'queue_bytes_capacity')::int8", &[]);
    assert!(capacity <= 1 << 21, "queue_size not applied: capacity {capacity}");
    c.batch_execute("SET custody.on_failure = continue; SET custody.failure_timeout = '10ms'").unwrap();
    let lost_before = query_i64(&mut c, "SELECT (custody.status()->>'lost_records')::int8", &[]);

    let w = writer_pid(&mut c).expect("a writer runs");
    let _cont = ContOnDrop(w);
    signal("-STOP", w);
    let m = marker("gap");
    let pad = "x".repeat(20_000);
    let n = 100;
    for i in 0..n {
        c.simple_query(&format!("SELECT '{pad}' AS pad /* {m} {i} */"))
            .unwrap_or_else(|e| panic!("statement {i} failed although on_failure = continue: {e}"));
    }
    let lost = query_i64(&mut c, "SELECT (custody.status()->>'lost_records')::int8", &[]) - lost_before;
    assert!(lost >= 1, "the queue did not overflow: nothing lost");
    let ok: bool = c.query_one("SELECT pg_terminate_backend($1)", &[&w]).unwrap().get(0);
    assert!(ok, "pg_terminate_backend({w})");
    signal("-CONT", w);
    wait_new_writer(&mut c, w, WAIT);
    c.simple_query(&format!("SELECT '{m} after'")).unwrap();
    flush(&mut c);

    let r = c
        .query_one(
            "SELECT count(*), coalesce(sum((objects->0->>'count')::int8), 0)::int8, \
                    coalesce(min((objects->0->>'count')::int8), 0)::int8 \
             FROM custody.audit_log WHERE class = 'system' AND command = 'GAP'",
            &[],
        )
        .unwrap();
    let (gaps, gap_sum, gap_min): (i64, i64, i64) = (r.get(0), r.get(1), r.get(2));
    eprintln!("lost {lost}, GAP records {gaps}, their counts add up to {gap_sum}");
    assert!(gaps >= 1, "no GAP record for {lost} lost records");
    assert!(gap_min >= 1, "a GAP record without a count");
    let lost_total = query_i64(&mut c, "SELECT (custody.status()->>'lost_records')::int8", &[]);
    assert_eq!(gap_sum, lost_total, "GAP counts do not add up to status lost_records");
    let stored = query_i64(
        &mut c,
        "SELECT count(*) FROM custody.audit_log WHERE statement LIKE 'SELECT ''xxx%' AND statement LIKE '%' || $1 || '%'",
        &[&format!("/* {m} ")],
    );
    assert!(stored + gap_sum >= n, "{stored} stored + {gap_sum} lost < {n} statements");
    assert!(stored < n, "every statement stored although {lost} were lost");
    assert_chain_ok(&mut c);
}
