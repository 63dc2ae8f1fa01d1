//! Tideway's campaign execution: what turns a campaign definition and a cohort into messages
//! that reach people, and their engagement into Currents events.
//!
//! - [`liquid`]: Braze-flavoured Liquid (`{{${first_name}}}`, `custom_attribute.${x}`,
//!   `abort_message`), checked when a campaign is saved and rendered per user at send time;
//! - [`webhook`] and [`email`]: the two channels, each one attempt of one message, classified
//!   into delivered / retry / failed so the dispatcher's loop stays a plain loop.

pub mod email;
pub mod liquid;
pub mod webhook;
