//! One error table: every layer's failures end up here, and this is the only place that
//! maps them to gRPC status codes.
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
}
