//! hardneg-server: online hard-negative mining over gRPC.
//!
//! One module per part, imports pointing one way: [`bootstrap`] (start and stop) -> [`api`]
//! (validation, wire conversion, the error table, gRPC) -> [`engine`] (collections, writes,
//! mining, refresh, persistence) -> [`mine`] (exclusion, filters, adaptive depth, reranking,
//! sampling: no I/O), [`encode`] (bi-encoder and cross-encoder, each on its own thread,
//! batched by token budget), [`index`] (usearch), [`store`] (redb). [`metrics`], [`error`] and
//! [`config`] are leaves.
pub mod api;
pub mod bootstrap;
pub mod config;
pub mod encode;
pub mod engine;
pub mod error;
pub mod index;
pub mod metrics;
pub mod mine;
pub mod store;

pub use bootstrap::serve;
/// Generated wire types and service stubs (package `hardneg.v1`).
pub use hardneg_proto as proto;
