//! The one error table: each [`Error`] to its gRPC status (side-effect free), the API's
//! accounting of refusals, the statuses that end refresh and mining streams, and tonic's own
//! refusal of oversized messages reworded to name the limit.
use tonic::codegen::http;
use tonic::{Code, Status};

use crate::encode::EncodeError;
use crate::engine::{RefreshPhase, RefreshProgress};
use crate::error::Error;
use crate::metrics::REJECTED;
use crate::store::StoreError;

/// The status code of each error.
pub fn code(err: &Error) -> Code {
    match err {
        Error::InvalidArgument { .. } => Code::InvalidArgument,
        Error::CollectionNotFound(_) => Code::NotFound,
        Error::CollectionExists(_) => Code::AlreadyExists,
        Error::FailedPrecondition(_) => Code::FailedPrecondition,
        Error::Overloaded(_) => Code::ResourceExhausted,
        Error::Aborted(_) => Code::Aborted,
        Error::Unavailable(_) => Code::Unavailable,
        Error::DeadlineExceeded(_) => Code::DeadlineExceeded,
        Error::Cancelled => Code::Cancelled,
        Error::Encoder(EncodeError::Stopped) => Code::Unavailable,
        Error::Store(StoreError::Missing(_)) => Code::NotFound,
        Error::Store(StoreError::Busy(_)) => Code::Aborted,
        Error::Encoder(_) | Error::Store(_) | Error::Index(_) | Error::Internal(_) => Code::Internal,
    }
}

/// The status a client gets for an error.
pub fn status(err: &Error) -> Status {
    Status::new(code(err), err.to_string())
}

/// Refuses a request: counted by kind, logged when the fault is the server's.
pub fn reject(err: Error) -> Status {
    metrics::counter!(REJECTED, "reason" => err.kind()).increment(1);
    let status = status(&err);
    if status.code() == Code::Internal {
        tracing::error!(kind = err.kind(), error = %err, "request failed");
    }
    status
}

/// Why a handler stopped: an error of the service (refused through [`reject`]) or a status
/// that already is one (a client stream that failed).
pub enum Refusal {
    Error(Error),
    Status(Status),
}

impl From<Error> for Refusal {
    fn from(err: Error) -> Self {
        Refusal::Error(err)
    }
}

impl From<Status> for Refusal {
    fn from(status: Status) -> Self {
        Refusal::Status(status)
    }
}

impl Refusal {
    pub fn into_status(self) -> Status {
        match self {
            Refusal::Error(err) => reject(err),
            Refusal::Status(status) => status,
        }
    }

    /// The same refusal (counted as it is), its message prefixed with where it happened.
    pub fn context(self, prefix: &str) -> Refusal {
        let status = self.into_status();
        Refusal::Status(Status::new(status.code(), format!("{prefix}: {}", status.message())))
    }
}

/// The status a refresh stream ends with, once the refresh has ended without a swap.
pub fn refresh_ended(p: &RefreshProgress) -> Option<Status> {
    match p.phase {
        RefreshPhase::Cancelled => Some(Status::aborted(format!("refresh of {:?} to generation {} cancelled", p.collection, p.generation))),
        RefreshPhase::Interrupted => Some(Status::unavailable(format!(
            "refresh of {:?} to generation {} stopped: the server is shutting down; nothing of it was kept, run it again once the server is back",
            p.collection, p.generation
        ))),
        RefreshPhase::Failed => {
            let code = p.failure.as_deref().map_or(Code::Internal, code);
            Some(Status::new(code, format!("refresh of {:?} failed: {}", p.collection, p.error)))
        }
        RefreshPhase::Encoding | RefreshPhase::Swapping | RefreshPhase::Done => None,
    }
}

/// A refresh whose job went away without a final state (a bug).
pub fn refresh_lost(collection: &str) -> Status {
    Status::internal(format!("refresh of {collection:?} ended without a final state"))
}

/// What ends a MineStream once shutdown begins.
pub fn stream_shutdown() -> Status {
    Status::unavailable("the server is shutting down: batches sent after the answered ones were not mined; send them again once it is back")
}

/// A stream batch that cannot get a slot because the server is closing.
pub fn closing() -> Status {
    Status::unavailable("shutting down")
}

/// NegativeMiner calls while the models and collections load.
pub fn loading() -> Status {
    Status::unavailable("the server is loading its models and collections; health reports SERVING once it is ready")
}

/// A stream batch's refusal, naming the batch.
pub fn in_batch(batch_id: u64, status: Status) -> Status {
    Status::new(status.code(), format!("batch {batch_id}: {}", status.message()))
}

/// How tonic words the refusal of an inbound message above the size limit.
const TONIC_OVERSIZE: &str = "Error, decoded message length too large";

/// What a client gets for a message above `limits.max_message_bytes`.
fn oversize_message(detail: &str) -> String {
    format!("message too large for limits.max_message_bytes: {}", detail.trim_start_matches(TONIC_OVERSIZE).trim_start_matches(':').trim())
}

/// An error reading a client's stream, as the client gets it: tonic refuses an oversized
/// message with OUT_OF_RANGE; gRPC's convention (and this service's) is RESOURCE_EXHAUSTED
/// naming the limit.
pub fn inbound(status: Status) -> Status {
    if status.code() == Code::OutOfRange && status.message().starts_with(TONIC_OVERSIZE) {
        metrics::counter!(REJECTED, "reason" => "message_too_large").increment(1);
        return Status::resource_exhausted(oversize_message(status.message()));
    }
    status
}

/// The same for unary calls, whose oversized request tonic answers before any handler runs:
/// rewrites such a trailers-only response (see [`inbound`]).
pub fn rewrite_oversize<B>(mut response: http::Response<B>) -> http::Response<B> {
    let headers = response.headers_mut();
    if headers.get("grpc-status").is_some_and(|v| v.as_bytes() == b"11") {
        let message = headers.get("grpc-message").map(|v| percent_decode(v.as_bytes())).unwrap_or_default();
        if message.starts_with(TONIC_OVERSIZE) {
            metrics::counter!(REJECTED, "reason" => "message_too_large").increment(1);
            let text = oversize_message(&message);
            if let Ok(value) = http::HeaderValue::from_str(&text) {
                headers.insert("grpc-status", http::HeaderValue::from_static("8"));
                headers.insert("grpc-message", value);
            }
        }
    }
    response
}

/// grpc-message is percent-encoded (only where needed).
fn percent_decode(raw: &[u8]) -> String {
    let mut out = Vec::with_capacity(raw.len());
    let mut i = 0;
    while i < raw.len() {
        let hex = |b: u8| (b as char).to_digit(16);
        if raw[i] == b'%' && i + 2 < raw.len() {
            if let (Some(h), Some(l)) = (hex(raw[i + 1]), hex(raw[i + 2])) {
                out.push((h * 16 + l) as u8);
                i += 3;
                continue;
            }
        }
        out.push(raw[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_kind_maps_to_its_status() {
        let cases = [
            (Error::invalid("options.num_negatives", "must be > 0"), Code::InvalidArgument),
            (Error::CollectionNotFound("x".into()), Code::NotFound),
            (Error::CollectionExists("x".into()), Code::AlreadyExists),
            (Error::FailedPrecondition("x".into()), Code::FailedPrecondition),
            (Error::Overloaded("x".into()), Code::ResourceExhausted),
            (Error::Unavailable("x".into()), Code::Unavailable),
            (Error::Internal("x".into()), Code::Internal),
        ];
        for (err, code) in cases {
            assert_eq!(status(&err).code(), code);
        }
        let status = status(&Error::invalid("queries[3].text", "is empty"));
        assert_eq!(status.message(), "queries[3].text: is empty");
    }

    #[test]
    fn oversized_messages_are_resource_exhausted_naming_the_limit() {
        let tonic_said = Status::out_of_range("Error, decoded message length too large: found 2000 bytes, the limit is: 1024 bytes");
        let status = inbound(tonic_said);
        assert_eq!(status.code(), Code::ResourceExhausted);
        assert_eq!(status.message(), "message too large for limits.max_message_bytes: found 2000 bytes, the limit is: 1024 bytes");
        let other = inbound(Status::out_of_range("options.range_max: too deep"));
        assert_eq!((other.code(), other.message()), (Code::OutOfRange, "options.range_max: too deep"));

        // The unary path: a trailers-only response as tonic writes it (percent-encoded).
        let response = Status::out_of_range("Error, decoded message length too large: found 2000 bytes, the limit is: 1024 bytes").into_http::<()>();
        let response = rewrite_oversize(response);
        let status = Status::from_header_map(response.headers()).unwrap();
        assert_eq!(status.code(), Code::ResourceExhausted);
        assert!(status.message().starts_with("message too large for limits.max_message_bytes: found 2000"), "{}", status.message());
        let untouched = rewrite_oversize(Status::invalid_argument("queries[0].text: is empty").into_http::<()>());
        let status = Status::from_header_map(untouched.headers()).unwrap();
        assert_eq!((status.code(), status.message()), (Code::InvalidArgument, "queries[0].text: is empty"));
    }
}
