//! `tideway partners …`: the operator's side of partner cohort import — partner API keys,
//! per-workspace data import keys (several valid at once, so rotation needs no downtime),
//! enabling a partner, and the Heap segment-sync webhook secret.
//!
//! Commands that create a secret print only the secret on stdout, so scripts can capture it.

use anyhow::{Context, bail};
use tideway_core::cohorts::{PARTNERS, partner};
use tideway_core::ids::AliasLabel;
use tideway_core::keys::Secret;

use crate::admin::{Location, find_workspace, table};
use crate::data;

#[derive(Debug, clap::Subcommand)]
pub enum PartnersCommand {
    /// List the technology partners Tideway knows
    List,
    /// Print a partner's partner_api_key (created on first use; the same key afterwards)
    ApiKey {
        #[command(flatten)]
        location: Location,
        #[arg(long, default_value = "heap")]
        partner: String,
    },
    /// Create a new data import key for a workspace and partner; prints only the key
    ImportKey {
        #[command(flatten)]
        location: Location,
        #[arg(long)]
        workspace: String,
        #[arg(long, default_value = "heap")]
        partner: String,
    },
    /// List a workspace's data import keys for a partner (never the secrets)
    ImportKeys {
        #[command(flatten)]
        location: Location,
        #[arg(long)]
        workspace: String,
        #[arg(long, default_value = "heap")]
        partner: String,
    },
    /// Invalidate a data import key at once (by id or prefix)
    InvalidateImportKey {
        #[command(flatten)]
        location: Location,
        #[arg(long)]
        workspace: String,
        #[arg(long, default_value = "heap")]
        partner: String,
        id_or_prefix: String,
    },
    /// Allow cohort import from a partner for a workspace (creating an import key does this too)
    Enable {
        #[command(flatten)]
        location: Location,
        #[arg(long)]
        workspace: String,
        #[arg(long, default_value = "heap")]
        partner: String,
    },
    /// Refuse cohort import from a partner for a workspace (keys stay; imports get 401, Heap's
    /// segment sync 403)
    Disable {
        #[command(flatten)]
        location: Location,
        #[arg(long)]
        workspace: String,
        #[arg(long, default_value = "heap")]
        partner: String,
    },
    /// Print the workspace's Heap segment-sync webhook secret (created on first use), optionally
    /// setting how Heap's user ids map to Tideway users
    HeapWebhookSecret {
        #[command(flatten)]
        location: Location,
        #[arg(long)]
        workspace: String,
        /// Treat Heap's ids as alias names under this alias label
        #[arg(long, value_name = "LABEL", conflicts_with = "match_external_id")]
        match_alias_label: Option<String>,
        /// Treat Heap's ids as external ids (the default)
        #[arg(long)]
        match_external_id: bool,
    },
}

fn known_partner(slug: &str) -> anyhow::Result<&str> {
    match partner(slug) {
        Some(p) => Ok(p.slug),
        None => {
            let known: Vec<&str> = PARTNERS.iter().map(|p| p.slug).collect();
            bail!(
                "unknown partner '{slug}'; known partners: {}",
                known.join(", ")
            )
        }
    }
}

/// A fresh random secret shaped like Braze's keys (a hyphenated UUID v4).
fn fresh_key() -> Secret {
    Secret::new(uuid::Uuid::new_v4().hyphenated().to_string())
}

pub async fn run(command: PartnersCommand) -> anyhow::Result<()> {
    match command {
        PartnersCommand::List => {
            let rows: Vec<Vec<String>> = PARTNERS
                .iter()
                .map(|p| {
                    vec![
                        p.slug.to_owned(),
                        p.display_name.to_owned(),
                        p.filter_name.to_owned(),
                    ]
                })
                .collect();
            print!("{}", table(&["partner", "name", "segment filter"], &rows));
        }
        PartnersCommand::ApiKey { location, partner } => {
            let slug = known_partner(&partner)?;
            let (store, _) = location.open_store().await?;
            let key = store
                .partner_api_key(slug, fresh_key(), data::now())
                .await
                .context("cannot read the partner API key")?;
            println!("{}", key.expose());
        }
        PartnersCommand::ImportKey {
            location,
            workspace,
            partner,
        } => {
            let slug = known_partner(&partner)?;
            let (store, flags) = location.open_store().await?;
            let ws = find_workspace(store.as_ref(), &workspace, &flags).await?;
            let secret = fresh_key();
            store
                .create_import_key(ws.id, slug, &secret, data::now())
                .await
                .context("cannot store the import key")?;
            println!("{}", secret.expose());
        }
        PartnersCommand::ImportKeys {
            location,
            workspace,
            partner,
        } => {
            let slug = known_partner(&partner)?;
            let (store, flags) = location.open_store().await?;
            let ws = find_workspace(store.as_ref(), &workspace, &flags).await?;
            let keys = store
                .list_import_keys(ws.id, slug)
                .await
                .context("cannot list import keys")?;
            let rows: Vec<Vec<String>> = keys
                .iter()
                .map(|k| {
                    vec![
                        k.id.to_string(),
                        k.prefix.clone(),
                        k.created_at.to_iso(),
                        k.invalidated_at.map_or_else(
                            || "valid".to_owned(),
                            |at| format!("invalidated {}", at.to_iso()),
                        ),
                    ]
                })
                .collect();
            print!("{}", table(&["id", "prefix", "created", "status"], &rows));
        }
        PartnersCommand::InvalidateImportKey {
            location,
            workspace,
            partner,
            id_or_prefix,
        } => {
            let slug = known_partner(&partner)?;
            let (store, flags) = location.open_store().await?;
            let ws = find_workspace(store.as_ref(), &workspace, &flags).await?;
            if !store
                .invalidate_import_key(ws.id, slug, &id_or_prefix, data::now())
                .await
                .context("cannot invalidate the key")?
            {
                bail!(
                    "no valid {slug} import key '{id_or_prefix}' in workspace '{workspace}'; list them with `tideway partners import-keys --workspace {workspace} --partner {slug}`"
                );
            }
            eprintln!("Invalidated import key '{id_or_prefix}'.");
        }
        PartnersCommand::Enable {
            location,
            workspace,
            partner,
        } => set_enabled(location, &workspace, &partner, true).await?,
        PartnersCommand::Disable {
            location,
            workspace,
            partner,
        } => set_enabled(location, &workspace, &partner, false).await?,
        PartnersCommand::HeapWebhookSecret {
            location,
            workspace,
            match_alias_label,
            match_external_id,
        } => {
            let (store, flags) = location.open_store().await?;
            let ws = find_workspace(store.as_ref(), &workspace, &flags).await?;
            let mapping = match (match_alias_label, match_external_id) {
                (Some(label), _) => Some(Some(
                    AliasLabel::parse(&label)
                        .map_err(|e| anyhow::anyhow!("--match-alias-label: {e}"))?,
                )),
                (None, true) => Some(None),
                (None, false) => None,
            };
            let fresh = Secret::new(format!(
                "{}{}",
                uuid::Uuid::new_v4().simple(),
                uuid::Uuid::new_v4().simple()
            ));
            let hook = store
                .heap_webhook(ws.id, fresh, mapping)
                .await
                .context("cannot read the webhook settings")?;
            println!("{}", hook.secret.expose());
        }
    }
    Ok(())
}

async fn set_enabled(
    location: Location,
    workspace: &str,
    partner: &str,
    enabled: bool,
) -> anyhow::Result<()> {
    let slug = known_partner(partner)?;
    let (store, flags) = location.open_store().await?;
    let ws = find_workspace(store.as_ref(), workspace, &flags).await?;
    store
        .set_partner_enabled(ws.id, slug, enabled)
        .await
        .context("cannot change the partner setting")?;
    eprintln!(
        "{} {slug} for workspace '{workspace}'.",
        if enabled { "Enabled" } else { "Disabled" }
    );
    Ok(())
}
