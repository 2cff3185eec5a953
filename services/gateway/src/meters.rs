//! The gateway's histograms, through prometheus-client: HTTP requests by
//! method, route pattern and status, and completions by the model version
//! that answered. Observed where requests and completions end; written
//! out by `/metrics` ([`crate::metrics`]).

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

/// A label value as the text format needs it (prometheus-client writes
/// them unescaped; so does `/metrics`' own part).
pub(crate) fn escaped(s: &str) -> String {
    s.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// An HTTP request's labels: bounded (the route's pattern, never the raw
/// path; no team or user).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct HttpLabels {
    method: String,
    route: String,
    status: String,
}

/// A completion's label: the model version that answered.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ModelLabel {
    model: String,
}

/// A vote's labels: the version that made the completion, the rating.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct VoteLabels {
    version_id: String,
    rating: String,
}

type Histograms<L> = Family<L, Histogram, fn() -> Histogram>;

fn seconds() -> Histogram {
    // 5 ms to 41 s.
    Histogram::new(exponential_buckets(0.005, 2.0, 14))
}

fn token_gaps() -> Histogram {
    // 1 ms to 8 s.
    Histogram::new(exponential_buckets(0.001, 2.0, 14))
}

fn tokens() -> Histogram {
    // 1 to 4,096.
    Histogram::new(exponential_buckets(1.0, 2.0, 13))
}

/// The histograms, kept by the gateway and read by `/metrics`.
pub struct Meters {
    registry: Registry,
    http: Histograms<HttpLabels>,
    first_token: Histograms<ModelLabel>,
    inter_token: Histograms<ModelLabel>,
    duration: Histograms<ModelLabel>,
    output_tokens: Histograms<ModelLabel>,
    votes: Family<VoteLabels, Counter>,
}

impl Default for Meters {
    fn default() -> Self {
        let mut registry = Registry::default();
        let http = Histograms::new_with_constructor(seconds as fn() -> Histogram);
        let first_token = Histograms::new_with_constructor(seconds as fn() -> Histogram);
        let inter_token = Histograms::new_with_constructor(token_gaps as fn() -> Histogram);
        let duration = Histograms::new_with_constructor(seconds as fn() -> Histogram);
        let output_tokens = Histograms::new_with_constructor(tokens as fn() -> Histogram);
        registry.register(
            "flywheel_http_request_duration_seconds",
            "Time from a request's arrival to its answer's headers (a stream's first bytes), by method, route pattern and status",
            http.clone(),
        );
        registry.register(
            "flywheel_time_to_first_token_seconds",
            "Time from a completion request's arrival to its first token, by the model version that answered",
            first_token.clone(),
        );
        registry.register(
            "flywheel_inter_token_latency_seconds",
            "A completion's mean time between two tokens it wrote (from its first token to its end, over the gaps), by the model version that answered; completions of two or more tokens",
            inter_token.clone(),
        );
        registry.register(
            "flywheel_completion_duration_seconds",
            "Time from a completion request's arrival to its end, by the model version that answered",
            duration.clone(),
        );
        registry.register(
            "flywheel_completion_output_tokens",
            "Tokens a completion wrote, by the model version that answered",
            output_tokens.clone(),
        );
        let votes = Family::<VoteLabels, Counter>::default();
        registry.register(
            "flywheel_votes",
            "Votes acknowledged, by the model version whose completion they rate (its name: flywheel_model_info) and the rating",
            votes.clone(),
        );
        Self {
            registry,
            votes,
            http,
            first_token,
            inter_token,
            duration,
            output_tokens,
        }
    }
}

impl Meters {
    pub fn observe_http(&self, method: &str, route: &str, status: u16, seconds: f64) {
        let labels = HttpLabels {
            method: method.to_string(),
            route: route.to_string(),
            status: status.to_string(),
        };
        self.http.get_or_create(&labels).observe(seconds);
    }

    /// A vote acknowledged.
    pub fn observe_vote(&self, version: uuid::Uuid, rating: &str) {
        let labels = VoteLabels {
            version_id: version.to_string(),
            rating: rating.to_string(),
        };
        self.votes.get_or_create(&labels).inc();
    }

    /// A completion that ended: its model version, time to first token
    /// (none when it wrote nothing), duration and tokens written; its mean
    /// gap between tokens follows from them.
    pub fn observe_completion(
        &self,
        model: &str,
        first_token: Option<f64>,
        seconds: f64,
        tokens: usize,
    ) {
        // prometheus-client writes label values as they are: escaped
        // here, as a version's name may hold any character.
        let label = ModelLabel {
            model: escaped(model),
        };
        if let Some(t) = first_token {
            self.first_token.get_or_create(&label).observe(t);
            if tokens >= 2 {
                let gap = (seconds - t).max(0.0) / (tokens - 1) as f64;
                self.inter_token.get_or_create(&label).observe(gap);
            }
        }
        self.duration.get_or_create(&label).observe(seconds);
        self.output_tokens
            .get_or_create(&label)
            .observe(tokens as f64);
    }

    /// Appends the histograms in the text format (without OpenMetrics'
    /// closing `# EOF`, as the rest of the page is Prometheus' format).
    pub(crate) fn encode(&self, out: &mut String) {
        let mut text = String::new();
        if prometheus_client::encoding::text::encode(&mut text, &self.registry).is_ok() {
            out.push_str(text.trim_end().trim_end_matches("# EOF").trim_end());
            out.push('\n');
        }
    }
}
