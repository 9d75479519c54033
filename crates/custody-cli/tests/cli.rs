//! End-to-end tests of the `custody` binary on exports built with the
//! library: what a user sees and the exit status they script against.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::io::Write as _;

use custody_chain::export::{ChainHeader, CheckpointLine, Digest, ExportLine, RecordLine};
use custody_chain::merkle::MerkleBuilder;
use custody_chain::note::{checkpoint_origin, parse_private_key, PrivateKey};
use custody_chain::{genesis_hash, Record};
use serde_json::json;

const SYSID: u64 = 7_123_456_789_012_345_678;
const OID: u32 = 16384;

/// A fresh directory under the system temp dir, removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new(tag: &str) -> Self {
        let p = std::env::temp_dir().join(format!("custody-cli-test-{}-{tag}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).unwrap();
        TempDir(p)
    }
    fn path(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn custody(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_custody")).args(args).output().unwrap()
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn record(seq: i64) -> Record {
    Record {
        seq,
        event_time: 1_700_000_000_000_000 + seq,
        logged_at: 1_700_000_000_000_100 + seq,
        database_name: "app".into(),
        session_user_name: "alice".into(),
        current_user_name: "alice".into(),
        client_addr: Some("10.0.0.5".into()),
        application_name: Some("psql".into()),
        backend_pid: 777,
        nesting_level: 0,
        xid: Some(1000 + seq),
        class: "WRITE".into(),
        command: "INSERT".into(),
        objects: json!([{"type": "table", "name": "public.payments"}]),
        statement: Some(format!("INSERT INTO payments VALUES ({seq}, 'amount-{seq:04}')")),
        statement_sha256: None,
        rows: Some(1),
        outcome: "ok".into(),
        sqlstate: None,
        message: None,
        decision: None,
    }
}

/// Write an export of `n` records with a checkpoint after record `cp`;
/// returns the digest at `cp`.
fn write_export(path: &Path, n: i64, cp: i64, key: &PrivateKey) -> Digest {
    let mut out = vec![ExportLine::Chain(ChainHeader {
        format: 1,
        system_identifier: SYSID,
        database_oid: OID,
        database: "app".into(),
        escape: None,
    })
    .to_json()];
    let mut prev = genesis_hash(SYSID, OID);
    let mut m = MerkleBuilder::new();
    let mut digest = None;
    for s in 1..=n {
        let r = record(s);
        let hash = r.chain_hash(&prev);
        out.push(ExportLine::Record(RecordLine { record: r, prev_hash: prev, hash }).to_json());
        m.push(&hash);
        prev = hash;
        if s == cp {
            let origin = checkpoint_origin(SYSID, OID);
            let c = CheckpointLine::sign(&origin, s, hash, m.root(), key, 1_700_000_000_000_000).unwrap();
            digest = Some(Digest { seq: s, hash, merkle_root: m.root(), signed_note: Some(c.note.clone()) });
            out.push(ExportLine::Checkpoint(c).to_json());
        }
    }
    std::fs::write(path, out.join("\n") + "\n").unwrap();
    digest.expect("cp <= n")
}

/// Generate a key with the binary itself: (private key, verifier key text).
fn keygen(dir: &TempDir) -> (PrivateKey, String) {
    let keyfile = dir.path("signing.key");
    let o = custody(&["keygen", "--out", keyfile.to_str().unwrap(), "--name", "test-log"]);
    assert!(o.status.success(), "{o:?}");
    let private = parse_private_key(&std::fs::read_to_string(&keyfile).unwrap()).unwrap();
    (private, stdout(&o).trim().to_string())
}

#[test]
fn keygen_writes_0600_and_refuses_to_overwrite() {
    use std::os::unix::fs::PermissionsExt as _;
    let dir = TempDir::new("keygen");
    let (private, verifier) = keygen(&dir);
    assert_eq!(private.verifier().to_text(), verifier);
    assert!(verifier.starts_with("test-log+"));
    let keyfile = dir.path("signing.key");
    let mode = std::fs::metadata(&keyfile).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600);
    let before = std::fs::read(&keyfile).unwrap();
    let o = custody(&["keygen", "--out", keyfile.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&o.stderr).contains("already exists"));
    assert_eq!(std::fs::read(&keyfile).unwrap(), before, "key must be untouched");
}

#[test]
fn valid_export_exits_0() {
    let dir = TempDir::new("valid");
    let (k, vkey) = keygen(&dir);
    let log = dir.path("export.jsonl");
    let d = write_export(&log, 30, 20, &k);
    let dfile = dir.path("digest.json");
    std::fs::write(&dfile, d.to_json()).unwrap();
    let o = custody(&["verify", "--log", log.to_str().unwrap(), "--public-key", &vkey, "--digest", dfile.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(0), "{}", stdout(&o));
    let out = stdout(&o);
    assert!(out.starts_with("OK: database app: 30 records verified (seq 1..30)"), "{out}");
    assert!(out.contains("1 signed checkpoints verified"), "{out}");
    // Key given as a file; log on stdin; --json.
    let kfile = dir.path("verifier.pub");
    std::fs::write(&kfile, format!("{vkey}\n")).unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_custody"))
        .args(["verify", "--log", "-", "--public-key", kfile.to_str().unwrap(), "--json"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(&std::fs::read(&log).unwrap()).unwrap();
    let o = child.wait_with_output().unwrap();
    assert_eq!(o.status.code(), Some(0));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["ok"], true);
    assert_eq!(v["records"], 30);
    assert_eq!(v["checkpoints"], 1);
    assert_eq!(v["failure"], serde_json::Value::Null);
}

#[test]
fn flipped_byte_names_the_record() {
    let dir = TempDir::new("flip");
    let (k, vkey) = keygen(&dir);
    let log = dir.path("export.jsonl");
    write_export(&log, 30, 20, &k);
    let mut bytes = std::fs::read(&log).unwrap();
    // One byte inside record 13's statement text: 'amount-0013' -> 'amount-0014'.
    let needle = b"amount-0013";
    let at = bytes.windows(needle.len()).position(|w| w == needle).unwrap() + needle.len() - 1;
    bytes[at] = b'4';
    std::fs::write(&log, bytes).unwrap();
    let o = custody(&["verify", "--log", log.to_str().unwrap(), "--public-key", &vkey]);
    assert_eq!(o.status.code(), Some(1));
    let out = stdout(&o);
    assert!(out.starts_with("TAMPERED: database app: record seq 13: hash mismatch"), "{out}");
    let o = custody(&["verify", "--log", log.to_str().unwrap(), "--public-key", &vkey, "--json"]);
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!((v["failure"]["seq"].as_i64(), v["failure"]["kind"].as_str()), (Some(13), Some("tamper")));
}

#[test]
fn wrong_key_is_reported_as_wrong_key_not_tampering() {
    let dir = TempDir::new("wrongkey");
    let (k, _) = keygen(&dir);
    let log = dir.path("export.jsonl");
    write_export(&log, 30, 20, &k);
    let other = PrivateKey::from_seed("test-log", &[42; 32]).unwrap().verifier().to_text();
    let o = custody(&["verify", "--log", log.to_str().unwrap(), "--public-key", &other]);
    assert_eq!(o.status.code(), Some(1));
    let out = stdout(&o);
    assert!(out.starts_with("WRONG KEY:"), "{out}");
    assert!(out.contains("wrong public key") && out.contains("not evidence of tampering"), "{out}");
    assert!(!out.contains("TAMPERED"), "{out}");
}

#[test]
fn truncated_tail_with_digest_exits_1() {
    let dir = TempDir::new("trunc");
    let (k, vkey) = keygen(&dir);
    let log = dir.path("export.jsonl");
    let d = write_export(&log, 30, 20, &k);
    let dfile = dir.path("digest.json");
    std::fs::write(&dfile, d.to_json()).unwrap();
    // Keep the header and records 1..15 only.
    let text = std::fs::read_to_string(&log).unwrap();
    let kept: Vec<&str> = text.lines().take(16).collect();
    std::fs::write(&log, kept.join("\n") + "\n").unwrap();
    let o = custody(&["verify", "--log", log.to_str().unwrap(), "--public-key", &vkey, "--digest", dfile.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(1));
    let out = stdout(&o);
    assert!(out.starts_with("TRUNCATED: database app: log truncated: digest at seq 20 but export ends at 15"), "{out}");
}

#[test]
fn garbage_and_bad_usage_exit_2() {
    let dir = TempDir::new("garbage");
    let (k, vkey) = keygen(&dir);
    let log = dir.path("export.jsonl");
    write_export(&log, 5, 5, &k);
    let mut text = std::fs::read_to_string(&log).unwrap();
    text.push_str("this is not json\n");
    std::fs::write(&log, text).unwrap();
    let o = custody(&["verify", "--log", log.to_str().unwrap(), "--public-key", &vkey]);
    assert_eq!(o.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&o.stderr).contains("line 8:"), "{o:?}");

    let missing = dir.path("nope.jsonl");
    for args in [
        vec!["verify", "--log", missing.to_str().unwrap(), "--public-key", vkey.as_str()],
        vec!["verify", "--log", log.to_str().unwrap(), "--public-key", "not-a-key"],
        vec!["frobnicate"],
    ] {
        assert_eq!(custody(&args).status.code(), Some(2), "{args:?}");
    }
    assert_eq!(custody(&["--help"]).status.code(), Some(0));
    let o = custody(&["verify", "--help"]);
    assert_eq!(o.status.code(), Some(0));
    assert!(stdout(&o).contains("--public-key KEY"));
}

#[test]
fn unsigned_verification_without_a_key_says_so() {
    let dir = TempDir::new("nokey");
    let (k, _) = keygen(&dir);
    let log = dir.path("export.jsonl");
    let d = write_export(&log, 30, 20, &k);
    let dfile = dir.path("digest.json");
    std::fs::write(&dfile, d.to_json()).unwrap();
    let o = custody(&["verify", "--log", log.to_str().unwrap(), "--digest", dfile.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(0), "{o:?}");
    let out = stdout(&o);
    assert!(out.starts_with("OK: database app: 30 records verified (seq 1..30)"), "{out}");
    assert!(out.contains("1 checkpoints' hashes and Merkle roots verified; 1 digests matched"), "{out}");
    assert!(out.contains("NO SIGNATURE WAS CHECKED"), "{out}");
    let o = custody(&["verify", "--log", log.to_str().unwrap(), "--json"]);
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!((v["ok"].as_bool(), v["signatures_checked"].as_bool()), (Some(true), Some(false)), "{v}");
    // Tampering is still found without a key.
    let mut bytes = std::fs::read(&log).unwrap();
    let needle = b"amount-0013";
    let at = bytes.windows(needle.len()).position(|w| w == needle).unwrap() + needle.len() - 1;
    bytes[at] = b'4';
    std::fs::write(&log, bytes).unwrap();
    let o = custody(&["verify", "--log", log.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(1), "{o:?}");
    assert!(stdout(&o).starts_with("TAMPERED: database app: record seq 13: hash mismatch"), "{}", stdout(&o));
}
