//! The frame around every signed-in page: the header with the workspace switcher and the
//! signed-in user, the navigation (Braze's sections), and the page's `main`.

use maud::{DOCTYPE, Markup, html};

use super::{Ctx, assets};

/// Which navigation entry a page is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Section {
    Home,
    Heap,
    Cohorts,
    Segments,
    Users,
    Campaigns,
    Canvases,
    Currents,
    ApiKeys,
}

/// A whole page: `title` in the tab and as the heading, `body` inside `main`.
pub fn page(ctx: &Ctx, section: Section, title: &str, body: Markup) -> Markup {
    let nav = |s: Section, rest: &str, label: &str| {
        html! {
            @if s == section {
                a href=(ctx.url(rest)) aria-current="page" { (label) }
            } @else {
                a href=(ctx.url(rest)) { (label) }
            }
        }
    };
    let headers = ["{\"X-CSRF-Token\": \"", ctx.csrf(), "\"}"].concat();
    html! {
        (DOCTYPE)
        html lang="en" {
            head {
                meta charset="utf-8";
                meta name="viewport" content="width=device-width, initial-scale=1";
                // No icon: without this the browser asks for /favicon.ico, a 404 on every page.
                link rel="icon" href="data:,";
                // No inline styles from htmx (the CSP forbids them) and no eval.
                meta name="htmx-config" content=r#"{"includeIndicatorStyles":false,"allowEval":false,"allowScriptTags":false}"#;
                title { (title) " — " (ctx.workspace.name) " — Tideway" }
                link rel="stylesheet" href=(assets::url("app.css"));
                script src=(assets::url("htmx.min.js")) defer {}
                script src=(assets::url("app.js")) defer {}
            }
            body hx-headers=(headers) {
                a class="skip" href="#main" { "Skip to content" }
                header class="top" {
                    a class="brand" href=(ctx.url("/")) { "Tideway" }
                    form method="get" action="/dashboard/switch" {
                        label for="ws-switch" { "Workspace" }
                        select id="ws-switch" name="ws" {
                            @for w in &ctx.workspaces {
                                option value=(w.id.0) selected[w.id == ctx.workspace.id] { (w.name) }
                            }
                        }
                        button type="submit" class="secondary" { "Go" }
                    }
                    span class="who" {
                        (ctx.me.session.user.username)
                        " (" (ctx.me.session.user.role.as_str()) ")"
                    }
                    form method="post" action="/dashboard/logout" {
                        (ctx.csrf_field())
                        button type="submit" class="secondary" { "Sign out" }
                    }
                }
                div class="layout" {
                    nav class="side" aria-label="Sections" {
                        (nav(Section::Home, "/", "Home"))
                        h2 { "Audience" }
                        (nav(Section::Segments, "/segments", "Segments"))
                        (nav(Section::Cohorts, "/cohorts", "Cohorts"))
                        (nav(Section::Users, "/users", "User lookup"))
                        h2 { "Messaging" }
                        (nav(Section::Campaigns, "/campaigns", "Campaigns"))
                        (nav(Section::Canvases, "/canvases", "Canvas"))
                        h2 { "Partner Integrations" }
                        (nav(Section::Heap, "/partners/heap", "Technology Partners › Heap"))
                        @if ctx.currents {
                            (nav(Section::Currents, "/currents", "Data Export › Currents"))
                        }
                        h2 { "Settings" }
                        (nav(Section::ApiKeys, "/developer/api-keys", "Developer Console › REST API keys"))
                    }
                    main id="main" {
                        h1 { (title) }
                        @if !ctx.me.may_change() {
                            p class="notice" { "You are signed in read-only: changes are disabled." }
                        }
                        (body)
                    }
                }
            }
        }
    }
}
