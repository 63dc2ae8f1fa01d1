//! Tideway's campaign execution: what turns a campaign definition and a cohort into messages
//! that reach people, and their engagement into Currents events.
//!
//! The channels and their helpers:
//! - [`liquid`]: Braze-flavoured Liquid (`{{${first_name}}}`, `custom_attribute.${x}`,
//!   `abort_message`), checked when a campaign is saved and rendered per user at send time;
//! - [`webhook`] and [`email`]: the two channels, each one attempt of one message, classified
//!   into delivered / retry / failed so the dispatcher's loop stays a plain loop;
//! - [`tracking`]: signed open, click and unsubscribe URLs and the HTML rewriting that plants
//!   them;
//! - [`smtp_sink`]: a small SMTP server that stores what it receives (`tideway sink
//!   --smtp-listen`, and the tests' mailbox).
//!
//! The engine ([`engine`]) over the store's queue:
//! - [`triggers`]: action-based campaigns, conversions and [`stats`] from the logs;
//! - [`scheduler`]: scheduled campaigns (in UTC or each user's [`local_time`]) and audience
//!   expansion in chunks;
//! - [`dispatcher`]: claim → render ([`personalise`]) → send → settle;
//! - [`canvas`]: Canvas entries, journeys' timers and steps (their messages go through the
//!   dispatcher's queue);
//! - [`sends`] and [`plan`]: what the API's sends and the loops enqueue; [`audience`]: who is
//!   in a campaign's audience (answered by the server's segment indexes).

pub mod audience;
pub mod canvas;
pub mod dispatcher;
pub mod email;
pub mod engine;
pub mod liquid;
pub mod local_time;
pub mod personalise;
pub mod plan;
pub mod scheduler;
pub mod sends;
pub mod smtp_sink;
pub mod stats;
pub mod tracking;
pub mod triggers;
pub mod webhook;
