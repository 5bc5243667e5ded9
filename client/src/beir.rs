//! Readers for BEIR-format collections: `corpus.jsonl`, `queries.jsonl`, `qrels/*.tsv`.
use std::collections::HashMap;
use std::io::BufRead;
use std::path::Path;

use serde::Deserialize;
use serde::de::DeserializeOwned;

#[derive(Debug, Clone, Deserialize)]
pub struct CorpusDoc {
    #[serde(rename = "_id")]
    pub id: String,
    #[serde(default)]
    pub title: String,
    #[serde(default)]
    pub text: String,
    /// The document's embedding, for vectors-only collections (empty: none given).
    #[serde(default)]
    pub vector: Vec<f32>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct BeirQuery {
    #[serde(rename = "_id")]
    pub id: String,
    /// Empty when the query is given by its vector only.
    #[serde(default)]
    pub text: String,
    /// The query's embedding, mined with in place of encoding the text (empty: none given).
    #[serde(default)]
    pub vector: Vec<f32>,
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

/// JSON lines one at a time with their 1-based line numbers, so a large file is never held
/// whole; blank lines are skipped and an error names the file and line.
pub fn jsonl_lines<T: DeserializeOwned>(path: &Path) -> anyhow::Result<impl Iterator<Item = anyhow::Result<(usize, T)>> + use<T>> {
    let name = path.display().to_string();
    Ok(open(path)?.lines().enumerate().filter_map(move |(n, line)| match line {
        Ok(l) if l.trim().is_empty() => None,
        Ok(l) => Some(serde_json::from_str(&l).map(|t| (n + 1, t)).map_err(|e| anyhow::anyhow!("{name}:{}: {e}", n + 1))),
        Err(e) => Some(Err(anyhow::anyhow!("{name}:{}: {e}", n + 1))),
    }))
}

/// Reads JSON lines, naming the file and line on a parse error; blank lines are skipped.
pub fn read_jsonl<T: DeserializeOwned>(path: &Path) -> anyhow::Result<Vec<T>> {
    jsonl_lines(path)?.map(|r| r.map(|(_, t)| t)).collect()
}

/// Reads a queries.jsonl whose every query has a text or a vector (an error names the line).
pub fn read_queries(path: &Path) -> anyhow::Result<Vec<BeirQuery>> {
    jsonl_lines::<BeirQuery>(path)?
        .map(|r| {
            let (line, q) = r?;
            if q.text.trim().is_empty() && q.vector.is_empty() {
                anyhow::bail!("{}:{line}: query {:?} has neither \"text\" nor \"vector\"", path.display(), q.id);
            }
            Ok(q)
        })
        .collect()
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

    #[test]
    fn corpus_and_query_lines_may_carry_vectors() {
        let doc: CorpusDoc = serde_json::from_str(r#"{"_id":"d","text":"x","metadata":{"a":"b"},"vector":[1,0.5,-2]}"#).unwrap();
        assert_eq!(doc.vector, vec![1.0, 0.5, -2.0]);
        let plain: CorpusDoc = serde_json::from_str(r#"{"_id":"d","text":"x"}"#).unwrap();
        assert!(plain.vector.is_empty());
        let dir = std::env::temp_dir().join(format!("hardneg-beir-q-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let q = dir.join("queries.jsonl");
        std::fs::write(&q, "{\"_id\":\"1\",\"text\":\"wing\"}\n\n{\"_id\":\"2\",\"vector\":[0.25,1]}\n").unwrap();
        let qs = read_queries(&q).unwrap();
        assert_eq!((qs[0].text.as_str(), qs[0].vector.len()), ("wing", 0));
        assert_eq!((qs[1].text.as_str(), qs[1].vector.clone()), ("", vec![0.25, 1.0]));
        std::fs::write(&q, "{\"_id\":\"1\",\"text\":\"wing\"}\n\n{\"_id\":\"2\",\"text\":\" \"}\n").unwrap();
        let err = read_queries(&q).unwrap_err().to_string();
        assert!(err.contains("queries.jsonl:3") && err.contains("neither \"text\" nor \"vector\""), "{err}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
