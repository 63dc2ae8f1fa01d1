//! The one error type of this crate: what went wrong verifying or parsing a Heap webhook, or
//! running the sink. Each webhook variant maps to the HTTP status Heap's reference receiver
//! answers with ([`HeapError::http_status`]), and its message is the reference's text where
//! one exists.

/// Errors a caller of `tideway-heap` can act on.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HeapError {
    /// The request has no `Heap-Hash` header.
    #[error("Expected \"heap-hash\" in the header")]
    MissingSignature,
    /// The header is not `ts:<milliseconds>,hmac:<signature>`.
    #[error("Malformed \"heap-hash\" header: {0}")]
    MalformedSignature(&'static str),
    /// The timestamp is more than 60 s old or 1 s or more ahead of now.
    #[error("Timestamp of \"heap-hash\" is not within threshold")]
    StaleSignature,
    /// The HMAC does not match the body under the webhook secret.
    #[error("Invalid signature")]
    BadSignature,
    /// The body is not JSON.
    #[error("Invalid data format: body is not JSON ({0})")]
    NotJson(String),
    /// A required field is missing or has the wrong type.
    #[error("Invalid data format: {field} {problem}")]
    InvalidField {
        field: &'static str,
        problem: &'static str,
    },
    /// `action_type` is neither `segment.users.sync` nor `segment.users.drain`.
    #[error("Unknown action_type {0:?}")]
    UnknownAction(String),
    /// The sink could not open or write its storage.
    #[error("sink storage: {0}")]
    Storage(String),
    /// The sink could not listen.
    #[error("sink: {0}")]
    Io(String),
}

impl HeapError {
    /// The status Heap's reference receiver answers with: 400 for a missing, malformed or
    /// stale header and for bodies it cannot read, 403 for a bad signature, 500 otherwise.
    pub fn http_status(&self) -> u16 {
        match self {
            HeapError::MissingSignature
            | HeapError::MalformedSignature(_)
            | HeapError::StaleSignature
            | HeapError::NotJson(_)
            | HeapError::InvalidField { .. }
            | HeapError::UnknownAction(_) => 400,
            HeapError::BadSignature => 403,
            HeapError::Storage(_) | HeapError::Io(_) => 500,
        }
    }
}
