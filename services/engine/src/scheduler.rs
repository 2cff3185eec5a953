//! The engine thread: one thread owns the model and runs every admitted
//! request together. Each step, sequences that are generating contribute one
//! token each and sequences still reading their prompt contribute a chunk of
//! it, within a token budget, so a long prompt never stalls the others for
//! long (continuous batching with chunked prefill). New requests join
//! between steps; finished or abandoned ones leave and free their cache at
//! once. Waiting requests are admitted fairly between tenants (teams): a
//! free slot goes to the tenant with the fewest sequences running, so one
//! team's flood cannot hold every slot while another team waits; a waiting
//! request whose client went away leaves the queue at once.
//!
//! A step has three parts, as vLLM's engine core has: [`Scheduler::plan`]
//! decides which sequences run and how many tokens each brings,
//! [`Scheduler::execute`] runs the step model once over all of them, and
//! [`Scheduler::update`] samples, streams and retires.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::sync::mpsc::Receiver;
use std::time::{Duration, Instant};

use flywheel_model::IncrementalDecoder;
use tokio::sync::mpsc::UnboundedSender;

use crate::sampling::{Sampler, top_n};
use crate::step::{BatchItem, StepModel};
use crate::stop::StopMatcher;
use crate::types::{
    EngineConfig, Event, FinishReason, GenerateRequest, Scheduling, Shared, TokenLogprob,
    TopLogprob,
};
use crate::{EngineError, Result};

pub(crate) struct Job {
    pub req: GenerateRequest,
    pub events: UnboundedSender<Event>,
    /// The span that submitted the request (the gateway's request, an
    /// evaluation job): the parent of the request's phases.
    parent: tracing::Span,
    /// The phase the request is in, as a span that ends with it:
    /// `engine.queue` from submission to admission, `engine.prefill` from
    /// there to the first token, `engine.decode` from there to the end.
    phase: tracing::Span,
}

impl Job {
    /// A request submitted from within the current span.
    pub(crate) fn new(req: GenerateRequest, events: UnboundedSender<Event>) -> Self {
        let parent = tracing::Span::current();
        let phase = tracing::info_span!(parent: &parent, "engine.queue");
        Self {
            req,
            events,
            parent,
            phase,
        }
    }
}

pub(crate) fn spawn<M: StepModel>(
    model: M,
    shared: Arc<Shared>,
    cfg: EngineConfig,
    rx: Receiver<Job>,
) -> Result<()> {
    std::thread::Builder::new()
        .name("flywheel-engine".into())
        .spawn(move || Scheduler::new(model, shared, cfg).run(rx))
        .map_err(|e| EngineError::Load(format!("engine thread: {e}")))?;
    Ok(())
}

/// Under a `response_format`, a sampled (not greedy) request draws from the
/// this many best tokens that keep the output valid.
const JSON_SAMPLED_FROM: usize = 64;

/// One request in the running batch.
struct Seq<C> {
    job: Job,
    adapter: Option<Arc<crate::adapter::Adapter>>,
    cache: C,
    sampler: Sampler,
    decoder: IncrementalDecoder,
    stops: StopMatcher,
    /// Where the output stands against its `response_format`, if any.
    json: Option<crate::grammar::Matcher>,
    /// Tokens of the bytes the `response_format` forces next, not yet
    /// emitted: one per step, or all at once when jumping forward.
    forced_run: std::collections::VecDeque<u32>,
    /// Whether this sequence jumps forward (not with log-probabilities,
    /// which need a forward pass at every token).
    jump: bool,
    /// Prompt tokens already run through the model.
    prefilled: usize,
    /// The tokens to feed next, once the prompt is done: the one chosen
    /// last, and the forced ones after it when jumping forward.
    next: Vec<u32>,
    /// Every token written so far, in order (what the cache holds after
    /// the prompt, when the sequence is kept for reuse).
    output: Vec<u32>,
    /// The guessed tokens at the end of `next`, checked when it is fed.
    drafted: Vec<u32>,
    /// Tokens guessed so far, and of them those the model kept; and the
    /// steps since the last guess (see [`MIN_KEPT`]).
    guessed: usize,
    guessed_kept: usize,
    since_guess: usize,
    generated: usize,
    admitted: Instant,
    first_token: bool,
}

/// One step's plan: per active sequence, the tokens it brings (0: it sits
/// this step out), and the indices of those that take part.
struct Plan {
    take: Vec<usize>,
    who: Vec<usize>,
    /// Prompt tokens in this step under fair scheduling, whose step time
    /// is held near the target.
    shared_prompt: usize,
}

/// Fewest prompt tokens a shared step carries, however slow steps are.
const MIN_PROMPT_CAP: usize = 16;

/// The prompt tokens a shared step may carry next, from the last one,
/// which carried `carried` and took `took`: what it carried, cut in
/// proportion, when it overran `target`; half as much again when it took
/// less than half of it with the cap full (a step that carried less says
/// nothing about more); never past `max` (the step budget).
fn next_prompt_cap(
    cap: usize,
    carried: usize,
    took: Duration,
    target: Duration,
    max: usize,
) -> usize {
    let cap = if took > target {
        (carried as f64 * target.as_secs_f64() / took.as_secs_f64()) as usize
    } else if took < target / 2 && carried >= cap {
        cap + cap / 2 + 1
    } else {
        cap
    };
    cap.clamp(MIN_PROMPT_CAP.min(max), max)
}

/// Why a sequence left the batch.
enum End {
    Finished,
    Cancelled,
}

struct Scheduler<M: StepModel> {
    model: M,
    shared: Arc<Shared>,
    cfg: EngineConfig,
    active: Vec<Seq<M::Cache>>,
    /// Submitted, not yet admitted, oldest first.
    waiting: std::collections::VecDeque<Job>,
    /// When each tenant last had a request admitted (a count of admissions).
    last_admitted: std::collections::HashMap<u64, u64>,
    admissions: u64,
    /// Prompt tokens a step may carry (fair scheduling), kept so that a
    /// step takes about `cfg.step_target`.
    prompt_cap: usize,
    /// Finished sequences' caches, for prompts that begin the same way.
    prefixes: crate::prefix::PrefixCache<M::Cache>,
}

impl<M: StepModel> Scheduler<M> {
    fn new(model: M, shared: Arc<Shared>, cfg: EngineConfig) -> Self {
        Self {
            model,
            shared,
            active: Vec::new(),
            waiting: Default::default(),
            last_admitted: Default::default(),
            admissions: 0,
            prompt_cap: cfg.max_batched_tokens.max(1),
            prefixes: crate::prefix::PrefixCache::new(cfg.prefix_cache_bytes),
            cfg,
        }
    }

    fn run(mut self, rx: Receiver<Job>) {
        loop {
            // Wait for work when idle; otherwise take everything submitted
            // without waiting.
            if self.active.is_empty() && self.waiting.is_empty() {
                match rx.recv() {
                    Ok(job) => self.waiting.push_back(job),
                    Err(_) => return,
                }
            }
            while let Ok(job) = rx.try_recv() {
                self.waiting.push_back(job);
            }
            self.drop_abandoned();
            self.fill();
            self.drop_cancelled();
            if !self.active.is_empty() {
                self.step();
            }
        }
    }

    /// Admits waiting requests while the batch has room, and the memory
    /// for the next one's keys and values: a request is held back (not
    /// passed over) until the running sequences leave room for it, though
    /// one always runs (the model was loaded only if one of the full
    /// context fits).
    fn fill(&mut self) {
        while self.active.len() < self.cfg.max_batch.max(1) {
            let Some(i) = self.next_fair() else { break };
            if !self.active.is_empty() && !self.has_room_for(&self.waiting[i].req) {
                self.shared
                    .stats
                    .held_for_memory
                    .fetch_add(1, Ordering::Relaxed);
                break;
            }
            let Some(job) = self.waiting.remove(i) else {
                break;
            };
            if self.cfg.scheduling == Scheduling::Fair {
                self.admissions += 1;
                self.last_admitted.insert(job.req.tenant, self.admissions);
            }
            self.admit(job);
        }
    }

    /// The keys and values a request may come to hold: its prompt, its
    /// answer and a draft, within the context.
    fn reservation(&self, req: &GenerateRequest) -> u64 {
        let most = req.prompt_ids.len() + req.params.max_tokens + DRAFT_TOKENS;
        self.shared.kv_per_token * most.min(self.model.config().context_length) as u64
    }

    /// Whether `req`'s [`reservation`](Self::reservation) fits beside the
    /// running sequences' within the engine's budget for them.
    fn has_room_for(&self, req: &GenerateRequest) -> bool {
        let Some(budget) = self.shared.kv_budget else {
            return true;
        };
        let running: u64 = self
            .active
            .iter()
            .map(|s| self.reservation(&s.job.req))
            .sum();
        running + self.reservation(req) <= budget
    }

    /// Which waiting request goes next: the oldest under FIFO; else the one
    /// whose tenant has the fewest sequences running, among equals the
    /// tenant served least recently, then the oldest request (round robin
    /// between tenants, first come within one).
    fn next_fair(&self) -> Option<usize> {
        if self.waiting.is_empty() {
            return None;
        }
        if self.cfg.scheduling == Scheduling::Fifo {
            return Some(0);
        }
        let running = |tenant: u64| {
            self.active
                .iter()
                .filter(|s| s.job.req.tenant == tenant)
                .count()
        };
        let served = |tenant: u64| self.last_admitted.get(&tenant).copied().unwrap_or(0);
        (0..self.waiting.len()).min_by_key(|&i| {
            let tenant = self.waiting[i].req.tenant;
            (running(tenant), served(tenant), i)
        })
    }

    /// Waiting requests whose client went away leave the queue.
    fn drop_abandoned(&mut self) {
        let before = self.waiting.len();
        let shared = &self.shared;
        self.waiting.retain(|job| {
            let gone = job.events.is_closed();
            if gone {
                shared.waiting().leave(job.req.tenant);
            }
            !gone
        });
        let gone = (before - self.waiting.len()) as u64;
        shared.stats.cancelled.fetch_add(gone, Ordering::Relaxed);
    }

    /// Sequences whose client went away leave the batch.
    fn drop_cancelled(&mut self) {
        let mut i = 0;
        while i < self.active.len() {
            if self.active[i].job.events.is_closed() {
                let s = self.active.remove(i);
                self.keep(s);
                self.shared.stats.cancelled.fetch_add(1, Ordering::Relaxed);
            } else {
                i += 1;
            }
        }
        self.shared
            .stats
            .running
            .store(self.active.len() as u64, Ordering::Relaxed);
    }

    /// A sequence that left the batch: its cache is kept for prompts that
    /// begin with the same tokens (its prompt, then what it wrote).
    fn keep(&mut self, s: Seq<M::Cache>) {
        let bytes = M::cache_bytes(&s.cache);
        if self.cfg.prefix_cache_bytes == 0 || bytes == 0 {
            return;
        }
        let held = M::cache_len(&s.cache);
        let prompt = &s.job.req.prompt_ids;
        let mut tokens = prompt[..held.min(prompt.len())].to_vec();
        tokens.extend(s.output.iter().take(held.saturating_sub(prompt.len())));
        let owner = crate::prefix::Owner {
            tenant: s.job.req.tenant,
            adapter: s.job.req.adapter,
        };
        self.prefixes.insert(owner, tokens, s.cache, bytes);
    }

    /// A new sequence's cache and the prompt tokens it already holds: a
    /// copy of the longest kept beginning of its prompt (all but the last
    /// token, whose logits are needed), else an empty one.
    fn start_cache(&mut self, req: &GenerateRequest) -> (M::Cache, usize) {
        let last = req.prompt_ids.len().saturating_sub(1);
        let owner = crate::prefix::Owner {
            tenant: req.tenant,
            adapter: req.adapter,
        };
        if let Some((kept, n)) = self.prefixes.longest(owner, &req.prompt_ids, last)
            && let Some(cache) = M::cache_prefix(kept, n)
        {
            self.shared
                .stats
                .cached_prompt_tokens
                .fetch_add(n as u64, Ordering::Relaxed);
            return (cache, n);
        }
        (self.model.new_cache(), 0)
    }

    fn admit(&mut self, mut job: Job) {
        self.shared.waiting().leave(job.req.tenant);
        let n = job.req.prompt_ids.len();
        // Counts as i64: `tracing` hands unsigned values to trace exporters
        // as text.
        job.phase =
            tracing::info_span!(parent: &job.parent, "engine.prefill", prompt_tokens = n as i64);
        if n == 0 || n >= self.model.config().context_length {
            let _ = job.events.send(Event::Error(format!(
                "a prompt of {n} tokens does not fit the context window of {}",
                self.model.config().context_length
            )));
            self.shared.stats.failed.fetch_add(1, Ordering::Relaxed);
            return;
        }
        let adapter = match job.req.adapter {
            None => None,
            Some(id) => {
                let found = self
                    .shared
                    .adapters
                    .read()
                    .unwrap_or_else(|p| p.into_inner())
                    .get(&id)
                    .cloned();
                match found {
                    Some(a) => Some(a),
                    None => {
                        let _ = job
                            .events
                            .send(Event::Error("the adapter is not loaded".into()));
                        self.shared.stats.failed.fetch_add(1, Ordering::Relaxed);
                        return;
                    }
                }
            }
        };
        let (cache, prefilled) = self.start_cache(&job.req);
        self.active.push(Seq {
            adapter,
            sampler: Sampler::new(job.req.params.clone()),
            stops: StopMatcher::new(job.req.params.stop.clone()),
            json: job
                .req
                .params
                .json
                .clone()
                .map(crate::grammar::Matcher::new),
            forced_run: Default::default(),
            jump: self.cfg.jump_forward && !job.req.params.logprobs,
            cache,
            decoder: IncrementalDecoder::default(),
            prefilled,
            next: Vec::new(),
            output: Vec::new(),
            drafted: Vec::new(),
            guessed: 0,
            guessed_kept: 0,
            since_guess: 0,
            generated: 0,
            admitted: Instant::now(),
            first_token: true,
            job,
        });
    }

    /// One step: plan, execute, update.
    fn step(&mut self) {
        self.fit_drafts();
        let plan = self.plan();
        let started = Instant::now();
        let logits = self.execute(&plan);
        if plan.shared_prompt > 0 {
            self.prompt_cap = next_prompt_cap(
                self.prompt_cap,
                plan.shared_prompt,
                started.elapsed(),
                self.cfg.step_target,
                self.cfg.max_batched_tokens.max(1),
            );
        }
        self.update(&plan, logits);
        // Finished sequences have left: the gauge must not keep them while
        // the thread waits for work.
        self.shared
            .stats
            .running
            .store(self.active.len() as u64, Ordering::Relaxed);
    }

    /// How many tokens each active sequence brings to this step:
    /// generating sequences first (one token each, or a forced run after
    /// it), then prompt chunks.
    /// Under fair scheduling the prompts being read carry at most
    /// `prompt_cap` tokens, which keeps a step near `cfg.step_target` (also
    /// with one prompt alone: a request that arrives meanwhile waits for
    /// that step), the prompt with the fewest tokens left first: a short
    /// prompt that arrives while a long one is read is read in the next
    /// steps, and running streams keep their pace. Under first come, first
    /// served the oldest prompt takes what is left of the budget.
    fn plan(&self) -> Plan {
        let mut budget = self.cfg.max_batched_tokens.max(1);
        let mut take = vec![0usize; self.active.len()];
        // One token for each generating sequence first, then the rest of
        // each one's queue (a forced run, a draft): a long run never holds
        // another stream's next token back.
        let generating: Vec<usize> = (0..self.active.len())
            .filter(|&i| self.active[i].prefilled == self.active[i].job.req.prompt_ids.len())
            .collect();
        for &i in &generating {
            take[i] = self.active[i].next.len().min(budget).min(1);
            budget -= take[i];
        }
        for &i in &generating {
            if take[i] == 1 {
                let more = (self.active[i].next.len() - 1).min(budget);
                take[i] += more;
                budget -= more;
            }
        }
        let left = |s: &Seq<M::Cache>| s.job.req.prompt_ids.len() - s.prefilled;
        let reading = self.active.iter().filter(|s| left(s) > 0).count();
        // A step carrying a prompt is held near the target even when the
        // prompt is alone: whoever arrives meanwhile waits for that step.
        let fair = self.cfg.scheduling == Scheduling::Fair;
        let mut prompt_budget = if fair {
            budget.min(self.prompt_cap)
        } else {
            budget
        };
        if fair && reading > 1 {
            // Shortest prompt first: a short request is read in a step or
            // two beside a long one, which takes what is left.
            let mut readers: Vec<usize> = (0..self.active.len())
                .filter(|&i| left(&self.active[i]) > 0)
                .collect();
            readers.sort_by_key(|&i| left(&self.active[i]));
            for i in readers {
                let part = left(&self.active[i]).min(prompt_budget);
                take[i] = part;
                prompt_budget -= part;
            }
        }
        let mut prompt = 0;
        for (i, s) in self.active.iter().enumerate() {
            if left(s) == 0 {
                continue;
            }
            let more = (left(s) - take[i]).min(prompt_budget);
            take[i] += more;
            prompt_budget -= more;
            prompt += take[i];
        }
        let who = (0..take.len()).filter(|&i| take[i] > 0).collect();
        Plan {
            take,
            who,
            shared_prompt: if fair { prompt } else { 0 },
        }
    }

    /// Runs the step model once over the planned sequences; per sequence in
    /// `plan.who`, the logits after its last token when it needs them.
    fn execute(&mut self, plan: &Plan) -> Result<Vec<Option<Vec<f32>>>> {
        let mut items = Vec::with_capacity(plan.who.len());
        for (i, s) in self.active.iter_mut().enumerate() {
            if plan.take[i] == 0 {
                continue;
            }
            let prompt_len = s.job.req.prompt_ids.len();
            let (tokens, want_logits, verify) = if s.prefilled < prompt_len {
                let end = s.prefilled + plan.take[i];
                (
                    &s.job.req.prompt_ids[s.prefilled..end],
                    end == prompt_len,
                    0,
                )
            } else {
                let all = plan.take[i] == s.next.len();
                let verify = if all { s.drafted.len() } else { 0 };
                (&s.next[..plan.take[i]], all, verify)
            };
            items.push(BatchItem {
                cache: &mut s.cache,
                tokens,
                want_logits,
                verify,
                adapter: s.adapter.as_deref(),
            });
        }
        let stats = &self.shared.stats;
        stats.steps.fetch_add(1, Ordering::Relaxed);
        stats
            .last_batch
            .store(plan.who.len() as u64, Ordering::Relaxed);
        stats
            .peak_batch
            .fetch_max(plan.who.len() as u64, Ordering::Relaxed);
        self.model.step(&mut items)
    }

    /// Advances each planned sequence, samples for those that got logits,
    /// streams their tokens, and retires those that ended.
    fn update(&mut self, plan: &Plan, result: Result<Vec<Option<Vec<f32>>>>) {
        let shared = self.shared.clone();
        let stats = &shared.stats;
        let logits = match result {
            Ok(l) => l,
            Err(e) => {
                // A failed step fails the sequences in it, not the engine.
                tracing::error!(error = %e, "engine step failed");
                for &i in plan.who.iter().rev() {
                    let s = self.active.remove(i);
                    let _ = s.job.events.send(Event::Error(e.to_string()));
                    stats.failed.fetch_add(1, Ordering::Relaxed);
                }
                return;
            }
        };
        let mut ended = Vec::new();
        for (&i, logits) in plan.who.iter().zip(logits) {
            let s = &mut self.active[i];
            let prompt_len = s.job.req.prompt_ids.len();
            if s.prefilled < prompt_len {
                s.prefilled += plan.take[i];
                stats
                    .prompt_tokens
                    .fetch_add(plan.take[i] as u64, Ordering::Relaxed);
            } else {
                s.next.drain(..plan.take[i]);
            }
            let Some(logits) = logits else { continue };
            if let Some(end) = self.emit(i, logits) {
                ended.push((i, end));
            }
        }
        for (i, end) in ended.into_iter().rev() {
            let s = self.active.remove(i);
            self.keep(s);
            match end {
                End::Finished => stats.finished.fetch_add(1, Ordering::Relaxed),
                End::Cancelled => stats.cancelled.fetch_add(1, Ordering::Relaxed),
            };
        }
    }

    /// Chooses sequence `i`'s next token (a scored or forced one, else one
    /// sampled from `logits`) and streams it; when the sequence jumps
    /// forward, the tokens its `response_format` forces after that one
    /// follow at once, to be run through the model together next step.
    /// When the step checked a draft (`logits` then holds a row per drafted
    /// token and one more), each row chooses in turn as a step of its own
    /// would have, and the drafted tokens the model chose are kept: the
    /// first that differs is replaced by the model's choice and the rest
    /// dropped, keys and values included. Says if the sequence ended.
    fn emit(&mut self, i: usize, logits: Vec<f32>) -> Option<End> {
        let shared = &*self.shared;
        let stats = &shared.stats;
        let ctx = self.model.config().context_length;
        let may_draft =
            self.cfg.speculative && self.model.verifies() && self.active.len() <= SPECULATE_UP_TO;
        let budget = self.cfg.max_batched_tokens.max(1);
        let s = &mut self.active[i];
        debug_assert!(s.next.is_empty(), "logits come once every token is fed");
        let drafted = std::mem::take(&mut s.drafted);
        // Positions the cache has room for beyond what it held before the
        // draft (the drafted tokens the model keeps take their places).
        let held = M::cache_len(&s.cache) - drafted.len();
        let room = ctx.saturating_sub(held);
        if s.first_token {
            s.first_token = false;
            s.job.phase = tracing::info_span!(
                parent: &s.job.parent,
                "engine.decode",
                output_tokens = tracing::field::Empty
            );
            stats
                .ttft_micros
                .fetch_add(s.admitted.elapsed().as_micros() as u64, Ordering::Relaxed);
            stats.ttft_count.fetch_add(1, Ordering::Relaxed);
        }
        let vocab = logits.len() / (drafted.len() + 1);
        let mut kept = 0;
        let mut end = Ok(None);
        for row in logits.chunks_exact(vocab) {
            let (next, scored, logprobs) = match s.choose(shared, row.to_vec()) {
                Ok(c) => c,
                Err(e) => return Some(e),
            };
            // A drafted token the model chose is in the cache already.
            let in_cache = drafted.get(kept) == Some(&next);
            end = s.push(shared, next, scored, logprobs, room - kept, in_cache);
            if !in_cache {
                break;
            }
            kept += 1;
            if !matches!(end, Ok(None)) {
                break;
            }
        }
        if !drafted.is_empty() {
            M::truncate_cache(&mut s.cache, held + kept);
            s.guessed += drafted.len();
            s.guessed_kept += kept;
            stats
                .draft_tokens
                .fetch_add(drafted.len() as u64, Ordering::Relaxed);
            stats
                .draft_tokens_accepted
                .fetch_add(kept as u64, Ordering::Relaxed);
        }
        let room = room - kept;
        if s.jump {
            while let Ok(None) = end {
                let Some(t) = s.next_forced(shared) else {
                    break;
                };
                end = s.push(shared, t, false, None, room, false);
            }
            // A complete value leaves only the end of the turn: no pass
            // is run to sample it.
            let complete = s.json.as_ref().is_some_and(|m| m.is_complete());
            if let Ok(None) = end
                && complete
                && !s.job.req.params.ignore_eos
            {
                end = Ok(Some(FinishReason::Stop));
            }
        }
        if may_draft && matches!(end, Ok(None)) {
            let max = DRAFT_TOKENS
                .min(room.saturating_sub(s.next.len()))
                .min(budget.saturating_sub(s.next.len()))
                .min(s.job.req.params.max_tokens.saturating_sub(s.generated));
            s.draft(shared, max);
        }
        let reason = match end {
            Ok(reason) => reason?,
            Err(e) => return Some(e),
        };
        s.job.phase.record("output_tokens", s.generated as i64);
        let rest = s.stops.flush();
        if !rest.is_empty() {
            let _ = s.job.events.send(Event::Delta {
                text: rest,
                logprobs: None,
            });
        }
        let _ = s.job.events.send(Event::Done {
            finish_reason: reason,
            prompt_tokens: s.job.req.prompt_ids.len(),
            completion_tokens: s.generated,
        });
        Some(End::Finished)
    }

    /// Drafts that [`Scheduler::plan`] would not feed whole this step are
    /// dropped: a draft is checked whole or not at all. (The same
    /// reckoning as the plan's: a token for each generating sequence, then
    /// the rest of each one's queue, in order.)
    fn fit_drafts(&mut self) {
        let budget = self.cfg.max_batched_tokens.max(1);
        let generating = self
            .active
            .iter()
            .filter(|s| s.prefilled == s.job.req.prompt_ids.len())
            .count();
        let ones = generating.min(budget);
        let mut extra = budget - ones;
        let mut seen = 0;
        for s in &mut self.active {
            if s.prefilled < s.job.req.prompt_ids.len() {
                continue;
            }
            let fed = seen < ones;
            seen += 1;
            let rest = s.next.len().saturating_sub(1);
            if !s.drafted.is_empty() && (!fed || rest > extra) {
                s.next.truncate(s.next.len() - s.drafted.len());
                s.drafted.clear();
            }
            if fed {
                extra -= s.next.len().saturating_sub(1).min(extra);
            }
        }
    }
}

/// Most tokens guessed ahead at once.
const DRAFT_TOKENS: usize = 5;

/// The share of its guessed tokens a sequence must see kept to go on
/// guessing. A guessed token costs its row of a step: on the 2-core test
/// machine about 0.28 of a one-token step (the structured benchmark's
/// run: 9 guessed tokens and 5 fewer steps per answer took 0.82x the
/// time), so guessing pays above about that share; this asks for a margin
/// over it.
const MIN_KEPT: f64 = 0.35;

/// Steps between two guesses of a sequence that has stopped guessing (see
/// [`MIN_KEPT`]).
const PROBE_EVERY: usize = 16;

/// Longest run of last tokens looked up in what came before.
const DRAFT_NGRAM: usize = 3;

/// Drafts are made only while the batch holds at most this many
/// sequences: a draft's rows cost compute a full batch does not have.
const SPECULATE_UP_TO: usize = 4;

/// Tokens to guess next (prompt lookup): where the last `n` tokens of
/// `prompt` then `output` (`n` from [`DRAFT_NGRAM`] down to 1) appeared
/// before, the up to `max` tokens that followed them at the latest such
/// place.
fn guess(prompt: &[u32], output: &[u32], max: usize) -> Vec<u32> {
    let seen: Vec<u32> = prompt.iter().chain(output).copied().collect();
    let len = seen.len();
    if max == 0 || len < 2 {
        return Vec::new();
    }
    for n in (1..=DRAFT_NGRAM.min(len - 1)).rev() {
        let tail = &seen[len - n..];
        if let Some(at) = (0..len - n).rev().find(|&at| &seen[at..at + n] == tail) {
            let from = at + n;
            return seen[from..(from + max).min(len)].to_vec();
        }
    }
    Vec::new()
}

impl<C> Seq<C> {
    /// The next token from one row of logits, as a step chooses it: a
    /// scored token, else a forced one, else one sampled under the
    /// `response_format`'s mask; with its log-probabilities when asked.
    #[allow(clippy::type_complexity)]
    fn choose(
        &mut self,
        shared: &Shared,
        mut logits: Vec<f32>,
    ) -> std::result::Result<(u32, bool, Option<Vec<f32>>), End> {
        let tok = &shared.tokenizer;
        let p = &self.job.req.params;
        let scored = p.forced.get(self.generated).copied();
        let logprobs = (p.logprobs || scored.is_some()).then(|| log_softmax(&logits));
        let keep = if p.temperature < crate::MIN_TEMPERATURE {
            1
        } else {
            JSON_SAMPLED_FROM
        };
        let next = match scored {
            Some(t) if (t as usize) < logits.len() => t,
            Some(t) => {
                let _ = self.job.events.send(Event::Error(format!(
                    "forced token {t} is outside the vocabulary"
                )));
                return Err(End::Cancelled);
            }
            None => match self.next_forced(shared) {
                Some(t) => t,
                None => {
                    if let Some(m) = &self.json {
                        let bytes = shared.token_bytes.get_or_init(|| tok.token_bytes());
                        crate::grammar::mask(&mut logits, m, bytes, &tok.stop_ids, keep);
                    }
                    self.sampler.sample(&mut logits)
                }
            },
        };
        Ok((next, scored.is_some(), logprobs))
    }

    /// Guesses up to `max` tokens to follow what is queued to feed, and
    /// queues them too, to be checked in the same pass. Only a greedy
    /// request's guess can be checked exactly (its choice is the best
    /// logit, whatever the draws), and one that reports log-probabilities
    /// or scores given tokens is left as it is; under a `response_format`
    /// the guess stops where the schema would refuse it.
    fn draft(&mut self, shared: &Shared, max: usize) {
        let p = &self.job.req.params;
        let greedy = p.temperature < crate::MIN_TEMPERATURE;
        if !greedy
            || !p.speculative
            || p.logprobs
            || !p.forced.is_empty()
            || !self.forced_run.is_empty()
        {
            return;
        }
        if self.json.is_some() && !self.jump {
            return;
        }
        // A sequence whose guesses the model mostly refuses stops guessing,
        // but for one guess every PROBE_EVERY tokens, in case its text has
        // come to repeat its context.
        let kept = (self.guessed_kept + 1) as f64 / (self.guessed + 2) as f64;
        self.since_guess += 1;
        if self.guessed >= 8 && kept < MIN_KEPT && self.since_guess < PROBE_EVERY {
            return;
        }
        let mut guess = guess(&self.job.req.prompt_ids, &self.output, max);
        if let Some(m) = &self.json {
            let Some(table) = shared.token_bytes.get() else {
                return;
            };
            let mut m = m.clone();
            let fits = guess
                .iter()
                .take_while(|&&t| {
                    !m.is_complete()
                        && table
                            .get(t as usize)
                            .and_then(|b| b.as_deref())
                            .is_some_and(|b| m.feed(b))
                })
                .count();
            guess.truncate(fits);
        }
        let stops = &shared.tokenizer.stop_ids;
        if let Some(at) = guess.iter().position(|t| stops.contains(t)) {
            guess.truncate(at);
        }
        if !guess.is_empty() {
            self.since_guess = 0;
        }
        self.next.extend(&guess);
        self.drafted = guess;
    }

    /// The next token of the bytes the `response_format` forces, if any:
    /// the forced bytes (whole characters) are tokenized once and their
    /// tokens handed out in order, the same whether they go one per step or
    /// all at once, so jumping forward never changes the output. Bytes the
    /// tokenizer would not spell back exactly are left to sampling.
    fn next_forced(&mut self, shared: &Shared) -> Option<u32> {
        if self.forced_run.is_empty() && self.job.req.params.forced.is_empty() {
            let m = self.json.as_ref()?;
            let bytes = m.forced();
            let whole = match std::str::from_utf8(&bytes) {
                Ok(t) => t,
                Err(e) => std::str::from_utf8(&bytes[..e.valid_up_to()]).unwrap_or_default(),
            };
            if whole.is_empty() {
                return None;
            }
            let tok = &shared.tokenizer;
            let table = shared.token_bytes.get_or_init(|| tok.token_bytes());
            let ids = tok.encode_continuation(whole).ok()?;
            let mut spelled = Vec::with_capacity(whole.len());
            for id in &ids {
                spelled.extend_from_slice(table.get(*id as usize)?.as_deref()?);
            }
            if spelled != whole.as_bytes() {
                return None;
            }
            self.forced_run = ids.into();
        }
        self.forced_run.pop_front()
    }

    /// Streams `next` as the sequence's next token and queues it to be fed
    /// (unless it is `in_cache`: a drafted token the model kept); `Ok(Some)`
    /// when the sequence ends with it, `Err` when it must leave (its client
    /// went away, or the token could not be decoded). `room`: tokens the
    /// cache has room for beyond those it holds.
    fn push(
        &mut self,
        shared: &Shared,
        next: u32,
        scored: bool,
        logprobs: Option<Vec<f32>>,
        room: usize,
        in_cache: bool,
    ) -> std::result::Result<Option<FinishReason>, End> {
        let tok = &shared.tokenizer;
        let p = &self.job.req.params;
        if let (Some(m), false) = (&mut self.json, scored)
            && !tok.stop_ids.contains(&next)
            && let Some(Some(b)) = shared.token_bytes.get().and_then(|t| t.get(next as usize))
        {
            m.feed(b);
        }
        if !scored && tok.stop_ids.contains(&next) && !p.ignore_eos {
            return Ok(Some(FinishReason::Stop));
        }
        self.generated += 1;
        shared
            .stats
            .generated_tokens
            .fetch_add(1, Ordering::Relaxed);
        let delta = match self.decoder.push(tok, next) {
            Ok(d) => d,
            Err(e) => {
                let _ = self.job.events.send(Event::Error(e.to_string()));
                return Err(End::Cancelled);
            }
        };
        // Stop strings end what the model writes, not the text it is
        // given: a scored token is never held back or matched.
        let step = match scored {
            true => crate::stop::StopStep {
                emit: delta,
                stopped: false,
            },
            false => self.stops.push(&delta),
        };
        let logprobs = logprobs.map(|lp| TokenLogprob {
            token: tok.token_text(next),
            logprob: lp[next as usize],
            top: top_n(&lp, p.top_logprobs)
                .into_iter()
                .map(|(id, logprob)| TopLogprob {
                    token: tok.token_text(id),
                    logprob,
                })
                .collect(),
        });
        let sent = self.job.events.send(Event::Delta {
            text: step.emit,
            logprobs,
        });
        if sent.is_err() {
            return Err(End::Cancelled);
        }
        if !in_cache {
            self.next.push(next);
        }
        self.output.push(next);
        Ok(if !p.forced.is_empty() && p.max_tokens <= p.forced.len() {
            // Scoring: the forced tokens and nothing after them.
            (self.generated >= p.forced.len()).then_some(FinishReason::Stop)
        } else if step.stopped {
            Some(FinishReason::Stop)
        } else if self.generated >= p.max_tokens || self.next.len() > room {
            Some(FinishReason::Length)
        } else {
            None
        })
    }
}

fn log_softmax(logits: &[f32]) -> Vec<f32> {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let sum: f32 = logits.iter().map(|&l| (l - max).exp()).sum();
    let log_sum = max + sum.ln();
    logits.iter().map(|&l| l - log_sum).collect()
}

#[cfg(test)]
mod tests {
    use flywheel_model::testing as tiny;
    use flywheel_model::{ChatMessage, ModelFiles};
    use tokio::sync::mpsc::{UnboundedReceiver, unbounded_channel};

    use super::*;
    use crate::cpu::CpuLlama;
    use crate::handle::EngineHandle;
    use crate::kernels::Simd;
    use crate::sampling::SamplingParams;
    use crate::types::{Backend, SubmitError};

    fn tiny_engine(queue: usize) -> EngineHandle {
        tiny_engine_with(EngineConfig {
            queue_capacity: queue,
            ..Default::default()
        })
    }

    /// The tiny model, written in a folder of its own for `tag`'s tests.
    fn tiny_model_in(tag: &str) -> std::path::PathBuf {
        let dir = std::env::temp_dir().join(format!("fw-engine-{tag}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        tiny::write_tiny_model(&dir, 1).unwrap()
    }

    fn tiny_engine_with(cfg: EngineConfig) -> EngineHandle {
        let dir = std::env::temp_dir().join(format!("fw-engine-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = tiny::write_tiny_model(&dir, 1).unwrap();
        EngineHandle::load(&path, "tiny", cfg).unwrap()
    }

    fn collect(mut rx: UnboundedReceiver<Event>) -> (String, Option<Event>) {
        let mut text = String::new();
        while let Some(ev) = rx.blocking_recv() {
            match ev {
                Event::Delta { text: t, .. } => text.push_str(&t),
                other => return (text, Some(other)),
            }
        }
        (text, None)
    }

    fn request(engine: &EngineHandle, params: SamplingParams) -> GenerateRequest {
        let prompt_ids = engine
            .prepare_chat(&[ChatMessage {
                role: "user".into(),
                content: "hello".into(),
            }])
            .unwrap();
        GenerateRequest {
            prompt_ids,
            params,
            ..Default::default()
        }
    }

    #[test]
    fn a_model_that_does_not_fit_is_refused_before_it_loads() {
        let path = tiny_model_in("mem");
        let plan = crate::MemoryPlan::for_file(&path, &EngineConfig::default()).unwrap();
        let budget = |bytes| EngineConfig {
            memory_budget: Some(bytes),
            ..Default::default()
        };
        let err = EngineHandle::load(&path, "tiny", budget(plan.needed() - 1))
            .err()
            .expect("a byte short is refused");
        assert!(matches!(err, EngineError::DoesNotFit(_)), "{err:?}");
        let said = err.to_string();
        for part in [
            "tiny does not fit",
            "needs about",
            "FLYWHEEL_MEMORY_MB",
            "prefix cache",
        ] {
            assert!(said.contains(part), "{part:?} in {said}");
        }
        EngineHandle::load(&path, "tiny", budget(plan.needed())).expect("exactly enough loads");
    }

    #[test]
    fn requests_wait_while_the_running_ones_hold_the_memory_for_keys_and_values() {
        let path = tiny_model_in("kv");
        let base = EngineConfig {
            prefix_cache_bytes: 0,
            ..Default::default()
        };
        let plan = crate::MemoryPlan::for_file(&path, &base).unwrap();
        // Room for two sequences of the full context beside the weights.
        let cfg = EngineConfig {
            memory_budget: Some(plan.needed() + plan.one_sequence()),
            ..base
        };
        let engine = EngineHandle::load(&path, "tiny", cfg).unwrap();
        let params = SamplingParams {
            temperature: 0.0,
            max_tokens: 400,
            ignore_eos: true,
            ..Default::default()
        };
        let runs: Vec<_> = (0..5)
            .map(|_| engine.submit(request(&engine, params.clone())).unwrap())
            .collect();
        for rx in runs {
            match collect(rx).1 {
                Some(Event::Done {
                    finish_reason: FinishReason::Length,
                    ..
                }) => {}
                other => panic!("unexpected {other:?}"),
            }
        }
        let stats = engine.stats();
        assert_eq!(stats.peak_batch, 2, "{stats:?}");
        assert!(stats.held_for_memory > 0, "{stats:?}");
        // Without the limit all five run at once.
        let free = tiny_engine_with(EngineConfig {
            prefix_cache_bytes: 0,
            ..Default::default()
        });
        let runs: Vec<_> = (0..5)
            .map(|_| free.submit(request(&free, params.clone())).unwrap())
            .collect();
        runs.into_iter().for_each(|rx| drop(collect(rx)));
        assert_eq!(free.stats().peak_batch, 5);
        assert_eq!(free.stats().held_for_memory, 0);
    }

    #[test]
    fn a_shorter_context_is_served_and_needs_less() {
        let path = tiny_model_in("ctx");
        let short = EngineConfig {
            max_context: 32,
            ..Default::default()
        };
        let full = crate::MemoryPlan::for_file(&path, &EngineConfig::default()).unwrap();
        let plan = crate::MemoryPlan::for_file(&path, &short).unwrap();
        assert_eq!(
            (full.context, plan.context),
            (tiny::TINY_CONTEXT as usize, 32)
        );
        assert_eq!(full.one_sequence(), 8 * plan.one_sequence());
        let engine = EngineHandle::load(&path, "tiny", short).unwrap();
        assert_eq!(engine.info().context_length, 32);
        // An answer stops at the shorter context, for length.
        let params = SamplingParams {
            temperature: 0.0,
            max_tokens: 100,
            ignore_eos: true,
            ..Default::default()
        };
        let req = request(&engine, params.clone());
        let n_prompt = req.prompt_ids.len();
        match collect(engine.submit(req).unwrap()).1 {
            Some(Event::Done {
                finish_reason: FinishReason::Length,
                prompt_tokens,
                completion_tokens,
                // The last token is written, never fed: it takes no place.
            }) => assert_eq!(prompt_tokens + completion_tokens, 32 + 1),
            other => panic!("unexpected {other:?}"),
        }
        // A prompt as long as the context is refused.
        let mut req = request(&engine, params);
        req.prompt_ids = req.prompt_ids.iter().cycle().take(32).copied().collect();
        assert!(n_prompt < 32);
        match collect(engine.submit(req).unwrap()).1 {
            Some(Event::Error(e)) => assert!(e.contains("context window of 32"), "{e}"),
            other => panic!("unexpected {other:?}"),
        }
    }

    #[test]
    fn max_tokens_ends_with_length_and_counts_tokens() {
        let engine = tiny_engine(4);
        let params = SamplingParams {
            temperature: 0.0,
            max_tokens: 5,
            // The random model may pick an end token; here it must not stop.
            ignore_eos: true,
            ..Default::default()
        };
        let req = request(&engine, params);
        let n_prompt = req.prompt_ids.len();
        let (_, done) = collect(engine.submit(req).unwrap());
        match done {
            Some(Event::Done {
                finish_reason,
                prompt_tokens,
                completion_tokens,
            }) => {
                assert_eq!(completion_tokens, 5);
                assert_eq!(finish_reason, FinishReason::Length);
                assert_eq!(prompt_tokens, n_prompt);
            }
            other => panic!("unexpected {other:?}"),
        }
    }

    /// The deltas of a generation: each token's text and log-probability.
    fn tokens(mut rx: UnboundedReceiver<Event>) -> (Vec<(String, f32)>, Option<Event>) {
        let mut out = Vec::new();
        while let Some(ev) = rx.blocking_recv() {
            match ev {
                Event::Delta {
                    logprobs: Some(lp), ..
                } => out.push((lp.token, lp.logprob)),
                Event::Delta { .. } => {}
                other => return (out, Some(other)),
            }
        }
        (out, None)
    }

    #[test]
    fn forced_tokens_then_free_ones_continue_as_if_the_forced_were_prompt() {
        let engine = tiny_engine(4);
        let given = engine.encode(" stop here and go").unwrap();
        let greedy = |max_tokens, forced: Vec<u32>, stop: Vec<String>| SamplingParams {
            temperature: 0.0,
            max_tokens,
            ignore_eos: true,
            logprobs: true,
            forced,
            stop,
            ..Default::default()
        };
        // The given tokens as part of the prompt, then 4 written.
        let mut whole = request(&engine, greedy(4, vec![], vec![]));
        whole.prompt_ids.extend(&given);
        let (written, _) = tokens(engine.submit(whole).unwrap());
        assert_eq!(written.len(), 4);

        // The same tokens forced, then 4 written: one stream of both, the
        // written part the same as above; a stop string inside the forced
        // text does not end it.
        let n = given.len();
        let forced = greedy(n + 4, given.clone(), vec!["stop here".into()]);
        let (both, done) = tokens(engine.submit(request(&engine, forced)).unwrap());
        assert_eq!(both.len(), n + 4, "{both:?}");
        for (i, ((a, la), (b, lb))) in both[n..].iter().zip(&written).enumerate() {
            assert_eq!(a, b, "token {i}");
            assert!((la - lb).abs() < 1e-3, "token {i}: {la} vs {lb}");
        }
        match done {
            Some(Event::Done {
                finish_reason,
                completion_tokens,
                ..
            }) => {
                assert_eq!(finish_reason, FinishReason::Length);
                assert_eq!(completion_tokens, n + 4);
            }
            other => panic!("unexpected {other:?}"),
        }

        // Scoring (max_tokens no more than the forced): just those.
        let (scored, done) = tokens(
            engine
                .submit(request(&engine, greedy(n, given, vec![])))
                .unwrap(),
        );
        assert_eq!(scored.len(), n);
        assert!(matches!(
            done,
            Some(Event::Done {
                finish_reason: FinishReason::Stop,
                ..
            })
        ));
    }

    #[test]
    fn same_seed_gives_same_text() {
        let engine = tiny_engine(4);
        let params = SamplingParams {
            temperature: 1.0,
            seed: Some(9),
            max_tokens: 20,
            ..Default::default()
        };
        let a = collect(engine.submit(request(&engine, params.clone())).unwrap());
        let b = collect(engine.submit(request(&engine, params)).unwrap());
        assert_eq!(a, b);
    }

    #[test]
    fn logprobs_are_normalised_and_sorted() {
        let engine = tiny_engine(4);
        let params = SamplingParams {
            temperature: 0.0,
            max_tokens: 3,
            logprobs: true,
            top_logprobs: 3,
            ..Default::default()
        };
        let mut rx = engine.submit(request(&engine, params)).unwrap();
        let mut seen = 0;
        while let Some(Event::Delta { logprobs, .. }) = rx.blocking_recv() {
            let lp = logprobs.expect("logprobs asked for");
            assert!(lp.logprob <= 0.0);
            assert_eq!(lp.top.len(), 3);
            // Greedy: the chosen token is the most likely one.
            assert_eq!(lp.top[0].logprob, lp.logprob);
            assert!(lp.top.windows(2).all(|w| w[0].logprob >= w[1].logprob));
            seen += 1;
        }
        assert!(seen >= 1);
    }

    #[test]
    fn batched_requests_give_the_same_text_as_alone() {
        // A prompt-chunk budget smaller than the prompts forces chunked
        // prefill next to running decodes.
        let engine = tiny_engine_with(EngineConfig {
            max_batched_tokens: 7,
            ..Default::default()
        });
        let params = |seed| SamplingParams {
            temperature: 0.9,
            seed: Some(seed),
            max_tokens: 30,
            ..Default::default()
        };
        let alone: Vec<_> = (0..6)
            .map(|i| collect(engine.submit(request(&engine, params(i))).unwrap()))
            .collect();
        let receivers: Vec<_> = (0..6)
            .map(|i| engine.submit(request(&engine, params(i))).unwrap())
            .collect();
        let together: Vec<_> = receivers.into_iter().map(collect).collect();
        assert_eq!(alone, together);
        assert!(engine.stats().steps > 0);
    }

    #[test]
    fn a_slow_shared_step_carries_fewer_prompt_tokens_and_a_quick_one_more() {
        let target = Duration::from_millis(500);
        let next = |cap, carried, ms| {
            next_prompt_cap(cap, carried, Duration::from_millis(ms), target, 256)
        };
        // Twice the target: half the tokens carried; ten times: a tenth.
        assert_eq!(next(256, 256, 1_000), 128);
        assert_eq!(next(200, 200, 5_000), 20);
        assert_eq!(next(256, 100, 1_000), 50);
        // Never below the floor, never past the step budget.
        assert_eq!(next(20, 20, 60_000), MIN_PROMPT_CAP);
        assert_eq!(next(200, 200, 10), 256);
        // Quick with the cap full: grows by half; quick carrying less, or
        // near the target: kept.
        assert_eq!(next(64, 64, 100), 97);
        assert_eq!(next(64, 10, 100), 64);
        assert_eq!(next(64, 64, 400), 64);
        // A budget under the floor is the cap.
        assert_eq!(next_prompt_cap(4, 4, Duration::from_secs(9), target, 4), 4);
    }

    /// Which of a long prompt (admitted first, one step read) and a short
    /// one (admitted after that step) gives its first token first, under
    /// `scheduling`, stepping the scheduler by hand.
    fn first_answered(scheduling: Scheduling) -> &'static str {
        let (mut scheduler, shared) = tiny_scheduler();
        scheduler.cfg.max_batched_tokens = 4;
        scheduler.cfg.scheduling = scheduling;
        scheduler.prompt_cap = 4;
        let params = SamplingParams {
            temperature: 0.0,
            max_tokens: 1,
            ignore_eos: true,
            ..Default::default()
        };
        let short_ids = shared.tokenizer.encode("<|im_start|>user\nhello").unwrap();
        let mut long_ids = short_ids.clone();
        long_ids.extend(std::iter::repeat_n(40u32, 200));
        let job = |prompt_ids: Vec<u32>| {
            let (events, rx) = unbounded_channel();
            shared.waiting().enter(0, usize::MAX, usize::MAX).unwrap();
            let req = GenerateRequest {
                prompt_ids,
                params: params.clone(),
                ..Default::default()
            };
            (Job::new(req, events), rx)
        };
        let (long_job, mut long) = job(long_ids);
        let (short_job, mut short) = job(short_ids);
        scheduler.admit(long_job);
        // The long prompt is being read when the short one arrives.
        scheduler.step();
        scheduler.admit(short_job);
        for _ in 0..200 {
            scheduler.step();
            let (l, s) = (long.try_recv().is_ok(), short.try_recv().is_ok());
            match (l, s) {
                (true, false) => return "long",
                (false, true) => return "short",
                (true, true) => return "both",
                (false, false) => {}
            }
        }
        "neither"
    }

    #[test]
    fn a_short_prompt_is_read_beside_a_long_one_not_after_it() {
        // 200 tokens at 4 a step: the long prompt needs 50 steps.
        assert_eq!(first_answered(Scheduling::Fair), "short");
        assert_eq!(first_answered(Scheduling::Fifo), "long");
    }

    #[test]
    fn candle_backend_serves_the_same_greedy_text() {
        let kernels = tiny_engine(4);
        let candle = tiny_engine_with(EngineConfig {
            backend: Backend::Candle,
            ..Default::default()
        });
        let params = SamplingParams {
            temperature: 0.0,
            max_tokens: 12,
            ..Default::default()
        };
        let a = collect(kernels.submit(request(&kernels, params.clone())).unwrap());
        let b = collect(candle.submit(request(&candle, params)).unwrap());
        assert!(matches!(b.1, Some(Event::Done { .. })));
        assert_eq!(a, b);
    }

    /// Submits one request and reads it to its end.
    fn generate(
        engine: &EngineHandle,
        prompt_ids: Vec<u32>,
        params: SamplingParams,
    ) -> (String, Option<Event>) {
        let req = GenerateRequest {
            prompt_ids,
            params,
            ..Default::default()
        };
        collect(engine.submit(req).unwrap())
    }

    /// One `response_format` request alone on `engine`: its text, finish
    /// reason and token count, and the steps (forward passes) it took.
    fn structured(
        engine: &EngineHandle,
        params: SamplingParams,
        prompt: &str,
    ) -> (String, FinishReason, usize, u64) {
        let before = engine.stats().steps;
        let prompt_ids = engine
            .prepare_chat(&[ChatMessage {
                role: "user".into(),
                content: prompt.into(),
            }])
            .unwrap();
        let (text, done) = generate(engine, prompt_ids, params);
        let Some(Event::Done {
            finish_reason,
            completion_tokens,
            ..
        }) = done
        else {
            panic!("{done:?}")
        };
        (
            text,
            finish_reason,
            completion_tokens,
            engine.stats().steps - before,
        )
    }

    #[test]
    fn jumping_forward_writes_the_same_output_in_fewer_forward_passes() {
        use crate::grammar::Node;
        // Keys, a long constant, enum values sharing their first bytes, a
        // nullable field and an array: runs the schema forces, long and
        // short, between the model's own choices.
        let schema = Node::from_schema(&serde_json::json!({
            "type": "object",
            "properties": {
                "intent": {"enum": ["refund", "return_item", "track_order"]},
                "note": {"const": "routed by the support desk, see the handbook"},
                "order_id": {"type": ["string", "null"]},
                "tags": {"type": "array", "items": {"enum": ["late", "lost"]}},
                "urgent": {"type": "boolean"}
            }
        }))
        .unwrap();
        let off = tiny_engine_with(EngineConfig {
            jump_forward: false,
            ..Default::default()
        });
        let on = tiny_engine(8);
        // A step budget smaller than the constant's run: it is fed over
        // several steps.
        let narrow = tiny_engine_with(EngineConfig {
            max_batched_tokens: 4,
            ..Default::default()
        });
        let (mut steps_off, mut steps_on) = (0, 0);
        for (i, prompt) in ["where is 1234", "refund please", "hello", "lost box"]
            .iter()
            .enumerate()
        {
            for temperature in [0.0, 1.0] {
                let params = SamplingParams {
                    temperature,
                    seed: Some(i as u64),
                    max_tokens: 300,
                    json: Some(schema.clone()),
                    ..Default::default()
                };
                let a = structured(&off, params.clone(), prompt);
                let b = structured(&on, params.clone(), prompt);
                let c = structured(&narrow, params, prompt);
                assert_eq!(
                    (&a.0, a.1, a.2),
                    (&b.0, b.1, b.2),
                    "{prompt} at {temperature}"
                );
                assert_eq!(
                    (&a.0, a.1, a.2),
                    (&c.0, c.1, c.2),
                    "{prompt} at {temperature}"
                );
                assert_eq!(a.1, FinishReason::Stop, "{}", a.0);
                let v: serde_json::Value = serde_json::from_str(&a.0).unwrap();
                assert_eq!(v["note"], "routed by the support desk, see the handbook");
                // Compact, as OpenAI writes it.
                assert_eq!(a.0, v.to_string());
                steps_off += a.3;
                steps_on += b.3;
            }
        }
        // Without jumping, a pass per token and one for the end of the
        // turn; with it, the forced runs (at least the constant's 40-odd
        // bytes per answer) take none of their own.
        assert!(steps_on * 2 < steps_off, "{steps_on} vs {steps_off}");
    }

    #[test]
    fn log_probabilities_are_reported_for_forced_tokens_too() {
        let schema = crate::grammar::Node::from_schema(&serde_json::json!({
            "type": "object", "properties": {"intent": {"enum": ["refund", "track_order"]}}
        }))
        .unwrap();
        let engine = tiny_engine(8);
        let params = SamplingParams {
            temperature: 0.0,
            logprobs: true,
            json: Some(schema),
            ..Default::default()
        };
        let (with_logprobs, done) =
            tokens(engine.submit(request(&engine, params.clone())).unwrap());
        assert!(matches!(done, Some(Event::Done { .. })), "{done:?}");
        let text: String = with_logprobs.iter().map(|(t, _)| t.as_str()).collect();
        // Every token has its own log-probability (a pass each), and the
        // text is what a request without them gets.
        assert!(
            with_logprobs
                .iter()
                .all(|(_, lp)| lp.is_finite() && *lp <= 0.0)
        );
        let plain = SamplingParams {
            logprobs: false,
            ..params
        };
        let (without, _) = collect(engine.submit(request(&engine, plain)).unwrap());
        assert_eq!(text, without);
        assert!(text.starts_with(r#"{"intent":""#), "{text}");
    }

    #[test]
    fn guesses_follow_the_latest_place_the_last_tokens_appeared() {
        // "7 8 9" appeared twice before; the later place is followed by 5.
        let prompt = [1, 7, 8, 9, 2, 3, 7, 8, 9, 5, 6];
        assert_eq!(guess(&prompt, &[7, 8, 9], 3), vec![5, 6, 7]);
        // Only the last token seen before: what followed it.
        assert_eq!(guess(&prompt, &[4, 2], 2), vec![3, 7]);
        // Never seen: no guess; nothing asked for: none.
        assert_eq!(guess(&prompt, &[42], 3), Vec::<u32>::new());
        assert_eq!(guess(&prompt, &[7, 8, 9], 0), Vec::<u32>::new());
    }

    #[test]
    fn speculating_writes_the_same_greedy_text_in_fewer_passes() {
        use crate::grammar::Node;
        // The prefix cache off in all three, so steps count the same reads.
        let config = |speculative, max_batched_tokens| EngineConfig {
            speculative,
            max_batched_tokens,
            prefix_cache_bytes: 0,
            ..Default::default()
        };
        let off = tiny_engine_with(config(false, 256));
        let on = tiny_engine_with(config(true, 256));
        // A budget of 3 tokens a step: most drafts do not fit and are dropped.
        let narrow = tiny_engine_with(config(true, 3));
        let schema = Node::from_schema(&serde_json::json!({
            "type": "object",
            "properties": {"note": {"type": "string"}, "n": {"type": "integer"}}
        }))
        .unwrap();
        let greedy = |max_tokens, json: Option<Arc<Node>>| SamplingParams {
            temperature: 0.0,
            max_tokens,
            json,
            ..Default::default()
        };
        let cases = [
            (
                "repeat after me: blue green blue green blue green",
                greedy(60, None),
            ),
            ("count 1 2 3 1 2 3 1 2 3", greedy(60, None)),
            ("hello", greedy(7, None)),
            (
                "note: the parcel is late, the parcel is late",
                greedy(80, Some(schema)),
            ),
        ];
        let (mut steps_off, mut steps_on) = (0, 0);
        for (prompt, params) in &cases {
            let a = structured(&off, params.clone(), prompt);
            let b = structured(&on, params.clone(), prompt);
            let c = structured(&narrow, params.clone(), prompt);
            assert_eq!((&a.0, a.1, a.2), (&b.0, b.1, b.2), "{prompt}");
            assert_eq!((&a.0, a.1, a.2), (&c.0, c.1, c.2), "{prompt}");
            steps_off += a.3;
            steps_on += b.3;
        }
        // Several at once: each row of a step checks its own draft.
        let submit_all = |engine: &EngineHandle| -> Vec<String> {
            let rxs: Vec<_> = cases
                .iter()
                .map(|(prompt, params)| {
                    let prompt_ids = conversation(engine, &[prompt]);
                    engine
                        .submit(GenerateRequest {
                            prompt_ids,
                            params: params.clone(),
                            ..Default::default()
                        })
                        .unwrap()
                })
                .collect();
            rxs.into_iter().map(|rx| collect(rx).0).collect()
        };
        assert_eq!(submit_all(&off), submit_all(&on));
        let stats = on.stats();
        assert!(stats.draft_tokens_accepted > 0, "{stats:?}");
        assert!(
            stats.draft_tokens_accepted < stats.draft_tokens,
            "{stats:?}"
        );
        assert_eq!(off.stats().draft_tokens, 0);
        assert!(steps_on < steps_off, "{steps_on} vs {steps_off}");
    }

    #[test]
    fn guessing_and_jumping_keep_the_text_at_a_tight_budget_and_at_the_context_end() {
        use crate::grammar::Node;
        let config = |on: bool, max_batched_tokens| EngineConfig {
            speculative: on,
            jump_forward: on,
            max_batched_tokens,
            prefix_cache_bytes: 0,
            ..Default::default()
        };
        let schema = Node::from_schema(&serde_json::json!({
            "type": "object",
            "properties": {"a": {"type": "string"}, "b": {"const": "a fixed closing note"}}
        }))
        .unwrap();
        let run = |engine: &EngineHandle, reqs: &[(Vec<u32>, SamplingParams)]| {
            let rxs: Vec<_> = reqs
                .iter()
                .map(|(prompt_ids, params)| {
                    engine
                        .submit(GenerateRequest {
                            prompt_ids: prompt_ids.clone(),
                            params: params.clone(),
                            ..Default::default()
                        })
                        .unwrap()
                })
                .collect();
            rxs.into_iter().map(collect).collect::<Vec<_>>()
        };
        let off = tiny_engine_with(config(false, 4));
        let greedy = |max_tokens, ignore_eos, json: Option<Arc<Node>>| SamplingParams {
            temperature: 0.0,
            max_tokens,
            ignore_eos,
            json,
            ..Default::default()
        };
        // Four at once with 4 tokens a step: each stream gets its token
        // every step, and a draft or a run that does not fit waits or goes.
        let together: Vec<_> = [
            "repeat after me: blue green blue green blue green",
            "count 1 2 3 1 2 3 1 2 3",
            "abc abc abc abc",
            "note: late, late, late",
        ]
        .iter()
        .enumerate()
        .map(|(i, p)| {
            let json = (i == 3).then(|| schema.clone());
            (conversation(&off, &[p]), greedy(60, false, json))
        })
        .collect();
        let on = tiny_engine_with(config(true, 4));
        assert_eq!(run(&off, &together), run(&on, &together));
        assert!(on.stats().draft_tokens > 0, "{:?}", on.stats());
        // A prompt that leaves the context 16 positions: the answers stop
        // at the window, with the same text and length either way.
        let long = "blue green ".repeat(200);
        let mut prompt = conversation(&off, &[&long]);
        let tail = prompt.split_off(prompt.len() - 8);
        prompt.truncate(flywheel_model::testing::TINY_CONTEXT as usize - 16 - tail.len());
        prompt.extend(tail);
        let at_the_end = [
            (prompt.clone(), greedy(100, true, None)),
            (prompt, greedy(100, false, Some(schema))),
        ];
        let (off, on) = (
            tiny_engine_with(config(false, 256)),
            tiny_engine_with(config(true, 256)),
        );
        for (i, req) in at_the_end.into_iter().enumerate() {
            let a = run(&off, std::slice::from_ref(&req));
            assert_eq!(a, run(&on, std::slice::from_ref(&req)));
            let (text, done) = &a[0];
            let Some(Event::Done { finish_reason, .. }) = done else {
                panic!("{done:?} after {text:?}");
            };
            // The plain answer, past every end of turn, ends at the window.
            if i == 0 {
                assert_eq!(*finish_reason, FinishReason::Length, "{text:?}");
            }
        }
    }

    /// A chat's prompt: one shared system prompt and `turns` (user, then
    /// assistant, alternating).
    fn conversation(engine: &EngineHandle, turns: &[&str]) -> Vec<u32> {
        let mut messages = vec![ChatMessage {
            role: "system".into(),
            content: "You route support tickets for a homeware shop. Pick one intent.".into(),
        }];
        for (i, t) in turns.iter().enumerate() {
            messages.push(ChatMessage {
                role: if i % 2 == 0 { "user" } else { "assistant" }.into(),
                content: (*t).into(),
            });
        }
        engine.prepare_chat(&messages).unwrap()
    }

    #[test]
    fn prompts_that_begin_alike_are_read_once_and_answered_the_same() {
        let kept = tiny_engine(8);
        let fresh = tiny_engine_with(EngineConfig {
            prefix_cache_bytes: 0,
            ..Default::default()
        });
        let ask = |engine: &EngineHandle, prompt_ids: Vec<u32>, seed| {
            let params = SamplingParams {
                temperature: 1.0,
                seed: Some(seed),
                max_tokens: 12,
                ..Default::default()
            };
            let before = engine.stats();
            let (text, done) = generate(engine, prompt_ids, params);
            assert!(matches!(done, Some(Event::Done { .. })), "{done:?}");
            let after = engine.stats();
            (
                text,
                after.prompt_tokens - before.prompt_tokens,
                after.cached_prompt_tokens - before.cached_prompt_tokens,
            )
        };
        let first = conversation(&kept, &["where is order 1234?"]);
        let second = conversation(&kept, &["I want a refund"]);
        let shared = first
            .iter()
            .zip(&second)
            .take_while(|(a, b)| a == b)
            .count();
        assert!(shared > crate::prefix::MIN_SHARED, "{shared}");

        let (a, read, cached) = ask(&kept, first.clone(), 1);
        assert_eq!((read, cached), (first.len() as u64, 0));
        assert_eq!(a, ask(&fresh, first.clone(), 1).0);
        // The second question after the same system prompt reads only
        // what differs, and answers as an engine that read it all.
        let (b, read, cached) = ask(&kept, second.clone(), 2);
        assert_eq!(cached, shared as u64);
        assert_eq!(read, (second.len() - shared) as u64);
        assert_eq!(b, ask(&fresh, second.clone(), 2).0);
        // The conversation's next turn starts from the first one's cache:
        // its whole prompt, and of its answer as many tokens as the
        // template's rendering shares (the random model's bytes are not
        // re-tokenized alike, so here none).
        let next = conversation(&kept, &["where is order 1234?", &a, "and when?"]);
        let (c, _, cached) = ask(&kept, next.clone(), 3);
        assert!(cached >= first.len() as u64, "{cached} of {}", first.len());
        assert_eq!(c, ask(&fresh, next.clone(), 3).0);
        // The same prompt again: all but its last token.
        let (_, read, cached) = ask(&kept, second.clone(), 4);
        assert_eq!((read, cached), (1, second.len() as u64 - 1));
    }

    /// A scheduler on the tiny model, driven step by step by the test.
    fn tiny_scheduler() -> (Scheduler<CpuLlama>, Arc<Shared>) {
        let dir = std::env::temp_dir().join(format!("fw-engine-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = tiny::write_tiny_model(&dir, 1).unwrap();
        let mut files = ModelFiles::open(&path).unwrap();
        let model = CpuLlama::load(&mut files.gguf, 1, Simd::Avx512).unwrap();
        let shared = Arc::new(Shared {
            info: crate::types::ModelInfo {
                name: "tiny".into(),
                context_length: files.config.context_length,
                vocab_size: files.config.vocab,
                weight_bytes: model.weight_bytes(),
            },
            config: files.config.clone(),
            kernels: true,
            tokenizer: files.tokenizer,
            template: files.template,
            eos: files.eos,
            queued: Default::default(),
            stats: Default::default(),
            adapters: Default::default(),
            token_bytes: Default::default(),
            kv_per_token: 0,
            kv_budget: None,
            next_adapter: Default::default(),
        });
        (
            Scheduler::new(model, shared.clone(), EngineConfig::default()),
            shared,
        )
    }

    #[test]
    fn dropping_the_receiver_stops_generation() {
        let (mut scheduler, shared) = tiny_scheduler();
        let prompt_ids = shared.tokenizer.encode("<|im_start|>user\nhello").unwrap();
        let long = SamplingParams {
            temperature: 1.0,
            seed: Some(3),
            max_tokens: 200,
            // It must not end by itself before the client leaves.
            ignore_eos: true,
            ..Default::default()
        };
        let (events, mut rx) = unbounded_channel();
        shared.waiting().enter(0, usize::MAX, usize::MAX).unwrap();
        scheduler.admit(Job::new(
            GenerateRequest {
                prompt_ids,
                params: long,
                ..Default::default()
            },
            events,
        ));
        while !matches!(rx.try_recv(), Ok(Event::Delta { .. })) {
            scheduler.step();
        }
        drop(rx); // the client went away
        scheduler.drop_cancelled();
        assert!(scheduler.active.is_empty(), "it left the batch");
        let stats = &shared.stats;
        assert_eq!(stats.cancelled.load(Ordering::Relaxed), 1);
        let generated = stats.generated_tokens.load(Ordering::Relaxed);
        assert!(generated < 200, "{generated} tokens");
    }

    /// A waiting job of `tenant` that will not end by itself.
    fn waiting_job(shared: &Shared, tenant: u64) -> (Job, UnboundedReceiver<Event>) {
        let (events, rx) = unbounded_channel();
        shared
            .waiting()
            .enter(tenant, usize::MAX, usize::MAX)
            .unwrap();
        let job = Job::new(
            GenerateRequest {
                prompt_ids: shared.tokenizer.encode("<|im_start|>user\nhello").unwrap(),
                params: SamplingParams {
                    max_tokens: 100,
                    ignore_eos: true,
                    ..Default::default()
                },
                tenant,
                ..Default::default()
            },
            events,
        );
        (job, rx)
    }

    #[test]
    fn a_free_slot_goes_to_the_tenant_with_the_fewest_running() {
        let (mut scheduler, shared) = tiny_scheduler();
        scheduler.cfg.max_batch = 3;
        let mut receivers = Vec::new();
        // Tenant 1 floods first; tenant 2's one request comes last.
        for tenant in [1, 1, 1, 1, 1, 2] {
            let (job, rx) = waiting_job(&shared, tenant);
            scheduler.waiting.push_back(job);
            receivers.push(rx);
        }
        scheduler.fill();
        let running: Vec<u64> = scheduler.active.iter().map(|s| s.job.req.tenant).collect();
        assert_eq!(running, vec![1, 2, 1], "tenant 2 took the second slot");
        assert_eq!(shared.waiting().total, 3);
        assert_eq!(shared.waiting().by_tenant.get(&2), None);
        // With one slot, a finished sequence's slot goes to the tenant
        // served least recently, not to the flood's older requests.
        let (mut one, shared_one) = tiny_scheduler();
        one.cfg.max_batch = 1;
        for tenant in [1, 1, 1, 2, 1, 3] {
            let (job, rx) = waiting_job(&shared_one, tenant);
            one.waiting.push_back(job);
            receivers.push(rx);
        }
        let mut order = Vec::new();
        while !one.waiting.is_empty() {
            one.fill();
            order.push(one.active[0].job.req.tenant);
            one.active.clear();
        }
        assert_eq!(order, vec![1, 2, 3, 1, 1, 1]);
        // First come, first served, tenant 2 waits behind all five.
        let (mut fifo, shared) = tiny_scheduler();
        fifo.cfg.max_batch = 3;
        fifo.cfg.scheduling = Scheduling::Fifo;
        for tenant in [1, 1, 1, 1, 1, 2] {
            let (job, rx) = waiting_job(&shared, tenant);
            fifo.waiting.push_back(job);
            receivers.push(rx);
        }
        fifo.fill();
        assert!(fifo.active.iter().all(|s| s.job.req.tenant == 1));
    }

    #[test]
    fn a_waiting_request_whose_client_left_leaves_the_queue_at_once() {
        let (mut scheduler, shared) = tiny_scheduler();
        let (kept, _rx) = waiting_job(&shared, 1);
        let (gone, rx) = waiting_job(&shared, 2);
        scheduler.waiting.extend([kept, gone]);
        drop(rx);
        scheduler.drop_abandoned();
        assert_eq!(scheduler.waiting.len(), 1);
        assert_eq!(scheduler.waiting[0].req.tenant, 1);
        assert_eq!(shared.waiting().total, 1);
        assert_eq!(shared.stats.cancelled.load(Ordering::Relaxed), 1);
    }

    #[test]
    fn a_tenant_that_fills_its_share_of_the_queue_leaves_room_for_others() {
        // One sequence runs at a time; the queue holds 6, a tenant 2 of them.
        let engine = tiny_engine_with(EngineConfig {
            queue_capacity: 6,
            queue_per_tenant: 2,
            max_batch: 1,
            ..Default::default()
        });
        let params = SamplingParams {
            max_tokens: 300,
            ignore_eos: true,
            ..Default::default()
        };
        let mut receivers = Vec::new();
        let mut accepted = 0;
        loop {
            let req = GenerateRequest {
                tenant: 1,
                ..request(&engine, params.clone())
            };
            match engine.submit(req) {
                Ok(rx) => {
                    receivers.push(rx);
                    accepted += 1;
                }
                Err(SubmitError::TenantQueueFull) => break,
                Err(e) => panic!("{e}"),
            }
            assert!(accepted <= 3 + 20, "tenant 1 was never refused");
        }
        // Tenant 1 is refused, tenant 2 is not.
        let quiet = GenerateRequest {
            tenant: 2,
            ..request(&engine, params.clone())
        };
        let quiet = engine.submit(quiet).expect("the other tenant gets in");
        drop(receivers);
        assert!(matches!(collect(quiet).1, Some(Event::Done { .. })));
    }

    #[test]
    fn the_running_gauge_is_zero_once_every_generation_has_ended() {
        let engine = tiny_engine(4);
        let params = SamplingParams {
            max_tokens: 5,
            ignore_eos: true,
            ..Default::default()
        };
        let rx = engine.submit(request(&engine, params)).unwrap();
        assert!(matches!(collect(rx).1, Some(Event::Done { .. })));
        // The thread goes idle, waiting for work; before this was fixed the
        // gauge stayed at 1 for as long as no other request came.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while engine.stats().running != 0 && std::time::Instant::now() < deadline {
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        assert_eq!(engine.stats().running, 0);
    }

    #[test]
    fn full_queue_is_refused() {
        // One running, one waiting: everything else is refused.
        let engine = tiny_engine_with(EngineConfig {
            queue_capacity: 1,
            max_batch: 1,
            ..Default::default()
        });
        let params = SamplingParams {
            max_tokens: 200,
            temperature: 1.0,
            ..Default::default()
        };
        let mut receivers = Vec::new();
        let mut refused = 0;
        for _ in 0..20 {
            match engine.submit(request(&engine, params.clone())) {
                Ok(rx) => receivers.push(rx),
                Err(SubmitError::QueueFull) => refused += 1,
                Err(e) => panic!("{e}"),
            }
        }
        assert!(refused > 0, "a queue of one accepted 20 requests");
        // Everything accepted still completes.
        for rx in receivers {
            assert!(matches!(collect(rx).1, Some(Event::Done { .. })));
        }
    }
}
