//! Trace context: the caller's W3C `traceparent`, read with the global
//! propagator (set by the binary) so that a request's spans join the
//! caller's trace, and the trace id kept with each completion.

use axum::http::HeaderMap;
use opentelemetry::propagation::Extractor;
use opentelemetry::trace::TraceContextExt;
use tracing_opentelemetry::OpenTelemetrySpanExt;

struct Headers<'a>(&'a HeaderMap);

impl Extractor for Headers<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|v| v.to_str().ok())
    }

    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(|k| k.as_str()).collect()
    }
}

/// Makes `span` a child of the caller's span, where the request carries a
/// `traceparent` (and traces are exported: without an exporter there is
/// nothing to join, and this does nothing).
pub(crate) fn join_caller(span: &tracing::Span, headers: &HeaderMap) {
    let cx = opentelemetry::global::get_text_map_propagator(|p| p.extract(&Headers(headers)));
    if cx.span().span_context().is_valid() {
        let _ = span.set_parent(cx);
    }
}

/// Renames `span` in its trace, to a name known only once the request has
/// been read (`POST /v1/chat/completions`, `chat tiny`). Recording
/// `otel.name` would not do: the exporter reads it only until the span is
/// first entered.
pub(crate) fn rename(span: &tracing::Span, name: String) {
    span.context().span().update_name(name);
}

/// Sets an attribute of `span`'s exported span, without a field of the
/// `tracing` span (so not on its log lines).
pub(crate) fn set(span: &tracing::Span, key: &'static str, value: impl Into<opentelemetry::Value>) {
    span.set_attribute(key, value);
}

/// The trace `span` belongs to, as 32 hex digits: its exported trace, or
/// where none is exported, the caller's (from `traceparent`), so a record
/// can still be found from the caller's side.
pub(crate) fn trace_id(span: &tracing::Span, headers: &HeaderMap) -> Option<String> {
    let cx = span.context();
    let ours = cx.span().span_context().clone();
    if ours.is_valid() {
        return Some(ours.trace_id().to_string());
    }
    traceparent_trace_id(headers.get("traceparent")?.to_str().ok()?)
}

/// The trace id of a W3C `traceparent` (`00-<trace>-<parent>-<flags>`), if
/// it is one: 32 lowercase hex digits, not all zero.
fn traceparent_trace_id(value: &str) -> Option<String> {
    let mut parts = value.trim().split('-');
    let (version, trace, parent) = (parts.next()?, parts.next()?, parts.next()?);
    let hex = |s: &str, n: usize| {
        s.len() == n
            && s.bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    };
    (hex(version, 2)
        && version != "ff"
        && hex(trace, 32)
        && hex(parent, 16)
        && trace.bytes().any(|b| b != b'0'))
    .then(|| trace.to_string())
}

#[cfg(test)]
mod tests {
    use super::traceparent_trace_id;

    #[test]
    fn a_traceparent_gives_its_trace_id_and_a_malformed_one_none() {
        let id = "4bf92f3577b34da6a3ce929d0e0e4736";
        assert_eq!(
            traceparent_trace_id(&format!("00-{id}-00f067aa0ba902b7-01")).as_deref(),
            Some(id)
        );
        for bad in [
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e473-00f067aa0ba902b7-01",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736",
            "",
        ] {
            assert_eq!(traceparent_trace_id(bad), None, "{bad}");
        }
    }
}
