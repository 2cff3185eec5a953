//! `flywheel judges check`: is a model version a judge the team's users
//! would agree with? Asked about the preference pairs of a dataset version
//! (the answers the users chose and rejected), each in both orders
//! ([`flywheel_eval::judge`]).

use anyhow::Context;
use flywheel_curation::build::DpoPair;
use flywheel_eval::judge::{self, Verdict};
use flywheel_store::PgPool;
use futures::StreamExt;

use crate::Config;

#[derive(Debug, Clone, clap::Subcommand)]
pub enum JudgesCommand {
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
    let JudgesCommand::Check {
        judge: name,
        dataset,
        prompt,
        limit,
        bar,
        concurrency,
        json,
    } = command;
    if !(0.0..1.0).contains(&bar) {
        anyhow::bail!("--bar must be from 0 to below 1, not {bar}");
    }
    let template = match &prompt {
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
    let version = crate::datasets::resolve(pool, &dataset).await?;
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
    let v = crate::models::version(pool, &name).await?;
    // The team's own pairs go only to a model the team may use.
    if let Some(team) = version.team_id {
        crate::distill::usable_by_team(pool, &v, team).await?;
    }
    let model = crate::distill::model(cfg, pool, &v).await?;
    let errors = std::sync::atomic::AtomicUsize::new(0);
    let ask = |text: String| {
        let (model, errors) = (&model, &errors);
        async move {
            let question = [flywheel_curation::build::Message {
                role: "user".into(),
                content: text,
            }];
            match model.answer(&question, 32).await {
                Ok(a) => judge::parse(&a.text),
                Err(e) => {
                    tracing::warn!(error = %format!("{e:#}"), "the judge did not answer");
                    errors.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    Verdict::Unreadable
                }
            }
        }
    };
    let total = pairs.len();
    let mut asked = futures::stream::iter(pairs.iter().enumerate())
        .map(|(i, p)| {
            let question = p
                .prompt
                .iter()
                .map(|m| format!("{}: {}", m.role, m.content))
                .collect::<Vec<_>>()
                .join("\n");
            let chosen_first = judge::prompt(&template, &question, &p.chosen, &p.rejected);
            let chosen_second = judge::prompt(&template, &question, &p.rejected, &p.chosen);
            async move { (i, ask(chosen_first).await, ask(chosen_second).await) }
        })
        .buffer_unordered(concurrency.max(1));
    let (mut verdicts, mut replies) = (Vec::with_capacity(total), Vec::with_capacity(2 * total));
    while let Some((_, first, second)) = asked.next().await {
        replies.extend([first, second]);
        verdicts.push(judge::combine(first, second));
        if verdicts.len() % 20 == 0 || verdicts.len() == total {
            eprintln!("{name}: judged {} of {total} pairs", verdicts.len());
        }
    }
    drop(asked);
    // A judge that could not be reached is not a judge that disagrees.
    let errors = errors.into_inner();
    if 2 * errors > replies.len() {
        anyhow::bail!(
            "{name} failed {errors} of {} questions: no verdict on it as a judge",
            replies.len()
        );
    }
    let a = judge::agreement(&verdicts, &replies, bar);
    if json {
        println!(
            "{}",
            serde_json::json!({"judge": name, "dataset": dataset, "report": a, "errors": errors})
        );
    } else {
        println!("{name} on {dataset}: {}", a.reason);
        println!(
            "pairs {}: users' choice {}, the other {}, tie {}, inconsistent across orders {}, questions failed {errors}",
            a.pairs, a.chosen, a.rejected, a.ties, a.inconsistent
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
