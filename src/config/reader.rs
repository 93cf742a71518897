//! A strict reader over a spanned TOML table.
//!
//! Every `take_*` call names a key the caller understands; [`Fields::finish`]
//! then reports every other key as unknown. Problems are reported into the
//! shared [`Diagnostics`] and the reader carries on, so one pass finds them all.

use std::time::Duration;

use toml::de::{DeTable, DeValue};
use toml::Spanned;

use super::duration::parse_duration;
use super::error::Diagnostics;

/// A spanned TOML value as parsed.
pub(crate) type Value<'i> = Spanned<DeValue<'i>>;

/// A value read from the file together with where it was written.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct At<T> {
    pub value: T,
    pub path: String,
    pub line: Option<usize>,
}

/// A key of a free-form table (`schema`, `kafka.options`) with its value.
pub(crate) struct Entry<'a, 'i> {
    pub key: String,
    pub path: String,
    pub value: &'a Value<'i>,
}

/// Reads the keys of one table, remembering which ones were asked for.
pub(crate) struct Fields<'a, 'i> {
    diag: &'a Diagnostics,
    /// `None` for a table that is absent from the file; every key then reads
    /// as absent.
    table: Option<&'a DeTable<'i>>,
    path: String,
    line: Option<usize>,
    /// Keys the caller asked for; listed as the allowed keys.
    allowed: Vec<&'static str>,
    /// Keys recognised only to give a better message; never listed.
    recognised: Vec<&'static str>,
}

impl<'a, 'i> Fields<'a, 'i> {
    /// The top level of a document.
    pub(crate) fn root(diag: &'a Diagnostics, table: &'a DeTable<'i>) -> Self {
        Fields::new(diag, Some(table), String::new(), None)
    }

    fn new(diag: &'a Diagnostics, table: Option<&'a DeTable<'i>>, path: String, line: Option<usize>) -> Self {
        Fields {
            diag,
            table,
            path,
            line,
            allowed: Vec::new(),
            recognised: Vec::new(),
        }
    }

    /// TOML path of this table, e.g. `sources[0].watermark`.
    pub(crate) fn path(&self) -> &str {
        &self.path
    }

    /// Line of this table's header (or first line of an inline table).
    pub(crate) fn line(&self) -> Option<usize> {
        self.line
    }

    /// Path of a key in this table.
    pub(crate) fn key_path(&self, key: &str) -> String {
        join_path(&self.path, key)
    }

    /// Reports a problem at an arbitrary place.
    pub(crate) fn report_at(&self, path: impl Into<String>, line: Option<usize>, message: String) {
        self.diag.report(path, line, message);
    }

    /// Line on which a value starts.
    pub(crate) fn line_of(&self, value: &Value<'_>) -> Option<usize> {
        Some(self.diag.line_of(value.span().start))
    }

    /// Whether the key is written in this table.
    pub(crate) fn has(&self, key: &str) -> bool {
        self.table.is_some_and(|t| t.contains_key(key))
    }

    /// The raw value of an allowed key.
    pub(crate) fn take_value(&mut self, key: &'static str) -> Option<&'a Value<'i>> {
        if !self.allowed.contains(&key) {
            self.allowed.push(key);
        }
        self.table?.get(key)
    }

    /// The raw value of a key that is recognised but not listed as allowed,
    /// such as a not-yet-implemented option that deserves its own message.
    pub(crate) fn take_unlisted(&mut self, key: &'static str) -> Option<&'a Value<'i>> {
        self.recognised.push(key);
        self.table?.get(key)
    }

    /// Reads an optional key with `convert`, reporting a conversion failure
    /// at the key's value.
    pub(crate) fn take_with<T>(&mut self, key: &'static str, convert: impl FnOnce(&Value<'i>) -> Result<T, String>) -> Option<At<T>> {
        let value = self.take_value(key)?;
        let path = self.key_path(key);
        let line = self.line_of(value);
        match convert(value) {
            Ok(converted) => Some(At { value: converted, path, line }),
            Err(message) => {
                self.diag.report(path, line, message);
                None
            }
        }
    }

    /// Reads a key that must be present: reports it as missing (at this
    /// table's line) when absent, otherwise reads it with `take`.
    pub(crate) fn require<T>(&mut self, key: &'static str, take: impl FnOnce(&mut Self, &'static str) -> Option<T>) -> Option<T> {
        if !self.has(key) {
            self.take_value(key); // listed as allowed
            let table = if self.path.is_empty() {
                "the top level".to_string()
            } else {
                self.path.clone()
            };
            self.diag.report(
                self.key_path(key),
                self.line,
                format!("missing required key \"{key}\"; add {key} = ... to {table}"),
            );
            return None;
        }
        take(self, key)
    }

    /// A non-empty string.
    pub(crate) fn take_str(&mut self, key: &'static str) -> Option<At<String>> {
        self.take_with(key, to_str)
    }

    /// A duration string such as `"10s"`.
    pub(crate) fn take_duration(&mut self, key: &'static str) -> Option<At<Duration>> {
        self.take_with(key, to_duration)
    }

    /// An integer within `min..=max`.
    pub(crate) fn take_int(&mut self, key: &'static str, min: u64, max: u64) -> Option<At<u64>> {
        self.take_with(key, |v| to_int(v, min, max))
    }

    /// A number within 0..=1.
    pub(crate) fn take_share(&mut self, key: &'static str) -> Option<At<f64>> {
        self.take_with(key, |v| to_fraction(v, "a share between 0 and 1 (e.g. 0.05 for 5%)"))
    }

    /// A number within 0..=1; `what` names it in the error, e.g. "a share between 0 and 1 (e.g. 0.05 for 5%)".
    pub(crate) fn take_fraction(&mut self, key: &'static str, what: &str) -> Option<At<f64>> {
        self.take_with(key, |v| to_fraction(v, what))
    }

    /// A boolean.
    pub(crate) fn take_bool(&mut self, key: &'static str) -> Option<At<bool>> {
        self.take_with(key, |v| v.get_ref().as_bool().ok_or_else(|| found("true or false", v)))
    }

    /// A byte size: an integer number of bytes or a string such as `"128MiB"`.
    pub(crate) fn take_size(&mut self, key: &'static str) -> Option<At<u64>> {
        self.take_with(key, to_size)
    }

    /// A string naming one of `choices`.
    pub(crate) fn take_choice<T: Copy>(&mut self, key: &'static str, choices: &[(&str, T)]) -> Option<At<T>> {
        self.take_with(key, |v| to_choice(v, choices))
    }

    /// An array of non-empty strings, each with its own path and line.
    pub(crate) fn take_str_list(&mut self, key: &'static str) -> Option<Vec<At<String>>> {
        let value = self.take_value(key)?;
        let path = self.key_path(key);
        let Some(items) = value.get_ref().as_array() else {
            self.diag.report(path, self.line_of(value), found("an array of strings", value));
            return None;
        };
        let mut out = Vec::with_capacity(items.len());
        for (i, item) in items.iter().enumerate() {
            let item_path = format!("{path}[{i}]");
            let line = self.line_of(item);
            match to_str(item) {
                Ok(s) => out.push(At {
                    value: s,
                    path: item_path,
                    line,
                }),
                Err(message) => self.diag.report(item_path, line, message),
            }
        }
        Some(out)
    }

    /// One string or an array of strings (`sink = "a"` or `sink = ["a", "b"]`); at least one.
    pub(crate) fn take_str_or_list(&mut self, key: &'static str) -> Option<Vec<At<String>>> {
        let value = self.take_value(key)?;
        if value.get_ref().as_array().is_none() {
            let path = self.key_path(key);
            let line = self.line_of(value);
            return match to_str(value) {
                Ok(s) => Some(vec![At { value: s, path, line }]),
                Err(_) => {
                    self.diag.report(path, line, found("a string or an array of strings", value));
                    None
                }
            };
        }
        let line = self.line_of(value);
        let path = self.key_path(key);
        let list = self.take_str_list(key)?;
        if list.is_empty() {
            self.diag.report(path, line, "is empty; name at least one".to_string());
            return None;
        }
        Some(list)
    }

    /// A sub-table (`[a.b]`, `b = { ... }` or dotted keys).
    pub(crate) fn take_table(&mut self, key: &'static str) -> Option<Fields<'a, 'i>> {
        let value = self.take_value(key)?;
        let path = self.key_path(key);
        let line = self.line_of(value);
        match value.get_ref().as_table() {
            Some(table) => Some(Fields::new(self.diag, Some(table), path, line)),
            None => {
                self.diag.report(path, line, found("a table", value));
                None
            }
        }
    }

    /// A sub-table, or an empty reader when the key is absent so that its
    /// required keys are reported as missing and its defaults apply.
    pub(crate) fn take_table_or_empty(&mut self, key: &'static str) -> Option<Fields<'a, 'i>> {
        if self.has(key) {
            self.take_table(key)
        } else {
            self.take_value(key); // listed as allowed
            Some(Fields::new(self.diag, None, self.key_path(key), None))
        }
    }

    /// An array of tables (`[[key]]` or `key = [{ ... }, ...]`).
    pub(crate) fn take_tables(&mut self, key: &'static str) -> Option<Vec<Fields<'a, 'i>>> {
        let value = self.take_value(key)?;
        let path = self.key_path(key);
        let Some(items) = value.get_ref().as_array() else {
            self.diag.report(path, self.line_of(value), found("an array of tables", value));
            return None;
        };
        let mut out = Vec::with_capacity(items.len());
        for (i, item) in items.iter().enumerate() {
            let item_path = format!("{path}[{i}]");
            let line = self.line_of(item);
            match item.get_ref().as_table() {
                Some(table) => out.push(Fields::new(self.diag, Some(table), item_path, line)),
                None => self.diag.report(item_path, line, found("a table", item)),
            }
        }
        Some(out)
    }

    /// The entries of a free-form table, in file order. Also returns the
    /// path and line of the table itself.
    pub(crate) fn take_entries(&mut self, key: &'static str) -> Option<(At<()>, Vec<Entry<'a, 'i>>)> {
        let value = self.take_value(key)?;
        let path = self.key_path(key);
        let line = self.line_of(value);
        let Some(table) = value.get_ref().as_table() else {
            self.diag.report(path, line, found("a table", value));
            return None;
        };
        let mut entries: Vec<_> = table.iter().collect();
        // The map may be ordered by key; the span restores file order.
        entries.sort_by_key(|(k, _)| k.span().start);
        let entries = entries
            .into_iter()
            .map(|(k, v)| Entry {
                key: k.get_ref().to_string(),
                path: join_path(&path, k.get_ref()),
                value: v,
            })
            .collect();
        Some((At { value: (), path, line }, entries))
    }

    /// Reports every key that no `take_*` call asked for.
    pub(crate) fn finish(self) {
        let Some(table) = self.table else {
            return;
        };
        let mut unknown: Vec<_> = table
            .iter()
            .filter(|(k, _)| {
                let k = k.get_ref().as_ref();
                !self.allowed.iter().chain(&self.recognised).any(|known| *known == k)
            })
            .map(|(k, _)| k)
            .collect();
        unknown.sort_by_key(|k| k.span().start);
        let place = if self.path.is_empty() {
            "at the top level".to_string()
        } else {
            format!("in {}", self.path)
        };
        let allowed = self.allowed.join(", ");
        for key in unknown {
            self.diag.report(
                join_path(&self.path, key.get_ref()),
                Some(self.diag.line_of(key.span().start)),
                format!("unknown key \"{}\" {place}; allowed keys: {allowed}", key.get_ref()),
            );
        }
    }
}

/// `parent.key`, quoting the key when it is not a bare TOML key.
pub(crate) fn join_path(parent: &str, key: &str) -> String {
    let bare = !key.is_empty() && key.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
    let key = if bare { key.to_string() } else { format!("{key:?}") };
    if parent.is_empty() {
        key
    } else {
        format!("{parent}.{key}")
    }
}

/// "expected a string, found integer"
pub(crate) fn found(expected: &str, value: &Value<'_>) -> String {
    format!("expected {expected}, found {}", value.get_ref().type_str())
}

pub(crate) fn to_str(value: &Value<'_>) -> Result<String, String> {
    match value.get_ref().as_str() {
        Some("") => Err("must not be empty".to_string()),
        Some(s) => Ok(s.to_string()),
        None => Err(found("a string", value)),
    }
}

fn to_duration(value: &Value<'_>) -> Result<Duration, String> {
    match value.get_ref() {
        DeValue::String(s) => parse_duration(s),
        DeValue::Integer(_) | DeValue::Float(_) => Err(format!(
            "expected a duration string with a unit, such as \"10s\" or \"500ms\", found {}",
            value.get_ref().type_str()
        )),
        _ => Err(found("a duration string such as \"10s\"", value)),
    }
}

/// The integer value of a TOML integer, if it fits in an `i128`.
fn integer(value: &Value<'_>) -> Option<i128> {
    let integer = value.get_ref().as_integer()?;
    i128::from_str_radix(integer.as_str(), integer.radix()).ok()
}

fn to_int(value: &Value<'_>, min: u64, max: u64) -> Result<u64, String> {
    if !value.get_ref().is_integer() {
        return Err(found("an integer", value));
    }
    let n = integer(value).ok_or_else(|| "integer is too large".to_string())?;
    if n < i128::from(min) {
        return Err(format!("must be at least {min}, found {n}"));
    }
    if n > i128::from(max) {
        return Err(format!("must be at most {max}, found {n}"));
    }
    // In range of u64 because min..=max is.
    u64::try_from(n).map_err(|_| format!("must be at most {max}, found {n}"))
}

/// An integer or float as a float.
pub(crate) fn number(value: &Value<'_>) -> Option<f64> {
    match value.get_ref() {
        DeValue::Float(f) => f.as_str().parse::<f64>().ok(),
        DeValue::Integer(_) => integer(value).map(|n| n as f64),
        _ => None,
    }
}

fn to_fraction(value: &Value<'_>, what: &str) -> Result<f64, String> {
    let share = match value.get_ref() {
        DeValue::Float(f) => f.as_str().parse::<f64>().ok(),
        // Precision loss is irrelevant: anything but 0 and 1 is rejected below.
        DeValue::Integer(_) => integer(value).map(|n| n as f64),
        _ => return Err(found("a number between 0 and 1", value)),
    };
    match share {
        Some(s) if (0.0..=1.0).contains(&s) => Ok(s),
        _ => Err(format!("must be {what}, found {}", value_text(value))),
    }
}

/// Size units, longest first so that `KiB` is tried before `B`.
const SIZE_UNITS: [(&str, u64); 7] = [
    ("KiB", 1 << 10),
    ("MiB", 1 << 20),
    ("GiB", 1 << 30),
    ("KB", 1_000),
    ("MB", 1_000_000),
    ("GB", 1_000_000_000),
    ("B", 1),
];

fn to_size(value: &Value<'_>) -> Result<u64, String> {
    let invalid = |s: &str| {
        format!("invalid size \"{s}\": write a whole number followed by B, KB, MB, GB, KiB, MiB or GiB (e.g. \"128MiB\"), or an integer number of bytes")
    };
    match value.get_ref() {
        DeValue::Integer(_) => to_int(value, 0, u64::MAX),
        DeValue::String(s) => {
            let (number, unit) = SIZE_UNITS
                .iter()
                .find_map(|&(name, factor)| s.strip_suffix(name).map(|n| (n, factor)))
                .ok_or_else(|| invalid(s))?;
            if number.is_empty() || !number.bytes().all(|b| b.is_ascii_digit()) {
                return Err(invalid(s));
            }
            number
                .parse::<u64>()
                .ok()
                .and_then(|n| n.checked_mul(unit))
                .ok_or_else(|| format!("size \"{s}\" is too large"))
        }
        _ => Err(found("a size such as \"128MiB\" or an integer number of bytes", value)),
    }
}

fn to_choice<T: Copy>(value: &Value<'_>, choices: &[(&str, T)]) -> Result<T, String> {
    let names = || choices.iter().map(|(name, _)| format!("\"{name}\"")).collect::<Vec<_>>().join(", ");
    let Some(s) = value.get_ref().as_str() else {
        return Err(format!("expected one of {}, found {}", names(), value.get_ref().type_str()));
    };
    choices
        .iter()
        .find(|(name, _)| *name == s)
        .map(|&(_, choice)| choice)
        .ok_or_else(|| format!("unknown value \"{s}\"; use one of {}", names()))
}

/// Short text of a scalar for messages.
pub(crate) fn value_text(value: &Value<'_>) -> String {
    match value.get_ref() {
        DeValue::String(s) => format!("{s:?}"),
        DeValue::Integer(i) => i.to_string(),
        DeValue::Float(f) => f.to_string(),
        DeValue::Boolean(b) => b.to_string(),
        DeValue::Datetime(d) => d.to_string(),
        DeValue::Array(_) => "an array".to_string(),
        DeValue::Table(_) => "a table".to_string(),
    }
}
