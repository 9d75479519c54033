//! Throughput of the export verifier (what `custody verify` runs) over an export of
//! pgbench-like records built in memory, with a checkpoint every 10,000 records.
//! Measures and prints; never a test.
//!
//!   cargo run --release -p custody-chain --example verify_bench [records (1000000)]
use std::time::Instant;

use custody_chain::export::{verify_export_parallel, ChainHeader, CheckpointLine, ExportLine, RecordLine};
use custody_chain::merkle::MerkleBuilder;
use custody_chain::{checkpoint_origin, genesis_hash, PrivateKey, Record};

fn main() {
    let n: i64 = std::env::args().nth(1).and_then(|a| a.parse().ok()).unwrap_or(1_000_000);
    let (sysid, oid) = (7_300_000_000_000_000_001u64, 5u32);
    let key = PrivateKey::from_seed("bench", &[7u8; 32]).expect("key");
    let origin = checkpoint_origin(sysid, oid);
    let mut text = ExportLine::Chain(ChainHeader {
        format: custody_chain::FORMAT_VERSION,
        system_identifier: sysid,
        database_oid: oid,
        database: "postgres".into(),
        escape: None,
    })
    .to_json();
    text.push('\n');
    let mut prev = genesis_hash(sysid, oid);
    let mut merkle = MerkleBuilder::new();
    for seq in 1..=n {
        let record = Record {
            seq,
            event_time: 1_764_320_000_000_000 + seq * 25,
            logged_at: 1_764_320_000_000_000 + seq * 25 + 900,
            database_name: "postgres".into(),
            session_user_name: "postgres".into(),
            current_user_name: "postgres".into(),
            client_addr: None,
            application_name: Some("pgbench".into()),
            backend_pid: 4000 + (seq % 4) as i32,
            nesting_level: 0,
            xid: None,
            class: "read".into(),
            command: "SELECT".into(),
            objects: serde_json::json!([{"kind": "table", "name": "pgbench_accounts", "schema": "public",
                                         "columns": ["abalance", "aid"], "privileges": ["SELECT"]}]),
            statement: Some("SELECT abalance FROM pgbench_accounts WHERE aid = $1;".into()),
            statement_sha256: None,
            rows: Some(1),
            outcome: "success".into(),
            sqlstate: None,
            message: None,
            decision: None,
        };
        let hash = record.chain_hash(&prev);
        text += &ExportLine::Record(RecordLine { record, prev_hash: prev, hash }).to_json();
        text.push('\n');
        merkle.push(&hash);
        prev = hash;
        if seq % 10_000 == 0 {
            let c = CheckpointLine::sign(&origin, seq, hash, merkle.root(), &key, 0).expect("sign");
            text += &ExportLine::Checkpoint(c).to_json();
            text.push('\n');
        }
    }
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    for t in [1, threads] {
        let start = Instant::now();
        let report = verify_export_parallel(text.as_bytes(), Some(&key.verifier()), &[], t).expect("readable");
        let secs = start.elapsed().as_secs_f64();
        assert!(report.ok, "{report:?}");
        println!(
            "verify_export, {t} thread(s): {} records, {} checkpoints, {:.0} MB, {:.3} s, {:.0} records/s",
            report.records,
            report.checkpoints,
            text.len() as f64 / 1e6,
            secs,
            report.records as f64 / secs
        );
    }
}
