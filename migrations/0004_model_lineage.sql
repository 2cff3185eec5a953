-- Where a trained model version came from: the base it was tuned from, the
-- dataset version it learned, its adapter (PEFT layout) and the training
-- record (configuration, losses, held-out loss before and after).
alter table model_versions
    add column base_version_id     uuid references model_versions (id),
    add column dataset_version_id  uuid references dataset_versions (id) on delete set null,
    add column adapter_path        text,
    add column training            jsonb;
