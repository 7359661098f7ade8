//! An MCP-style JSON-RPC service guarded by `EnforceLayer`: requests of a
//! revoked agent session (or of an actor it acts through, or of a disabled
//! user) get 401 before the service runs; every new agent session is
//! reported to the hub as a touch, so its revocation reaches this service.
//!
//! ```sh
//! TRANSMITTER_ISSUER=http://127.0.0.1:8080 RECEIVER_AUDIENCE=https://mcp.example \
//! RECEIVER_TOKEN=... cargo run -p caep-receiver --example mcp_guarded
//! curl -s localhost:3000/mcp -H "Authorization: Bearer $AGENT_JWT" \
//!   -d '{"jsonrpc":"2.0","id":1,"method":"tools/list"}'
//! ```

use std::sync::Arc;
use std::time::Duration;

use axum::Json;
use axum::routing::post;
use caep_receiver::guard::EnforceLayer;
use caep_receiver::{Receiver, Revocations, StreamRequest};
use serde_json::{Value, json};

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// The service itself: it knows nothing of revocations.
async fn mcp(Json(request): Json<Value>) -> Json<Value> {
    let result = match request["method"].as_str() {
        Some("tools/list") => json!({"tools": [{"name": "lookup", "description": "Looks something up"}]}),
        Some("tools/call") => json!({"content": [{"type": "text", "text": "found it"}]}),
        _ => {
            return Json(
                json!({"jsonrpc": "2.0", "id": request["id"], "error": {"code": -32601, "message": "no such method"}}),
            );
        }
    };
    Json(json!({"jsonrpc": "2.0", "id": request["id"], "result": result}))
}

#[tokio::main]
async fn main() -> Result<(), BoxError> {
    tracing_subscriber::fmt().with_writer(std::io::stderr).init();
    let env = |name: &str| std::env::var(name).map_err(|_| format!("{name} must be set"));
    let (issuer, audience, token) = (env("TRANSMITTER_ISSUER")?, env("RECEIVER_AUDIENCE")?, env("RECEIVER_TOKEN")?);

    // The integration: a store on disk, a stream feeding it, the layer.
    let revocations = Revocations::open("mcp-revocations.redb".as_ref(), Duration::from_secs(3600))?;
    let receiver =
        Arc::new(Receiver::discover(&issuer, &audience, &token).await?.with_revocations(revocations.clone()));
    let stream = receiver.create_stream(&StreamRequest::poll().all_events()).await?;
    tokio::spawn(receiver.poll_loop(&stream, |_| async { Ok(()) })?.run(std::future::pending()));
    let guard = EnforceLayer::new(revocations).reporting_touches(receiver, &stream.stream_id);
    let app = axum::Router::new().route("/mcp", post(mcp)).layer(guard);

    let listener = tokio::net::TcpListener::bind("127.0.0.1:3000").await?;
    axum::serve(listener, app).await?;
    Ok(())
}
