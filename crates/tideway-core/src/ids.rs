//! Identifiers, parsed once at the edge ("parse, don't validate").
//!
//! Every identifier a client can send is a newtype whose constructor checks it, so code deeper in
//! the system never re-checks lengths or emptiness. Braze's own limits apply: identifiers are
//! non-empty strings of at most 987 bytes (Braze documents 987 for `external_id`; we use it for
//! every free-form identifier so one rule covers them all).

use std::fmt;

/// Longest identifier Braze accepts, in bytes.
pub const MAX_IDENTIFIER_BYTES: usize = 987;

/// Why an identifier was rejected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdError {
    #[error("must be a non-empty string")]
    Empty,
    #[error("must be at most {MAX_IDENTIFIER_BYTES} bytes")]
    TooLong,
    #[error("must be 24 lowercase hexadecimal characters")]
    NotBrazeId,
    #[error("must not contain a NUL character (\\u0000)")]
    Nul,
}

fn check_free_form(raw: &str) -> Result<(), IdError> {
    if raw.trim().is_empty() {
        Err(IdError::Empty)
    } else if raw.len() > MAX_IDENTIFIER_BYTES {
        Err(IdError::TooLong)
    } else if raw.contains('\0') {
        // No identifier is meant to hold one, and PostgreSQL's text cannot store it.
        Err(IdError::Nul)
    } else {
        Ok(())
    }
}

macro_rules! free_form_id {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub struct $name(String);

        impl $name {
            /// Checks `raw` and wraps it.
            pub fn parse(raw: &str) -> Result<Self, IdError> {
                check_free_form(raw)?;
                Ok(Self(raw.to_owned()))
            }

            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }
    };
}

free_form_id!(
    /// A customer-assigned user identifier (`external_id`, Currents `external_user_id`).
    ExternalId
);
free_form_id!(
    /// An anonymous device identifier (Currents `device_id`).
    DeviceId
);
free_form_id!(
    /// The label half of a user alias, e.g. `email` or `amplitude_id`.
    AliasLabel
);
free_form_id!(
    /// The name half of a user alias: the value under its label.
    AliasName
);
free_form_id!(
    /// An email address used as an identifier (kept as given; Braze does not normalise it).
    Email
);
free_form_id!(
    /// A phone number used as an identifier (E.164 recommended, not required).
    Phone
);

/// A user alias: one name per label per user; (label, name) is unique within a workspace.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct UserAlias {
    pub label: AliasLabel,
    pub name: AliasName,
}

/// Braze's immutable user id, also Currents' `user_id`: 24 lowercase hex characters.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct BrazeId(String);

impl BrazeId {
    pub fn parse(raw: &str) -> Result<Self, IdError> {
        let ok = raw.len() == 24
            && raw
                .bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
        if ok {
            Ok(Self(raw.to_owned()))
        } else {
            Err(IdError::NotBrazeId)
        }
    }

    /// Builds an id from 12 bytes (the caller supplies randomness: core does no IO).
    pub fn from_bytes(bytes: [u8; 12]) -> Self {
        Self(hex::encode(bytes))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for BrazeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// The database key of a workspace.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct WorkspaceId(pub i64);

/// A user's dense integer id within its workspace (1, 2, 3, …; never reused). Segment bitmaps
/// are built over it, which is why it is dense and 32-bit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct UserSeq(pub u32);

/// A globally unique Currents event id (a UUID v4 in text form). Receivers dedupe on it.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct EventId(pub String);

/// Where fresh ids come from. Core does no IO, so randomness is a parameter like time is.
pub trait IdSource {
    fn braze_id(&mut self) -> BrazeId;
    fn event_id(&mut self) -> EventId;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn braze_id_accepts_only_24_lowercase_hex() {
        assert!(BrazeId::parse("0123456789abcdef01234567").is_ok());
        assert_eq!(
            BrazeId::parse("0123456789ABCDEF01234567"),
            Err(IdError::NotBrazeId)
        );
        assert_eq!(BrazeId::parse("abc"), Err(IdError::NotBrazeId));
        assert_eq!(
            BrazeId::from_bytes([0xab; 12]).as_str(),
            "abababababababababababab"
        );
    }

    #[test]
    fn free_form_ids_reject_blank_and_oversized() {
        assert_eq!(ExternalId::parse(""), Err(IdError::Empty));
        assert_eq!(ExternalId::parse("  "), Err(IdError::Empty));
        assert_eq!(ExternalId::parse(&"x".repeat(988)), Err(IdError::TooLong));
        assert_eq!(ExternalId::parse("user-1").unwrap().as_str(), "user-1");
    }
}
