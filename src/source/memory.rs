//! A source held in memory: partitions of payloads, read in order, with positions stored
//! like Kafka offsets (topic = the source's name). It lets a shard be run and tested without
//! a broker.

use std::rc::Rc;

use super::{InputInfo, Polled};
use crate::state::{PartitionPosition, Recovered};
use crate::types::EventTime;

#[derive(Debug, Clone)]
pub struct MemorySource {
    source: usize,
    name: String,
    partitions: Vec<Vec<Vec<u8>>>,
    /// Per partition: the next record to read.
    next: Vec<usize>,
    restored_max_event_time: Vec<Option<EventTime>>,
}

impl MemorySource {
    /// `partitions[p]` holds partition p's payloads in offset order; `source` is the index of
    /// the configured source whose schema they follow, `name` labels its positions.
    pub fn new(source: usize, name: &str, partitions: Vec<Vec<Vec<u8>>>) -> MemorySource {
        let n = partitions.len();
        MemorySource {
            source,
            name: name.to_string(),
            partitions,
            next: vec![0; n],
            restored_max_event_time: vec![None; n],
        }
    }

    /// Continues from the positions of the last flushed epoch.
    pub(super) fn resume(&mut self, recovered: &Recovered) {
        for p in 0..self.partitions.len() {
            if let Some(stored) = recovered.positions.get(&(self.name.clone(), p as i32)) {
                self.next[p] = (stored.next_offset.max(0) as usize).min(self.partitions[p].len());
                self.restored_max_event_time[p] = stored.max_event_time;
            }
        }
    }

    pub(super) fn inputs(&self) -> Vec<InputInfo> {
        let label: Rc<str> = self.name.as_str().into();
        (0..self.partitions.len())
            .map(|p| InputInfo {
                source: self.source,
                partition: p as i32,
                label: label.clone(),
                restored_max_event_time: self.restored_max_event_time[p],
                carried: false,
            })
            .collect()
    }

    /// Up to `max` records, taken from the partitions in turn.
    pub(super) fn poll(&mut self, max: usize, mut on: impl FnMut(Polled<'_>)) -> usize {
        let mut n = 0;
        while n < max {
            let before = n;
            for (p, records) in self.partitions.iter().enumerate() {
                let Some(payload) = records.get(self.next[p]) else { continue };
                on(Polled::record(p, self.next[p] as i64, payload));
                self.next[p] += 1;
                n += 1;
                if n == max {
                    break;
                }
            }
            if n == before {
                break;
            }
        }
        n
    }

    pub(super) fn input_count(&self) -> usize {
        self.partitions.len()
    }

    pub(super) fn lag(&self, input: usize) -> i64 {
        (self.partitions[input].len() - self.next[input]) as i64
    }

    pub(super) fn positions(&self, max_event_time: impl Fn(usize) -> Option<EventTime>, out: &mut Vec<PartitionPosition>) {
        out.extend((0..self.partitions.len()).map(|p| PartitionPosition {
            topic: self.name.clone(),
            partition: p as i32,
            next_offset: self.next[p] as i64,
            max_event_time: max_event_time(p),
        }));
    }
}
