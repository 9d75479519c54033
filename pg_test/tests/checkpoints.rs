//! Signed checkpoints: a configured key is loaded and signs checkpoints that verify; a
//! consistent rewrite of the whole chain and a truncated tail pass the plain hash check but
//! are caught by a trusted digest and by the checkpoint signatures; a missing or malformed key
//! file is reported in custody.status() while the chain keeps being written.
//!
//! Every test uses its own fresh cluster (PGDATA-ckpt, shared port + 3); run with
//! `--test-threads=1`.

use custody_chain::Record;
use pg_custody_client_tests::*;

/// A fresh cluster with a signing key configured (checkpoint every second) and loaded.
fn keyed_cluster() -> (StopOnDrop, Client, String) {
    let cluster = StopOnDrop(Cluster::own("ckpt", 3));
    let key_file = cluster.dir.join("custody_signing.key");
    let key = keygen(&key_file, "ckpt-test");
    let mut c = cluster.connect("ckpt_setup");
    set_and_reload(
        &cluster,
        &mut c,
        &[
            &format!("custody.signing_key_file = '{}'", key_file.display()),
            "custody.checkpoint_interval = 1",
        ],
    );
    wait_key_status(&mut c, "loaded:", "");
    (cluster, c, key)
}

/// Runs `n` distinct statements, flushes and waits for a checkpoint covering them; returns
/// the digest and its seq.
fn records_and_digest(c: &mut Client, tag: &str, n: usize) -> (String, i64) {
    c.batch_execute(&format!("CREATE TABLE {tag} (id int PRIMARY KEY, note text)")).unwrap();
    for i in 0..n {
        c.simple_query(&format!("INSERT INTO {tag} VALUES ({i}, 'row {i}')")).unwrap();
    }
    flush(c);
    let head = query_i64(c, "SELECT max(seq) FROM custody.audit_log", &[]);
    wait_checkpoint(c, head);
    let digest = audit_digest(c);
    let d: serde_json::Value = serde_json::from_str(&digest).unwrap();
    let seq = d["seq"].as_i64().unwrap_or_else(|| panic!("digest without seq: {digest}"));
    assert!(seq >= head, "digest seq {seq} below flushed head {head}");
    (digest, seq)
}

const SELECT_RECORDS: &str = "SELECT seq, \
    (extract(epoch FROM event_time) * 1000000)::int8, \
    (extract(epoch FROM logged_at) * 1000000)::int8, \
    database_name, session_user_name, current_user_name, host(client_addr), application_name, \
    backend_pid, nesting_level, xid, class, command, objects::text, statement, statement_sha256, \
    rows, outcome, sqlstate, message, decision::text, prev_hash, hash \
    FROM custody.audit_log WHERE seq >= $1 ORDER BY seq";

fn json(text: Option<String>) -> Option<serde_json::Value> {
    text.map(|t| serde_json::from_str(&t).unwrap_or(serde_json::Value::String(t)))
}

/// Rewrites record k's statement and recomputes prev_hash/hash of k..head so that the chain
/// is consistent again (what an attacker with table access and the format spec can do).
/// Returns the number of records rewritten.
fn rewrite_chain_from(c: &mut Client, k: i64, statement: &str) -> usize {
    let rows = c.query(SELECT_RECORDS, &[&(k - 1)]).unwrap();
    assert!(rows.len() >= 2, "nothing to rewrite from seq {k}");
    let mut prev: [u8; 32] = rows[0].get::<_, Vec<u8>>(22).try_into().expect("32-byte hash");
    assert_eq!(rows[0].get::<_, i64>(0), k - 1);
    let mut tx = c.transaction().unwrap();
    for row in &rows[1..] {
        let mut rec = Record {
            seq: row.get(0),
            event_time: row.get(1),
            logged_at: row.get(2),
            database_name: row.get(3),
            session_user_name: row.get(4),
            current_user_name: row.get(5),
            client_addr: row.get(6),
            application_name: row.get(7),
            backend_pid: row.get(8),
            nesting_level: row.get(9),
            xid: row.get(10),
            class: row.get(11),
            command: row.get(12),
            objects: json(row.get(13)).unwrap_or(serde_json::Value::Null),
            statement: row.get(14),
            statement_sha256: row.get(15),
            rows: row.get(16),
            outcome: row.get(17),
            sqlstate: row.get(18),
            message: row.get(19),
            decision: json(row.get(20)),
        };
        let stored_prev: Vec<u8> = row.get(21);
        let stored: Vec<u8> = row.get(22);
        if rec.seq == k {
            // The reconstruction is faithful: it reproduces the stored hash before the edit.
            assert_eq!(stored_prev, prev.to_vec(), "stored prev_hash of {k} differs");
            assert_eq!(rec.chain_hash(&prev).to_vec(), stored, "record {k} rebuilt with another hash");
            rec.statement = Some(statement.to_string());
        }
        let h = rec.chain_hash(&prev);
        tx.execute(
            "UPDATE custody.audit_log SET statement = $1, prev_hash = $2, hash = $3 WHERE seq = $4",
            &[&rec.statement, &prev.to_vec(), &h.to_vec(), &rec.seq],
        )
        .unwrap();
        prev = h;
    }
    tx.commit().unwrap();
    rows.len() - 1
}

#[test]
fn key_loaded_checkpoint_signed_and_verifies() {
    let (cluster, mut c, key) = keyed_cluster();
    let status = signing_key_status(&mut c);
    assert!(status.starts_with("loaded:"), "signing_key status {status:?}");
    c.simple_query("SELECT 'checkpoint me'").unwrap();
    flush(&mut c);
    let cp = wait_checkpoint(&mut c, 1);
    assert!(cp > 0);

    let keys: Vec<(String, String)> = c
        .query("SELECT key_id, public_key FROM custody.public_keys", &[])
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    assert_eq!(keys.len(), 1, "public_keys: {keys:?}");
    assert_eq!(keys[0].1, key, "public_keys.public_key is not the keygen output");
    let n = query_i64(
        &mut c,
        "SELECT count(*) FROM custody.checkpoints WHERE key_id <> $1",
        &[&keys[0].0],
    );
    assert_eq!(n, 0, "checkpoints signed with a key id other than {}", keys[0].0);
    let n = query_i64(&mut c, "SELECT count(*) FROM custody.checkpoints WHERE seq = $1", &[&cp]);
    assert_eq!(n, 1, "status last_checkpoint_seq {cp} has no row in custody.checkpoints");

    let v = c
        .query_one(
            "SELECT ok, first_bad_seq, reason FROM custody.verify_audit_chain(\
             trusted_digests => jsonb_build_array(custody.audit_digest()), public_key => $1)",
            &[&key],
        )
        .unwrap();
    let (ok, bad, reason): (bool, Option<i64>, Option<String>) = (v.get(0), v.get(1), v.get(2));
    assert!(ok, "verify with digest and key failed: {bad:?} {reason:?}");
    assert_chain_ok(&mut c);
    drop(c);
    drop(cluster);
}

#[test]
fn consistent_full_rewrite_caught_by_digest_and_signatures() {
    let (cluster, mut c, key) = keyed_cluster();
    let (digest, d) = records_and_digest(&mut c, "rewrite_t", 20);
    let digests = format!("[{digest}]");
    assert!(verify_with(&mut c, Some(&digests), Some(&key)).ok, "untouched chain does not verify");
    let k = d - 8;
    assert!(k >= 2, "too few records: digest at {d}");
    drop(c);

    // Unloaded: drop the checkpoints (kept aside) and rewrite the chain from k consistently.
    cluster.restart_unloaded();
    let mut c = cluster.connect("ckpt_unloaded");
    c.batch_execute(
        "CREATE TABLE public.cp_backup AS SELECT * FROM custody.checkpoints; DELETE FROM custody.checkpoints",
    )
    .unwrap();
    let saved_max = query_i64(&mut c, "SELECT coalesce(max(seq), 0) FROM public.cp_backup", &[]);
    assert!(saved_max >= d, "saved checkpoints end at {saved_max}, digest at {d}");
    let n = rewrite_chain_from(&mut c, k, "SELECT 'rewritten'");
    assert!(n as i64 > d - k, "rewrote only {n} records");
    drop(c);

    // Loaded: the hashes and links alone cannot tell, but the writer remembers the head it
    // stored (and it was rewritten): a HEAD MISMATCH record, which verification reports...
    cluster.restart_loaded();
    let mut c = cluster.connect("ckpt_verify");
    flush(&mut c);
    let v = verify(&mut c);
    assert!(!v.ok, "rewrite not noticed by the writer: {v:?}");
    assert!(v.reason.as_deref().unwrap_or_default().starts_with("head mismatch"), "{v:?}");
    let alarm: i64 = query_i64(&mut c, "SELECT seq FROM custody.audit_log WHERE command = 'HEAD MISMATCH'", &[]);
    assert_eq!(v.first_bad_seq, Some(alarm), "{v:?}");
    assert!(alarm > d, "the alarm comes after the rewritten records: {alarm} <= {d}");
    // ...and, for an attacker who also edited that memory, the trusted digest does.
    let rewritten: Option<String> =
        c.query_one("SELECT statement FROM custody.audit_log WHERE seq = $1", &[&k]).unwrap().get(0);
    assert_eq!(rewritten.as_deref(), Some("SELECT 'rewritten'"));
    let v = verify_with(&mut c, Some(&digests), None);
    eprintln!("rewrite, digest: {v:?}");
    assert!(!v.ok, "rewrite not detected by the trusted digest: {v:?}");
    let bad = v.first_bad_seq.unwrap_or_else(|| panic!("no first_bad_seq: {v:?}"));
    assert!((k..=d).contains(&bad), "first_bad_seq {bad} outside {k}..={d}: {v:?}");
    let reason = v.reason.clone().unwrap_or_default();
    assert!(reason.starts_with("tamper"), "reason {reason:?} is not 'tamper...'");
    eprintln!("rewrite, key only, checkpoints deleted: {:?}", verify_with(&mut c, None, Some(&key)));
    drop(c);

    // Unloaded: put the old signed checkpoints back; loaded: their signatures/roots mismatch.
    cluster.restart_unloaded();
    let mut c = cluster.connect("ckpt_unloaded");
    c.batch_execute(
        "INSERT INTO custody.checkpoints SELECT * FROM public.cp_backup ON CONFLICT (seq) DO NOTHING; \
         DROP TABLE public.cp_backup",
    )
    .unwrap();
    drop(c);
    cluster.restart_loaded();
    let mut c = cluster.connect("ckpt_verify");
    let v = verify_with(&mut c, None, Some(&key));
    eprintln!("rewrite, key, old checkpoints restored: {v:?}");
    assert!(!v.ok, "rewrite not detected by the signed checkpoints: {v:?}");
    let bad = v.first_bad_seq.unwrap_or_else(|| panic!("no first_bad_seq: {v:?}"));
    assert!((k..=saved_max).contains(&bad), "first_bad_seq {bad} outside {k}..={saved_max}: {v:?}");
    let reason = v.reason.clone().unwrap_or_default();
    assert!(reason.starts_with("tamper"), "reason {reason:?} is not 'tamper...'");
    let v = verify_with(&mut c, Some(&digests), Some(&key));
    assert!(!v.ok, "rewrite not detected with digest and key: {v:?}");
    drop(c);
    drop(cluster);
}

#[test]
fn truncated_tail_caught_by_digest() {
    let (cluster, mut c, key) = keyed_cluster();
    let (digest, d) = records_and_digest(&mut c, "trunc_t", 20);
    let digests = format!("[{digest}]");
    drop(c);

    cluster.restart_unloaded();
    let mut c = cluster.connect("ckpt_unloaded");
    // Deep enough that the records appended after the restart do not reach seq d again.
    assert!(d > 30, "too few records: digest at {d}");
    let n = c.execute("DELETE FROM custody.audit_log WHERE seq > $1", &[&(d - 20)]).unwrap();
    assert!(n >= 20, "deleted only {n} records");
    drop(c);

    cluster.restart_loaded();
    let mut c = cluster.connect("ckpt_verify");
    flush(&mut c);
    // The writer remembers the head it stored: the cut stays a gap in seq, followed by a
    // HEAD MISMATCH record, so the chain alone no longer verifies...
    let v = verify(&mut c);
    assert!(!v.ok, "truncation not detected by the remembered head: {v:?}");
    assert_eq!(v.first_bad_seq, Some(d - 19), "{v:?}");
    let alarms = query_i64(&mut c, "SELECT count(*) FROM custody.audit_log WHERE command = 'HEAD MISMATCH'", &[]);
    assert_eq!(alarms, 1, "no HEAD MISMATCH record");
    let head = query_i64(&mut c, "SELECT max(seq) FROM custody.audit_log", &[]);
    // ...and the digest vouches for what was cut off.
    let v = verify_with(&mut c, Some(&digests), None);
    eprintln!("truncated (head {head}, digest {d}): {v:?}");
    assert!(!v.ok, "truncation not detected by the trusted digest: {v:?}");
    let bad = v.first_bad_seq.unwrap_or_else(|| panic!("no first_bad_seq: {v:?}"));
    assert!(bad <= d, "first_bad_seq {bad} beyond the digest seq {d}: {v:?}");
    let reason = v.reason.clone().unwrap_or_default();
    assert!(
        reason.starts_with("truncated") || reason.starts_with("tamper"),
        "reason {reason:?} is neither 'truncated...' nor 'tamper...'"
    );
    if head + 3 < d {
        // The chain (plus the few records appended since `head`) ends before the digest.
        assert!(reason.starts_with("truncated"), "chain ends near {head} < digest {d}, reason {reason:?}");
        assert_eq!(bad, d, "truncation reported at {bad}, digest at {d}");
    }
    let v = verify_with(&mut c, Some(&digests), Some(&key));
    assert!(!v.ok, "truncation not detected with digest and key: {v:?}");
    drop(c);
    drop(cluster);
}

/// Runs a statement with a unique text, flushes, and asserts its record is stored.
fn assert_still_recording(c: &mut Client, what: &str) {
    let stmt = format!("SELECT '{}'", marker(what));
    c.simple_query(&stmt).unwrap();
    flush(c);
    let n = query_i64(c, "SELECT count(*) FROM custody.audit_log WHERE statement = $1", &[&stmt]);
    assert_eq!(n, 1, "{what}: statement {stmt:?} not recorded once");
    assert_chain_ok(c);
}

#[test]
fn bad_key_file_reported_and_chain_still_written() {
    let cluster = StopOnDrop(Cluster::own("ckpt", 3));
    let mut c = cluster.connect("ckpt_badkey");
    let s = signing_key_status(&mut c);
    assert!(s.starts_with("none:"), "no key configured, but status {s:?}");

    // A file that does not exist.
    let missing = cluster.dir.join("no_such_dir").join("missing.key");
    set_and_reload(
        &cluster,
        &mut c,
        &[&format!("custody.signing_key_file = '{}'", missing.display()), "custody.checkpoint_interval = 1"],
    );
    let s = wait_key_status(&mut c, "error:", missing.to_str().unwrap());
    eprintln!("missing key file: {s}");
    assert_still_recording(&mut c, "missing_key");

    // A file with garbage content.
    let garbage = cluster.dir.join("garbage.key");
    std::fs::write(&garbage, "this is not a key\n\u{1}\u{2}garbage\n").unwrap();
    chown_postgres(&garbage);
    set_and_reload(&cluster, &mut c, &[&format!("custody.signing_key_file = '{}'", garbage.display())]);
    let s = wait_key_status(&mut c, "error:", garbage.to_str().unwrap());
    eprintln!("malformed key file: {s}");
    assert_still_recording(&mut c, "garbage_key");

    // Nothing was signed with either.
    let n = query_i64(&mut c, "SELECT count(*) FROM custody.checkpoints", &[]);
    assert_eq!(n, 0, "checkpoints written without a usable key");
    let s: Option<String> = c.query_one("SELECT custody.audit_digest()::text", &[]).unwrap().get(0);
    assert_eq!(s, None, "audit_digest() without any checkpoint");
    drop(c);
    drop(cluster);
}
