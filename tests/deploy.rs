//! The deployment files, checked without a container engine: the compose file parses and
//! references files that exist, Prometheus scrapes the port and path the server serves metrics
//! on, the image runs as a non-root user with a health check, and every metric the Grafana
//! dashboard queries is one a real server exports.
use std::collections::BTreeSet;
use std::process::Command;
use std::time::Duration;

use futures::StreamExt;
use hardneg_proto as proto;
use hardneg_server::encode::testing::perturbed_checkpoint;
use hardneg_tests::{Server, model_dir, root};

/// A YAML file as JSON (PyYAML; see tests/reference/requirements.txt).
fn yaml(path: &std::path::Path) -> serde_json::Value {
    let out = Command::new("python3")
        .args(["-c", "import json, sys, yaml; print(json.dumps(yaml.safe_load(open(sys.argv[1]))))"])
        .arg(path)
        .output()
        .expect("python3 runs");
    assert!(out.status.success(), "{}: {}", path.display(), String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).unwrap()
}

fn port_of(addr: &str) -> &str {
    addr.rsplit(':').next().unwrap()
}

/// A service's `environment` as the server's configuration would see it.
fn env_of(service: &serde_json::Value) -> std::collections::HashMap<String, String> {
    service["environment"].as_object().unwrap().iter().map(|(k, v)| (k.clone(), v.as_str().unwrap().to_string())).collect()
}

#[test]
fn compose_prometheus_and_dockerfile_agree() {
    let deploy = root().join("deploy");
    let compose = yaml(&deploy.join("docker-compose.yml"));
    let services = compose["services"].as_object().unwrap();
    for name in ["fetch-model", "hardneg", "hardneg-gpu", "prometheus", "grafana"] {
        assert!(services.contains_key(name), "service {name}");
    }
    // Build context and Dockerfile, and every bind-mounted path, exist.
    for name in ["hardneg", "hardneg-gpu"] {
        let build = &services[name]["build"];
        let context = deploy.join(build["context"].as_str().unwrap());
        assert!(context.join(build["dockerfile"].as_str().unwrap()).is_file());
    }
    let named: BTreeSet<&str> = compose["volumes"].as_object().unwrap().keys().map(String::as_str).collect();
    for (name, service) in services {
        for volume in service["volumes"].as_array().into_iter().flatten() {
            let source = volume.as_str().unwrap().split(':').next().unwrap();
            if source.starts_with('.') {
                assert!(deploy.join(source).exists(), "{name}: {source} does not exist");
            } else {
                assert!(named.contains(source), "{name}: volume {source} is not declared");
            }
        }
    }
    assert!(services["fetch-model"]["command"].to_string().contains("/scripts/fetch-models"));
    assert!(root().join("scripts/fetch-models").is_file());

    // One server per profile: CPU by default (deploy/.env), the CUDA image under `gpu`, both
    // reachable as `hardneg`; Prometheus starts with whichever runs.
    let dotenv = std::fs::read_to_string(deploy.join(".env")).unwrap();
    assert!(dotenv.lines().any(|l| l.trim() == "COMPOSE_PROFILES=cpu"), "{dotenv}");
    assert_eq!(services["hardneg"]["profiles"], serde_json::json!(["cpu"]));
    let gpu = &services["hardneg-gpu"];
    assert_eq!(gpu["profiles"], serde_json::json!(["gpu"]));
    assert_eq!(gpu["networks"]["default"]["aliases"], serde_json::json!(["hardneg"]));
    assert_eq!(gpu["build"]["args"]["VARIANT"], "cuda");
    let device = &gpu["deploy"]["resources"]["reservations"]["devices"][0];
    assert_eq!((device["driver"].as_str(), device["capabilities"][0].as_str()), (Some("nvidia"), Some("gpu")));
    for name in ["hardneg", "hardneg-gpu"] {
        let needs = &services["prometheus"]["depends_on"][name];
        assert_eq!(needs["required"], false, "prometheus must start with either server");
    }
    // Both servers' settings are a valid configuration, and the GPU one puts the models on the GPU.
    for name in ["hardneg", "hardneg-gpu"] {
        let cfg = hardneg_server::config::Config::load_with_env(None, &Default::default(), Some(env_of(&services[name])))
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        let stop: f64 = services[name]["stop_grace_period"].as_str().unwrap().trim_end_matches('s').parse().unwrap();
        assert!(stop > cfg.server.shutdown_timeout_seconds, "{name}: compose kills before the server's shutdown bound");
        if name == "hardneg-gpu" {
            use hardneg_server::config::DeviceSpec;
            assert_eq!((cfg.encoder.device_spec(), cfg.reranker.device_spec()), (DeviceSpec::Cuda(0), DeviceSpec::Cuda(0)));
        }
    }

    // Prometheus scrapes hardneg's metrics port at /metrics.
    let metrics_listen = services["hardneg"]["environment"]["HARDNEG__SERVER__METRICS_LISTEN"].as_str().unwrap();
    assert_eq!(gpu["environment"]["HARDNEG__SERVER__METRICS_LISTEN"].as_str(), Some(metrics_listen));
    let prometheus = yaml(&deploy.join("prometheus.yml"));
    let job = &prometheus["scrape_configs"][0];
    assert_eq!(job["metrics_path"], "/metrics");
    let target = job["static_configs"][0]["targets"][0].as_str().unwrap();
    assert_eq!(target, format!("hardneg:{}", port_of(metrics_listen)));
    let grafana = &services["grafana"];
    assert!(grafana["volumes"].to_string().contains("./grafana/provisioning"));
    let datasource = yaml(&deploy.join("grafana/provisioning/datasources/prometheus.yml"));
    assert_eq!(datasource["datasources"][0]["url"], "http://prometheus:9090");
    assert!(services["prometheus"]["ports"].to_string().contains("9090"));

    // The image: non-root, health check through the CLI, volumes, the same ports.
    let dockerfile = std::fs::read_to_string(root().join("Dockerfile")).unwrap();
    assert!(dockerfile.lines().any(|l| l.starts_with("USER ") && !l.contains("root")));
    assert!(dockerfile.contains("HEALTHCHECK") && dockerfile.contains(r#"CMD ["hardneg", "health"]"#));
    assert!(dockerfile.contains("HARDNEG_ADDR=http://127.0.0.1:50051"), "the health check's address");
    assert!(dockerfile.contains("VOLUME") && dockerfile.contains("/models"));
    assert!(dockerfile.contains(&format!("HARDNEG__SERVER__METRICS_LISTEN={metrics_listen}")));
    assert!(dockerfile.contains("EXPOSE 50051 9464"));
    // The variants: CPU by default; CUDA on NVIDIA's images, built by scripts/build-cuda.
    assert!(dockerfile.lines().any(|l| l.trim() == "ARG VARIANT=cpu"));
    for stage in ["build-cpu", "build-cuda", "runtime-cpu", "runtime-cuda"] {
        assert!(dockerfile.lines().any(|l| l.starts_with("FROM ") && l.ends_with(&format!(" AS {stage}"))), "stage {stage}");
    }
    assert!(dockerfile.contains("FROM build-${VARIANT} AS build") && dockerfile.contains("FROM runtime-${VARIANT}"));
    assert!(dockerfile.contains("FROM nvidia/cuda:${CUDA_VERSION}-devel") && dockerfile.contains("FROM nvidia/cuda:${CUDA_VERSION}-runtime"));
    assert!(dockerfile.contains("scripts/build-cuda") && root().join("scripts/build-cuda").is_file());
    // Both runtimes carry OpenBLAS, which encoder.cpu_kernels "auto" opens.
    let installs_openblas = dockerfile.matches("ca-certificates libopenblas0-pthread").count();
    assert_eq!(installs_openblas, 2, "libopenblas0-pthread in runtime-cpu and runtime-cuda");
    // And MKL from its wheel, through the script that fetches it, on the loader's path.
    assert!(dockerfile.contains("COPY scripts/fetch-mkl") && dockerfile.contains("fetch-mkl /opt/mkl") && root().join("scripts/fetch-mkl").is_file());
    assert_eq!(dockerfile.matches("COPY --from=mkl /opt/mkl /usr/local/lib/hardneg-mkl").count(), 2, "MKL in runtime-cpu and runtime-cuda");
    assert_eq!(dockerfile.matches("/etc/ld.so.conf.d/hardneg-mkl.conf && ldconfig").count(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_dashboard_metric_is_exported() {
    let dashboard: serde_json::Value =
        serde_json::from_slice(&std::fs::read(root().join("deploy/grafana/dashboards/hardneg.json")).unwrap()).unwrap();
    let mut wanted = BTreeSet::new();
    for panel in dashboard["panels"].as_array().unwrap() {
        for target in panel["targets"].as_array().unwrap() {
            let expr = target["expr"].as_str().unwrap();
            let mut rest = expr;
            while let Some(at) = rest.find("hardneg_") {
                let name: String = rest[at..].chars().take_while(|c| c.is_ascii_alphanumeric() || *c == '_').collect();
                rest = &rest[at + name.len()..];
                wanted.insert(name);
            }
        }
    }
    assert!(wanted.len() >= 10, "{wanted:?}");

    // A server with traffic of every kind the dashboard shows, including a re-encode.
    let tmp = tempfile::tempdir().unwrap();
    let models = tmp.path().join("models");
    perturbed_checkpoint(&model_dir(), &models.join("step-2"), 2, 0.02);
    let metrics_addr = format!("127.0.0.1:{}", hardneg_tests::free_port());
    let env = [("HARDNEG__SERVER__METRICS_LISTEN", metrics_addr.as_str()), ("HARDNEG__ENCODER__MODELS_ROOT", models.to_str().unwrap())];
    let server = Server::start_with(&tmp.path().join("data"), &env).await;
    let mut client = server.client().await;
    client.create_collection("c", proto::Quantization::F32).await.unwrap();
    let docs: Vec<proto::Document> = (0..12)
        .map(|i| proto::Document { id: format!("d{i}"), text: format!("boundary layer {i} on a flat plate"), title: None, metadata: Default::default(), vector: Vec::new() })
        .collect();
    client.upsert("c", futures::stream::iter([docs])).await.unwrap();
    let req = proto::MineRequest {
        collection: "c".into(),
        batch_id: 0,
        queries: vec![proto::Query { text: "flat plate".into(), positive_ids: vec!["d0".into()], ..Default::default() }],
        options: Some(proto::MineOptions { num_negatives: 2, ..Default::default() }),
        min_generation: None,
    };
    client.mine(req.clone()).await.unwrap();
    let _ = client.mine(proto::MineRequest { queries: vec![], ..req.clone() }).await;
    let mut stream = client.refresh("c", "step-2").await.unwrap();
    while let Some(p) = stream.next().await {
        p.unwrap();
    }
    tokio::time::sleep(Duration::from_millis(2500)).await;

    let text = hardneg_tests::scrape_metrics(&metrics_addr).await;
    let exported: BTreeSet<&str> = text
        .lines()
        .filter(|l| l.starts_with("hardneg_"))
        .map(|l| l.split(|c| c == '{' || c == ' ').next().unwrap())
        .collect();
    let missing: Vec<&String> = wanted.iter().filter(|m| !exported.contains(m.as_str())).collect();
    assert!(missing.is_empty(), "the dashboard queries metrics the server does not export: {missing:?}\nexported: {exported:?}");
    server.stop(Duration::from_secs(30));
}
