//! `flywheel keys`: API keys for teams (created, listed by prefix, revoked).

#[derive(Debug, Clone, clap::Subcommand)]
pub enum KeysCommand {
    /// Create a key for a team (created if new); the key is the last line printed.
    Create {
        #[arg(long)]
        team: String,
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
        KeysCommand::Create { team } => {
            let (info, secret) = keys::create_key(pool, &team).await?;
            println!(
                "created key {} ({}) for team {}",
                info.id, info.prefix, info.team
            );
            println!("{secret}");
        }
        KeysCommand::List { team, json: true } => {
            for k in keys::list_keys(pool, team.as_deref()).await? {
                println!("{}", serde_json::to_string(&k)?);
            }
        }
        KeysCommand::List { team, json: false } => {
            println!(
                "{:<36}  {:<16}  {:<12}  {:<20}  status",
                "id", "team", "prefix", "created"
            );
            for k in keys::list_keys(pool, team.as_deref()).await? {
                let status = match k.revoked_at {
                    Some(t) => format!("revoked {}", t.format("%Y-%m-%d %H:%M")),
                    None => "active".into(),
                };
                println!(
                    "{:<36}  {:<16}  {:<12}  {:<20}  {status}",
                    k.id,
                    k.team,
                    k.prefix,
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
