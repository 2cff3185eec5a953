-- Feedback on completions, and what the completion log needs to be lossless.

-- The request id the client saw (x-request-id), time to first token, and when
-- the request started (created_at is when the row was written, which can be
-- later when the database was away).
alter table completions
    add column request_id text,
    add column ttft_ms double precision,
    add column started_at timestamptz;

-- Every vote is kept: a user's current rating of a completion is their latest
-- row; earlier rows are the history. The id is chosen by the gateway when it
-- acknowledges the vote, so replaying its journal never duplicates a row.
create table feedback (
    id             uuid primary key,
    completion_id  text not null references completions (id) on delete cascade,
    team_id        uuid not null references teams (id) on delete cascade,
    end_user       text not null default '',     -- '' when the vote names no user
    rating         text not null check (rating in ('up', 'down')),
    comment        text,
    correction     text,
    created_at     timestamptz not null default now()
);
create index feedback_completion_user on feedback (completion_id, end_user, created_at desc);
create index feedback_team_user on feedback (team_id, end_user);
create index completions_team_user on completions (team_id, end_user);

-- Teams that must not have message text stored keep hashes and counts only.
alter table teams add column store_text boolean not null default true;
