//! PostgreSQL store: workspaces and credentials.
