-- Training runs as records: what was trained on what, how far it got, and
-- how it ended. The queue (apalis) runs them; these rows are what admins and
-- the dashboard read, and what a resumed run continues from.
create table training_runs (
    id                    uuid primary key,
    dataset_version_id    uuid not null references dataset_versions (id) on delete cascade,
    base_version_id       uuid not null references model_versions (id),
    objective             text not null check (objective in ('sft', 'dpo', 'kto')),
    config                jsonb not null,
    status                text not null
        check (status in ('queued', 'running', 'succeeded', 'failed', 'cancelled')),
    step                  integer not null default 0,
    total_steps           integer not null,
    checkpoint_step       integer,
    checkpoint_path       text,
    cancel_requested      boolean not null default false,
    candidate_version_id  uuid references model_versions (id),
    eval_loss_before      double precision,
    eval_loss_after       double precision,
    error                 text,
    created_at            timestamptz not null default now(),
    started_at            timestamptz,
    finished_at           timestamptz
);
-- At most one run per base model at a time.
create unique index training_runs_one_active_per_base on training_runs (base_version_id)
    where status in ('queued', 'running');

-- Per-step loss, learning rate and throughput.
create table training_steps (
    run_id         uuid not null references training_runs (id) on delete cascade,
    step           integer not null,
    loss           double precision not null,
    learning_rate  double precision not null,
    grad_norm      double precision not null,
    tokens         integer not null,
    seconds        double precision not null,
    primary key (run_id, step)
);
