//! C2SP signed notes (c2sp.org/signed-note) carrying tlog checkpoints
//! (c2sp.org/tlog-checkpoint), with Ed25519 keys in the text formats of Go's
//! golang.org/x/mod/sumdb/note, so Go tooling and witnesses interoperate.

use std::fmt;
use std::io::Read as _;

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;
use ed25519_dalek::{Signature, Signer as _, SigningKey, VerifyingKey};
use sha2::{Digest as _, Sha256};

use crate::Hash;

/// Algorithm byte of Ed25519 keys in note key encodings.
const ALG_ED25519: u8 = 0x01;

/// Errors about key text or key generation.
#[derive(Debug)]
pub enum KeyError {
    /// Name is empty or contains '+' or whitespace.
    InvalidName(String),
    /// The text is not a key of the expected form; says which part.
    Malformed(String),
    /// The 8-hex-digit key hash does not match the name and key.
    KeyHashMismatch,
    /// Reading /dev/urandom failed.
    Io(std::io::Error),
}

impl fmt::Display for KeyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            KeyError::InvalidName(n) => write!(f, "invalid key name {n:?}: must be non-empty, without '+' or whitespace"),
            KeyError::Malformed(why) => write!(f, "malformed key: {why}"),
            KeyError::KeyHashMismatch => f.write_str("malformed key: key hash does not match name and key (corrupted or hand-edited key?)"),
            KeyError::Io(e) => write!(f, "cannot read /dev/urandom: {e}"),
        }
    }
}

impl std::error::Error for KeyError {}

/// Errors opening a signed note.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NoteError {
    /// Not a signed note / checkpoint of the expected form.
    Malformed(String),
    /// No signature line by the given key (name + key hash): the note was
    /// signed by another key, i.e. the wrong public key was supplied.
    UnknownKey,
    /// A signature line by the given key exists but does not verify: the
    /// note text (or the signature) was altered.
    BadSignature,
}

impl fmt::Display for NoteError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            NoteError::Malformed(why) => write!(f, "malformed signed note: {why}"),
            NoteError::UnknownKey => f.write_str("no signature by this key: the note is signed by another key (wrong public key?)"),
            NoteError::BadSignature => f.write_str("invalid signature: the note was altered after signing"),
        }
    }
}

impl std::error::Error for NoteError {}

/// A signing key with its name.
pub struct PrivateKey {
    name: String,
    key: SigningKey,
}

/// A verifier (public) key with its name.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VerifierKey {
    name: String,
    key: VerifyingKey,
}

fn check_name(name: &str) -> Result<(), KeyError> {
    if name.is_empty() || name.contains('+') || name.chars().any(char::is_whitespace) {
        return Err(KeyError::InvalidName(name.to_string()));
    }
    Ok(())
}

/// Key ID: first 4 bytes of SHA-256(name || "\n" || 0x01 || public key).
pub fn key_id(name: &str, public_key: &[u8; 32]) -> [u8; 4] {
    let mut h = Sha256::new();
    h.update(name.as_bytes());
    h.update(b"\n");
    h.update([ALG_ED25519]);
    h.update(public_key);
    let d = h.finalize();
    [d[0], d[1], d[2], d[3]]
}

fn encode_key(material: &[u8; 32]) -> String {
    let mut b = [0u8; 33];
    b[0] = ALG_ED25519;
    b[1..].copy_from_slice(material);
    B64.encode(b)
}

/// Split "name+hash8+base64" and decode; shared by both key kinds.
fn split_key(text: &str) -> Result<(&str, [u8; 4], [u8; 32]), KeyError> {
    let text = text.trim();
    let mut parts = text.splitn(3, '+');
    let (name, hash, b64) = match (parts.next(), parts.next(), parts.next()) {
        (Some(n), Some(h), Some(k)) => (n, h, k),
        _ => return Err(KeyError::Malformed("expected <name>+<key hash>+<base64 key>".into())),
    };
    check_name(name)?;
    let id: [u8; 4] = match crate::hex::decode(hash) {
        Ok(v) if hash.len() == 8 => v.try_into().expect("8 hex digits"),
        _ => return Err(KeyError::Malformed(format!("key hash {hash:?} is not 8 hex digits"))),
    };
    let raw = B64
        .decode(b64)
        .map_err(|e| KeyError::Malformed(format!("key material is not base64: {e}")))?;
    if raw.len() != 33 || raw[0] != ALG_ED25519 {
        return Err(KeyError::Malformed("key material is not an Ed25519 key (0x01 + 32 bytes)".into()));
    }
    Ok((name, id, raw[1..].try_into().expect("32 bytes")))
}

/// Parse "PRIVATE+KEY+<name>+<key hash>+<base64(0x01 || seed)>".
pub fn parse_private_key(text: &str) -> Result<PrivateKey, KeyError> {
    let rest = text
        .trim()
        .strip_prefix("PRIVATE+KEY+")
        .ok_or_else(|| KeyError::Malformed("a private key starts with PRIVATE+KEY+".into()))?;
    let (name, id, seed) = split_key(rest)?;
    let k = PrivateKey::from_seed(name, &seed)?;
    if k.key_id() != id {
        return Err(KeyError::KeyHashMismatch);
    }
    Ok(k)
}

/// Parse "<name>+<key hash>+<base64(0x01 || public key)>".
pub fn parse_verifier_key(text: &str) -> Result<VerifierKey, KeyError> {
    if text.trim().starts_with("PRIVATE+KEY+") {
        return Err(KeyError::Malformed("this is a private key; give the verifier (public) key".into()));
    }
    let (name, id, pk) = split_key(text)?;
    let key = VerifyingKey::from_bytes(&pk)
        .map_err(|_| KeyError::Malformed("not a valid Ed25519 public key".into()))?;
    if key_id(name, &pk) != id {
        return Err(KeyError::KeyHashMismatch);
    }
    Ok(VerifierKey { name: name.to_string(), key })
}

/// A new key pair from 32 bytes of /dev/urandom:
/// (private key text, verifier key text).
pub fn generate_key(name: &str) -> Result<(String, String), KeyError> {
    check_name(name)?;
    let mut seed = [0u8; 32];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut seed))
        .map_err(KeyError::Io)?;
    let k = PrivateKey::from_seed(name, &seed)?;
    seed.fill(0);
    Ok((k.to_text(), k.verifier().to_text()))
}

impl PrivateKey {
    /// Key from a 32-byte Ed25519 seed.
    pub fn from_seed(name: &str, seed: &[u8; 32]) -> Result<Self, KeyError> {
        check_name(name)?;
        Ok(PrivateKey { name: name.to_string(), key: SigningKey::from_bytes(seed) })
    }
    pub fn name(&self) -> &str {
        &self.name
    }
    pub fn key_id(&self) -> [u8; 4] {
        key_id(&self.name, self.key.verifying_key().as_bytes())
    }
    pub fn verifier(&self) -> VerifierKey {
        VerifierKey { name: self.name.clone(), key: self.key.verifying_key() }
    }
    /// "PRIVATE+KEY+<name>+<key hash>+<base64>".
    pub fn to_text(&self) -> String {
        format!(
            "PRIVATE+KEY+{}+{}+{}",
            self.name,
            crate::hex::encode(&self.key_id()),
            encode_key(self.key.as_bytes())
        )
    }
    /// Raw 64-byte Ed25519 signature of `msg`.
    pub fn sign_bytes(&self, msg: &[u8]) -> [u8; 64] {
        self.key.sign(msg).to_bytes()
    }
}

impl fmt::Debug for PrivateKey {
    // Never print key material.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PrivateKey({}+{})", self.name, crate::hex::encode(&self.key_id()))
    }
}

impl VerifierKey {
    pub fn name(&self) -> &str {
        &self.name
    }
    pub fn key_id(&self) -> [u8; 4] {
        key_id(&self.name, self.key.as_bytes())
    }
    /// "<name>+<key hash>+<base64>".
    pub fn to_text(&self) -> String {
        format!("{}+{}+{}", self.name, crate::hex::encode(&self.key_id()), encode_key(self.key.as_bytes()))
    }
    /// Verify a raw 64-byte Ed25519 signature (strict: rejects malleable
    /// and small-order forms).
    pub fn verify_bytes(&self, msg: &[u8], sig: &[u8]) -> bool {
        match Signature::from_slice(sig) {
            Ok(s) => self.key.verify_strict(msg, &s).is_ok(),
            Err(_) => false,
        }
    }
}

/// The checkpoint origin pg_custody uses for one chain:
/// "pg_custody/<system_identifier>/<database_oid>".
pub fn checkpoint_origin(system_identifier: u64, database_oid: u32) -> String {
    format!("pg_custody/{system_identifier}/{database_oid}")
}

/// The cluster and database a checkpoint origin names (`checkpoint_origin` read back), if
/// it is one of pg_custody's.
pub fn parse_origin(origin: &str) -> Option<(u64, u32)> {
    let (sys, db) = origin.strip_prefix("pg_custody/")?.split_once('/')?;
    Some((sys.parse().ok()?, db.parse().ok()?))
}

/// The genesis hash of the chain a checkpoint origin names, if it is one of pg_custody's.
pub fn origin_genesis(origin: &str) -> Option<crate::Hash> {
    parse_origin(origin).map(|(sys, db)| crate::record::genesis_hash(sys, db))
}

/// Checkpoint body: "<origin>\n<tree size>\n<base64 root hash>\n".
pub fn checkpoint_body(origin: &str, size: u64, root: &Hash) -> String {
    format!("{origin}\n{size}\n{}\n", B64.encode(root))
}

/// Note text rules of the signed-note spec: UTF-8, ends in a newline, no
/// control characters other than newline.
fn check_text(text: &str) -> Result<(), NoteError> {
    if !text.ends_with('\n') {
        return Err(NoteError::Malformed("note text must end with a newline".into()));
    }
    if text.chars().any(|c| c.is_control() && c != '\n') {
        return Err(NoteError::Malformed("note text contains control characters".into()));
    }
    Ok(())
}

/// Sign `body` (the note text): body + "\n" + "— <name> <base64(key id ||
/// signature)>\n". Ed25519 is deterministic, so the output is too.
pub fn sign_note(body: &str, key: &PrivateKey) -> Result<String, NoteError> {
    check_text(body)?;
    if body.contains("\n\n") {
        return Err(NoteError::Malformed("note text must not contain a blank line".into()));
    }
    let mut blob = Vec::with_capacity(68);
    blob.extend_from_slice(&key.key_id());
    blob.extend_from_slice(&key.sign_bytes(body.as_bytes()));
    Ok(format!("{body}\n\u{2014} {} {}\n", key.name, B64.encode(blob)))
}

/// Open a signed note with `verifier`: the note text if it carries a valid
/// signature by that key. Other signatures (e.g. witnesses) are ignored.
pub fn open_note<'a>(note: &'a str, verifier: &VerifierKey) -> Result<&'a str, NoteError> {
    let split = note
        .rfind("\n\n")
        .ok_or_else(|| NoteError::Malformed("no blank line before the signatures".into()))?;
    let (text, sigs) = (&note[..split + 1], &note[split + 2..]);
    check_text(text)?;
    if sigs.is_empty() || !sigs.ends_with('\n') {
        return Err(NoteError::Malformed("signature block must end with a newline".into()));
    }
    let want_id = verifier.key_id();
    let mut found = false;
    for line in sigs[..sigs.len() - 1].split('\n') {
        let rest = line
            .strip_prefix("\u{2014} ")
            .ok_or_else(|| NoteError::Malformed(format!("signature line does not start with \"\u{2014} \": {line:?}")))?;
        let (name, b64) = rest
            .split_once(' ')
            .ok_or_else(|| NoteError::Malformed(format!("signature line has no key name: {line:?}")))?;
        let blob = B64
            .decode(b64)
            .map_err(|_| NoteError::Malformed(format!("signature is not base64: {line:?}")))?;
        if name.is_empty() || blob.len() < 5 {
            return Err(NoteError::Malformed(format!("signature line too short: {line:?}")));
        }
        if name != verifier.name || blob[..4] != want_id {
            continue;
        }
        found = true;
        if !verifier.verify_bytes(text.as_bytes(), &blob[4..]) {
            return Err(NoteError::BadSignature);
        }
    }
    if found {
        Ok(text)
    } else {
        Err(NoteError::UnknownKey)
    }
}

/// Parse a checkpoint body: (origin, tree size, root hash). Extension lines
/// after the root are allowed and ignored.
pub fn parse_checkpoint(body: &str) -> Result<(String, u64, Hash), NoteError> {
    let bad = |why: &str| NoteError::Malformed(format!("checkpoint {why}"));
    let mut lines = body.strip_suffix('\n').ok_or_else(|| bad("does not end with a newline"))?.split('\n');
    let origin = lines.next().filter(|o| !o.is_empty()).ok_or_else(|| bad("has no origin line"))?;
    let size_txt = lines.next().ok_or_else(|| bad("has no tree size line"))?;
    let canonical = size_txt == "0" || (!size_txt.starts_with('0') && size_txt.bytes().all(|b| b.is_ascii_digit()));
    let size = size_txt
        .parse::<u64>()
        .ok()
        .filter(|_| canonical)
        .ok_or_else(|| bad("tree size is not a canonical decimal number"))?;
    let root: Hash = lines
        .next()
        .and_then(|r| B64.decode(r).ok())
        .and_then(|r| r.try_into().ok())
        .ok_or_else(|| bad("root hash is not base64 of 32 bytes"))?;
    if lines.any(str::is_empty) {
        return Err(bad("has an empty extension line"));
    }
    Ok((origin.to_string(), size, root))
}

/// Open a signed checkpoint with `verifier`: (origin, tree size, root).
pub fn verify_note(note: &str, verifier: &VerifierKey) -> Result<(String, u64, Hash), NoteError> {
    parse_checkpoint(open_note(note, verifier)?)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// The golden seed of docs/chain-format.md: bytes 0x00..0x1f.
    pub(crate) fn golden_key() -> PrivateKey {
        let seed: [u8; 32] = std::array::from_fn(|i| i as u8);
        PrivateKey::from_seed("pg_custody", &seed).unwrap()
    }

    // Go's golang.org/x/mod/sumdb/note example (package documentation).
    const GO_SKEY: &str = "PRIVATE+KEY+PeterNeumann+c74f20a3+AYEKFALVFGyNhPJEMzD1QIDr+Y7hfZx09iUvxdXHKDFz";
    const GO_VKEY: &str = "PeterNeumann+c74f20a3+ARpc2QcUPDhMQegwxbzhKqiBfsVkmqq/LDE4izWy10TW";
    const GO_TEXT: &str = "If you think cryptography is the answer to your problem,\nthen you don't know what your problem is.\n";
    const GO_NOTE_SIG: &str = "\n\u{2014} PeterNeumann x08go/ZJkuBS9UG/SffcvIAQxVBtiFupLLr8pAcElZInNIuGUgYN1FFYC2pZSNXgKvqfqdngotpRZb6KE6RyyBwJnAM=\n";

    #[test]
    fn interoperates_with_go_sumdb_note() {
        let sk = parse_private_key(GO_SKEY).unwrap();
        assert_eq!(sk.to_text(), GO_SKEY);
        assert_eq!(sk.verifier().to_text(), GO_VKEY);
        let vk = parse_verifier_key(GO_VKEY).unwrap();
        let note = sign_note(GO_TEXT, &sk).unwrap();
        assert_eq!(note, format!("{GO_TEXT}{GO_NOTE_SIG}"));
        assert_eq!(open_note(&note, &vk), Ok(GO_TEXT));
    }

    pub(crate) const GOLDEN_VKEY: &str = "pg_custody+41dfb93b+AQOhB7/zzhC+HXDdGOdLwJln5NYwm6UNXx3chmQSVTG4";
    pub(crate) const GOLDEN_NOTE: &str = "pg_custody/7300000000000000001/16384\n3\nq6urq6urq6urq6urq6urq6urq6urq6urq6urq6urq6s=\n\n\u{2014} pg_custody Qd+5Oz5uA6yTq6AUcY8WsPYvsVdHOb7kyhrEpflHS1mxiJ3PpcQ2EmOJ6tlUcvf6F3B0kuKtmHAVLcH+n8DtoQlyWgk=\n";

    #[test]
    fn golden_checkpoint() {
        let k = golden_key();
        assert_eq!(k.verifier().to_text(), GOLDEN_VKEY);
        assert_eq!(k.to_text(), "PRIVATE+KEY+pg_custody+41dfb93b+AQABAgMEBQYHCAkKCwwNDg8QERITFBUWFxgZGhscHR4f");
        let body = checkpoint_body(&checkpoint_origin(7_300_000_000_000_000_001, 16384), 3, &[0xab; 32]);
        let note = sign_note(&body, &k).unwrap();
        assert_eq!(note, GOLDEN_NOTE);
        let v = parse_verifier_key(GOLDEN_VKEY).unwrap();
        assert_eq!(
            verify_note(&note, &v),
            Ok(("pg_custody/7300000000000000001/16384".to_string(), 3, [0xab; 32]))
        );
    }

    #[test]
    fn generated_keys_round_trip() {
        let (sk, vk) = generate_key("audit.example").unwrap();
        let (sk2, _) = generate_key("audit.example").unwrap();
        assert_ne!(sk, sk2, "keys must be random");
        let k = parse_private_key(&sk).unwrap();
        let v = parse_verifier_key(&vk).unwrap();
        assert_eq!(k.verifier(), v);
        let note = sign_note(&checkpoint_body("o", 1, &[1; 32]), &k).unwrap();
        assert_eq!(verify_note(&note, &v).unwrap().1, 1);
        assert!(!format!("{k:?}").contains(&sk[30..]), "Debug must not leak key material");
    }

    #[test]
    fn wrong_key_is_unknown_key_and_edits_are_bad_signature() {
        let k = golden_key();
        let other = PrivateKey::from_seed("pg_custody", &[9; 32]).unwrap();
        let note = sign_note(&checkpoint_body("o", 10, &[1; 32]), &k).unwrap();
        assert_eq!(verify_note(&note, &other.verifier()), Err(NoteError::UnknownKey));
        // Same key, different name: also not this key.
        let renamed = PrivateKey::from_seed("other", &std::array::from_fn(|i| i as u8)).unwrap();
        assert_eq!(verify_note(&note, &renamed.verifier()), Err(NoteError::UnknownKey));
        let edited = note.replacen("\n10\n", "\n11\n", 1);
        assert_eq!(verify_note(&edited, &k.verifier()), Err(NoteError::BadSignature));
        // A witness cosignature by another key next to ours is fine.
        let cosig = format!("{note}\u{2014} witness AAAAAAAAAA==\n");
        assert!(verify_note(&cosig, &k.verifier()).is_ok());
    }

    #[test]
    fn malformed_notes_and_keys() {
        let v = golden_key().verifier();
        for bad in ["", "o\n1\nAA==\n", "o\n1\n\nno dash\n", "o\n1\n\n\u{2014} pg_custody !!!\n"] {
            assert!(matches!(open_note(bad, &v), Err(NoteError::Malformed(_))), "{bad:?}");
        }
        let k = golden_key();
        let note = sign_note("o\n01\nAA==\n", &k).unwrap();
        assert!(matches!(verify_note(&note, &v), Err(NoteError::Malformed(_))));
        assert!(sign_note("no newline", &k).is_err());
        assert!(matches!(parse_verifier_key("x"), Err(KeyError::Malformed(_))));
        assert!(matches!(parse_verifier_key(GO_SKEY), Err(KeyError::Malformed(_))));
        assert!(matches!(parse_private_key(GO_VKEY), Err(KeyError::Malformed(_))));
        let tampered = GO_VKEY.replace("c74f20a3", "c74f20a4");
        assert!(matches!(parse_verifier_key(&tampered), Err(KeyError::KeyHashMismatch)));
        assert!(matches!(generate_key("has space"), Err(KeyError::InvalidName(_))));
        assert!(matches!(generate_key("a+b"), Err(KeyError::InvalidName(_))));
    }
}
