//! Liquid previews, shared by the campaign page and the Canvas page: find the user a preview
//! is for (by external id, as the dispatcher would see them), render a message's templates
//! with the variables a send builds, and show the "Preview for a user" form with what each
//! template rendered to — or why it did not (`abort_message`, an error on this user's data) —
//! beside its place (`messages[0].body`, `steps[2].message.url`).
//!
//! The variables are built by the callers with `tideway-messaging`'s own functions
//! (`personalise::vars_for`, and `canvas::canvas_vars` for a Canvas step), so a preview shows
//! what a send would — except the subscription links, which a send signs for itself: a preview
//! shows inert `#preview-unsubscribe_url`-style anchors (`dispatcher::preview_links`), so
//! clicking one in a preview unsubscribes nobody.

use axum::http::StatusCode;
use maud::{Markup, html};
use serde_json::Value;
use tideway_core::ids::{BrazeId, ExternalId, UserSeq};
use tideway_core::profile::UserRecord;
use tideway_core::services::Services;
use tideway_core::users::ExportRequest;
use tideway_messaging::liquid::{Template, Vars};

use super::{Ctx, PageError};
use crate::AppState;

/// Why a preview could not be made, with the status the page is answered with.
#[derive(Debug, Clone, PartialEq)]
pub(super) struct Refusal {
    pub status: StatusCode,
    pub message: String,
}

impl Refusal {
    pub fn new(status: StatusCode, message: impl Into<String>) -> Refusal {
        Refusal {
            status,
            message: message.into(),
        }
    }
}

/// One message's templates rendered: a title ("Variant 1", a step's name) and per place the
/// text or why it did not render.
#[derive(Debug, Clone, PartialEq)]
pub(super) struct RenderedMessage {
    pub title: String,
    pub note: Option<String>,
    pub parts: Vec<(String, Result<String, String>)>,
}

/// A preview: every rendered message, or why there is none.
pub(super) type Preview = Result<Vec<RenderedMessage>, Refusal>;

/// The user with this external id as a send sees them (found through the export's lookup and
/// the segment index's seq, their profile as of every acknowledged write), with their seq.
pub(super) async fn user(
    state: &AppState,
    ctx: &Ctx,
    external_id: &str,
) -> Result<Result<(UserSeq, UserRecord), Refusal>, PageError> {
    let Ok(id) = ExternalId::parse(external_id) else {
        return Ok(Err(Refusal::new(
            StatusCode::BAD_REQUEST,
            "That is not an external id.",
        )));
    };
    let unknown = || Refusal::new(StatusCode::NOT_FOUND, "No user has that external id.");
    let found = state
        .store()
        .export_ids(
            &ctx.workspace,
            ExportRequest {
                external_ids: vec![id],
                fields: vec!["braze_id".into()],
                ..Default::default()
            },
        )
        .await?;
    let Some(braze_id) = found
        .users
        .first()
        .and_then(|u| u.get("braze_id"))
        .and_then(Value::as_str)
        .and_then(|b| BrazeId::parse(b).ok())
    else {
        return Ok(Err(unknown()));
    };
    let seq = state
        .segments()
        .with_fresh(ctx.workspace.id, move |live| live.seq_of(&braze_id))
        .await?;
    let Some(seq) = seq else {
        return Ok(Err(Refusal::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "That user is not indexed yet; try again in a moment.",
        )));
    };
    Ok(state
        .store()
        .users_by_seq(ctx.workspace.id, vec![seq])
        .await?
        .into_iter()
        .next()
        .map(|user| (seq, user))
        .ok_or_else(unknown))
}

/// Each template rendered with `vars`, as the dispatcher renders it.
pub(super) fn render<'a>(
    templates: impl IntoIterator<Item = (String, &'a str)>,
    vars: &Vars,
) -> Vec<(String, Result<String, String>)> {
    templates
        .into_iter()
        .map(|(place, source)| {
            let rendered = Template::parse(source)
                .map_err(|e| e.to_string())
                .and_then(|t| t.render(vars).map_err(|e| e.to_string()));
            (place, rendered)
        })
        .collect()
}

/// The "Preview for a user" form (a GET to `action`: `preview`, and the extra fields the page
/// adds) and the preview's result.
pub(super) fn section(
    action: &str,
    wanted: Option<&str>,
    extra: Markup,
    preview: Option<&Preview>,
) -> Markup {
    html! {
        h2 { "Preview for a user" }
        form class="card" method="get" action=(action) {
            label for="preview" { "External id" }
            input type="text" id="preview" name="preview" required value=(wanted.unwrap_or(""));
            (extra)
            div class="actions" { button type="submit" id="show-preview" { "Preview" } }
        }
        @match preview {
            Some(Err(refusal)) => { p class="notice error" role="alert" id="preview-refused" { (refusal.message) } }
            Some(Ok(messages)) => {
                div id="preview-result" {
                    @for m in messages {
                        h3 { (m.title) }
                        @if let Some(note) = &m.note { p class="muted" { (note) } }
                        @for (place, text) in &m.parts {
                            p { code { (place) } }
                            @match text {
                                Ok(text) => { pre class="card mono" { (text) } }
                                Err(why) => { p class="notice error" { (why) } }
                            }
                        }
                    }
                }
            }
            None => {}
        }
    }
}

/// The status a page with this preview is answered with: the refusal's, else 200.
pub(super) fn status(preview: Option<&Preview>) -> StatusCode {
    match preview {
        Some(Err(refusal)) => refusal.status,
        _ => StatusCode::OK,
    }
}
