//! The sink's HTML page: totals, counts per event type and the latest events, rendered with
//! maud (compiled templates, auto-escaping: event bodies are untrusted input).

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use maud::{DOCTYPE, Markup, html};

use super::{Order, SinkState};

const LATEST: usize = 50;

fn when(ms: i64) -> String {
    time::OffsetDateTime::from_unix_timestamp(ms.div_euclid(1000))
        .map(|t| {
            format!(
                "{:04}-{:02}-{:02} {:02}:{:02}:{:02}Z",
                t.year(),
                u8::from(t.month()),
                t.day(),
                t.hour(),
                t.minute(),
                t.second()
            )
        })
        .unwrap_or_else(|_| ms.to_string())
}

pub(super) async fn index(State(state): State<SinkState>) -> Response {
    let store = state.store();
    let (totals, latest) =
        match tokio::try_join!(store.totals(), store.events(0, LATEST, None, Order::Newest)) {
            Ok(x) => x,
            Err(e) => return (StatusCode::SERVICE_UNAVAILABLE, e.to_string()).into_response(),
        };
    let page: Markup = html! {
        (DOCTYPE)
        html lang="en" {
            head {
                meta charset="utf-8";
                title { "tideway sink" }
                style { "body{font-family:system-ui,sans-serif;margin:2rem}table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:.3rem .6rem;text-align:left}code{font-size:.85em}" }
            }
            body {
                h1 { "tideway sink" }
                p { (totals.unique) " distinct events, " (totals.duplicates) " duplicate deliveries (deduplicated on id)." }
                h2 { "Events per type" }
                table {
                    tr { th { "event_type" } th { "count" } }
                    @for (t, n) in &totals.per_type {
                        tr { td { code { (t) } } td { (n) } }
                    }
                }
                h2 { "Latest " (LATEST) }
                table {
                    tr { th { "received" } th { "event_type" } th { "id" } th { "deliveries" } th { "event" } }
                    @for e in &latest {
                        tr {
                            td { (when(e.received_at)) }
                            td { code { (e.event_type) } }
                            td { code { (e.id) } }
                            td { (e.deliveries) }
                            td { code { (e.body.to_string().chars().take(300).collect::<String>()) } }
                        }
                    }
                }
            }
        }
    };
    page.into_response()
}
