//! hardneg-server: online hard-negative mining over gRPC.
//!
//! Pipeline stages, one module each: [`api`] (validation, gRPC), [`encode`] (bi-encoder and
//! optional cross-encoder, each on its own thread, batched by token budget), [`index`] (usearch), [`mine`] (exclusion,
//! filters, adaptive depth, sampling), [`store`] (redb), tied together by [`engine`].
pub mod api;
pub mod auth;
pub mod config;
pub mod encode;
pub mod engine;
pub mod error;
pub mod index;
pub mod metrics;
pub mod mine;
pub mod refresh;
pub mod store;

use std::sync::Arc;

/// Generated wire types and service stubs (package `hardneg.v1`).
pub mod proto {
    tonic::include_proto!("hardneg.v1");
    /// Encoded descriptors for server reflection.
    pub const FILE_DESCRIPTOR_SET: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/hardneg_descriptor.bin"));
}

use config::Config;
use encode::{BatchConfig, Encoder, Placement, Reranker};
use engine::Engine;

/// Loads the encoder and the collections, serves gRPC until `shutdown` resolves, then saves
/// every index so the next start loads instead of rebuilding.
pub async fn serve(cfg: Config, shutdown: impl std::future::Future<Output = ()> + Send + 'static) -> anyhow::Result<()> {
    let cfg = Arc::new(cfg);
    let listener = tokio::net::TcpListener::bind(&cfg.server.listen).await.map_err(|e| {
        anyhow::anyhow!("server.listen: cannot bind {}: {e}", cfg.server.listen)
    })?;
    let addr = listener.local_addr()?;
    let (reporter, health) = tonic_health::server::health_reporter();
    reporter
        .set_not_serving::<proto::negative_miner_server::NegativeMinerServer<api::MinerService>>()
        .await;

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
    tracing::info!(model = %info.name, dims = info.dims, max_tokens = info.max_tokens, fingerprint = %info.fingerprint, "encoder loaded");
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
        tracing::info!(model = %info.name, family = info.family, labels = info.num_labels, max_tokens = info.max_tokens, fingerprint = %info.fingerprint, "cross-encoder loaded");
        Some(reranker)
    };
    let engine_cfg = cfg.clone();
    let engine = Arc::new(tokio::task::spawn_blocking(move || Engine::open(engine_cfg, encoder, reranker)).await??);

    if !cfg.server.metrics_listen.is_empty() {
        let addr = cfg.server.metrics_listen.parse().expect("validated with the configuration");
        metrics::install(addr, engine.clone())?;
    }

    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()?;
    let miner = proto::negative_miner_server::NegativeMinerServer::new(api::MinerService::new(engine.clone()))
        .max_decoding_message_size(cfg.limits.max_message_bytes)
        .max_encoding_message_size(cfg.limits.max_message_bytes);
    let token = auth::load_token(&cfg.server.auth_token_file)?;
    if token.is_some() {
        tracing::info!("bearer-token auth on for hardneg.v1.NegativeMiner (health and reflection stay open)");
    }
    let miner = tonic::service::interceptor::InterceptedService::new(miner, auth::Auth(token));
    reporter.set_serving::<proto::negative_miner_server::NegativeMinerServer<api::MinerService>>().await;
    tracing::info!(%addr, "hardneg-server listening");

    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let mut server = tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(health)
            .add_service(reflection)
            .add_service(miner)
            .serve_with_incoming_shutdown(tokio_stream::wrappers::TcpListenerStream::new(listener), async {
                let _ = stop_rx.await;
            }),
    );
    tokio::select! {
        result = &mut server => result??,
        _ = shutdown => {
            reporter.set_not_serving::<proto::negative_miner_server::NegativeMinerServer<api::MinerService>>().await;
            let _ = stop_tx.send(());
            let grace = std::time::Duration::from_secs(cfg.server.shutdown_grace_seconds);
            match tokio::time::timeout(grace, &mut server).await {
                Ok(result) => result??,
                Err(_) => {
                    tracing::warn!(?grace, "requests still in flight after the grace period; saving anyway");
                    server.abort();
                }
            }
        }
    }
    tracing::info!("stopped accepting; saving indexes");
    engine.save_indexes().await?;
    tracing::info!("shutdown complete");
    Ok(())
}
