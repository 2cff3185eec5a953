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
        #[arg(long, value_parser = or_none(i64::MAX))]
        upstream_budget_tokens: Option<OrNone>,
        /// Chat requests the team may send a minute, per gateway process;
        /// `none`: no limit. Past it: 429 with `retry-after`.
        #[arg(long, value_parser = or_none(i32::MAX.into()))]
        requests_per_minute: Option<OrNone>,
        /// Prompt and completion tokens the team may use a minute, per
        /// gateway process; `none`: no limit.
        #[arg(long, value_parser = or_none(i32::MAX.into()))]
        tokens_per_minute: Option<OrNone>,
    },
}

/// A number above 0, or `none` (no limit).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct OrNone(Option<i64>);

/// Parses an [`OrNone`] of at most `max`.
fn or_none(max: i64) -> impl Fn(&str) -> Result<OrNone, String> + Clone + Send + Sync + 'static {
    move |s| match s {
        "none" => Ok(OrNone(None)),
        n => match n.parse::<i64>() {
            Ok(n) if n > 0 && n <= max => Ok(OrNone(Some(n))),
            _ => Err(format!(
                "expected a number above 0 (at most {max}), or none; not {n}"
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
            // Bounded by i32::MAX when parsed.
            requests_per_minute.map(|p| p.0.map(|n| n as u32)),
            tokens_per_minute.map(|p| p.0.map(|n| n as u32)),
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
    if let Some(OrNone(tokens)) = upstream_budget_tokens {
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
