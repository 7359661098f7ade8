#![forbid(unsafe_code)]
//! `caep-guard`: forward-auth enforcement of agent-session revocations for a
//! relying party in any language (see `caep_receiver::sidecar`).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use caep_receiver::sidecar::{self, GuardConfig, GuardDelivery};
use clap::{Parser, ValueEnum};

/// Answers `GET /check` for nginx `auth_request`, Envoy ext_authz (HTTP),
/// Traefik ForwardAuth or Caddy `forward_auth`: 200, or 401 with
/// `WWW-Authenticate: Bearer error="invalid_token", error_description="session
/// revoked"` when the request's bearer JWT names a revoked agent session (its
/// session claim, or that of an actor in its `act` chain) or a revoked user.
/// It joins the transmitter (the caep-hub) as a receiver, keeps the
/// revocations on disk, and reports each new agent session as a touch.
/// Also serves `/healthz` and `/metrics`.
#[derive(Debug, Parser)]
#[command(name = "caep-guard", version)]
struct Args {
    /// The transmitter's issuer URL (the hub).
    #[arg(long, env = "CAEP_GUARD_TRANSMITTER")]
    transmitter: String,
    /// This receiver's audience, as registered at the hub.
    #[arg(long, env = "CAEP_GUARD_AUDIENCE")]
    audience: String,
    /// This receiver's bearer token at the hub.
    #[arg(long, env = "CAEP_GUARD_TOKEN", hide_env_values = true)]
    token: String,
    /// Where /check, /healthz, /metrics (and /push) are served.
    #[arg(long, env = "CAEP_GUARD_LISTEN", default_value = "127.0.0.1:9090")]
    listen: SocketAddr,
    /// How SETs arrive: `poll` needs no inbound connection; `push` needs CAEP_GUARD_PUSH_URL.
    #[arg(long, env = "CAEP_GUARD_DELIVERY", value_enum, default_value_t = Delivery::Poll)]
    delivery: Delivery,
    /// With push: the URL the hub posts to, reaching this guard's /push.
    #[arg(long, env = "CAEP_GUARD_PUSH_URL")]
    push_url: Option<String>,
    /// The JWT claim naming the agent session.
    #[arg(long, env = "CAEP_GUARD_SESSION_CLAIM", default_value = "sid")]
    session_claim: String,
    /// Where the revocation store and the stream id are kept.
    #[arg(long, env = "CAEP_GUARD_DATA_DIR", default_value = "./caep-guard-data")]
    data_dir: PathBuf,
    /// How long a revocation is honoured, in seconds: at least the longest
    /// lifetime of the access tokens it guards.
    #[arg(long, env = "CAEP_GUARD_REVOCATION_TTL_SECS", default_value_t = 86_400)]
    revocation_ttl_secs: u64,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum Delivery {
    Poll,
    Push,
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "caep_receiver=info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let args = Args::parse();
    let delivery = match (args.delivery, args.push_url) {
        (Delivery::Poll, _) => GuardDelivery::Poll,
        (Delivery::Push, Some(url)) => GuardDelivery::Push { url },
        (Delivery::Push, None) => {
            eprintln!("caep-guard: CAEP_GUARD_DELIVERY=push needs CAEP_GUARD_PUSH_URL");
            return ExitCode::from(2);
        }
    };
    let config = GuardConfig {
        transmitter: args.transmitter,
        audience: args.audience,
        token: args.token,
        listen: args.listen,
        delivery,
        session_claim: args.session_claim,
        data_dir: args.data_dir,
        revocation_ttl: Duration::from_secs(args.revocation_ttl_secs),
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("caep-guard: {error}");
            return ExitCode::from(2);
        }
    };
    runtime.block_on(async move {
        let guard = match sidecar::start(config).await {
            Ok(guard) => guard,
            Err(error) => {
                eprintln!("caep-guard: {error}");
                return ExitCode::from(2);
            }
        };
        match guard.serve().await {
            Ok(()) => ExitCode::SUCCESS,
            Err(error) => {
                eprintln!("caep-guard: {error}");
                ExitCode::from(1)
            }
        }
    })
}
