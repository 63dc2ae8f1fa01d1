//! The crate's one error: why a filter's wire form was rejected, and where.
//!
//! The management API returns it to the person who wrote the filter, so it carries the JSON path
//! of the offending node (`$.and[1].attribute.op`) and a sentence saying what is wrong; `kind`
//! lets a caller act on the category (e.g. a 404-ish "unknown segment" vs a 400 "bad operator")
//! without parsing the message.

/// A rejected filter: `"{path}: {message}"`.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{path}: {message}")]
pub struct FilterError {
    /// What went wrong, as a category.
    pub kind: FilterErrorKind,
    /// JSON path of the problem, `$` being the whole filter.
    pub path: String,
    /// Human-readable explanation.
    pub message: String,
}

/// Categories of [`FilterError`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FilterErrorKind {
    /// A key that is not allowed at this place (unknown filter, unknown field, a field the
    /// operator does not take).
    UnknownKey,
    /// A required field is absent.
    MissingField,
    /// An operator that does not exist, or does not apply to this kind of attribute.
    UnknownOperator,
    /// A value of the wrong type or out of range (including unparseable times).
    InvalidValue,
    /// A `matches` pattern that does not compile.
    InvalidRegex,
    /// An `and` / `or` with no filters.
    EmptyGroup,
    /// A cohort the workspace does not know.
    UnknownCohort,
    /// An `in_segment` id that does not resolve.
    UnknownSegment,
    /// `in_segment` references that loop back.
    SegmentCycle,
    /// Nesting deeper than the parser accepts.
    TooDeep,
}

impl FilterError {
    pub(crate) fn new(kind: FilterErrorKind, path: &str, message: impl Into<String>) -> Self {
        Self {
            kind,
            path: path.to_owned(),
            message: message.into(),
        }
    }
}
