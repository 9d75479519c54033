//! Streaming chain verifier: feed records in seq order, get the first bad
//! record and why. Constant memory; reuses one encoding buffer.

use std::fmt;

use crate::record::Record;
use crate::Hash;

/// Why a record fails verification.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum FailureKind {
    /// The stored hash does not match the record's contents (it was edited).
    HashMismatch,
    /// The stored prev_hash is not the previous record's stored hash.
    BrokenLink,
    /// Records are missing: `expected` was due, `found` came instead.
    MissingSeq { expected: i64, found: i64 },
    /// The previous record had the same seq.
    Duplicate,
    /// The seq is lower than one already seen.
    Reordered,
    /// Record 1's prev_hash is not this cluster+database's genesis hash.
    BadGenesis,
    /// A record whose seq is below the chain's first one (1): it cannot be part of the chain,
    /// yet it shows in queries of the log.
    BelowStart { first: i64 },
    /// A HEAD MISMATCH record: the writer found the table without records it had stored, or
    /// with another record where one of them was (docs/chain-format.md, "Alarms").
    HeadMismatch { message: String },
    /// A record that names the chain it belongs to (WRITER START, CHAIN HANDOVER) does not
    /// fit the chain it is in: a hand-over that does not continue the chain before it, a
    /// writer of another cluster appending without a hand-over, or a malformed claim
    /// (docs/chain-format.md, "Hand-over").
    BadLineage { message: String },
    /// The chain, verified to its end, is another cluster's: the verifier expected the chain
    /// of `expected`, its last segment is the chain of `found` (an origin, or the genesis
    /// hash in hex when no record names one).
    ForeignChain { expected: String, found: String },
}

/// The command of the `system` record the writer appends when the table does not hold the
/// head it remembers storing.
pub const HEAD_MISMATCH: &str = "HEAD MISMATCH";

/// The command of the `system` record a writer appends when it continues the chain of another
/// cluster or database (a restore, a `pg_upgrade`): docs/chain-format.md, "Hand-over".
pub const CHAIN_HANDOVER: &str = "CHAIN HANDOVER";
/// The command of the `system` record a writer appends each time it starts; from format
/// revision "lineage" on it names the cluster and database that wrote it.
pub const WRITER_START: &str = "WRITER START";

/// The identity of one chain: the genesis hash of the cluster and database it was started
/// for (`genesis_hash`), with the checkpoint origin of that pair when it is known.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ChainId {
    pub genesis: Hash,
    /// `pg_custody/<system_identifier>/<database_oid>`; None when only the genesis hash is
    /// known (a chain restored from a writer that did not name itself).
    pub origin: Option<String>,
}

impl ChainId {
    pub fn of(system_identifier: u64, database_oid: u32) -> ChainId {
        ChainId {
            genesis: crate::record::genesis_hash(system_identifier, database_oid),
            origin: Some(crate::note::checkpoint_origin(system_identifier, database_oid)),
        }
    }

    /// How a message names it: its origin, else its genesis hash.
    pub fn label(&self) -> String {
        self.origin.clone().unwrap_or_else(|| format!("genesis {}", crate::hex::encode(&self.genesis)))
    }
}

/// What a record says about the chain it is in.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Lineage {
    /// A WRITER START of a writer that names its cluster and database.
    Writer(ChainId),
    /// A CHAIN HANDOVER: the chain `from`, whose head was (`head_seq`, `head_hash`), goes on
    /// as the chain `to` from this record on.
    Handover { from: ChainId, head_seq: i64, head_hash: Hash, to: ChainId },
    /// A WRITER START or CHAIN HANDOVER whose claim cannot be read.
    Malformed(String),
}

/// The lineage claim of a record, if it makes one (docs/chain-format.md, "Hand-over"): the
/// first element of `objects` of a `system` WRITER START (`kind` "writer") naming
/// `system_identifier` (decimal string) and `database_oid`, or of a CHAIN HANDOVER (`kind`
/// "chain", `name` "handover") naming those, `from_genesis` (hex), `from_head_seq`,
/// `from_head_hash` (hex) and, when known, `from_system_identifier` / `from_database_oid`.
pub fn lineage_of(rec: &Record) -> Option<Lineage> {
    if rec.class != "system" || (rec.command != WRITER_START && rec.command != CHAIN_HANDOVER) {
        return None;
    }
    let o = rec.objects.get(0);
    let field = |k: &str| o.and_then(|o| o.get(k));
    let ident = |sys: &str, db: &str| -> Option<Result<ChainId, String>> {
        let s = field(sys)?;
        let parsed = s.as_str().and_then(|t| t.parse::<u64>().ok()).zip(
            field(db).and_then(|d| d.as_u64()).and_then(|d| u32::try_from(d).ok()),
        );
        Some(parsed.map(|(s, d)| ChainId::of(s, d)).ok_or_else(|| format!("{sys}/{db} are not a cluster and database")))
    };
    if rec.command == WRITER_START {
        return match ident("system_identifier", "database_oid")? {
            Ok(id) => Some(Lineage::Writer(id)),
            Err(e) => Some(Lineage::Malformed(format!("WRITER START: {e}"))),
        };
    }
    let hash = |k: &str| -> Option<Hash> {
        crate::hex::decode(field(k)?.as_str()?).ok().and_then(|b| b.try_into().ok())
    };
    let claim = (|| {
        let to = ident("system_identifier", "database_oid").ok_or("it names no cluster")??;
        let genesis = hash("from_genesis").ok_or("from_genesis is not a hash")?;
        let from = match ident("from_system_identifier", "from_database_oid") {
            None => ChainId { genesis, origin: None },
            Some(id) => {
                let id = id?;
                if id.genesis != genesis {
                    return Err("from_genesis is not the genesis hash of from_system_identifier/from_database_oid".to_string());
                }
                id
            }
        };
        let head_seq = field("from_head_seq").and_then(|v| v.as_i64()).ok_or("from_head_seq is not a number")?;
        let head_hash = hash("from_head_hash").ok_or("from_head_hash is not a hash")?;
        Ok::<_, String>(Lineage::Handover { from, head_seq, head_hash, to })
    })();
    Some(claim.unwrap_or_else(|e| Lineage::Malformed(format!("CHAIN HANDOVER: {e}"))))
}

/// The alarm a record raises, if it is a HEAD MISMATCH record: its message.
pub fn alarm_of(rec: &Record) -> Option<String> {
    (rec.class == "system" && rec.command == HEAD_MISMATCH)
        .then(|| rec.message.clone().unwrap_or_else(|| "the table does not hold what the writer stored".into()))
}

/// The first bad record: its seq (for `MissingSeq`, the first missing seq)
/// and the reason.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Failure {
    pub seq: i64,
    pub kind: FailureKind,
}

impl fmt::Display for FailureKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            FailureKind::HashMismatch => {
                f.write_str("hash mismatch: stored hash does not match the record's contents")
            }
            FailureKind::BrokenLink => f.write_str(
                "broken link: prev_hash does not match the previous record's stored hash",
            ),
            FailureKind::MissingSeq { expected, found } => {
                if found - expected == 1 {
                    write!(f, "missing record: seq {expected} is absent (next record is seq {found})")
                } else {
                    write!(
                        f,
                        "missing records: seq {expected}..{} are absent (next record is seq {found})",
                        found - 1
                    )
                }
            }
            FailureKind::Duplicate => f.write_str("duplicate: a second record with the same seq"),
            FailureKind::Reordered => {
                f.write_str("reordered: seq is lower than a record already seen")
            }
            FailureKind::BadGenesis => f.write_str(
                "bad genesis: the first record's prev_hash is not the genesis hash of this cluster and database",
            ),
            FailureKind::HeadMismatch { message } => write!(f, "head mismatch: {message}"),
            FailureKind::BadLineage { message } => write!(f, "bad lineage: {message}"),
            FailureKind::ForeignChain { expected, found } => write!(
                f,
                "foreign chain: the log is the chain of {found}, not of {expected} (no hand-over to this cluster and database)"
            ),
            FailureKind::BelowStart { first } => {
                write!(f, "before the chain: a record whose seq is below {first}, where the chain starts")
            }
        }
    }
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "record seq {}: {}", self.seq, self.kind)
    }
}

impl std::error::Error for Failure {}

/// Verifies a run of consecutive records.
pub struct ChainVerifier {
    /// Seq the next record must have.
    expected: i64,
    /// Stored hash of the previous record (or the given start prev).
    prev: Option<Hash>,
    /// Verifying from seq 1: record 1's prev_hash names the chain it starts.
    from_start: bool,
    /// The chain the log must end in (from_seq == 1: the `prev` given), None = any.
    expect: Option<ChainId>,
    /// Record 1's stored prev_hash: the genesis hash of the first segment.
    first_prev: Option<Hash>,
    /// The chain the records seen so far are in, once known (named by a record, or record 1
    /// started the expected chain).
    segment: Option<ChainId>,
    /// Seq of the last hand-over (where a foreign chain shows; 1 without one).
    named_at: i64,
    checked: i64,
    head: Option<(i64, Hash)>,
    failure: Option<Failure>,
    buf: Vec<u8>,
}

impl ChainVerifier {
    /// Start verifying at `from_seq` > 1; `prev` = the stored hash of record from_seq-1, None
    /// = trust the first record's prev_hash. From seq 1, use `from_genesis`.
    pub fn new(from_seq: i64, prev: Option<Hash>) -> Self {
        if from_seq <= 1 {
            return Self::from_genesis(prev.map(|genesis| ChainId { genesis, origin: None }));
        }
        Self::build(from_seq, prev, None)
    }

    /// Verify the whole chain, which must end as the chain `expect` (the cluster and
    /// database verifying it), or any chain (None: a copy kept elsewhere). Hand-overs on the
    /// way are followed (docs/chain-format.md, "Hand-over"); call `finish` at the end.
    pub fn from_genesis(expect: Option<ChainId>) -> Self {
        let mut v = Self::build(1, None, expect);
        v.from_start = true;
        v
    }

    fn build(from_seq: i64, prev: Option<Hash>, expect: Option<ChainId>) -> Self {
        ChainVerifier {
            expected: from_seq,
            from_start: false,
            expect,
            first_prev: None,
            segment: None,
            named_at: 0,
            prev,
            checked: 0,
            head: None,
            failure: None,
            buf: Vec::with_capacity(512),
        }
    }

    /// Feed records in the order they are stored (ORDER BY seq). Returns the
    /// first failure; after a failure further pushes change nothing and
    /// return that same first failure.
    pub fn push(
        &mut self,
        rec: &Record,
        stored_prev_hash: &[u8],
        stored_hash: &[u8],
    ) -> Result<(), Failure> {
        if let Some(f) = &self.failure {
            return Err(f.clone());
        }
        match self.check(rec, stored_prev_hash, stored_hash) {
            Ok(hash) => self.accepted(rec.seq, stored_prev_hash, hash, alarm_of(rec), lineage_of(rec)),
            Err(kind) => Err(self.fail(rec.seq, kind)),
        }
    }

    /// After a record's position, link and hash are right: what it says about the chain.
    fn accepted(
        &mut self,
        seq: i64,
        stored_prev: &[u8],
        hash: Hash,
        alarm: Option<String>,
        lineage: Option<Lineage>,
    ) -> Result<(), Failure> {
        if seq == 1 && self.from_start {
            let first: Hash = stored_prev.try_into().expect("checked by check_link");
            self.first_prev = Some(first);
            if let Some(e) = self.expect.as_ref().filter(|e| e.genesis == first) {
                self.segment = Some(e.clone());
            }
        }
        self.accept(seq, hash);
        if let Some(l) = lineage {
            if let Err(kind) = self.follow(seq, stored_prev, l) {
                return Err(self.fail(seq, kind));
            }
        }
        match alarm {
            None => Ok(()),
            Some(message) => Err(self.fail(seq, FailureKind::HeadMismatch { message })),
        }
    }

    /// The chain before `seq`, as far as it is known: named, or started by record 1.
    fn current(&self) -> Option<ChainId> {
        self.segment.clone().or_else(|| self.first_prev.map(|genesis| ChainId { genesis, origin: None }))
    }

    /// The chain a checkpoint after the last record must be signed for: its origin when
    /// known, and its genesis hash (the origin a note names must have that genesis).
    pub fn chain(&self) -> Option<ChainId> {
        self.current().or_else(|| self.expect.clone())
    }

    fn follow(&mut self, seq: i64, stored_prev: &[u8], l: Lineage) -> Result<(), FailureKind> {
        let bad = |message: String| Err(FailureKind::BadLineage { message });
        match l {
            Lineage::Malformed(m) => return bad(m),
            Lineage::Writer(id) => match self.current() {
                // Record 1 started another chain than the one its own writer names.
                Some(c) if c.genesis != id.genesis && self.segment.is_none() => return Err(FailureKind::BadGenesis),
                Some(c) if c.genesis != id.genesis => {
                    return bad(format!(
                        "a writer of {} appends to the chain of {} without a hand-over",
                        id.label(),
                        c.label()
                    ))
                }
                _ => self.segment = Some(id),
            },
            Lineage::Handover { from, head_seq, head_hash, to } => {
                if head_seq < 1 || head_seq != seq - 1 || stored_prev != head_hash {
                    return bad(format!(
                        "the hand-over names head seq {head_seq} of the chain before it, but follows record {}",
                        seq - 1
                    ));
                }
                if let Some(c) = self.current().filter(|c| c.genesis != from.genesis) {
                    return bad(format!("the hand-over continues the chain of {}, but the records before it are the chain of {}", from.label(), c.label()));
                }
                self.segment = Some(to);
                self.named_at = seq;
            }
        }
        Ok(())
    }

    /// At the end of the records: whether the chain ends as the chain it had to be (the
    /// first failure, if any, otherwise). Call once, after the last `push`.
    pub fn finish(&mut self) -> Result<(), Failure> {
        if let Some(f) = &self.failure {
            return Err(f.clone());
        }
        let Some(expect) = self.expect.clone() else { return Ok(()) };
        match self.current() {
            Some(c) if c.genesis == expect.genesis => Ok(()),
            // Record 1 named no chain, and no record after it did: record 1 is wrong.
            Some(_) if self.segment.is_none() => Err(self.fail(1, FailureKind::BadGenesis)),
            Some(c) => {
                let at = self.named_at.max(1);
                Err(self.fail(at, FailureKind::ForeignChain { expected: expect.label(), found: c.label() }))
            }
            None => Ok(()),
        }
    }

    /// `push` for a record whose chain hash over its stored prev_hash was computed already
    /// (by another thread), and whose alarm (`alarm_of`) was read then: the same checks in
    /// the same order, the same result. When the link check passes, the stored prev_hash is
    /// the one `push` would hash with.
    pub fn push_hashed(
        &mut self,
        seq: i64,
        stored_prev_hash: &[u8],
        stored_hash: &[u8],
        computed: Hash,
        alarm: Option<String>,
        lineage: Option<Lineage>,
    ) -> Result<(), Failure> {
        if let Some(f) = &self.failure {
            return Err(f.clone());
        }
        match self.check_link(seq, stored_prev_hash).and_then(|_| {
            if stored_hash != computed { Err(FailureKind::HashMismatch) } else { Ok(computed) }
        }) {
            Ok(hash) => self.accepted(seq, stored_prev_hash, hash, alarm, lineage),
            Err(kind) => Err(self.fail(seq, kind)),
        }
    }

    fn accept(&mut self, seq: i64, hash: Hash) {
        self.prev = Some(hash);
        self.expected = seq + 1;
        self.checked += 1;
        self.head = Some((seq, hash));
    }

    fn fail(&mut self, seq: i64, kind: FailureKind) -> Failure {
        let seq = match kind {
            FailureKind::MissingSeq { expected, .. } => expected,
            FailureKind::BadGenesis => 1,
            _ => seq,
        };
        let f = Failure { seq, kind };
        self.failure = Some(f.clone());
        f
    }

    /// Position (seq), then the link to the previous record; returns the prev hash to use.
    fn check_link(&self, seq: i64, stored_prev: &[u8]) -> Result<Hash, FailureKind> {
        if seq != self.expected {
            return Err(if seq > self.expected {
                FailureKind::MissingSeq { expected: self.expected, found: seq }
            } else if self.head.is_none() {
                FailureKind::BelowStart { first: self.expected }
            } else if self.head.is_some_and(|(s, _)| s == seq) {
                FailureKind::Duplicate
            } else {
                FailureKind::Reordered
            });
        }
        match (self.prev, <&Hash>::try_from(stored_prev)) {
            (Some(p), Ok(sp)) if p == *sp => Ok(p),
            // Record 1's prev_hash names the chain it starts: checked once the chain is known
            // (a record naming it, or `finish`).
            (None, Ok(sp)) if self.from_start && seq == 1 => Ok(*sp),
            (None, Err(_)) if self.from_start && seq == 1 => Err(FailureKind::BadGenesis),
            (Some(_), _) | (None, Err(_)) => Err(FailureKind::BrokenLink),
            (None, Ok(sp)) => Ok(*sp),
        }
    }

    /// Checks in the order that names the first bad record: position (seq),
    /// then the link to the previous record, then the record's own hash.
    fn check(&mut self, rec: &Record, stored_prev: &[u8], stored: &[u8]) -> Result<Hash, FailureKind> {
        let prev = self.check_link(rec.seq, stored_prev)?;
        let hash = rec.chain_hash_with(&prev, &mut self.buf);
        if stored != hash {
            return Err(FailureKind::HashMismatch);
        }
        Ok(hash)
    }

    /// Number of records verified so far.
    pub fn checked(&self) -> i64 {
        self.checked
    }

    /// Seq and hash of the last verified record.
    pub fn head(&self) -> Option<(i64, Hash)> {
        self.head
    }

    /// The first failure, if any.
    pub fn failure(&self) -> Option<&Failure> {
        self.failure.as_ref()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::record::genesis_hash;
    use crate::record::tests::sample;

    /// A stored row: record plus stored prev_hash and hash.
    type Row = (Record, Hash, Hash);

    fn chain(n: i64) -> (Hash, Vec<Row>) {
        let g = genesis_hash(42, 5);
        let mut prev = g;
        let rows = (1..=n)
            .map(|s| {
                let mut r = sample(s);
                r.statement = Some(format!("SELECT {s}"));
                let h = r.chain_hash(&prev);
                let row = (r, prev, h);
                prev = h;
                row
            })
            .collect();
        (g, rows)
    }

    fn run(g: Hash, rows: &[Row]) -> Result<i64, Failure> {
        let mut v = ChainVerifier::new(1, Some(g));
        for (r, p, h) in rows {
            v.push(r, p, h)?;
        }
        v.finish()?;
        Ok(v.checked())
    }

    // ---- lineage (docs/chain-format.md, "Hand-over") ----

    fn writer_start(seq: i64, sysid: u64, oid: u32) -> Record {
        let mut r = sample(seq);
        r.class = "system".into();
        r.command = WRITER_START.into();
        r.objects = serde_json::json!([{ "kind": "writer", "name": "start", "system_identifier": sysid.to_string(), "database_oid": oid }]);
        r
    }

    fn handover(seq: i64, from: (u64, u32), head: (i64, Hash), to: (u64, u32)) -> Record {
        let mut r = sample(seq);
        r.class = "system".into();
        r.command = CHAIN_HANDOVER.into();
        r.objects = serde_json::json!([{
            "kind": "chain", "name": "handover",
            "from_system_identifier": from.0.to_string(), "from_database_oid": from.1,
            "from_genesis": crate::hex::encode(&genesis_hash(from.0, from.1)),
            "from_head_seq": head.0, "from_head_hash": crate::hex::encode(&head.1),
            "system_identifier": to.0.to_string(), "database_oid": to.1,
        }]);
        r
    }

    /// Links `records` (seq 1..) from the genesis of `start`.
    fn linked(start: (u64, u32), records: Vec<Record>) -> Vec<Row> {
        let mut prev = genesis_hash(start.0, start.1);
        records
            .into_iter()
            .map(|r| {
                let h = r.chain_hash(&prev);
                let row = (r, prev, h);
                prev = h;
                row
            })
            .collect()
    }

    /// A chain of cluster A (42/5) for 3 records, handed over to B (43/7) at seq 4.
    fn handed_over(head_override: Option<(i64, Hash)>, to: (u64, u32)) -> Vec<Row> {
        let a = linked((42, 5), vec![writer_start(1, 42, 5), sample(2), sample(3)]);
        let head = head_override.unwrap_or((3, a[2].2));
        let mut records: Vec<Record> = a.into_iter().map(|r| r.0).collect();
        records.push(handover(4, (42, 5), head, to));
        records.push(writer_start(5, to.0, to.1));
        records.push(sample(6));
        linked((42, 5), records)
    }

    #[test]
    fn a_handed_over_chain_verifies_as_the_new_clusters() {
        let rows = handed_over(None, (43, 7));
        assert_eq!(run(genesis_hash(43, 7), &rows), Ok(6));
        // ... and is not the old cluster's any more.
        let f = run(genesis_hash(42, 5), &rows).unwrap_err();
        assert_eq!(f.seq, 4, "{f}");
        assert!(matches!(f.kind, FailureKind::ForeignChain { .. }), "{f}");
        // A copy verified without an expected chain follows the hand-over.
        let mut v = ChainVerifier::from_genesis(None);
        for (r, p, h) in &rows {
            v.push(r, p, h).unwrap();
        }
        assert_eq!(v.finish(), Ok(()));
        assert_eq!(v.chain(), Some(ChainId::of(43, 7)));
    }

    #[test]
    fn a_hand_over_that_does_not_continue_its_chain_is_bad_lineage() {
        let rows = handed_over(Some((2, [7; 32])), (43, 7));
        let f = run(genesis_hash(43, 7), &rows).unwrap_err();
        assert_eq!(f.seq, 4);
        assert!(matches!(f.kind, FailureKind::BadLineage { .. }), "{f}");
        // A hand-over from a chain other than the one before it.
        let mut records: Vec<Record> = linked((42, 5), vec![writer_start(1, 42, 5), sample(2)]).into_iter().map(|r| r.0).collect();
        let a = linked((42, 5), records.clone());
        records.push(handover(3, (99, 1), (2, a[1].2), (43, 7)));
        let f = run(genesis_hash(43, 7), &linked((42, 5), records)).unwrap_err();
        assert_eq!((f.seq, matches!(f.kind, FailureKind::BadLineage { .. })), (3, true), "{f}");
    }

    #[test]
    fn a_foreign_chain_without_hand_over_is_bad_genesis_or_foreign() {
        // Another cluster's chain, nothing naming it: record 1 is wrong for this cluster.
        let rows = linked((42, 5), vec![sample(1), sample(2)]);
        assert_eq!(run(genesis_hash(43, 7), &rows), fail(1, FailureKind::BadGenesis));
        // A chain whose writer names itself: record 1 starts the chain of another cluster.
        let rows = linked((42, 5), vec![writer_start(1, 42, 5), sample(2)]);
        let f = run(genesis_hash(43, 7), &rows).unwrap_err();
        assert_eq!((f.seq, matches!(f.kind, FailureKind::ForeignChain { .. })), (1, true), "{f}");
        // Record 1 started one chain, its writer names another.
        let rows = linked((42, 5), vec![writer_start(1, 43, 7), sample(2)]);
        assert_eq!(run(genesis_hash(43, 7), &rows), fail(1, FailureKind::BadGenesis));
        // A writer of another cluster appends without a hand-over.
        let rows = linked((42, 5), vec![writer_start(1, 42, 5), sample(2), writer_start(3, 43, 7)]);
        let f = run(genesis_hash(43, 7), &rows).unwrap_err();
        assert_eq!((f.seq, matches!(f.kind, FailureKind::BadLineage { .. })), (3, true), "{f}");
        // Handed over to a third cluster, verified as the second.
        let rows = handed_over(None, (44, 9));
        let f = run(genesis_hash(43, 7), &rows).unwrap_err();
        assert!(matches!(f.kind, FailureKind::ForeignChain { .. }), "{f}");
    }

    #[test]
    fn a_malformed_claim_is_bad_lineage() {
        let mut h = handover(2, (42, 5), (1, [0; 32]), (43, 7));
        h.objects[0]["from_head_hash"] = serde_json::json!("zz");
        let mut w = writer_start(1, 42, 5);
        w.objects[0]["database_oid"] = serde_json::json!("five");
        for (records, at) in [(vec![writer_start(1, 42, 5), h], 2), (vec![w], 1)] {
            let f = run(genesis_hash(42, 5), &linked((42, 5), records)).unwrap_err();
            assert_eq!((f.seq, matches!(f.kind, FailureKind::BadLineage { .. })), (at, true), "{f}");
        }
        // A WRITER START of an older writer names nothing: no claim.
        assert_eq!(lineage_of(&sample(1)), None);
    }

    fn fail(seq: i64, kind: FailureKind) -> Result<i64, Failure> {
        Err(Failure { seq, kind })
    }

    #[test]
    fn intact_chain_verifies() {
        let (g, rows) = chain(10);
        assert_eq!(run(g, &rows), Ok(10));
        let mut v = ChainVerifier::new(1, Some(g));
        assert_eq!(v.head(), None);
        for (r, p, h) in &rows {
            v.push(r, p, h).unwrap();
        }
        assert_eq!(v.head(), Some((10, rows[9].2)));
    }

    #[test]
    fn head_mismatch_record_fails_verification_at_its_seq() {
        // A chain whose 4th record is the writer's alarm (correctly hashed and linked).
        let g = genesis_hash(42, 5);
        let mut prev = g;
        let mut rows = Vec::new();
        for s in 1..=6 {
            let mut r = sample(s);
            if s == 4 {
                r.class = "system".into();
                r.command = HEAD_MISMATCH.into();
                r.message = Some("records 2..3 stored by the custody writer are missing".into());
            }
            let h = r.chain_hash(&prev);
            rows.push((r, prev, h));
            prev = h;
        }
        let message = "records 2..3 stored by the custody writer are missing".to_string();
        assert_eq!(run(g, &rows), fail(4, FailureKind::HeadMismatch { message: message.clone() }));
        assert_eq!(alarm_of(&rows[3].0), Some(message));
        assert_eq!(alarm_of(&rows[2].0), None);
        // The hashed path (parallel export verification) says the same.
        let mut v = ChainVerifier::new(1, Some(g));
        let mut result = Ok(());
        for (r, p, h) in &rows {
            result = v.push_hashed(r.seq, p, h, r.chain_hash(p), alarm_of(r), lineage_of(r));
            if result.is_err() {
                break;
            }
        }
        assert_eq!(result.map(|_| 0), fail(4, FailureKind::HeadMismatch { message: "records 2..3 stored by the custody writer are missing".into() }));
    }

    #[test]
    fn edited_record_is_hash_mismatch() {
        let (g, mut rows) = chain(10);
        rows[4].0.statement = Some("SELECT 666".into());
        assert_eq!(run(g, &rows), fail(5, FailureKind::HashMismatch));
    }

    #[test]
    fn edit_with_recomputed_hash_breaks_the_next_link() {
        let (g, mut rows) = chain(10);
        rows[4].0.rows = Some(0);
        rows[4].2 = rows[4].0.chain_hash(&rows[4].1);
        assert_eq!(run(g, &rows), fail(6, FailureKind::BrokenLink));
    }

    #[test]
    fn deleted_record_is_missing_seq() {
        let (g, mut rows) = chain(10);
        rows.remove(4);
        assert_eq!(run(g, &rows), fail(5, FailureKind::MissingSeq { expected: 5, found: 6 }));
        let (g, mut rows) = chain(10);
        rows.drain(2..5);
        let e = run(g, &rows).unwrap_err();
        assert_eq!(e.kind, FailureKind::MissingSeq { expected: 3, found: 6 });
        assert!(e.to_string().contains("seq 3..5 are absent"), "{e}");
    }

    #[test]
    fn inserted_duplicate_seq_is_duplicate() {
        let (g, mut rows) = chain(10);
        let mut forged = rows[4].clone();
        forged.0.statement = Some("SELECT 'forged'".into());
        rows.insert(5, forged);
        assert_eq!(run(g, &rows), fail(5, FailureKind::Duplicate));
        // A forged row sorted first fails on its own hash instead.
        let (g, mut rows) = chain(10);
        let mut forged = rows[4].clone();
        forged.0.statement = Some("SELECT 'forged'".into());
        rows.insert(4, forged);
        assert_eq!(run(g, &rows), fail(5, FailureKind::HashMismatch));
    }

    #[test]
    fn out_of_order_input_is_reordered() {
        let (g, rows) = chain(10);
        let mut order = rows[..3].to_vec();
        order.push(rows[0].clone());
        assert_eq!(run(g, &order), fail(1, FailureKind::Reordered));
    }

    #[test]
    fn swapped_contents_are_caught_at_the_first_swapped_seq() {
        // Rows 5 and 6 swap everything but their seq numbers.
        let (g, mut rows) = chain(10);
        let (mut a, mut b) = (rows[5].clone(), rows[4].clone());
        a.0.seq = 5;
        b.0.seq = 6;
        rows[4] = a;
        rows[5] = b;
        assert_eq!(run(g, &rows), fail(5, FailureKind::BrokenLink));
    }

    #[test]
    fn wrong_genesis_is_bad_genesis() {
        let (_, rows) = chain(3);
        assert_eq!(run(genesis_hash(42, 6), &rows), fail(1, FailureKind::BadGenesis));
    }

    #[test]
    fn mid_chain_start_and_trusted_prev() {
        let (_, rows) = chain(10);
        let mut v = ChainVerifier::new(4, Some(rows[2].2));
        for (r, p, h) in &rows[3..] {
            v.push(r, p, h).unwrap();
        }
        assert_eq!(v.checked(), 7);
        // None trusts the first prev_hash, but still checks links after it.
        let mut v = ChainVerifier::new(4, None);
        let mut tail = rows[3..].to_vec();
        tail[2].1 = [0; 32];
        assert!(v.push(&tail[0].0, &tail[0].1, &tail[0].2).is_ok());
        assert!(v.push(&tail[1].0, &tail[1].1, &tail[1].2).is_ok());
        let f = v.push(&tail[2].0, &tail[2].1, &tail[2].2).unwrap_err();
        assert_eq!(f, Failure { seq: 6, kind: FailureKind::BrokenLink });
        // Later pushes are ignored and repeat the first failure.
        assert_eq!(v.push(&tail[3].0, &tail[3].1, &tail[3].2), Err(f));
        assert_eq!(v.checked(), 2);
    }

    #[test]
    fn wrong_length_hashes_are_failures_not_panics() {
        let (g, rows) = chain(2);
        let mut v = ChainVerifier::new(1, Some(g));
        assert_eq!(v.push(&rows[0].0, &rows[0].1, &[1, 2]).unwrap_err().kind, FailureKind::HashMismatch);
        let mut v = ChainVerifier::new(1, None);
        assert_eq!(v.push(&rows[0].0, &[], &rows[0].2).unwrap_err().kind, FailureKind::BadGenesis);
    }

    #[test]
    fn failure_messages_are_clear() {
        let f = Failure { seq: 5, kind: FailureKind::HashMismatch };
        assert_eq!(f.to_string(), "record seq 5: hash mismatch: stored hash does not match the record's contents");
    }
}
