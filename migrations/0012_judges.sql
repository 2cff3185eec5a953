-- A team's judge: a model version asked which of two answers is better.
-- Before its verdicts count in an evaluation it is checked against the
-- team's own end users (their chosen and rejected answers); the check and
-- the weight the gate gave it are kept with the evaluation.
create table judges (
    team_id           uuid primary key references teams (id) on delete cascade,
    model_version_id  uuid not null references model_versions (id) on delete cascade,
    -- The question, with the places the request and the two answers go.
    prompt            text not null check (
        position('{question}' in prompt) > 0
        and position('{first}' in prompt) > 0
        and position('{second}' in prompt) > 0),
    -- The lower bound of its agreement with the users must be above this.
    bar               double precision not null check (bar >= 0.5 and bar < 1),
    -- Tokens one evaluation may spend asking it (null: no limit).
    budget_tokens     bigint check (budget_tokens > 0),
    created_at        timestamptz not null default now()
);

-- What the team's judge did in an evaluation: its check against the users,
-- the weight it was given, its verdicts' tally (null: no judge).
alter table evaluations add column judge jsonb;

-- What a team's jobs may spend on upstream models (teachers and judges) in
-- any 30 days, in tokens (null: no limit), and what they spent.
alter table teams add column upstream_budget_tokens bigint check (upstream_budget_tokens > 0);
create table upstream_spend (
    id                bigserial primary key,
    team_id           uuid not null references teams (id) on delete cascade,
    model_version_id  uuid not null references model_versions (id) on delete cascade,
    purpose           text not null check (purpose in ('distill', 'judge')),
    calls             integer not null check (calls >= 0),
    tokens            bigint not null check (tokens >= 0),
    at                timestamptz not null default now()
);
create index upstream_spend_team on upstream_spend (team_id, at);
