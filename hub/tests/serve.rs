//! `caep-hub` as a user runs it: the real binary, a real data directory,
//! HTTP on loopback.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

const BIN: &str = env!("CARGO_BIN_EXE_caep-hub");

/// A running `caep-hub serve`, killed on drop.
struct Hub {
    child: Child,
    base: String,
    stdout_lines: Vec<String>,
}

impl Drop for Hub {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_port() -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    listener.local_addr().expect("addr").port()
}

fn command(data_dir: &Path, envs: &[(&str, &str)]) -> Command {
    let mut command = Command::new(BIN);
    command
        .env_remove("CAEP_HUB_ADMIN_TOKEN")
        .env_remove("CAEP_HUB_SIGNING_ALG")
        .env_remove("CAEP_HUB_CONFIG")
        .env("CAEP_HUB_DATA_DIR", data_dir)
        .env("RUST_LOG", "warn");
    for (key, value) in envs {
        command.env(key, value);
    }
    command
}

fn start(data_dir: &Path, envs: &[(&str, &str)]) -> Hub {
    let port = free_port();
    let listen = format!("127.0.0.1:{port}");
    let mut child = command(data_dir, envs)
        .env("CAEP_HUB_LISTEN", &listen)
        .arg("serve")
        .stdout(Stdio::piped())
        .spawn()
        .expect("spawn caep-hub");
    let stdout = child.stdout.take().expect("stdout");
    let base = format!("http://{listen}");
    wait_healthy(&base, &mut child);
    // The admin-token lines are printed before the server starts listening.
    let stdout_lines = read_available_lines(stdout);
    Hub { child, base, stdout_lines }
}

fn read_available_lines(stdout: std::process::ChildStdout) -> Vec<String> {
    let (sender, receiver) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if sender.send(line).is_err() {
                break;
            }
        }
    });
    let mut lines = Vec::new();
    while let Ok(line) = receiver.recv_timeout(Duration::from_millis(300)) {
        lines.push(line);
    }
    lines
}

fn wait_healthy(base: &str, child: &mut Child) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline {
        if let Ok(Some(status)) = child.try_wait() {
            panic!("caep-hub exited early: {status}");
        }
        if get_json(&format!("{base}/healthz")).is_ok() {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!("caep-hub did not become healthy");
}

/// A minimal blocking HTTP GET, so the test depends on no client crate.
fn get_json(url: &str) -> Result<Value, String> {
    use std::io::{Read, Write};
    let rest = url.strip_prefix("http://").ok_or("http only")?;
    let (authority, path) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
    let mut stream = std::net::TcpStream::connect(authority).map_err(|e| e.to_string())?;
    write!(stream, "GET {path} HTTP/1.1\r\nHost: {authority}\r\nConnection: close\r\n\r\n")
        .map_err(|e| e.to_string())?;
    let mut response = String::new();
    stream.read_to_string(&mut response).map_err(|e| e.to_string())?;
    let (head, body) = response.split_once("\r\n\r\n").ok_or("no body")?;
    if !head.starts_with("HTTP/1.1 200") {
        return Err(head.to_owned());
    }
    serde_json::from_str(body).map_err(|e| format!("{e}: {body}"))
}

fn kids(jwks: &Value) -> Vec<String> {
    let mut kids: Vec<String> = jwks["keys"]
        .as_array()
        .expect("keys array")
        .iter()
        .map(|key| key["kid"].as_str().expect("kid").to_owned())
        .collect();
    kids.sort();
    kids
}

fn run_cli(data_dir: &Path, args: &[&str]) -> String {
    let output = command(data_dir, &[]).args(args).output().expect("run caep-hub");
    assert!(output.status.success(), "caep-hub {args:?}: {}", String::from_utf8_lossy(&output.stderr));
    String::from_utf8(output.stdout).expect("utf-8")
}

#[test]
fn metadata_is_complete_and_absolute() {
    let dir = tempfile::tempdir().expect("temp dir");
    let hub = start(dir.path(), &[]);
    let metadata = get_json(&format!("{}/.well-known/ssf-configuration", hub.base)).expect("metadata");
    assert_eq!(metadata["spec_version"], "1_0");
    assert_eq!(metadata["issuer"], hub.base.as_str());
    assert_eq!(metadata["delivery_methods_supported"], serde_json::json!(["urn:ietf:rfc:8935", "urn:ietf:rfc:8936"]));
    for endpoint in [
        "jwks_uri",
        "configuration_endpoint",
        "status_endpoint",
        "add_subject_endpoint",
        "remove_subject_endpoint",
        "verification_endpoint",
    ] {
        let url = metadata[endpoint].as_str().unwrap_or_else(|| panic!("{endpoint} missing"));
        assert!(url.starts_with(&format!("{}/", hub.base)), "{endpoint} = {url} is not under the issuer");
    }
    assert_eq!(metadata["authorization_schemes"], serde_json::json!([{"spec_urn": "urn:ietf:rfc:6749"}]));
    assert_eq!(metadata["default_subjects"], "NONE");

    let jwks_uri = metadata["jwks_uri"].as_str().expect("jwks_uri");
    let jwks = get_json(jwks_uri).expect("jwks");
    let key = &jwks["keys"][0];
    assert_eq!(
        (key["kty"].as_str(), key["crv"].as_str(), key["alg"].as_str()),
        (Some("EC"), Some("P-256"), Some("ES256"))
    );
    for private in ["d", "p", "q", "dp", "dq", "qi"] {
        assert!(key.get(private).is_none(), "private member {private} published");
    }
}

#[test]
fn issuer_with_a_path_serves_metadata_under_the_well_known_path() {
    let dir = tempfile::tempdir().expect("temp dir");
    let port = free_port();
    let issuer = format!("http://127.0.0.1:{port}/tenant-a");
    let mut child =
        command(dir.path(), &[("CAEP_HUB_LISTEN", &format!("127.0.0.1:{port}")), ("CAEP_HUB_ISSUER", &issuer)])
            .arg("serve")
            .stdout(Stdio::null())
            .spawn()
            .expect("spawn");
    let base = format!("http://127.0.0.1:{port}");
    wait_healthy(&base, &mut child);
    let metadata = get_json(&format!("{base}/.well-known/ssf-configuration/tenant-a"));
    let jwks = get_json(&format!("{issuer}/ssf/jwks.json"));
    let _ = child.kill();
    let _ = child.wait();
    let metadata = metadata.expect("metadata at the path-appended well-known URL");
    assert_eq!(metadata["issuer"], issuer.as_str());
    assert_eq!(metadata["jwks_uri"], format!("{issuer}/ssf/jwks.json").as_str());
    assert!(jwks.is_ok(), "JWKS under the issuer path");
}

#[test]
fn keys_and_admin_token_survive_restarts_and_rotation() {
    let dir = tempfile::tempdir().expect("temp dir");
    let first = start(dir.path(), &[]);
    let token_lines: Vec<_> = first.stdout_lines.iter().filter(|l| l.starts_with("CAEP_HUB_ADMIN_TOKEN=")).collect();
    assert_eq!(token_lines.len(), 1, "admin token shown on first start: {:?}", first.stdout_lines);
    let before = kids(&get_json(&format!("{}/ssf/jwks.json", first.base)).expect("jwks"));
    drop(first);

    let second = start(dir.path(), &[]);
    assert!(!second.stdout_lines.iter().any(|l| l.starts_with("CAEP_HUB_ADMIN_TOKEN=")), "admin token shown only once");
    assert_eq!(kids(&get_json(&format!("{}/ssf/jwks.json", second.base)).expect("jwks")), before);
    drop(second);

    let rotated = run_cli(dir.path(), &["keys", "rotate"]);
    assert!(rotated.contains("new active key"), "{rotated}");
    let third = start(dir.path(), &[]);
    let after = kids(&get_json(&format!("{}/ssf/jwks.json", third.base)).expect("jwks"));
    drop(third);
    assert_eq!(after.len(), 2, "old and new published");
    assert!(before.iter().all(|kid| after.contains(kid)));

    let old = &before[0];
    let listing = run_cli(dir.path(), &["keys", "list"]);
    assert!(listing.lines().any(|l| l.contains(old.as_str()) && l.contains("published")), "{listing}");
    run_cli(dir.path(), &["keys", "retire", old]);
    let fourth = start(dir.path(), &[]);
    let remaining = kids(&get_json(&format!("{}/ssf/jwks.json", fourth.base)).expect("jwks"));
    assert_eq!(remaining.len(), 1);
    assert!(!remaining.contains(old));

    let active = &remaining[0];
    let refused = command(dir.path(), &[]).args(["keys", "retire", active]).output().expect("run");
    assert!(!refused.status.success(), "retiring the active key must fail");
}

#[test]
fn rs256_publishes_an_rsa_key_of_at_least_2048_bits() {
    use base64::Engine;
    let dir = tempfile::tempdir().expect("temp dir");
    let hub = start(dir.path(), &[("CAEP_HUB_SIGNING_ALG", "RS256")]);
    let jwks = get_json(&format!("{}/ssf/jwks.json", hub.base)).expect("jwks");
    let key = &jwks["keys"][0];
    assert_eq!((key["kty"].as_str(), key["alg"].as_str()), (Some("RSA"), Some("RS256")));
    let modulus = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(key["n"].as_str().expect("n"))
        .expect("base64url modulus");
    let bits = modulus.len() * 8 - modulus[0].leading_zeros() as usize;
    assert!(bits >= 2048, "RSA modulus has {bits} bits");
}

#[test]
fn sigterm_shuts_down_cleanly() {
    let dir = tempfile::tempdir().expect("temp dir");
    let mut hub = start(dir.path(), &[]);
    let status = Command::new("kill").args(["-TERM", &hub.child.id().to_string()]).status().expect("kill");
    assert!(status.success());
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Some(status) = hub.child.try_wait().expect("wait") {
            assert!(status.success(), "exit after SIGTERM: {status}");
            break;
        }
        assert!(Instant::now() < deadline, "did not stop after SIGTERM");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn a_key_id_that_begins_with_a_hyphen_is_a_value_not_an_option() {
    // Thumbprints are base64url: about one key in 64 has an id starting with `-`.
    let dir = tempfile::tempdir().expect("temp dir");
    let output = command(dir.path(), &[]).args(["keys", "retire", "-KA4-unknown"]).output().expect("run");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success(), "an unknown kid cannot be retired");
    assert!(!stderr.contains("unexpected argument"), "the kid was parsed as an option: {stderr}");
    assert!(stderr.contains("-KA4-unknown"), "the error should name the kid: {stderr}");
}

#[test]
fn every_command_has_help_and_bad_settings_are_named() {
    let dir = tempfile::tempdir().expect("temp dir");
    for args in [
        vec!["--help"],
        vec!["serve", "--help"],
        vec!["keys", "--help"],
        vec!["keys", "list", "--help"],
        vec!["keys", "rotate", "--help"],
        vec!["keys", "retire", "--help"],
        vec!["admin-token", "--help"],
        vec!["admin-token", "rotate", "--help"],
    ] {
        let out = run_cli(dir.path(), &args);
        assert!(out.contains("Usage"), "{args:?}: {out}");
    }
    let bad = command(dir.path(), &[("CAEP_HUB_SIGNING_ALG", "none")]).arg("serve").output().expect("run");
    assert!(!bad.status.success());
    assert!(
        String::from_utf8_lossy(&bad.stderr).to_lowercase().contains("signing_alg"),
        "{}",
        String::from_utf8_lossy(&bad.stderr)
    );
    // A bad value is named once: an error's causes are not repeated when its message already says them.
    let bad = command(dir.path(), &[("CAEP_HUB_SECRET_KEY", "too-short")]).arg("serve").output().expect("run");
    let stderr = String::from_utf8_lossy(&bad.stderr);
    assert!(!bad.status.success());
    assert_eq!(stderr.matches("exactly 32 bytes").count(), 1, "{stderr}");
}
