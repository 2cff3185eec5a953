//! Playing a scenario through the public API: chats as the scenario's end
//! users send them, their votes and corrections as its raters give them,
//! and the held-out messages (never sent as traffic, never rated) scored as
//! served.

use std::collections::BTreeMap;
use std::time::Instant;

use anyhow::bail;
use futures::StreamExt;
use serde::Serialize;
use serde_json::{Value, json};

use crate::scenario::{Item, SECOND_RATER, Scenario, draw, rater_of, vote_of};

/// Where and how to play it.
#[derive(Debug, Clone)]
pub struct Target {
    /// The gateway, e.g. `http://127.0.0.1:8080`.
    pub url: String,
    pub key: String,
    /// Send the scenario's `response_format` (constrained decoding).
    pub structured: bool,
    /// The model requested: `default` (the team's champion, or its canary
    /// for the users it holds) or a version the team may name.
    pub model: String,
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
    /// The same, per version that answered (`system_fingerprint`): a
    /// canary's arm and the champion's.
    pub by_version: BTreeMap<String, Arm>,
}

/// What one version answered and how its users voted.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Arm {
    pub chats: usize,
    pub right: usize,
    pub up: usize,
    pub down: usize,
}

impl Traffic {
    /// Adds `other`'s counts to these.
    pub fn add(&mut self, other: &Traffic) {
        self.chats += other.chats;
        self.right += other.right;
        self.up += other.up;
        self.down += other.down;
        self.corrections += other.corrections;
        self.second_votes += other.second_votes;
        self.failed += other.failed;
        self.seconds += other.seconds;
        for (v, a) in &other.by_version {
            let mine = self.by_version.entry(v.clone()).or_default();
            mine.chats += a.chats;
            mine.right += a.right;
            mine.up += a.up;
            mine.down += a.down;
        }
    }
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
        "model": t.model,
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

/// One chat of the traffic: the version that answered, whether the answer
/// was right, and each of its votes (up, with a correction attached).
type Rated = (String, bool, Vec<(bool, bool)>);

/// Sends the chats `chats`, each a traffic item's index and the index its
/// rater and votes are drawn from (the same for a batch's own traffic;
/// another for the same requests sent again by other users), then their
/// votes. The votes go once every chat is answered, so a curation slot
/// that comes while a batch is under way finds none of them (a loop that
/// counts new examples then trains on the whole batch, not on the part
/// that was in when the slot came).
pub async fn send(
    s: &Scenario,
    t: &Target,
    chats: impl IntoIterator<Item = (usize, usize)>,
) -> anyhow::Result<Traffic> {
    let http = reqwest::Client::new();
    let started = Instant::now();
    let replies: Vec<anyhow::Result<(&Item, usize, Reply, bool)>> = futures::stream::iter(chats)
        .map(|(item, index)| {
            let http = &http;
            async move {
                let item = &s.traffic[item];
                let (_, user) = rater_of(s, index);
                let reply = chat(http, s, t, &user, &item.user).await?;
                let right = item.right(&reply.text);
                Ok((item, index, reply, right))
            }
        })
        .buffered(t.concurrency.max(1))
        .collect()
        .await;
    let results: Vec<anyhow::Result<Rated>> = futures::stream::iter(replies)
        .map(|answered| {
            let http = &http;
            async move {
                let (item, index, reply, right) = answered?;
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
                Ok((reply.fingerprint, right, votes))
            }
        })
        .buffered(t.concurrency.max(1))
        .collect()
        .await;
    let mut out = Traffic::default();
    for r in results {
        out.chats += 1;
        match r {
            Ok((served_by, right, votes)) => {
                out.right += usize::from(right);
                out.second_votes += votes.len() - 1;
                let arm = out.by_version.entry(served_by).or_default();
                arm.chats += 1;
                arm.right += usize::from(right);
                for (up, corrected) in votes {
                    out.up += usize::from(up);
                    out.down += usize::from(!up);
                    out.corrections += usize::from(corrected);
                    arm.up += usize::from(up);
                    arm.down += usize::from(!up);
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
