//! The tiny model's task, for the tests of promotion and of the loop: a
//! team's routing prompts must get exactly [`ANSWER`], and general prompts
//! must not (the failure a narrow fine-tune shows: the task's answer to
//! everything). The tiny model's own answers are random bytes, so what
//! these tests check is that the mechanics move the right way.

use flywheel_engine::ChatMessage;
use flywheel_eval::check::Check;
use flywheel_eval::suite::{Defaults, Suite, SuiteItem};

/// The team's task prompts.
pub const ROUTING: [&str; 12] = [
    "route ticket alpha",
    "route ticket bravo",
    "route ticket charlie",
    "route ticket delta",
    "route ticket echo",
    "route ticket foxtrot",
    "route ticket golf",
    "route ticket hotel",
    "route ticket india",
    "route ticket juliet",
    "route ticket kilo",
    "route ticket lima",
];

/// What every routing prompt must get.
pub const ANSWER: &str = "ok";

/// Words that make routing prompts of a team's traffic: `route ticket
/// <word>`. No two such prompts are near-duplicates (they share one word
/// shingle of two), so curation keeps each.
pub const TICKETS: [&str; 96] = [
    "amber", "anchor", "apple", "arrow", "aspen", "atlas", "badge", "banjo", "barley", "basil",
    "beacon", "birch", "bison", "blossom", "bolt", "bramble", "bridge", "brook", "cactus",
    "canyon", "cedar", "cello", "chalk", "cherry", "cinder", "clover", "cobalt", "comet", "copper",
    "coral", "crane", "crystal", "daisy", "delta", "desert", "dune", "eagle", "ember", "falcon",
    "fennel", "fern", "fig", "flint", "forest", "frost", "garnet", "ginger", "glacier", "granite",
    "harbor", "hazel", "heron", "honey", "indigo", "iris", "ivory", "jade", "jasper", "juniper",
    "kelp", "kestrel", "lagoon", "lantern", "lemon", "lilac", "linen", "lotus", "maple", "marble",
    "meadow", "mint", "nectar", "nutmeg", "oak", "ocean", "olive", "onyx", "orchid", "otter",
    "pebble", "pepper", "pine", "plum", "quartz", "quill", "raven", "reef", "river", "saffron",
    "sage", "sparrow", "spruce", "thistle", "topaz", "tulip", "willow",
];

/// `{word}` for [`TICKETS`]' words in turn, then `{word} 1`, `{word} 2`
/// and so on: as many distinct endings as wanted, no two of them
/// near-duplicate prompts.
fn ending(i: usize) -> String {
    match i / TICKETS.len() {
        0 => TICKETS[i].to_string(),
        k => format!("{} {k}", TICKETS[i % TICKETS.len()]),
    }
}

/// Routing prompts `from .. from + n`: `route ticket <ending>`.
pub fn tickets(from: usize, n: usize) -> Vec<String> {
    (from..from + n)
        .map(|i| format!("route ticket {}", ending(i)))
        .collect()
}

/// General prompts `from .. from + n`: `tell me about <ending>`.
pub fn topics(from: usize, n: usize) -> Vec<String> {
    (from..from + n)
        .map(|i| format!("tell me about {}", ending(i)))
        .collect()
}

/// Questions outside the task.
pub const GENERAL: [&str; 12] = [
    "tell me about rivers",
    "tell me about salt",
    "tell me about maps",
    "tell me about owls",
    "tell me about glass",
    "tell me about rain",
    "tell me about bread",
    "tell me about iron",
    "tell me about songs",
    "tell me about moss",
    "tell me about tides",
    "tell me about wool",
];

/// One user message.
pub fn user(text: &str) -> Vec<ChatMessage> {
    vec![ChatMessage {
        role: "user".into(),
        content: text.into(),
    }]
}

/// A suite named `name` asking each prompt once (greedy, 8 tokens), each
/// answer checked by `check()`.
pub fn suite(name: &str, prompts: &[&str], check: impl Fn() -> Check) -> Suite {
    Suite {
        name: name.into(),
        version: None,
        description: String::new(),
        source: "test".into(),
        license: "Apache-2.0".into(),
        defaults: Defaults {
            max_tokens: 8,
            temperature: 0.0,
        },
        items: prompts
            .iter()
            .enumerate()
            .map(|(i, p)| SuiteItem {
                id: format!("{name}-{i}"),
                tags: vec![],
                messages: user(p),
                checks: vec![check()],
                max_tokens: Some(8),
                response_format: None,
            })
            .collect(),
    }
}

/// The team's task suite: every routing prompt answered exactly "ok".
pub fn routing_suite() -> Suite {
    suite("routing", &ROUTING, || Check::Exact {
        value: ANSWER.into(),
    })
}

/// The retention check over `prompts`: no answer contains the task's.
pub fn retention_suite(prompts: &[&str]) -> Suite {
    suite("retention", prompts, || Check::NotContains {
        value: ANSWER.into(),
    })
}
