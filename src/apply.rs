//! Change events applied to a table keyed by primary key: the operator of an `apply` query.
//!
//! Each record is one change of one key (the encoded primary key, routed to the shard owning
//! its key group): an upsert (create, update or snapshot read, carrying the new row's other
//! columns) or a delete, with its source position (see [`crate::decode::encode_position_int`]:
//! encodings compare byte-wise as the positions do).
//!
//! Changes of a key are applied in source-position order: the operator keeps, per key, the
//! position of the last change it applied, and a change at that position or before it is a
//! duplicate delivery or an out-of-order replay and is skipped (counted). A deleted key keeps
//! its position as a tombstone, so an older update arriving after the delete cannot bring the
//! row back. Whatever order the changes of a key arrive in, the key ends as its change with
//! the highest position says — so the table does not depend on how partitions interleave,
//! how epochs are cut or where a crash falls.
//!
//! At the end of an epoch the operator emits one row per key changed in it, with the key's
//! last state: the row to upsert, or a retraction (delete) of the key. The sink upserts them
//! on the primary-key columns, rewriting only the files that hold those keys.
//!
//! State table `keys`: key = the encoded primary key; value = one byte (0 live, 1 deleted)
//! then the position. Written for the keys changed in the epoch; never deleted (tombstones
//! are kept, see the README's "not done").

use std::collections::HashMap;
use std::rc::Rc;

use xxhash_rust::xxh3::Xxh3DefaultBuilder;

use crate::state::TableWrites;
use crate::types::decode_key;
use crate::window::{InSlot, OutputRow};

/// Input slot 0 of a change: [`UPSERT`] or [`DELETE`].
pub const UPSERT: i64 = 0;
pub const DELETE: i64 = 1;

/// What an apply operator needs from the plan.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApplySpec {
    /// Value columns of the table (the schema fields outside the primary key).
    pub value_width: usize,
}

/// Per key: the last change applied.
struct Applied {
    position: Box<[u8]>,
    deleted: bool,
}

type Key = Rc<[u8]>;

/// The changes of one query on one shard; see the [module docs](self).
pub struct ApplyOperator {
    spec: ApplySpec,
    keys: HashMap<Key, Applied, Xxh3DefaultBuilder>,
    /// Keys changed in this epoch → their new values (encoded), `None` when deleted.
    changed: HashMap<Key, Option<Vec<u8>>, Xxh3DefaultBuilder>,
    /// Table writes of the epoch, made when it ends.
    writes: TableWrites,
    /// Changes skipped (at or before their key's position) since the last `take_skipped`.
    skipped: u64,
}

impl ApplyOperator {
    pub const TABLES: &'static [&'static str] = &["keys"];

    pub fn new(spec: ApplySpec) -> ApplyOperator {
        ApplyOperator {
            spec,
            keys: HashMap::default(),
            changed: HashMap::default(),
            writes: TableWrites::default(),
            skipped: 0,
        }
    }

    /// Restores one entry of `keys` when `owns(key)`.
    pub fn restore(&mut self, table: usize, key: &[u8], value: &[u8], owns: impl Fn(&[u8]) -> bool) -> Result<bool, String> {
        if table != 0 {
            return Err(format!("apply state has one table, not table {table}"));
        }
        if !owns(key) {
            return Ok(false);
        }
        let deleted = match value.first() {
            Some(0) => false,
            Some(1) => true,
            Some(flag) => return Err(format!("apply state entry has flag {flag}, not 0 (live) or 1 (deleted)")),
            None => return Err("apply state entry is empty".into()),
        };
        self.keys.insert(
            key.into(),
            Applied {
                position: value[1..].into(),
                deleted,
            },
        );
        Ok(true)
    }

    /// One change of `key`: `inputs` are the op ([`UPSERT`] or [`DELETE`]), the position and
    /// the new row's value columns (encoded with `types::encode_key_value`), the last two as
    /// byte ranges of `blob`.
    pub fn process(&mut self, key: &[u8], inputs: &[InSlot], blob: &[u8]) {
        let bytes = |i: usize| match inputs.get(i) {
            Some(&InSlot::Bytes { start, end }) => &blob[start as usize..end as usize],
            _ => &[],
        };
        let delete = matches!(inputs.first(), Some(InSlot::Int(DELETE)));
        let (position, values) = (bytes(1), bytes(2));
        let key: Key = match self.keys.get_key_value(key) {
            Some((_, applied)) if position <= &*applied.position => {
                self.skipped += 1;
                return;
            }
            Some((k, _)) => k.clone(),
            None => key.into(),
        };
        self.keys.insert(
            key.clone(),
            Applied {
                position: position.into(),
                deleted: delete,
            },
        );
        let change = (!delete).then(|| values.to_vec());
        self.changed.insert(key, change);
    }

    /// The epoch ended: one row per key changed in it (its last state), and the state writes.
    pub fn finish_epoch(&mut self, out: &mut Vec<OutputRow>) {
        for (key, change) in self.changed.drain() {
            let applied = &self.keys[&key];
            let mut entry = Vec::with_capacity(1 + applied.position.len());
            entry.push(u8::from(applied.deleted));
            entry.extend_from_slice(&applied.position);
            self.writes.puts.push((key.to_vec(), entry));
            let (mut values, retract) = match change {
                // Encoded by the shard from the decoded row, so it decodes; NULLs otherwise.
                Some(values) => (decode_key(&values).unwrap_or_default(), false),
                None => (Vec::new(), true),
            };
            values.resize(self.spec.value_width, crate::types::Value::Null);
            out.push(OutputRow {
                window_start: 0,
                window_end: 0,
                key: key.to_vec(),
                values,
                retract,
            });
        }
    }

    pub fn take_writes(&mut self) -> Vec<TableWrites> {
        vec![std::mem::take(&mut self.writes)]
    }

    /// Changes skipped since the last call.
    pub fn take_skipped(&mut self) -> u64 {
        std::mem::take(&mut self.skipped)
    }

    /// Keys held, deleted ones included.
    pub fn open_keys(&self) -> usize {
        self.keys.len()
    }
}

#[cfg(test)]
mod tests;
