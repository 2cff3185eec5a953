-- A model version's answers to greedy evaluation requests, kept so that a
-- later evaluation of the same version reads them instead of generating
-- them again: the next cycle's champion is this cycle's candidate, whose
-- answers to every suite item were generated when it was evaluated.
-- Greedy decoding on an engine whose output does not depend on the batch
-- gives the same answer to the same request, so the key is the request as
-- the engine sees it (prompt tokens, length limit, response format) and the
-- engine's release.
create table remembered_answers (
    model_version_id  uuid not null references model_versions (id) on delete cascade,
    request_sha256    text not null,
    output            text not null,
    tokens            int not null,
    created_at        timestamptz not null default now(),
    primary key (model_version_id, request_sha256)
);
