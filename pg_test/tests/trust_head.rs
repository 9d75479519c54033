//! Attack tests, family 3 (spec/trust.md): the head cannot go backwards unnoticed. A tail
//! cut off with the library unloaded (records and the checkpoints covering them) is found
//! by the writer, which remembers its head outside the table, and by the verifier; a writer
//! terminated and restarted is no alarm; every checkpoint leaves the database.
//!
//! Every test uses its own fresh cluster with a signing key (PGDATA-<suffix>, shared port +
//! 11..13); run with `--test-threads=1`.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use pg_custody_client_tests::*;

/// A fresh cluster with a signing key (checkpoint every second), loaded; its verifier key.
fn keyed_cluster(suffix: &str, offset: u16) -> (StopOnDrop, Client, String) {
    let cluster = StopOnDrop(Cluster::own(suffix, offset));
    let key_file = cluster.dir.join("custody_signing.key");
    let key = keygen(&key_file, &format!("{suffix}-test"));
    let mut c = cluster.connect("head_setup");
    set_and_reload(
        &cluster,
        &mut c,
        &[&format!("custody.signing_key_file = '{}'", key_file.display()), "custody.checkpoint_interval = 1"],
    );
    wait_key_status(&mut c, "loaded:", "");
    (cluster, c, key)
}

/// Runs `n` inserts into a new table `tag`, flushes, waits for a checkpoint covering them.
fn activity_and_checkpoint(c: &mut Client, tag: &str, n: usize) -> i64 {
    c.batch_execute(&format!("CREATE TABLE {tag} (id int)")).unwrap();
    for i in 0..n {
        c.simple_query(&format!("INSERT INTO {tag} VALUES ({i})")).unwrap();
    }
    flush(c);
    let head = query_i64(c, "SELECT max(seq) FROM custody.audit_log", &[]);
    wait_checkpoint(c, head)
}

fn alarm(c: &mut Client) -> Option<String> {
    c.query_one("SELECT custody.status()->>'alarm'", &[]).expect("custody.status()").get(0)
}

/// (from, to) of every HEAD MISMATCH record.
fn head_mismatches(c: &mut Client) -> Vec<(Option<i64>, Option<i64>)> {
    c.query(
        "SELECT (objects->0->>'from')::int8, (objects->0->>'to')::int8 FROM custody.audit_log \
         WHERE class = 'system' AND command = 'HEAD MISMATCH' ORDER BY seq",
        &[],
    )
    .unwrap()
    .iter()
    .map(|r| (r.get(0), r.get(1)))
    .collect()
}

/// Attack: with the library unloaded, delete the newest 5 records and every checkpoint that
/// covers them; loaded again, the writer would continue from the shortened head and the
/// remaining chain (and its remaining signed checkpoints) verify.
/// Defence: the writer remembers its head outside the table: custody.status() carries an
/// alarm about the missing records, a system record HEAD MISMATCH {from: H-4, to: H} is
/// appended, seq is never reused, so verify_audit_chain() (also with the public key) fails at
/// H-4, and the offline verifier on an export exits 1.
#[test]
fn head_cut_off_while_unloaded_raises_an_alarm() {
    let (cluster, mut c, key) = keyed_cluster("trust_head_cut", 11);
    activity_and_checkpoint(&mut c, "head_t", 50);
    // Records after the checkpoint, so that one remains below the cut.
    for i in 0..10 {
        c.simple_query(&format!("SELECT {i} AS after_checkpoint")).unwrap();
    }
    flush(&mut c);
    drop(c);

    cluster.restart_unloaded();
    let mut u = cluster.connect("head_unloaded");
    // Nothing is appended while unloaded: this is the head the writer last stored.
    let h = query_i64(&mut u, "SELECT max(seq) FROM custody.audit_log", &[]);
    let n = u.execute("DELETE FROM custody.audit_log WHERE seq > $1", &[&(h - 5)]).unwrap();
    assert_eq!(n, 5, "deleted {n} records above {}", h - 5);
    u.execute("DELETE FROM custody.checkpoints WHERE seq > $1", &[&(h - 5)]).unwrap();
    let kept = query_i64(&mut u, "SELECT count(*) FROM custody.checkpoints", &[]);
    assert!(kept >= 1, "no checkpoint left below the cut");
    drop(u);

    cluster.restart_loaded();
    let mut c = cluster.connect("head_loaded");
    flush(&mut c);
    let a = alarm(&mut c);
    eprintln!("head {h}, alarm {a:?}");
    assert!(a.as_deref().is_some_and(|a| a.contains("missing")), "custody.status() alarm {a:?}");
    // `to` is the head the writer remembered: H, read while nothing could be appended (the
    // spec allows higher, should the writer have remembered records it never stored).
    let mismatches = head_mismatches(&mut c);
    assert_eq!(mismatches.len(), 1, "HEAD MISMATCH records (from, to): {mismatches:?}");
    let (from, to) = mismatches[0];
    assert_eq!(from, Some(h - 4), "HEAD MISMATCH from: {mismatches:?}");
    assert!(to.is_some_and(|t| t >= h), "HEAD MISMATCH to below the head {h}: {mismatches:?}");
    let reused = query_i64(&mut c, "SELECT count(*) FROM custody.audit_log WHERE seq BETWEEN $1 AND $2", &[&(h - 4), &h]);
    assert_eq!(reused, 0, "seq {}..{h} reused after the cut", h - 4);
    let v = verify(&mut c);
    eprintln!("verify after the cut: {v:?}");
    assert!(!v.ok, "the cut tail verifies: {v:?}");
    assert_eq!(v.first_bad_seq, Some(h - 4), "{v:?}");
    let v = verify_with(&mut c, None, Some(&key));
    assert!(!v.ok, "the cut tail verifies with the public key: {v:?}");

    let file = cluster.dir.join("head_cut_export.jsonl");
    export_to_file(&mut c, &file);
    let (code, out, err) = run_custody(&["verify", "--log", file.to_str().unwrap(), "--public-key", &key]);
    assert_eq!(code, 1, "custody verify of the cut export:\n{out}{err}");
}

/// Attack (for false alarms): terminate the writer with pg_terminate_backend(), and, as a
/// variant, restart the cluster unloaded and loaded again without touching anything.
/// Defence: neither is an alarm: a new writer appends, status alarm stays null, no HEAD
/// MISMATCH record, and the chain verifies (also with the public key).
#[test]
fn writer_termination_is_not_a_head_alarm() {
    let (cluster, mut c, key) = keyed_cluster("trust_head_term", 12);
    activity_and_checkpoint(&mut c, "term_t", 10);
    let pid = writer_pid(&mut c).expect("a writer runs");
    let ok: bool = c.query_one("SELECT pg_terminate_backend($1)", &[&pid]).unwrap().get(0);
    assert!(ok, "pg_terminate_backend({pid})");
    wait_new_writer(&mut c, pid, Duration::from_secs(10));
    c.simple_query("SELECT 'after the termination'").unwrap();
    flush(&mut c);
    assert_eq!(alarm(&mut c), None, "alarm after a writer termination");
    assert_eq!(head_mismatches(&mut c), vec![], "HEAD MISMATCH after a writer termination");
    assert_chain_ok(&mut c);
    drop(c);

    cluster.restart_unloaded();
    cluster.restart_loaded();
    let mut c = cluster.connect("term_restarted");
    c.simple_query("SELECT 'after the restart'").unwrap();
    flush(&mut c);
    assert_eq!(alarm(&mut c), None, "alarm after a clean restart");
    assert_eq!(head_mismatches(&mut c), vec![], "HEAD MISMATCH after a clean restart");
    assert_chain_ok(&mut c);
    let head = query_i64(&mut c, "SELECT max(seq) FROM custody.audit_log", &[]);
    wait_checkpoint(&mut c, head);
    let v = verify_with(&mut c, None, Some(&key));
    assert!(v.ok, "verify with the public key: {v:?}");
}

/// Removes a directory when dropped.
struct RemoveDir(PathBuf);

impl Drop for RemoveDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Attack (the premise of every truncation): the digests that catch a cut tail exist only
/// inside the database the attacker controls.
/// Defence: with custody.checkpoint_command set, every checkpoint's digest is handed to the
/// command (%p the digest file, %s its seq): /tmp/<dir>/cp-<seq>.json holds {seq, hash,
/// merkle_root, signed_note}, verifies as a trusted digest with the public key, and the
/// signed note also goes to the server log.
#[test]
fn every_checkpoint_leaves_the_database() {
    let (cluster, mut c, key) = keyed_cluster("trust_ckpt_cmd", 13);
    let dir = PathBuf::from("/tmp").join(marker("trust_cp"));
    std::fs::create_dir_all(&dir).unwrap();
    let _remove = RemoveDir(dir.clone());
    chown_postgres(&dir);
    set_and_reload(&cluster, &mut c, &[&format!("custody.checkpoint_command = 'cp %p {}/cp-%s.json'", dir.display())]);
    // The writer has the command once it recorded the reload.
    wait_until(
        &mut c,
        "SELECT count(*) > 0 FROM custody.audit_log WHERE command = 'SETTINGS RELOADED' \
         AND strpos(objects::text, $1) > 0",
        &[&dir.display().to_string()],
        "the writer to record the reloaded checkpoint_command",
    );
    let head = activity_and_checkpoint(&mut c, "cmd_t", 10);
    // A checkpoint made while the command still copies the one before goes to no command (the
    // next one does): the one to read is the newest handed over, at the head or after it.
    wait_until(
        &mut c,
        "SELECT coalesce((custody.status()->>'checkpoint_archived_seq')::int8, 0) >= $1",
        &[&head],
        "a checkpoint at the head or after it to be handed to the command",
    );
    let cp = query_i64(&mut c, "SELECT (custody.status()->>'checkpoint_archived_seq')::int8", &[]);

    let file = dir.join(format!("cp-{cp}.json"));
    let deadline = Instant::now() + WAIT;
    while !file.exists() {
        let have: Vec<String> = std::fs::read_dir(&dir)
            .map(|d| d.filter_map(|e| e.ok()).map(|e| e.file_name().to_string_lossy().into_owned()).collect())
            .unwrap_or_default();
        assert!(Instant::now() < deadline, "{} not written within {WAIT:?}; {} has {have:?}", file.display(), dir.display());
        std::thread::sleep(Duration::from_millis(100));
    }
    // The command may still be writing: read until it parses.
    let mut content = String::new();
    let mut digest = serde_json::Value::Null;
    while Instant::now() < deadline + WAIT {
        content = std::fs::read_to_string(&file).unwrap_or_default();
        if let Ok(d) = serde_json::from_str::<serde_json::Value>(&content) {
            digest = d;
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    for k in ["seq", "hash", "merkle_root", "signed_note"] {
        assert!(digest.get(k).is_some(), "digest file without {k:?}: {content}");
    }
    assert_eq!(digest["seq"].as_i64(), Some(cp), "digest file seq: {content}");
    let note: String =
        c.query_one("SELECT note FROM custody.checkpoints WHERE seq = $1", &[&cp]).unwrap().get(0);
    assert_eq!(digest["signed_note"].as_str(), Some(note.as_str()), "digest file signed_note");
    let v = verify_with(&mut c, Some(&format!("[{content}]")), Some(&key));
    assert!(v.ok, "the exported digest does not verify: {v:?}");

    // The signed note also went to the server log.
    let log = std::fs::read_to_string(cluster.dir.join("server.log")).unwrap();
    let note_lines: Vec<&str> = note.lines().filter(|l| !l.trim().is_empty()).collect();
    let root_line = note_lines.get(2).copied().unwrap_or("<no root line>");
    let sig_line = note_lines.iter().find(|l| l.starts_with('\u{2014}')).copied().unwrap_or("<no signature line>");
    assert!(
        log.lines().any(|l| l.contains("LOG:") && l.contains("pg_custody")),
        "no LOG line of pg_custody in server.log"
    );
    assert!(
        log.contains(root_line) || log.contains(sig_line),
        "server.log has neither the root hash line {root_line:?} nor the signature line {sig_line:?} of checkpoint {cp}"
    );
}

/// The last "N records of custody.audit_log read to resume it" the server log has, which
/// custody.status() reports too, with how long that start took.
fn records_read_at_start(cluster: &Cluster, c: &mut Client) -> i64 {
    let log = std::fs::read_to_string(cluster.dir.join("server.log")).expect("server.log");
    let line = log.lines().rev().find(|l| l.contains("records of custody.audit_log read to resume it")).expect("a writer start");
    let n = line.split('(').nth(1).and_then(|t| t.split_whitespace().next()).expect("a count");
    let n: i64 = n.parse().unwrap_or_else(|_| panic!("count in {line}"));
    let row = c
        .query_one(
            "SELECT (s->>'writer_start_records_read')::int8, (s->>'writer_start_seconds')::float8 \
             FROM custody.status() s",
            &[],
        )
        .expect("custody.status()");
    let (status_n, seconds): (Option<i64>, Option<f64>) = (row.get(0), row.get(1));
    assert_eq!(status_n, Some(n), "custody.status() names the records the start read ({line})");
    assert!(seconds.is_some_and(|s| (0.0..60.0).contains(&s)), "writer_start_seconds: {seconds:?}");
    n
}

fn head_file(cluster: &Cluster, c: &mut Client) -> PathBuf {
    let oid = query_i64(c, "SELECT oid::int8 FROM pg_database WHERE datname = current_database()", &[]);
    cluster.dir.join(format!("pg_custody.{oid}.head"))
}

/// Cost that grows with the log (issue 16): a writer that starts reads only the records after
/// the head it remembers, with the Merkle tree up to there, not the whole log. A frontier that
/// does not match what the last checkpoint signed, or none (a head file of an earlier
/// version), makes it read the whole log; either way the chain and every checkpoint verify.
#[test]
fn a_start_reads_only_what_came_after_the_remembered_head() {
    let (cluster, mut c, key) = keyed_cluster("trust_head_resume", 16);
    activity_and_checkpoint(&mut c, "resume_t", 300);
    let file = head_file(&cluster, &mut c);
    drop(c);

    // A clean restart: the head file names the last record and the tree up to it.
    cluster.start();
    let mut c = cluster.connect("resume_1");
    wait_ready(&mut c);
    let read = records_read_at_start(&cluster, &mut c);
    let head = query_i64(&mut c, "SELECT max(seq) FROM custody.audit_log", &[]);
    assert!(head > 300, "the log holds the activity ({head})");
    assert!(read <= 2, "a clean restart read {read} records of {head}");
    let head = activity_and_checkpoint(&mut c, "resume_t2", 20);
    let v = verify_with(&mut c, None, Some(&key));
    assert!(v.ok, "after a resumed start: {v:?}");
    drop(c);

    // The frontier edited by hand: it does not give the root the last checkpoint signed.
    cluster.stop("fast");
    let text = std::fs::read_to_string(&file).expect("head file");
    let fields: Vec<&str> = text.split_whitespace().collect();
    assert_eq!(fields.len(), 8, "head file with a frontier: {text}");
    let forged: Vec<String> = fields[7].split(',').map(|_| "ab".repeat(32)).collect();
    let edited = format!("{} {}\n", fields[..7].join(" "), forged.join(","));
    std::fs::write(&file, edited).expect("edit head file");
    cluster.start();
    let mut c = cluster.connect("resume_2");
    wait_ready(&mut c);
    let stored = query_i64(&mut c, "SELECT count(*) FROM custody.audit_log", &[]);
    let read = records_read_at_start(&cluster, &mut c);
    assert!(read >= head && read <= stored, "a forged frontier must make the writer read the whole log: {read} of {stored}");
    activity_and_checkpoint(&mut c, "resume_t3", 5);
    let v = verify_with(&mut c, None, Some(&key));
    assert!(v.ok, "after a forged frontier: {v:?}");
    assert_eq!(head_mismatches(&mut c), vec![], "the head itself was right");
    drop(c);

    // A head file without a frontier (an earlier version's): the whole log, and on from there.
    cluster.stop("fast");
    let text = std::fs::read_to_string(&file).expect("head file");
    let fields: Vec<&str> = text.split_whitespace().collect();
    std::fs::write(&file, format!("{}\n", fields[..6].join(" "))).expect("old head file");
    cluster.start();
    let mut c = cluster.connect("resume_3");
    wait_ready(&mut c);
    // What the table held when this writer started: everything before its WRITER START (the
    // statements of this test's session since then are stored after it, as many as waiting
    // for the writer took).
    let started = query_i64(&mut c, "SELECT max(seq) FROM custody.audit_log WHERE command = 'WRITER START'", &[]);
    let stored = query_i64(&mut c, "SELECT count(*) FROM custody.audit_log WHERE seq < $1", &[&started]);
    let read = records_read_at_start(&cluster, &mut c);
    assert!(read + 2 >= stored && read <= stored, "no frontier: the whole log ({read} of {stored})");
    activity_and_checkpoint(&mut c, "resume_t4", 5);
    let v = verify_with(&mut c, None, Some(&key));
    assert!(v.ok, "after an old head file: {v:?}");

    // A head file that lags behind the table (as after a crash: taken while records still
    // came, and not clean): the writer resumes from it and reads what followed; with its
    // frontier forged, the first checkpoint after that head does not match and the whole
    // log is read.
    let lagging = std::fs::read_to_string(&file).expect("head file");
    let lag_seq: i64 = lagging.split_whitespace().nth(3).unwrap().parse().unwrap();
    activity_and_checkpoint(&mut c, "resume_t5", 30);
    drop(c);
    let not_clean = |text: &str, forge: bool| -> String {
        let mut f: Vec<String> = text.split_whitespace().map(str::to_string).collect();
        f[5] = "0".into();
        if forge {
            f[7] = f[7].split(',').map(|_| "cd".repeat(32)).collect::<Vec<_>>().join(",");
        }
        f.join(" ") + "\n"
    };
    for forge in [false, true] {
        cluster.stop("fast");
        std::fs::write(&file, not_clean(&lagging, forge)).expect("lagging head file");
        cluster.start();
        let mut c = cluster.connect("resume_4");
        wait_ready(&mut c);
        // What the table held when this writer started: everything before its WRITER START.
        let started = query_i64(&mut c, "SELECT max(seq) FROM custody.audit_log WHERE command = 'WRITER START'", &[]);
        let stored = query_i64(&mut c, "SELECT count(*) FROM custody.audit_log WHERE seq < $1", &[&started]);
        let after =
            query_i64(&mut c, "SELECT count(*) FROM custody.audit_log WHERE seq > $1 AND seq < $2", &[&lag_seq, &started]);
        let read = records_read_at_start(&cluster, &mut c);
        if forge {
            assert_eq!(read, stored, "a forged lagging frontier: the whole log");
        } else {
            assert_eq!(read, after, "a lagging head: only what followed seq {lag_seq}");
        }
        activity_and_checkpoint(&mut c, &format!("resume_t6_{forge}"), 5);
        let v = verify_with(&mut c, None, Some(&key));
        assert!(v.ok, "after a lagging head file (forged: {forge}): {v:?}");
        assert_eq!(head_mismatches(&mut c), vec![], "a lagging head is no alarm");
    }
    let mut c = cluster.connect("resume_5");

    // A writer terminated and started again goes on from shared memory.
    let pid = writer_pid(&mut c).expect("a writer runs");
    c.query_one("SELECT pg_terminate_backend($1)", &[&pid]).unwrap();
    wait_new_writer(&mut c, pid, Duration::from_secs(10));
    flush(&mut c);
    let read = records_read_at_start(&cluster, &mut c);
    assert!(read <= 2, "a writer restart read {read} records");
    activity_and_checkpoint(&mut c, "resume_t7", 5);
    assert!(verify_with(&mut c, None, Some(&key)).ok, "after a writer restart");
    assert_eq!(alarm(&mut c), None);
}
