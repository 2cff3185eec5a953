-- Flywheel's first schema: teams and their API keys, model versions, and the
-- completion log that feedback and training build on.

create extension if not exists pgcrypto;

-- A team owns keys, completions and (later) feedback and datasets.
create table teams (
    id          uuid primary key default gen_random_uuid(),
    name        text not null unique,
    created_at  timestamptz not null default now()
);

-- API keys are stored as the SHA-256 of the secret; the prefix lets admins
-- recognise a key in listings without revealing it.
create table api_keys (
    id          uuid primary key default gen_random_uuid(),
    team_id     uuid not null references teams (id) on delete cascade,
    prefix      text not null,
    key_hash    bytea not null unique,
    created_at  timestamptz not null default now(),
    revoked_at  timestamptz
);
create index api_keys_team on api_keys (team_id);

-- One row per model file Flywheel knows: pulled, imported or (later) trained.
create table model_versions (
    id           uuid primary key default gen_random_uuid(),
    name         text not null unique,
    source       text not null,
    sha256       text not null,
    format       text not null,
    path         text not null,
    size_bytes   bigint not null,
    is_champion  boolean not null default false,
    created_at   timestamptz not null default now()
);
-- Exactly one champion at a time.
create unique index model_versions_one_champion on model_versions (is_champion) where is_champion;

-- Every answer the gateway gave, with the exact model version that made it.
create table completions (
    id                 text primary key,            -- chatcmpl-<uuid>, as the client saw it
    team_id            uuid not null references teams (id) on delete cascade,
    model_version_id   uuid not null references model_versions (id),
    end_user           text,
    request            jsonb not null,              -- messages and sampling parameters
    output             text not null,
    finish_reason      text not null,
    prompt_tokens      integer not null,
    completion_tokens  integer not null,
    latency_ms         double precision not null,
    created_at         timestamptz not null default now()
);
create index completions_team_created on completions (team_id, created_at);
create index completions_model_version on completions (model_version_id);
