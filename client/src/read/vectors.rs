//! Document vectors for an upload: JSONL of {"id","vector"}, or a .npy matrix with an id file.
use std::path::PathBuf;

use anyhow::{Context, bail};

/// Reads (id, vector) rows: JSONL {"id","vector"}, or a .npy matrix with an id file.
pub fn read_vectors(path: &PathBuf, ids: Option<&PathBuf>) -> anyhow::Result<Vec<(String, Vec<f32>)>> {
    if path.extension().is_some_and(|e| e == "npy") {
        let ids_path = ids.context("a .npy file needs --ids (one document id per line, in row order)")?;
        let ids: Vec<String> = std::fs::read_to_string(ids_path)
            .with_context(|| ids_path.display().to_string())?
            .lines()
            .map(|l| l.trim().to_string())
            .filter(|l| !l.is_empty())
            .collect();
        let rows = super::npy::read_npy(path)?;
        if rows.len() != ids.len() {
            bail!("{}: {} rows, {}: {} ids", path.display(), rows.len(), ids_path.display(), ids.len());
        }
        return Ok(ids.into_iter().zip(rows).collect());
    }
    #[derive(serde::Deserialize)]
    struct Row {
        id: String,
        vector: Vec<f32>,
    }
    let text = std::fs::read_to_string(path).with_context(|| path.display().to_string())?;
    text.lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
        .map(|(i, l)| {
            let row: Row = serde_json::from_str(l).with_context(|| format!("{}:{}", path.display(), i + 1))?;
            Ok((row.id, row.vector))
        })
        .collect()
}
