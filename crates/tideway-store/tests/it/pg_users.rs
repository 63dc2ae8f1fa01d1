//! PostgreSQL store: the unit-of-work transaction and cohort reads.
