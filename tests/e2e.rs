//! End to end: the real server binary with the real all-MiniLM-L6-v2, driven through the
//! client crate and the `hardneg` CLI.
use std::collections::{HashMap, HashSet};
use std::process::Command;
use std::time::Duration;

use futures::StreamExt;
use hardneg_client::beir::{self, BeirQuery, CorpusDoc};
use hardneg_client::{Client, Code};
use hardneg_proto as proto;
use hardneg_tests::{Server, bin, dataset};

fn normalize(text: &str) -> String {
    text.split_whitespace().map(str::to_lowercase).collect::<Vec<_>>().join(" ")
}

fn options(k: u32, seed: u64) -> proto::MineOptions {
    proto::MineOptions { num_negatives: k, seed: Some(seed), return_text: true, ..Default::default() }
}

struct Judged {
    id: String,
    text: String,
    positive: String,
}

fn cranfield_queries() -> Vec<Judged> {
    let dir = dataset("cranfield");
    let qs: Vec<BeirQuery> = beir::read_jsonl(&dir.join("queries.jsonl")).unwrap();
    let qrels = beir::read_qrels(&dir.join("qrels/test.tsv")).unwrap();
    qs.into_iter()
        .filter_map(|q| {
            let positive = qrels.get(&q.id)?.positive()?.to_string();
            Some(Judged { id: q.id, text: q.text, positive })
        })
        .collect()
}

fn batches(queries: &[Judged], size: usize, opts: &proto::MineOptions) -> Vec<proto::MineRequest> {
    queries
        .chunks(size)
        .enumerate()
        .map(|(b, chunk)| proto::MineRequest {
            collection: "cranfield".into(),
            batch_id: b as u64,
            queries: chunk
                .iter()
                .map(|q| proto::Query {
                    id: q.id.clone(),
                    text: q.text.clone(),
                    positive_ids: vec![q.positive.clone()],
                    ..Default::default()
                })
                .collect(),
            options: Some(opts.clone()),
            min_generation: None,
        })
        .collect()
}

fn ids(resp: &proto::MineResponse) -> Vec<Vec<String>> {
    resp.results.iter().map(|r| r.negatives.iter().map(|n| n.id.clone()).collect()).collect()
}

/// Runs `hardneg --addr .. <args> --queries .. --qrels ..` over Cranfield; returns stdout.
fn cli_beir(server: &Server, args: &[&str]) -> String {
    let dir = dataset("cranfield");
    let out = Command::new(bin("hardneg"))
        .args(["--addr", &server.addr])
        .args(args)
        .arg("--queries")
        .arg(dir.join("queries.jsonl"))
        .arg("--qrels")
        .arg(dir.join("qrels/test.tsv"))
        .output()
        .unwrap();
    assert!(out.status.success(), "hardneg {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).unwrap()
}

async fn ingest_cranfield(client: &mut Client) -> HashMap<String, String> {
    let docs: Vec<CorpusDoc> = beir::read_jsonl(&dataset("cranfield").join("corpus.jsonl")).unwrap();
    let docs: Vec<CorpusDoc> = docs.into_iter().filter(|d| !(d.title.trim().is_empty() && d.text.trim().is_empty())).collect();
    let texts = docs.iter().map(|d| (d.id.clone(), format!("{} {}", d.title, d.text))).collect();
    let batches: Vec<Vec<proto::Document>> = docs
        .chunks(200)
        .map(|c| {
            c.iter()
                .map(|d| proto::Document { id: d.id.clone(), text: d.text.clone(), title: Some(d.title.clone()), metadata: Default::default(), vector: Vec::new() })
                .collect()
        })
        .collect();
    // One client-streaming call, several messages.
    let resp = client.upsert("cranfield", futures::stream::iter(batches)).await.unwrap();
    assert_eq!((resp.inserted, resp.updated, resp.doc_count), (1398, 0, 1398));
    texts
}

/// Checks the contract of every answer: negatives are never a positive of the query or of the
/// batch, never share a positive's text, never repeat, and there are as many as asked for.
fn check_contract(req: &proto::MineRequest, resp: &proto::MineResponse, texts: &HashMap<String, String>, k: usize) {
    assert_eq!(resp.batch_id, req.batch_id);
    assert_eq!(resp.generation, 1);
    assert_eq!(resp.results.len(), req.queries.len());
    let batch_positives: HashSet<&str> = req.queries.iter().flat_map(|q| q.positive_ids.iter().map(String::as_str)).collect();
    for (q, r) in req.queries.iter().zip(&resp.results) {
        assert_eq!(r.query_id, q.id);
        assert_eq!(r.negatives.len(), k, "query {} got {} negatives", q.id, r.negatives.len());
        let positive_text = normalize(&texts[&q.positive_ids[0]]);
        let mut seen = HashSet::new();
        for n in &r.negatives {
            assert!(!batch_positives.contains(n.id.as_str()), "query {}: negative {} is a (batch) positive", q.id, n.id);
            assert!(seen.insert(n.id.clone()), "query {}: duplicate negative {}", q.id, n.id);
            assert_ne!(normalize(&texts[&n.id]), positive_text, "query {}: negative {} has the positive's text", q.id, n.id);
            assert_eq!(normalize(&n.text), normalize(&texts[&n.id]), "returned text is the document's");
        }
        assert!(r.negatives.windows(2).all(|w| w[0].rank < w[1].rank && w[0].score >= w[1].score));
        assert!(r.positive_score.is_some());
        assert!(r.dropped.unwrap().positive <= 1);
    }
    let t = resp.timings.unwrap();
    assert!(t.total_seconds >= t.encode_seconds + t.search_seconds);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cranfield_end_to_end_with_restart() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let server = Server::start(&data).await;
    let mut client = server.client().await;

    let info = client.create_collection("cranfield", proto::Quantization::F32).await.unwrap();
    assert_eq!((info.dims, info.doc_count, info.generation), (384, 0, 1));
    assert_eq!(info.encoder_name, "all-MiniLM-L6-v2");
    let texts = ingest_cranfield(&mut client).await;
    assert_eq!(client.get_collection("cranfield").await.unwrap().doc_count, 1398);

    let queries = cranfield_queries();
    assert_eq!(queries.len(), 225);
    let opts = options(5, 7);
    let requests = batches(&queries, 32, &opts);
    let mut unary = Vec::new();
    for req in &requests {
        let resp = client.mine(req.clone()).await.unwrap();
        check_contract(req, &resp, &texts, 5);
        unary.push(resp);
    }
    let positives_dropped: u32 = unary.iter().flat_map(|r| &r.results).map(|r| r.dropped.unwrap().positive).sum();
    assert!(positives_dropped > 150, "most positives rank among the candidates and are dropped: {positives_dropped}");

    // Same seed, same answer, also for random sampling; another seed moves it.
    let uniform = proto::MineOptions { sampling: proto::Sampling::Uniform as i32, range_max: Some(50), ..options(5, 11) };
    let req = batches(&queries[..32], 32, &uniform).remove(0);
    let a = client.mine(req.clone()).await.unwrap();
    let b = client.mine(req.clone()).await.unwrap();
    check_contract(&req, &a, &texts, 5);
    assert_eq!(ids(&a), ids(&b));
    let other = batches(&queries[..32], 32, &proto::MineOptions { seed: Some(12), ..uniform.clone() }).remove(0);
    assert_ne!(ids(&a), ids(&client.mine(other).await.unwrap()));

    // MineStream: in order, with the same answers as the unary calls.
    let mut stream = client.mine_stream(futures::stream::iter(requests.clone())).await.unwrap();
    let mut streamed = Vec::new();
    while let Some(resp) = stream.next().await {
        streamed.push(resp.unwrap());
    }
    assert_eq!(streamed.iter().map(|r| r.batch_id).collect::<Vec<_>>(), (0..requests.len() as u64).collect::<Vec<_>>());
    for (s, u) in streamed.iter().zip(&unary) {
        assert_eq!(ids(s), ids(u));
    }

    // The CLI gives the same negatives as the client crate (same batches, same seed).
    let stdout = cli_beir(&server, &["mine", "--collection", "cranfield", "--num-negatives", "5", "--seed", "7"]);
    let lines: Vec<serde_json::Value> = stdout.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(lines.len(), 225);
    let expected: Vec<Vec<String>> = unary.iter().flat_map(ids).collect();
    for (line, want) in lines.iter().zip(&expected) {
        let got: Vec<String> = line["negatives"].as_array().unwrap().iter().map(|n| n["id"].as_str().unwrap().to_string()).collect();
        assert_eq!(&got, want);
        assert!(line["dropped"]["positive"].is_u64());
        for n in line["negatives"].as_array().unwrap() {
            let id = n["id"].as_str().unwrap();
            assert_eq!(normalize(n["text"].as_str().unwrap()), normalize(&texts[id]));
        }
    }

    // The CLI's triplet format and eval report.
    let stdout = cli_beir(&server, &["mine", "--collection", "cranfield", "--num-negatives", "2", "--format", "triplet"]);
    let first: serde_json::Value = serde_json::from_str(stdout.lines().next().unwrap()).unwrap();
    assert_eq!(first["anchor"], queries[0].text.as_str());
    assert_eq!(normalize(first["positive"].as_str().unwrap()), normalize(&texts[&queries[0].positive]));
    let report: serde_json::Value =
        serde_json::from_str(&cli_beir(&server, &["eval", "--collection", "cranfield", "--range-max", "30"])).unwrap();
    assert_eq!(report["queries"], 225);
    let leak = report["leak_rate"].as_f64().unwrap();
    assert!((0.05..0.6).contains(&leak), "plain top-5-of-30 leaks unlabeled positives: {leak}");
    assert_eq!(report["yield"], 1.0);

    // Restart on the same data dir: everything is back and answers the same.
    server.stop(Duration::from_secs(30));
    let server = Server::start(&data).await;
    let mut client = server.client().await;
    let info = client.get_collection("cranfield").await.unwrap();
    assert_eq!(info.doc_count, 1398);
    for (req, before) in requests.iter().zip(&unary) {
        let after = client.mine(req.clone()).await.unwrap();
        assert_eq!(ids(&after), ids(before));
    }
    assert!(server.log_text().contains("index loaded from its saved file"));
    server.stop(Duration::from_secs(30));
}

async fn small_collection(client: &mut Client, name: &str) {
    client.create_collection(name, proto::Quantization::F32).await.unwrap();
    let docs: Vec<proto::Document> = [
        "the wing stalls at high angles of attack",
        "boundary layer transition on a flat plate",
        "heat transfer in hypersonic flow",
        "shock waves in supersonic nozzles",
        "buckling of thin cylindrical shells",
        "flutter of aircraft wings",
        "laminar flow over a cone",
        "turbulent skin friction measurements",
    ]
    .iter()
    .enumerate()
    .map(|(i, t)| proto::Document { id: format!("d{i}"), text: t.to_string(), title: None, metadata: Default::default(), vector: Vec::new() })
    .collect();
    let resp = client.upsert(name, futures::stream::iter([docs])).await.unwrap();
    assert_eq!(resp.inserted, 8);
}

fn mine_req(collection: &str, queries: Vec<proto::Query>, opts: proto::MineOptions) -> proto::MineRequest {
    proto::MineRequest { collection: collection.into(), batch_id: 0, queries, options: Some(opts), min_generation: None }
}

fn text_query(text: &str) -> proto::Query {
    proto::Query { text: text.into(), positive_ids: vec!["d0".into()], ..Default::default() }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_gets_a_clear_status_and_the_server_keeps_serving() {
    let tmp = tempfile::tempdir().unwrap();
    let server = Server::start(&tmp.path().join("data")).await;
    let mut client = server.client().await;
    small_collection(&mut client, "small").await;
    let good = || mine_req("small", vec![text_query("wing stall")], options(2, 1));

    let mut cases: Vec<(&str, proto::MineRequest, Code, &str)> = Vec::new();
    cases.push(("empty batch", mine_req("small", vec![], options(2, 1)), Code::InvalidArgument, "queries"));
    cases.push(("empty query text", mine_req("small", vec![text_query("  ")], options(2, 1)), Code::InvalidArgument, "queries[0].text"));
    cases.push(("unknown collection", mine_req("nope", vec![text_query("x")], options(2, 1)), Code::NotFound, "nope"));
    let mut wrong_dims = text_query("");
    wrong_dims.vector = vec![0.1; 17];
    cases.push(("wrong dims", mine_req("small", vec![wrong_dims], options(2, 1)), Code::InvalidArgument, "queries[0].vector"));
    let mut nan = text_query("");
    nan.vector = vec![0.1; 384];
    nan.vector[3] = f32::NAN;
    cases.push(("NaN", mine_req("small", vec![nan], options(2, 1)), Code::InvalidArgument, "queries[0].vector[3]"));
    cases.push(("num_negatives 0", mine_req("small", vec![text_query("x")], options(0, 1)), Code::InvalidArgument, "options.num_negatives"));
    cases.push(("num_negatives above limit", mine_req("small", vec![text_query("x")], options(257, 1)), Code::InvalidArgument, "options.num_negatives"));
    let window = proto::MineOptions { range_min: 10, range_max: Some(10), ..options(2, 1) };
    cases.push(("range_min >= range_max", mine_req("small", vec![text_query("x")], window), Code::InvalidArgument, "options.range_min"));
    cases.push(("text too long", mine_req("small", vec![text_query(&"a".repeat(20_001))], options(2, 1)), Code::InvalidArgument, "queries[0].text"));
    let many = (0..1025).map(|_| text_query("x")).collect();
    cases.push(("batch too large", mine_req("small", many, options(2, 1)), Code::InvalidArgument, "queries"));
    let margin = proto::MineOptions { relative_margin: Some(1.5), ..options(2, 1) };
    cases.push(("relative margin", mine_req("small", vec![text_query("x")], margin), Code::InvalidArgument, "options.relative_margin"));
    let sim = proto::MineOptions { max_positive_similarity: Some(1.5), ..options(2, 1) };
    cases.push(("positive similarity", mine_req("small", vec![text_query("x")], sim), Code::InvalidArgument, "options.max_positive_similarity"));
    let preset = proto::MineOptions { preset: 9, ..options(2, 1) };
    cases.push(("unknown preset", mine_req("small", vec![text_query("x")], preset), Code::InvalidArgument, "options.preset"));
    let ce_alone = proto::MineOptions { ce_max_score: Some(0.1), ..options(2, 1) };
    cases.push(("ce option without rerank", mine_req("small", vec![text_query("x")], ce_alone), Code::InvalidArgument, "options.ce_max_score"));
    let rerank = proto::MineOptions { rerank: Some(true), ..options(2, 1) };
    let too_many = proto::MineOptions { rerank_candidates: Some(257), ..rerank.clone() };
    cases.push(("rerank candidates", mine_req("small", vec![text_query("x")], too_many), Code::InvalidArgument, "options.rerank_candidates"));
    let mut vector_only = text_query("");
    vector_only.vector = vec![0.1; 384];
    cases.push(("rerank without query text", mine_req("small", vec![vector_only], rerank.clone()), Code::InvalidArgument, "queries[0].text"));
    cases.push(("rerank without a cross-encoder", mine_req("small", vec![text_query("x")], rerank), Code::FailedPrecondition, "reranker.model_dir"));
    let mut zero = text_query("");
    zero.vector = vec![0.0; 384];
    cases.push(("zero vector in a cosine collection", mine_req("small", vec![text_query("x"), zero], options(2, 1)), Code::InvalidArgument, "queries[1].vector"));
    let simans = proto::MineOptions { sampling: proto::Sampling::Ambiguous as i32, simans_a: Some(-1.0), ..options(2, 1) };
    cases.push(("simans a below 0", mine_req("small", vec![text_query("x")], simans), Code::InvalidArgument, "options.simans_a"));

    for (what, req, code, field) in cases {
        let err = client.mine(req).await.expect_err(what);
        assert_eq!(err.code(), Some(code), "{what}: {err}");
        assert!(err.to_string().contains(field), "{what}: message {err:?} should name {field}");
        let ok = client.mine(good()).await.unwrap_or_else(|e| panic!("server stopped serving after {what}: {e}"));
        assert_eq!(ok.results[0].negatives.len(), 2);
    }

    // Upsert and collection errors.
    let empty_id = vec![proto::Document { id: String::new(), text: "x".into(), title: None, metadata: Default::default(), vector: Vec::new() }];
    let err = client.upsert("small", futures::stream::iter([empty_id])).await.unwrap_err();
    assert_eq!(err.code(), Some(Code::InvalidArgument));
    assert!(err.to_string().contains("documents[0].id"), "{err}");
    // A stream commits message by message: the error names the message that failed and what
    // the messages before it committed, and those documents are there.
    let doc = |id: &str, metadata: std::collections::HashMap<String, String>| proto::Document { id: id.into(), text: format!("wing {id}"), title: None, metadata, vector: Vec::new() };
    let before = client.get_collection("small").await.unwrap().doc_count;
    let crowded: std::collections::HashMap<String, String> = (0..65).map(|i| (format!("k{i}"), "v".into())).collect();
    let messages = vec![vec![doc("m0a", Default::default()), doc("m0b", Default::default())], vec![doc("m1", Default::default())], vec![doc("m2", crowded)]];
    let err = client.upsert("small", futures::stream::iter(messages)).await.unwrap_err();
    assert_eq!(err.code(), Some(Code::InvalidArgument), "{err}");
    let text = err.to_string();
    assert!(text.contains("upsert message 2") && text.contains("3 documents") && text.contains("documents[0].metadata"), "{text}");
    assert_eq!(client.get_collection("small").await.unwrap().doc_count, before + 3, "messages 0 and 1 are committed");
    let heavy: std::collections::HashMap<String, String> = [("k".to_string(), "v".repeat(20_000))].into();
    let err = client.upsert("small", futures::stream::iter([vec![doc("heavy", heavy)]])).await.unwrap_err();
    assert!(err.to_string().contains("documents[0].metadata") && err.to_string().contains("limits.max_metadata_bytes"), "{err}");
    client.delete("small", vec!["m0a".into(), "m0b".into(), "m1".into()]).await.unwrap();
    let err = client.create_collection("small", proto::Quantization::F32).await.unwrap_err();
    assert_eq!(err.code(), Some(Code::AlreadyExists));
    let err = client.create_collection("bad/name", proto::Quantization::F32).await.unwrap_err();
    assert_eq!(err.code(), Some(Code::InvalidArgument));
    assert!(err.to_string().contains("name"));
    let err = client.get_collection("missing").await.unwrap_err();
    assert_eq!(err.code(), Some(Code::NotFound));

    // A bad batch in a stream ends it with that batch's status, after the good ones.
    let reqs = vec![good(), mine_req("small", vec![], options(2, 1))];
    let reqs: Vec<_> = reqs.into_iter().enumerate().map(|(i, mut r)| { r.batch_id = i as u64; r }).collect();
    let mut stream = client.mine_stream(futures::stream::iter(reqs)).await.unwrap();
    assert_eq!(stream.next().await.unwrap().unwrap().batch_id, 0);
    let status = stream.next().await.unwrap().unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    assert!(status.message().contains("batch 1") && status.message().contains("queries"), "{}", status.message());

    assert!(client.ready().await.unwrap());
    let ok = client.mine(good()).await.unwrap();
    assert_eq!(ok.results[0].negatives.len(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn updates_deletes_vectors_and_text_positives() {
    let tmp = tempfile::tempdir().unwrap();
    let server = Server::start(&tmp.path().join("data")).await;
    let mut client = server.client().await;
    small_collection(&mut client, "small").await;
    let all = proto::MineOptions { range_max: Some(8), ..options(8, 1) };

    // Deleted documents are never returned; unknown ids are counted.
    let resp = client.delete("small", vec!["d5".into(), "zz".into()]).await.unwrap();
    assert_eq!((resp.deleted, resp.not_found), (1, 1));
    let got = client.mine(mine_req("small", vec![text_query("flutter of aircraft wings")], all.clone())).await.unwrap();
    let got: Vec<&str> = got.results[0].negatives.iter().map(|n| n.id.as_str()).collect();
    assert_eq!(got.len(), 6, "8 docs - 1 deleted - the positive: {got:?}");
    assert!(!got.contains(&"d5") && !got.contains(&"d0"));
    assert_eq!(client.get_collection("small").await.unwrap().doc_count, 7);

    // An update replaces the text; positives by text exclude same-text documents.
    let update = vec![proto::Document { id: "d1".into(), text: "Heat Transfer in  hypersonic flow".into(), title: None, metadata: Default::default(), vector: Vec::new() }];
    let resp = client.upsert("small", futures::stream::iter([update])).await.unwrap();
    assert_eq!((resp.inserted, resp.updated, resp.doc_count), (0, 1, 7));
    let docs = client.get_documents("small", vec!["d1".into(), "d5".into()]).await.unwrap();
    assert_eq!(docs.documents[0].text, "Heat Transfer in  hypersonic flow");
    assert_eq!(docs.missing, vec!["d5".to_string()]);
    let docs = client.get_documents("small", vec!["d0".into(), "d0".into()]).await.unwrap();
    assert_eq!((docs.documents.len(), docs.missing.len()), (2, 0), "a repeated id is found twice");
    let q = proto::Query { text: "hypersonic heating".into(), positive_texts: vec!["heat transfer in hypersonic flow".into()], ..Default::default() };
    let resp = client.mine(mine_req("small", vec![q], all.clone())).await.unwrap();
    let r = &resp.results[0];
    let got: Vec<&str> = r.negatives.iter().map(|n| n.id.as_str()).collect();
    assert!(!got.contains(&"d1") && !got.contains(&"d2"), "both texts equal the positive after normalization: {got:?}");
    assert_eq!(r.dropped.unwrap().duplicate_text, 2);
    assert!(r.positive_score.unwrap() > 0.5);

    // A vector query needs no text; batch positives are excluded by default, not when off.
    let vector = proto::Query { vector: vec![0.05; 384], positive_ids: vec!["d3".into()], ..Default::default() };
    let other = proto::Query { text: "wing".into(), positive_ids: vec!["d4".into()], ..Default::default() };
    let resp = client.mine(mine_req("small", vec![vector.clone(), other.clone()], all.clone())).await.unwrap();
    for r in &resp.results {
        assert!(r.negatives.iter().all(|n| n.id != "d3" && n.id != "d4"));
    }
    let off = proto::MineOptions { exclude_batch_positives: Some(false), ..all.clone() };
    let resp = client.mine(mine_req("small", vec![vector, other], off)).await.unwrap();
    assert!(resp.results[0].negatives.iter().any(|n| n.id == "d4"));
    assert_eq!(resp.results[0].dropped.unwrap().batch_positive, 0);

    // Drop removes it.
    assert!(client.drop_collection("small").await.unwrap());
    assert_eq!(client.get_collection("small").await.unwrap_err().code(), Some(Code::NotFound));
    assert!(client.list_collections().await.unwrap().is_empty());
}

/// A crash (SIGKILL: no index save) loses nothing acknowledged: the index is rebuilt from the
/// store at start and answers as before.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crash_restart_rebuilds_the_index_from_the_store() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let server = Server::start(&data).await;
    let mut client = server.client().await;
    small_collection(&mut client, "small").await;
    client.delete("small", vec!["d2".into()]).await.unwrap();
    let req = mine_req("small", vec![text_query("supersonic shock waves")], proto::MineOptions { range_max: Some(8), ..options(6, 3) });
    let before = client.mine(req.clone()).await.unwrap();
    drop(client);
    drop(server); // SIGKILL
    let server = Server::start(&data).await;
    let mut client = server.client().await;
    assert_eq!(client.get_collection("small").await.unwrap().doc_count, 7);
    let after = client.mine(req).await.unwrap();
    assert_eq!(ids(&after), ids(&before));
    assert!(ids(&after)[0].iter().all(|id| id != "d2"));
    assert!(server.log_text().contains("index rebuilt from the store"), "{}", server.log_text());
}

/// Reranking with a cross-encoder (the real MiniLM body under a seeded head: its scores carry
/// no relevance, which is why every check compares with the same model run in-process) and
/// the positive-neighbourhood filter, through the real server.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reranking_and_the_positive_neighbourhood_filter() {
    use hardneg_server::encode::testing::seeded_cross_encoder;
    use hardneg_server::encode::{BatchConfig, Encoder, Reranker};
    let tmp = tempfile::tempdir().unwrap();
    let ce_dir = tmp.path().join("cross-encoder");
    std::fs::create_dir_all(&ce_dir).unwrap();
    seeded_cross_encoder(&hardneg_tests::model_dir(), &ce_dir, 1, 42);
    // Pairs truncated to 128 tokens keep the test quick on two cores.
    let env = [("HARDNEG__RERANKER__MODEL_DIR", ce_dir.to_str().unwrap()), ("HARDNEG__RERANKER__MAX_TOKENS", "128")];
    let server = Server::start_with(&tmp.path().join("data"), &env).await;
    assert!(server.log_text().contains("cross-encoder loaded"), "{}", server.log_text());
    let mut client = server.client().await;

    // 150 Cranfield documents; queries whose judged positive is among them.
    let docs: Vec<CorpusDoc> = beir::read_jsonl(&dataset("cranfield").join("corpus.jsonl")).unwrap();
    let docs: Vec<proto::Document> = docs
        .into_iter()
        .filter(|d| !d.text.trim().is_empty())
        .take(150)
        .map(|d| proto::Document { id: d.id, text: d.text, title: Some(d.title).filter(|t| !t.is_empty()), metadata: Default::default(), vector: Vec::new() })
        .collect();
    let texts: HashMap<String, String> = docs
        .iter()
        .map(|d| (d.id.clone(), match d.title.as_deref().map(str::trim) { Some(t) if !t.is_empty() => format!("{t} {}", d.text), _ => d.text.clone() }))
        .collect();
    client.create_collection("cran150", proto::Quantization::F32).await.unwrap();
    client.upsert("cran150", futures::stream::iter([docs])).await.unwrap();
    let queries: Vec<Judged> = cranfield_queries().into_iter().filter(|q| texts.contains_key(&q.positive)).take(6).collect();
    assert!(queries.len() >= 4);
    let request = |opts: proto::MineOptions| proto::MineRequest {
        collection: "cran150".into(),
        batch_id: 0,
        queries: queries
            .iter()
            .map(|q| proto::Query { id: q.id.clone(), text: q.text.clone(), positive_ids: vec![q.positive.clone()], ..Default::default() })
            .collect(),
        options: Some(opts),
        min_generation: None,
    };
    let cfg = BatchConfig { token_budget: 8192, max_batch_texts: 64, queue_capacity: 64 };
    let reference = Reranker::load(&ce_dir, 128, cfg).unwrap();
    let close = |a: f32, b: f32| (a - b).abs() < 1e-4;

    // An absolute threshold: every negative scores below it, ordered by the cross-encoder, and
    // each score is the model's score of (query text, document text).
    let rerank = proto::MineOptions { rerank: Some(true), rerank_candidates: Some(8), ..options(4, 3) };
    let resp = client.mine(request(proto::MineOptions { ce_max_score: Some(0.6), ..rerank.clone() })).await.unwrap();
    assert!(resp.timings.as_ref().unwrap().rerank_seconds > 0.0);
    let mut dropped = 0;
    for (q, r) in queries.iter().zip(&resp.results) {
        let ces: Vec<f32> = r.negatives.iter().map(|n| n.ce_score.expect("reranked negatives carry ce_score")).collect();
        assert!(ces.iter().all(|&c| c < 0.6), "{ces:?}");
        assert!(ces.windows(2).all(|w| w[0] >= w[1]), "ordered by the cross-encoder: {ces:?}");
        assert_eq!(r.negatives.len(), 4, "scored deeper until enough passed");
        let pairs: Vec<(String, String)> = r.negatives.iter().map(|n| (q.text.clone(), n.text.clone())).collect();
        let want = reference.score(pairs).await.unwrap();
        for (got, want) in ces.iter().zip(&want) {
            assert!(close(*got, *want), "negative {got} vs {want}");
        }
        assert_eq!(r.positive_ce_score, None, "positives are scored only for ce_relative_margin");
        let d = r.dropped.as_ref().unwrap();
        dropped += d.ce_score;
        assert_eq!(d.ce_margin, 0);
    }
    assert!(dropped > 0, "the threshold dropped candidates");

    // Relative to the positive's cross-encoder score.
    let resp = client.mine(request(proto::MineOptions { ce_relative_margin: Some(0.1), ..rerank.clone() })).await.unwrap();
    for (q, r) in queries.iter().zip(&resp.results) {
        let pos = r.positive_ce_score.expect("the positive is scored once per query");
        let want = reference.score(vec![(q.text.clone(), texts[&q.positive].clone())]).await.unwrap();
        assert!(close(pos, want[0]), "positive {pos} vs {}", want[0]);
        let limit = pos * 0.9;
        assert!(r.negatives.iter().all(|n| n.ce_score.unwrap() < limit + 1e-6), "below {limit}");
    }
    assert!(resp.results.iter().map(|r| r.dropped.as_ref().unwrap().ce_margin).sum::<u32>() > 0);

    // MineStream answers reranked batches like Mine does.
    let reqs: Vec<proto::MineRequest> = (0..2).map(|b| proto::MineRequest { batch_id: b, ..request(rerank.clone()) }).collect();
    let unary = client.mine(request(rerank.clone())).await.unwrap();
    let streamed: Vec<proto::MineResponse> =
        client.mine_stream(futures::stream::iter(reqs)).await.unwrap().map(|r| r.unwrap()).collect().await;
    assert_eq!(streamed.len(), 2);
    for s in &streamed {
        assert_eq!(ids(s), ids(&unary));
    }

    // The positive-neighbourhood filter: no negative is closer than the threshold to the
    // positive (checked with the same encoder in-process), and some were dropped.
    let encoder = Encoder::load(&hardneg_tests::model_dir(), 0, cfg).unwrap();
    let near = proto::MineOptions { max_positive_similarity: Some(0.5), ..options(4, 3) };
    let resp = client.mine(request(near)).await.unwrap();
    let mut dropped = 0;
    for (q, r) in queries.iter().zip(&resp.results) {
        assert_eq!(r.negatives.len(), 4);
        let mut batch = vec![texts[&q.positive].clone()];
        batch.extend(r.negatives.iter().map(|n| n.text.clone()));
        let v = encoder.encode(batch).await.unwrap();
        for (n, nv) in r.negatives.iter().zip(&v[1..]) {
            let cos: f32 = v[0].iter().zip(nv).map(|(a, b)| a * b).sum();
            assert!(cos <= 0.5 + 1e-3, "{} is {cos} from the positive", n.id);
        }
        dropped += r.dropped.as_ref().unwrap().positive_similarity;
    }
    assert!(dropped > 0);

    // The denoised preset is its documented settings, and explicit options override it.
    let preset = client.mine(request(proto::MineOptions { preset: proto::Preset::Denoised as i32, ..options(4, 3) })).await.unwrap();
    let explicit = proto::MineOptions {
        relative_margin: Some(0.05),
        max_positive_similarity: Some(0.65),
        adaptive_depth: Some(true),
        ..options(4, 3)
    };
    assert_eq!(ids(&preset), ids(&client.mine(request(explicit)).await.unwrap()));
    let overridden = proto::MineOptions { preset: proto::Preset::Denoised as i32, relative_margin: Some(0.0), max_positive_similarity: Some(1.0), ..options(4, 3) };
    let plain = proto::MineOptions { relative_margin: Some(0.0), ..options(4, 3) };
    assert_eq!(ids(&client.mine(request(overridden)).await.unwrap()), ids(&client.mine(request(plain)).await.unwrap()));

    // The CLI passes the same flags (eval over the same queries).
    let query_file = tmp.path().join("queries.jsonl");
    let lines: Vec<String> = queries.iter().map(|q| serde_json::json!({"_id": q.id, "text": q.text}).to_string()).collect();
    std::fs::write(&query_file, lines.join("\n")).unwrap();
    let out = Command::new(bin("hardneg"))
        .args(["--addr", &server.addr, "eval", "--collection", "cran150", "--num-negatives", "3", "--rerank", "--rerank-candidates", "6", "--ce-max-score", "0.6", "--preset", "denoised"])
        .arg("--queries")
        .arg(&query_file)
        .arg("--qrels")
        .arg(dataset("cranfield").join("qrels/test.tsv"))
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(v["dropped"]["ce_score"].as_u64().unwrap() > 0, "{v}");
    assert!(v["dropped"]["margin"].as_u64().unwrap() > 0, "{v}");
    server.stop(Duration::from_secs(30));
}


/// The value of the sample `name{labels}` (labels as rendered, e.g. `rpc="Mine",code="Ok"`).
fn sample(text: &str, series: &str) -> Option<f64> {
    text.lines().find(|l| l.starts_with(series) && l[series.len()..].starts_with(' ')).and_then(|l| l.rsplit(' ').next()?.parse().ok())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_count_requests_stages_and_drops() {
    let tmp = tempfile::tempdir().unwrap();
    let metrics_addr = format!("127.0.0.1:{}", hardneg_tests::free_port());
    let server = Server::start_with(&tmp.path().join("data"), &[("HARDNEG__SERVER__METRICS_LISTEN", &metrics_addr)]).await;
    let mut client = server.client().await;
    small_collection(&mut client, "small").await;
    let good = || mine_req("small", vec![text_query("wing stall")], options(2, 1));
    for _ in 0..3 {
        client.mine(good()).await.unwrap();
    }
    client.mine(mine_req("small", vec![], options(2, 1))).await.unwrap_err();
    let reqs: Vec<proto::MineRequest> = (0..2).map(|b| proto::MineRequest { batch_id: b, ..good() }).collect();
    let answers: Vec<_> = client.mine_stream(futures::stream::iter(reqs)).await.unwrap().collect().await;
    assert_eq!(answers.len(), 2);
    tokio::time::sleep(Duration::from_millis(2500)).await; // collection gauges refresh every 2 s

    let text = hardneg_tests::scrape_metrics(&metrics_addr).await;
    let at = |series: &str| sample(&text, series).unwrap_or_else(|| panic!("no sample {series} in\n{text}"));
    assert_eq!(at(r#"hardneg_requests_total{rpc="Mine",code="Ok"}"#), 3.0);
    assert_eq!(at(r#"hardneg_requests_total{rpc="Mine",code="InvalidArgument"}"#), 1.0);
    assert_eq!(at(r#"hardneg_requests_total{rpc="Upsert",code="Ok"}"#), 1.0);
    assert_eq!(at(r#"hardneg_stream_batches_total{rpc="MineStream",code="Ok"}"#), 2.0);
    assert_eq!(at(r#"hardneg_rejected_requests_total{reason="invalid_argument"}"#), 1.0);
    assert_eq!(at("hardneg_queries_total"), 5.0);
    assert_eq!(at("hardneg_negatives_total"), 10.0);
    assert_eq!(at(r#"hardneg_dropped_candidates_total{reason="positive"}"#), 5.0, "d0, the positive, is dropped each time");
    assert_eq!(at(r#"hardneg_request_duration_seconds_count{rpc="Mine"}"#), 4.0);
    for stage in ["tokenize", "queue_wait", "encode", "search", "filter"] {
        assert!(at(&format!(r#"hardneg_stage_duration_seconds_count{{stage="{stage}"}}"#)) >= 5.0, "{stage}");
        assert!(text.contains(&format!(r#"hardneg_stage_duration_seconds_bucket{{stage="{stage}",le="0.01"}}"#)), "{stage} has explicit buckets");
    }
    assert!(at(r#"hardneg_model_batch_texts_count{model="encoder"}"#) >= 1.0);
    assert!(text.contains(r#"hardneg_model_batch_tokens_bucket{model="encoder",le="#));
    assert_eq!(at(r#"hardneg_collection_documents{collection="small"}"#), 8.0);
    assert_eq!(at(r#"hardneg_collection_indexed_vectors{collection="small"}"#), 8.0);
    assert_eq!(at(r#"hardneg_collection_generation{collection="small"}"#), 1.0);
    assert_eq!(at(r#"hardneg_collection_pending_documents{collection="small"}"#), 0.0);
    assert_eq!(at(r#"hardneg_in_flight_requests{rpc="Mine"}"#), 0.0);
    assert_eq!(at(r#"hardneg_open_streams{rpc="MineStream"}"#), 0.0);
    server.stop(Duration::from_secs(30));
}

/// Beyond limits.max_in_flight unary calls fail at once with RESOURCE_EXHAUSTED while stream
/// batches wait; beyond limits.max_streams a new stream is refused; the server keeps serving.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn backpressure_refuses_unary_overflow_and_queues_stream_batches() {
    let tmp = tempfile::tempdir().unwrap();
    let env = [("HARDNEG__LIMITS__MAX_IN_FLIGHT", "1"), ("HARDNEG__LIMITS__MAX_STREAMS", "1")];
    let server = Server::start_with(&tmp.path().join("data"), &env).await;
    let mut client = server.client().await;
    small_collection(&mut client, "small").await;
    // Many texts make each Mine take a while, so concurrent calls overlap.
    let heavy = || mine_req("small", (0..64).map(|i| text_query(&format!("wing stall number {i} at high angles"))).collect(), options(2, 1));
    let calls: Vec<_> = (0..6)
        .map(|_| {
            let mut c = client.clone();
            let req = heavy();
            tokio::spawn(async move { c.mine(req).await })
        })
        .collect();
    let (mut ok, mut exhausted) = (0, 0);
    for call in calls {
        match call.await.unwrap() {
            Ok(_) => ok += 1,
            Err(e) => {
                assert_eq!(e.code(), Some(Code::ResourceExhausted), "{e}");
                assert!(e.to_string().contains("limits.max_in_flight"), "{e}");
                exhausted += 1;
            }
        }
    }
    assert!(ok >= 1 && exhausted >= 1, "ok {ok}, refused {exhausted}");

    // One stream's batches all get answered, one slot at a time; a second stream is refused.
    let (tx, rx) = tokio::sync::mpsc::channel(8);
    let mut stream = client.mine_stream(tokio_stream::wrappers::ReceiverStream::new(rx)).await.unwrap();
    for b in 0..4u64 {
        tx.send(proto::MineRequest { batch_id: b, ..heavy() }).await.unwrap();
    }
    for b in 0..4u64 {
        assert_eq!(stream.next().await.unwrap().unwrap().batch_id, b);
    }
    let err = client.mine_stream(futures::stream::iter(vec![heavy()])).await;
    let refused = match err {
        Err(e) => e.code() == Some(Code::ResourceExhausted),
        Ok(mut s) => matches!(s.next().await, Some(Err(st)) if st.code() == Code::ResourceExhausted),
    };
    assert!(refused, "a second stream beyond limits.max_streams is refused");
    drop(tx);
    assert!(stream.next().await.is_none());
    drop(stream);
    tokio::time::sleep(Duration::from_millis(200)).await;
    // Slots come back: a new stream and a unary call work.
    let answers: Vec<_> = client.mine_stream(futures::stream::iter(vec![heavy()])).await.unwrap().collect().await;
    assert!(answers[0].is_ok());
    client.mine(heavy()).await.unwrap();
    server.stop(Duration::from_secs(30));
}

/// With a token configured, NegativeMiner calls need it; health stays open.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bearer_token_auth() {
    let tmp = tempfile::tempdir().unwrap();
    let token_file = tmp.path().join("token");
    std::fs::write(&token_file, "s3cret-token\n").unwrap();
    let server = Server::start_with(&tmp.path().join("data"), &[("HARDNEG__SERVER__AUTH_TOKEN_FILE", token_file.to_str().unwrap())]).await;
    assert!(!server.log_text().contains("s3cret"), "the token is never logged");
    let mut plain = server.client().await;
    assert!(plain.ready().await.unwrap(), "health needs no token");
    let err = plain.list_collections().await.unwrap_err();
    assert_eq!(err.code(), Some(Code::Unauthenticated), "{err}");
    let mut wrong = Client::connect_with_token(&server.addr, Some("guess")).await.unwrap();
    assert_eq!(wrong.list_collections().await.unwrap_err().code(), Some(Code::Unauthenticated));
    let mut right = Client::connect_with_token(&server.addr, Some("s3cret-token")).await.unwrap();
    small_collection(&mut right, "small").await;
    right.mine(mine_req("small", vec![text_query("wing stall")], options(2, 1))).await.unwrap();
    // The CLI takes it from --token or HARDNEG_TOKEN.
    let status = |token: Option<&str>| {
        let mut cmd = Command::new(bin("hardneg"));
        cmd.args(["--addr", &server.addr, "status"]).env_remove("HARDNEG_TOKEN");
        if let Some(t) = token {
            cmd.env("HARDNEG_TOKEN", t);
        }
        cmd.output().unwrap()
    };
    assert!(status(Some("s3cret-token")).status.success());
    let refused = status(None);
    assert!(!refused.status.success());
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(stderr.contains("authorization: Bearer"), "{stderr}");
    server.stop(Duration::from_secs(30));
}

/// A Mine that runs past limits.mine_timeout_seconds ends with DEADLINE_EXCEEDED, and the
/// server goes on serving.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mine_timeout() {
    let tmp = tempfile::tempdir().unwrap();
    let server = Server::start_with(&tmp.path().join("data"), &[("HARDNEG__LIMITS__MINE_TIMEOUT_SECONDS", "0.001")]).await;
    let mut client = server.client().await;
    small_collection(&mut client, "small").await;
    let many = mine_req("small", (0..200).map(|i| text_query(&format!("flutter of wing panel {i}"))).collect(), options(2, 1));
    let err = client.mine(many).await.unwrap_err();
    assert_eq!(err.code(), Some(Code::DeadlineExceeded), "{err}");
    assert!(err.to_string().contains("limits.mine_timeout_seconds"), "{err}");
    assert_eq!(client.get_collection("small").await.unwrap().doc_count, 8);
    server.stop(Duration::from_secs(30));
}
