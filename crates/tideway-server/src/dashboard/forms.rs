//! What every dashboard form shares: the posted fields ([`FormData`]), repeated groups of
//! fields (a segment builder's groups and conditions, a campaign's variants:
//! `{prefix}{i}_{field}`, with `remove` naming a group to drop), the role check before a form
//! is shown, the lifecycle actions in an address, and refusals turned into messages beside
//! the field they are about (the API's checks name the place, e.g. `messages[1].url`).
//!
//! Forms build the management API's JSON and hand it to the API's own checks, so what is
//! valid is decided once; this module only carries the answers back to the form.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use maud::{Markup, html};
use tideway_core::campaigns::CampaignAction;
use tideway_core::store::StoreError;

use super::{Ctx, PageError};
use crate::error::ApiError;

/// A POST's form fields, in order (repeated names kept: checkbox groups).
#[derive(Debug, Clone, Default)]
pub(crate) struct FormData(pub Vec<(String, String)>);

impl FormData {
    pub fn parse(bytes: &[u8]) -> FormData {
        FormData(form_urlencoded::parse(bytes).into_owned().collect())
    }

    /// Refuses a form with a NUL character (`%00`) in any name or value: no field means one,
    /// and PostgreSQL's text cannot store it, so both backends refuse the form the same way,
    /// before anything reads it.
    pub fn refuse_nul(&self) -> Result<(), PageError> {
        if self
            .0
            .iter()
            .any(|(k, v)| k.contains('\0') || v.contains('\0'))
        {
            return Err(PageError::BadRequest(
                "A field holds a NUL character (%00); remove it and send the form again.".into(),
            ));
        }
        Ok(())
    }

    /// The first value of `name`.
    pub fn get(&self, name: &str) -> Option<&str> {
        self.0
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }

    /// The first value of `name`, trimmed; empty when absent.
    pub fn text(&self, name: &str) -> &str {
        self.get(name).unwrap_or("").trim()
    }

    /// Every value of `name`.
    pub fn all(&self, name: &str) -> Vec<&str> {
        self.0
            .iter()
            .filter(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
            .collect()
    }

    /// The repeated groups `{prefix}0_…`, `{prefix}1_…`, … for as long as the group's `key`
    /// field is present (at most [`MAX_GROUPS`]), leaving out the one the form's `remove`
    /// names (a "Remove" button's value).
    pub fn groups(&self, prefix: &str, key: &str) -> Vec<Group<'_>> {
        Group {
            form: self,
            name: String::new(),
        }
        .groups(prefix, key)
    }
}

/// Most repeated groups a form is read for.
pub(crate) const MAX_GROUPS: usize = 20;

/// One repeated group of a form's fields, named like `v1` or `g0r2`.
#[derive(Debug, Clone)]
pub(crate) struct Group<'a> {
    form: &'a FormData,
    name: String,
}

impl<'a> Group<'a> {
    /// The group's name: its fields are `{name}_{field}`.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The group's `field`, untrimmed; empty when absent.
    pub fn get(&self, field: &str) -> &'a str {
        self.form
            .get(&[self.name.as_str(), "_", field].concat())
            .unwrap_or("")
    }

    /// The groups nested in this one (`{name}{prefix}{i}_…`), as [`FormData::groups`].
    pub fn groups(&self, prefix: &str, key: &str) -> Vec<Group<'a>> {
        let mut out = Vec::new();
        for i in 0..MAX_GROUPS {
            let name = [self.name.as_str(), prefix, &i.to_string()].concat();
            if self.form.get(&[name.as_str(), "_", key].concat()).is_none() {
                break;
            }
            if self.form.get("remove") == Some(name.as_str()) {
                continue;
            }
            out.push(Group {
                form: self.form,
                name,
            });
        }
        out
    }
}

/// Forbidden unless the signed-in user may change things (forms that only create or edit are
/// not shown to a read-only user; the guard refuses their POST anyway).
pub(crate) fn require_admin(ctx: &Ctx) -> Result<(), PageError> {
    if ctx.me.may_change() {
        Ok(())
    } else {
        Err(PageError::Forbidden(
            "Your role is read-only: you can look, not change.",
        ))
    }
}

/// The lifecycle action an address names (`…/{id}/launch`), or 404.
pub(crate) fn lifecycle_action(name: &str, what: &str) -> Result<CampaignAction, PageError> {
    match name {
        "launch" => Ok(CampaignAction::Launch),
        "pause" => Ok(CampaignAction::Pause),
        "stop" => Ok(CampaignAction::Stop),
        other => Err(PageError::NotFound(format!(
            "No {what} action '{other}' (launch, pause or stop)."
        ))),
    }
}

/// A failed API call as a page error (4xx kept, the rest as the store's).
pub(crate) fn api_error(e: ApiError) -> PageError {
    match e {
        ApiError::BadRequest { message, .. } => PageError::BadRequest(message),
        ApiError::Missing(what) => PageError::NotFound(what),
        ApiError::Conflict(why) => PageError::Conflict(why),
        ApiError::Unavailable => {
            PageError::Store(StoreError::Unavailable("the API's check".into()))
        }
        other => PageError::Store(StoreError::Corrupt(format!("{other:?}"))),
    }
}

/// What a form's field is refused for: `field` is the place the API names (`name`,
/// `messages[1].url`, `steps[2].next`, or `$` for the whole), `message` what to fix.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct FieldError {
    pub field: String,
    pub message: String,
}

impl FieldError {
    pub fn new(field: impl Into<String>, message: impl Into<String>) -> FieldError {
        FieldError {
            field: field.into(),
            message: message.into(),
        }
    }

    /// The API's 400 as the field it names and its message (the first of its `errors`);
    /// any other failure stays a page error.
    pub fn from_api(e: ApiError) -> Result<FieldError, PageError> {
        match e {
            ApiError::BadRequest { message, detail } => {
                let first = detail
                    .as_ref()
                    .and_then(|(_, d)| d.get(0))
                    .and_then(|e| Some((e.get("field")?.as_str()?, e.get("message")?.as_str()?)));
                Ok(match first {
                    Some((field, why)) => FieldError::new(field, why),
                    None => FieldError::new("$", message),
                })
            }
            other => Err(api_error(other)),
        }
    }

    /// The whole message, place first.
    pub fn full(&self) -> String {
        if self.field == "$" {
            self.message.clone()
        } else {
            [self.field.as_str(), ": ", self.message.as_str()].concat()
        }
    }
}

/// The message beside a form field (`id` is the field's id; the message's is `{id}-error`,
/// for the field's `aria-describedby`) when `error` is about it.
pub(crate) fn error_beside(error: Option<&FieldError>, id: &str) -> Markup {
    html! {
        @if let Some(e) = error {
            p class="field-error" id=([id, "-error"].concat()) role="alert" { (e.full()) }
        }
    }
}

/// The `aria-describedby` of a field with an error beside it.
pub(crate) fn described_by(error: Option<&FieldError>, id: &str) -> Option<String> {
    error.map(|_| [id, "-error"].concat())
}

/// A form page sent back with 400: nothing was saved, and the page says why.
pub(crate) fn refused(page: Markup) -> Response {
    (StatusCode::BAD_REQUEST, page).into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn form(pairs: &[(&str, &str)]) -> FormData {
        FormData(
            pairs
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect(),
        )
    }

    #[test]
    fn repeated_groups_are_read_in_order_until_one_is_missing_and_remove_drops_one() {
        let f = form(&[
            ("v0_channel", "email"),
            ("v0_name", "A"),
            ("v1_channel", "webhook"),
            ("v1_name", "B"),
            ("v2_channel", "email"),
            ("v4_channel", "email"),
            ("remove", "v1"),
        ]);
        let names: Vec<_> = f
            .groups("v", "channel")
            .iter()
            .map(|g| (g.name().to_owned(), g.get("name")))
            .collect();
        assert_eq!(names, [("v0".into(), "A"), ("v2".into(), "")]);
        let nested = form(&[
            ("g0_combine", "and"),
            ("g0r0_kind", "cohort"),
            ("g0r1_kind", "attribute"),
            ("g0r1_name", "plan"),
        ]);
        let groups = nested.groups("g", "combine");
        let rows: Vec<_> = groups[0]
            .groups("r", "kind")
            .iter()
            .map(|r| (r.name().to_owned(), r.get("kind"), r.get("name")))
            .collect();
        assert_eq!(
            rows,
            [
                ("g0r0".into(), "cohort", ""),
                ("g0r1".into(), "attribute", "plan")
            ]
        );
    }

    #[test]
    fn the_apis_refusal_names_the_field() {
        let e = crate::campaigns_api::place_error("messages[1].url", "must be a URL");
        let f = FieldError::from_api(e).unwrap();
        assert_eq!(f, FieldError::new("messages[1].url", "must be a URL"));
        assert_eq!(f.full(), "messages[1].url: must be a URL");
        let plain = FieldError::from_api(ApiError::bad_request("nope")).unwrap();
        assert_eq!(plain.full(), "nope");
        assert!(FieldError::from_api(ApiError::Conflict("stopped".into())).is_err());
    }

    #[test]
    fn only_the_three_lifecycle_actions_exist() {
        assert_eq!(
            lifecycle_action("launch", "x").unwrap(),
            CampaignAction::Launch
        );
        assert_eq!(
            lifecycle_action("pause", "x").unwrap(),
            CampaignAction::Pause
        );
        assert_eq!(lifecycle_action("stop", "x").unwrap(), CampaignAction::Stop);
        assert!(matches!(
            lifecycle_action("fly", "Canvas"),
            Err(PageError::NotFound(m)) if m.contains("Canvas action 'fly'")
        ));
    }
}
