//! Integration tests of tideway-messaging.
