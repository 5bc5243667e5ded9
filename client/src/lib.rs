//! Typed async client for the hardneg service, and BEIR readers shared with the `hardneg` CLI.
pub mod beir;

use futures::Stream;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint};

/// Generated wire types and the raw client stub (package `hardneg.v1`).
pub use hardneg_proto as proto;

pub use proto::negative_miner_client::NegativeMinerClient;
pub use tonic::{Code, Status};

/// Adds `authorization: Bearer <token>` to every call when a token is set.
#[derive(Clone)]
pub struct BearerToken(Option<tonic::metadata::MetadataValue<tonic::metadata::Ascii>>);

impl tonic::service::Interceptor for BearerToken {
    fn call(&mut self, mut request: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(value) = &self.0 {
            request.metadata_mut().insert("authorization", value.clone());
        }
        Ok(request)
    }
}

type Miner = NegativeMinerClient<tonic::service::interceptor::InterceptedService<Channel, BearerToken>>;

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("connecting to {addr}: {source}")]
    Connect { addr: String, source: tonic::transport::Error },
    #[error("invalid address {0:?}")]
    Address(String),
    #[error("the token holds characters a header cannot carry")]
    Token,
    #[error("TLS: {0}")]
    Tls(String),
    #[error("{}: {}", .0.code(), .0.message())]
    Status(#[from] tonic::Status),
}

impl ClientError {
    /// The gRPC status code, when the server answered.
    pub fn code(&self) -> Option<Code> {
        match self {
            ClientError::Status(s) => Some(s.code()),
            _ => None,
        }
    }
}

pub type Result<T, E = ClientError> = std::result::Result<T, E>;

/// How [`Client::connect_with`] connects.
#[derive(Debug, Clone, Default)]
pub struct ConnectOptions {
    /// Sent as `authorization: Bearer <token>` with every call.
    pub token: Option<String>,
    /// PEM certificate(s) of the CA that signed the server's certificate (https:// only).
    pub tls_ca_pem: Option<Vec<u8>>,
    /// The name to check the server's certificate against, when not the address's host.
    pub tls_domain: Option<String>,
}

/// A connection to one hardneg server. Cheap to clone; clones share the channel.
#[derive(Clone)]
pub struct Client {
    miner: Miner,
    health: tonic_health::pb::health_client::HealthClient<Channel>,
}

impl Client {
    /// Connects to `addr` (e.g. `http://127.0.0.1:50051`).
    pub async fn connect(addr: &str) -> Result<Self> {
        Self::connect_with_token(addr, None).await
    }

    /// Connects, sending `token` as a bearer token with every call (servers with auth on).
    pub async fn connect_with_token(addr: &str, token: Option<&str>) -> Result<Self> {
        Self::connect_with(addr, &ConnectOptions { token: token.map(str::to_string), ..Default::default() }).await
    }

    /// Connects with `options`. An `https://` address uses TLS: the server's certificate is
    /// checked against `options.tls_ca_pem` when given, else against the system's roots.
    pub async fn connect_with(addr: &str, options: &ConnectOptions) -> Result<Self> {
        let token = options
            .token
            .as_deref()
            .map(|t| format!("Bearer {}", t.trim()).parse().map_err(|_| ClientError::Token))
            .transpose()?;
        let mut endpoint = Endpoint::from_shared(addr.to_string()).map_err(|_| ClientError::Address(addr.to_string()))?;
        let https = addr.starts_with("https://");
        if !https && (options.tls_ca_pem.is_some() || options.tls_domain.is_some()) {
            return Err(ClientError::Tls(format!("a CA or TLS domain was given but {addr:?} is not an https:// address")));
        }
        if https {
            let mut tls = ClientTlsConfig::new();
            tls = match &options.tls_ca_pem {
                Some(pem) => tls.ca_certificate(Certificate::from_pem(pem)),
                None => tls.with_native_roots(),
            };
            if let Some(domain) = &options.tls_domain {
                tls = tls.domain_name(domain.clone());
            }
            endpoint = endpoint.tls_config(tls).map_err(|e| ClientError::Tls(e.to_string()))?;
        }
        let channel = endpoint
            .connect()
            .await
            .map_err(|source| ClientError::Connect { addr: addr.to_string(), source })?;
        let miner = NegativeMinerClient::with_interceptor(channel.clone(), BearerToken(token))
            .max_decoding_message_size(256 << 20)
            .max_encoding_message_size(256 << 20);
        Ok(Self { miner, health: tonic_health::pb::health_client::HealthClient::new(channel) })
    }

    /// The raw generated stub, for calls this wrapper does not cover.
    pub fn raw(&mut self) -> &mut Miner {
        &mut self.miner
    }

    /// True when the server reports the NegativeMiner service as SERVING.
    pub async fn ready(&mut self) -> Result<bool> {
        let req = tonic_health::pb::HealthCheckRequest { service: "hardneg.v1.NegativeMiner".into() };
        let status = self.health.check(req).await?.into_inner().status;
        Ok(status == tonic_health::pb::health_check_response::ServingStatus::Serving as i32)
    }

    pub async fn create_collection(
        &mut self,
        name: &str,
        quantization: proto::Quantization,
    ) -> Result<proto::CollectionInfo> {
        let req = proto::CreateCollectionRequest {
            name: name.into(),
            metric: proto::Metric::Cosine as i32,
            quantization: quantization as i32,
            ..Default::default()
        };
        self.create(req).await
    }

    /// Creates a vectors-only cosine collection of `dims`: the server encodes no text, so every
    /// document and query carries its vector. `encoder_name` names where the vectors come from
    /// (None: the server's default, "trainer").
    pub async fn create_vectors_collection(
        &mut self,
        name: &str,
        dims: u32,
        quantization: proto::Quantization,
        encoder_name: Option<&str>,
    ) -> Result<proto::CollectionInfo> {
        let req = proto::CreateCollectionRequest {
            name: name.into(),
            metric: proto::Metric::Cosine as i32,
            quantization: quantization as i32,
            dims,
            encoder_name: encoder_name.unwrap_or_default().into(),
            ..Default::default()
        };
        self.create(req).await
    }

    /// Creates a collection with every option of the request (metric, prompts, dims).
    pub async fn create(&mut self, req: proto::CreateCollectionRequest) -> Result<proto::CollectionInfo> {
        Ok(self.miner.create_collection(req).await?.into_inner())
    }

    pub async fn get_collection(&mut self, name: &str) -> Result<proto::CollectionInfo> {
        Ok(self.miner.get_collection(proto::GetCollectionRequest { name: name.into() }).await?.into_inner())
    }

    pub async fn list_collections(&mut self) -> Result<Vec<proto::CollectionInfo>> {
        Ok(self.miner.list_collections(proto::ListCollectionsRequest {}).await?.into_inner().collections)
    }

    pub async fn drop_collection(&mut self, name: &str) -> Result<bool> {
        Ok(self.miner.drop_collection(proto::DropCollectionRequest { name: name.into() }).await?.into_inner().dropped)
    }

    /// Streams batches of documents into `collection`; returns once all are durable. In a
    /// vectors-only collection every document carries its `vector`.
    pub async fn upsert(
        &mut self,
        collection: &str,
        batches: impl Stream<Item = Vec<proto::Document>> + Send + 'static,
    ) -> Result<proto::UpsertResponse> {
        use futures::StreamExt;
        let collection = collection.to_string();
        let requests = batches.map(move |documents| proto::UpsertRequest { collection: collection.clone(), documents });
        Ok(self.miner.upsert(requests).await?.into_inner())
    }

    pub async fn delete(&mut self, collection: &str, ids: Vec<String>) -> Result<proto::DeleteResponse> {
        Ok(self.miner.delete(proto::DeleteRequest { collection: collection.into(), ids }).await?.into_inner())
    }

    pub async fn get_documents(&mut self, collection: &str, ids: Vec<String>) -> Result<proto::GetDocumentsResponse> {
        Ok(self
            .miner
            .get_documents(proto::GetDocumentsRequest { collection: collection.into(), ids })
            .await?
            .into_inner())
    }

    pub async fn mine(&mut self, request: proto::MineRequest) -> Result<proto::MineResponse> {
        Ok(self.miner.mine(request).await?.into_inner())
    }

    /// Sends batches as they come and yields responses in request order. The server works on
    /// several batches at once, so a trainer keeps mining ahead of its training step.
    pub async fn mine_stream(
        &mut self,
        requests: impl Stream<Item = proto::MineRequest> + Send + 'static,
    ) -> Result<tonic::Streaming<proto::MineResponse>> {
        Ok(self.miner.mine_stream(requests).await?.into_inner())
    }

    /// Starts re-encoding `collection` with the checkpoint in `encoder_dir` (under the server's
    /// encoder.models_root); yields progress until the new generation is current. The refresh
    /// runs on if this stream is dropped.
    pub async fn refresh(&mut self, collection: &str, encoder_dir: &str) -> Result<tonic::Streaming<proto::RefreshProgress>> {
        let req = proto::RefreshRequest { collection: collection.into(), encoder_dir: encoder_dir.into() };
        Ok(self.miner.refresh(req).await?.into_inner())
    }

    /// Streams (document id, vector) batches into the collection's pending generation, named
    /// `encoder_name`. Commit with [`Client::commit_vectors`].
    pub async fn upload_vectors(
        &mut self,
        collection: &str,
        encoder_name: &str,
        batches: impl Stream<Item = Vec<(String, Vec<f32>)>> + Send + 'static,
    ) -> Result<proto::UploadVectorsResponse> {
        use futures::StreamExt;
        let (collection, encoder_name) = (collection.to_string(), encoder_name.to_string());
        let requests = batches.map(move |batch| proto::UploadVectorsRequest {
            collection: collection.clone(),
            encoder_name: encoder_name.clone(),
            vectors: batch.into_iter().map(|(id, vector)| proto::DocumentVector { id, vector }).collect(),
        });
        Ok(self.miner.upload_vectors(requests).await?.into_inner())
    }

    /// Makes the uploaded vectors the collection's current generation.
    pub async fn commit_vectors(&mut self, collection: &str) -> Result<proto::CommitVectorsResponse> {
        Ok(self.miner.commit_vectors(proto::CommitVectorsRequest { collection: collection.into() }).await?.into_inner())
    }

    /// Cancels a running re-encode or discards pending vectors.
    pub async fn cancel_refresh(&mut self, collection: &str) -> Result<proto::CancelRefreshResponse> {
        Ok(self.miner.cancel_refresh(proto::CancelRefreshRequest { collection: collection.into() }).await?.into_inner())
    }
}
