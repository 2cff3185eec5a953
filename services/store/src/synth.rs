//! Synthetic completions and ratings, generated inside Postgres, for
//! benchmarks of the curation job at production sizes. Prompts are built
//! from word lists so that some repeat exactly, some differ by a word, and
//! most are distinct; some outputs carry e-mail addresses and phone numbers;
//! some completions get conflicting votes and corrections.

use uuid::Uuid;

use crate::Result;

/// Adds `completions` completions (numbered from `first`) to `team_id`,
/// logged by a model version named `synthetic`.
pub async fn completions(
    pool: &sqlx::PgPool,
    team_id: Uuid,
    first: i64,
    count: i64,
) -> Result<u64> {
    let model: Uuid = sqlx::query_scalar(
        "insert into model_versions (name, source, sha256, format, path, size_bytes)
         values ('synthetic', 'synthetic data for benchmarks', '', 'none', '', 0)
         on conflict (name) do update set name = excluded.name returning id",
    )
    .fetch_one(pool)
    .await?;
    Ok(sqlx::query(
        "insert into completions (id, team_id, model_version_id, end_user, request, output,
             finish_reason, prompt_tokens, completion_tokens, latency_ms, created_at)
         select 'synth-' || left($1::text, 8) || '-' || i, $1, $2, 'user-' || (i % 20000),
             jsonb_build_object('messages', jsonb_build_array(jsonb_build_object(
                 'role', 'user',
                 'content',
                 (array['How do I', 'What is the best way to', 'Can you explain how to',
                        'Why does it fail when I', 'Show me how to'])[1 + i % 5]
                 || ' ' ||
                 (array['reset', 'configure', 'export', 'import', 'delete', 'rename',
                        'share', 'archive', 'restore', 'schedule', 'merge'])[1 + (i / 5) % 11]
                 || ' ' ||
                 (array['my account', 'the invoice', 'a project', 'the report', 'an order',
                        'the dashboard', 'a user group', 'the API key', 'a webhook',
                        'the calendar', 'a backup', 'the billing plan', 'a template'])[1 + (i / 55) % 13]
                 || ' in ' ||
                 (array['the web app', 'the mobile app', 'the CLI', 'the admin panel',
                        'the desktop client', 'the browser extension', 'the API'])[1 + (i / 715) % 7]
                 || ' for ticket ' || (i % 300000)))),
             'To ' || (array['reset', 'configure', 'export', 'import', 'delete', 'rename',
                        'share', 'archive', 'restore', 'schedule', 'merge'])[1 + (i / 5) % 11]
                 || ' it, open Settings, choose the item and confirm. Step ' || (i % 97)
                 || ' applies here.'
                 || case when i % 50 = 0 then ' Contact user' || i || '@example.com for help.'
                         when i % 70 = 0 then ' Call +44 20 7946 ' || lpad((i % 10000)::text, 4, '0') || '.'
                         else '' end,
             'stop', 20, 30, 100.0,
             now() - make_interval(secs => ($3 + $4 - i)::double precision)
         from generate_series($3::bigint, $3 + $4 - 1) as i
         on conflict (id) do nothing",
    )
    .bind(team_id)
    .bind(model)
    .bind(first)
    .bind(count)
    .execute(pool)
    .await?
    .rows_affected())
}

/// Adds ratings numbered `first..first + count` on the team's synthetic
/// completions (`total` of them): the first 90% rate distinct completions
/// (every second one), the rest are second opinions from other users on
/// already rated completions. Every 10th down vote carries a correction.
pub async fn ratings(
    pool: &sqlx::PgPool,
    team_id: Uuid,
    total_completions: i64,
    total_ratings: i64,
    first: i64,
    count: i64,
) -> Result<u64> {
    Ok(sqlx::query(
        "with r as (
             select j,
                 case when j < $3 * 9 / 10 then (j * 2) % $2
                      else ((j - $3 * 9 / 10) * 18) % $2 end as c
             from generate_series($4::bigint, $4 + $5 - 1) as j
         )
         insert into feedback (id, completion_id, team_id, end_user, rating, comment, correction,
             created_at)
         select gen_random_uuid(), 'synth-' || left($1::text, 8) || '-' || c, $1,
             case when j < $3 * 9 / 10 then 'user-' || (c % 20000) else 'reviewer-' || (j % 500) end,
             case when (c * 7 + j * 5) % 3 = 0 then 'down' else 'up' end,
             null,
             case when (c * 7 + j * 5) % 3 = 0 and j % 10 = 0
                  then 'Open Settings, then Advanced, and choose the option for ticket ' || c || '.'
                  else null end,
             now() - make_interval(secs => ($3 - j)::double precision / 2)
         from r",
    )
    .bind(team_id)
    .bind(total_completions)
    .bind(total_ratings)
    .bind(first)
    .bind(count)
    .execute(pool)
    .await?
    .rows_affected())
}
