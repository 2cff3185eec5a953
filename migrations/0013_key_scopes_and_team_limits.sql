-- What each API key may do. Keys made before scopes existed keep every
-- scope they had in effect; a key never gains one it was not given.
--   chat:     POST /v1/chat/completions
--   feedback: POST /v1/feedback, /v1/feedback/batch
--   read:     GET /v1/completions/{id}, /v1/completions/{id}/feedback
--   delete:   DELETE /v1/users/{user}/data
alter table api_keys
    add column scopes text[] not null default array['chat', 'feedback', 'read', 'delete'],
    add constraint api_keys_scopes_known
        check (scopes <@ array['chat', 'feedback', 'read', 'delete']::text[]
               and cardinality(scopes) > 0);

-- Per-team rate limits, enforced by each gateway process on its own
-- (null: no limit). Requests per minute count every chat request; tokens
-- per minute count prompt and completion tokens once a request is done.
alter table teams
    add column requests_per_minute integer check (requests_per_minute > 0),
    add column tokens_per_minute   integer check (tokens_per_minute > 0);
