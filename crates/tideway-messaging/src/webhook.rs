//! The webhook channel (placeholder until the module lands).
