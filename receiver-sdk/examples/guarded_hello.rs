//! A hello-world axum service, bare or behind `EnforceLayer` with 100,000
//! revoked sessions in its store, for measuring the layer's overhead over
//! HTTP with a load generator (wrk):
//!
//! ```sh
//! cargo build --release -p caep-receiver --example guarded_hello
//! target/release/examples/guarded_hello bare 127.0.0.1:3001 &
//! target/release/examples/guarded_hello guarded 127.0.0.1:3002 &
//! wrk -t2 -c32 -d10s -H "Authorization: Bearer $AGENT_JWT" http://127.0.0.1:3001/
//! ```

use std::time::Duration;

use caep_receiver::Revocations;
use caep_receiver::guard::EnforceLayer;

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    let mut args = std::env::args().skip(1);
    let mode = args.next().unwrap_or_else(|| "guarded".into());
    let listen = args.next().unwrap_or_else(|| "127.0.0.1:3000".into());
    let app = axum::Router::new().route("/", axum::routing::get(|| async { "hello" }));
    let app = match mode.as_str() {
        "bare" => app,
        "guarded" => {
            let revocations = Revocations::in_memory(Duration::from_secs(3600));
            for n in 0..100_000 {
                revocations.revoke_session(&format!("revoked-{n}")).await?;
            }
            app.layer(EnforceLayer::new(revocations))
        }
        other => return Err(format!("mode `{other}`: bare or guarded").into()),
    };
    let listener = tokio::net::TcpListener::bind(&listen).await?;
    eprintln!("{mode} hello-world on {listen}");
    axum::serve(listener, app).await?;
    Ok(())
}
