//! PostgreSQL store: segments and the change feed.
