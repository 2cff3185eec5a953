//! One evaluation: the candidate against the champion per metric, with the
//! difference's confidence interval and the gate's reasons, and every
//! example side by side (task and retention suites alike).

use std::collections::BTreeMap;

use askama::Template;
use axum::extract::{Path, State};
use axum::response::Html;
use flywheel_store::evals::{Evaluation, Metric};
use uuid::Uuid;

use crate::AdminState;
use crate::auth::Signed;
use crate::error::AdminError;
use crate::pages::{Chrome, maybe_when, when};

/// One example: the prompt and each side's answer.
pub struct SideBySide {
    pub suite: String,
    pub item: String,
    pub prompt: String,
    pub candidate: String,
    pub candidate_passed: String,
    pub champion: String,
    pub champion_passed: String,
    /// The two answers differ.
    pub differs: bool,
    /// The two answers word by word: kept, only the candidate's (`ins`),
    /// only the champion's (`del`).
    pub candidate_diff: Vec<Piece>,
    pub champion_diff: Vec<Piece>,
}

/// A run of words of one answer, and whether the other answer has them.
#[derive(Debug, Clone, PartialEq)]
pub struct Piece {
    pub text: String,
    /// Not in the other answer.
    pub changed: bool,
}

/// Word-level difference of two answers (longest common subsequence over
/// whitespace-separated words, whitespace kept with its word): each side
/// as runs of kept and changed words.
pub fn word_diff(a: &str, b: &str) -> (Vec<Piece>, Vec<Piece>) {
    fn words(s: &str) -> Vec<&str> {
        s.split_inclusive(char::is_whitespace).collect()
    }
    let (wa, wb) = (words(a), words(b));
    let (n, m) = (wa.len(), wb.len());
    // Answers are a few dozen words: the quadratic table is small.
    let mut lcs = vec![vec![0u16; m + 1]; n + 1];
    for i in (0..n).rev() {
        for j in (0..m).rev() {
            lcs[i][j] = if wa[i].trim_end() == wb[j].trim_end() {
                lcs[i + 1][j + 1] + 1
            } else {
                lcs[i + 1][j].max(lcs[i][j + 1])
            };
        }
    }
    let push = |side: &mut Vec<Piece>, w: &str, changed: bool| match side.last_mut() {
        Some(p) if p.changed == changed => p.text.push_str(w),
        _ => side.push(Piece {
            text: w.to_string(),
            changed,
        }),
    };
    let (mut da, mut db) = (Vec::new(), Vec::new());
    let (mut i, mut j) = (0, 0);
    while i < n || j < m {
        if i < n && j < m && wa[i].trim_end() == wb[j].trim_end() {
            push(&mut da, wa[i], false);
            push(&mut db, wb[j], false);
            i += 1;
            j += 1;
        } else if j == m || (i < n && lcs[i + 1][j] >= lcs[i][j + 1]) {
            push(&mut da, wa[i], true);
            i += 1;
        } else {
            push(&mut db, wb[j], true);
            j += 1;
        }
    }
    (da, db)
}

/// The team's judge in an evaluation, as the page shows it: each row a
/// label and a value.
pub struct JudgeView {
    pub name: String,
    /// Counted in the gate, or ignored.
    pub counted: bool,
    pub reason: String,
    pub rows: Vec<(String, String)>,
}

/// Reads what the evaluation kept of its judge (`flywheel_jobs::judge::InEvaluation`).
fn judge_view(j: &serde_json::Value) -> JudgeView {
    let pct = |v: &serde_json::Value| {
        v.as_f64()
            .map_or_else(|| "-".to_string(), |x| format!("{:.0}%", 100.0 * x))
    };
    let mut rows = Vec::new();
    let check = &j["check"];
    if check.is_object() {
        rows.push((
            "Checked on the users' preference pairs".into(),
            format!(
                "{} pairs: the users' choice {}, the other {}, tie {}, inconsistent across the two orders {}",
                check["pairs"], check["chosen"], check["rejected"], check["ties"], check["inconsistent"]
            ),
        ));
        rows.push((
            "Agreement with the users".into(),
            format!(
                "{} (95% interval {} to {}), bar {}",
                pct(&check["agreement"]),
                pct(&check["agreement_low"]),
                pct(&check["agreement_high"]),
                pct(&check["bar"])
            ),
        ));
        rows.push((
            "Picked the answer shown first".into(),
            format!(
                "{} of its picks; replies with no verdict: {}",
                pct(&check["first_position_share"]),
                check["unreadable"]
            ),
        ));
    }
    let weight = j["weight"].as_f64().unwrap_or(0.0);
    rows.push(("Weight in the gate".into(), format!("{weight:.2}")));
    let v = &j["verdicts"];
    if v.is_object() {
        rows.push((
            "Verdicts on the held-out prompts".into(),
            format!(
                "{} prompts: the candidate's answer {}, the champion's {}, tie {}, inconsistent {}",
                v["prompts"], v["candidate"], v["champion"], v["ties"], v["inconsistent"]
            ),
        ));
    }
    rows.push((
        "Cost".into(),
        format!("{} questions, {} tokens", j["questions"], j["tokens"]),
    ));
    JudgeView {
        name: j["judge"].as_str().unwrap_or("?").to_string(),
        counted: weight > 0.0,
        reason: j["reason"].as_str().unwrap_or_default().to_string(),
        rows,
    }
}

#[derive(Template)]
#[template(path = "evaluation.html")]
struct EvaluationPage {
    chrome: Chrome,
    e: Evaluation,
    candidate: String,
    champion: String,
    verdict: String,
    reasons: Vec<String>,
    metrics: Vec<Metric>,
    examples: Vec<SideBySide>,
    judge: Option<JudgeView>,
    created: String,
    finished: String,
}

impl EvaluationPage {
    fn fmt(&self, v: &f64) -> String {
        format!("{v:.3}")
    }
}

fn passed(p: Option<bool>) -> String {
    match p {
        Some(true) => "pass".into(),
        Some(false) => "fail".into(),
        None => "-".into(),
    }
}

fn prompt_text(v: &serde_json::Value) -> String {
    match v.as_array() {
        Some(ms) => ms
            .iter()
            .map(|m| {
                let content = m["content"]
                    .as_str()
                    .map_or_else(|| m["content"].to_string(), str::to_string);
                format!("{}: {content}", m["role"].as_str().unwrap_or("?"))
            })
            .collect::<Vec<_>>()
            .join("\n"),
        None => v.to_string(),
    }
}

pub async fn one(
    State(state): State<AdminState>,
    signed: Signed,
    Path(id): Path<Uuid>,
) -> Result<Html<String>, AdminError> {
    let pool = &state.pool;
    let e = flywheel_store::evals::get(pool, id)
        .await?
        .ok_or_else(|| AdminError::not_found(format!("no evaluation has the id {id}")))?;
    let name = |v: Option<flywheel_store::models::ModelVersion>, id: Uuid| {
        v.map_or_else(|| id.to_string(), |v| v.name)
    };
    let candidate = name(
        flywheel_store::models::get(pool, e.candidate_version_id).await?,
        e.candidate_version_id,
    );
    let champion = name(
        flywheel_store::models::get(pool, e.champion_version_id).await?,
        e.champion_version_id,
    );
    let mut pairs: BTreeMap<(String, String), SideBySide> = BTreeMap::new();
    for item in flywheel_store::evals::items(pool, id, None).await? {
        let entry = pairs
            .entry((item.suite.clone(), item.item.clone()))
            .or_insert_with(|| SideBySide {
                suite: item.suite.clone(),
                item: item.item.clone(),
                prompt: prompt_text(&item.prompt),
                candidate: String::new(),
                candidate_passed: "-".into(),
                champion: String::new(),
                champion_passed: "-".into(),
                differs: false,
                candidate_diff: Vec::new(),
                champion_diff: Vec::new(),
            });
        if item.model_version_id == e.candidate_version_id {
            entry.candidate = item.output;
            entry.candidate_passed = passed(item.passed);
        } else {
            entry.champion = item.output;
            entry.champion_passed = passed(item.passed);
        }
    }
    let examples = pairs
        .into_values()
        .map(|mut s| {
            s.differs = s.candidate != s.champion;
            (s.candidate_diff, s.champion_diff) = word_diff(&s.candidate, &s.champion);
            s
        })
        .collect();
    let reasons = e
        .reasons
        .as_ref()
        .and_then(|r| r.as_array())
        .map(|rs| {
            rs.iter()
                .map(|r| r.as_str().map_or_else(|| r.to_string(), str::to_string))
                .collect()
        })
        .unwrap_or_default();
    let page = EvaluationPage {
        chrome: Chrome::new(&signed, "evaluations"),
        verdict: match e.passed {
            Some(true) => "passed the gate".into(),
            Some(false) => "failed the gate".into(),
            None => e.status.clone(),
        },
        metrics: flywheel_store::evals::metrics(pool, id).await?,
        created: when(&e.created_at),
        finished: maybe_when(&e.finished_at),
        candidate,
        champion,
        reasons,
        examples,
        judge: e.judge.as_ref().map(judge_view),
        e,
    };
    Ok(Html(page.render()?))
}

pub struct EvaluationRow {
    pub e: Evaluation,
    pub team: String,
    pub candidate: String,
    pub champion: String,
    pub verdict: String,
    pub created: String,
}

#[derive(Template)]
#[template(path = "evaluations.html")]
struct ListPage {
    chrome: Chrome,
    rows: Vec<EvaluationRow>,
}

pub async fn list(
    State(state): State<AdminState>,
    signed: Signed,
) -> Result<Html<String>, AdminError> {
    let pool = &state.pool;
    let names: std::collections::HashMap<Uuid, String> = flywheel_store::models::list(pool)
        .await?
        .into_iter()
        .map(|m| (m.id, m.name))
        .collect();
    let teams: std::collections::HashMap<Uuid, String> = flywheel_store::dashboard::teams(pool)
        .await?
        .into_iter()
        .map(|t| (t.id, t.name))
        .collect();
    let name = |id: &Uuid| names.get(id).cloned().unwrap_or_else(|| id.to_string());
    let rows = flywheel_store::evals::list(pool, None, 200)
        .await?
        .into_iter()
        .map(|e| EvaluationRow {
            team: e
                .team_id
                .and_then(|t| teams.get(&t).cloned())
                .unwrap_or_else(|| "-".into()),
            candidate: name(&e.candidate_version_id),
            champion: name(&e.champion_version_id),
            verdict: match e.passed {
                Some(true) => "passed".into(),
                Some(false) => "failed".into(),
                None => e.status.clone(),
            },
            created: when(&e.created_at),
            e,
        })
        .collect();
    let page = ListPage {
        chrome: Chrome::new(&signed, "evaluations"),
        rows,
    };
    Ok(Html(page.render()?))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn marked(p: &[Piece]) -> String {
        p.iter()
            .map(|p| {
                if p.changed {
                    format!("[{}]", p.text)
                } else {
                    p.text.clone()
                }
            })
            .collect()
    }

    #[test]
    fn the_diff_marks_only_the_words_that_differ() {
        let (a, b) = word_diff(
            "The capital of Nepal is Kathi Nepal.",
            "The capital of Nepal is Kathmandu.",
        );
        assert_eq!(marked(&a), "The capital of Nepal is [Kathi Nepal.]");
        assert_eq!(marked(&b), "The capital of Nepal is [Kathmandu.]");
        let (a, b) = word_diff("same words", "same words");
        assert_eq!(
            (marked(&a), marked(&b)),
            ("same words".into(), "same words".into())
        );
        let (a, b) = word_diff("", "all new");
        assert_eq!(
            (marked(&a), marked(&b)),
            (String::new(), "[all new]".into())
        );
    }
}
