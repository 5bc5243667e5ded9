//! The hardneg wire contract (package `hardneg.v1`), compiled once from
//! `proto/hardneg/v1/hardneg.proto` for the server, the client and the tests.

tonic::include_proto!("hardneg.v1");

/// Encoded descriptors of the contract, for gRPC server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/hardneg_descriptor.bin"));
