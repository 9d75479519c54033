//! A hot standby's durable buffer: records its standby worker could not ship to the primary,
//! kept in `$PGDATA/pg_custody_standby.spool` (fsynced), and how far they were shipped in
//! `pg_custody_standby.spool.pos`. Shipped first when the primary is back; stored by the
//! writer if the standby is promoted first. A standby restart keeps them.
//!
//! The file: one header line naming the cluster (`pg_custody standby spool 1 <system
//! identifier>`), then per record its length (u32 LE), the first 4 bytes of its SHA-256 and
//! the queue payload. A record cut short or damaged (a crash while appending) ends the
//! spool: `recover` cuts it there and counts a lost record, which the chain shows as a GAP.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom, Write};

use pgrx::pg_sys;
use sha2::{Digest, Sha256};

const FILE: &str = "pg_custody_standby.spool";
const POS: &str = "pg_custody_standby.spool.pos";
/// Most bytes kept: beyond it records wait in the shared queue, and custody.on_failure
/// decides once that is full too.
pub const MAX_BYTES: u64 = 1 << 30;

fn header() -> String {
    // SAFETY: a plain read of the control file's system identifier.
    format!("pg_custody standby spool 1 {}\n", unsafe { pg_sys::GetSystemIdentifier() })
}

fn check(payload: &[u8]) -> [u8; 4] {
    let d = Sha256::digest(payload);
    [d[0], d[1], d[2], d[3]]
}

/// Makes a rename or a new file durable: fsync of the data directory.
fn sync_dir() -> io::Result<()> {
    File::open(".")?.sync_all()
}

/// Whether records are waiting in the spool.
pub fn pending() -> bool {
    fs::metadata(FILE).is_ok_and(|m| m.len() > shipped().max(header().len() as u64))
}

/// Bytes of the spool already shipped (from the start of the file).
fn shipped() -> u64 {
    fs::read_to_string(POS).ok().and_then(|t| t.trim().parse().ok()).unwrap_or(0)
}

/// Appends `batch` durably; Err when it would grow past MAX_BYTES (nothing written then).
pub fn append(batch: &crate::queue::Records) -> io::Result<()> {
    let len = fs::metadata(FILE).map_or(0, |m| m.len());
    let add: u64 = batch.iter().map(|b| b.len() as u64 + 8).sum();
    if len + add > MAX_BYTES {
        return Err(io::Error::other(format!("the standby's spool is full ({MAX_BYTES} bytes)")));
    }
    let mut bytes = Vec::with_capacity(add as usize + 64);
    if len == 0 {
        // A new spool: nothing of it is shipped yet.
        match fs::remove_file(POS) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
        bytes.extend_from_slice(header().as_bytes());
    }
    for b in batch.iter() {
        bytes.extend_from_slice(&(b.len() as u32).to_le_bytes());
        bytes.extend_from_slice(&check(b));
        bytes.extend_from_slice(b);
    }
    let mut f = OpenOptions::new().create(true).append(true).open(FILE)?;
    f.write_all(&bytes)?;
    f.sync_all()?;
    if len == 0 {
        sync_dir()?;
    }
    Ok(())
}

/// Reads the record at the file's position; None at the end or at a record cut short or
/// damaged.
fn read_one(f: &mut File, max_len: usize) -> io::Result<Option<Vec<u8>>> {
    let mut head = [0u8; 8];
    match f.read_exact(&mut head) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e),
    }
    let n = u32::from_le_bytes(head[..4].try_into().expect("4 bytes")) as usize;
    if n > max_len {
        return Ok(None);
    }
    let mut payload = vec![0u8; n];
    if f.read_exact(&mut payload).is_err() || check(&payload) != head[4..] {
        return Ok(None);
    }
    Ok(Some(payload))
}

fn open_checked() -> io::Result<File> {
    let mut f = File::open(FILE)?;
    let want = header();
    let mut got = vec![0u8; want.len()];
    f.read_exact(&mut got)?;
    if got != want.as_bytes() {
        return Err(io::Error::other(format!("{FILE} is not this cluster's standby spool; left as it is")));
    }
    Ok(f)
}

/// At start: checks that the spool is this cluster's and cuts a damaged tail off (counted as
/// a lost record).
pub fn recover() -> io::Result<()> {
    if fs::metadata(FILE).is_err() {
        return Ok(());
    }
    let mut f = open_checked()?;
    let mut good = header().len() as u64;
    let max_len = crate::queue::max_record_len().max(1);
    while let Some(p) = read_one(&mut f, max_len)? {
        good += 8 + p.len() as u64;
    }
    let len = fs::metadata(FILE)?.len();
    if good < len {
        let f = OpenOptions::new().write(true).open(FILE)?;
        f.set_len(good)?;
        f.sync_all()?;
        crate::queue::note_lost();
        pgrx::warning!("pg_custody: cut {} damaged bytes off the standby spool (a crash while it was written)", len - good);
    }
    Ok(())
}

/// The next records not shipped yet (up to about `max_bytes`), and the position after them.
pub fn next(max_bytes: usize) -> io::Result<(crate::queue::Records, u64)> {
    let mut f = open_checked()?;
    let mut pos = shipped().max(header().len() as u64);
    f.seek(SeekFrom::Start(pos))?;
    let max_len = crate::queue::max_record_len().max(1);
    let (mut out, mut bytes) = (crate::queue::Records::default(), 0usize);
    while bytes < max_bytes {
        let Some(p) = read_one(&mut f, max_len)? else { break };
        pos += 8 + p.len() as u64;
        bytes += p.len();
        out.push(&p);
    }
    Ok((out, pos))
}

/// Records before `pos` are stored (by the primary, or by the writer); the spool goes when
/// all are (the file first, so that a failure in between never ships anything again).
pub fn shipped_to(pos: u64) -> io::Result<()> {
    if fs::metadata(FILE).map_or(0, |m| m.len()) <= pos {
        match fs::remove_file(FILE) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
        let _ = fs::remove_file(POS);
        return sync_dir();
    }
    let tmp = format!("{POS}.tmp");
    fs::write(&tmp, pos.to_string())?;
    File::open(&tmp)?.sync_all()?;
    fs::rename(&tmp, POS)?;
    sync_dir()
}
