//! Parsed JSON values by a key (the text a session sent, or the bytes of a stored jsonb),
//! lent to a record while it is hashed or verified instead of cloned: records repeat the
//! same few values, and parsing or cloning them per record cost more than hashing. Used by
//! the writer (writer/rows.rs) and the verifier (scan.rs).

use std::borrow::Borrow;
use std::collections::HashMap;
use std::hash::Hash;

use serde_json::Value;

/// Entries kept before the cache starts over, and the largest key kept.
const ENTRIES: usize = 4096;
const MAX_KEY: usize = 4096;

pub struct JsonLender<K> {
    /// foldhash: the keys (JSON texts, jsonb bytes) are hashed for every value of every
    /// record; SipHash was 4 % of verification (FNV, a byte at a time, was slower still).
    index: HashMap<K, usize, foldhash::fast::RandomState>,
    entries: Vec<Entry>,
    /// Entries whose key was too large to index: needed until the next `trim` only.
    unindexed: usize,
}

pub struct Entry {
    value: Value,
    lent: bool,
    /// What the user of the cache derives from the value once (the writer: its jsonb).
    pub derived: Option<Box<[u64]>>,
}

/// A value on loan: give it back with `give_back`.
#[derive(Clone, Copy)]
pub struct Lent {
    entry: usize,
    /// False when the value was parsed again because the entry was lent already (the same
    /// value twice in one record).
    lent: bool,
}

impl<K: Hash + Eq> JsonLender<K> {
    pub fn new() -> Self {
        JsonLender { index: HashMap::default(), entries: Vec::new(), unindexed: 0 }
    }

    /// Starts over if the cache is full or holds values of large keys. Call only when
    /// nothing is lent and nothing derived is still in use (between batches or rows).
    pub fn trim(&mut self) {
        if self.entries.len() >= ENTRIES || self.unindexed > 0 {
            self.index.clear();
            self.entries.clear();
            self.unindexed = 0;
        }
    }

    /// Moves the value for `key` into `out`, parsing it with `parse` the first time; None
    /// when `parse` finds no value.
    pub fn lend<Q>(&mut self, key: &Q, key_len: usize, out: &mut Value, parse: impl Fn() -> Option<Value>) -> Option<Lent>
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ToOwned<Owned = K> + ?Sized,
    {
        let entry = match self.index.get(key) {
            Some(&i) => i,
            None => {
                self.entries.push(Entry { value: parse()?, lent: false, derived: None });
                if key_len <= MAX_KEY {
                    self.index.insert(key.to_owned(), self.entries.len() - 1);
                } else {
                    self.unindexed += 1;
                }
                self.entries.len() - 1
            }
        };
        let e = &mut self.entries[entry];
        if e.lent {
            *out = parse()?;
            return Some(Lent { entry, lent: false });
        }
        e.lent = true;
        *out = std::mem::take(&mut e.value);
        Some(Lent { entry, lent: true })
    }

    /// Takes back a value `lend` moved out.
    pub fn give_back(&mut self, key: Lent, v: &mut Value) {
        if key.lent {
            let e = &mut self.entries[key.entry];
            e.value = std::mem::take(v);
            e.lent = false;
        }
    }

    /// The entry of a value (lent or given back), for what is derived from it.
    pub fn entry(&mut self, key: Lent) -> (&Value, &mut Option<Box<[u64]>>) {
        let e = &mut self.entries[key.entry];
        (&e.value, &mut e.derived)
    }
}
