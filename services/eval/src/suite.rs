//! A suite: prompts with checks, run by generation as served. Teams add
//! their own (`flywheel suites add FILE`); the general retention suite ships
//! with Flywheel ([`crate::RETENTION_SUITE`]) so forgetting is measured.
//!
//! ```json
//! {"name": "routing", "description": "...", "source": "...", "license": "...",
//!  "defaults": {"max_tokens": 48, "temperature": 0},
//!  "items": [{"id": "refund-1", "tags": ["refund"],
//!             "messages": [{"role": "user", "content": "..."}],
//!             "checks": [{"type": "json_fields", "fields": {"intent": "refund"}}]}]}
//! ```

use flywheel_engine::ChatMessage;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::check::Check;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Suite {
    pub name: String,
    #[serde(default)]
    pub version: Option<u32>,
    #[serde(default)]
    pub description: String,
    #[serde(default)]
    pub source: String,
    #[serde(default)]
    pub license: String,
    #[serde(default)]
    pub defaults: Defaults,
    pub items: Vec<SuiteItem>,
}

#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct Defaults {
    pub max_tokens: usize,
    pub temperature: f32,
}

impl Default for Defaults {
    fn default() -> Self {
        Self {
            max_tokens: 64,
            temperature: 0.0,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SuiteItem {
    pub id: String,
    #[serde(default)]
    pub tags: Vec<String>,
    pub messages: Vec<ChatMessage>,
    pub checks: Vec<Check>,
    #[serde(default)]
    pub max_tokens: Option<usize>,
    /// A JSON schema the answer is constrained to while it is generated
    /// (the request's `response_format`), when the team serves one.
    #[serde(default)]
    pub response_format: Option<serde_json::Value>,
}

#[derive(Debug, thiserror::Error)]
pub enum SuiteError {
    #[error("not a suite: {0}")]
    Parse(String),
    #[error("suite {suite}: {why}")]
    Invalid { suite: String, why: String },
}

impl Suite {
    /// Parses and checks a suite file's text.
    pub fn parse(text: &str) -> Result<Self, SuiteError> {
        let suite: Suite =
            serde_json::from_str(text).map_err(|e| SuiteError::Parse(e.to_string()))?;
        suite.validate()?;
        Ok(suite)
    }

    fn validate(&self) -> Result<(), SuiteError> {
        let bad = |why: String| SuiteError::Invalid {
            suite: self.name.clone(),
            why,
        };
        if self.name.trim().is_empty() {
            return Err(bad("the suite has no name".into()));
        }
        if self.items.is_empty() {
            return Err(bad("the suite has no items".into()));
        }
        let mut ids = std::collections::HashSet::new();
        for item in &self.items {
            if !ids.insert(&item.id) {
                return Err(bad(format!("item id {} appears twice", item.id)));
            }
            if item.messages.is_empty() {
                return Err(bad(format!("item {} has no messages", item.id)));
            }
            if item.checks.is_empty() {
                return Err(bad(format!("item {} has no checks", item.id)));
            }
            for (i, c) in item.checks.iter().enumerate() {
                c.validate()
                    .map_err(|why| bad(format!("item {} check {i}: {why}", item.id)))?;
            }
        }
        Ok(())
    }

    /// The content's digest: the same suite added twice is one suite.
    pub fn sha256(&self) -> String {
        let canonical = serde_json::to_vec(self).unwrap_or_default();
        hex::encode(Sha256::digest(&canonical))
    }

    /// The shipped general retention suite.
    pub fn retention() -> Self {
        Self::parse(crate::RETENTION_SUITE).expect("the shipped retention suite parses")
    }
}

impl SuiteItem {
    /// Whether `answer` passes every check.
    pub fn passes(&self, answer: &str) -> bool {
        self.checks.iter().all(|c| c.passes(answer))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_shipped_retention_suite_is_valid_and_sizeable() {
        let s = Suite::retention();
        assert_eq!(s.name, "general-retention");
        assert!(s.items.len() >= 250, "{} items", s.items.len());
        assert!(!s.license.is_empty() && !s.source.is_empty());
    }

    #[test]
    fn bad_suites_are_refused_with_the_reason() {
        let e = Suite::parse(r#"{"name": "x", "items": []}"#).unwrap_err();
        assert!(e.to_string().contains("no items"), "{e}");
        let twice = r#"{"name": "x", "items": [
            {"id": "a", "messages": [{"role": "user", "content": "q"}], "checks": [{"type": "json"}]},
            {"id": "a", "messages": [{"role": "user", "content": "q"}], "checks": [{"type": "json"}]}]}"#;
        assert!(
            Suite::parse(twice)
                .unwrap_err()
                .to_string()
                .contains("twice")
        );
        let regex = r#"{"name": "x", "items": [
            {"id": "a", "messages": [{"role": "user", "content": "q"}], "checks": [{"type": "regex", "pattern": "("}]}]}"#;
        assert!(
            Suite::parse(regex)
                .unwrap_err()
                .to_string()
                .contains("bad regex")
        );
        assert!(Suite::parse("{").is_err());
    }
}
