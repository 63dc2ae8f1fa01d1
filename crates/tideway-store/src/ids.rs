//! Fresh identifiers from the operating system's randomness (the [`IdSource`] core asks for).

use tideway_core::ids::{BrazeId, EventId, IdSource};

/// Random `braze_id`s and UUID v4 event ids.
#[derive(Debug, Default)]
pub struct RandomIds;

impl IdSource for RandomIds {
    fn braze_id(&mut self) -> BrazeId {
        let uuid = uuid::Uuid::new_v4();
        let mut bytes = [0u8; 12];
        bytes.copy_from_slice(&uuid.as_bytes()[..12]);
        BrazeId::from_bytes(bytes)
    }

    fn event_id(&mut self) -> EventId {
        EventId(uuid::Uuid::new_v4().hyphenated().to_string())
    }
}
