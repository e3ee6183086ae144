//! The `khub` binary as other tools use it.

use std::process::Command;

#[test]
fn khub_vectors_writes_the_published_files() {
    let out = std::env::temp_dir().join(format!("khub-vectors-{}", std::process::id()));
    let status = Command::new(env!("CARGO_BIN_EXE_khub"))
        .args(["vectors", "--out"])
        .arg(&out)
        .status()
        .expect("khub runs");
    assert!(status.success());
    for name in khub::vectors::FILES {
        let written = std::fs::read(out.join(name)).expect("file written");
        let published = std::fs::read(
            std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("tests/data")
                .join(name),
        )
        .expect("published file");
        assert_eq!(written, published, "{name}");
    }
    std::fs::remove_dir_all(&out).ok();
}

#[test]
fn unknown_commands_fail_with_usage() {
    let output = Command::new(env!("CARGO_BIN_EXE_khub"))
        .arg("frobnicate")
        .output()
        .expect("khub runs");
    assert!(!output.status.success());
    assert!(String::from_utf8_lossy(&output.stderr).contains("Usage"));
}
