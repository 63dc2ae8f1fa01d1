//! The one error type of `tideway-currents`.

use tideway_core::egress::Refusal;
use tideway_core::store::StoreError;

/// What went wrong, as far as a caller can act on it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CurrentsError {
    /// A Current definition is invalid: `field` names the offending JSON field.
    #[error("{field}: {message}")]
    InvalidSpec { field: String, message: String },
    /// The egress policy refuses a URL of the definition: `field` names the JSON field
    /// (`endpoint`, `alert_webhook`), `refusal` the rule.
    #[error("{field}: {refusal}")]
    Refused { field: String, refusal: Refusal },
    /// The storage refused or failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The HTTP client could not be built.
    #[error("cannot deliver to this endpoint: {0}")]
    Transport(String),
}

impl CurrentsError {
    pub(crate) fn spec(field: impl Into<String>, message: impl Into<String>) -> Self {
        CurrentsError::InvalidSpec {
            field: field.into(),
            message: message.into(),
        }
    }
}
