//! The PostgreSQL test fixture lives in the crate (`tideway_store::testing`, feature `testing`)
//! so the server's and the binary's suites use the same one.

pub use tideway_store::testing::TestDb;
