//! Vectors-only collections end to end: the trainer's document vectors in, query vectors in,
//! negatives out, checked against an exact brute-force search; every refusal around them; and
//! restarts (SIGTERM, kill -9 after a saved index and later writes) answering as before.
use std::collections::HashSet;
use std::time::Duration;

use hardneg_client::{Client, Code};
use hardneg_proto as proto;
use hardneg_tests::Server;

const DIMS: usize = 24;

/// Deterministic clustered vectors (not normalized: cosine must normalize them itself).
fn vectors(n: usize, seed: u64) -> Vec<Vec<f32>> {
    let mut state = seed;
    let mut next = move || {
        state = state.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        ((state >> 33) as f32 / (1u64 << 31) as f32) - 0.5
    };
    let centers: Vec<Vec<f32>> = (0..40).map(|_| (0..DIMS).map(|_| next()).collect()).collect();
    (0..n).map(|i| centers[i % 40].iter().map(|c| (c + 0.4 * next()) * (1.0 + (i % 7) as f32)).collect()).collect()
}

fn cosine(a: &[f32], b: &[f32]) -> f64 {
    let dot: f64 = a.iter().zip(b).map(|(x, y)| *x as f64 * *y as f64).sum();
    let na: f64 = a.iter().map(|x| (*x as f64).powi(2)).sum::<f64>().sqrt();
    let nb: f64 = b.iter().map(|x| (*x as f64).powi(2)).sum::<f64>().sqrt();
    dot / (na * nb)
}

/// The exact top-k document indices by cosine, best first.
fn exact_top_k(docs: &[Vec<f32>], query: &[f32], k: usize) -> Vec<(usize, f64)> {
    let mut scored: Vec<(usize, f64)> = docs.iter().enumerate().map(|(i, d)| (i, cosine(query, d))).collect();
    scored.sort_by(|a, b| b.1.total_cmp(&a.1));
    scored.truncate(k);
    scored
}

fn doc(i: usize, vector: Vec<f32>) -> proto::Document {
    proto::Document { id: format!("v{i}"), text: format!("passage number {i}"), vector, ..Default::default() }
}

async fn create_vectors_only(client: &mut Client, name: &str, quantization: proto::Quantization) -> proto::CollectionInfo {
    client
        .create(proto::CreateCollectionRequest {
            name: name.into(),
            dims: DIMS as u32,
            encoder_name: "my-encoder@step-100".into(),
            quantization: quantization as i32,
            ..Default::default()
        })
        .await
        .unwrap()
}

/// Ingests `docs` in messages of 500.
async fn ingest(client: &mut Client, name: &str, docs: &[Vec<f32>]) {
    let messages: Vec<Vec<proto::Document>> =
        docs.chunks(500).enumerate().map(|(c, chunk)| chunk.iter().enumerate().map(|(j, v)| doc(c * 500 + j, v.clone())).collect()).collect();
    let resp = client.upsert(name, futures::stream::iter(messages)).await.unwrap();
    assert_eq!(resp.inserted as usize, docs.len());
    assert_eq!(resp.pending, 0);
}

fn mine_req(name: &str, queries: &[Vec<f32>], k: u32) -> proto::MineRequest {
    proto::MineRequest {
        collection: name.into(),
        queries: queries.iter().enumerate().map(|(i, q)| proto::Query { id: format!("q{i}"), vector: q.clone(), ..Default::default() }).collect(),
        options: Some(proto::MineOptions { num_negatives: k, range_max: Some(k), seed: Some(1), ..Default::default() }),
        ..Default::default()
    }
}

fn negative_ids(resp: &proto::MineResponse) -> Vec<Vec<String>> {
    resp.results.iter().map(|r| r.negatives.iter().map(|n| n.id.clone()).collect()).collect()
}

/// Exact search (below index.exact_search_below) returns exactly the brute-force top k, with
/// its scores; HNSW (exact search off) finds at least 99% of them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn negatives_are_the_exact_top_k_and_hnsw_recalls_them() {
    let docs = vectors(3000, 7);
    let queries = vectors(64, 99);
    let k = 10;
    let tmp = tempfile::tempdir().unwrap();
    for (exact_below, quantization) in [("20000", proto::Quantization::F32), ("0", proto::Quantization::F32), ("0", proto::Quantization::F16)] {
        let server = Server::start_with(&tmp.path().join(format!("data-{exact_below}-{quantization:?}")), &[("HARDNEG__INDEX__EXACT_SEARCH_BELOW", exact_below)]).await;
        let mut client = server.client().await;
        let info = create_vectors_only(&mut client, "vecs", quantization).await;
        assert!(info.vectors_only);
        assert_eq!((info.dims, info.encoder_kind.as_str(), info.encoder_name.as_str()), (DIMS as u32, "trainer", "my-encoder@step-100"));
        ingest(&mut client, "vecs", &docs).await;
        let resp = client.mine(mine_req("vecs", &queries, k as u32)).await.unwrap();
        let (mut found, mut total) = (0, 0);
        for (q, result) in queries.iter().zip(&resp.results) {
            let want = exact_top_k(&docs, q, k);
            let want_ids: Vec<String> = want.iter().map(|(i, _)| format!("v{i}")).collect();
            let got: Vec<String> = result.negatives.iter().map(|n| n.id.clone()).collect();
            if exact_below != "0" {
                assert_eq!(got, want_ids, "exact search returns the brute-force top {k} in order");
                for (n, (_, score)) in result.negatives.iter().zip(&want) {
                    assert!((n.score as f64 - score).abs() < 1e-5, "score {} vs cosine {score}", n.score);
                }
            }
            let want_set: HashSet<&String> = want_ids.iter().collect();
            found += got.iter().filter(|id| want_set.contains(id)).count();
            total += k;
        }
        let recall = found as f64 / total as f64;
        assert!(recall >= 0.99, "recall@{k} {recall:.4} with exact_search_below={exact_below}, {quantization:?}");
    }
}

/// Every refusal names its field, with the right status, and the server keeps serving.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vector_refusals_name_the_field_and_the_server_keeps_serving() {
    let tmp = tempfile::tempdir().unwrap();
    let server = Server::start(&tmp.path().join("data")).await;
    let mut client = server.client().await;
    let create = |req: proto::CreateCollectionRequest| proto::CreateCollectionRequest { name: "bad".into(), ..req };
    for (req, field) in [
        (create(proto::CreateCollectionRequest { dims: 8, query_prompt: Some("query: ".into()), ..Default::default() }), "query_prompt"),
        (create(proto::CreateCollectionRequest { dims: 70000, ..Default::default() }), "dims"),
        (create(proto::CreateCollectionRequest { encoder_name: "x".into(), ..Default::default() }), "encoder_name"),
    ] {
        let err = client.create(req).await.unwrap_err();
        assert_eq!(err.code(), Some(Code::InvalidArgument), "{err}");
        assert!(err.to_string().contains(field), "{err}");
    }
    create_vectors_only(&mut client, "vecs", proto::Quantization::F32).await;
    client.create_collection("text", proto::Quantization::F32).await.unwrap();
    let good = vectors(2, 3);
    let upsert_one = |d: proto::Document| vec![doc(0, good[0].clone()), d];
    let mut wrong_dims = good[1].clone();
    wrong_dims.pop();
    let mut not_finite = good[1].clone();
    not_finite[3] = f32::NAN;
    for (collection, docs, field) in [
        ("vecs", upsert_one(doc(1, Vec::new())), "documents[1].vector"),
        ("vecs", upsert_one(doc(1, wrong_dims)), "documents[1].vector"),
        ("vecs", upsert_one(doc(1, vec![0.0; DIMS])), "documents[1].vector"),
        ("vecs", upsert_one(doc(1, not_finite)), "documents[1].vector[3]"),
        ("text", vec![doc(0, good[0].clone())], "documents[0].vector"),
    ] {
        let err = client.upsert(collection, futures::stream::iter([docs])).await.unwrap_err();
        assert_eq!(err.code(), Some(Code::InvalidArgument), "{err}");
        assert!(err.to_string().contains(field), "{field}: {err}");
        assert!(err.to_string().contains("upsert message 0"), "{err}");
    }
    assert_eq!(client.get_collection("vecs").await.unwrap().doc_count, 0, "a refused message writes nothing");
    ingest(&mut client, "vecs", &vectors(100, 5)).await;
    let text_query = proto::Query { text: "a text query".into(), ..Default::default() };
    let positive_text = proto::Query { vector: good[0].clone(), positive_texts: vec!["a positive".into()], ..Default::default() };
    for (query, field) in [(text_query, "queries[0].vector"), (positive_text, "queries[0].positive_texts")] {
        let req = proto::MineRequest { collection: "vecs".into(), queries: vec![query], options: mine_req("vecs", &[], 3).options, ..Default::default() };
        let err = client.mine(req).await.unwrap_err();
        assert_eq!(err.code(), Some(Code::FailedPrecondition), "{err}");
        assert!(err.to_string().contains(field), "{field}: {err}");
    }
    let resp = client.mine(mine_req("vecs", &good, 3)).await.unwrap();
    assert!(resp.results.iter().all(|r| r.negatives.len() == 3), "still serving");
}

/// Restarts answer as before: after SIGTERM (the index saved at shutdown is loaded), and after
/// kill -9 following more writes (the saved index is brought up to date with them); a
/// background save is then loaded as it is.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restarts_after_sigterm_and_kill_answer_as_before() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let docs = vectors(2500, 11);
    let queries = vectors(16, 12);
    let no_background = [("HARDNEG__INDEX__SAVE_INTERVAL_SECONDS", "0"), ("HARDNEG__INDEX__EXACT_SEARCH_BELOW", "100000")];
    let server = Server::start_with(&data, &no_background).await;
    let mut client = server.client().await;
    create_vectors_only(&mut client, "vecs", proto::Quantization::F32).await;
    ingest(&mut client, "vecs", &docs).await;
    let before = client.mine(mine_req("vecs", &queries, 8)).await.unwrap();
    drop(client);
    server.stop(Duration::from_secs(30));

    let server = Server::start_with(&data, &no_background).await;
    assert!(server.log_text().contains("index loaded from its saved file"), "{}", server.log_text());
    let mut client = server.client().await;
    assert_eq!(negative_ids(&client.mine(mine_req("vecs", &queries, 8)).await.unwrap()), negative_ids(&before));
    // Writes after the save: every query's best document deleted, its second replaced by a
    // vector far from everything, and new documents equal to the queries.
    let best: Vec<String> = before.results.iter().map(|r| r.negatives[0].id.clone()).collect();
    client.delete("vecs", best.clone()).await.unwrap();
    let second: Vec<proto::Document> = before
        .results
        .iter()
        .enumerate()
        .map(|(i, r)| proto::Document { id: r.negatives[1].id.clone(), text: format!("moved {i}"), vector: vec![-1.0; DIMS], ..Default::default() })
        .collect();
    let added: Vec<proto::Document> =
        queries.iter().enumerate().map(|(i, q)| proto::Document { id: format!("new{i}"), text: format!("new {i}"), vector: q.clone(), ..Default::default() }).collect();
    client.upsert("vecs", futures::stream::iter([second, added])).await.unwrap();
    let expected = client.mine(mine_req("vecs", &queries, 8)).await.unwrap();
    for (i, r) in expected.results.iter().enumerate() {
        assert_eq!(r.negatives[0].id, format!("new{i}"), "the new document equal to the query ranks first");
        assert!(r.negatives.iter().all(|n| !best.contains(&n.id)));
    }
    let count = client.get_collection("vecs").await.unwrap().doc_count;
    drop(client);
    drop(server); // kill -9: no save since the writes

    let with_background = [("HARDNEG__INDEX__SAVE_INTERVAL_SECONDS", "0.3"), ("HARDNEG__INDEX__EXACT_SEARCH_BELOW", "100000")];
    let server = Server::start_with(&data, &with_background).await;
    assert!(server.log_text().contains("brought up to date with the later writes"), "{}", server.log_text());
    let mut client = server.client().await;
    assert_eq!(client.get_collection("vecs").await.unwrap().doc_count, count);
    assert_eq!(negative_ids(&client.mine(mine_req("vecs", &queries, 8)).await.unwrap()), negative_ids(&expected));
    // The background save catches up with the replayed writes; a crash after it loads it as is.
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while !server.log_text().contains("index saved") {
        assert!(std::time::Instant::now() < deadline, "no background save in 20 s:\n{}", server.log_text());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    drop(client);
    drop(server);
    let server = Server::start_with(&data, &no_background).await;
    let log = server.log_text();
    assert!(log.contains("index loaded from its saved file") && !log.contains("brought up to date") && !log.contains("rebuilt"), "{log}");
    let mut client = server.client().await;
    assert_eq!(negative_ids(&client.mine(mine_req("vecs", &queries, 8)).await.unwrap()), negative_ids(&expected));
}

/// A little-endian float32 .npy matrix, as numpy.save writes one.
fn write_npy(path: &std::path::Path, rows: &[Vec<f32>]) {
    let header = format!("{{'descr': '<f4', 'fortran_order': False, 'shape': ({}, {}), }}", rows.len(), rows[0].len());
    let pad = 64 - (10 + header.len() + 1) % 64;
    let mut bytes = b"\x93NUMPY\x01\x00".to_vec();
    bytes.extend(((header.len() + pad + 1) as u16).to_le_bytes());
    bytes.extend(header.as_bytes());
    bytes.extend(std::iter::repeat_n(b' ', pad));
    bytes.push(b'\n');
    for r in rows {
        bytes.extend(r.iter().flat_map(|x| x.to_le_bytes()));
    }
    std::fs::write(path, bytes).unwrap();
}

fn cli(server: &Server, args: &[&str]) -> String {
    let out = std::process::Command::new(hardneg_tests::bin("hardneg")).args(["--addr", &server.addr]).args(args).output().unwrap();
    assert!(out.status.success(), "hardneg {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).unwrap()
}

/// Through the CLI: create --dims, ingest a corpus with its vectors from a .npy and an ids
/// file, mine pairs given as query vectors; the negatives are the exact top 5 after the
/// positive, which is excluded.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cli_creates_ingests_and_mines_a_vectors_only_collection() {
    let tmp = tempfile::tempdir().unwrap();
    let server = Server::start(&tmp.path().join("data")).await;
    let docs = vectors(1200, 21);
    let queries = vectors(20, 22);
    let dir = tmp.path();
    write_npy(&dir.join("v.npy"), &docs);
    let ids: Vec<String> = (0..docs.len()).map(|i| format!("v{i}")).collect();
    std::fs::write(dir.join("ids.txt"), ids.join("\n") + "\n").unwrap();
    let corpus: String = (0..docs.len()).rev().map(|i| format!("{}\n", serde_json::json!({"_id": format!("v{i}"), "title": "", "text": format!("passage number {i}")}))).collect();
    std::fs::write(dir.join("corpus.jsonl"), corpus).unwrap();
    let created: serde_json::Value = serde_json::from_str(&cli(&server, &["create", "--collection", "c", "--dims", &DIMS.to_string()])).unwrap();
    assert_eq!(created["vectors_only"], true, "{created}");
    let path = |f: &str| dir.join(f).to_str().unwrap().to_string();
    let (corpus, npy, ids_file) = (path("corpus.jsonl"), path("v.npy"), path("ids.txt"));
    let ingested: serde_json::Value =
        serde_json::from_str(&cli(&server, &["ingest", "--collection", "c", "--corpus", &corpus, "--vectors", &npy, "--ids", &ids_file])).unwrap();
    assert_eq!((ingested["inserted"].as_u64(), ingested["pending"].as_u64()), (Some(1200), Some(0)), "{ingested}");

    let exact: Vec<Vec<(usize, f64)>> = queries.iter().map(|q| exact_top_k(&docs, q, 6)).collect();
    let pairs: String = queries
        .iter()
        .zip(&exact)
        .enumerate()
        .map(|(i, (q, top))| format!("{}\n", serde_json::json!({"id": format!("q{i}"), "vector": q, "positive_id": format!("v{}", top[0].0)})))
        .collect();
    std::fs::write(dir.join("pairs.jsonl"), pairs).unwrap();
    let pairs = path("pairs.jsonl");
    let out = cli(&server, &["mine", "--collection", "c", "--pairs", &pairs, "--num-negatives", "5", "--range-max", "5", "--exclude-batch-positives", "false"]);
    let lines: Vec<serde_json::Value> = out.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(lines.len(), queries.len());
    for (line, top) in lines.iter().zip(&exact) {
        let got: Vec<&str> = line["negatives"].as_array().unwrap().iter().map(|n| n["id"].as_str().unwrap()).collect();
        let want: Vec<String> = top[1..].iter().map(|(i, _)| format!("v{i}")).collect();
        assert_eq!(got, want, "{line}");
        assert!((line["positive_score"].as_f64().unwrap() - top[0].1).abs() < 1e-5, "{line}");
    }
}
