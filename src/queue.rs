//! The bounded shared-memory queue between sessions and the custody writer, and the small
//! amount of shared state that goes with it (writer state, stored position, lost records).
//!
//! Sessions append length-prefixed records without a lock: a push reserves its bytes with one
//! compare-and-swap on `head`, copies the record in, and publishes it by writing its length
//! word last (release ordering); the writer alone consumes, in reservation order, and stops at
//! the first record not published yet. The bytes the writer consumed are zeroed before `tail`
//! moves past them, so a length word of 0 always means "not published yet". Every record
//! starts at a multiple of 8, so a length word never wraps around the end of the ring.
//! A record leaves the queue only after the writer has committed it to the audit log, so a
//! writer that dies mid-batch loses nothing: its successor reads the same bytes again.
//! Positions are byte offsets that only grow (`head`: reserved, `tail`: committed by the
//! writer), so "is my record stored?" is one comparison. The writer commits asynchronously;
//! a session waiting at COMMIT makes its records durable with its own commit's WAL flush.

use std::ptr::{addr_of_mut, null_mut};
use std::sync::atomic::{AtomicI32, AtomicI64, AtomicU32, AtomicU64, Ordering};
use std::time::Duration;

use pgrx::pg_sys;

use crate::settings;

pub const TRANCHE: &std::ffi::CStr = c"pg_custody";
/// Where the writer keeps the chain head of database `dboid` (`writer::head`), in the data
/// directory. While such a file exists sessions record from their first statement after a
/// restart, before the writer has looked.
pub fn head_file(dboid: u32) -> String {
    format!("pg_custody.{dboid}.head")
}

/// Whether the data directory holds a head file (for any database).
fn a_chain_exists() -> bool {
    std::fs::read_dir(".").is_ok_and(|d| {
        d.flatten().any(|e| {
            let n = e.file_name();
            let n = n.to_string_lossy();
            n.starts_with("pg_custody.") && n.ends_with(".head")
        })
    })
}
const WAIT_EVENT: u32 = pg_sys::PG_WAIT_EXTENSION;

/// Whether the writer has found the audit log in `custody.database`.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
#[repr(u32)]
pub enum ChainState {
    /// The chain existed when the server stopped and the writer has not attached yet:
    /// sessions queue their records (and wait for them at commit) from the first statement.
    Unknown = 0,
    /// `pg_custody` is not created in `custody.database`: nothing is recorded.
    Absent = 1,
    /// The writer is appending.
    Ready = 2,
    /// The writer found pg_custody's tables changed (while the library was not loaded) and
    /// does not write to them: sessions queue records as if the writer were away.
    Refusing = 3,
}

#[repr(C)]
struct Shared {
    lock: *mut pg_sys::LWLock,
    capacity: u64,
    /// Bytes ever reserved by pushes (no lock: compare-and-swap).
    head: AtomicU64,
    /// Bytes ever consumed and committed to the audit log (moved by the consumer only, under
    /// `lock`; mirrored in `flushed`).
    tail: AtomicU64,
    flushed: AtomicU64,
    space_cv: pg_sys::ConditionVariable,
    flush_cv: pg_sys::ConditionVariable,
    writer_latch: AtomicU64,
    writer_pid: AtomicI32,
    state: AtomicU32,
    /// Records that could not be queued (on_failure = continue, or failures during abort);
    /// the writer turns each increase into a `system` gap record.
    lost: AtomicU64,
    head_seq: AtomicI64,
    last_checkpoint_seq: AtomicI64,
    /// A push that brings `head` to this position wakes the writer; below it the writer is
    /// gathering a batch and wakes by itself (0: every push wakes it).
    wake_at: AtomicU64,
    /// The furthest position a session has waited for in `wait_flushed` (only grows): while
    /// it is beyond the stored position someone is waiting, and the writer does not gather.
    /// A position rather than a count, so that a wait ended by an ERROR leaves nothing behind.
    wanted: AtomicU64,
    /// Lost records the writer has already turned into GAP records (survives writer restarts).
    lost_recorded: AtomicU64,
    /// The chain head the writer last committed (under `lock`; `head_valid` false until the
    /// first writer of this server run has read the table): the writer that follows compares
    /// the table with it, so a head that went backwards is noticed.
    head_valid: bool,
    head_hash: [u8; 32],
    /// The Merkle tree over the records up to that head (size and frontier, under `lock`): the
    /// writer that follows goes on from it instead of reading the whole log again.
    merkle_size: u64,
    merkle_len: u32,
    merkle: [[u8; 32]; 64],
    /// How many times the chain was dropped in this server run (under `lock`): a writer
    /// records only heads of the chain it opened, so one that commits a batch just before a
    /// DROP EXTENSION commits never brings the dropped chain's head back (`writer_committed`).
    chain_generation: u64,
    /// Commits that showed the extension is there (`extension_is_there`, under `lock`): a
    /// writer that found no log in a snapshot taken before one of them does not say "absent".
    extension_seen: u64,
    /// The seq of the last checkpoint custody.checkpoint_command took.
    archived_seq: AtomicI64,
    /// End of the writer's last commit record in WAL: what must be flushed for everything it
    /// stored so far to be on disk.
    commit_lsn: AtomicU64,
    /// Texts for custody.status() (under `lock`).
    texts: [StatusText; 3],
    /// The standby worker's pid while it ships this queue (0: none): a promoted server's
    /// writer waits for it to end before it consumes the queue.
    shipping_pid: AtomicI32,
    /// A standby worker ran in this server run: a spool left in the data directory is this
    /// server's, kept while it was a standby.
    was_standby: std::sync::atomic::AtomicBool,
    /// The last writer start of this server run (custody.status()): records of the log it
    /// read to resume the chain, and how long opening the chain took, in µs (0: none yet;
    /// stored as µs + 1).
    start_read: AtomicU64,
    start_us: AtomicU64,
    // the ring of `capacity` bytes follows
}

/// A short text in shared memory, for custody.status().
#[repr(C)]
#[derive(Clone, Copy)]
struct StatusText {
    len: u32,
    bytes: [u8; 256],
}

/// The status texts the writer publishes.
#[derive(Clone, Copy)]
pub enum Text {
    /// The signing key's state.
    Key = 0,
    /// An alarm about the chain (its head went backwards), or empty.
    Alarm = 1,
    /// custody.checkpoint_command's last failure, or empty.
    Archive = 2,
}

static mut SHARED: *mut Shared = null_mut();

/// Bytes of shared memory the queue needs (control block and ring).
pub fn shmem_size() -> usize {
    std::mem::size_of::<Shared>() + settings::queue_size_bytes()
}

/// Creates or attaches the queue. Called by `shmem` with AddinShmemInitLock held.
///
/// # Safety
/// Only from the shared-memory startup hook.
pub unsafe fn attach_shmem() {
    // SAFETY: ShmemInitStruct returns memory of the requested size, zeroed here on creation.
    unsafe {
        let mut found = false;
        let p = pg_sys::ShmemInitStruct(c"pg_custody queue".as_ptr(), shmem_size(), &mut found)
            as *mut Shared;
        if !found {
            // The ring too: a length word of 0 is a record not published yet.
            std::ptr::write_bytes(p as *mut u8, 0, shmem_size());
            (*p).lock = addr_of_mut!((*pg_sys::GetNamedLWLockTranche(TRANCHE.as_ptr())).lock);
            (*p).capacity = settings::queue_size_bytes() as u64;
            // The postmaster's working directory is the data directory.
            let st = if a_chain_exists() {
                ChainState::Unknown
            } else {
                ChainState::Absent
            };
            (*p).state = AtomicU32::new(st as u32);
            pg_sys::ConditionVariableInit(addr_of_mut!((*p).space_cv));
            pg_sys::ConditionVariableInit(addr_of_mut!((*p).flush_cv));
        }
        SHARED = p;
    }
}

fn shared() -> Option<&'static Shared> {
    // SAFETY: SHARED is set once in shmem_startup before any backend forks and never moves.
    unsafe { SHARED.as_ref() }
}

/// The ring of `capacity` bytes that follows the control block.
///
/// # Safety
/// `s` is the queue's control block in shared memory (SHARED).
unsafe fn ring(s: *const Shared) -> *mut u8 {
    // SAFETY: the control block was allocated by ShmemInitStruct with shmem_size() bytes, the
    // block followed by the ring, so the offset stays inside that allocation.
    unsafe { (s as *mut u8).add(std::mem::size_of::<Shared>()) }
}

/// Why a record could not be queued.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QueueError {
    /// The library is not preloaded: there is no queue.
    NoQueue,
    /// The writer did not make room within `custody.failure_timeout`.
    Timeout,
    /// The record is larger than the queue can ever hold.
    TooLarge,
}

pub fn state() -> ChainState {
    match shared().map(|s| s.state.load(Ordering::Acquire)) {
        Some(1) => ChainState::Absent,
        Some(2) => ChainState::Ready,
        Some(3) => ChainState::Refusing,
        _ => ChainState::Unknown,
    }
}

/// A backend committed a change to pg_custody's store, so the extension is there, but the
/// writer has not found it yet (it looks every 100 ms): from now on sessions record and gate
/// as while the writer attaches (`Unknown`), instead of neither recording nor gating.
pub fn extension_is_there() {
    let Some(s) = shared() else { return };
    let sp = s as *const Shared as *mut Shared;
    // SAFETY: the count is written under the lock; once per commit that changed the store.
    unsafe {
        pg_sys::LWLockAcquire(s.lock, pg_sys::LWLockMode::LW_EXCLUSIVE);
        (*sp).extension_seen += 1;
        let _ = s.state.compare_exchange(ChainState::Absent as u32, ChainState::Unknown as u32, Ordering::AcqRel, Ordering::Acquire);
        pg_sys::LWLockRelease(s.lock);
    }
}

/// The standby worker starts (its pid) or ends (0) shipping this queue.
pub fn set_shipping(pid: i32) {
    if let Some(s) = shared() {
        if pid != 0 {
            s.was_standby.store(true, Ordering::Release);
        }
        s.shipping_pid.store(pid, Ordering::Release);
    }
}

/// The standby worker shipping this queue, if one is (its pid).
pub fn shipping_pid() -> Option<i32> {
    shared().map(|s| s.shipping_pid.load(Ordering::Acquire)).filter(|p| *p != 0)
}

/// Whether a standby worker ran in this server run.
pub fn was_standby() -> bool {
    shared().is_some_and(|s| s.was_standby.load(Ordering::Acquire))
}

/// Sets the chain state from a process that is not the writer (the standby worker).
pub fn set_chain_state(st: ChainState) {
    if let Some(s) = shared() {
        s.state.store(st as u32, Ordering::Release);
    }
}

/// Whether this server is a standby (in recovery): no writer runs, so nothing is queued
/// (docs/operations.md, "Replicas"). Cheap once recovery has ended (a backend-local flag).
pub fn on_standby() -> bool {
    // SAFETY: RecoveryInProgress reads a flag in shared memory (and caches its end locally).
    unsafe { pg_sys::RecoveryInProgress() }
}

/// Largest payload a single record may have, given the queue size.
pub fn max_record_len() -> usize {
    shared().map_or(0, |s| (s.capacity / 4) as usize)
}

/// Appends one record; waits up to `timeout_ms` for room. Returns the position at which the
/// record ends: once `flushed() >= pos` it is committed to the audit log.
///
/// Safe to call during transaction abort (it raises no error; interrupts are held there).
pub fn push(payload: &[u8], timeout_ms: i64) -> Result<u64, QueueError> {
    push_all(&[payload], timeout_ms)
}

/// `push` of several records as one block: all of them, one after the other with nothing in
/// between, or none. The writer sees none of them before it can see all of them (the first
/// one's length word is published last).
pub fn push_all(payloads: &[&[u8]], timeout_ms: i64) -> Result<u64, QueueError> {
    let s = shared().ok_or(QueueError::NoQueue)?;
    let need: u64 = payloads.iter().map(|p| slot_len(p.len())).sum();
    if payloads.is_empty() {
        return Ok(s.head.load(Ordering::Acquire));
    }
    if need > s.capacity / 2 || payloads.iter().any(|p| p.len() >= u32::MAX as usize) {
        return Err(QueueError::TooLarge);
    }
    let sp = s as *const Shared as *mut Shared;
    let mut waited_ms: i64 = 0;
    let mut sleeping = false;
    let result = loop {
        let reserved = {
            let _signals = NoSignals::unless_backend();
            reserve(s, need).inspect(|&at| {
                // SAFETY: [at, at + need) was reserved above: it lies in the free region,
                // which the consumer never reads (it stops at the first length word of 0) and
                // no other push writes. Each record's bytes are copied before its length word
                // is published.
                unsafe {
                    let mut pos = at;
                    for payload in payloads {
                        copy_in(sp, pos + 4, payload);
                        pos += slot_len(payload.len());
                    }
                    // The others first: the writer reads none of them before the first.
                    let mut pos = at + slot_len(payloads[0].len());
                    for payload in &payloads[1..] {
                        len_word(sp, pos).store(payload.len() as u32 + 1, Ordering::Release);
                        pos += slot_len(payload.len());
                    }
                    len_word(sp, at).store(payloads[0].len() as u32 + 1, Ordering::SeqCst);
                }
            })
        };
        if let Some(at) = reserved {
            let pos = at + need;
            // SeqCst, after the publication: the writer stores wake_at before it looks whether
            // a record is published (`pending`), so one of the two sees the other.
            if pos >= s.wake_at.load(Ordering::SeqCst) {
                wake_writer();
            }
            break Ok(pos);
        }
        wake_writer();
        if waited_ms >= timeout_ms {
            break Err(QueueError::Timeout);
        }
        // SAFETY: standard condition-variable wait; the writer broadcasts after freeing space.
        unsafe {
            if !sleeping {
                pg_sys::ConditionVariablePrepareToSleep(addr_of_mut!((*sp).space_cv));
                sleeping = true;
            }
            pg_sys::ConditionVariableTimedSleep(addr_of_mut!((*sp).space_cv), 10, WAIT_EVENT);
        }
        waited_ms += 10;
    };
    if sleeping {
        // SAFETY: paired with the PrepareToSleep above.
        unsafe { pg_sys::ConditionVariableCancelSleep() };
    }
    result
}

/// Signals blocked while a push has reserved its bytes and not published them yet, in
/// processes other than client backends: a background worker's default SIGTERM handler
/// (`bgworker_die`) raises FATAL inside the handler, and a worker that exited between the two
/// would leave a slot that is never published, behind which the writer can read nothing. A
/// client backend's handlers only set flags, so it pays nothing.
struct NoSignals(Option<pg_sys::__sigset_t>);

unsafe extern "C" {
    fn sigfillset(set: *mut pg_sys::__sigset_t) -> std::ffi::c_int;
    fn sigprocmask(how: std::ffi::c_int, set: *const pg_sys::__sigset_t, old: *mut pg_sys::__sigset_t) -> std::ffi::c_int;
}
/// SIG_SETMASK of Linux's <signal.h>.
const SIG_SETMASK: std::ffi::c_int = 2;

impl NoSignals {
    fn unless_backend() -> NoSignals {
        // SAFETY: a plain read of a process global set at process start.
        if unsafe { pg_sys::MyBackendType } == pg_sys::BackendType::B_BACKEND {
            return NoSignals(None);
        }
        // SAFETY: sigset_t values owned here; sigprocmask on this single-threaded process.
        unsafe {
            let mut all: pg_sys::__sigset_t = std::mem::zeroed();
            let mut old: pg_sys::__sigset_t = std::mem::zeroed();
            sigfillset(&mut all);
            if sigprocmask(SIG_SETMASK, &all, &mut old) != 0 {
                return NoSignals(None);
            }
            NoSignals(Some(old))
        }
    }
}

impl Drop for NoSignals {
    fn drop(&mut self) {
        if let Some(old) = self.0.take() {
            // SAFETY: restores the mask saved by `unless_backend`; a signal that arrived
            // meanwhile is delivered now.
            unsafe { sigprocmask(SIG_SETMASK, &old, std::ptr::null_mut()) };
        }
    }
}

/// Bytes a record of `len` payload bytes takes in the ring: its length word and payload,
/// padded to a multiple of 8 (so that every length word is aligned and never wraps).
const fn slot_len(len: usize) -> u64 {
    (4 + len as u64).div_ceil(8) * 8
}

/// Reserves `need` bytes at the head, if the ring has room for them: the position they start
/// at. One compare-and-swap; the only contention between pushing sessions.
fn reserve(s: &Shared, need: u64) -> Option<u64> {
    let mut head = s.head.load(Ordering::Acquire);
    loop {
        // Read after head, the tail is at least the one of that moment (it only grows), so
        // head - tail is at most the capacity. It can be past that head, when others pushed
        // and the writer consumed meanwhile: then head is stale and the exchange fails.
        let tail = s.tail.load(Ordering::Acquire);
        if s.capacity - head.saturating_sub(tail) < need {
            return None;
        }
        match s.head.compare_exchange_weak(head, head + need, Ordering::AcqRel, Ordering::Acquire) {
            Ok(_) => return Some(head),
            Err(now) => head = now,
        }
    }
}

/// The length word of the record slot at `pos`: 0 while the slot is not published, else the
/// payload's length + 1.
///
/// # Safety
/// `s` is the queue's control block and `pos` a slot boundary (a multiple of 8).
unsafe fn len_word<'a>(s: *const Shared, pos: u64) -> &'a AtomicU32 {
    // SAFETY: the ring starts 8-aligned (ShmemInitStruct is MAXALIGNed and the control block's
    // size is a multiple of its 8-byte alignment) and its capacity is a multiple of 1024, so
    // a slot boundary's offset is 8-aligned and the 4 bytes lie inside the ring; shared memory
    // lives as long as the cluster. Besides atomic accesses, the word is only written plainly
    // by the zeroing at creation (before any process uses the queue) and by the consumer's
    // `zero`, which happens before its Release store of tail and so before any push that
    // reserves those bytes again (pushes load tail with Acquire).
    unsafe {
        let off = (pos % (*s).capacity) as usize;
        &*(ring(s).add(off) as *const AtomicU32)
    }
}

/// Where `len` bytes from position `pos` lie in the ring: `(off, first)`, `first` bytes at
/// [off, capacity) and the rest at [0, len - first).
///
/// # Safety
/// `s` is the queue's control block.
unsafe fn span(s: *const Shared, pos: u64, len: usize) -> (usize, usize) {
    // SAFETY: capacity is written once, when shared memory is created (caller's contract).
    let cap = unsafe { (*s).capacity };
    let off = (pos % cap) as usize;
    (off, len.min(cap as usize - off))
}

/// Copies `bytes` into the ring at position `pos`, wrapping at `capacity`.
///
/// # Safety
/// `s` is the queue's control block and [pos, pos + bytes.len()) lies in a region this
/// process reserved (`reserve`) and has not published yet.
unsafe fn copy_in(s: *mut Shared, pos: u64, bytes: &[u8]) {
    // SAFETY: `off < cap`, and the two copies write `first` bytes at [off, cap) and the rest at
    // [0, len - first), both inside the ring of `cap` bytes since len <= cap; nobody reads an
    // unpublished region and no other push writes this one (caller's contract).
    unsafe {
        let (off, first) = span(s, pos, bytes.len());
        std::ptr::copy_nonoverlapping(bytes.as_ptr(), ring(s).add(off), first);
        if first < bytes.len() {
            std::ptr::copy_nonoverlapping(bytes.as_ptr().add(first), ring(s), bytes.len() - first);
        }
    }
}

/// Zeroes [from, to) of the ring (consumed bytes, about to be freed).
///
/// # Safety
/// `s` is the queue's control block and [from, to) lies in [tail, end of the last published
/// record), which only the consumer (the caller) touches.
unsafe fn zero(s: *mut Shared, from: u64, to: u64) {
    // SAFETY: as in copy_in, both writes stay inside the ring (to - from <= cap).
    unsafe {
        let len = (to - from) as usize;
        let (off, first) = span(s, from, len);
        std::ptr::write_bytes(ring(s).add(off), 0, first);
        if first < len {
            std::ptr::write_bytes(ring(s), 0, len - first);
        }
    }
}

/// Appends `len` bytes of the ring from position `pos` (wrapping at `capacity`) to `out`.
///
/// # Safety
/// `s` is the queue's control block and [pos, pos + len) lies in a published record at or
/// after tail, which no one writes until the consumer advances tail.
unsafe fn copy_out(s: *const Shared, pos: u64, len: usize, out: &mut Vec<u8>) {
    out.reserve(len);
    // SAFETY: as in copy_in, both copies stay inside the ring; the bytes read are queued
    // records, not written meanwhile (caller's contract). They go to the `len` bytes of spare
    // capacity just reserved, all written before the length covers them.
    unsafe {
        let dst = out.as_mut_ptr().add(out.len());
        let (off, first) = span(s, pos, len);
        std::ptr::copy_nonoverlapping(ring(s).add(off), dst, first);
        if first < len {
            std::ptr::copy_nonoverlapping(ring(s), dst.add(first), len - first);
        }
        out.set_len(out.len() + len);
    }
}

/// Records copied out of the queue (or read back from the standby's spool): their bytes end
/// to end in one buffer, reused from batch to batch (no allocation per record).
#[derive(Default)]
pub struct Records {
    bytes: Vec<u8>,
    ends: Vec<usize>,
}

impl Records {
    pub fn clear(&mut self) {
        self.bytes.clear();
        self.ends.clear();
    }

    pub fn len(&self) -> usize {
        self.ends.len()
    }

    pub fn is_empty(&self) -> bool {
        self.ends.is_empty()
    }

    pub fn push(&mut self, record: &[u8]) {
        self.bytes.extend_from_slice(record);
        self.ends.push(self.bytes.len());
    }

    /// The records, in order.
    pub fn iter(&self) -> impl ExactSizeIterator<Item = &[u8]> + '_ {
        (0..self.ends.len()).map(|i| &self.bytes[if i == 0 { 0 } else { self.ends[i - 1] }..self.ends[i]])
    }
}

/// Waits until every record up to `pos` is committed to the audit log, at most `timeout_ms`.
/// Returns false on timeout. May process interrupts (query cancel raises as usual).
pub fn wait_flushed(pos: u64, timeout_ms: i64) -> bool {
    let Some(s) = shared() else { return true };
    if s.flushed.load(Ordering::Acquire) >= pos {
        return true;
    }
    let sp = s as *const Shared as *mut Shared;
    let start = std::time::Instant::now();
    s.wanted.fetch_max(pos, Ordering::SeqCst);
    // SAFETY: standard condition-variable wait; the writer broadcasts after each commit.
    unsafe { pg_sys::ConditionVariablePrepareToSleep(addr_of_mut!((*sp).flush_cv)) };
    let ok = loop {
        if s.flushed.load(Ordering::Acquire) >= pos {
            break true;
        }
        let elapsed = start.elapsed().as_millis() as i64;
        if elapsed >= timeout_ms {
            break false;
        }
        wake_writer();
        // SAFETY: flush_cv lives in shared memory for the cluster's life; this process is
        // prepared to sleep on it (above).
        unsafe {
            pg_sys::ConditionVariableTimedSleep(
                addr_of_mut!((*sp).flush_cv),
                (timeout_ms - elapsed).min(100),
                WAIT_EVENT,
            )
        };
    };
    // SAFETY: paired with the PrepareToSleep above.
    unsafe { pg_sys::ConditionVariableCancelSleep() };
    ok
}

fn wake_writer() {
    if let Some(s) = shared() {
        let latch = s.writer_latch.load(Ordering::Acquire) as *mut pg_sys::Latch;
        if !latch.is_null() {
            // SAFETY: the latch is the writer's PGPROC latch, in shared memory for the life
            // of the cluster; SetLatch on a latch whose owner exited is harmless.
            unsafe { pg_sys::SetLatch(latch) };
        }
    }
}

/// The writer committed a batch ending at (seq, hash) of the chain it opened in `generation`:
/// for custody.status(), for the next writer of this server run, and for `flush_stored`.
/// Called right after every commit, so that what shared memory remembers is never behind
/// the table. When that chain was dropped meanwhile (its DROP EXTENSION waited for this
/// commit, then committed before this call), nothing is remembered, and `dropped_later`
/// runs under the lock that `forget_committed_head` took: the dropped chain ended here.
pub fn writer_committed(
    generation: u64,
    seq: i64,
    hash: &[u8; 32],
    merkle: &custody_chain::MerkleBuilder,
    dropped_later: impl FnOnce(),
) {
    let Some(s) = shared() else { return };
    let sp = s as *const Shared as *mut Shared;
    let frontier = merkle.frontier();
    // SAFETY: XactLastCommitEnd was set by the commit this process just made; the head is
    // written under the lock. A frontier has one hash per set bit of a u64, at most 64.
    unsafe {
        s.commit_lsn.fetch_max(pg_sys::XactLastCommitEnd, Ordering::AcqRel);
        pg_sys::LWLockAcquire(s.lock, pg_sys::LWLockMode::LW_EXCLUSIVE);
        let now = (*sp).chain_generation;
        if now == generation {
            (*sp).head_hash = *hash;
            (*sp).head_valid = true;
            (*sp).merkle_size = merkle.size();
            (*sp).merkle_len = frontier.len() as u32;
            (&mut (*sp).merkle)[..frontier.len()].copy_from_slice(frontier);
            s.head_seq.store(seq, Ordering::Release);
        } else if now == generation + 1 {
            // Dropped once since: the tombstone written under this lock is that chain's.
            dropped_later();
        }
        pg_sys::LWLockRelease(s.lock);
    }
}

/// A head the writer committed: seq, hash, and the Merkle tree over the records up to it.
pub type CommittedHead = (i64, [u8; 32], Option<custody_chain::MerkleBuilder>);

/// The chain was dropped (DROP EXTENSION with custody.allow_drop, committed): the next writer
/// of this server run remembers no head, like one after a restart without a head file, and
/// the running one remembers none of its chain any more. `then` gets the head forgotten
/// (exact: the last the writer committed) and runs under the lock, so that a writer commit
/// that lands after it is seen by it (`writer_committed`).
pub fn forget_committed_head(then: impl FnOnce(Option<(i64, [u8; 32])>)) {
    let Some(s) = shared() else { return then(None) };
    let sp = s as *const Shared as *mut Shared;
    // SAFETY: the head is read and written under the lock; `then` raises no ERROR (file
    // writes whose failures are warnings), so the lock is always released here.
    unsafe {
        pg_sys::LWLockAcquire(s.lock, pg_sys::LWLockMode::LW_EXCLUSIVE);
        let head = (*sp).head_valid.then(|| (s.head_seq.load(Ordering::Acquire), (*sp).head_hash));
        (*sp).head_valid = false;
        (*sp).chain_generation += 1;
        // The writer's chain is gone; it finds out at its next append.
        let _ = s.state.compare_exchange(ChainState::Ready as u32, ChainState::Unknown as u32, Ordering::AcqRel, Ordering::Acquire);
        then(head);
        pg_sys::LWLockRelease(s.lock);
    }
}

/// Whether the chain opened in `generation` is still the one shared memory follows (not
/// dropped since).
pub fn chain_is_current(generation: u64) -> bool {
    let Some(s) = shared() else { return true };
    let sp = s as *const Shared;
    // SAFETY: read under the lock.
    unsafe {
        pg_sys::LWLockAcquire(s.lock, pg_sys::LWLockMode::LW_SHARED);
        let now = (*sp).chain_generation;
        pg_sys::LWLockRelease(s.lock);
        now == generation
    }
}

/// Flushes WAL up to the writer's last commit: everything it has stored is then on disk
/// (it commits asynchronously). Nothing to do on a standby, which writes no WAL of its own.
pub fn flush_stored() {
    let Some(s) = shared() else { return };
    let lsn = s.commit_lsn.load(Ordering::Acquire);
    // SAFETY: a WAL flush request no further than a commit record that was written.
    unsafe {
        if lsn != 0 && !pg_sys::RecoveryInProgress() {
            pg_sys::XLogFlush(lsn);
        }
    }
}

/// Counts a record that could not be queued; the writer records the gap.
pub fn note_lost() {
    if let Some(s) = shared() {
        s.lost.fetch_add(1, Ordering::AcqRel);
        wake_writer();
    }
}

/// What `custody.status()` shows of the queue.
pub struct Status {
    pub key_status: String,
    pub alarm: String,
    pub archive_error: String,
    pub archived_seq: i64,
    pub last_checkpoint_seq: i64,
    pub capacity: u64,
    pub used: u64,
    pub writer_pid: i32,
    pub state: ChainState,
    pub lost: u64,
    pub head_seq: i64,
    /// The last writer start: records read to resume the chain, and the time it took.
    pub start: Option<(u64, Duration)>,
}

pub fn status() -> Option<Status> {
    let s = shared()?;
    let sp = s as *const Shared;
    // Tail first: both only grow, so head read after it is never behind it.
    let tail = s.tail.load(Ordering::Acquire);
    let used = s.head.load(Ordering::Acquire).saturating_sub(tail);
    // SAFETY: the texts are written under the lock.
    let texts = unsafe {
        pg_sys::LWLockAcquire(s.lock, pg_sys::LWLockMode::LW_SHARED);
        let texts = (*sp).texts.map(|t| String::from_utf8_lossy(&t.bytes[..(t.len as usize).min(256)]).into_owned());
        pg_sys::LWLockRelease(s.lock);
        texts
    };
    let [key_status, alarm, archive_error] = texts;
    Some(Status {
        key_status,
        alarm,
        archive_error,
        archived_seq: s.archived_seq.load(Ordering::Acquire),
        last_checkpoint_seq: s.last_checkpoint_seq.load(Ordering::Acquire),
        capacity: s.capacity,
        used,
        writer_pid: s.writer_pid.load(Ordering::Acquire),
        state: state(),
        lost: s.lost.load(Ordering::Acquire),
        head_seq: s.head_seq.load(Ordering::Acquire),
        start: match s.start_us.load(Ordering::Acquire) {
            0 => None,
            us => Some((s.start_read.load(Ordering::Acquire), Duration::from_micros(us - 1))),
        },
    })
}

// ---- the writer's side ------------------------------------------------------------------

/// The consumer handle; only the custody writer creates one.
pub struct Consumer {
    s: &'static Shared,
}

impl Consumer {
    /// Attaches the calling process (the writer) as the queue's consumer.
    pub fn attach() -> Option<Consumer> {
        let s = shared()?;
        // SAFETY: MyLatch is this process's latch, valid for its lifetime.
        s.writer_latch.store(unsafe { pg_sys::MyLatch } as u64, Ordering::Release);
        // SAFETY: a plain read of a process global set at process start.
        s.writer_pid.store(unsafe { pg_sys::MyProcPid }, Ordering::Release);
        // A chain the writer before this one opened is not open in this one yet: "starting"
        // until it is (a writer about to refuse must not look like one appending).
        let _ = s.state.compare_exchange(ChainState::Ready as u32, ChainState::Unknown as u32, Ordering::AcqRel, Ordering::Acquire);
        Some(Consumer { s })
    }

    pub fn set_state(&self, st: ChainState) {
        self.s.state.store(st as u32, Ordering::Release);
    }

    /// Publishes what this writer's start read and how long it took (custody.status()).
    pub fn set_started(&self, records_read: u64, took: Duration) {
        self.s.start_read.store(records_read, Ordering::Release);
        let us = u64::try_from(took.as_micros()).unwrap_or(u64::MAX - 1);
        self.s.start_us.store(us.saturating_add(1), Ordering::Release);
    }

    pub fn set_last_checkpoint(&self, seq: i64) {
        self.s.last_checkpoint_seq.store(seq, Ordering::Release);
    }

    /// Publishes a status text (truncated to 256 bytes) for custody.status().
    pub fn set_text(&self, which: Text, text: &str) {
        let sp = self.s as *const Shared as *mut Shared;
        let mut n = text.len().min(256);
        while !text.is_char_boundary(n) {
            n -= 1;
        }
        // SAFETY: the status texts are written under the lock and read under it.
        unsafe {
            pg_sys::LWLockAcquire(self.s.lock, pg_sys::LWLockMode::LW_EXCLUSIVE);
            let t = &mut (*sp).texts[which as usize];
            t.bytes[..n].copy_from_slice(&text.as_bytes()[..n]);
            t.len = n as u32;
            pg_sys::LWLockRelease(self.s.lock);
        }
    }

    /// The chain generation (see `writer_committed`) and the head the previous writer of
    /// this server run committed in it, if one did, with the Merkle tree over the records up
    /// to that head.
    pub fn committed_head(&self) -> (u64, Option<CommittedHead>) {
        let sp = self.s as *const Shared;
        // SAFETY: read under the lock; merkle_len was written with the frontier (<= 64).
        unsafe {
            pg_sys::LWLockAcquire(self.s.lock, pg_sys::LWLockMode::LW_SHARED);
            let h = (*sp).head_valid.then(|| {
                let frontier = (&(*sp).merkle)[..((*sp).merkle_len as usize).min(64)].to_vec();
                let merkle = custody_chain::MerkleBuilder::from_frontier((*sp).merkle_size, frontier);
                (self.s.head_seq.load(Ordering::Acquire), (*sp).head_hash, merkle)
            });
            let generation = (*sp).chain_generation;
            pg_sys::LWLockRelease(self.s.lock);
            (generation, h)
        }
    }

    /// Lost records already recorded as gaps, by this writer or one before it.
    pub fn lost_recorded(&self) -> u64 {
        self.s.lost_recorded.load(Ordering::Acquire)
    }

    pub fn set_lost_recorded(&self, n: u64) {
        self.s.lost_recorded.store(n, Ordering::Release);
    }

    pub fn set_archived_seq(&self, seq: i64) {
        self.s.archived_seq.store(seq, Ordering::Release);
    }

    pub fn lost(&self) -> u64 {
        self.s.lost.load(Ordering::Acquire)
    }

    /// Copies out up to `max_records` published records from the durable position on, without
    /// consuming them; stops at the first one not published yet. Returns the position after
    /// the last one copied.
    pub fn peek(&self, max_records: usize, max_bytes: usize, out: &mut Records) -> u64 {
        let sp = self.s as *const Shared;
        let head = self.s.head.load(Ordering::Acquire);
        let mut pos = self.s.tail.load(Ordering::Acquire);
        let mut bytes = 0usize;
        // SAFETY: pos is a slot boundary in [tail, head); a published record's bytes are not
        // written again until this consumer advances tail past them.
        unsafe {
            while pos < head && out.len() < max_records && bytes < max_bytes {
                let word = len_word(sp, pos).load(Ordering::Acquire);
                if word == 0 {
                    break;
                }
                let len = (word - 1) as usize;
                copy_out(sp, pos + 4, len, &mut out.bytes);
                out.ends.push(out.bytes.len());
                pos += slot_len(len);
                bytes += len;
            }
        }
        pos
    }

    /// Whether a session is waiting for records not stored yet.
    pub fn has_waiters(&self) -> bool {
        self.s.wanted.load(Ordering::SeqCst) > self.s.flushed.load(Ordering::Acquire)
    }

    /// Pushes reaching `pos` wake the writer; 0 makes every push wake it.
    pub fn set_wake_at(&self, pos: u64) {
        self.s.wake_at.store(pos, Ordering::SeqCst);
    }

    /// Whether a record is queued and published. Call after `set_wake_at(0)`: a push that
    /// this misses sees the new wake position and wakes the writer (both sides store, then
    /// load, in SeqCst order).
    pub fn pending(&self) -> bool {
        let tail = self.s.tail.load(Ordering::Acquire);
        // The word at tail is 0 unless a record there is published (the bytes from tail on
        // are zero until a push publishes them), so it alone says it, whatever head is.
        // SAFETY: tail is a slot boundary (only the consumer moves it, to slot boundaries).
        unsafe { len_word(self.s, tail) }.load(Ordering::SeqCst) != 0
    }

    /// Marks everything before `pos` (the end of records `peek` returned) as committed to the
    /// audit log, frees the space and wakes waiters.
    pub fn advance(&self, pos: u64) {
        let sp = self.s as *const Shared as *mut Shared;
        // SAFETY: only the consumer moves tail, under the lock; [tail, pos) are published
        // records it has consumed, zeroed before the space is given back.
        unsafe {
            pg_sys::LWLockAcquire(self.s.lock, pg_sys::LWLockMode::LW_EXCLUSIVE);
            let tail = self.s.tail.load(Ordering::Acquire);
            if pos > tail {
                zero(sp, tail, pos);
                self.s.tail.store(pos, Ordering::Release);
            }
            pg_sys::LWLockRelease(self.s.lock);
            self.s.flushed.fetch_max(pos, Ordering::AcqRel);
            pg_sys::ConditionVariableBroadcast(addr_of_mut!((*sp).space_cv));
            pg_sys::ConditionVariableBroadcast(addr_of_mut!((*sp).flush_cv));
        }
    }

    /// Waits until every record reserved before `to` (a value head had) is published, at most
    /// `timeout`; false if one is not by then.
    pub fn wait_published(&self, to: u64, timeout: std::time::Duration) -> bool {
        let deadline = std::time::Instant::now() + timeout;
        let mut pos = self.s.tail.load(Ordering::Acquire);
        while pos < to {
            // SAFETY: pos is a slot boundary at or after tail: whole slots from tail on.
            match unsafe { len_word(self.s, pos) }.load(Ordering::Acquire) {
                0 if std::time::Instant::now() >= deadline => return false,
                0 => std::thread::sleep(std::time::Duration::from_micros(10)),
                word => pos += slot_len((word - 1) as usize),
            }
        }
        true
    }

    /// Where the head is now: records reserved before it (`wait_published`).
    pub fn reserved(&self) -> u64 {
        self.s.head.load(Ordering::Acquire)
    }

    /// Taken before the writer looks for the log: what `absent` may discard.
    pub fn mark(&self) -> AbsentMark {
        let sp = self.s as *const Shared;
        // SAFETY: the count is read under the lock it is written under.
        unsafe {
            pg_sys::LWLockAcquire(self.s.lock, pg_sys::LWLockMode::LW_SHARED);
            let m = AbsentMark { seen: (*sp).extension_seen, head: self.s.head.load(Ordering::Acquire) };
            pg_sys::LWLockRelease(self.s.lock);
            m
        }
    }

    /// The writer found no audit log in a snapshot taken after `mark`: nothing to record, and
    /// what was queued before it is dropped. Unless a commit showed the extension there
    /// meanwhile (its snapshot came too early): then nothing changes and the writer looks again.
    pub fn absent(&self, mark: AbsentMark) {
        let sp = self.s as *const Shared as *mut Shared;
        // Records reserved before the mark are published within microseconds (a push copies
        // and publishes with nothing in between); only this consumer moves tail, so the wait
        // needs no lock. One that is not published in time: nothing changes, look again.
        if !self.wait_published(mark.head, std::time::Duration::from_secs(1)) {
            return;
        }
        // SAFETY: the state, the count and tail are changed under the lock (as in `advance`);
        // [tail, mark.head) are whole records reserved before the mark, zeroed once each is
        // published (a push publishes right after it copies, without waiting for anything).
        unsafe {
            pg_sys::LWLockAcquire(self.s.lock, pg_sys::LWLockMode::LW_EXCLUSIVE);
            let still = (*sp).extension_seen == mark.seen;
            let tail = self.s.tail.load(Ordering::Acquire);
            let moved = still && mark.head > tail;
            if still {
                self.s.state.store(ChainState::Absent as u32, Ordering::Release);
            }
            if moved {
                zero(sp, tail, mark.head);
                self.s.tail.store(mark.head, Ordering::Release);
                self.s.flushed.fetch_max(mark.head, Ordering::AcqRel);
            }
            pg_sys::LWLockRelease(self.s.lock);
            if moved {
                pg_sys::ConditionVariableBroadcast(addr_of_mut!((*sp).space_cv));
                pg_sys::ConditionVariableBroadcast(addr_of_mut!((*sp).flush_cv));
            }
        }
    }
}

/// The queue as the writer found it before looking for the log (`Consumer::mark`).
#[derive(Clone, Copy)]
pub struct AbsentMark {
    seen: u64,
    head: u64,
}

impl Drop for Consumer {
    fn drop(&mut self) {
        self.s.writer_latch.store(0, Ordering::Release);
        self.s.writer_pid.store(0, Ordering::Release);
    }
}
