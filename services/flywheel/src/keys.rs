//! `flywheel keys`: API keys for teams (created, listed by prefix, given
//! scopes, revoked).

use flywheel_store::keys::{Scope, parse_scopes, scope_list};

/// Scopes as given on the command line (`chat,feedback`), parsed whole.
#[derive(Debug, Clone)]
pub struct Scopes(Vec<Scope>);

fn scopes(s: &str) -> Result<Scopes, String> {
    parse_scopes(s).map(Scopes)
}

#[derive(Debug, Clone, clap::Subcommand)]
pub enum KeysCommand {
    /// Create a key for a team (created if new); the key is the last line printed.
    Create {
        #[arg(long)]
        team: String,
        /// What the key may do, comma-separated: chat (chat completions),
        /// feedback (votes), read (logged completions), delete (an end
        /// user's data), admin (the dashboard's JSON API as an admin, every
        /// team). Default: the first four.
        #[arg(long, value_parser = scopes)]
        scopes: Option<Scopes>,
    },
    /// Set what a live key (by id or prefix) may do, e.g. `chat,feedback`;
    /// running gateways apply it from the key's next request.
    Scopes {
        key: String,
        #[arg(value_parser = scopes)]
        scopes: Scopes,
    },
    /// List keys (prefixes only; secrets are never stored).
    List {
        #[arg(long)]
        team: Option<String>,
        /// One JSON object per key, a line each.
        #[arg(long)]
        json: bool,
    },
    /// Revoke a key by id or prefix.
    Revoke { key: String },
}

pub async fn run(pool: &flywheel_store::PgPool, command: KeysCommand) -> anyhow::Result<()> {
    use flywheel_store::keys;
    match command {
        KeysCommand::Create { team, scopes } => {
            let scopes = scopes.map_or(Scope::DEFAULT.to_vec(), |Scopes(s)| s);
            let (info, secret) = keys::create_key_with(pool, &team, &scopes).await?;
            println!(
                "created key {} ({}) for team {}, scopes {}",
                info.id,
                info.prefix,
                info.team,
                scope_list(&scopes)
            );
            println!("{secret}");
        }
        KeysCommand::Scopes {
            key,
            scopes: Scopes(scopes),
        } => match keys::set_scopes(pool, &key, &scopes).await? {
            0 => anyhow::bail!("no active key matches {key}"),
            n => println!("key {key}: scopes {} ({n} key(s))", scope_list(&scopes)),
        },
        KeysCommand::List { team, json: true } => {
            for k in keys::list_keys(pool, team.as_deref()).await? {
                println!("{}", serde_json::to_string(&k)?);
            }
        }
        KeysCommand::List { team, json: false } => {
            println!(
                "{:<36}  {:<16}  {:<12}  {:<26}  {:<20}  status",
                "id", "team", "prefix", "scopes", "created"
            );
            for k in keys::list_keys(pool, team.as_deref()).await? {
                let status = match k.revoked_at {
                    Some(t) => format!("revoked {}", t.format("%Y-%m-%d %H:%M")),
                    None => "active".into(),
                };
                println!(
                    "{:<36}  {:<16}  {:<12}  {:<26}  {:<20}  {status}",
                    k.id,
                    k.team,
                    k.prefix,
                    k.scopes.join(","),
                    k.created_at.format("%Y-%m-%d %H:%M:%S")
                );
            }
        }
        KeysCommand::Revoke { key } => match keys::revoke_key(pool, &key).await? {
            0 => anyhow::bail!("no active key matches {key}"),
            n => println!("revoked {n} key(s)"),
        },
    }
    Ok(())
}
