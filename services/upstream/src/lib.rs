//! A model version served by a server elsewhere (vLLM, TGI, llama.cpp's
//! server, a hosted API) instead of weights in this process.
//!
//! [`Client`] answers a chat request the way an engine does: a stream of
//! [`flywheel_engine::Event`]s, so the gateway records, streams and
//! rates an upstream answer with the same code as a local one. Around the
//! protocol ([`Upstream`], one file per protocol: [`openai`]) it keeps the
//! rules every upstream gets: one deadline per answer, retries with
//! backoff while nothing has been streamed yet, and a circuit breaker
//! ([`breaker`]) that stops calling a server that keeps failing.

pub mod breaker;
pub mod openai;

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use flywheel_engine::{Event, FinishReason, TokenLogprob};
use serde_json::Value;
use tokio::sync::mpsc;
use tokio::time::Instant;

use breaker::Breaker;

pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// Why an upstream gave no answer (or stopped giving one).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum UpstreamError {
    /// No connection (refused, reset, name unknown).
    #[error("the upstream could not be reached: {0}")]
    Unreachable(String),
    #[error("the upstream did not finish within {0:?}")]
    Timeout(Duration),
    /// The server answered with an HTTP error.
    #[error("the upstream answered {status}: {message}")]
    Status { status: u16, message: String },
    /// Something that does not speak the protocol.
    #[error("the upstream's answer could not be read: {0}")]
    Protocol(String),
    /// Too many failures lately: not called until the breaker lets a trial through.
    #[error("the upstream failed repeatedly; calls resume in {} s", retry_after.as_secs().max(1))]
    CircuitOpen { retry_after: Duration },
    /// The version names a key variable this process does not have.
    #[error("the upstream's API key variable {0} is not set on this server")]
    MissingKey(String),
}

impl UpstreamError {
    /// Worth another attempt: the server may answer next time.
    fn transient(&self) -> bool {
        match self {
            Self::Unreachable(_) | Self::Timeout(_) => true,
            Self::Status { status, .. } => *status == 429 || *status >= 500,
            _ => false,
        }
    }

    /// Counts against the server's health: its fault, not the request's.
    fn server_fault(&self) -> bool {
        match self {
            Self::Unreachable(_) | Self::Timeout(_) | Self::Protocol(_) => true,
            Self::Status { status, .. } => *status >= 500,
            _ => false,
        }
    }
}

/// One piece of a streamed answer, as a protocol reads it.
#[derive(Debug, Clone, PartialEq)]
pub enum Piece {
    /// Generated text, with the log-probabilities of its tokens when asked for.
    Text {
        text: String,
        logprobs: Vec<TokenLogprob>,
    },
    Finish(FinishReason),
    Usage {
        prompt_tokens: usize,
        completion_tokens: usize,
    },
}

/// A wire protocol: opens one streamed chat completion.
pub trait Upstream: Send + Sync + 'static {
    /// One attempt: `Ok` once the server accepted the request; its pieces
    /// follow from the [`Answer`].
    fn open<'a>(
        &'a self,
        request: &'a Value,
    ) -> BoxFuture<'a, Result<Box<dyn Answer>, UpstreamError>>;
}

/// The rest of one accepted answer.
pub trait Answer: Send {
    /// The next piece; `None` once the server ended the answer.
    fn next(&mut self) -> BoxFuture<'_, Result<Option<Piece>, UpstreamError>>;
}

/// The rules every upstream gets.
#[derive(Debug, Clone, PartialEq)]
pub struct Settings {
    /// Attempts after the first while nothing has been streamed.
    pub retries: u32,
    /// The wait before the first retry, doubled for each one after.
    pub backoff: Duration,
    /// Consecutive failures that open the circuit.
    pub breaker_failures: u32,
    /// How long an open circuit refuses calls before letting one trial through.
    pub breaker_cooldown: Duration,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            retries: 2,
            backoff: Duration::from_millis(250),
            breaker_failures: 5,
            breaker_cooldown: Duration::from_secs(30),
        }
    }
}

/// Running totals, for `/metrics`.
#[derive(Debug, Default)]
pub struct Counters {
    pub requests: AtomicU64,
    pub attempts: AtomicU64,
    pub failures: AtomicU64,
    pub refused_open: AtomicU64,
    pub prompt_tokens: AtomicU64,
    pub completion_tokens: AtomicU64,
}

/// One upstream version's client, shared by every request to it.
pub struct Client {
    upstream: Box<dyn Upstream>,
    settings: Settings,
    /// The longest one answer may take, retries included.
    timeout: Duration,
    breaker: Arc<Breaker>,
    counters: Arc<Counters>,
}

impl Client {
    pub fn new(upstream: Box<dyn Upstream>, timeout: Duration, settings: Settings) -> Self {
        let breaker = Arc::new(Breaker::new(
            settings.breaker_failures,
            settings.breaker_cooldown,
        ));
        Self {
            upstream,
            settings,
            timeout,
            breaker,
            counters: Arc::default(),
        }
    }

    /// A client of an OpenAI-compatible server whose API key (if any) is in
    /// the environment variable `api_key_env` of this process.
    pub fn openai(
        base_url: &str,
        model: &str,
        api_key_env: Option<&str>,
        timeout: Duration,
        settings: Settings,
    ) -> Result<Self, UpstreamError> {
        let key = match api_key_env {
            Some(var) => {
                Some(std::env::var(var).map_err(|_| UpstreamError::MissingKey(var.to_string()))?)
            }
            None => None,
        };
        let protocol = openai::OpenAi::new(base_url, model, key.as_deref())?;
        Ok(Self::new(Box::new(protocol), timeout, settings))
    }

    pub fn counters(&self) -> &Counters {
        &self.counters
    }

    /// Whether calls are being refused now (the circuit is open).
    pub fn circuit_open(&self) -> bool {
        self.breaker.is_open()
    }

    /// Starts a streamed chat completion (an OpenAI request body without
    /// `model` and `stream`: the protocol sets them). Returns once the
    /// server accepted it, after retries; the answer follows as engine
    /// events, ending in `Done` or `Error`. Dropping the receiver ends the
    /// call.
    pub async fn chat(
        &self,
        request: Value,
    ) -> Result<mpsc::UnboundedReceiver<Event>, UpstreamError> {
        self.counters.requests.fetch_add(1, Ordering::Relaxed);
        let deadline = Instant::now() + self.timeout;
        let answer = self.open_with_retries(&request, deadline).await?;
        let (tx, rx) = mpsc::unbounded_channel();
        let reader = Reader {
            answer,
            tx,
            deadline,
            timeout: self.timeout,
        };
        // The reader owns the rest of the answer; the breaker and the
        // counters hear how it ended. Only a finished answer shows the
        // server well: one that accepts requests and then breaks them
        // still opens the circuit.
        let (breaker, counters) = (self.breaker.clone(), self.counters.clone());
        tokio::spawn(async move {
            match reader.run().await {
                Ended::Finished { prompt, completion } => {
                    breaker.success();
                    counters
                        .prompt_tokens
                        .fetch_add(prompt as u64, Ordering::Relaxed);
                    counters
                        .completion_tokens
                        .fetch_add(completion as u64, Ordering::Relaxed);
                }
                // A long answer that ran past its deadline says nothing
                // of the server's health.
                Ended::Failed(UpstreamError::Timeout(_)) | Ended::Abandoned => breaker.release(),
                Ended::Failed(e) if e.server_fault() => {
                    breaker.failure();
                    counters.failures.fetch_add(1, Ordering::Relaxed);
                }
                Ended::Failed(_) => breaker.release(),
            }
        });
        Ok(rx)
    }

    /// Attempts until the server accepts the request, a failure is not
    /// worth retrying, the retries are spent or `deadline` passes. Each
    /// attempt that went out is counted once, for the breaker and in the
    /// counters.
    async fn open_with_retries(
        &self,
        request: &Value,
        deadline: Instant,
    ) -> Result<Box<dyn Answer>, UpstreamError> {
        let mut wait = self.settings.backoff;
        let mut attempt = 0;
        loop {
            if let Err(retry_after) = self.breaker.admit() {
                self.counters.refused_open.fetch_add(1, Ordering::Relaxed);
                return Err(UpstreamError::CircuitOpen { retry_after });
            }
            self.counters.attempts.fetch_add(1, Ordering::Relaxed);
            let e = match tokio::time::timeout_at(deadline, self.upstream.open(request)).await {
                Ok(Ok(answer)) => return Ok(answer),
                Ok(Err(e)) => e,
                Err(_) => UpstreamError::Timeout(self.timeout),
            };
            if e.server_fault() {
                self.breaker.failure();
                self.counters.failures.fetch_add(1, Ordering::Relaxed);
            } else {
                self.breaker.release();
            }
            if !e.transient() || attempt >= self.settings.retries {
                return Err(e);
            }
            // No time left for another attempt: the last failure stands.
            if Instant::now() + wait >= deadline {
                return Err(e);
            }
            attempt += 1;
            tracing::warn!(error = %e, attempt, "upstream attempt failed; retrying");
            tokio::time::sleep(wait).await;
            wait *= 2;
        }
    }
}

/// How a streamed answer ended.
enum Ended {
    Finished {
        prompt: usize,
        completion: usize,
    },
    Failed(UpstreamError),
    /// The receiver went away (the client left).
    Abandoned,
}

/// Moves one answer's pieces to the engine events the gateway reads.
struct Reader {
    answer: Box<dyn Answer>,
    tx: mpsc::UnboundedSender<Event>,
    deadline: Instant,
    timeout: Duration,
}

impl Reader {
    async fn run(mut self) -> Ended {
        let mut finish = None;
        let mut usage = None;
        let mut deltas = 0;
        loop {
            let next = tokio::select! {
                n = tokio::time::timeout_at(self.deadline, self.answer.next()) => n,
                _ = self.tx.closed() => return Ended::Abandoned,
            };
            let piece = match next {
                Err(_) => return self.fail(UpstreamError::Timeout(self.timeout)),
                Ok(Err(e)) => return self.fail(e),
                Ok(Ok(None)) => break,
                Ok(Ok(Some(p))) => p,
            };
            match piece {
                Piece::Text { text, logprobs } => {
                    let mut logprobs = logprobs.into_iter();
                    let first = Event::Delta {
                        text,
                        logprobs: logprobs.next(),
                    };
                    deltas += 1;
                    let rest = logprobs.map(|lp| Event::Delta {
                        text: String::new(),
                        logprobs: Some(lp),
                    });
                    for ev in std::iter::once(first).chain(rest) {
                        if self.tx.send(ev).is_err() {
                            return Ended::Abandoned;
                        }
                    }
                }
                Piece::Finish(f) => finish = Some(f),
                Piece::Usage {
                    prompt_tokens,
                    completion_tokens,
                } => usage = Some((prompt_tokens, completion_tokens)),
            }
        }
        let Some(finish_reason) = finish else {
            return self.fail(UpstreamError::Protocol(
                "the stream ended before the answer finished".into(),
            ));
        };
        // Without usage (a server that does not report it) the prompt's
        // size is unknown and each streamed piece counts as a token.
        let (prompt, completion) = usage.unwrap_or((0, deltas));
        let _ = self.tx.send(Event::Done {
            finish_reason,
            prompt_tokens: prompt,
            completion_tokens: completion,
        });
        Ended::Finished { prompt, completion }
    }

    fn fail(&self, e: UpstreamError) -> Ended {
        let _ = self.tx.send(match e {
            UpstreamError::Timeout(_) => Event::TimedOut(e.to_string()),
            _ => Event::Error(e.to_string()),
        });
        Ended::Failed(e)
    }
}

#[cfg(test)]
mod tests {
    use std::collections::VecDeque;
    use std::sync::Mutex;

    use super::*;

    /// An upstream that answers each attempt from a script.
    struct Scripted {
        attempts: Mutex<VecDeque<Result<Vec<Piece>, UpstreamError>>>,
    }

    struct Canned(VecDeque<Piece>);

    impl Answer for Canned {
        fn next(&mut self) -> BoxFuture<'_, Result<Option<Piece>, UpstreamError>> {
            Box::pin(async move { Ok(self.0.pop_front()) })
        }
    }

    impl Upstream for Scripted {
        fn open<'a>(
            &'a self,
            _: &'a Value,
        ) -> BoxFuture<'a, Result<Box<dyn Answer>, UpstreamError>> {
            let next = self.attempts.lock().unwrap().pop_front();
            Box::pin(async move {
                match next.expect("an attempt the script did not expect") {
                    Ok(pieces) => Ok(Box::new(Canned(pieces.into())) as Box<dyn Answer>),
                    Err(e) => Err(e),
                }
            })
        }
    }

    fn client(script: Vec<Result<Vec<Piece>, UpstreamError>>, settings: Settings) -> Client {
        let upstream = Scripted {
            attempts: Mutex::new(script.into()),
        };
        Client::new(Box::new(upstream), Duration::from_secs(60), settings)
    }

    fn answer() -> Vec<Piece> {
        vec![
            Piece::Text {
                text: "ok".into(),
                logprobs: vec![],
            },
            Piece::Finish(FinishReason::Stop),
        ]
    }

    fn status(status: u16) -> UpstreamError {
        UpstreamError::Status {
            status,
            message: "no".into(),
        }
    }

    async fn events(mut rx: mpsc::UnboundedReceiver<Event>) -> Vec<Event> {
        let mut out = Vec::new();
        while let Some(ev) = rx.recv().await {
            out.push(ev);
        }
        out
    }

    #[tokio::test(start_paused = true)]
    async fn retries_server_errors_and_answers_as_an_engine_does() {
        let c = client(
            vec![
                Err(status(503)),
                Err(UpstreamError::Unreachable("reset".into())),
                Ok(answer()),
            ],
            Settings::default(),
        );
        let evs = events(c.chat(json_request()).await.unwrap()).await;
        assert_eq!(
            evs,
            vec![
                Event::Delta {
                    text: "ok".into(),
                    logprobs: None
                },
                Event::Done {
                    finish_reason: FinishReason::Stop,
                    prompt_tokens: 0,
                    completion_tokens: 1
                },
            ]
        );
        assert_eq!(c.counters().attempts.load(Ordering::Relaxed), 3);
    }

    #[tokio::test(start_paused = true)]
    async fn a_refused_request_is_not_retried_and_does_not_count_against_the_server() {
        let c = client(
            vec![Err(status(400)), Err(status(400))],
            Settings {
                breaker_failures: 1,
                ..Settings::default()
            },
        );
        assert_eq!(c.chat(json_request()).await.unwrap_err(), status(400));
        assert_eq!(c.counters().attempts.load(Ordering::Relaxed), 1);
        assert!(!c.circuit_open());
        assert_eq!(c.chat(json_request()).await.unwrap_err(), status(400));
    }

    #[tokio::test(start_paused = true)]
    async fn gives_up_after_the_retries_and_the_breaker_then_refuses_at_once() {
        let c = client(
            vec![Err(status(500)), Err(status(502)), Err(status(504))],
            Settings {
                breaker_failures: 3,
                ..Settings::default()
            },
        );
        assert_eq!(c.chat(json_request()).await.unwrap_err(), status(504));
        // No attempt is scripted: a call that went out would panic the upstream.
        assert!(matches!(
            c.chat(json_request()).await,
            Err(UpstreamError::CircuitOpen { .. })
        ));
        assert_eq!(c.counters().refused_open.load(Ordering::Relaxed), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn an_answer_that_stops_before_finishing_ends_in_an_error_event() {
        let c = client(
            vec![Ok(vec![Piece::Text {
                text: "half".into(),
                logprobs: vec![],
            }])],
            Settings::default(),
        );
        let evs = events(c.chat(json_request()).await.unwrap()).await;
        assert_eq!(evs.len(), 2);
        assert!(
            matches!(&evs[1], Event::Error(e) if e.contains("ended before the answer finished"))
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_server_that_accepts_then_breaks_every_answer_opens_the_circuit() {
        let half = || {
            Ok(vec![Piece::Text {
                text: "half".into(),
                logprobs: vec![],
            }])
        };
        let c = client(
            vec![half(), half()],
            Settings {
                breaker_failures: 2,
                ..Settings::default()
            },
        );
        for _ in 0..2 {
            let evs = events(c.chat(json_request()).await.unwrap()).await;
            assert!(matches!(evs.last(), Some(Event::Error(_))));
            // The reader's task reports the end to the breaker.
            tokio::task::yield_now().await;
        }
        assert!(matches!(
            c.chat(json_request()).await,
            Err(UpstreamError::CircuitOpen { .. })
        ));
    }

    fn json_request() -> Value {
        serde_json::json!({"messages": [{"role": "user", "content": "hi"}]})
    }
}
