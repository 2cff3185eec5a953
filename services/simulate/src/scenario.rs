//! A scenario: a team's task as its users live it (the system prompt,
//! traffic and held-out messages, each with the checks that say whether an
//! answer is right) and the simulated raters who vote on the answers. Who
//! rates which chat, and how, is drawn from the scenario's seed, so a run
//! can be repeated exactly. The file format: `scenarios/README.md`.

use anyhow::{Context, bail};
use flywheel_eval::Check;
use serde::Deserialize;
use serde_json::Value;

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

    pub(crate) fn validate(&self) -> anyhow::Result<()> {
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

/// splitmix64 over (seed, what, index): the same scenario always gives the
/// same raters and the same flips.
pub(crate) fn draw(seed: u64, what: u64, index: u64) -> f64 {
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
pub(crate) fn rater_of(s: &Scenario, index: usize) -> (&Rater, String) {
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
pub(crate) const SECOND_RATER: usize = 1 << 40;

/// How `rater` votes on chat `index` (a first or second rater's index):
/// (up, attaches the correction).
pub(crate) fn vote_of(s: &Scenario, rater: &Rater, index: usize, right: bool) -> (bool, bool) {
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

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use serde_json::json;

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
