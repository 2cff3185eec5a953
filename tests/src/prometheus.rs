//! A `/metrics` page read as Prometheus reads it: through the Prometheus
//! project's own text-format parser (the PyPI package prometheus-client,
//! which the test command installs).

/// Every sample on `page`, `(name, labels, value)`; panics with the
/// parser's error when the page does not parse.
pub fn samples(page: &str) -> Vec<(String, serde_json::Value, f64)> {
    let script = r#"
import json, sys
from prometheus_client.parser import text_string_to_metric_families
print(json.dumps([[s.name, s.labels, s.value]
                  for f in text_string_to_metric_families(sys.stdin.read()) for s in f.samples]))
"#;
    let mut child = std::process::Command::new("python3")
        .args(["-c", script])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("python3");
    std::io::Write::write_all(&mut child.stdin.take().unwrap(), page.as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "the page does not parse: {}\n{page}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

/// The samples of the `/metrics` page at `url`.
pub async fn scrape(url: &str) -> Vec<(String, serde_json::Value, f64)> {
    let page = reqwest::get(url).await.unwrap().text().await.unwrap();
    samples(&page)
}

/// The sum of the values of `name` whose labels include `labels` (an
/// object), 0 when there are none.
pub fn value(
    rows: &[(String, serde_json::Value, f64)],
    name: &str,
    labels: &serde_json::Value,
) -> f64 {
    rows.iter()
        .filter(|(n, l, _)| {
            n == name
                && labels
                    .as_object()
                    .unwrap()
                    .iter()
                    .all(|(k, v)| l.get(k) == Some(v))
        })
        .map(|(_, _, v)| v)
        .sum()
}
