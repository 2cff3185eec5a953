//! The write path of everything acknowledged: completions and votes go to an
//! append-only journal on local disk *before* the client gets its answer,
//! and a background flusher copies them to Postgres in batches.
//!
//! So the request path never waits for the database; a database that is
//! slow, restarting or unreachable only makes the journal longer (the
//! flusher retries with backoff); and a gateway killed outright replays its
//! journal when it starts again. Rows carry ids chosen here, and inserts
//! skip ids already stored, so a replay never duplicates anything. The
//! journal is bounded: when it is full, writes are refused (HTTP 503) and
//! say so, rather than dropping anything.
//!
//! Records are JSON lines in numbered segment files; a segment is deleted
//! once every record in it is in Postgres.

use std::collections::{HashMap, VecDeque};
use std::io::{BufRead, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use flywheel_store::PgPool;
use flywheel_store::completions::NewCompletion;
use flywheel_store::feedback::Feedback;
use serde::{Deserialize, Serialize};
use tokio::sync::Notify;
use uuid::Uuid;

/// One acknowledged write.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Record {
    Completion(NewCompletion),
    Feedback(Feedback),
}

#[derive(Debug, Clone)]
pub struct JournalConfig {
    pub dir: PathBuf,
    /// Records waiting for Postgres before writes are refused.
    pub max_pending: usize,
    /// Records per database round trip.
    pub batch: usize,
    /// Start a new segment file past this size.
    pub segment_bytes: u64,
}

impl JournalConfig {
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Self {
            dir: dir.into(),
            max_pending: 1_000_000,
            batch: 2000,
            segment_bytes: 16 << 20,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum JournalError {
    #[error("the journal is full ({0} records wait for the database)")]
    Full(usize),
    #[error("journal: {0}")]
    Io(#[from] std::io::Error),
}

struct Segment {
    index: u64,
    file: std::fs::File,
    bytes: u64,
}

struct State {
    segment: Segment,
    /// Not yet in Postgres, in journal order, each with its segment.
    pending: VecDeque<(u64, Record)>,
    /// Completions not yet in Postgres: id -> team, so votes on them are
    /// accepted before the row exists.
    pending_completions: HashMap<String, Uuid>,
}

struct Inner {
    cfg: JournalConfig,
    state: Mutex<State>,
    wake: Notify,
    flushed: Notify,
    db_ok: AtomicBool,
    written: AtomicU64,
    stored: AtomicU64,
    failures: AtomicU64,
    /// Records ever queued (replayed ones included) and ever stored, in
    /// journal order: everything queued before a moment is in Postgres once
    /// `stored_seq` reaches `queued_seq` of that moment.
    queued_seq: AtomicU64,
    stored_seq: AtomicU64,
}

/// Cheap to clone; all clones share one journal.
#[derive(Clone)]
pub struct Journal {
    inner: Arc<Inner>,
}

/// What `/metrics` and `/readyz` report about the journal.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct JournalStats {
    pub pending: usize,
    pub written: u64,
    pub stored: u64,
    pub flush_failures: u64,
    pub database_ok: bool,
    pub full: bool,
}

fn segment_path(dir: &Path, index: u64) -> PathBuf {
    dir.join(format!("journal-{index:012}.jsonl"))
}

fn segment_indices(dir: &Path) -> std::io::Result<Vec<u64>> {
    let mut out: Vec<u64> = std::fs::read_dir(dir)?
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().to_string();
            name.strip_prefix("journal-")?
                .strip_suffix(".jsonl")?
                .parse()
                .ok()
        })
        .collect();
    out.sort_unstable();
    Ok(out)
}

fn open_segment(dir: &Path, index: u64) -> std::io::Result<Segment> {
    let file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(segment_path(dir, index))?;
    let bytes = file.metadata()?.len();
    Ok(Segment { index, file, bytes })
}

impl Journal {
    /// Opens the journal in `cfg.dir`, loading whatever an earlier run left
    /// unflushed; returns the journal and how many records it replays.
    pub fn open(cfg: JournalConfig) -> Result<(Self, usize), JournalError> {
        std::fs::create_dir_all(&cfg.dir)?;
        let existing = segment_indices(&cfg.dir)?;
        let mut pending = VecDeque::new();
        let mut pending_completions = HashMap::new();
        for &index in &existing {
            let file = std::fs::File::open(segment_path(&cfg.dir, index))?;
            for (n, line) in std::io::BufReader::new(file).lines().enumerate() {
                let line = line?;
                match serde_json::from_str::<Record>(&line) {
                    Ok(rec) => {
                        if let Record::Completion(c) = &rec {
                            pending_completions.insert(c.id.clone(), c.team_id);
                        }
                        pending.push_back((index, rec));
                    }
                    // Only the last line of a segment can be torn (the
                    // process died mid-write, before acknowledging it).
                    Err(e) => {
                        tracing::warn!(segment = index, line = n + 1, error = %e, "skipping an unreadable journal line")
                    }
                }
            }
        }
        let replayed = pending.len();
        if replayed > 0 {
            tracing::info!(records = replayed, "replaying the journal into Postgres");
        }
        let next = existing.last().map_or(0, |i| i + 1);
        let segment = open_segment(&cfg.dir, next)?;
        let inner = Inner {
            cfg,
            state: Mutex::new(State {
                segment,
                pending,
                pending_completions,
            }),
            wake: Notify::new(),
            flushed: Notify::new(),
            db_ok: AtomicBool::new(true),
            written: AtomicU64::new(0),
            stored: AtomicU64::new(0),
            failures: AtomicU64::new(0),
            queued_seq: AtomicU64::new(replayed as u64),
            stored_seq: AtomicU64::new(0),
        };
        Ok((
            Self {
                inner: Arc::new(inner),
            },
            replayed,
        ))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.inner.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Writes a record to the journal. When this returns `Ok` the record
    /// survives the process dying; it reaches Postgres later.
    pub fn append(&self, rec: Record) -> Result<(), JournalError> {
        let mut line = serde_json::to_vec(&rec).map_err(std::io::Error::other)?;
        line.push(b'\n');
        let mut st = self.lock();
        if st.pending.len() >= self.inner.cfg.max_pending {
            tracing::error!(
                pending = st.pending.len(),
                "journal full: refusing writes until Postgres catches up"
            );
            return Err(JournalError::Full(st.pending.len()));
        }
        if st.segment.bytes > self.inner.cfg.segment_bytes {
            let next = st.segment.index + 1;
            st.segment = open_segment(&self.inner.cfg.dir, next)?;
        }
        // One write(2) per record: once it returns, the bytes belong to the
        // kernel and survive the process being killed.
        st.segment.file.write_all(&line)?;
        st.segment.bytes += line.len() as u64;
        let index = st.segment.index;
        if let Record::Completion(c) = &rec {
            st.pending_completions.insert(c.id.clone(), c.team_id);
        }
        st.pending.push_back((index, rec));
        self.inner.queued_seq.fetch_add(1, Ordering::SeqCst);
        drop(st);
        self.inner.written.fetch_add(1, Ordering::Relaxed);
        self.inner.wake.notify_one();
        Ok(())
    }

    /// The team of a completion that is still only in the journal.
    pub fn pending_owner(&self, completion_id: &str) -> Option<Uuid> {
        self.lock().pending_completions.get(completion_id).copied()
    }

    pub fn stats(&self) -> JournalStats {
        let pending = self.lock().pending.len();
        JournalStats {
            pending,
            written: self.inner.written.load(Ordering::Relaxed),
            stored: self.inner.stored.load(Ordering::Relaxed),
            flush_failures: self.inner.failures.load(Ordering::Relaxed),
            database_ok: self.inner.db_ok.load(Ordering::Relaxed),
            full: pending >= self.inner.cfg.max_pending,
        }
    }

    pub fn database_ok(&self) -> bool {
        self.inner.db_ok.load(Ordering::Relaxed)
    }

    /// Waits until everything written before this call is in Postgres
    /// (later writes do not delay it); false after `timeout`.
    pub async fn wait_flushed(&self, timeout: Duration) -> bool {
        let target = self.inner.queued_seq.load(Ordering::SeqCst);
        let done = || self.inner.stored_seq.load(Ordering::SeqCst) >= target;
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let flushed = self.inner.flushed.notified();
            if done() {
                return true;
            }
            self.inner.wake.notify_one();
            if tokio::time::timeout_at(deadline, flushed).await.is_err() {
                return done();
            }
        }
    }

    /// Runs the flusher until the process ends.
    pub fn spawn_flusher(&self, pool: PgPool) -> tokio::task::JoinHandle<()> {
        let journal = self.clone();
        tokio::spawn(async move { journal.flush_loop(pool).await })
    }

    async fn flush_loop(self, pool: PgPool) {
        let mut backoff = Duration::from_millis(50);
        loop {
            let batch: Vec<Record> = {
                let st = self.lock();
                st.pending
                    .iter()
                    .take(self.inner.cfg.batch)
                    .map(|(_, r)| r.clone())
                    .collect()
            };
            if batch.is_empty() {
                self.inner.flushed.notify_waiters();
                // Sleep until something is written (or check again in a while).
                let _ =
                    tokio::time::timeout(Duration::from_secs(1), self.inner.wake.notified()).await;
                continue;
            }
            match store_batch(&pool, &batch).await {
                Ok(()) => {
                    if !self.inner.db_ok.swap(true, Ordering::Relaxed) {
                        tracing::info!("Postgres is back; the journal is draining");
                    }
                    backoff = Duration::from_millis(50);
                    self.inner
                        .stored
                        .fetch_add(batch.len() as u64, Ordering::Relaxed);
                    self.forget(batch.len());
                    self.inner
                        .stored_seq
                        .fetch_add(batch.len() as u64, Ordering::SeqCst);
                    self.inner.flushed.notify_waiters();
                }
                Err(e) => {
                    if self.inner.db_ok.swap(false, Ordering::Relaxed) {
                        tracing::error!(error = %e, "Postgres unreachable; spooling to the journal");
                    }
                    self.inner.failures.fetch_add(1, Ordering::Relaxed);
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(2));
                }
            }
        }
    }

    /// Drops the first `n` pending records (now in Postgres) and deletes
    /// segments that hold nothing pending any more.
    fn forget(&self, n: usize) {
        let mut st = self.lock();
        for _ in 0..n {
            if let Some((_, Record::Completion(c))) = st.pending.pop_front() {
                st.pending_completions.remove(&c.id);
            }
        }
        let oldest_needed = st.pending.front().map_or(st.segment.index, |(i, _)| *i);
        let dir = self.inner.cfg.dir.clone();
        let current = st.segment.index;
        // Everything is stored and the segment has grown: start afresh.
        if st.pending.is_empty() && st.segment.bytes > 0 {
            match open_segment(&dir, current + 1) {
                Ok(seg) => st.segment = seg,
                Err(e) => tracing::warn!(error = %e, "could not start a new journal segment"),
            }
        }
        let keep_from = if st.pending.is_empty() {
            st.segment.index
        } else {
            oldest_needed
        };
        drop(st);
        if let Ok(indices) = segment_indices(&dir) {
            for i in indices.into_iter().filter(|&i| i < keep_from) {
                let _ = std::fs::remove_file(segment_path(&dir, i));
            }
        }
    }
}

/// Completions first, so votes in the same batch find their completion.
async fn store_batch(pool: &PgPool, batch: &[Record]) -> Result<(), flywheel_store::StoreError> {
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

#[cfg(test)]
mod tests {
    use super::*;

    fn completion(id: &str) -> Record {
        Record::Completion(NewCompletion {
            id: id.into(),
            team_id: Uuid::nil(),
            model_version_id: Uuid::nil(),
            end_user: None,
            request: serde_json::json!({}),
            output: "x".into(),
            finish_reason: "stop".into(),
            prompt_tokens: 1,
            completion_tokens: 1,
            latency_ms: 1.0,
            request_id: None,
            ttft_ms: None,
            started_at: None,
        })
    }

    fn dir() -> PathBuf {
        std::env::temp_dir().join(format!("fw-journal-{}", Uuid::new_v4()))
    }

    #[test]
    fn records_survive_reopening_and_torn_lines_are_skipped() {
        let d = dir();
        let (j, replayed) = Journal::open(JournalConfig::new(&d)).unwrap();
        assert_eq!(replayed, 0);
        j.append(completion("a")).unwrap();
        j.append(completion("b")).unwrap();
        assert_eq!(j.pending_owner("a"), Some(Uuid::nil()));
        drop(j);
        // A write cut short by a crash.
        let last = *segment_indices(&d).unwrap().last().unwrap();
        let mut f = std::fs::OpenOptions::new()
            .append(true)
            .open(segment_path(&d, last))
            .unwrap();
        f.write_all(br#"{"kind":"completion","id":"#).unwrap();
        let (j, replayed) = Journal::open(JournalConfig::new(&d)).unwrap();
        assert_eq!(replayed, 2);
        assert_eq!(j.stats().pending, 2);
        assert_eq!(j.pending_owner("b"), Some(Uuid::nil()));
    }

    #[test]
    fn a_full_journal_refuses_writes() {
        let mut cfg = JournalConfig::new(dir());
        cfg.max_pending = 2;
        let (j, _) = Journal::open(cfg).unwrap();
        j.append(completion("a")).unwrap();
        j.append(completion("b")).unwrap();
        assert!(matches!(
            j.append(completion("c")),
            Err(JournalError::Full(2))
        ));
        assert!(j.stats().full);
    }

    #[test]
    fn forgetting_deletes_finished_segments() {
        let d = dir();
        let mut cfg = JournalConfig::new(&d);
        cfg.segment_bytes = 10; // every record starts a new segment
        let (j, _) = Journal::open(cfg).unwrap();
        for id in ["a", "b", "c"] {
            j.append(completion(id)).unwrap();
        }
        assert!(segment_indices(&d).unwrap().len() >= 3);
        j.forget(2);
        assert_eq!(j.pending_owner("a"), None);
        assert_eq!(j.pending_owner("c"), Some(Uuid::nil()));
        let left = segment_indices(&d).unwrap();
        // The segment holding "c" and the current one remain.
        assert!(left.len() <= 2, "{left:?}");
        j.forget(1);
        assert_eq!(j.stats().pending, 0);
        assert_eq!(segment_indices(&d).unwrap().len(), 1);
    }
}
