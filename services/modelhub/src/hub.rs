//! A whole repository from the Hugging Face hub (`flywheel models pull
//! owner/repo[@revision]`): its model folder downloaded file by file, each
//! checked against the digest the hub publishes, a partial download
//! resumed where it stopped; then converted to GGUF as a local folder is.
//! A snapshot already in the hub's own cache (`HF_HUB_CACHE`, else
//! `HF_HOME/hub`, where Python's `huggingface_hub` puts it) is used without
//! the network, and with `HF_HUB_OFFLINE` nothing else is tried.

use std::ffi::OsString;
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
        Self::from_vars(endpoint, |k| std::env::var_os(k))
    }

    /// The hub as the variables `var` gives describe it, read as
    /// huggingface_hub reads them: the cache is `HF_HUB_CACHE`, else
    /// `HF_HOME/hub`, else `XDG_CACHE_HOME/huggingface/hub`, else
    /// `~/.cache/huggingface/hub`; offline when `HF_HUB_OFFLINE` is 1, ON,
    /// YES or TRUE in any case. An empty variable counts as unset.
    pub fn from_vars(endpoint: &str, var: impl Fn(&str) -> Option<OsString>) -> Self {
        let var = |k: &str| var(k).filter(|v| !v.is_empty());
        let cache = var("HF_HUB_CACHE")
            .map(PathBuf::from)
            .or_else(|| var("HF_HOME").map(|h| PathBuf::from(h).join("hub")))
            .or_else(|| var("XDG_CACHE_HOME").map(|c| PathBuf::from(c).join("huggingface/hub")))
            .or_else(|| var("HOME").map(|h| PathBuf::from(h).join(".cache/huggingface/hub")));
        let offline = var("HF_HUB_OFFLINE").is_some_and(|v| truthy(&v));
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
        complete(&dir).then_some(dir)
    }
}

/// A boolean variable as huggingface_hub reads one: 1, ON, YES or TRUE in
/// any case.
fn truthy(v: &OsString) -> bool {
    matches!(
        v.to_string_lossy().to_ascii_uppercase().as_str(),
        "1" | "ON" | "YES" | "TRUE"
    )
}

/// The hub token as huggingface_hub finds it: `HF_TOKEN` (or the older
/// `HUGGING_FACE_HUB_TOKEN`), else the file `huggingface-cli login` writes:
/// `HF_TOKEN_PATH`, else `HF_HOME/token`, else
/// `XDG_CACHE_HOME/huggingface/token`, else `~/.cache/huggingface/token`.
/// Surrounding whitespace is dropped; a token of none counts as none (and
/// the next place is looked in). With `HF_HUB_DISABLE_IMPLICIT_TOKEN` set
/// (1, ON, YES, TRUE), none is sent.
pub fn token_from_vars(var: impl Fn(&str) -> Option<OsString>) -> Option<String> {
    let var = |k: &str| var(k).filter(|v| !v.is_empty());
    let clean = |t: String| Some(t.trim().to_string()).filter(|t| !t.is_empty());
    if var("HF_HUB_DISABLE_IMPLICIT_TOKEN").is_some_and(|v| truthy(&v)) {
        return None;
    }
    let given = ["HF_TOKEN", "HUGGING_FACE_HUB_TOKEN"]
        .into_iter()
        .find_map(|k| clean(var(k)?.to_string_lossy().into_owned()));
    if given.is_some() {
        return given;
    }
    let file = var("HF_TOKEN_PATH")
        .map(PathBuf::from)
        .or_else(|| var("HF_HOME").map(|h| PathBuf::from(h).join("token")))
        .or_else(|| var("XDG_CACHE_HOME").map(|c| PathBuf::from(c).join("huggingface/token")))
        .or_else(|| var("HOME").map(|h| PathBuf::from(h).join(".cache/huggingface/token")))?;
    clean(std::fs::read_to_string(file).ok()?)
}

/// [`token_from_vars`] on the process's environment.
pub fn token_from_env() -> Option<String> {
    token_from_vars(|k| std::env::var_os(k))
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
    /// `<cache>/hf/<owner>--<repo>/<commit>/` (the commit the revision names
    /// now, so a branch that moves between two tries never mixes two
    /// versions' files); files already there whole are kept, a `.part` left
    /// by a stopped download is resumed. The weights are those the index
    /// names, or `model.safetensors` (not every `*.safetensors`: some
    /// repositories hold the same weights twice).
    async fn download_folder(&self, hub: &Hub, repo: &str, revision: &str) -> Result<PathBuf> {
        let listing = format!(
            "{}/api/models/{repo}/revision/{revision}?blobs=true",
            hub.endpoint
        );
        let info: serde_json::Value = match self.get(&listing).await {
            Ok(resp) => resp.json().await?,
            Err(FetchError::Status { status, .. }) if matches!(status, 401 | 403) => {
                return Err(FetchError::Invalid(format!(
                    "the hub answered {status} for {repo}: a private or gated repository needs \
                     a token that may read it, in HF_TOKEN or saved by `huggingface-cli login` \
                     (and, for a gated one, its terms accepted on the hub)"
                )));
            }
            Err(e) => return Err(e),
        };
        let commit = info["sha"]
            .as_str()
            .filter(|c| !c.is_empty() && c.bytes().all(|b| b.is_ascii_alphanumeric()))
            .unwrap_or(revision)
            .to_string();
        let blobs: std::collections::HashMap<String, Blob> = info["siblings"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|s| {
                let name = s["rfilename"].as_str()?.to_string();
                let blob = Blob {
                    sha256: s["lfs"]["sha256"].as_str().map(str::to_ascii_lowercase),
                    size: s["lfs"]["size"].as_u64().or(s["size"].as_u64()),
                };
                Some((name, blob))
            })
            .collect();
        let dir = self
            .dir()
            .join("hf")
            .join(repo.replace('/', "--"))
            .join(&commit);
        tokio::fs::create_dir_all(&dir).await?;
        let fetch = |file: String| {
            let (dir, blob) = (dir.clone(), blobs.get(&file).cloned());
            let url = format!("{}/{repo}/resolve/{commit}/{file}", hub.endpoint);
            async move {
                let to = dir.join(&file);
                if !tokio::fs::try_exists(&to).await? {
                    tracing::info!("{repo}: {file}");
                    self.download_checked(&url, &to, blob.as_ref()).await?;
                }
                Ok::<_, FetchError>(())
            }
        };
        let mut small: Vec<&String> = blobs
            .keys()
            .filter(|f| flywheel_model::hf::FOLDER_FILES.contains(&f.as_str()))
            .collect();
        small.sort();
        for file in small {
            fetch(file.clone()).await?;
        }
        let weights = weight_files(&dir, blobs.contains_key("model.safetensors"))?;
        for (i, file) in weights.iter().enumerate() {
            tracing::info!("{repo}: weights {} of {}", i + 1, weights.len());
            if !blobs.contains_key(file) {
                return Err(FetchError::Invalid(format!(
                    "{repo}@{revision}: its index names {file}, which the repository does not hold"
                )));
            }
            fetch(file.clone()).await?;
        }
        Ok(dir)
    }

    /// Downloads `url` to `to` through `to.part`, resuming a part left
    /// before (an HTTP range request; a server that ignores it sends the
    /// whole file again), and checks the whole file against the size and
    /// sha256 the hub's listing gives for it, or the `X-Linked-Etag` it
    /// answers with.
    async fn download_checked(&self, url: &str, to: &Path, blob: Option<&Blob>) -> Result<()> {
        let part = to.with_extension(format!(
            "{}.part",
            to.extension().and_then(|e| e.to_str()).unwrap_or("")
        ));
        let have = tokio::fs::metadata(&part).await.map_or(0, |m| m.len());
        let resp = self.get_from(url, have).await?;
        let resumed = resp.status() == reqwest::StatusCode::PARTIAL_CONTENT;
        if resumed {
            let range = resp
                .headers()
                .get(reqwest::header::CONTENT_RANGE)
                .and_then(|v| v.to_str().ok())
                .unwrap_or_default();
            if !range.starts_with(&format!("bytes {have}-")) {
                tokio::fs::remove_file(&part).await?;
                return Err(FetchError::Invalid(format!(
                    "{url}: asked from byte {have}, answered {range:?}; the part is deleted, try again"
                )));
            }
        }
        let etag = resp
            .headers()
            .get("x-linked-etag")
            .and_then(|v| v.to_str().ok())
            .map(|v| {
                v.trim_start_matches("W/")
                    .trim_matches('"')
                    .to_ascii_lowercase()
            });
        let digest = blob
            .and_then(|b| b.sha256.clone())
            .or(etag)
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
        let size = tokio::fs::metadata(&part).await?.len();
        let wrong = match (blob.and_then(|b| b.size), digest) {
            (Some(want), _) if want != size => {
                Some(format!("{size} bytes where the hub says {want}"))
            }
            (_, Some(want)) => {
                let got = sha256_file(&part).await?;
                (got != want).then(|| format!("sha256 {got} where the hub says {want}"))
            }
            _ => None,
        };
        if let Some(wrong) = wrong {
            tokio::fs::remove_file(&part).await?;
            return Err(FetchError::Invalid(format!(
                "{url}: {wrong}; the download is deleted"
            )));
        }
        tokio::fs::rename(&part, to).await?;
        Ok(())
    }
}

/// What the hub's listing says of one file.
#[derive(Debug, Clone)]
struct Blob {
    /// Large files' (LFS) content digest.
    sha256: Option<String>,
    size: Option<u64>,
}

/// The weight files of a folder whose index (if any) is already in `dir`:
/// those the index names, else `model.safetensors` when `has_single` says
/// the repository holds it.
fn weight_files(dir: &Path, has_single: bool) -> Result<Vec<String>> {
    let indexed = flywheel_model::hf::indexed_weights(dir)
        .map_err(|e| FetchError::Invalid(format!("{}: {e}", dir.display())))?;
    match (indexed, has_single) {
        (Some(files), _) => Ok(files),
        (None, true) => Ok(vec!["model.safetensors".into()]),
        (None, false) => Err(FetchError::Invalid(
            "the repository holds neither model.safetensors nor model.safetensors.index.json \
             (for a GGUF file, pull owner/repo/file.gguf)"
                .into(),
        )),
    }
}

/// Whether a snapshot holds all a conversion reads: a model folder with
/// its tokenizer and every weight file (a snapshot Python filled only
/// partly, with a config fetched alone, is not one).
fn complete(dir: &Path) -> bool {
    flywheel_model::hf::is_folder(dir)
        && dir.join("tokenizer.json").is_file()
        && weight_files(dir, true).is_ok_and(|files| files.iter().all(|f| dir.join(f).is_file()))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The hub the variables `vars` describe.
    fn hub(vars: &[(&str, &str)]) -> Hub {
        let vars: Vec<(String, OsString)> = vars
            .iter()
            .map(|(k, v)| (k.to_string(), OsString::from(v)))
            .collect();
        Hub::from_vars("https://hub.example/", |k| {
            vars.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone())
        })
    }

    #[test]
    fn the_environment_is_read_as_huggingface_hub_reads_it() {
        let home = [("HOME", "/home/u")];
        let at = |vars: &[(&str, &str)]| hub(vars).cache.unwrap();
        assert_eq!(at(&home), PathBuf::from("/home/u/.cache/huggingface/hub"));
        let xdg = [("HOME", "/home/u"), ("XDG_CACHE_HOME", "/x")];
        assert_eq!(at(&xdg), PathBuf::from("/x/huggingface/hub"));
        let hf_home = [("XDG_CACHE_HOME", "/x"), ("HF_HOME", "/h")];
        assert_eq!(at(&hf_home), PathBuf::from("/h/hub"));
        let both = [("HF_HOME", "/h"), ("HF_HUB_CACHE", "/c")];
        assert_eq!(at(&both), PathBuf::from("/c"));
        // An empty variable is no variable.
        let empty = [("HOME", "/home/u"), ("HF_HOME", "")];
        assert_eq!(at(&empty), PathBuf::from("/home/u/.cache/huggingface/hub"));
        assert_eq!(hub(&[]).cache, None);
        assert_eq!(hub(&[]).endpoint, "https://hub.example");
        for on in ["1", "ON", "yes", "True"] {
            assert!(hub(&[("HF_HUB_OFFLINE", on)]).offline, "{on}");
        }
        for off in ["0", "false", "no", "", "offline"] {
            assert!(!hub(&[("HF_HUB_OFFLINE", off)]).offline, "{off}");
        }
        assert!(!hub(&[]).offline);
    }

    #[test]
    fn the_token_is_found_as_huggingface_hub_finds_it() {
        let root = std::env::temp_dir().join(format!("fw-hub-token-{}", uuid::Uuid::new_v4()));
        let home = root.join("home");
        std::fs::create_dir_all(home.join(".cache/huggingface")).unwrap();
        std::fs::create_dir_all(root.join("hf")).unwrap();
        std::fs::write(home.join(".cache/huggingface/token"), "hf_login\n").unwrap();
        std::fs::write(root.join("hf/token"), "hf_home\n").unwrap();
        std::fs::write(root.join("elsewhere"), "  hf_path  ").unwrap();
        let p = |p: &Path| p.to_str().unwrap().to_string();
        let token = |vars: &[(&str, String)]| {
            token_from_vars(|k| {
                vars.iter()
                    .find(|(n, _)| *n == k)
                    .map(|(_, v)| OsString::from(v))
            })
        };
        let h = ("HOME", p(&home));
        // `huggingface-cli login`'s file, where HF_HOME says, or where
        // HF_TOKEN_PATH says.
        assert_eq!(token(std::slice::from_ref(&h)).as_deref(), Some("hf_login"));
        let hf_home = ("HF_HOME", p(&root.join("hf")));
        assert_eq!(
            token(&[h.clone(), hf_home.clone()]).as_deref(),
            Some("hf_home")
        );
        let path = ("HF_TOKEN_PATH", p(&root.join("elsewhere")));
        assert_eq!(
            token(&[h.clone(), hf_home.clone(), path.clone()]).as_deref(),
            Some("hf_path")
        );
        // The variable first, the older name too; an empty one is none.
        let var = ("HF_TOKEN", "hf_var".to_string());
        assert_eq!(token(&[h.clone(), path, var]).as_deref(), Some("hf_var"));
        let old = ("HUGGING_FACE_HUB_TOKEN", "hf_old".to_string());
        assert_eq!(token(&[h.clone(), old]).as_deref(), Some("hf_old"));
        let empty = ("HF_TOKEN", String::new());
        assert_eq!(token(&[h.clone(), empty]).as_deref(), Some("hf_login"));
        let spaces = ("HF_TOKEN", "  ".to_string());
        assert_eq!(token(&[h.clone(), spaces]).as_deref(), Some("hf_login"));
        // Implicit tokens turned off: none, from the variable or the file.
        let off = ("HF_HUB_DISABLE_IMPLICIT_TOKEN", "1".to_string());
        let var = ("HF_TOKEN", "hf_var".to_string());
        assert_eq!(token(&[h.clone(), off.clone(), var]), None);
        assert_eq!(token(&[h, off]), None);
        // No file, no token.
        assert_eq!(token(&[("HOME", p(&root))]), None);
        std::fs::remove_dir_all(&root).unwrap();
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
        // A snapshot without a whole model folder in it is not one: a
        // config alone, or an index whose shards are not all there.
        assert_eq!(hub.snapshot("acme/tiny", "main"), None);
        std::fs::write(snap.join("config.json"), "{}").unwrap();
        std::fs::write(snap.join("tokenizer.json"), "{}").unwrap();
        assert_eq!(hub.snapshot("acme/tiny", "main"), None);
        std::fs::write(
            snap.join("model.safetensors.index.json"),
            r#"{"weight_map": {"a": "model-1.safetensors", "b": "model-2.safetensors"}}"#,
        )
        .unwrap();
        std::fs::write(snap.join("model-1.safetensors"), "").unwrap();
        assert_eq!(hub.snapshot("acme/tiny", "main"), None);
        std::fs::write(snap.join("model-2.safetensors"), "").unwrap();
        assert_eq!(hub.snapshot("acme/tiny", "main"), Some(snap.clone()));
        assert_eq!(hub.snapshot("acme/tiny", "abc123"), Some(snap));
        assert_eq!(hub.snapshot("acme/other", "main"), None);
        std::fs::remove_dir_all(&root).unwrap();
    }
}
