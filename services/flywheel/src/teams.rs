//! `flywheel teams`: a team's privacy, pooling, rate limits and upstream
//! budget settings.

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
        /// Tokens the team's jobs may spend on upstream models (teachers
        /// and judges) in any 30 days; `none`: no limit. A job that reaches
        /// it stops and says so.
        #[arg(long, value_parser = budget)]
        upstream_budget_tokens: Option<Budget>,
        /// Chat requests the team may send a minute, per gateway process;
        /// `none`: no limit. Past it: 429 with `retry-after`.
        #[arg(long, value_parser = per_minute)]
        requests_per_minute: Option<PerMinute>,
        /// Prompt and completion tokens the team may use a minute, per
        /// gateway process; `none`: no limit.
        #[arg(long, value_parser = per_minute)]
        tokens_per_minute: Option<PerMinute>,
    },
}

/// A rate limit, or none.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PerMinute(Option<u32>);

fn per_minute(s: &str) -> Result<PerMinute, String> {
    match s {
        "none" => Ok(PerMinute(None)),
        n => match n.parse::<u32>() {
            Ok(n) if n > 0 && n <= i32::MAX as u32 => Ok(PerMinute(Some(n))),
            _ => Err(format!("expected a number above 0, or none; not {n}")),
        },
    }
}

/// A budget in tokens, or none.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Budget(Option<i64>);

fn budget(s: &str) -> Result<Budget, String> {
    match s {
        "none" => Ok(Budget(None)),
        n => match n.parse::<i64>() {
            Ok(n) if n > 0 => Ok(Budget(Some(n))),
            _ => Err(format!(
                "expected a number of tokens above 0, or none; not {n}"
            )),
        },
    }
}

pub async fn run(pool: &PgPool, command: TeamsCommand) -> anyhow::Result<()> {
    let TeamsCommand::Set {
        team,
        store_text,
        share_for_training,
        upstream_budget_tokens,
        requests_per_minute,
        tokens_per_minute,
    } = command;
    if store_text.is_none()
        && share_for_training.is_none()
        && upstream_budget_tokens.is_none()
        && requests_per_minute.is_none()
        && tokens_per_minute.is_none()
    {
        anyhow::bail!(
            "nothing to set: give --store-text, --share-for-training, --requests-per-minute, \
             --tokens-per-minute or --upstream-budget-tokens"
        );
    }
    if requests_per_minute.is_some() || tokens_per_minute.is_some() {
        let (rpm, tpm) = (
            requests_per_minute.map(|p| p.0),
            tokens_per_minute.map(|p| p.0),
        );
        if !flywheel_store::keys::set_limits(pool, &team, rpm, tpm).await? {
            anyhow::bail!("no team named {team}");
        }
        let show = |n: Option<u32>| n.map_or("none".to_string(), |n| n.to_string());
        if let Some(n) = rpm {
            println!("team {team}: requests_per_minute = {}", show(n));
        }
        if let Some(n) = tpm {
            println!("team {team}: tokens_per_minute = {}", show(n));
        }
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
    if let Some(Budget(tokens)) = upstream_budget_tokens {
        if !flywheel_store::upstreams::set_budget(pool, &team, tokens).await? {
            anyhow::bail!("no team named {team}");
        }
        match tokens {
            Some(n) => println!(
                "team {team}: upstream_budget_tokens = {n} per {} days",
                flywheel_store::upstreams::BUDGET_DAYS
            ),
            None => println!("team {team}: upstream_budget_tokens = none"),
        }
    }
    Ok(())
}
