//! The gRPC surface. Every handler validates first (`validate`, messages name the field),
//! converts to the engine's domain types (`convert`), calls the engine, and converts back;
//! errors become statuses in one table (`status`). Handlers by RPC group: `collections`,
//! `documents`, `mining` (unary and streaming share one inner function), `refresh`.
pub mod auth;
mod collections;
pub mod convert;
mod documents;
mod mining;
mod refresh;
pub mod status;
pub mod validate;

use std::future::Future;
use std::sync::Arc;

use tonic::{Request, Response, Status, Streaming};

pub use validate::{DENOISED_MAX_POSITIVE_SIMILARITY, DENOISED_RELATIVE_MARGIN, resolve_checkpoint, validate_mine, validate_name};

use crate::config::Config;
use crate::engine::Engine;
use crate::error::{Error, Result};
use crate::proto as pb;
use status::Refusal;

pub struct MinerService {
    engine: Arc<Engine>,
    cfg: Arc<Config>,
    /// Slots for data requests (unary calls and stream batches): limits.max_in_flight.
    in_flight: Arc<tokio::sync::Semaphore>,
    /// Open MineStream streams: limits.max_streams.
    streams: Arc<tokio::sync::Semaphore>,
}

impl MinerService {
    pub fn new(engine: Arc<Engine>) -> Self {
        let cfg = engine.config().clone();
        let in_flight = Arc::new(tokio::sync::Semaphore::new(cfg.limits.max_in_flight));
        let streams = Arc::new(tokio::sync::Semaphore::new(cfg.limits.max_streams));
        Self { engine, cfg, in_flight, streams }
    }

    /// A slot for a unary data request, or RESOURCE_EXHAUSTED at once when all are taken.
    fn slot(&self) -> Result<tokio::sync::OwnedSemaphorePermit> {
        self.in_flight.clone().try_acquire_owned().map_err(|_| {
            Error::Overloaded(format!(
                "{} requests in flight, the limit is {} (limits.max_in_flight); retry with backoff",
                self.cfg.limits.max_in_flight, self.cfg.limits.max_in_flight
            ))
        })
    }
}

/// Runs a handler as one RPC: timed and counted by outcome, its refusal turned into a status.
async fn rpc<T>(name: &'static str, handler: impl Future<Output = Result<T, Refusal>>) -> Result<Response<T>, Status> {
    crate::metrics::timed(name, async move { handler.await.map(Response::new).map_err(Refusal::into_status) }).await
}

#[tonic::async_trait]
impl pb::negative_miner_server::NegativeMiner for MinerService {
    async fn create_collection(&self, request: Request<pb::CreateCollectionRequest>) -> Result<Response<pb::CollectionInfo>, Status> {
        rpc("CreateCollection", self.create_collection(request.into_inner())).await
    }

    async fn get_collection(&self, request: Request<pb::GetCollectionRequest>) -> Result<Response<pb::CollectionInfo>, Status> {
        rpc("GetCollection", self.get_collection(request.into_inner())).await
    }

    async fn list_collections(&self, _request: Request<pb::ListCollectionsRequest>) -> Result<Response<pb::ListCollectionsResponse>, Status> {
        rpc("ListCollections", self.list_collections()).await
    }

    async fn drop_collection(&self, request: Request<pb::DropCollectionRequest>) -> Result<Response<pb::DropCollectionResponse>, Status> {
        rpc("DropCollection", self.drop_collection(request.into_inner())).await
    }

    async fn upsert(&self, request: Request<Streaming<pb::UpsertRequest>>) -> Result<Response<pb::UpsertResponse>, Status> {
        rpc("Upsert", self.upsert(request.into_inner())).await
    }

    async fn delete(&self, request: Request<pb::DeleteRequest>) -> Result<Response<pb::DeleteResponse>, Status> {
        rpc("Delete", self.delete(request.into_inner())).await
    }

    async fn get_documents(&self, request: Request<pb::GetDocumentsRequest>) -> Result<Response<pb::GetDocumentsResponse>, Status> {
        rpc("GetDocuments", self.get_documents(request.into_inner())).await
    }

    async fn mine(&self, request: Request<pb::MineRequest>) -> Result<Response<pb::MineResponse>, Status> {
        rpc("Mine", self.mine(request.into_inner())).await
    }

    type MineStreamStream = mining::MineStreamOut;

    /// Up to STREAM_IN_FLIGHT batches are mined at once; answers keep request order. An
    /// invalid batch ends the stream with its status (the message names the batch id).
    async fn mine_stream(&self, request: Request<Streaming<pb::MineRequest>>) -> Result<Response<Self::MineStreamStream>, Status> {
        rpc("MineStream", self.mine_stream(request.into_inner())).await
    }

    type RefreshStream = refresh::RefreshOut;

    async fn refresh(&self, request: Request<pb::RefreshRequest>) -> Result<Response<Self::RefreshStream>, Status> {
        rpc("Refresh", self.refresh(request.into_inner())).await
    }

    async fn upload_vectors(&self, request: Request<Streaming<pb::UploadVectorsRequest>>) -> Result<Response<pb::UploadVectorsResponse>, Status> {
        rpc("UploadVectors", self.upload_vectors(request.into_inner())).await
    }

    async fn commit_vectors(&self, request: Request<pb::CommitVectorsRequest>) -> Result<Response<pb::CommitVectorsResponse>, Status> {
        rpc("CommitVectors", self.commit_vectors(request.into_inner())).await
    }

    async fn cancel_refresh(&self, request: Request<pb::CancelRefreshRequest>) -> Result<Response<pb::CancelRefreshResponse>, Status> {
        rpc("CancelRefresh", self.cancel_refresh(request.into_inner())).await
    }
}
