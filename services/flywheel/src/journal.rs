//! `flywheel journal`: the records the gateway's journal set aside because
//! Postgres refused them (dead letters), listed and replayed after a fix.

use flywheel_gateway::journal::{DeadLetters, dead_letter};
use flywheel_store::PgPool;

#[derive(Debug, Clone, clap::Subcommand)]
pub enum JournalCommand {
    /// Records set aside: when, what, and why Postgres refused them.
    DeadLetters {
        /// Print each record in full, as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Store set-aside records again (all, or the ids given), oldest first;
    /// each one stored leaves the folder, each one refused again stays.
    Replay { ids: Vec<String> },
}

pub async fn run(
    cfg: &crate::Config,
    command: JournalCommand,
    pool: Option<PgPool>,
) -> anyhow::Result<()> {
    let letters = DeadLetters::new(&cfg.journal.dir);
    match command {
        JournalCommand::DeadLetters { json } => {
            let all = letters.list()?;
            if json {
                for l in &all {
                    let mut v = serde_json::to_value(l)?;
                    v["id"] = l.id.clone().into();
                    println!("{v}");
                }
                return Ok(());
            }
            if all.is_empty() {
                println!("no records are set aside in {}", letters.dir().display());
                return Ok(());
            }
            println!("{:<40}  {:<52}  {:<6}  reason", "id", "record", "code");
            for l in &all {
                println!(
                    "{:<40}  {:<52}  {:<6}  {}",
                    l.id,
                    l.what(),
                    l.code.as_deref().unwrap_or(""),
                    l.reason
                );
            }
            println!("{} record(s) in {}", all.len(), letters.dir().display());
        }
        JournalCommand::Replay { ids } => {
            let pool = pool.ok_or_else(|| anyhow::anyhow!("replay needs DATABASE_URL"))?;
            let done = dead_letter::replay(&letters, &pool, &ids).await?;
            println!(
                "stored {} record(s); {} still refused (see `flywheel journal dead-letters`)",
                done.stored, done.still_refused
            );
        }
    }
    Ok(())
}
