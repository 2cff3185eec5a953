//! A whole repository from the Hugging Face hub (`flywheel models pull
//! owner/repo[@revision]`): its model folder downloaded file by file, each
//! checked against the digest the hub publishes, a partial download
//! resumed where it stopped; then converted to GGUF as a local folder is.
//! A snapshot already in the hub's own cache (`HF_HUB_CACHE`, else
//! `HF_HOME/hub`, where Python's `huggingface_hub` puts it) is used without
//! the network, and with `HF_HUB_OFFLINE` nothing else is tried.

use std::path::{Path, PathBuf};

use futures::StreamExt;
use tokio::io::AsyncWriteExt;

use crate::{FetchError, FetchedModel, GgmlDType, ModelCache, Result, sha256_file};

/// Where and how the hub is reached: the endpoint, the hub's own cache, and
/// whether the network may be used (`HF_HUB_OFFLINE`).
#[derive(Debug, Clone)]
pub struct Hub {
    pub endpoint: String,
    /// `HF_HUB_CACHE`, or `HF_HOME/hub`, or `~/.cache/huggingface/hub`.
    pub cache: Option<PathBuf>,
    pub offline: bool,
}

impl Hub {
    /// The hub as Hugging Face's environment variables describe it.
    pub fn from_env(endpoint: &str) -> Self {
        let var = |k: &str| std::env::var_os(k).filter(|v| !v.is_empty());
        let cache = var("HF_HUB_CACHE")
            .map(PathBuf::from)
            .or_else(|| var("HF_HOME").map(|h| PathBuf::from(h).join("hub")))
            .or_else(|| var("HOME").map(|h| PathBuf::from(h).join(".cache/huggingface/hub")));
        let offline = var("HF_HUB_OFFLINE")
            .map(|v| !matches!(v.to_string_lossy().as_ref(), "0" | "false" | "no"))
            .unwrap_or(false);
        Self {
            endpoint: endpoint.trim_end_matches('/').to_string(),
            cache,
            offline,
        }
    }

    /// The hub cache's snapshot of `repo` at `revision` (a branch or tag
    /// its `refs/` resolves, or a commit), if it holds a model folder.
    pub fn snapshot(&self, repo: &str, revision: &str) -> Option<PathBuf> {
        let root = self
            .cache
            .as_ref()?
            .join(format!("models--{}", repo.replace('/', "--")));
        let commit = std::fs::read_to_string(root.join("refs").join(revision))
            .map(|c| c.trim().to_string())
            .unwrap_or_else(|_| revision.to_string());
        let dir = root.join("snapshots").join(commit);
        flywheel_model::hf::is_folder(&dir).then_some(dir)
    }
}

/// Whether the conversion reads `file` of a repository.
fn wanted(file: &str) -> bool {
    flywheel_model::hf::FOLDER_FILES.contains(&file)
        || (!file.contains('/') && file.ends_with(".safetensors"))
}

impl ModelCache {
    /// Pulls `repo` at `revision` as a Hugging Face folder and converts it
    /// into one GGUF file, named after the repository (and the type its
    /// matrices were quantized to, when `quantize` says one).
    pub async fn pull_hub_folder(
        &self,
        hub: &Hub,
        repo: &str,
        revision: &str,
        quantize: Option<GgmlDType>,
    ) -> Result<FetchedModel> {
        let source = format!("hf:{repo}@{revision}");
        let mut name = repo.rsplit('/').next().unwrap_or(repo).to_string();
        if let Some(q) = quantize {
            name = format!("{name}-{q:?}");
        }
        if let Some(found) = self.find_cached(&name, &source).await? {
            return Ok(found);
        }
        let folder = match hub.snapshot(repo, revision) {
            Some(dir) => {
                tracing::info!(folder = %dir.display(), "{repo}@{revision} found in the hub's cache");
                dir
            }
            None if hub.offline => {
                return Err(FetchError::Invalid(format!(
                    "HF_HUB_OFFLINE is set and {repo}@{revision} is in neither Flywheel's \
                     cache nor the hub's ({})",
                    hub.cache
                        .as_ref()
                        .map_or("none".into(), |c| c.display().to_string())
                )));
            }
            None => self.download_folder(hub, repo, revision).await?,
        };
        tokio::fs::create_dir_all(self.dir()).await?;
        let part = self.part_path(&name);
        self.convert(&folder, &part, quantize).await?;
        self.keep(part, &name, source).await
    }

    /// Downloads the files of `repo` the conversion reads into
    /// `<cache>/hf/<owner>--<repo>/<revision>/`; files already there whole
    /// are kept, a `.part` left by a stopped download is resumed.
    async fn download_folder(&self, hub: &Hub, repo: &str, revision: &str) -> Result<PathBuf> {
        let listing = format!("{}/api/models/{repo}/revision/{revision}", hub.endpoint);
        let info: serde_json::Value = self.get(&listing).await?.json().await?;
        let files: Vec<String> = info["siblings"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|s| s["rfilename"].as_str())
            .filter(|f| wanted(f))
            .map(str::to_string)
            .collect();
        if !files.iter().any(|f| f.ends_with(".safetensors")) {
            return Err(FetchError::Invalid(format!(
                "{repo}@{revision} holds no safetensors weights (for a GGUF file, \
                 pull owner/repo/file.gguf)"
            )));
        }
        let dir = self
            .dir()
            .join("hf")
            .join(repo.replace('/', "--"))
            .join(revision);
        tokio::fs::create_dir_all(&dir).await?;
        for (i, file) in files.iter().enumerate() {
            let to = dir.join(file);
            if tokio::fs::try_exists(&to).await? {
                continue;
            }
            tracing::info!("{repo}: file {} of {}: {file}", i + 1, files.len());
            let url = format!("{}/{repo}/resolve/{revision}/{file}", hub.endpoint);
            self.download_checked(&url, &to).await?;
        }
        Ok(dir)
    }

    /// Downloads `url` to `to` through `to.part`, resuming a part left
    /// before (an HTTP range request; a server that ignores it sends the
    /// whole file again), and checks the whole file against the sha256 the
    /// hub gives for large files (`X-Linked-Etag`).
    async fn download_checked(&self, url: &str, to: &Path) -> Result<()> {
        let part = to.with_extension(format!(
            "{}.part",
            to.extension().and_then(|e| e.to_str()).unwrap_or("")
        ));
        let have = tokio::fs::metadata(&part).await.map_or(0, |m| m.len());
        let resp = self.get_from(url, have).await?;
        let resumed = resp.status() == reqwest::StatusCode::PARTIAL_CONTENT;
        let digest = resp
            .headers()
            .get("x-linked-etag")
            .and_then(|v| v.to_str().ok())
            .map(|v| {
                v.trim_start_matches("W/")
                    .trim_matches('"')
                    .to_ascii_lowercase()
            })
            .filter(|d| d.len() == 64 && d.bytes().all(|b| b.is_ascii_hexdigit()));
        let mut file = match resumed {
            true => {
                tracing::info!(url, "resuming after {:.1} MB", have as f64 / 1e6);
                tokio::fs::OpenOptions::new()
                    .append(true)
                    .open(&part)
                    .await?
            }
            false => tokio::fs::File::create(&part).await?,
        };
        let mut stream = resp.bytes_stream();
        while let Some(chunk) = stream.next().await {
            file.write_all(&chunk?).await?;
        }
        file.flush().await?;
        file.sync_all().await?;
        if let Some(want) = digest {
            let got = sha256_file(&part).await?;
            if got != want {
                tokio::fs::remove_file(&part).await?;
                return Err(FetchError::Invalid(format!(
                    "{url}: sha256 {got} where the hub says {want}; the download is deleted"
                )));
            }
        }
        tokio::fs::rename(&part, to).await?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_files_a_conversion_reads_are_pulled_and_no_others() {
        for f in [
            "config.json",
            "tokenizer.json",
            "model-00001-of-00002.safetensors",
            "model.safetensors.index.json",
        ] {
            assert!(wanted(f), "{f}");
        }
        for f in [
            "pytorch_model.bin",
            "README.md",
            "original/consolidated.safetensors",
            "model.gguf",
        ] {
            assert!(!wanted(f), "{f}");
        }
    }

    #[test]
    fn a_snapshot_is_found_through_its_ref() {
        let root = std::env::temp_dir().join(format!("fw-hub-cache-{}", uuid::Uuid::new_v4()));
        let repo = root.join("models--acme--tiny");
        let snap = repo.join("snapshots/abc123");
        std::fs::create_dir_all(&snap).unwrap();
        std::fs::create_dir_all(repo.join("refs")).unwrap();
        std::fs::write(repo.join("refs/main"), "abc123\n").unwrap();
        let hub = Hub {
            endpoint: String::new(),
            cache: Some(root.clone()),
            offline: true,
        };
        // A snapshot without a model folder in it is not one.
        assert_eq!(hub.snapshot("acme/tiny", "main"), None);
        std::fs::write(snap.join("config.json"), "{}").unwrap();
        assert_eq!(hub.snapshot("acme/tiny", "main"), Some(snap.clone()));
        assert_eq!(hub.snapshot("acme/tiny", "abc123"), Some(snap));
        assert_eq!(hub.snapshot("acme/other", "main"), None);
        std::fs::remove_dir_all(&root).unwrap();
    }
}
