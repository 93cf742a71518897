//! Configuration errors: always the user's fault, never worth retrying, and
//! reported all at once so one edit-run cycle fixes everything.

use std::cell::RefCell;
use std::fmt;

/// One problem in the configuration file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    /// TOML path of the offending key, e.g. `queries[1].aggregates[0].field`.
    /// Empty when the error is about the whole file (unreadable, bad syntax).
    pub path: String,
    /// 1-based line of the offending key or value; for a missing key, the
    /// line of the table that should contain it. `None` when there is no
    /// such line (e.g. a whole table is missing).
    pub line: Option<usize>,
    /// What is wrong and what to do about it.
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some(line) = self.line {
            write!(f, "line {line}: ")?;
        }
        if !self.path.is_empty() {
            write!(f, "{}: ", self.path)?;
        }
        f.write_str(&self.message)
    }
}

impl std::error::Error for ConfigError {}

/// Every problem found in a configuration file, in file order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigErrors(pub Vec<ConfigError>);

impl ConfigErrors {
    /// The number of problems found.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Whether no problem was found (never true for a returned error).
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Iterates over the problems in file order.
    pub fn iter(&self) -> std::slice::Iter<'_, ConfigError> {
        self.0.iter()
    }
}

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, error) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str("\n")?;
            }
            write!(f, "{error}")?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigErrors {}

impl From<ConfigError> for ConfigErrors {
    fn from(error: ConfigError) -> Self {
        ConfigErrors(vec![error])
    }
}

impl<'a> IntoIterator for &'a ConfigErrors {
    type Item = &'a ConfigError;
    type IntoIter = std::slice::Iter<'a, ConfigError>;

    fn into_iter(self) -> Self::IntoIter {
        self.0.iter()
    }
}

/// Maps byte offsets in the source text to 1-based line numbers.
#[derive(Debug)]
pub(crate) struct LineIndex {
    /// Byte offset at which each line after the first starts.
    line_starts: Vec<usize>,
}

impl LineIndex {
    pub(crate) fn new(text: &str) -> Self {
        let line_starts = text.bytes().enumerate().filter(|&(_, b)| b == b'\n').map(|(i, _)| i + 1).collect();
        LineIndex { line_starts }
    }

    /// 1-based line containing byte `offset`.
    pub(crate) fn line_of(&self, offset: usize) -> usize {
        self.line_starts.partition_point(|&start| start <= offset) + 1
    }
}

/// Collects errors while the whole configuration is walked. Shared by
/// reference so nested table readers can all report into it.
#[derive(Debug)]
pub(crate) struct Diagnostics {
    lines: LineIndex,
    errors: RefCell<Vec<ConfigError>>,
}

impl Diagnostics {
    pub(crate) fn new(text: &str) -> Self {
        Diagnostics {
            lines: LineIndex::new(text),
            errors: RefCell::new(Vec::new()),
        }
    }

    pub(crate) fn line_of(&self, offset: usize) -> usize {
        self.lines.line_of(offset)
    }

    pub(crate) fn report(&self, path: impl Into<String>, line: Option<usize>, message: String) {
        self.errors.borrow_mut().push(ConfigError {
            path: path.into(),
            line,
            message,
        });
    }

    pub(crate) fn has_errors(&self) -> bool {
        !self.errors.borrow().is_empty()
    }

    /// All errors, ordered by line (file-level errors without a line first);
    /// errors on the same line keep the order they were found in.
    pub(crate) fn into_errors(self) -> ConfigErrors {
        let mut errors = self.errors.into_inner();
        errors.sort_by_key(|e| e.line);
        ConfigErrors(errors)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn line_index_is_one_based() {
        let index = LineIndex::new("a\nbc\n\nd");
        assert_eq!(index.line_of(0), 1);
        assert_eq!(index.line_of(1), 1); // the newline itself
        assert_eq!(index.line_of(2), 2);
        assert_eq!(index.line_of(5), 3);
        assert_eq!(index.line_of(6), 4);
        assert_eq!(index.line_of(100), 4);
    }

    #[test]
    fn display_includes_line_and_path_only_when_known() {
        let with_line = ConfigError {
            path: "sources[0].watermark.delay".into(),
            line: Some(12),
            message: "bad".into(),
        };
        assert_eq!(with_line.to_string(), "line 12: sources[0].watermark.delay: bad");
        let bare = ConfigError {
            path: String::new(),
            line: None,
            message: "cannot read".into(),
        };
        assert_eq!(bare.to_string(), "cannot read");
        let both = ConfigErrors(vec![with_line, bare]);
        assert_eq!(both.to_string(), "line 12: sources[0].watermark.delay: bad\ncannot read");
    }
}
