//! Integration tests of tideway-messaging.

mod channels;
