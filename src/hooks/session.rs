//! The client-authentication hook: PostgreSQL calls it once a connection's credentials were
//! checked (whatever the outcome); capture records the login (capture::session).

use pgrx::pg_sys;

use crate::capture;

type ClientAuthenticationHook = Option<unsafe extern "C-unwind" fn(*mut pg_sys::Port, std::ffi::c_int)>;

extern "C" {
    // libpq/auth.h, which pgrx does not bind.
    static mut ClientAuthentication_hook: ClientAuthenticationHook;
}

static mut PREV_CLIENT_AUTH: ClientAuthenticationHook = None;

pub fn init() {
    // SAFETY: _PG_init; the previous hook is saved and chained to.
    unsafe {
        PREV_CLIENT_AUTH = ClientAuthentication_hook;
        ClientAuthentication_hook = Some(custody_client_authentication);
    }
}

/// ClientAuthentication_hook. A plain frame: an ERROR (FATAL) of the previous hook passes
/// through.
///
/// # Safety
/// Called only by PostgreSQL, as ClientAuthentication_hook.
unsafe extern "C-unwind" fn custody_client_authentication(port: *mut pg_sys::Port, status: std::ffi::c_int) {
    // SAFETY: PREV_CLIENT_AUTH is written only in _PG_init (postmaster, before any fork);
    // it is called with the Port and status PostgreSQL passed to us, unchanged.
    unsafe {
        if let Some(prev) = PREV_CLIENT_AUTH {
            prev(port, status);
        }
    }
    // Success is known when the startup transaction commits, failure from the FATAL that
    // follows (capture::session); here the connection starts to count as a login.
    super::guarded(capture::session::authenticating);
}
