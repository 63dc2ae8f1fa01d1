//! The email channel (placeholder until the module lands).
