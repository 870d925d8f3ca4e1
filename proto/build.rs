//! Compiles `proto/**/*.proto` with protox (a pure-Rust protobuf compiler), so
//! no system `protoc` is needed, and writes the encoded descriptor set (which
//! keeps custom options such as `google.api.http`) to `OUT_DIR` for the
//! gateway and for server reflection.

use std::path::PathBuf;

const PROTOS: &[&str] = &[
    "trellis/data/v1/keyvalue.proto",
    "trellis/data/v1/pubsub.proto",
    "trellis/admin/v1/admin.proto",
    "trellis/pattern/v1/lifecycle.proto",
];

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let root = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR")?);
    for p in PROTOS {
        println!("cargo:rerun-if-changed={}", root.join(p).display());
    }
    println!("cargo:rerun-if-changed={}", root.join("google").display());

    let mut compiler = protox::Compiler::new([&root])?;
    compiler.include_imports(true).include_source_info(true);
    compiler.open_files(PROTOS)?;
    let out = PathBuf::from(std::env::var("OUT_DIR")?);
    std::fs::write(
        out.join("trellis_descriptor.bin"),
        compiler.encode_file_descriptor_set(),
    )?;
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .compile_fds(compiler.file_descriptor_set())?;
    Ok(())
}
