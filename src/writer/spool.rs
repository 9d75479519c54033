//! A hot standby's durable buffer: records its standby worker could not ship to the primary,
//! kept in `$PGDATA/pg_custody_standby.spool` (length-prefixed queue payloads, fsynced), and
//! how far they were shipped in `pg_custody_standby.spool.pos`. Shipped first when the primary
//! is back; stored by the writer itself if the standby is promoted first. A standby restart
//! keeps them.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom, Write};

const FILE: &str = "pg_custody_standby.spool";
const POS: &str = "pg_custody_standby.spool.pos";
/// Most bytes kept: beyond it records wait in the shared queue, and custody.on_failure
/// decides once that is full too.
pub const MAX_BYTES: u64 = 1 << 30;

/// Whether records are waiting in the spool.
pub fn pending() -> bool {
    fs::metadata(FILE).is_ok_and(|m| m.len() > shipped())
}

/// Bytes of the spool already shipped.
fn shipped() -> u64 {
    fs::read_to_string(POS).ok().and_then(|t| t.trim().parse().ok()).unwrap_or(0)
}

/// Appends `batch` durably; Err when it would grow past MAX_BYTES (nothing written then).
pub fn append(batch: &[Vec<u8>]) -> io::Result<()> {
    let len = fs::metadata(FILE).map_or(0, |m| m.len());
    let add: u64 = batch.iter().map(|b| b.len() as u64 + 4).sum();
    if len + add > MAX_BYTES {
        return Err(io::Error::other(format!("the standby's spool is full ({MAX_BYTES} bytes)")));
    }
    let mut bytes = Vec::with_capacity(add as usize);
    for b in batch {
        bytes.extend_from_slice(&(b.len() as u32).to_le_bytes());
        bytes.extend_from_slice(b);
    }
    let mut f = OpenOptions::new().create(true).append(true).open(FILE)?;
    f.write_all(&bytes)?;
    f.sync_all()
}

/// The next records not shipped yet (up to about `max_bytes`), and the position after them.
pub fn next(max_bytes: usize) -> io::Result<(Vec<Vec<u8>>, u64)> {
    let mut f = File::open(FILE)?;
    let mut pos = shipped();
    f.seek(SeekFrom::Start(pos))?;
    let mut out = Vec::new();
    let mut bytes = 0usize;
    let mut len = [0u8; 4];
    while bytes < max_bytes {
        match f.read_exact(&mut len) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => break,
            Err(e) => return Err(e),
        }
        let n = u32::from_le_bytes(len) as usize;
        let mut payload = vec![0u8; n];
        // A record cut short (a crash while appending) ends the spool.
        if f.read_exact(&mut payload).is_err() {
            break;
        }
        pos += 4 + n as u64;
        bytes += n;
        out.push(payload);
    }
    Ok((out, pos))
}

/// Records before `pos` are stored (by the primary, or by the writer); the spool goes when
/// all are.
pub fn shipped_to(pos: u64) -> io::Result<()> {
    if fs::metadata(FILE).map_or(0, |m| m.len()) <= pos {
        let _ = fs::remove_file(POS);
        return fs::remove_file(FILE).or_else(|e| if e.kind() == io::ErrorKind::NotFound { Ok(()) } else { Err(e) });
    }
    let tmp = format!("{POS}.tmp");
    fs::write(&tmp, pos.to_string())?;
    File::open(&tmp)?.sync_all()?;
    fs::rename(&tmp, POS)
}
