//! Index refresh through the real server: re-encode with a later checkpoint and trainer
//! vectors while clients keep mining, crash in the middle of a refresh, and refusals that
//! must leave everything as it was.
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use futures::StreamExt;
use hardneg_client::beir::{self, BeirQuery, CorpusDoc};
use hardneg_client::{Client, Code};
use hardneg_proto as proto;
use hardneg_server::encode::testing::perturbed_checkpoint;
use hardneg_tests::{Server, dataset, model_dir};

const DOCS: usize = 240;

/// The first DOCS non-empty Cranfield documents.
fn documents() -> Vec<proto::Document> {
    let docs: Vec<CorpusDoc> = beir::read_jsonl(&dataset("cranfield").join("corpus.jsonl")).unwrap();
    docs.into_iter()
        .filter(|d| !d.text.trim().is_empty())
        .take(DOCS)
        .map(|d| proto::Document { id: d.id, text: d.text, title: Some(d.title).filter(|t| !t.trim().is_empty()), metadata: Default::default(), vector: Vec::new() })
        .collect()
}

fn query_texts() -> Vec<String> {
    let qs: Vec<BeirQuery> = beir::read_jsonl(&dataset("cranfield").join("queries.jsonl")).unwrap();
    qs.into_iter().take(16).map(|q| q.text).collect()
}

/// Deterministic "trainer" vectors: 384-d, clustered by document index, unit length.
fn trainer_vectors(ids: &[String]) -> Vec<(String, Vec<f32>)> {
    ids.iter()
        .enumerate()
        .map(|(i, id)| {
            let mut v: Vec<f32> = (0..384).map(|d| (((i % 12) * 31 + d * 7) as f32).sin() + 0.3 * ((i * 13 + d) as f32).cos()).collect();
            let n = v.iter().map(|x| x * x).sum::<f32>().sqrt();
            v.iter_mut().for_each(|x| *x /= n);
            (id.clone(), v)
        })
        .collect()
}

fn text_request(batch_id: u64, texts: &[String], positive: &str) -> proto::MineRequest {
    proto::MineRequest {
        collection: "c".into(),
        batch_id,
        queries: texts
            .iter()
            .map(|t| proto::Query { text: t.clone(), positive_ids: vec![positive.into()], ..Default::default() })
            .collect(),
        options: Some(proto::MineOptions { num_negatives: 4, seed: Some(7), ..Default::default() }),
        min_generation: None,
    }
}

fn vector_request(batch_id: u64, vectors: &[(String, Vec<f32>)]) -> proto::MineRequest {
    proto::MineRequest {
        collection: "c".into(),
        batch_id,
        queries: vectors
            .iter()
            .map(|(id, v)| proto::Query { vector: v.clone(), positive_ids: vec![id.clone()], ..Default::default() })
            .collect(),
        options: Some(proto::MineOptions { num_negatives: 4, seed: Some(7), ..Default::default() }),
        min_generation: None,
    }
}

fn ids(resp: &proto::MineResponse) -> Vec<Vec<String>> {
    resp.results.iter().map(|r| r.negatives.iter().map(|n| n.id.clone()).collect()).collect()
}

async fn load(client: &mut Client) -> Vec<String> {
    client.create_collection("c", proto::Quantization::F32).await.unwrap();
    let docs = documents();
    let ids = docs.iter().map(|d| d.id.clone()).collect();
    client.upsert("c", futures::stream::iter([docs])).await.unwrap();
    ids
}

/// Clients mining over MineStream until `stop` is set and they have seen generation `until`;
/// returns each stream's generations, in order.
fn miners(
    addr: &str,
    stop: Arc<AtomicBool>,
    until: u64,
    make: Arc<dyn Fn(u64) -> proto::MineRequest + Send + Sync>,
) -> Vec<tokio::task::JoinHandle<Vec<u64>>> {
    (0..3)
        .map(|_| {
            let (addr, stop, make) = (addr.to_string(), stop.clone(), make.clone());
            tokio::spawn(async move {
                let mut client = Client::connect(&addr).await.unwrap();
                let (tx, rx) = tokio::sync::mpsc::channel(4);
                let mut responses = client.mine_stream(tokio_stream::wrappers::ReceiverStream::new(rx)).await.unwrap();
                let mut generations = Vec::new();
                let mut sent = 0u64;
                for _ in 0..2 {
                    tx.send(make(sent)).await.unwrap();
                    sent += 1;
                }
                while let Some(resp) = responses.next().await {
                    let resp = resp.unwrap_or_else(|s| panic!("a request failed during the refresh: {s}"));
                    assert_eq!(resp.batch_id, generations.len() as u64, "in order");
                    generations.push(resp.generation);
                    if stop.load(Ordering::Acquire) && resp.generation >= until {
                        break;
                    }
                    tx.send(make(sent)).await.unwrap();
                    sent += 1;
                }
                generations
            })
        })
        .collect()
}

async fn refresh_to_done(client: &mut Client, dir: &str) -> Vec<proto::RefreshProgress> {
    let mut stream = client.refresh("c", dir).await.unwrap();
    let mut seen = Vec::new();
    while let Some(p) = stream.next().await {
        seen.push(p.unwrap());
    }
    seen
}

fn check_generations(all: Vec<Vec<u64>>, from: u64, to: u64) {
    for generations in all {
        assert!(!generations.is_empty());
        assert!(generations.windows(2).all(|w| w[0] <= w[1]), "generations go backwards: {generations:?}");
        assert!(generations.iter().all(|g| (from..=to).contains(g)), "{generations:?}");
    }
}

/// A models root holding a later checkpoint of the server's encoder.
fn models_root(tmp: &Path) -> std::path::PathBuf {
    let root = tmp.join("models");
    perturbed_checkpoint(&model_dir(), &root.join("step-2"), 2, 0.02);
    root
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn refresh_under_load_matches_a_fresh_server() {
    let tmp = tempfile::tempdir().unwrap();
    let root = models_root(tmp.path());
    let env = [("HARDNEG__ENCODER__MODELS_ROOT", root.to_str().unwrap())];
    let server = Server::start_with(&tmp.path().join("a"), &env).await;
    let mut client = server.client().await;
    let doc_ids = load(&mut client).await;
    let texts = query_texts();
    let positive = doc_ids[0].clone();
    let before = client.mine(text_request(0, &texts, &positive)).await.unwrap();
    assert_eq!(before.generation, 1);

    // Re-encode while three streams mine text queries.
    let stop = Arc::new(AtomicBool::new(false));
    let (t, p) = (texts.clone(), positive.clone());
    let tasks = miners(&server.addr, stop.clone(), 2, Arc::new(move |b| text_request(b, &t, &p)));
    tokio::time::sleep(Duration::from_millis(500)).await;
    let mut stream = client.refresh("c", "step-2").await.unwrap();
    let first = stream.next().await.unwrap().unwrap();
    assert_eq!(first.generation, 2);
    // Writes during the re-encode are carried into the new generation.
    let fresh_doc = "heat transfer to a flat plate in a hypersonic wind tunnel with a zirconium nose";
    let added = proto::Document { id: "added".into(), text: fresh_doc.into(), title: None, metadata: Default::default(), vector: Vec::new() };
    client.upsert("c", futures::stream::iter([vec![added]])).await.unwrap();
    client.delete("c", vec![doc_ids[1].clone()]).await.unwrap();
    let mut progress = vec![first];
    while let Some(p) = stream.next().await {
        progress.push(p.unwrap());
    }
    let last = progress.last().unwrap();
    assert_eq!((last.phase.as_str(), last.generation, last.total), ("done", 2, DOCS as u64));
    assert!(progress.iter().any(|p| p.phase == "encoding"), "progress is streamed");
    stop.store(true, Ordering::Release);
    let streams: Vec<Vec<u64>> = futures::future::join_all(tasks).await.into_iter().map(|r| r.unwrap()).collect();
    assert!(streams.iter().all(|g| g.contains(&1) && g.contains(&2)), "each stream saw both: {streams:?}");
    check_generations(streams, 1, 2);
    let info = client.get_collection("c").await.unwrap();
    assert_eq!((info.generation, info.encoder_kind.as_str(), info.encoder_name.as_str(), info.doc_count), (2, "checkpoint", "step-2", DOCS as u64));
    let probe = proto::MineRequest { queries: vec![proto::Query { text: format!("{fresh_doc} please"), ..Default::default() }], ..text_request(0, &texts, &positive) };
    let found = client.mine(probe).await.unwrap();
    assert_eq!(found.results[0].negatives[0].id, "added", "a document written during the refresh is searchable after it");
    // Put the collection back as it was for the comparisons below.
    client.delete("c", vec!["added".into()]).await.unwrap();
    let doc1 = documents().into_iter().find(|d| d.id == doc_ids[1]).unwrap();
    client.upsert("c", futures::stream::iter([vec![doc1]])).await.unwrap();
    let reencoded = client.mine(text_request(0, &texts, &positive)).await.unwrap();
    assert_eq!(reencoded.generation, 2);
    assert_ne!(ids(&reencoded), ids(&before), "a different encoder answers");

    // A fresh server whose own encoder is that checkpoint answers the same.
    let fresh = Server::start_with_model(&tmp.path().join("b"), &root.join("step-2"), &[]).await;
    let mut fresh_client = fresh.client().await;
    load(&mut fresh_client).await;
    assert_eq!(ids(&fresh_client.mine(text_request(0, &texts, &positive)).await.unwrap()), ids(&reencoded));

    // Trainer vectors while three streams mine with query vectors.
    let vectors = trainer_vectors(&doc_ids);
    let probes: Vec<(String, Vec<f32>)> = vectors.iter().step_by(20).cloned().collect();
    let stop = Arc::new(AtomicBool::new(false));
    let q = probes.clone();
    let tasks = miners(&server.addr, stop.clone(), 3, Arc::new(move |b| vector_request(b, &q)));
    let half = vectors.len() / 2;
    let up = client.upload_vectors("c", "trainer-step-3", futures::stream::iter([vectors[..half].to_vec()])).await.unwrap();
    assert_eq!((up.received, up.generation, up.missing), (half as u64, 3, (DOCS - half) as u64));
    let up = client.upload_vectors("c", "trainer-step-3", futures::stream::iter([vectors[half..].to_vec()])).await.unwrap();
    assert_eq!(up.missing, 0);
    let committed = client.commit_vectors("c").await.unwrap().collection.unwrap();
    assert_eq!((committed.generation, committed.encoder_kind.as_str()), (3, "trainer"));
    stop.store(true, Ordering::Release);
    let streams: Vec<Vec<u64>> = futures::future::join_all(tasks).await.into_iter().map(|r| r.unwrap()).collect();
    check_generations(streams, 2, 3);
    let trained = client.mine(vector_request(0, &probes)).await.unwrap();
    assert_eq!(trained.generation, 3);

    // The same vectors on the fresh server give the same answers.
    fresh_client.upload_vectors("c", "trainer-step-3", futures::stream::iter([vectors.clone()])).await.unwrap();
    fresh_client.commit_vectors("c").await.unwrap();
    assert_eq!(ids(&fresh_client.mine(vector_request(0, &probes)).await.unwrap()), ids(&trained));

    // Text needs a server-side encoder: refused with a message that says what to send.
    let err = client.mine(text_request(0, &texts, &positive)).await.unwrap_err();
    assert_eq!(err.code(), Some(Code::FailedPrecondition));
    assert!(err.to_string().contains("send query vectors"), "{err}");
    // A new document waits for the next vector refresh, and is never returned meanwhile.
    let new_doc = proto::Document { id: "new".into(), text: "a brand new wing".into(), title: None, metadata: Default::default(), vector: Vec::new() };
    let resp = client.upsert("c", futures::stream::iter([vec![new_doc]])).await.unwrap();
    assert_eq!(resp.pending, 1);
    assert_eq!(client.get_collection("c").await.unwrap().pending_documents, 1);
    let resp = client.mine(vector_request(0, &probes)).await.unwrap();
    assert!(resp.results.iter().all(|r| r.negatives.iter().all(|n| n.id != "new")));
    // The generation survives a restart, pending document included.
    server.stop(Duration::from_secs(30));
    let server = Server::start_with(&tmp.path().join("a"), &env).await;
    let mut client = server.client().await;
    let info = client.get_collection("c").await.unwrap();
    assert_eq!((info.generation, info.pending_documents, info.doc_count), (3, 1, DOCS as u64 + 1));
    assert_eq!(ids(&client.mine(vector_request(0, &probes)).await.unwrap()), ids(&trained));
    server.stop(Duration::from_secs(30));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crash_during_a_refresh_leaves_the_previous_generation_serving() {
    let tmp = tempfile::tempdir().unwrap();
    let root = models_root(tmp.path());
    let env = [("HARDNEG__ENCODER__MODELS_ROOT", root.to_str().unwrap())];
    let data = tmp.path().join("data");
    let server = Server::start_with(&data, &env).await;
    let mut client = server.client().await;
    let doc_ids = load(&mut client).await;
    let texts = query_texts();
    let before = client.mine(text_request(0, &texts, &doc_ids[0])).await.unwrap();
    let mut stream = client.refresh("c", "step-2").await.unwrap();
    loop {
        let p = stream.next().await.unwrap().unwrap();
        if p.done > 0 && p.done < p.total {
            break;
        }
    }
    assert_eq!(client.get_collection("c").await.unwrap().building_generation, Some(2));
    drop(stream);
    drop(client);
    drop(server); // SIGKILL mid-refresh
    let server = Server::start_with(&data, &env).await;
    let mut client = server.client().await;
    let info = client.get_collection("c").await.unwrap();
    assert_eq!((info.generation, info.building_generation, info.encoder_kind.as_str()), (1, None, "server"));
    let after = client.mine(text_request(0, &texts, &doc_ids[0])).await.unwrap();
    assert_eq!(after.generation, 1);
    assert_eq!(ids(&after), ids(&before));
    assert!(server.log_text().contains("removed the half-built generation"), "{}", server.log_text());
    // The refresh can be run again to the end.
    let last = refresh_to_done(&mut client, "step-2").await.pop().unwrap();
    assert_eq!((last.phase.as_str(), last.generation), ("done", 2));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_refreshes_and_commits_change_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let root = models_root(tmp.path());
    std::fs::create_dir_all(tmp.path().join("outside")).unwrap();
    let env = [("HARDNEG__ENCODER__MODELS_ROOT", root.to_str().unwrap()), ("HARDNEG__MINING__MIN_GENERATION_WAIT_SECONDS", "0.5")];
    let server = Server::start_with(&tmp.path().join("data"), &env).await;
    let mut client = server.client().await;
    let doc_ids = load(&mut client).await;
    let texts = query_texts();
    let info = client.get_collection("c").await.unwrap();
    let answer = ids(&client.mine(text_request(0, &texts, &doc_ids[0])).await.unwrap());
    let unchanged = |client: &mut Client| {
        let mut client = client.clone();
        let (info, answer, texts, positive) = (info.clone(), answer.clone(), texts.clone(), doc_ids[0].clone());
        async move {
            let now = client.get_collection("c").await.unwrap();
            assert_eq!((now.generation, now.doc_count, now.building_generation, now.encoder_fingerprint), (info.generation, info.doc_count, None, info.encoder_fingerprint));
            assert_eq!(ids(&client.mine(text_request(0, &texts, &positive)).await.unwrap()), answer);
        }
    };

    let outside = tmp.path().join("outside").to_string_lossy().into_owned();
    let cases: [(&str, Code, &str); 5] = [
        ("../outside", Code::InvalidArgument, ".."),
        ("step-2/../../outside", Code::InvalidArgument, ".."),
        (&outside, Code::InvalidArgument, "not under encoder.models_root"),
        ("missing-checkpoint", Code::InvalidArgument, "encoder_dir"),
        ("", Code::InvalidArgument, "encoder_dir"),
    ];
    for (dir, code, says) in cases {
        let err = client.refresh("c", dir).await.err().unwrap_or_else(|| panic!("{dir:?} accepted"));
        assert_eq!(err.code(), Some(code), "{dir:?}: {err}");
        assert!(err.to_string().contains(says), "{dir:?}: {err}");
        unchanged(&mut client).await;
    }
    let err = client.refresh("nope", "step-2").await.err().unwrap();
    assert_eq!(err.code(), Some(Code::NotFound));

    // Commit without uploads; a partial upload; vectors of the wrong size; unknown ids.
    let err = client.commit_vectors("c").await.unwrap_err();
    assert_eq!(err.code(), Some(Code::FailedPrecondition));
    let vectors = trainer_vectors(&doc_ids);
    client.upload_vectors("c", "t", futures::stream::iter([vectors[..10].to_vec()])).await.unwrap();
    let err = client.commit_vectors("c").await.unwrap_err();
    assert_eq!(err.code(), Some(Code::FailedPrecondition));
    assert!(err.to_string().contains(&format!("lacks vectors for {} live documents", DOCS - 10)), "{err}");
    let short = vec![(doc_ids[20].clone(), vec![0.5f32; 17])];
    let err = client.upload_vectors("c", "t", futures::stream::iter([short])).await.unwrap_err();
    assert_eq!(err.code(), Some(Code::InvalidArgument));
    assert!(err.to_string().contains("dims"), "{err}");
    let unknown = vec![("no-such-doc".to_string(), vectors[0].1.clone())];
    let err = client.upload_vectors("c", "t", futures::stream::iter([unknown])).await.unwrap_err();
    assert_eq!(err.code(), Some(Code::InvalidArgument));
    let err = client.upload_vectors("c", "other", futures::stream::iter([vectors[..1].to_vec()])).await.unwrap_err();
    assert_eq!(err.code(), Some(Code::Aborted), "{err}");
    // A re-encode cannot start while vectors are pending.
    let err = client.refresh("c", "step-2").await.err().unwrap();
    assert_eq!(err.code(), Some(Code::Aborted), "{err}");
    let now = client.get_collection("c").await.unwrap();
    assert_eq!((now.generation, now.building_generation), (1, Some(2)));
    let cancelled = client.cancel_refresh("c").await.unwrap();
    assert!(cancelled.cancelled && cancelled.what.contains("discarded"), "{cancelled:?}");
    unchanged(&mut client).await;

    // min_generation: a generation that does not come in time is UNAVAILABLE.
    let mut req = text_request(0, &texts, &doc_ids[0]);
    req.min_generation = Some(2);
    let err = client.mine(req.clone()).await.unwrap_err();
    assert_eq!(err.code(), Some(Code::Unavailable), "{err}");
    req.min_generation = Some(1);
    client.mine(req).await.unwrap();

    // One re-encode at a time; a cancelled one changes nothing.
    let mut stream = client.refresh("c", "step-2").await.unwrap();
    let err = client.refresh("c", "step-2").await.err().unwrap();
    assert_eq!(err.code(), Some(Code::Aborted), "{err}");
    let cancelled = client.cancel_refresh("c").await.unwrap();
    assert!(cancelled.cancelled, "{cancelled:?}");
    let mut end = None;
    while let Some(p) = stream.next().await {
        if let Err(status) = p {
            end = Some(status);
        }
    }
    let end = end.expect("a cancelled refresh ends with a status");
    assert_eq!(end.code(), Code::Aborted, "{end:?}");
    unchanged(&mut client).await;
    server.stop(Duration::from_secs(30));
}
