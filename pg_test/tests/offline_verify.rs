//! Offline verification with the `custody` command-line tool: an export of a chain with
//! signed checkpoints verifies with the right key and a digest (exit 0, JSON report ok);
//! one changed character in a record is found at that record's seq (exit 1); a wrong public
//! key is reported as such, not as tampering (exit 1); an unreadable export is exit 2.
//!
//! One cluster (PGDATA-offline, shared port + 4) produces the export once and is stopped;
//! the tests work on the files. Run with `--test-threads=1`.

use std::path::PathBuf;
use std::sync::OnceLock;

use pg_custody_client_tests::*;

struct Fixture {
    dir: PathBuf,
    log: PathBuf,
    digest: PathBuf,
    key: String,
    lines: Vec<String>,
    /// Unique text inside the statement of one record covered by the digest.
    flip: String,
}

fn fixture() -> &'static Fixture {
    static FX: OnceLock<Fixture> = OnceLock::new();
    FX.get_or_init(|| {
        let cluster = StopOnDrop(Cluster::own("offline", 4));
        // Inside PGDATA: readable by postgres, wiped by the next run's Cluster::own.
        let dir = cluster.dir.join("offline_files");
        std::fs::create_dir_all(&dir).unwrap();
        let key_file = dir.join("signing.key");
        let key = keygen(&key_file, "offline-test");
        let mut c = cluster.connect("offline_setup");
        set_and_reload(
            &cluster,
            &mut c,
            &[
                &format!("custody.signing_key_file = '{}'", key_file.display()),
                "custody.checkpoint_interval = 1",
            ],
        );
        wait_key_status(&mut c, "loaded:", "");
        let flip = marker("flipme");
        c.batch_execute("CREATE TABLE offline_t (id int PRIMARY KEY, note text)").unwrap();
        for i in 0..10 {
            c.simple_query(&format!("INSERT INTO offline_t VALUES ({i}, 'row {i}')")).unwrap();
        }
        c.simple_query(&format!("SELECT '{flip}'")).unwrap();
        for i in 10..15 {
            c.simple_query(&format!("INSERT INTO offline_t VALUES ({i}, 'row {i}')")).unwrap();
        }
        flush(&mut c);
        let head = query_i64(&mut c, "SELECT max(seq) FROM custody.audit_log", &[]);
        wait_checkpoint(&mut c, head);
        let digest_text = audit_digest(&mut c);
        let digest = dir.join("digest.json");
        std::fs::write(&digest, &digest_text).unwrap();
        let log = dir.join("export.jsonl");
        let lines = export_to_file(&mut c, &log);
        drop(c);
        let fx = Fixture { dir, log, digest, key, lines, flip };
        drop(cluster);
        fx
    })
}

fn verify_cli(log: &std::path::Path, key: &str, digest: Option<&std::path::Path>, json: bool) -> (i32, String) {
    let mut args = vec!["verify", "--log", log.to_str().unwrap(), "--public-key", key];
    if let Some(d) = digest {
        args.extend(["--digest", d.to_str().unwrap()]);
    }
    if json {
        args.push("--json");
    }
    let (code, out, err) = run_custody(&args);
    (code, format!("{out}{err}"))
}

#[test]
fn export_verifies_with_key_and_digest() {
    let fx = fixture();
    let first: serde_json::Value = serde_json::from_str(&fx.lines[0]).unwrap();
    assert_eq!(first["type"], "chain", "first export line is not the chain header: {}", fx.lines[0]);
    let checkpoints = fx.lines.iter().filter(|l| l.contains("\"type\":\"checkpoint\"")).count();
    assert!(checkpoints > 0, "export without checkpoints");

    let (code, out) = verify_cli(&fx.log, &fx.key, Some(&fx.digest), false);
    assert_eq!(code, 0, "custody verify failed:\n{out}");
    let (code, out) = verify_cli(&fx.log, &fx.key, Some(&fx.digest), true);
    assert_eq!(code, 0, "custody verify --json failed:\n{out}");
    let report: serde_json::Value =
        serde_json::from_str(out.trim()).unwrap_or_else(|e| panic!("--json output is not JSON ({e}): {out}"));
    assert_eq!(report["ok"], true, "{report}");
    assert!(report["checkpoints"].as_u64().unwrap_or(0) > 0, "no checkpoint verified: {report}");
    assert_eq!(report["digests"], 1, "digest not matched: {report}");
}

#[test]
fn flipped_character_in_a_record_found_at_its_seq() {
    let fx = fixture();
    let idx = fx
        .lines
        .iter()
        .position(|l| l.contains("\"type\":\"record\"") && l.contains(&fx.flip))
        .expect("record of the flip statement in the export");
    let rec: serde_json::Value = serde_json::from_str(&fx.lines[idx]).unwrap();
    let seq = rec["seq"].as_i64().unwrap();
    assert!(rec["statement"].as_str().unwrap().contains(&fx.flip));
    // One character changed inside the statement value: flipme_ -> flipmf_.
    let changed = fx.flip.replacen("flipme", "flipmf", 1);
    let mut lines = fx.lines.clone();
    lines[idx] = lines[idx].replace(&fx.flip, &changed);
    let edited: serde_json::Value = serde_json::from_str(&lines[idx]).expect("still valid JSON");
    assert_ne!(edited, rec);
    let log = fx.dir.join("flipped.jsonl");
    std::fs::write(&log, lines.join("\n") + "\n").unwrap();

    let (code, out) = verify_cli(&log, &fx.key, Some(&fx.digest), false);
    assert_eq!(code, 1, "flipped character not detected:\n{out}");
    assert!(out.contains(&format!("first bad seq: {seq};")), "output does not name seq {seq}:\n{out}");
    assert!(out.contains("TAMPERED"), "not reported as tampering:\n{out}");
    let (code, out) = verify_cli(&log, &fx.key, Some(&fx.digest), true);
    assert_eq!(code, 1, "--json: flipped character not detected:\n{out}");
    let report: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(report["ok"], false);
    assert_eq!(report["failure"]["seq"], seq, "{report}");
    assert_eq!(report["failure"]["kind"], "tamper", "{report}");
}

#[test]
fn wrong_public_key_reported_as_wrong_key() {
    let fx = fixture();
    let other_file = fx.dir.join("other.key");
    let _ = std::fs::remove_file(&other_file);
    let other = keygen(&other_file, "offline-test");
    assert_ne!(other, fx.key);
    for digest in [Some(fx.digest.as_path()), None] {
        let (code, out) = verify_cli(&fx.log, &other, digest, false);
        assert_eq!(code, 1, "wrong key accepted (digest {digest:?}):\n{out}");
        assert!(out.contains("WRONG KEY"), "not reported as a wrong key:\n{out}");
        assert!(!out.contains("TAMPER"), "wrong key reported as tampering:\n{out}");
        let (code, out) = verify_cli(&fx.log, &other, digest, true);
        assert_eq!(code, 1, "--json: wrong key accepted:\n{out}");
        let report: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
        assert_eq!(report["failure"]["kind"], "wrong_key", "{report}");
    }
}

#[test]
fn garbage_input_is_exit_2() {
    let fx = fixture();
    let garbage = fx.dir.join("garbage.jsonl");
    std::fs::write(&garbage, "this is not an export\n\u{0}\u{1}{{{\n").unwrap();
    let (code, out) = verify_cli(&garbage, &fx.key, None, false);
    assert_eq!(code, 2, "garbage export:\n{out}");
    let (code, out) = verify_cli(&fx.log, &fx.key, Some(&garbage), false);
    assert_eq!(code, 2, "garbage digest file:\n{out}");
    let (code, out) = verify_cli(&fx.dir.join("does_not_exist.jsonl"), &fx.key, None, false);
    assert_eq!(code, 2, "missing export file:\n{out}");
    let (code, out) = verify_cli(&fx.log, "not-a-key", None, false);
    assert_eq!(code, 2, "malformed public key:\n{out}");
}
