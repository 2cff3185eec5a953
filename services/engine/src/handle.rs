//! The engine's public face: [`EngineHandle`]. A handle loads a model, starts its engine thread ([`crate::scheduler`])
//! and feeds it through a bounded queue; a full queue is refused at once
//! ([`SubmitError::QueueFull`], HTTP 429) rather than letting latency grow
//! without bound. Each request gets its own channel of [`Event`]s; when the
//! receiver is dropped (the client went away) the sequence leaves the batch
//! at the next step.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{SyncSender, TrySendError, sync_channel};

use flywheel_model::{ChatMessage, ModelFiles};
use tokio::sync::mpsc::{UnboundedReceiver, unbounded_channel};

use crate::Result;
use crate::adapter::AdapterWeights;
use crate::cpu::CpuLlama;
use crate::scheduler::{Job, spawn};
use crate::types::{
    AdapterId, Backend, Counters, EngineConfig, EngineStats, Event, GenerateRequest, ModelInfo,
    Shared, SubmitError,
};

/// Cheap to clone; every clone feeds the same engine thread.
#[derive(Clone)]
pub struct EngineHandle {
    tx: SyncSender<Job>,
    shared: Arc<Shared>,
    /// The queue's bounds: in all, and per tenant.
    capacity: usize,
    per_tenant: usize,
}

impl EngineHandle {
    /// Loads a GGUF model and starts its engine thread.
    pub fn load(path: &Path, name: &str, cfg: EngineConfig) -> Result<Self> {
        let files = ModelFiles::open(path)?;
        let ModelFiles {
            mut gguf,
            mut config,
            tokenizer,
            template,
            eos,
        } = files;
        let device = flywheel_model::device();
        let cpu = device.is_cpu() && cfg.backend == Backend::Auto;
        // What the CPU kernels will hold, said and checked before a weight
        // is read (a GPU's memory is candle's to manage).
        let plan = crate::MemoryPlan::new(&gguf, &config, &cfg);
        let mut kv_budget = None;
        if cpu {
            match crate::MemoryLimit::now(cfg.memory_budget) {
                Some(limit) => {
                    plan.check(name, &limit)?;
                    kv_budget = Some(limit.bytes - (plan.needed() - plan.one_sequence()));
                }
                None => tracing::warn!(model = name, "cannot tell how much memory is available"),
            }
            tracing::info!(model = name, memory = %plan, "memory");
        }
        config.context_length = plan.context;
        let mut info = ModelInfo {
            name: name.to_string(),
            context_length: config.context_length,
            vocab_size: config.vocab,
            weight_bytes: 0,
        };
        // The thread takes every submitted request off this channel into
        // its own waiting list; `Shared::queued` bounds the two together.
        let (tx, rx) = sync_channel(cfg.queue_capacity);
        let (capacity, per_tenant) = (cfg.queue_capacity, cfg.queue_per_tenant);
        let llama = config.clone();
        let shared = |info| {
            Arc::new(Shared {
                info,
                config: llama,
                tokenizer,
                template,
                eos,
                queued: Default::default(),
                stats: Counters::default(),
                adapters: Default::default(),
                next_adapter: AtomicU64::new(1),
                kernels: cpu,
                token_bytes: Default::default(),
                kv_per_token: plan.kv_per_token,
                kv_budget,
            })
        };
        let shared = if cpu {
            // Our kernels: quantized weights, batched steps.
            let mut model = CpuLlama::load_as(&mut gguf, cfg.threads, cfg.simd, cfg.quantize)?;
            model.limit_context(plan.context);
            info.weight_bytes = model.weight_bytes();
            let shared = shared(info);
            spawn(model, shared.clone(), cfg, rx)?;
            shared
        } else {
            // A GPU through candle: the reference forward on that device.
            let mut model = flywheel_model::Llama::load(&mut gguf, &device)?;
            model.limit_context(plan.context)?;
            info.weight_bytes = model.weight_bytes();
            let shared = shared(info);
            spawn(model, shared.clone(), cfg, rx)?;
            shared
        };
        tracing::info!(model = name, path = %path.display(), "model loaded");
        Ok(Self {
            tx,
            shared,
            capacity,
            per_tenant,
        })
    }

    pub fn info(&self) -> &ModelInfo {
        &self.shared.info
    }

    /// Makes a LoRA adapter available to requests (`GenerateRequest::adapter`):
    /// it runs on this engine's base weights, which it shares with every
    /// other adapter and with requests that name none. Only the CPU kernels
    /// apply adapters.
    pub fn add_adapter(&self, weights: AdapterWeights) -> Result<AdapterId> {
        if !self.shared.kernels {
            return Err(crate::EngineError::Invalid(
                "adapters are applied by the CPU kernels only; serve the merged model instead"
                    .into(),
            ));
        }
        let adapter = crate::adapter::Adapter::new(weights, &self.shared.config)?;
        let id = AdapterId(self.shared.next_adapter.fetch_add(1, Ordering::Relaxed));
        self.shared
            .adapters
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .insert(id, Arc::new(adapter));
        Ok(id)
    }

    /// Forgets an adapter; generations already running with it finish.
    pub fn remove_adapter(&self, id: AdapterId) -> bool {
        self.shared
            .adapters
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&id)
            .is_some()
    }

    /// Bytes of adapter weights loaded.
    pub fn adapter_bytes(&self) -> usize {
        self.shared
            .adapters
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .map(|a| a.weight_bytes())
            .sum()
    }

    /// Requests waiting for the engine, not counting the one running.
    pub fn queue_depth(&self) -> usize {
        self.shared.waiting().total
    }

    pub fn stats(&self) -> EngineStats {
        let c = &self.shared.stats;
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        EngineStats {
            queued: self.queue_depth(),
            running: get(&c.running),
            last_batch: get(&c.last_batch),
            peak_batch: get(&c.peak_batch),
            held_for_memory: get(&c.held_for_memory),
            steps: get(&c.steps),
            ttft_micros: get(&c.ttft_micros),
            ttft_count: get(&c.ttft_count),
            generated_tokens: get(&c.generated_tokens),
            prompt_tokens: get(&c.prompt_tokens),
            cached_prompt_tokens: get(&c.cached_prompt_tokens),
            draft_tokens: get(&c.draft_tokens),
            draft_tokens_accepted: get(&c.draft_tokens_accepted),
            finished: get(&c.finished),
            cancelled: get(&c.cancelled),
            failed: get(&c.failed),
        }
    }

    /// Prompt token ids for a conversation, rendered with the model's template.
    pub fn prepare_chat(&self, messages: &[ChatMessage]) -> Result<Vec<u32>> {
        let text = self.shared.template.render(messages)?;
        Ok(self.shared.tokenizer.encode(&text)?)
    }

    /// Token ids of `text` as it is (special tokens in it recognised).
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        Ok(self.shared.tokenizer.encode(text)?)
    }

    /// The text of token ids, special tokens kept; an id outside the
    /// vocabulary is an error.
    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        let vocab = self.shared.info.vocab_size;
        if let Some(bad) = ids.iter().find(|&&id| id as usize >= vocab) {
            return Err(crate::EngineError::Invalid(format!(
                "token {bad} is outside the vocabulary (0 to {})",
                vocab - 1
            )));
        }
        Ok(self.shared.tokenizer.decode(ids, false)?)
    }

    /// Token ids of an assistant's answer as the model would end it (its
    /// text, then the end-of-turn token): what scoring forces.
    pub fn answer_ids(&self, text: &str) -> Result<Vec<u32>> {
        let mut ids = self.shared.tokenizer.encode(text)?;
        ids.push(self.shared.eos);
        Ok(ids)
    }

    /// Queues a request; events arrive on the returned channel.
    pub fn submit(
        &self,
        req: GenerateRequest,
    ) -> std::result::Result<UnboundedReceiver<Event>, SubmitError> {
        let (events, rx) = unbounded_channel();
        let tenant = req.tenant;
        self.shared
            .waiting()
            .enter(tenant, self.capacity, self.per_tenant)?;
        match self.tx.try_send(Job::new(req, events)) {
            Ok(()) => Ok(rx),
            Err(e) => {
                self.shared.waiting().leave(tenant);
                Err(match e {
                    TrySendError::Full(_) => SubmitError::QueueFull,
                    TrySendError::Disconnected(_) => SubmitError::Stopped,
                })
            }
        }
    }
}
