//! RFC 6962 Merkle Tree Hash: a reference implementation and an
//! incremental builder keeping only O(log n) subtree roots.

use sha2::{Digest as _, Sha256};

use crate::Hash;

/// MTH of the empty tree: SHA-256 of the empty string.
pub fn empty_root() -> Hash {
    Sha256::digest([]).into()
}

/// Leaf hash: SHA-256(0x00 || data).
pub fn leaf_hash(data: &[u8]) -> Hash {
    let mut h = Sha256::new();
    h.update([0x00]);
    h.update(data);
    h.finalize().into()
}

/// Interior node hash: SHA-256(0x01 || left || right).
pub fn node_hash(left: &Hash, right: &Hash) -> Hash {
    let mut h = Sha256::new();
    h.update([0x01]);
    h.update(left);
    h.update(right);
    h.finalize().into()
}

/// Reference MTH, recursive as in RFC 6962 §2.1: split at the largest power
/// of two smaller than n. In pg_custody each leaf is a 32-byte record hash.
pub fn merkle_root<T: AsRef<[u8]>>(leaves: &[T]) -> Hash {
    match leaves.len() {
        0 => empty_root(),
        1 => leaf_hash(leaves[0].as_ref()),
        n => {
            let k = 1usize << (usize::BITS - 1 - (n - 1).leading_zeros());
            node_hash(&merkle_root(&leaves[..k]), &merkle_root(&leaves[k..]))
        }
    }
}

/// Incremental MTH. `stack` holds the roots of the perfect subtrees that
/// make up the tree so far, largest (leftmost) first: one per set bit of
/// `size`, so at most 64 entries.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct MerkleBuilder {
    stack: Vec<Hash>,
    size: u64,
}

impl MerkleBuilder {
    pub fn new() -> Self {
        Self::default()
    }

    /// Append a leaf (raw leaf data; hashed with the 0x00 prefix).
    pub fn push(&mut self, leaf: &[u8]) {
        self.push_leaf_hash(leaf_hash(leaf));
    }

    /// Append an already computed leaf hash.
    pub fn push_leaf_hash(&mut self, mut h: Hash) {
        // Each trailing 1 bit of the old size is a perfect subtree of the
        // same height as the one being carried: merge them.
        let mut s = self.size;
        while s & 1 == 1 {
            let left = self.stack.pop().expect("one stack entry per set bit");
            h = node_hash(&left, &h);
            s >>= 1;
        }
        self.stack.push(h);
        self.size += 1;
    }

    /// Number of leaves.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// The frontier: the roots of the perfect subtrees so far, largest first (one per set
    /// bit of `size`). With `size` it is all the builder keeps, so a writer that saves it can
    /// go on from there without reading the leaves again.
    pub fn frontier(&self) -> &[Hash] {
        &self.stack
    }

    /// A builder going on from a saved frontier; None unless it has one hash per set bit of
    /// `size`.
    pub fn from_frontier(size: u64, frontier: Vec<Hash>) -> Option<Self> {
        (frontier.len() == size.count_ones() as usize).then_some(Self { stack: frontier, size })
    }

    /// MTH of the leaves so far. Folding right to left gives exactly the
    /// RFC 6962 split: the left part is always the largest power of two.
    pub fn root(&self) -> Hash {
        let mut it = self.stack.iter().rev();
        match it.next() {
            None => empty_root(),
            Some(&last) => it.fold(last, |acc, left| node_hash(left, &acc)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hex;

    /// Leaves and roots of the certificate-transparency reference
    /// `merkle_tree_test` (also in Trillian's testonly constants).
    const CT_LEAVES: [&[u8]; 8] = [
        b"",
        b"\x00",
        b"\x10",
        b"\x20\x21",
        b"\x30\x31",
        b"\x40\x41\x42\x43",
        b"\x50\x51\x52\x53\x54\x55\x56\x57",
        b"\x60\x61\x62\x63\x64\x65\x66\x67\x68\x69\x6a\x6b\x6c\x6d\x6e\x6f",
    ];
    const CT_ROOTS: [&str; 8] = [
        "6e340b9cffb37a989ca544e6bb780a2c78901d3fb33738768511a30617afa01d",
        "fac54203e7cc696cf0dfcb42c92a1d9dbaf70ad9e621f4bd8d98662f00e3c125",
        "aeb6bcfe274b70a14fb067a5e5578264db0fa9b51af5e0ba159158f329e06e77",
        "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7",
        "4e3bbb1f7b478dcfe71fb631631519a3bca12c9aefca1612bfce4c13a86264d4",
        "76e67dadbcdf1e10e1b74ddc608abd2f98dfb16fbce75277b5232a127f2087ef",
        "ddb89be403809e325750d3d263cd78929c2942b7942a34b77e122c9594a74c8c",
        "5dc9da79a70659a9ad559cb701ded9a2ab9d823aad2f4960cfe370eff4604328",
    ];

    #[test]
    fn ct_reference_vectors() {
        assert_eq!(
            hex::encode(&merkle_root::<&[u8]>(&[])),
            "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
        let mut b = MerkleBuilder::new();
        for n in 1..=8 {
            b.push(CT_LEAVES[n - 1]);
            assert_eq!(hex::encode(&merkle_root(&CT_LEAVES[..n])), CT_ROOTS[n - 1], "reference n={n}");
            assert_eq!(hex::encode(&b.root()), CT_ROOTS[n - 1], "builder n={n}");
        }
    }

    #[test]
    fn a_saved_frontier_goes_on_as_the_whole_builder() {
        let leaves: Vec<[u8; 32]> = (0..40u8).map(|i| [i; 32]).collect();
        for cut in 0..leaves.len() {
            let mut whole = MerkleBuilder::new();
            leaves[..cut].iter().for_each(|l| whole.push(l));
            let mut resumed = MerkleBuilder::from_frontier(whole.size(), whole.frontier().to_vec()).expect("valid");
            for l in &leaves[cut..] {
                whole.push(l);
                resumed.push(l);
            }
            assert_eq!(resumed.root(), whole.root(), "resumed after {cut}");
            assert_eq!(resumed.root(), merkle_root(&leaves));
        }
        assert!(MerkleBuilder::from_frontier(3, vec![[0; 32]]).is_none(), "3 leaves need two subtree roots");
        assert!(MerkleBuilder::from_frontier(0, vec![]).is_some());
    }

    #[test]
    fn builder_agrees_with_reference_up_to_70() {
        let leaves: Vec<[u8; 32]> = (0..70u8).map(|i| [i; 32]).collect();
        let mut b = MerkleBuilder::new();
        assert_eq!(b.root(), merkle_root(&leaves[..0]));
        for n in 1..=70 {
            b.push(&leaves[n - 1]);
            assert_eq!(b.size(), n as u64);
            assert_eq!(b.root(), merkle_root(&leaves[..n]), "n={n}");
            assert_eq!(b.stack.len(), n.count_ones() as usize);
        }
    }

    #[test]
    fn leaf_and_node_are_domain_separated() {
        // A two-leaf root must differ from a single leaf holding both hashes.
        let (a, b) = (leaf_hash(b"a"), leaf_hash(b"b"));
        let mut both = a.to_vec();
        both.extend_from_slice(&b);
        assert_ne!(node_hash(&a, &b), leaf_hash(&both));
    }
}
