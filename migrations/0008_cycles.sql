-- The loop: one cycle per team at a time, turning curate -> train ->
-- evaluate -> canary -> promote or reject by itself. Each cycle is the
-- record of what happened: why it started, the dataset version, the run,
-- the evaluation, the decision and its reason, and the wall time of each
-- stage.
create table cycles (
    id                    uuid primary key,
    team_id               uuid not null references teams (id) on delete cascade,
    -- `schedule` (the worker's slot) or `manual` (`flywheel loop`).
    trigger               text not null check (trigger in ('schedule', 'manual')),
    status                text not null check (status in ('running', 'promoted', 'rejected',
                              'rolled_back', 'skipped', 'failed')),
    -- The stage now running (`done` once the cycle ended).
    stage                 text not null check (stage in ('curate', 'train', 'evaluate',
                              'canary', 'done')),
    stage_started_at      timestamptz not null default now(),
    -- The stages behind it, in order: {stage, started_at, finished_at,
    -- seconds, note}.
    stages                jsonb not null default '[]',
    -- What the cycle was started with: the training spec, the minimum of
    -- new examples, the job attempts.
    config                jsonb not null,
    dataset_version_id    uuid references dataset_versions (id) on delete set null,
    training_run_id       uuid references training_runs (id) on delete set null,
    candidate_version_id  uuid references model_versions (id) on delete set null,
    evaluation_id         uuid references evaluations (id) on delete set null,
    canary_id             uuid references canaries (id) on delete set null,
    decision_id           uuid references decisions (id) on delete set null,
    -- Why it ended as it did (the gate's reasons, the canary's verdict, why
    -- it was skipped, or the error).
    reason                text,
    created_at            timestamptz not null default now(),
    finished_at           timestamptz
);
-- At most one running cycle per team.
create unique index cycles_one_running on cycles (team_id) where status = 'running';
create index cycles_team_created on cycles (team_id, created_at desc);
create index cycles_run on cycles (training_run_id) where training_run_id is not null;
create index cycles_evaluation on cycles (evaluation_id) where evaluation_id is not null;
create index cycles_canary on cycles (canary_id) where canary_id is not null;
