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
//! What the journal promises, and against what:
//! - **One bad record never blocks the others.** A record Postgres refuses
//!   for its data (a constraint, a value it cannot store, a size limit) is
//!   found by splitting the batch, set aside in `dead-letters/`
//!   ([`dead_letter`]), counted and logged once; the rest go on. Only a
//!   database that cannot be reached (or refuses every write) stops the
//!   flush, and the log says which.
//! - **A journal belongs to one database.** Each segment starts with a
//!   header naming the database ([`DatabaseIdentity`]); opening a journal
//!   that holds records for another database fails.
//! - **A journal belongs to one gateway.** The folder's `LOCK` file is
//!   locked (`flock`) while the journal is open; a second gateway pointed
//!   at the same folder refuses to start, rather than both replaying and
//!   deleting the same segments. The lock goes with the process, however
//!   it ends.
//! - **Damage is detected.** Every line carries a checksum; a last line cut
//!   short by a crash is skipped and counted, a damaged line elsewhere is set
//!   aside as text.
//! - **Durability follows [`SyncPolicy`]**: with `always` each record is on
//!   stable storage (fsync) before it is acknowledged; with `batch` (the
//!   default) too, syncs being shared by the writes of a few milliseconds;
//!   with `never` a record survives the process being killed but not the
//!   machine losing power.
//!
//! Records are lines in numbered segment files ([`format`]); a segment is
//! deleted once every record in it is in Postgres or set aside.

pub mod dead_letter;
pub mod format;
mod record;

use std::collections::{HashMap, VecDeque};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use flywheel_store::completions::Owner;

use flywheel_store::PgPool;
use flywheel_store::instance::DatabaseIdentity;
use serde::{Deserialize, Serialize};
use tokio::sync::{Notify, watch};
use tracing::Instrument;

pub use dead_letter::{DeadLetter, DeadLetters};
pub use record::Record;
use record::store_batch;

/// When a record reaches stable storage (`FLYWHEEL_JOURNAL_SYNC`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SyncPolicy {
    /// fsync after every record, before acknowledging it.
    Always,
    /// Group commit: one fsync for all the records written within
    /// `sync_interval`, before acknowledging any of them.
    #[default]
    Batch,
    /// No fsync: the kernel writes the data back when it likes. Survives the
    /// process dying, not the machine.
    Never,
}

impl std::str::FromStr for SyncPolicy {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "always" => Ok(Self::Always),
            "batch" => Ok(Self::Batch),
            "never" => Ok(Self::Never),
            other => Err(format!("{other:?} is not always, batch or never")),
        }
    }
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
    pub sync: SyncPolicy,
    /// How long `batch` gathers writes before one fsync covers them.
    pub sync_interval: Duration,
}

impl JournalConfig {
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Self {
            dir: dir.into(),
            max_pending: 1_000_000,
            batch: 2000,
            segment_bytes: 16 << 20,
            sync: SyncPolicy::default(),
            sync_interval: Duration::from_millis(2),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum JournalError {
    #[error("the journal is full ({0} records wait for the database)")]
    Full(usize),
    #[error("journal: {0}")]
    Io(#[from] std::io::Error),
    #[error(
        "the journal in {dir} is in use by another process (its LOCK file is locked): \
         each gateway needs a journal folder of its own (FLYWHEEL_JOURNAL_DIR)"
    )]
    Locked { dir: PathBuf },
    #[error(
        "the journal in {dir} holds {records} records for {theirs}, but this gateway is \
         connected to {ours}. Start it against that database to let them drain, or point \
         FLYWHEEL_JOURNAL_DIR at another folder."
    )]
    OtherDatabase {
        dir: PathBuf,
        records: usize,
        theirs: Box<DatabaseIdentity>,
        ours: Box<DatabaseIdentity>,
    },
}

/// What opening found in the folder.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Opened {
    /// Records left unflushed by an earlier run, to be stored again.
    pub replayed: usize,
    /// Last lines cut short by a crash, skipped.
    pub torn: usize,
    /// Damaged lines set aside as dead letters.
    pub corrupt: usize,
}

struct Segment {
    index: u64,
    file: Arc<std::fs::File>,
    bytes: u64,
    /// Whether its header has been written (it is, with the first record).
    started: bool,
}

struct State {
    segment: Segment,
    /// Not yet in Postgres, in journal order, each with its segment.
    pending: VecDeque<(u64, Record)>,
    /// Completions not yet in Postgres: id -> team, so votes on them are
    /// accepted before the row exists.
    pending_completions: HashMap<String, Owner>,
    /// Records this process wrote, for the syncer.
    written_seq: u64,
}

/// Why the flusher is not keeping up, if it is not.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum FlushState {
    #[default]
    Ok,
    /// The database cannot be reached.
    Unreachable(String),
    /// The database answers but refuses every write (not for any one
    /// record's data: a missing table, permissions, read-only).
    Refusing(String),
}

struct Inner {
    /// Held, locked, while the journal is open.
    _lock: std::fs::File,
    cfg: JournalConfig,
    database: DatabaseIdentity,
    dead: DeadLetters,
    state: Mutex<State>,
    wake: Notify,
    flushed: Notify,
    flush_state: Mutex<FlushState>,
    /// Highest `written_seq` known to be on stable storage.
    synced: watch::Sender<u64>,
    /// Wakes the group-commit thread.
    sync_wake: Option<std::sync::mpsc::SyncSender<()>>,
    written: AtomicU64,
    stored: AtomicU64,
    set_aside: AtomicU64,
    failures: AtomicU64,
    syncs: AtomicU64,
    opened: Opened,
    /// Records ever queued (replayed ones included) and ever stored or set
    /// aside, in journal order: everything queued before a moment is done
    /// once `stored_seq` reaches `queued_seq` of that moment.
    queued_seq: AtomicU64,
    stored_seq: AtomicU64,
}

/// Cheap to clone; all clones share one journal.
#[derive(Clone)]
pub struct Journal {
    inner: Arc<Inner>,
}

/// What `/metrics` and `/readyz` report about the journal.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JournalStats {
    pub pending: usize,
    pub written: u64,
    pub stored: u64,
    pub flush_failures: u64,
    /// Set aside by this process.
    pub set_aside: u64,
    /// In the dead-letter folder now.
    pub dead_letters: usize,
    pub syncs: u64,
    pub opened: Opened,
    pub flush: FlushState,
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

fn open_segment(dir: &Path, index: u64, sync: SyncPolicy) -> std::io::Result<Segment> {
    let file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(segment_path(dir, index))?;
    if sync != SyncPolicy::Never {
        // The new file's name must survive a power loss too.
        std::fs::File::open(dir)?.sync_all()?;
    }
    let bytes = file.metadata()?.len();
    Ok(Segment {
        index,
        file: Arc::new(file),
        bytes,
        started: bytes > 0,
    })
}

/// The folder's `LOCK` file, locked for this process: the error says so
/// when another holds it.
fn lock(dir: &Path) -> Result<std::fs::File, JournalError> {
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(dir.join("LOCK"))?;
    match file.try_lock() {
        Ok(()) => Ok(file),
        Err(std::fs::TryLockError::WouldBlock) => Err(JournalError::Locked {
            dir: dir.to_path_buf(),
        }),
        Err(std::fs::TryLockError::Error(e)) => Err(e.into()),
    }
}

/// Whose a journalled completion is.
fn owner_of(c: &flywheel_store::completions::NewCompletion) -> Owner {
    Owner {
        team_id: c.team_id,
        model_version_id: c.model_version_id,
    }
}

impl Journal {
    /// Opens the journal in `cfg.dir` for `database`, loading whatever an
    /// earlier run left unflushed. Fails when the folder holds records for
    /// another database.
    pub fn open(
        cfg: JournalConfig,
        database: DatabaseIdentity,
    ) -> Result<(Self, Opened), JournalError> {
        std::fs::create_dir_all(&cfg.dir)?;
        let lock = lock(&cfg.dir)?;
        let dead = DeadLetters::new(&cfg.dir);
        let existing = segment_indices(&cfg.dir)?;
        let mut pending = VecDeque::new();
        let mut pending_completions = HashMap::new();
        let mut opened = Opened::default();
        let mut contents = Vec::new();
        for &index in &existing {
            let path = segment_path(&cfg.dir, index);
            let c = format::read_segment(&path)?;
            if let Some(h) = &c.header
                && h.database.id != database.id
                && !c.records.is_empty()
            {
                return Err(JournalError::OtherDatabase {
                    dir: cfg.dir.clone(),
                    records: c.records.len(),
                    theirs: Box::new(h.database.clone()),
                    ours: Box::new(database),
                });
            }
            contents.push((index, path, c));
        }
        for (index, path, c) in contents {
            if c.torn > 0 {
                tracing::warn!(segment = %path.display(), "skipping a journal line cut short by a crash");
            }
            opened.torn += c.torn;
            for bad in &c.corrupt {
                let id = dead.put(&dead_letter::unreadable(bad, &path, &database))?;
                tracing::error!(segment = %path.display(), line = bad.line, why = bad.why, dead_letter = id,
                    "a damaged journal line was set aside");
            }
            opened.corrupt += c.corrupt.len();
            for rec in c.records {
                if let Record::Completion(c) = &rec {
                    pending_completions.insert(c.id.clone(), owner_of(c));
                }
                pending.push_back((index, rec));
            }
        }
        opened.replayed = pending.len();
        if opened.replayed > 0 {
            tracing::info!(
                records = opened.replayed,
                "replaying the journal into Postgres"
            );
        }
        let next = existing.last().map_or(0, |i| i + 1);
        let segment = open_segment(&cfg.dir, next, cfg.sync)?;
        let (sync_wake, sync_rx) = match cfg.sync {
            SyncPolicy::Batch => {
                let (tx, rx) = std::sync::mpsc::sync_channel(1);
                (Some(tx), Some(rx))
            }
            _ => (None, None),
        };
        let inner = Arc::new(Inner {
            _lock: lock,
            dead,
            database,
            state: Mutex::new(State {
                segment,
                pending,
                pending_completions,
                written_seq: 0,
            }),
            wake: Notify::new(),
            flushed: Notify::new(),
            flush_state: Mutex::new(FlushState::Ok),
            synced: watch::Sender::new(0),
            sync_wake,
            written: AtomicU64::new(0),
            stored: AtomicU64::new(0),
            set_aside: AtomicU64::new(0),
            failures: AtomicU64::new(0),
            syncs: AtomicU64::new(0),
            opened,
            queued_seq: AtomicU64::new(opened.replayed as u64),
            stored_seq: AtomicU64::new(0),
            cfg,
        });
        if let Some(rx) = sync_rx {
            let weak = Arc::downgrade(&inner);
            std::thread::Builder::new()
                .name("flywheel-journal-sync".into())
                .spawn(move || group_commit(weak, rx))?;
        }
        Ok((Self { inner }, opened))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.inner.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Writes a record to the journal. When this returns `Ok` the record
    /// survives the process dying (and, unless the policy is `never`, the
    /// machine losing power); it reaches Postgres later.
    #[tracing::instrument(name = "journal.append", skip_all)]
    pub async fn append(&self, rec: Record) -> Result<(), JournalError> {
        let (seq, file) = self.write(rec)?;
        match self.inner.cfg.sync {
            SyncPolicy::Never => {}
            SyncPolicy::Always => {
                tokio::task::spawn_blocking(move || file.sync_data())
                    .await
                    .map_err(std::io::Error::other)??;
                self.inner.syncs.fetch_add(1, Ordering::Relaxed);
            }
            SyncPolicy::Batch => {
                if let Some(wake) = &self.inner.sync_wake {
                    let _ = wake.try_send(());
                }
                let mut synced = self.inner.synced.subscribe();
                synced
                    .wait_for(|&s| s >= seq)
                    .await
                    .map_err(|_| std::io::Error::other("the journal's sync thread stopped"))?;
            }
        }
        Ok(())
    }

    /// The synchronous part of [`append`](Self::append): one `write(2)`;
    /// returns the record's sequence number and its file.
    fn write(&self, rec: Record) -> Result<(u64, Arc<std::fs::File>), JournalError> {
        let line = format::encode(&rec)?;
        let cfg = &self.inner.cfg;
        let mut st = self.lock();
        if st.pending.len() >= cfg.max_pending {
            tracing::error!(
                pending = st.pending.len(),
                "journal full: refusing writes until Postgres catches up"
            );
            return Err(JournalError::Full(st.pending.len()));
        }
        if st.segment.bytes > cfg.segment_bytes {
            if cfg.sync != SyncPolicy::Never {
                // Its records must be on disk before the syncer moves on.
                st.segment.file.sync_data()?;
            }
            let next = st.segment.index + 1;
            st.segment = open_segment(&cfg.dir, next, cfg.sync)?;
        }
        let mut bytes = Vec::with_capacity(line.len() + 160);
        if !st.segment.started {
            bytes = format::encode(&format::Header {
                journal: format::FORMAT,
                database: self.inner.database.clone(),
            })?;
        }
        bytes.extend_from_slice(&line);
        // One write(2) per record: once it returns, the bytes belong to the
        // kernel and survive the process being killed.
        if let Err(e) = (&*st.segment.file).write_all(&bytes) {
            // A short write (a full disk) leaves part of a line: cut it off,
            // or the next record would be read back glued to it, and lost.
            if let Err(cut) = st.segment.file.set_len(st.segment.bytes) {
                tracing::error!(error = %cut, "could not cut a partial journal record");
            }
            return Err(e.into());
        }
        st.segment.started = true;
        st.segment.bytes += bytes.len() as u64;
        let index = st.segment.index;
        if let Record::Completion(c) = &rec {
            st.pending_completions.insert(c.id.clone(), owner_of(c));
        }
        st.pending.push_back((index, rec));
        st.written_seq += 1;
        let seq = st.written_seq;
        let file = st.segment.file.clone();
        self.inner.queued_seq.fetch_add(1, Ordering::SeqCst);
        drop(st);
        self.inner.written.fetch_add(1, Ordering::Relaxed);
        self.inner.wake.notify_one();
        Ok((seq, file))
    }

    /// The team of a completion that is still only in the journal.
    pub fn pending_owner(&self, completion_id: &str) -> Option<Owner> {
        self.lock().pending_completions.get(completion_id).copied()
    }

    /// The database this journal's records are for.
    pub fn database(&self) -> &DatabaseIdentity {
        &self.inner.database
    }

    pub fn dead_letters(&self) -> &DeadLetters {
        &self.inner.dead
    }

    pub fn stats(&self) -> JournalStats {
        let pending = self.lock().pending.len();
        let flush = self.flush_state();
        let i = &self.inner;
        JournalStats {
            pending,
            written: i.written.load(Ordering::Relaxed),
            stored: i.stored.load(Ordering::Relaxed),
            flush_failures: i.failures.load(Ordering::Relaxed),
            set_aside: i.set_aside.load(Ordering::Relaxed),
            dead_letters: i.dead.count(),
            syncs: i.syncs.load(Ordering::Relaxed),
            opened: i.opened,
            database_ok: !matches!(flush, FlushState::Unreachable(_)),
            flush,
            full: pending >= i.cfg.max_pending,
        }
    }

    pub fn flush_state(&self) -> FlushState {
        self.inner
            .flush_state
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// False while the database cannot be reached.
    pub fn database_ok(&self) -> bool {
        !matches!(self.flush_state(), FlushState::Unreachable(_))
    }

    /// Waits until everything written before this call is in Postgres or
    /// set aside (later writes do not delay it); false after `timeout`.
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

    fn set_flush_state(&self, new: FlushState) {
        let mut st = self
            .inner
            .flush_state
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if *st == new {
            return;
        }
        // Logged when it changes, saying which of the two it is.
        match (&*st, &new) {
            (_, FlushState::Unreachable(e)) => {
                tracing::error!(error = %e, "Postgres is unreachable; writes wait in the journal")
            }
            (_, FlushState::Refusing(e)) => {
                tracing::error!(error = %e, "Postgres refuses every write; they wait in the journal")
            }
            (_, FlushState::Ok) => {
                tracing::info!("Postgres takes writes again; the journal drains")
            }
        }
        *st = new;
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
            // A trace of its own: one flush stores the records of many
            // requests.
            let span = tracing::info_span!(
                "journal.flush",
                records = batch.len() as i64,
                stored = tracing::field::Empty
            );
            let (done, stopped) = self
                .store_or_set_aside(&pool, &batch)
                .instrument(span.clone())
                .await;
            span.record("stored", done as i64);
            if done > 0 {
                self.forget(done);
                self.inner
                    .stored_seq
                    .fetch_add(done as u64, Ordering::SeqCst);
                self.inner.flushed.notify_waiters();
            }
            match stopped {
                None => {
                    self.set_flush_state(FlushState::Ok);
                    backoff = Duration::from_millis(50);
                }
                Some(state) => {
                    self.set_flush_state(state);
                    self.inner.failures.fetch_add(1, Ordering::Relaxed);
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(2));
                }
            }
        }
    }

    /// Stores `batch` in order. When Postgres refuses a part for its data,
    /// the part is split until the refused records are found; those are set
    /// aside and the rest stored. Returns how many records from the front
    /// are done (stored or set aside), and why it stopped early, if it did.
    async fn store_or_set_aside(
        &self,
        pool: &PgPool,
        batch: &[Record],
    ) -> (usize, Option<FlushState>) {
        let mut done = 0;
        // (start, end) ranges still to store, the leftmost last: processed in order.
        let mut todo = vec![(0, batch.len())];
        while let Some((start, end)) = todo.pop() {
            let e = match store_batch(pool, &batch[start..end]).await {
                Ok(()) => {
                    self.inner
                        .stored
                        .fetch_add((end - start) as u64, Ordering::Relaxed);
                    done = end;
                    continue;
                }
                Err(e) => e,
            };
            let Some(refusal) = e.refusal() else {
                let state = if e.is_unreachable() {
                    FlushState::Unreachable(e.to_string())
                } else {
                    FlushState::Refusing(e.to_string())
                };
                return (done, Some(state));
            };
            if end - start > 1 {
                let mid = start + (end - start) / 2;
                todo.push((mid, end));
                todo.push((start, mid));
                continue;
            }
            let rec = &batch[start];
            let letter = DeadLetter {
                id: String::new(),
                set_aside_at: chrono::Utc::now(),
                reason: refusal.message.clone(),
                code: Some(refusal.code.clone()),
                database: self.inner.database.clone(),
                record: Some(rec.clone()),
                raw: None,
            };
            match self.inner.dead.put(&letter) {
                Ok(id) => {
                    tracing::warn!(
                        record = rec.id(),
                        code = refusal.code,
                        reason = refusal.message,
                        dead_letter = id,
                        "Postgres refused a record; it is set aside and the others go on"
                    );
                    self.inner.set_aside.fetch_add(1, Ordering::Relaxed);
                    done = end;
                }
                // Without a place to keep it, it stays in the journal.
                Err(io) => {
                    return (
                        done,
                        Some(FlushState::Refusing(format!(
                            "record {} was refused ({}) and could not be set aside: {io}",
                            rec.id(),
                            refusal.message
                        ))),
                    );
                }
            }
        }
        (done, None)
    }

    /// Drops the first `n` pending records (now in Postgres or set aside)
    /// and deletes segments that hold nothing pending any more.
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
        if st.pending.is_empty() && st.segment.started {
            match open_segment(&dir, current + 1, self.inner.cfg.sync) {
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

/// The `batch` policy's thread: woken by a write, it waits the interval
/// for more, then one fsync covers every record written until then.
fn group_commit(journal: Weak<Inner>, wake: std::sync::mpsc::Receiver<()>) {
    while wake.recv().is_ok() {
        let Some(inner) = journal.upgrade() else {
            return;
        };
        std::thread::sleep(inner.cfg.sync_interval);
        let (seq, file) = {
            let st = inner.state.lock().unwrap_or_else(|p| p.into_inner());
            (st.written_seq, st.segment.file.clone())
        };
        match file.sync_data() {
            Ok(()) => {
                inner.syncs.fetch_add(1, Ordering::Relaxed);
                inner.synced.send_replace(seq);
            }
            Err(e) => {
                tracing::error!(error = %e, "journal fsync failed; retrying");
                let _ = inner.sync_wake.as_ref().map(|w| w.try_send(()));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use flywheel_store::completions::NewCompletion;
    use uuid::Uuid;

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
            trace_id: None,
            ttft_ms: None,
            started_at: None,
            route: "champion".into(),
            canary_id: None,
        })
    }

    fn db(name: &str) -> DatabaseIdentity {
        DatabaseIdentity {
            id: Uuid::from_bytes([name.as_bytes()[0]; 16]),
            name: name.into(),
            system_identifier: None,
        }
    }

    fn dir() -> PathBuf {
        std::env::temp_dir().join(format!("fw-journal-{}", Uuid::new_v4()))
    }

    /// Opens `cfg`'s journal for database `name`. One just dropped may
    /// still be held for a moment by its group-commit thread, finishing a
    /// sync: its lock is waited for (a second at most).
    fn open_as(cfg: JournalConfig, name: &str) -> Result<(Journal, Opened), JournalError> {
        for _ in 0..50 {
            match Journal::open(cfg.clone(), db(name)) {
                Err(JournalError::Locked { .. }) => {
                    std::thread::sleep(std::time::Duration::from_millis(20))
                }
                other => return other,
            }
        }
        Journal::open(cfg, db(name))
    }

    fn open(cfg: JournalConfig) -> (Journal, Opened) {
        open_as(cfg, "a").unwrap()
    }

    fn last_segment(d: &Path) -> PathBuf {
        segment_path(d, *segment_indices(d).unwrap().last().unwrap())
    }

    #[tokio::test]
    async fn records_survive_reopening_and_torn_lines_are_skipped_and_counted() {
        let d = dir();
        let (j, opened) = open(JournalConfig::new(&d));
        assert_eq!(opened, Opened::default());
        j.append(completion("a")).await.unwrap();
        j.append(completion("b")).await.unwrap();
        assert_eq!(j.pending_owner("a").map(|o| o.team_id), Some(Uuid::nil()));
        drop(j);
        // A write cut short by a crash.
        let mut f = std::fs::OpenOptions::new()
            .append(true)
            .open(last_segment(&d))
            .unwrap();
        f.write_all(br#"0badf00d {"kind":"completion","id":"#)
            .unwrap();
        let (j, opened) = open(JournalConfig::new(&d));
        assert_eq!((opened.replayed, opened.torn, opened.corrupt), (2, 1, 0));
        assert_eq!(j.stats().pending, 2);
        assert_eq!(j.pending_owner("b").map(|o| o.team_id), Some(Uuid::nil()));
    }

    #[tokio::test]
    async fn a_damaged_line_in_the_middle_is_set_aside_not_parsed() {
        let d = dir();
        let (j, _) = open(JournalConfig::new(&d));
        for id in ["a", "b", "c"] {
            j.append(completion(id)).await.unwrap();
        }
        drop(j);
        let path = last_segment(&d);
        let text = std::fs::read_to_string(&path).unwrap();
        // Line 3 is record "b" (line 1 is the header): flip one character of it.
        let damaged = text.replacen(r#""id":"b""#, r#""id":"B""#, 1);
        assert_ne!(text, damaged);
        std::fs::write(&path, damaged).unwrap();
        let (j, opened) = open(JournalConfig::new(&d));
        assert_eq!((opened.replayed, opened.torn, opened.corrupt), (2, 0, 1));
        assert_eq!(j.pending_owner("b"), None);
        let letters = j.dead_letters().list().unwrap();
        assert_eq!(letters.len(), 1);
        assert!(letters[0].reason.contains("checksum"), "{:?}", letters[0]);
        assert!(letters[0].raw.as_deref().unwrap().contains(r#""id":"B""#));
    }

    #[tokio::test]
    async fn a_journal_for_another_database_is_refused() {
        let d = dir();
        let (j, _) = open(JournalConfig::new(&d));
        j.append(completion("a")).await.unwrap();
        drop(j);
        let err = open_as(JournalConfig::new(&d), "b")
            .err()
            .expect("another database");
        let text = err.to_string();
        assert!(text.contains("1 records for database \"a\""), "{text}");
        assert!(text.contains("connected to database \"b\""), "{text}");
        // Its own database opens it.
        assert_eq!(open(JournalConfig::new(&d)).1.replayed, 1);
    }

    #[tokio::test]
    async fn a_journal_open_in_one_place_is_refused_in_another_until_closed() {
        let d = dir();
        let (j, _) = open(JournalConfig::new(&d));
        j.append(completion("a")).await.unwrap();
        let err = Journal::open(JournalConfig::new(&d), db("a"))
            .err()
            .expect("the folder is taken");
        assert!(matches!(err, JournalError::Locked { .. }), "{err}");
        assert!(err.to_string().contains("FLYWHEEL_JOURNAL_DIR"), "{err}");
        drop(j);
        assert_eq!(open(JournalConfig::new(&d)).1.replayed, 1);
    }

    #[tokio::test]
    async fn a_full_journal_refuses_writes() {
        let mut cfg = JournalConfig::new(dir());
        cfg.max_pending = 2;
        let (j, _) = open(cfg);
        j.append(completion("a")).await.unwrap();
        j.append(completion("b")).await.unwrap();
        assert!(matches!(
            j.append(completion("c")).await,
            Err(JournalError::Full(2))
        ));
        assert!(j.stats().full);
    }

    #[tokio::test]
    async fn each_sync_policy_syncs_as_it_says() {
        for (policy, at_least, at_most) in [
            (SyncPolicy::Never, 0, 0),
            (SyncPolicy::Always, 20, 20),
            (SyncPolicy::Batch, 1, 20),
        ] {
            let mut cfg = JournalConfig::new(dir());
            cfg.sync = policy;
            cfg.sync_interval = Duration::from_millis(20);
            let (j, _) = open(cfg);
            // Twenty writers at once: `batch` covers them with few syncs.
            let writes: Vec<_> = (0..20)
                .map(|i| {
                    let j = j.clone();
                    tokio::spawn(async move { j.append(completion(&format!("c{i}"))).await })
                })
                .collect();
            for w in writes {
                w.await.unwrap().unwrap();
            }
            let syncs = j.stats().syncs;
            assert!(
                (at_least..=at_most).contains(&syncs),
                "{policy:?}: {syncs} syncs for 20 records"
            );
            if policy == SyncPolicy::Batch {
                assert!(syncs < 10, "batch shares syncs: {syncs}");
            }
        }
    }

    #[tokio::test]
    async fn forgetting_deletes_finished_segments() {
        let d = dir();
        let mut cfg = JournalConfig::new(&d);
        cfg.segment_bytes = 10; // every record starts a new segment
        let (j, _) = open(cfg);
        for id in ["a", "b", "c"] {
            j.append(completion(id)).await.unwrap();
        }
        assert!(segment_indices(&d).unwrap().len() >= 3);
        j.forget(2);
        assert_eq!(j.pending_owner("a"), None);
        assert_eq!(j.pending_owner("c").map(|o| o.team_id), Some(Uuid::nil()));
        let left = segment_indices(&d).unwrap();
        // The segment holding "c" and the current one remain.
        assert!(left.len() <= 2, "{left:?}");
        j.forget(1);
        assert_eq!(j.stats().pending, 0);
        assert_eq!(segment_indices(&d).unwrap().len(), 1);
    }
}
