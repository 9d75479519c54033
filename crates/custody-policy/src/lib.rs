//! pg_custody's authorization engine, free of PostgreSQL: Rego policies
//! evaluated in process by regorus, role attributes that expire, suspensions,
//! and the gate every statement passes.
//!
//! The extension publishes a [`Snapshot`] of the store through shared memory;
//! each backend builds a [`Gate`] from it once per generation and asks it
//! about every statement ([`Gate::decide`]) and row ([`Gate::row_allow`]).

mod compile;
mod gate;
mod input;
mod snapshot;
mod split;
pub mod time;

pub use compile::{compile_check, CompileError, PACKAGE};
pub use gate::{Decision, Gate};
pub use input::{StatementInput, SubjectInput};
pub use snapshot::{Attribute, PolicySource, Snapshot, Suspension};

#[cfg(test)]
mod tests;
