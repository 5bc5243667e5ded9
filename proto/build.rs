//! Compiles the wire contract once, with protox (pure Rust, no `protoc`): message types,
//! server and client stubs, and the encoded descriptor set for gRPC server reflection.
use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    // Read at run time: a build script compiled for one checkout may be reused for another.
    let proto_root = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR")?);
    let file = proto_root.join("hardneg/v1/hardneg.proto");
    println!("cargo:rerun-if-changed={}", file.display());
    let fds = protox::compile([&file], [&proto_root])?;
    let out = PathBuf::from(std::env::var("OUT_DIR")?);
    std::fs::write(out.join("hardneg_descriptor.bin"), prost::Message::encode_to_vec(&fds))?;
    tonic_prost_build::configure()
        .build_server(true)
        .build_client(true)
        .compile_fds(fds)?;
    Ok(())
}
