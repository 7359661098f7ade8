//! Helpers shared by the end-to-end drill tests (`mod support;`).
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Command;

pub const DRILL: &str = env!("CARGO_BIN_EXE_caep-drill");

/// `<target>/<profile>/caep-hub`, built with `cargo build -p caep-hub` when
/// missing (another package's binary is not built for this one's tests).
pub fn hub_bin() -> PathBuf {
    let drill = PathBuf::from(DRILL);
    let profile_dir = drill.parent().expect("the drill binary has a directory");
    let bin = profile_dir.join(format!("caep-hub{}", std::env::consts::EXE_SUFFIX));
    if !bin.is_file() {
        let manifest = Path::new(env!("CARGO_MANIFEST_DIR")).join("../Cargo.toml");
        let target_dir = profile_dir.parent().expect("target dir");
        let mut build = Command::new(env!("CARGO"));
        build.args(["build", "-p", "caep-hub", "--bin", "caep-hub", "--manifest-path"]).arg(&manifest);
        build.arg("--target-dir").arg(target_dir);
        if profile_dir.file_name().is_some_and(|name| name == "release") {
            build.arg("--release");
        }
        let status = build.status().expect("running cargo build -p caep-hub");
        assert!(status.success(), "cargo build -p caep-hub failed");
    }
    assert!(bin.is_file(), "no caep-hub at {}", bin.display());
    bin
}
