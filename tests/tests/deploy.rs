//! What can be checked of `deploy/` without a container runtime (none runs
//! where these tests do): the compose file parses as YAML, with its
//! anchors resolved, into a gateway and a worker that share what they must;
//! the image keeps its state on its volume and does not run as root.

use std::path::PathBuf;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

#[test]
fn the_compose_file_runs_a_gateway_and_a_worker_on_one_database() {
    // PyYAML, which the test command's Python has (schemathesis needs it).
    let script = r#"
import json, sys, yaml
d = yaml.safe_load(open(sys.argv[1]))
print(json.dumps(d["services"]))
"#;
    let out = std::process::Command::new("python3")
        .args(["-c", script])
        .arg(root().join("deploy/compose.yaml"))
        .output()
        .expect("python3");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let services: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
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

#[test]
fn the_image_keeps_its_state_on_its_volume_and_runs_as_another_user() {
    let text = std::fs::read_to_string(root().join("deploy/Dockerfile")).unwrap();
    let runtime = text
        .rsplit_once("\nFROM ")
        .map(|(_, last)| last)
        .expect("a runtime stage");
    assert!(runtime.contains("FLYWHEEL_HOME=/data"), "{runtime}");
    assert!(runtime.contains("VOLUME /data"), "{runtime}");
    let user = runtime
        .lines()
        .find_map(|l| l.strip_prefix("USER "))
        .expect("a USER line");
    assert_ne!(user.trim(), "root");
    assert!(runtime.contains("HEALTHCHECK"), "{runtime}");
    let ignored = std::fs::read_to_string(root().join(".dockerignore")).unwrap();
    for path in ["target/", ".flywheel/"] {
        assert!(ignored.lines().any(|l| l == path), "{path}");
    }
}
