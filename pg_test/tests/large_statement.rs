//! Statements of any size are recorded: a 10 MB statement has its record, its text
//! truncated at custody.max_statement_length, and the SHA-256 of the full text kept.

use pg_custody_client_tests::*;
use sha2::{Digest, Sha256};

#[test]
fn ten_megabyte_statement_is_recorded_truncated_with_its_hash() {
    let cluster = Cluster::shared();
    let m = marker("big");
    let mut c = cluster.connect(&m);
    // SELECT '<marker>' || '<10 MB of x>' — one statement of just over 10 MB.
    let filler = "x".repeat(10 * 1024 * 1024);
    let sql = format!("SELECT length('{m}' || '{filler}')");
    assert!(sql.len() > 10 * 1024 * 1024);
    let rows = c.simple_query(&sql).unwrap();
    assert!(!rows.is_empty());
    flush(&mut c);

    let limit: i64 = c
        .query_one("SELECT setting::bigint FROM pg_settings WHERE name = 'custody.max_statement_length'", &[])
        .unwrap()
        .get(0);
    let row = c
        .query_one(
            "SELECT octet_length(statement)::bigint, statement_sha256, outcome, left(statement, 40) \
             FROM custody.audit_log WHERE application_name = $1 AND statement LIKE 'SELECT length(%' ",
            &[&m],
        )
        .unwrap();
    let stored_len: i64 = row.get(0);
    let digest: Option<Vec<u8>> = row.get(1);
    let outcome: String = row.get(2);
    let head: String = row.get(3);
    assert_eq!(outcome, "success");
    assert!(stored_len <= limit && stored_len >= limit - 4, "stored {stored_len} bytes, limit {limit}");
    assert!(head.starts_with(&format!("SELECT length('{m}'")));
    let expected: Vec<u8> = Sha256::digest(sql.as_bytes()).to_vec();
    assert_eq!(digest, Some(expected), "statement_sha256 must be the SHA-256 of the full text");
    assert_chain_ok(&mut c);
}

#[test]
fn short_statement_is_stored_whole_without_hash() {
    let cluster = Cluster::shared();
    let m = marker("small");
    let mut c = cluster.connect(&m);
    let sql = format!("SELECT '{m}'");
    c.simple_query(&sql).unwrap();
    flush(&mut c);
    let row = c
        .query_one("SELECT statement, statement_sha256 FROM custody.audit_log WHERE statement = $1", &[&sql])
        .unwrap();
    assert_eq!(row.get::<_, String>(0), sql);
    assert_eq!(row.get::<_, Option<Vec<u8>>>(1), None);
}

/// Long values of the log are compressed with lz4 where the server has it (pglz cost the
/// writer about twice as much per record of a 4 kB statement, docs/benchmarks.md); a long
/// statement's stored text is lz4-compressed and reads back whole.
#[test]
fn long_values_are_stored_with_lz4_where_the_server_has_it() {
    let cluster = Cluster::shared();
    let m = marker("lz4");
    let mut c = cluster.connect(&m);
    let has_lz4: bool = c
        .query_one(
            "SELECT 'lz4' = ANY (enumvals) FROM pg_catalog.pg_settings WHERE name = 'default_toast_compression'",
            &[],
        )
        .unwrap()
        .get(0);
    let want = if has_lz4 { "l" } else { "" };
    let rows = c
        .query(
            "SELECT attname::text, attcompression::text FROM pg_catalog.pg_attribute \
             WHERE attrelid = 'custody.audit_log'::regclass \
               AND attname IN ('statement', 'objects', 'message', 'decision') ORDER BY attname",
            &[],
        )
        .unwrap();
    let got: Vec<(String, String)> = rows.iter().map(|r| (r.get(0), r.get(1))).collect();
    let expected: Vec<(String, String)> =
        ["decision", "message", "objects", "statement"].iter().map(|n| (n.to_string(), want.to_string())).collect();
    assert_eq!(got, expected, "compression of the log's long columns (lz4 available: {has_lz4})");

    let sql = format!("SELECT '{m}', '{}'", "abcdefgh".repeat(2000));
    c.simple_query(&sql).unwrap();
    flush(&mut c);
    let row = c
        .query_one(
            "SELECT statement, pg_catalog.pg_column_compression(statement) FROM custody.audit_log \
             WHERE application_name = $1 AND command = 'SELECT' ORDER BY seq DESC LIMIT 1",
            &[&m],
        )
        .unwrap();
    assert_eq!(row.get::<_, String>(0), sql, "the text reads back whole");
    let method: Option<String> = row.get(1);
    assert_eq!(method.as_deref(), Some(if has_lz4 { "lz4" } else { "pglz" }), "how the statement was stored");
    assert_chain_ok(&mut c);
}
