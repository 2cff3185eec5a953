//! The worker's figures for `/metrics` (its own listener, in the binary):
//! each job attempt's duration by kind and outcome, through
//! prometheus-client. One registry for the process, as Prometheus' own
//! clients keep a default one.

use std::sync::LazyLock;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct JobLabels {
    /// `curate`, `train` or `evaluate`.
    kind: String,
    /// `succeeded` or `failed` (an attempt; a failed one may be retried).
    outcome: String,
}

struct Meters {
    registry: Registry,
    jobs: Family<JobLabels, Histogram, fn() -> Histogram>,
}

fn job_seconds() -> Histogram {
    // 0.1 s to about 14 hours.
    Histogram::new(exponential_buckets(0.1, 2.0, 20))
}

static METERS: LazyLock<Meters> = LazyLock::new(|| {
    let mut registry = Registry::default();
    let jobs = Family::new_with_constructor(job_seconds as fn() -> Histogram);
    registry.register(
        "flywheel_job_duration_seconds",
        "Job attempts by kind and outcome, and how long each took",
        jobs.clone(),
    );
    Meters { registry, jobs }
});

/// A job attempt that ended.
pub(crate) fn observe_job(kind: &str, succeeded: bool, seconds: f64) {
    let labels = JobLabels {
        kind: kind.to_string(),
        outcome: if succeeded { "succeeded" } else { "failed" }.to_string(),
    };
    METERS.jobs.get_or_create(&labels).observe(seconds);
}

/// The figures in Prometheus' text format (OpenMetrics' closing `# EOF`
/// left out, so that more can follow).
pub fn encode(out: &mut String) {
    let mut text = String::new();
    if prometheus_client::encoding::text::encode(&mut text, &METERS.registry).is_ok() {
        out.push_str(text.trim_end().trim_end_matches("# EOF").trim_end());
        out.push('\n');
    }
}
