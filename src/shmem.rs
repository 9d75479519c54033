//! Shared memory: one request hook and one startup hook for all of pg_custody's shared
//! state — the record queue (`queue`) and the published policy snapshot (`policy`).

use pgrx::pg_sys;

use crate::{policy, queue};

static mut PREV_SHMEM_REQUEST: pg_sys::shmem_request_hook_type = None;
static mut PREV_SHMEM_STARTUP: pg_sys::shmem_startup_hook_type = None;

/// Installs the hooks. Called from `_PG_init` (preload only).
pub fn init() {
    // SAFETY: _PG_init runs once in the postmaster; the previous hooks are chained.
    unsafe {
        PREV_SHMEM_REQUEST = pg_sys::shmem_request_hook;
        pg_sys::shmem_request_hook = Some(shmem_request);
        PREV_SHMEM_STARTUP = pg_sys::shmem_startup_hook;
        pg_sys::shmem_startup_hook = Some(shmem_startup);
    }
}

/// shmem_request_hook.
///
/// # Safety
/// Called only by PostgreSQL, as shmem_request_hook.
#[pgrx::pg_guard]
unsafe extern "C-unwind" fn shmem_request() {
    // SAFETY: called by the postmaster while it sizes shared memory.
    unsafe {
        if let Some(prev) = PREV_SHMEM_REQUEST {
            prev();
        }
        pg_sys::RequestAddinShmemSpace(queue::shmem_size());
        pg_sys::RequestNamedLWLockTranche(queue::TRANCHE.as_ptr(), 1);
        pg_sys::RequestAddinShmemSpace(policy::shmem_size());
        pg_sys::RequestNamedLWLockTranche(policy::TRANCHE.as_ptr(), 1);
    }
}

/// shmem_startup_hook.
///
/// # Safety
/// Called only by PostgreSQL, as shmem_startup_hook.
#[pgrx::pg_guard]
unsafe extern "C-unwind" fn shmem_startup() {
    // SAFETY: called in the postmaster (and after a crash reset); AddinShmemInitLock
    // serializes the creation of add-in structures.
    unsafe {
        if let Some(prev) = PREV_SHMEM_STARTUP {
            prev();
        }
        let init_lock = addin_shmem_init_lock();
        pg_sys::LWLockAcquire(init_lock, pg_sys::LWLockMode::LW_EXCLUSIVE);
        queue::attach_shmem();
        policy::attach_shmem();
        pg_sys::LWLockRelease(init_lock);
    }
}

/// `AddinShmemInitLock` is a C macro: `&MainLWLockArray[21].lock` (storage/lwlocknames.h).
///
/// # Safety
/// After shared memory is created (MainLWLockArray is set), as in shmem_startup_hook.
unsafe fn addin_shmem_init_lock() -> *mut pg_sys::LWLock {
    // SAFETY: MainLWLockArray points to the main LWLock array once shared memory exists (our
    // contract); it holds NUM_FIXED_LWLOCKS entries, far more than 22. Only an address is
    // computed, nothing is read.
    unsafe { std::ptr::addr_of_mut!((*pg_sys::MainLWLockArray.add(21)).lock) }
}
