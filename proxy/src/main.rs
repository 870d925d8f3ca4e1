//! `trellis`: load config → build the runtime it asks for → bind → serve
//! until SIGINT/SIGTERM → stop patterns.

use std::process::ExitCode;

use clap::Parser;
use trellis::cli::{self, Cli, Command};
use trellis::{config, logging, server};

fn main() -> ExitCode {
    let cli = Cli::parse();
    let command = match cli.command {
        None | Some(Command::Serve) => None,
        Some(c) => Some(c),
    };
    let Some(command) = command else {
        // The config decides the runtime (`worker_threads`), so it is read
        // before there is one.
        let loaded = match config::load(cli.serve.config.as_deref(), std::env::vars()) {
            Ok(l) => l,
            Err(e) => {
                eprintln!("{e}");
                return ExitCode::from(2);
            }
        };
        return match runtime(loaded.config.worker_threads) {
            Ok(rt) => rt.block_on(serve(loaded, cli.serve)),
            Err(e) => {
                eprintln!("cannot start the async runtime: {e}");
                ExitCode::FAILURE
            }
        };
    };
    // The client commands make a call or two: one thread is plenty.
    match runtime(Some(1)) {
        Ok(rt) => rt.block_on(client(command, cli.serve.config)),
        Err(e) => {
            eprintln!("cannot start the async runtime: {e}");
            ExitCode::FAILURE
        }
    }
}

/// One thread → tokio's current-thread scheduler (no cross-thread wake-ups);
/// more → the multi-thread scheduler with that many workers; `None` → one
/// worker per core.
fn runtime(worker_threads: Option<usize>) -> std::io::Result<tokio::runtime::Runtime> {
    let mut builder = match worker_threads {
        Some(1) => tokio::runtime::Builder::new_current_thread(),
        Some(n) => {
            let mut b = tokio::runtime::Builder::new_multi_thread();
            b.worker_threads(n);
            b
        }
        None => tokio::runtime::Builder::new_multi_thread(),
    };
    builder.enable_all().build()
}

/// The commands that are not `serve`; `config` is the global `--config`.
async fn client(command: Command, config: Option<std::path::PathBuf>) -> ExitCode {
    let result = match command {
        Command::Serve => return ExitCode::SUCCESS, // handled in main
        Command::CheckConfig { file } => {
            let file = file.or(config);
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
        Command::Kv { client, op } => cli::kv(client, op).await,
        Command::Pubsub { client, op } => cli::pubsub(client, op).await,
        Command::Patterns { client, op } => cli::patterns(client, op).await,
        Command::Health { client, service } => match cli::health(client, service).await {
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

async fn serve(loaded: config::Loaded, args: cli::ServeArgs) -> ExitCode {
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
