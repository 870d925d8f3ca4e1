use trellis_redis::RedisKv;

#[tokio::main]
async fn main() -> std::process::ExitCode {
    pattern_sdk::Server::<RedisKv>::new()
        .key_value()
        .run()
        .await
}
