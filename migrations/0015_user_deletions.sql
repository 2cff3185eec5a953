-- When each end user's data was deleted, per team. A gateway may still hold
-- records of theirs in its journal, made before the deletion reached the
-- database (another gateway, or one that was down): when those arrive,
-- the inserts skip them, so deleted data never comes back. Made after the
-- deletion (the user came back), they are stored. The user is kept as the
-- SHA-256 of their id, not the id they asked to have forgotten.
create table user_deletions (
    team_id uuid not null references teams (id) on delete cascade,
    end_user_sha256 text not null,
    deleted_at timestamptz not null default now(),
    primary key (team_id, end_user_sha256)
);
