-- Promotion: champions per team, canaries, evaluations with their evidence,
-- and the audit log of every decision.

-- Who may use a model version. A version trained on one team's feedback
-- serves that team only (it can repeat what it learned); one trained on a
-- shared dataset serves the teams that pool feedback; a base model (pulled
-- or imported) serves anyone.
alter table model_versions
    add column team_id uuid references teams (id) on delete cascade,
    add column pooled boolean not null default false;

-- A team's champion; null: the global champion (`model_versions.is_champion`).
alter table teams add column champion_version_id uuid references model_versions (id);

-- A candidate serving a share of a team's traffic, sticky per end user,
-- until the live comparison promotes it or rolls it back.
create table canaries (
    id                    uuid primary key,
    team_id               uuid not null references teams (id) on delete cascade,
    candidate_version_id  uuid not null references model_versions (id),
    -- The champion it is compared with (what the rest of the traffic gets).
    champion_version_id   uuid not null references model_versions (id),
    share                 double precision not null check (share > 0 and share < 1),
    status                text not null check (status in ('running', 'promoted', 'rolled_back')),
    evaluation_id         uuid,
    reason                text,
    started_at            timestamptz not null default now(),
    deadline              timestamptz not null,
    ended_at              timestamptz
);
-- At most one running canary per team.
create unique index canaries_one_running on canaries (team_id) where status = 'running';

-- Which route served a completion: the team's champion, its canary, or a
-- version the request named.
alter table completions
    add column route text not null default 'champion'
        check (route in ('champion', 'canary', 'named')),
    add column canary_id uuid;
create index completions_canary on completions (canary_id) where canary_id is not null;

-- Task suites a team defines (and the shipped retention suite, team null):
-- prompts with checks, versioned by content.
create table eval_suites (
    id          uuid primary key,
    team_id     uuid references teams (id) on delete cascade,
    name        text not null,
    sha256      text not null,
    definition  jsonb not null,
    created_at  timestamptz not null default now()
);
create unique index eval_suites_name on eval_suites (coalesce(team_id, '00000000-0000-0000-0000-000000000000'::uuid), name, sha256);

-- One comparison of a candidate with a champion on the same items.
create table evaluations (
    id                    uuid primary key,
    team_id               uuid references teams (id) on delete cascade,
    candidate_version_id  uuid not null references model_versions (id),
    champion_version_id   uuid not null references model_versions (id),
    dataset_version_id    uuid references dataset_versions (id) on delete set null,
    training_run_id       uuid references training_runs (id) on delete set null,
    status                text not null check (status in ('queued', 'running', 'succeeded', 'failed')),
    -- The gate's verdict on the offline evidence: pass or fail, and why.
    passed                boolean,
    reasons               jsonb,
    policy                jsonb,
    error                 text,
    created_at            timestamptz not null default now(),
    finished_at           timestamptz
);
create index evaluations_candidate on evaluations (candidate_version_id);

-- Per metric: both models' values, their paired difference and its 95%
-- confidence interval.
create table eval_metrics (
    evaluation_id  uuid not null references evaluations (id) on delete cascade,
    suite          text not null,
    metric         text not null,
    items          integer not null,
    candidate      double precision not null,
    champion       double precision not null,
    difference     double precision not null,
    ci_low         double precision not null,
    ci_high        double precision not null,
    primary key (evaluation_id, suite, metric)
);

-- Every example's output, for both models, so a person can see what changed.
create table eval_items (
    evaluation_id     uuid not null references evaluations (id) on delete cascade,
    suite             text not null,
    item              text not null,
    model_version_id  uuid not null references model_versions (id),
    prompt            jsonb not null,
    output            text not null,
    passed            boolean,
    score             double precision,
    primary key (evaluation_id, suite, item, model_version_id)
);

-- The audit log: every promotion, rejection, canary start and end, manual
-- promotion or rollback, with its reason and evidence.
create table decisions (
    id                    uuid primary key,
    team_id               uuid references teams (id) on delete cascade,
    kind                  text not null check (kind in ('promote', 'reject', 'canary_started',
                              'canary_passed', 'rolled_back', 'manual_promote', 'manual_rollback')),
    candidate_version_id  uuid references model_versions (id),
    champion_version_id   uuid references model_versions (id),
    evaluation_id         uuid references evaluations (id) on delete set null,
    canary_id             uuid references canaries (id) on delete set null,
    reason                text not null,
    evidence              jsonb not null default '{}',
    actor                 text not null,
    created_at            timestamptz not null default now()
);
create index decisions_team_created on decisions (team_id, created_at desc);

-- The context window a version serves (read from its file when registered).
alter table model_versions add column context_length integer;
