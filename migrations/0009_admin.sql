-- The admin dashboard's accounts and sessions. Passwords are stored only as
-- argon2 hashes (PHC strings); a session is known by the SHA-256 of its
-- cookie, so a database dump opens no dashboard.
create table admin_accounts (
    id               uuid primary key default gen_random_uuid(),
    username         text not null unique,
    password_hash    text not null,
    -- `viewer` sees every page; `admin` may also promote, roll back and
    -- manage teams and keys.
    role             text not null check (role in ('viewer', 'admin')),
    -- Bad passwords since the last good one; at the limit the account is
    -- locked until `locked_until`.
    failed_logins    integer not null default 0,
    locked_until     timestamptz,
    created_at       timestamptz not null default now()
);

create table admin_sessions (
    token_hash   bytea primary key,
    account_id   uuid not null references admin_accounts (id) on delete cascade,
    -- Sent back in every form and in the X-CSRF-Token header of the JSON API.
    csrf_token   text not null,
    created_at   timestamptz not null default now(),
    expires_at   timestamptz not null
);
create index admin_sessions_account on admin_sessions (account_id);

-- The completions page filters by team and time, newest first, and by
-- model version within a team.
create index completions_team_version_created
    on completions (team_id, model_version_id, created_at desc);
-- Votes by team and time (the overview's thumbs-up rates).
create index feedback_team_created on feedback (team_id, created_at);
