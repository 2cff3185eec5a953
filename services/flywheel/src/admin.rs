//! `flywheel admin`: the dashboard's accounts. Passwords come from stdin or
//! `FLYWHEEL_ADMIN_PASSWORD`, never from a flag (flags end up in shell
//! history and `ps`).

use std::io::BufRead;

use anyhow::Context;
use flywheel_store::PgPool;

#[derive(Debug, Clone, clap::Subcommand)]
pub enum AdminCommand {
    /// Make an account (or set an existing one's password and role).
    Create {
        username: String,
        /// `admin` may act (promote, roll back); `viewer` only looks.
        #[arg(long, default_value = "admin")]
        role: String,
        /// Read the password from the first line of stdin (otherwise
        /// from FLYWHEEL_ADMIN_PASSWORD).
        #[arg(long)]
        password_stdin: bool,
    },
    /// The accounts.
    List {
        /// One JSON object per account (never a password hash), a line each.
        #[arg(long)]
        json: bool,
    },
}

/// Passwords shorter than this are refused.
const MIN_PASSWORD: usize = 10;

pub async fn run(pool: &PgPool, command: AdminCommand) -> anyhow::Result<()> {
    match command {
        AdminCommand::Create {
            username,
            role,
            password_stdin,
        } => {
            flywheel_store::admins::check_role(&role)?;
            let username = username.trim().to_string();
            if username.is_empty() || username.len() > 64 {
                anyhow::bail!("the username must be 1 to 64 characters");
            }
            let password = if password_stdin {
                let mut line = String::new();
                std::io::stdin()
                    .lock()
                    .read_line(&mut line)
                    .context("reading the password from stdin")?;
                line.trim_end_matches(['\r', '\n']).to_string()
            } else {
                std::env::var("FLYWHEEL_ADMIN_PASSWORD").map_err(|_| {
                    anyhow::anyhow!("give the password on stdin (--password-stdin) or in FLYWHEEL_ADMIN_PASSWORD")
                })?
            };
            if password.chars().count() < MIN_PASSWORD {
                anyhow::bail!("the password must have at least {MIN_PASSWORD} characters");
            }
            let hash =
                tokio::task::spawn_blocking(move || flywheel_admin::hash_password(&password))
                    .await??;
            let a = flywheel_store::admins::upsert(pool, &username, &hash, &role).await?;
            println!("account {} ({}) can sign in at /admin", a.username, a.role);
        }
        AdminCommand::List { json: true } => {
            for a in flywheel_store::admins::list(pool).await? {
                println!("{}", serde_json::to_string(&a)?);
            }
        }
        AdminCommand::List { json: false } => {
            println!(
                "{:<24}  {:<7}  {:<6}  created",
                "username", "role", "locked"
            );
            for a in flywheel_store::admins::list(pool).await? {
                let locked = a.locked_until.is_some_and(|u| u > chrono::Utc::now());
                println!(
                    "{:<24}  {:<7}  {:<6}  {}",
                    a.username,
                    a.role,
                    if locked { "yes" } else { "no" },
                    a.created_at.format("%Y-%m-%d %H:%M")
                );
            }
        }
    }
    Ok(())
}
