//! Readers for BEIR-format collections: `corpus.jsonl`, `queries.jsonl`, `qrels/*.tsv`.
use std::collections::HashMap;
use std::io::BufRead;
use std::path::Path;

use serde::Deserialize;

#[derive(Debug, Clone, Deserialize)]
pub struct CorpusDoc {
    #[serde(rename = "_id")]
    pub id: String,
    #[serde(default)]
    pub title: String,
    #[serde(default)]
    pub text: String,
}

#[derive(Debug, Clone, Deserialize)]
pub struct BeirQuery {
    #[serde(rename = "_id")]
    pub id: String,
    pub text: String,
}

/// Judgments of one query, in file order.
#[derive(Debug, Clone, Default)]
pub struct Judgments {
    pub docs: Vec<(String, f64)>,
}

impl Judgments {
    /// The positive: highest-scored judged document, ties broken by first appearance.
    pub fn positive(&self) -> Option<&str> {
        let mut best: Option<&(String, f64)> = None;
        for j in &self.docs {
            if j.1 > 0.0 && best.is_none_or(|b| j.1 > b.1) {
                best = Some(j);
            }
        }
        best.map(|b| b.0.as_str())
    }

    /// Every judged-relevant document (score > 0).
    pub fn relevant(&self) -> impl Iterator<Item = &str> {
        self.docs.iter().filter(|j| j.1 > 0.0).map(|j| j.0.as_str())
    }
}

fn open(path: &Path) -> anyhow::Result<std::io::BufReader<std::fs::File>> {
    let file = std::fs::File::open(path).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
    Ok(std::io::BufReader::new(file))
}

/// Reads JSON lines, naming the file and line on a parse error; blank lines are skipped.
pub fn read_jsonl<T: for<'de> Deserialize<'de>>(path: &Path) -> anyhow::Result<Vec<T>> {
    let mut out = Vec::new();
    for (n, line) in open(path)?.lines().enumerate() {
        let line = line?;
        if line.trim().is_empty() {
            continue;
        }
        out.push(serde_json::from_str(&line).map_err(|e| anyhow::anyhow!("{}:{}: {e}", path.display(), n + 1))?);
    }
    Ok(out)
}

/// Reads a qrels TSV (`query-id corpus-id score`, optional header).
pub fn read_qrels(path: &Path) -> anyhow::Result<HashMap<String, Judgments>> {
    let mut out: HashMap<String, Judgments> = HashMap::new();
    for (n, line) in open(path)?.lines().enumerate() {
        let line = line?;
        let fields: Vec<&str> = line.split('\t').map(str::trim).collect();
        if line.trim().is_empty() || (n == 0 && fields.first() == Some(&"query-id")) {
            continue;
        }
        let [q, d, s] = fields[..] else {
            anyhow::bail!("{}:{}: expected 3 tab-separated fields", path.display(), n + 1);
        };
        let score: f64 = s.parse().map_err(|_| anyhow::anyhow!("{}:{}: bad score {s:?}", path.display(), n + 1))?;
        out.entry(q.to_string()).or_default().docs.push((d.to_string(), score));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn positive_is_the_highest_scored_first_seen() {
        let j = Judgments { docs: vec![("a".into(), 2.0), ("b".into(), 3.0), ("c".into(), 3.0), ("d".into(), 0.0)] };
        assert_eq!(j.positive(), Some("b"));
        assert_eq!(j.relevant().collect::<Vec<_>>(), vec!["a", "b", "c"]);
        assert_eq!(Judgments::default().positive(), None);
    }

    #[test]
    fn qrels_and_jsonl_parse_with_line_numbers_in_errors() {
        let dir = std::env::temp_dir().join(format!("hardneg-beir-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let q = dir.join("qrels.tsv");
        std::fs::write(&q, "query-id\tcorpus-id\tscore\n1\t10\t2\n1\t11\t4\n2\t12\t1\n").unwrap();
        let qrels = read_qrels(&q).unwrap();
        assert_eq!(qrels["1"].positive(), Some("11"));
        assert_eq!(qrels["2"].docs.len(), 1);
        let c = dir.join("corpus.jsonl");
        std::fs::write(&c, "{\"_id\":\"1\",\"title\":\"t\",\"text\":\"x\"}\n\nnot json\n").unwrap();
        let err = read_jsonl::<CorpusDoc>(&c).unwrap_err().to_string();
        assert!(err.contains("corpus.jsonl:3"), "{err}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
