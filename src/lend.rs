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
    /// What the user of the cache derives from the value once (the writer: its jsonb and
    /// its canonical text).
    pub derived: Option<Box<[u64]>>,
    pub canonical: Option<Box<[u8]>>,
}

impl Entry {
    /// The value (Null while it is lent).
    pub fn value(&self) -> &Value {
        &self.value
    }
}

/// An entry of the cache, valid until the next `trim`.
#[derive(Clone, Copy)]
pub struct Key(usize);

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
        let Key(entry) = self.find(key, key_len, &parse)?;
        let e = &mut self.entries[entry];
        if e.lent {
            *out = parse()?;
            return Some(Lent { entry, lent: false });
        }
        e.lent = true;
        *out = std::mem::take(&mut e.value);
        Some(Lent { entry, lent: true })
    }

    /// The entry for `key`, parsing its value with `parse` the first time; None when `parse`
    /// finds no value. Nothing is lent: the value stays in the entry.
    pub fn find<Q>(&mut self, key: &Q, key_len: usize, parse: impl Fn() -> Option<Value>) -> Option<Key>
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ToOwned<Owned = K> + ?Sized,
    {
        if let Some(&i) = self.index.get(key) {
            return Some(Key(i));
        }
        self.entries.push(Entry { value: parse()?, lent: false, derived: None, canonical: None });
        if key_len <= MAX_KEY {
            self.index.insert(key.to_owned(), self.entries.len() - 1);
        } else {
            self.unindexed += 1;
        }
        Some(Key(self.entries.len() - 1))
    }

    /// Takes back a value `lend` moved out.
    pub fn give_back(&mut self, key: Lent, v: &mut Value) {
        if key.lent {
            let e = &mut self.entries[key.entry];
            e.value = std::mem::take(v);
            e.lent = false;
        }
    }

    /// The entry `find` returned, for what is derived from its value.
    pub fn entry(&mut self, key: Key) -> &mut Entry {
        &mut self.entries[key.0]
    }

    /// The entry `find` returned.
    pub fn get(&self, key: Key) -> &Entry {
        &self.entries[key.0]
    }
}
