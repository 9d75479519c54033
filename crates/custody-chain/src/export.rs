//! The JSON-lines export format (one chain line, then records with
//! checkpoints interleaved) and its streaming verifier, which is what the
//! `custody verify` command runs.

use std::collections::VecDeque;
use std::fmt;
use std::io::BufRead;

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;
use serde::{Deserialize, Serialize};

use crate::merkle::MerkleBuilder;
use crate::note::{self, NoteError, PrivateKey, VerifierKey};
use crate::record::Record;
use crate::verify::{ChainId, ChainVerifier, FailureKind, Lineage};
use crate::{Hash, FORMAT_VERSION};

/// First line: which cluster and database the chain belongs to.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChainHeader {
    pub format: u8,
    /// Decimal string: u64 does not survive JSON parsers that use doubles.
    #[serde(with = "u64_string")]
    pub system_identifier: u64,
    pub database_oid: u32,
    pub database: String,
    /// Always a single backslash. Makes the export self-describing when it went through
    /// PostgreSQL's `COPY ... TO STDOUT` text format, which doubles every backslash: the
    /// verifier then sees two here and undoes COPY's escaping on every line.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub escape: Option<String>,
}

/// A record as stored, with its stored prev_hash and hash.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RecordLine {
    #[serde(flatten)]
    pub record: Record,
    #[serde(with = "crate::hex::hash")]
    pub prev_hash: Hash,
    #[serde(with = "crate::hex::hash")]
    pub hash: Hash,
}

/// A signed checkpoint over records 1..=seq, placed right after record seq.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct CheckpointLine {
    pub seq: i64,
    /// Chain hash of record `seq`.
    #[serde(with = "crate::hex::hash")]
    pub hash: Hash,
    /// RFC 6962 root over the hashes of records 1..=seq.
    #[serde(with = "crate::hex::hash")]
    pub merkle_root: Hash,
    /// 8 hex digits: the signing key's key ID.
    pub key_id: String,
    /// base64 of the 64-byte Ed25519 signature of the checkpoint body.
    pub signature: String,
    /// µs since the Unix epoch, UTC. Informational; not signed.
    pub signed_at: i64,
    /// The signed note: checkpoint body + signature line(s).
    pub note: String,
}

impl CheckpointLine {
    /// Sign a checkpoint for records 1..=seq of the chain with `origin`
    /// (see `note::checkpoint_origin`).
    pub fn sign(
        origin: &str,
        seq: i64,
        hash: Hash,
        merkle_root: Hash,
        key: &PrivateKey,
        signed_at: i64,
    ) -> Result<Self, NoteError> {
        let size = u64::try_from(seq).map_err(|_| NoteError::Malformed("negative seq".into()))?;
        let body = note::checkpoint_body(origin, size, &merkle_root);
        Ok(CheckpointLine {
            seq,
            hash,
            merkle_root,
            key_id: crate::hex::encode(&key.key_id()),
            signature: B64.encode(key.sign_bytes(body.as_bytes())),
            signed_at,
            note: note::sign_note(&body, key)?,
        })
    }
}

/// Undoes the escaping of PostgreSQL's COPY text format (backslash sequences).
pub fn unescape_copy_text(line: &str) -> String {
    let mut out = String::with_capacity(line.len());
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        if c != '\\' {
            out.push(c);
            continue;
        }
        match chars.next() {
            Some('n') => out.push('\n'),
            Some('t') => out.push('\t'),
            Some('r') => out.push('\r'),
            Some('b') => out.push('\u{8}'),
            Some('f') => out.push('\u{c}'),
            Some('v') => out.push('\u{b}'),
            Some(other) => out.push(other),
            None => out.push('\\'),
        }
    }
    out
}

/// One line of an export.
// Records are nearly every line: boxing them would cost an allocation each.
#[allow(clippy::large_enum_variant)]
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "lowercase")]
pub enum ExportLine {
    Chain(ChainHeader),
    Record(RecordLine),
    Checkpoint(CheckpointLine),
}

impl ExportLine {
    /// The line's JSON text, without the trailing newline.
    pub fn to_json(&self) -> String {
        serde_json::to_string(self).expect("export lines always serialize")
    }
    /// Parse one line (without its newline).
    pub fn parse(line: &str) -> Result<Self, String> {
        // Record lines are nearly all of an export, and serde's tagged-enum and flatten
        // support buffers every field before decoding it; read the fields straight in when
        // the line starts the way exports write it. Anything else takes the general path.
        if line.starts_with(r#"{"type":"record","#) {
            if let Ok(flat) = serde_json::from_str::<FlatRecordLine>(line) {
                return Ok(ExportLine::Record(flat.into()));
            }
        }
        serde_json::from_str(line).map_err(|e| e.to_string())
    }
}

/// A record line's fields, for `ExportLine::parse`'s direct path: the same fields and
/// attributes as `Record` and `RecordLine`, without the flatten. A record line's keys are the
/// log's columns, in order (`columns::COLUMNS`; tested there and in
/// `direct_record_path_agrees_with_the_general_one`).
#[derive(Deserialize)]
struct FlatRecordLine {
    #[serde(rename = "type")]
    _type: serde::de::IgnoredAny,
    seq: i64,
    event_time: i64,
    logged_at: i64,
    database_name: String,
    session_user_name: String,
    current_user_name: String,
    client_addr: Option<String>,
    application_name: Option<String>,
    backend_pid: i32,
    nesting_level: i32,
    xid: Option<i64>,
    class: String,
    command: String,
    objects: serde_json::Value,
    statement: Option<String>,
    #[serde(default, with = "crate::hex::opt_bytes")]
    statement_sha256: Option<Vec<u8>>,
    rows: Option<i64>,
    outcome: String,
    sqlstate: Option<String>,
    message: Option<String>,
    #[serde(default, deserialize_with = "crate::record::present_json")]
    decision: Option<serde_json::Value>,
    #[serde(with = "crate::hex::hash")]
    prev_hash: Hash,
    #[serde(with = "crate::hex::hash")]
    hash: Hash,
}

impl From<FlatRecordLine> for RecordLine {
    fn from(f: FlatRecordLine) -> RecordLine {
        RecordLine {
            record: Record {
                seq: f.seq,
                event_time: f.event_time,
                logged_at: f.logged_at,
                database_name: f.database_name,
                session_user_name: f.session_user_name,
                current_user_name: f.current_user_name,
                client_addr: f.client_addr,
                application_name: f.application_name,
                backend_pid: f.backend_pid,
                nesting_level: f.nesting_level,
                xid: f.xid,
                class: f.class,
                command: f.command,
                objects: f.objects,
                statement: f.statement,
                statement_sha256: f.statement_sha256,
                rows: f.rows,
                outcome: f.outcome,
                sqlstate: f.sqlstate,
                message: f.message,
                decision: f.decision,
            },
            prev_hash: f.prev_hash,
            hash: f.hash,
        }
    }
}

/// A digest an auditor kept: the chain state at `seq`, to later prove the
/// chain was neither rewritten nor truncated since.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Digest {
    pub seq: i64,
    #[serde(with = "crate::hex::hash")]
    pub hash: Hash,
    #[serde(with = "crate::hex::hash")]
    pub merkle_root: Hash,
    #[serde(default)]
    pub signed_note: Option<String>,
}

impl Digest {
    pub fn to_json(&self) -> String {
        serde_json::to_string(self).expect("digests always serialize")
    }
    pub fn parse(text: &str) -> Result<Self, String> {
        serde_json::from_str(text.trim()).map_err(|e| e.to_string())
    }
}

mod u64_string {
    use serde::{Deserialize, Deserializer, Serializer};
    pub fn serialize<S: Serializer>(v: &u64, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(v)
    }
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
        let s = <std::borrow::Cow<str>>::deserialize(d)?;
        s.parse().map_err(|_| serde::de::Error::custom("expected a decimal u64 in a string"))
    }
}

/// What kind of problem was found; callers must tell them apart.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FailureClass {
    /// Records, links, checkpoints or digests do not match: evidence of
    /// tampering (or corruption).
    Tamper,
    /// A checkpoint/digest is signed by another key than the one given:
    /// most likely the wrong public key, not evidence of tampering.
    WrongKey,
    /// The export ends before a seq a digest vouches for.
    Truncated,
}

impl FailureClass {
    pub fn as_str(self) -> &'static str {
        match self {
            FailureClass::Tamper => "tamper",
            FailureClass::WrongKey => "wrong_key",
            FailureClass::Truncated => "truncated",
        }
    }
}

/// A verification failure in an export.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ExportFailure {
    /// The first bad record (or the checkpoint's / digest's seq).
    pub seq: i64,
    pub class: FailureClass,
    /// The record-level reason when it is a chain failure.
    pub chain: Option<FailureKind>,
    pub reason: String,
}

/// Outcome of `verify_export`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Report {
    pub ok: bool,
    pub records: i64,
    /// Checkpoints whose hash, Merkle root and (if a key was given)
    /// signature all verified.
    pub checkpoints: u64,
    pub digests: u64,
    /// Whether checkpoint signatures were checked (a key was given).
    pub signatures_checked: bool,
    pub head: Option<(i64, Hash)>,
    pub header: Option<ChainHeader>,
    /// Most serious failure: tampering, else truncation, else wrong key.
    pub failure: Option<ExportFailure>,
}

/// Unreadable or malformed input, naming the line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExportError {
    pub line: u64,
    pub message: String,
}

impl fmt::Display for ExportError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "line {}: {}", self.line, self.message)
    }
}

impl std::error::Error for ExportError {}

fn tamper(seq: i64, reason: String) -> ExportFailure {
    ExportFailure { seq, class: FailureClass::Tamper, chain: None, reason }
}

/// Check a signed note against the chain state at `seq`, if a key is given.
fn check_note(
    what: &str,
    seq: i64,
    note_text: &str,
    root: &Hash,
    chain: &Option<ChainId>,
    key: Option<&VerifierKey>,
) -> Result<(), ExportFailure> {
    let opened = match key {
        Some(k) => note::open_note(note_text, k),
        // No key: still check the body matches, so a swapped note shows.
        None => note_text
            .rfind("\n\n")
            .map(|i| &note_text[..i + 1])
            .ok_or_else(|| NoteError::Malformed("no signature block".into())),
    };
    let body = match opened {
        Ok(b) => b,
        Err(NoteError::UnknownKey) => {
            let k = key.expect("UnknownKey only with a key");
            return Err(ExportFailure {
                seq,
                class: FailureClass::WrongKey,
                chain: None,
                reason: format!(
                    "wrong public key: {what} at seq {seq} is signed by another key, not {}+{} (this is not evidence of tampering; check the key)",
                    k.name(),
                    crate::hex::encode(&k.key_id())
                ),
            });
        }
        Err(e) => return Err(tamper(seq, format!("{what} at seq {seq}: {e}"))),
    };
    let (o, size, r) =
        note::parse_checkpoint(body).map_err(|e| tamper(seq, format!("{what} at seq {seq}: {e}")))?;
    // The note names the chain it signs by its origin; a hand-over changes the origin from
    // its record on, and a restored chain may know its first segment by genesis hash only.
    if let Some(c) = chain {
        let fits = match &c.origin {
            Some(origin) => o == *origin,
            None => note::origin_genesis(&o) == Some(c.genesis),
        };
        if !fits {
            return Err(tamper(seq, format!("{what} at seq {seq}: note origin {o:?} is not this chain's ({})", c.label())));
        }
    }
    if i64::try_from(size).ok() != Some(seq) || r != *root {
        return Err(tamper(
            seq,
            format!("{what} at seq {seq}: signed note (tree size {size}) does not match the chain's Merkle root at seq {seq}"),
        ));
    }
    Ok(())
}

/// Verify an export as it streams by: every hash and link from the genesis,
/// each checkpoint against the Merkle root and chain hash at its seq (and
/// its signature with `verifier`), and each digest against the chain.
/// Memory is constant besides the Merkle stack and the digests.
/// Returns Err only for unreadable or malformed input.
pub fn verify_export(
    reader: impl BufRead,
    verifier: Option<&VerifierKey>,
    digests: &[Digest],
) -> Result<Report, ExportError> {
    let mut lines = LineSource::new(reader);
    verify_lines(|| lines.next_parsed(), verifier, digests)
}

/// `verify_export` with the lines parsed and the records hashed by `threads` worker threads
/// (the checks themselves stay in order on the calling thread, so the result is the same).
/// Worth it when parsing, not reading, is the bottleneck: the command-line verifier.
pub fn verify_export_parallel(
    reader: impl BufRead,
    verifier: Option<&VerifierKey>,
    digests: &[Digest],
    threads: usize,
) -> Result<Report, ExportError> {
    if threads < 2 {
        return verify_export(reader, verifier, digests);
    }
    let mut lines = LineSource::new(reader);
    std::thread::scope(|scope| {
        use std::sync::mpsc;
        let mut to_workers = Vec::new();
        let mut from_workers = Vec::new();
        for _ in 0..threads {
            let (tx, rx) = mpsc::sync_channel::<(bool, Chunk)>(2);
            let (rtx, rrx) = mpsc::sync_channel::<Vec<Parsed>>(2);
            scope.spawn(move || {
                let mut buf = Vec::with_capacity(1024);
                for (copy_text, chunk) in rx {
                    let mut out = Vec::with_capacity(chunk.ends.len());
                    let mut from = 0;
                    for (i, &end) in chunk.ends.iter().enumerate() {
                        out.push(parse_one(chunk.first_line + i as u64, &chunk.text[from..end], copy_text, &mut buf));
                        from = end;
                    }
                    if rtx.send(out).is_err() {
                        break;
                    }
                }
            });
            to_workers.push(tx);
            from_workers.push(rrx);
        }
        // Chunks go to the workers in turn and come back in the same turn, so order holds.
        const CHUNK: usize = 1024;
        let (mut sent, mut received) = (0usize, 0usize);
        let mut read_error: Option<ExportError> = None;
        let mut done_reading = false;
        let mut current: std::vec::IntoIter<Parsed> = Vec::new().into_iter();
        let result = verify_lines(
            || loop {
                if let Some(p) = current.next() {
                    return Some(Ok(p));
                }
                while !done_reading && sent - received < 2 * threads {
                    match lines.read_chunk(CHUNK) {
                        Ok(chunk) if chunk.ends.is_empty() => done_reading = true,
                        Ok(chunk) => {
                            let _ = to_workers[sent % threads].send((lines.copy_text, chunk));
                            sent += 1;
                        }
                        Err(e) => {
                            read_error = Some(e);
                            done_reading = true;
                        }
                    }
                }
                if received == sent {
                    return read_error.take().map(Err);
                }
                current = from_workers[received % threads].recv().unwrap_or_default().into_iter();
                received += 1;
            },
            verifier,
            digests,
        );
        drop(to_workers); // workers end when their channel closes
        drop(from_workers);
        result
    })
}

/// A parsed line as the checks need it: a record is reduced to its seq, its stored hashes
/// and its chain hash computed over its stored prev_hash (so that the record itself is
/// freed by the thread that parsed it).
struct Parsed {
    lineno: u64,
    line: Result<Line, String>,
}

enum Line {
    Chain(ChainHeader),
    Record { seq: i64, prev_hash: Hash, hash: Hash, computed: Hash, alarm: Option<String>, lineage: Option<Lineage> },
    Checkpoint(CheckpointLine),
}

fn parse_one(lineno: u64, text: &str, copy_text: bool, buf: &mut Vec<u8>) -> Parsed {
    let line = text.strip_suffix('\n').unwrap_or(text);
    let line = line.strip_suffix('\r').unwrap_or(line);
    let unescaped;
    let line = if copy_text {
        unescaped = unescape_copy_text(line);
        unescaped.as_str()
    } else {
        line
    };
    let line = ExportLine::parse(line).map(|l| match l {
        ExportLine::Chain(h) => Line::Chain(h),
        ExportLine::Record(r) => Line::Record {
            seq: r.record.seq,
            computed: r.record.chain_hash_with(&r.prev_hash, buf),
            alarm: crate::verify::alarm_of(&r.record),
            lineage: crate::verify::lineage_of(&r.record),
            prev_hash: r.prev_hash,
            hash: r.hash,
        },
        ExportLine::Checkpoint(c) => Line::Checkpoint(c),
    });
    Parsed { lineno, line }
}

/// Lines of an export, numbered; knows from the first line whether the export went through
/// COPY's text format.
struct LineSource<R> {
    reader: R,
    lineno: u64,
    copy_text: bool,
    buf: Vec<u8>,
}

impl<R: BufRead> LineSource<R> {
    fn new(reader: R) -> Self {
        LineSource { reader, lineno: 0, copy_text: false, buf: Vec::with_capacity(1024) }
    }

    fn read_line(&mut self) -> Result<Option<(u64, String)>, ExportError> {
        let mut text = String::new();
        self.lineno += 1;
        let n = self.reader.read_line(&mut text).map_err(|e| ExportError {
            line: self.lineno,
            message: format!("cannot read: {e}"),
        })?;
        if n == 0 {
            return Ok(None);
        }
        if self.lineno == 1 && text.contains(r#""escape":"\\\\""#) {
            self.copy_text = true;
        }
        Ok(Some((self.lineno, text)))
    }

    fn next_parsed(&mut self) -> Option<Result<Parsed, ExportError>> {
        match self.read_line() {
            Ok(Some((n, text))) => {
                let copy_text = self.copy_text;
                Some(Ok(parse_one(n, &text, copy_text, &mut self.buf)))
            }
            Ok(None) => None,
            Err(e) => Some(Err(e)),
        }
    }

    /// Up to `n` lines in one buffer; the first line of the export always alone, so that
    /// `copy_text` is known before any other line is parsed.
    fn read_chunk(&mut self, n: usize) -> Result<Chunk, ExportError> {
        let n = if self.lineno == 0 { 1 } else { n };
        let mut chunk = Chunk { first_line: self.lineno + 1, text: String::with_capacity(n * 800), ends: Vec::with_capacity(n) };
        while chunk.ends.len() < n {
            self.lineno += 1;
            let read = self.reader.read_line(&mut chunk.text).map_err(|e| ExportError {
                line: self.lineno,
                message: format!("cannot read: {e}"),
            })?;
            if read == 0 {
                self.lineno -= 1;
                break;
            }
            if self.lineno == 1 && chunk.text.contains(r#""escape":"\\\\""#) {
                self.copy_text = true;
            }
            chunk.ends.push(chunk.text.len());
        }
        Ok(chunk)
    }
}

/// Consecutive lines in one buffer (one allocation to hand to a worker and free there).
struct Chunk {
    first_line: u64,
    text: String,
    ends: Vec<usize>,
}

fn verify_lines(
    next: impl FnMut() -> Option<Result<Parsed, ExportError>>,
    verifier: Option<&VerifierKey>,
    digests: &[Digest],
) -> Result<Report, ExportError> {
    let mut pending: Vec<&Digest> = digests.iter().collect();
    pending.sort_by_key(|d| d.seq);
    let mut pending: VecDeque<&Digest> = pending.into();

    let mut report = Report {
        ok: false,
        records: 0,
        checkpoints: 0,
        digests: 0,
        signatures_checked: verifier.is_some(),
        head: None,
        header: None,
        failure: None,
    };
    let mut chain: Option<ChainVerifier> = None;
    let mut merkle = MerkleBuilder::new();
    let mut tampered: Option<ExportFailure> = None;
    let mut wrong_key: Option<ExportFailure> = None;

    let mut next = next;
    while let Some(item) = next() {
        let Parsed { lineno, line: parsed } = item?;
        let parsed = parsed.map_err(|m| ExportError { line: lineno, message: m })?;
        let malformed = |m: &str| ExportError { line: lineno, message: m.to_string() };
        match parsed {
            Line::Chain(h) => {
                if chain.is_some() {
                    return Err(malformed("a second \"chain\" line"));
                }
                if h.format != FORMAT_VERSION {
                    return Err(malformed(&format!(
                        "unsupported format {} (this verifier reads format {FORMAT_VERSION})",
                        h.format
                    )));
                }
                // The chain must end as the chain of the cluster and database the header names;
                // hand-overs on the way are followed (docs/chain-format.md, "Hand-over").
                chain = Some(ChainVerifier::from_genesis(Some(ChainId::of(h.system_identifier, h.database_oid))));
                report.header = Some(h);
            }
            _ if chain.is_none() => return Err(malformed("the first line must be the \"chain\" line")),
            Line::Record { seq, prev_hash, hash, computed, alarm, lineage } => {
                let v = chain.as_mut().expect("checked above");
                if let Err(f) = v.push_hashed(seq, &prev_hash, &hash, computed, alarm, lineage) {
                    tampered = Some(ExportFailure {
                        seq: f.seq,
                        class: FailureClass::Tamper,
                        reason: f.to_string(),
                        chain: Some(f.kind),
                    });
                    break;
                }
                merkle.push(&hash);
                while pending.front().is_some_and(|d| d.seq <= seq) {
                    let d = pending.pop_front().expect("front exists");
                    let root = merkle.root();
                    if d.seq != seq || d.hash != hash || d.merkle_root != root {
                        tampered = Some(tamper(
                            d.seq,
                            format!("digest at seq {} does not match the export: the chain was rewritten after the digest was taken", d.seq),
                        ));
                        break;
                    }
                    if let Some(n) = &d.signed_note {
                        match check_note("digest", seq, n, &root, &v.chain(), verifier) {
                            Ok(()) => {}
                            Err(f) if f.class == FailureClass::WrongKey => {
                                wrong_key.get_or_insert(f);
                            }
                            Err(f) => {
                                tampered = Some(f);
                                break;
                            }
                        }
                    }
                    report.digests += 1;
                }
                if tampered.is_some() {
                    break;
                }
            }
            Line::Checkpoint(c) => {
                let v = chain.as_ref().expect("checked above");
                let head = v.head();
                let result = match head {
                    Some((s, h)) if s == c.seq => {
                        let root = merkle.root();
                        if c.hash != h {
                            Err(tamper(c.seq, format!("checkpoint at seq {}: its hash is not the chain hash of record {}", c.seq, c.seq)))
                        } else if c.merkle_root != root {
                            Err(tamper(c.seq, format!("checkpoint at seq {}: Merkle root does not match records 1..{}", c.seq, c.seq)))
                        } else {
                            check_note("checkpoint", c.seq, &c.note, &root, &v.chain(), verifier)
                                .and_then(|()| check_signature_field(&c, verifier))
                        }
                    }
                    _ => Err(tamper(
                        c.seq,
                        format!(
                            "checkpoint for seq {} is out of place (it follows record {})",
                            c.seq,
                            head.map_or(0, |(s, _)| s)
                        ),
                    )),
                };
                match result {
                    Ok(()) => report.checkpoints += 1,
                    Err(f) if f.class == FailureClass::WrongKey => {
                        wrong_key.get_or_insert(f);
                    }
                    Err(f) => {
                        tampered = Some(f);
                        break;
                    }
                }
            }
        }
    }
    let Some(mut v) = chain else {
        return Err(ExportError { line: 1, message: "empty export: no \"chain\" line".into() });
    };
    if tampered.is_none() {
        if let Err(f) = v.finish() {
            tampered = Some(ExportFailure { seq: f.seq, class: FailureClass::Tamper, reason: f.to_string(), chain: Some(f.kind) });
        }
    }
    report.records = v.checked();
    report.head = v.head();
    let truncated = match (tampered.is_none(), pending.back()) {
        (true, Some(d)) => Some(ExportFailure {
            seq: d.seq,
            class: FailureClass::Truncated,
            chain: None,
            reason: format!(
                "log truncated: digest at seq {} but export ends at {}",
                d.seq,
                report.head.map_or(0, |(s, _)| s)
            ),
        }),
        _ => None,
    };
    report.failure = tampered.or(truncated).or(wrong_key);
    report.ok = report.failure.is_none();
    Ok(report)
}

/// The line's own `signature` and `key_id` fields must agree with the key.
fn check_signature_field(c: &CheckpointLine, key: Option<&VerifierKey>) -> Result<(), ExportFailure> {
    let Some(k) = key else { return Ok(()) };
    let body = &c.note[..c.note.rfind("\n\n").map_or(0, |i| i + 1)];
    let sig = B64.decode(&c.signature).unwrap_or_default();
    if c.key_id != crate::hex::encode(&k.key_id()) || !k.verify_bytes(body.as_bytes(), &sig) {
        return Err(tamper(
            c.seq,
            format!("checkpoint at seq {}: key_id/signature fields do not match its signed note", c.seq),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::note::tests::golden_key;
    use crate::record::tests::sample;
    use crate::record::genesis_hash;

    const SYSID: u64 = 7_300_000_000_000_000_001;
    const OID: u32 = 16384;

    /// An export of `n` records with checkpoints after every `every`th
    /// record; also returns a digest at each checkpoint.
    fn build(n: i64, every: i64, key: &PrivateKey) -> (Vec<String>, Vec<Digest>) {
        let header = ChainHeader { format: 1, system_identifier: SYSID, database_oid: OID, database: "app".into(), escape: None };
        let origin = note::checkpoint_origin(SYSID, OID);
        let mut lines = vec![ExportLine::Chain(header).to_json()];
        let mut digests = Vec::new();
        let mut prev = genesis_hash(SYSID, OID);
        let mut m = MerkleBuilder::new();
        for s in 1..=n {
            let mut record = sample(s);
            record.statement = Some(format!("UPDATE t SET x = {s}"));
            let hash = record.chain_hash(&prev);
            lines.push(ExportLine::Record(RecordLine { record, prev_hash: prev, hash }).to_json());
            m.push(&hash);
            prev = hash;
            if s % every == 0 {
                let c = CheckpointLine::sign(&origin, s, hash, m.root(), key, 1_700_000_000_000_000).unwrap();
                digests.push(Digest { seq: s, hash, merkle_root: m.root(), signed_note: Some(c.note.clone()) });
                lines.push(ExportLine::Checkpoint(c).to_json());
            }
        }
        (lines, digests)
    }

    fn run(lines: &[String], key: Option<&VerifierKey>, digests: &[Digest]) -> Result<Report, ExportError> {
        let text = lines.join("\n") + "\n";
        verify_export(text.as_bytes(), key, digests)
    }

    fn failure(r: &Report) -> (i64, FailureClass) {
        let f = r.failure.as_ref().expect("expected a failure");
        (f.seq, f.class)
    }

    /// The example export of docs/chain-format.md, byte for byte.
    const GOLDEN_EXPORT: &str = concat!(
        r#"{"type":"chain","format":1,"system_identifier":"7300000000000000001","database_oid":16384,"database":"app"}"#, "\n",
        r#"{"type":"record","seq":1,"event_time":1700000000000000,"logged_at":1700000000000123,"database_name":"app","session_user_name":"alice","current_user_name":"alice","client_addr":"192.168.0.7","application_name":"psql","backend_pid":4242,"nesting_level":0,"xid":731,"class":"WRITE","command":"UPDATE","objects":[{"name":"public.accounts","type":"table"}],"statement":"UPDATE accounts SET balance = 0","statement_sha256":null,"rows":1,"outcome":"ok","sqlstate":null,"message":null,"decision":{"allow":true,"policy":"p1"},"prev_hash":"49f3f36ac8dfeafe4836dc54fca9342f52bef2b873fbf1ed5b81430086caaab4","hash":"7d83234b9419459f5acf42c866a24d0f6dc4fe7307e11e053b22c5174e32d0c9"}"#, "\n",
        r#"{"type":"checkpoint","seq":1,"hash":"7d83234b9419459f5acf42c866a24d0f6dc4fe7307e11e053b22c5174e32d0c9","merkle_root":"c92b5a34ad5057344ba3dc8db4784fb33e6050fbde6df4c1d3aaea0c485d56c2","key_id":"41dfb93b","signature":"MNwrUS0rq3k2E5XNa9MHgh5OH1ES9G4UxJbcVcRPq5zsbzXR1+B/sRF8ytfSSUwFbJ1Aq9DdoVlsdgqCmGxOCA==","signed_at":1700000000100000,"note":"pg_custody/7300000000000000001/16384\n1\nyStaNK1QVzRLo9yNtHhPsz5gUPvebfTB06rqDEhdVsI=\n\n— pg_custody Qd+5OzDcK1EtK6t5NhOVzWvTB4IeTh9REvRuFMSW3FXET6uc7G810dfgf7ERfMrX0klMBWydQKvQ3aFZbHYKgphsTgg=\n"}"#, "\n",
    );

    #[test]
    fn golden_export_verifies_and_reserializes_identically() {
        let k = golden_key();
        let r = verify_export(GOLDEN_EXPORT.as_bytes(), Some(&k.verifier()), &[]).unwrap();
        assert!(r.ok, "{r:?}");
        assert_eq!((r.records, r.checkpoints), (1, 1));
        let mut rebuilt = String::new();
        for l in GOLDEN_EXPORT.lines() {
            rebuilt += &ExportLine::parse(l).unwrap().to_json();
            rebuilt.push('\n');
        }
        assert_eq!(rebuilt, GOLDEN_EXPORT);
        // The checkpoint is reproducible from the key (Ed25519 is deterministic).
        let h = r.head.unwrap().1;
        let root = crate::merkle::merkle_root(&[h]);
        let c = CheckpointLine::sign(&note::checkpoint_origin(SYSID, OID), 1, h, root, &k, 1_700_000_000_100_000).unwrap();
        assert_eq!(ExportLine::Checkpoint(c).to_json(), GOLDEN_EXPORT.lines().nth(2).unwrap());
    }

    #[test]
    fn line_round_trip() {
        let (lines, digests) = build(4, 2, &golden_key());
        for l in &lines {
            assert_eq!(&ExportLine::parse(l).unwrap().to_json(), l);
        }
        assert_eq!(Digest::parse(&digests[0].to_json()).unwrap(), digests[0]);
        assert!(lines[0].starts_with(r#"{"type":"chain","format":1,"system_identifier":"7300000000000000001""#), "{}", lines[0]);
    }

    #[test]
    fn direct_record_path_agrees_with_the_general_one() {
        let golden = GOLDEN_EXPORT.lines().nth(1).unwrap();
        let mut variants = vec![golden.to_string()];
        // decision: JSON null (Some(Null)) versus absent (None); a statement hash present.
        variants.push(golden.replace(r#""decision":{"allow":true,"policy":"p1"}"#, r#""decision":null"#));
        variants.push(golden.replace(r#","decision":{"allow":true,"policy":"p1"}"#, ""));
        variants.push(golden.replace(r#""statement_sha256":null"#, &format!(r#""statement_sha256":"{}""#, "ab".repeat(32))));
        // Not what exports write: the general path decides, error messages included.
        variants.push(golden.replace(r#""seq":1,"#, r#""seq":"one","#));
        variants.push(golden.replace(r#","hash":"7d8"#, r#","hash":"zz8"#));
        for v in &variants {
            let general: Result<ExportLine, String> = serde_json::from_str(v).map_err(|e| e.to_string());
            assert_eq!(ExportLine::parse(v), general, "{v}");
        }
        assert!(matches!(ExportLine::parse(&variants[2]), Ok(ExportLine::Record(r)) if r.record.decision.is_none()));
        assert!(matches!(ExportLine::parse(&variants[1]), Ok(ExportLine::Record(r)) if r.record.decision == Some(serde_json::Value::Null)));
    }

    #[test]
    fn parallel_verification_reports_exactly_what_sequential_does() {
        let k = golden_key();
        let (lines, digests) = build(5000, 1000, &k);
        let mut cases: Vec<(Vec<String>, Vec<Digest>)> = vec![(lines.clone(), digests.clone())];
        let mut edited = lines.clone();
        edited[2345] = edited[2345].replacen("UPDATE t SET x", "UPDATE t SET y", 1);
        cases.push((edited, vec![]));
        let mut deleted = lines.clone();
        deleted.remove(4000);
        cases.push((deleted, vec![]));
        let mut swapped = lines.clone();
        swapped.swap(10, 11);
        cases.push((swapped, vec![]));
        let mut duplicated = lines.clone();
        duplicated.insert(3000, lines[2999].clone());
        cases.push((duplicated, vec![]));
        cases.push((lines[..3000].to_vec(), digests.clone())); // truncated below a digest
        let mut malformed = lines.clone();
        malformed[4321] = "{not json".into();
        cases.push((malformed, vec![]));
        for (i, (ls, ds)) in cases.iter().enumerate() {
            let text = ls.join("\n") + "\n";
            let seq = verify_export(text.as_bytes(), Some(&k.verifier()), ds);
            for threads in [2, 3] {
                let par = verify_export_parallel(text.as_bytes(), Some(&k.verifier()), ds, threads);
                assert_eq!(par, seq, "case {i}, {threads} threads");
            }
        }
        // And a case each way, so that the comparison above cannot pass vacuously.
        let text = cases[0].0.join("\n") + "\n";
        assert!(verify_export_parallel(text.as_bytes(), Some(&k.verifier()), &cases[0].1, 2).unwrap().ok);
        let text = cases[1].0.join("\n") + "\n";
        let r = verify_export_parallel(text.as_bytes(), Some(&k.verifier()), &[], 2).unwrap();
        let Ok(ExportLine::Record(edited)) = ExportLine::parse(&lines[2345]) else { panic!("a record line") };
        assert_eq!(failure(&r), (edited.record.seq, FailureClass::Tamper));
    }

    #[test]
    fn valid_export_verifies() {
        let k = golden_key();
        let (lines, digests) = build(25, 10, &k);
        let r = run(&lines, Some(&k.verifier()), &digests).unwrap();
        assert!(r.ok, "{r:?}");
        assert_eq!((r.records, r.checkpoints, r.digests), (25, 2, 2));
        assert_eq!(r.head.unwrap().0, 25);
    }

    #[test]
    fn edited_record_is_tamper_at_its_seq() {
        let k = golden_key();
        let (mut lines, _) = build(25, 10, &k);
        // Line index = seq for records before the first checkpoint.
        lines[7] = lines[7].replace("x = 7", "x = 8");
        let r = run(&lines, Some(&k.verifier()), &[]).unwrap();
        assert_eq!(failure(&r), (7, FailureClass::Tamper));
        assert_eq!(r.failure.unwrap().chain, Some(FailureKind::HashMismatch));
    }

    #[test]
    fn rewritten_suffix_is_caught_by_checkpoint_and_digest() {
        // Edit record 3 and recompute every later hash: the chain is
        // internally consistent again, only the signed roots catch it.
        let k = golden_key();
        let (lines, digests) = build(10, 5, &k);
        let mut parsed: Vec<ExportLine> = lines.iter().map(|l| ExportLine::parse(l).unwrap()).collect();
        let mut prev = genesis_hash(SYSID, OID);
        for l in parsed.iter_mut() {
            if let ExportLine::Record(r) = l {
                if r.record.seq == 3 {
                    r.record.rows = Some(99);
                }
                r.prev_hash = prev;
                r.hash = r.record.chain_hash(&prev);
                prev = r.hash;
            }
        }
        let forged: Vec<String> = parsed.iter().map(ExportLine::to_json).collect();
        let r = run(&forged, Some(&k.verifier()), &[]).unwrap();
        assert_eq!(failure(&r), (5, FailureClass::Tamper));
        // Without checkpoints, an earlier digest still catches it.
        let no_cp: Vec<String> = forged.into_iter().filter(|l| !l.contains("\"checkpoint\"")).collect();
        let r = run(&no_cp, None, &digests[..1]).unwrap();
        assert_eq!(failure(&r), (5, FailureClass::Tamper));
        assert!(r.failure.unwrap().reason.contains("rewritten"));
    }

    #[test]
    fn wrong_key_is_not_tamper() {
        let k = golden_key();
        let other = PrivateKey::from_seed("pg_custody", &[7; 32]).unwrap();
        let (lines, _) = build(12, 5, &k);
        let r = run(&lines, Some(&other.verifier()), &[]).unwrap();
        assert_eq!(failure(&r), (5, FailureClass::WrongKey));
        assert!(r.failure.unwrap().reason.contains("wrong public key"));
        assert_eq!(r.records, 12, "records are still all checked");
    }

    #[test]
    fn altered_checkpoint_note_is_tamper() {
        let k = golden_key();
        let (mut lines, _) = build(6, 5, &k);
        let i = lines.iter().position(|l| l.contains("\"checkpoint\"")).unwrap();
        let mut c = match ExportLine::parse(&lines[i]).unwrap() {
            ExportLine::Checkpoint(c) => c,
            _ => unreachable!(),
        };
        c.note = c.note.replacen("\n5\n", "\n4\n", 1);
        lines[i] = ExportLine::Checkpoint(c).to_json();
        let r = run(&lines, Some(&k.verifier()), &[]).unwrap();
        assert_eq!(failure(&r), (5, FailureClass::Tamper));
    }

    #[test]
    fn truncated_export_with_digest() {
        let k = golden_key();
        let (lines, digests) = build(20, 10, &k);
        let r = run(&lines[..12], Some(&k.verifier()), &digests).unwrap();
        let f = r.failure.unwrap();
        assert_eq!((f.seq, f.class), (20, FailureClass::Truncated));
        assert_eq!(f.reason, "log truncated: digest at seq 20 but export ends at 10");
    }

    #[test]
    fn deleted_line_is_missing_seq() {
        let k = golden_key();
        let (mut lines, _) = build(8, 100, &k);
        lines.remove(4);
        let r = run(&lines, None, &[]).unwrap();
        assert_eq!(r.failure.unwrap().chain, Some(FailureKind::MissingSeq { expected: 4, found: 5 }));
    }

    #[test]
    fn malformed_input_names_the_line() {
        let k = golden_key();
        let (mut lines, _) = build(5, 100, &k);
        lines[3] = "{not json".into();
        assert_eq!(run(&lines, None, &[]).unwrap_err().line, 4);
        assert_eq!(verify_export(&b""[..], None, &[]).unwrap_err().line, 1);
        assert_eq!(run(&lines[1..2], None, &[]).unwrap_err().line, 1);
        let wrong_format = lines[0].replace("\"format\":1", "\"format\":2");
        assert!(run(&[wrong_format], None, &[]).unwrap_err().message.contains("unsupported format"));
    }

    #[test]
    fn an_export_that_went_through_copy_text_format_still_verifies() {
        let (sk, vk) = test_keys_for_copy();
        let header = ChainHeader {
            format: 1,
            system_identifier: SYSID,
            database_oid: OID,
            database: "app".into(),
            escape: Some("\\".into()),
        };
        let mut prev = genesis_hash(SYSID, OID);
        let mut m = MerkleBuilder::new();
        let mut lines = vec![ExportLine::Chain(header).to_json()];
        for seq in 1..=3 {
            let mut rec = sample_record_for_copy(seq);
            rec.statement = Some(format!("SELECT 'a\\b \"q\"' -- {seq}"));
            let hash = rec.chain_hash(&prev);
            lines.push(ExportLine::Record(RecordLine { record: rec, prev_hash: prev, hash }).to_json());
            m.push(&hash);
            prev = hash;
        }
        let origin = note::checkpoint_origin(SYSID, OID);
        let cp = CheckpointLine::sign(&origin, 3, prev, m.root(), &sk, 0).unwrap();
        lines.push(ExportLine::Checkpoint(cp).to_json());
        // COPY ... TO STDOUT (text format) doubles every backslash.
        let copied: String = lines.iter().map(|l| l.replace('\\', "\\\\") + "\n").collect();
        assert_ne!(copied, lines.join("\n") + "\n");
        let report = verify_export(copied.as_bytes(), Some(&vk), &[]).unwrap();
        assert!(report.ok, "{:?}", report.failure);
        assert_eq!(report.records, 3);
        let plain = lines.join("\n") + "\n";
        assert!(verify_export(plain.as_bytes(), Some(&vk), &[]).unwrap().ok);
    }

    fn test_keys_for_copy() -> (PrivateKey, VerifierKey) {
        let sk = PrivateKey::from_seed("copy-test", &[9u8; 32]).unwrap();
        let vk = sk.verifier();
        (sk, vk)
    }

    fn sample_record_for_copy(seq: i64) -> Record {
        Record {
            seq,
            event_time: 1,
            logged_at: 2,
            database_name: "app".into(),
            session_user_name: "u".into(),
            current_user_name: "u".into(),
            client_addr: None,
            application_name: None,
            backend_pid: 1,
            nesting_level: 0,
            xid: None,
            class: "read".into(),
            command: "SELECT".into(),
            objects: serde_json::json!([]),
            statement: None,
            statement_sha256: None,
            rows: None,
            outcome: "success".into(),
            sqlstate: None,
            message: None,
            decision: None,
        }
    }
}
