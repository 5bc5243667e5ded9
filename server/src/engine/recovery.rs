//! Bringing every collection back at start: documents from the store, the current
//! generation's encoder (refused, with the reason kept, when its fingerprint no longer
//! matches), and its index (see `persist`). A re-encode refresh that was interrupted is
//! dropped; uploaded trainer vectors are kept.
use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::collection::{Collection, DocTable, Generation, prompts_in_force};
use super::Engine;
use crate::encode::{BatchConfig, EncodeError, Encoder, Placement, Prompts};
use crate::index::{Metric, Quantization};
use crate::store::{CollectionMeta, EncoderKind, GenerationMeta, PromptOverrides};

impl Engine {
    /// Loads every collection of the store into the registry.
    pub(super) fn recover(&self) -> anyhow::Result<()> {
        for mut meta in self.store.collections()? {
            if let Some(b) = meta.building.clone().filter(|b| b.encoder.kind != EncoderKind::Trainer) {
                self.store.abort_generation(&meta.name)?;
                meta.building = None;
                tracing::warn!(collection = %meta.name, generation = b.number, "removed the half-built generation of an interrupted re-encode refresh");
            }
            let name = meta.name.clone();
            let coll = self.load_collection(meta)?;
            self.collections.write().insert(name, Arc::new(coll));
        }
        Ok(())
    }

    /// Loads the encoder of a checkpoint directory. Each generation holds its own, so a model
    /// leaves memory with the last generation (and request) using it.
    pub(super) fn checkpoint_encoder(&self, dir: &Path) -> Result<Encoder, EncodeError> {
        let cfg = &self.cfg.encoder;
        let batch = BatchConfig {
            token_budget: cfg.token_budget,
            max_batch_texts: cfg.max_batch_texts,
            queue_capacity: cfg.queue_capacity,
        };
        let placement = Placement { device: cfg.device_spec(), dtype: cfg.dtype_spec() };
        Encoder::load_on(dir, cfg.max_tokens, batch, placement)
    }

    /// The encoder that can encode text for a generation, with the prompts in force, or why
    /// none can. The fingerprint covers the prompts: a model whose own prompts changed since
    /// the vectors were made is a mismatch like any other.
    fn generation_encoder(&self, collection: &str, overrides: &PromptOverrides, g: &GenerationMeta) -> (Option<Encoder>, String, Prompts) {
        let short = |fp: &str| fp[..12.min(fp.len())].to_string();
        match g.encoder.kind {
            EncoderKind::Server => {
                let info = self.encoder.info();
                let prompts = prompts_in_force(overrides, info);
                let fingerprint = info.fingerprint_for(&prompts);
                if fingerprint == g.encoder.fingerprint {
                    (Some(self.encoder.clone()), String::new(), prompts)
                } else {
                    (None, format!(
                        "collection {collection:?} was encoded with encoder {} ({}), the server runs {} ({}, prompts included): text cannot be encoded for it; send query vectors or refresh it",
                        g.encoder.name, short(&g.encoder.fingerprint), info.name, short(&fingerprint)
                    ), Prompts::default())
                }
            }
            EncoderKind::Checkpoint => {
                let dir = PathBuf::from(g.encoder.dir.clone().unwrap_or_default());
                match self.checkpoint_encoder(&dir) {
                    Ok(e) => {
                        let prompts = prompts_in_force(overrides, e.info());
                        let fingerprint = e.info().fingerprint_for(&prompts);
                        if fingerprint == g.encoder.fingerprint {
                            (Some(e), String::new(), prompts)
                        } else {
                            (None, format!(
                                "collection {collection:?} generation {} was encoded with the checkpoint in {} ({}), which now holds {} (prompts included): text cannot be encoded for it; send query vectors or refresh it",
                                g.number, dir.display(), short(&g.encoder.fingerprint), short(&fingerprint)
                            ), Prompts::default())
                        }
                    }
                    Err(err) => (None, format!(
                        "collection {collection:?} generation {}: its encoder checkpoint cannot be loaded ({err}): send query vectors or refresh it",
                        g.number
                    ), Prompts::default()),
                }
            }
            EncoderKind::Trainer => (None, trainer_no_text(collection, g), Prompts::default()),
        }
    }

    fn load_collection(&self, meta: CollectionMeta) -> anyhow::Result<Collection> {
        let metric = Metric::parse(&meta.metric)
            .ok_or_else(|| anyhow::anyhow!("collection {}: unknown metric {:?}", meta.name, meta.metric))?;
        let quantization = Quantization::parse(&meta.quantization)
            .ok_or_else(|| anyhow::anyhow!("collection {}: unknown quantization {:?}", meta.name, meta.quantization))?;
        let (encoder, no_text, prompts) = self.generation_encoder(&meta.name, &meta.prompts, &meta.current);
        if encoder.is_none() && meta.current.encoder.kind != EncoderKind::Trainer {
            tracing::warn!("{no_text}");
        }
        let mut docs = DocTable::default();
        for (key, doc) in self.store.scan(&meta.name)? {
            docs.insert(key, &doc);
        }
        let (index, saved_version) = self.load_index(&meta, metric, quantization)?;
        docs.pending = docs.by_key.keys().filter(|k| !index.contains(**k)).copied().collect();
        let generation = Generation { meta: meta.current.clone(), index, encoder, no_text, prompts };
        let coll = Collection::new(meta, metric, quantization, generation, docs);
        coll.set_saved_version(saved_version);
        Ok(coll)
    }
}

/// Why the server cannot encode text for a generation of trainer vectors.
pub(super) fn trainer_no_text(collection: &str, g: &GenerationMeta) -> String {
    format!(
        "collection {collection:?} generation {} holds vectors from the trainer's encoder {:?}: the server cannot encode text for it; send query vectors (and upload vectors for new documents)",
        g.number, g.encoder.name
    )
}
