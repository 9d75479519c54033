//! The standby worker: on a hot standby, where no custody writer runs, it publishes the policy
//! store as WAL replay brings it (the store's tables are replicated), so that statements there
//! pass the same gate as on the primary, and a policy change, a suspension or an expired
//! attribute applies to a standby's open sessions too. It ends when recovery ends: the writer
//! of the promoted server takes over. Statements run on a standby are not recorded yet
//! (docs/operations.md, "Replicas").

use std::time::Duration;

use pgrx::bgworkers::{BackgroundWorker, BackgroundWorkerBuilder, SignalWakeFlags};
use pgrx::prelude::*;
use pgrx::pg_sys;

use crate::protect::Table;
use crate::queue::ChainState;
use crate::{own, settings};

/// How often the replicated store is read again.
const POLL: Duration = Duration::from_millis(200);

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
        if !BackgroundWorker::wait_latch(Some(POLL)) {
            break;
        }
    }
    // Recovery ended: done (the writer takes over). Otherwise terminated: exit code 1, so the
    // postmaster starts another (at server shutdown it starts none).
    // SAFETY: as above.
    let code = if unsafe { pg_sys::RecoveryInProgress() } { 1 } else { 0 };
    // SAFETY: the documented way for a background worker to end.
    unsafe { pg_sys::proc_exit(code) };
}
