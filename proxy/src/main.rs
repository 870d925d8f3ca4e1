//! `trellis`: load config → bind → serve until SIGINT/SIGTERM → stop patterns.

use std::process::ExitCode;

use clap::Parser;
use trellis::cli::{self, Cli, Command};
use trellis::{config, logging, server};

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        None | Some(Command::Serve) => return serve(cli.serve).await,
        Some(Command::CheckConfig { file }) => {
            let file = file.or(cli.serve.config);
            return match config::load(file.as_deref(), std::env::vars()) {
                Ok(loaded) => match check_commands(&loaded) {
                    Ok(()) => {
                        println!("{}: OK", loaded.source);
                        ExitCode::SUCCESS
                    }
                    Err(problems) => {
                        eprintln!("{}: {problems}", loaded.source);
                        ExitCode::from(2)
                    }
                },
                Err(e) => {
                    eprintln!("{e}");
                    ExitCode::from(2)
                }
            };
        }
        Some(Command::Kv { client, op }) => cli::kv(client, op).await,
        Some(Command::Pubsub { client, op }) => cli::pubsub(client, op).await,
        Some(Command::Patterns { client, op }) => cli::patterns(client, op).await,
        Some(Command::Health { client, service }) => match cli::health(client, service).await {
            Ok(true) => Ok(()),
            Ok(false) => return ExitCode::from(1),
            Err(e) => Err(e),
        },
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Every pattern's command must resolve to an executable.
fn check_commands(loaded: &config::Loaded) -> Result<(), String> {
    let exe_dir = std::env::current_exe()
        .ok()
        .and_then(|p| p.parent().map(|d| d.to_path_buf()));
    let path_var = std::env::var_os("PATH");
    let missing: Vec<String> = loaded
        .config
        .patterns
        .iter()
        .enumerate()
        .filter_map(|(i, p)| {
            config::resolve_command(
                &p.command,
                loaded.source.dir(),
                exe_dir.as_deref(),
                path_var.as_deref(),
            )
            .err()
            .map(|searched| trellis::supervisor::missing_command(i, &p.command, &searched))
        })
        .collect();
    if missing.is_empty() {
        Ok(())
    } else {
        Err(missing.join("\n"))
    }
}

async fn serve(args: cli::ServeArgs) -> ExitCode {
    let loaded = match config::load(args.config.as_deref(), std::env::vars()) {
        Ok(l) => l,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::from(2);
        }
    };
    let format = args
        .log_format
        .map(Into::into)
        .unwrap_or(loaded.config.log.format);
    logging::init(format, &loaded.config.log.level);
    let grpc = match bind(
        loaded.config.listen.grpc,
        "listen.grpc",
        "TRELLIS_LISTEN__GRPC",
    )
    .await
    {
        Ok(l) => l,
        Err(code) => return code,
    };
    let http = match loaded.config.listen.http {
        Some(addr) => match bind(addr, "listen.http", "TRELLIS_LISTEN__HTTP").await {
            Ok(l) => Some(l),
            Err(code) => return code,
        },
        None => None,
    };
    let listeners = server::Listeners { grpc, http };
    match server::run(loaded, listeners, server::signal()).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = %e, "the proxy failed");
            ExitCode::FAILURE
        }
    }
}

async fn bind(
    addr: std::net::SocketAddr,
    field: &str,
    env: &str,
) -> Result<tokio::net::TcpListener, ExitCode> {
    tokio::net::TcpListener::bind(addr).await.map_err(|e| {
        tracing::error!(
            "cannot listen on {addr}: {e}; another process (perhaps another trellis) holds it — \
             stop it, or set {field} in the config or {env}"
        );
        ExitCode::from(1)
    })
}
