//! Heap's segment-sync webhook (`reference/heap.md` §2): signature verification and body
//! parsing. Pure functions; the caller passes the current time.
//!
//! Signature: `Heap-Hash: ts:<milliseconds>,hmac:<signature>` where the signature is
//! `Base64(HMAC-SHA256(secret, ts + body))`. It is checked over the raw body first and, as
//! Heap's reference receiver hashes `JSON.stringify(parsed)`, over the compact key-order
//! preserving re-serialisation second. Lowercase hex signatures (Heap's 2021 format) are
//! accepted too. The comparison is constant-time (`Mac::verify_slice`). The timestamp must be
//! at most 60 s old and less than 1 s in the future.
//!
//! Body: `segment.users.sync` carries `add` / `remove` deltas for one page of one sync task;
//! `segment.users.drain` asks to remove every member. [`parse_sync`] turns either into a
//! [`SyncRequest`] with the rules of §2.4: numeric ids become decimal strings, entries
//! without a usable id are counted and skipped, an id in both lists ends removed, a page with
//! neither list is a no-op.

use base64::Engine;
use hmac::{Hmac, Mac};
use serde_json::{Map, Value};
use sha2::Sha256;

use crate::HeapError;

/// The header carrying the signature (HTTP header names are case-insensitive).
pub const SIGNATURE_HEADER: &str = "heap-hash";
/// Oldest accepted signature timestamp, relative to now.
pub const MAX_AGE_MS: i64 = 60_000;
/// A timestamp this far (or further) in the future is refused.
pub const MAX_AHEAD_MS: i64 = 1_000;
/// Longest `sync_task_id`, in bytes: Braze's identifier bound (987 bytes).
pub const MAX_SYNC_TASK_ID_BYTES: usize = 987;
const SYNC_TASK_ID_RULE: &str = "must be a non-empty string of at most 987 bytes, without NUL";

/// `action_type` of a webhook call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SyncAction {
    /// `segment.users.sync`: apply `add` and `remove`.
    Sync,
    /// `segment.users.drain`: remove every member of the segment.
    Drain,
}

impl SyncAction {
    pub fn as_str(self) -> &'static str {
        match self {
            SyncAction::Sync => "segment.users.sync",
            SyncAction::Drain => "segment.users.drain",
        }
    }
}

/// The Heap segment a call is about.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Segment {
    /// `data.segment.id` (int64 in Heap's spec).
    pub id: i64,
    /// `data.segment.name`, when sent.
    pub name: Option<String>,
}

impl Segment {
    /// The Braze `cohort_id` for this segment: its id as a decimal string (§2.5).
    pub fn cohort_id(&self) -> String {
        self.id.to_string()
    }
}

/// `data.sync_info`: which page of which sync task this is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SyncPage {
    pub sync_task_id: String,
    pub page_number: u32,
    pub total_pages: u32,
}

/// One entry of `customer_config.fields`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigField {
    pub field_id: String,
    pub field_type: Option<String>,
    /// `value.id`, when the value is an object with an id (or a plain string).
    pub value_id: Option<String>,
}

/// A parsed webhook body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SyncRequest {
    pub action: SyncAction,
    /// The customer's id (OAuth); absent from drain samples.
    pub id_token: Option<String>,
    pub config_fields: Vec<ConfigField>,
    pub segment: Segment,
    /// Absent on drains and on syncs that do not send it.
    pub page: Option<SyncPage>,
    /// Identities that entered the segment (never also in `remove`).
    pub add: Vec<String>,
    /// Identities that left it.
    pub remove: Vec<String>,
    /// Entries of `add`/`remove` without a usable `id`, skipped.
    pub skipped: usize,
}

/// When a verified signature was made (milliseconds since the epoch).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SignedAt(pub i64);

type HmacSha256 = Hmac<Sha256>;

fn mac(secret: &[u8], ts: &str, body: &[u8]) -> HmacSha256 {
    #[allow(clippy::expect_used)]
    let mut m = <HmacSha256 as Mac>::new_from_slice(secret).expect("HMAC takes keys of any length");
    m.update(ts.as_bytes());
    m.update(body);
    m
}

/// The `Heap-Hash` header value Heap would send for `body` at `ts_ms` (tests, clients).
pub fn sign(secret: &[u8], ts_ms: i64, body: &[u8]) -> String {
    let ts = ts_ms.to_string();
    let sig = base64::engine::general_purpose::STANDARD
        .encode(mac(secret, &ts, body).finalize().into_bytes());
    format!("ts:{ts},hmac:{sig}")
}

/// Splits `ts:<ms>,hmac:<sig>` (parts in any order, split on `,` then on the first `:`).
fn parse_header(header: &str) -> Result<(&str, i64, &str), HeapError> {
    let mut ts = None;
    let mut sig = None;
    for part in header.split(',') {
        let (key, value) = part
            .trim()
            .split_once(':')
            .ok_or(HeapError::MalformedSignature("a part without ':'"))?;
        match key.trim() {
            "ts" => ts = Some(value.trim()),
            "hmac" => sig = Some(value.trim()),
            _ => {}
        }
    }
    let ts = ts.ok_or(HeapError::MalformedSignature("no ts"))?;
    let sig = sig
        .filter(|s| !s.is_empty())
        .ok_or(HeapError::MalformedSignature("no hmac"))?;
    let ms: i64 = ts
        .parse()
        .map_err(|_| HeapError::MalformedSignature("ts is not an integer"))?;
    Ok((ts, ms, sig))
}

fn decode_signature(sig: &str) -> Result<Vec<u8>, HeapError> {
    if sig.len() == 64
        && sig
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    {
        return hex::decode(sig).map_err(|_| HeapError::MalformedSignature("bad hex"));
    }
    base64::engine::general_purpose::STANDARD
        .decode(sig)
        .map_err(|_| HeapError::MalformedSignature("hmac is neither Base64 nor hex"))
}

/// Verifies a `Heap-Hash` header over `body` with the webhook `secret` at `now_ms`.
///
/// Order: header present (else [`HeapError::MissingSignature`]), well-formed
/// ([`HeapError::MalformedSignature`]), fresh ([`HeapError::StaleSignature`]), then the HMAC
/// over the raw body and over its compact re-serialisation ([`HeapError::BadSignature`]).
pub fn verify_signature(
    header: Option<&str>,
    body: &[u8],
    secret: &[u8],
    now_ms: i64,
) -> Result<SignedAt, HeapError> {
    let header = header.ok_or(HeapError::MissingSignature)?;
    let (ts_text, ts, sig) = parse_header(header)?;
    if now_ms.saturating_sub(ts) > MAX_AGE_MS || ts.saturating_sub(now_ms) >= MAX_AHEAD_MS {
        return Err(HeapError::StaleSignature);
    }
    let expected = decode_signature(sig)?;
    if mac(secret, ts_text, body).verify_slice(&expected).is_ok() {
        return Ok(SignedAt(ts));
    }
    if let Ok(parsed) = serde_json::from_slice::<Value>(body) {
        let compact = parsed.to_string();
        if compact.as_bytes() != body
            && mac(secret, ts_text, compact.as_bytes())
                .verify_slice(&expected)
                .is_ok()
        {
            return Ok(SignedAt(ts));
        }
    }
    Err(HeapError::BadSignature)
}

fn invalid(field: &'static str, problem: &'static str) -> HeapError {
    HeapError::InvalidField { field, problem }
}

/// A user id as Braze wants it: strings kept (non-empty after trimming), integers as decimal.
fn user_id(entry: &Value) -> Option<String> {
    let id = entry.as_object()?.get("id")?;
    match id {
        Value::String(s) if !s.trim().is_empty() => Some(s.clone()),
        Value::Number(n) if n.is_i64() || n.is_u64() => Some(n.to_string()),
        _ => None,
    }
}

fn id_list(
    data: &Map<String, Value>,
    key: &'static str,
    skipped: &mut usize,
) -> Result<Vec<String>, HeapError> {
    match data.get(key) {
        None | Some(Value::Null) => Ok(Vec::new()),
        Some(Value::Array(entries)) => {
            let mut out = Vec::with_capacity(entries.len());
            for e in entries {
                match user_id(e) {
                    Some(id) => out.push(id),
                    None => *skipped += 1,
                }
            }
            Ok(out)
        }
        Some(_) => Err(invalid(key, "must be an array of {\"id\": …} objects")),
    }
}

fn config_fields(root: &Map<String, Value>) -> Result<Vec<ConfigField>, HeapError> {
    let Some(config) = root.get("customer_config") else {
        return Ok(Vec::new());
    };
    let config = config
        .as_object()
        .ok_or(invalid("customer_config", "must be an object"))?;
    let Some(fields) = config.get("fields") else {
        return Ok(Vec::new());
    };
    let fields = fields
        .as_array()
        .ok_or(invalid("customer_config.fields", "must be an array"))?;
    fields
        .iter()
        .map(|f| {
            let f = f
                .as_object()
                .ok_or(invalid("customer_config.fields", "must hold objects"))?;
            let field_id = f.get("field_id").and_then(Value::as_str).ok_or(invalid(
                "customer_config.fields[].field_id",
                "must be a string",
            ))?;
            let value_id = match f.get("value") {
                Some(Value::String(s)) => Some(s.clone()),
                Some(Value::Object(v)) => v.get("id").and_then(|id| match id {
                    Value::String(s) => Some(s.clone()),
                    Value::Number(n) => Some(n.to_string()),
                    _ => None,
                }),
                _ => None,
            };
            Ok(ConfigField {
                field_id: field_id.to_owned(),
                field_type: f
                    .get("field_type")
                    .and_then(Value::as_str)
                    .map(str::to_owned),
                value_id,
            })
        })
        .collect()
}

fn sync_page(data: &Map<String, Value>) -> Result<Option<SyncPage>, HeapError> {
    let Some(info) = data.get("sync_info") else {
        return Ok(None);
    };
    if info.is_null() {
        return Ok(None);
    }
    let info = info
        .as_object()
        .ok_or(invalid("data.sync_info", "must be an object"))?;
    let number = |k: &str, field: &'static str| -> Result<u32, HeapError> {
        info.get(k)
            .and_then(Value::as_u64)
            .and_then(|n| u32::try_from(n).ok())
            .ok_or(invalid(field, "must be a non-negative integer"))
    };
    // A key of the pages already applied: bounded as identifiers are, so it always fits the
    // key's index (on PostgreSQL, B-tree entries stop near 2.7 kB).
    let sync_task_id = match info.get("sync_task_id") {
        Some(Value::String(s))
            if !s.is_empty() && s.len() <= MAX_SYNC_TASK_ID_BYTES && !s.contains('\0') =>
        {
            s.clone()
        }
        Some(Value::Number(n)) => n.to_string(),
        _ => {
            return Err(invalid("data.sync_info.sync_task_id", SYNC_TASK_ID_RULE));
        }
    };
    Ok(Some(SyncPage {
        sync_task_id,
        page_number: number("page_number", "data.sync_info.page_number")?,
        total_pages: number("total_pages", "data.sync_info.total_pages")?,
    }))
}

/// Parses a webhook body (`segment.users.sync` or `segment.users.drain`).
pub fn parse_sync(body: &[u8]) -> Result<SyncRequest, HeapError> {
    let root: Value =
        serde_json::from_slice(body).map_err(|e| HeapError::NotJson(e.to_string()))?;
    let root = root
        .as_object()
        .ok_or(invalid("body", "must be a JSON object"))?;
    let action = match root.get("action_type") {
        Some(Value::String(a)) if a == SyncAction::Sync.as_str() => SyncAction::Sync,
        Some(Value::String(a)) if a == SyncAction::Drain.as_str() => SyncAction::Drain,
        Some(Value::String(a)) => return Err(HeapError::UnknownAction(a.clone())),
        _ => return Err(invalid("action_type", "must be a string")),
    };
    let id_token = match root.get("id_token") {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) => Some(s.clone()),
        Some(_) => return Err(invalid("id_token", "must be a string")),
    };
    let data = root
        .get("data")
        .and_then(Value::as_object)
        .ok_or(invalid("data", "must be an object"))?;
    let segment = data
        .get("segment")
        .and_then(Value::as_object)
        .ok_or(invalid("data.segment", "must be an object"))?;
    let id = match segment.get("id") {
        Some(Value::Number(n)) => n
            .as_i64()
            .ok_or(invalid("data.segment.id", "must be an integer"))?,
        Some(Value::String(s)) => s
            .trim()
            .parse()
            .map_err(|_| invalid("data.segment.id", "must be an integer"))?,
        _ => return Err(invalid("data.segment.id", "is required")),
    };
    let name = segment
        .get("name")
        .and_then(Value::as_str)
        .map(str::to_owned);
    let mut skipped = 0;
    let (mut add, remove, page) = match action {
        SyncAction::Sync => (
            id_list(data, "add", &mut skipped)?,
            id_list(data, "remove", &mut skipped)?,
            sync_page(data)?,
        ),
        SyncAction::Drain => (Vec::new(), Vec::new(), sync_page(data)?),
    };
    // An id in both lists ends removed (the conservative reading).
    if !remove.is_empty() {
        let removed: std::collections::HashSet<&str> = remove.iter().map(String::as_str).collect();
        add.retain(|id| !removed.contains(id.as_str()));
    }
    Ok(SyncRequest {
        action,
        id_token,
        config_fields: config_fields(root)?,
        segment: Segment { id, name },
        page,
        add,
        remove,
        skipped,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECRET: &[u8] = b"whsec_test";
    const NOW: i64 = 1_700_000_000_000;

    fn sample() -> &'static str {
        r#"{"id_token":"7a36ae58-c4b9-11eb-8529-0242ac130003","action_type":"segment.users.sync","customer_config":{"fields":[{"field_id":"workspace","field_display_name":"Workspace","field_type":"identity_mapping","value":{"id":"workspace_1","display_name":"Workspace 1"}}]},"data":{"segment":{"id":1338065,"name":"Free Customers"},"sync_info":{"page_number":1,"total_pages":5,"sync_task_id":"afe74af0-496e-11ec-81d3-0242ac130003"},"add":[{"id":"user1@email.com"},{"id":"user2@email.com"}],"remove":[{"id":"user3@email.com"}]}}"#
    }

    /// The signature computed here independently of `sign`, byte for byte as Heap's generator.
    fn heap_header(ts: i64, body: &[u8]) -> String {
        let mut m = <HmacSha256 as Mac>::new_from_slice(SECRET).unwrap();
        m.update(ts.to_string().as_bytes());
        m.update(body);
        let sig = base64::engine::general_purpose::STANDARD.encode(m.finalize().into_bytes());
        format!("ts:{ts},hmac:{sig}")
    }

    #[test]
    fn a_fresh_correct_signature_verifies() {
        let body = sample().as_bytes();
        let header = heap_header(NOW - 5_000, body);
        assert_eq!(header, sign(SECRET, NOW - 5_000, body));
        assert_eq!(
            verify_signature(Some(&header), body, SECRET, NOW),
            Ok(SignedAt(NOW - 5_000))
        );
    }

    #[test]
    fn the_freshness_window_is_60s_back_and_under_1s_ahead() {
        let body = b"{}";
        let at = |ts| verify_signature(Some(&heap_header(ts, body)), body, SECRET, NOW);
        assert!(at(NOW - 60_000).is_ok());
        assert_eq!(at(NOW - 60_001), Err(HeapError::StaleSignature));
        assert!(at(NOW + 999).is_ok());
        assert_eq!(at(NOW + 1_000), Err(HeapError::StaleSignature));
    }

    #[test]
    fn wrong_secret_body_or_header_shape_is_refused_precisely() {
        let body = sample().as_bytes();
        let header = heap_header(NOW, body);
        assert_eq!(
            verify_signature(Some(&header), body, b"other", NOW),
            Err(HeapError::BadSignature)
        );
        assert_eq!(
            verify_signature(Some(&header), b"{\"x\":1}", SECRET, NOW),
            Err(HeapError::BadSignature)
        );
        assert_eq!(
            verify_signature(None, body, SECRET, NOW),
            Err(HeapError::MissingSignature)
        );
        assert!(matches!(
            verify_signature(Some("garbage"), body, SECRET, NOW),
            Err(HeapError::MalformedSignature(_))
        ));
        assert!(matches!(
            verify_signature(Some("ts:abc,hmac:x"), body, SECRET, NOW),
            Err(HeapError::MalformedSignature(_))
        ));
        assert!(matches!(
            verify_signature(Some(&format!("ts:{NOW}")), body, SECRET, NOW),
            Err(HeapError::MalformedSignature(_))
        ));
        assert_eq!(HeapError::BadSignature.http_status(), 403);
        assert_eq!(HeapError::StaleSignature.http_status(), 400);
        assert_eq!(
            HeapError::MissingSignature.to_string(),
            "Expected \"heap-hash\" in the header"
        );
    }

    #[test]
    fn hex_signatures_and_reordered_parts_are_accepted() {
        let body = b"{\"a\":1}";
        let mut m = <HmacSha256 as Mac>::new_from_slice(SECRET).unwrap();
        m.update(NOW.to_string().as_bytes());
        m.update(body);
        let hex_sig = hex::encode(m.finalize().into_bytes());
        let header = format!("hmac:{hex_sig}, ts:{NOW}");
        assert!(verify_signature(Some(&header), body, SECRET, NOW).is_ok());
    }

    #[test]
    fn a_signature_over_the_reserialised_body_verifies() {
        // Heap's reference hashes JSON.stringify(parsed): compact, key order kept.
        let pretty = b"{ \"action_type\": \"segment.users.drain\",\n  \"data\": {\"segment\": {\"id\": 1}} }";
        let compact = br#"{"action_type":"segment.users.drain","data":{"segment":{"id":1}}}"#;
        let header = heap_header(NOW, compact);
        assert!(verify_signature(Some(&header), pretty, SECRET, NOW).is_ok());
    }

    #[test]
    fn the_reference_sync_sample_parses() {
        let req = parse_sync(sample().as_bytes()).unwrap();
        assert_eq!(req.action, SyncAction::Sync);
        assert_eq!(
            req.id_token.as_deref(),
            Some("7a36ae58-c4b9-11eb-8529-0242ac130003")
        );
        assert_eq!(
            req.segment,
            Segment {
                id: 1_338_065,
                name: Some("Free Customers".into())
            }
        );
        assert_eq!(req.segment.cohort_id(), "1338065");
        assert_eq!(
            req.page,
            Some(SyncPage {
                sync_task_id: "afe74af0-496e-11ec-81d3-0242ac130003".into(),
                page_number: 1,
                total_pages: 5
            })
        );
        assert_eq!(req.add, ["user1@email.com", "user2@email.com"]);
        assert_eq!(req.remove, ["user3@email.com"]);
        assert_eq!(
            req.config_fields[0].value_id.as_deref(),
            Some("workspace_1")
        );
        assert_eq!(req.skipped, 0);
    }

    #[test]
    fn drain_numeric_ids_skips_and_overlaps() {
        let drain = parse_sync(br#"{"action_type":"segment.users.drain","customer_config":{"fields":[]},"data":{"segment":{"id":7,"name":"X"}}}"#).unwrap();
        assert_eq!(
            (
                drain.action,
                drain.add.len(),
                drain.remove.len(),
                drain.id_token
            ),
            (SyncAction::Drain, 0, 0, None)
        );
        let req = parse_sync(
            br#"{"action_type":"segment.users.sync","data":{"segment":{"id":"9"},"add":[{"id":42},{"id":""},{"x":1},{"id":"both"}],"remove":[{"id":"both"},{"id":null}]}}"#,
        )
        .unwrap();
        assert_eq!(req.add, ["42"]);
        assert_eq!(req.remove, ["both"]);
        assert_eq!(req.skipped, 3);
        assert_eq!(req.segment.id, 9);
        let empty =
            parse_sync(br#"{"action_type":"segment.users.sync","data":{"segment":{"id":1}}}"#)
                .unwrap();
        assert!(empty.add.is_empty() && empty.remove.is_empty());
    }

    #[test]
    fn bad_bodies_get_precise_errors() {
        assert!(matches!(parse_sync(b"nope"), Err(HeapError::NotJson(_))));
        assert_eq!(
            parse_sync(b"[]"),
            Err(invalid("body", "must be a JSON object"))
        );
        assert_eq!(
            parse_sync(br#"{"data":{}}"#),
            Err(invalid("action_type", "must be a string"))
        );
        assert_eq!(
            parse_sync(br#"{"action_type":"segment.users.delete","data":{}}"#),
            Err(HeapError::UnknownAction("segment.users.delete".into()))
        );
        assert_eq!(
            parse_sync(br#"{"action_type":"segment.users.sync"}"#),
            Err(invalid("data", "must be an object"))
        );
        assert_eq!(
            parse_sync(br#"{"action_type":"segment.users.sync","data":{"segment":{}}}"#),
            Err(invalid("data.segment.id", "is required"))
        );
        assert_eq!(
            parse_sync(
                br#"{"action_type":"segment.users.sync","data":{"segment":{"id":1},"add":"x"}}"#
            ),
            Err(invalid("add", "must be an array of {\"id\": …} objects"))
        );
        assert_eq!(
            parse_sync(br#"{"action_type":"segment.users.sync","data":{"segment":{"id":1},"sync_info":{"page_number":1,"total_pages":2}}}"#),
            Err(invalid("data.sync_info.sync_task_id", SYNC_TASK_ID_RULE))
        );
        for bad in [
            "x".repeat(MAX_SYNC_TASK_ID_BYTES + 1),
            "a\\u0000b".to_owned(),
        ] {
            let page = format!(
                r#"{{"action_type":"segment.users.sync","data":{{"segment":{{"id":1}},"sync_info":{{"page_number":1,"total_pages":2,"sync_task_id":"{bad}"}}}}}}"#
            );
            assert_eq!(
                parse_sync(page.as_bytes()),
                Err(invalid("data.sync_info.sync_task_id", SYNC_TASK_ID_RULE))
            );
        }
    }
}
