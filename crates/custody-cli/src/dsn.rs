//! `custody verify --dsn`: reads a log straight from a database — the source, a restored
//! copy, or a copy that logical replication keeps on a central server that does not run
//! pg_custody — and hands it to the export verifier as the export's JSON lines. The select
//! list comes from the one definition of the log's row (`custody_chain::COLUMNS`); values
//! are turned into their export form in SQL, exactly (µs integers from numeric epochs,
//! bytea as hex, inet as its host text).

use std::io::{self, Read};

use custody_chain::columns::SqlType;
use custody_chain::{lineage_of, Lineage, Record, COLUMNS};
use postgres::fallible_iterator::FallibleIterator;
use postgres::types::ToSql;
use serde_json::{Map, Value};

/// A schema name as an SQL identifier.
fn ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

/// The select list of the log, in `COLUMNS` order, each value as the export writes it.
fn select_list() -> String {
    COLUMNS
        .iter()
        .map(|c| {
            let col = ident(c.name);
            match c.sql_type {
                SqlType::TimestampTz => {
                    format!("(EXTRACT(EPOCH FROM {col}) OPERATOR(pg_catalog.*) 1000000)::pg_catalog.int8")
                }
                SqlType::Bytea => format!("pg_catalog.encode({col}, 'hex')"),
                SqlType::Jsonb => format!("{col}::pg_catalog.text"),
                SqlType::Inet => format!("pg_catalog.host({col})"),
                SqlType::Int8 | SqlType::Int4 | SqlType::Text => col,
            }
        })
        .collect::<Vec<_>>()
        .join(", ")
}

/// The copy's tables must be plain tables of built-in column types: a view, a table with row
/// security, or a column of a user's type would run its owner's code as the auditor.
fn check_tables(client: &mut postgres::Client, schema: &str) -> Result<(), String> {
    for table in ["audit_log", "checkpoints"] {
        let row = client
            .query_opt(
                "SELECT c.relkind::pg_catalog.text, c.relrowsecurity, \
                        EXISTS (SELECT FROM pg_catalog.pg_attribute a WHERE a.attrelid OPERATOR(pg_catalog.=) c.oid \
                                AND a.attnum OPERATOR(pg_catalog.>) 0 AND a.atttypid::pg_catalog.int8 OPERATOR(pg_catalog.>=) 16384) \
                 FROM pg_catalog.pg_class c JOIN pg_catalog.pg_namespace n ON n.oid OPERATOR(pg_catalog.=) c.relnamespace \
                 WHERE n.nspname OPERATOR(pg_catalog.=) $1 AND c.relname OPERATOR(pg_catalog.=) $2",
                &[&schema, &table],
            )
            .map_err(|e| format!("--dsn: {e}"))?
            .ok_or_else(|| format!("--dsn: there is no table {schema}.{table}"))?;
        let (kind, rls, user_types): (String, bool, bool) = (row.get(0), row.get(1), row.get(2));
        if kind != "r" || rls || user_types {
            return Err(format!(
                "--dsn: {schema}.{table} is not a plain table of built-in types (kind {kind}, row security {rls}, \
                 user-defined column types {user_types}): reading it could run its owner's code"
            ));
        }
    }
    Ok(())
}

/// The chain the log names (docs/chain-format.md §1.6): (system identifier, database OID).
fn named_chain(client: &mut postgres::Client, schema: &str) -> Result<Option<(u64, u32)>, postgres::Error> {
    let q = format!(
        "SELECT command, objects::pg_catalog.text FROM ONLY {}.audit_log WHERE class OPERATOR(pg_catalog.=) 'system' \
         AND (command OPERATOR(pg_catalog.=) $1 OR command OPERATOR(pg_catalog.=) $2) ORDER BY seq DESC",
        ident(schema)
    );
    let params: [&(dyn ToSql + Sync); 2] = [&custody_chain::WRITER_START, &custody_chain::CHAIN_HANDOVER];
    let mut rows = client.query_raw(q.as_str(), params)?;
    while let Some(row) = rows.next()? {
        let rec = Record {
            class: "system".into(),
            command: row.get(0),
            objects: serde_json::from_str(row.get::<_, &str>(1)).unwrap_or(Value::Null),
            ..Default::default()
        };
        let id = match lineage_of(&rec) {
            Some(Lineage::Writer(id)) => id,
            Some(Lineage::Handover { to, .. }) => to,
            _ => continue,
        };
        let parsed = id.origin.as_deref().and_then(custody_chain::note::parse_origin);
        if parsed.is_some() {
            return Ok(parsed);
        }
    }
    Ok(None)
}

/// The export's lines, produced as the verifier reads them.
pub struct DsnLines {
    pending: Vec<u8>,
    pos: usize,
    next: Box<dyn FnMut() -> io::Result<Option<String>>>,
}

impl Read for DsnLines {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        while self.pos >= self.pending.len() {
            match (self.next)()? {
                None => return Ok(0),
                Some(line) => {
                    self.pending = line.into_bytes();
                    self.pending.push(b'\n');
                    self.pos = 0;
                }
            }
        }
        let n = out.len().min(self.pending.len() - self.pos);
        out[..n].copy_from_slice(&self.pending[self.pos..self.pos + n]);
        self.pos += n;
        Ok(n)
    }
}

/// Connects to `dsn` and reads `<schema>.audit_log` and `<schema>.checkpoints` in seq order.
/// `origin` ("pg_custody/<system identifier>/<database oid>") names the chain the log must
/// be; by default the chain its records name.
pub fn open(dsn: &str, schema: &str, origin: Option<&str>) -> Result<(DsnLines, String), String> {
    let mut client = postgres::Client::connect(dsn, postgres::NoTls).map_err(|e| format!("--dsn: {e}"))?;
    // One snapshot for the log and its checkpoints; names resolved in pg_catalog only.
    client
        .batch_execute(
            "BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY; SET LOCAL search_path = pg_catalog, pg_temp; \
             SET LOCAL row_security = off",
        )
        .map_err(|e| format!("--dsn: {e}"))?;
    check_tables(&mut client, schema)?;
    // On a server where pg_custody writes this log, it must be this server's chain, whatever
    // its records claim.
    let writes_here: bool = client
        .query_one(
            "SELECT EXISTS (SELECT FROM pg_catalog.pg_extension WHERE extname OPERATOR(pg_catalog.=) 'pg_custody') \
                AND pg_catalog.current_setting('custody.database', true) OPERATOR(pg_catalog.=) pg_catalog.current_database()",
            &[],
        )
        .map_err(|e| format!("--dsn: {e}"))?
        .get(0);
    let own_origin = if writes_here && origin.is_none() {
        let r = client
            .query_one(
                "SELECT s.system_identifier::pg_catalog.text, d.oid::pg_catalog.int8 FROM pg_catalog.pg_control_system() s, \
                        pg_catalog.pg_database d WHERE d.datname OPERATOR(pg_catalog.=) pg_catalog.current_database()",
                &[],
            )
            .map_err(|e| format!("--dsn: this server writes the log, but its identity cannot be read ({e}): give --origin"))?;
        Some(format!("pg_custody/{}/{}", r.get::<_, String>(0), r.get::<_, i64>(1)))
    } else {
        None
    };
    let origin = origin.or(own_origin.as_deref());
    let chain = match origin {
        Some(o) => {
            let parsed = custody_chain::note::parse_origin(o);
            Some(parsed.ok_or_else(|| format!("--origin {o:?}: not pg_custody/<system identifier>/<database oid>"))?)
        }
        None => named_chain(&mut client, schema).map_err(|e| format!("--dsn: reading {schema}.audit_log: {e}"))?,
    };
    let (sysid, dboid) = match chain {
        Some(c) => c,
        None => {
            let any: i64 = client
                .query_one(&format!("SELECT pg_catalog.count(*) FROM ONLY {}.audit_log", ident(schema)), &[])
                .map_err(|e| format!("--dsn: {e}"))?
                .get(0);
            if any > 0 {
                return Err(
                    "the log names no chain (its writer predates chain lineage): give --origin pg_custody/<system identifier>/<database oid>"
                        .into(),
                );
            }
            (0, 0)
        }
    };
    let database: String = client.query_one("SELECT pg_catalog.current_database()::pg_catalog.text", &[]).map_err(|e| format!("--dsn: {e}"))?.get(0);
    let header = serde_json::json!({
        "type": "chain", "format": custody_chain::FORMAT_VERSION, "system_identifier": sysid.to_string(),
        "database_oid": dboid, "database": database,
    })
    .to_string();
    let cps = client
        .query(
            &format!(
                "SELECT seq, pg_catalog.encode(hash, 'hex'), pg_catalog.encode(merkle_root, 'hex'), key_id, signature, \
                        (EXTRACT(EPOCH FROM signed_at) OPERATOR(pg_catalog.*) 1000000)::pg_catalog.int8, note \
                 FROM ONLY {}.checkpoints ORDER BY seq",
                ident(schema)
            ),
            &[],
        )
        .map_err(|e| format!("--dsn: reading {schema}.checkpoints: {e}"))?;
    let mut cps = cps
        .into_iter()
        .map(|r| {
            let seq: i64 = r.get(0);
            let line = serde_json::json!({
                "type": "checkpoint", "seq": seq, "hash": r.get::<_, String>(1), "merkle_root": r.get::<_, String>(2),
                "key_id": r.get::<_, String>(3), "signature": r.get::<_, String>(4), "signed_at": r.get::<_, i64>(5),
                "note": r.get::<_, String>(6),
            });
            (seq, line.to_string())
        })
        .collect::<Vec<_>>()
        .into_iter()
        .peekable();
    let records = format!("SELECT {} FROM ONLY {}.audit_log ORDER BY seq", select_list(), ident(schema));
    client
        .batch_execute(&format!("DECLARE custody_verify NO SCROLL CURSOR FOR {records}"))
        .map_err(|e| format!("--dsn: reading {schema}.audit_log: {e}"))?;
    let mut header = Some(header);
    let mut batch = std::collections::VecDeque::new();
    let mut last_seq = i64::MIN;
    let mut done = false;
    let next = move || -> io::Result<Option<String>> {
        if let Some(h) = header.take() {
            return Ok(Some(h));
        }
        if cps.peek().is_some_and(|(s, _)| *s <= last_seq) {
            return Ok(cps.next().map(|(_, l)| l));
        }
        if batch.is_empty() && !done {
            batch.extend(client.query("FETCH 10000 FROM custody_verify", &[]).map_err(io::Error::other)?);
            done = batch.is_empty();
        }
        let Some(row) = batch.pop_front() else {
            return Ok(cps.next().map(|(_, l)| l));
        };
        let mut m = Map::new();
        m.insert("type".into(), "record".into());
        for (i, c) in COLUMNS.iter().enumerate() {
            let v = match c.sql_type {
                SqlType::Int8 | SqlType::TimestampTz => row.get::<_, Option<i64>>(i).map(Value::from),
                SqlType::Int4 => row.get::<_, Option<i32>>(i).map(Value::from),
                SqlType::Jsonb => row
                    .get::<_, Option<String>>(i)
                    .map(|t| serde_json::from_str(&t).map_err(io::Error::other))
                    .transpose()?,
                SqlType::Text | SqlType::Bytea | SqlType::Inet => row.get::<_, Option<String>>(i).map(Value::from),
            };
            match v {
                // A NULL decision is written by leaving the key out (chain-format.md §5.1).
                None if c.name == "decision" => {}
                None => {
                    m.insert(c.name.into(), Value::Null);
                }
                Some(v) => {
                    m.insert(c.name.into(), v);
                }
            }
        }
        last_seq = m.get("seq").and_then(Value::as_i64).unwrap_or(last_seq);
        Ok(Some(Value::Object(m).to_string()))
    };
    Ok((DsnLines { pending: Vec::new(), pos: 0, next: Box::new(next) }, database))
}
