//! One error table: every layer's failures end up here, and this is the only place that
//! maps them to gRPC status codes.
use tonic::codegen::http;
use tonic::{Code, Status};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A request field is out of its documented range.
    #[error("{field}: {reason}")]
    InvalidArgument { field: String, reason: String },
    #[error("collection {0:?} does not exist")]
    CollectionNotFound(String),
    #[error("collection {0:?} already exists")]
    CollectionExists(String),
    /// The request is valid but the collection's state does not allow it.
    #[error("{0}")]
    FailedPrecondition(String),
    #[error("overloaded: {0}")]
    Overloaded(String),
    /// Conflicts with an operation in progress (a refresh).
    #[error("{0}")]
    Aborted(String),
    #[error("unavailable: {0}")]
    Unavailable(String),
    #[error("{0}")]
    DeadlineExceeded(String),
    #[error("request cancelled by the client")]
    Cancelled,
    #[error("encoder: {0}")]
    Encoder(#[from] crate::encode::EncodeError),
    #[error("store: {0}")]
    Store(#[from] crate::store::StoreError),
    #[error("index: {0}")]
    Index(#[from] crate::index::IndexError),
    #[error("internal: {0}")]
    Internal(String),
}

impl Error {
    pub fn invalid(field: impl Into<String>, reason: impl Into<String>) -> Self {
        Error::InvalidArgument { field: field.into(), reason: reason.into() }
    }

    /// Stable label for logs and failure counters.
    pub fn kind(&self) -> &'static str {
        match self {
            Error::InvalidArgument { .. } => "invalid_argument",
            Error::CollectionNotFound(_) => "not_found",
            Error::CollectionExists(_) => "already_exists",
            Error::FailedPrecondition(_) => "failed_precondition",
            Error::Overloaded(_) => "overloaded",
            Error::Aborted(_) => "aborted",
            Error::Unavailable(_) => "unavailable",
            Error::DeadlineExceeded(_) => "deadline_exceeded",
            Error::Cancelled => "cancelled",
            Error::Encoder(_) => "encoder",
            Error::Store(_) => "store",
            Error::Index(_) => "index",
            Error::Internal(_) => "internal",
        }
    }

    pub fn code(&self) -> Code {
        match self {
            Error::InvalidArgument { .. } => Code::InvalidArgument,
            Error::CollectionNotFound(_) => Code::NotFound,
            Error::CollectionExists(_) => Code::AlreadyExists,
            Error::FailedPrecondition(_) => Code::FailedPrecondition,
            Error::Overloaded(_) => Code::ResourceExhausted,
            Error::Aborted(_) => Code::Aborted,
            Error::Unavailable(_) => Code::Unavailable,
            Error::DeadlineExceeded(_) => Code::DeadlineExceeded,
            Error::Cancelled => Code::Cancelled,
            Error::Encoder(crate::encode::EncodeError::Stopped) => Code::Unavailable,
            Error::Store(crate::store::StoreError::Missing(_)) => Code::NotFound,
            Error::Store(crate::store::StoreError::Busy(_)) => Code::Aborted,
            Error::Encoder(_) | Error::Store(_) | Error::Index(_) | Error::Internal(_) => {
                Code::Internal
            }
        }
    }
}

impl From<Error> for Status {
    fn from(err: Error) -> Self {
        let code = err.code();
        metrics::counter!(crate::metrics::REJECTED, "reason" => err.kind()).increment(1);
        if code == Code::Internal {
            tracing::error!(kind = err.kind(), error = %err, "request failed");
        }
        Status::new(code, err.to_string())
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

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
        metrics::counter!(crate::metrics::REJECTED, "reason" => "message_too_large").increment(1);
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
            metrics::counter!(crate::metrics::REJECTED, "reason" => "message_too_large").increment(1);
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
            assert_eq!(Status::from(err).code(), code);
        }
        let status = Status::from(Error::invalid("queries[3].text", "is empty"));
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
