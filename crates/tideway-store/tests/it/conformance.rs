//! The conformance suite: every store behaviour the HTTP layer relies on, run against each backend.
