//! `tideway users …`: the dashboard's users (roles `admin` and `read_only`), on the database
//! directly like `tideway keys`. A password is generated (and printed once on stdout) unless
//! `--password-stdin` gives one; the store keeps only its argon2id hash.

use std::io::{BufRead, Write};

use anyhow::Context;
use tideway_core::dashboard::{PasswordHash, Role, Username};
use tideway_core::store::{Store, StoreError};

use crate::admin::{Location, table};
use crate::data;

#[derive(Debug, clap::Subcommand)]
pub enum UsersCommand {
    /// Create a dashboard user; prints the generated password (unless --password-stdin)
    Create {
        /// Username: letters, digits, '.', '_', '-', '@' (up to 64)
        username: String,
        /// admin (every change) or read_only (sees every page, changes nothing)
        #[arg(long, default_value = "admin", value_parser = parse_role)]
        role: Role,
        /// Read the password (12 to 256 characters) from the first line of stdin instead of
        /// generating one
        #[arg(long)]
        password_stdin: bool,
        #[command(flatten)]
        location: Location,
    },
    /// Set a new password (ends the user's sessions); prints it unless --password-stdin
    ResetPassword {
        username: String,
        /// Read the password from the first line of stdin instead of generating one
        #[arg(long)]
        password_stdin: bool,
        #[command(flatten)]
        location: Location,
    },
    /// List the dashboard's users: username, role, created
    List {
        #[command(flatten)]
        location: Location,
    },
}

fn parse_role(raw: &str) -> Result<Role, String> {
    Role::parse(raw).map_err(|e| e.to_string())
}

/// A generated password: 24 characters of an unambiguous alphabet (about 138 bits).
pub fn generate_password() -> anyhow::Result<String> {
    const ALPHABET: &[u8] = b"abcdefghjkmnpqrstuvwxyzABCDEFGHJKLMNPQRSTUVWXYZ23456789";
    let mut bytes = [0u8; 24];
    getrandom::fill(&mut bytes).map_err(|e| anyhow::anyhow!("cannot draw a password: {e}"))?;
    // 256 % 55 leaves a small bias; acceptable at this length.
    Ok(bytes
        .iter()
        .map(|b| char::from(ALPHABET[usize::from(*b) % ALPHABET.len()]))
        .collect())
}

/// A password hash with a fresh salt.
pub fn hash(password: &str) -> anyhow::Result<PasswordHash> {
    let mut salt = [0u8; 16];
    getrandom::fill(&mut salt).map_err(|e| anyhow::anyhow!("cannot draw a salt: {e}"))?;
    PasswordHash::new(password, salt).map_err(|e| anyhow::anyhow!("{e}"))
}

/// The password to set: the first line of stdin, or a generated one (to print).
fn password(from_stdin: bool) -> anyhow::Result<(String, bool)> {
    if !from_stdin {
        return Ok((generate_password()?, true));
    }
    let mut line = String::new();
    std::io::stdin()
        .lock()
        .read_line(&mut line)
        .context("cannot read the password from stdin")?;
    Ok((line.trim_end_matches(['\r', '\n']).to_owned(), false))
}

/// Creates the dashboard user `admin` with a generated password when there is no dashboard
/// user at all (the first start); returns the password to show, or `None`.
pub async fn bootstrap_admin(store: &dyn Store) -> anyhow::Result<Option<String>> {
    if !store
        .list_dashboard_users()
        .await
        .context("cannot list dashboard users")?
        .is_empty()
    {
        return Ok(None);
    }
    let password = generate_password()?;
    let name = Username::parse("admin").map_err(|e| anyhow::anyhow!("{e}"))?;
    match store
        .create_dashboard_user(&name, Role::Admin, &hash(&password)?, data::now())
        .await
    {
        Ok(_) => Ok(Some(password)),
        // Another node on the same database made it at the same moment; it printed its own.
        Err(StoreError::Conflict(_)) => Ok(None),
        Err(e) => Err(e).context("cannot create the dashboard user 'admin'"),
    }
}

pub async fn run(command: UsersCommand) -> anyhow::Result<()> {
    match command {
        UsersCommand::Create {
            username,
            role,
            password_stdin,
            location,
        } => {
            let name = Username::parse(&username).map_err(|e| anyhow::anyhow!("{e}"))?;
            let (password, generated) = password(password_stdin)?;
            let hashed = hash(&password)?;
            let (store, flags) = location.open_store().await?;
            match store
                .create_dashboard_user(&name, role, &hashed, data::now())
                .await
            {
                Ok(_) => {}
                Err(StoreError::Conflict(_)) => anyhow::bail!(
                    "a dashboard user '{name}' exists; set a new password with `tideway users reset-password {name} {flags}`"
                ),
                Err(e) => return Err(e).context("cannot create the dashboard user"),
            }
            if generated {
                println!("{password}");
            }
            eprintln!(
                "Created dashboard user '{name}' ({}).{}",
                role.as_str(),
                if generated {
                    " The password above is shown only once."
                } else {
                    ""
                }
            );
        }
        UsersCommand::ResetPassword {
            username,
            password_stdin,
            location,
        } => {
            let name = Username::parse(&username).map_err(|e| anyhow::anyhow!("{e}"))?;
            let (password, generated) = password(password_stdin)?;
            let hashed = hash(&password)?;
            let (store, flags) = location.open_store().await?;
            if !store
                .set_dashboard_password(&name, &hashed)
                .await
                .context("cannot set the password")?
            {
                anyhow::bail!(
                    "no dashboard user '{name}'; list them with `tideway users list {flags}`"
                );
            }
            if generated {
                println!("{password}");
            }
            eprintln!("New password set for '{name}'; their sessions have ended.");
        }
        UsersCommand::List { location } => {
            let (store, _) = location.open_store().await?;
            let users = store
                .list_dashboard_users()
                .await
                .context("cannot list dashboard users")?;
            let rows: Vec<Vec<String>> = users
                .iter()
                .map(|u| {
                    vec![
                        u.username.to_string(),
                        u.role.as_str().to_owned(),
                        u.created_at.to_iso(),
                    ]
                })
                .collect();
            let mut out = std::io::stdout().lock();
            write!(out, "{}", table(&["USERNAME", "ROLE", "CREATED"], &rows))?;
        }
    }
    Ok(())
}
