use trellis_postgres::Postgres;

#[tokio::main]
async fn main() -> std::process::ExitCode {
    pattern_sdk::Server::<Postgres>::new()
        .key_value()
        .run()
        .await
}
