//! A judge at work: a model asked which of two answers to a request is
//! better, every pair in both orders ([`flywheel_eval::judge`]), within a
//! token budget.
//!
//! Checked first, against the team's own end users: on the preference pairs
//! of the candidate's dataset version (its train split: the answers users
//! chose and rejected), how often does it pick the users' answer? Only a
//! judge whose agreement clears its bar is asked about the evaluation's
//! held-out prompts (the candidate's answer against the champion's, a
//! different set from the one it was checked on), and the gate counts its
//! verdicts weighted by that agreement ([`flywheel_eval::gate::with_judge`]).

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

use flywheel_curation::build::{DpoPair, Message};
use flywheel_eval::judge::{self, Agreement, PairVerdict, Verdict};
use flywheel_eval::run::{ItemOutput, Metric};
use flywheel_store::PgPool;
use flywheel_store::evals::Evaluation;
use futures::StreamExt;
use serde::{Deserialize, Serialize};

use crate::distill::Teacher;

/// Pairs of the dataset a judge is checked on, at most.
pub const CHECK_PAIRS: usize = 200;

/// Tokens a judge may answer with (a verdict is a word).
const VERDICT_TOKENS: usize = 32;

/// Why a judge's asking stopped before every question was answered.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum Stopped {
    #[error("stopped at its budget of {budget} tokens ({spent} spent)")]
    Budget { budget: u64, spent: u64 },
    #[error("stopped at the team's upstream budget ({left} tokens were left; {spent} spent)")]
    TeamBudget { left: u64, spent: u64 },
    #[error("failed {failed} of {asked} questions (unreachable or erring)")]
    Failing { failed: usize, asked: usize },
}

/// Asks one judge, counting what it costs.
pub struct Asking<'a> {
    pub teacher: &'a Teacher,
    /// With `{question}`, `{first}` and `{second}`.
    pub template: &'a str,
    /// Tokens it may spend in all (prompt and answer, as it reports them):
    /// the lower of its own budget and its team's.
    budget: Option<u64>,
    /// The team's budget is the lower.
    team_binds: bool,
    pub concurrency: usize,
    spent: AtomicU64,
    asked: AtomicUsize,
    failed: AtomicUsize,
}

/// A request, as the judge's prompt shows it: each message on its own line
/// after its role.
pub fn question(prompt: &[Message]) -> String {
    prompt
        .iter()
        .map(|m| format!("{}: {}", m.role, m.content))
        .collect::<Vec<_>>()
        .join("\n")
}

impl<'a> Asking<'a> {
    /// `budget` is the judge's own for this job, `team_left` what its team
    /// may still spend on it ([`crate::distill::team_allowance`]).
    pub fn new(
        teacher: &'a Teacher,
        template: &'a str,
        budget: Option<u64>,
        team_left: Option<u64>,
        concurrency: usize,
    ) -> Self {
        let (budget, team_binds) = crate::distill::binding_budget(budget, team_left);
        Self {
            teacher,
            template,
            budget,
            team_binds,
            concurrency: concurrency.max(1),
            spent: AtomicU64::new(0),
            asked: AtomicUsize::new(0),
            failed: AtomicUsize::new(0),
        }
    }

    /// Tokens spent so far.
    pub fn spent(&self) -> u64 {
        self.spent.load(Ordering::Relaxed)
    }

    /// Questions asked so far.
    pub fn asked(&self) -> usize {
        self.asked.load(Ordering::Relaxed)
    }

    fn over_budget(&self) -> bool {
        self.budget.is_some_and(|b| self.spent() >= b)
    }

    async fn ask(&self, text: String) -> Verdict {
        if self.over_budget() {
            return Verdict::Unreadable;
        }
        self.asked.fetch_add(1, Ordering::Relaxed);
        let question = [Message {
            role: "user".into(),
            content: text,
        }];
        match self.teacher.answer(&question, VERDICT_TOKENS).await {
            Ok(a) => {
                self.spent.fetch_add(a.tokens, Ordering::Relaxed);
                judge::parse(&a.text)
            }
            Err(e) => {
                tracing::warn!(error = %format!("{e:#}"), "the judge did not answer");
                self.failed.fetch_add(1, Ordering::Relaxed);
                Verdict::Unreadable
            }
        }
    }

    /// The verdict on each `(question, x, y)`, asked with `x` first and
    /// with `x` second ([`judge::combine`]: `Chosen` is `x`), in order, and
    /// every reply. `progress` hears how many are done of how many.
    pub async fn pairs(
        &self,
        items: &[(String, String, String)],
        progress: impl Fn(usize, usize),
    ) -> Result<(Vec<PairVerdict>, Vec<Verdict>), Stopped> {
        let total = items.len();
        // This call's questions only: one `Asking` serves the check and then
        // the held-out prompts.
        let (asked_before, failed_before) = (self.asked(), self.failed.load(Ordering::Relaxed));
        // Owned prompts: a future that borrows its item from the closure's
        // argument is not `Send` for every lifetime, as the worker needs.
        let prompts: Vec<(String, String)> = items
            .iter()
            .map(|(q, x, y)| {
                (
                    judge::prompt(self.template, q, x, y),
                    judge::prompt(self.template, q, y, x),
                )
            })
            .collect();
        let mut asked = futures::stream::iter(prompts)
            .map(|(first, second)| async move { (self.ask(first).await, self.ask(second).await) })
            .buffered(self.concurrency);
        let (mut verdicts, mut replies) = (Vec::with_capacity(total), Vec::new());
        while let Some((first, second)) = asked.next().await {
            replies.extend([first, second]);
            verdicts.push(judge::combine(first, second));
            if verdicts.len() % 20 == 0 || verdicts.len() == total {
                progress(verdicts.len(), total);
            }
        }
        drop(asked);
        let asked = self.asked() - asked_before;
        if let Some(budget) = self.budget
            && self.spent() >= budget
            && asked < 2 * total
        {
            let spent = self.spent();
            return Err(match self.team_binds {
                true => Stopped::TeamBudget {
                    left: budget,
                    spent,
                },
                false => Stopped::Budget { budget, spent },
            });
        }
        // A judge that could not be reached is not a judge that disagrees.
        let failed = self.failed.load(Ordering::Relaxed) - failed_before;
        if 2 * failed > asked {
            return Err(Stopped::Failing { failed, asked });
        }
        Ok((verdicts, replies))
    }

    /// The judge's agreement with the users' choices on `pairs`.
    pub async fn check(
        &self,
        pairs: &[DpoPair],
        bar: f64,
        progress: impl Fn(usize, usize),
    ) -> Result<Agreement, Stopped> {
        let items: Vec<_> = pairs
            .iter()
            .map(|p| (question(&p.prompt), p.chosen.clone(), p.rejected.clone()))
            .collect();
        let (verdicts, replies) = self.pairs(&items, progress).await?;
        Ok(judge::agreement(&verdicts, &replies, bar))
    }
}

/// What the team's judge did in an evaluation, kept with it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct InEvaluation {
    /// The judge's model version.
    pub judge: String,
    /// Its check against the team's users (`None`: it was not checked).
    pub check: Option<Agreement>,
    /// What each of its verdicts counted in the gate (0: ignored).
    pub weight: f64,
    /// Why, in words.
    pub reason: String,
    /// Its verdicts on the held-out prompts, when it was asked them.
    pub verdicts: Option<Tally>,
    /// Questions asked and tokens spent, check included.
    pub questions: usize,
    pub tokens: u64,
}

/// How its verdicts on the held-out prompts fell.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Tally {
    pub prompts: usize,
    pub candidate: usize,
    pub champion: usize,
    pub ties: usize,
    pub inconsistent: usize,
}

/// The held-out prompts both models answered in the evaluation
/// (corrections and liked answers) differently, as `(question, candidate's
/// answer, champion's answer)`.
fn held_out_answers(items: &[ItemOutput]) -> Vec<(String, String, String)> {
    let of = |model: &str, suite: &str, item: &str| {
        items
            .iter()
            .find(|i| i.model == model && i.suite == suite && i.item == item)
    };
    items
        .iter()
        .filter(|i| {
            i.model == "candidate"
                && matches!(i.suite.as_str(), "heldout-corrections" | "heldout-liked")
        })
        .filter_map(|c| {
            let h = of("champion", &c.suite, &c.item)?;
            // The same answer from both: nothing to judge.
            if c.output.trim() == h.output.trim() {
                return None;
            }
            let prompt: Vec<Message> = serde_json::from_value(c.prompt.clone()).ok()?;
            Some((question(&prompt), c.output.clone(), h.output.clone()))
        })
        .collect()
}

/// The team's judge in evaluation `e`, given the answers both models gave
/// (`items`): `None` when the team has none; else what it did, and its
/// verdicts' metric when it was trusted and asked.
pub async fn in_evaluation(
    pool: &PgPool,
    versions: &flywheel_modelhub::Versions,
    upstream: &flywheel_upstream::Settings,
    concurrency: usize,
    e: &Evaluation,
    items: &[ItemOutput],
) -> anyhow::Result<Option<(InEvaluation, Option<Metric>)>> {
    let Some(team) = e.team_id else {
        return Ok(None);
    };
    let Some(j) = flywheel_store::judges::get(pool, team).await? else {
        return Ok(None);
    };
    let Some(v) = flywheel_store::models::get(pool, j.model_version_id).await? else {
        return Ok(None);
    };
    let report = InEvaluation {
        judge: v.name.clone(),
        check: None,
        weight: 0.0,
        reason: String::new(),
        verdicts: None,
        questions: 0,
        tokens: 0,
    };
    let not_asked = |mut report: InEvaluation, why: String| {
        report.reason = why;
        Ok(Some((report, None)))
    };
    let dataset = match e.dataset_version_id {
        Some(d) => flywheel_store::datasets::get(pool, d).await?,
        None => None,
    };
    let Some(dataset) = dataset else {
        return not_asked(
            report,
            "not asked: the evaluation has no dataset version whose users' choices it could be checked on".into(),
        );
    };
    // Only the team's own users' words go to the team's judge.
    if dataset.team_id != Some(team) {
        return not_asked(
            report,
            "not asked: the evaluation's dataset version is not the team's own".into(),
        );
    }
    // A judge grading answers it taught would vouch for itself.
    if dataset.manifest["distilled"]["teacher"].as_str() == Some(v.name.as_str()) {
        return not_asked(
            report,
            format!(
                "not asked: {} taught this dataset's distilled answers, and would judge its own student",
                v.name
            ),
        );
    }
    // Their words go to no judge once an end user in it had their data deleted.
    if dataset.user_data_deleted_at.is_some() {
        return not_asked(
            report,
            "not asked: the dataset version holds data of an end user who had it deleted".into(),
        );
    }
    if !v.usable_by(team, flywheel_store::keys::team_shares(pool, team).await?) {
        return not_asked(
            report,
            format!("not asked: {} is not a model this team may use", v.name),
        );
    }
    let pairs: Vec<DpoPair> =
        match flywheel_store::datasets::examples(pool, dataset.id, "dpo", Some("train"))
            .await?
            .into_iter()
            .take(CHECK_PAIRS)
            .map(|(_, e)| serde_json::from_value(e))
            .collect::<Result<_, _>>()
        {
            Ok(pairs) => pairs,
            Err(err) => {
                return not_asked(
                    report,
                    format!("not asked: a preference pair of the dataset could not be read: {err}"),
                );
            }
        };
    if pairs.is_empty() {
        return not_asked(
            report,
            "not asked: the dataset version's train split holds no preference pairs to check it on"
                .into(),
        );
    }
    let team_left = match crate::distill::team_allowance(pool, team, &v).await {
        Ok(left) => left,
        Err(err) => return not_asked(report, format!("not asked: {err:#}")),
    };
    let teacher = match Teacher::of(pool, versions, upstream, &v).await {
        Ok(t) => t,
        Err(err) => {
            return not_asked(
                report,
                format!("not asked: it could not be loaded: {err:#}"),
            );
        }
    };
    let asking = Asking::new(
        &teacher,
        &j.prompt,
        j.budget_tokens.map(|b| b as u64),
        team_left,
        concurrency,
    );
    let report = judged(pool, dataset.id, &asking, &v, &j, &pairs, items, report).await;
    // The spend is kept; failing to keep it does not undo the judging.
    if let Err(err) = crate::distill::record_spend(
        pool,
        team,
        &v,
        flywheel_store::upstreams::Purpose::Judge,
        report.0.questions as u64,
        report.0.tokens,
    )
    .await
    {
        tracing::warn!(error = %format!("{err:#}"), judge = %v.name, "the judge's spend was not recorded");
    }
    Ok(Some(report))
}

/// The judge checked on `pairs` and, if trusted, asked about the held-out
/// answers in `items`.
#[allow(clippy::too_many_arguments)]
async fn judged(
    pool: &PgPool,
    dataset: uuid::Uuid,
    asking: &Asking<'_>,
    v: &flywheel_store::models::ModelVersion,
    j: &flywheel_store::judges::Judge,
    pairs: &[DpoPair],
    items: &[ItemOutput],
    mut report: InEvaluation,
) -> (InEvaluation, Option<Metric>) {
    let name = v.name.clone();
    let said = |what: &'static str| {
        let name = name.clone();
        move |done: usize, of: usize| tracing::info!(judge = %name, "{what}: {done} of {of}")
    };
    let checked = asking
        .check(pairs, j.bar, said("checking against the users' choices"))
        .await;
    let finish = |mut report: InEvaluation, metric: Option<Metric>| {
        report.questions = asking.asked();
        report.tokens = asking.spent();
        (report, metric)
    };
    let agreement = match checked {
        Ok(a) => a,
        Err(stopped) => {
            report.reason = format!("ignored: its check {stopped}");
            return finish(report, None);
        }
    };
    report.reason = agreement.reason.clone();
    report.check = Some(agreement.clone());
    if !agreement.trusted {
        return finish(report, None);
    }
    // An end user in the dataset may have had their data deleted while the
    // judge was checked: their held-out prompts then go to it no more.
    let marked = flywheel_store::datasets::get(pool, dataset)
        .await
        .map(|d| d.is_none_or(|d| d.user_data_deleted_at.is_some()));
    if !matches!(marked, Ok(false)) {
        report.reason = format!(
            "{}; not asked about the held-out prompts: an end user in the dataset had their data deleted meanwhile",
            agreement.reason
        );
        return finish(report, None);
    }
    let answers = held_out_answers(items);
    if answers.is_empty() {
        report.reason = format!("{}; no held-out prompt to judge", agreement.reason);
        return finish(report, None);
    }
    match asking
        .pairs(&answers, said("judging the candidate against the champion"))
        .await
    {
        Ok((verdicts, _)) => {
            let count = |v: PairVerdict| verdicts.iter().filter(|&&x| x == v).count();
            report.verdicts = Some(Tally {
                prompts: verdicts.len(),
                candidate: count(PairVerdict::Chosen),
                champion: count(PairVerdict::Rejected),
                ties: count(PairVerdict::Tie),
                inconsistent: count(PairVerdict::Inconsistent),
            });
            report.weight = agreement.weight();
            finish(report, Some(judge::preference(&verdicts)))
        }
        Err(stopped) => {
            report.reason = format!(
                "{}; ignored: judging the held-out prompts {stopped}",
                agreement.reason
            );
            finish(report, None)
        }
    }
}
