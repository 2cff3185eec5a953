-- A key may be given the admin API (`admin`): automation run by the
-- platform team calls /admin/api with it instead of a signed-in session.
-- No key has it unless it is given: the column's default stays the four
-- scopes of a team's own API.
alter table api_keys
    drop constraint api_keys_scopes_known,
    add constraint api_keys_scopes_known
        check (scopes <@ array['chat', 'feedback', 'read', 'delete', 'admin']::text[]
               and cardinality(scopes) > 0);
