//! `trellis`: load config → build the runtime it asks for → bind → serve
//! until SIGINT/SIGTERM → stop patterns.

use std::future::Future;
use std::process::ExitCode;

use clap::Parser;
use trellis::cli::{self, Cli, Command};
use trellis::{config, logging, server};

// Every forwarded call allocates a few small, short-lived objects (h2
// stream state, header blocks, the call's future); mimalloc's thread-local
// free lists serve them faster than glibc's malloc (measured with `make
// bench-peers`).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        None | Some(Command::Serve) => {
            // The config decides the runtime (`worker_threads`), so it is
            // read before there is one.
            let loaded = match config::load(cli.serve.config.as_deref(), std::env::vars()) {
                Ok(l) => l,
                Err(e) => {
                    eprintln!("{e}");
                    return ExitCode::from(2);
                }
            };
            let worker_threads = loaded.config.worker_threads;
            block_on(worker_threads, serve(loaded, cli.serve))
        }
        Some(Command::CheckConfig { file }) => check_config(file.or(cli.serve.config)),
        // The client commands make a call or two: one thread is plenty.
        Some(Command::Kv { op }) => block_on(Some(1), done(cli::kv(cli.client, op))),
        Some(Command::Pubsub { op }) => block_on(Some(1), done(cli::pubsub(cli.client, op))),
        Some(Command::Patterns { op }) => block_on(Some(1), done(cli::patterns(cli.client, op))),
        Some(Command::Reload) => block_on(Some(1), async {
            match cli::reload(cli.client).await {
                Ok(cli::Reloaded::Applied) => ExitCode::SUCCESS,
                Ok(cli::Reloaded::Refused) => ExitCode::from(2),
                Err(e) => failed(e),
            }
        }),
        Some(Command::Drain) => block_on(Some(1), done(cli::drain(cli.client))),
        Some(Command::Health { service }) => block_on(Some(1), async {
            match cli::health(cli.client, service).await {
                Ok(true) => ExitCode::SUCCESS,
                Ok(false) => ExitCode::from(1),
                Err(e) => failed(e),
            }
        }),
    }
}

/// Runs `main` on a runtime with `worker_threads`: one → tokio's
/// current-thread scheduler (no cross-thread wake-ups); more → the
/// multi-thread scheduler with that many workers; `None` → the default for
/// this machine's cores ([`config::default_worker_threads`]).
fn block_on(worker_threads: Option<usize>, main: impl Future<Output = ExitCode>) -> ExitCode {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let mut builder = match worker_threads.unwrap_or_else(|| config::default_worker_threads(cores))
    {
        1 => tokio::runtime::Builder::new_current_thread(),
        n => {
            let mut b = tokio::runtime::Builder::new_multi_thread();
            b.worker_threads(n);
            b
        }
    };
    match builder.enable_all().build() {
        Ok(rt) => rt.block_on(main),
        Err(e) => {
            eprintln!("cannot start the async runtime: {e}");
            ExitCode::FAILURE
        }
    }
}

/// A client command's exit code: success, or the error on stderr.
async fn done<E: std::fmt::Display>(command: impl Future<Output = Result<(), E>>) -> ExitCode {
    match command.await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => failed(e),
    }
}

fn failed(e: impl std::fmt::Display) -> ExitCode {
    eprintln!("error: {e}");
    ExitCode::FAILURE
}

/// `trellis check-config`: the file parses, validates, and every pattern's
/// command resolves. Needs no runtime.
fn check_config(file: Option<std::path::PathBuf>) -> ExitCode {
    match config::load(file.as_deref(), std::env::vars()) {
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
    }
}

/// Every pattern's command must resolve to an executable, and the TLS
/// files (when set) must load.
fn check_commands(loaded: &config::Loaded) -> Result<(), String> {
    let mut missing = trellis::supervisor::check_commands(loaded);
    if let Some(Err(e)) = loaded.config.tls.as_ref().map(trellis::tls::Tls::load) {
        missing.push(e.to_string());
    }
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
    // Handlers first, so a SIGTERM at any point from here is graceful.
    let shutdown = server::signal();
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
    let admin = match loaded.config.listen.admin {
        Some(addr) => match bind(addr, "listen.admin", "TRELLIS_LISTEN__ADMIN").await {
            Ok(l) => Some(l),
            Err(code) => return code,
        },
        None => None,
    };
    let listeners = server::Listeners { grpc, http, admin };
    match server::run(loaded, listeners, shutdown).await {
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
