//! Developer Console › REST API keys: the workspace's keys (name, prefix, permissions, IP
//! allowlist, created, revoked), a form to create one with permission checkboxes grouped by
//! endpoint family (with select-all per group) and an optional IP allowlist — the secret
//! shown once on the page that answers it —, and revocation (effective at once on every node:
//! keys are read per request).

use axum::Extension;
use axum::extract::State;
use axum::response::Response;
use maud::{Markup, html};
use tideway_core::keys::{ApiKey, IpAllowlist, Permission, PermissionSet, Secret};
use tideway_core::store::NewApiKey;

use super::layout::{self, Section};
use super::{Ctx, FormData, Me, PageError, PathParams, path_param, see_other, when, ws_id};
use crate::AppState;

/// Longest key name accepted.
const MAX_NAME_CHARS: usize = 200;

/// Permission checkboxes in groups: `(group, permissions)`, by the name's first part.
fn permission_groups() -> Vec<(&'static str, Vec<Permission>)> {
    let mut groups: Vec<(&'static str, Vec<Permission>)> = Vec::new();
    for p in Permission::ALL {
        let family = p.as_str().split('.').next().unwrap_or("");
        match groups.iter_mut().find(|(g, _)| *g == family) {
            Some((_, list)) => list.push(p),
            None => groups.push((family, vec![p])),
        }
    }
    groups
}

/// `GET /dashboard/w/{ws}/developer/api-keys`.
pub async fn page(
    State(state): State<AppState>,
    Extension(me): Extension<Me>,
    path: PathParams,
) -> Result<Markup, PageError> {
    let ctx = Ctx::load(&state, me, ws_id(&path.0)?).await?;
    render(&state, &ctx, None, None).await
}

/// The page; `refused` is a create form sent back with what to fix, shown again as typed.
async fn render(
    state: &AppState,
    ctx: &Ctx,
    created: Option<(&Secret, &ApiKey)>,
    refused: Option<(&str, &FormData)>,
) -> Result<Markup, PageError> {
    let error = refused.map(|(message, _)| message);
    let typed = refused.map(|(_, form)| form);
    let typed_name = typed.and_then(|f| f.get("name")).unwrap_or("");
    let ticked = typed.map(|f| f.all("permission")).unwrap_or_default();
    let typed_ips = typed.and_then(|f| f.get("allow_ips")).unwrap_or("");
    let keys = state.store().list_api_keys(ctx.workspace.id).await?;
    let admin = ctx.me.may_change();
    let body = html! {
        @if let Some((secret, key)) = created {
            div class="notice secret" role="status" {
                p { strong { "Key '" (key.name) "' created." } " Copy the secret now: it is shown only once." }
                p { "API key: " code id="new-api-key" { (secret.expose()) } }
            }
        }
        @if let Some(error) = error {
            p class="notice error" role="alert" { (error) }
        }
        @if keys.is_empty() {
            p class="muted" { "No REST API keys in this workspace." }
        } @else {
            table id="api-keys" {
                thead { tr { th { "Name" } th { "Prefix" } th { "Permissions" } th { "Allowed from" } th { "Created" } th { "Status" } } }
                tbody {
                    @for k in &keys {
                        tr {
                            td { (k.name) }
                            td { code { (k.prefix) "…" } }
                            td class="mono" { (k.permissions.to_list().replace(',', ", ")) }
                            td class="mono" {
                                @if k.allow.is_empty() { span class="muted" { "anywhere" } }
                                @else { (k.allow.entries().collect::<Vec<_>>().join(", ")) }
                            }
                            td { (when(tideway_core::clock::Millis(k.created_at))) }
                            td {
                                @if let Some(at) = k.revoked_at {
                                    span class="badge bad" { "revoked " (when(tideway_core::clock::Millis(at))) }
                                } @else {
                                    span class="badge ok" { "active" }
                                    @if admin {
                                        " "
                                        form class="inline" method="post" action=(ctx.url(&["/developer/api-keys/", &k.id.to_string(), "/revoke"].concat())) {
                                            (ctx.csrf_field())
                                            button type="submit" class="danger" aria-label=(["Revoke key ", k.name.as_str()].concat()) { "Revoke" }
                                        }
                                    }
                                }
                            }
                        }
                    }
                }
            }
        }
        @if admin {
            h2 { "Create New API Key" }
            form class="card" method="post" action=(ctx.url("/developer/api-keys")) {
                (ctx.csrf_field())
                label for="key-name" { "API key name" }
                input type="text" id="key-name" name="name" maxlength=(MAX_NAME_CHARS) required value=(typed_name);
                fieldset {
                    legend { "Permissions" }
                    @for (group, permissions) in permission_groups() {
                        div class="group" {
                            label class="check" {
                                input type="checkbox" data-select-all=(group);
                                strong { (group) } " — select all"
                            }
                            div class="checks" {
                                @for p in permissions {
                                    label class="check" {
                                        input type="checkbox" name="permission" value=(p.as_str()) data-group=(group) checked[ticked.contains(&p.as_str())];
                                        code { (p.as_str()) }
                                    }
                                }
                            }
                        }
                    }
                }
                label for="allow-ips" { "Allowed IP addresses " span class="muted" { "(optional; one address or CIDR network per line; empty: anywhere)" } }
                textarea id="allow-ips" name="allow_ips" rows="3" { (typed_ips) }
                div class="actions" { button type="submit" id="create-key" { "Create API key" } }
            }
        }
    };
    Ok(layout::page(
        ctx,
        Section::ApiKeys,
        "Developer Console › REST API keys",
        body,
    ))
}

/// `POST /dashboard/w/{ws}/developer/api-keys`: creates a key; its secret is on the answer.
/// A bad form is answered 400 with the page and what to fix.
pub async fn create(
    State(state): State<AppState>,
    Extension(me): Extension<Me>,
    Extension(form): Extension<FormData>,
    path: PathParams,
) -> Result<Response, PageError> {
    use axum::response::IntoResponse;
    let ctx = Ctx::load(&state, me, ws_id(&path.0)?).await?;
    let (name, permissions, allow) = match parse_form(&form) {
        Ok(parsed) => parsed,
        Err(message) => {
            let page = render(&state, &ctx, None, Some((&message, &form))).await?;
            return Ok((axum::http::StatusCode::BAD_REQUEST, page).into_response());
        }
    };
    let secret = Secret::new(uuid::Uuid::new_v4().hyphenated().to_string());
    let key = state
        .store()
        .create_api_key(NewApiKey {
            workspace: ctx.workspace.id,
            name,
            prefix: secret.expose()[..ApiKey::PREFIX_LEN].to_owned(),
            hash: secret.hash(),
            permissions,
            allow,
            created_at: state.dashboard_now(),
        })
        .await?;
    let page = render(&state, &ctx, Some((&secret, &key)), None).await?;
    Ok((axum::http::StatusCode::CREATED, page).into_response())
}

/// The create form's name, permissions and allowlist, or what to fix.
fn parse_form(form: &FormData) -> Result<(String, PermissionSet, IpAllowlist), String> {
    let name = form.get("name").unwrap_or("").trim().to_owned();
    if name.is_empty() || name.chars().count() > MAX_NAME_CHARS {
        return Err(format!(
            "Give the key a name of 1 to {MAX_NAME_CHARS} characters."
        ));
    }
    let permissions = form
        .all("permission")
        .into_iter()
        .map(str::parse::<Permission>)
        .collect::<Result<PermissionSet, _>>()
        .map_err(|e| e.to_string())?;
    if permissions.iter().next().is_none() {
        return Err("Tick at least one permission.".to_owned());
    }
    let allow = IpAllowlist::parse_all(
        form.get("allow_ips")
            .unwrap_or("")
            .split(|c: char| c == ',' || c.is_whitespace())
            .filter(|s| !s.is_empty()),
    )
    .map_err(|e| format!("Allowed IP addresses: {e}"))?;
    Ok((name, permissions, allow))
}

/// `POST /dashboard/w/{ws}/developer/api-keys/{id}/revoke`.
pub async fn revoke(
    State(state): State<AppState>,
    Extension(me): Extension<Me>,
    path: PathParams,
) -> Result<Response, PageError> {
    let ctx = Ctx::load(&state, me, ws_id(&path.0)?).await?;
    let id: i64 = path_param(&path.0, "id")?
        .parse()
        .map_err(|_| PageError::BadRequest("A key id is a number.".into()))?;
    let revoked = state
        .store()
        .revoke_api_key(ctx.workspace.id, &id.to_string(), state.dashboard_now())
        .await?;
    if !revoked {
        return Err(PageError::NotFound(format!(
            "No active API key {id} in this workspace."
        )));
    }
    Ok(see_other(&ctx.url("/developer/api-keys")))
}
