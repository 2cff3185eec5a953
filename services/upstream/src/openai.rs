//! OpenAI's chat completions protocol, as vLLM, TGI, llama.cpp's server and
//! the hosted APIs speak it: `POST {base}/chat/completions` with
//! `stream: true`, answered by server-sent events, one JSON chunk per
//! `data:` line and `data: [DONE]` at the end.

use std::collections::VecDeque;
use std::time::Duration;

use flywheel_engine::{FinishReason, TokenLogprob, TopLogprob};
use reqwest::header::{ACCEPT, AUTHORIZATION, HeaderValue};
use serde_json::{Value, json};
use tracing::Instrument;

use crate::{Answer, BoxFuture, Piece, Upstream, UpstreamError};

/// An OpenAI-compatible server.
pub struct OpenAi {
    http: reqwest::Client,
    url: String,
    model: String,
    key: Option<HeaderValue>,
}

impl OpenAi {
    /// `base_url` up to the API's version (`http://host:8000/v1`); `model`
    /// as the server names it; `api_key` sent as a bearer token.
    pub fn new(base_url: &str, model: &str, api_key: Option<&str>) -> Result<Self, UpstreamError> {
        let http = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(10))
            .build()
            .map_err(|e| UpstreamError::Protocol(format!("no HTTP client: {e}")))?;
        let key = match api_key {
            Some(k) => {
                let mut v = HeaderValue::from_str(&format!("Bearer {k}")).map_err(|_| {
                    UpstreamError::Protocol("the API key holds characters a header cannot".into())
                })?;
                // Kept out of any debug print of the request.
                v.set_sensitive(true);
                Some(v)
            }
            None => None,
        };
        Ok(Self {
            http,
            url: format!("{}/chat/completions", base_url.trim_end_matches('/')),
            model: model.to_string(),
            key,
        })
    }

    fn body(&self, request: &Value) -> Value {
        let mut body = request.clone();
        body["model"] = json!(self.model);
        body["stream"] = json!(true);
        body["stream_options"] = json!({"include_usage": true});
        body
    }
}

impl Upstream for OpenAi {
    fn open<'a>(
        &'a self,
        request: &'a Value,
    ) -> BoxFuture<'a, Result<Box<dyn Answer>, UpstreamError>> {
        let span = tracing::info_span!(
            "upstream",
            otel.name = %format!("chat {}", self.model),
            otel.kind = "client",
            gen_ai.operation.name = "chat",
            gen_ai.request.model = %self.model,
            server.address = %self.url,
        );
        let call = async move {
            let mut req = self
                .http
                .post(&self.url)
                .header(ACCEPT, "text/event-stream")
                .json(&self.body(request));
            if let Some(key) = &self.key {
                req = req.header(AUTHORIZATION, key.clone());
            }
            for (name, value) in trace_context() {
                req = req.header(name, value);
            }
            let resp = req.send().await.map_err(|e| {
                // Without the URL: the error says what failed, the version's
                // settings say where.
                UpstreamError::Unreachable(e.without_url().to_string())
            })?;
            let status = resp.status();
            if !status.is_success() {
                let text = resp.text().await.unwrap_or_default();
                return Err(UpstreamError::Status {
                    status: status.as_u16(),
                    message: error_message(&text),
                });
            }
            let is_json = resp
                .headers()
                .get(reqwest::header::CONTENT_TYPE)
                .and_then(|v| v.to_str().ok())
                .is_some_and(|t| t.starts_with("application/json"));
            if is_json {
                // A server that ignored `stream`: the whole answer at once.
                let v: Value = resp
                    .json()
                    .await
                    .map_err(|e| UpstreamError::Protocol(e.without_url().to_string()))?;
                let pieces = whole_answer(&v)?;
                return Ok(Box::new(Events {
                    resp: None,
                    buf: Vec::new(),
                    pending: pieces.into(),
                    done: true,
                }) as Box<dyn Answer>);
            }
            Ok(Box::new(Events {
                resp: Some(resp),
                buf: Vec::new(),
                pending: VecDeque::new(),
                done: false,
            }) as Box<dyn Answer>)
        };
        Box::pin(call.instrument(span))
    }
}

/// The current span's context as W3C headers (`traceparent`,
/// `tracestate`), by the global propagator: the upstream's spans join our
/// trace. Nothing where no trace is exported.
fn trace_context() -> Vec<(String, String)> {
    use tracing_opentelemetry::OpenTelemetrySpanExt;
    let cx = tracing::Span::current().context();
    let mut headers = std::collections::HashMap::new();
    opentelemetry::global::get_text_map_propagator(|p| p.inject_context(&cx, &mut headers));
    headers.into_iter().collect()
}

/// The message of an error body in OpenAI's shape, else the body itself
/// (cut short).
fn error_message(body: &str) -> String {
    let parsed: Option<Value> = serde_json::from_str(body).ok();
    let message = parsed.as_ref().and_then(|v| {
        v["error"]["message"]
            .as_str()
            .or_else(|| v["error"].as_str())
            .or_else(|| v["message"].as_str())
            .or_else(|| v["detail"].as_str())
            .map(str::to_string)
    });
    let text = message.unwrap_or_else(|| body.trim().to_string());
    let text: String = text.chars().take(500).collect();
    if text.is_empty() {
        "no detail given".into()
    } else {
        text
    }
}

/// The server-sent events of one answer.
struct Events {
    resp: Option<reqwest::Response>,
    buf: Vec<u8>,
    pending: VecDeque<Piece>,
    done: bool,
}

impl Answer for Events {
    fn next(&mut self) -> BoxFuture<'_, Result<Option<Piece>, UpstreamError>> {
        Box::pin(async move {
            loop {
                if let Some(p) = self.pending.pop_front() {
                    return Ok(Some(p));
                }
                if let Some(end) = self.buf.iter().position(|&b| b == b'\n') {
                    let line: Vec<u8> = self.buf.drain(..=end).collect();
                    self.line(&line)?;
                    continue;
                }
                if self.done {
                    return Ok(None);
                }
                let Some(resp) = self.resp.as_mut() else {
                    return Ok(None);
                };
                match resp.chunk().await {
                    Ok(Some(bytes)) => self.buf.extend_from_slice(&bytes),
                    Ok(None) => {
                        // A last line without its newline.
                        let rest = std::mem::take(&mut self.buf);
                        self.done = true;
                        self.resp = None;
                        self.line(&rest)?;
                    }
                    Err(e) => {
                        return Err(UpstreamError::Unreachable(format!(
                            "the connection broke mid-answer: {}",
                            e.without_url()
                        )));
                    }
                }
            }
        })
    }
}

impl Events {
    /// One line of the event stream: only `data:` lines carry anything.
    fn line(&mut self, line: &[u8]) -> Result<(), UpstreamError> {
        let line = String::from_utf8_lossy(line);
        let Some(data) = line.trim_end_matches(['\r', '\n']).strip_prefix("data:") else {
            return Ok(());
        };
        let data = data.trim();
        if data == "[DONE]" {
            // Whatever follows the end is not part of the answer.
            self.done = true;
            self.resp = None;
            self.buf.clear();
            return Ok(());
        }
        let v: Value = serde_json::from_str(data)
            .map_err(|e| UpstreamError::Protocol(format!("a chunk is not JSON: {e}")))?;
        if !v["error"].is_null() {
            return Err(UpstreamError::Status {
                status: v["error"]["code"]
                    .as_u64()
                    .and_then(|c| u16::try_from(c).ok())
                    .unwrap_or(500),
                message: error_message(data),
            });
        }
        let choice = &v["choices"][0];
        let text = choice["delta"]["content"].as_str().unwrap_or_default();
        let logprobs = token_logprobs(&choice["logprobs"]["content"]);
        if !text.is_empty() || !logprobs.is_empty() {
            self.pending.push_back(Piece::Text {
                text: text.to_string(),
                logprobs,
            });
        }
        if let Some(reason) = choice["finish_reason"].as_str() {
            self.pending.push_back(Piece::Finish(finish_reason(reason)));
        }
        if let Some(usage) = usage(&v["usage"]) {
            self.pending.push_back(usage);
        }
        Ok(())
    }
}

fn finish_reason(s: &str) -> FinishReason {
    match s {
        "length" => FinishReason::Length,
        // `stop`, and what this API has no word for (`content_filter`, `tool_calls`).
        _ => FinishReason::Stop,
    }
}

fn usage(v: &Value) -> Option<Piece> {
    let count = |k: &str| v[k].as_u64().map(|n| n as usize);
    Some(Piece::Usage {
        prompt_tokens: count("prompt_tokens")?,
        completion_tokens: count("completion_tokens")?,
    })
}

fn token_logprobs(v: &Value) -> Vec<TokenLogprob> {
    let Some(items) = v.as_array() else {
        return Vec::new();
    };
    let top = |t: &Value| TopLogprob {
        token: t["token"].as_str().unwrap_or_default().to_string(),
        logprob: t["logprob"].as_f64().unwrap_or(f64::NEG_INFINITY) as f32,
    };
    items
        .iter()
        .map(|t| TokenLogprob {
            token: t["token"].as_str().unwrap_or_default().to_string(),
            logprob: t["logprob"].as_f64().unwrap_or(f64::NEG_INFINITY) as f32,
            top: t["top_logprobs"]
                .as_array()
                .map(|a| a.iter().map(top).collect())
                .unwrap_or_default(),
        })
        .collect()
}

/// The pieces of a non-streamed `chat.completion`.
fn whole_answer(v: &Value) -> Result<Vec<Piece>, UpstreamError> {
    let choice = &v["choices"][0];
    let text = choice["message"]["content"]
        .as_str()
        .ok_or_else(|| UpstreamError::Protocol("no message in the answer".into()))?;
    let mut pieces = vec![Piece::Text {
        text: text.to_string(),
        logprobs: token_logprobs(&choice["logprobs"]["content"]),
    }];
    pieces.push(Piece::Finish(finish_reason(
        choice["finish_reason"].as_str().unwrap_or("stop"),
    )));
    pieces.extend(usage(&v["usage"]));
    Ok(pieces)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn events(body: &str) -> Events {
        Events {
            resp: None,
            buf: body.as_bytes().to_vec(),
            pending: VecDeque::new(),
            done: true,
        }
    }

    async fn all(mut e: Events) -> Result<Vec<Piece>, UpstreamError> {
        let mut out = Vec::new();
        while let Some(p) = e.next().await? {
            out.push(p);
        }
        Ok(out)
    }

    #[tokio::test]
    async fn reads_text_finish_and_usage_from_chunks() {
        let body = concat!(
            "data: {\"choices\":[{\"index\":0,\"delta\":{\"role\":\"assistant\",\"content\":\"\"},\"finish_reason\":null}]}\n\n",
            ": a comment line\n",
            "data: {\"choices\":[{\"index\":0,\"delta\":{\"content\":\"Hel\"},\"finish_reason\":null}]}\r\n\r\n",
            "data: {\"choices\":[{\"index\":0,\"delta\":{\"content\":\"lo\"},\"finish_reason\":\"length\"}]}\n\n",
            "data: {\"choices\":[],\"usage\":{\"prompt_tokens\":7,\"completion_tokens\":2,\"total_tokens\":9}}\n\n",
            "data: [DONE]\n\n",
            "data: {\"choices\":[{\"delta\":{\"content\":\"after the end\"}}]}\n",
        );
        let pieces = all(events(body)).await.unwrap();
        assert_eq!(
            pieces,
            vec![
                Piece::Text {
                    text: "Hel".into(),
                    logprobs: vec![]
                },
                Piece::Text {
                    text: "lo".into(),
                    logprobs: vec![]
                },
                Piece::Finish(FinishReason::Length),
                Piece::Usage {
                    prompt_tokens: 7,
                    completion_tokens: 2
                },
            ]
        );
    }

    #[tokio::test]
    async fn an_error_event_mid_stream_is_an_error() {
        let body = concat!(
            "data: {\"choices\":[{\"delta\":{\"content\":\"Hi\"}}]}\n\n",
            "data: {\"error\":{\"message\":\"out of memory\",\"code\":503}}\n\n",
        );
        let mut e = events(body);
        assert!(matches!(e.next().await, Ok(Some(Piece::Text { .. }))));
        assert_eq!(
            e.next().await,
            Err(UpstreamError::Status {
                status: 503,
                message: "out of memory".into()
            })
        );
    }

    #[tokio::test]
    async fn a_chunk_that_is_not_json_is_a_protocol_error() {
        let r = all(events("data: {\"choices\": [\n")).await;
        assert!(matches!(r, Err(UpstreamError::Protocol(_))), "{r:?}");
    }

    #[test]
    fn reads_logprobs_and_error_messages() {
        let lp = token_logprobs(&serde_json::json!([
            {"token": "a", "logprob": -0.5, "top_logprobs": [{"token": "a", "logprob": -0.5}, {"token": "b", "logprob": -1.5}]}
        ]));
        assert_eq!(lp.len(), 1);
        assert_eq!(lp[0].top[1].token, "b");
        assert_eq!(lp[0].top[1].logprob, -1.5);
        assert_eq!(
            error_message(r#"{"error": {"message": "bad", "type": "x"}}"#),
            "bad"
        );
        assert_eq!(error_message(r#"{"detail": "Not Found"}"#), "Not Found");
        assert_eq!(error_message("<html>oops</html>"), "<html>oops</html>");
        assert_eq!(error_message(""), "no detail given");
    }
}
