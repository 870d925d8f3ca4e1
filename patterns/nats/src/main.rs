use trellis_nats::Nats;

#[tokio::main]
async fn main() -> std::process::ExitCode {
    pattern_sdk::Server::<Nats>::new().pub_sub().run().await
}
