//! Where training runs keep their files: checkpoints, adapters, exported
//! datasets, logs. One interface over the `object_store` crate, so the same
//! code writes to a local folder (the default) or to S3-compatible object
//! storage (`FLYWHEEL_ARTIFACTS=s3://bucket/prefix`, credentials and endpoint
//! from the usual `AWS_*` variables).
//!
//! Objects are addressed by keys under the store's root (`runs/<id>/adapter`),
//! and every key has a URL (`file:///…` or `s3://…`) that other programs, a
//! Kubernetes Job say, can read and write with the same settings.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context, bail};
use futures::TryStreamExt;
use object_store::aws::AmazonS3Builder;
use object_store::buffered::BufWriter;
use object_store::local::LocalFileSystem;
use object_store::path::Path as Key;
use object_store::{ObjectStore, ObjectStoreExt};
use tokio::io::AsyncWriteExt;
use url::Url;

/// A store and the root every key is relative to.
#[derive(Debug, Clone)]
pub struct Artifacts {
    store: Arc<dyn ObjectStore>,
    root: Key,
    /// `root` as a URL, without a trailing slash.
    url: String,
}

impl Artifacts {
    /// Opens `location`: a folder path, a `file://` URL or an `s3://bucket/prefix`
    /// URL (configured by `AWS_ENDPOINT`, `AWS_ACCESS_KEY_ID`,
    /// `AWS_SECRET_ACCESS_KEY`, `AWS_REGION`, `AWS_ALLOW_HTTP`, ...).
    pub fn open(location: &str) -> anyhow::Result<Self> {
        let url = match Url::parse(location) {
            // "C:\..." or a relative path parses oddly or not at all.
            Ok(u) if u.scheme().len() > 1 => u,
            _ => {
                let path = std::path::absolute(location)
                    .with_context(|| format!("artifact folder {location}"))?;
                Url::from_file_path(&path)
                    .map_err(|()| anyhow::anyhow!("{} is not a usable path", path.display()))?
            }
        };
        let (store, root): (Arc<dyn ObjectStore>, Key) = match url.scheme() {
            "file" => {
                let path = url
                    .to_file_path()
                    .map_err(|()| anyhow::anyhow!("{url} is not a local path"))?;
                (
                    Arc::new(LocalFileSystem::new()),
                    Key::from_absolute_path(&path)?,
                )
            }
            "s3" | "s3a" => {
                let s3 = AmazonS3Builder::from_env()
                    .with_url(url.as_str())
                    .build()
                    .with_context(|| format!("configuring the object store for {url}"))?;
                (Arc::new(s3), Key::from_url_path(url.path())?)
            }
            other => bail!(
                "artifact store {location}: scheme {other} is not supported (a folder, file:// or s3://)"
            ),
        };
        let url = url.as_str().trim_end_matches('/').to_string();
        Ok(Self { store, root, url })
    }

    fn key(&self, key: &str) -> anyhow::Result<Key> {
        let mut k = self.root.clone();
        for part in key.split('/').filter(|p| !p.is_empty()) {
            if part == "." || part == ".." {
                bail!("artifact key {key} may not contain . or ..");
            }
            k = k.join(part);
        }
        Ok(k)
    }

    /// The URL of `key`, for logs, lineage and other programs.
    pub fn url(&self, key: &str) -> String {
        let key = key.trim_matches('/');
        if key.is_empty() {
            self.url.clone()
        } else {
            format!("{}/{key}", self.url)
        }
    }

    /// Stores `bytes` at `key`.
    pub async fn put_bytes(&self, key: &str, bytes: Vec<u8>) -> anyhow::Result<()> {
        self.store
            .put(&self.key(key)?, bytes.into())
            .await
            .with_context(|| format!("writing {}", self.url(key)))?;
        Ok(())
    }

    /// Reads the object at `key` whole.
    pub async fn get_bytes(&self, key: &str) -> anyhow::Result<Vec<u8>> {
        let got = self
            .store
            .get(&self.key(key)?)
            .await
            .with_context(|| format!("reading {}", self.url(key)))?;
        Ok(got.bytes().await?.to_vec())
    }

    /// Whether an object exists at `key`.
    pub async fn exists(&self, key: &str) -> anyhow::Result<bool> {
        match self.store.head(&self.key(key)?).await {
            Ok(_) => Ok(true),
            Err(object_store::Error::NotFound { .. }) => Ok(false),
            Err(e) => Err(e).with_context(|| format!("looking up {}", self.url(key))),
        }
    }

    /// Streams the local file `from` to `key` (in parts when it is large).
    pub async fn put_file(&self, key: &str, from: &Path) -> anyhow::Result<()> {
        let mut file = tokio::fs::File::open(from)
            .await
            .with_context(|| format!("opening {}", from.display()))?;
        let mut out = BufWriter::new(self.store.clone(), self.key(key)?);
        let copied = tokio::io::copy(&mut file, &mut out).await;
        if let Err(e) = copied {
            let _ = out.abort().await;
            return Err(e).with_context(|| format!("writing {}", self.url(key)));
        }
        out.shutdown()
            .await
            .with_context(|| format!("writing {}", self.url(key)))?;
        Ok(())
    }

    /// Streams the object at `key` into the local file `to`.
    pub async fn get_file(&self, key: &str, to: &Path) -> anyhow::Result<()> {
        let got = self
            .store
            .get(&self.key(key)?)
            .await
            .with_context(|| format!("reading {}", self.url(key)))?;
        if let Some(dir) = to.parent() {
            tokio::fs::create_dir_all(dir).await?;
        }
        let mut file = tokio::fs::File::create(to).await?;
        let mut stream = got.into_stream();
        while let Some(chunk) = stream.try_next().await? {
            file.write_all(&chunk).await?;
        }
        file.flush().await?;
        Ok(())
    }

    /// Stores every file under the local folder `from` below `key`, keeping
    /// relative paths.
    pub async fn put_dir(&self, key: &str, from: &Path) -> anyhow::Result<usize> {
        let mut count = 0;
        for file in files_under(from)? {
            let rel = file.strip_prefix(from)?;
            let rel = rel
                .to_str()
                .with_context(|| format!("{} is not UTF-8", rel.display()))?;
            self.put_file(&format!("{}/{rel}", key.trim_end_matches('/')), &file)
                .await?;
            count += 1;
        }
        Ok(count)
    }

    /// Fetches every object below `key` into the local folder `to`. Fails
    /// when there is none.
    pub async fn get_dir(&self, key: &str, to: &Path) -> anyhow::Result<usize> {
        let prefix = self.key(key)?;
        let objects: Vec<_> = self.store.list(Some(&prefix)).try_collect().await?;
        if objects.is_empty() {
            bail!("nothing stored under {}", self.url(key));
        }
        for meta in &objects {
            let rel: Vec<String> = meta
                .location
                .prefix_match(&prefix)
                .context("listing returned a foreign key")?
                .map(|p| p.as_ref().to_string())
                .collect();
            let local = rel.iter().fold(to.to_path_buf(), |p, part| p.join(part));
            let full = format!("{}/{}", key.trim_end_matches('/'), rel.join("/"));
            self.get_file(&full, &local).await?;
        }
        Ok(objects.len())
    }

    /// Deletes every object below `key`.
    pub async fn delete_dir(&self, key: &str) -> anyhow::Result<()> {
        let prefix = self.key(key)?;
        let objects: Vec<_> = self.store.list(Some(&prefix)).try_collect().await?;
        for meta in objects {
            self.store.delete(&meta.location).await?;
        }
        Ok(())
    }
}

/// Every regular file below `dir`, in a stable order.
fn files_under(dir: &Path) -> anyhow::Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for entry in
            std::fs::read_dir(&d).with_context(|| format!("reading folder {}", d.display()))?
        {
            let entry = entry?;
            let kind = entry.file_type()?;
            if kind.is_dir() {
                stack.push(entry.path());
            } else if kind.is_file() {
                out.push(entry.path());
            }
        }
    }
    out.sort();
    Ok(out)
}

/// Copies between a local path and a URL, either way, file or folder: what
/// `flywheel artifacts get|put` does, and what a Kubernetes Job running the
/// flywheel image uses to fetch its dataset and return its adapter.
pub async fn download(url: &str, to: &Path) -> anyhow::Result<usize> {
    let store = Artifacts::open(url)?;
    if store.exists("").await? {
        store.get_file("", to).await?;
        Ok(1)
    } else {
        store.get_dir("", to).await
    }
}

/// See [`download`].
pub async fn upload(from: &Path, url: &str) -> anyhow::Result<usize> {
    let store = Artifacts::open(url)?;
    if from.is_dir() {
        store.put_dir("", from).await
    } else {
        store.put_file("", from).await?;
        Ok(1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_local_folder_round_trips_files_and_folders() {
        let root = std::env::temp_dir().join(format!("fw-artifacts-{}", uuid::Uuid::new_v4()));
        let store = Artifacts::open(root.to_str().unwrap()).unwrap();
        assert!(store.url("runs/x").starts_with("file:///"));
        let src = root.join("src");
        std::fs::create_dir_all(src.join("nested")).unwrap();
        std::fs::write(src.join("a.txt"), b"alpha").unwrap();
        std::fs::write(src.join("nested/b.bin"), vec![7u8; 100_000]).unwrap();
        assert_eq!(store.put_dir("runs/x/adapter", &src).await.unwrap(), 2);
        assert!(store.exists("runs/x/adapter/a.txt").await.unwrap());
        assert!(!store.exists("runs/x/adapter/zzz").await.unwrap());
        let back = root.join("back");
        assert_eq!(store.get_dir("runs/x/adapter", &back).await.unwrap(), 2);
        assert_eq!(std::fs::read(back.join("a.txt")).unwrap(), b"alpha");
        assert_eq!(
            std::fs::read(back.join("nested/b.bin")).unwrap(),
            vec![7u8; 100_000]
        );
        // The URL works as a store of its own.
        let one = root.join("one.txt");
        assert_eq!(
            download(&store.url("runs/x/adapter/a.txt"), &one)
                .await
                .unwrap(),
            1
        );
        assert_eq!(std::fs::read(&one).unwrap(), b"alpha");
        store.delete_dir("runs/x").await.unwrap();
        assert!(store.get_dir("runs/x/adapter", &back).await.is_err());
        assert!(store.key("runs/../etc").is_err());
        assert!(Artifacts::open("ftp://example.com/x").is_err());
        std::fs::remove_dir_all(&root).unwrap();
    }
}
