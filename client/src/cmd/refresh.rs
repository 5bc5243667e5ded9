//! `hardneg refresh`: re-encode with a checkpoint, or upload and commit the trainer's
//! vectors (or cancel either).
use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Context, bail};
use futures::StreamExt;
use hardneg_client::Client;
use serde_json::json;

use crate::read::vectors::read_vectors;

/// Re-encode with a checkpoint, following its progress.
pub async fn reencode(client: &mut Client, collection: &str, dir: &str) -> anyhow::Result<()> {
    let mut stream = client.refresh(collection, dir).await?;
    let bar = indicatif::ProgressBar::new(0);
    bar.set_style(
        indicatif::ProgressStyle::with_template("{msg} [{bar:40}] {pos}/{len} docs ({per_sec}, eta {eta})")
            .expect("valid template")
            .progress_chars("=> "),
    );
    let mut last = None;
    while let Some(p) = stream.next().await {
        let p = p.map_err(|s| anyhow::anyhow!("{}: {}", s.code(), s.message()))?;
        bar.set_length(p.total);
        bar.set_position(p.done);
        bar.set_message(format!("generation {} {}", p.generation, p.phase));
        last = Some(p);
    }
    bar.finish_and_clear();
    let p = last.context("the server sent no progress")?;
    println!(
        "{}",
        json!({"collection": p.collection, "generation": p.generation, "phase": p.phase, "documents": p.done,
               "seconds": p.elapsed_seconds, "docs_per_second": p.docs_per_second})
    );
    Ok(())
}

/// Upload the trainer's vectors, then commit them.
pub async fn upload(client: &mut Client, collection: &str, path: &PathBuf, ids: Option<&PathBuf>, encoder_name: &str, batch_size: usize) -> anyhow::Result<()> {
    if batch_size == 0 {
        bail!("--batch-size must be at least 1");
    }
    let rows = read_vectors(path, ids)?;
    let started = Instant::now();
    let batches: Vec<Vec<(String, Vec<f32>)>> = rows.chunks(batch_size).map(|c| c.to_vec()).collect();
    let uploaded = client.upload_vectors(collection, encoder_name, futures::stream::iter(batches)).await?;
    if uploaded.missing > 0 {
        bail!(
            "uploaded {} vectors into pending generation {}, but {} live documents still have none: upload them and run this again (or --cancel)",
            uploaded.received, uploaded.generation, uploaded.missing
        );
    }
    let committed = client.commit_vectors(collection).await?;
    let info = committed.collection.unwrap_or_default();
    println!(
        "{}",
        json!({"collection": collection, "generation": info.generation, "vectors": uploaded.received,
               "seconds": started.elapsed().as_secs_f64(), "commit_seconds": committed.seconds})
    );
    Ok(())
}
