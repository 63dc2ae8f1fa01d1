//! Dashboard users: who may sign in to `/dashboard`, with which role, and how their passwords
//! are kept (argon2id PHC strings, never the password).
//!
//! Pure like the rest of core: the salt of a new hash is a parameter (the caller draws it), so
//! hashing is deterministic and testable. Storage is [`crate::store::DashboardStore`].

use std::fmt;

use argon2::Argon2;
use argon2::password_hash::{PasswordHasher, PasswordVerifier};

/// What a dashboard user may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// Every page and every change.
    Admin,
    /// Every page; every change is refused (403).
    ReadOnly,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Admin => "admin",
            Role::ReadOnly => "read_only",
        }
    }

    /// `admin` or `read_only` (also `read-only`).
    pub fn parse(raw: &str) -> Result<Role, DashboardError> {
        match raw.trim() {
            "admin" => Ok(Role::Admin),
            "read_only" | "read-only" => Ok(Role::ReadOnly),
            _ => Err(DashboardError::UnknownRole),
        }
    }

    pub fn may_change(self) -> bool {
        self == Role::Admin
    }
}

/// What is wrong with a username, password or role.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum DashboardError {
    #[error("a username is 1 to 64 characters: letters, digits, '.', '_', '-' or '@'")]
    BadUsername,
    #[error("a password is {MIN_PASSWORD_CHARS} to {MAX_PASSWORD_CHARS} characters")]
    BadPassword,
    #[error("a role is admin or read_only")]
    UnknownRole,
    #[error("the password could not be hashed")]
    Hashing,
}

/// Shortest password accepted for a dashboard user.
pub const MIN_PASSWORD_CHARS: usize = 12;
/// Longest password accepted (argon2 takes any length; this bounds the work a sign-in costs).
pub const MAX_PASSWORD_CHARS: usize = 256;

/// A dashboard username: 1 to 64 of `[A-Za-z0-9._@-]`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Username(String);

impl Username {
    pub fn parse(raw: &str) -> Result<Username, DashboardError> {
        let ok = (1..=64).contains(&raw.len())
            && raw
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-' | b'@'));
        if ok {
            Ok(Username(raw.to_owned()))
        } else {
            Err(DashboardError::BadUsername)
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for Username {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// An argon2id hash in PHC string form (`$argon2id$v=19$…`). Redacted in `Debug`.
#[derive(Clone, PartialEq, Eq)]
pub struct PasswordHash(String);

impl PasswordHash {
    /// A stored PHC string, as read back from the store.
    pub fn from_stored(phc: String) -> PasswordHash {
        PasswordHash(phc)
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// Hashes a new password (checked for length) with the given salt.
    pub fn new(password: &str, salt: [u8; 16]) -> Result<PasswordHash, DashboardError> {
        check_password(password)?;
        let hash = Argon2::default()
            .hash_password_with_salt(password.as_bytes(), &salt)
            .map_err(|_| DashboardError::Hashing)?;
        Ok(PasswordHash(hash.to_string()))
    }

    /// Whether `password` is the one hashed (constant-time in argon2's comparison).
    pub fn verify(&self, password: &str) -> bool {
        password.chars().count() <= MAX_PASSWORD_CHARS
            && Argon2::default()
                .verify_password(password.as_bytes(), self.0.as_str())
                .is_ok()
    }
}

impl fmt::Debug for PasswordHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("PasswordHash([REDACTED])")
    }
}

/// Checks a new password's length.
pub fn check_password(password: &str) -> Result<(), DashboardError> {
    if (MIN_PASSWORD_CHARS..=MAX_PASSWORD_CHARS).contains(&password.chars().count()) {
        Ok(())
    } else {
        Err(DashboardError::BadPassword)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hashes_verify_only_their_password_and_never_show_it() {
        let hash = PasswordHash::new("correct horse battery", [7; 16]).unwrap();
        assert!(hash.as_str().starts_with("$argon2id$"));
        assert!(hash.verify("correct horse battery"));
        assert!(!hash.verify("correct horse batterY"));
        assert!(!hash.verify(""));
        assert_eq!(format!("{hash:?}"), "PasswordHash([REDACTED])");
        let again = PasswordHash::from_stored(hash.as_str().to_owned());
        assert!(again.verify("correct horse battery"));
        assert!(!PasswordHash::from_stored("garbage".into()).verify("x"));
    }

    #[test]
    fn short_passwords_and_odd_usernames_are_refused() {
        assert_eq!(
            PasswordHash::new("short", [0; 16]),
            Err(DashboardError::BadPassword)
        );
        for bad in ["", "a b", "<script>", &"x".repeat(65)] {
            assert_eq!(
                Username::parse(bad),
                Err(DashboardError::BadUsername),
                "{bad}"
            );
        }
        assert_eq!(
            Username::parse("ops.lead@acme").unwrap().as_str(),
            "ops.lead@acme"
        );
        assert_eq!(Role::parse("read-only"), Ok(Role::ReadOnly));
        assert_eq!(Role::parse("root"), Err(DashboardError::UnknownRole));
    }
}
