//! The audit record, its canonical byte encoding, its chain hash and the
//! genesis hash. The encoding is what the chain protects: change nothing here
//! without bumping `FORMAT_VERSION` (see docs/chain-format.md).

use std::io::Write as _;
use std::net::IpAddr;

use serde::{Deserialize, Deserializer, Serialize};
use serde_json::Value;
use sha2::{Digest as _, Sha256};

use crate::{Hash, FORMAT_VERSION};

/// Domain-separation prefix of every encoded record (then `FORMAT_VERSION`).
pub const RECORD_DOMAIN: &[u8] = b"pg_custody/record\0";
/// Domain-separation prefix of the genesis hash input (then `FORMAT_VERSION`).
pub const GENESIS_DOMAIN: &[u8] = b"pg_custody/genesis\0";

/// Field type tags. Every field starts with one, so a reader always knows
/// how many bytes follow; NULL is its own tag, never an empty value.
pub const TAG_NULL: u8 = 0x00;
pub const TAG_INT8: u8 = 0x01;
pub const TAG_INT4: u8 = 0x02;
pub const TAG_TEXT: u8 = 0x03;
pub const TAG_BYTEA: u8 = 0x04;
pub const TAG_JSON: u8 = 0x05;

/// One audit record, every field except `prev_hash`/`hash`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Record {
    pub seq: i64,
    /// µs since the Unix epoch, UTC.
    pub event_time: i64,
    /// µs since the Unix epoch, UTC.
    pub logged_at: i64,
    pub database_name: String,
    pub session_user_name: String,
    pub current_user_name: String,
    /// IP address text; hashed in canonical form (see `encode_into`).
    pub client_addr: Option<String>,
    pub application_name: Option<String>,
    pub backend_pid: i32,
    /// 0 = top-level statement, 1 = inside a function/DO called by it, ...
    pub nesting_level: i32,
    pub xid: Option<i64>,
    pub class: String,
    pub command: String,
    /// A JSON array.
    pub objects: Value,
    pub statement: Option<String>,
    /// SHA-256 of the full text when `statement` was truncated, else None.
    #[serde(default, with = "crate::hex::opt_bytes")]
    pub statement_sha256: Option<Vec<u8>>,
    pub rows: Option<i64>,
    pub outcome: String,
    pub sqlstate: Option<String>,
    pub message: Option<String>,
    /// SQL NULL is serialized by *omitting* the field, so that a JSON `null`
    /// decision (Some(Value::Null)) survives a round trip distinctly.
    #[serde(default, skip_serializing_if = "Option::is_none", deserialize_with = "present_json")]
    pub decision: Option<Value>,
}

/// A present field, even `null`, is `Some`; only absence is `None`.
pub(crate) fn present_json<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Value>, D::Error> {
    Value::deserialize(d).map(Some)
}

#[inline]
fn put_i64(buf: &mut Vec<u8>, v: i64) {
    buf.push(TAG_INT8);
    buf.extend_from_slice(&v.to_be_bytes());
}

#[inline]
fn put_i32(buf: &mut Vec<u8>, v: i32) {
    buf.push(TAG_INT4);
    buf.extend_from_slice(&v.to_be_bytes());
}

#[inline]
fn put_len_prefixed(buf: &mut Vec<u8>, tag: u8, bytes: &[u8]) {
    // PostgreSQL values are at most 1 GB, so this cannot fail for real data;
    // a longer value would make the encoding ambiguous, hence the panic.
    let len = u32::try_from(bytes.len()).expect("field longer than 4 GiB");
    buf.push(tag);
    buf.extend_from_slice(&len.to_be_bytes());
    buf.extend_from_slice(bytes);
}

/// Write `tag`, a length placeholder, let `body` append, then patch the
/// length: lets variable-length values be written without a temporary.
#[inline]
fn put_deferred(buf: &mut Vec<u8>, tag: u8, body: impl FnOnce(&mut Vec<u8>)) {
    buf.push(tag);
    let at = buf.len();
    buf.extend_from_slice(&[0; 4]);
    body(buf);
    let len = u32::try_from(buf.len() - at - 4).expect("field longer than 4 GiB");
    buf[at..at + 4].copy_from_slice(&len.to_be_bytes());
}

#[inline]
fn put_opt_text(buf: &mut Vec<u8>, v: &Option<String>) {
    match v {
        Some(s) => put_len_prefixed(buf, TAG_TEXT, s.as_bytes()),
        None => buf.push(TAG_NULL),
    }
}

#[inline]
fn put_opt_i64(buf: &mut Vec<u8>, v: Option<i64>) {
    match v {
        Some(x) => put_i64(buf, x),
        None => buf.push(TAG_NULL),
    }
}

fn put_json(buf: &mut Vec<u8>, v: Json<'_>) {
    match v {
        Json::Value(v) => put_deferred(buf, TAG_JSON, |b| write_canonical_json(v, b)),
        Json::Canonical(bytes) => put_len_prefixed(buf, TAG_JSON, bytes),
    }
}

/// A JSON field as `encode_into_parts` takes it: the value, or its canonical text written
/// already by `write_canonical_json` (the writer keeps that once per distinct value; records
/// repeat the same few, and writing it again per record cost more than hashing it).
#[derive(Clone, Copy, Debug)]
pub enum Json<'a> {
    Value(&'a Value),
    Canonical(&'a [u8]),
}

impl Record {
    /// Canonical, versioned byte encoding of every field except
    /// prev_hash/hash.
    pub fn canonical_bytes(&self) -> Vec<u8> {
        let mut buf = Vec::with_capacity(256);
        self.encode_into(&mut buf);
        buf
    }

    /// Append the canonical encoding to `buf` (callers reuse one buffer;
    /// clear it first). Allocates nothing except when an object in
    /// `objects`/`decision` has keys that are not already sorted.
    pub fn encode_into(&self, buf: &mut Vec<u8>) {
        self.encode_into_parts(buf, Json::Value(&self.objects), self.decision.as_ref().map(Json::Value));
    }

    /// `encode_into` with `objects` and `decision` given apart (the record's own fields are
    /// not read): the same bytes when they hold the record's values or their canonical text.
    pub fn encode_into_parts(&self, buf: &mut Vec<u8>, objects: Json<'_>, decision: Option<Json<'_>>) {
        buf.extend_from_slice(RECORD_DOMAIN);
        buf.push(FORMAT_VERSION);
        put_i64(buf, self.seq);
        put_i64(buf, self.event_time);
        put_i64(buf, self.logged_at);
        put_len_prefixed(buf, TAG_TEXT, self.database_name.as_bytes());
        put_len_prefixed(buf, TAG_TEXT, self.session_user_name.as_bytes());
        put_len_prefixed(buf, TAG_TEXT, self.current_user_name.as_bytes());
        match &self.client_addr {
            // The same address may be spelled differently (inet text vs. a
            // socket address, "::1" vs "0:0:0:0:0:0:0:1"): hash one spelling.
            Some(a) => match a.parse::<IpAddr>() {
                Ok(ip) => put_deferred(buf, TAG_TEXT, |b| {
                    write!(b, "{ip}").expect("write to Vec cannot fail")
                }),
                Err(_) => put_len_prefixed(buf, TAG_TEXT, a.as_bytes()),
            },
            None => buf.push(TAG_NULL),
        }
        put_opt_text(buf, &self.application_name);
        put_i32(buf, self.backend_pid);
        put_i32(buf, self.nesting_level);
        put_opt_i64(buf, self.xid);
        put_len_prefixed(buf, TAG_TEXT, self.class.as_bytes());
        put_len_prefixed(buf, TAG_TEXT, self.command.as_bytes());
        put_json(buf, objects);
        put_opt_text(buf, &self.statement);
        match &self.statement_sha256 {
            Some(b) => put_len_prefixed(buf, TAG_BYTEA, b),
            None => buf.push(TAG_NULL),
        }
        put_opt_i64(buf, self.rows);
        put_len_prefixed(buf, TAG_TEXT, self.outcome.as_bytes());
        put_opt_text(buf, &self.sqlstate);
        put_opt_text(buf, &self.message);
        match decision {
            Some(v) => put_json(buf, v),
            None => buf.push(TAG_NULL),
        }
    }

    /// SHA-256(prev_hash || canonical_bytes).
    pub fn chain_hash(&self, prev: &Hash) -> Hash {
        self.chain_hash_with(prev, &mut Vec::with_capacity(256))
    }

    /// `chain_hash` using `buf` as scratch space (cleared first), for the
    /// writer and verifiers that hash many records.
    pub fn chain_hash_with(&self, prev: &Hash, buf: &mut Vec<u8>) -> Hash {
        buf.clear();
        self.encode_into(buf);
        hash_after(prev, buf)
    }

    /// `chain_hash_with` of `encode_into_parts`.
    pub fn chain_hash_parts(&self, prev: &Hash, buf: &mut Vec<u8>, objects: Json<'_>, decision: Option<Json<'_>>) -> Hash {
        buf.clear();
        self.encode_into_parts(buf, objects, decision);
        hash_after(prev, buf)
    }
}

/// SHA-256(prev_hash || encoding).
fn hash_after(prev: &Hash, buf: &[u8]) -> Hash {
    let mut h = Sha256::new();
    h.update(prev);
    h.update(buf);
    h.finalize().into()
}

/// Genesis prev_hash binding the chain to one cluster and database:
/// SHA-256(GENESIS_DOMAIN || FORMAT_VERSION || system_identifier u64 BE ||
/// database_oid u32 BE).
pub fn genesis_hash(system_identifier: u64, database_oid: u32) -> Hash {
    let mut h = Sha256::new();
    h.update(GENESIS_DOMAIN);
    h.update([FORMAT_VERSION]);
    h.update(system_identifier.to_be_bytes());
    h.update(database_oid.to_be_bytes());
    h.finalize().into()
}

/// Canonical JSON: object keys sorted by UTF-8 bytes, no insignificant
/// whitespace, serde_json string and number formatting. Text read back from
/// a jsonb column (reordered keys, spaces) gives the same bytes once parsed.
pub fn canonical_json(v: &Value) -> String {
    let mut out = Vec::with_capacity(64);
    write_canonical_json(v, &mut out);
    String::from_utf8(out).expect("serde_json writes UTF-8")
}

/// Append the canonical JSON of `v` to `out`.
pub fn write_canonical_json(v: &Value, out: &mut Vec<u8>) {
    match v {
        Value::Null => out.extend_from_slice(b"null"),
        Value::Bool(true) => out.extend_from_slice(b"true"),
        Value::Bool(false) => out.extend_from_slice(b"false"),
        Value::Number(n) => serde_json::to_writer(&mut *out, n).expect("write to Vec"),
        Value::String(s) => serde_json::to_writer(&mut *out, s).expect("write to Vec"),
        Value::Array(a) => {
            out.push(b'[');
            for (i, x) in a.iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                write_canonical_json(x, out);
            }
            out.push(b']');
        }
        Value::Object(m) => {
            // serde_json's Map is sorted unless some crate in the build
            // enables `preserve_order`; sort only when needed. Rust's str
            // ordering is byte-wise, which is what we specify.
            let mut entries: Vec<(&String, &Value)> = m.iter().collect();
            if !entries.windows(2).all(|w| w[0].0 <= w[1].0) {
                entries.sort_unstable_by(|a, b| a.0.cmp(b.0));
            }
            out.push(b'{');
            for (i, (k, x)) in entries.into_iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                serde_json::to_writer(&mut *out, k).expect("write to Vec");
                out.push(b':');
                write_canonical_json(x, out);
            }
            out.push(b'}');
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::hex;
    use serde_json::json;

    /// The record pinned by the golden vectors in docs/chain-format.md.
    pub(crate) fn sample(seq: i64) -> Record {
        Record {
            seq,
            event_time: 1_700_000_000_000_000,
            logged_at: 1_700_000_000_000_123,
            database_name: "app".into(),
            session_user_name: "alice".into(),
            current_user_name: "alice".into(),
            client_addr: Some("192.168.0.7".into()),
            application_name: Some("psql".into()),
            backend_pid: 4242,
            nesting_level: 0,
            xid: Some(731),
            class: "WRITE".into(),
            command: "UPDATE".into(),
            objects: json!([{"type": "table", "name": "public.accounts"}]),
            statement: Some("UPDATE accounts SET balance = 0".into()),
            statement_sha256: None,
            rows: Some(1),
            outcome: "ok".into(),
            sqlstate: None,
            message: None,
            decision: Some(json!({"allow": true, "policy": "p1"})),
        }
    }

    /// A record with every optional field NULL.
    pub(crate) fn sample_nulls() -> Record {
        Record {
            seq: 2,
            event_time: -1,
            logged_at: 0,
            database_name: "".into(),
            session_user_name: "postgres".into(),
            current_user_name: "postgres".into(),
            client_addr: None,
            application_name: None,
            backend_pid: -1,
            nesting_level: 1,
            xid: None,
            class: "DDL".into(),
            command: "CREATE TABLE".into(),
            objects: json!([]),
            statement: None,
            statement_sha256: None,
            rows: None,
            outcome: "error".into(),
            sqlstate: None,
            message: None,
            decision: None,
        }
    }

    /// Pinned by docs/chain-format.md (and checked there against an
    /// independent implementation of the spec).
    pub(crate) const GENESIS_HEX: &str = "49f3f36ac8dfeafe4836dc54fca9342f52bef2b873fbf1ed5b81430086caaab4";
    pub(crate) const SAMPLE_HASH_HEX: &str = "7d83234b9419459f5acf42c866a24d0f6dc4fe7307e11e053b22c5174e32d0c9";

    /// The writer hashes objects and decision from their canonical text kept apart: the same
    /// hash as from the values, whatever order their keys came in, and with a NULL decision.
    #[test]
    fn parts_hash_like_the_record() {
        let prev = [7u8; 32];
        let mut r = sample(5);
        r.objects = serde_json::from_str(r#"[{"z":1,"a":{"y":[true,null],"b":"\u00e9"}}]"#).unwrap();
        r.decision = Some(serde_json::from_str(r#"{"rules":["x"],"allow":false}"#).unwrap());
        let canon = |v: &Value| {
            let mut out = Vec::new();
            write_canonical_json(v, &mut out);
            out
        };
        let (o, d) = (canon(&r.objects), canon(r.decision.as_ref().unwrap()));
        let parts = |r: &Record, d: Option<&[u8]>| {
            let mut without = r.clone();
            without.objects = Value::Null;
            without.decision = Some(json!("ignored"));
            without.chain_hash_parts(&prev, &mut Vec::new(), Json::Canonical(&o), d.map(Json::Canonical))
        };
        assert_eq!(parts(&r, Some(&d)), r.chain_hash(&prev));
        assert_ne!(parts(&r, None), r.chain_hash(&prev));
        r.decision = None;
        assert_eq!(parts(&r, None), r.chain_hash(&prev));
        let mut buf = Vec::new();
        r.encode_into_parts(&mut buf, Json::Value(&r.objects), None);
        assert_eq!(buf, r.canonical_bytes());
    }

    #[test]
    fn golden_genesis() {
        let g = genesis_hash(7_300_000_000_000_000_001, 16384);
        assert_eq!(hex::encode(&g), GENESIS_HEX);
    }

    #[test]
    fn golden_encoding_of_all_null_record() {
        // Field by field, as laid out in docs/chain-format.md.
        let want = [
            "70675f637573746f64792f7265636f726400", // "pg_custody/record\0"
            "01",                                   // FORMAT_VERSION
            "010000000000000002",                   // seq = 2
            "01ffffffffffffffff",                   // event_time = -1
            "010000000000000000",                   // logged_at = 0
            "0300000000",                           // database_name = ""
            "0300000008706f737467726573",           // session_user_name
            "0300000008706f737467726573",           // current_user_name
            "00",                                   // client_addr NULL
            "00",                                   // application_name NULL
            "02ffffffff",                           // backend_pid = -1
            "0200000001",                           // nesting_level = 1
            "00",                                   // xid NULL
            "030000000344444c",                     // class = "DDL"
            "030000000c435245415445205441424c45",   // command = "CREATE TABLE"
            "05000000025b5d",                       // objects = []
            "00",                                   // statement NULL
            "00",                                   // statement_sha256 NULL
            "00",                                   // rows NULL
            "03000000056572726f72",                 // outcome = "error"
            "00",                                   // sqlstate NULL
            "00",                                   // message NULL
            "00",                                   // decision NULL
        ]
        .concat();
        assert_eq!(hex::encode(&sample_nulls().canonical_bytes()), want);
    }

    #[test]
    fn golden_record_hash() {
        let g = genesis_hash(7_300_000_000_000_000_001, 16384);
        let h = sample(1).chain_hash(&g);
        assert_eq!(hex::encode(&h), SAMPLE_HASH_HEX);
        assert_eq!(
            hex::encode(&sample(1).canonical_bytes()),
            "70675f637573746f64792f7265636f726400010100000000000000010100060a24181e40000100060a24181e407b03000000036170700300000005616c6963650300000005616c696365030000000b3139322e3136382e302e3703000000047073716c020000109202000000000100000000000002db030000000557524954450300000006555044415445050000002b5b7b226e616d65223a227075626c69632e6163636f756e7473222c2274797065223a227461626c65227d5d030000001f555044415445206163636f756e7473205345542062616c616e6365203d20300001000000000000000103000000026f6b0000050000001c7b22616c6c6f77223a747275652c22706f6c696379223a227031227d"
        );
    }

    #[test]
    fn chain_hash_is_sha256_of_prev_and_encoding() {
        let prev = [7u8; 32];
        let r = sample(3);
        let mut h = Sha256::new();
        h.update(prev);
        h.update(r.canonical_bytes());
        let want: Hash = h.finalize().into();
        assert_eq!(r.chain_hash(&prev), want);
        let mut buf = vec![1, 2, 3];
        assert_eq!(r.chain_hash_with(&prev, &mut buf), want);
    }

    #[test]
    fn canonical_json_sorts_keys_and_strips_whitespace() {
        // What PostgreSQL's jsonb output looks like for the same value.
        let from_pg: Value = serde_json::from_str(r#"{"b": 1, "a": [1, 2], "é": "x\ny", "A": null}"#).unwrap();
        let built = json!({"é": "x\ny", "a": [1, 2], "A": null, "b": 1});
        assert_eq!(canonical_json(&from_pg), r#"{"A":null,"a":[1,2],"b":1,"é":"x\ny"}"#);
        assert_eq!(canonical_json(&from_pg), canonical_json(&built));
        assert_eq!(canonical_json(&json!({"z": {"y": 1, "x": 2}})), r#"{"z":{"x":2,"y":1}}"#);
        // Escaping as documented: short escapes, lowercase \u00XX, '/' literal.
        assert_eq!(canonical_json(&json!("a\u{1}\t\"\\/é")), r#""a\u0001\t\"\\/é""#);
        assert_eq!(canonical_json(&json!([1.5, -5, 1e300])), "[1.5,-5,1e+300]");
    }

    #[test]
    fn every_field_changes_the_encoding() {
        let base = sample(1);
        let enc = base.canonical_bytes();
        let mut variants: Vec<Record> = Vec::new();
        macro_rules! vary {
            ($($f:ident = $v:expr),* $(,)?) => {$({
                let mut r = base.clone();
                r.$f = $v;
                variants.push(r);
            })*};
        }
        vary!(
            seq = 2, event_time = 1, logged_at = 1,
            database_name = "x".into(), session_user_name = "x".into(),
            current_user_name = "x".into(), client_addr = None,
            application_name = None, backend_pid = 1, nesting_level = 1,
            xid = None, class = "x".into(), command = "x".into(),
            objects = json!([]), statement = None,
            statement_sha256 = Some(vec![0; 32]), rows = None,
            outcome = "x".into(), sqlstate = Some("42501".into()),
            message = Some("x".into()), decision = None,
        );
        for v in &variants {
            assert_ne!(v.canonical_bytes(), enc, "{v:?}");
        }
    }

    #[test]
    fn null_empty_and_json_null_are_distinct() {
        let mut a = sample_nulls();
        let mut b = a.clone();
        b.application_name = Some(String::new());
        assert_ne!(a.canonical_bytes(), b.canonical_bytes());
        b = a.clone();
        b.decision = Some(Value::Null);
        assert_ne!(a.canonical_bytes(), b.canonical_bytes());
        // Moving a byte from one text field to the next must not collide.
        a.message = Some("ab".into());
        a.sqlstate = Some("".into());
        b = a.clone();
        b.sqlstate = Some("a".into());
        b.message = Some("b".into());
        assert_ne!(a.canonical_bytes(), b.canonical_bytes());
    }

    #[test]
    fn client_addr_is_canonicalized() {
        let mut a = sample(1);
        let mut b = sample(1);
        a.client_addr = Some("::1".into());
        b.client_addr = Some("0:0:0:0:0:0:0:1".into());
        assert_eq!(a.canonical_bytes(), b.canonical_bytes());
        b.client_addr = Some("::2".into());
        assert_ne!(a.canonical_bytes(), b.canonical_bytes());
        // Unparseable text is hashed as is.
        a.client_addr = Some("[local]".into());
        let enc = a.canonical_bytes();
        assert!(enc.windows(7).any(|w| w == b"[local]"));
    }

    #[test]
    fn serde_round_trip_keeps_null_decision_distinct() {
        let mut r = sample(1);
        r.statement_sha256 = Some(vec![0xab; 32]);
        for d in [None, Some(Value::Null), Some(json!({"k": 1}))] {
            r.decision = d;
            let s = serde_json::to_string(&r).unwrap();
            let back: Record = serde_json::from_str(&s).unwrap();
            assert_eq!(back, r, "{s}");
        }
        assert!(serde_json::to_string(&r).unwrap().contains(&"ab".repeat(32)));
    }
}
