//! The record format of repartition topics (written by `crate::scale::repartition`, read by
//! the tasks' Kafka sources): a record is the source's message, unchanged, with headers naming
//! its source partition, its offset there and the partition's largest event time before it;
//! a marker has no payload and says a source partition's largest event time and whether it
//! is idle.

use rdkafka::message::{BorrowedHeaders, Header, Headers, OwnedHeaders};

use super::Carried;
use crate::types::EventTime;

/// The source partition a record or marker comes from (i32, big endian).
pub const FROM_HEADER: &str = "tidemark.from";
/// The record's offset in its source partition (i64, big endian).
pub const OFFSET_HEADER: &str = "tidemark.offset";
/// The source partition's largest event time before the record, or as of the marker (i64
/// microseconds, big endian; absent before its first event).
pub const MAX_HEADER: &str = "tidemark.max";
/// Present on markers: one byte, 1 when the source partition is idle.
pub const MARK_HEADER: &str = "tidemark.mark";

/// The headers of a record (`offset` set) or of a marker (`mark` set) of a repartition topic.
pub fn write_headers(from: i32, offset: Option<i64>, max: Option<EventTime>, mark: Option<bool>) -> OwnedHeaders {
    let mut headers = OwnedHeaders::new_with_capacity(3).insert(Header {
        key: FROM_HEADER,
        value: Some(&from.to_be_bytes()[..]),
    });
    if let Some(o) = offset {
        headers = headers.insert(Header {
            key: OFFSET_HEADER,
            value: Some(&o.to_be_bytes()[..]),
        });
    }
    if let Some(m) = max {
        headers = headers.insert(Header {
            key: MAX_HEADER,
            value: Some(&m.to_be_bytes()[..]),
        });
    }
    if let Some(idle) = mark {
        headers = headers.insert(Header {
            key: MARK_HEADER,
            value: Some(&[idle as u8][..]),
        });
    }
    headers
}

/// (source partition, offset there, what came with it) from the headers of a record of a
/// repartition topic; `None` when they name no source partition.
pub fn read_headers(headers: Option<&BorrowedHeaders>) -> Option<(i32, Option<i64>, Carried)> {
    let (mut from, mut offset, mut max_before, mut mark) = (None, None, None, None);
    for h in headers?.iter() {
        let value = h.value.unwrap_or(&[]);
        match h.key {
            FROM_HEADER => from = value.try_into().ok().map(i32::from_be_bytes),
            OFFSET_HEADER => offset = value.try_into().ok().map(i64::from_be_bytes),
            MAX_HEADER => max_before = value.try_into().ok().map(EventTime::from_be_bytes),
            MARK_HEADER => mark = Some(value.first() == Some(&1)),
            _ => {}
        }
    }
    Some((from?, offset, Carried { max_before, mark }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_and_markers_carry_their_source_partition_and_clock() {
        let record = write_headers(3, Some(41), Some(1_700_000_000_000_000), None);
        assert_eq!(
            read_headers(Some(record.as_borrowed())),
            Some((
                3,
                Some(41),
                Carried {
                    max_before: Some(1_700_000_000_000_000),
                    mark: None
                }
            ))
        );
        let first = write_headers(0, Some(0), None, None);
        assert_eq!(
            read_headers(Some(first.as_borrowed())),
            Some((0, Some(0), Carried { max_before: None, mark: None }))
        );
        for idle in [false, true] {
            let marker = write_headers(2, None, Some(-5), Some(idle));
            assert_eq!(
                read_headers(Some(marker.as_borrowed())),
                Some((
                    2,
                    None,
                    Carried {
                        max_before: Some(-5),
                        mark: Some(idle)
                    }
                ))
            );
        }
        let foreign = OwnedHeaders::new().insert(Header {
            key: "trace",
            value: Some(&b"x"[..]),
        });
        assert_eq!(read_headers(Some(foreign.as_borrowed())), None, "a record from elsewhere names no partition");
        assert_eq!(read_headers(None), None);
    }
}
