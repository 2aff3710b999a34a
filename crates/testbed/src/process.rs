//! Running programs for the tests: as the postgres user when root, with
//! their failures shown.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// Whether the tests run as root.
pub fn is_root() -> bool {
    // `id -u` rather than libc: the test bed needs nothing unsafe.
    let uid = Command::new("id").arg("-u").output().expect("id -u");
    String::from_utf8_lossy(&uid.stdout).trim() == "0"
}

/// Runs a server tool as the postgres user when we are root (initdb and
/// postgres refuse to run as root).
pub fn as_postgres(program: &Path) -> Command {
    if is_root() {
        let mut cmd = Command::new("runuser");
        cmd.args(["-u", "postgres", "--"]).arg(program);
        cmd
    } else {
        Command::new(program)
    }
}

/// Runs `cmd`, which must succeed; returns its output.
pub fn run(cmd: &mut Command) -> Output {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// The newest PostgreSQL server binaries' directory.
pub fn pg_bindir() -> PathBuf {
    let mut dirs: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .expect("PostgreSQL server binaries under /usr/lib/postgresql (./dev installs them)")
        .filter_map(|e| e.ok().map(|e| e.path().join("bin")))
        .filter(|p| p.join("initdb").exists())
        .collect();
    dirs.sort_by_key(|p| {
        p.to_string_lossy()
            .split('/')
            .nth(4)
            .and_then(|v| v.parse::<u32>().ok())
    });
    dirs.pop().expect("an initdb")
}

/// An empty directory, removed when the value is dropped.
pub fn tempdir() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("bank-test-")
        .tempdir()
        .expect("temp dir")
}
