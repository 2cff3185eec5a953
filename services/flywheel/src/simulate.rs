//! `flywheel simulate SCENARIO`: a team's task played through the public
//! API as its users would. Each cycle sends the scenario's traffic as chats,
//! has simulated end users vote on every answer by the scenario's checks
//! (some honest, some noisy, some voting against everyone or always up) and
//! attach the right answer as a correction to some down votes; before the
//! first cycle and after each, the held-out messages (never sent as traffic,
//! never rated) are scored. The file format: `scenarios/README.md`.

use std::collections::BTreeMap;
use std::time::Instant;

use anyhow::{Context, bail};
use flywheel_eval::Check;
use futures::StreamExt;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

/// A scenario file.
#[derive(Debug, Clone, Deserialize)]
pub struct Scenario {
    pub name: String,
    #[serde(default)]
    pub description: String,
    pub team: String,
    pub system: String,
    #[serde(default)]
    pub response_format: Option<Value>,
    pub max_tokens: u32,
    #[serde(default)]
    pub temperature: f32,
    pub cycles: usize,
    pub chats_per_cycle: usize,
    pub correction_probability: f64,
    pub raters: Vec<Rater>,
    pub users_per_rater: usize,
    /// Share of chats a second simulated user (drawn like the first) also
    /// rates, as a reviewer would: what lets curation compare raters.
    #[serde(default)]
    pub second_rater_share: f64,
    pub traffic: Vec<Item>,
    pub heldout: Vec<Item>,
    /// Seeds who rates what (default 0).
    #[serde(default)]
    pub seed: u64,
}

#[derive(Debug, Clone, Deserialize)]
pub struct Rater {
    pub name: String,
    pub share: f64,
    pub behaviour: Behaviour,
    #[serde(default)]
    pub flip_probability: f64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Behaviour {
    /// Up exactly when the checks pass.
    Honest,
    /// Honest, then flipped with `flip_probability`.
    Noisy,
    /// The opposite of honest.
    Inverted,
    /// Up whatever the answer.
    AlwaysUp,
}

#[derive(Debug, Clone, Deserialize)]
pub struct Item {
    pub user: String,
    pub answer: String,
    pub checks: Vec<Check>,
}

impl Item {
    pub fn right(&self, reply: &str) -> bool {
        self.checks.iter().all(|c| c.passes(reply))
    }
}

impl Scenario {
    pub fn load(path: &std::path::Path) -> anyhow::Result<Self> {
        let text =
            std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        let s: Self = serde_json::from_str(&text)
            .with_context(|| format!("{} is not a scenario file", path.display()))?;
        s.validate()?;
        Ok(s)
    }

    fn validate(&self) -> anyhow::Result<()> {
        let shares: f64 = self.raters.iter().map(|r| r.share).sum();
        if self.raters.is_empty() || (shares - 1.0).abs() > 1e-6 {
            bail!("the raters' shares must sum to 1 (they sum to {shares})");
        }
        if self.users_per_rater == 0 {
            bail!("users_per_rater must be at least 1");
        }
        if self.traffic.len() < self.cycles * self.chats_per_cycle {
            bail!(
                "{} cycles of {} chats need {} traffic items; the file has {}",
                self.cycles,
                self.chats_per_cycle,
                self.cycles * self.chats_per_cycle,
                self.traffic.len()
            );
        }
        if !(0.0..=1.0).contains(&self.correction_probability) {
            bail!("correction_probability must be in [0, 1]");
        }
        if !(0.0..=1.0).contains(&self.second_rater_share) {
            bail!("second_rater_share must be in [0, 1]");
        }
        for (i, item) in self.traffic.iter().chain(&self.heldout).enumerate() {
            for c in &item.checks {
                c.validate().map_err(|e| anyhow::anyhow!("item {i}: {e}"))?;
            }
            if !item.right(&item.answer) {
                bail!("item {i}: its own answer fails its checks");
            }
        }
        Ok(())
    }

    /// The traffic items cycle `k` (from 0) sends.
    pub fn traffic_of(&self, k: usize) -> &[Item] {
        &self.traffic[k * self.chats_per_cycle..(k + 1) * self.chats_per_cycle]
    }
}

/// Where and how to play it.
#[derive(Debug, Clone)]
pub struct Target {
    /// The gateway, e.g. `http://127.0.0.1:8080`.
    pub url: String,
    pub key: String,
    /// Send the scenario's `response_format` (constrained decoding).
    pub structured: bool,
    /// Chats in flight at once.
    pub concurrency: usize,
}

/// One cycle's traffic, as sent and rated.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Traffic {
    pub chats: usize,
    pub right: usize,
    pub up: usize,
    pub down: usize,
    pub corrections: usize,
    /// Votes by second raters (counted in `up`, `down`, `corrections` too).
    pub second_votes: usize,
    pub failed: usize,
    pub seconds: f64,
}

/// A held-out score.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Score {
    pub items: usize,
    pub right: usize,
    /// Requests answered by each version (`system_fingerprint`).
    pub served_by: BTreeMap<String, usize>,
    pub failed: usize,
    pub seconds: f64,
}

impl Score {
    pub fn rate(&self) -> f64 {
        if self.items == 0 {
            0.0
        } else {
            self.right as f64 / self.items as f64
        }
    }
}

/// splitmix64 over (seed, what, index): the same scenario always gives the
/// same raters and the same flips.
fn draw(seed: u64, what: u64, index: u64) -> f64 {
    let mut z = seed
        .wrapping_add(what.wrapping_mul(0x9E37_79B9_7F4A_7C15))
        .wrapping_add(index.wrapping_mul(0xD1B5_4A32_D192_ED03));
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^= z >> 31;
    (z >> 11) as f64 / (1u64 << 53) as f64
}

/// Who rates traffic chat `index` (counted over the whole scenario), and
/// as which end user.
fn rater_of(s: &Scenario, index: usize) -> (&Rater, String) {
    let x = draw(s.seed, 1, index as u64);
    let mut acc = 0.0;
    let rater = s
        .raters
        .iter()
        .find(|r| {
            acc += r.share;
            x < acc
        })
        .unwrap_or_else(|| s.raters.last().expect("validated: at least one rater"));
    let n = (draw(s.seed, 2, index as u64) * s.users_per_rater as f64) as usize;
    let user = format!("{}-{}", rater.name, n.min(s.users_per_rater - 1));
    (rater, user)
}

/// Index offset of second raters' draws, apart from every first rater's.
const SECOND_RATER: usize = 1 << 40;

/// How `rater` votes on chat `index` (a first or second rater's index):
/// (up, attaches the correction).
fn vote_of(s: &Scenario, rater: &Rater, index: usize, right: bool) -> (bool, bool) {
    let up = match rater.behaviour {
        Behaviour::Honest => right,
        Behaviour::Noisy => right ^ (draw(s.seed, 3, index as u64) < rater.flip_probability),
        Behaviour::Inverted => !right,
        Behaviour::AlwaysUp => true,
    };
    let corrects = !up
        && matches!(rater.behaviour, Behaviour::Honest | Behaviour::Noisy)
        && draw(s.seed, 4, index as u64) < s.correction_probability;
    (up, corrects)
}

struct Reply {
    id: String,
    text: String,
    fingerprint: String,
}

async fn chat(
    http: &reqwest::Client,
    s: &Scenario,
    t: &Target,
    user: &str,
    message: &str,
) -> anyhow::Result<Reply> {
    let mut body = json!({
        "model": "default",
        "messages": [
            {"role": "system", "content": s.system},
            {"role": "user", "content": message},
        ],
        "max_tokens": s.max_tokens,
        "temperature": s.temperature,
        "user": user,
    });
    if t.structured
        && let Some(rf) = &s.response_format
    {
        body["response_format"] = rf.clone();
    }
    let resp = http
        .post(format!("{}/v1/chat/completions", t.url))
        .bearer_auth(&t.key)
        .json(&body)
        .send()
        .await?;
    let status = resp.status();
    let v: Value = resp.json().await.unwrap_or_default();
    if !status.is_success() {
        bail!("chat answered {status}: {v}");
    }
    Ok(Reply {
        id: v["id"].as_str().unwrap_or_default().to_string(),
        text: v["choices"][0]["message"]["content"]
            .as_str()
            .unwrap_or_default()
            .to_string(),
        fingerprint: v["system_fingerprint"]
            .as_str()
            .unwrap_or_default()
            .to_string(),
    })
}

/// One chat of the traffic: whether the answer was right, and each of its
/// votes (up, with a correction attached).
type Rated = (bool, Vec<(bool, bool)>);

/// Sends cycle `k`'s traffic, then its votes. The votes go once every chat
/// is answered, so a curation slot that comes while the batch is under way
/// finds none of them (a loop that counts new examples then trains on the
/// whole batch, not on the part that was in when the slot came).
pub async fn traffic(s: &Scenario, t: &Target, k: usize) -> anyhow::Result<Traffic> {
    let http = reqwest::Client::new();
    let started = Instant::now();
    let first = k * s.chats_per_cycle;
    let replies: Vec<anyhow::Result<(usize, Reply, bool)>> =
        futures::stream::iter(s.traffic_of(k).iter().enumerate())
            .map(|(i, item)| {
                let http = &http;
                async move {
                    let index = first + i;
                    let (_, user) = rater_of(s, index);
                    let reply = chat(http, s, t, &user, &item.user).await?;
                    let right = item.right(&reply.text);
                    Ok((index, reply, right))
                }
            })
            .buffered(t.concurrency.max(1))
            .collect()
            .await;
    let results: Vec<anyhow::Result<Rated>> = futures::stream::iter(replies)
        .map(|answered| {
            let http = &http;
            async move {
                let (index, reply, right) = answered?;
                let item = &s.traffic[index];
                let (rater, user) = rater_of(s, index);
                let mut raters = vec![(rater, user, index)];
                if draw(s.seed, 5, index as u64) < s.second_rater_share {
                    let (second, user) = rater_of(s, SECOND_RATER + index);
                    if user != raters[0].1 {
                        raters.push((second, user, SECOND_RATER + index));
                    }
                }
                let mut votes = Vec::new();
                for (rater, user, at) in raters {
                    let (up, corrects) = vote_of(s, rater, at, right);
                    let mut vote = json!({
                        "completion_id": reply.id,
                        "rating": if up { "up" } else { "down" },
                        "user": user,
                    });
                    if corrects {
                        vote["correction"] = item.answer.clone().into();
                    }
                    let resp = http
                        .post(format!("{}/v1/feedback", t.url))
                        .bearer_auth(&t.key)
                        .json(&vote)
                        .send()
                        .await?;
                    if !resp.status().is_success() {
                        let status = resp.status();
                        bail!("feedback answered {status}: {}", resp.text().await?);
                    }
                    votes.push((up, corrects));
                }
                Ok((right, votes))
            }
        })
        .buffered(t.concurrency.max(1))
        .collect()
        .await;
    let mut out = Traffic::default();
    for r in results {
        out.chats += 1;
        match r {
            Ok((right, votes)) => {
                out.right += usize::from(right);
                out.second_votes += votes.len() - 1;
                for (up, corrected) in votes {
                    out.up += usize::from(up);
                    out.down += usize::from(!up);
                    out.corrections += usize::from(corrected);
                }
            }
            Err(e) => {
                out.failed += 1;
                tracing::warn!(error = %e, "a simulated chat failed");
            }
        }
    }
    out.seconds = started.elapsed().as_secs_f64();
    Ok(out)
}

/// Scores the held-out messages (unrated; as end user `simulate-heldout`).
pub async fn heldout(s: &Scenario, t: &Target) -> anyhow::Result<Score> {
    let http = reqwest::Client::new();
    let started = Instant::now();
    let replies: Vec<(bool, anyhow::Result<Reply>)> = futures::stream::iter(&s.heldout)
        .map(|item| {
            let http = &http;
            async move {
                let r = chat(http, s, t, "simulate-heldout", &item.user).await;
                let right = r.as_ref().is_ok_and(|r| item.right(&r.text));
                (right, r)
            }
        })
        .buffered(t.concurrency.max(1))
        .collect()
        .await;
    let mut out = Score {
        items: s.heldout.len(),
        ..Default::default()
    };
    for (right, r) in replies {
        match r {
            Ok(reply) => {
                out.right += usize::from(right);
                *out.served_by.entry(reply.fingerprint).or_default() += 1;
            }
            Err(e) => {
                out.failed += 1;
                tracing::warn!(error = %e, "a held-out chat failed");
            }
        }
    }
    out.seconds = started.elapsed().as_secs_f64();
    Ok(out)
}

/// `flywheel simulate`'s arguments.
#[derive(Debug, Clone, clap::Args)]
pub struct SimulateArgs {
    /// The scenario file (format: scenarios/README.md).
    pub scenario: std::path::PathBuf,
    /// The gateway (default: http:// and the configured gateway.addr).
    #[arg(long)]
    pub url: Option<String>,
    /// An API key of the scenario's team (default: a new one, made in the
    /// database).
    #[arg(long)]
    pub key: Option<String>,
    /// Cycles to run (default: the scenario's).
    #[arg(long)]
    pub cycles: Option<usize>,
    /// The first cycle's number (from 0): its traffic is sent first.
    #[arg(long, default_value_t = 0)]
    pub from_cycle: usize,
    /// Leave the scenario's response_format out (constrained decoding off).
    #[arg(long)]
    pub unstructured: bool,
    /// Chats in flight at once.
    #[arg(long, default_value_t = 4)]
    pub concurrency: usize,
    /// Send traffic and votes only; score nothing held out.
    #[arg(long)]
    pub no_heldout: bool,
    /// Score the held-out messages once and stop.
    #[arg(long, conflicts_with = "no_heldout")]
    pub heldout_only: bool,
    /// Write the report (JSON) here as well.
    #[arg(long)]
    pub report: Option<std::path::PathBuf>,
    /// After each cycle's traffic, wait for the loop (a worker: `flywheel
    /// up`) to turn by itself: a cycle of the team that trained ends, and
    /// none is running; its outcome and stage times go in the report.
    /// Needs the database (`DATABASE_URL`).
    #[arg(long)]
    pub follow_loop: bool,
    /// How long to wait for the loop per cycle, in minutes.
    #[arg(long, default_value_t = 40)]
    pub loop_timeout_minutes: u64,
}

/// What a simulation measured, cycle by cycle (cycle 0's score is before
/// any traffic).
#[derive(Debug, Clone, Default, Serialize)]
pub struct Report {
    pub scenario: String,
    pub structured: bool,
    pub cycles: Vec<CycleReport>,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct CycleReport {
    pub cycle: usize,
    pub traffic: Option<Traffic>,
    /// The loop's cycle that followed the traffic (`--follow-loop`).
    pub turned: Option<Turned>,
    pub heldout: Option<Score>,
}

/// What the loop did with a cycle's traffic.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Turned {
    pub cycle_id: uuid::Uuid,
    pub status: String,
    pub reason: Option<String>,
    /// Seconds per stage, in order.
    pub stages: Vec<(String, f64)>,
    /// Cycles that ended skipped meanwhile (too few new examples yet).
    pub skipped: usize,
    /// From the traffic's end to the cycle's end.
    pub waited_seconds: f64,
}

/// Waits until a cycle of `team` started after `since` has trained and
/// ended, with no cycle of the team running.
async fn follow_loop(
    pool: &flywheel_store::PgPool,
    team: uuid::Uuid,
    since: chrono::DateTime<chrono::Utc>,
    timeout: std::time::Duration,
) -> anyhow::Result<Turned> {
    let t0 = std::time::Instant::now();
    loop {
        let cycles: Vec<_> = flywheel_store::cycles::list(pool, Some(team), 100)
            .await?
            .into_iter()
            .filter(|c| c.created_at >= since)
            .collect();
        let running = cycles.iter().any(|c| c.status == "running");
        let trained = cycles
            .iter()
            .find(|c| c.training_run_id.is_some() && c.status != "running");
        if let (false, Some(c)) = (running, trained) {
            return Ok(Turned {
                cycle_id: c.id,
                status: c.status.clone(),
                reason: c.reason.clone(),
                stages: flywheel_jobs::cycle::stage_seconds(c),
                skipped: cycles.iter().filter(|c| c.status == "skipped").count(),
                waited_seconds: t0.elapsed().as_secs_f64(),
            });
        }
        if t0.elapsed() > timeout {
            bail!(
                "the loop did not turn within {} minutes (is a worker running, with \
                 FLYWHEEL_TRAIN_MIN_NEW_EXAMPLES above 0?)",
                timeout.as_secs() / 60
            );
        }
        tokio::time::sleep(std::time::Duration::from_secs(5)).await;
    }
}

fn print_score(label: &str, s: &Score) {
    println!(
        "{label}: held-out {}/{} right ({:.1}%), served by {}, {:.0} s",
        s.right,
        s.items,
        100.0 * s.rate(),
        s.served_by
            .iter()
            .map(|(v, n)| format!("{v} x{n}"))
            .collect::<Vec<_>>()
            .join(", "),
        s.seconds
    );
}

pub async fn run(cfg: &crate::Config, args: SimulateArgs) -> anyhow::Result<()> {
    let s = Scenario::load(&args.scenario)?;
    let key = match args.key {
        Some(k) => k,
        None => {
            let pool = crate::bootstrap::pool(cfg).await?;
            flywheel_store::keys::create_key(&pool, &s.team).await?.1
        }
    };
    let target = Target {
        url: args
            .url
            .unwrap_or_else(|| format!("http://{}", cfg.gateway.addr))
            .trim_end_matches('/')
            .to_string(),
        key,
        structured: !args.unstructured && s.response_format.is_some(),
        concurrency: args.concurrency,
    };
    let mut report = Report {
        scenario: s.name.clone(),
        structured: target.structured,
        ..Default::default()
    };
    let write = |report: &Report| -> anyhow::Result<()> {
        if let Some(path) = &args.report {
            std::fs::write(path, serde_json::to_vec_pretty(report)?)?;
        }
        Ok(())
    };
    println!(
        "scenario {} for team {}: {} traffic, {} held-out messages; response_format {}",
        s.name,
        s.team,
        s.traffic.len(),
        s.heldout.len(),
        if target.structured {
            "sent"
        } else {
            "not sent"
        }
    );
    if !args.no_heldout {
        let score = heldout(&s, &target).await?;
        print_score(&format!("before cycle {}", args.from_cycle + 1), &score);
        report.cycles.push(CycleReport {
            cycle: args.from_cycle,
            heldout: Some(score),
            ..Default::default()
        });
        write(&report)?;
    }
    if args.heldout_only {
        return Ok(());
    }
    let follow = match args.follow_loop {
        true => {
            let pool = crate::bootstrap::pool(cfg).await?;
            let team = crate::models::team_id(&pool, &s.team).await?;
            Some((pool, team))
        }
        false => None,
    };
    let cycles = args.cycles.unwrap_or(s.cycles);
    for k in args.from_cycle..args.from_cycle + cycles {
        let started = chrono::Utc::now();
        if (k + 1) * s.chats_per_cycle > s.traffic.len() {
            bail!(
                "the scenario has traffic for {} cycles",
                s.traffic.len() / s.chats_per_cycle
            );
        }
        let sent = traffic(&s, &target, k).await?;
        println!(
            "cycle {}: {} chats, {} right, {} up, {} down, {} corrections ({} votes by second raters), {} failed, {:.0} s",
            k + 1,
            sent.chats,
            sent.right,
            sent.up,
            sent.down,
            sent.corrections,
            sent.second_votes,
            sent.failed,
            sent.seconds
        );
        let mut cycle = CycleReport {
            cycle: k + 1,
            traffic: Some(sent),
            ..Default::default()
        };
        if let Some((pool, team)) = &follow {
            let timeout = std::time::Duration::from_secs(args.loop_timeout_minutes * 60);
            let turned = follow_loop(pool, *team, started, timeout).await?;
            println!(
                "cycle {}: the loop's cycle {} ended {} after {:.0} s ({}); {}",
                k + 1,
                turned.cycle_id,
                turned.status,
                turned.waited_seconds,
                turned
                    .stages
                    .iter()
                    .map(|(s, t)| format!("{s} {t:.0} s"))
                    .collect::<Vec<_>>()
                    .join(", "),
                turned.reason.as_deref().unwrap_or("")
            );
            cycle.turned = Some(turned);
        }
        if !args.no_heldout {
            let score = heldout(&s, &target).await?;
            print_score(&format!("after cycle {}", k + 1), &score);
            cycle.heldout = Some(score);
        }
        report.cycles.push(cycle);
        write(&report)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scenario(raters: Value) -> Scenario {
        serde_json::from_value(json!({
            "name": "t", "team": "t", "system": "s", "max_tokens": 8,
            "cycles": 1, "chats_per_cycle": 1, "correction_probability": 0.5,
            "users_per_rater": 3, "raters": raters,
            "traffic": [{"user": "u", "answer": "{\"a\": 1}",
                         "checks": [{"type": "json_fields", "fields": {"a": 1}}]}],
            "heldout": [],
        }))
        .unwrap()
    }

    #[test]
    fn raters_are_drawn_by_share_and_stay_within_their_users() {
        let s = scenario(json!([
            {"name": "a", "share": 0.75, "behaviour": "honest"},
            {"name": "b", "share": 0.25, "behaviour": "always_up"},
        ]));
        s.validate().unwrap();
        let mut counts = BTreeMap::new();
        for i in 0..4000 {
            let (r, user) = rater_of(&s, i);
            *counts.entry(r.name.clone()).or_insert(0usize) += 1;
            let n: usize = user.rsplit('-').next().unwrap().parse().unwrap();
            assert!(user.starts_with(&r.name) && n < 3, "{user}");
        }
        let a = counts["a"] as f64 / 4000.0;
        assert!((a - 0.75).abs() < 0.03, "{counts:?}");
        // Deterministic: the same chat gets the same rater again.
        assert_eq!(rater_of(&s, 17).1, rater_of(&s, 17).1);
    }

    #[test]
    fn second_raters_vote_their_own_way() {
        let s = scenario(json!([
            {"name": "honest", "share": 0.5, "behaviour": "honest"},
            {"name": "contrarian", "share": 0.5, "behaviour": "inverted"},
        ]));
        let honest = &s.raters[0];
        let contrarian = &s.raters[1];
        // Drawn apart from the first rater of the same chat.
        let same = (0..2000)
            .filter(|&i| rater_of(&s, i).1 == rater_of(&s, SECOND_RATER + i).1)
            .count();
        assert!(same < 2000 / 4, "{same}");
        for right in [true, false] {
            assert_eq!(vote_of(&s, honest, 3, right).0, right);
            assert_eq!(vote_of(&s, contrarian, 3, right), (!right, false));
        }
    }

    #[test]
    fn a_scenario_whose_shares_or_answers_are_wrong_is_refused() {
        let bad = scenario(json!([{"name": "a", "share": 0.5, "behaviour": "honest"}]));
        assert!(bad.validate().unwrap_err().to_string().contains("sum to 1"));
        let mut s = scenario(json!([{"name": "a", "share": 1.0, "behaviour": "honest"}]));
        s.traffic[0].answer = "{\"a\": 2}".into();
        assert!(
            s.validate()
                .unwrap_err()
                .to_string()
                .contains("fails its checks")
        );
    }

    #[test]
    fn the_demo_scenario_loads() {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../../scenarios/support-routing.json");
        let s = Scenario::load(&path).unwrap();
        assert_eq!(s.traffic_of(2).len(), s.chats_per_cycle);
        assert!(s.heldout.len() >= 40);
    }
}
