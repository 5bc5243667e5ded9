//! The service's error type: every layer's failures end up here (chained with `#[from]`).
//! The API maps them to gRPC status codes, in one table (`api::status`).

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
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
