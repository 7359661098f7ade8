#![forbid(unsafe_code)]
//! `caep-hub`: the command line of the CAEP event hub.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use caep_hub::admin_token::{AdminToken, NewToken};
use caep_hub::config::HubConfig;
use caep_hub::server;
use caep_schemas::jose::Algorithm;
use caep_transmitter::keys::KeyStore;
use caep_transmitter::store::Store;
use clap::{Parser, Subcommand};

/// mimalloc: the hub allocates many small, short-lived buffers from many
/// threads (SETs, JSON, HTTP), where glibc's allocator contends. Built
/// without transparent huge pages (the workspace's `no_thp`; see Cargo.toml).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Continuous access evaluation (CAEP) event hub: ingests IdP security events
/// and cascades session revocations to every relying party an agent touched.
///
/// Settings come from built-in defaults, then the optional TOML file, then
/// CAEP_HUB_* environment variables (CAEP_HUB_LISTEN, CAEP_HUB_ISSUER,
/// CAEP_HUB_DATA_DIR, CAEP_HUB_ADMIN_TOKEN, CAEP_HUB_SIGNING_ALG,
/// CAEP_HUB_PUSH_ALLOW_CIDRS).
#[derive(Parser)]
#[command(name = "caep-hub", version)]
struct Cli {
    /// TOML configuration file (also CAEP_HUB_CONFIG).
    #[arg(long, global = true, value_name = "FILE")]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Operate a running hub over its admin API (--hub URL; the token from
    /// CAEP_HUB_ADMIN_TOKEN): issuers, receivers, streams, cascades, dead letters.
    Admin(caep_hub::admin_cli::AdminArgs),
    #[command(flatten)]
    Local(LocalCommand),
}

/// Commands that work on this machine's configuration and data directory.
#[derive(Subcommand)]
enum LocalCommand {
    /// Run the hub (HTTP server) until SIGTERM or Ctrl-C.
    Serve,
    /// Manage the signing keys published in the JWKS.
    #[command(subcommand)]
    Keys(KeysCommand),
    /// Manage the operator's admin bearer token.
    #[command(subcommand)]
    AdminToken(AdminTokenCommand),
    /// The key that seals receivers' push credentials at rest.
    #[command(subcommand)]
    SecretKey(SecretKeyCommand),
    /// Print the OpenAPI 3.1 document of the HTTP API (as served at /openapi.json
    /// by a hub whose issuer URL has no path).
    Openapi,
}

#[derive(Subcommand)]
enum SecretKeyCommand {
    /// Print a new random key for CAEP_HUB_SECRET_KEY (every instance of a
    /// scaled-out hub must have the same one; without it, a single hub keeps
    /// its own key in DATA_DIR/keys/secret.key).
    Generate,
}

#[derive(Subcommand)]
enum KeysCommand {
    /// List keys with their state (active, published, retired).
    List,
    /// Make a new active key; the previous one stays published for verifiers.
    /// A running hub picks the new key up at its next start.
    Rotate {
        /// Algorithm of the new key (ES256, RS256, EdDSA); default: CAEP_HUB_SIGNING_ALG.
        #[arg(long)]
        alg: Option<Algorithm>,
    },
    /// Stop publishing a key (never the active one: rotate first).
    Retire {
        /// Key id, as `keys list` shows it (base64url, so it may begin with `-`).
        #[arg(allow_hyphen_values = true)]
        kid: String,
    },
}

#[derive(Subcommand)]
enum AdminTokenCommand {
    /// Mint a new admin token (shown once) and invalidate the old one.
    Rotate,
}

fn main() -> ExitCode {
    init_tracing();
    let cli = Cli::parse();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("caep-hub: {}", describe(&error));
            ExitCode::FAILURE
        }
    }
}

/// The error and its causes, each cause once: most of the hub's errors
/// already end with their cause's message, which `{:#}` would repeat.
fn describe(error: &anyhow::Error) -> String {
    let mut text = error.to_string();
    for cause in error.chain().skip(1).map(ToString::to_string) {
        if !text.ends_with(&cause) {
            text = format!("{text}: {cause}");
        }
    }
    text
}

fn run(cli: Cli) -> anyhow::Result<()> {
    let command = match cli.command {
        // A client of a running hub: it needs no configuration of its own.
        Command::Admin(args) => return caep_hub::admin_cli::run(args, std::env::var("CAEP_HUB_ADMIN_TOKEN").ok()),
        Command::Local(LocalCommand::Openapi) => {
            println!("{}", serde_json::to_string_pretty(&caep_hub::openapi::document(""))?);
            return Ok(());
        }
        Command::Local(command) => command,
    };
    let config = HubConfig::load(cli.config.as_deref())?;
    match command {
        LocalCommand::Serve => serve(config),
        LocalCommand::Keys(command) => keys(config, command),
        LocalCommand::Openapi => Ok(()),
        LocalCommand::SecretKey(SecretKeyCommand::Generate) => {
            println!("CAEP_HUB_SECRET_KEY={}", caep_transmitter::secrets::SecretBox::generate_key());
            Ok(())
        }
        LocalCommand::AdminToken(AdminTokenCommand::Rotate) => {
            if config.admin_token.is_some() {
                anyhow::bail!(
                    "the admin token is set by CAEP_HUB_ADMIN_TOKEN (or the config file): change it there and \
                     restart the hub; rotate only replaces a generated token"
                );
            }
            let (_, token) = AdminToken::rotate(&config.data_dir)?;
            show_admin_token(&token);
            Ok(())
        }
    }
}

fn serve(config: HubConfig) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    let outcome = runtime.block_on(async {
        let mut bound = server::bind(&config).await?;
        if let Some(token) = bound.new_admin_token.take() {
            show_admin_token(&token);
        }
        let hub = Arc::clone(&bound.hub);
        anyhow::Ok((hub, bound.serve().await))
    });
    // Dropping a runtime waits for its blocking calls without a bound (a
    // librdkafka call against a broker that is gone); the drain is over, so
    // give them a moment and leave.
    runtime.shutdown_timeout(BLOCKING_CALLS_AT_EXIT);
    let (hub, served) = outcome?;
    // With every task gone nothing writes any more, and the stores open now
    // are all there will be.
    close_stores(hub.open_stores());
    tracing::info!("caep-hub stopped");
    Ok(served?)
}

/// How long the exit waits for blocking calls still running after the drain.
const BLOCKING_CALLS_AT_EXIT: Duration = Duration::from_secs(2);
/// How long the exit waits for the databases to close.
const STORES_CLOSE: Duration = Duration::from_secs(10);

/// Closes the databases cleanly (their last writes made durable, no repair
/// at the next start), on a thread of their own: a disk that hangs must not
/// keep the process from exiting.
fn close_stores(stores: Vec<Store>) {
    let (done, closed) = std::sync::mpsc::channel();
    let closing = std::thread::spawn(move || {
        for store in stores {
            if let Err(error) = store.close(STORES_CLOSE) {
                tracing::warn!(%error, path = %store.path().display(), "closing a database at exit");
            }
        }
        let _ = done.send(());
    });
    if closed.recv_timeout(STORES_CLOSE).is_ok() {
        let _ = closing.join();
    } else {
        tracing::warn!(within_secs = STORES_CLOSE.as_secs(), "the databases did not close in time; exiting anyway");
    }
}

fn keys(config: HubConfig, command: KeysCommand) -> anyhow::Result<()> {
    let store = KeyStore::open(&config.data_dir, config.signing_alg)?;
    match command {
        KeysCommand::List => {
            println!("{:<44} {:<6} {:<10} CREATED", "KID", "ALG", "STATE");
            for key in store.list() {
                println!("{:<44} {:<6} {:<10} {}", key.kid, key.alg.as_str(), key.state.as_str(), key.created_at);
            }
        }
        KeysCommand::Rotate { alg } => {
            let key = store.rotate(alg)?;
            println!("new active key {} ({})", key.kid, key.alg.as_str());
        }
        KeysCommand::Retire { kid } => {
            store.retire(&kid)?;
            println!("retired {kid}");
        }
    }
    Ok(())
}

/// The one place the admin token is ever shown: on stdout, never in logs.
fn show_admin_token(NewToken(token): &NewToken) {
    println!("CAEP_HUB_ADMIN_TOKEN={token}");
    println!("(admin token: shown once, only its hash is stored; `caep-hub admin-token rotate` makes a new one)");
}

fn init_tracing() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).with_ansi(ansi).init();
}
