//! The chain head the writer remembers outside the table it protects: in shared memory across
//! writer restarts (the queue's committed head) and in a file in the data directory across
//! server restarts. A table whose head is behind what the writer stored, or whose record at
//! that seq has another hash, was cut or rewritten while pg_custody was not looking: the
//! writer records a HEAD MISMATCH and carries on after the highest seq it ever stored, so the
//! missing seqs stay missing (the writer never reuses a seq).
//!
//! The writer commits asynchronously, so the file only ever names a head whose commit record
//! WAL has already flushed: after a crash the table holds at least that much, and no alarm
//! is raised for records the crash itself lost (those are what the unclean-stop note in the
//! next WRITER START record is about).

use std::collections::VecDeque;

use std::time::{Duration, Instant};

use custody_chain::{hex, Hash, MerkleBuilder};
use pgrx::pg_sys;

use crate::queue::head_file;

/// A position in the chain.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Head {
    pub seq: i64,
    pub hash: Hash,
}

/// What the file says: the head, whether the writer that wrote it stopped cleanly, and the
/// Merkle frontier over the records up to the head (absent in files of earlier versions), so
/// that the next writer reads only the records after it instead of the whole log.
#[derive(Debug, PartialEq, Eq)]
pub struct Remembered {
    pub head: Head,
    pub clean: bool,
    pub merkle: Option<MerkleBuilder>,
}

const MAGIC: &str = "pg_custody-head-1";

/// The file's one line: magic, system identifier, database OID, seq, hash, clean flag, and
/// the Merkle tree's size and frontier (comma-separated hashes, `-` for none).
pub fn encode(sysid: u64, dboid: u32, r: &Remembered) -> String {
    let mut line = format!("{MAGIC} {sysid} {dboid} {} {} {}", r.head.seq, hex::encode(&r.head.hash), u8::from(r.clean));
    if let Some(m) = &r.merkle {
        let frontier: Vec<String> = m.frontier().iter().map(|h| hex::encode(h)).collect();
        let frontier = if frontier.is_empty() { "-".to_string() } else { frontier.join(",") };
        line += &format!(" {} {frontier}", m.size());
    }
    line + "\n"
}

/// Parses the file's line; None when it is not one, or names another cluster or database
/// (a data directory copied from elsewhere).
pub fn decode(text: &str, sysid: u64, dboid: u32) -> Option<Remembered> {
    let mut w = text.split_whitespace();
    if w.next()? != MAGIC || w.next()?.parse::<u64>().ok()? != sysid || w.next()?.parse::<u32>().ok()? != dboid {
        return None;
    }
    let seq = w.next()?.parse().ok()?;
    let hash = hex::decode_hash(w.next()?).ok()?;
    let clean = w.next()? == "1";
    // A frontier that does not parse is as good as none: the writer reads the whole log.
    let merkle = (|| {
        let size = w.next()?.parse::<u64>().ok()?;
        let frontier = match w.next()? {
            "-" => Vec::new(),
            list => list.split(',').map(|h| hex::decode_hash(h).ok()).collect::<Option<Vec<Hash>>>()?,
        };
        MerkleBuilder::from_frontier(size, frontier)
    })();
    Some(Remembered { head: Head { seq, hash }, clean, merkle })
}

/// What the table holds compared with what the writer stored.
#[derive(Debug, PartialEq, Eq)]
pub enum Check {
    Consistent,
    /// Records `from..=to` the writer stored are not in the table.
    Missing { from: i64, to: i64, expected: Head },
    /// The table's record at `expected.seq` is not the one the writer stored.
    Rewritten { expected: Head, found: Hash },
    /// Records `from..=to` were added after the head while no writer ran.
    Appended { from: i64, to: i64, expected: Head },
}

/// Compares the table's head with the remembered one; `hash_at(seq)` reads the table's
/// stored hash of record `seq`, if it has one. `exact`: the remembered head is the last one
/// the writer committed (the previous writer of this server run, or a writer that stopped
/// cleanly), so the table must end there; otherwise (after a crash) the file can lag behind
/// what was committed, and more records are no alarm.
pub fn compare(remembered: &Head, table: &Head, exact: bool, hash_at: impl FnOnce(i64) -> Option<Hash>) -> Check {
    if table.seq < remembered.seq {
        return Check::Missing { from: table.seq + 1, to: remembered.seq, expected: *remembered };
    }
    if exact && table.seq > remembered.seq {
        return Check::Appended { from: remembered.seq + 1, to: table.seq, expected: *remembered };
    }
    if remembered.seq == 0 {
        return Check::Consistent;
    }
    match hash_at(remembered.seq) {
        Some(h) if h == remembered.hash => Check::Consistent,
        Some(found) => Check::Rewritten { expected: *remembered, found },
        // The record at that seq is gone although later ones exist: cut out of the middle.
        None => Check::Missing { from: remembered.seq, to: remembered.seq, expected: *remembered },
    }
}

fn identity() -> (u64, u32) {
    // SAFETY: plain reads of the control file's system identifier and this database's OID.
    unsafe { (pg_sys::GetSystemIdentifier(), u32::from(pg_sys::MyDatabaseId)) }
}

/// The head the file of this database remembers, if it is this cluster's.
pub fn read() -> Option<Remembered> {
    let (sysid, dboid) = identity();
    let file = head_file(dboid);
    let text = std::fs::read_to_string(&file).ok()?;
    let r = decode(&text, sysid, dboid);
    if r.is_none() {
        pgrx::warning!("pg_custody writer: {file} does not belong to this cluster; ignored");
    }
    r
}

/// After pg_custody's extension was dropped in this database (custody.allow_drop, committed):
/// the file becomes a tombstone (`<file>.dropped`) naming the head of the dropped chain, and
/// — in custody.database — shared memory forgets the head. The next writer of this database
/// says in its chain that a chain was dropped there, and where it ended (`dropped`).
pub fn forget(in_chain_database: bool) {
    let bury = |exact: Option<(i64, Hash)>| {
        // The exact head from shared memory when there is one (the file may lag behind it).
        let on_file = read();
        let head = exact.map(|(seq, hash)| Head { seq, hash }).or(on_file.as_ref().map(|r| r.head));
        let Some(head) = head else { return };
        if bury_at(head) && on_file.is_some() {
            let file = head_file(identity().1);
            if let Err(e) = std::fs::remove_file(&file) {
                pgrx::warning!("pg_custody: could not remove {file}: {e}");
            }
        }
    };
    if in_chain_database {
        crate::queue::forget_committed_head(bury);
    } else {
        bury(None);
    }
}

/// The writer committed `head` of a chain dropped since (its commit came first, its note in
/// shared memory after the drop): the tombstone names it when it is further on. Called under
/// the queue's lock, right after `forget`'s.
pub fn dropped_at(head: Head) {
    if dropped().is_some_and(|d| d.head.seq < head.seq) {
        bury_at(head);
    }
}

/// Writes the tombstone naming `head`; false (with a warning) when it could not.
fn bury_at(head: Head) -> bool {
    let (sysid, dboid) = identity();
    let tomb = format!("{}.dropped", head_file(dboid));
    match std::fs::write(&tomb, encode(sysid, dboid, &Remembered { head, clean: true, merkle: None })) {
        Ok(()) => true,
        Err(e) => {
            pgrx::warning!("pg_custody: could not keep the dropped chain's head in {tomb}: {e}");
            false
        }
    }
}

/// The head of the chain last dropped in this database, if its tombstone is there.
pub fn dropped() -> Option<Remembered> {
    let (sysid, dboid) = identity();
    let text = std::fs::read_to_string(format!("{}.dropped", head_file(dboid))).ok()?;
    decode(&text, sysid, dboid)
}

/// Removes the tombstone once a chain says what it held.
pub fn clear_dropped() {
    let _ = std::fs::remove_file(format!("{}.dropped", head_file(identity().1)));
}

fn write(r: &Remembered) -> std::io::Result<()> {
    let (sysid, dboid) = identity();
    let file = head_file(dboid);
    let tmp = format!("{file}.tmp");
    std::fs::write(&tmp, encode(sysid, dboid, r))?;
    std::fs::rename(&tmp, &file)
}

/// Heads committed but maybe not flushed yet (with the Merkle frontier at each), and the
/// last one written to the file.
pub struct Durable {
    pending: VecDeque<(u64, Head, Option<MerkleBuilder>)>,
    written: Option<(Head, Option<MerkleBuilder>)>,
    last_write: Option<Instant>,
    /// The chain generation the heads belong to (`crate::queue::writer_committed`).
    generation: u64,
}

/// How often the file is rewritten at most while records flow.
const WRITE_EVERY: Duration = Duration::from_millis(100);

impl Durable {
    pub fn new() -> Durable {
        Durable { pending: VecDeque::new(), written: None, last_write: None, generation: 0 }
    }

    /// A batch ending at `head` committed; its commit record ends at this LSN. `merkle`: the
    /// tree over the records up to it.
    pub fn committed(&mut self, head: Head, merkle: &MerkleBuilder) {
        // SAFETY: set by CommitTransaction in this process, read right after.
        let lsn = unsafe { pg_sys::XactLastCommitEnd };
        self.pending.push_back((lsn, head, Some(merkle.clone())));
    }

    /// Writes the newest head whose commit is flushed, at most every WRITE_EVERY unless
    /// `now`. `clean`: the writer is stopping after a final flush.
    pub fn sync(&mut self, now: bool, clean: bool) {
        // SAFETY: reads the WAL flush position.
        let flushed = unsafe { pg_sys::GetFlushRecPtr(std::ptr::null_mut()) };
        let mut newest = None;
        while self.pending.front().is_some_and(|(lsn, _, _)| *lsn <= flushed) {
            newest = self.pending.pop_front().map(|(_, h, m)| (h, m));
        }
        let Some((head, merkle)) = newest.or(if clean { self.written.take() } else { None }) else { return };
        if !now && self.last_write.is_some_and(|t| t.elapsed() < WRITE_EVERY) {
            // Keep it for the next call.
            self.pending.push_front((0, head, merkle));
            return;
        }
        // Never the head of a chain dropped since: `forget` removed the file, and a write
        // that raced with it is taken back (forget counts the drop before it removes the file,
        // so either it removes this write or the check after the rename sees the drop).
        if !crate::queue::chain_is_current(self.generation) {
            self.pending.clear();
            return;
        }
        let r = Remembered { head, clean, merkle };
        match write(&r) {
            Ok(()) if !crate::queue::chain_is_current(self.generation) => {
                let _ = std::fs::remove_file(head_file(identity().1));
                self.pending.clear();
            }
            Ok(()) => {
                self.written = Some((r.head, r.merkle));
                self.last_write = Some(Instant::now());
            }
            Err(e) => pgrx::warning!("pg_custody writer: could not write {}: {e}", head_file(identity().1)),
        }
    }

    /// Marks the chain head as known at start (the table's, after any alarm was recorded),
    /// with the tree over the records up to it when the writer has it.
    pub fn start(&mut self, generation: u64, head: Head, merkle: Option<MerkleBuilder>) {
        self.generation = generation;
        self.written = None;
        self.pending.clear();
        self.pending.push_back((0, head, merkle));
        self.sync(true, false);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn h(b: u8) -> Hash {
        [b; 32]
    }

    #[test]
    fn file_round_trip_and_identity() {
        let r = Remembered { head: Head { seq: 42, hash: h(7) }, clean: true, merkle: None };
        let line = encode(99, 5, &r);
        assert_eq!(decode(&line, 99, 5), Some(r));
        let mut m = MerkleBuilder::new();
        for i in 0..42u8 {
            m.push(&[i; 32]);
        }
        let with = Remembered { head: Head { seq: 42, hash: h(7) }, clean: false, merkle: Some(m.clone()) };
        let line = encode(99, 5, &with);
        assert_eq!(decode(&line, 99, 5), Some(with), "{line}");
        let empty = Remembered { head: Head { seq: 0, hash: h(0) }, clean: true, merkle: Some(MerkleBuilder::new()) };
        assert_eq!(decode(&encode(99, 5, &empty), 99, 5), Some(empty));
        // A damaged frontier is no frontier, the head still counts.
        let damaged = line.replacen(&format!(" 42 {}", hex::encode(&m.frontier()[0])), " 42 zz", 1);
        assert_ne!(damaged, line);
        assert_eq!(decode(&damaged, 99, 5).map(|r| (r.head, r.merkle)), Some((Head { seq: 42, hash: h(7) }, None)));
        assert_eq!(decode(&line, 98, 5), None, "another cluster");
        assert_eq!(decode(&line, 99, 6), None, "another database");
        assert_eq!(decode("garbage", 99, 5), None);
        assert_eq!(decode("", 99, 5), None);
    }

    #[test]
    fn a_table_behind_the_writer_misses_records() {
        let remembered = Head { seq: 100, hash: h(1) };
        let table = Head { seq: 95, hash: h(2) };
        assert_eq!(compare(&remembered, &table, false, |_| None), Check::Missing { from: 96, to: 100, expected: remembered });
        assert_eq!(compare(&remembered, &table, true, |_| None), Check::Missing { from: 96, to: 100, expected: remembered });
    }

    #[test]
    fn a_table_ahead_with_the_same_record_is_consistent() {
        let remembered = Head { seq: 100, hash: h(1) };
        let table = Head { seq: 120, hash: h(3) };
        // After a crash the file may lag behind what was committed.
        assert_eq!(compare(&remembered, &table, false, |s| (s == 100).then_some(h(1))), Check::Consistent);
        assert_eq!(compare(&remembered, &Head { seq: 100, hash: h(1) }, true, |_| Some(h(1))), Check::Consistent);
    }

    #[test]
    fn records_after_an_exact_head_were_appended_by_someone_else() {
        let remembered = Head { seq: 100, hash: h(1) };
        let table = Head { seq: 102, hash: h(3) };
        assert_eq!(
            compare(&remembered, &table, true, |_| Some(h(1))),
            Check::Appended { from: 101, to: 102, expected: remembered }
        );
    }

    #[test]
    fn a_rewritten_or_removed_record_is_noticed() {
        let remembered = Head { seq: 100, hash: h(1) };
        let table = Head { seq: 100, hash: h(9) };
        assert_eq!(compare(&remembered, &table, true, |_| Some(h(9))), Check::Rewritten { expected: remembered, found: h(9) });
        let later = Head { seq: 130, hash: h(4) };
        assert_eq!(compare(&remembered, &later, false, |_| None), Check::Missing { from: 100, to: 100, expected: remembered });
    }

    #[test]
    fn nothing_remembered_is_consistent() {
        assert_eq!(compare(&Head { seq: 0, hash: h(0) }, &Head { seq: 0, hash: h(0) }, false, |_| None), Check::Consistent);
    }
}
