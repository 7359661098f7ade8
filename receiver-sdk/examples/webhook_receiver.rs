//! An example relying party: receives the hub's SETs by push and prints one
//! JSON line per accepted event on stdout.
//!
//! Configured by environment:
//!
//! | variable | meaning |
//! |---|---|
//! | `TRANSMITTER_ISSUER` | the hub's issuer URL (required) |
//! | `RECEIVER_AUDIENCE` | this receiver's audience at the hub (required) |
//! | `RECEIVER_TOKEN` | this receiver's bearer token at the hub (required) |
//! | `RECEIVER_PUSH_SECRET` | the `Authorization` value given to the hub and then required on every push (required) |
//! | `RECEIVER_LISTEN` | address to serve push on (default `127.0.0.1:0`) |
//! | `RECEIVER_ENDPOINT_URL` | the push URL the hub is given (default `http://` + the bound address + `/`) |
//! | `RECEIVER_TOUCH` | comma-separated agent session ids reported as touched at start |
//!
//! It creates its push stream, verifies it, reports the touches, then prints
//! `{"event", "session_id", "txn", "jti", "latency_ms"}` per accepted event
//! (stream verification SETs excepted) until Ctrl-C or SIGTERM, when it
//! deletes its stream. Logs go to stderr (`RUST_LOG`).
//!
//! ```sh
//! TRANSMITTER_ISSUER=http://127.0.0.1:8080 RECEIVER_AUDIENCE=https://rp.example \
//! RECEIVER_TOKEN=... RECEIVER_PUSH_SECRET='Bearer s3cr3t' RECEIVER_TOUCH=s1,s2 \
//! cargo run -p caep-receiver --example webhook_receiver
//! ```

use std::io::{IsTerminal as _, Write as _};
use std::net::SocketAddr;
use std::time::Duration;

use caep_receiver::{HandlerError, ReceivedEvent, Receiver, Signal, StreamRequest};
use serde_json::json;

type BoxError = Box<dyn std::error::Error + Send + Sync>;

fn required(name: &str) -> Result<String, BoxError> {
    std::env::var(name).map_err(|_| format!("{name} must be set").into())
}

#[tokio::main]
async fn main() -> Result<(), BoxError> {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .init();

    let issuer = required("TRANSMITTER_ISSUER")?;
    let audience = required("RECEIVER_AUDIENCE")?;
    let token = required("RECEIVER_TOKEN")?;
    let push_secret = required("RECEIVER_PUSH_SECRET")?;
    let listen: SocketAddr = std::env::var("RECEIVER_LISTEN").unwrap_or_else(|_| "127.0.0.1:0".into()).parse()?;
    let touches: Vec<String> = std::env::var("RECEIVER_TOUCH")
        .unwrap_or_default()
        .split(',')
        .map(str::trim)
        .filter(|id| !id.is_empty())
        .map(str::to_owned)
        .collect();

    let receiver = Receiver::discover(&issuer, audience, token).await?;

    // Serve push before creating the stream: verification arrives by push.
    let listener = tokio::net::TcpListener::bind(listen).await?;
    let bound = listener.local_addr()?;
    let endpoint_url = std::env::var("RECEIVER_ENDPOINT_URL").unwrap_or_else(|_| format!("http://{bound}/"));
    let router = receiver.push_router(Some(push_secret.clone()), print_event);
    let (stop_server, server_stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(async move {
        axum::serve(listener, router)
            .with_graceful_shutdown(async {
                server_stopped.await.ok();
            })
            .await
    });
    tracing::info!(%bound, %endpoint_url, "push endpoint listening");

    let request =
        StreamRequest::push(&endpoint_url, Some(push_secret)).all_events().description("webhook_receiver example");
    let stream = receiver.create_stream(&request).await?;
    let stream_id = stream.stream_id.clone();
    let setup = async {
        receiver.verify_stream(&stream_id, Duration::from_secs(15)).await?;
        for session_id in &touches {
            receiver.touch(&stream_id, session_id).await?;
        }
        Ok::<(), BoxError>(())
    };
    if let Err(error) = setup.await {
        receiver.delete_stream(&stream_id).await.ok();
        return Err(error);
    }
    tracing::info!(stream_id = %stream_id, touches = touches.len(), "ready");

    shutdown_signal().await;
    if let Err(error) = receiver.delete_stream(&stream_id).await {
        tracing::warn!(%error, stream_id = %stream_id, "could not delete the stream");
    }
    stop_server.send(()).ok();
    // Graceful shutdown waits for open connections; the hub may hold a
    // keep-alive one, so do not wait for it for long.
    match tokio::time::timeout(Duration::from_secs(3), server).await {
        Ok(served) => served??,
        Err(_) => tracing::debug!("push server still had open connections at exit"),
    }
    Ok(())
}

/// The handler: one JSON line per accepted event.
async fn print_event(event: ReceivedEvent) -> Result<(), HandlerError> {
    if matches!(event.signal(), Signal::Verification { .. }) {
        return Ok(());
    }
    let line = json!({
        "event": event.event_type(),
        "session_id": event.session_id(),
        "txn": event.txn(),
        "jti": event.jti(),
        "latency_ms": event.latency_ms(),
    });
    // A failed write (stdout closed) is reported to the hub as "not
    // processed", so the SET is delivered again rather than lost.
    let mut stdout = std::io::stdout().lock();
    writeln!(stdout, "{line}")?;
    stdout.flush()?;
    Ok(())
}

async fn shutdown_signal() {
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        () = terminate => {}
    }
}
