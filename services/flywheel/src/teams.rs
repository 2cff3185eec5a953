//! `flywheel teams`: a team's privacy and pooling settings.

use flywheel_store::PgPool;

#[derive(Debug, Clone, clap::Subcommand)]
pub enum TeamsCommand {
    /// Change a team's settings.
    Set {
        team: String,
        /// Store message text (`false`: hashes and counts only).
        #[arg(long, action = clap::ArgAction::Set)]
        store_text: Option<bool>,
        /// Let this team's feedback go into datasets shared across teams.
        #[arg(long, action = clap::ArgAction::Set)]
        share_for_training: Option<bool>,
    },
}

pub async fn run(pool: &PgPool, command: TeamsCommand) -> anyhow::Result<()> {
    let TeamsCommand::Set {
        team,
        store_text,
        share_for_training,
    } = command;
    if store_text.is_none() && share_for_training.is_none() {
        anyhow::bail!("nothing to set: give --store-text and/or --share-for-training");
    }
    if let Some(v) = store_text {
        if !flywheel_store::keys::set_store_text(pool, &team, v).await? {
            anyhow::bail!("no team named {team}");
        }
        println!("team {team}: store_text = {v}");
    }
    if let Some(v) = share_for_training {
        if !flywheel_store::keys::set_share_for_training(pool, &team, v).await? {
            anyhow::bail!("no team named {team}");
        }
        println!("team {team}: share_for_training = {v}");
    }
    Ok(())
}
