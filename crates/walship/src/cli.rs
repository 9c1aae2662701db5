//! The command line: parses arguments, sets up logging and signals, maps results to exit codes.
//!
//! Invariant: this is the top of the crate. It calls the commands (`run`, `init-sql`, `check`,
//! `status`) and none of them calls back into it; what they share (loading the configuration,
//! printing a report) lives in [`crate::command`]. Exit codes: 0 after a graceful stop, 1 for a
//! runtime error, 2 for a configuration error.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};

use crate::command;
use crate::error::Error;

/// `walship --version`: the version, the git commit it was built from and the compiler, as
/// `walship_build_info` reports them.
const VERSION: &str = concat!(
    env!("CARGO_PKG_VERSION"),
    " (git ",
    env!("WALSHIP_GIT_COMMIT"),
    ", rustc ",
    env!("WALSHIP_RUSTC_VERSION"),
    ")"
);

/// Streams transactional-outbox events from PostgreSQL to Kafka.
#[derive(Debug, Parser)]
#[command(name = "walship", version = VERSION, about)]
pub struct Cli {
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
    /// Log format.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Human, env = "WALSHIP_LOG_FORMAT")]
    pub log_format: LogFormat,
}

/// Log output format.
#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    Human,
    /// One JSON object per line.
    Json,
}

/// Subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Stream outbox events until SIGINT/SIGTERM.
    Run {
        /// Configuration file.
        #[arg(long, short, env = "WALSHIP_CONFIG", default_value = "walship.toml")]
        config: PathBuf,
    },
    /// Print the SQL kit (outbox table, publication, outbox_emit) for a schema.
    InitSql(crate::init_sql::InitSqlArgs),
    /// Check the whole setup (PostgreSQL, slot, publication, table, broker, topics) and report
    /// every problem with its fix. Exit 0 when nothing failed, 1 otherwise, 2 for a bad config.
    Check {
        /// Configuration file.
        #[arg(long, short, env = "WALSHIP_CONFIG", default_value = "walship.toml")]
        config: PathBuf,
        /// Print the report as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Show the slot's position, lag, WAL retention and the publication's tables. Exit 0 when the
    /// slot exists and is not lost, 1 otherwise, 2 for a bad config.
    Status {
        /// Configuration file.
        #[arg(long, short, env = "WALSHIP_CONFIG", default_value = "walship.toml")]
        config: PathBuf,
        /// Print the status as JSON.
        #[arg(long)]
        json: bool,
    },
}

fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("WALSHIP_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    // Colours only on a terminal: log files and collectors get plain text.
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Human => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

/// Resolves when SIGINT or SIGTERM arrives.
async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        tracing::error!("cannot install signal handlers; stop walship with SIGKILL");
        return std::future::pending().await;
    };
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM: draining and stopping"),
        _ = int.recv() => tracing::info!("SIGINT: draining and stopping"),
    }
}

/// Runs the CLI; returns the process exit code.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging(cli.log_format);
    // One thread: the pipeline is a single task, and waking it across threads for every socket
    // read costs more than the work; librdkafka runs its own threads for the broker side.
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::from(1);
        }
    };
    match cli.command {
        Command::InitSql(args) => crate::init_sql::main(&args),
        Command::Check { config, json } => crate::check::main(&config, json, &runtime),
        Command::Status { config, json } => crate::status::main(&config, json, &runtime),
        Command::Run { config } => {
            let deployment = match command::load_deployment(&config) {
                Ok(d) => d,
                Err(code) => return code,
            };
            // Before any thread starts (the runtime's blocking pool and librdkafka's start
            // later), so every thread inherits the policy.
            match deployment.cpu_scheduling.apply() {
                Ok(()) => tracing::debug!(policy = ?deployment.cpu_scheduling, "CPU scheduling"),
                Err(why) => tracing::warn!("{why}"),
            }
            // Dropping the runtime waits for a broker call a stop left running on a blocking
            // thread (bounded by its own timeout): exiting under librdkafka's threads could race
            // OpenSSL's exit-time cleanup.
            match runtime.block_on(crate::deployment::run_deployment(
                deployment,
                shutdown_signal(),
            )) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    tracing::error!("{e}");
                    eprintln!("error: {e}");
                    ExitCode::from(if matches!(e, Error::Config(_)) { 2 } else { 1 })
                }
            }
        }
    }
}
