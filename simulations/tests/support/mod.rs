//! Helpers shared by the end-to-end drill tests (`mod support;`).
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Command;

pub const DRILL: &str = env!("CARGO_BIN_EXE_caep-drill");

/// `<target>/<profile>/caep-hub`, built when missing.
pub fn hub_bin() -> PathBuf {
    workspace_bin("caep-hub", "caep-hub")
}

/// `<target>/<profile>/caep-guard` (the sidecar of the receiver SDK), built when missing.
pub fn guard_bin() -> PathBuf {
    workspace_bin("caep-receiver", "caep-guard")
}

/// Binary `bin` of workspace package `package`, beside the drill, built
/// with `cargo build -p {package} --bin {bin}` when missing (another
/// package's binary is not built for this one's tests).
fn workspace_bin(package: &str, bin: &str) -> PathBuf {
    let drill = PathBuf::from(DRILL);
    let profile_dir = drill.parent().expect("the drill binary has a directory");
    let path = profile_dir.join(format!("{bin}{}", std::env::consts::EXE_SUFFIX));
    if !path.is_file() {
        let manifest = Path::new(env!("CARGO_MANIFEST_DIR")).join("../Cargo.toml");
        let target_dir = profile_dir.parent().expect("target dir");
        let mut build = Command::new(env!("CARGO"));
        build.args(["build", "-p", package, "--bin", bin, "--manifest-path"]).arg(&manifest);
        build.arg("--target-dir").arg(target_dir);
        if profile_dir.file_name().is_some_and(|name| name == "release") {
            build.arg("--release");
        }
        let status = build.status().unwrap_or_else(|e| panic!("running cargo build -p {package}: {e}"));
        assert!(status.success(), "cargo build -p {package} --bin {bin} failed");
    }
    assert!(path.is_file(), "no {bin} at {}", path.display());
    path
}
