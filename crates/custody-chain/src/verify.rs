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
}

/// The command of the `system` record the writer appends when the table does not hold the
/// head it remembers storing.
pub const HEAD_MISMATCH: &str = "HEAD MISMATCH";

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
    /// Whether `prev` is the genesis hash (from_seq == 1 and given).
    prev_is_genesis: bool,
    checked: i64,
    head: Option<(i64, Hash)>,
    failure: Option<Failure>,
    buf: Vec<u8>,
}

impl ChainVerifier {
    /// Start verifying at `from_seq`; `prev` = the stored hash of record
    /// from_seq-1 (or the genesis hash when from_seq == 1), None = trust the
    /// first record's prev_hash.
    pub fn new(from_seq: i64, prev: Option<Hash>) -> Self {
        ChainVerifier {
            expected: from_seq,
            prev_is_genesis: from_seq == 1 && prev.is_some(),
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
            Ok(hash) => {
                self.accept(rec.seq, hash);
                match alarm_of(rec) {
                    None => Ok(()),
                    Some(message) => Err(self.fail(rec.seq, FailureKind::HeadMismatch { message })),
                }
            }
            Err(kind) => Err(self.fail(rec.seq, kind)),
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
    ) -> Result<(), Failure> {
        if let Some(f) = &self.failure {
            return Err(f.clone());
        }
        match self.check_link(seq, stored_prev_hash).and_then(|_| {
            if stored_hash != computed { Err(FailureKind::HashMismatch) } else { Ok(computed) }
        }) {
            Ok(hash) => {
                self.accept(seq, hash);
                match alarm {
                    None => Ok(()),
                    Some(message) => Err(self.fail(seq, FailureKind::HeadMismatch { message })),
                }
            }
            Err(kind) => Err(self.fail(seq, kind)),
        }
    }

    fn accept(&mut self, seq: i64, hash: Hash) {
        self.prev = Some(hash);
        self.prev_is_genesis = false;
        self.expected = seq + 1;
        self.checked += 1;
        self.head = Some((seq, hash));
    }

    fn fail(&mut self, seq: i64, kind: FailureKind) -> Failure {
        let seq = match kind {
            FailureKind::MissingSeq { expected, .. } => expected,
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
            (Some(_), _) if self.prev_is_genesis => Err(FailureKind::BadGenesis),
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
        Ok(v.checked())
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
            result = v.push_hashed(r.seq, p, h, r.chain_hash(p), alarm_of(r));
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
        assert_eq!(v.push(&rows[0].0, &[], &rows[0].2).unwrap_err().kind, FailureKind::BrokenLink);
    }

    #[test]
    fn failure_messages_are_clear() {
        let f = Failure { seq: 5, kind: FailureKind::HashMismatch };
        assert_eq!(f.to_string(), "record seq 5: hash mismatch: stored hash does not match the record's contents");
    }
}
