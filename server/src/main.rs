use std::path::PathBuf;

use clap::Parser;
use hardneg_server::config::{Config, Overrides};

// glibc malloc spends much of candle's forward pass in the kernel; mimalloc does not.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Online hard-negative mining over gRPC.
#[derive(Parser, Debug)]
#[command(name = "hardneg-server", version, about)]
struct Args {
    /// TOML configuration file (see config/hardneg.toml for every key).
    #[arg(long)]
    config: Option<PathBuf>,
    /// gRPC listen address, ADDR:PORT (server.listen).
    #[arg(long)]
    listen: Option<String>,
    /// Prometheus metrics address, ADDR:PORT (server.metrics_listen).
    #[arg(long)]
    metrics_listen: Option<String>,
    /// Data directory for the store and saved indexes (server.data_dir).
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// Bi-encoder model directory (encoder.model_dir).
    #[arg(long)]
    model_dir: Option<PathBuf>,
    /// Cross-encoder model directory for reranking (reranker.model_dir).
    #[arg(long)]
    reranker_dir: Option<PathBuf>,
    /// Print the effective configuration and exit.
    #[arg(long)]
    print_config: bool,
}

async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).expect("installing a SIGTERM handler must succeed");
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM received"),
        _ = tokio::signal::ctrl_c() => tracing::info!("SIGINT received"),
    }
}

fn main() -> std::process::ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let args = Args::parse();
    let overrides = Overrides { listen: args.listen, metrics_listen: args.metrics_listen, data_dir: args.data_dir, model_dir: args.model_dir, reranker_dir: args.reranker_dir };
    let cfg = match Config::load(args.config.as_deref(), &overrides) {
        Ok(cfg) => cfg,
        Err(e) => {
            eprintln!("error: {e}");
            return std::process::ExitCode::from(2);
        }
    };
    if args.print_config {
        println!("{cfg:#?}");
        return std::process::ExitCode::SUCCESS;
    }
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().expect("tokio runtime starts");
    let served = runtime.block_on(hardneg_server::serve(cfg, shutdown_signal()));
    // Work still on blocking threads (a save cut off by server.shutdown_timeout_seconds) does
    // not hold up the exit.
    runtime.shutdown_timeout(std::time::Duration::from_millis(200));
    match served {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e:#}");
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
