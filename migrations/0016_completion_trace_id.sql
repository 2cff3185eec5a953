-- The trace a completion belongs to (32 hex digits): the gateway's own
-- OpenTelemetry trace when traces are exported, else the caller's W3C
-- `traceparent`. The dashboard shows it beside the completion, so an
-- answer can be followed to its spans in the tracing backend.
alter table completions add column trace_id text;
