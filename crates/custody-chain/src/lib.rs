//! The pg_custody audit chain format: one implementation shared by the
//! extension (writer, in-database verifier) and the `custody` command-line
//! verifier. Pure Rust: no `pg_sys`, no pgrx. The format is specified in
//! `docs/chain-format.md`; golden vectors there are pinned by tests here.

pub mod columns;
pub mod export;
pub mod hex;
pub mod merkle;
pub mod note;
pub mod record;
pub mod verify;

/// A SHA-256 digest.
pub type Hash = [u8; 32];

/// Version of the record encoding, written as the byte after the domain
/// prefix. Bump it (and keep the old encoder) for any change to the encoding.
pub const FORMAT_VERSION: u8 = 1;

pub use columns::{Column, ColumnDef, SqlType, COLUMNS};
pub use export::{verify_export, Digest, ExportError, ExportLine, FailureClass, Report};
pub use merkle::{merkle_root, MerkleBuilder};
pub use note::{
    checkpoint_body, checkpoint_origin, generate_key, key_id, open_note, parse_private_key,
    parse_verifier_key, sign_note, verify_note, KeyError, NoteError, PrivateKey, VerifierKey,
};
pub use record::{canonical_json, genesis_hash, write_canonical_json, Json, Record};
pub use verify::{alarm_of, lineage_of, ChainId, ChainVerifier, Failure, FailureKind, Lineage, CHAIN_HANDOVER, HEAD_MISMATCH, WRITER_START};
