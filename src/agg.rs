//! Aggregate functions whose accumulators can be updated per event, merged with each other and
//! encoded into the state store.
//!
//! A window operator keeps one [`Acc`] per aggregate and group key. Partial accumulators (from
//! another shard, or restored from RocksDB) are combined with [`Acc::merge`]; the merge laws are:
//!
//! - exact aggregates: `result(merge(a, b))` equals the result of one accumulator fed all of
//!   `a`'s and `b`'s inputs, independent of the split and of the merge order (float sums, averages
//!   and variances up to rounding, see below);
//! - sketches (`approx_count_distinct`, `approx_percentile`): the merged state is *identical* to
//!   the state of one sketch fed all inputs, so splitting never costs accuracy.
//!
//! # Inputs
//!
//! The caller turns each event's field into an [`In`]: numbers for the numeric functions,
//! key-encoded bytes ([`crate::types`] encoding) for the functions that work on any type. [`In::Skip`]
//! (the aggregate's FILTER rejected the row) has no effect at all; [`In::Null`] is ignored by every
//! function except `count()` without a field, which counts rows. Specs are checked once with
//! [`AggSpec::validate`]; feeding an accumulator an input of the wrong shape is a caller bug
//! (debug builds panic, release builds ignore the input).
//!
//! # Accumulators and their error bounds
//!
//! - `count`: a `u64`. Exact.
//! - `sum`: int input: row count and an `i64` sum that wraps on overflow (as Spark outside ANSI
//!   mode). Float input: row count and a Neumaier-compensated `f64` sum, so the result is within
//!   a few ulps of the exact sum of the inputs for realistic row counts and barely depends on how
//!   inputs were split between accumulators. Inf and NaN propagate as in IEEE arithmetic.
//! - `avg`: the compensated float sum and the count (ints are converted to `f64`); result
//!   `sum / count`.
//! - `min`/`max`: `Option<i64>` (int and timestamp input; timestamps come back as
//!   [`Value::Time`]) or `Option<f64>`. Floats are ordered totally so the result does not depend
//!   on arrival order: `-0.0 < +0.0`, and NaN sorts above `+inf` (as in Spark and PostgreSQL), so
//!   `max` is NaN if any input was NaN and `min` only if all were. Exact.
//! - `var_samp`/`var_pop`/`stddev_samp`/`stddev_pop`: count, mean and the sum of squared
//!   deviations `M2`, updated with Welford's algorithm and merged with Chan et al.'s parallel
//!   formula; both are numerically stable (no `Σx² − (Σx)²/n` cancellation). `var_samp` needs
//!   at least 2 values, `var_pop` at least 1, else NULL.
//! - `count_distinct`: the exact set of the key-encoded values. Memory grows with the number of
//!   distinct values; use `approx_count_distinct` for high cardinalities.
//! - `approx_count_distinct`: HyperLogLog with precision 14 (16384 one-byte registers), hash
//!   `xxh3_64` of the key-encoded value. While at most 2048 distinct hashes were seen the sketch
//!   is *sparse*: it keeps the sorted hashes themselves (at most 16 KiB) and the count is exact
//!   up to 64-bit hash collisions (probability about `n²/2⁶⁵`, negligible). Past that it turns
//!   into the dense registers, estimated with Ertl's improved raw estimator ("New cardinality
//!   estimation algorithms for HyperLogLog sketches", 2017), which is unbiased over the whole
//!   range without the empirical bias tables or the linear-counting switch of the classic
//!   estimator. Standard error `1.04/√16384 ≈ 0.81%`; the tests assert at most 2% at 100 to 1M
//!   distinct values. The state is a function of the *set* of hashes seen (sparse below the
//!   threshold, dense above), so merging is lossless.
//! - `approx_percentile`: a DDSketch-style sketch with relative accuracy `α = 0.01`. With
//!   `γ = (1 + α)/(1 − α)`, a value `x > 0` is counted in bin `i = ⌈log_γ x⌉`, which covers
//!   `(γ^(i−1), γ^i]` and is represented by `2γ^i/(γ + 1)`; negative values go to a mirrored
//!   store, zeros (and subnormal magnitudes below `f64::MIN_POSITIVE`) to a zero count, NaN to a
//!   NaN count sorted above `+inf` (as in `min`/`max`). The quantile is the lower nearest rank:
//!   the value `v` at 0-based rank `⌊p·(n−1)⌋` of the sorted inputs. **Bound**: the result `v̂`
//!   satisfies `|v̂ − v| ≤ α·|v|` (up to float rounding of the bin index, ~1e-15 relative), for
//!   every data set, every `p` and after any merges, because bins are merged by exact addition;
//!   a zero `v` is returned as exactly `0`. Memory: one bin per occupied bucket, about 115 bins
//!   per decade of magnitude (at most ~146 000 bins for inputs spanning all finite doubles).
//! - `first`/`last`: the `(event time, key-encoded value)` pair that is smallest (`first`) or
//!   largest (`last`) lexicographically, so ties in event time are broken by the encoded value
//!   and the result does not depend on arrival or merge order. NULL inputs are ignored (like
//!   Spark's `first(x, ignoreNulls = true)`). The result is the decoded value, of the input type.
//!
//! # Encoding
//!
//! Each accumulator is a kind tag byte followed by its body; a row of accumulators is their
//! concatenation, checked against the specs (tag per position, no trailing bytes), so state
//! written by a different query fails to decode rather than being misread. `uvarint` is LEB128,
//! `ivarint` is a zigzag-mapped `uvarint`, `f64` and `i64le` are 8 little-endian bytes.
//!
//! | tag | kind                   | body |
//! |-----|------------------------|------|
//! | 1   | count                  | `uvarint n` |
//! | 2   | sum (int)              | `uvarint n`, `ivarint sum` |
//! | 3   | sum (float)            | `uvarint n`, `f64 sum`, `f64 compensation` |
//! | 4   | avg                    | as sum (float) |
//! | 5–6 | min / max (int, time)  | `0` (empty) or `1`, `ivarint value` |
//! | 7–8 | min / max (float)      | `0` (empty) or `1`, `f64 value` |
//! | 9   | variance / stddev      | `uvarint n`, `f64 mean`, `f64 M2` |
//! | 10  | count_distinct         | `uvarint count`, then per value in strictly increasing byte order: `uvarint len`, bytes |
//! | 11  | approx_count_distinct  | `0`, `uvarint count ≤ 2048`, strictly increasing hashes as 8 bytes LE each; or `1`, 16384 register bytes (each ≤ 51) |
//! | 12  | approx_percentile      | `uvarint zeros`, `uvarint nans`, negative store, positive store; a store is `uvarint bins`, then per bin in increasing index order: the index (first as `ivarint`, then `uvarint` delta ≥ 1) and `uvarint count ≥ 1` |
//! | 13–14 | first / last         | `0` (empty) or `1`, `i64le event time`, `uvarint len`, one key-encoded value |
//!
//! Equal states encode to equal bytes (sets and bins are written in sorted order). Decoding never
//! panics and never allocates more than the input can justify; garbage yields [`AggDecodeError`].

use std::cmp::Ordering;
use std::collections::{BTreeMap, HashSet};
use std::fmt;

use xxhash_rust::xxh3::{xxh3_64, Xxh3DefaultBuilder};

use crate::types::FieldType;
use crate::types::{decode_key, EventTime, Value};

// ---------------------------------------------------------------------------------------------
// Functions and specs
// ---------------------------------------------------------------------------------------------

/// Aggregate function, as configured.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum AggFunc {
    Count,
    Sum,
    Min,
    Max,
    Avg,
    /// `sample`: divide by `n − 1` (`var_samp`), else by `n` (`var_pop`).
    Variance {
        sample: bool,
    },
    /// Square root of the matching variance.
    Stddev {
        sample: bool,
    },
    CountDistinct,
    ApproxCountDistinct,
    /// Lower-nearest-rank quantile, `p` in `0.0..=1.0`.
    ApproxPercentile {
        p: f64,
    },
    /// Value with the smallest event time.
    First,
    /// Value with the largest event time.
    Last,
}

impl AggFunc {
    /// The function's name as written in a pipeline config.
    pub fn name(&self) -> &'static str {
        match self {
            AggFunc::Count => "count",
            AggFunc::Sum => "sum",
            AggFunc::Min => "min",
            AggFunc::Max => "max",
            AggFunc::Avg => "avg",
            AggFunc::Variance { sample: true } => "var_samp",
            AggFunc::Variance { sample: false } => "var_pop",
            AggFunc::Stddev { sample: true } => "stddev_samp",
            AggFunc::Stddev { sample: false } => "stddev_pop",
            AggFunc::CountDistinct => "count_distinct",
            AggFunc::ApproxCountDistinct => "approx_count_distinct",
            AggFunc::ApproxPercentile { .. } => "approx_percentile",
            AggFunc::First => "first",
            AggFunc::Last => "last",
        }
    }

    /// Whether the caller passes key-encoded bytes ([`In::Bytes`]) rather than numbers.
    pub fn takes_bytes(&self) -> bool {
        matches!(self, AggFunc::CountDistinct | AggFunc::ApproxCountDistinct | AggFunc::First | AggFunc::Last)
    }
}

/// One aggregate: function and the type of its input field.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AggSpec {
    pub func: AggFunc,
    /// Type of the input field; `None` only for `count` without a field (counts rows).
    pub input: Option<FieldType>,
}

fn type_name(t: FieldType) -> &'static str {
    match t {
        FieldType::String => "string",
        FieldType::Int => "int",
        FieldType::Float => "float",
        FieldType::Bool => "bool",
        FieldType::Timestamp => "timestamp",
    }
}

impl AggSpec {
    /// Type of the result column (for a spec that passed [`AggSpec::validate`]).
    pub fn output_type(&self) -> FieldType {
        match self.func {
            AggFunc::Count | AggFunc::CountDistinct | AggFunc::ApproxCountDistinct => FieldType::Int,
            AggFunc::Avg | AggFunc::Variance { .. } | AggFunc::Stddev { .. } | AggFunc::ApproxPercentile { .. } => FieldType::Float,
            AggFunc::Sum if self.input == Some(FieldType::Float) => FieldType::Float,
            AggFunc::Sum => FieldType::Int,
            AggFunc::Min | AggFunc::Max | AggFunc::First | AggFunc::Last => self.input.unwrap_or(FieldType::Int),
        }
    }

    /// Checks that the function can be applied to the input type; the message says what is
    /// wrong and what would work.
    pub fn validate(&self) -> Result<(), String> {
        let name = self.func.name();
        let Some(input) = self.input else {
            return match self.func {
                AggFunc::Count => Ok(()),
                _ => Err(format!("`{name}` needs an input field; only `count` may omit it (it then counts rows)")),
            };
        };
        let numeric = matches!(input, FieldType::Int | FieldType::Float);
        match self.func {
            AggFunc::Count | AggFunc::CountDistinct | AggFunc::ApproxCountDistinct | AggFunc::First | AggFunc::Last => Ok(()),
            AggFunc::Min | AggFunc::Max => match input {
                FieldType::Int | FieldType::Float | FieldType::Timestamp => Ok(()),
                _ => Err(format!(
                    "`{name}` needs an int, float or timestamp field, not a {} field; use `first`/`last` for the earliest/latest value by event time",
                    type_name(input)
                )),
            },
            AggFunc::Sum | AggFunc::Avg | AggFunc::Variance { .. } | AggFunc::Stddev { .. } | AggFunc::ApproxPercentile { .. } if !numeric => {
                let hint = if input == FieldType::Timestamp {
                    "for timestamps use `min`, `max`, `first` or `last`"
                } else {
                    "`count`, `count_distinct`, `approx_count_distinct`, `first` and `last` work on any type"
                };
                Err(format!("`{name}` needs an int or float field, not a {} field; {hint}", type_name(input)))
            }
            AggFunc::ApproxPercentile { p } if !(0.0..=1.0).contains(&p) => Err(format!(
                "`{name}` needs a percentile p between 0.0 and 1.0 (e.g. 0.95 for the 95th percentile), got {p}"
            )),
            AggFunc::Sum | AggFunc::Avg | AggFunc::Variance { .. } | AggFunc::Stddev { .. } | AggFunc::ApproxPercentile { .. } => Ok(()),
        }
    }

    /// An empty accumulator for this (validated) spec.
    pub fn new_acc(&self) -> Acc {
        match self.kind() {
            Kind::Count => Acc::Count(0),
            Kind::SumInt => Acc::SumInt { n: 0, sum: 0 },
            Kind::SumFloat => Acc::SumFloat(FloatSum::default()),
            Kind::Avg => Acc::Avg(FloatSum::default()),
            Kind::MinInt => Acc::MinInt(None),
            Kind::MaxInt => Acc::MaxInt(None),
            Kind::MinFloat => Acc::MinFloat(None),
            Kind::MaxFloat => Acc::MaxFloat(None),
            Kind::Moments => Acc::Moments(Moments::default()),
            Kind::Distinct => Acc::Distinct(Box::default()),
            Kind::Hll => Acc::Hll(Box::default()),
            Kind::Quantiles => Acc::Quantiles(Box::default()),
            Kind::First => Acc::First(None),
            Kind::Last => Acc::Last(None),
        }
    }

    fn kind(&self) -> Kind {
        let float = self.input == Some(FieldType::Float);
        match self.func {
            AggFunc::Count => Kind::Count,
            AggFunc::Sum if float => Kind::SumFloat,
            AggFunc::Sum => Kind::SumInt,
            AggFunc::Avg => Kind::Avg,
            AggFunc::Min if float => Kind::MinFloat,
            AggFunc::Min => Kind::MinInt,
            AggFunc::Max if float => Kind::MaxFloat,
            AggFunc::Max => Kind::MaxInt,
            AggFunc::Variance { .. } | AggFunc::Stddev { .. } => Kind::Moments,
            AggFunc::CountDistinct => Kind::Distinct,
            AggFunc::ApproxCountDistinct => Kind::Hll,
            AggFunc::ApproxPercentile { .. } => Kind::Quantiles,
            AggFunc::First => Kind::First,
            AggFunc::Last => Kind::Last,
        }
    }
}

/// The accumulator layout; its discriminant is the tag byte of the encoding (never renumber).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Count = 1,
    SumInt = 2,
    SumFloat = 3,
    Avg = 4,
    MinInt = 5,
    MaxInt = 6,
    MinFloat = 7,
    MaxFloat = 8,
    Moments = 9,
    Distinct = 10,
    Hll = 11,
    Quantiles = 12,
    First = 13,
    Last = 14,
}

impl Kind {
    const ALL: [Kind; 14] = [
        Kind::Count,
        Kind::SumInt,
        Kind::SumFloat,
        Kind::Avg,
        Kind::MinInt,
        Kind::MaxInt,
        Kind::MinFloat,
        Kind::MaxFloat,
        Kind::Moments,
        Kind::Distinct,
        Kind::Hll,
        Kind::Quantiles,
        Kind::First,
        Kind::Last,
    ];

    fn from_tag(tag: u8) -> Option<Kind> {
        Kind::ALL.into_iter().find(|k| *k as u8 == tag)
    }

    fn name(self) -> &'static str {
        match self {
            Kind::Count => "count",
            Kind::SumInt => "sum(int)",
            Kind::SumFloat => "sum(float)",
            Kind::Avg => "avg",
            Kind::MinInt => "min(int)",
            Kind::MaxInt => "max(int)",
            Kind::MinFloat => "min(float)",
            Kind::MaxFloat => "max(float)",
            Kind::Moments => "variance/stddev",
            Kind::Distinct => "count_distinct",
            Kind::Hll => "approx_count_distinct",
            Kind::Quantiles => "approx_percentile",
            Kind::First => "first",
            Kind::Last => "last",
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Inputs and accumulators
// ---------------------------------------------------------------------------------------------

/// One input value for one aggregate, as produced per event.
///
/// Which variant the caller passes depends on the function ([`AggFunc::takes_bytes`]):
/// - `count_distinct`, `approx_count_distinct`, `first`, `last` (any input type): [`In::Bytes`]
///   with the value key-encoded as one component (`crate::types::encode_key_value`);
/// - `sum`, `avg`, `min`, `max`, variance, stddev, `approx_percentile`: [`In::Int`] for int and
///   timestamp fields, [`In::Float`] for float fields (an `Int` is also accepted where the
///   accumulator is float-based);
/// - `count`: any non-null variant counts;
/// - all of them: [`In::Null`] or [`In::Skip`].
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum In<'a> {
    /// The aggregate's FILTER rejected this row: no effect at all (not even on `count`).
    Skip,
    /// Field null or missing: `count(field)` and every other function ignore it; `count()`
    /// (input `None`) counts it, because it counts rows.
    Null,
    /// Int and timestamp fields.
    Int(i64),
    Float(f64),
    /// A key-encoded value ([`crate::types`] encoding, one component).
    Bytes(&'a [u8]),
}

/// Accumulator of one aggregate for one group. Variants for the common numeric functions are
/// inline (the enum is at most 32 bytes); the large states are boxed.
#[derive(Debug, Clone, PartialEq)]
pub enum Acc {
    Count(u64),
    SumInt { n: u64, sum: i64 },
    SumFloat(FloatSum),
    Avg(FloatSum),
    MinInt(Option<i64>),
    MaxInt(Option<i64>),
    MinFloat(Option<f64>),
    MaxFloat(Option<f64>),
    Moments(Moments),
    Distinct(Box<DistinctSet>),
    Hll(Box<Hll>),
    Quantiles(Box<QuantileSketch>),
    First(Option<Box<Stamped>>),
    Last(Option<Box<Stamped>>),
}

impl Acc {
    fn kind(&self) -> Kind {
        match self {
            Acc::Count(_) => Kind::Count,
            Acc::SumInt { .. } => Kind::SumInt,
            Acc::SumFloat(_) => Kind::SumFloat,
            Acc::Avg(_) => Kind::Avg,
            Acc::MinInt(_) => Kind::MinInt,
            Acc::MaxInt(_) => Kind::MaxInt,
            Acc::MinFloat(_) => Kind::MinFloat,
            Acc::MaxFloat(_) => Kind::MaxFloat,
            Acc::Moments(_) => Kind::Moments,
            Acc::Distinct(_) => Kind::Distinct,
            Acc::Hll(_) => Kind::Hll,
            Acc::Quantiles(_) => Kind::Quantiles,
            Acc::First(_) => Kind::First,
            Acc::Last(_) => Kind::Last,
        }
    }

    /// Adds one event's input. `event_time` is only used by `first`/`last`.
    #[inline]
    pub fn update(&mut self, spec: &AggSpec, x: In<'_>, event_time: EventTime) {
        debug_assert_eq!(self.kind(), spec.kind(), "accumulator does not belong to {spec:?}");
        match (self, x) {
            (_, In::Skip) => {}
            (Acc::Count(n), In::Null) => {
                if spec.input.is_none() {
                    *n = n.saturating_add(1);
                }
            }
            (Acc::Count(n), _) => *n = n.saturating_add(1),
            (_, In::Null) => {}
            (Acc::SumInt { n, sum }, In::Int(v)) => {
                *n = n.saturating_add(1);
                // Wraps on overflow, as Spark does outside ANSI mode: a sum must not fail a window.
                *sum = sum.wrapping_add(v);
            }
            (Acc::SumFloat(s) | Acc::Avg(s), In::Int(v)) => s.add(v as f64),
            (Acc::SumFloat(s) | Acc::Avg(s), In::Float(v)) => s.add(v),
            (Acc::MinInt(m), In::Int(v)) => *m = Some(m.map_or(v, |c| c.min(v))),
            (Acc::MaxInt(m), In::Int(v)) => *m = Some(m.map_or(v, |c| c.max(v))),
            (Acc::MinFloat(m), In::Int(v)) => keep_float(m, v as f64, Ordering::Less),
            (Acc::MinFloat(m), In::Float(v)) => keep_float(m, v, Ordering::Less),
            (Acc::MaxFloat(m), In::Int(v)) => keep_float(m, v as f64, Ordering::Greater),
            (Acc::MaxFloat(m), In::Float(v)) => keep_float(m, v, Ordering::Greater),
            (Acc::Moments(m), In::Int(v)) => m.add(v as f64),
            (Acc::Moments(m), In::Float(v)) => m.add(v),
            (Acc::Distinct(set), In::Bytes(b)) => set.insert(b),
            (Acc::Hll(h), In::Bytes(b)) => h.insert_hash(xxh3_64(b)),
            (Acc::Quantiles(q), In::Int(v)) => q.insert(v as f64),
            (Acc::Quantiles(q), In::Float(v)) => q.insert(v),
            (Acc::First(slot), In::Bytes(b)) => Stamped::offer(slot, event_time, b, Ordering::Less),
            (Acc::Last(slot), In::Bytes(b)) => Stamped::offer(slot, event_time, b, Ordering::Greater),
            (acc, x) => debug_assert!(false, "input {x:?} does not fit a {} accumulator (caller bug)", acc.kind().name()),
        }
    }

    /// Folds `other` (a partial state of the same spec) into `self`.
    pub fn merge(&mut self, spec: &AggSpec, other: &Acc) {
        debug_assert_eq!(self.kind(), spec.kind(), "accumulator does not belong to {spec:?}");
        match (self, other) {
            (Acc::Count(a), Acc::Count(b)) => *a = a.saturating_add(*b),
            (Acc::SumInt { n, sum }, Acc::SumInt { n: n2, sum: s2 }) => {
                *n = n.saturating_add(*n2);
                *sum = sum.wrapping_add(*s2);
            }
            (Acc::SumFloat(a), Acc::SumFloat(b)) | (Acc::Avg(a), Acc::Avg(b)) => a.merge(b),
            (Acc::MinInt(a), Acc::MinInt(b)) => *a = (*a).into_iter().chain(*b).min(),
            (Acc::MaxInt(a), Acc::MaxInt(b)) => *a = (*a).into_iter().chain(*b).max(),
            (Acc::MinFloat(a), Acc::MinFloat(b)) => b.iter().for_each(|&v| keep_float(a, v, Ordering::Less)),
            (Acc::MaxFloat(a), Acc::MaxFloat(b)) => b.iter().for_each(|&v| keep_float(a, v, Ordering::Greater)),
            (Acc::Moments(a), Acc::Moments(b)) => a.merge(b),
            (Acc::Distinct(a), Acc::Distinct(b)) => a.merge(b),
            (Acc::Hll(a), Acc::Hll(b)) => a.merge(b),
            (Acc::Quantiles(a), Acc::Quantiles(b)) => a.merge(b),
            (Acc::First(a), Acc::First(Some(b))) => Stamped::offer(a, b.time, &b.key, Ordering::Less),
            (Acc::Last(a), Acc::Last(Some(b))) => Stamped::offer(a, b.time, &b.key, Ordering::Greater),
            (Acc::First(_), Acc::First(None)) | (Acc::Last(_), Acc::Last(None)) => {}
            (a, b) => debug_assert!(false, "cannot merge a {} accumulator into a {} one", b.kind().name(), a.kind().name()),
        }
    }

    /// The aggregate's value: NULL when no value was aggregated (except the counts, which are 0).
    pub fn result(&self, spec: &AggSpec) -> Value {
        let int_or_time = |v: i64| {
            if spec.input == Some(FieldType::Timestamp) {
                Value::Time(v)
            } else {
                Value::Int(v)
            }
        };
        let float = |v: Option<f64>| v.map_or(Value::Null, Value::Float);
        match self {
            Acc::Count(n) => Value::Int(i64::try_from(*n).unwrap_or(i64::MAX)),
            Acc::SumInt { n: 0, .. } => Value::Null,
            Acc::SumInt { sum, .. } => Value::Int(*sum),
            Acc::SumFloat(s) => float((s.n > 0).then(|| s.total())),
            Acc::Avg(s) => float((s.n > 0).then(|| s.total() / s.n as f64)),
            Acc::MinInt(v) | Acc::MaxInt(v) => v.map_or(Value::Null, int_or_time),
            Acc::MinFloat(v) | Acc::MaxFloat(v) => float(*v),
            Acc::Moments(m) => match spec.func {
                AggFunc::Variance { sample } => float(m.variance(sample)),
                AggFunc::Stddev { sample } => float(m.variance(sample).map(f64::sqrt)),
                _ => Value::Null,
            },
            Acc::Distinct(set) => Value::Int(i64::try_from(set.len()).unwrap_or(i64::MAX)),
            Acc::Hll(h) => Value::Int(h.estimate().round() as i64),
            Acc::Quantiles(q) => match spec.func {
                AggFunc::ApproxPercentile { p } => float(q.quantile(p)),
                _ => Value::Null,
            },
            Acc::First(slot) | Acc::Last(slot) => slot.as_ref().map_or(Value::Null, |s| s.value()),
        }
    }

    /// Appends the encoding (see the module docs) to `out`.
    pub fn encode(&self, out: &mut Vec<u8>) {
        out.push(self.kind() as u8);
        match self {
            Acc::Count(n) => put_uvarint(out, *n),
            Acc::SumInt { n, sum } => {
                put_uvarint(out, *n);
                put_ivarint(out, *sum);
            }
            Acc::SumFloat(s) | Acc::Avg(s) => {
                put_uvarint(out, s.n);
                out.extend_from_slice(&s.sum.to_le_bytes());
                out.extend_from_slice(&s.comp.to_le_bytes());
            }
            Acc::MinInt(v) | Acc::MaxInt(v) => match v {
                None => out.push(0),
                Some(v) => {
                    out.push(1);
                    put_ivarint(out, *v);
                }
            },
            Acc::MinFloat(v) | Acc::MaxFloat(v) => match v {
                None => out.push(0),
                Some(v) => {
                    out.push(1);
                    out.extend_from_slice(&v.to_le_bytes());
                }
            },
            Acc::Moments(m) => {
                put_uvarint(out, m.n);
                out.extend_from_slice(&m.mean.to_le_bytes());
                out.extend_from_slice(&m.m2.to_le_bytes());
            }
            Acc::Distinct(set) => set.encode(out),
            Acc::Hll(h) => h.encode(out),
            Acc::Quantiles(q) => q.encode(out),
            Acc::First(slot) | Acc::Last(slot) => match slot {
                None => out.push(0),
                Some(s) => {
                    out.push(1);
                    out.extend_from_slice(&s.time.to_le_bytes());
                    put_uvarint(out, s.key.len() as u64);
                    out.extend_from_slice(&s.key);
                }
            },
        }
    }

    /// Decodes one accumulator of `spec` from the front of `input` and advances it.
    pub fn decode(spec: &AggSpec, input: &mut &[u8]) -> Result<Acc, AggDecodeError> {
        let expected = spec.kind();
        let tag = get_u8(input, "accumulator tag")?;
        if tag != expected as u8 {
            let found = Kind::from_tag(tag).map_or("unknown", Kind::name);
            return Err(AggDecodeError::KindMismatch {
                expected: expected.name(),
                found,
                tag,
            });
        }
        Ok(match expected {
            Kind::Count => Acc::Count(get_uvarint(input, "count")?),
            Kind::SumInt => Acc::SumInt {
                n: get_uvarint(input, "sum count")?,
                sum: get_ivarint(input, "sum")?,
            },
            Kind::SumFloat => Acc::SumFloat(FloatSum::decode(input)?),
            Kind::Avg => Acc::Avg(FloatSum::decode(input)?),
            Kind::MinInt => Acc::MinInt(get_option(input, |i| get_ivarint(i, "min"))?),
            Kind::MaxInt => Acc::MaxInt(get_option(input, |i| get_ivarint(i, "max"))?),
            Kind::MinFloat => Acc::MinFloat(get_option(input, |i| get_f64(i, "min"))?),
            Kind::MaxFloat => Acc::MaxFloat(get_option(input, |i| get_f64(i, "max"))?),
            Kind::Moments => Acc::Moments(Moments {
                n: get_uvarint(input, "variance count")?,
                mean: get_f64(input, "variance mean")?,
                m2: get_f64(input, "variance M2")?,
            }),
            Kind::Distinct => Acc::Distinct(Box::new(DistinctSet::decode(input)?)),
            Kind::Hll => Acc::Hll(Box::new(Hll::decode(input)?)),
            Kind::Quantiles => Acc::Quantiles(Box::new(QuantileSketch::decode(input)?)),
            Kind::First => Acc::First(get_option(input, Stamped::decode)?),
            Kind::Last => Acc::Last(get_option(input, Stamped::decode)?),
        })
    }
}

/// Encodes a whole row of accumulators (their concatenation).
pub fn encode_accs(accs: &[Acc], out: &mut Vec<u8>) {
    for acc in accs {
        acc.encode(out);
    }
}

/// Decodes a row written by [`encode_accs`] for `specs`; trailing bytes are an error.
pub fn decode_accs(specs: &[AggSpec], bytes: &[u8]) -> Result<Vec<Acc>, AggDecodeError> {
    let mut input = bytes;
    let accs = specs.iter().map(|spec| Acc::decode(spec, &mut input)).collect::<Result<Vec<_>, _>>()?;
    if !input.is_empty() {
        return Err(AggDecodeError::TrailingBytes { count: input.len() });
    }
    Ok(accs)
}

/// Aggregate state that this version cannot read: corruption, or state written for other
/// aggregates.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AggDecodeError {
    #[error("aggregate state is truncated (while reading {what})")]
    Truncated { what: &'static str },
    #[error(
        "aggregate state holds a `{found}` accumulator (tag {tag}) where `{expected}` was expected (did the query's aggregates change? use a new state_dir)"
    )]
    KindMismatch { expected: &'static str, found: &'static str, tag: u8 },
    #[error("aggregate state is corrupt: {what}")]
    Invalid { what: &'static str },
    #[error("aggregate state has {count} unexpected trailing bytes (did the query's aggregates change? use a new state_dir)")]
    TrailingBytes { count: usize },
}

// ---------------------------------------------------------------------------------------------
// Numeric states
// ---------------------------------------------------------------------------------------------

/// Count and Neumaier-compensated sum of floats (for `sum` over floats and `avg`).
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct FloatSum {
    n: u64,
    sum: f64,
    /// Low-order bits lost by `sum`; added back at the end.
    comp: f64,
}

impl FloatSum {
    #[inline]
    fn add(&mut self, x: f64) {
        self.n = self.n.saturating_add(1);
        self.add_value(x);
    }

    #[inline]
    fn add_value(&mut self, x: f64) {
        let t = self.sum + x;
        // Once the sum is inf or NaN the compensation is meaningless (inf − inf = NaN would
        // poison an otherwise correct inf result), so it is only tracked while finite.
        if t.is_finite() {
            let c = if self.sum.abs() >= x.abs() { (self.sum - t) + x } else { (x - t) + self.sum };
            self.comp += c;
        }
        self.sum = t;
    }

    fn merge(&mut self, other: &FloatSum) {
        self.n = self.n.saturating_add(other.n);
        self.add_value(other.sum);
        self.comp += other.comp;
    }

    fn total(&self) -> f64 {
        self.sum + self.comp
    }

    fn decode(input: &mut &[u8]) -> Result<FloatSum, AggDecodeError> {
        Ok(FloatSum {
            n: get_uvarint(input, "sum count")?,
            sum: get_f64(input, "sum")?,
            comp: get_f64(input, "sum compensation")?,
        })
    }
}

/// Orders floats totally for min/max: NaN above everything, `-0.0 < +0.0`, so the kept value
/// does not depend on input order.
fn float_order(a: f64, b: f64) -> Ordering {
    match (a.is_nan(), b.is_nan()) {
        (true, true) => Ordering::Equal,
        (true, false) => Ordering::Greater,
        (false, true) => Ordering::Less,
        (false, false) => a.total_cmp(&b),
    }
}

#[inline]
fn keep_float(slot: &mut Option<f64>, x: f64, want: Ordering) {
    match slot {
        Some(cur) if float_order(x, *cur) != want => {}
        _ => *slot = Some(x),
    }
}

/// Count, mean and sum of squared deviations (Welford), for variance and stddev.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Moments {
    n: u64,
    mean: f64,
    m2: f64,
}

impl Moments {
    #[inline]
    fn add(&mut self, x: f64) {
        self.n = self.n.saturating_add(1);
        let delta = x - self.mean;
        self.mean += delta / self.n as f64;
        self.m2 += delta * (x - self.mean);
    }

    /// Chan, Golub & LeVeque's pairwise combination of two partial (n, mean, M2).
    fn merge(&mut self, other: &Moments) {
        if other.n == 0 {
            return;
        }
        if self.n == 0 {
            *self = *other;
            return;
        }
        let n = self.n.saturating_add(other.n);
        let (na, nb, nf) = (self.n as f64, other.n as f64, n as f64);
        let delta = other.mean - self.mean;
        self.mean += delta * (nb / nf);
        self.m2 += other.m2 + delta * delta * (na * nb / nf);
        self.n = n;
    }

    fn variance(&self, sample: bool) -> Option<f64> {
        let denominator = if sample { self.n.checked_sub(1)? } else { self.n };
        if denominator == 0 {
            return None;
        }
        // M2 is a sum of squares; rounding can leave it a hair below zero, which would make
        // stddev NaN. (A NaN M2 from NaN inputs stays NaN.)
        let m2 = if self.m2 < 0.0 { 0.0 } else { self.m2 };
        Some(m2 / denominator as f64)
    }
}

// ---------------------------------------------------------------------------------------------
// count_distinct: exact set
// ---------------------------------------------------------------------------------------------

/// The distinct key-encoded values seen.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct DistinctSet {
    values: HashSet<Box<[u8]>, Xxh3DefaultBuilder>,
}

impl DistinctSet {
    #[inline]
    fn insert(&mut self, bytes: &[u8]) {
        // Look up first so that repeated values (the common case) do not allocate.
        if !self.values.contains(bytes) {
            self.values.insert(bytes.into());
        }
    }

    fn merge(&mut self, other: &DistinctSet) {
        for v in &other.values {
            self.insert(v);
        }
    }

    fn len(&self) -> usize {
        self.values.len()
    }

    fn encode(&self, out: &mut Vec<u8>) {
        // Sorted, so that equal sets encode to equal bytes whatever the hash-set order.
        let mut sorted: Vec<&[u8]> = self.values.iter().map(|v| &v[..]).collect();
        sorted.sort_unstable();
        put_uvarint(out, sorted.len() as u64);
        for v in sorted {
            put_uvarint(out, v.len() as u64);
            out.extend_from_slice(v);
        }
    }

    fn decode(input: &mut &[u8]) -> Result<DistinctSet, AggDecodeError> {
        let count = get_uvarint(input, "distinct count")?;
        // Each value takes at least one byte, so the input bounds the believable capacity.
        let capacity = usize::try_from(count).unwrap_or(usize::MAX).min(input.len());
        let mut values = HashSet::with_capacity_and_hasher(capacity, Xxh3DefaultBuilder);
        let mut prev: Option<&[u8]> = None;
        for _ in 0..count {
            let len = get_len(input, "distinct value length")?;
            let v = take(input, len, "distinct value")?;
            if prev.is_some_and(|p| p >= v) {
                return Err(AggDecodeError::Invalid {
                    what: "distinct values not in strictly increasing order",
                });
            }
            prev = Some(v);
            values.insert(v.into());
        }
        Ok(DistinctSet { values })
    }
}

// ---------------------------------------------------------------------------------------------
// approx_count_distinct: HyperLogLog
// ---------------------------------------------------------------------------------------------

/// Precision: `2^14` registers.
const HLL_P: u32 = 14;
const HLL_M: usize = 1 << HLL_P;
/// Hash bits left after the register index; register values are `1..=HLL_Q + 1`.
const HLL_Q: u32 = 64 - HLL_P;
/// Up to this many distinct hashes are kept as they are (≤ 16 KiB, the size of the dense
/// registers), which makes small groups exact and cheap.
const HLL_SPARSE_MAX: usize = 2048;

/// HyperLogLog sketch, sparse (exact set of hashes) or dense (registers).
#[derive(Clone, PartialEq)]
pub struct Hll {
    repr: HllRepr,
}

#[derive(Clone, PartialEq)]
enum HllRepr {
    /// Sorted, distinct hashes; at most [`HLL_SPARSE_MAX`].
    Sparse(Vec<u64>),
    /// [`HLL_M`] registers, each the maximum rank seen for its index.
    Dense(Box<[u8]>),
}

impl Default for Hll {
    fn default() -> Self {
        Hll {
            repr: HllRepr::Sparse(Vec::new()),
        }
    }
}

impl fmt::Debug for Hll {
    // 16 KiB of registers would drown any debug output; the estimate says what matters.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.repr {
            HllRepr::Sparse(h) => write!(f, "Hll::Sparse({} hashes)", h.len()),
            HllRepr::Dense(_) => write!(f, "Hll::Dense(estimate {:.0})", self.estimate()),
        }
    }
}

impl Hll {
    #[inline]
    fn insert_hash(&mut self, hash: u64) {
        match &mut self.repr {
            HllRepr::Sparse(hashes) => {
                if let Err(at) = hashes.binary_search(&hash) {
                    hashes.insert(at, hash);
                    if hashes.len() > HLL_SPARSE_MAX {
                        self.densify();
                    }
                }
            }
            HllRepr::Dense(registers) => set_register(registers, hash),
        }
    }

    fn densify(&mut self) {
        if let HllRepr::Sparse(hashes) = &self.repr {
            let mut registers = vec![0u8; HLL_M].into_boxed_slice();
            for &h in hashes {
                set_register(&mut registers, h);
            }
            self.repr = HllRepr::Dense(registers);
        }
    }

    fn merge(&mut self, other: &Hll) {
        match (&mut self.repr, &other.repr) {
            (HllRepr::Sparse(a), HllRepr::Sparse(b)) => {
                let merged = merge_sorted_unique(a, b);
                *a = merged;
                if a.len() > HLL_SPARSE_MAX {
                    self.densify();
                }
            }
            (HllRepr::Dense(a), HllRepr::Sparse(b)) => b.iter().for_each(|&h| set_register(a, h)),
            (HllRepr::Sparse(_), HllRepr::Dense(_)) => {
                self.densify();
                self.merge(other);
            }
            (HllRepr::Dense(a), HllRepr::Dense(b)) => a.iter_mut().zip(b.iter()).for_each(|(x, &y)| *x = (*x).max(y)),
        }
    }

    /// Estimated number of distinct values.
    fn estimate(&self) -> f64 {
        let registers = match &self.repr {
            HllRepr::Sparse(hashes) => return hashes.len() as f64,
            HllRepr::Dense(registers) => registers,
        };
        // Ertl (2017), "improved raw estimator": a histogram of register values, with σ and τ
        // correcting for registers still at 0 and registers at the maximum rank.
        let mut histogram = [0u32; HLL_Q as usize + 2];
        for &r in registers.iter() {
            // Registers are ≤ HLL_Q + 1 by construction and by decode's check; clamp anyway.
            histogram[usize::from(r).min(HLL_Q as usize + 1)] += 1;
        }
        let m = HLL_M as f64;
        let q = HLL_Q as usize;
        let mut z = m * hll_tau(1.0 - f64::from(histogram[q + 1]) / m);
        for k in (1..=q).rev() {
            z = 0.5 * (z + f64::from(histogram[k]));
        }
        z += m * hll_sigma(f64::from(histogram[0]) / m);
        let alpha_inf = 0.5 / std::f64::consts::LN_2;
        alpha_inf * m * m / z
    }

    fn encode(&self, out: &mut Vec<u8>) {
        match &self.repr {
            HllRepr::Sparse(hashes) => {
                out.push(0);
                put_uvarint(out, hashes.len() as u64);
                for h in hashes {
                    out.extend_from_slice(&h.to_le_bytes());
                }
            }
            HllRepr::Dense(registers) => {
                out.push(1);
                out.extend_from_slice(registers);
            }
        }
    }

    fn decode(input: &mut &[u8]) -> Result<Hll, AggDecodeError> {
        match get_u8(input, "hll mode")? {
            0 => {
                let count = get_uvarint(input, "hll sparse count")?;
                if count > HLL_SPARSE_MAX as u64 {
                    return Err(AggDecodeError::Invalid {
                        what: "sparse hll holds more hashes than the sparse limit",
                    });
                }
                let mut hashes = Vec::with_capacity(count as usize);
                for _ in 0..count {
                    let h = get_u64(input, "hll hash")?;
                    if hashes.last().is_some_and(|&p| p >= h) {
                        return Err(AggDecodeError::Invalid {
                            what: "sparse hll hashes not in strictly increasing order",
                        });
                    }
                    hashes.push(h);
                }
                Ok(Hll { repr: HllRepr::Sparse(hashes) })
            }
            1 => {
                let registers = take(input, HLL_M, "hll registers")?;
                if registers.iter().any(|&r| u32::from(r) > HLL_Q + 1) {
                    return Err(AggDecodeError::Invalid {
                        what: "hll register above the maximum rank",
                    });
                }
                Ok(Hll {
                    repr: HllRepr::Dense(registers.into()),
                })
            }
            _ => Err(AggDecodeError::Invalid { what: "unknown hll mode" }),
        }
    }
}

/// Register index: the top `HLL_P` bits; rank: 1 + leading zeros of the remaining bits
/// (capped at `HLL_Q + 1` when they are all zero).
#[inline]
fn set_register(registers: &mut [u8], hash: u64) {
    let index = (hash >> HLL_Q) as usize;
    let rank = (hash << HLL_P).leading_zeros().min(HLL_Q) + 1;
    if let Some(r) = registers.get_mut(index) {
        *r = (*r).max(rank as u8);
    }
}

fn merge_sorted_unique(a: &[u64], b: &[u64]) -> Vec<u64> {
    let mut out = Vec::with_capacity(a.len() + b.len());
    let (mut i, mut j) = (0, 0);
    while i < a.len() && j < b.len() {
        match a[i].cmp(&b[j]) {
            Ordering::Less => {
                out.push(a[i]);
                i += 1;
            }
            Ordering::Greater => {
                out.push(b[j]);
                j += 1;
            }
            Ordering::Equal => {
                out.push(a[i]);
                i += 1;
                j += 1;
            }
        }
    }
    out.extend_from_slice(&a[i..]);
    out.extend_from_slice(&b[j..]);
    out
}

/// Ertl's σ(x) = x + Σ_{k≥1} x^(2^k) 2^(k−1), the correction for empty registers.
fn hll_sigma(x: f64) -> f64 {
    if x >= 1.0 {
        return f64::INFINITY;
    }
    let (mut x, mut y, mut z) = (x, 1.0, x);
    loop {
        x *= x;
        let previous = z;
        z += x * y;
        y += y;
        if z == previous {
            return z;
        }
    }
}

/// Ertl's τ(x), the correction for registers at the maximum rank.
fn hll_tau(x: f64) -> f64 {
    if x <= 0.0 || x >= 1.0 {
        return 0.0;
    }
    let (mut x, mut y, mut z) = (x, 1.0, 1.0 - x);
    loop {
        x = x.sqrt();
        let previous = z;
        y *= 0.5;
        z -= (1.0 - x).powi(2) * y;
        if z == previous {
            return z / 3.0;
        }
    }
}

// ---------------------------------------------------------------------------------------------
// approx_percentile: DDSketch-style log buckets
// ---------------------------------------------------------------------------------------------

/// Relative accuracy of [`QuantileSketch`].
const DD_ALPHA: f64 = 0.01;
const DD_GAMMA: f64 = (1.0 + DD_ALPHA) / (1.0 - DD_ALPHA);
/// Bin index of `+inf`.
const DD_INF_INDEX: i32 = i32::MAX;

/// Log-bucket quantile sketch with relative accuracy α = 0.01 (see the module docs).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct QuantileSketch {
    /// Zeros and subnormal magnitudes.
    zeros: u64,
    nans: u64,
    /// Bins of `|x|` for negative `x`.
    negative: BTreeMap<i32, u64>,
    positive: BTreeMap<i32, u64>,
}

/// `⌈log_γ x⌉` for `x ≥ f64::MIN_POSITIVE` (finite doubles give −36 000..=35 500).
#[inline]
fn dd_index(x: f64) -> i32 {
    if x == f64::INFINITY {
        return DD_INF_INDEX;
    }
    (x.ln() / DD_GAMMA.ln()).ceil() as i32
}

/// Representative of bin `i`: `2γ^i/(γ+1)`, within `α` of every value in `(γ^(i−1), γ^i]`.
fn dd_value(i: i32) -> f64 {
    if i == DD_INF_INDEX {
        return f64::INFINITY;
    }
    // Through exp/ln, because γ^i itself overflows for the top bins although the
    // representative (≈ γ^i(1 − α)) may not; a finite input's bin never yields inf.
    let v = (f64::from(i) * DD_GAMMA.ln() + (2.0 / (DD_GAMMA + 1.0)).ln()).exp();
    v.min(f64::MAX)
}

impl QuantileSketch {
    #[inline]
    fn insert(&mut self, x: f64) {
        if x.is_nan() {
            self.nans = self.nans.saturating_add(1);
        } else if x.abs() < f64::MIN_POSITIVE {
            self.zeros = self.zeros.saturating_add(1);
        } else {
            let store = if x > 0.0 { &mut self.positive } else { &mut self.negative };
            let count = store.entry(dd_index(x.abs())).or_insert(0);
            *count = count.saturating_add(1);
        }
    }

    fn merge(&mut self, other: &QuantileSketch) {
        self.zeros = self.zeros.saturating_add(other.zeros);
        self.nans = self.nans.saturating_add(other.nans);
        for (mine, theirs) in [(&mut self.negative, &other.negative), (&mut self.positive, &other.positive)] {
            for (&i, &c) in theirs {
                let count = mine.entry(i).or_insert(0);
                *count = count.saturating_add(c);
            }
        }
    }

    /// Estimate of the value at 0-based rank `⌊p·(n−1)⌋`; `None` when empty.
    fn quantile(&self, p: f64) -> Option<f64> {
        let n = self
            .negative
            .values()
            .chain(self.positive.values())
            .fold(self.zeros.saturating_add(self.nans), |a, &c| a.saturating_add(c));
        if n == 0 {
            return None;
        }
        // `as u64` saturates (NaN → 0), and the min keeps an out-of-range p at the ends.
        let rank = ((p * (n - 1) as f64).floor() as u64).min(n - 1);
        let mut seen = 0u64;
        // Ascending order: negatives by decreasing magnitude, zeros, positives, NaNs.
        for (&i, &c) in self.negative.iter().rev() {
            seen = seen.saturating_add(c);
            if seen > rank {
                return Some(-dd_value(i));
            }
        }
        seen = seen.saturating_add(self.zeros);
        if seen > rank {
            return Some(0.0);
        }
        for (&i, &c) in &self.positive {
            seen = seen.saturating_add(c);
            if seen > rank {
                return Some(dd_value(i));
            }
        }
        Some(f64::NAN)
    }

    fn encode(&self, out: &mut Vec<u8>) {
        put_uvarint(out, self.zeros);
        put_uvarint(out, self.nans);
        for store in [&self.negative, &self.positive] {
            put_uvarint(out, store.len() as u64);
            let mut prev: Option<i32> = None;
            for (&i, &c) in store {
                match prev {
                    None => put_ivarint(out, i64::from(i)),
                    Some(p) => put_uvarint(out, (i64::from(i) - i64::from(p)) as u64),
                }
                put_uvarint(out, c);
                prev = Some(i);
            }
        }
    }

    fn decode(input: &mut &[u8]) -> Result<QuantileSketch, AggDecodeError> {
        let zeros = get_uvarint(input, "percentile zero count")?;
        let nans = get_uvarint(input, "percentile NaN count")?;
        let negative = Self::decode_store(input)?;
        let positive = Self::decode_store(input)?;
        Ok(QuantileSketch {
            zeros,
            nans,
            negative,
            positive,
        })
    }

    fn decode_store(input: &mut &[u8]) -> Result<BTreeMap<i32, u64>, AggDecodeError> {
        let bins = get_uvarint(input, "percentile bin count")?;
        let mut store = BTreeMap::new();
        let mut prev: Option<i64> = None;
        for _ in 0..bins {
            let index = match prev {
                None => get_ivarint(input, "percentile bin index")?,
                Some(p) => {
                    let delta = get_uvarint(input, "percentile bin index")?;
                    if delta == 0 {
                        return Err(AggDecodeError::Invalid {
                            what: "percentile bins not in strictly increasing order",
                        });
                    }
                    i64::try_from(delta).ok().and_then(|d| p.checked_add(d)).ok_or(AggDecodeError::Invalid {
                        what: "percentile bin index out of range",
                    })?
                }
            };
            let i = i32::try_from(index).map_err(|_| AggDecodeError::Invalid {
                what: "percentile bin index out of range",
            })?;
            let count = get_uvarint(input, "percentile bin count")?;
            if count == 0 {
                return Err(AggDecodeError::Invalid { what: "empty percentile bin" });
            }
            store.insert(i, count);
            prev = Some(index);
        }
        Ok(store)
    }
}

// ---------------------------------------------------------------------------------------------
// first / last
// ---------------------------------------------------------------------------------------------

/// A key-encoded value and the event time it was seen at.
#[derive(Debug, Clone, PartialEq)]
pub struct Stamped {
    time: EventTime,
    key: Vec<u8>,
}

impl Stamped {
    /// Replaces the slot's value if `(time, bytes)` compares as `want` (Less for first, Greater
    /// for last) against it; reuses the buffer so a `last` over increasing times does not
    /// allocate per event.
    #[inline]
    fn offer(slot: &mut Option<Box<Stamped>>, time: EventTime, bytes: &[u8], want: Ordering) {
        match slot {
            None => *slot = Some(Box::new(Stamped { time, key: bytes.to_vec() })),
            Some(s) => {
                if (time, bytes).cmp(&(s.time, &s.key[..])) == want {
                    s.time = time;
                    s.key.clear();
                    s.key.extend_from_slice(bytes);
                }
            }
        }
    }

    fn value(&self) -> Value {
        // Decode validated the bytes; values from `update` come from the caller's encoder.
        decode_key(&self.key).ok().and_then(|v| v.into_iter().next()).unwrap_or(Value::Null)
    }

    fn decode(input: &mut &[u8]) -> Result<Box<Stamped>, AggDecodeError> {
        let time = get_u64(input, "first/last event time")? as i64;
        let len = get_len(input, "first/last value length")?;
        let key = take(input, len, "first/last value")?;
        match decode_key(key) {
            Ok(values) if values.len() == 1 => Ok(Box::new(Stamped { time, key: key.to_vec() })),
            _ => Err(AggDecodeError::Invalid {
                what: "first/last value is not one key-encoded value",
            }),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Byte-level helpers
// ---------------------------------------------------------------------------------------------

fn put_uvarint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push(v as u8 | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

fn put_ivarint(out: &mut Vec<u8>, v: i64) {
    put_uvarint(out, ((v << 1) ^ (v >> 63)) as u64);
}

fn take<'a>(input: &mut &'a [u8], n: usize, what: &'static str) -> Result<&'a [u8], AggDecodeError> {
    if input.len() < n {
        return Err(AggDecodeError::Truncated { what });
    }
    let (head, tail) = input.split_at(n);
    *input = tail;
    Ok(head)
}

fn get_u8(input: &mut &[u8], what: &'static str) -> Result<u8, AggDecodeError> {
    let (&b, rest) = input.split_first().ok_or(AggDecodeError::Truncated { what })?;
    *input = rest;
    Ok(b)
}

fn get_u64(input: &mut &[u8], what: &'static str) -> Result<u64, AggDecodeError> {
    let bytes = take(input, 8, what)?;
    let mut word = [0u8; 8];
    word.copy_from_slice(bytes);
    Ok(u64::from_le_bytes(word))
}

fn get_f64(input: &mut &[u8], what: &'static str) -> Result<f64, AggDecodeError> {
    get_u64(input, what).map(f64::from_bits)
}

fn get_uvarint(input: &mut &[u8], what: &'static str) -> Result<u64, AggDecodeError> {
    let mut v = 0u64;
    for shift in (0..64).step_by(7) {
        let b = get_u8(input, what)?;
        // The 10th byte may only carry the top bit of a u64.
        if shift == 63 && b > 1 {
            return Err(AggDecodeError::Invalid {
                what: "varint longer than 64 bits",
            });
        }
        v |= u64::from(b & 0x7f) << shift;
        if b & 0x80 == 0 {
            return Ok(v);
        }
    }
    Err(AggDecodeError::Invalid {
        what: "varint longer than 64 bits",
    })
}

fn get_ivarint(input: &mut &[u8], what: &'static str) -> Result<i64, AggDecodeError> {
    let u = get_uvarint(input, what)?;
    Ok((u >> 1) as i64 ^ -((u & 1) as i64))
}

/// A length prefix, which must fit in the remaining input.
fn get_len(input: &mut &[u8], what: &'static str) -> Result<usize, AggDecodeError> {
    let len = get_uvarint(input, what)?;
    match usize::try_from(len) {
        Ok(len) if len <= input.len() => Ok(len),
        _ => Err(AggDecodeError::Truncated { what }),
    }
}

fn get_option<T>(input: &mut &[u8], body: impl FnOnce(&mut &[u8]) -> Result<T, AggDecodeError>) -> Result<Option<T>, AggDecodeError> {
    match get_u8(input, "presence flag")? {
        0 => Ok(None),
        1 => body(input).map(Some),
        _ => Err(AggDecodeError::Invalid {
            what: "presence flag is neither 0 nor 1",
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::types::{encode_key_str, encode_key_value};
    use proptest::prelude::*;
    use proptest::sample::Index;
    use rand::{Rng, SeedableRng};
    use rand_chacha::ChaCha8Rng;
    use std::collections::BTreeSet;

    const ALL_FUNCS: [AggFunc; 18] = [
        AggFunc::Count,
        AggFunc::Sum,
        AggFunc::Min,
        AggFunc::Max,
        AggFunc::Avg,
        AggFunc::Variance { sample: true },
        AggFunc::Variance { sample: false },
        AggFunc::Stddev { sample: true },
        AggFunc::Stddev { sample: false },
        AggFunc::CountDistinct,
        AggFunc::ApproxCountDistinct,
        AggFunc::ApproxPercentile { p: 0.0 },
        AggFunc::ApproxPercentile { p: 0.5 },
        AggFunc::ApproxPercentile { p: 0.9 },
        AggFunc::ApproxPercentile { p: 1.0 },
        AggFunc::First,
        AggFunc::Last,
        AggFunc::Count,
    ];

    const ALL_TYPES: [FieldType; 5] = [FieldType::String, FieldType::Int, FieldType::Float, FieldType::Bool, FieldType::Timestamp];

    fn spec(func: AggFunc, input: FieldType) -> AggSpec {
        AggSpec { func, input: Some(input) }
    }

    /// Every valid spec over `ty`, plus `count()` without a field: the test matrix follows
    /// `validate`, so a function that gains a type is tested on it too.
    fn specs_for(ty: FieldType) -> Vec<AggSpec> {
        let mut specs: Vec<AggSpec> = ALL_FUNCS.iter().map(|&f| spec(f, ty)).filter(|s| s.validate().is_ok()).collect();
        specs.push(AggSpec {
            func: AggFunc::Count,
            input: None,
        });
        specs
    }

    /// One spec of every accumulator kind.
    fn one_spec_per_kind() -> Vec<AggSpec> {
        let mut specs: Vec<AggSpec> = Vec::new();
        for ty in ALL_TYPES {
            for s in specs_for(ty) {
                if !specs.iter().any(|k| k.kind() == s.kind()) {
                    specs.push(s);
                }
            }
        }
        assert_eq!(specs.len(), Kind::ALL.len());
        specs
    }

    fn key(v: &Value) -> Vec<u8> {
        let mut out = Vec::new();
        encode_key_value(&mut out, v);
        out
    }

    fn round_trip(spec: &AggSpec, acc: &Acc) -> Acc {
        let mut bytes = Vec::new();
        acc.encode(&mut bytes);
        let mut input = &bytes[..];
        let decoded = Acc::decode(spec, &mut input).expect("own encoding decodes");
        assert!(input.is_empty(), "decode left {} bytes", input.len());
        decoded
    }

    fn encoded(acc: &Acc) -> Vec<u8> {
        let mut bytes = Vec::new();
        acc.encode(&mut bytes);
        bytes
    }

    // --- the naive model -----------------------------------------------------------------

    #[derive(Debug, Clone)]
    enum Cell {
        Skip,
        Null,
        Val(Value),
    }

    #[derive(Debug, Clone)]
    struct Row {
        time: EventTime,
        cell: Cell,
        key: Vec<u8>,
    }

    impl Row {
        fn new(time: EventTime, cell: Cell) -> Row {
            let key = match &cell {
                Cell::Val(v) => key(v),
                _ => Vec::new(),
            };
            Row { time, cell, key }
        }

        /// What the window operator would pass for this row.
        fn input(&self, spec: &AggSpec) -> In<'_> {
            match &self.cell {
                Cell::Skip => In::Skip,
                Cell::Null => In::Null,
                Cell::Val(_) if spec.func.takes_bytes() => In::Bytes(&self.key),
                Cell::Val(Value::Int(i) | Value::Time(i)) => In::Int(*i),
                Cell::Val(Value::Float(f)) => In::Float(*f),
                Cell::Val(_) => In::Bytes(&self.key),
            }
        }
    }

    fn feed(acc: &mut Acc, spec: &AggSpec, rows: &[Row]) {
        for r in rows {
            acc.update(spec, r.input(spec), r.time);
        }
    }

    fn as_f64(v: &Value) -> f64 {
        match v {
            Value::Int(i) | Value::Time(i) => *i as f64,
            Value::Float(f) => *f,
            other => panic!("not numeric: {other:?}"),
        }
    }

    /// What the aggregate should return, computed the obvious way, with the absolute
    /// tolerance a float result is allowed.
    fn model(spec: &AggSpec, rows: &[Row]) -> (Value, f64) {
        let vals: Vec<&Row> = rows.iter().filter(|r| matches!(r.cell, Cell::Val(_))).collect();
        let value = |r: &Row| match &r.cell {
            Cell::Val(v) => v.clone(),
            _ => unreachable!(),
        };
        let nums: Vec<f64> = if spec.func.takes_bytes() || spec.func == AggFunc::Count {
            Vec::new()
        } else {
            vals.iter().map(|r| as_f64(&value(r))).collect()
        };
        let n = vals.len();
        let abs_sum: f64 = nums.iter().map(|x| x.abs()).sum();
        let max_abs = nums.iter().fold(0.0f64, |a, x| a.max(x.abs()));
        let exact = |v: Value| (v, 0.0);
        let variance = |sample: bool| -> Option<f64> {
            let d = if sample { n.checked_sub(1)? } else { n };
            if d == 0 {
                return None;
            }
            let mean = nums.iter().sum::<f64>() / n as f64;
            Some(nums.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / d as f64)
        };
        match spec.func {
            AggFunc::Count if spec.input.is_none() => exact(Value::Int(rows.iter().filter(|r| !matches!(r.cell, Cell::Skip)).count() as i64)),
            AggFunc::Count => exact(Value::Int(n as i64)),
            _ if n == 0 && !matches!(spec.func, AggFunc::CountDistinct | AggFunc::ApproxCountDistinct) => exact(Value::Null),
            AggFunc::Sum if spec.input == Some(FieldType::Float) => (Value::Float(nums.iter().sum()), 1e-9 * abs_sum),
            AggFunc::Sum => exact(Value::Int(vals.iter().fold(0i64, |a, r| match value(r) {
                Value::Int(i) => a.wrapping_add(i),
                other => panic!("not an int: {other:?}"),
            }))),
            AggFunc::Min | AggFunc::Max => {
                let mut vs: Vec<Value> = vals.iter().map(|r| value(r)).collect();
                vs.sort_by(|a, b| match (a, b) {
                    (Value::Float(x), Value::Float(y)) => x.total_cmp(y),
                    (Value::Int(x), Value::Int(y)) | (Value::Time(x), Value::Time(y)) => x.cmp(y),
                    _ => unreachable!(),
                });
                exact(if spec.func == AggFunc::Min { vs[0].clone() } else { vs[n - 1].clone() })
            }
            AggFunc::Avg => (Value::Float(nums.iter().sum::<f64>() / n as f64), 1e-9 * abs_sum / n as f64),
            AggFunc::Variance { sample } => match variance(sample) {
                Some(v) => (Value::Float(v), 1e-9 * v + 1e-12 * max_abs * max_abs),
                None => exact(Value::Null),
            },
            AggFunc::Stddev { sample } => match variance(sample) {
                Some(v) => (Value::Float(v.sqrt()), 1e-9 * v.sqrt() + 1e-6 * max_abs),
                None => exact(Value::Null),
            },
            AggFunc::CountDistinct | AggFunc::ApproxCountDistinct => {
                exact(Value::Int(vals.iter().map(|r| r.key.clone()).collect::<BTreeSet<_>>().len() as i64))
            }
            AggFunc::ApproxPercentile { p } => {
                let mut sorted = nums.clone();
                sorted.sort_by(f64::total_cmp);
                let v = sorted[(p * (n - 1) as f64).floor() as usize];
                // The sketch's documented bound, plus float rounding of the bin index.
                (Value::Float(v), (DD_ALPHA + 1e-12) * v.abs())
            }
            AggFunc::First => exact(value(vals.iter().min_by(|a, b| (a.time, &a.key).cmp(&(b.time, &b.key))).unwrap())),
            AggFunc::Last => exact(value(vals.iter().max_by(|a, b| (a.time, &a.key).cmp(&(b.time, &b.key))).unwrap())),
        }
    }

    fn close(got: &Value, want: &Value, tol: f64) -> bool {
        match (got, want) {
            (Value::Float(g), Value::Float(w)) => g == w || (g - w).abs() <= tol,
            _ => got == want,
        }
    }

    fn arb_value(ty: FieldType) -> BoxedStrategy<Value> {
        match ty {
            // Small ranges make duplicates and ties; full ranges make sums wrap.
            FieldType::Int => prop_oneof![-20i64..20, any::<i64>()].prop_map(Value::Int).boxed(),
            FieldType::Timestamp => prop_oneof![0i64..10, any::<i64>()].prop_map(Value::Time).boxed(),
            FieldType::Float => prop_oneof![(-20i32..20).prop_map(f64::from), -1e6f64..1e6, Just(0.0), Just(-0.0)]
                .prop_map(Value::Float)
                .boxed(),
            FieldType::String => "[ab]{0,3}".prop_map(Value::Str).boxed(),
            FieldType::Bool => any::<bool>().prop_map(Value::Bool).boxed(),
        }
    }

    fn arb_rows() -> impl Strategy<Value = (FieldType, Vec<Row>)> {
        proptest::sample::select(ALL_TYPES.to_vec()).prop_flat_map(|ty| {
            let cell = prop_oneof![1 => Just(Cell::Skip), 1 => Just(Cell::Null), 6 => arb_value(ty).prop_map(Cell::Val)];
            // Few distinct event times, so first/last ties are common.
            proptest::collection::vec((0i64..4, cell), 0..40).prop_map(move |rows| (ty, rows.into_iter().map(|(t, c)| Row::new(t, c)).collect()))
        })
    }

    proptest! {
        #[test]
        fn merged_partial_accumulators_match_the_naive_model((ty, rows) in arb_rows(), split in any::<Index>()) {
            let k = split.index(rows.len() + 1);
            for spec in specs_for(ty) {
                let (want, tol) = model(&spec, &rows);
                let mut a = spec.new_acc();
                feed(&mut a, &spec, &rows[..k]);
                let mut b = spec.new_acc();
                feed(&mut b, &spec, &rows[k..]);
                let mut whole = spec.new_acc();
                feed(&mut whole, &spec, &rows);

                // Partial states go through the encoding first, as restored state would.
                let (a2, b2) = (round_trip(&spec, &a), round_trip(&spec, &b));
                prop_assert_eq!(encoded(&a2), encoded(&a));
                let mut ab = a2;
                ab.merge(&spec, &b2);
                let mut ba = b.clone();
                ba.merge(&spec, &a);

                for (what, acc) in [("whole", &whole), ("a+b", &ab), ("b+a", &ba)] {
                    let got = acc.result(&spec);
                    prop_assert!(close(&got, &want, tol), "{} {}({:?}) split at {}: got {:?}, want {:?} ± {}", what, spec.func.name(), ty, k, got, want, tol);
                }
                let decoded = round_trip(&spec, &ab);
                prop_assert_eq!(decoded.result(&spec), ab.result(&spec));
                if spec.kind() != Kind::SumFloat && spec.kind() != Kind::Avg && spec.kind() != Kind::Moments {
                    // Everything but the float arithmetic is exactly split-invariant, down to the state.
                    prop_assert_eq!(encoded(&ab), encoded(&whole), "{}", spec.func.name());
                    prop_assert_eq!(encoded(&ba), encoded(&whole), "{}", spec.func.name());
                }
            }
        }

        #[test]
        fn a_row_of_accumulators_round_trips((ty, rows) in arb_rows()) {
            let specs = specs_for(ty);
            let accs: Vec<Acc> = specs.iter().map(|s| { let mut a = s.new_acc(); feed(&mut a, s, &rows); a }).collect();
            let mut bytes = Vec::new();
            encode_accs(&accs, &mut bytes);
            let decoded = decode_accs(&specs, &bytes).expect("own encoding decodes");
            for ((s, a), d) in specs.iter().zip(&accs).zip(&decoded) {
                prop_assert_eq!(encoded(a), encoded(d));
                prop_assert_eq!(a.result(s), d.result(s));
            }
            bytes.push(0);
            prop_assert_eq!(decode_accs(&specs, &bytes), Err(AggDecodeError::TrailingBytes { count: 1 }));
            bytes.pop();
            if !bytes.is_empty() {
                bytes.pop();
                prop_assert!(decode_accs(&specs, &bytes).is_err());
            }
        }

        #[test]
        fn decoding_garbage_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..300), which in any::<Index>()) {
            let specs = one_spec_per_kind();
            let spec = specs[which.index(specs.len())];
            // With the right tag in front too, so that the body decoders get garbage.
            let mut tagged = vec![spec.kind() as u8];
            tagged.extend_from_slice(&bytes);
            for input in [&bytes[..], &tagged[..]] {
                let mut rest = input;
                if let Ok(acc) = Acc::decode(&spec, &mut rest) {
                    let _ = acc.result(&spec);
                    // Whatever decoded re-encodes to something that decodes to the same state.
                    let again = round_trip(&spec, &acc);
                    prop_assert_eq!(encoded(&again), encoded(&acc));
                }
                let _ = decode_accs(&[spec, spec], input);
            }
        }

        #[test]
        fn decoding_corrupted_state_never_panics(
            (ty, rows) in arb_rows(),
            which in any::<Index>(),
            flips in proptest::collection::vec((any::<Index>(), 1u8..=255), 1..4),
            cut in any::<Index>(),
        ) {
            let specs = specs_for(ty);
            let spec = specs[which.index(specs.len())];
            let mut acc = spec.new_acc();
            feed(&mut acc, &spec, &rows);
            let mut bytes = encoded(&acc);
            for (at, x) in flips {
                let i = at.index(bytes.len());
                bytes[i] ^= x;
            }
            bytes.truncate(cut.index(bytes.len() + 1));
            if let Ok(acc) = Acc::decode(&spec, &mut &bytes[..]) {
                let _ = acc.result(&spec);
            }
        }
    }

    // --- semantics ------------------------------------------------------------------------

    fn run(spec: AggSpec, inputs: &[(In<'_>, EventTime)]) -> Value {
        assert_eq!(spec.validate(), Ok(()));
        let mut acc = spec.new_acc();
        for &(x, t) in inputs {
            acc.update(&spec, x, t);
        }
        acc.result(&spec)
    }

    fn nums(spec: AggSpec, xs: &[In<'_>]) -> Value {
        run(spec, &xs.iter().map(|&x| (x, 0)).collect::<Vec<_>>())
    }

    #[test]
    fn accumulator_is_small_inline() {
        assert!(std::mem::size_of::<Acc>() <= 32, "Acc is {} bytes", std::mem::size_of::<Acc>());
        assert_eq!(std::mem::size_of::<In<'_>>(), 24);
    }

    #[test]
    fn count_counts_rows_or_non_null_values_and_never_skips() {
        let rows = [In::Int(1), In::Null, In::Skip, In::Float(2.0), In::Null];
        assert_eq!(
            nums(
                AggSpec {
                    func: AggFunc::Count,
                    input: None
                },
                &rows
            ),
            Value::Int(4)
        );
        assert_eq!(nums(spec(AggFunc::Count, FieldType::Int), &rows), Value::Int(2));
        assert_eq!(nums(spec(AggFunc::Count, FieldType::Int), &[]), Value::Int(0));
    }

    #[test]
    fn empty_or_all_null_aggregates_are_null() {
        for ty in ALL_TYPES {
            for s in specs_for(ty) {
                let want = match s.func {
                    AggFunc::Count | AggFunc::CountDistinct | AggFunc::ApproxCountDistinct => Value::Int(0),
                    _ => Value::Null,
                };
                assert_eq!(nums(s, &[In::Skip]), if s.input.is_none() { Value::Int(0) } else { want.clone() }, "{s:?}");
                if s.input.is_some() {
                    assert_eq!(nums(s, &[In::Null, In::Skip, In::Null]), want, "{s:?}");
                }
            }
        }
    }

    #[test]
    fn integer_sum_wraps_and_float_sum_is_compensated() {
        assert_eq!(
            nums(spec(AggFunc::Sum, FieldType::Int), &[In::Int(i64::MAX), In::Int(2)]),
            Value::Int(i64::MIN + 1)
        );
        // Naive summation returns 0 here: 1e16 swallows each 1.0.
        let xs = [In::Float(1e16), In::Float(1.0), In::Float(1.0), In::Float(-1e16)];
        assert_eq!(nums(spec(AggFunc::Sum, FieldType::Float), &xs), Value::Float(2.0));
        assert_eq!(nums(spec(AggFunc::Avg, FieldType::Float), &xs), Value::Float(0.5));
        let inf = [In::Float(f64::INFINITY), In::Float(1.0), In::Float(-3.0)];
        assert_eq!(nums(spec(AggFunc::Sum, FieldType::Float), &inf), Value::Float(f64::INFINITY));
        assert_eq!(nums(spec(AggFunc::Avg, FieldType::Int), &[In::Int(1), In::Int(2)]), Value::Float(1.5));
    }

    #[test]
    fn float_sum_compensation_survives_merging() {
        // Each half alone rounds a 1.0 away; only carrying both compensations gets 2.0.
        let s = spec(AggFunc::Sum, FieldType::Float);
        let (mut a, mut b) = (s.new_acc(), s.new_acc());
        for x in [1e16, 1.0] {
            a.update(&s, In::Float(x), 0);
        }
        for x in [1.0, -1e16] {
            b.update(&s, In::Float(x), 0);
        }
        let mut b = round_trip(&s, &b);
        b.merge(&s, &round_trip(&s, &a));
        assert_eq!(b.result(&s), Value::Float(2.0));
    }

    #[test]
    fn min_max_keep_the_input_type_and_order_floats_totally() {
        assert_eq!(
            nums(spec(AggFunc::Max, FieldType::Timestamp), &[In::Int(5), In::Int(9), In::Null]),
            Value::Time(9)
        );
        assert_eq!(nums(spec(AggFunc::Min, FieldType::Int), &[In::Int(5), In::Int(-9)]), Value::Int(-9));
        let min_f = spec(AggFunc::Min, FieldType::Float);
        let max_f = spec(AggFunc::Max, FieldType::Float);
        let with_nan = [In::Float(1.0), In::Float(f64::NAN), In::Float(-2.0)];
        assert_eq!(nums(min_f, &with_nan), Value::Float(-2.0));
        assert!(matches!(nums(max_f, &with_nan), Value::Float(x) if x.is_nan()));
        for zeros in [[In::Float(0.0), In::Float(-0.0)], [In::Float(-0.0), In::Float(0.0)]] {
            assert!(matches!(nums(min_f, &zeros), Value::Float(x) if x == 0.0 && x.is_sign_negative()));
            assert!(matches!(nums(max_f, &zeros), Value::Float(x) if x == 0.0 && x.is_sign_positive()));
        }
    }

    #[test]
    fn variance_and_stddev_known_values() {
        let xs: Vec<In<'_>> = [2.0, 4.0, 4.0, 4.0, 5.0, 5.0, 7.0, 9.0].iter().map(|&x| In::Float(x)).collect();
        assert_eq!(nums(spec(AggFunc::Variance { sample: false }, FieldType::Float), &xs), Value::Float(4.0));
        assert_eq!(nums(spec(AggFunc::Stddev { sample: false }, FieldType::Float), &xs), Value::Float(2.0));
        let Value::Float(s) = nums(spec(AggFunc::Variance { sample: true }, FieldType::Float), &xs) else {
            panic!()
        };
        assert!((s - 32.0 / 7.0).abs() < 1e-12);
        assert_eq!(nums(spec(AggFunc::Variance { sample: true }, FieldType::Int), &[In::Int(3)]), Value::Null);
        assert_eq!(
            nums(spec(AggFunc::Variance { sample: false }, FieldType::Int), &[In::Int(3)]),
            Value::Float(0.0)
        );
        // Large offset, small spread: the textbook Σx² formula loses every digit here.
        let shifted: Vec<In<'_>> = (0..1000).map(|i| In::Float(1e9 + (i % 2) as f64)).collect();
        let Value::Float(v) = nums(spec(AggFunc::Variance { sample: false }, FieldType::Float), &shifted) else {
            panic!()
        };
        assert!((v - 0.25).abs() < 1e-9, "{v}");
    }

    #[test]
    fn first_and_last_break_time_ties_by_value_in_any_order() {
        let (a, b, c) = (key(&Value::Str("a".into())), key(&Value::Str("b".into())), key(&Value::Str("c".into())));
        let rows = [
            (In::Bytes(&b), 5),
            (In::Bytes(&a), 5),
            (In::Null, 1),
            (In::Bytes(&c), 7),
            (In::Bytes(&a), 7),
            (In::Skip, 9),
        ];
        let first = spec(AggFunc::First, FieldType::String);
        let last = spec(AggFunc::Last, FieldType::String);
        let mut reversed = rows;
        reversed.reverse();
        for order in [&rows, &reversed] {
            assert_eq!(run(first, order), Value::Str("a".into()));
            assert_eq!(run(last, order), Value::Str("c".into()));
        }
        let t = key(&Value::Time(42));
        assert_eq!(run(spec(AggFunc::Last, FieldType::Timestamp), &[(In::Bytes(&t), 0)]), Value::Time(42));
    }

    #[test]
    fn names_output_types_and_validation() {
        let names: Vec<&str> = ALL_FUNCS[..17].iter().map(AggFunc::name).collect();
        assert_eq!(
            names,
            [
                "count",
                "sum",
                "min",
                "max",
                "avg",
                "var_samp",
                "var_pop",
                "stddev_samp",
                "stddev_pop",
                "count_distinct",
                "approx_count_distinct",
                "approx_percentile",
                "approx_percentile",
                "approx_percentile",
                "approx_percentile",
                "first",
                "last"
            ]
        );
        assert_eq!(spec(AggFunc::Sum, FieldType::Float).output_type(), FieldType::Float);
        assert_eq!(spec(AggFunc::Sum, FieldType::Int).output_type(), FieldType::Int);
        assert_eq!(spec(AggFunc::Max, FieldType::Timestamp).output_type(), FieldType::Timestamp);
        assert_eq!(spec(AggFunc::Last, FieldType::Bool).output_type(), FieldType::Bool);
        assert_eq!(spec(AggFunc::ApproxCountDistinct, FieldType::String).output_type(), FieldType::Int);
        assert_eq!(spec(AggFunc::Stddev { sample: true }, FieldType::Int).output_type(), FieldType::Float);
        assert_eq!(spec(AggFunc::ApproxPercentile { p: 0.5 }, FieldType::Int).output_type(), FieldType::Float);

        let err = |s: AggSpec| s.validate().expect_err("should be rejected");
        assert!(err(spec(AggFunc::Min, FieldType::String)).contains("first"));
        assert!(err(spec(AggFunc::Sum, FieldType::Timestamp)).contains("min"));
        assert!(err(spec(AggFunc::Avg, FieldType::Bool)).contains("count_distinct"));
        assert!(err(AggSpec {
            func: AggFunc::Sum,
            input: None
        })
        .contains("needs an input field"));
        assert!(err(spec(AggFunc::ApproxPercentile { p: 1.5 }, FieldType::Float)).contains("between 0.0 and 1.0"));
        assert!(spec(AggFunc::ApproxPercentile { p: f64::NAN }, FieldType::Float).validate().is_err());
        assert!(spec(AggFunc::CountDistinct, FieldType::Bool).validate().is_ok());
    }

    #[test]
    fn decode_rejects_state_of_another_aggregate() {
        let sum = spec(AggFunc::Sum, FieldType::Int);
        let mut bytes = Vec::new();
        encode_accs(&[sum.new_acc()], &mut bytes);
        let err = decode_accs(&[spec(AggFunc::Avg, FieldType::Int)], &bytes).unwrap_err();
        assert_eq!(
            err,
            AggDecodeError::KindMismatch {
                expected: "avg",
                found: "sum(int)",
                tag: 2
            }
        );
        assert!(err.to_string().contains("did the query's aggregates change"));
        assert!(matches!(decode_accs(&[sum, sum], &bytes), Err(AggDecodeError::Truncated { .. })));
    }

    #[test]
    fn decode_rejects_malformed_bodies() {
        let decode = |s: AggSpec, body: &[u8]| {
            let mut bytes = vec![s.kind() as u8];
            bytes.extend_from_slice(body);
            decode_accs(&[s], &bytes)
        };
        let invalid = |r: Result<Vec<Acc>, AggDecodeError>| matches!(r, Err(AggDecodeError::Invalid { .. }));
        let count = AggSpec {
            func: AggFunc::Count,
            input: None,
        };
        assert_eq!(
            decode(count, &[0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x01]).unwrap()[0],
            Acc::Count(u64::MAX)
        );
        assert!(
            invalid(decode(count, &[0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x02])),
            "varint past 64 bits"
        );
        assert!(invalid(decode(spec(AggFunc::Min, FieldType::Int), &[2])), "presence flag");

        let distinct = spec(AggFunc::CountDistinct, FieldType::String);
        assert_eq!(decode(distinct, &[2, 1, b'a', 1, b'b']).unwrap()[0].result(&distinct), Value::Int(2));
        assert!(invalid(decode(distinct, &[2, 1, b'b', 1, b'a'])), "unsorted");
        assert!(invalid(decode(distinct, &[2, 1, b'a', 1, b'a'])), "duplicate");
        assert!(
            matches!(decode(distinct, &[1, 200, b'a']), Err(AggDecodeError::Truncated { .. })),
            "length past the end"
        );
        let huge = [0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x01];
        assert!(
            matches!(decode(distinct, &huge), Err(AggDecodeError::Truncated { .. })),
            "a huge count must not allocate up front"
        );

        let hll = spec(AggFunc::ApproxCountDistinct, FieldType::String);
        let sparse = |hashes: &[u64]| {
            let mut b = vec![0, hashes.len() as u8];
            hashes.iter().for_each(|h| b.extend_from_slice(&h.to_le_bytes()));
            b
        };
        assert_eq!(decode(hll, &sparse(&[1, 2])).unwrap()[0].result(&hll), Value::Int(2));
        assert!(invalid(decode(hll, &sparse(&[2, 1]))));
        assert!(invalid(decode(hll, &sparse(&[2, 2]))));
        assert!(invalid(decode(hll, &[0, 0x81, 0x10])), "sparse count 2049 is over the limit");
        let mut dense = vec![1u8];
        dense.extend(std::iter::repeat_n(HLL_Q as u8 + 1, HLL_M));
        assert!(decode(hll, &dense).is_ok());
        dense[HLL_M] = HLL_Q as u8 + 2;
        assert!(invalid(decode(hll, &dense)), "register above the maximum rank");

        let pct = spec(AggFunc::ApproxPercentile { p: 0.5 }, FieldType::Float);
        assert!(decode(pct, &[0, 0, 0, 2, 10, 1, 3, 1]).is_ok());
        assert!(invalid(decode(pct, &[0, 0, 0, 2, 10, 1, 0, 1])), "repeated bin");
        assert!(invalid(decode(pct, &[0, 0, 0, 1, 10, 0])), "empty bin");
        assert!(invalid(decode(pct, &[0, 0, 1, 0xfe, 0xff, 0xff, 0xff, 0x1f, 1, 0])), "index beyond i32");

        let first = spec(AggFunc::First, FieldType::Int);
        let stamped = |value: &[u8]| {
            let mut b = vec![1];
            b.extend_from_slice(&7i64.to_le_bytes());
            b.push(value.len() as u8);
            b.extend_from_slice(value);
            b
        };
        let one = key(&Value::Int(3));
        assert_eq!(decode(first, &stamped(&one)).unwrap()[0].result(&first), Value::Int(3));
        assert!(invalid(decode(first, &stamped(&[one.clone(), one.clone()].concat()))), "two values");
        assert!(invalid(decode(first, &stamped(&[9]))), "not a key encoding");
        assert!(invalid(decode(first, &stamped(&[]))), "no value");
    }

    // --- approx_count_distinct ------------------------------------------------------------

    fn random_string(rng: &mut ChaCha8Rng) -> [u8; 16] {
        const ALPHABET: &[u8] = b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789";
        std::array::from_fn(|_| ALPHABET[rng.random_range(0..ALPHABET.len())])
    }

    #[test]
    fn approx_count_distinct_within_two_percent_and_merges_losslessly() {
        let spec = spec(AggFunc::ApproxCountDistinct, FieldType::String);
        let mut key = Vec::new();
        for (seed, n) in [100usize, 1_000, 10_000, 100_000, 1_000_000].into_iter().enumerate() {
            let mut rng = ChaCha8Rng::seed_from_u64(seed as u64);
            let (mut whole, mut left, mut right) = (spec.new_acc(), spec.new_acc(), spec.new_acc());
            for i in 0..n {
                key.clear();
                encode_key_str(&mut key, &random_string(&mut rng));
                whole.update(&spec, In::Bytes(&key), 0);
                // Some values twice: duplicates must not count.
                if i % 3 == 0 {
                    whole.update(&spec, In::Bytes(&key), 0);
                }
                let half = if i < n / 2 { &mut left } else { &mut right };
                half.update(&spec, In::Bytes(&key), 0);
            }
            let Value::Int(estimate) = whole.result(&spec) else { panic!("not an int") };
            let error = (estimate as f64 - n as f64).abs() / n as f64;
            eprintln!("approx_count_distinct n={n}: estimate {estimate}, relative error {:.3}%", error * 100.0);
            assert!(error <= 0.02, "n={n}: estimate {estimate}, error {error}");
            if n <= HLL_SPARSE_MAX {
                assert_eq!(estimate, n as i64, "the sparse sketch is exact");
            }
            left.merge(&spec, &right);
            assert_eq!(left, whole, "merged halves must equal the sketch fed everything");
            assert_eq!(round_trip(&spec, &whole), whole);
        }
    }

    #[test]
    fn hll_error_over_many_seeds() {
        // The 2% assertion above is ~2.5 standard errors; this measures the spread over seeds.
        let mut worst: f64 = 0.0;
        let mut sum_sq = 0.0;
        let runs = 40;
        for seed in 0..runs {
            let mut rng = ChaCha8Rng::seed_from_u64(1000 + seed);
            let mut h = Hll::default();
            let n = 20_000;
            for _ in 0..n {
                h.insert_hash(rng.random());
            }
            let e = (h.estimate() - n as f64) / n as f64;
            worst = worst.max(e.abs());
            sum_sq += e * e;
        }
        let rms = (sum_sq / runs as f64).sqrt();
        eprintln!("hll n=20000 over {runs} seeds: rms error {:.3}%, worst {:.3}%", rms * 100.0, worst * 100.0);
        assert!(rms < 0.0125, "rms {rms}");
        assert!(worst < 0.03, "worst {worst}");
    }

    #[test]
    fn hll_sparse_turns_dense_at_the_threshold_whatever_the_merge_shape() {
        let mut rng = ChaCha8Rng::seed_from_u64(7);
        let hashes: Vec<u64> = (0..HLL_SPARSE_MAX + 500).map(|_| rng.random()).collect();
        let mut whole = Hll::default();
        hashes.iter().for_each(|&h| whole.insert_hash(h));
        assert!(matches!(whole.repr, HllRepr::Dense(_)));
        let mut exactly_full = Hll::default();
        hashes[..HLL_SPARSE_MAX].iter().for_each(|&h| exactly_full.insert_hash(h));
        assert!(matches!(exactly_full.repr, HllRepr::Sparse(_)));
        // sparse + sparse → dense, dense + sparse, sparse + dense
        for split in [10, HLL_SPARSE_MAX / 2, HLL_SPARSE_MAX + 100] {
            let (mut a, mut b) = (Hll::default(), Hll::default());
            hashes[..split].iter().for_each(|&h| a.insert_hash(h));
            hashes[split..].iter().for_each(|&h| b.insert_hash(h));
            let mut ab = a.clone();
            ab.merge(&b);
            b.merge(&a);
            assert!(ab == whole && b == whole, "split {split}");
        }
    }

    // --- approx_percentile ----------------------------------------------------------------

    #[test]
    fn approx_percentile_within_one_percent_of_the_exact_lower_rank() {
        let n = 100_000;
        let mut rng = ChaCha8Rng::seed_from_u64(99);
        let uniform: Vec<f64> = (0..n).map(|_| rng.random_range(0.0..1000.0)).collect();
        let exponential: Vec<f64> = (0..n).map(|_| -(1.0 - rng.random::<f64>()).ln() * 50.0).collect();
        // 30% negative, 40% zero, 30% positive over many magnitudes: the median is exactly 0.
        let mixed: Vec<f64> = (0..n)
            .map(|_| match rng.random_range(0..10) {
                0..3 => -(10f64.powf(rng.random_range(-3.0..6.0))),
                3..7 => 0.0,
                _ => 10f64.powf(rng.random_range(-3.0..6.0)),
            })
            .collect();
        let ints: Vec<f64> = (0..n).map(|_| f64::from(rng.random_range(-1000i32..1000))).collect();
        for (name, data, as_int) in [
            ("uniform", &uniform, false),
            ("exponential", &exponential, false),
            ("mixed-sign", &mixed, false),
            ("int", &ints, true),
        ] {
            let mut sorted = data.clone();
            sorted.sort_by(f64::total_cmp);
            for p in [0.0, 0.05, 0.5, 0.95, 0.99, 1.0] {
                let ty = if as_int { FieldType::Int } else { FieldType::Float };
                let spec = spec(AggFunc::ApproxPercentile { p }, ty);
                let (mut whole, mut left, mut right) = (spec.new_acc(), spec.new_acc(), spec.new_acc());
                for (i, &x) in data.iter().enumerate() {
                    let input = if as_int { In::Int(x as i64) } else { In::Float(x) };
                    whole.update(&spec, input, 0);
                    if i % 2 == 0 { &mut left } else { &mut right }.update(&spec, input, 0);
                }
                left.merge(&spec, &right);
                assert_eq!(left, whole, "merging is exact");
                let exact = sorted[(p * (n - 1) as f64).floor() as usize];
                let Value::Float(estimate) = whole.result(&spec) else { panic!("not a float") };
                if exact == 0.0 {
                    assert_eq!(estimate, 0.0, "{name} p={p}");
                    continue;
                }
                let error = (estimate - exact).abs() / exact.abs();
                if [0.5, 0.95, 0.99].contains(&p) {
                    eprintln!(
                        "approx_percentile {name} p={p}: exact {exact:.4}, estimate {estimate:.4}, relative error {:.3}%",
                        error * 100.0
                    );
                }
                assert!(error <= DD_ALPHA + 1e-12, "{name} p={p}: exact {exact}, estimate {estimate}");
            }
        }
    }

    #[test]
    fn percentile_bins_cover_every_magnitude() {
        let spec = spec(AggFunc::ApproxPercentile { p: 1.0 }, FieldType::Float);
        for x in [f64::MIN_POSITIVE, 1e-300, 0.3, 1.0, 1e300, f64::MAX, -f64::MAX, -1e-300] {
            let Value::Float(got) = nums(spec, &[In::Float(x)]) else { panic!() };
            assert!((got - x).abs() <= DD_ALPHA * x.abs() * (1.0 + 1e-9), "{x} → {got}");
        }
        assert_eq!(nums(spec, &[In::Float(5e-324)]), Value::Float(0.0), "subnormals count as zero");
        assert_eq!(nums(spec, &[In::Float(1.0), In::Float(f64::INFINITY)]), Value::Float(f64::INFINITY));
        assert!(matches!(nums(spec, &[In::Float(f64::NAN), In::Float(1.0)]), Value::Float(x) if x.is_nan()));
        let median = self::spec(AggFunc::ApproxPercentile { p: 0.5 }, FieldType::Float);
        let Value::Float(m) = nums(median, &[In::Float(f64::NAN), In::Float(1.0), In::Float(-4.0)]) else {
            panic!()
        };
        assert!((m - 1.0).abs() <= 0.01, "NaN sorts last: {m}");
    }

    #[test]
    fn large_states_survive_random_corruption_without_panicking() {
        let mut rng = ChaCha8Rng::seed_from_u64(5);
        let hll = spec(AggFunc::ApproxCountDistinct, FieldType::Int);
        let pct = spec(AggFunc::ApproxPercentile { p: 0.5 }, FieldType::Float);
        let distinct = spec(AggFunc::CountDistinct, FieldType::Int);
        let mut states = Vec::new();
        for s in [hll, pct, distinct] {
            let mut acc = s.new_acc();
            for i in 0..5000i64 {
                let k = key(&Value::Int(i));
                let x = if s.func.takes_bytes() {
                    In::Bytes(&k)
                } else {
                    In::Float(rng.random_range(-1e4..1e4))
                };
                acc.update(&s, x, 0);
            }
            states.push((s, encoded(&acc)));
        }
        for (s, bytes) in &states {
            for _ in 0..300 {
                let mut b = bytes.clone();
                for _ in 0..rng.random_range(1..4) {
                    let i = rng.random_range(0..b.len());
                    b[i] = rng.random();
                }
                b.truncate(rng.random_range(0..=b.len()));
                if let Ok(acc) = Acc::decode(s, &mut &b[..]) {
                    let _ = acc.result(s);
                }
            }
        }
    }
}
