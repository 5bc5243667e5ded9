//! Start and stop: bind the port and serve health and reflection at once, load the models
//! and collections, install the NegativeMiner service, and on shutdown drain, then save
//! every index.
use std::sync::Arc;

use crate::config::{self, Config};
use crate::encode::{self, BatchConfig, Encoder, Placement, Reranker};
use crate::engine::Engine;
use crate::{api, proto};

type MinerServer = proto::negative_miner_server::NegativeMinerServer<api::MinerService>;
type Served = tokio::task::JoinHandle<Result<(), tonic::transport::Error>>;

/// The port, serving health (NOT_SERVING), reflection and a NegativeMiner that answers
/// UNAVAILABLE until the real one is installed.
struct Listening {
    addr: std::net::SocketAddr,
    reporter: tonic_health::server::HealthReporter,
    miner: Deferred<MinerWithAuth>,
    server: Served,
    stop: tokio::sync::oneshot::Sender<()>,
    token: Option<Arc<[u8]>>,
}

/// Serves gRPC until `shutdown` resolves: health (NOT_SERVING) and reflection at once, the
/// NegativeMiner service once the models and collections are loaded (UNAVAILABLE before);
/// then saves every index written to since its last save, so the next start loads instead of
/// rebuilding. Meanwhile, indexes are saved every `index.save_interval_seconds`.
pub async fn serve(cfg: Config, shutdown: impl std::future::Future<Output = ()> + Send + 'static) -> anyhow::Result<()> {
    let cfg = Arc::new(cfg);
    let Listening { addr, reporter, miner, mut server, stop, token } = listen(&cfg).await?;
    tracing::info!(%addr, "hardneg-server listening; loading models and collections (health: NOT_SERVING)");
    let mut shutdown = std::pin::pin!(shutdown);
    let engine = tokio::select! {
        loaded = load(cfg.clone()) => match loaded {
            Ok(engine) => engine,
            Err(e) => {
                let _ = stop.send(());
                return Err(e);
            }
        },
        result = &mut server => {
            result??;
            anyhow::bail!("the gRPC server stopped while loading");
        }
        _ = &mut shutdown => {
            tracing::info!("shutdown while loading: nothing to save");
            let _ = stop.send(());
            return Ok(());
        }
    };
    tokio::spawn(engine.clone().save_periodically());
    if !cfg.server.metrics_listen.is_empty() {
        let addr = cfg.server.metrics_listen.parse().expect("validated with the configuration");
        let gauges = engine.clone();
        crate::metrics::install(addr, move || gauges.export_collection_gauges())?;
    }
    if token.is_some() {
        tracing::info!("bearer-token auth on for hardneg.v1.NegativeMiner (health and reflection stay open)");
    }
    let service = MinerServer::new(api::MinerService::new(engine.clone()))
        .max_decoding_message_size(cfg.limits.max_message_bytes)
        .max_encoding_message_size(cfg.limits.max_message_bytes);
    miner.install(tonic::service::interceptor::InterceptedService::new(service, api::auth::Auth(token)));
    reporter.set_serving::<MinerServer>().await;
    tracing::info!(%addr, "ready (health: SERVING)");
    let deadline = run_until_shutdown(&cfg, &engine, &reporter, server, stop, shutdown).await?;
    tracing::info!("stopped accepting; saving indexes");
    match tokio::time::timeout_at(deadline, engine.save_indexes()).await {
        Ok(saved) => saved?,
        Err(_) => tracing::warn!(
            seconds = cfg.server.shutdown_timeout_seconds,
            "indexes not all saved within server.shutdown_timeout_seconds; the next start rebuilds them from the store"
        ),
    }
    tracing::info!("shutdown complete");
    Ok(())
}

/// Checks what can be refused without loading a model, binds the port and starts serving.
async fn listen(cfg: &Config) -> anyhow::Result<Listening> {
    let token = api::auth::load_token(&cfg.server.auth_token_file)?;
    let tls = tls_config(&cfg.server)?;
    let listener = tokio::net::TcpListener::bind(&cfg.server.listen).await.map_err(|e| {
        anyhow::anyhow!("server.listen: cannot bind {}: {e}", cfg.server.listen)
    })?;
    let addr = listener.local_addr()?;
    let (reporter, health) = tonic_health::server::health_reporter();
    reporter.set_not_serving::<MinerServer>().await;
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()?;
    let miner = Deferred::<MinerWithAuth>::default();
    let mut builder = tonic::transport::Server::builder();
    if let Some(tls) = tls {
        builder = builder.tls_config(tls).map_err(|e| anyhow::anyhow!("server.tls_cert_file / server.tls_key_file: {e}"))?;
        tracing::info!("TLS on for the gRPC port");
    }
    let (stop, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(
        builder
            .layer(tower::util::MapResponseLayer::new(api::status::rewrite_oversize))
            .add_service(health)
            .add_service(reflection)
            .add_service(miner.clone())
            // TCP_NODELAY: without it a small reply waits on the client's delayed ACK (~40 ms).
            .serve_with_incoming_shutdown(tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true)), async {
                let _ = stop_rx.await;
            }),
    );
    Ok(Listening { addr, reporter, miner, server, stop, token })
}

/// Serves until the server ends or `shutdown` resolves; then stops accepting, lets requests
/// and refreshes finish within the grace period, and returns the deadline for the save.
async fn run_until_shutdown(
    cfg: &Config,
    engine: &Engine,
    reporter: &tonic_health::server::HealthReporter,
    mut server: Served,
    stop: tokio::sync::oneshot::Sender<()>,
    shutdown: std::pin::Pin<&mut impl std::future::Future<Output = ()>>,
) -> anyhow::Result<tokio::time::Instant> {
    let shutdown_deadline =
        || tokio::time::Instant::now() + std::time::Duration::from_secs_f64(cfg.server.shutdown_timeout_seconds);
    tokio::select! {
        result = &mut server => {
            result??;
            Ok(shutdown_deadline())
        }
        _ = shutdown => {
            let deadline = shutdown_deadline();
            reporter.set_not_serving::<MinerServer>().await;
            let _ = stop.send(());
            engine.begin_shutdown();
            let grace = std::time::Duration::from_secs_f64(cfg.server.shutdown_grace_seconds);
            let drained = tokio::time::timeout(grace, async {
                let (served, ()) = tokio::join!(&mut server, engine.refreshes_stopped());
                served
            });
            match drained.await {
                Ok(result) => result??,
                Err(_) => {
                    tracing::warn!(?grace, "requests or refreshes still running after the grace period; saving anyway");
                    server.abort();
                }
            }
            Ok(deadline)
        }
    }
}

/// The encoder, the cross-encoder when configured, and the collections.
async fn load(cfg: Arc<Config>) -> anyhow::Result<Arc<Engine>> {
    let kernels = encode::cpu::select(cfg.encoder.cpu_kernels_spec(), &cfg.encoder.blas_library)
        .map_err(|e| anyhow::anyhow!("encoder.cpu_kernels / encoder.blas_library: {e}"))?;
    tracing::info!("{kernels}");
    let batch = BatchConfig {
        token_budget: cfg.encoder.token_budget,
        max_batch_texts: cfg.encoder.max_batch_texts,
        queue_capacity: cfg.encoder.queue_capacity,
    };
    let model_dir = cfg.encoder.model_dir.clone();
    let max_tokens = cfg.encoder.max_tokens;
    let placement = Placement { device: cfg.encoder.device_spec(), dtype: cfg.encoder.dtype_spec() };
    let encoder = tokio::task::spawn_blocking(move || Encoder::load_on(&model_dir, max_tokens, batch, placement))
        .await?
        .map_err(|e| anyhow::anyhow!("{}: {e}", e.config_field("encoder")))?;
    let info = encoder.info().clone();
    tracing::info!(model = %info.name, dims = info.dims, max_tokens = info.max_tokens, device = %encode::device::describe(placement), fingerprint = %info.fingerprint, "encoder loaded");
    let reranker = if cfg.reranker.model_dir.as_os_str().is_empty() {
        None
    } else {
        let rcfg = cfg.reranker.clone();
        let batch = BatchConfig {
            token_budget: rcfg.token_budget,
            max_batch_texts: rcfg.max_batch_texts,
            queue_capacity: rcfg.queue_capacity,
        };
        let placement = Placement { device: rcfg.device_spec(), dtype: rcfg.dtype_spec() };
        let reranker = tokio::task::spawn_blocking(move || Reranker::load_on(&rcfg.model_dir, rcfg.max_tokens, batch, placement))
            .await?
            .map_err(|e| anyhow::anyhow!("{}: {e}", e.config_field("reranker")))?;
        let info = reranker.info();
        tracing::info!(model = %info.name, family = info.family, labels = info.num_labels, max_tokens = info.max_tokens, device = %encode::device::describe(placement), fingerprint = %info.fingerprint, "cross-encoder loaded");
        Some(reranker)
    };
    Ok(Arc::new(tokio::task::spawn_blocking(move || Engine::open(cfg, encoder, reranker)).await??))
}

/// A gRPC service that answers UNAVAILABLE until the real one is installed, so the port (and
/// health) can serve while the models load.
struct Deferred<S>(Arc<std::sync::OnceLock<S>>);

impl<S> Default for Deferred<S> {
    fn default() -> Self {
        Self(Arc::new(std::sync::OnceLock::new()))
    }
}

impl<S> Clone for Deferred<S> {
    fn clone(&self) -> Self {
        Self(self.0.clone())
    }
}

impl<S> Deferred<S> {
    fn install(&self, service: S) {
        if self.0.set(service).is_err() {
            unreachable!("the service is installed once");
        }
    }
}

impl<S: tonic::server::NamedService> tonic::server::NamedService for Deferred<S> {
    const NAME: &'static str = S::NAME;
}

type MinerWithAuth = tonic::service::interceptor::InterceptedService<MinerServer, api::auth::Auth>;

impl tower::Service<tonic::codegen::http::Request<tonic::body::Body>> for Deferred<MinerWithAuth> {
    type Response = tonic::codegen::http::Response<tonic::body::Body>;
    type Error = std::convert::Infallible;
    type Future = std::pin::Pin<Box<dyn std::future::Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, _: &mut std::task::Context<'_>) -> std::task::Poll<Result<(), Self::Error>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: tonic::codegen::http::Request<tonic::body::Body>) -> Self::Future {
        use tower::ServiceExt;
        match self.0.get() {
            Some(service) => {
                let call = service.clone().oneshot(request);
                Box::pin(async move { call.await.map(|response| response.map(tonic::body::Body::new)) })
            }
            None => Box::pin(async { Ok(api::status::loading().into_http()) }),
        }
    }
}

/// The TLS identity from `server.tls_cert_file` and `server.tls_key_file`, when both are set.
fn tls_config(cfg: &config::ServerConfig) -> anyhow::Result<Option<tonic::transport::ServerTlsConfig>> {
    if cfg.tls_cert_file.as_os_str().is_empty() {
        return Ok(None);
    }
    let read = |field: &str, path: &std::path::Path| {
        std::fs::read(path).map_err(|e| anyhow::anyhow!("{field}: reading {}: {e}", path.display()))
    };
    let cert = read("server.tls_cert_file", &cfg.tls_cert_file)?;
    let key = read("server.tls_key_file", &cfg.tls_key_file)?;
    if !String::from_utf8_lossy(&cert).contains("-----BEGIN CERTIFICATE-----") {
        anyhow::bail!("server.tls_cert_file: {} holds no PEM certificate", cfg.tls_cert_file.display());
    }
    if !String::from_utf8_lossy(&key).contains("PRIVATE KEY-----") {
        anyhow::bail!("server.tls_key_file: {} holds no PEM private key", cfg.tls_key_file.display());
    }
    let identity = tonic::transport::Identity::from_pem(cert, key);
    Ok(Some(tonic::transport::ServerTlsConfig::new().identity(identity)))
}
