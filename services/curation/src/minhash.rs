//! Near-duplicate detection: MinHash signatures over word shingles, and a
//! banded locality-sensitive index that finds earlier examples whose
//! estimated Jaccard similarity passes a threshold without comparing every
//! pair. Hashes are fixed functions (FNV-1a, then a splitmix finalizer per
//! permutation), so signatures are the same on every machine and run.

use std::collections::HashMap;

/// Lowercases, drops punctuation and collapses whitespace, so trivial
/// variations ("Hello, world!" / "hello world") compare equal.
pub fn normalize(text: &str) -> String {
    text.chars()
        .map(|c| {
            if c.is_alphanumeric() {
                c.to_ascii_lowercase()
            } else {
                ' '
            }
        })
        .collect::<String>()
        .split_whitespace()
        .collect::<Vec<_>>()
        .join(" ")
}

fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, &b| {
        (h ^ b as u64).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

#[derive(Debug, Clone)]
pub struct MinHasher {
    permutations: usize,
    shingle_words: usize,
}

impl Default for MinHasher {
    fn default() -> Self {
        Self {
            permutations: 128,
            shingle_words: 3,
        }
    }
}

impl MinHasher {
    pub fn new(permutations: usize, shingle_words: usize) -> Self {
        Self {
            permutations: permutations.max(1),
            shingle_words: shingle_words.max(1),
        }
    }

    /// The signature of `text` (normalized first).
    pub fn signature(&self, text: &str) -> Vec<u64> {
        let norm = normalize(text);
        let words: Vec<&str> = norm.split(' ').filter(|w| !w.is_empty()).collect();
        let shingles: Vec<u64> = if words.len() <= self.shingle_words {
            vec![fnv1a(norm.as_bytes())]
        } else {
            words
                .windows(self.shingle_words)
                .map(|w| fnv1a(w.join(" ").as_bytes()))
                .collect()
        };
        (0..self.permutations as u64)
            .map(|i| {
                let seed = mix(i.wrapping_add(0x9e37_79b9_7f4a_7c15));
                shingles
                    .iter()
                    .map(|&h| mix(h ^ seed))
                    .min()
                    .unwrap_or(u64::MAX)
            })
            .collect()
    }
}

/// Estimated Jaccard similarity: the share of equal signature components.
pub fn similarity(a: &[u64], b: &[u64]) -> f64 {
    let same = a.iter().zip(b).filter(|(x, y)| x == y).count();
    same as f64 / a.len().max(1) as f64
}

/// Signatures seen so far, bucketed by bands of `rows` components. Kept
/// compact for builds over hundreds of thousands of prompts: signatures in
/// one flat vector, and each bucket a linked list threaded through `next`.
#[derive(Debug)]
pub struct LshIndex {
    rows: usize,
    threshold: f64,
    /// Components per signature (fixed by the first insert).
    width: usize,
    /// Band key -> (newest id in that bucket, entries in it).
    heads: HashMap<u64, (u32, u32)>,
    /// `next[id * bands + band]`: the previous id in the same bucket.
    next: Vec<u32>,
    signatures: Vec<u64>,
    /// Hash of a whole signature and its group -> its id: exact repeats
    /// found in O(1).
    exact: HashMap<u64, u32>,
    /// Each entry's group: only entries of one group can be duplicates.
    groups: Vec<u64>,
}

const NONE: u32 = u32::MAX;

/// Buckets holding more entries than this are not searched. Prompts that
/// share common phrasing fill some buckets with thousands of entries that
/// are not near-duplicates of each other; a true near-duplicate shares about
/// 13 of its 32 bands at the 0.8 threshold (all of them when it is an exact
/// repeat), so it is found through the others. This keeps a build linear in
/// its input.
pub const HOT_BUCKET: u32 = 64;

impl LshIndex {
    /// `rows` per band sets the similarity at which candidates appear
    /// (about `(1/bands)^(1/rows)`); `threshold` is what counts as a duplicate.
    pub fn new(rows: usize, threshold: f64) -> Self {
        Self {
            rows: rows.max(1),
            threshold,
            width: 0,
            heads: HashMap::new(),
            next: Vec::new(),
            signatures: Vec::new(),
            exact: HashMap::new(),
            groups: Vec::new(),
        }
    }

    fn signature(&self, id: usize) -> &[u64] {
        &self.signatures[id * self.width..(id + 1) * self.width]
    }

    /// Adds `sig` unless an earlier signature is a near duplicate; returns
    /// the new index, or the index of the earliest one it duplicates.
    pub fn insert(&mut self, sig: Vec<u64>) -> Result<usize, usize> {
        self.insert_in(sig, 0)
    }

    /// As [`insert`](Self::insert), but only entries inserted with the same
    /// `group` count as duplicates (curation groups by the answer: two
    /// prompts alike whose right answers differ are both kept). The group
    /// is folded into every band key, so other groups' entries are never
    /// even candidates.
    pub fn insert_in(&mut self, sig: Vec<u64>, group: u64) -> Result<usize, usize> {
        if self.width == 0 {
            self.width = sig.len();
        }
        assert_eq!(
            sig.len(),
            self.width,
            "signatures of one index have one width"
        );
        let whole = sig.iter().fold(mix(group), |h, &x| mix(h ^ x));
        if let Some(&dup) = self.exact.get(&whole) {
            return Err(dup as usize);
        }
        let keys: Vec<u64> = sig
            .chunks(self.rows)
            .enumerate()
            .map(|(b, rows)| {
                rows.iter()
                    .fold(mix(b as u64 ^ mix(group)), |h, &x| mix(h ^ x))
            })
            .collect();
        let bands = keys.len();
        // A similar signature shares many bands: check each candidate once,
        // lowest id first.
        let mut candidates = Vec::new();
        for (b, key) in keys.iter().enumerate() {
            let Some(&(mut at, len)) = self.heads.get(key) else {
                continue;
            };
            if len > HOT_BUCKET {
                continue;
            }
            while at != NONE {
                candidates.push(at);
                at = self.next[at as usize * bands + b];
            }
        }
        candidates.sort_unstable();
        candidates.dedup();
        if let Some(&dup) = candidates.iter().find(|&&other| {
            self.groups[other as usize] == group
                && similarity(&sig, self.signature(other as usize)) >= self.threshold
        }) {
            return Err(dup as usize);
        }
        let id = self.len();
        for key in keys {
            let (head, len) = self.heads.entry(key).or_insert((NONE, 0));
            self.next.push(*head);
            *head = id as u32;
            *len += 1;
        }
        self.signatures.extend_from_slice(&sig);
        self.groups.push(group);
        self.exact.insert(whole, id as u32);
        Ok(id)
    }

    pub fn len(&self) -> usize {
        self.signatures.len().checked_div(self.width).unwrap_or(0)
    }

    pub fn is_empty(&self) -> bool {
        self.signatures.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normalization_ignores_case_punctuation_and_spacing() {
        assert_eq!(normalize("  Hello,   WORLD!! "), "hello world");
    }

    #[test]
    fn signatures_are_deterministic_and_track_similarity() {
        let h = MinHasher::default();
        let a = "how do I reset my password on the mobile app when I forgot the old one";
        let near = "How do I reset my password on the mobile app, when I forgot the old one?";
        let edit = "how do I reset my password on the mobile app when I lost the old one";
        let other = "what is the weather going to be like in paris tomorrow afternoon";
        assert_eq!(h.signature(a), h.signature(a));
        assert_eq!(similarity(&h.signature(a), &h.signature(near)), 1.0);
        let s_edit = similarity(&h.signature(a), &h.signature(edit));
        let s_other = similarity(&h.signature(a), &h.signature(other));
        assert!(s_edit > 0.5 && s_edit < 1.0, "{s_edit}");
        assert!(s_other < 0.1, "{s_other}");
    }

    #[test]
    fn index_finds_near_duplicates_and_keeps_the_rest() {
        let h = MinHasher::default();
        let mut idx = LshIndex::new(4, 0.8);
        let base = "please summarize this article about climate change and its effects on \
                    farming in southern europe in three short sentences for a school newsletter";
        // The last word changed: 20 of 22 shingles shared, a true Jaccard
        // of 0.91, so near but not equal.
        let near = "please summarize this article about climate change and its effects on \
                    farming in southern europe in three short sentences for a school magazine";
        // Another topic in the same frame: a true Jaccard of 0.29.
        let far = "please summarize this article about the history of the printing press \
                   in germany in three short sentences for a school newsletter";
        let s_near = similarity(&h.signature(base), &h.signature(near));
        let s_far = similarity(&h.signature(base), &h.signature(far));
        assert!((0.8..1.0).contains(&s_near), "near pair: {s_near}");
        assert!(s_far < 0.8, "far pair: {s_far}");
        assert_eq!(idx.insert(h.signature(base)), Ok(0));
        assert_eq!(
            idx.insert(h.signature(&base.to_uppercase())),
            Err(0),
            "same after normalization"
        );
        assert_eq!(idx.insert(h.signature(near)), Err(0), "near duplicate");
        assert_eq!(idx.insert(h.signature(far)), Ok(1), "not a duplicate");
        assert_eq!(idx.len(), 2);
    }

    #[test]
    fn groups_keep_alike_entries_apart() {
        let h = MinHasher::default();
        let mut idx = LshIndex::new(4, 0.8);
        let text = "where is my parcel it was due on monday and has not arrived yet";
        assert_eq!(idx.insert_in(h.signature(text), 1), Ok(0));
        assert_eq!(idx.insert_in(h.signature(text), 2), Ok(1), "other group");
        assert_eq!(idx.insert_in(h.signature(text), 1), Err(0));
        assert_eq!(idx.insert_in(h.signature(text), 2), Err(1));
    }
}
