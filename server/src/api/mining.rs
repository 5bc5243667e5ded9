//! Mine and MineStream: one inner function behind both. A stream is the unary logic plus
//! bounded fan-out that keeps request order and stops reading at shutdown.
use std::pin::Pin;

use futures::{Stream, StreamExt};
use tonic::{Status, Streaming};

use super::status::{self, Refusal, inbound};
use super::validate::validate_mine;
use super::{MinerService, convert};
use crate::engine::Engine;
use crate::error::{Error, Result};
use crate::proto as pb;

/// Mine requests a stream works on at once; responses still leave in request order.
const STREAM_IN_FLIGHT: usize = 4;

pub type MineStreamOut = Pin<Box<dyn Stream<Item = Result<pb::MineResponse, Status>> + Send>>;

/// Validates, converts, then mines (the engine checks dims against the generation that
/// answers): the one path behind Mine and MineStream.
async fn mine_one(engine: &Engine, req: pb::MineRequest) -> Result<pb::MineResponse> {
    let cfg = engine.config();
    let params = validate_mine(&req, cfg)?;
    let limit = std::time::Duration::from_secs_f64(cfg.limits.mine_timeout_seconds);
    let batch = convert::mine_batch(req, params);
    let outcome = tokio::time::timeout(limit, engine.mine(&batch))
        .await
        .map_err(|_| Error::DeadlineExceeded(format!("mining took longer than {limit:?} (limits.mine_timeout_seconds)")))??;
    Ok(convert::mine_response(outcome))
}

impl MinerService {
    pub(super) async fn mine(&self, req: pb::MineRequest) -> Result<pb::MineResponse, Refusal> {
        let _slot = self.slot()?;
        Ok(mine_one(&self.engine, req).await?)
    }

    pub(super) async fn mine_stream(&self, input: Streaming<pb::MineRequest>) -> Result<MineStreamOut, Refusal> {
        let engine = self.engine.clone();
        let stream_slot = self.streams.clone().try_acquire_owned().map_err(|_| {
            Error::Overloaded(format!(
                "{} MineStream streams are open, the limit is {} (limits.max_streams)",
                self.cfg.limits.max_streams, self.cfg.limits.max_streams
            ))
        })?;
        let open = crate::metrics::OpenStream::new("MineStream");
        let in_flight = self.in_flight.clone();
        // From shutdown on, no further batch is read: those read are mined, then the stream
        // ends with UNAVAILABLE.
        let mut shutdown = engine.shutdown_watch();
        let input = async_stream::stream! {
            let mut input = input;
            loop {
                tokio::select! {
                    biased;
                    _ = async { shutdown.wait_for(|stopping| *stopping).await.is_ok() } => {
                        yield Err(status::stream_shutdown());
                        break;
                    }
                    msg = input.next() => match msg {
                        Some(msg) => yield msg,
                        None => break,
                    },
                }
            }
        };
        let output = input
            .map(move |msg| {
                let _held = (&open, &stream_slot);
                let engine = engine.clone();
                let in_flight = in_flight.clone();
                async move {
                    // Stream batches wait for a slot rather than fail.
                    let _slot = in_flight.acquire_owned().await.map_err(|_| status::closing())?;
                    let req = msg.map_err(inbound)?;
                    let batch_id = req.batch_id;
                    let result = mine_one(&engine, req).await.map_err(|e| status::in_batch(batch_id, status::reject(e)));
                    let code = result.as_ref().map_or_else(|s| s.code(), |_| tonic::Code::Ok);
                    metrics::counter!(crate::metrics::STREAM_BATCHES, "rpc" => "MineStream", "code" => crate::metrics::code_name(code)).increment(1);
                    result
                }
            })
            .buffered(STREAM_IN_FLIGHT);
        // Stop after the first error: a gRPC stream ends with one status.
        let output = output.scan(false, |failed, item| {
            if *failed {
                return futures::future::ready(None);
            }
            *failed = item.is_err();
            futures::future::ready(Some(item))
        });
        Ok(Box::pin(output) as MineStreamOut)
    }
}
