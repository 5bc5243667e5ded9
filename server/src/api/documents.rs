//! Upsert (a client stream of documents), Delete, GetDocuments.
use tonic::Streaming;

use super::status::{Refusal, inbound};
use super::validate::{check_id_count, validate_docs, validate_name};
use super::{MinerService, convert};
use crate::error::Error;
use crate::proto as pb;

impl MinerService {
    /// Commits message by message: when message k fails, the documents of messages 0..k-1
    /// are committed, and the error says so.
    pub(super) async fn upsert(&self, stream: Streaming<pb::UpsertRequest>) -> Result<pb::UpsertResponse, Refusal> {
        let _slot = self.slot()?;
        let mut progress = UpsertProgress::default();
        self.upsert_messages(stream, &mut progress).await.map_err(|r| {
            let (k, n) = (progress.messages, progress.inserted + progress.updated);
            r.context(&format!("upsert message {k} (counting from 0; the {k} messages before it, {n} documents, are committed)"))
        })
    }

    async fn upsert_messages(&self, mut stream: Streaming<pb::UpsertRequest>, progress: &mut UpsertProgress) -> Result<pb::UpsertResponse, Refusal> {
        let mut collection: Option<String> = None;
        let mut coll = None;
        while let Some(msg) = stream.message().await.map_err(inbound)? {
            let name = match (&collection, msg.collection.as_str()) {
                (None, "") => return Err(Error::invalid("collection", "is empty in the first message").into()),
                (None, n) => {
                    validate_name("collection", n)?;
                    collection = Some(n.to_string());
                    coll = Some(self.engine.get(n)?);
                    n.to_string()
                }
                (Some(c), n) if n.is_empty() || n == c => c.clone(),
                (Some(c), n) => {
                    return Err(Error::invalid("collection", format!("changed from {c:?} to {n:?} within one stream")).into());
                }
            };
            let docs = validate_docs(&msg.documents, &self.cfg)?;
            let coll = coll.as_ref().expect("set with the first message");
            let (i, u) = self.engine.upsert_docs(coll, docs).await.map_err(|e| {
                tracing::debug!(collection = %name, error = %e, "upsert failed");
                e
            })?;
            progress.inserted += i;
            progress.updated += u;
            progress.messages += 1;
        }
        let (doc_count, pending) = coll.map(|c| c.counts()).unwrap_or((0, 0));
        Ok(pb::UpsertResponse { inserted: progress.inserted, updated: progress.updated, doc_count, pending })
    }

    pub(super) async fn delete(&self, req: pb::DeleteRequest) -> Result<pb::DeleteResponse, Refusal> {
        let _slot = self.slot()?;
        validate_name("collection", &req.collection)?;
        check_id_count(&req.ids, &self.cfg)?;
        if let Some(i) = req.ids.iter().position(String::is_empty) {
            return Err(Error::invalid(format!("ids[{i}]"), "is empty").into());
        }
        let coll = self.engine.get(&req.collection)?;
        let (deleted, not_found) = self.engine.delete(&coll, req.ids).await?;
        Ok(pb::DeleteResponse { deleted, not_found })
    }

    pub(super) async fn get_documents(&self, req: pb::GetDocumentsRequest) -> Result<pb::GetDocumentsResponse, Refusal> {
        let _slot = self.slot()?;
        validate_name("collection", &req.collection)?;
        check_id_count(&req.ids, &self.cfg)?;
        let coll = self.engine.get(&req.collection)?;
        let (docs, missing) = self.engine.documents(&coll, req.ids).await?;
        Ok(pb::GetDocumentsResponse { documents: docs.into_iter().map(convert::document).collect(), missing })
    }
}

/// How far an Upsert stream got: messages committed, and their documents.
#[derive(Default)]
struct UpsertProgress {
    messages: u64,
    inserted: u64,
    updated: u64,
}
