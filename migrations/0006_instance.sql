-- Which database this is. The gateway's journal records the id of the
-- database its records are for and refuses to replay them into another one
-- (a journal left from another database would otherwise fail every foreign
-- key, or worse, land). One row, made once, kept by dumps and restores.
create table flywheel_instance (
    id          uuid primary key default gen_random_uuid(),
    singleton   boolean not null default true unique check (singleton),
    created_at  timestamptz not null default now()
);
insert into flywheel_instance default values;
