//! Records set aside: acknowledged writes that Postgres refused for a reason
//! retrying cannot fix (a value it cannot store, a constraint, a size limit),
//! and journal lines damaged on disk. Each is one file in `dead-letters/`
//! beside the journal, named in the order it was set aside, holding the
//! record, why, and the database it was for, so that nothing acknowledged is
//! dropped and the records behind it flow on. `flywheel journal dead-letters`
//! lists them; `flywheel journal replay` stores them after a fix.

use std::path::{Path, PathBuf};

use chrono::{DateTime, Utc};
use flywheel_store::PgPool;
use flywheel_store::instance::DatabaseIdentity;
use serde::{Deserialize, Serialize};

use super::format;
use super::record::{Record, store_batch};

/// One set-aside record.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DeadLetter {
    /// The file's name without `.json`: time-ordered.
    #[serde(skip)]
    pub id: String,
    pub set_aside_at: DateTime<Utc>,
    /// Postgres's message, or what was wrong with the line.
    pub reason: String,
    /// The SQLSTATE code when Postgres refused it.
    pub code: Option<String>,
    pub database: DatabaseIdentity,
    /// The record, when it could be read.
    pub record: Option<Record>,
    /// The line as text, when it could not.
    pub raw: Option<String>,
}

impl DeadLetter {
    /// What the record is, for listings: `completion chatcmpl-...` or
    /// `feedback <uuid>`.
    pub fn what(&self) -> String {
        match &self.record {
            Some(Record::Completion(c)) => format!("completion {}", c.id),
            Some(Record::Feedback(f)) => format!("feedback {}", f.id),
            None => "unreadable line".into(),
        }
    }
}

/// The `dead-letters/` folder of a journal.
#[derive(Debug, Clone)]
pub struct DeadLetters {
    dir: PathBuf,
}

impl DeadLetters {
    pub fn new(journal_dir: &Path) -> Self {
        Self {
            dir: journal_dir.join("dead-letters"),
        }
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Writes one record durably (temporary file, fsync, rename); returns
    /// its id.
    pub fn put(&self, letter: &DeadLetter) -> std::io::Result<String> {
        use std::io::Write;
        std::fs::create_dir_all(&self.dir)?;
        let id = format!(
            "{}-{}",
            letter.set_aside_at.format("%Y%m%dT%H%M%S%.9fZ"),
            &uuid::Uuid::new_v4().simple().to_string()[..8]
        );
        let tmp = self.dir.join(format!(".{id}.tmp"));
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(&serde_json::to_vec_pretty(letter).map_err(std::io::Error::other)?)?;
        f.sync_all()?;
        std::fs::rename(&tmp, self.dir.join(format!("{id}.json")))?;
        std::fs::File::open(&self.dir)?.sync_all()?;
        Ok(id)
    }

    /// Every set-aside record, oldest first.
    pub fn list(&self) -> std::io::Result<Vec<DeadLetter>> {
        let mut names: Vec<String> = match std::fs::read_dir(&self.dir) {
            Ok(entries) => entries
                .filter_map(|e| e.ok())
                .filter_map(|e| {
                    e.file_name()
                        .to_str()?
                        .strip_suffix(".json")
                        .filter(|n| !n.starts_with('.'))
                        .map(str::to_string)
                })
                .collect(),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
            Err(e) => return Err(e),
        };
        names.sort();
        names
            .into_iter()
            .map(|id| {
                let text = std::fs::read(self.dir.join(format!("{id}.json")))?;
                let mut letter: DeadLetter = serde_json::from_slice(&text)
                    .map_err(|e| std::io::Error::other(format!("dead letter {id}: {e}")))?;
                letter.id = id;
                Ok(letter)
            })
            .collect()
    }

    /// How many records are set aside (cheap enough for every scrape).
    pub fn count(&self) -> usize {
        std::fs::read_dir(&self.dir).map_or(0, |entries| {
            entries
                .filter_map(|e| e.ok())
                .filter(|e| {
                    e.file_name()
                        .to_str()
                        .is_some_and(|n| n.ends_with(".json") && !n.starts_with('.'))
                })
                .count()
        })
    }

    pub fn remove(&self, id: &str) -> std::io::Result<()> {
        std::fs::remove_file(self.dir.join(format!("{id}.json")))
    }

    fn rewrite(&self, letter: &DeadLetter) -> std::io::Result<()> {
        let path = self.dir.join(format!("{}.json", letter.id));
        let tmp = self.dir.join(format!(".{}.tmp", letter.id));
        std::fs::write(
            &tmp,
            serde_json::to_vec_pretty(letter).map_err(std::io::Error::other)?,
        )?;
        std::fs::rename(tmp, path)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ReplayError {
    #[error("dead letter {id} is for {theirs}, but this is {ours}; connect to that database")]
    OtherDatabase {
        id: String,
        theirs: DatabaseIdentity,
        ours: DatabaseIdentity,
    },
    #[error("dead letters: {0}")]
    Io(#[from] std::io::Error),
    #[error(transparent)]
    Store(#[from] flywheel_store::StoreError),
}

/// What a replay did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Replayed {
    pub stored: usize,
    /// Refused again (their reason updated) or unreadable.
    pub still_refused: usize,
}

/// Stores the set-aside records (those named by `only`, or all) into the
/// database they were for, oldest first, so a completion goes in before
/// the votes on it; each one stored leaves the folder. A record Postgres
/// still refuses stays, with the new reason. Another database is refused.
pub async fn replay(
    letters: &DeadLetters,
    pool: &PgPool,
    only: &[String],
) -> Result<Replayed, ReplayError> {
    let here = flywheel_store::instance::identity(pool).await?;
    let mut done = Replayed::default();
    for mut letter in letters.list()? {
        if !only.is_empty() && !only.contains(&letter.id) {
            continue;
        }
        if letter.database.id != here.id {
            return Err(ReplayError::OtherDatabase {
                id: letter.id,
                theirs: letter.database,
                ours: here,
            });
        }
        let Some(record) = letter.record.clone() else {
            done.still_refused += 1;
            continue;
        };
        match store_batch(pool, std::slice::from_ref(&record)).await {
            Ok(()) => {
                letters.remove(&letter.id)?;
                done.stored += 1;
            }
            Err(e) => match e.refusal() {
                Some(r) => {
                    letter.reason = r.message;
                    letter.code = Some(r.code);
                    letters.rewrite(&letter)?;
                    done.still_refused += 1;
                }
                None => return Err(e.into()),
            },
        }
    }
    Ok(done)
}

/// A damaged journal line as a dead letter.
pub(super) fn unreadable(
    bad: &format::Unreadable,
    segment: &Path,
    db: &DatabaseIdentity,
) -> DeadLetter {
    DeadLetter {
        id: String::new(),
        set_aside_at: Utc::now(),
        reason: format!(
            "unreadable journal line {} of {}: {}",
            bad.line,
            segment.display(),
            bad.why
        ),
        code: None,
        database: db.clone(),
        record: None,
        raw: Some(bad.text.clone()),
    }
}
