//! SQL expressions in the configuration: `where` filters, per-aggregate `filter`s and derived
//! output columns.
//!
//! An expression is parsed once with `sqlparser` (generic dialect), type-checked against the
//! columns it may read, and compiled into a small tree with column indexes and literals resolved
//! up front. Evaluation walks that tree over a [`Row`]; predicates (column references,
//! literals, arithmetic, comparisons, `AND`/`OR`/`NOT`, `IN`, `IS NULL`, `BETWEEN`, `CASE`,
//! `LIKE`) never allocate, and strings are compared borrowed. What builds a new string does
//! allocate: `ILIKE`, `LOWER`/`UPPER`, `CONCAT`, casts to string, and [`Expr::eval`] returning
//! a string that is not a bare column reference.
//!
//! # Grammar
//!
//! | construct | notes |
//! | --- | --- |
//! | `42`, `-7`, `2.5`, `1e3` | integers are 64-bit (`int`); anything with `.` or an exponent is a `float` |
//! | `'text'` | string; write a quote inside as `''` (`'it''s'`). Double quotes name a **column**, not a string |
//! | `TRUE`, `FALSE`, `NULL` | |
//! | `TIMESTAMP '2026-11-23T20:00:00Z'` | `YYYY-MM-DD[( \|T)HH:MM[:SS[.fraction]]][Z\|±HH[:MM]]`; no offset means UTC |
//! | `DATE '2026-11-23'` | a validated date **string** (see "Dates are strings") |
//! | `page_url`, `"Page URL"` | a column: exact name first, else the one name equal ignoring case |
//! | `+ - * / %`, unary `-` `+` | see "Types" |
//! | `\|\|` | string concatenation, same as `CONCAT` |
//! | `= <> != < <= > >=` | numbers with numbers, strings with strings, bools with bools, timestamps with timestamps |
//! | `a IS [NOT] DISTINCT FROM b`, `a <=> b` | NULL-safe (in)equality: never NULL |
//! | `AND OR NOT` | three-valued logic |
//! | `x IS [NOT] NULL`, `IS [NOT] TRUE`, `IS [NOT] FALSE`, `IS [NOT] UNKNOWN` | never NULL |
//! | `x [NOT] IN (a, b, ...)` | SQL NULL rules: no match and a NULL in the list gives NULL |
//! | `x [NOT] BETWEEN lo AND hi` | `x >= lo AND x <= hi` |
//! | `s [NOT] LIKE 'pat' [ESCAPE 'c']`, `ILIKE` | `%` any run, `_` one character, `\` escapes by default; the pattern must be a literal |
//! | `CASE [x] WHEN .. THEN .. [ELSE ..] END` | no match and no `ELSE` gives NULL |
//! | `CAST(x AS t)`, `x::t` | see "Casts" |
//! | `EXTRACT(YEAR\|MONTH\|DAY\|HOUR\|MINUTE\|SECOND FROM t)` | same as the functions below |
//!
//! Functions (names are case-insensitive):
//!
//! | function | result |
//! | --- | --- |
//! | `COALESCE(a, b, ...)`, `IFNULL(a, b)`, `NVL(a, b)` | first non-NULL argument |
//! | `NULLIF(a, b)` | NULL when `a = b`, else `a` |
//! | `IF(cond, a, b)` | `CASE WHEN cond THEN a ELSE b END` |
//! | `GREATEST(a, b, ...)`, `LEAST(a, b, ...)` | largest / smallest non-NULL argument (NULL only if all are) |
//! | `ABS(x)` | same type as `x` |
//! | `ROUND(x [, digits])` | half away from zero, on the decimal value shown for `x` (`ROUND(2.675, 2)` = 2.68); `digits` is a literal and may be negative; same type as `x` |
//! | `FLOOR(x)`, `CEIL(x)`, `CEILING(x)` | `int` (NULL if out of range) |
//! | `SQRT`, `LN`, `LOG10`, `EXP`, `POWER(x, y)`/`POW` | `float`; NULL outside the domain (`SQRT(-1)`, `LN(0)`) |
//! | `LOWER(s)`, `UPPER(s)`, `TRIM(s)`, `LTRIM(s)`, `RTRIM(s)` | string (TRIM removes spaces) |
//! | `LENGTH(s)`, `CHAR_LENGTH(s)` | `int`, in characters |
//! | `CONCAT(a, b, ...)` | string; arguments of other types are cast to string; NULL if any is NULL |
//! | `SUBSTR(s, start [, len])`, `SUBSTRING(s FROM start [FOR len])` | 1-based; a negative start counts from the end |
//! | `DATE(t)` | same as `CAST(t AS DATE)` |
//! | `DATE_TRUNC('second'\|'minute'\|'hour'\|'day'\|'week'\|'month'\|'quarter'\|'year', t)` | timestamp; UTC; weeks start on Monday |
//! | `YEAR(t)`, `MONTH(t)`, `DAY(t)`/`DAYOFMONTH(t)`, `HOUR(t)`, `MINUTE(t)`, `SECOND(t)` | `int`, UTC |
//!
//! Time functions also take a string, read as a timestamp (NULL if it is not one).
//!
//! Not supported, with an error naming the fragment: subqueries, aggregate functions (define an
//! aggregate and refer to its output column instead), window functions, `INTERVAL`, qualified
//! names (`t.col`), query parameters, and any function not listed above.
//!
//! # Types
//!
//! Column types come from the schema the expression is compiled against; every operator is
//! checked when the configuration is loaded, so a type error never reaches the event path.
//!
//! * `int op int` is `int` for `+ - * %`; **`/` always gives `float`** (`7 / 2` = 3.5, as in
//!   Spark). Any `float` operand makes the result `float`.
//! * Integer overflow gives NULL rather than wrapping; division or modulo by zero gives NULL.
//!   Float arithmetic otherwise follows IEEE 754 (it can reach ±infinity).
//! * Timestamps are microseconds since the Unix epoch, UTC: `t - t` is an `int` of
//!   microseconds, `t + int` and `t - int` shift by microseconds (one hour is `3600000000`).
//! * `int` and `float` compare by exact numeric value. NaN equals NaN and sorts above every other
//!   number (as in Spark). Strings compare by Unicode code point, `FALSE < TRUE`.
//! * A timestamp compared with a string literal reads the literal as a timestamp when compiling
//!   (`window_start >= '2026-11-23'`); an unreadable literal is an error.
//! * `CASE`, `COALESCE`, `GREATEST`, `LEAST` and `IF` need arguments of one type, where `int`
//!   and `float` mix to `float` and NULL fits anything.
//! * An expression that is just `NULL` (or only ever NULL, like `CASE WHEN x THEN NULL END`) has
//!   output type string, the type any sink can hold.
//! * A row value whose variant does not match its column's declared type reads as NULL
//!   (an `int` in a `float` column is widened instead).
//!
//! # Casts
//!
//! Targets: `BIGINT`/`INT`/`INTEGER`/`SMALLINT`/`TINYINT` → int, `DOUBLE`/`FLOAT`/`REAL`/
//! `DECIMAL`/`NUMERIC` → float (precision and scale are ignored), `VARCHAR`/`STRING`/`TEXT`/
//! `CHAR` → string, `BOOLEAN` → bool, `TIMESTAMP` → timestamp, `DATE` → string `YYYY-MM-DD`.
//! A value that cannot be converted gives NULL (`CAST('abc' AS BIGINT)`), as in Spark's
//! non-ANSI mode. Float → int truncates toward zero (NULL for NaN or out of range); string →
//! int also accepts decimals (`'1.9'` → 1). Timestamp ↔ int converts to and from
//! **microseconds** (Spark uses seconds), matching the timestamp arithmetic above. Timestamp →
//! string is `YYYY-MM-DD HH:MM:SS[.ffffff]` in UTC. String → bool accepts
//! `true/false/t/f/yes/no/y/n/1/0` ignoring case.
//!
//! # Dates are strings
//!
//! There is no date type: `CAST(t AS DATE)`, `DATE(t)` and `DATE '…'` give the UTC calendar date
//! as a `YYYY-MM-DD` string, which sorts and compares correctly as a string and partitions
//! tables well. Use `DATE_TRUNC('day', t)` for a timestamp at midnight.

use std::borrow::Cow;
use std::cmp::Ordering;
use std::collections::HashSet;
use std::fmt::Write as _;

use sqlparser::ast::{
    self, BinaryOperator, CeilFloorKind, DataType, DateTimeField, FunctionArg, FunctionArgExpr, FunctionArguments, ObjectNamePart, TrimWhereField,
    UnaryOperator,
};
use sqlparser::dialect::GenericDialect;
use sqlparser::parser::{Parser, ParserError};
use sqlparser::tokenizer::{Token, Tokenizer};

use crate::time::{civil_from_days, days_from_civil, days_in_month};
use crate::types::{EventTime, FieldType, Value};

/// A value produced while evaluating: like [`Value`], but strings may borrow from the row (or the
/// compiled expression), so evaluation does not allocate for them.
#[derive(Debug, Clone, PartialEq)]
pub enum Val<'a> {
    Null,
    Int(i64),
    Float(f64),
    Bool(bool),
    Str(Cow<'a, str>),
    /// Microseconds since the Unix epoch, UTC.
    Time(EventTime),
}

impl<'a> Val<'a> {
    pub fn into_value(self) -> Value {
        match self {
            Val::Null => Value::Null,
            Val::Int(i) => Value::Int(i),
            Val::Float(f) => Value::Float(f),
            Val::Bool(b) => Value::Bool(b),
            Val::Str(s) => Value::Str(s.into_owned()),
            Val::Time(t) => Value::Time(t),
        }
    }

    pub fn from_value(v: &'a Value) -> Val<'a> {
        match v {
            Value::Null => Val::Null,
            Value::Int(i) => Val::Int(*i),
            Value::Float(f) => Val::Float(*f),
            Value::Bool(b) => Val::Bool(*b),
            Value::Str(s) => Val::Str(Cow::Borrowed(s.as_str())),
            Value::Time(t) => Val::Time(*t),
        }
    }

    pub fn is_null(&self) -> bool {
        matches!(self, Val::Null)
    }

    /// Detaches from the borrowed row, copying a borrowed string.
    fn into_static(self) -> Val<'static> {
        match self {
            Val::Null => Val::Null,
            Val::Int(i) => Val::Int(i),
            Val::Float(f) => Val::Float(f),
            Val::Bool(b) => Val::Bool(b),
            Val::Str(s) => Val::Str(Cow::Owned(s.into_owned())),
            Val::Time(t) => Val::Time(t),
        }
    }
}

/// A row the expression reads: column `i` of the schema it was compiled against. A missing
/// column reads as NULL. (`Vec<Value>` rows pass `.as_slice()`: an impl for `Vec` would shadow
/// `Vec::get` wherever this trait is imported.)
pub trait Row {
    fn get(&self, column: usize) -> Val<'_>;
}

impl Row for [Value] {
    #[inline]
    fn get(&self, column: usize) -> Val<'_> {
        match <[Value]>::get(self, column) {
            Some(v) => Val::from_value(v),
            None => Val::Null,
        }
    }
}

/// Everything the error messages offer as the alternative to an unsupported construct.
const SUPPORTED: &str = "arithmetic + - * / %, comparison = <> != < <= > >=, AND/OR/NOT, IS [NOT] NULL, IS [NOT] TRUE/FALSE, \
IS [NOT] DISTINCT FROM, [NOT] IN (...), [NOT] BETWEEN, [NOT] LIKE/ILIKE, CASE WHEN, CAST/::, EXTRACT, literals, and the functions ";

const FUNCTIONS: &str = "COALESCE, IFNULL, NVL, NULLIF, IF, GREATEST, LEAST, ABS, ROUND, FLOOR, CEIL, CEILING, SQRT, LN, LOG10, EXP, POWER, POW, \
LOWER, UPPER, TRIM, LTRIM, RTRIM, LENGTH, CHAR_LENGTH, CONCAT, SUBSTR, SUBSTRING, DATE, DATE_TRUNC, YEAR, MONTH, DAY, DAYOFMONTH, HOUR, MINUTE, SECOND";

/// Names that are aggregates elsewhere in SQL: they get a pointed message instead of "unknown function".
const AGGREGATES: &[&str] = &[
    "count",
    "sum",
    "avg",
    "mean",
    "min",
    "max",
    "stddev",
    "stddev_samp",
    "stddev_pop",
    "variance",
    "var_samp",
    "var_pop",
    "approx_percentile",
    "percentile",
    "percentile_approx",
    "approx_count_distinct",
    "count_distinct",
    "median",
    "first",
    "last",
    "first_value",
    "last_value",
    "any_value",
    "collect_list",
    "collect_set",
    "array_agg",
    "string_agg",
    "listagg",
    "count_if",
    "bool_and",
    "bool_or",
    "every",
];

/// Why an expression was rejected. Messages name the problem, the offending fragment and the fix.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ExprError {
    #[error("syntax error: {message} (in `{text}`)")]
    Syntax { message: String, text: String },
    #[error("unknown column \"{name}\" (columns: {columns}){hint}")]
    UnknownColumn { name: String, columns: String, hint: String },
    #[error("ambiguous column \"{name}\": ignoring case it matches {matches}; write the exact name in double quotes")]
    AmbiguousColumn { name: String, matches: String },
    /// A type mismatch; the message names both sides.
    #[error("{0}")]
    Type(String),
    #[error("unsupported SQL: {what} (supported: {sup}{fns})", sup = SUPPORTED, fns = FUNCTIONS)]
    Unsupported { what: String },
    #[error("unknown function {name}(...) in `{fragment}` (supported functions: {fns})", fns = FUNCTIONS)]
    UnknownFunction { name: String, fragment: String },
    #[error("invalid literal: {0}")]
    Literal(String),
    #[error("expression too complex: {0}")]
    TooComplex(String),
}

/// Longer expressions are rejected before parsing: the parser and `Drop` of its tree recurse
/// along chains like `a + b + c + ...`, and a bounded input bounds that recursion.
const MAX_TOKENS: usize = 8192;
/// Nesting allowed in the compiled tree (chains of AND/OR are flattened and do not count).
const MAX_DEPTH: usize = 128;
/// From this many literals on, `IN` looks values up in a hash set instead of scanning.
const IN_HASH_THRESHOLD: usize = 12;

/// A compiled, type-checked expression.
#[derive(Debug, Clone)]
pub struct Expr {
    root: Node,
    ty: Ty,
    text: String,
}

impl Expr {
    /// Parses `text` (one SQL expression) and type-checks it against `columns` (name, type).
    /// A column name matches exactly first, else the one column equal ignoring ASCII case.
    pub fn compile(text: &str, columns: &[(&str, FieldType)]) -> std::result::Result<Expr, ExprError> {
        let ast = parse(text)?;
        let mut compiler = Compiler { columns, depth: 0 };
        let typed = compiler.expr(&ast)?;
        Ok(Expr {
            root: typed.node,
            ty: typed.ty,
            text: text.to_string(),
        })
    }

    /// [`Expr::compile`] for a `where`/`filter`: also requires a boolean result.
    pub fn compile_predicate(text: &str, columns: &[(&str, FieldType)]) -> std::result::Result<Expr, ExprError> {
        let expr = Expr::compile(text, columns)?;
        match expr.ty {
            Ty::Bool | Ty::Null => Ok(expr),
            other => Err(ExprError::Type(format!(
                "a filter must be a boolean condition, but `{}` is {} (compare it, e.g. `{} > 0`, or use IS NOT NULL)",
                text.trim(),
                other.name(),
                text.trim()
            ))),
        }
    }

    /// The type of [`Expr::eval`]'s result. An expression that can only be NULL is `String`.
    pub fn output_type(&self) -> FieldType {
        self.ty.field_type()
    }

    /// Indexes of the columns the expression reads, sorted and deduplicated.
    pub fn columns(&self) -> Vec<usize> {
        let mut out = Vec::new();
        collect_columns(&self.root, &mut out);
        out.sort_unstable();
        out.dedup();
        out
    }

    /// Evaluates over `row`. A column reference returns the row's string borrowed; other string
    /// results are owned.
    pub fn eval<'r, R: Row + ?Sized>(&self, row: &'r R) -> Val<'r> {
        if let Node::Col { index, ty } = self.root {
            return read_column(row, index, ty);
        }
        self.root.eval(row).into_static()
    }

    /// For filters: true only when the result is TRUE (NULL and FALSE reject), as in SQL `WHERE`.
    pub fn eval_predicate<R: Row + ?Sized>(&self, row: &R) -> bool {
        matches!(self.root.eval(row), Val::Bool(true))
    }

    /// The source text the expression was compiled from.
    pub fn text(&self) -> &str {
        &self.text
    }

    /// Always NULL: stands in for `text` when it failed to compile, in a configuration that is
    /// reported invalid and never runs.
    pub fn unusable(text: &str) -> Expr {
        Expr {
            root: Node::Lit(Value::Null),
            ty: Ty::Null,
            text: text.to_string(),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Parsing
// ---------------------------------------------------------------------------------------------

fn parse(text: &str) -> Result<ast::Expr> {
    let syntax = |message: String| ExprError::Syntax {
        message,
        text: text.trim().to_string(),
    };
    if text.trim().is_empty() {
        return Err(syntax("the expression is empty".into()));
    }
    let dialect = GenericDialect {};
    let tokens = Tokenizer::new(&dialect, text).tokenize_with_location().map_err(|e| syntax(e.to_string()))?;
    let significant = tokens.iter().filter(|t| !matches!(t.token, Token::Whitespace(_))).count();
    if significant > MAX_TOKENS {
        return Err(ExprError::TooComplex(format!(
            "{significant} tokens, more than the {MAX_TOKENS} allowed; split it into derived columns or shorten IN lists"
        )));
    }
    let mut parser = Parser::new(&dialect).with_tokens_with_locations(tokens);
    let ast = parser.parse_expr().map_err(|e| {
        syntax(match e {
            ParserError::TokenizerError(m) | ParserError::ParserError(m) => m,
            ParserError::RecursionLimitExceeded => "the expression nests too deeply".into(),
        })
    })?;
    let next = parser.peek_token();
    if next.token != Token::EOF {
        let at = next.span.start;
        return Err(syntax(format!(
            "unexpected {} at line {}, column {} after the complete expression `{ast}` (a missing operator, AND/OR, or comma?)",
            next.token, at.line, at.column
        )));
    }
    Ok(ast)
}

// ---------------------------------------------------------------------------------------------
// The compiled tree
// ---------------------------------------------------------------------------------------------

/// Static types. `Null` is the type of the bare NULL literal, which fits anywhere.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Ty {
    Null,
    Int,
    Float,
    Bool,
    Str,
    Time,
}

impl Ty {
    fn from_field(t: FieldType) -> Ty {
        match t {
            FieldType::String => Ty::Str,
            FieldType::Int => Ty::Int,
            FieldType::Float => Ty::Float,
            FieldType::Bool => Ty::Bool,
            FieldType::Timestamp => Ty::Time,
        }
    }

    fn field_type(self) -> FieldType {
        match self {
            Ty::Null | Ty::Str => FieldType::String,
            Ty::Int => FieldType::Int,
            Ty::Float => FieldType::Float,
            Ty::Bool => FieldType::Bool,
            Ty::Time => FieldType::Timestamp,
        }
    }

    fn name(self) -> &'static str {
        match self {
            Ty::Null => "null",
            Ty::Int => "int",
            Ty::Float => "float",
            Ty::Bool => "bool",
            Ty::Str => "string",
            Ty::Time => "timestamp",
        }
    }

    fn numeric(self) -> bool {
        matches!(self, Ty::Int | Ty::Float)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum CmpOp {
    Eq,
    Ne,
    Lt,
    Le,
    Gt,
    Ge,
    /// `IS DISTINCT FROM`: NULL-safe `<>`.
    Distinct,
    /// `IS NOT DISTINCT FROM` / `<=>`: NULL-safe `=`.
    NotDistinct,
}

/// Arithmetic with the operand types fixed at compile time (ints are widened to float by an
/// explicit [`Node::ToFloat`] where needed, so each kernel sees one shape).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ArithOp {
    IntAdd,
    IntSub,
    IntMul,
    IntMod,
    FloatAdd,
    FloatSub,
    FloatMul,
    FloatDiv,
    FloatMod,
    /// timestamp + int µs (int + timestamp is compiled with the operands swapped).
    TimeAdd,
    /// timestamp − int µs.
    TimeSub,
    /// timestamp − timestamp → int µs.
    TimeDiff,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum CastTo {
    Int,
    Float,
    Str,
    Bool,
    Time,
    /// A `YYYY-MM-DD` string.
    Date,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum TruncUnit {
    Second,
    Minute,
    Hour,
    Day,
    Week,
    Month,
    Quarter,
    Year,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Part {
    Year,
    Month,
    Day,
    Hour,
    Minute,
    Second,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum TrimSide {
    Both,
    Leading,
    Trailing,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Func {
    Coalesce,
    NullIf,
    Greatest,
    Least,
    AbsInt,
    AbsFloat,
    /// Digits, always negative (non-negative rounding of an int is the int itself).
    RoundInt(i32),
    RoundFloat(i32),
    Floor,
    Ceil,
    Sqrt,
    Ln,
    Log10,
    Exp,
    Power,
    Lower,
    Upper,
    Trim(TrimSide),
    Length,
    Concat,
    Substr,
    DateTrunc(TruncUnit),
    Part(Part),
}

/// Literal `IN` lists, by what the tested value is compared as.
#[derive(Debug, Clone)]
enum LitSet {
    /// Ints or timestamps.
    Ints(Vec<i64>),
    IntHash(HashSet<i64>),
    Strs(Vec<Box<str>>),
    StrHash(HashSet<Box<str>>),
    /// Anything else (bools, int/float mixes): compared one by one.
    Other(Vec<Value>),
}

impl LitSet {
    fn contains(&self, v: &Val<'_>) -> bool {
        match (self, v) {
            (LitSet::Ints(xs), Val::Int(i) | Val::Time(i)) => xs.contains(i),
            (LitSet::IntHash(xs), Val::Int(i) | Val::Time(i)) => xs.contains(i),
            (LitSet::Strs(xs), Val::Str(s)) => xs.iter().any(|x| **x == **s),
            (LitSet::StrHash(xs), Val::Str(s)) => xs.contains(s.as_ref()),
            (LitSet::Other(xs), v) => xs.iter().any(|x| compare(v, &Val::from_value(x)) == Some(Ordering::Equal)),
            _ => false,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum LikeTok {
    Any,
    One,
    Char(char),
}

/// A compiled LIKE pattern. Patterns without `_` split into literal pieces between `%`s and
/// match with `starts_with`/`find`/`ends_with`, which covers the usual prefix, suffix and
/// contains filters without a per-character loop.
#[derive(Debug, Clone)]
enum LikePattern {
    Pieces { pieces: Vec<Box<str>>, open_start: bool, open_end: bool },
    General(Vec<LikeTok>),
}

impl LikePattern {
    fn compile(pattern: &str, escape: Option<char>) -> std::result::Result<LikePattern, String> {
        let mut toks = Vec::new();
        let mut chars = pattern.chars();
        while let Some(c) = chars.next() {
            if Some(c) == escape {
                match chars.next() {
                    Some(next) => toks.push(LikeTok::Char(next)),
                    None => {
                        return Err(format!(
                            "the LIKE pattern '{pattern}' ends with the escape character '{c}'; write it twice to match it literally"
                        ))
                    }
                }
            } else if c == '%' {
                // Runs of % are one %.
                if toks.last() != Some(&LikeTok::Any) {
                    toks.push(LikeTok::Any);
                }
            } else if c == '_' {
                toks.push(LikeTok::One);
            } else {
                toks.push(LikeTok::Char(c));
            }
        }
        if toks.contains(&LikeTok::One) {
            return Ok(LikePattern::General(toks));
        }
        let open_start = toks.first() == Some(&LikeTok::Any);
        let open_end = toks.last() == Some(&LikeTok::Any);
        let mut pieces = Vec::new();
        let mut cur = String::new();
        for t in &toks {
            match t {
                LikeTok::Char(c) => cur.push(*c),
                _ => {
                    if !cur.is_empty() {
                        pieces.push(std::mem::take(&mut cur).into_boxed_str());
                    }
                }
            }
        }
        if !cur.is_empty() {
            pieces.push(cur.into_boxed_str());
        }
        Ok(LikePattern::Pieces { pieces, open_start, open_end })
    }

    fn matches(&self, s: &str) -> bool {
        match self {
            LikePattern::Pieces { pieces, open_start, open_end } => {
                if pieces.is_empty() {
                    // '' matches only ''; '%' matches anything.
                    return *open_start || s.is_empty();
                }
                let last_index = pieces.len() - 1;
                let mut rest = s;
                for (i, piece) in pieces.iter().enumerate() {
                    if i == 0 && !open_start {
                        match rest.strip_prefix(&**piece) {
                            Some(r) => rest = r,
                            None => return false,
                        }
                    } else if i == last_index && !open_end {
                        return rest.ends_with(&**piece);
                    } else {
                        // Leftmost match of each middle piece leaves the most room for the rest.
                        match rest.find(&**piece) {
                            Some(at) => rest = &rest[at + piece.len()..],
                            None => return false,
                        }
                    }
                }
                *open_end || rest.is_empty()
            }
            LikePattern::General(toks) => like_general(s, toks),
        }
    }
}

/// Wildcard matching with single-star backtracking: on a mismatch, retry from the last `%`
/// consuming one more character. O(len(s) · len(pattern)), no allocation.
fn like_general(s: &str, toks: &[LikeTok]) -> bool {
    let (mut si, mut ti) = (0usize, 0usize);
    let mut star: Option<(usize, usize)> = None;
    loop {
        if let Some(tok) = toks.get(ti) {
            let next = s[si..].chars().next();
            match (tok, next) {
                (LikeTok::Any, _) => {
                    star = Some((ti + 1, si));
                    ti += 1;
                    continue;
                }
                (LikeTok::One, Some(c)) => {
                    si += c.len_utf8();
                    ti += 1;
                    continue;
                }
                (LikeTok::Char(p), Some(c)) if *p == c => {
                    si += c.len_utf8();
                    ti += 1;
                    continue;
                }
                _ => {}
            }
        } else if si == s.len() {
            return true;
        }
        match star {
            Some((after_star, from)) => match s[from..].chars().next() {
                Some(c) => {
                    let from = from + c.len_utf8();
                    star = Some((after_star, from));
                    ti = after_star;
                    si = from;
                }
                None => return false,
            },
            None => return false,
        }
    }
}

#[derive(Debug, Clone)]
enum Node {
    Lit(Value),
    /// A column of the declared type; a row value of another type reads as NULL.
    Col {
        index: usize,
        ty: Ty,
    },
    Not(Box<Node>),
    And(Vec<Node>),
    Or(Vec<Node>),
    IsNull {
        e: Box<Node>,
        negated: bool,
    },
    /// `IS [NOT] TRUE/FALSE`.
    IsBool {
        e: Box<Node>,
        value: bool,
        negated: bool,
    },
    Cmp {
        op: CmpOp,
        l: Box<Node>,
        r: Box<Node>,
    },
    InSet {
        e: Box<Node>,
        set: LitSet,
        has_null: bool,
        negated: bool,
    },
    Like {
        e: Box<Node>,
        pattern: LikePattern,
        negated: bool,
        case_insensitive: bool,
    },
    Arith {
        op: ArithOp,
        l: Box<Node>,
        r: Box<Node>,
    },
    Neg(Box<Node>),
    ToFloat(Box<Node>),
    Case {
        operand: Option<Box<Node>>,
        whens: Vec<(Node, Node)>,
        otherwise: Box<Node>,
    },
    Cast {
        e: Box<Node>,
        to: CastTo,
    },
    Call {
        func: Func,
        args: Vec<Node>,
    },
}

fn collect_columns(node: &Node, out: &mut Vec<usize>) {
    if let Node::Col { index, .. } = node {
        out.push(*index);
    }
    node.for_each_child(&mut |c| collect_columns(c, out));
}

#[inline(always)]
fn read_column<R: Row + ?Sized>(row: &R, index: usize, ty: Ty) -> Val<'_> {
    match (ty, row.get(index)) {
        (Ty::Int, v @ Val::Int(_))
        | (Ty::Float, v @ Val::Float(_))
        | (Ty::Bool, v @ Val::Bool(_))
        | (Ty::Str, v @ Val::Str(_))
        | (Ty::Time, v @ Val::Time(_)) => v,
        (Ty::Float, Val::Int(i)) => Val::Float(i as f64),
        _ => Val::Null,
    }
}

impl Node {
    fn for_each_child(&self, f: &mut dyn FnMut(&Node)) {
        match self {
            Node::Lit(_) | Node::Col { .. } => {}
            Node::Not(e) | Node::Neg(e) | Node::ToFloat(e) => f(e),
            Node::IsNull { e, .. } | Node::IsBool { e, .. } | Node::InSet { e, .. } | Node::Like { e, .. } | Node::Cast { e, .. } => f(e),
            Node::And(xs) | Node::Or(xs) | Node::Call { args: xs, .. } => xs.iter().for_each(f),
            Node::Cmp { l, r, .. } | Node::Arith { l, r, .. } => {
                f(l);
                f(r);
            }
            Node::Case { operand, whens, otherwise } => {
                if let Some(o) = operand {
                    f(o);
                }
                for (w, t) in whens {
                    f(w);
                    f(t);
                }
                f(otherwise);
            }
        }
    }

    /// Evaluates a child: leaves (columns and literals, most children in practice) are read
    /// here instead of through a recursive call, which saves a call and a hard-to-predict
    /// indirect jump per leaf on the event path.
    #[inline(always)]
    fn eval_child<'a, R: Row + ?Sized>(&'a self, row: &'a R) -> Val<'a> {
        match self {
            Node::Col { index, ty } => read_column(row, *index, *ty),
            Node::Lit(v) => Val::from_value(v),
            _ => self.eval(row),
        }
    }

    fn eval<'a, R: Row + ?Sized>(&'a self, row: &'a R) -> Val<'a> {
        match self {
            Node::Lit(v) => Val::from_value(v),
            Node::Col { index, ty } => read_column(row, *index, *ty),
            Node::Not(e) => match e.eval_child(row) {
                Val::Bool(b) => Val::Bool(!b),
                _ => Val::Null,
            },
            Node::And(xs) => {
                let mut unknown = false;
                for x in xs {
                    match x.eval_child(row) {
                        Val::Bool(false) => return Val::Bool(false),
                        Val::Bool(true) => {}
                        _ => unknown = true,
                    }
                }
                if unknown {
                    Val::Null
                } else {
                    Val::Bool(true)
                }
            }
            Node::Or(xs) => {
                let mut unknown = false;
                for x in xs {
                    match x.eval_child(row) {
                        Val::Bool(true) => return Val::Bool(true),
                        Val::Bool(false) => {}
                        _ => unknown = true,
                    }
                }
                if unknown {
                    Val::Null
                } else {
                    Val::Bool(false)
                }
            }
            Node::IsNull { e, negated } => Val::Bool(e.eval_child(row).is_null() != *negated),
            Node::IsBool { e, value, negated } => Val::Bool(matches!(e.eval_child(row), Val::Bool(b) if b == *value) != *negated),
            Node::Cmp { op, l, r } => {
                let a = l.eval_child(row);
                if a.is_null() && !matches!(op, CmpOp::Distinct | CmpOp::NotDistinct) {
                    return Val::Null;
                }
                apply_cmp(*op, &a, &r.eval_child(row))
            }
            Node::InSet { e, set, has_null, negated } => {
                let v = e.eval_child(row);
                if v.is_null() {
                    Val::Null
                } else if set.contains(&v) {
                    Val::Bool(!negated)
                } else if *has_null {
                    Val::Null
                } else {
                    Val::Bool(*negated)
                }
            }
            Node::Like {
                e,
                pattern,
                negated,
                case_insensitive,
            } => match e.eval_child(row) {
                Val::Str(s) if *case_insensitive => Val::Bool(pattern.matches(&s.to_lowercase()) != *negated),
                Val::Str(s) => Val::Bool(pattern.matches(&s) != *negated),
                _ => Val::Null,
            },
            Node::Arith { op, l, r } => {
                let a = l.eval_child(row);
                if a.is_null() {
                    return Val::Null;
                }
                arith(*op, a, r.eval_child(row))
            }
            Node::Neg(e) => match e.eval_child(row) {
                Val::Int(i) => i.checked_neg().map_or(Val::Null, Val::Int),
                Val::Float(f) => Val::Float(-f),
                _ => Val::Null,
            },
            Node::ToFloat(e) => match e.eval_child(row) {
                Val::Int(i) => Val::Float(i as f64),
                v @ Val::Float(_) => v,
                _ => Val::Null,
            },
            Node::Case { operand, whens, otherwise } => {
                match operand {
                    Some(operand) => {
                        let v = operand.eval_child(row);
                        if !v.is_null() {
                            for (w, then) in whens {
                                if compare(&v, &w.eval_child(row)) == Some(Ordering::Equal) {
                                    return then.eval_child(row);
                                }
                            }
                        }
                    }
                    None => {
                        for (w, then) in whens {
                            if matches!(w.eval_child(row), Val::Bool(true)) {
                                return then.eval_child(row);
                            }
                        }
                    }
                }
                otherwise.eval_child(row)
            }
            Node::Cast { e, to } => cast(e.eval_child(row), *to),
            Node::Call { func, args } => call(*func, args, row),
        }
    }
}

/// Orders two values of compatible types; `None` when either is NULL (or, defensively, when
/// the types do not match). Int and float compare by exact value.
#[inline]
fn compare(a: &Val<'_>, b: &Val<'_>) -> Option<Ordering> {
    match (a, b) {
        (Val::Int(x), Val::Int(y)) | (Val::Time(x), Val::Time(y)) => Some(x.cmp(y)),
        (Val::Float(x), Val::Float(y)) => Some(cmp_f64(*x, *y)),
        (Val::Int(x), Val::Float(y)) => Some(cmp_i64_f64(*x, *y)),
        (Val::Float(x), Val::Int(y)) => Some(cmp_i64_f64(*y, *x).reverse()),
        (Val::Str(x), Val::Str(y)) => Some(x.as_ref().cmp(y.as_ref())),
        (Val::Bool(x), Val::Bool(y)) => Some(x.cmp(y)),
        _ => None,
    }
}

/// Total order on floats as Spark has it: NaN equals NaN and is above everything; -0 = 0.
#[inline]
fn cmp_f64(x: f64, y: f64) -> Ordering {
    match (x.is_nan(), y.is_nan()) {
        (true, true) => Ordering::Equal,
        (true, false) => Ordering::Greater,
        (false, true) => Ordering::Less,
        (false, false) => x.partial_cmp(&y).unwrap_or(Ordering::Equal),
    }
}

/// Exact comparison of an int with a float: converting the int to f64 would round above 2^53.
#[inline]
fn cmp_i64_f64(i: i64, f: f64) -> Ordering {
    if f.is_nan() {
        return Ordering::Less;
    }
    // 2^63 is exactly representable; every i64 is below it and at or above -2^63.
    const TWO_63: f64 = 9_223_372_036_854_775_808.0;
    if f >= TWO_63 {
        return Ordering::Less;
    }
    if f < -TWO_63 {
        return Ordering::Greater;
    }
    let whole = f.trunc();
    // In range, so the cast is exact.
    match i.cmp(&(whole as i64)) {
        Ordering::Equal => 0.0f64.partial_cmp(&(f - whole)).unwrap_or(Ordering::Equal),
        other => other,
    }
}

#[inline]
fn apply_cmp(op: CmpOp, a: &Val<'_>, b: &Val<'_>) -> Val<'static> {
    // Equality of strings needs no ordering: `==` rejects on length before comparing bytes.
    if let (CmpOp::Eq | CmpOp::Ne, Val::Str(x), Val::Str(y)) = (op, a, b) {
        return Val::Bool((x == y) == (op == CmpOp::Eq));
    }
    let ord = match op {
        CmpOp::Distinct | CmpOp::NotDistinct => {
            let same = match (a.is_null(), b.is_null()) {
                (true, true) => true,
                (false, false) => compare(a, b) == Some(Ordering::Equal),
                _ => false,
            };
            return Val::Bool(same == (op == CmpOp::NotDistinct));
        }
        _ => match compare(a, b) {
            Some(o) => o,
            None => return Val::Null,
        },
    };
    Val::Bool(match op {
        CmpOp::Eq => ord == Ordering::Equal,
        CmpOp::Ne => ord != Ordering::Equal,
        CmpOp::Lt => ord == Ordering::Less,
        CmpOp::Le => ord != Ordering::Greater,
        CmpOp::Gt => ord == Ordering::Greater,
        CmpOp::Ge | CmpOp::Distinct | CmpOp::NotDistinct => ord != Ordering::Less,
    })
}

#[inline]
fn arith(op: ArithOp, a: Val<'_>, b: Val<'_>) -> Val<'static> {
    use ArithOp::*;
    let int = |r: Option<i64>| r.map_or(Val::Null, Val::Int);
    match (op, a, b) {
        (IntAdd, Val::Int(x), Val::Int(y)) => int(x.checked_add(y)),
        (IntSub, Val::Int(x), Val::Int(y)) => int(x.checked_sub(y)),
        (IntMul, Val::Int(x), Val::Int(y)) => int(x.checked_mul(y)),
        // i64::MIN % -1 is mathematically 0; only `checked_rem` calls it overflow.
        (IntMod, Val::Int(x), Val::Int(y)) if y != 0 => Val::Int(x.wrapping_rem(y)),
        (FloatAdd, Val::Float(x), Val::Float(y)) => Val::Float(x + y),
        (FloatSub, Val::Float(x), Val::Float(y)) => Val::Float(x - y),
        (FloatMul, Val::Float(x), Val::Float(y)) => Val::Float(x * y),
        (FloatDiv, Val::Float(x), Val::Float(y)) if y != 0.0 => Val::Float(x / y),
        (FloatMod, Val::Float(x), Val::Float(y)) if y != 0.0 => Val::Float(x % y),
        (TimeAdd, Val::Time(t), Val::Int(d)) => t.checked_add(d).map_or(Val::Null, Val::Time),
        (TimeSub, Val::Time(t), Val::Int(d)) => t.checked_sub(d).map_or(Val::Null, Val::Time),
        (TimeDiff, Val::Time(x), Val::Time(y)) => int(x.checked_sub(y)),
        _ => Val::Null,
    }
}

fn f64_to_i64(f: f64) -> Option<i64> {
    let t = f.trunc();
    // NaN fails both comparisons.
    (-9_223_372_036_854_775_808.0..9_223_372_036_854_775_808.0).contains(&t).then_some(t as i64)
}

fn cast(v: Val<'_>, to: CastTo) -> Val<'_> {
    match (to, v) {
        (_, Val::Null) => Val::Null,
        (CastTo::Int, v @ Val::Int(_)) => v,
        (CastTo::Int, Val::Float(f)) => f64_to_i64(f).map_or(Val::Null, Val::Int),
        (CastTo::Int, Val::Str(s)) => {
            let s = s.trim();
            match s.parse::<i64>() {
                Ok(i) => Val::Int(i),
                Err(_) => s.parse::<f64>().ok().and_then(f64_to_i64).map_or(Val::Null, Val::Int),
            }
        }
        (CastTo::Int, Val::Bool(b)) => Val::Int(b as i64),
        (CastTo::Int, Val::Time(t)) => Val::Int(t),
        (CastTo::Float, Val::Int(i)) => Val::Float(i as f64),
        (CastTo::Float, v @ Val::Float(_)) => v,
        (CastTo::Float, Val::Str(s)) => s.trim().parse::<f64>().map_or(Val::Null, Val::Float),
        (CastTo::Float, Val::Bool(b)) => Val::Float(if b { 1.0 } else { 0.0 }),
        (CastTo::Str, v @ Val::Str(_)) => v,
        (CastTo::Str, Val::Int(i)) => Val::Str(Cow::Owned(i.to_string())),
        // Debug keeps a ".0" on whole numbers, so a float reads back as a float.
        (CastTo::Str, Val::Float(f)) => Val::Str(Cow::Owned(format!("{f:?}"))),
        (CastTo::Str, Val::Bool(b)) => Val::Str(Cow::Borrowed(if b { "true" } else { "false" })),
        (CastTo::Str, Val::Time(t)) => Val::Str(Cow::Owned(format_timestamp(t))),
        (CastTo::Bool, Val::Int(i)) => Val::Bool(i != 0),
        (CastTo::Bool, Val::Float(f)) if !f.is_nan() => Val::Bool(f != 0.0),
        (CastTo::Bool, Val::Str(s)) => parse_bool(&s).map_or(Val::Null, Val::Bool),
        (CastTo::Bool, v @ Val::Bool(_)) => v,
        (CastTo::Time, Val::Str(s)) => parse_timestamp(&s).map_or(Val::Null, Val::Time),
        (CastTo::Time, Val::Int(i)) => Val::Time(i),
        (CastTo::Time, v @ Val::Time(_)) => v,
        (CastTo::Date, Val::Time(t)) => Val::Str(Cow::Owned(format_date(t))),
        (CastTo::Date, Val::Str(s)) => parse_timestamp(&s).map_or(Val::Null, |t| Val::Str(Cow::Owned(format_date(t)))),
        _ => Val::Null,
    }
}

fn parse_bool(s: &str) -> Option<bool> {
    let s = s.trim();
    let any = |words: &[&str]| words.iter().any(|w| s.eq_ignore_ascii_case(w));
    if any(&["true", "t", "yes", "y", "1"]) {
        Some(true)
    } else if any(&["false", "f", "no", "n", "0"]) {
        Some(false)
    } else {
        None
    }
}

fn call<'a, R: Row + ?Sized>(func: Func, args: &'a [Node], row: &'a R) -> Val<'a> {
    let float = |f: f64| if f.is_nan() { Val::Null } else { Val::Float(f) };
    match (func, args) {
        (Func::Coalesce, _) => args.iter().map(|a| a.eval_child(row)).find(|v| !v.is_null()).unwrap_or(Val::Null),
        (Func::NullIf, [a, b]) => {
            let v = a.eval_child(row);
            if compare(&v, &b.eval_child(row)) == Some(Ordering::Equal) {
                Val::Null
            } else {
                v
            }
        }
        (Func::Greatest | Func::Least, _) => {
            let want = if func == Func::Greatest { Ordering::Greater } else { Ordering::Less };
            let mut best = Val::Null;
            for a in args {
                let v = a.eval_child(row);
                if !v.is_null() && (best.is_null() || compare(&v, &best) == Some(want)) {
                    best = v;
                }
            }
            best
        }
        (_, [a]) => call1(func, a.eval_child(row)),
        (Func::Power, [a, b]) => match (a.eval_child(row), b.eval_child(row)) {
            (Val::Float(x), Val::Float(y)) => float(x.powf(y)),
            _ => Val::Null,
        },
        (Func::Concat, _) => {
            let mut out = String::new();
            for a in args {
                match a.eval_child(row) {
                    Val::Str(s) => out.push_str(&s),
                    _ => return Val::Null,
                }
            }
            Val::Str(Cow::Owned(out))
        }
        (Func::Substr, [s, start, rest @ ..]) => {
            let (s, start) = (s.eval_child(row), start.eval_child(row));
            let len = match rest {
                [] => None,
                [len] => match len.eval_child(row) {
                    Val::Int(n) => Some(n),
                    _ => return Val::Null,
                },
                _ => return Val::Null,
            };
            match (s, start) {
                (Val::Str(s), Val::Int(start)) => Val::Str(map_cow(s, |s| substr(s, start, len))),
                _ => Val::Null,
            }
        }
        _ => Val::Null,
    }
}

/// Narrows a string to a sub-slice, staying borrowed when it was.
fn map_cow<'a>(s: Cow<'a, str>, f: impl FnOnce(&str) -> &str) -> Cow<'a, str> {
    match s {
        Cow::Borrowed(b) => Cow::Borrowed(f(b)),
        Cow::Owned(o) => Cow::Owned(f(&o).to_string()),
    }
}

fn call1(func: Func, v: Val<'_>) -> Val<'_> {
    let float = |f: f64| if f.is_nan() { Val::Null } else { Val::Float(f) };
    match (func, v) {
        (_, Val::Null) => Val::Null,
        (Func::AbsInt, Val::Int(i)) => i.checked_abs().map_or(Val::Null, Val::Int),
        (Func::AbsFloat, Val::Float(f)) => Val::Float(f.abs()),
        (Func::RoundInt(digits), Val::Int(i)) => round_i64(i, digits).map_or(Val::Null, Val::Int),
        (Func::RoundFloat(digits), Val::Float(f)) => Val::Float(round_f64(f, digits)),
        (Func::Floor, Val::Float(f)) => f64_to_i64(f.floor()).map_or(Val::Null, Val::Int),
        (Func::Ceil, Val::Float(f)) => f64_to_i64(f.ceil()).map_or(Val::Null, Val::Int),
        (Func::Sqrt, Val::Float(f)) => float(f.sqrt()),
        (Func::Ln, Val::Float(f)) if f > 0.0 => float(f.ln()),
        (Func::Log10, Val::Float(f)) if f > 0.0 => float(f.log10()),
        (Func::Exp, Val::Float(f)) => float(f.exp()),
        (Func::Lower, Val::Str(s)) => Val::Str(Cow::Owned(s.to_lowercase())),
        (Func::Upper, Val::Str(s)) => Val::Str(Cow::Owned(s.to_uppercase())),
        (Func::Trim(side), Val::Str(s)) => Val::Str(map_cow(s, |s| match side {
            TrimSide::Both => s.trim_matches(' '),
            TrimSide::Leading => s.trim_start_matches(' '),
            TrimSide::Trailing => s.trim_end_matches(' '),
        })),
        (Func::Length, Val::Str(s)) => Val::Int(s.chars().count() as i64),
        (Func::Concat, v @ Val::Str(_)) => v,
        (Func::DateTrunc(unit), Val::Time(t)) => truncate_time(t, unit).map_or(Val::Null, Val::Time),
        (Func::Part(part), Val::Time(t)) => Val::Int(time_part(t, part)),
        _ => Val::Null,
    }
}

/// Spark's `substring`: 1-based `start`; 0 acts as 1; negative counts from the end; a missing
/// length runs to the end; a negative length is empty.
fn substr(s: &str, start: i64, len: Option<i64>) -> &str {
    let start = start as i128;
    let from = if start > 0 {
        start - 1
    } else if start < 0 {
        s.chars().count() as i128 + start
    } else {
        0
    };
    let to = match len {
        Some(n) => from + n as i128,
        None => i128::MAX,
    };
    let from = from.max(0);
    if from >= to {
        return "";
    }
    let byte_at = |chars: i128| -> usize {
        if chars >= s.len() as i128 {
            return s.len();
        }
        s.char_indices().nth(chars as usize).map_or(s.len(), |(b, _)| b)
    };
    let (b0, b1) = (byte_at(from), byte_at(to));
    &s[b0..b1.max(b0)]
}

/// Rounds half away from zero to `digits` (negative: tens, hundreds...); None on overflow.
fn round_i64(x: i64, digits: i32) -> Option<i64> {
    if digits >= 0 {
        return Some(x);
    }
    let Some(unit) = 10i64.checked_pow(digits.unsigned_abs()) else {
        return Some(0);
    };
    let rem = x % unit;
    let down = x - rem;
    if rem.unsigned_abs() * 2 >= unit as u64 {
        if x >= 0 {
            down.checked_add(unit)
        } else {
            down.checked_sub(unit)
        }
    } else {
        Some(down)
    }
}

/// Rounds half away from zero on the shortest decimal that reads back as `x` (what users see),
/// so `round(2.675, 2)` is 2.68 although the double is 2.67499999…: scaling by 100 in binary
/// would say 2.67.
fn round_f64(x: f64, digits: i32) -> f64 {
    if !x.is_finite() || x == 0.0 {
        return x;
    }
    let sci = format!("{:e}", x.abs());
    let Some((mantissa, exp)) = sci.split_once('e') else {
        return x;
    };
    let Ok(exp) = exp.parse::<i64>() else {
        return x;
    };
    let sig: Vec<u8> = mantissa.bytes().filter(u8::is_ascii_digit).collect();
    // The digit at index i is worth 10^(exp - i); keep those worth at least 10^-digits.
    let keep = exp + digits as i64 + 1;
    if keep < 0 {
        return 0.0;
    }
    let keep = keep as usize;
    if keep >= sig.len() {
        return x;
    }
    let mut n: u64 = sig[..keep].iter().fold(0, |n, d| n * 10 + (d - b'0') as u64);
    if sig[keep] >= b'5' {
        n += 1;
    }
    let rounded: f64 = format!("{n}e{}", exp - keep as i64 + 1).parse().unwrap_or(x.abs());
    if rounded == 0.0 {
        0.0
    } else {
        rounded.copysign(x)
    }
}

// ---------------------------------------------------------------------------------------------
// Time: civil-calendar arithmetic on µs since the epoch, UTC
// ---------------------------------------------------------------------------------------------

const MICROS_PER_SECOND: i64 = 1_000_000;
const MICROS_PER_MINUTE: i64 = 60 * MICROS_PER_SECOND;
const MICROS_PER_HOUR: i64 = 60 * MICROS_PER_MINUTE;
const MICROS_PER_DAY: i64 = 24 * MICROS_PER_HOUR;

/// Reads `YYYY-MM-DD[( |T)HH:MM[:SS[.fraction]]][Z|±HH[:MM]|±HHMM]`, UTC when no offset is
/// given. The fraction is cut to microseconds.
fn parse_timestamp(text: &str) -> Option<EventTime> {
    struct Cursor<'s> {
        s: &'s [u8],
        i: usize,
    }
    impl Cursor<'_> {
        fn peek(&self) -> Option<u8> {
            self.s.get(self.i).copied()
        }
        fn eat(&mut self, b: u8) -> bool {
            let hit = self.peek() == Some(b);
            self.i += usize::from(hit);
            hit
        }
        fn digits(&mut self, n: usize) -> Option<i64> {
            let d = self.s.get(self.i..self.i + n)?;
            if !d.iter().all(u8::is_ascii_digit) {
                return None;
            }
            self.i += n;
            Some(d.iter().fold(0, |acc, b| acc * 10 + (b - b'0') as i64))
        }
    }
    let mut c = Cursor {
        s: text.trim().as_bytes(),
        i: 0,
    };
    let year = c.digits(4)?;
    c.eat(b'-').then_some(())?;
    let month = c.digits(2)? as u32;
    c.eat(b'-').then_some(())?;
    let day = c.digits(2)? as u32;
    if !(1..=12).contains(&month) || day == 0 || day > days_in_month(year, month) {
        return None;
    }
    let (mut hour, mut minute, mut second, mut micros, mut offset) = (0, 0, 0, 0, 0);
    if c.peek().is_some() {
        if !(c.eat(b'T') || c.eat(b't') || c.eat(b' ')) {
            return None;
        }
        hour = c.digits(2)?;
        c.eat(b':').then_some(())?;
        minute = c.digits(2)?;
        if c.eat(b':') {
            second = c.digits(2)?;
            if c.eat(b'.') {
                let mut n = 0;
                while let Some(d) = c.peek().filter(u8::is_ascii_digit) {
                    if n < 6 {
                        micros = micros * 10 + (d - b'0') as i64;
                    }
                    n += 1;
                    c.i += 1;
                }
                if n == 0 || n > 9 {
                    return None;
                }
                micros *= 10i64.pow(6u32.saturating_sub(n as u32));
            }
        }
        match c.peek() {
            None => {}
            Some(b'Z' | b'z') => c.i += 1,
            Some(sign @ (b'+' | b'-')) => {
                c.i += 1;
                let oh = c.digits(2)?;
                c.eat(b':');
                let om = if c.peek().is_some() { c.digits(2)? } else { 0 };
                if oh > 23 || om > 59 {
                    return None;
                }
                offset = (oh * 60 + om) * MICROS_PER_MINUTE * if sign == b'-' { -1 } else { 1 };
            }
            Some(_) => return None,
        }
        if c.peek().is_some() || hour > 23 || minute > 59 || second > 59 {
            return None;
        }
    }
    // A four-digit year keeps all of this far inside i64.
    Some(
        days_from_civil(year, month, day) * MICROS_PER_DAY + hour * MICROS_PER_HOUR + minute * MICROS_PER_MINUTE + second * MICROS_PER_SECOND + micros - offset,
    )
}

fn format_date(t: EventTime) -> String {
    let (y, m, d) = civil_from_days(t.div_euclid(MICROS_PER_DAY));
    format!("{y:04}-{m:02}-{d:02}")
}

/// `YYYY-MM-DD HH:MM:SS[.ffffff]` (UTC), the fraction without trailing zeros.
fn format_timestamp(t: EventTime) -> String {
    let mut out = format_date(t);
    let in_day = t.rem_euclid(MICROS_PER_DAY);
    let secs = in_day / MICROS_PER_SECOND;
    let _ = write!(out, " {:02}:{:02}:{:02}", secs / 3600, secs / 60 % 60, secs % 60);
    let micros = in_day % MICROS_PER_SECOND;
    if micros != 0 {
        let frac = format!("{micros:06}");
        out.push('.');
        out.push_str(frac.trim_end_matches('0'));
    }
    out
}

fn truncate_time(t: EventTime, unit: TruncUnit) -> Option<EventTime> {
    let floor_to = |unit: i64| t.div_euclid(unit).checked_mul(unit);
    let days = t.div_euclid(MICROS_PER_DAY);
    let at_day = |d: i64| d.checked_mul(MICROS_PER_DAY);
    match unit {
        TruncUnit::Second => floor_to(MICROS_PER_SECOND),
        TruncUnit::Minute => floor_to(MICROS_PER_MINUTE),
        TruncUnit::Hour => floor_to(MICROS_PER_HOUR),
        TruncUnit::Day => at_day(days),
        // 1970-01-01 was a Thursday: three days after a Monday.
        TruncUnit::Week => at_day(days - (days + 3).rem_euclid(7)),
        TruncUnit::Month | TruncUnit::Quarter | TruncUnit::Year => {
            let (y, m, _) = civil_from_days(days);
            let month = match unit {
                TruncUnit::Month => m,
                TruncUnit::Quarter => (m - 1) / 3 * 3 + 1,
                _ => 1,
            };
            at_day(days_from_civil(y, month, 1))
        }
    }
}

fn time_part(t: EventTime, part: Part) -> i64 {
    let in_day = t.rem_euclid(MICROS_PER_DAY);
    match part {
        Part::Hour => in_day / MICROS_PER_HOUR,
        Part::Minute => in_day / MICROS_PER_MINUTE % 60,
        Part::Second => in_day / MICROS_PER_SECOND % 60,
        Part::Year | Part::Month | Part::Day => {
            let (y, m, d) = civil_from_days(t.div_euclid(MICROS_PER_DAY));
            match part {
                Part::Year => y,
                Part::Month => m as i64,
                _ => d as i64,
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Compiling: AST → typed tree
// ---------------------------------------------------------------------------------------------

#[derive(Debug, Clone)]
struct Typed {
    node: Node,
    ty: Ty,
}

impl Typed {
    fn new(node: Node, ty: Ty) -> Typed {
        Typed { node: fold(node), ty }
    }

    fn lit(&self) -> Option<&Value> {
        match &self.node {
            Node::Lit(v) => Some(v),
            _ => None,
        }
    }

    fn boxed(self) -> Box<Node> {
        Box::new(self.node)
    }
}

/// Evaluates a node whose children are all literals once, now: constant parts of an
/// expression (`3600 * 1000000`, `CAST('2026-01-01' AS TIMESTAMP)`) cost nothing per event,
/// and `IN` lists of constants become literal sets.
fn fold(node: Node) -> Node {
    if matches!(node, Node::Lit(_) | Node::Col { .. }) {
        return node;
    }
    let mut constant = true;
    node.for_each_child(&mut |c| constant &= matches!(c, Node::Lit(_)));
    if !constant {
        return node;
    }
    let value = node.eval::<[Value]>(&[]).into_value();
    Node::Lit(value)
}

/// How a fragment is quoted in messages: columns as `"name"`, everything else as SQL text.
fn fragment(e: &ast::Expr) -> String {
    let text = match e {
        ast::Expr::Identifier(id) => format!("\"{}\"", id.value),
        other => other.to_string(),
    };
    if text.chars().count() > 80 {
        let cut: String = text.chars().take(77).collect();
        format!("{cut}...")
    } else {
        text
    }
}

/// "string \"page_url\"", "int 3".
fn describe(t: &Typed, e: &ast::Expr) -> String {
    format!("{} {}", t.ty.name(), fragment(e))
}

fn unsupported(what: impl Into<String>) -> ExprError {
    ExprError::Unsupported { what: what.into() }
}

/// The common type of CASE branches, COALESCE arguments and the like.
fn unify(a: Ty, b: Ty) -> Option<Ty> {
    match (a, b) {
        _ if a == b => Some(a),
        (Ty::Null, t) | (t, Ty::Null) => Some(t),
        (Ty::Int, Ty::Float) | (Ty::Float, Ty::Int) => Some(Ty::Float),
        _ => None,
    }
}

/// Widens an int to `to` = float; anything else is already of type `to` (or NULL).
fn widen(t: Typed, to: Ty) -> Typed {
    if t.ty == Ty::Int && to == Ty::Float {
        Typed::new(Node::ToFloat(t.boxed()), Ty::Float)
    } else {
        Typed {
            node: t.node,
            ty: if t.ty == Ty::Null { to } else { t.ty },
        }
    }
}

fn cast_target(dt: &DataType) -> Option<CastTo> {
    use DataType as D;
    Some(match dt {
        D::TinyInt(_)
        | D::SmallInt(_)
        | D::MediumInt(_)
        | D::Int(_)
        | D::Integer(_)
        | D::BigInt(_)
        | D::Int2(_)
        | D::Int4(_)
        | D::Int8(_)
        | D::Int16
        | D::Int32
        | D::Int64
        | D::Signed
        | D::SignedInteger => CastTo::Int,
        D::Custom(name, _) if name.to_string().eq_ignore_ascii_case("long") => CastTo::Int,
        D::Float(_)
        | D::Real
        | D::Double(_)
        | D::DoublePrecision
        | D::Float4
        | D::Float8
        | D::Float32
        | D::Float64
        | D::Decimal(_)
        | D::Numeric(_)
        | D::Dec(_)
        | D::BigDecimal(_)
        | D::BigNumeric(_) => CastTo::Float,
        D::Varchar(_)
        | D::Nvarchar(_)
        | D::Char(_)
        | D::Character(_)
        | D::CharacterVarying(_)
        | D::CharVarying(_)
        | D::Text
        | D::TinyText
        | D::MediumText
        | D::LongText
        | D::String(_) => CastTo::Str,
        D::Bool | D::Boolean => CastTo::Bool,
        D::Timestamp(_, _) | D::TimestampNtz | D::Datetime(_) => CastTo::Time,
        D::Date => CastTo::Date,
        _ => return None,
    })
}

struct Compiler<'c> {
    columns: &'c [(&'c str, FieldType)],
    depth: usize,
}

type Result<T> = std::result::Result<T, ExprError>;

impl Compiler<'_> {
    fn expr(&mut self, e: &ast::Expr) -> Result<Typed> {
        self.depth += 1;
        if self.depth > MAX_DEPTH {
            return Err(ExprError::TooComplex(format!(
                "it nests more than {MAX_DEPTH} levels deep; split it into derived columns"
            )));
        }
        let out = self.expr_inner(e);
        self.depth -= 1;
        out
    }

    fn expr_inner(&mut self, e: &ast::Expr) -> Result<Typed> {
        use ast::Expr as E;
        match e {
            E::Identifier(id) => self.column(&id.value, id.quote_style.is_some()),
            E::CompoundIdentifier(parts) => {
                let joined = parts.iter().map(|p| p.value.as_str()).collect::<Vec<_>>().join(".");
                if let Some((index, ty)) = self.columns.iter().position(|(n, _)| *n == joined).map(|i| (i, self.columns[i].1)) {
                    return Ok(Typed {
                        node: Node::Col { index, ty: Ty::from_field(ty) },
                        ty: Ty::from_field(ty),
                    });
                }
                Err(unsupported(format!(
                    "qualified name `{e}`: columns are referenced by their bare name (write \"{joined}\" in double quotes if that is the column's name)"
                )))
            }
            E::Nested(inner) => self.expr(inner),
            E::Value(v) => literal(&v.value, e),
            E::TypedString(ts) => self.typed_string(&ts.data_type, &ts.value.value, e),
            E::UnaryOp { op, expr } => self.unary(*op, expr, e),
            E::BinaryOp { left, op, right } => self.binary(left, op, right, e),
            E::IsNull(x) | E::IsNotNull(x) => {
                let t = self.expr(x)?;
                Ok(Typed::new(
                    Node::IsNull {
                        e: t.boxed(),
                        negated: matches!(e, E::IsNotNull(_)),
                    },
                    Ty::Bool,
                ))
            }
            E::IsUnknown(x) | E::IsNotUnknown(x) => {
                let t = self.boolean(x, "IS UNKNOWN")?;
                Ok(Typed::new(
                    Node::IsNull {
                        e: t.boxed(),
                        negated: matches!(e, E::IsNotUnknown(_)),
                    },
                    Ty::Bool,
                ))
            }
            E::IsTrue(x) | E::IsNotTrue(x) | E::IsFalse(x) | E::IsNotFalse(x) => {
                let value = matches!(e, E::IsTrue(_) | E::IsNotTrue(_));
                let negated = matches!(e, E::IsNotTrue(_) | E::IsNotFalse(_));
                let t = self.boolean(x, if value { "IS TRUE" } else { "IS FALSE" })?;
                Ok(Typed::new(Node::IsBool { e: t.boxed(), value, negated }, Ty::Bool))
            }
            E::IsDistinctFrom(a, b) => self.comparison(CmpOp::Distinct, a, b),
            E::IsNotDistinctFrom(a, b) => self.comparison(CmpOp::NotDistinct, a, b),
            E::InList { expr, list, negated } => self.in_list(expr, list, *negated),
            E::Between { expr, negated, low, high } => {
                let ge = self.comparison(CmpOp::Ge, expr, low)?;
                let le = self.comparison(CmpOp::Le, expr, high)?;
                let both = Typed::new(Node::And(vec![ge.node, le.node]), Ty::Bool);
                Ok(if *negated { Typed::new(Node::Not(both.boxed()), Ty::Bool) } else { both })
            }
            E::Like {
                negated,
                any,
                expr,
                pattern,
                escape_char,
            } => self.like(*negated, *any, expr, pattern, escape_char.as_ref(), false, e),
            E::ILike {
                negated,
                any,
                expr,
                pattern,
                escape_char,
            } => self.like(*negated, *any, expr, pattern, escape_char.as_ref(), true, e),
            E::Case {
                operand,
                conditions,
                else_result,
                ..
            } => self.case(operand.as_deref(), conditions, else_result.as_deref()),
            // TRY_CAST and SAFE_CAST behave as CAST does: a failed cast is NULL anyway.
            E::Cast {
                kind: _,
                expr,
                data_type,
                format,
            } => {
                if format.is_some() {
                    return Err(unsupported(format!("CAST ... FORMAT in `{e}`")));
                }
                let to = cast_target(data_type).ok_or_else(|| {
                    unsupported(format!(
                        "CAST to {data_type} in `{e}` (types: BIGINT, INT, DOUBLE, FLOAT, DECIMAL, VARCHAR, STRING, BOOLEAN, TIMESTAMP, DATE)"
                    ))
                })?;
                let t = self.expr(expr)?;
                self.cast(t, to, expr)
            }
            E::Function(f) => self.function(f, e),
            E::Ceil { expr, field } | E::Floor { expr, field } => {
                let name = if matches!(e, E::Ceil { .. }) { "CEIL" } else { "FLOOR" };
                match field {
                    CeilFloorKind::DateTimeField(DateTimeField::NoDateTime) => {}
                    _ => return Err(unsupported(format!("{name} with a scale or unit in `{e}`; use ROUND(x, digits) or DATE_TRUNC"))),
                }
                let t = self.expr(expr)?;
                self.floor_ceil(name, t, expr)
            }
            E::Substring {
                expr,
                substring_from,
                substring_for,
                ..
            } => {
                let Some(from) = substring_from else {
                    return Err(ExprError::Type(format!("SUBSTRING needs a start position: `{e}`")));
                };
                let mut args = vec![expr.as_ref(), from.as_ref()];
                args.extend(substring_for.as_deref());
                self.substr(&args, e)
            }
            E::Trim {
                expr,
                trim_where,
                trim_what,
                trim_characters,
            } => {
                if trim_what.is_some() || trim_characters.is_some() {
                    return Err(unsupported(format!("TRIM of characters other than spaces in `{e}`")));
                }
                let side = match trim_where {
                    None | Some(TrimWhereField::Both) => TrimSide::Both,
                    Some(TrimWhereField::Leading) => TrimSide::Leading,
                    Some(TrimWhereField::Trailing) => TrimSide::Trailing,
                };
                self.string_fn(Func::Trim(side), "TRIM", expr)
            }
            E::Extract { field, expr, .. } => {
                let part = match field {
                    DateTimeField::Year | DateTimeField::Years => Part::Year,
                    DateTimeField::Month | DateTimeField::Months => Part::Month,
                    DateTimeField::Day | DateTimeField::Days => Part::Day,
                    DateTimeField::Hour | DateTimeField::Hours => Part::Hour,
                    DateTimeField::Minute | DateTimeField::Minutes => Part::Minute,
                    DateTimeField::Second | DateTimeField::Seconds => Part::Second,
                    other => {
                        return Err(unsupported(format!(
                            "EXTRACT({other} ...) in `{e}` (fields: YEAR, MONTH, DAY, HOUR, MINUTE, SECOND)"
                        )))
                    }
                };
                let t = self.time_arg(expr, "EXTRACT")?;
                Ok(Typed::new(
                    Node::Call {
                        func: Func::Part(part),
                        args: vec![t.node],
                    },
                    Ty::Int,
                ))
            }
            E::Subquery(_) | E::Exists { .. } | E::InSubquery { .. } => {
                Err(unsupported(format!("subqueries are not supported in expressions: `{}`", fragment(e))))
            }
            E::Interval(_) => Err(unsupported(format!(
                "INTERVAL literals are not supported: `{e}`; timestamps are microseconds, so add an int (one hour is 3600000000)"
            ))),
            E::AnyOp { .. } | E::AllOp { .. } => Err(unsupported(format!("ANY/ALL comparisons are not supported: `{}`; use IN (...)", fragment(e)))),
            E::Wildcard(_) | E::QualifiedWildcard(..) => Err(unsupported("`*` is not an expression")),
            _ => Err(unsupported(format!("`{}` is not supported in expressions", fragment(e)))),
        }
    }

    fn column(&self, name: &str, quoted: bool) -> Result<Typed> {
        let exact = self.columns.iter().position(|(n, _)| *n == name);
        let index = match exact {
            Some(i) => i,
            None => {
                let folded: Vec<usize> = (0..self.columns.len()).filter(|&i| self.columns[i].0.eq_ignore_ascii_case(name)).collect();
                match folded.as_slice() {
                    [i] => *i,
                    [] => return Err(self.unknown_column(name, quoted)),
                    many => {
                        return Err(ExprError::AmbiguousColumn {
                            name: name.to_string(),
                            matches: many.iter().map(|&i| format!("\"{}\"", self.columns[i].0)).collect::<Vec<_>>().join(", "),
                        })
                    }
                }
            }
        };
        let ty = Ty::from_field(self.columns[index].1);
        Ok(Typed {
            node: Node::Col { index, ty },
            ty,
        })
    }

    fn unknown_column(&self, name: &str, quoted: bool) -> ExprError {
        const SHOWN: usize = 40;
        let mut columns = self.columns.iter().take(SHOWN).map(|(n, _)| *n).collect::<Vec<_>>().join(", ");
        if self.columns.len() > SHOWN {
            let _ = write!(columns, ", ... ({} more)", self.columns.len() - SHOWN);
        }
        if self.columns.is_empty() {
            columns = "none".into();
        }
        let lower = name.to_lowercase();
        let best = self
            .columns
            .iter()
            .map(|(n, _)| (edit_distance(&lower, &n.to_lowercase()), *n))
            .filter(|(d, n)| *d <= (n.chars().count() / 3).max(1))
            .min_by_key(|(d, _)| *d);
        let mut hint = String::new();
        if let Some((_, n)) = best {
            let _ = write!(hint, "; did you mean \"{n}\"?");
        }
        if quoted {
            let _ = write!(hint, "; double quotes name a column; write a string in single quotes: '{name}'");
        }
        ExprError::UnknownColumn {
            name: name.to_string(),
            columns,
            hint,
        }
    }

    fn typed_string(&mut self, dt: &DataType, v: &ast::Value, e: &ast::Expr) -> Result<Typed> {
        let Some(text) = v.clone().into_string() else {
            return Err(unsupported(format!("`{e}`")));
        };
        match cast_target(dt) {
            Some(CastTo::Time) => match parse_timestamp(&text) {
                Some(t) => Ok(Typed {
                    node: Node::Lit(Value::Time(t)),
                    ty: Ty::Time,
                }),
                None => Err(ExprError::Literal(format!(
                    "`{e}` is not a timestamp; write TIMESTAMP 'YYYY-MM-DD HH:MM:SS' with an optional fraction and Z or ±HH:MM offset"
                ))),
            },
            Some(CastTo::Date) => match parse_timestamp(&text) {
                Some(t) if text.trim().len() == 10 => Ok(Typed {
                    node: Node::Lit(Value::Str(format_date(t))),
                    ty: Ty::Str,
                }),
                _ => Err(ExprError::Literal(format!("`{e}` is not a date; write DATE 'YYYY-MM-DD'"))),
            },
            Some(to) => {
                let t = Typed {
                    node: Node::Lit(Value::Str(text)),
                    ty: Ty::Str,
                };
                self.cast(t, to, e)
            }
            None => Err(unsupported(format!("typed literal `{e}`"))),
        }
    }

    fn boolean(&mut self, e: &ast::Expr, context: &str) -> Result<Typed> {
        let t = self.expr(e)?;
        match t.ty {
            Ty::Bool | Ty::Null => Ok(t),
            _ => Err(ExprError::Type(format!(
                "{context} needs a boolean operand, but {} is not boolean (compare it, e.g. `{} > 0`, or test `IS NOT NULL`)",
                describe(&t, e),
                e
            ))),
        }
    }

    fn unary(&mut self, op: UnaryOperator, x: &ast::Expr, whole: &ast::Expr) -> Result<Typed> {
        match op {
            UnaryOperator::Not => {
                let t = self.boolean(x, "NOT")?;
                Ok(Typed::new(Node::Not(t.boxed()), Ty::Bool))
            }
            UnaryOperator::Minus | UnaryOperator::Plus => {
                // `-9223372036854775808` is i64::MIN, but 9223372036854775808 alone is out of range.
                if op == UnaryOperator::Minus {
                    if let ast::Expr::Value(v) = x {
                        if let ast::Value::Number(n, _) = &v.value {
                            if !n.contains(['.', 'e', 'E']) {
                                if let Ok(i) = format!("-{n}").parse::<i64>() {
                                    return Ok(Typed {
                                        node: Node::Lit(Value::Int(i)),
                                        ty: Ty::Int,
                                    });
                                }
                            }
                        }
                    }
                }
                let t = self.expr(x)?;
                match t.ty {
                    Ty::Int | Ty::Float | Ty::Null if op == UnaryOperator::Plus => Ok(t),
                    Ty::Int | Ty::Float => {
                        let ty = t.ty;
                        Ok(Typed::new(Node::Neg(t.boxed()), ty))
                    }
                    Ty::Null => Ok(Typed {
                        node: Node::Lit(Value::Null),
                        ty: Ty::Int,
                    }),
                    _ => Err(ExprError::Type(format!("unary {op} needs a number, but {} is not", describe(&t, x)))),
                }
            }
            _ => Err(unsupported(format!("operator {op} in `{}`", fragment(whole)))),
        }
    }

    fn binary(&mut self, left: &ast::Expr, op: &BinaryOperator, right: &ast::Expr, whole: &ast::Expr) -> Result<Typed> {
        use BinaryOperator as B;
        let cmp = match op {
            B::Eq => Some(CmpOp::Eq),
            B::NotEq => Some(CmpOp::Ne),
            B::Lt => Some(CmpOp::Lt),
            B::LtEq => Some(CmpOp::Le),
            B::Gt => Some(CmpOp::Gt),
            B::GtEq => Some(CmpOp::Ge),
            B::Spaceship => Some(CmpOp::NotDistinct),
            _ => None,
        };
        if let Some(cmp) = cmp {
            if matches!(cmp, CmpOp::Eq | CmpOp::Ne) && [left, right].iter().any(|x| matches!(x, ast::Expr::Value(v) if v.value == ast::Value::Null)) {
                // Always NULL, so never true: nearly always a mistake for IS NULL.
                return Err(ExprError::Type(format!(
                    "`{whole}` is never true: comparing with NULL gives NULL; write `{} IS {}NULL`",
                    if matches!(left, ast::Expr::Value(_)) { right } else { left },
                    if cmp == CmpOp::Ne { "NOT " } else { "" }
                )));
            }
            return self.comparison(cmp, left, right);
        }
        match op {
            B::And | B::Or => {
                // Flatten `a AND b AND c ...` (parsed left-deep) into one n-ary node, without recursion
                // along the chain, so long filters neither nest deeply nor evaluate recursively.
                let mut operands = Vec::new();
                let mut stack = vec![right, left];
                while let Some(x) = stack.pop() {
                    match x {
                        ast::Expr::BinaryOp { left, op: inner, right } if inner == op => {
                            stack.push(right);
                            stack.push(left);
                        }
                        other => operands.push(other),
                    }
                }
                // The stack pops left before right; `operands` is in source order.
                let name = if *op == B::And { "AND" } else { "OR" };
                let mut nodes = Vec::with_capacity(operands.len());
                for x in operands {
                    nodes.push(self.boolean(x, name)?.node);
                }
                Ok(Typed::new(if *op == B::And { Node::And(nodes) } else { Node::Or(nodes) }, Ty::Bool))
            }
            B::Plus | B::Minus | B::Multiply | B::Divide | B::Modulo => {
                let (l, r) = (self.expr(left)?, self.expr(right)?);
                arithmetic(op, l, r, left, right)
            }
            B::StringConcat => {
                let args = [left, right].iter().map(|x| self.concat_arg(x)).collect::<Result<Vec<_>>>()?;
                Ok(Typed::new(Node::Call { func: Func::Concat, args }, Ty::Str))
            }
            _ => Err(unsupported(format!("operator {op} in `{}`", fragment(whole)))),
        }
    }

    /// Checks that `l` and `r` can be compared, reading a string literal as a timestamp when
    /// the other side is one.
    fn comparable(&self, l: Typed, r: Typed, le: &ast::Expr, re: &ast::Expr) -> Result<(Typed, Typed)> {
        match (l.ty, r.ty) {
            (a, b) if a == b || a == Ty::Null || b == Ty::Null || (a.numeric() && b.numeric()) => Ok((l, r)),
            (Ty::Time, Ty::Str) => {
                let r = string_as_time(&r, re, &l, le, true)?;
                Ok((l, r))
            }
            (Ty::Str, Ty::Time) => {
                let l = string_as_time(&l, le, &r, re, false)?;
                Ok((l, r))
            }
            (a, b) => {
                let hint = if a == Ty::Str || b == Ty::Str {
                    let (s, other, other_ty) = if a == Ty::Str { (le, re, b) } else { (re, le, a) };
                    format!(" (convert one side, e.g. CAST({s} AS {}) or CAST({other} AS VARCHAR))", cast_name(other_ty))
                } else {
                    " (use CAST(... AS <type>) to convert one side)".to_string()
                };
                Err(ExprError::Type(format!("cannot compare {} with {}{hint}", describe(&l, le), describe(&r, re))))
            }
        }
    }

    fn comparison(&mut self, op: CmpOp, left: &ast::Expr, right: &ast::Expr) -> Result<Typed> {
        let (l, r) = (self.expr(left)?, self.expr(right)?);
        let (l, r) = self.comparable(l, r, left, right)?;
        Ok(Typed::new(
            Node::Cmp {
                op,
                l: l.boxed(),
                r: r.boxed(),
            },
            Ty::Bool,
        ))
    }

    fn in_list(&mut self, expr: &ast::Expr, list: &[ast::Expr], negated: bool) -> Result<Typed> {
        let mut needle = self.expr(expr)?;
        let mut items = Vec::with_capacity(list.len());
        for item in list {
            let t = self.expr(item)?;
            let (n, t) = self.comparable(needle, t, expr, item)?;
            needle = n;
            items.push(t);
        }
        if items.iter().any(|t| t.lit().is_none()) {
            // Non-constant items: `x IN (a, b)` is `x = a OR x = b` under three-valued logic.
            let ors = items
                .into_iter()
                .map(|t| {
                    fold(Node::Cmp {
                        op: CmpOp::Eq,
                        l: Box::new(needle.node.clone()),
                        r: t.boxed(),
                    })
                })
                .collect();
            let any = Typed::new(Node::Or(ors), Ty::Bool);
            return Ok(if negated { Typed::new(Node::Not(any.boxed()), Ty::Bool) } else { any });
        }
        let mut has_null = false;
        let mut values = Vec::with_capacity(items.len());
        for t in items {
            match t.node {
                Node::Lit(Value::Null) => has_null = true,
                Node::Lit(v) => values.push(v),
                _ => {}
            }
        }
        let all_ints = values.iter().all(|v| matches!(v, Value::Int(_) | Value::Time(_)));
        let set = match needle.ty {
            Ty::Int | Ty::Time if all_ints => {
                let xs: Vec<i64> = values
                    .iter()
                    .filter_map(|v| if let Value::Int(i) | Value::Time(i) = v { Some(*i) } else { None })
                    .collect();
                if xs.len() >= IN_HASH_THRESHOLD {
                    LitSet::IntHash(xs.into_iter().collect())
                } else {
                    LitSet::Ints(xs)
                }
            }
            Ty::Str => {
                let xs: Vec<Box<str>> = values
                    .into_iter()
                    .filter_map(|v| if let Value::Str(s) = v { Some(s.into_boxed_str()) } else { None })
                    .collect();
                if xs.len() >= IN_HASH_THRESHOLD {
                    LitSet::StrHash(xs.into_iter().collect())
                } else {
                    LitSet::Strs(xs)
                }
            }
            _ => LitSet::Other(values),
        };
        Ok(Typed::new(
            Node::InSet {
                e: needle.boxed(),
                set,
                has_null,
                negated,
            },
            Ty::Bool,
        ))
    }

    #[allow(clippy::too_many_arguments)]
    fn like(
        &mut self,
        negated: bool,
        any: bool,
        expr: &ast::Expr,
        pattern: &ast::Expr,
        escape: Option<&ast::Value>,
        case_insensitive: bool,
        whole: &ast::Expr,
    ) -> Result<Typed> {
        let name = if case_insensitive { "ILIKE" } else { "LIKE" };
        if any {
            return Err(unsupported(format!("{name} ANY in `{}`; combine LIKEs with OR", fragment(whole))));
        }
        let t = self.expr(expr)?;
        if !matches!(t.ty, Ty::Str | Ty::Null) {
            return Err(ExprError::Type(format!(
                "{name} needs a string on its left, but {} is not a string (use CAST({expr} AS VARCHAR))",
                describe(&t, expr)
            )));
        }
        let p = self.expr(pattern)?;
        let Some(Value::Str(text)) = p.lit() else {
            return Err(unsupported(format!("{name} with a pattern that is not a string literal: `{pattern}`")));
        };
        let escape = match escape {
            None => Some('\\'),
            Some(v) => {
                let s = v.clone().into_string().unwrap_or_default();
                let mut chars = s.chars();
                match (chars.next(), chars.next()) {
                    (Some(c), None) => Some(c),
                    (None, _) => None,
                    _ => return Err(ExprError::Literal(format!("ESCAPE needs a single character, not '{s}'"))),
                }
            }
        };
        let text = if case_insensitive { text.to_lowercase() } else { text.clone() };
        let pattern = LikePattern::compile(&text, escape).map_err(ExprError::Literal)?;
        Ok(Typed::new(
            Node::Like {
                e: t.boxed(),
                pattern,
                negated,
                case_insensitive,
            },
            Ty::Bool,
        ))
    }

    fn case(&mut self, operand: Option<&ast::Expr>, conditions: &[ast::CaseWhen], otherwise: Option<&ast::Expr>) -> Result<Typed> {
        let null = ast::Expr::Value(ast::Value::Null.into());
        let mut operand_t = operand.map(|o| self.expr(o)).transpose()?;
        let mut whens = Vec::with_capacity(conditions.len());
        let mut results = Vec::with_capacity(conditions.len() + 1);
        for cw in conditions {
            let cond = match (operand, operand_t.take()) {
                (Some(oe), Some(ot)) => {
                    let w = self.expr(&cw.condition)?;
                    let (ot, w) = self.comparable(ot, w, oe, &cw.condition)?;
                    operand_t = Some(ot);
                    w
                }
                _ => self.boolean(&cw.condition, "CASE WHEN")?,
            };
            whens.push(cond.node);
            results.push((self.expr(&cw.result)?, &cw.result));
        }
        let otherwise = match otherwise {
            Some(e) => (self.expr(e)?, e),
            None => (
                Typed {
                    node: Node::Lit(Value::Null),
                    ty: Ty::Null,
                },
                &null,
            ),
        };
        results.push(otherwise);
        let ty = unify_all("CASE results", &results)?;
        let mut results: Vec<Node> = results.into_iter().map(|(t, _)| widen(t, ty).node).collect();
        let otherwise = results.pop().unwrap_or(Node::Lit(Value::Null));
        let node = Node::Case {
            operand: operand_t.map(Typed::boxed),
            whens: whens.into_iter().zip(results).collect(),
            otherwise: Box::new(otherwise),
        };
        Ok(Typed::new(node, ty))
    }

    fn cast(&self, t: Typed, to: CastTo, e: &ast::Expr) -> Result<Typed> {
        let ty = match to {
            CastTo::Int => Ty::Int,
            CastTo::Float => Ty::Float,
            CastTo::Str | CastTo::Date => Ty::Str,
            CastTo::Bool => Ty::Bool,
            CastTo::Time => Ty::Time,
        };
        let ok = match (t.ty, to) {
            (Ty::Null, _) | (_, CastTo::Str | CastTo::Int) => true,
            (from, CastTo::Float | CastTo::Bool) => from != Ty::Time,
            (from, CastTo::Time) => matches!(from, Ty::Str | Ty::Int | Ty::Time),
            (from, CastTo::Date) => matches!(from, Ty::Str | Ty::Time),
        };
        if !ok {
            let target = match to {
                CastTo::Date => "DATE",
                _ => cast_name(ty),
            };
            let targets = match t.ty {
                Ty::Time => "BIGINT (microseconds), VARCHAR, TIMESTAMP or DATE",
                Ty::Bool => "BIGINT, DOUBLE, VARCHAR or BOOLEAN",
                _ => "BIGINT, DOUBLE, VARCHAR, BOOLEAN or TIMESTAMP",
            };
            return Err(ExprError::Type(format!(
                "cannot cast {} to {target} (a {} casts to {targets})",
                describe(&t, e),
                t.ty.name()
            )));
        }
        if t.ty == ty && to != CastTo::Date {
            return Ok(t);
        }
        Ok(Typed::new(Node::Cast { e: t.boxed(), to }, ty))
    }

    /// A timestamp argument; strings are read as timestamps (a literal that is not one is an error).
    fn time_arg(&mut self, e: &ast::Expr, func: &str) -> Result<Typed> {
        let t = self.expr(e)?;
        match t.ty {
            Ty::Time | Ty::Null => Ok(t),
            Ty::Str => {
                if let Some(Value::Str(s)) = t.lit() {
                    if parse_timestamp(s).is_none() {
                        return Err(ExprError::Literal(format!(
                            "{func} needs a timestamp, and {e} is not one; write 'YYYY-MM-DD[ HH:MM:SS]'"
                        )));
                    }
                }
                Ok(Typed::new(
                    Node::Cast {
                        e: t.boxed(),
                        to: CastTo::Time,
                    },
                    Ty::Time,
                ))
            }
            _ => Err(ExprError::Type(format!("{func} needs a timestamp, but {} is not one", describe(&t, e)))),
        }
    }

    fn concat_arg(&mut self, e: &ast::Expr) -> Result<Node> {
        let t = self.expr(e)?;
        Ok(self.cast(t, CastTo::Str, e)?.node)
    }

    fn string_fn(&mut self, func: Func, name: &str, arg: &ast::Expr) -> Result<Typed> {
        let t = self.expr(arg)?;
        if !matches!(t.ty, Ty::Str | Ty::Null) {
            return Err(ExprError::Type(format!(
                "{name} needs a string, but {} is not one (use CAST({arg} AS VARCHAR))",
                describe(&t, arg)
            )));
        }
        let ty = if func == Func::Length { Ty::Int } else { Ty::Str };
        Ok(Typed::new(Node::Call { func, args: vec![t.node] }, ty))
    }

    fn number(&mut self, e: &ast::Expr, name: &str) -> Result<Typed> {
        let t = self.expr(e)?;
        if !matches!(t.ty, Ty::Int | Ty::Float | Ty::Null) {
            return Err(ExprError::Type(format!("{name} needs a number, but {} is not one", describe(&t, e))));
        }
        Ok(t)
    }

    fn floor_ceil(&mut self, name: &str, t: Typed, e: &ast::Expr) -> Result<Typed> {
        match t.ty {
            Ty::Int => Ok(t),
            Ty::Null => Ok(Typed {
                node: Node::Lit(Value::Null),
                ty: Ty::Int,
            }),
            Ty::Float => {
                let func = if name == "FLOOR" { Func::Floor } else { Func::Ceil };
                Ok(Typed::new(Node::Call { func, args: vec![t.node] }, Ty::Int))
            }
            _ => Err(ExprError::Type(format!("{name} needs a number, but {} is not one", describe(&t, e)))),
        }
    }

    fn substr(&mut self, args: &[&ast::Expr], whole: &ast::Expr) -> Result<Typed> {
        let mut nodes = Vec::with_capacity(args.len());
        for (i, a) in args.iter().enumerate() {
            let t = self.expr(a)?;
            let want = if i == 0 { Ty::Str } else { Ty::Int };
            if t.ty != want && t.ty != Ty::Null {
                let what = ["the string", "the start position", "the length"][i.min(2)];
                return Err(ExprError::Type(format!(
                    "SUBSTRING needs {} {what}, but {} is not in `{whole}`",
                    want.name(),
                    describe(&t, a)
                )));
            }
            nodes.push(t.node);
        }
        Ok(Typed::new(
            Node::Call {
                func: Func::Substr,
                args: nodes,
            },
            Ty::Str,
        ))
    }

    fn function(&mut self, f: &ast::Function, whole: &ast::Expr) -> Result<Typed> {
        let name = match f.name.0.as_slice() {
            [ObjectNamePart::Identifier(id)] => id.value.to_ascii_lowercase(),
            _ => return Err(unsupported(format!("qualified function name `{}`", f.name))),
        };
        let upper = name.to_ascii_uppercase();
        if f.over.is_some() {
            return Err(unsupported(format!("window functions are not supported in expressions: `{}`", fragment(whole))));
        }
        if AGGREGATES.contains(&name.as_str()) {
            return Err(unsupported(format!(
                "aggregate function {upper}(...) in `{}`: expressions are evaluated per row; define the aggregate in the query's `aggregates` \
                 (e.g. {{ name = \"total\", fn = \"sum\", field = \"amount\" }}) and refer to its name in `derive`",
                fragment(whole)
            )));
        }
        if f.filter.is_some() || f.null_treatment.is_some() || !f.within_group.is_empty() || !matches!(f.parameters, FunctionArguments::None) {
            return Err(unsupported(format!("function call clauses in `{}`", fragment(whole))));
        }
        let args: Vec<&ast::Expr> = match &f.args {
            FunctionArguments::List(list) if list.duplicate_treatment.is_none() && list.clauses.is_empty() => list
                .args
                .iter()
                .map(|a| match a {
                    FunctionArg::Unnamed(FunctionArgExpr::Expr(e)) => Ok(e),
                    _ => Err(unsupported(format!("named or `*` arguments in `{}`", fragment(whole)))),
                })
                .collect::<Result<_>>()?,
            FunctionArguments::None => {
                return Err(ExprError::UnknownFunction {
                    name: upper,
                    fragment: fragment(whole),
                });
            }
            _ => return Err(unsupported(format!("function arguments in `{}`", fragment(whole)))),
        };
        let arity = |min: usize, max: usize| -> Result<()> {
            if args.len() < min || args.len() > max {
                let expected = match (min, max) {
                    (1, 1) => "1 argument".to_string(),
                    (a, b) if a == b => format!("{a} arguments"),
                    (a, usize::MAX) => format!("at least {a} argument(s)"),
                    (a, b) => format!("{a} or {b} arguments"),
                };
                return Err(ExprError::Type(format!(
                    "{upper} takes {expected}, but `{}` has {}",
                    fragment(whole),
                    args.len()
                )));
            }
            Ok(())
        };
        match name.as_str() {
            "coalesce" | "ifnull" | "nvl" => {
                if name == "coalesce" {
                    arity(1, usize::MAX)?;
                } else {
                    arity(2, 2)?;
                }
                let ts = args.iter().map(|a| Ok((self.expr(a)?, *a))).collect::<Result<Vec<_>>>()?;
                let ty = unify_all(&format!("{upper} arguments"), &ts)?;
                let nodes = ts.into_iter().map(|(t, _)| widen(t, ty).node).collect();
                Ok(Typed::new(
                    Node::Call {
                        func: Func::Coalesce,
                        args: nodes,
                    },
                    ty,
                ))
            }
            "nullif" => {
                arity(2, 2)?;
                let (a, b) = (self.expr(args[0])?, self.expr(args[1])?);
                let (a, b) = self.comparable(a, b, args[0], args[1])?;
                let ty = a.ty;
                Ok(Typed::new(
                    Node::Call {
                        func: Func::NullIf,
                        args: vec![a.node, b.node],
                    },
                    ty,
                ))
            }
            "if" | "iff" => {
                arity(3, 3)?;
                let cond = self.boolean(args[0], "IF")?;
                let ts = vec![(self.expr(args[1])?, args[1]), (self.expr(args[2])?, args[2])];
                let ty = unify_all("IF results", &ts)?;
                let mut nodes = ts.into_iter().map(|(t, _)| widen(t, ty).node);
                let (Some(then), Some(otherwise)) = (nodes.next(), nodes.next()) else {
                    return Err(ExprError::Type(format!("IF takes 3 arguments: `{}`", fragment(whole))));
                };
                Ok(Typed::new(
                    Node::Case {
                        operand: None,
                        whens: vec![(cond.node, then)],
                        otherwise: Box::new(otherwise),
                    },
                    ty,
                ))
            }
            "greatest" | "least" => {
                arity(2, usize::MAX)?;
                let ts = args.iter().map(|a| Ok((self.expr(a)?, *a))).collect::<Result<Vec<_>>>()?;
                let ty = unify_all(&format!("{upper} arguments"), &ts)?;
                let nodes = ts.into_iter().map(|(t, _)| widen(t, ty).node).collect();
                let func = if name == "greatest" { Func::Greatest } else { Func::Least };
                Ok(Typed::new(Node::Call { func, args: nodes }, ty))
            }
            "abs" => {
                arity(1, 1)?;
                let t = self.number(args[0], "ABS")?;
                let (func, ty) = if t.ty == Ty::Float {
                    (Func::AbsFloat, Ty::Float)
                } else {
                    (Func::AbsInt, Ty::Int)
                };
                Ok(Typed::new(Node::Call { func, args: vec![t.node] }, ty))
            }
            "round" => {
                arity(1, 2)?;
                let t = self.number(args[0], "ROUND")?;
                let digits = match args.get(1) {
                    None => 0,
                    Some(d) => match self.expr(d)?.lit() {
                        // Beyond ±400 digits every double is already whole or zero.
                        Some(Value::Int(n)) => (*n).clamp(-400, 400) as i32,
                        _ => return Err(ExprError::Type(format!("ROUND's digits must be an integer literal, not `{d}`"))),
                    },
                };
                match t.ty {
                    Ty::Float => Ok(Typed::new(
                        Node::Call {
                            func: Func::RoundFloat(digits),
                            args: vec![t.node],
                        },
                        Ty::Float,
                    )),
                    _ if digits >= 0 => Ok(widen(t, Ty::Int)),
                    _ => Ok(Typed::new(
                        Node::Call {
                            func: Func::RoundInt(digits),
                            args: vec![t.node],
                        },
                        Ty::Int,
                    )),
                }
            }
            "floor" | "ceil" | "ceiling" => {
                arity(1, 1)?;
                let t = self.expr(args[0])?;
                self.floor_ceil(if name == "floor" { "FLOOR" } else { "CEIL" }, t, args[0])
            }
            "sqrt" | "ln" | "log10" | "exp" => {
                arity(1, 1)?;
                let t = self.number(args[0], &upper)?;
                let func = match name.as_str() {
                    "sqrt" => Func::Sqrt,
                    "ln" => Func::Ln,
                    "log10" => Func::Log10,
                    _ => Func::Exp,
                };
                Ok(Typed::new(
                    Node::Call {
                        func,
                        args: vec![widen(t, Ty::Float).node],
                    },
                    Ty::Float,
                ))
            }
            "power" | "pow" => {
                arity(2, 2)?;
                let (a, b) = (self.number(args[0], &upper)?, self.number(args[1], &upper)?);
                Ok(Typed::new(
                    Node::Call {
                        func: Func::Power,
                        args: vec![widen(a, Ty::Float).node, widen(b, Ty::Float).node],
                    },
                    Ty::Float,
                ))
            }
            "lower" | "lcase" | "upper" | "ucase" | "length" | "char_length" | "character_length" | "len" | "trim" | "ltrim" | "rtrim" | "btrim" => {
                arity(1, 1)?;
                let func = match name.as_str() {
                    "lower" | "lcase" => Func::Lower,
                    "upper" | "ucase" => Func::Upper,
                    "trim" | "btrim" => Func::Trim(TrimSide::Both),
                    "ltrim" => Func::Trim(TrimSide::Leading),
                    "rtrim" => Func::Trim(TrimSide::Trailing),
                    _ => Func::Length,
                };
                self.string_fn(func, &upper, args[0])
            }
            "concat" => {
                arity(1, usize::MAX)?;
                let nodes = args.iter().map(|a| self.concat_arg(a)).collect::<Result<Vec<_>>>()?;
                Ok(Typed::new(
                    Node::Call {
                        func: Func::Concat,
                        args: nodes,
                    },
                    Ty::Str,
                ))
            }
            "substr" | "substring" => {
                arity(2, 3)?;
                self.substr(&args, whole)
            }
            "date" | "to_date" => {
                arity(1, 1)?;
                let t = self.time_arg(args[0], &upper)?;
                self.cast(t, CastTo::Date, args[0])
            }
            "date_trunc" => {
                arity(2, 2)?;
                let unit_t = self.expr(args[0])?;
                let unit = match unit_t.lit() {
                    Some(Value::Str(s)) => match s.trim().to_ascii_lowercase().as_str() {
                        "second" => TruncUnit::Second,
                        "minute" => TruncUnit::Minute,
                        "hour" => TruncUnit::Hour,
                        "day" | "dd" => TruncUnit::Day,
                        "week" => TruncUnit::Week,
                        "month" | "mon" | "mm" => TruncUnit::Month,
                        "quarter" => TruncUnit::Quarter,
                        "year" | "yyyy" | "yy" => TruncUnit::Year,
                        _ => {
                            return Err(ExprError::Literal(format!(
                                "DATE_TRUNC unit '{s}' is not one of 'second', 'minute', 'hour', 'day', 'week', 'month', 'quarter', 'year'"
                            )))
                        }
                    },
                    _ => {
                        return Err(ExprError::Type(format!(
                            "DATE_TRUNC's first argument is the unit as a string literal, e.g. DATE_TRUNC('day', {}), not `{}`",
                            args[1], args[0]
                        )))
                    }
                };
                let t = self.time_arg(args[1], "DATE_TRUNC")?;
                Ok(Typed::new(
                    Node::Call {
                        func: Func::DateTrunc(unit),
                        args: vec![t.node],
                    },
                    Ty::Time,
                ))
            }
            "year" | "month" | "day" | "dayofmonth" | "hour" | "minute" | "second" => {
                arity(1, 1)?;
                let part = match name.as_str() {
                    "year" => Part::Year,
                    "month" => Part::Month,
                    "day" | "dayofmonth" => Part::Day,
                    "hour" => Part::Hour,
                    "minute" => Part::Minute,
                    _ => Part::Second,
                };
                let t = self.time_arg(args[0], &upper)?;
                Ok(Typed::new(
                    Node::Call {
                        func: Func::Part(part),
                        args: vec![t.node],
                    },
                    Ty::Int,
                ))
            }
            _ => Err(ExprError::UnknownFunction {
                name: upper,
                fragment: fragment(whole),
            }),
        }
    }
}

/// A string literal compared with a timestamp, read as one when compiling.
/// `time_first` keeps the two sides in source order in the message.
fn string_as_time(s: &Typed, se: &ast::Expr, time: &Typed, te: &ast::Expr, time_first: bool) -> Result<Typed> {
    match s.lit() {
        Some(Value::Str(text)) => match parse_timestamp(text) {
            Some(t) => Ok(Typed {
                node: Node::Lit(Value::Time(t)),
                ty: Ty::Time,
            }),
            None => Err(ExprError::Literal(format!(
                "{se} is compared with the timestamp {} but is not a timestamp; write 'YYYY-MM-DD' or 'YYYY-MM-DD HH:MM:SS[.ffffff][Z|±HH:MM]'",
                fragment(te)
            ))),
        },
        Some(Value::Null) => Ok(Typed {
            node: Node::Lit(Value::Null),
            ty: Ty::Time,
        }),
        _ => {
            let (a, b) = if time_first {
                (describe(time, te), describe(s, se))
            } else {
                (describe(s, se), describe(time, te))
            };
            Err(ExprError::Type(format!(
                "cannot compare {a} with {b}: convert the string with CAST({se} AS TIMESTAMP)"
            )))
        }
    }
}

fn cast_name(ty: Ty) -> &'static str {
    match ty {
        Ty::Int => "BIGINT",
        Ty::Float => "DOUBLE",
        Ty::Bool => "BOOLEAN",
        Ty::Time => "TIMESTAMP",
        Ty::Str | Ty::Null => "VARCHAR",
    }
}

fn unify_all(what: &str, items: &[(Typed, &ast::Expr)]) -> Result<Ty> {
    let mut ty = Ty::Null;
    let mut first: Option<&(Typed, &ast::Expr)> = None;
    for item in items {
        match unify(ty, item.0.ty) {
            Some(t) => ty = t,
            None => {
                let (ft, fe) = first.map_or_else(|| (String::new(), String::new()), |(t, e)| (t.ty.name().to_string(), fragment(e)));
                return Err(ExprError::Type(format!(
                    "{what} must have one type, but {ft} {fe} and {} differ (CAST one of them)",
                    describe(&item.0, item.1)
                )));
            }
        }
        if first.is_none() && item.0.ty != Ty::Null {
            first = Some(item);
        }
    }
    Ok(ty)
}

fn literal(v: &ast::Value, e: &ast::Expr) -> Result<Typed> {
    let (value, ty) = match v {
        ast::Value::Number(n, _) => {
            if n.contains(['.', 'e', 'E']) {
                match n.parse::<f64>() {
                    Ok(f) if f.is_finite() => (Value::Float(f), Ty::Float),
                    _ => return Err(ExprError::Literal(format!("{n} is out of range for a float"))),
                }
            } else {
                match n.parse::<i64>() {
                    Ok(i) => (Value::Int(i), Ty::Int),
                    Err(_) => return Err(ExprError::Literal(format!("{n} is out of range for a 64-bit int (write {n}.0 for a float)"))),
                }
            }
        }
        ast::Value::Boolean(b) => (Value::Bool(*b), Ty::Bool),
        ast::Value::Null => (Value::Null, Ty::Null),
        ast::Value::Placeholder(p) => return Err(unsupported(format!("query parameters like `{p}` are not supported; write the value"))),
        ast::Value::SingleQuotedString(s)
        | ast::Value::EscapedStringLiteral(s)
        | ast::Value::NationalStringLiteral(s)
        | ast::Value::UnicodeStringLiteral(s)
        | ast::Value::TripleSingleQuotedString(s)
        | ast::Value::TripleDoubleQuotedString(s) => (Value::Str(s.clone()), Ty::Str),
        ast::Value::DollarQuotedString(d) => (Value::Str(d.value.clone()), Ty::Str),
        _ => return Err(unsupported(format!("literal `{e}`"))),
    };
    Ok(Typed { node: Node::Lit(value), ty })
}

fn arithmetic(op: &BinaryOperator, l: Typed, r: Typed, le: &ast::Expr, re: &ast::Expr) -> Result<Typed> {
    use BinaryOperator as B;
    let node = |op: ArithOp, l: Typed, r: Typed| Node::Arith {
        op,
        l: l.boxed(),
        r: r.boxed(),
    };
    let numeric_or_null = |t: Ty| t.numeric() || t == Ty::Null;
    match (l.ty, r.ty) {
        (a, b) if numeric_or_null(a) && numeric_or_null(b) => {
            if a == Ty::Float || b == Ty::Float || *op == B::Divide {
                let (l, r) = (widen(l, Ty::Float), widen(r, Ty::Float));
                let op = match op {
                    B::Plus => ArithOp::FloatAdd,
                    B::Minus => ArithOp::FloatSub,
                    B::Multiply => ArithOp::FloatMul,
                    B::Divide => ArithOp::FloatDiv,
                    _ => ArithOp::FloatMod,
                };
                Ok(Typed::new(node(op, l, r), Ty::Float))
            } else {
                let op = match op {
                    B::Plus => ArithOp::IntAdd,
                    B::Minus => ArithOp::IntSub,
                    B::Multiply => ArithOp::IntMul,
                    _ => ArithOp::IntMod,
                };
                Ok(Typed::new(node(op, l, r), Ty::Int))
            }
        }
        (Ty::Time, Ty::Int | Ty::Null) if *op == B::Plus => Ok(Typed::new(node(ArithOp::TimeAdd, l, r), Ty::Time)),
        (Ty::Int | Ty::Null, Ty::Time) if *op == B::Plus => Ok(Typed::new(node(ArithOp::TimeAdd, r, l), Ty::Time)),
        (Ty::Time, Ty::Int | Ty::Null) if *op == B::Minus => Ok(Typed::new(node(ArithOp::TimeSub, l, r), Ty::Time)),
        (Ty::Time, Ty::Time) if *op == B::Minus => Ok(Typed::new(node(ArithOp::TimeDiff, l, r), Ty::Int)),
        _ => {
            let hint = if l.ty == Ty::Str || r.ty == Ty::Str {
                " (use CONCAT or || to join strings, or CAST the string to a number)"
            } else if l.ty == Ty::Time || r.ty == Ty::Time {
                " (timestamps support t + int, t - int and t - t, in microseconds)"
            } else {
                ""
            };
            Err(ExprError::Type(format!(
                "cannot apply {op} to {} and {}{hint}",
                describe(&l, le),
                describe(&r, re)
            )))
        }
    }
}

/// Levenshtein distance, for "did you mean" on unknown columns.
fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    let mut cur = vec![0; b.len() + 1];
    for (i, ca) in a.chars().enumerate() {
        cur[0] = i + 1;
        for (j, cb) in b.iter().enumerate() {
            let sub = prev[j] + usize::from(ca != *cb);
            cur[j + 1] = sub.min(prev[j + 1] + 1).min(cur[j] + 1);
        }
        std::mem::swap(&mut prev, &mut cur);
    }
    prev[b.len()]
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// 2026-11-23T20:00:00Z, a Monday (computed independently: `calendar.timegm`).
    const T: i64 = 1_795_464_000 * MICROS_PER_SECOND;

    const SCHEMA: &[(&str, FieldType)] = &[
        ("user_id", FieldType::Int),            // 0: 42
        ("page_url", FieldType::String),        // 1: "/home"
        ("action", FieldType::String),          // 2: "click"
        ("value", FieldType::Float),            // 3: 2.5
        ("ts", FieldType::Timestamp),           // 4: T
        ("flag", FieldType::Bool),              // 5: true
        ("n", FieldType::Int),                  // 6: NULL
        ("s", FieldType::String),               // 7: NULL
        ("b", FieldType::Bool),                 // 8: NULL
        ("big", FieldType::Int),                // 9: i64::MAX
        ("zero", FieldType::Int),               // 10: 0
        ("f", FieldType::Float),                // 11: NULL
        ("Mixed Case", FieldType::Int),         // 12: 7
        ("click_count", FieldType::Int),        // 13: 3
        ("view_count", FieldType::Int),         // 14: 12
        ("window_start", FieldType::Timestamp), // 15: T
    ];

    fn row() -> Vec<Value> {
        vec![
            Value::Int(42),
            Value::Str("/home".into()),
            Value::Str("click".into()),
            Value::Float(2.5),
            Value::Time(T),
            Value::Bool(true),
            Value::Null,
            Value::Null,
            Value::Null,
            Value::Int(i64::MAX),
            Value::Int(0),
            Value::Null,
            Value::Int(7),
            Value::Int(3),
            Value::Int(12),
            Value::Time(T),
        ]
    }

    fn s(x: &str) -> Val<'static> {
        Val::Str(Cow::Owned(x.to_string()))
    }

    fn eval_text(text: &str) -> Val<'static> {
        let e = Expr::compile(text, SCHEMA).unwrap_or_else(|err| panic!("`{text}` failed to compile: {err}"));
        e.eval(row().as_slice()).into_static()
    }

    fn check(cases: &[(&str, Val<'static>)]) {
        let mut failures = Vec::new();
        for (text, want) in cases {
            let got = eval_text(text);
            if &got != want {
                failures.push(format!("`{text}`: got {got:?}, want {want:?}"));
            }
        }
        assert!(failures.is_empty(), "{} case(s) failed:\n{}", failures.len(), failures.join("\n"));
    }

    fn error(text: &str) -> String {
        match Expr::compile(text, SCHEMA) {
            Ok(e) => panic!("`{text}` compiled, to {e:?}"),
            Err(err) => err.to_string(),
        }
    }

    fn assert_error(text: &str, fragments: &[&str]) {
        let msg = error(text);
        for f in fragments {
            assert!(msg.contains(f), "error for `{text}` lacks {f:?}: {msg}");
        }
    }

    use Val::{Bool as B, Float as F, Int as I, Null as N, Time as Tm};

    #[test]
    fn literals_and_columns() {
        check(&[
            ("42", I(42)),
            ("-7", I(-7)),
            ("2.5", F(2.5)),
            ("1e3", F(1000.0)),
            (".5", F(0.5)),
            ("'it''s'", s("it's")),
            ("TRUE", B(true)),
            ("false", B(false)),
            ("NULL", N),
            ("-9223372036854775808", I(i64::MIN)),
            ("TIMESTAMP '2026-11-23T20:00:00Z'", Tm(T)),
            ("TIMESTAMP '2026-11-23 21:30:00+01:30'", Tm(T)),
            ("TIMESTAMP '2026-11-23T15:00:00-0500'", Tm(T)),
            ("TIMESTAMP '2026-11-23T20:00:00.5Z'", Tm(T + 500_000)),
            ("TIMESTAMP '2026-11-23T20:00:00.123456789Z'", Tm(T + 123_456)),
            ("TIMESTAMP '2026-11-23 20:00'", Tm(T)),
            ("TIMESTAMP '2026-11-23'", Tm(T - 20 * MICROS_PER_HOUR)),
            ("DATE '2026-11-23'", s("2026-11-23")),
            ("user_id", I(42)),
            ("USER_ID", I(42)),
            ("\"page_url\"", s("/home")),
            ("\"Mixed Case\"", I(7)),
            ("(((user_id)))", I(42)),
        ]);
    }

    #[test]
    fn arithmetic_rules() {
        check(&[
            ("user_id + 1", I(43)),
            ("user_id - 50", I(-8)),
            ("user_id * 2", I(84)),
            ("user_id / 4", F(10.5)),
            ("7 / 2", F(3.5)),
            ("click_count / view_count", F(0.25)),
            ("user_id % 5", I(2)),
            ("-5 % 3", I(-2)),
            ("5.5 % 2", F(1.5)),
            ("-user_id", I(-42)),
            ("+user_id", I(42)),
            ("value * 2", F(5.0)),
            ("user_id + value", F(44.5)),
            ("value + 3 * 2", F(8.5)),
            ("(value + 3) * 2", F(11.0)),
            // Overflow gives NULL instead of wrapping.
            ("big + 1", N),
            ("big * 2", N),
            ("-big - 2", N),
            ("-(-9223372036854775808)", N),
            ("-9223372036854775808 % -1", I(0)),
            // Division and modulo by zero give NULL, for ints and floats alike.
            ("user_id / zero", N),
            ("user_id % zero", N),
            ("value / 0", N),
            ("value / 0.0", N),
            ("value % 0.0", N),
            ("n + 1", N),
            ("NULL + 1", N),
            ("NULL / NULL", N),
            ("f * 2", N),
            // Timestamps: µs arithmetic.
            ("ts - TIMESTAMP '2026-11-23T19:00:00Z'", I(3_600_000_000)),
            ("ts + 1000000", Tm(T + 1_000_000)),
            ("1000000 + ts", Tm(T + 1_000_000)),
            ("ts - 3600000000", Tm(T - 3_600_000_000)),
            ("ts + big", N),
        ]);
        assert_eq!(Expr::compile("click_count / view_count", SCHEMA).unwrap().output_type(), FieldType::Float);
        assert_eq!(Expr::compile("click_count * view_count", SCHEMA).unwrap().output_type(), FieldType::Int);
        assert_eq!(Expr::compile("value + 3 * 2", SCHEMA).unwrap().output_type(), FieldType::Float);
        assert_eq!(Expr::compile("ts - ts", SCHEMA).unwrap().output_type(), FieldType::Int);
        assert_eq!(Expr::compile("ts + 1", SCHEMA).unwrap().output_type(), FieldType::Timestamp);
        assert_eq!(Expr::compile("NULL", SCHEMA).unwrap().output_type(), FieldType::String);
        assert_eq!(Expr::compile("NULL + 1", SCHEMA).unwrap().output_type(), FieldType::Int);
    }

    #[test]
    fn comparisons() {
        check(&[
            ("user_id = 42", B(true)),
            ("user_id <> 42", B(false)),
            ("user_id != 41", B(true)),
            ("user_id < 42.5", B(true)),
            ("42.0 = user_id", B(true)),
            ("value >= 2.5", B(true)),
            ("value > user_id", B(false)),
            ("page_url = '/home'", B(true)),
            ("page_url > '/a'", B(true)),
            ("'/a' < page_url", B(true)),
            ("flag = TRUE", B(true)),
            ("FALSE < TRUE", B(true)),
            ("n = 1", N),
            ("1 <= n", N),
            ("s = page_url", N),
            // A string literal against a timestamp is read as a timestamp.
            ("ts > '2026-11-23'", B(true)),
            ("ts = '2026-11-23T20:00:00Z'", B(true)),
            ("'2026-11-24' > ts", B(true)),
            ("window_start >= '2026-11-23 20:00:00'", B(true)),
            // Int and float compare exactly, even past 2^53.
            ("9007199254740993 > 9007199254740992.0", B(true)),
            ("9223372036854775807 < 9223372036854775808.0", B(true)),
            ("CAST('NaN' AS DOUBLE) = CAST('NaN' AS DOUBLE)", B(true)),
            ("CAST('NaN' AS DOUBLE) > 1e308", B(true)),
            ("-0.0 = 0.0", B(true)),
            // NULL-safe equality.
            ("n <=> NULL", B(true)),
            ("n IS NOT DISTINCT FROM NULL", B(true)),
            ("n IS DISTINCT FROM 1", B(true)),
            ("user_id IS DISTINCT FROM 42", B(false)),
            ("user_id IS NOT DISTINCT FROM 42.0", B(true)),
        ]);
    }

    /// Kleene logic, through literals (folded at compile time) and through columns (evaluated).
    #[test]
    fn three_valued_logic_truth_tables() {
        let vals = [Some(true), Some(false), None];
        let lit = |v: Option<bool>| match v {
            Some(true) => "TRUE",
            Some(false) => "FALSE",
            None => "NULL",
        };
        let to_val = |v: Option<bool>| v.map_or(N, B);
        let and = |a: Option<bool>, b: Option<bool>| match (a, b) {
            (Some(false), _) | (_, Some(false)) => Some(false),
            (Some(true), Some(true)) => Some(true),
            _ => None,
        };
        let or = |a: Option<bool>, b: Option<bool>| match (a, b) {
            (Some(true), _) | (_, Some(true)) => Some(true),
            (Some(false), Some(false)) => Some(false),
            _ => None,
        };
        let cols = [("x", FieldType::Bool), ("y", FieldType::Bool)];
        for a in vals {
            for b in vals {
                let row = [a.map_or(Value::Null, Value::Bool), b.map_or(Value::Null, Value::Bool)];
                for (op, want) in [("AND", and(a, b)), ("OR", or(a, b))] {
                    let literal = format!("{} {op} {}", lit(a), lit(b));
                    assert_eq!(Expr::compile(&literal, &cols).unwrap().eval(&row[..]), to_val(want), "{literal}");
                    let columns = Expr::compile(&format!("x {op} y"), &cols).unwrap();
                    assert_eq!(columns.eval(&row[..]), to_val(want), "x {op} y with x={a:?}, y={b:?}");
                    assert_eq!(columns.eval_predicate(&row[..]), want == Some(true));
                }
            }
            let row = [a.map_or(Value::Null, Value::Bool), Value::Null];
            let not = Expr::compile("NOT x", &cols).unwrap();
            assert_eq!(not.eval(&row[..]), to_val(a.map(|x| !x)), "NOT {a:?}");
            for (text, want) in [
                ("x IS NULL", a.is_none()),
                ("x IS NOT NULL", a.is_some()),
                ("x IS TRUE", a == Some(true)),
                ("x IS NOT TRUE", a != Some(true)),
                ("x IS FALSE", a == Some(false)),
                ("x IS NOT FALSE", a != Some(false)),
                ("x IS UNKNOWN", a.is_none()),
            ] {
                assert_eq!(Expr::compile(text, &cols).unwrap().eval(&row[..]), B(want), "{text} with x={a:?}");
            }
        }
        // Long chains are flattened and still short-circuit correctly.
        let chain = vec!["y"; 500].join(" AND ") + " AND x";
        let e = Expr::compile(&chain, &cols).unwrap();
        assert_eq!(e.eval(&[Value::Bool(false), Value::Bool(true)][..]), B(false));
        assert_eq!(e.eval(&[Value::Null, Value::Bool(true)][..]), N);
        assert_eq!(e.eval(&[Value::Bool(true), Value::Bool(true)][..]), B(true));
    }

    #[test]
    fn in_between_and_like() {
        let many_ints = (0..50).map(|i| (i * 3).to_string()).collect::<Vec<_>>().join(", ");
        let many_strs = (0..30).map(|i| format!("'a{i}'")).collect::<Vec<_>>().join(", ");
        check(&[
            ("action IN ('view', 'click')", B(true)),
            ("action NOT IN ('view', 'click')", B(false)),
            ("action IN ('view')", B(false)),
            // SQL NULL rules: no match and a NULL in the list is unknown.
            ("action IN ('view', NULL)", N),
            ("action IN ('click', NULL)", B(true)),
            ("action NOT IN ('view', NULL)", N),
            ("s IN ('a')", N),
            ("NULL IN (1, 2)", N),
            ("user_id IN (1, 2, 42)", B(true)),
            ("user_id IN (1, 2.0)", B(false)),
            ("user_id IN (42.0)", B(true)),
            ("value IN (2.5, 3)", B(true)),
            ("flag IN (FALSE)", B(false)),
            ("user_id IN (n, 42)", B(true)),
            ("user_id IN (n, 41)", N),
            ("user_id NOT IN (zero, 41)", B(true)),
            ("ts IN ('2026-11-23T20:00:00Z', '2027-01-01')", B(true)),
            (&format!("user_id IN ({many_ints})"), B(true)),
            (&format!("user_id + 1 IN ({many_ints})"), B(false)),
            (&format!("action IN ({many_strs}, 'click')"), B(true)),
            (&format!("action IN ({many_strs})"), B(false)),
            (&format!("action NOT IN ({many_strs}, NULL)"), N),
            ("user_id BETWEEN 40 AND 50", B(true)),
            ("user_id BETWEEN 42 AND 42", B(true)),
            ("user_id NOT BETWEEN 40 AND 50", B(false)),
            ("value BETWEEN 3 AND 4", B(false)),
            ("n BETWEEN 1 AND 2", N),
            ("user_id BETWEEN n AND 10", B(false)),
            ("ts BETWEEN '2026-11-23' AND '2026-11-24'", B(true)),
            ("page_url LIKE '/h%'", B(true)),
            ("page_url LIKE '%me'", B(true)),
            ("page_url LIKE '%om%'", B(true)),
            ("page_url LIKE '/home'", B(true)),
            ("page_url LIKE '/hom'", B(false)),
            ("page_url LIKE '/h_me'", B(true)),
            ("page_url LIKE '/h%_e'", B(true)),
            ("page_url LIKE '_'", B(false)),
            ("page_url LIKE '%'", B(true)),
            ("'' LIKE '%'", B(true)),
            ("'' LIKE ''", B(true)),
            ("page_url NOT LIKE '%x%'", B(true)),
            ("s LIKE '%'", N),
            ("'a%b' LIKE 'a\\%b'", B(true)),
            ("'axb' LIKE 'a\\%b'", B(false)),
            ("'a%b' LIKE 'a!%b' ESCAPE '!'", B(true)),
            ("'axb' LIKE 'a!%b' ESCAPE '!'", B(false)),
            ("'héllo' LIKE 'h_llo'", B(true)),
            ("'abcabc' LIKE '%bc%bc'", B(true)),
            ("'abcab' LIKE '%bc%bc'", B(false)),
            ("page_url ILIKE '/HOME'", B(true)),
            ("page_url ILIKE '/H%'", B(true)),
        ]);
    }

    #[test]
    fn case_cast_and_functions() {
        check(&[
            ("CASE WHEN user_id > 40 THEN 'big' ELSE 'small' END", s("big")),
            ("CASE action WHEN 'view' THEN 1 WHEN 'click' THEN 2 END", I(2)),
            ("CASE action WHEN 'x' THEN 1 END", N),
            ("CASE WHEN n > 0 THEN 1 ELSE 2.5 END", F(2.5)),
            ("CASE WHEN TRUE THEN 1 ELSE 2.5 END", F(1.0)),
            ("CASE WHEN flag THEN user_id ELSE value END", F(42.0)),
            ("CASE n WHEN NULL THEN 1 ELSE 0 END", I(0)),
            ("CASE WHEN flag THEN NULL ELSE 3 END", N),
            ("CASE WHEN b THEN 1 WHEN flag THEN 2 END", I(2)),
            ("CASE ts WHEN '2026-11-23T20:00:00Z' THEN 'now' END", s("now")),
            ("IF(flag, 'y', 'n')", s("y")),
            ("IF(b, 1, 2)", I(2)),
            ("CAST('123' AS BIGINT)", I(123)),
            ("CAST(' 12 ' AS INT)", I(12)),
            ("CAST('1.9' AS BIGINT)", I(1)),
            ("CAST('abc' AS BIGINT)", N),
            ("CAST(-2.7 AS BIGINT)", I(-2)),
            ("CAST(1e19 AS BIGINT)", N),
            ("CAST(CAST('NaN' AS DOUBLE) AS BIGINT)", N),
            ("CAST(flag AS INT)", I(1)),
            ("CAST(user_id AS DOUBLE)", F(42.0)),
            ("CAST('2.5' AS DECIMAL(10, 2))", F(2.5)),
            ("CAST('x' AS FLOAT)", N),
            ("CAST(value AS VARCHAR)", s("2.5")),
            ("CAST(3.0 AS STRING)", s("3.0")),
            ("CAST(user_id AS TEXT)", s("42")),
            ("CAST(flag AS VARCHAR(10))", s("true")),
            ("CAST('yes' AS BOOLEAN)", B(true)),
            ("CAST('F' AS BOOLEAN)", B(false)),
            ("CAST('maybe' AS BOOLEAN)", N),
            ("CAST(0 AS BOOLEAN)", B(false)),
            ("CAST(ts AS STRING)", s("2026-11-23 20:00:00")),
            ("CAST(ts + 123450 AS STRING)", s("2026-11-23 20:00:00.12345")),
            ("CAST(TIMESTAMP '1969-12-31T23:59:59.5Z' AS STRING)", s("1969-12-31 23:59:59.5")),
            ("CAST('2026-11-23 20:00:00' AS TIMESTAMP)", Tm(T)),
            ("CAST('bad' AS TIMESTAMP)", N),
            ("CAST(ts AS BIGINT)", I(T)),
            ("CAST(1795464000000000 AS TIMESTAMP)", Tm(T)),
            ("CAST(ts AS DATE)", s("2026-11-23")),
            ("ts::date", s("2026-11-23")),
            ("user_id::double", F(42.0)),
            ("CAST('2026-11-23T23:59:59-05:00' AS DATE)", s("2026-11-24")),
            ("CAST('not a date' AS DATE)", N),
            ("CAST(NULL AS INT)", N),
            ("DATE(TIMESTAMP '2026-11-23T23:59:59Z') = '2026-11-23'", B(true)),
            ("DATE(TIMESTAMP '1900-03-01T00:00:00Z')", s("1900-03-01")),
            ("DATE('2024-02-29 12:00')", s("2024-02-29")),
            ("COALESCE(n, user_id)", I(42)),
            ("COALESCE(n, NULL)", N),
            ("COALESCE(f, 1)", F(1.0)),
            ("COALESCE(s, page_url, 'x')", s("/home")),
            ("IFNULL(s, 'x')", s("x")),
            ("NVL(n, 0)", I(0)),
            ("NULLIF(user_id, 42)", N),
            ("NULLIF(user_id, 1)", I(42)),
            ("NULLIF(n, 1)", N),
            ("GREATEST(1, user_id, n)", I(42)),
            ("LEAST(3, 2.5, n)", F(2.5)),
            ("GREATEST(n, NULL)", N),
            ("LEAST('b', action)", s("b")),
            ("ABS(-5)", I(5)),
            ("ABS(-2.5)", F(2.5)),
            ("ABS(-9223372036854775808)", N),
            ("ROUND(2.675, 2)", F(2.68)),
            ("ROUND(0.12345, 4)", F(0.1235)),
            ("ROUND(-2.5)", F(-3.0)),
            ("ROUND(2.4)", F(2.0)),
            ("ROUND(0.4)", F(0.0)),
            ("ROUND(0.5)", F(1.0)),
            ("ROUND(9.99, 1)", F(10.0)),
            ("ROUND(1234.5678, -2)", F(1200.0)),
            ("ROUND(1e300, 2)", F(1e300)),
            ("ROUND(42)", I(42)),
            ("ROUND(1234, -2)", I(1200)),
            ("ROUND(1250, -2)", I(1300)),
            ("ROUND(-1250, -2)", I(-1300)),
            ("ROUND(9223372036854775807, -1)", N),
            ("FLOOR(-2.5)", I(-3)),
            ("CEIL(2.1)", I(3)),
            ("CEILING(2.0)", I(2)),
            ("CEIL(user_id)", I(42)),
            ("FLOOR(1e300)", N),
            ("SQRT(16)", F(4.0)),
            ("SQRT(-1)", N),
            ("LN(0)", N),
            ("EXP(0)", F(1.0)),
            ("POWER(2, 10)", F(1024.0)),
            ("LOG10(1000)", F(3.0)),
            ("LOWER('AbC')", s("abc")),
            ("UPPER(action)", s("CLICK")),
            ("LENGTH('héllo')", I(5)),
            ("LENGTH(s)", N),
            ("TRIM('  a b  ')", s("a b")),
            ("LTRIM('  a ')", s("a ")),
            ("RTRIM('  a ')", s("  a")),
            ("CONCAT('a', user_id, '-', value)", s("a42-2.5")),
            ("CONCAT('a', n)", N),
            ("'a' || 'b' || 1", s("ab1")),
            ("SUBSTR('hello', 2, 3)", s("ell")),
            ("SUBSTR('hello', -3)", s("llo")),
            ("SUBSTRING('hello' FROM 2)", s("ello")),
            ("SUBSTRING('hello' FROM 2 FOR 2)", s("el")),
            ("SUBSTR('hello', 0, 2)", s("he")),
            ("SUBSTR('héllo', 2, 1)", s("é")),
            ("SUBSTR('hello', 10)", s("")),
            ("SUBSTR('hello', 2, -1)", s("")),
            ("SUBSTR('hello', -7, 3)", s("h")),
            ("SUBSTR(page_url, 2)", s("home")),
        ]);
    }

    #[test]
    fn dates_and_times() {
        let day = MICROS_PER_DAY;
        check(&[
            ("DATE_TRUNC('week', TIMESTAMP '2026-11-26T10:00:00Z')", Tm(T - 20 * MICROS_PER_HOUR)),
            ("DATE_TRUNC('week', ts)", Tm(T - 20 * MICROS_PER_HOUR)),
            ("DATE_TRUNC('week', TIMESTAMP '1970-01-01T00:00:00Z')", Tm(-3 * day)),
            ("DATE_TRUNC('month', ts)", Tm(1_793_491_200 * MICROS_PER_SECOND)),
            ("DATE_TRUNC('quarter', ts)", Tm(1_790_812_800 * MICROS_PER_SECOND)),
            ("DATE_TRUNC('year', ts)", Tm(1_767_225_600 * MICROS_PER_SECOND)),
            ("DATE_TRUNC('DAY', ts)", Tm(T - 20 * MICROS_PER_HOUR)),
            ("DATE_TRUNC('hour', ts + 1234)", Tm(T)),
            ("DATE_TRUNC('minute', ts + 61000000)", Tm(T + 60_000_000)),
            ("DATE_TRUNC('second', ts + 1500000)", Tm(T + 1_000_000)),
            ("DATE_TRUNC('day', '2026-11-23 05:00:00')", Tm(T - 20 * MICROS_PER_HOUR)),
            ("DATE_TRUNC('hour', TIMESTAMP '1969-12-31T23:30:00Z')", Tm(-MICROS_PER_HOUR)),
            ("DATE_TRUNC('month', TIMESTAMP '2024-02-29T12:00:00Z') = TIMESTAMP '2024-02-01'", B(true)),
            ("HOUR(ts)", I(20)),
            ("MINUTE(ts + 60000000)", I(1)),
            ("SECOND(ts + 59999999)", I(59)),
            ("DAY(ts)", I(23)),
            ("DAYOFMONTH(ts)", I(23)),
            ("MONTH(ts)", I(11)),
            ("YEAR(ts)", I(2026)),
            ("EXTRACT(HOUR FROM ts)", I(20)),
            ("EXTRACT(YEAR FROM ts)", I(2026)),
            ("YEAR('2024-02-29')", I(2024)),
            ("MONTH(CAST(window_start AS DATE))", I(11)),
            ("HOUR(TIMESTAMP '1969-12-31T23:00:00Z')", I(23)),
            ("DAY(TIMESTAMP '1969-12-31T23:00:00Z')", I(31)),
            ("HOUR(s)", N),
        ]);
    }

    #[test]
    fn timestamp_parser_rejects_malformed_text() {
        for bad in [
            "",
            "2026",
            "2026-13-01",
            "2026-02-29",
            "2026-11-31",
            "2026-11-23T24:00:00",
            "2026-11-23T20:60",
            "2026-11-23T20:00:61",
            "2026-11-23T20:00:00.",
            "2026-11-23T20:00:00.1234567890",
            "2026-11-23T20:00:00+25:00",
            "2026-11-23T20:00:00 UTC",
            "2026-11-23X20:00",
            "26-11-23",
            "2026-11-23T2:00",
            "２０２６-11-23",
        ] {
            assert_eq!(parse_timestamp(bad), None, "{bad:?}");
        }
        assert_eq!(parse_timestamp("2024-02-29"), Some(days_from_civil(2024, 2, 29) * MICROS_PER_DAY));
        assert_eq!(parse_timestamp(" 2026-11-23t20:00:00z "), Some(T));
    }

    #[test]
    fn compile_errors_name_the_problem() {
        assert_error(
            "pag_url IS NOT NULL",
            &["unknown column \"pag_url\"", "columns: user_id, page_url, action", "did you mean \"page_url\"?"],
        );
        assert_error("action = \"click\"", &["unknown column \"click\"", "single quotes: 'click'"]);
        assert_error("page_url = 3", &["cannot compare string \"page_url\" with int 3", "CAST"]);
        assert_error("3 < action", &["cannot compare int 3 with string \"action\""]);
        assert_error("flag = 1", &["cannot compare bool \"flag\" with int 1"]);
        assert_error("ts > 'yesterday'", &["'yesterday'", "not a timestamp"]);
        assert_error(
            "ts = page_url",
            &["cannot compare timestamp \"ts\" with string \"page_url\"", "CAST(page_url AS TIMESTAMP)"],
        );
        assert_error("page_url + 1", &["cannot apply + to string \"page_url\" and int 1"]);
        assert_error("ts * 2", &["cannot apply * to timestamp \"ts\" and int 2", "microseconds"]);
        assert_error("user_id AND flag", &["AND needs a boolean operand", "int \"user_id\""]);
        assert_error("NOT page_url", &["NOT needs a boolean operand", "string \"page_url\""]);
        assert_error(
            "CASE WHEN flag THEN 1 ELSE 'a' END",
            &["CASE results must have one type", "int 1", "string 'a'"],
        );
        assert_error("CASE WHEN user_id THEN 1 END", &["CASE WHEN needs a boolean operand"]);
        assert_error("COALESCE(user_id, page_url)", &["COALESCE arguments must have one type", "string \"page_url\""]);
        assert_error("CAST(ts AS DOUBLE)", &["cannot cast timestamp \"ts\" to DOUBLE"]);
        assert_error("CAST(user_id AS DATE)", &["cannot cast int \"user_id\" to DATE"]);
        assert_error("CAST(user_id AS BLOB)", &["unsupported SQL: CAST to BLOB"]);
        assert_error("user_id = NULL", &["never true", "user_id IS NULL"]);
        assert_error("user_id <> NULL", &["user_id IS NOT NULL"]);
        assert_error("9223372036854775808", &["out of range for a 64-bit int"]);
        assert_error("1e400", &["out of range for a float"]);
        assert_error("TIMESTAMP '2026-13-01'", &["not a timestamp"]);
        assert_error("LOWER(user_id)", &["LOWER needs a string", "int \"user_id\""]);
        assert_error("ROUND(value, user_id)", &["integer literal"]);
        assert_error("ROUND(1, 2, 3)", &["ROUND takes 1 or 2 arguments", "has 3"]);
        assert_error("LOWER()", &["LOWER takes 1 argument,", "has 0"]);
        assert_error("DATE_TRUNC('fortnight', ts)", &["'fortnight'", "'week'"]);
        assert_error("HOUR(user_id)", &["HOUR needs a timestamp", "int \"user_id\""]);
        assert_error("page_url LIKE action", &["pattern that is not a string literal"]);
        assert_error("user_id LIKE '1%'", &["LIKE needs a string", "int \"user_id\""]);
        assert_error("page_url LIKE 'a\\'", &["ends with the escape character"]);
        // Syntax.
        assert_error("user_id = ", &["syntax error:", "Expected: an expression"]);
        assert_error("user_id 3", &["syntax error:", "unexpected 3", "column 9"]);
        assert_error("a = 1; b = 2", &["syntax error:", "unexpected ;"]);
        assert_error("   ", &["syntax error: the expression is empty"]);
        assert_error("'unterminated", &["syntax error:"]);
        // Unsupported constructs name the fragment and list what is supported.
        assert_error(
            "SUM(value) OVER ()",
            &["unsupported SQL: window functions", "SUM(value) OVER ()", "CASE WHEN", "COALESCE"],
        );
        assert_error("sum(value) > 3", &["aggregate function SUM(...)", "`aggregates`"]);
        assert_error("count(*)", &["aggregate function COUNT(...)"]);
        assert_error("user_id IN (SELECT 1)", &["subqueries are not supported"]);
        assert_error("EXISTS (SELECT 1)", &["subqueries are not supported"]);
        assert_error(
            "frobnicate(user_id)",
            &["unknown function FROBNICATE(...)", "frobnicate(user_id)", "COALESCE", "DATE_TRUNC"],
        );
        assert_error("current_timestamp", &["unknown function CURRENT_TIMESTAMP"]);
        assert_error("t.user_id", &["qualified name `t.user_id`"]);
        assert_error("ts + INTERVAL '1' HOUR", &["INTERVAL literals are not supported", "3600000000"]);
        assert_error("user_id = ?", &["query parameters"]);
        assert_error("user_id & 1", &["unsupported SQL: operator &"]);
        assert_error("user_id = ANY(n)", &["unsupported SQL"]);
    }

    #[test]
    fn column_lookup_is_exact_first_then_unique_ignoring_case() {
        let cols = [("Ab", FieldType::Int), ("aB", FieldType::Int), ("cd", FieldType::String)];
        let row = [Value::Int(1), Value::Int(2), Value::Str("x".into())];
        assert_eq!(Expr::compile("Ab", &cols).unwrap().eval(&row[..]), I(1));
        assert_eq!(Expr::compile("\"aB\"", &cols).unwrap().eval(&row[..]), I(2));
        assert_eq!(Expr::compile("CD", &cols).unwrap().eval(&row[..]), s("x"));
        let err = Expr::compile("ab", &cols).unwrap_err().to_string();
        assert!(err.contains("ambiguous column \"ab\"") && err.contains("\"Ab\", \"aB\""), "{err}");
        let err = Expr::compile("x", &[]).unwrap_err().to_string();
        assert!(err.contains("(columns: none)"), "{err}");
    }

    #[test]
    fn predicates_reject_null_and_false() {
        let r = row();
        let pred = |text: &str| Expr::compile_predicate(text, SCHEMA).unwrap().eval_predicate(r.as_slice());
        assert!(pred("action IN ('view','click') AND page_url IS NOT NULL"));
        assert!(!pred("n > 1"));
        assert!(!pred("NOT (n > 1)"));
        assert!(!pred("n = n"));
        assert!(!pred("NULL"));
        assert!(!pred("action = 'view'"));
        assert!(pred("n IS NULL"));
        assert!(pred("n > 1 OR flag"));
        assert!(pred("COALESCE(n > 1, TRUE)"));
        let err = Expr::compile_predicate("user_id + 1", SCHEMA).unwrap_err().to_string();
        assert!(err.contains("must be a boolean condition") && err.contains("is int"), "{err}");
    }

    #[test]
    fn columns_output_type_and_text() {
        let e = Expr::compile("user_id + n * user_id > value OR \"Mixed Case\" IS NULL", SCHEMA).unwrap();
        assert_eq!(e.columns(), vec![0, 3, 6, 12]);
        assert_eq!(e.output_type(), FieldType::Bool);
        assert_eq!(e.text(), "user_id + n * user_id > value OR \"Mixed Case\" IS NULL");
        assert_eq!(Expr::compile("1 + 2", SCHEMA).unwrap().columns(), Vec::<usize>::new());
        assert_eq!(Expr::compile("CAST(window_start AS DATE)", SCHEMA).unwrap().output_type(), FieldType::String);
        assert_eq!(
            Expr::compile(
                "avg_value + 3 * stddev_value",
                &[("avg_value", FieldType::Float), ("stddev_value", FieldType::Float)]
            )
            .unwrap()
            .output_type(),
            FieldType::Float
        );
        assert_eq!(Expr::compile("DATE_TRUNC('day', ts)", SCHEMA).unwrap().output_type(), FieldType::Timestamp);
        assert_eq!(Expr::compile("CASE WHEN flag THEN NULL END", SCHEMA).unwrap().output_type(), FieldType::String);
        // Constant parts are folded away.
        let folded = Expr::compile("ts > TIMESTAMP '2026-01-01' + 3600 * 1000000", SCHEMA).unwrap();
        assert!(
            matches!(&folded.root, Node::Cmp { r, .. } if matches!(**r, Node::Lit(Value::Time(_)))),
            "{:?}",
            folded.root
        );
    }

    #[test]
    fn column_results_stay_borrowed() {
        let r = row();
        let e = Expr::compile("page_url", SCHEMA).unwrap();
        assert!(matches!(e.eval(r.as_slice()), Val::Str(Cow::Borrowed("/home"))));
        assert_eq!(e.eval(r.as_slice()).into_value(), Value::Str("/home".into()));
        // And a string that outlives the expression.
        let v = {
            let e = Expr::compile("UPPER(page_url)", SCHEMA).unwrap();
            e.eval(r.as_slice())
        };
        assert_eq!(v, s("/HOME"));
    }

    #[test]
    fn unexpected_row_values_read_as_null() {
        // user_id holds a string, value an int (widened), flag is missing entirely.
        let r = vec![Value::Str("x".into()), Value::Null, Value::Null, Value::Int(3), Value::Float(1.0)];
        let eval = |text: &str| Expr::compile(text, SCHEMA).unwrap().eval(r.as_slice());
        assert_eq!(eval("user_id IS NULL"), B(true));
        assert_eq!(eval("user_id + 1"), N);
        assert_eq!(eval("value * 2"), F(6.0));
        assert_eq!(eval("ts"), N);
        assert_eq!(eval("flag"), N);
        assert_eq!(eval("window_start IS NULL"), B(true));
    }

    #[test]
    fn limits_turn_into_errors_not_stack_overflows() {
        let deep = vec!["user_id"; 300].join(" + ");
        assert!(matches!(Expr::compile(&deep, SCHEMA), Err(ExprError::TooComplex(_))));
        let ok = vec!["user_id"; 100].join(" + ");
        assert_eq!(Expr::compile(&ok, SCHEMA).unwrap().eval(row().as_slice()), I(4200));
        let long = format!("user_id IN ({})", vec!["1"; 5000].join(", "));
        assert!(matches!(Expr::compile(&long, SCHEMA), Err(ExprError::TooComplex(_))));
        let nested = format!("{}1{}", "(".repeat(200), ")".repeat(200));
        assert!(Expr::compile(&nested, SCHEMA).is_err());
        let postfix = format!("user_id{}", " IS NULL".repeat(3000));
        assert!(Expr::compile(&postfix, SCHEMA).is_err());
    }

    /// A reference LIKE: plain recursion over characters.
    fn like_reference(s: &[char], p: &[char]) -> bool {
        match p.split_first() {
            None => s.is_empty(),
            Some(('%', rest)) => (0..=s.len()).any(|i| like_reference(&s[i..], rest)),
            Some(('_', rest)) => !s.is_empty() && like_reference(&s[1..], rest),
            Some((c, rest)) => s.first() == Some(c) && like_reference(&s[1..], rest),
        }
    }

    proptest! {
        #[test]
        fn int_arithmetic_is_checked(a in any::<i64>(), b in any::<i64>()) {
            let cols = [("a", FieldType::Int), ("b", FieldType::Int)];
            let row = [Value::Int(a), Value::Int(b)];
            let eval = |text: &str| Expr::compile(text, &cols).unwrap().eval(&row[..]);
            prop_assert_eq!(eval("a + b"), a.checked_add(b).map_or(N, I));
            prop_assert_eq!(eval("a - b"), a.checked_sub(b).map_or(N, I));
            prop_assert_eq!(eval("a * b"), a.checked_mul(b).map_or(N, I));
            prop_assert_eq!(eval("a / b"), if b == 0 { N } else { F(a as f64 / b as f64) });
            prop_assert_eq!(eval("(a < b) = NOT (a >= b)"), B(true));
            prop_assert_eq!(eval("a < b"), B(a < b));
            // The same through literals, folded at compile time.
            let lit = |text: String| Expr::compile(&text, &[]).unwrap().eval(&[][..]);
            prop_assert_eq!(lit(format!("({a}) + ({b})")), a.checked_add(b).map_or(N, I));
            prop_assert_eq!(lit(format!("({a}) * ({b})")), a.checked_mul(b).map_or(N, I));
        }

        #[test]
        fn small_int_arithmetic_and_division(a in -1000i64..1000, b in -1000i64..1000) {
            let cols = [("a", FieldType::Int), ("b", FieldType::Int)];
            let row = [Value::Int(a), Value::Int(b)];
            let eval = |text: &str| Expr::compile(text, &cols).unwrap().eval(&row[..]);
            prop_assert_eq!(eval("a + b"), I(a + b));
            prop_assert_eq!(eval("a / b"), if b == 0 { N } else { F(a as f64 / b as f64) });
            prop_assert_eq!(eval("a % b"), if b == 0 { N } else { I(a % b) });
            prop_assert_eq!(eval("(a < b) = NOT (a >= b)"), B(true));
        }

        #[test]
        fn int_float_comparison_is_exact(i in any::<i64>(), f in any::<f64>()) {
            let want = if f.is_nan() { Ordering::Less } else { (i as i128 as f64).partial_cmp(&f).map(|o| {
                // Compare exactly: f is an integer or between two; an i128 holds both sides.
                if f.abs() < 1.7e38 && f.fract() == 0.0 { (i as i128).cmp(&(f as i128)) } else { o }
            }).unwrap() };
            prop_assert_eq!(cmp_i64_f64(i, f), want);
        }

        #[test]
        fn like_matches_the_reference(s in "[ab%_]{0,8}", p in "[ab%_]{0,6}") {
            let pattern = LikePattern::compile(&p, None).unwrap();
            let sc: Vec<char> = s.chars().collect();
            let pc: Vec<char> = p.chars().collect();
            prop_assert_eq!(pattern.matches(&s), like_reference(&sc, &pc), "{:?} LIKE {:?}", s, p);
        }

        #[test]
        fn timestamps_round_trip_through_strings(t in -62_135_596_800_000_000i64..253_402_300_799_999_999) {
            let text = format_timestamp(t);
            prop_assert_eq!(parse_timestamp(&text), Some(t), "{}", text);
            prop_assert_eq!(parse_timestamp(&format_date(t)), truncate_time(t, TruncUnit::Day));
        }

        #[test]
        fn round_float_is_half_away_from_zero_on_the_decimal(int in -1_000_000i64..1_000_000, digits in 0i32..4) {
            // x = int / 10^(digits + 1): its decimal has exactly one digit past the rounding point.
            let x: f64 = format!("{}e-{}", int, digits + 1).parse().unwrap();
            let last = (int % 10).abs();
            let trunc = int / 10;
            let rounded = if last >= 5 { trunc + int.signum() } else { trunc };
            let want: f64 = format!("{}e-{}", rounded, digits).parse().unwrap();
            prop_assert_eq!(round_f64(x, digits), want, "round({}, {})", x, digits);
        }

        #[test]
        fn arbitrary_text_never_panics(text in "[a-z_ 0-9'\"().,*/%+<>=!|:-]{0,40}|(user_id|page_url|ts|NULL|CASE|WHEN|THEN|END|IN|AND|NOT|CAST|AS|DATE|[(),'+*/ <=>-]|[0-9]+){0,12}") {
            if let Ok(e) = Expr::compile(&text, SCHEMA) {
                let _ = e.eval(row().as_slice());
                let _ = e.eval(&[][..]);
                let _ = e.eval_predicate(row().as_slice());
                let _ = e.columns();
            }
        }
    }
}
