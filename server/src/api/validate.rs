//! Validation at the edge: every request field is checked before any work, with a message
//! that names the field. Checks that need the collection (vector dims against the answering
//! generation) happen in the engine.
use std::path::{Path, PathBuf};

use crate::config::{Config, LimitsConfig};
use crate::engine::NewDoc;
use crate::error::{Error, Result};
use crate::mine::{Filters, MineParams, RerankFilters, Sampling};
use crate::proto as pb;
use crate::store::{PromptOverrides, StoredDoc};

/// 1-64 characters of letters, digits, '_', '-', '.', not starting with '.'.
pub fn validate_name(field: &str, name: &str) -> Result<()> {
    if name.is_empty() {
        return Err(Error::invalid(field, "is empty"));
    }
    if name.len() > 64 {
        return Err(Error::invalid(field, format!("is {} bytes long, the limit is 64", name.len())));
    }
    if name.starts_with('.') || !name.chars().all(|c| c.is_ascii_alphanumeric() || "_-.".contains(c)) {
        return Err(Error::invalid(field, format!("{name:?} may hold only letters, digits, '_', '-', '.' and must not start with '.'")));
    }
    Ok(())
}

/// A document's metadata: at most limits.max_metadata_entries entries and
/// limits.max_metadata_bytes bytes of keys and values.
fn check_metadata(field: &str, metadata: &std::collections::HashMap<String, String>, limits: &LimitsConfig) -> Result<()> {
    if metadata.len() > limits.max_metadata_entries {
        return Err(Error::invalid(
            field,
            format!("has {} entries, the limit is {} (limits.max_metadata_entries)", metadata.len(), limits.max_metadata_entries),
        ));
    }
    let bytes: usize = metadata.iter().map(|(k, v)| k.len() + v.len()).sum();
    if bytes > limits.max_metadata_bytes {
        return Err(Error::invalid(field, format!("holds {bytes} bytes, the limit is {} (limits.max_metadata_bytes)", limits.max_metadata_bytes)));
    }
    Ok(())
}

/// Dims at most, for vectors-only collections and uploaded vectors.
const MAX_DIMS: usize = 65536;

/// What a CreateCollection with `dims` asks for.
pub struct VectorsOnly {
    pub dims: u32,
    pub encoder_name: String,
}

/// A CreateCollection's `dims` and `encoder_name`: None for an encoded collection (dims 0,
/// no encoder_name); else dims in 1..=65536, no prompts, and an encoder name of at most 256
/// bytes ("trainer" when empty).
pub fn validate_vectors_only(req: &pb::CreateCollectionRequest) -> Result<Option<VectorsOnly>> {
    if req.dims == 0 {
        if !req.encoder_name.is_empty() {
            return Err(Error::invalid("encoder_name", "is for vectors-only collections: set dims too, or leave encoder_name empty"));
        }
        return Ok(None);
    }
    if req.dims as usize > MAX_DIMS {
        return Err(Error::invalid("dims", format!("is {}, the limit is {MAX_DIMS}", req.dims)));
    }
    for (field, p) in [("query_prompt", &req.query_prompt), ("document_prompt", &req.document_prompt)] {
        if p.is_some() {
            return Err(Error::invalid(field, "is set, but a vectors-only collection (dims) encodes no text: leave it unset"));
        }
    }
    if req.encoder_name.len() > 256 {
        return Err(Error::invalid("encoder_name", "is longer than 256 bytes"));
    }
    let encoder_name = if req.encoder_name.is_empty() { "trainer".to_string() } else { req.encoder_name.clone() };
    Ok(Some(VectorsOnly { dims: req.dims, encoder_name }))
}

/// A CreateCollection's prompts: each at most `limit` characters ("" is no prompt).
pub fn validate_prompts(req: &pb::CreateCollectionRequest, limit: usize) -> Result<PromptOverrides> {
    for (field, p) in [("query_prompt", &req.query_prompt), ("document_prompt", &req.document_prompt)] {
        if let Some(p) = p {
            let chars = p.chars().count();
            if chars > limit {
                return Err(Error::invalid(field, format!("is {chars} characters long, the limit is {limit}")));
            }
        }
    }
    Ok(PromptOverrides { query: req.query_prompt.clone(), document: req.document_prompt.clone() })
}

fn check_text(field: &str, text: &str, limit: usize) -> Result<()> {
    if text.trim().is_empty() {
        return Err(Error::invalid(field, "is empty"));
    }
    let chars = text.chars().count();
    if chars > limit {
        return Err(Error::invalid(field, format!("is {chars} characters long, the limit is {limit}")));
    }
    Ok(())
}

fn check_finite(field: &str, value: Option<f32>) -> Result<()> {
    match value {
        Some(v) if !v.is_finite() => Err(Error::invalid(field, format!("must be finite, got {v}"))),
        _ => Ok(()),
    }
}

/// Checks everything that does not depend on the collection, and resolves the options.
pub fn validate_mine(req: &pb::MineRequest, cfg: &Config) -> Result<MineParams> {
    let limits = &cfg.limits;
    validate_name("collection", &req.collection)?;
    validate_queries(&req.queries, limits)?;
    let mut o = req.options.clone().unwrap_or_default();
    match pb::Preset::try_from(o.preset) {
        Ok(pb::Preset::Unspecified) => {}
        Ok(pb::Preset::Denoised) => apply_denoised(&mut o),
        Err(_) => return Err(Error::invalid("options.preset", format!("unknown value {}", o.preset))),
    }
    if o.num_negatives == 0 {
        return Err(Error::invalid("options.num_negatives", "must be at least 1"));
    }
    if o.num_negatives > limits.max_num_negatives {
        return Err(Error::invalid(
            "options.num_negatives",
            format!("is {}, the limit is {} (limits.max_num_negatives)", o.num_negatives, limits.max_num_negatives),
        ));
    }
    let range_max = o.range_max.unwrap_or(cfg.mining.default_range_max);
    if range_max > limits.max_range {
        return Err(Error::invalid("options.range_max", format!("is {range_max}, the limit is {} (limits.max_range)", limits.max_range)));
    }
    if o.range_min >= range_max {
        return Err(Error::invalid("options.range_min", format!("must be below range_max ({range_max}), got {}", o.range_min)));
    }
    check_scores(&o)?;
    let rerank = rerank_filters(&o, &req.queries, limits)?;
    let temperature = o.temperature.unwrap_or(cfg.mining.default_temperature);
    if temperature <= 0.0 {
        return Err(Error::invalid("options.temperature", "must be greater than 0"));
    }
    let sampling = match pb::Sampling::try_from(o.sampling) {
        Ok(pb::Sampling::Unspecified | pb::Sampling::Top) => Sampling::Top,
        Ok(pb::Sampling::Uniform) => Sampling::Uniform,
        Ok(pb::Sampling::Softmax) => Sampling::Softmax { temperature },
        Ok(pb::Sampling::Ambiguous) => {
            let a = o.simans_a.unwrap_or(cfg.mining.simans_a);
            if !(a > 0.0 && a.is_finite()) {
                return Err(Error::invalid("options.simans_a", format!("must be a finite number above 0, got {a}")));
            }
            let b = o.simans_b.unwrap_or(cfg.mining.simans_b);
            if !b.is_finite() {
                return Err(Error::invalid("options.simans_b", format!("must be finite, got {b}")));
            }
            Sampling::Ambiguous { a, b }
        }
        Err(_) => return Err(Error::invalid("options.sampling", format!("unknown value {}", o.sampling))),
    };
    Ok(MineParams {
        num_negatives: o.num_negatives as usize,
        range_max: range_max as usize,
        filters: Filters {
            range_min: o.range_min as usize,
            min_score: o.min_score,
            max_score: o.max_score,
            absolute_margin: o.absolute_margin,
            relative_margin: o.relative_margin,
            max_positive_similarity: o.max_positive_similarity,
            exclude_batch_positives: o.exclude_batch_positives.unwrap_or(true),
        },
        sampling,
        seed: o.seed,
        adaptive_depth: o.adaptive_depth.unwrap_or(true),
        return_text: o.return_text,
        rerank,
    })
}

/// The batch: 1 to limits.max_batch_queries queries, each with a text or a finite vector,
/// and a bounded number of non-empty positives.
fn validate_queries(queries: &[pb::Query], limits: &LimitsConfig) -> Result<()> {
    if queries.is_empty() {
        return Err(Error::invalid("queries", "is empty: send at least one query"));
    }
    if queries.len() > limits.max_batch_queries {
        return Err(Error::invalid(
            "queries",
            format!("holds {} queries, the limit is {} (limits.max_batch_queries)", queries.len(), limits.max_batch_queries),
        ));
    }
    for (i, q) in queries.iter().enumerate() {
        if q.vector.is_empty() {
            check_text(&format!("queries[{i}].text"), &q.text, limits.max_text_chars).map_err(|e| match e {
                Error::InvalidArgument { field, reason } if reason == "is empty" => {
                    Error::InvalidArgument { field, reason: "is empty and no vector is given".into() }
                }
                e => e,
            })?;
        } else {
            if let Some(j) = q.vector.iter().position(|x| !x.is_finite()) {
                return Err(Error::invalid(format!("queries[{i}].vector[{j}]"), format!("must be finite, got {}", q.vector[j])));
            }
            if q.text.chars().count() > limits.max_text_chars {
                return Err(Error::invalid(format!("queries[{i}].text"), format!("is longer than {} characters", limits.max_text_chars)));
            }
        }
        let positives = q.positive_ids.len() + q.positive_texts.len();
        if positives > limits.max_positives_per_query {
            return Err(Error::invalid(
                format!("queries[{i}].positive_ids"),
                format!("{positives} positives, the limit is {} (limits.max_positives_per_query)", limits.max_positives_per_query),
            ));
        }
        for (j, id) in q.positive_ids.iter().enumerate() {
            if id.is_empty() {
                return Err(Error::invalid(format!("queries[{i}].positive_ids[{j}]"), "is empty"));
            }
        }
        for (j, t) in q.positive_texts.iter().enumerate() {
            check_text(&format!("queries[{i}].positive_texts[{j}]"), t, limits.max_text_chars)?;
        }
    }
    Ok(())
}

/// Score bounds, margins and the positive-similarity limit: finite and in range.
fn check_scores(o: &pb::MineOptions) -> Result<()> {
    for (field, v) in [
        ("options.min_score", o.min_score),
        ("options.max_score", o.max_score),
        ("options.absolute_margin", o.absolute_margin),
        ("options.relative_margin", o.relative_margin),
        ("options.temperature", o.temperature),
        ("options.ce_max_score", o.ce_max_score),
        ("options.ce_relative_margin", o.ce_relative_margin),
        ("options.max_positive_similarity", o.max_positive_similarity),
    ] {
        check_finite(field, v)?;
    }
    if let (Some(lo), Some(hi)) = (o.min_score, o.max_score) {
        if lo > hi {
            return Err(Error::invalid("options.min_score", format!("{lo} is above max_score {hi}")));
        }
    }
    if o.absolute_margin.is_some_and(|m| m < 0.0) {
        return Err(Error::invalid("options.absolute_margin", "must not be negative"));
    }
    if o.relative_margin.is_some_and(|m| !(0.0..=1.0).contains(&m)) {
        return Err(Error::invalid("options.relative_margin", "must lie in [0, 1]"));
    }
    if o.max_positive_similarity.is_some_and(|m| !(-1.0..=1.0).contains(&m)) {
        return Err(Error::invalid("options.max_positive_similarity", "must lie in [-1, 1] (a cosine similarity)"));
    }
    Ok(())
}

/// The cross-encoder options when the request reranks; refused when set without rerank.
fn rerank_filters(o: &pb::MineOptions, queries: &[pb::Query], limits: &LimitsConfig) -> Result<Option<RerankFilters>> {
    if !o.rerank.unwrap_or(false) {
        for (field, set) in [
            ("options.rerank_candidates", o.rerank_candidates.is_some()),
            ("options.ce_max_score", o.ce_max_score.is_some()),
            ("options.ce_relative_margin", o.ce_relative_margin.is_some()),
        ] {
            if set {
                return Err(Error::invalid(field, "applies only when options.rerank is true"));
            }
        }
        return Ok(None);
    }
    let limit = limits.max_rerank_candidates;
    let candidates = o.rerank_candidates.unwrap_or_else(|| o.num_negatives.saturating_mul(3).min(limit));
    if candidates < o.num_negatives {
        return Err(Error::invalid(
            "options.rerank_candidates",
            format!("is {candidates}, below num_negatives ({}): score at least as many as you want back", o.num_negatives),
        ));
    }
    if candidates > limit {
        return Err(Error::invalid("options.rerank_candidates", format!("is {candidates}, the limit is {limit} (limits.max_rerank_candidates)")));
    }
    let pairs = candidates as usize * queries.len();
    if pairs > limits.max_rerank_pairs {
        return Err(Error::invalid(
            "options.rerank_candidates",
            format!(
                "{candidates} candidates x {} queries = {pairs} pairs, the limit is {} (limits.max_rerank_pairs): send smaller batches or fewer candidates",
                queries.len(),
                limits.max_rerank_pairs
            ),
        ));
    }
    if o.ce_max_score.is_some_and(|m| !(m > 0.0 && m <= 1.0)) {
        return Err(Error::invalid("options.ce_max_score", "must lie in (0, 1] (a probability; 0 would drop everything)"));
    }
    if o.ce_relative_margin.is_some_and(|m| !(0.0..1.0).contains(&m)) {
        return Err(Error::invalid("options.ce_relative_margin", "must lie in [0, 1) (1 would drop everything)"));
    }
    for (i, q) in queries.iter().enumerate() {
        if q.text.trim().is_empty() {
            return Err(Error::invalid(format!("queries[{i}].text"), "is empty: rerank scores (query text, document) pairs"));
        }
    }
    Ok(Some(RerankFilters {
        candidates: candidates as usize,
        // Scoring deeper when too few pass stops at 4 rounds' worth.
        max_scored: candidates as usize * 4,
        max_score: o.ce_max_score,
        relative_margin: o.ce_relative_margin,
    }))
}

/// The `denoised` preset: relative margin 0.05 to the positive's score (NV-Retriever's
/// TopK-PercPos), candidates more similar than MAX_POSITIVE_SIMILARITY to a positive dropped,
/// and adaptive depth so the filters do not cost yield. Fields the request sets win.
pub const DENOISED_RELATIVE_MARGIN: f32 = 0.05;
pub const DENOISED_MAX_POSITIVE_SIMILARITY: f32 = 0.65;

fn apply_denoised(o: &mut pb::MineOptions) {
    o.relative_margin.get_or_insert(DENOISED_RELATIVE_MARGIN);
    o.max_positive_similarity.get_or_insert(DENOISED_MAX_POSITIVE_SIMILARITY);
    o.adaptive_depth.get_or_insert(true);
}

/// One Upsert message's documents: ids, texts and titles within their limits, vectors (when
/// given) finite and of at most 65536 dims. Checks against the collection (dims, whether it
/// takes vectors) are the engine's.
pub fn validate_docs(docs: &[pb::Document], cfg: &Config) -> Result<Vec<NewDoc>> {
    if docs.len() > cfg.limits.max_docs_per_message {
        return Err(Error::invalid(
            "documents",
            format!("{} documents in one message, the limit is {} (limits.max_docs_per_message)", docs.len(), cfg.limits.max_docs_per_message),
        ));
    }
    docs.iter()
        .enumerate()
        .map(|(i, d)| {
            if d.id.is_empty() {
                return Err(Error::invalid(format!("documents[{i}].id"), "is empty"));
            }
            if d.id.len() > 512 {
                return Err(Error::invalid(format!("documents[{i}].id"), "is longer than 512 bytes"));
            }
            if d.text.trim().is_empty() && d.title.as_deref().is_none_or(|t| t.trim().is_empty()) {
                return Err(Error::invalid(format!("documents[{i}].text"), "is empty and the document has no title"));
            }
            if d.text.chars().count() > cfg.limits.max_text_chars {
                return Err(Error::invalid(format!("documents[{i}].text"), format!("is longer than {} characters", cfg.limits.max_text_chars)));
            }
            if let Some(t) = &d.title {
                if t.chars().count() > cfg.limits.max_text_chars {
                    return Err(Error::invalid(format!("documents[{i}].title"), format!("is longer than {} characters", cfg.limits.max_text_chars)));
                }
            }
            check_metadata(&format!("documents[{i}].metadata"), &d.metadata, &cfg.limits)?;
            if d.vector.len() > MAX_DIMS {
                return Err(Error::invalid(format!("documents[{i}].vector"), format!("has {} dims, the limit is {MAX_DIMS}", d.vector.len())));
            }
            if let Some(j) = d.vector.iter().position(|x| !x.is_finite()) {
                return Err(Error::invalid(format!("documents[{i}].vector[{j}]"), format!("must be finite, got {}", d.vector[j])));
            }
            let doc = StoredDoc {
                id: d.id.clone(),
                title: d.title.clone().filter(|t| !t.trim().is_empty()),
                text: d.text.clone(),
                metadata: d.metadata.clone().into_iter().collect(),
            };
            Ok((doc, (!d.vector.is_empty()).then(|| d.vector.clone())))
        })
        .collect()
}

/// The checkpoint directory a Refresh names: relative paths are taken from `root`; `..` is
/// refused outright; the resolved directory must exist and lie under `root`.
pub fn resolve_checkpoint(dir: &str, root: &Path) -> Result<PathBuf> {
    let field = "encoder_dir";
    if dir.trim().is_empty() {
        return Err(Error::invalid(field, "is empty"));
    }
    let path = Path::new(dir);
    if path.components().any(|c| matches!(c, std::path::Component::ParentDir)) {
        return Err(Error::invalid(field, format!("{dir:?} contains \"..\"")));
    }
    let configured = root;
    let root = root
        .canonicalize()
        .map_err(|e| Error::FailedPrecondition(format!("encoder.models_root {}: {e}", root.display())))?;
    let joined = if path.is_absolute() { path.to_path_buf() } else { root.join(path) };
    // A relative path that already starts with the models root as configured (e.g.
    // "models/step-2000" with models_root "models") names the same directory.
    let joined = match path.strip_prefix(configured) {
        Ok(rest) if path.is_relative() && !joined.exists() && !rest.as_os_str().is_empty() => root.join(rest),
        _ => joined,
    };
    let resolved = joined.canonicalize().map_err(|e| Error::invalid(field, format!("{}: {e}", joined.display())))?;
    if !resolved.starts_with(&root) || resolved == root {
        return Err(Error::invalid(field, format!("{} is not under encoder.models_root ({})", resolved.display(), root.display())));
    }
    if !resolved.is_dir() {
        return Err(Error::invalid(field, format!("{} is not a directory", resolved.display())));
    }
    Ok(resolved)
}

/// Ids per Delete or GetDocuments request: at most limits.max_docs_per_message.
pub fn check_id_count(ids: &[String], cfg: &Config) -> Result<()> {
    let limit = cfg.limits.max_docs_per_message;
    if ids.len() > limit {
        return Err(Error::invalid("ids", format!("{} ids, the limit is {limit}", ids.len())));
    }
    Ok(())
}

/// One UploadVectors message's vectors: a bounded count, ids, and finite vectors of one size.
pub fn check_vectors(vectors: &[pb::DocumentVector], cfg: &Config) -> Result<()> {
    if vectors.len() > cfg.limits.max_docs_per_message {
        return Err(Error::invalid(
            "vectors",
            format!("{} vectors in one message, the limit is {} (limits.max_docs_per_message)", vectors.len(), cfg.limits.max_docs_per_message),
        ));
    }
    let dims = vectors.first().map(|v| v.vector.len()).unwrap_or(0);
    for (i, v) in vectors.iter().enumerate() {
        if v.id.is_empty() {
            return Err(Error::invalid(format!("vectors[{i}].id"), "is empty"));
        }
        if v.vector.is_empty() || v.vector.len() != dims || dims > MAX_DIMS {
            return Err(Error::invalid(format!("vectors[{i}].vector"), format!("has {} dims, vectors[0] has {dims}", v.vector.len())));
        }
        if let Some(j) = v.vector.iter().position(|x| !x.is_finite()) {
            return Err(Error::invalid(format!("vectors[{i}].vector[{j}]"), format!("must be finite, got {}", v.vector[j])));
        }
    }
    Ok(())
}
#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> Config {
        Config::load_with_env(None, &Default::default(), Some(Default::default())).unwrap()
    }

    fn req(queries: usize, options: pb::MineOptions) -> pb::MineRequest {
        pb::MineRequest {
            collection: "c".into(),
            batch_id: 0,
            queries: (0..queries).map(|_| pb::Query { text: "wing flutter".into(), ..Default::default() }).collect(),
            options: Some(options),
            min_generation: None,
        }
    }

    fn refused(options: pb::MineOptions, queries: usize) -> String {
        match validate_mine(&req(queries, options), &cfg()) {
            Err(Error::InvalidArgument { field, .. }) => field,
            other => panic!("accepted or wrong error: {other:?}"),
        }
    }

    #[test]
    fn preset_fills_only_what_the_request_leaves_unset() {
        let base = pb::MineOptions { num_negatives: 5, preset: pb::Preset::Denoised as i32, ..Default::default() };
        let p = validate_mine(&req(1, base.clone()), &cfg()).unwrap();
        assert_eq!(p.filters.relative_margin, Some(DENOISED_RELATIVE_MARGIN));
        assert_eq!(p.filters.max_positive_similarity, Some(DENOISED_MAX_POSITIVE_SIMILARITY));
        assert!(p.adaptive_depth);
        let own = pb::MineOptions { relative_margin: Some(0.1), adaptive_depth: Some(false), ..base };
        let p = validate_mine(&req(1, own), &cfg()).unwrap();
        assert_eq!(p.filters.relative_margin, Some(0.1));
        assert_eq!(p.filters.max_positive_similarity, Some(DENOISED_MAX_POSITIVE_SIMILARITY));
        assert!(!p.adaptive_depth);
        let none = validate_mine(&req(1, pb::MineOptions { num_negatives: 5, ..Default::default() }), &cfg()).unwrap();
        assert_eq!((none.filters.relative_margin, none.filters.max_positive_similarity), (None, None));
    }

    #[test]
    fn rerank_options_are_bounded_and_named() {
        let rerank = pb::MineOptions { num_negatives: 5, rerank: Some(true), ..Default::default() };
        let p = validate_mine(&req(2, rerank.clone()), &cfg()).unwrap().rerank.unwrap();
        assert_eq!((p.candidates, p.max_scored), (15, 60), "3 x num_negatives, 4 rounds");
        let cases = [
            (pb::MineOptions { ce_max_score: Some(0.0), ..rerank.clone() }, 1, "options.ce_max_score"),
            (pb::MineOptions { ce_max_score: Some(f32::NAN), ..rerank.clone() }, 1, "options.ce_max_score"),
            (pb::MineOptions { ce_relative_margin: Some(1.0), ..rerank.clone() }, 1, "options.ce_relative_margin"),
            (pb::MineOptions { rerank_candidates: Some(4), ..rerank.clone() }, 1, "options.rerank_candidates"),
            (pb::MineOptions { rerank_candidates: Some(257), ..rerank.clone() }, 1, "options.rerank_candidates"),
            (pb::MineOptions { rerank_candidates: Some(200), ..rerank.clone() }, 21, "options.rerank_candidates"),
            (pb::MineOptions { ce_max_score: Some(0.1), rerank: None, ..rerank.clone() }, 1, "options.ce_max_score"),
            (pb::MineOptions { max_positive_similarity: Some(-1.5), ..rerank.clone() }, 1, "options.max_positive_similarity"),
        ];
        for (options, queries, field) in cases {
            assert_eq!(refused(options, queries), field);
        }
        let ok = pb::MineOptions { ce_max_score: Some(1.0), ce_relative_margin: Some(0.0), rerank_candidates: Some(5), ..rerank };
        assert!(validate_mine(&req(1, ok), &cfg()).is_ok());
    }

    #[test]
    fn checkpoint_paths_stay_under_the_models_root() {
        let root = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(root.path().join("models/step-1")).unwrap();
        std::fs::create_dir_all(root.path().join("elsewhere")).unwrap();
        std::fs::write(root.path().join("models/file"), b"x").unwrap();
        let models = root.path().join("models");
        let ok = resolve_checkpoint("step-1", &models).unwrap();
        assert_eq!(ok, models.join("step-1").canonicalize().unwrap());

        assert_eq!(resolve_checkpoint(models.join("step-1").to_str().unwrap(), &models).unwrap(), ok, "absolute inside is fine");
        #[cfg(unix)]
        std::os::unix::fs::symlink(root.path().join("elsewhere"), models.join("link")).unwrap();
        for bad in ["", "../elsewhere", "step-1/../../elsewhere", "missing", "file", "link", "."] {
            assert!(matches!(resolve_checkpoint(bad, &models), Err(Error::InvalidArgument { .. })), "{bad:?} accepted");
        }
        let outside = root.path().join("elsewhere");
        assert!(resolve_checkpoint(outside.to_str().unwrap(), &models).is_err());
    }

    #[test]
    fn ambiguous_sampling_takes_its_options_or_the_configured_defaults() {
        let base = pb::MineOptions { num_negatives: 3, sampling: pb::Sampling::Ambiguous as i32, ..Default::default() };
        let params = validate_mine(&req(1, base.clone()), &cfg()).unwrap();
        assert_eq!(params.sampling, Sampling::Ambiguous { a: 20.0, b: -0.05 }, "mining.simans_a / simans_b");
        let set = pb::MineOptions { simans_a: Some(5.0), simans_b: Some(0.1), ..base.clone() };
        assert_eq!(validate_mine(&req(1, set), &cfg()).unwrap().sampling, Sampling::Ambiguous { a: 5.0, b: 0.1 });
        assert_eq!(refused(pb::MineOptions { simans_a: Some(0.0), ..base.clone() }, 1), "options.simans_a");
        assert_eq!(refused(pb::MineOptions { simans_a: Some(f32::NAN), ..base.clone() }, 1), "options.simans_a");
        assert_eq!(refused(pb::MineOptions { simans_b: Some(f32::INFINITY), ..base }, 1), "options.simans_b");
    }

    /// `hardneg refresh --encoder models/step-2 ` with models_root "models": the path already
    /// starts with the root as configured, and is taken as meant.
    #[test]
    fn a_path_that_repeats_a_relative_models_root_is_taken_as_meant() {
        let here = tempfile::tempdir_in(".").unwrap();
        let name = here.path().file_name().unwrap().to_str().unwrap().to_string();
        std::fs::create_dir_all(here.path().join("models/step-2")).unwrap();
        let root = Path::new(&name).join("models");
        let want = here.path().join("models/step-2").canonicalize().unwrap();
        assert_eq!(resolve_checkpoint("step-2", &root).unwrap(), want);
        assert_eq!(resolve_checkpoint(&format!("{name}/models/step-2"), &root).unwrap(), want);
        assert!(resolve_checkpoint(&format!("{name}/models/missing"), &root).is_err());
        assert!(resolve_checkpoint(&format!("{name}/models"), &root).is_err(), "the root itself is no checkpoint");
    }
}
