//! `hardneg ingest`: a BEIR corpus.jsonl into a collection.
use std::path::PathBuf;
use std::time::Instant;

use hardneg_client::beir::{self, CorpusDoc};
use hardneg_client::{Client, proto};
use serde_json::json;

/// `hardneg ingest`: upsert a BEIR corpus in batches, with a progress bar.
pub async fn ingest(client: &mut Client, collection: &str, corpus: &PathBuf, batch_size: usize) -> anyhow::Result<()> {
    let docs: Vec<CorpusDoc> = beir::read_jsonl(corpus)?;
    let (docs, empty): (Vec<CorpusDoc>, Vec<CorpusDoc>) =
        docs.into_iter().partition(|d| !(d.title.trim().is_empty() && d.text.trim().is_empty()));
    for d in &empty {
        eprintln!("skipping document {:?}: no title and no text", d.id);
    }
    client.get_collection(collection).await?;
    let bar = indicatif::ProgressBar::new(docs.len() as u64);
    bar.set_style(
        indicatif::ProgressStyle::with_template("{bar:40} {pos}/{len} docs {per_sec} eta {eta}")
            .expect("static progress template"),
    );
    let started = Instant::now();
    let (mut inserted, mut updated, mut doc_count) = (0, 0, 0);
    for chunk in docs.chunks(batch_size.max(1)) {
        let batch: Vec<proto::Document> = chunk
            .iter()
            .map(|d| proto::Document {
                id: d.id.clone(),
                text: d.text.clone(),
                title: (!d.title.trim().is_empty()).then(|| d.title.clone()),
                metadata: Default::default(),
            })
            .collect();
        let resp = client.upsert(collection, futures::stream::iter([batch])).await?;
        inserted += resp.inserted;
        updated += resp.updated;
        doc_count = resp.doc_count;
        bar.inc(chunk.len() as u64);
    }
    bar.finish_and_clear();
    let secs = started.elapsed().as_secs_f64();
    println!(
        "{}",
        json!({"inserted": inserted, "updated": updated, "skipped": empty.len(), "doc_count": doc_count,
               "seconds": secs, "docs_per_second": docs.len() as f64 / secs.max(1e-9)})
    );
    Ok(())
}
