//! A private S3-compatible server for the artifact-store tests: moto's
//! (`python3 -m moto.server`, a stand-in for S3 that `scripts/test.sh`
//! installs), on a free port, holding one empty bucket.

use crate::wait::until;

/// A private S3-compatible server (moto's, `python3 -m moto.server`;
/// `scripts/test.sh` installs it) on a free port, holding one empty bucket.
/// Stopped when dropped.
pub struct S3 {
    child: std::process::Child,
    pub endpoint: String,
    pub bucket: String,
}

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
