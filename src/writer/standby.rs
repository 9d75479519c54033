//! The standby worker: on a hot standby, where no custody writer runs, it
//! - publishes the policy store as WAL replay brings it (the store's tables are replicated),
//!   so that statements there pass the same gate as on the primary, and a policy change, a
//!   suspension or an expired attribute applies to a standby's open sessions too;
//! - takes the records of the standby's statements from its queue and ships them to the
//!   primary (`primary_conninfo`), whose writer stores them in the one chain; they leave the
//!   queue only once the primary has stored them. While the primary cannot be reached they
//!   wait in the queue, and custody.on_failure decides when it is full.
//!
//! It ends when recovery ends: the writer of the promoted server takes over the queue and
//! the store (docs/operations.md, "Replicas").

use std::time::Duration;

use pgrx::bgworkers::{BackgroundWorker, BackgroundWorkerBuilder, SignalWakeFlags};
use pgrx::prelude::*;
use pgrx::pg_sys;

use super::spool;
use crate::protect::Table;
use crate::queue::ChainState;
use crate::{own, settings};

/// How often the replicated store is read again.
const POLL: Duration = Duration::from_millis(200);
/// Records and bytes shipped in one call (the call's text carries them in hex).
const SHIP_RECORDS: usize = 5000;
const SHIP_BYTES: usize = 1 << 20;
/// After a failed call or connection: wait this long before trying again.
const RETRY: Duration = Duration::from_secs(1);

/// The connection to the primary, made when there is something to ship.
struct Shipper {
    conn: *mut pg_sys::WalReceiverConn,
    retry_at: Option<std::time::Instant>,
}

impl Shipper {
    /// Ships `batch` (queue payloads) and the count of records sessions here could not queue
    /// since the last call; Ok once the primary has stored them.
    fn ship(&mut self, batch: &crate::queue::Records, lost: u64) -> Result<(), String> {
        if self.conn.is_null() {
            // SAFETY: PrimaryConnInfo is the primary_conninfo GUC's string (NULL or
            // NUL-terminated), read in this process.
            let primary = unsafe {
                if pg_sys::PrimaryConnInfo.is_null() { String::new() } else { std::ffi::CStr::from_ptr(pg_sys::PrimaryConnInfo).to_string_lossy().into_owned() }
            };
            if primary.trim().is_empty() {
                return Err("primary_conninfo is not set".into());
            }
            // The primary's custody.database, whatever primary_conninfo names (later keywords
            // win); timeouts and keepalives that primary_conninfo may override (earlier ones
            // lose), so that a primary gone silent cannot hold this worker for ever.
            let db = settings::database();
            let primary = primary.trim();
            let conninfo = if primary.starts_with("postgresql://") || primary.starts_with("postgres://") {
                let enc: String = db.bytes().map(|b| if b.is_ascii_alphanumeric() { (b as char).to_string() } else { format!("%{b:02X}") }).collect();
                format!("{primary}{}dbname={enc}", if primary.contains('?') { '&' } else { '?' })
            } else {
                let dbname = db.replace('\\', "\\\\").replace('\'', "\\'");
                format!(
                    "connect_timeout=10 keepalives=1 keepalives_idle=10 keepalives_interval=5 keepalives_count=3 \
                     tcp_user_timeout=30000 {primary} dbname='{dbname}'"
                )
            };
            let conninfo = std::ffi::CString::new(conninfo).map_err(|e| e.to_string())?;
            // SAFETY: connected to a database (connect_worker_to_spi), not in a critical section.
            self.conn = unsafe { crate::pgver::walrcv_connect(&conninfo, c"pg_custody standby")? };
        }
        let mut bytes = Vec::with_capacity(batch.iter().map(|b| b.len() + 4).sum());
        for b in batch.iter() {
            bytes.extend_from_slice(&(b.len() as u32).to_le_bytes());
            bytes.extend_from_slice(b);
        }
        let sql = std::ffi::CString::new(format!(
            "SELECT custody.standby_records(pg_catalog.decode('{}', 'hex'), {lost})::pg_catalog.text",
            custody_chain::hex::encode(&bytes)
        ))
        .map_err(|e| e.to_string())?;
        let conn = self.conn;
        // SAFETY: a live connection; the result is freed inside the transaction.
        BackgroundWorker::transaction(|| unsafe { crate::pgver::walrcv_exec(conn, &sql) })
    }

    fn close(&mut self) {
        if !self.conn.is_null() {
            // SAFETY: the live connection, not used afterwards.
            unsafe { crate::pgver::walrcv_disconnect(self.conn) };
            self.conn = std::ptr::null_mut();
        }
    }
}

pub fn init() {
    BackgroundWorkerBuilder::new("pg_custody standby")
        .set_type("pg_custody standby")
        .set_function("custody_standby_main")
        .set_library("pg_custody")
        .enable_spi_access()
        .set_start_time(pgrx::bgworkers::BgWorkerStartTime::ConsistentState)
        .set_restart_time(Some(Duration::from_secs(1)))
        .load();
}

/// Moves what the queue holds into the spool (durable on the standby), as far as it takes it.
fn spool_queue(queue: &crate::queue::Consumer, batch: &mut crate::queue::Records) {
    loop {
        // SAFETY: a plain check of the server's state (promoted: the writer's queue now).
        if !unsafe { pg_sys::RecoveryInProgress() } {
            return;
        }
        batch.clear();
        let end = queue.peek(SHIP_RECORDS, SHIP_BYTES, batch);
        if batch.is_empty() {
            queue.set_wake_at(0);
            return;
        }
        match spool::append(batch) {
            Ok(()) => queue.advance(end),
            Err(e) => {
                queue.set_text(crate::queue::Text::Alarm, &format!("standby: cannot ship records to the primary, nor keep more: {e}"));
                return;
            }
        }
    }
}

#[pg_guard]
#[unsafe(no_mangle)]
pub extern "C-unwind" fn custody_standby_main(_arg: pg_sys::Datum) {
    BackgroundWorker::attach_signal_handlers(SignalWakeFlags::SIGHUP | SignalWakeFlags::SIGTERM);
    // SAFETY: a plain check of the server's state.
    if !unsafe { pg_sys::RecoveryInProgress() } {
        // A primary (or a standby promoted meanwhile): the writer publishes. Exit code 0: the
        // postmaster does not start this worker again.
        // SAFETY: the documented way for a background worker to end.
        unsafe { pg_sys::proc_exit(0) };
    }
    own::set_writer();
    BackgroundWorker::connect_worker_to_spi(Some(settings::database()), None);
    // Shipping before attaching: a writer of a promoted server waits for this process to end
    // before it attaches itself, so the two never consume at once.
    // SAFETY: a plain read of this process's pid.
    crate::queue::set_shipping(unsafe { pg_sys::MyProcPid });
    let Some(queue) = crate::queue::Consumer::attach() else { return };
    if let Err(e) = spool::recover() {
        warning!("pg_custody standby: its spool: {e}");
    }
    let mut shipper = Shipper { conn: std::ptr::null_mut(), retry_at: None };
    let mut batch = crate::queue::Records::default();
    let mut last: Option<custody_policy::Snapshot> = None;
    loop {
        // SAFETY: as above.
        if !unsafe { pg_sys::RecoveryInProgress() } {
            break;
        }
        if BackgroundWorker::sighup_received() {
            // SAFETY: re-reading postgresql.conf in this process, as every worker does.
            unsafe { pg_sys::ProcessConfigFile(pg_sys::GucContext::PGC_SIGHUP) };
        }
        let snap = BackgroundWorker::transaction(|| {
            let here = crate::protect::ids().map(|i| i.table(Table::PolicyStore)).unwrap_or(pg_sys::InvalidOid);
            (here != pg_sys::InvalidOid).then(crate::policy::store::load_snapshot)
        });
        match snap {
            None => crate::queue::set_chain_state(ChainState::Absent),
            Some(s) if last.as_ref() != Some(&s) => {
                // Replay applies changes in the primary's commit order, and this worker is the
                // only publisher while recovery lasts: the newest state read is the newest.
                // SAFETY: as above; checked again right before publishing, so that the
                // promoted server's writer is never followed by an older state from here.
                if !unsafe { pg_sys::RecoveryInProgress() } {
                    break;
                }
                if !crate::policy::publish(&s) {
                    warning!("pg_custody standby: the policy store does not fit in shared memory; gated statements are denied until it does");
                }
                if crate::queue::state() == ChainState::Absent {
                    crate::queue::set_chain_state(ChainState::Unknown);
                }
                last = Some(s);
            }
            Some(_) => {}
        }
        // Records of this standby's statements, to the primary: those kept in the spool first
        // (they are older), then the queue's. What cannot be shipped goes to the spool, so it
        // survives a standby restart; beyond the spool's size it waits in the queue.
        loop {
            let retrying = shipper.retry_at.is_some_and(|t| std::time::Instant::now() < t);
            batch.clear();
            let from_spool = spool::pending();
            let (end, lost) = if from_spool {
                if retrying {
                    // Behind the spool: the queue's records follow it there, in order.
                    spool_queue(&queue, &mut batch);
                    break;
                }
                match spool::next(SHIP_BYTES) {
                    Ok((b, pos)) => {
                        batch = b;
                        (pos, 0)
                    }
                    Err(e) => {
                        warning!("pg_custody standby: cannot read its spool: {e}");
                        break;
                    }
                }
            } else {
                let end = queue.peek(SHIP_RECORDS, SHIP_BYTES, &mut batch);
                (end, queue.lost().saturating_sub(queue.lost_recorded()))
            };
            if batch.is_empty() && lost == 0 {
                if from_spool {
                    // Only a record cut short by a crash while it was kept is left: drop it.
                    let _ = spool::shipped_to(u64::MAX);
                    continue;
                }
                queue.set_wake_at(0);
                break;
            }
            if retrying {
                spool_queue(&queue, &mut batch);
                break;
            }
            let shipped = shipper.ship(&batch, lost);
            // SAFETY: a plain check of the server's state. Promoted meanwhile: the writer
            // owns the queue and the spool now (it waits for this worker to end).
            if !unsafe { pg_sys::RecoveryInProgress() } {
                break;
            }
            match shipped {
                Ok(()) => {
                    if from_spool {
                        if let Err(e) = spool::shipped_to(end) {
                            // Not noted: shipping the same records again and again would
                            // follow; wait, and try again.
                            warning!("pg_custody standby: cannot note what it shipped from its spool: {e}");
                            shipper.retry_at = Some(std::time::Instant::now() + RETRY);
                            break;
                        }
                    } else {
                        queue.advance(end);
                        queue.set_lost_recorded(queue.lost_recorded() + lost);
                    }
                    queue.set_text(crate::queue::Text::Alarm, "");
                    shipper.retry_at = None;
                }
                Err(e) => {
                    let why = format!("standby: cannot ship records to the primary (kept on the standby): {e}");
                    if shipper.retry_at.is_none() {
                        warning!("pg_custody {why}");
                    }
                    queue.set_text(crate::queue::Text::Alarm, &why);
                    shipper.close();
                    shipper.retry_at = Some(std::time::Instant::now() + RETRY);
                    if !from_spool {
                        spool_queue(&queue, &mut batch);
                    }
                    break;
                }
            }
        }
        if !BackgroundWorker::wait_latch(Some(POLL)) {
            break;
        }
    }
    shipper.close();
    crate::queue::set_shipping(0);
    // Recovery ended: done (the writer takes over). Otherwise terminated: exit code 1, so the
    // postmaster starts another (at server shutdown it starts none).
    // SAFETY: as above.
    let code = if unsafe { pg_sys::RecoveryInProgress() } { 1 } else { 0 };
    // SAFETY: the documented way for a background worker to end.
    unsafe { pg_sys::proc_exit(code) };
}
