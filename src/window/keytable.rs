//! The keyed state of one bucket (pane or calendar period) in a compact layout: every key's
//! bytes in one arena, every key's accumulators in one flat vector, and a hash table of
//! 4-byte entry numbers. A `HashMap<Box<[u8]>, Box<[Acc]>>` costs a 40-byte slot (times the
//! table's slack) plus two heap allocations per key; this costs the key's bytes, 4 bytes of
//! offset, a dirty flag and the accumulators themselves, plus a 4-byte slot. Entries are
//! never removed one by one: a bucket's table is dropped whole when its windows close.

use hashbrown::HashTable;

use crate::agg::Acc;

/// Keys and accumulators of one bucket.
#[derive(Debug)]
pub(super) struct KeyTable {
    /// Entry numbers, hashed by their key.
    index: HashTable<u32>,
    /// Key bytes of every entry, back to back.
    keys: Vec<u8>,
    /// End of entry i's key in `keys` (its start is the previous entry's end).
    key_ends: Vec<u32>,
    dirty: Vec<bool>,
    /// `width` accumulators per entry.
    accs: Vec<Acc>,
    width: usize,
}

fn hash(key: &[u8]) -> u64 {
    xxhash_rust::xxh3::xxh3_64(key)
}

/// Entry `i`'s key in the arena: it ends at `key_ends[i]` and starts where entry `i - 1`'s
/// ends. A free function so the rehash callback can use it while the table is borrowed.
fn key_of<'a>(keys: &'a [u8], key_ends: &[u32], i: usize) -> &'a [u8] {
    let start = if i == 0 { 0 } else { key_ends[i - 1] as usize };
    &keys[start..key_ends[i] as usize]
}

/// One entry, read-only.
pub(super) struct EntryRef<'a> {
    pub dirty: bool,
    pub accs: &'a [Acc],
}

impl KeyTable {
    /// A table whose entries hold `width` accumulators each.
    pub fn new(width: usize) -> Self {
        KeyTable {
            index: HashTable::new(),
            keys: Vec::new(),
            key_ends: Vec::new(),
            dirty: Vec::new(),
            accs: Vec::new(),
            width,
        }
    }

    pub fn len(&self) -> usize {
        self.key_ends.len()
    }

    fn key(&self, i: usize) -> &[u8] {
        key_of(&self.keys, &self.key_ends, i)
    }

    /// Entry `i`'s accumulators in `accs`.
    fn accs_range(&self, i: usize) -> std::ops::Range<usize> {
        i * self.width..(i + 1) * self.width
    }

    fn find(&self, key: &[u8]) -> Option<usize> {
        self.index.find(hash(key), |&i| self.key(i as usize) == key).map(|&i| i as usize)
    }

    pub fn get(&self, key: &[u8]) -> Option<EntryRef<'_>> {
        self.find(key).map(|i| self.entry(i))
    }

    fn entry(&self, i: usize) -> EntryRef<'_> {
        EntryRef {
            dirty: self.dirty[i],
            accs: &self.accs[self.accs_range(i)],
        }
    }

    /// The accumulators of `key`, created with `fresh` if the key is new (then `true`); the
    /// entry is marked dirty either way.
    pub fn upsert(&mut self, key: &[u8], fresh: impl FnOnce() -> Box<[Acc]>) -> (&mut [Acc], bool) {
        let (i, new) = match self.find(key) {
            Some(i) => (i, false),
            None => (self.push(key, fresh().into_vec(), true), true),
        };
        self.dirty[i] = true;
        let range = self.accs_range(i);
        (&mut self.accs[range], new)
    }

    /// Restores an entry read back from the state store (not dirty). Returns whether the key
    /// was new; an existing key's accumulators are replaced.
    pub fn restore(&mut self, key: &[u8], accs: Vec<Acc>) -> bool {
        debug_assert_eq!(accs.len(), self.width);
        match self.find(key) {
            Some(i) => {
                self.dirty[i] = false;
                let range = self.accs_range(i);
                for (slot, acc) in self.accs[range].iter_mut().zip(accs) {
                    *slot = acc;
                }
                false
            }
            None => {
                self.push(key, accs, false);
                true
            }
        }
    }

    fn push(&mut self, key: &[u8], accs: Vec<Acc>, dirty: bool) -> usize {
        let i = self.key_ends.len();
        self.keys.extend_from_slice(key);
        self.key_ends.push(u32::try_from(self.keys.len()).expect("a bucket holds under 4 GiB of keys"));
        self.dirty.push(dirty);
        self.accs.extend(accs);
        let (key_ends, keys) = (&self.key_ends, &self.keys);
        self.index.insert_unique(hash(key), i as u32, |&j| hash(key_of(keys, key_ends, j as usize)));
        i
    }

    /// Every (key, entry), in insertion order.
    pub fn iter(&self) -> impl Iterator<Item = (&[u8], EntryRef<'_>)> + '_ {
        (0..self.len()).map(move |i| (self.key(i), self.entry(i)))
    }

    pub fn keys(&self) -> impl Iterator<Item = &[u8]> + '_ {
        (0..self.len()).map(move |i| self.key(i))
    }

    /// Calls `f` with every dirty (key, accumulators) and clears the flags.
    pub fn drain_dirty(&mut self, mut f: impl FnMut(&[u8], &[Acc])) {
        for i in 0..self.len() {
            if std::mem::take(&mut self.dirty[i]) {
                f(key_of(&self.keys, &self.key_ends, i), &self.accs[self.accs_range(i)]);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn count(a: &[Acc]) -> u64 {
        match a[0] {
            Acc::Count(n) => n,
            _ => unreachable!(),
        }
    }

    #[test]
    fn behaves_like_a_map_of_keys_to_accumulators() {
        let mut t = KeyTable::new(1);
        let mut model: HashMap<Vec<u8>, u64> = HashMap::new();
        // Keys of many lengths, the empty key among them, with repeats; enough to rehash.
        for n in 0..20_000u64 {
            let key: Vec<u8> = format!("{}", (n * 7919) % 5_003).into_bytes().into_iter().take((n % 7) as usize).collect();
            let (accs, new) = t.upsert(&key, || vec![Acc::Count(0)].into_boxed_slice());
            assert_eq!(new, !model.contains_key(&key));
            if let Acc::Count(c) = &mut accs[0] {
                *c += 1;
            }
            *model.entry(key).or_default() += 1;
        }
        assert_eq!(t.len(), model.len());
        for (k, v) in &model {
            assert_eq!(t.get(k).map(|e| count(e.accs)), Some(*v));
        }
        assert!(t.get(b"absent-key").is_none());
        let listed: HashMap<Vec<u8>, u64> = t.iter().map(|(k, e)| (k.to_vec(), count(e.accs))).collect();
        assert_eq!(listed, model);
        assert_eq!(t.keys().count(), model.len());

        let mut drained = 0;
        t.drain_dirty(|_, _| drained += 1);
        assert_eq!(drained, model.len());
        t.drain_dirty(|_, _| panic!("nothing is dirty after a drain"));
        t.upsert(b"12", || unreachable!("the key exists"));
        let mut again = Vec::new();
        t.drain_dirty(|k, _| again.push(k.to_vec()));
        assert_eq!(again, vec![b"12".to_vec()]);
    }

    #[test]
    fn restore_adds_clean_entries_and_replaces_existing_ones() {
        let mut t = KeyTable::new(2);
        assert!(t.restore(b"a", vec![Acc::Count(3), Acc::Count(4)]));
        assert!(!t.restore(b"a", vec![Acc::Count(5), Acc::Count(6)]));
        let e = t.get(b"a").unwrap();
        assert!(!e.dirty);
        assert_eq!((count(&e.accs[..1]), count(&e.accs[1..])), (5, 6));
        t.drain_dirty(|_, _| panic!("restored entries are clean"));
    }
}
