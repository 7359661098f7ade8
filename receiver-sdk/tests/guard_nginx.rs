//! `caep-guard` behind a real nginx (Debian's package; `.ci/run` installs
//! it, and a missing nginx fails this test rather than skipping it): nginx
//! `auth_request`s every call to a small upstream through the guard. Before
//! the IdP revokes the agent's session the upstream is reached; after it the
//! agent gets 401 with the RFC 6750 challenge and the upstream is not
//! reached, while another agent is still let through. The guard reports the
//! agents' sessions to the hub by itself.

mod support;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use caep_schemas::event::{Event, SessionEstablished, SessionRevoked};
use caep_schemas::jose::{Algorithm, Jwks, SigningKey};
use caep_schemas::set::SecurityEventToken;
use caep_schemas::subject::SubjectId;
use serde_json::{Value, json};
use support::{TestHub, WAIT, serve};

const IDP: &str = "https://idp.example.com";
const AUDIENCE: &str = "https://legacy-api.example.com";

/// A child process killed on drop.
struct Running(Child);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").expect("bind").local_addr().expect("addr").port()
}

fn nginx_binary() -> PathBuf {
    let path = std::env::var_os("CAEP_NGINX").map_or_else(|| PathBuf::from("/usr/sbin/nginx"), PathBuf::from);
    assert!(path.is_file(), "nginx not found at {} (apt-get install nginx, or set CAEP_NGINX)", path.display());
    path
}

/// nginx on `port`, asking the guard at `guard` about every request to `upstream`.
fn nginx(dir: &Path, port: u16, guard: u16, upstream: u16) -> Running {
    let conf = format!(
        r#"daemon off;
master_process off;
worker_processes 1;
error_log {dir}/error.log;
pid {dir}/nginx.pid;
events {{ worker_connections 64; }}
http {{
    access_log off;
    client_body_temp_path {dir}/body;
    proxy_temp_path {dir}/proxy;
    fastcgi_temp_path {dir}/fastcgi;
    uwsgi_temp_path {dir}/uwsgi;
    scgi_temp_path {dir}/scgi;
    server {{
        listen 127.0.0.1:{port};
        location = /_caep_check {{
            internal;
            proxy_pass http://127.0.0.1:{guard}/check;
            proxy_pass_request_body off;
            proxy_set_header Content-Length "";
        }}
        location / {{
            auth_request /_caep_check;
            auth_request_set $caep_challenge $upstream_http_www_authenticate;
            add_header WWW-Authenticate $caep_challenge always;
            proxy_pass http://127.0.0.1:{upstream};
        }}
    }}
}}
"#,
        dir = dir.display()
    );
    let path = dir.join("nginx.conf");
    std::fs::write(&path, conf).expect("nginx.conf");
    let child = Command::new(nginx_binary())
        .arg("-p")
        .arg(dir)
        .arg("-c")
        .arg(&path)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("start nginx");
    Running(child)
}

async fn wait_for_port(port: u16, what: &str) {
    let deadline = Instant::now() + WAIT;
    while tokio::net::TcpStream::connect(("127.0.0.1", port)).await.is_err() {
        assert!(Instant::now() < deadline, "{what} never listened on {port}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn ingest(hub: &TestHub, key: &SigningKey, session: &str, event: Event) {
    let subject = SubjectId::session_of(SubjectId::opaque(session), Some(SubjectId::email("ada@example.com")));
    hub.ingest(SecurityEventToken::new(IDP, hub.issuer.as_str(), subject, event).sign(key).expect("sign")).await;
}

fn agent_token(session: &str) -> String {
    let part = |value: Value| URL_SAFE_NO_PAD.encode(value.to_string());
    format!("{}.{}.sig", part(json!({"alg": "ES256"})), part(json!({"iss": IDP, "sub": "ada", "sid": session})))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_sidecar_behind_nginx_refuses_a_revoked_agent_and_lets_others_through() {
    let hub = TestHub::start().await;
    let idp_key = SigningKey::generate(Algorithm::Es256).expect("key");
    let issuer = json!({"issuer": IDP, "jwks": Jwks::from_keys([&idp_key]).to_json()});
    assert_eq!(hub.admin(reqwest::Method::POST, "/admin/issuers", issuer).await.0, 201);
    for session in ["agent-1", "agent-2"] {
        ingest(&hub, &idp_key, session, Event::SessionEstablished(SessionEstablished::default())).await;
    }
    let guard_token = hub.new_receiver("legacy api guard", AUDIENCE).await;

    let dir = tempfile::tempdir().expect("temp dir");
    let guard_port = free_port();
    let _guard = Running(
        Command::new(env!("CARGO_BIN_EXE_caep-guard"))
            .env("CAEP_GUARD_TRANSMITTER", &hub.issuer)
            .env("CAEP_GUARD_AUDIENCE", AUDIENCE)
            .env("CAEP_GUARD_TOKEN", &guard_token)
            .env("CAEP_GUARD_LISTEN", format!("127.0.0.1:{guard_port}"))
            .env("CAEP_GUARD_DATA_DIR", dir.path().join("guard"))
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .spawn()
            .expect("start caep-guard"),
    );
    wait_for_port(guard_port, "caep-guard").await;

    let upstream_calls = Arc::new(AtomicUsize::new(0));
    let counter = Arc::clone(&upstream_calls);
    let upstream = axum::Router::new().fallback(move || {
        counter.fetch_add(1, Ordering::SeqCst);
        async { "hello from the upstream" }
    });
    let upstream_port = serve(upstream).await.port();
    let nginx_port = free_port();
    let nginx_dir = dir.path().join("nginx");
    std::fs::create_dir_all(&nginx_dir).expect("nginx dir");
    let _nginx = nginx(&nginx_dir, nginx_port, guard_port, upstream_port);
    wait_for_port(nginx_port, "nginx").await;

    let http = reqwest::Client::new();
    let call = async |session: &str| {
        let response = http
            .get(format!("http://127.0.0.1:{nginx_port}/tools/lookup"))
            .bearer_auth(agent_token(session))
            .send()
            .await
            .expect("call through nginx");
        let challenge = response.headers().get("www-authenticate").map(|v| v.to_str().unwrap_or_default().to_owned());
        (response.status().as_u16(), challenge)
    };

    // Before the revocation: through to the upstream.
    assert_eq!(call("agent-1").await.0, 200);
    assert_eq!(call("agent-2").await.0, 200);
    assert_eq!(upstream_calls.load(Ordering::SeqCst), 2);
    // The guard told the hub which sessions reached this RP.
    let deadline = Instant::now() + WAIT;
    loop {
        let (_, view) = hub.admin(reqwest::Method::GET, "/admin/sessions/agent-1", Value::Null).await;
        if view["touches"].as_array().is_some_and(|touches| touches.len() == 1) {
            break;
        }
        assert!(Instant::now() < deadline, "the guard's touch never reached the hub: {view}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // The IdP revokes agent-1: refused at nginx, the upstream not reached.
    ingest(&hub, &idp_key, "agent-1", Event::SessionRevoked(SessionRevoked::default())).await;
    let deadline = Instant::now() + WAIT;
    let refused = loop {
        let answer = call("agent-1").await;
        if answer.0 == 401 {
            break answer;
        }
        assert!(Instant::now() < deadline, "agent-1 is still let through: {answer:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(refused.1.as_deref(), Some(r#"Bearer error="invalid_token", error_description="session revoked""#));
    let reached = upstream_calls.load(Ordering::SeqCst);
    assert_eq!(call("agent-1").await.0, 401);
    assert_eq!(upstream_calls.load(Ordering::SeqCst), reached, "a refused call never reaches the upstream");
    assert_eq!(call("agent-2").await.0, 200, "an unaffected agent is let through");

    let metrics = http.get(format!("http://127.0.0.1:{guard_port}/metrics")).send().await.expect("metrics");
    let metrics = metrics.text().await.expect("metrics text");
    assert!(metrics.contains("caep_guard_revoked{kind=\"session\"} 1"), "{metrics}");
    assert!(metrics.contains("caep_guard_checks_total{outcome=\"refused\"} 2"), "{metrics}");
}
