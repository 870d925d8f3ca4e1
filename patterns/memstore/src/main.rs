use trellis_memstore::MemStore;

#[tokio::main]
async fn main() -> std::process::ExitCode {
    pattern_sdk::Server::<MemStore>::new()
        .key_value()
        .pub_sub()
        .run()
        .await
}
