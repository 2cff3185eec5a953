//! Logs and traces: what `main` sets up before anything else runs.
//!
//! Logs go to stderr, as text or as JSON lines (`FLYWHEEL_LOG_FORMAT`),
//! filtered by `RUST_LOG` (which does not filter what traces get). Traces go to an OpenTelemetry collector over
//! OTLP/HTTP (protobuf) when one is named with the standard variables
//! (`OTEL_EXPORTER_OTLP_ENDPOINT` or `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`);
//! with neither set, or with `OTEL_SDK_DISABLED=true` or
//! `OTEL_TRACES_EXPORTER=none`, nothing is exported and nothing is said.
//! The SDK reads the other `OTEL_*` variables itself (`OTEL_SERVICE_NAME`,
//! `OTEL_RESOURCE_ATTRIBUTES`, `OTEL_TRACES_SAMPLER`, `OTEL_BSP_*`,
//! `OTEL_EXPORTER_OTLP_HEADERS`, ...).
//!
//! The spans themselves are `tracing` spans written where the work happens
//! (the gateway, the engine, the journal, the jobs): the crates that write
//! them know nothing of the exporter. W3C `traceparent` is read from callers
//! and written on calls to upstreams with the global propagator set here.

use opentelemetry::trace::TracerProvider as _;
use opentelemetry_sdk::trace::SdkTracerProvider;
use tracing::Level;
use tracing_subscriber::filter::Targets;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{Layer, Registry};

/// What must outlive the program's work: the trace exporter, whose last
/// spans are sent by [`Telemetry::shutdown`].
#[derive(Debug)]
pub struct Telemetry {
    traces: Option<SdkTracerProvider>,
}

impl Telemetry {
    /// Sends the spans still buffered (the batch exporter's queue) and
    /// stops the exporter. Called once the runtime has stopped, outside any
    /// async context: the exporter's HTTP client is a blocking one.
    pub fn shutdown(self) {
        if let Some(provider) = self.traces
            && let Err(e) = provider.shutdown()
        {
            eprintln!("flywheel: the last traces could not be sent: {e}");
        }
    }
}

/// Installs the log subscriber and, when a collector is named, the trace
/// exporter. Call before the async runtime starts.
pub fn init() -> anyhow::Result<Telemetry> {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| "info,sqlx=warn".into());
    let json = match std::env::var("FLYWHEEL_LOG_FORMAT").as_deref() {
        Ok("json") => true,
        Ok("text") | Err(_) => false,
        Ok(other) => anyhow::bail!("FLYWHEEL_LOG_FORMAT is `text` or `json`, not `{other}`"),
    };
    let logs = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
    // For log collectors: a JSON object a line.
    let logs: Box<dyn Layer<Registry> + Send + Sync> = if json {
        Box::new(logs.json())
    } else {
        Box::new(logs)
    };
    opentelemetry::global::set_text_map_propagator(
        opentelemetry_sdk::propagation::TraceContextPropagator::new(),
    );
    let traces = tracer_provider()?;
    // Spans (and the log lines inside them, as span events) at `info` and
    // above, whatever `RUST_LOG` keeps in the log: a quiet log
    // (`RUST_LOG=warn`) still exports every request's trace. sqlx logs each
    // statement at `info`: kept out, as from the log.
    let otel = traces.as_ref().map(|p| {
        tracing_opentelemetry::layer()
            .with_tracer(p.tracer("flywheel"))
            // Our spans carry what a trace needs; the code's file and line,
            // the thread's name and `tracing`'s target only add bytes.
            .with_location(false)
            .with_threads(false)
            .with_target(false)
            .with_filter(
                Targets::new()
                    .with_default(Level::INFO)
                    .with_target("sqlx", Level::WARN),
            )
    });
    tracing_subscriber::registry()
        .with(logs.with_filter(filter))
        .with(otel)
        .init();
    Ok(Telemetry { traces })
}

/// The OTLP trace pipeline, or `None` where the environment asks for none.
fn tracer_provider() -> anyhow::Result<Option<SdkTracerProvider>> {
    let set = |name: &str| std::env::var(name).ok().filter(|v| !v.trim().is_empty());
    if set("OTEL_SDK_DISABLED").is_some_and(|v| v.eq_ignore_ascii_case("true")) {
        return Ok(None);
    }
    match set("OTEL_TRACES_EXPORTER").as_deref() {
        None | Some("otlp") => {}
        Some("none") => return Ok(None),
        Some(other) => anyhow::bail!(
            "OTEL_TRACES_EXPORTER=`{other}`: Flywheel exports traces with `otlp` (or `none`)"
        ),
    }
    if set("OTEL_EXPORTER_OTLP_ENDPOINT").is_none()
        && set("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT").is_none()
    {
        return Ok(None);
    }
    for var in [
        "OTEL_EXPORTER_OTLP_PROTOCOL",
        "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL",
    ] {
        if let Some(p) = set(var)
            && p != "http/protobuf"
        {
            anyhow::bail!(
                "{var}=`{p}`: Flywheel sends traces as `http/protobuf` (collectors take it on port 4318)"
            );
        }
    }
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_http()
        .build()
        .map_err(|e| anyhow::anyhow!("the OTLP trace exporter: {e}"))?;
    let mut resource = opentelemetry_sdk::Resource::builder().with_attribute(
        opentelemetry::KeyValue::new("service.version", env!("CARGO_PKG_VERSION")),
    );
    // The SDK names the service from `OTEL_SERVICE_NAME` or
    // `OTEL_RESOURCE_ATTRIBUTES`, else `unknown_service`: ours, unless told.
    let named = set("OTEL_SERVICE_NAME").is_some()
        || set("OTEL_RESOURCE_ATTRIBUTES").is_some_and(|a| a.contains("service.name="));
    if !named {
        resource = resource.with_service_name("flywheel");
    }
    Ok(Some(
        SdkTracerProvider::builder()
            .with_batch_exporter(exporter)
            .with_resource(resource.build())
            .build(),
    ))
}
