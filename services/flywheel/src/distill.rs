//! `flywheel distill`: a teacher (a model version: an upstream, or one
//! served here) answers a team's prompts, and its answers become the
//! team's next SFT dataset version ([`flywheel_jobs::distill`]).

use anyhow::Context;
use flywheel_curation::build::Message;
use flywheel_jobs::distill::{DistillJob, Prompts, Teacher};
use flywheel_store::PgPool;

use crate::Config;
use crate::models::{team_id, version};

#[derive(Debug, Clone, clap::Args)]
pub struct DistillArgs {
    #[arg(long)]
    pub team: String,
    /// The teacher: any model version (an upstream, or one served here).
    #[arg(long)]
    pub teacher: String,
    /// `log` (the team's logged requests, newest first) or a JSON Lines
    /// file of prompts, one `{"messages": [...]}` or `{"prompt": "..."}` a line.
    #[arg(long, default_value = "log")]
    pub prompts: String,
    /// Distinct prompts to ask at most.
    #[arg(long, default_value_t = 1000)]
    pub limit: usize,
    /// The longest answer asked for.
    #[arg(long, default_value_t = 512)]
    pub max_tokens: usize,
    /// Stop asking once the teacher has spent this many tokens.
    #[arg(long)]
    pub budget_tokens: Option<u64>,
    /// Prompts in flight at once.
    #[arg(long, default_value_t = 8)]
    pub concurrency: usize,
}

pub async fn run(cfg: &Config, pool: &PgPool, args: DistillArgs) -> anyhow::Result<()> {
    let team = team_id(pool, &args.team).await?;
    let v = version(pool, &args.teacher).await?;
    usable_by_team(pool, &v, team).await?;
    let teacher = model(cfg, pool, &v).await?;
    let prompts = match args.prompts.as_str() {
        "log" => Prompts::Log,
        path => Prompts::Given {
            origin: format!("file:{path}"),
            prompts: read_prompts(std::path::Path::new(path))?,
        },
    };
    let job = DistillJob {
        team,
        prompts,
        limit: args.limit,
        max_tokens: args.max_tokens,
        budget_tokens: args.budget_tokens,
        concurrency: args.concurrency,
        eval_fraction: cfg.jobs.curation_rules.eval_fraction,
        cycle: None,
    };
    let o = flywheel_jobs::distill::run(pool, &job, &teacher, &v, |done, total| {
        eprintln!("{} answered {done} of {total} prompts", v.name);
    })
    .await?;
    let Some(number) = o.version else {
        anyhow::bail!(
            "no dataset version: {} of {} prompts answered ({} failed, {} read, {} without text, {} dropped as deleted)",
            o.answered,
            o.asked,
            o.failed,
            o.prompts_read,
            o.without_text,
            o.deleted_meanwhile
        );
    };
    println!(
        "{}@{number}: {} SFT examples from {} ({} prompts read, {} duplicates, {} without text, {} asked, {} failed, {} cut at --max-tokens, {} dropped as deleted{}; {} teacher tokens, {:.0} s)",
        args.team,
        o.examples,
        v.name,
        o.prompts_read,
        o.duplicates,
        o.without_text,
        o.asked,
        o.failed,
        o.truncated,
        o.deleted_meanwhile,
        if o.stopped_by_team_budget {
            ", stopped at the team's upstream budget"
        } else if o.stopped_by_budget {
            ", stopped at the token budget"
        } else {
            ""
        },
        o.teacher_tokens,
        o.seconds
    );
    Ok(())
}

/// Refuses a model the team may not use (another team's candidate, or a
/// pooled one when the team does not pool): its prompts go only where its
/// own requests may.
pub async fn usable_by_team(
    pool: &PgPool,
    v: &flywheel_store::models::ModelVersion,
    team: uuid::Uuid,
) -> anyhow::Result<()> {
    let pools = flywheel_store::keys::team_shares(pool, team).await?;
    if !v.usable_by(team, pools) {
        anyhow::bail!("{} is not a model this team may use", v.name);
    }
    Ok(())
}

/// `v` as a model to ask: its upstream, or an engine on its file.
pub async fn model(
    cfg: &Config,
    pool: &PgPool,
    v: &flywheel_store::models::ModelVersion,
) -> anyhow::Result<Teacher> {
    if !v.is_upstream() {
        eprintln!("loading {}", v.name);
    }
    Teacher::of(
        pool,
        &crate::bootstrap::versions(cfg, pool),
        &cfg.gateway.http.upstream,
        v,
    )
    .await
}

/// One prompt a line: `{"messages": [{"role", "content"}, ...]}` or
/// `{"prompt": "text"}` (a user message).
fn read_prompts(path: &std::path::Path) -> anyhow::Result<Vec<Vec<Message>>> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let mut out = Vec::new();
    for (n, line) in text
        .lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
    {
        let at = || format!("{} line {}", path.display(), n + 1);
        let v: serde_json::Value = serde_json::from_str(line).with_context(at)?;
        let prompt = match (v.get("messages"), v.get("prompt").and_then(|p| p.as_str())) {
            (Some(m), _) => serde_json::from_value::<Vec<Message>>(m.clone()).with_context(at)?,
            (None, Some(p)) => vec![Message {
                role: "user".into(),
                content: p.to_string(),
            }],
            (None, None) => anyhow::bail!("{}: expected \"messages\" or \"prompt\"", at()),
        };
        if prompt.is_empty() {
            anyhow::bail!("{}: no messages", at());
        }
        out.push(prompt);
    }
    Ok(out)
}
