//! What `flywheel serve` writes to its log: an access line per API request
//! at the default level, naming the method, the route's pattern, the team,
//! the request id, the caller's trace id, the status and the latency, and never the message, the
//! answer or the key; as text by default, as JSON objects with
//! `FLYWHEEL_LOG_FORMAT=json`.

use std::io::Read;

use flywheel_tests::{GatewayProcess, TinySetup};
use serde_json::{Value, json};

const SECRET: &str = "the-secret-question-31337";
const TRACE: &str = "4bf92f3577b34da6a3ce929d0e0e4736";

/// Starts a gateway with `env`, sends a chat with [`SECRET`] and asks for
/// a model that does not exist, and returns what it wrote to stderr.
async fn log_of(s: &TinySetup, key: &str, name: &str, env: &[(&str, &str)]) -> String {
    let port = flywheel_tests::free_port();
    let child = GatewayProcess::spawn(
        &s.db,
        port,
        &s.dir.join(format!("journal-{name}")),
        env,
        std::process::Stdio::piped(),
    );
    let mut gw = GatewayProcess {
        child,
        base: format!("http://127.0.0.1:{port}"),
    };
    assert!(flywheel_tests::ready(&gw.base).await);
    // With the caller's trace context: its trace id goes on the line.
    let chat = reqwest::Client::new()
        .post(format!("{}/v1/chat/completions", gw.base))
        .bearer_auth(key)
        .header("traceparent", format!("00-{TRACE}-00f067aa0ba902b7-01"))
        .json(&json!({"model": "default", "max_tokens": 3,
                      "messages": [{"role": "user", "content": SECRET}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(chat.status(), 200);
    let missing = reqwest::Client::new()
        .get(format!("{}/v1/models/no-such-model", gw.base))
        .bearer_auth(key)
        .send()
        .await
        .unwrap();
    assert_eq!(missing.status(), 404);
    let _ = gw.child.kill();
    let _ = gw.child.wait();
    let mut log = String::new();
    gw.child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut log)
        .unwrap();
    log
}

#[tokio::test]
async fn each_api_request_writes_an_access_line_without_text_or_keys() {
    let s = TinySetup::new("fw_access_log").await;
    let key = s.key("acme");

    // The default: text.
    let text = log_of(&s, &key, "text", &[]).await;
    let lines: Vec<&str> = text
        .lines()
        .filter(|l| l.contains("finished processing request"))
        .collect();
    let chat = lines
        .iter()
        .find(|l| l.contains("route=/v1/chat/completions"))
        .unwrap_or_else(|| panic!("no access line for the chat in\n{text}"));
    let trace = format!("trace_id={TRACE}");
    for part in [
        "method=POST",
        trace.as_str(),
        "team=acme",
        "request_id=",
        "status=200",
        "latency=",
    ] {
        assert!(chat.contains(part), "{part} missing from {chat}");
    }
    let missing = lines
        .iter()
        .find(|l| l.contains("route=/v1/models/{name}"))
        .unwrap_or_else(|| panic!("no access line for the missing model in\n{text}"));
    assert!(missing.contains("status=404"), "{missing}");
    assert!(!text.contains(SECRET), "the message is in the log:\n{text}");
    assert!(!text.contains(&key), "the key is in the log");
    assert!(!text.contains("no-such-model"), "a raw path is in the log");

    // JSON: every line an object, the access line's fields in its span.
    let json = log_of(&s, &key, "json", &[("FLYWHEEL_LOG_FORMAT", "json")]).await;
    let objects: Vec<Value> = json
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect();
    let chat = objects
        .iter()
        .find(|o| {
            o["fields"]["message"] == "finished processing request"
                && o["span"]["route"] == "/v1/chat/completions"
        })
        .unwrap_or_else(|| panic!("no access line for the chat in\n{json}"));
    assert_eq!(chat["level"], "INFO");
    assert_eq!(chat["fields"]["status"], 200, "{chat}");
    assert_eq!(chat["span"]["method"], "POST", "{chat}");
    assert_eq!(chat["span"]["team"], "acme", "{chat}");
    assert_eq!(chat["span"]["trace_id"], TRACE, "{chat}");
    assert!(
        chat["span"]["request_id"]
            .as_str()
            .is_some_and(|id| id.len() >= 32),
        "{chat}"
    );
    assert!(!json.contains(SECRET) && !json.contains(&key));

    // A format it does not know is refused, naming the setting.
    let ran = flywheel_tests::run(
        Some(&s.db),
        &[("FLYWHEEL_LOG_FORMAT", "xml")],
        &["config", "show"],
        None,
    );
    assert!(!ran.ok());
    assert!(ran.stderr.contains("FLYWHEEL_LOG_FORMAT"), "{}", ran.stderr);
}
