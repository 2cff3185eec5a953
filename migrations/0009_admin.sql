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

-- The completions page: newest first across teams (a page of 50 read from
-- the top of the index, not a sort of every row), and by model version
-- within a team.
create index completions_created on completions (created_at desc, id desc);
create index completions_team_version_created
    on completions (team_id, model_version_id, created_at desc);

-- The overview's charts: requests, votes and thumbs up per team, model
-- version and minute, kept exact by triggers on every insert and delete
-- (statement-level, over the statement's rows at once, so the journal's
-- batched inserts pay one aggregate each), so a chart reads a few thousand
-- rows however many millions of completions there are. A vote counts in
-- the minute it was cast, for the version that wrote the rated answer.
create table traffic_minutes (
    team_id           uuid not null references teams (id) on delete cascade,
    minute            timestamptz not null,
    model_version_id  uuid not null references model_versions (id) on delete cascade,
    requests          bigint not null default 0,
    votes             bigint not null default 0,
    up                bigint not null default 0,
    primary key (team_id, minute, model_version_id)
);

create function traffic_minutes_completions() returns trigger language plpgsql as $$
begin
    if tg_op = 'INSERT' then
        insert into traffic_minutes (team_id, minute, model_version_id, requests)
        select team_id, date_trunc('minute', created_at), model_version_id, count(*)
        from new_rows group by 1, 2, 3
        on conflict (team_id, minute, model_version_id)
            do update set requests = traffic_minutes.requests + excluded.requests;
    else
        update traffic_minutes t set requests = t.requests - d.n
        from (select team_id, date_trunc('minute', created_at) as minute, model_version_id,
                     count(*) as n
              from old_rows group by 1, 2, 3) d
        where t.team_id = d.team_id and t.minute = d.minute
          and t.model_version_id = d.model_version_id;
    end if;
    return null;
end $$;

-- Votes need their completion's model version: deleting votes before their
-- completions (as `delete_user_data` does) keeps the counts exact.
create function traffic_minutes_feedback() returns trigger language plpgsql as $$
begin
    if tg_op = 'INSERT' then
        insert into traffic_minutes (team_id, minute, model_version_id, votes, up)
        select v.team_id, date_trunc('minute', v.created_at), c.model_version_id,
               count(*), count(*) filter (where v.rating = 'up')
        from new_rows v join completions c on c.id = v.completion_id
        group by 1, 2, 3
        on conflict (team_id, minute, model_version_id)
            do update set votes = traffic_minutes.votes + excluded.votes,
                          up = traffic_minutes.up + excluded.up;
    else
        update traffic_minutes t set votes = t.votes - d.n, up = t.up - d.up
        from (select v.team_id, date_trunc('minute', v.created_at) as minute,
                     c.model_version_id, count(*) as n,
                     count(*) filter (where v.rating = 'up') as up
              from old_rows v join completions c on c.id = v.completion_id
              group by 1, 2, 3) d
        where t.team_id = d.team_id and t.minute = d.minute
          and t.model_version_id = d.model_version_id;
    end if;
    return null;
end $$;

create trigger completions_traffic_insert after insert on completions
    referencing new table as new_rows for each statement
    execute function traffic_minutes_completions();
create trigger completions_traffic_delete after delete on completions
    referencing old table as old_rows for each statement
    execute function traffic_minutes_completions();
create trigger feedback_traffic_insert after insert on feedback
    referencing new table as new_rows for each statement
    execute function traffic_minutes_feedback();
create trigger feedback_traffic_delete after delete on feedback
    referencing old table as old_rows for each statement
    execute function traffic_minutes_feedback();

-- What is there already.
insert into traffic_minutes (team_id, minute, model_version_id, requests)
select team_id, date_trunc('minute', created_at), model_version_id, count(*)
from completions group by 1, 2, 3;
insert into traffic_minutes (team_id, minute, model_version_id, votes, up)
select v.team_id, date_trunc('minute', v.created_at), c.model_version_id,
       count(*), count(*) filter (where v.rating = 'up')
from feedback v join completions c on c.id = v.completion_id
group by 1, 2, 3
on conflict (team_id, minute, model_version_id)
    do update set votes = excluded.votes, up = excluded.up;
