//! What the journal holds, and how a batch of it goes into Postgres.

use flywheel_store::PgPool;
use flywheel_store::completions::NewCompletion;
use flywheel_store::feedback::Feedback;
use serde::{Deserialize, Serialize};

/// One acknowledged write.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Record {
    Completion(NewCompletion),
    Feedback(Feedback),
}

impl Record {
    /// The id the client saw, for logs.
    pub fn id(&self) -> String {
        match self {
            Self::Completion(c) => c.id.clone(),
            Self::Feedback(f) => f.id.to_string(),
        }
    }
}

/// Completions first, so votes in the same batch find their completion.
pub async fn store_batch(
    pool: &PgPool,
    batch: &[Record],
) -> Result<(), flywheel_store::StoreError> {
    let mut completions = Vec::new();
    let mut votes = Vec::new();
    for r in batch {
        match r {
            Record::Completion(c) => completions.push(c.clone()),
            Record::Feedback(f) => votes.push(f.clone()),
        }
    }
    let mut tx = pool.begin().await?;
    flywheel_store::completions::insert_many(&mut *tx, &completions).await?;
    flywheel_store::feedback::insert_many(&mut *tx, &votes).await?;
    tx.commit().await?;
    Ok(())
}
