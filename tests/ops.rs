//! Operations through the real server: TLS with a test CA, shutdown on SIGTERM (streams and
//! refreshes stop at a safe point, the exit is bounded), and many streaming clients sending
//! normal and oversized batches at once.
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use futures::StreamExt;
use hardneg_client::beir::{self, BeirQuery, CorpusDoc};
use hardneg_client::{Client, Code, ConnectOptions};
use hardneg_proto as proto;
use hardneg_server::encode::testing::perturbed_checkpoint;
use hardneg_tests::{Server, bin, dataset, model_dir};

/// The first `n` non-empty Cranfield documents.
fn documents(n: usize) -> Vec<proto::Document> {
    let docs: Vec<CorpusDoc> = beir::read_jsonl(&dataset("cranfield").join("corpus.jsonl")).unwrap();
    docs.into_iter()
        .filter(|d| !d.text.trim().is_empty())
        .take(n)
        .map(|d| proto::Document { id: d.id, text: d.text, title: None, metadata: Default::default(), vector: Vec::new() })
        .collect()
}

fn text_request(collection: &str, batch_id: u64) -> proto::MineRequest {
    let qs: Vec<BeirQuery> = beir::read_jsonl(&dataset("cranfield").join("queries.jsonl")).unwrap();
    proto::MineRequest {
        collection: collection.into(),
        batch_id,
        queries: qs.into_iter().take(8).map(|q| proto::Query { id: q.id, text: q.text, ..Default::default() }).collect(),
        options: Some(proto::MineOptions { num_negatives: 4, seed: Some(3), ..Default::default() }),
        min_generation: None,
    }
}

fn ids(resp: &proto::MineResponse) -> Vec<Vec<String>> {
    resp.results.iter().map(|r| r.negatives.iter().map(|n| n.id.clone()).collect()).collect()
}

/// A test CA and a certificate it signed for localhost / 127.0.0.1: (CA PEM, cert path, key path).
fn test_pki(dir: &Path, name: &str) -> (Vec<u8>, std::path::PathBuf, std::path::PathBuf) {
    use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair, KeyUsagePurpose, SanType};
    let ca_key = KeyPair::generate().unwrap();
    let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.distinguished_name.push(DnType::CommonName, format!("{name} test CA"));
    ca.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
    let ca_cert = ca.self_signed(&ca_key).unwrap();
    let issuer = Issuer::new(ca, ca_key);
    let key = KeyPair::generate().unwrap();
    let mut leaf = CertificateParams::new(vec!["localhost".to_string()]).unwrap();
    leaf.subject_alt_names.push(SanType::IpAddress("127.0.0.1".parse().unwrap()));
    leaf.distinguished_name.push(DnType::CommonName, "localhost");
    let cert = leaf.signed_by(&key, &issuer).unwrap();
    let (cert_path, key_path) = (dir.join(format!("{name}-cert.pem")), dir.join(format!("{name}-key.pem")));
    std::fs::write(&cert_path, cert.pem()).unwrap();
    std::fs::write(&key_path, key.serialize_pem()).unwrap();
    (ca_cert.pem().into_bytes(), cert_path, key_path)
}

/// Starts the server binary expecting it to refuse to start; its stderr.
fn refused_start(data_dir: &Path, env: &[(&str, &str)]) -> String {
    let mut cmd = Command::new(bin("hardneg-server"));
    cmd.arg("--listen").arg(format!("127.0.0.1:{}", hardneg_tests::free_port())).arg("--data-dir").arg(data_dir);
    cmd.arg("--model-dir").arg(model_dir()).stdout(Stdio::null()).stderr(Stdio::piped());
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = cmd.output().unwrap();
    assert!(!out.status.success(), "the server started with {env:?}");
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// Any call over this connection, or the connection itself, fails.
async fn refused(addr: &str, options: &ConnectOptions) -> String {
    match Client::connect_with(addr, options).await {
        Err(e) => e.to_string(),
        Ok(mut c) => match c.list_collections().await {
            Err(e) => e.to_string(),
            Ok(list) => panic!("{addr} with {options:?} answered: {list:?}"),
        },
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn tls_with_the_test_ca() {
    let tmp = tempfile::tempdir().unwrap();
    let (ca, cert, key) = test_pki(tmp.path(), "server");
    let (other_ca, _, _) = test_pki(tmp.path(), "other");
    let env = [
        ("HARDNEG__SERVER__TLS_CERT_FILE", cert.to_str().unwrap()),
        ("HARDNEG__SERVER__TLS_KEY_FILE", key.to_str().unwrap()),
        ("HARDNEG_AUTH_TOKEN", "s3cret"),
    ];
    // Ready means a TLS client trusting the test CA got SERVING from health.
    let mut server = Server::start_tls(&tmp.path().join("data"), &env, &ca).await;
    server.connect.token = Some("s3cret".into());
    let mut client = server.client().await;
    client.create_collection("c", proto::Quantization::F32).await.unwrap();
    client.upsert("c", futures::stream::iter([documents(12)])).await.unwrap();
    let resp = client.mine(text_request("c", 1)).await.unwrap();
    assert!(resp.results.iter().all(|r| r.negatives.len() == 4), "mining works over TLS");
    // The IP address is in the certificate too.
    let port = server.addr.rsplit(':').next().unwrap().to_string();
    let by_ip = format!("https://127.0.0.1:{port}");
    let mut c = Client::connect_with(&by_ip, &server.connect).await.unwrap();
    assert_eq!(c.list_collections().await.unwrap().len(), 1);

    // A plaintext client does not get an answer.
    let plain = format!("http://127.0.0.1:{port}");
    let err = refused(&plain, &ConnectOptions { token: Some("s3cret".into()), ..Default::default() }).await;
    eprintln!("plaintext client: {err}");
    // Nor does a TLS client trusting another CA, or only the system's roots.
    let err = refused(&server.addr, &ConnectOptions { tls_ca_pem: Some(other_ca), token: Some("s3cret".into()), ..Default::default() }).await;
    assert!(err.to_lowercase().contains("certificate") || err.contains("transport"), "{err}");
    refused(&server.addr, &ConnectOptions { token: Some("s3cret".into()), ..Default::default() }).await;
    // TLS does not replace the token.
    let mut no_token = Client::connect_with(&server.addr, &ConnectOptions { tls_ca_pem: Some(ca.clone()), ..Default::default() }).await.unwrap();
    assert_eq!(no_token.list_collections().await.unwrap_err().code(), Some(Code::Unauthenticated));
    // The CLI speaks TLS too.
    let ca_file = tmp.path().join("ca.pem");
    std::fs::write(&ca_file, &ca).unwrap();
    let out = Command::new(bin("hardneg"))
        .args(["--addr", &server.addr, "--tls-ca", ca_file.to_str().unwrap(), "status"])
        .env("HARDNEG_TOKEN", "s3cret")
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stdout).contains("\"c\""), "{}", String::from_utf8_lossy(&out.stdout));
    let health = Command::new(bin("hardneg")).args(["--addr", &server.addr, "--tls-ca", ca_file.to_str().unwrap(), "health"]).status().unwrap();
    assert!(health.success(), "hardneg health works over TLS");
    let health = Command::new(bin("hardneg")).args(["--addr", &plain, "health"]).status().unwrap();
    assert!(!health.success(), "a plaintext health check of a TLS server fails");
    server.stop(Duration::from_secs(30));

    // Bad TLS settings stop the start, naming the key.
    let missing = tmp.path().join("missing.pem");
    let err = refused_start(&tmp.path().join("d2"), &[
        ("HARDNEG__SERVER__TLS_CERT_FILE", missing.to_str().unwrap()),
        ("HARDNEG__SERVER__TLS_KEY_FILE", key.to_str().unwrap()),
    ]);
    assert!(err.contains("server.tls_cert_file"), "{err}");
    let err = refused_start(&tmp.path().join("d3"), &[
        ("HARDNEG__SERVER__TLS_CERT_FILE", cert.to_str().unwrap()),
        ("HARDNEG__SERVER__TLS_KEY_FILE", cert.to_str().unwrap()),
    ]);
    assert!(err.contains("server.tls_key_file"), "{err}");
    let err = refused_start(&tmp.path().join("d4"), &[("HARDNEG__SERVER__TLS_CERT_FILE", cert.to_str().unwrap())]);
    assert!(err.contains("server.tls_key_file"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sigterm_stops_streams_and_refreshes_at_a_safe_point() {
    const DOCS: usize = 192;
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("models");
    perturbed_checkpoint(&model_dir(), &root.join("step-2"), 2, 0.02);
    let grace = 60.0;
    let env = [
        ("HARDNEG__ENCODER__MODELS_ROOT", root.to_str().unwrap()),
        ("HARDNEG__SERVER__SHUTDOWN_GRACE_SECONDS", "60"),
        ("HARDNEG__SERVER__SHUTDOWN_TIMEOUT_SECONDS", "90"),
    ];
    let data = tmp.path().join("data");
    let mut server = Server::start_with(&data, &env).await;
    let mut client = server.client().await;
    client.create_collection("c", proto::Quantization::F32).await.unwrap();
    client.upsert("c", futures::stream::iter(documents(DOCS).chunks(64).map(<[_]>::to_vec).collect::<Vec<_>>())).await.unwrap();
    let before = client.mine(text_request("c", 0)).await.unwrap();

    // A trainer's stream, open between batches.
    let (tx, rx) = tokio::sync::mpsc::channel::<proto::MineRequest>(4);
    let mut answers = client.mine_stream(tokio_stream::wrappers::ReceiverStream::new(rx)).await.unwrap();
    tx.send(text_request("c", 1)).await.unwrap();
    let first = answers.next().await.unwrap().unwrap();
    assert_eq!((first.batch_id, ids(&first)), (1, ids(&before)));
    // A re-encode past its first chunk.
    let mut refresh = client.refresh("c", "step-2").await.unwrap();
    loop {
        let p = refresh.next().await.expect("refresh running").unwrap();
        if p.done > 0 {
            assert!(p.done < DOCS as u64, "the re-encode finished before the signal: {p:?}");
            break;
        }
    }
    let signalled = Instant::now();
    server.sigterm();
    // The stream ends with UNAVAILABLE; the batch it had answered stays answered.
    let end = answers.next().await.expect("the stream ends with a status").unwrap_err();
    assert_eq!(end.code(), Code::Unavailable, "{end:?}");
    assert!(end.message().contains("shutting down"), "{end:?}");
    assert!(answers.next().await.is_none());
    drop(tx);
    // New connections are refused once shutdown has begun.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let err = refused(&server.addr, &ConnectOptions::default()).await;
    eprintln!("new connection during shutdown: {err}");
    // The re-encode stops at the end of its chunk, without a swap, and says so.
    let mut last = None;
    while let Some(item) = refresh.next().await {
        match item {
            Ok(p) => assert_eq!(p.phase, "encoding", "{p:?}"),
            Err(status) => last = Some(status),
        }
    }
    let last = last.expect("the refresh stream ends with a status");
    assert_eq!(last.code(), Code::Unavailable, "{last:?}");
    assert!(last.message().contains("run it again"), "{last:?}");
    let status = server.wait_exit(Duration::from_secs_f64(grace + 30.0));
    let took = signalled.elapsed();
    assert!(status.success(), "exit status {status}:\n{}", server.log_text());
    let log = server.log_text();
    assert!(took < Duration::from_secs_f64(grace), "the exit waited out the grace period ({took:?}):\n{log}");
    assert!(!log.contains("after the grace period"), "{log}");
    assert!(log.contains("stopped at a safe point for shutdown") && log.contains("shutdown complete"), "{log}");
    eprintln!("SIGTERM to exit with a stream and a re-encode open: {took:?}");
    drop(server);

    // Back at generation 1 with nothing half-built, answering as before.
    let server = Server::start_with(&data, &env).await;
    let mut client = server.client().await;
    let info = client.get_collection("c").await.unwrap();
    assert_eq!((info.generation, info.building_generation, info.doc_count), (1, None, DOCS as u64));
    assert!(!server.log_text().contains("half-built"), "the shutdown dropped it already:\n{}", server.log_text());
    assert_eq!(ids(&client.mine(text_request("c", 0)).await.unwrap()), ids(&before));
    // The refresh runs again after the restart.
    let mut refresh = client.refresh("c", "step-2").await.unwrap();
    let mut phase = String::new();
    while let Some(p) = refresh.next().await {
        phase = p.unwrap().phase;
    }
    assert_eq!(phase, "done");
    assert_eq!(client.get_collection("c").await.unwrap().generation, 2);
    server.stop(Duration::from_secs(30));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn shutdown_cuts_off_what_outlasts_the_grace_period() {
    let tmp = tempfile::tempdir().unwrap();
    let env = [("HARDNEG__SERVER__SHUTDOWN_GRACE_SECONDS", "2"), ("HARDNEG__SERVER__SHUTDOWN_TIMEOUT_SECONDS", "5")];
    let data = tmp.path().join("data");
    let mut server = Server::start_with(&data, &env).await;
    let mut client = server.client().await;
    client.create_collection("c", proto::Quantization::F32).await.unwrap();
    client.upsert("c", futures::stream::iter([documents(8)])).await.unwrap();
    // An upsert whose client never finishes its stream.
    let (tx, rx) = tokio::sync::mpsc::channel::<Vec<proto::Document>>(1);
    tx.send(documents(10)[8..].to_vec()).await.unwrap();
    let mut c = client.clone();
    let held = tokio::spawn(async move { c.upsert("c", tokio_stream::wrappers::ReceiverStream::new(rx)).await });
    tokio::time::sleep(Duration::from_millis(500)).await;
    let signalled = Instant::now();
    server.sigterm();
    let status = server.wait_exit(Duration::from_secs(20));
    let took = signalled.elapsed();
    assert!(status.success(), "exit status {status}:\n{}", server.log_text());
    assert!(took >= Duration::from_secs(2), "the grace period was not given: {took:?}");
    assert!(took < Duration::from_secs(5) + Duration::from_millis(1500), "past server.shutdown_timeout_seconds: {took:?}");
    assert!(server.log_text().contains("after the grace period"), "{}", server.log_text());
    assert!(held.await.unwrap().is_err(), "the cut-off upsert was not acknowledged");
    drop(tx);
    drop(server);
    // What was acknowledged is there.
    let server = Server::start_with(&data, &env).await;
    let mut client = server.client().await;
    let got = client.get_documents("c", documents(8).into_iter().map(|d| d.id).collect()).await.unwrap();
    assert_eq!(got.documents.len(), 8);
}

/// Resident and peak resident memory of a process, in MiB (Linux /proc).
fn memory_mib(pid: u32) -> (f64, f64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let field = |name: &str| {
        status.lines().find(|l| l.starts_with(name)).and_then(|l| l.split_whitespace().nth(1)).unwrap().parse::<f64>().unwrap() / 1024.0
    };
    (field("VmRSS:"), field("VmHWM:"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn many_streams_with_oversized_batches_stay_bounded() {
    const STREAMS: usize = 64;
    const BATCHES: usize = 12;
    let tmp = tempfile::tempdir().unwrap();
    let env = [
        ("HARDNEG__LIMITS__MAX_STREAMS", "48"),
        ("HARDNEG__LIMITS__MAX_IN_FLIGHT", "4"),
        ("HARDNEG__LIMITS__MAX_MESSAGE_BYTES", "1048576"),
        ("HARDNEG__LIMITS__MAX_BATCH_QUERIES", "64"),
        ("HARDNEG__LIMITS__MAX_TEXT_CHARS", "2000"),
    ];
    let server = Server::start_with(&tmp.path().join("data"), &env).await;
    let pid = server.pid();
    let mut client = server.client().await;
    client.create_collection("c", proto::Quantization::F32).await.unwrap();
    let docs: Vec<proto::Document> = documents(96)
        .into_iter()
        .map(|mut d| {
            d.text.truncate(d.text.char_indices().nth(200).map_or(d.text.len(), |(i, _)| i));
            d
        })
        .collect();
    client.upsert("c", futures::stream::iter([docs])).await.unwrap();
    let vector = |seed: usize| -> Vec<f32> {
        let v: Vec<f32> = (0..384).map(|d| ((seed * 7 + d * 13) as f32).sin()).collect();
        let n = v.iter().map(|x| x * x).sum::<f32>().sqrt();
        v.into_iter().map(|x| x / n).collect()
    };
    let request = move |batch_id: u64, kind: usize| {
        let queries = match kind {
            // Oversized: a 2 MiB text in a 1 MiB message limit.
            1 => vec![proto::Query { text: "x".repeat(2 << 20), ..Default::default() }],
            // Too many queries.
            2 => (0..65).map(|i| proto::Query { vector: vector(i), ..Default::default() }).collect(),
            // A text over max_text_chars but inside the message limit.
            3 => vec![proto::Query { text: "wing ".repeat(1000), ..Default::default() }],
            _ => (0..32).map(|i| proto::Query { vector: vector(batch_id as usize * 32 + i), ..Default::default() }).collect(),
        };
        proto::MineRequest {
            collection: "c".into(),
            batch_id,
            queries,
            options: Some(proto::MineOptions { num_negatives: 8, ..Default::default() }),
            min_generation: None,
        }
    };
    client.mine(request(0, 0)).await.unwrap();
    // Resets the high-water mark (VmHWM) to the current resident size, so it measures the load.
    let _ = std::fs::write(format!("/proc/{pid}/clear_refs"), "5");
    let (rss_before, _) = memory_mib(pid);

    // Each stream sends normal batches, then (for most) one bad batch; unary calls run beside.
    let mut tasks = Vec::new();
    for s in 0..STREAMS {
        let mut c = Client::connect(&server.addr).await.unwrap();
        tasks.push(tokio::spawn(async move {
            let bad = s % 4; // 0: none, 1: oversized, 2: too many queries, 3: text too long
            let batches: Vec<proto::MineRequest> =
                (0..BATCHES).map(|b| request((s * 100 + b) as u64, if b == BATCHES / 2 { bad } else { 0 })).collect();
            let mut outcomes: Vec<(Code, String)> = Vec::new();
            match c.mine_stream(futures::stream::iter(batches)).await {
                Err(e) => outcomes.push((e.code().unwrap(), e.to_string())),
                Ok(mut answers) => {
                    while let Some(item) = answers.next().await {
                        match item {
                            Ok(r) => {
                                assert!(r.results.iter().all(|q| q.negatives.len() == 8));
                                outcomes.push((Code::Ok, String::new()));
                            }
                            Err(status) => outcomes.push((status.code(), status.message().to_string())),
                        }
                    }
                }
            }
            outcomes
        }));
    }
    for u in 0..32 {
        let mut c = Client::connect(&server.addr).await.unwrap();
        tasks.push(tokio::spawn(async move {
            match c.mine(request(10_000 + u, if u % 5 == 1 { 1 } else { 0 })).await {
                Ok(_) => vec![(Code::Ok, String::new())],
                Err(e) => vec![(e.code().unwrap(), e.to_string())],
            }
        }));
    }
    while !tasks.iter().all(|t| t.is_finished()) {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let outcomes: Vec<(Code, String)> = futures::future::join_all(tasks).await.into_iter().flat_map(|r| r.unwrap()).collect();
    let mut counts = std::collections::BTreeMap::<String, usize>::new();
    for (code, message) in &outcomes {
        *counts.entry(format!("{code:?}")).or_default() += 1;
        match code {
            Code::Ok => {}
            Code::ResourceExhausted => assert!(
                ["limits.max_streams", "limits.max_in_flight", "limits.max_message_bytes"].iter().any(|l| message.contains(l)),
                "RESOURCE_EXHAUSTED names its limit: {message}"
            ),
            Code::InvalidArgument => assert!(message.contains("queries"), "validation names the field: {message}"),
            other => panic!("unexpected {other:?}: {message}"),
        }
    }
    eprintln!("outcomes: {counts:?}");
    for needed in ["Ok", "ResourceExhausted", "InvalidArgument"] {
        assert!(counts.contains_key(needed), "no {needed} among {counts:?}");
    }
    assert!(outcomes.iter().any(|(_, m)| m.contains("limits.max_message_bytes")), "an oversized batch was refused by size");
    let (rss_after, hwm) = memory_mib(pid);
    eprintln!("resident memory: {rss_before:.0} MiB before the load, {hwm:.0} MiB peak during it, {rss_after:.0} MiB after");
    // Oversized messages are refused from their length prefix, never buffered: the rise stays
    // far below what buffering them would take (STREAMS x 2 MiB alone is 128 MiB per round).
    assert!(hwm - rss_before < 256.0, "resident memory rose {:.0} MiB", hwm - rss_before);
    // Still serving.
    let mut c = server.client().await;
    assert_eq!(c.mine(request(1, 0)).await.unwrap().results.len(), 32);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn health_is_not_serving_while_loading() {
    let tmp = tempfile::tempdir().unwrap();
    let port = hardneg_tests::free_port();
    let addr = format!("http://127.0.0.1:{port}");
    let log = tmp.path().join("server.log");
    let mut child = Command::new(bin("hardneg-server"))
        .args(["--listen", &format!("127.0.0.1:{port}"), "--data-dir"])
        .arg(tmp.path().join("data"))
        .arg("--model-dir")
        .arg(model_dir())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    // From the first answer on: NOT_SERVING (calls get UNAVAILABLE) until ready, then SERVING.
    let mut seen = Vec::new();
    let mut refused_while_loading = None;
    let deadline = Instant::now() + Duration::from_secs(120);
    while Instant::now() < deadline {
        let Ok(mut c) = Client::connect(&addr).await else {
            tokio::time::sleep(Duration::from_millis(2)).await;
            continue;
        };
        loop {
            let ready = c.ready().await.expect("health answers from the start");
            if seen.last() != Some(&ready) {
                seen.push(ready);
            }
            if ready {
                break;
            }
            if refused_while_loading.is_none() {
                // (Loading may end between the two calls: then the next round tries again.)
                refused_while_loading = c.list_collections().await.err();
            }
        }
        break;
    }
    let _ = child.kill();
    let _ = child.wait();
    let log = std::fs::read_to_string(&log).unwrap();
    assert_eq!(seen, [false, true], "health went NOT_SERVING then SERVING:\n{log}");
    let err = refused_while_loading.expect("a call was made while loading");
    assert_eq!(err.code(), Some(Code::Unavailable), "{err}");
    assert!(err.to_string().contains("loading"), "{err}");
}
