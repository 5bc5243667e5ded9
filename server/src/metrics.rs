//! Prometheus metrics: names, buckets and the exporter on its own port (`server.metrics_listen`,
//! `/metrics`). Every name has the `hardneg_` prefix and a unit suffix; histograms have
//! explicit buckets so Prometheus sees real histograms.
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use metrics_exporter_prometheus::{Matcher, PrometheusBuilder};

pub const REQUESTS: &str = "hardneg_requests_total";
pub const REQUEST_DURATION: &str = "hardneg_request_duration_seconds";
pub const IN_FLIGHT: &str = "hardneg_in_flight_requests";
pub const OPEN_STREAMS: &str = "hardneg_open_streams";
pub const STREAM_BATCHES: &str = "hardneg_stream_batches_total";
pub const REJECTED: &str = "hardneg_rejected_requests_total";
pub const STAGE_DURATION: &str = "hardneg_stage_duration_seconds";
pub const MODEL_BATCH_TEXTS: &str = "hardneg_model_batch_texts";
pub const MODEL_BATCH_TOKENS: &str = "hardneg_model_batch_tokens";
pub const MODEL_QUEUE_DEPTH: &str = "hardneg_model_queue_depth";
pub const MODEL_ABANDONED: &str = "hardneg_model_abandoned_jobs_total";
pub const QUERIES: &str = "hardneg_queries_total";
pub const NEGATIVES: &str = "hardneg_negatives_total";
pub const DROPPED: &str = "hardneg_dropped_candidates_total";
pub const COLLECTION_DOCUMENTS: &str = "hardneg_collection_documents";
pub const COLLECTION_PENDING: &str = "hardneg_collection_pending_documents";
pub const COLLECTION_INDEXED: &str = "hardneg_collection_indexed_vectors";
pub const COLLECTION_GENERATION: &str = "hardneg_collection_generation";
pub const REFRESH_DURATION: &str = "hardneg_refresh_duration_seconds";
pub const REFRESH_PROGRESS: &str = "hardneg_refresh_progress_ratio";
pub const REFRESHES: &str = "hardneg_refreshes_total";

const SECONDS: &[f64] = &[0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0];
const TEXTS: &[f64] = &[1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0];
const TOKENS: &[f64] = &[64.0, 256.0, 1024.0, 2048.0, 4096.0, 8192.0, 16384.0, 32768.0];

/// Starts the exporter on `addr`, and calls `gauges` every few seconds to refresh the gauges
/// it owns (the collections').
pub fn install(addr: SocketAddr, gauges: impl Fn() + Send + 'static) -> anyhow::Result<()> {
    let (recorder, exporter) = PrometheusBuilder::new()
        .with_http_listener(addr)
        .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), SECONDS)?
        .set_buckets_for_metric(Matcher::Full(MODEL_BATCH_TEXTS.into()), TEXTS)?
        .set_buckets_for_metric(Matcher::Full(MODEL_BATCH_TOKENS.into()), TOKENS)?
        .build()
        .map_err(|e| anyhow::anyhow!("server.metrics_listen: {addr}: {e}"))?;
    metrics::set_global_recorder(recorder).map_err(|e| anyhow::anyhow!("metrics recorder: {e}"))?;
    // Series a dashboard shows from the start, at zero until something happens.
    metrics::gauge!(OPEN_STREAMS, "rpc" => "MineStream").set(0.0);
    metrics::gauge!(MODEL_QUEUE_DEPTH, "model" => "encoder").set(0.0);
    tokio::spawn(async move {
        if let Err(e) = exporter.await {
            tracing::error!(error = ?e, "metrics exporter stopped");
        }
    });
    tokio::spawn(async move {
        loop {
            gauges();
            tokio::time::sleep(Duration::from_secs(2)).await;
        }
    });
    tracing::info!(%addr, "metrics on http://{addr}/metrics");
    Ok(())
}

/// Counts one RPC by method and status code, with its duration; tracks requests in flight.
pub struct RequestTimer {
    rpc: &'static str,
    started: Instant,
}

impl RequestTimer {
    pub fn start(rpc: &'static str) -> Self {
        metrics::gauge!(IN_FLIGHT, "rpc" => rpc).increment(1.0);
        Self { rpc, started: Instant::now() }
    }

    /// Records the outcome (the gRPC code's name, e.g. "Ok", "InvalidArgument").
    pub fn finish<T>(self, result: &Result<T, tonic::Status>) {
        let code = match result {
            Ok(_) => tonic::Code::Ok,
            Err(s) => s.code(),
        };
        metrics::counter!(REQUESTS, "rpc" => self.rpc, "code" => code_name(code)).increment(1);
        metrics::histogram!(REQUEST_DURATION, "rpc" => self.rpc).record(self.started.elapsed().as_secs_f64());
    }
}

impl Drop for RequestTimer {
    fn drop(&mut self) {
        metrics::gauge!(IN_FLIGHT, "rpc" => self.rpc).decrement(1.0);
    }
}

/// Runs an RPC's handler under a [`RequestTimer`].
pub async fn timed<T>(rpc: &'static str, handler: impl std::future::Future<Output = Result<T, tonic::Status>>) -> Result<T, tonic::Status> {
    let timer = RequestTimer::start(rpc);
    let result = handler.await;
    timer.finish(&result);
    result
}

pub fn code_name(code: tonic::Code) -> &'static str {
    use tonic::Code::*;
    match code {
        Ok => "Ok",
        Cancelled => "Cancelled",
        Unknown => "Unknown",
        InvalidArgument => "InvalidArgument",
        DeadlineExceeded => "DeadlineExceeded",
        NotFound => "NotFound",
        AlreadyExists => "AlreadyExists",
        PermissionDenied => "PermissionDenied",
        ResourceExhausted => "ResourceExhausted",
        FailedPrecondition => "FailedPrecondition",
        Aborted => "Aborted",
        OutOfRange => "OutOfRange",
        Unimplemented => "Unimplemented",
        Internal => "Internal",
        Unavailable => "Unavailable",
        DataLoss => "DataLoss",
        Unauthenticated => "Unauthenticated",
    }
}

/// Counts an open stream for as long as it lives.
pub struct OpenStream(&'static str);

impl OpenStream {
    pub fn new(rpc: &'static str) -> Self {
        metrics::gauge!(OPEN_STREAMS, "rpc" => rpc).increment(1.0);
        Self(rpc)
    }
}

impl Drop for OpenStream {
    fn drop(&mut self) {
        metrics::gauge!(OPEN_STREAMS, "rpc" => self.0).decrement(1.0);
    }
}

pub fn stage(stage: &'static str, seconds: f64) {
    metrics::histogram!(STAGE_DURATION, "stage" => stage).record(seconds);
}
