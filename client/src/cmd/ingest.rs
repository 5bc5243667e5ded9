//! `hardneg ingest`: a BEIR corpus.jsonl, document vectors, or both, into a collection.
use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::bail;
use hardneg_client::beir::{self, CorpusDoc};
use hardneg_client::{Client, proto};
use serde_json::json;

use crate::read::vectors::read_vectors;

/// What ingest reads: a corpus, vectors by document id (--vectors, with --ids for .npy), or both.
pub struct Input {
    pub corpus: Option<PathBuf>,
    pub vectors: Option<PathBuf>,
    pub ids: Option<PathBuf>,
}

/// A document id and its vector, as `read_vectors` gives them.
type Row = (String, Vec<f32>);

/// The --vectors rows by document id, with their row numbers, for attaching to corpus documents.
struct Rows {
    /// The vectors file, named in errors.
    name: String,
    by_id: HashMap<String, (usize, Vec<f32>)>,
}

/// What the check before sending found in the corpus.
#[derive(Debug, Default, PartialEq)]
struct Scan {
    docs: u64,
    skipped: u64,
}

/// `hardneg ingest`: checks the whole input, then upserts it in batches with a progress bar.
/// The corpus is read line by line on both passes, so its size does not bound memory.
pub async fn ingest(client: &mut Client, collection: &str, input: &Input, batch_size: usize) -> anyhow::Result<()> {
    if batch_size == 0 {
        bail!("--batch-size must be at least 1");
    }
    let info = client.get_collection(collection).await?;
    let rows = match &input.vectors {
        Some(path) => Some(checked_rows(path, input.ids.as_ref(), info.dims as usize)?),
        None => None,
    };
    match (&input.corpus, rows) {
        (Some(corpus), rows) => {
            let rows = rows.map(|(name, rows)| index_rows(name, rows));
            let scan = scan(corpus, &info, rows.as_ref())?;
            let mut up = Upserter::new(client, collection, batch_size, scan.docs);
            up.send_corpus(corpus, rows.as_ref()).await?;
            up.report(scan.skipped);
        }
        (None, Some((_, rows))) => {
            let mut up = Upserter::new(client, collection, batch_size, rows.len() as u64);
            up.send_rows(rows).await?;
            up.report(0);
        }
        (None, None) => bail!("give --corpus, --vectors, or both"),
    }
    Ok(())
}

/// Reads the --vectors rows as `refresh` does and checks them before anything is sent: each
/// id once, each vector non-empty, finite and of the collection's `dims` (0: unknown).
fn checked_rows(path: &PathBuf, ids: Option<&PathBuf>, dims: usize) -> anyhow::Result<(String, Vec<Row>)> {
    let name = path.display().to_string();
    let rows = read_vectors(path, ids)?;
    let mut first_row: HashMap<&str, usize> = HashMap::with_capacity(rows.len());
    for (row, (id, vector)) in rows.iter().enumerate() {
        if let Some(earlier) = first_row.insert(id.as_str(), row) {
            bail!("{name}: document {id:?} has rows {earlier} and {row}");
        }
        if let Some(why) = vector_problem(vector, dims) {
            bail!("{name}: row {row} (document {id:?}) {why}");
        }
    }
    Ok((name, rows))
}

fn index_rows(name: String, rows: Vec<Row>) -> Rows {
    Rows { name, by_id: rows.into_iter().enumerate().map(|(row, (id, vector))| (id, (row, vector))).collect() }
}

/// Why `vector` cannot go into a collection of `dims` (0: unknown), if it cannot.
fn vector_problem(vector: &[f32], dims: usize) -> Option<String> {
    if vector.is_empty() {
        return Some("has an empty \"vector\"".into());
    }
    if dims > 0 && vector.len() != dims {
        return Some(format!("has a \"vector\" of {} dims, where the collection has {dims}", vector.len()));
    }
    vector.iter().position(|x| !x.is_finite()).map(|j| format!("has a non-finite vector[{j}]"))
}

/// Why corpus document `d` cannot be sent, if it cannot: with --vectors it needs its row and no
/// vector of its own; without, its vector must fit, and a vectors-only collection needs one.
fn doc_problem(d: &CorpusDoc, info: &proto::CollectionInfo, rows: Option<&Rows>) -> Option<String> {
    match rows {
        Some(rows) if !rows.by_id.contains_key(&d.id) => Some(format!("has no row in {}", rows.name)),
        Some(rows) if !d.vector.is_empty() => Some(format!("has a \"vector\" and a row in {}: give one or the other", rows.name)),
        Some(_) => None,
        None if !d.vector.is_empty() => vector_problem(&d.vector, info.dims as usize),
        None if info.vectors_only => {
            Some(format!("has no \"vector\", and collection {:?} is vectors-only (give each line one, or --vectors)", info.name))
        }
        None => None,
    }
}

/// The server refuses a document with neither title nor text; ingest skips it.
fn is_blank(d: &CorpusDoc) -> bool {
    d.title.trim().is_empty() && d.text.trim().is_empty()
}

/// Reads the whole corpus once before anything is sent, so a bad line stops the ingest with
/// nothing stored: every line parses, every document's vector fits, and with --vectors every
/// document has one row and every row a document. Blank documents are counted as skipped.
fn scan(corpus: &Path, info: &proto::CollectionInfo, rows: Option<&Rows>) -> anyhow::Result<Scan> {
    let mut scan = Scan::default();
    let mut claimed = HashSet::new();
    for r in beir::jsonl_lines::<CorpusDoc>(corpus)? {
        let (line, d) = r?;
        if is_blank(&d) {
            eprintln!("skipping document {:?}: no title and no text", d.id);
            scan.skipped += 1;
        } else if let Some(why) = doc_problem(&d, info, rows) {
            bail!("{}:{line}: document {:?} {why}", corpus.display(), d.id);
        } else {
            scan.docs += 1;
        }
        if rows.is_some() {
            claimed.insert(d.id);
        }
    }
    if let Some(rows) = rows {
        let unclaimed = rows.by_id.iter().filter(|(id, _)| !claimed.contains(*id)).min_by_key(|(_, (row, _))| *row);
        if let Some((id, (row, _))) = unclaimed {
            bail!("{}: row {row} is document {id:?}, which is not in {}", rows.name, corpus.display());
        }
    }
    Ok(scan)
}

/// A corpus document as sent; the title only when it is not blank.
fn document(d: CorpusDoc) -> proto::Document {
    let title = (!d.title.trim().is_empty()).then_some(d.title);
    proto::Document { id: d.id, text: d.text, title, metadata: Default::default(), vector: d.vector }
}

/// Sends batches as Upsert calls (each durable when it returns) and sums the replies.
struct Upserter<'a> {
    client: &'a mut Client,
    collection: &'a str,
    batch_size: usize,
    bar: indicatif::ProgressBar,
    /// Summed inserted and updated; the last doc_count and pending.
    reply: proto::UpsertResponse,
    sent: u64,
    started: Instant,
}

impl<'a> Upserter<'a> {
    /// Starts the clock and a progress bar of `total` documents.
    fn new(client: &'a mut Client, collection: &'a str, batch_size: usize, total: u64) -> Self {
        let bar = indicatif::ProgressBar::new(total);
        bar.set_style(
            indicatif::ProgressStyle::with_template("{bar:40} {pos}/{len} docs {per_sec} eta {eta}").expect("static progress template"),
        );
        Self { client, collection, batch_size, bar, reply: Default::default(), sent: 0, started: Instant::now() }
    }

    /// Prints the summary line.
    fn report(self, skipped: u64) {
        self.bar.finish_and_clear();
        let (r, secs) = (&self.reply, self.started.elapsed().as_secs_f64());
        println!(
            "{}",
            json!({"inserted": r.inserted, "updated": r.updated, "skipped": skipped, "doc_count": r.doc_count,
                   "pending": r.pending, "seconds": secs, "docs_per_second": self.sent as f64 / secs.max(1e-9)})
        );
    }

    async fn send(&mut self, batch: Vec<proto::Document>) -> anyhow::Result<()> {
        let n = batch.len() as u64;
        let resp = self.client.upsert(self.collection, futures::stream::iter([batch])).await?;
        self.reply.inserted += resp.inserted;
        self.reply.updated += resp.updated;
        (self.reply.doc_count, self.reply.pending) = (resp.doc_count, resp.pending);
        self.sent += n;
        self.bar.inc(n);
        Ok(())
    }

    /// The corpus's non-blank documents, each with its row's vector when there are rows.
    async fn send_corpus(&mut self, corpus: &Path, rows: Option<&Rows>) -> anyhow::Result<()> {
        let mut batch = Vec::with_capacity(self.batch_size);
        for r in beir::jsonl_lines::<CorpusDoc>(corpus)? {
            let (_, mut d) = r?;
            if is_blank(&d) {
                continue;
            }
            if let Some((_, vector)) = rows.and_then(|rows| rows.by_id.get(&d.id)) {
                d.vector = vector.clone();
            }
            batch.push(document(d));
            if batch.len() == self.batch_size {
                self.send(std::mem::take(&mut batch)).await?;
            }
        }
        if !batch.is_empty() {
            self.send(batch).await?;
        }
        Ok(())
    }

    /// Rows without a corpus: each a document whose text is its id.
    async fn send_rows(&mut self, rows: Vec<Row>) -> anyhow::Result<()> {
        let mut rows = rows.into_iter();
        loop {
            let batch: Vec<proto::Document> = rows
                .by_ref()
                .take(self.batch_size)
                .map(|(id, vector)| proto::Document { text: id.clone(), id, vector, ..Default::default() })
                .collect();
            if batch.is_empty() {
                return Ok(());
            }
            self.send(batch).await?;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn doc(line: &str) -> CorpusDoc {
        serde_json::from_str(line).unwrap()
    }

    fn info(dims: u32, vectors_only: bool) -> proto::CollectionInfo {
        proto::CollectionInfo { name: "c".into(), dims, vectors_only, ..Default::default() }
    }

    fn rows(ids: &[&str]) -> Rows {
        index_rows("v.npy".into(), ids.iter().map(|id| (id.to_string(), vec![1.0, 0.0])).collect())
    }

    /// Writes `body` as a corpus file and scans it.
    fn scan_body(name: &str, body: &str, info: &proto::CollectionInfo, rows: Option<&Rows>) -> anyhow::Result<Scan> {
        let dir = std::env::temp_dir().join(format!("hardneg-ingest-{name}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("corpus.jsonl");
        std::fs::write(&path, body).unwrap();
        let out = scan(&path, info, rows);
        std::fs::remove_dir_all(&dir).unwrap();
        out
    }

    #[test]
    fn a_line_vector_must_fit_the_collection() {
        let two = info(2, true);
        assert_eq!(doc_problem(&doc(r#"{"_id":"a","text":"x","vector":[1,2]}"#), &two, None), None);
        let wrong = doc_problem(&doc(r#"{"_id":"a","text":"x","vector":[1,2,3]}"#), &two, None).unwrap();
        assert_eq!(wrong, "has a \"vector\" of 3 dims, where the collection has 2");
        let missing = doc_problem(&doc(r#"{"_id":"a","text":"x"}"#), &two, None).unwrap();
        assert!(missing.starts_with("has no \"vector\", and collection \"c\" is vectors-only"), "{missing}");
        assert_eq!(doc_problem(&doc(r#"{"_id":"a","text":"x"}"#), &info(384, false), None), None);
        assert_eq!(vector_problem(&[1.0, f32::NAN], 2).as_deref(), Some("has a non-finite vector[1]"));
        assert_eq!(vector_problem(&[], 0).as_deref(), Some("has an empty \"vector\""));
    }

    #[test]
    fn rows_attach_by_id_and_conflict_with_a_line_vector() {
        let (two, rows) = (info(2, true), rows(&["a", "b"]));
        assert_eq!(doc_problem(&doc(r#"{"_id":"a","text":"x"}"#), &two, Some(&rows)), None);
        let both = doc_problem(&doc(r#"{"_id":"a","text":"x","vector":[1,2]}"#), &two, Some(&rows)).unwrap();
        assert_eq!(both, "has a \"vector\" and a row in v.npy: give one or the other");
        let none = doc_problem(&doc(r#"{"_id":"z","text":"x"}"#), &two, Some(&rows)).unwrap();
        assert_eq!(none, "has no row in v.npy");
    }

    #[test]
    fn the_scan_counts_documents_and_names_lines_and_unclaimed_rows() {
        let two = info(2, true);
        let body = "{\"_id\":\"a\",\"text\":\"x\"}\n\n{\"_id\":\"b\",\"title\":\" \",\"text\":\"\"}\n";
        assert_eq!(scan_body("ok", body, &two, Some(&rows(&["a", "b"]))).unwrap(), Scan { docs: 1, skipped: 1 });
        let err = scan_body("unclaimed", body, &two, Some(&rows(&["a", "b", "c"]))).unwrap_err().to_string();
        assert!(err.starts_with("v.npy: row 2 is document \"c\", which is not in ") && err.ends_with("corpus.jsonl"), "{err}");
        let body = format!("{body}{{\"_id\":\"d\",\"text\":\"y\"}}\n");
        let err = scan_body("norow", &body, &two, Some(&rows(&["a", "b"]))).unwrap_err().to_string();
        assert!(err.ends_with("corpus.jsonl:4: document \"d\" has no row in v.npy"), "{err}");
        let err = scan_body("novector", &body, &two, None).unwrap_err().to_string();
        assert!(err.contains("corpus.jsonl:1: document \"a\" has no \"vector\""), "{err}");
    }

    #[test]
    fn a_corpus_document_keeps_its_vector_and_drops_a_blank_title() {
        let d = document(doc(r#"{"_id":"a","title":" ","text":"x","vector":[0.5]}"#));
        assert_eq!((d.id.as_str(), d.text.as_str(), d.title, d.vector), ("a", "x", None, vec![0.5]));
    }
}
