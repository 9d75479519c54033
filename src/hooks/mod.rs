//! The hooks pg_custody installs: each saves the previous hook and always chains to it
//! (or to PostgreSQL's standard function), so pg_custody composes with other extensions.
//!
//! On the per-statement path the hooks do only what capture needs; a PostgreSQL ERROR raised
//! inside the standard functions passes through them untouched (the records of failed
//! statements are closed by the abort callbacks in `xact`), so error details, positions and
//! context lines reach the client exactly as PostgreSQL reported them.

pub mod executor;
mod object_access;
mod session;
mod utility;
mod xact;

pub fn init() {
    executor::init();
    object_access::init();
    session::init();
    utility::init();
    xact::init();
}
