//! Input files the commands read (BEIR readers live in the library, `hardneg_client::beir`).
pub mod npy;
pub mod queries;
pub mod vectors;
