//! The real `flywheel` binary as a process: its admin commands, and
//! `flywheel serve` on a free port over a fresh database with the tiny
//! model. Only the integration tests of the `flywheel` package build the
//! binary; these helpers find it beside their test executable.

use std::path::PathBuf;

use crate::db::fresh_database;
use crate::wait::until;

/// The `flywheel` binary cargo built for the running test (`target/<profile>/flywheel`).
pub fn binary() -> PathBuf {
    let exe = std::env::current_exe().expect("the test's own path");
    let dir = exe
        .parent()
        .and_then(|deps| deps.parent())
        .expect("tests run from target/<profile>/deps");
    let bin = dir.join("flywheel");
    assert!(
        bin.exists(),
        "{} is missing: run the tests of the flywheel package (cargo test -p flywheel)",
        bin.display()
    );
    bin
}

/// `FLYWHEEL_HOME` for the binary under test: models it imports and its
/// journal go to a temporary folder, never into the source tree.
pub fn test_home() -> std::path::PathBuf {
    std::env::temp_dir().join("flywheel-test-home")
}

/// The binary under test as a command: no `FLYWHEEL_*` setting inherited
/// from whoever runs the tests (but the shared model cache), `FLYWHEEL_HOME`
/// a temporary folder, `DATABASE_URL` `db` (none when `None`), then `env`,
/// then `args`. Every test of the binary starts it through here.
pub fn command(db: Option<&str>, env: &[(&str, &str)], args: &[&str]) -> std::process::Command {
    let mut c = std::process::Command::new(binary());
    for (k, _) in std::env::vars() {
        if k.starts_with("FLYWHEEL_") && k != "FLYWHEEL_MODEL_CACHE" {
            c.env_remove(k);
        }
    }
    c.env("FLYWHEEL_HOME", test_home());
    // Many workers run at once in the tests: each listener on a port of
    // its own.
    c.env("FLYWHEEL_WORKER_ADDR", "127.0.0.1:0");
    match db {
        Some(db) => c.env("DATABASE_URL", db),
        None => c.env_remove("DATABASE_URL"),
    };
    c.envs(env.iter().copied()).args(args);
    c
}

/// How a run of the binary ended.
#[derive(Debug, Clone)]
pub struct Ran {
    /// The exit code (`None`: killed by a signal).
    pub code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
}

impl Ran {
    pub fn ok(&self) -> bool {
        self.code == Some(0)
    }
}

/// Runs the binary (as [`command`] builds it) to its end, `stdin` written
/// to its input.
pub fn run(db: Option<&str>, env: &[(&str, &str)], args: &[&str], stdin: Option<&str>) -> Ran {
    use std::io::Write;
    use std::process::Stdio;
    let mut child = command(db, env, args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut input = child.stdin.take().unwrap();
    if let Some(text) = stdin {
        input.write_all(text.as_bytes()).unwrap();
    }
    drop(input);
    let out = child.wait_with_output().unwrap();
    Ran {
        code: out.status.code(),
        stdout: String::from_utf8_lossy(&out.stdout).to_string(),
        stderr: String::from_utf8_lossy(&out.stderr).to_string(),
    }
}

/// Starts the binary (as [`command`] builds it) in the background, its
/// output discarded: a `serve` or a `worker`.
pub fn spawn(db: &str, env: &[(&str, &str)], args: &[&str]) -> std::process::Child {
    command(Some(db), env, args)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap()
}

/// Runs the binary under test against `db`; panics with its stderr if it
/// fails, returns its stdout.
pub fn cli(db: &str, args: &[&str]) -> String {
    let ran = run(Some(db), &[], args, None);
    assert!(ran.ok(), "{}", ran.stderr);
    ran.stdout
}

/// `flywheel datasets synth`: `completions` simulated completions of
/// `team` (made if missing), `ratings` of them rated.
pub fn synth(db: &str, team: &str, completions: usize, ratings: usize) {
    let (c, r) = (completions.to_string(), ratings.to_string());
    cli(
        db,
        &[
            "datasets",
            "synth",
            "--team",
            team,
            "--completions",
            &c,
            "--ratings",
            &r,
        ],
    );
}

/// Whether the gateway at `base` answered `/readyz` with 200 within 60 s.
pub async fn ready(base: &str) -> bool {
    until(60, || async {
        reqwest::get(format!("{base}/readyz"))
            .await
            .is_ok_and(|r| r.status() == 200)
    })
    .await
}

/// A free port on 127.0.0.1.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A database with the tiny random-weight model registered as champion and
/// a scratch folder; `key(team)` makes API keys.
pub struct TinySetup {
    pub db: String,
    pub dir: std::path::PathBuf,
}

impl TinySetup {
    pub async fn new(prefix: &str) -> Self {
        let db = fresh_database(prefix).await;
        cli(&db, &["migrate"]);
        let dir = std::env::temp_dir().join(format!("{prefix}-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(&dir).unwrap();
        let model = flywheel_model::testing::write_tiny_model(&dir, 4).unwrap();
        cli(
            &db,
            &[
                "models",
                "import",
                model.to_str().unwrap(),
                "--name",
                "tiny",
            ],
        );
        Self { db, dir }
    }

    pub fn key(&self, team: &str) -> String {
        cli(&self.db, &["keys", "create", "--team", team])
            .lines()
            .last()
            .unwrap()
            .to_string()
    }
}

/// A `flywheel serve` process on its own port; killed when dropped.
pub struct GatewayProcess {
    pub child: std::process::Child,
    pub base: String,
}

impl GatewayProcess {
    /// Starts `flywheel serve` on `db` with the journal in `journal` and
    /// `env` on top; waits until it is ready.
    pub async fn start(db: &str, journal: &std::path::Path, env: &[(&str, &str)]) -> Self {
        let port = free_port();
        let child = Self::spawn(db, port, journal, env, std::process::Stdio::null());
        let base = format!("http://127.0.0.1:{port}");
        assert!(ready(&base).await, "the gateway did not become ready");
        Self { child, base }
    }

    pub fn spawn(
        db: &str,
        port: u16,
        journal: &std::path::Path,
        env: &[(&str, &str)],
        stderr: std::process::Stdio,
    ) -> std::process::Child {
        let addr = format!("127.0.0.1:{port}");
        let journal = journal.display().to_string();
        let base = [
            ("FLYWHEEL_ADDR", addr.as_str()),
            ("FLYWHEEL_JOURNAL_DIR", journal.as_str()),
        ];
        command(Some(db), &[&base[..], env].concat(), &["serve"])
            .stdout(std::process::Stdio::null())
            .stderr(stderr)
            .spawn()
            .unwrap()
    }

    /// Kills it outright (SIGKILL) and waits for it.
    pub fn kill(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    pub async fn metric(&self, name: &str) -> f64 {
        let text = reqwest::get(format!("{}/metrics", self.base))
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        text.lines()
            .find_map(|l| l.strip_prefix(&format!("{name} ")))
            .unwrap_or_else(|| panic!("no metric {name} in\n{text}"))
            .trim()
            .parse()
            .unwrap()
    }

    /// POSTs JSON with `key`; returns status and body.
    pub async fn post(
        &self,
        key: &str,
        path: &str,
        body: serde_json::Value,
    ) -> (u16, serde_json::Value) {
        let resp = reqwest::Client::new()
            .post(format!("{}{path}", self.base))
            .bearer_auth(key)
            .json(&body)
            .send()
            .await
            .unwrap();
        (
            resp.status().as_u16(),
            resp.json().await.unwrap_or_default(),
        )
    }

    /// A chat completion on the tiny model; returns its id.
    pub async fn complete(&self, key: &str, user: Option<&str>) -> String {
        let mut body = serde_json::json!({"model": "tiny", "max_tokens": 3,
            "messages": [{"role": "user", "content": "hi"}]});
        if let Some(u) = user {
            body["user"] = u.into();
        }
        let (status, body) = self.post(key, "/v1/chat/completions", body).await;
        assert_eq!(status, 200, "{body}");
        body["id"].as_str().unwrap().to_string()
    }
}

impl Drop for GatewayProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
