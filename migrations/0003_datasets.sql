-- Curated training datasets: immutable versions built from feedback, with
-- their manifest and lineage, and a record of every background job attempt.

-- Teams that allow it pool their feedback into shared datasets.
alter table teams add column share_for_training boolean not null default false;

-- One immutable snapshot. `team_id` is null for a dataset pooled across the
-- teams that share. `fingerprint` is a hash of the rules and of every vote the
-- build read, so building again on the same feedback finds the old version.
create table dataset_versions (
    id                 uuid primary key,
    team_id            uuid references teams (id) on delete cascade,
    version            integer not null,
    fingerprint        text not null,
    manifest           jsonb not null,
    sft_count          integer not null,
    dpo_count          integer not null,
    kto_count          integer not null,
    window_start       timestamptz,
    window_end         timestamptz,
    -- Set when an end user whose data went into this version had it deleted.
    user_data_deleted_at timestamptz,
    created_at         timestamptz not null default now()
);
create unique index dataset_versions_number
    on dataset_versions (coalesce(team_id, '00000000-0000-0000-0000-000000000000'), version);
create unique index dataset_versions_fingerprint
    on dataset_versions (coalesce(team_id, '00000000-0000-0000-0000-000000000000'), fingerprint);

-- The examples of a version, in build order. `example` is the serialized
-- SFT example, DPO pair or KTO example.
create table dataset_examples (
    version_id  uuid not null references dataset_versions (id) on delete cascade,
    kind        text not null check (kind in ('sft', 'dpo', 'kto')),
    ordinal     integer not null,
    split       text not null check (split in ('train', 'eval')),
    example     jsonb not null,
    primary key (version_id, kind, ordinal)
);

-- Snapshots are immutable: examples are written once, with their version.
create function dataset_examples_immutable() returns trigger language plpgsql as $$
begin
    raise exception 'dataset examples are immutable';
end $$;
create trigger dataset_examples_no_update before update on dataset_examples
    for each row execute function dataset_examples_immutable();

-- Which votes (and so which completions) a version was built from. No foreign
-- keys: the rows may be deleted later, and the lineage says they were used.
create table dataset_lineage (
    version_id     uuid not null references dataset_versions (id) on delete cascade,
    team_id        uuid not null,
    feedback_id    uuid not null,
    completion_id  text not null,
    voter          text not null,        -- the vote's end user
    author         text not null         -- the completion's end user ('' if none)
);
create index dataset_lineage_version on dataset_lineage (version_id);
create index dataset_lineage_voter on dataset_lineage (team_id, voter);
create index dataset_lineage_author on dataset_lineage (team_id, author);

-- Every attempt of every background job: what ran, on which worker, how it
-- ended. apalis keeps the queue itself (schema `apalis`); this is the history
-- admins read.
create table job_runs (
    id           bigserial primary key,
    task_id      text not null,
    kind         text not null,
    attempt      integer not null,
    worker       text not null,
    status       text not null check (status in ('running', 'succeeded', 'failed')),
    args         jsonb not null,
    result       jsonb,
    error        text,
    started_at   timestamptz not null default now(),
    finished_at  timestamptz
);
create index job_runs_task on job_runs (task_id, attempt);

-- A scheduled job fires once per slot however many workers run the schedule.
create table schedule_ticks (
    schedule   text not null,
    slot       timestamptz not null,
    fired_at   timestamptz not null default now(),
    primary key (schedule, slot)
);
