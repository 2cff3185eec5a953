//! `flywheel judges`: a team's judge. `check` asks whether a model version
//! is a judge the team's users would agree with, on the preference pairs
//! of a dataset version (the answers the users chose and rejected), each in
//! both orders ([`flywheel_eval::judge`]); `add` makes it the team's judge,
//! which every evaluation of the team's candidates checks the same way and,
//! if the users vouch for it, asks about the held-out answers
//! ([`flywheel_jobs::judge`]).

use anyhow::Context;
use flywheel_curation::build::DpoPair;
use flywheel_eval::judge;
use flywheel_jobs::judge::Asking;
use flywheel_store::PgPool;

use crate::Config;

#[derive(Debug, Clone, clap::Subcommand)]
pub enum JudgesCommand {
    /// Make a model version the team's judge in its evaluations (replacing
    /// the one it had). Each evaluation checks it against the users' own
    /// choices first; its verdicts count only when its agreement clears the
    /// bar, weighted by it.
    Add {
        /// The judge: any model version the team may use.
        version: String,
        #[arg(long)]
        team: String,
        /// The judge's prompt, with `{question}`, `{first}` and `{second}`
        /// (default: a built-in one asking for A, B or tie).
        #[arg(long)]
        prompt: Option<std::path::PathBuf>,
        /// The lower bound of its agreement's 95% interval must be above this.
        #[arg(long, default_value_t = 0.6)]
        bar: f64,
        /// Tokens one evaluation may spend asking it; reached, its verdicts
        /// are ignored and the evaluation says so.
        #[arg(long)]
        budget_tokens: Option<u64>,
    },
    /// The teams' judges.
    List,
    /// The team has no judge any more.
    Remove {
        #[arg(long)]
        team: String,
    },
    /// Measure a judge's agreement with the users' own choices on a dataset
    /// version's preference pairs; exits 3 when it is not to be trusted.
    Check {
        /// The judge: any model version (an upstream, or one served here).
        #[arg(long)]
        judge: String,
        /// The dataset version whose pairs to use (id, TEAM@N).
        #[arg(long)]
        dataset: String,
        /// The judge's prompt, with `{question}`, `{first}` and `{second}`
        /// (default: a built-in one asking for A, B or tie).
        #[arg(long)]
        prompt: Option<std::path::PathBuf>,
        /// Pairs at most.
        #[arg(long, default_value_t = 200)]
        limit: usize,
        /// The lower bound of its agreement's 95% interval must be above this.
        #[arg(long, default_value_t = 0.6)]
        bar: f64,
        /// Questions in flight at once.
        #[arg(long, default_value_t = 8)]
        concurrency: usize,
        /// The report as one JSON object.
        #[arg(long)]
        json: bool,
    },
}

pub async fn run(cfg: &Config, pool: &PgPool, command: JudgesCommand) -> anyhow::Result<()> {
    match command {
        JudgesCommand::Add {
            version,
            team,
            prompt,
            bar,
            budget_tokens,
        } => {
            check_bar(bar)?;
            let template = template(prompt.as_deref())?;
            let team_id = crate::models::team_id(pool, &team).await?;
            let v = crate::models::version(pool, &version).await?;
            crate::distill::usable_by_team(pool, &v, team_id).await?;
            let budget = match budget_tokens {
                Some(0) => anyhow::bail!("--budget-tokens must be above 0"),
                Some(b) => Some(i64::try_from(b).context("--budget-tokens is too large")?),
                None => None,
            };
            flywheel_store::judges::set(pool, team_id, v.id, &template, bar, budget).await?;
            println!(
                "{} judges {team}'s candidates from now on, once each evaluation has checked it against {team}'s users (bar {bar})",
                v.name
            );
            Ok(())
        }
        JudgesCommand::List => {
            let judges = flywheel_store::judges::list(pool).await?;
            if judges.is_empty() {
                println!("no team has a judge (flywheel judges add VERSION --team TEAM)");
            }
            for j in judges {
                let budget = j.budget_tokens.map_or("no budget".to_string(), |b| {
                    format!("{b} tokens per evaluation")
                });
                println!("{}\t{}\tbar {}\t{budget}", j.team, j.version, j.bar);
            }
            Ok(())
        }
        JudgesCommand::Remove { team } => {
            let team_id = crate::models::team_id(pool, &team).await?;
            if !flywheel_store::judges::remove(pool, team_id).await? {
                anyhow::bail!("{team} has no judge");
            }
            println!("{team} has no judge now");
            Ok(())
        }
        JudgesCommand::Check {
            judge: name,
            dataset,
            prompt,
            limit,
            bar,
            concurrency,
            json,
        } => {
            check_bar(bar)?;
            let template = template(prompt.as_deref())?;
            check(
                cfg,
                pool,
                &name,
                &dataset,
                &template,
                limit,
                bar,
                concurrency,
                json,
            )
            .await
        }
    }
}

fn check_bar(bar: f64) -> anyhow::Result<()> {
    if !(0.5..1.0).contains(&bar) {
        anyhow::bail!("--bar must be from 0.5 (chance) to below 1, not {bar}");
    }
    Ok(())
}

/// The judge's prompt: the file's, or the built-in one.
fn template(prompt: Option<&std::path::Path>) -> anyhow::Result<String> {
    let template = match prompt {
        Some(p) => {
            std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))?
        }
        None => judge::DEFAULT_PROMPT.to_string(),
    };
    for place in ["{question}", "{first}", "{second}"] {
        if !template.contains(place) {
            anyhow::bail!("the judge's prompt has no {place}");
        }
    }
    Ok(template)
}

#[allow(clippy::too_many_arguments)]
async fn check(
    cfg: &Config,
    pool: &PgPool,
    name: &str,
    dataset: &str,
    template: &str,
    limit: usize,
    bar: f64,
    concurrency: usize,
    json: bool,
) -> anyhow::Result<()> {
    let version = crate::datasets::resolve(pool, dataset).await?;
    // Pooled feedback was shared for training, not for a judge elsewhere.
    if version.team_id.is_none() {
        anyhow::bail!(
            "{dataset} pools several teams' feedback: check a judge on one team's dataset version"
        );
    }
    // A version keeps its examples when an end user's data is deleted
    // (it is marked): their words are not sent to a judge.
    if let Some(at) = version.user_data_deleted_at {
        anyhow::bail!(
            "{dataset} holds data of an end user who had it deleted ({}): build a new dataset version and check the judge on that",
            at.format("%Y-%m-%d %H:%M UTC")
        );
    }
    let pairs: Vec<DpoPair> = flywheel_store::datasets::examples(pool, version.id, "dpo", None)
        .await?
        .into_iter()
        .take(limit)
        .map(|(_, e)| serde_json::from_value(e))
        .collect::<Result<_, _>>()
        .context("reading the dataset's preference pairs")?;
    if pairs.is_empty() {
        anyhow::bail!(
            "{dataset} holds no preference pairs (the users' chosen and rejected answers) to check a judge on"
        );
    }
    let v = crate::models::version(pool, name).await?;
    // The team's own pairs go only to a model the team may use.
    if let Some(team) = version.team_id {
        crate::distill::usable_by_team(pool, &v, team).await?;
    }
    // What the team may still spend on an upstream judge.
    let team_left = match version.team_id {
        Some(team) => flywheel_jobs::distill::team_allowance(pool, team, &v).await?,
        None => None,
    };
    let model = crate::distill::model(cfg, pool, &v).await?;
    let asking = Asking::new(&model, template, None, team_left, concurrency);
    let checked = asking
        .check(&pairs, bar, |done, of| {
            eprintln!("{name}: judged {done} of {of} pairs")
        })
        .await;
    if let Some(team) = version.team_id {
        flywheel_jobs::distill::record_spend(
            pool,
            team,
            &v,
            flywheel_store::upstreams::Purpose::Judge,
            asking.asked() as u64,
            asking.spent(),
        )
        .await?;
    }
    let a = checked
        .map_err(|stopped| anyhow::anyhow!("{name} {stopped}: no verdict on it as a judge"))?;
    if json {
        println!(
            "{}",
            serde_json::json!({"judge": name, "dataset": dataset, "report": a,
                               "questions": asking.asked(), "tokens": asking.spent()})
        );
    } else {
        println!("{name} on {dataset}: {}", a.reason);
        println!(
            "pairs {}: users' choice {}, the other {}, tie {}, inconsistent across orders {}; replies with no verdict {}",
            a.pairs, a.chosen, a.rejected, a.ties, a.inconsistent, a.unreadable
        );
    }
    if !a.trusted {
        return Err(crate::exit::DecidedNo(format!(
            "{name} is not to be trusted as a judge of {dataset}'s users"
        ))
        .into());
    }
    Ok(())
}
