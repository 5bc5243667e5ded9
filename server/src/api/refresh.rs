//! Refresh (a stream of progress until the swap, or the status it failed with),
//! UploadVectors, CommitVectors, CancelRefresh.
use std::pin::Pin;
use std::sync::Arc;

use futures::Stream;
use tonic::{Status, Streaming};

use super::status::{self, Refusal, inbound};
use super::validate::{check_vectors, resolve_checkpoint, validate_name};
use super::{MinerService, convert};
use crate::engine::{Collection, RefreshPhase};
use crate::error::Error;
use crate::proto as pb;

pub type RefreshOut = Pin<Box<dyn Stream<Item = Result<pb::RefreshProgress, Status>> + Send>>;

impl MinerService {
    pub(super) async fn refresh(&self, req: pb::RefreshRequest) -> Result<RefreshOut, Refusal> {
        validate_name("collection", &req.collection)?;
        let dir = resolve_checkpoint(&req.encoder_dir, &self.cfg.encoder.models_root)?;
        let coll = self.engine.get(&req.collection)?;
        let rx = self.engine.start_reencode(&coll, &dir).await?;
        // Every change, then the end: a failed or cancelled refresh ends with its status.
        let stream = futures::stream::unfold((rx, false), |(mut rx, finished)| async move {
            if finished {
                return None;
            }
            let p = rx.borrow_and_update().clone();
            let item = if p.phase == RefreshPhase::Done {
                (Ok(convert::refresh_progress(&p)), true)
            } else if let Some(ended) = status::refresh_ended(&p) {
                (Err(ended), true)
            } else {
                match rx.changed().await {
                    Ok(()) => (Ok(convert::refresh_progress(&p)), false),
                    // The job always sends a final state before its sender goes; this is a bug.
                    Err(_) => (Err(status::refresh_lost(&p.collection)), true),
                }
            };
            Some((item.0, (rx, item.1)))
        });
        Ok(Box::pin(stream) as RefreshOut)
    }

    pub(super) async fn upload_vectors(&self, mut stream: Streaming<pb::UploadVectorsRequest>) -> Result<pb::UploadVectorsResponse, Refusal> {
        let _slot = self.slot()?;
        let mut target: Option<(Arc<Collection>, String)> = None;
        let mut out = pb::UploadVectorsResponse::default();
        while let Some(msg) = stream.message().await.map_err(inbound)? {
            if target.is_none() {
                validate_name("collection", &msg.collection)?;
                let name = msg.encoder_name.trim();
                if name.is_empty() || name.len() > 256 {
                    return Err(Error::invalid("encoder_name", "is required in the first message (1-256 bytes)").into());
                }
                target = Some((self.engine.get(&msg.collection)?, name.to_string()));
            }
            let (coll, encoder_name) = target.as_ref().expect("set by the first message");
            let current = coll.name();
            if !msg.collection.is_empty() && msg.collection != current {
                return Err(Error::invalid("collection", format!("changed from {current:?} to {:?} within one stream", msg.collection)).into());
            }
            if !msg.encoder_name.is_empty() && msg.encoder_name.trim() != encoder_name {
                return Err(Error::invalid("encoder_name", "changed within one stream").into());
            }
            check_vectors(&msg.vectors, &self.cfg)?;
            let items = msg.vectors.into_iter().map(|v| (v.id, v.vector)).collect();
            let (written, generation, missing) = self.engine.upload_vectors(coll, encoder_name, items).await?;
            out.received += written;
            out.generation = generation;
            out.missing = missing;
        }
        if target.is_none() {
            return Err(Error::invalid("collection", "no message received").into());
        }
        Ok(out)
    }

    pub(super) async fn commit_vectors(&self, req: pb::CommitVectorsRequest) -> Result<pb::CommitVectorsResponse, Refusal> {
        let _slot = self.slot()?;
        validate_name("collection", &req.collection)?;
        let coll = self.engine.get(&req.collection)?;
        let started = std::time::Instant::now();
        self.engine.commit_vectors(&coll).await?;
        let collection = Some(convert::collection_info(self.engine.summary(&coll)));
        Ok(pb::CommitVectorsResponse { collection, seconds: started.elapsed().as_secs_f64() })
    }

    pub(super) async fn cancel_refresh(&self, req: pb::CancelRefreshRequest) -> Result<pb::CancelRefreshResponse, Refusal> {
        validate_name("collection", &req.collection)?;
        let coll = self.engine.get(&req.collection)?;
        let what = self.engine.cancel_refresh(&coll).await?;
        Ok(pb::CancelRefreshResponse { cancelled: what.is_some(), what: what.unwrap_or_else(|| "nothing was running".into()) })
    }
}
