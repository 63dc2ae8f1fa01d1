//! PostgreSQL store: the event log and Currents.
