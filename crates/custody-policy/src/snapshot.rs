//! The authorization state every backend needs: policies, attributes and
//! suspensions, as one value the extension publishes through shared memory.
//!
//! The store lives in `custody.database`, but statements run in every database
//! and a backend cannot read another database's tables; so the state travels
//! as bytes. The encoding is JSON behind a magic prefix: attribute values are
//! arbitrary JSON already, it is self-describing for debugging, and decoding
//! happens once per generation per backend, not per statement.

use serde::{Deserialize, Serialize};

/// Prefix of an encoded snapshot; a different layout gets a different magic.
const MAGIC: &[u8] = b"custody-snapshot/1\n";

/// One Rego module as stored by `custody.set_policy`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PolicySource {
    pub name: String,
    pub version: i64,
    pub source: String,
    pub enabled: bool,
}

/// One attribute of a role, in force for `valid_from <= now < valid_until`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Attribute {
    pub role: String,
    pub key: String,
    pub value: serde_json::Value,
    /// Unix microseconds.
    pub valid_from: i64,
    /// Unix microseconds; `None` means no end.
    pub valid_until: Option<i64>,
}

impl Attribute {
    /// True when the attribute is in force at `now_unix_us`.
    pub fn is_valid_at(&self, now_unix_us: i64) -> bool {
        self.valid_from <= now_unix_us && self.valid_until.is_none_or(|end| now_unix_us < end)
    }
}

/// A suspended role: every statement of it, or acting through it, is denied.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Suspension {
    pub role: String,
    pub reason: String,
}

/// What every backend of the cluster needs to decide; published through shared memory as bytes.
#[derive(Clone, Debug, PartialEq, Default, Serialize, Deserialize)]
pub struct Snapshot {
    /// Bumped at each committed change; a backend rebuilds its gate when it moves.
    pub generation: u64,
    pub policies: Vec<PolicySource>,
    pub attributes: Vec<Attribute>,
    pub suspensions: Vec<Suspension>,
}

impl Snapshot {
    pub fn encode(&self) -> Vec<u8> {
        let mut out = MAGIC.to_vec();
        // Serializing plain structs of strings, integers and JSON values into
        // a Vec cannot fail.
        serde_json::to_writer(&mut out, self).expect("snapshot serializes");
        out
    }

    pub fn decode(bytes: &[u8]) -> Result<Snapshot, String> {
        let body = bytes
            .strip_prefix(MAGIC)
            .ok_or_else(|| "not a pg_custody policy snapshot (bad magic)".to_string())?;
        serde_json::from_slice(body).map_err(|e| format!("corrupt policy snapshot: {e}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn sample() -> Snapshot {
        Snapshot {
            generation: 42,
            policies: vec![PolicySource {
                name: "office_hours".into(),
                version: 3,
                source: "package custody\n\ndeny contains \"no\" if input.time.hour < 8\n".into(),
                enabled: true,
            }],
            attributes: vec![Attribute {
                role: "alice".into(),
                key: "tenant".into(),
                value: json!({"id": 7, "names": ["a", "b"], "x": null, "f": 1.5}),
                valid_from: -5,
                valid_until: Some(1_795_874_400_000_000),
            }],
            suspensions: vec![Suspension {
                role: "mallory".into(),
                reason: "laptop stolen \u{2014} \"urgent\"".into(),
            }],
        }
    }

    #[test]
    fn round_trip() {
        let s = sample();
        assert_eq!(Snapshot::decode(&s.encode()).unwrap(), s);
        let empty = Snapshot::default();
        assert_eq!(Snapshot::decode(&empty.encode()).unwrap(), empty);
    }

    #[test]
    fn rejects_foreign_and_truncated_bytes() {
        let bytes = sample().encode();
        assert!(Snapshot::decode(&bytes[MAGIC.len()..]).is_err());
        assert!(Snapshot::decode(&bytes[..bytes.len() - 1]).is_err());
        assert!(Snapshot::decode(b"").is_err());
    }

    #[test]
    fn validity_window_is_half_open() {
        let a = Attribute {
            role: "r".into(),
            key: "k".into(),
            value: json!(true),
            valid_from: 100,
            valid_until: Some(200),
        };
        assert!(!a.is_valid_at(99));
        assert!(a.is_valid_at(100));
        assert!(a.is_valid_at(199));
        assert!(!a.is_valid_at(200));
        let open = Attribute {
            valid_until: None,
            ..a
        };
        assert!(open.is_valid_at(i64::MAX));
    }
}
