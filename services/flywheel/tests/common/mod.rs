//! Shared by the binary's tests: a fresh database on the test server.

pub fn admin_url() -> String {
    std::env::var("TEST_DATABASE_URL")
        .or_else(|_| std::env::var("DATABASE_URL"))
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into())
}

/// Creates an empty database named `<prefix>_<uuid>` and returns its URL.
pub async fn fresh_database(prefix: &str) -> String {
    let admin = flywheel_store::connect(&admin_url()).await.unwrap();
    let name = format!("{prefix}_{}", uuid::Uuid::new_v4().simple());
    sqlx::query(sqlx::AssertSqlSafe(format!("create database {name}")))
        .execute(&admin)
        .await
        .unwrap();
    let base = admin_url().rsplit_once('/').unwrap().0.to_string();
    format!("{base}/{name}")
}

/// `FLYWHEEL_HOME` for the binary under test: models it imports and its
/// journal go to a temporary folder, never into the source tree.
#[allow(dead_code)]
pub fn test_home() -> std::path::PathBuf {
    std::env::temp_dir().join("flywheel-test-home")
}

/// Runs the binary under test against `db`; panics with its stderr if it
/// fails, returns its stdout.
#[allow(dead_code)]
pub fn cli(db: &str, args: &[&str]) -> String {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_flywheel"))
        .env("FLYWHEEL_HOME", test_home())
        .args(args)
        .env("DATABASE_URL", db)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).to_string()
}

/// Polls `check` every 200 ms for up to `secs`; whether it came true.
#[allow(dead_code)]
pub async fn until<F, Fut>(secs: u64, mut check: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(secs);
    while std::time::Instant::now() < deadline {
        if check().await {
            return true;
        }
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
    false
}

/// Whether the gateway at `base` answered `/readyz` with 200 within 60 s.
#[allow(dead_code)]
pub async fn ready(base: &str) -> bool {
    until(60, || async {
        reqwest::get(format!("{base}/readyz"))
            .await
            .is_ok_and(|r| r.status() == 200)
    })
    .await
}

/// A private S3-compatible server (moto's, `python3 -m moto.server`;
/// `scripts/test.sh` installs it) on a free port, holding one empty bucket.
/// Stopped when dropped.
#[allow(dead_code)]
pub struct S3 {
    child: std::process::Child,
    pub endpoint: String,
    pub bucket: String,
}

#[allow(dead_code)]
impl S3 {
    pub async fn start(bucket: &str) -> S3 {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let child = std::process::Command::new("python3")
            .args(["-m", "moto.server", "-H", "127.0.0.1", "-p", &port.to_string()])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect(
                "the S3 tests need python3 with moto: pip install 'moto[server]' (scripts/test.sh does)",
            );
        let s3 = S3 {
            child,
            endpoint: format!("http://127.0.0.1:{port}"),
            bucket: bucket.into(),
        };
        let bucket_url = format!("{}/{bucket}", s3.endpoint);
        let made = until(30, || async {
            let client = reqwest::Client::new();
            client
                .put(&bucket_url)
                .send()
                .await
                .is_ok_and(|r| r.status().is_success())
        })
        .await;
        assert!(made, "moto_server did not come up on {}", s3.endpoint);
        s3
    }

    /// `s3://<bucket>/<prefix>`.
    pub fn url(&self, prefix: &str) -> String {
        format!("s3://{}/{prefix}", self.bucket)
    }

    /// The settings any S3 client of ours needs to reach it.
    pub fn env(&self) -> Vec<(&'static str, String)> {
        vec![
            ("AWS_ENDPOINT", self.endpoint.clone()),
            ("AWS_ACCESS_KEY_ID", "test".into()),
            ("AWS_SECRET_ACCESS_KEY", "test".into()),
            ("AWS_REGION", "us-east-1".into()),
            ("AWS_ALLOW_HTTP", "true".into()),
        ]
    }

    /// Every key in the bucket below `prefix`, from the server's own listing.
    pub async fn keys(&self, prefix: &str) -> Vec<String> {
        let text = reqwest::get(format!(
            "{}/{}?list-type=2&prefix={prefix}",
            self.endpoint, self.bucket
        ))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
        text.split("<Key>")
            .skip(1)
            .filter_map(|s| s.split("</Key>").next())
            .map(str::to_string)
            .collect()
    }
}

impl Drop for S3 {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A free port on 127.0.0.1.
#[allow(dead_code)]
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A database with the tiny random-weight model registered as champion and
/// a scratch folder; `key(team)` makes API keys.
#[allow(dead_code)]
pub struct TinySetup {
    pub db: String,
    pub dir: std::path::PathBuf,
}

#[allow(dead_code)]
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
#[allow(dead_code)]
pub struct GatewayProcess {
    pub child: std::process::Child,
    pub base: String,
}

#[allow(dead_code)]
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
        std::process::Command::new(env!("CARGO_BIN_EXE_flywheel"))
            .env("FLYWHEEL_HOME", test_home())
            .arg("serve")
            .env("DATABASE_URL", db)
            .env("FLYWHEEL_ADDR", format!("127.0.0.1:{port}"))
            .env("FLYWHEEL_JOURNAL_DIR", journal)
            .envs(env.iter().copied())
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
