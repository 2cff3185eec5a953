-- Model versions answered by an OpenAI-compatible server (vLLM, TGI,
-- llama.cpp's server, a hosted API) instead of weights in this process.
-- The row names the environment variable that holds the API key, never the
-- key itself: a key lives where the operator keeps secrets (a Kubernetes
-- Secret, a systemd credential), not in the database or its backups.
create table upstreams (
    model_version_id  uuid primary key references model_versions (id) on delete cascade,
    -- No credentials (user:key@) or query in the URL: it is shown to admins.
    base_url          text not null check (base_url ~ '^https?://[^[:space:]@?#]+$'),
    model             text not null check (model <> ''),
    api_key_env       text check (api_key_env ~ '^[A-Za-z_][A-Za-z0-9_]*$'),
    timeout_ms        integer not null default 120000 check (timeout_ms > 0),
    created_at        timestamptz not null default now()
);
