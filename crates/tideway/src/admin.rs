//! The admin commands: `tideway workspaces …` and `tideway keys …`.
//!
//! They open the SQLite file directly (safe beside a running server: WAL mode and a busy
//! timeout), so they work without a network and without a key. Stdout carries only the
//! result a script wants (a new key's secret, a new workspace's app_group_id, a listing);
//! notes and errors go to stderr, and every error says what to do next.

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context;
use tideway_core::clock::Millis;
use tideway_core::keys::{ApiKey, IpAllowlist, PermissionSet};
use tideway_core::store::{Store, StoreError, Workspace};

use crate::config::Settings;
use crate::data;

/// Where the admin commands find the database.
#[derive(Debug, Clone, clap::Args)]
pub struct Location {
    /// Data directory of the Tideway instance [default: ./tideway-data]
    #[arg(long, env = "TIDEWAY_DATA_DIR", value_name = "DIR")]
    pub data_dir: Option<PathBuf>,
    /// PostgreSQL database of the Tideway instance, when it runs on one (as `tideway serve
    /// --database-url`)
    #[arg(long, env = "TIDEWAY_DATABASE_URL", value_name = "URL")]
    pub database_url: Option<String>,
    /// TOML configuration file to take `data-dir`, `database-url` and `synchronous` from
    #[arg(long, env = "TIDEWAY_CONFIG", value_name = "FILE")]
    pub config: Option<PathBuf>,
}

impl Location {
    /// Opens the existing database this location names, with the flags that name it again
    /// (for the commands an error message suggests).
    pub async fn open_store(&self) -> anyhow::Result<(Arc<dyn Store>, String)> {
        let settings = self.settings()?;
        let store = data::open_store(&settings, false).await?;
        Ok((store, settings.database.flags(&settings.data_dir)))
    }

    fn settings(&self) -> anyhow::Result<crate::config::Resolved> {
        Settings {
            data_dir: self.data_dir.clone(),
            database_url: self.database_url.clone(),
            ..Settings::default()
        }
        .resolve(self.config.as_deref())
    }
}

#[derive(Debug, clap::Subcommand)]
pub enum WorkspacesCommand {
    /// Create a workspace; prints its app_group_id
    Create {
        /// Workspace name (unique)
        name: String,
        #[command(flatten)]
        location: Location,
    },
    /// List workspaces: name, app_group_id, created
    List {
        #[command(flatten)]
        location: Location,
    },
}

#[derive(Debug, clap::Subcommand)]
pub enum KeysCommand {
    /// Create a REST API key; prints only its secret (shown once, stored hashed)
    Create {
        #[command(flatten)]
        location: Location,
        /// Workspace the key belongs to
        #[arg(long, default_value = "default")]
        workspace: String,
        /// Comma-separated permissions, e.g. users.track,users.identify (or `all`); known:
        /// users.track, users.identify, users.alias.new, users.alias.update, users.delete,
        /// users.export.ids, users.merge, users.external_ids.rename, users.external_ids.remove,
        /// cohorts.read, segments.list, segments.details, segments.read, segments.manage,
        /// currents.manage
        #[arg(long, value_name = "LIST", value_parser = parse_permissions)]
        permissions: PermissionSet,
        /// A label to tell keys apart in listings
        #[arg(long, value_name = "LABEL", default_value = "")]
        name: String,
        /// Only accept the key from this network or address (repeatable; default: anywhere)
        #[arg(long = "allow-ip", value_name = "CIDR")]
        allow_ip: Vec<String>,
    },
    /// List a workspace's keys (never their secrets)
    List {
        #[command(flatten)]
        location: Location,
        #[arg(long, default_value = "default")]
        workspace: String,
    },
    /// Revoke a key by id or prefix; the running server refuses it from then on
    Revoke {
        #[command(flatten)]
        location: Location,
        #[arg(long, default_value = "default")]
        workspace: String,
        /// The key's id or its 8-character prefix, as `tideway keys list` shows them
        id_or_prefix: String,
    },
}

/// A workspace name is shown in tables and put in URLs (`/partners/heap/segment-sync/{name or
/// app_group_id}`), so it has no control characters and is not shaped like an app_group_id,
/// which would make such a URL name two workspaces.
fn check_workspace_name(name: &str) -> Result<(), String> {
    if name.is_empty() {
        return Err("a workspace name must not be empty".to_owned());
    }
    if name.chars().count() > 255 {
        return Err("a workspace name must be at most 255 characters".to_owned());
    }
    if name.chars().any(char::is_control) {
        return Err(
            "a workspace name must not contain control characters (newlines, tabs); pick a plain name such as 'acme'"
                .to_owned(),
        );
    }
    if uuid::Uuid::parse_str(name).is_ok() {
        return Err(format!(
            "'{name}' is shaped like an app_group_id (a UUID), which Heap's webhook URL accepts in place of a name; pick another name"
        ));
    }
    Ok(())
}

/// clap value parser for `--permissions`.
fn parse_permissions(raw: &str) -> Result<PermissionSet, String> {
    if raw.trim() == "all" {
        return Ok(PermissionSet::all());
    }
    if raw.split(',').all(|p| p.trim().is_empty()) {
        return Err("give at least one permission, e.g. --permissions users.track".to_owned());
    }
    PermissionSet::parse_list(raw).map_err(|e| e.to_string())
}

pub async fn workspaces(command: WorkspacesCommand) -> anyhow::Result<()> {
    match command {
        WorkspacesCommand::Create { name, location } => {
            let settings = location.settings()?;
            let name = name.trim().to_owned();
            check_workspace_name(&name).map_err(anyhow::Error::msg)?;
            let store = data::open_store(&settings, true).await?;
            let workspace = match store.create_workspace(&name, data::now()).await {
                Ok(w) => w,
                Err(StoreError::Conflict(_)) => anyhow::bail!(
                    "workspace '{name}' already exists in {}; see `tideway workspaces list {}`",
                    settings.database.describe(&settings.data_dir),
                    settings.database.flags(&settings.data_dir)
                ),
                Err(e) => return Err(e).context("cannot create the workspace"),
            };
            println!("{}", workspace.app_group_id);
            eprintln!(
                "Created workspace '{}'. Give it a key with `tideway keys create {} --workspace {} --permissions users.track`.",
                workspace.name,
                settings.database.flags(&settings.data_dir),
                workspace.name
            );
        }
        WorkspacesCommand::List { location } => {
            let settings = location.settings()?;
            let store = data::open_store(&settings, false).await?;
            let workspaces = store
                .list_workspaces()
                .await
                .context("cannot list workspaces")?;
            let rows = workspaces
                .iter()
                .map(|w| {
                    vec![
                        w.name.clone(),
                        w.app_group_id.clone(),
                        w.created_at.to_iso(),
                    ]
                })
                .collect::<Vec<_>>();
            print!("{}", table(&["NAME", "APP_GROUP_ID", "CREATED"], &rows));
        }
    }
    Ok(())
}

pub async fn keys(command: KeysCommand) -> anyhow::Result<()> {
    match command {
        KeysCommand::Create {
            location,
            workspace,
            permissions,
            name,
            allow_ip,
        } => {
            let settings = location.settings()?;
            let allow = IpAllowlist::parse_all(allow_ip.iter().map(String::as_str))
                .context("bad --allow-ip")?;
            let store = data::open_store(&settings, false).await?;
            let ws = find_workspace(
                store.as_ref(),
                &workspace,
                &settings.database.flags(&settings.data_dir),
            )
            .await?;
            let (secret, key) = data::mint_key(ws.id, &name, permissions, allow, data::now());
            let stored = store
                .create_api_key(key)
                .await
                .context("cannot store the key")?;
            println!("{}", secret.expose());
            eprintln!(
                "Created key {} (prefix {}) in workspace '{}' with {}. The secret above is shown only once.",
                stored.id,
                stored.prefix,
                ws.name,
                stored.permissions.to_list()
            );
        }
        KeysCommand::List {
            location,
            workspace,
        } => {
            let settings = location.settings()?;
            let store = data::open_store(&settings, false).await?;
            let ws = find_workspace(
                store.as_ref(),
                &workspace,
                &settings.database.flags(&settings.data_dir),
            )
            .await?;
            let keys = store
                .list_api_keys(ws.id)
                .await
                .context("cannot list keys")?;
            let rows = keys.iter().map(key_row).collect::<Vec<_>>();
            print!(
                "{}",
                table(
                    &[
                        "ID",
                        "PREFIX",
                        "NAME",
                        "PERMISSIONS",
                        "ALLOWED_IPS",
                        "CREATED",
                        "REVOKED"
                    ],
                    &rows
                )
            );
        }
        KeysCommand::Revoke {
            location,
            workspace,
            id_or_prefix,
        } => {
            let settings = location.settings()?;
            let store = data::open_store(&settings, false).await?;
            let ws = find_workspace(
                store.as_ref(),
                &workspace,
                &settings.database.flags(&settings.data_dir),
            )
            .await?;
            let revoked = store
                .revoke_api_key(ws.id, id_or_prefix.trim(), data::now())
                .await
                .context("cannot revoke the key")?;
            if !revoked {
                anyhow::bail!(
                    "no live key with id or prefix '{id_or_prefix}' in workspace '{}'; see `tideway keys list {} --workspace {}`",
                    ws.name,
                    settings.database.flags(&settings.data_dir),
                    ws.name
                );
            }
            eprintln!("Revoked key '{id_or_prefix}' of workspace '{}'.", ws.name);
        }
    }
    Ok(())
}

/// The workspace named `name`; an error naming the commands to list or create it (`flags`
/// names the database: `--data-dir DIR` or `--database-url URL`).
pub async fn find_workspace(
    store: &dyn Store,
    name: &str,
    flags: &str,
) -> anyhow::Result<Workspace> {
    store
        .workspace_by_name(name)
        .await
        .context("cannot read workspaces")?
        .ok_or_else(|| {
            anyhow::anyhow!(
                "no workspace named '{name}'; list them with `tideway workspaces list {flags}` \
             or create it with `tideway workspaces create {name} {flags}`"
            )
        })
}

fn key_row(key: &ApiKey) -> Vec<String> {
    let allow: Vec<String> = key.allow.entries().collect();
    vec![
        key.id.to_string(),
        key.prefix.clone(),
        if key.name.is_empty() {
            "-".to_owned()
        } else {
            key.name.clone()
        },
        key.permissions.to_list(),
        if allow.is_empty() {
            "any".to_owned()
        } else {
            allow.join(",")
        },
        Millis(key.created_at).to_iso(),
        key.revoked_at
            .map_or_else(|| "-".to_owned(), |at| Millis(at).to_iso()),
    ]
}

/// A plain left-aligned text table, columns separated by two spaces.
pub fn table(header: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = header.iter().map(|h| h.chars().count()).collect();
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let mut out = String::new();
    let header: Vec<String> = header.iter().map(|h| (*h).to_owned()).collect();
    for row in std::iter::once(&header).chain(rows) {
        let cells: Vec<String> = row
            .iter()
            .zip(&widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect();
        out.push_str(cells.join("  ").trim_end());
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn permissions_parse_with_helpful_errors() {
        assert_eq!(parse_permissions("all").unwrap(), PermissionSet::all());
        assert!(
            parse_permissions("users.track,users.identify")
                .unwrap()
                .contains(tideway_core::keys::Permission::UsersIdentify)
        );
        let err = parse_permissions("users.trak").unwrap_err();
        assert!(
            err.contains("users.trak") && err.contains("users.track"),
            "{err}"
        );
        assert!(
            parse_permissions(" , ")
                .unwrap_err()
                .contains("at least one")
        );
    }

    #[test]
    fn workspace_names_are_plain_and_never_look_like_an_app_group_id() {
        assert_eq!(check_workspace_name("acme"), Ok(()));
        assert_eq!(check_workspace_name("Acme EU (prod)"), Ok(()));
        for bad in [
            "",
            "line1\nline2",
            "a\tb",
            "3f859532-667d-433f-8463-c37c39d4a1b8",
            &"x".repeat(256),
        ] {
            assert!(check_workspace_name(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn tables_align_columns() {
        let t = table(&["A", "BB"], &[vec!["xxx".into(), "y".into()]]);
        assert_eq!(t, "A    BB\nxxx  y\n");
    }
}
