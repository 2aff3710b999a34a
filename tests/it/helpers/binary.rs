//! The `bank` binary (and diesel CLI) run as a user would: from an empty
//! directory, with bounded waits, their output read back.

use std::path::{Path, PathBuf};
use std::process::Output;
use std::time::{Duration, Instant};

use assert_cmd::Command;

use super::tempdir;

/// Runs diesel CLI with `args` on `url` and the migrations in `migrations`,
/// from an empty directory, so that it finds no diesel.toml and leaves
/// src/schema.rs alone.
pub fn run_diesel_cli(url: &str, migrations: &Path, args: &[&str]) -> Output {
    let workdir = tempdir();
    std::process::Command::new("diesel")
        .args(args)
        .arg("--database-url")
        .arg(url)
        .arg("--migration-dir")
        .arg(migrations)
        .current_dir(workdir.path())
        .output()
        .expect("diesel CLI on PATH (./dev test installs it)")
}

pub fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The `bank` binary, run from an empty directory (so no developer's .env
/// leaks in) and without DATABASE_URL in its environment.
pub fn bank_cmd(workdir: &Path) -> Command {
    let mut cmd = Command::cargo_bin("bank").expect("bank binary");
    cmd.current_dir(workdir)
        .env_remove("DATABASE_URL")
        .env_remove("RUST_LOG");
    cmd
}

/// Runs the binary (as [`bank_cmd`] sets it up) with `args`.
pub fn bank(args: &[&str]) -> Output {
    let dir = tempdir();
    bank_cmd(dir.path()).args(args).output().expect("run bank")
}

/// Asserts that a run succeeded, showing its stderr when it did not.
pub fn assert_ok(out: &Output) {
    assert!(
        out.status.success(),
        "bank failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A port on 127.0.0.1 that refuses connections, reserved for as long as the
/// returned socket lives: bound, never listening, so no other test can take
/// it in the meantime.
pub fn refusing_port() -> (socket2::Socket, u16) {
    let socket =
        socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).expect("socket");
    let any: std::net::SocketAddr = "127.0.0.1:0".parse().expect("address");
    socket.bind(&any.into()).expect("bind");
    let port = socket
        .local_addr()
        .expect("local address")
        .as_socket()
        .expect("an IP socket")
        .port();
    (socket, port)
}

/// Output as text, split in lines.
pub fn lines(bytes: &[u8]) -> Vec<String> {
    String::from_utf8_lossy(bytes)
        .lines()
        .map(str::to_owned)
        .collect()
}

/// The one line a failed run printed on stderr, which must be one line.
pub fn one_line(out: &Output) -> String {
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(stderr.lines().count(), 1, "not one line: {stderr}");
    stderr.trim_end().to_owned()
}

/// The accounts a run printed as created ("Created new account with id ..."
/// lines), with their balances, sorted by id.
pub fn printed_accounts(stdout: &[String]) -> Vec<(uuid::Uuid, i64)> {
    let mut printed: Vec<(uuid::Uuid, i64)> = stdout
        .iter()
        .filter_map(|line| line.strip_prefix("Created new account with id "))
        .map(|rest| {
            let (id, balance) = rest.split_once(" and balance ").expect("an account line");
            (
                id.parse().expect("an id"),
                balance.trim_end_matches('.').parse().expect("a balance"),
            )
        })
        .collect();
    printed.sort();
    printed
}

/// The `bank` binary with `args`, started from an empty directory with its
/// output piped; `prefix` runs it through another program first (`ip netns
/// exec NS`). Keep the directory for as long as the child runs.
pub fn spawn_bank(prefix: &[&str], args: &[&str]) -> (std::process::Child, tempfile::TempDir) {
    let workdir = tempdir();
    let bank = env!("CARGO_BIN_EXE_bank");
    let mut cmd = match prefix.split_first() {
        Some((program, rest)) => {
            let mut cmd = std::process::Command::new(program);
            cmd.args(rest).arg(bank);
            cmd
        }
        None => std::process::Command::new(bank),
    };
    let child = cmd
        .args(args)
        .current_dir(workdir.path())
        .env_remove("DATABASE_URL")
        .env_remove("RUST_LOG")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("start bank");
    (child, workdir)
}

/// Waits for `child` to end by itself, `bound` after `began` at the most
/// (then kills it), calling `tick` every 20 ms meanwhile; returns its
/// output, how long it ran since `began`, and whether it ended by itself.
pub fn wait_bounded_with(
    mut child: std::process::Child,
    began: Instant,
    bound: Duration,
    mut tick: impl FnMut(),
) -> (Output, Duration, bool) {
    let mut ended = false;
    while began.elapsed() < bound {
        if child.try_wait().expect("try_wait").is_some() {
            ended = true;
            break;
        }
        tick();
        std::thread::sleep(Duration::from_millis(20));
    }
    if !ended {
        let _ = child.kill();
    }
    let took = began.elapsed();
    (
        child.wait_with_output().expect("the child's output"),
        took,
        ended,
    )
}

/// [`wait_bounded_with`] with nothing to do meanwhile.
pub fn wait_bounded(
    child: std::process::Child,
    began: Instant,
    bound: Duration,
) -> (Output, Duration, bool) {
    wait_bounded_with(child, began, bound, || {})
}

/// The binary's arguments for the main job on `url` with `accounts`
/// accounts and `delete` deletions, then `extra`.
pub fn job_args(url: &str, accounts: u32, delete: u32, extra: &[&str]) -> Vec<String> {
    let mut args: Vec<String> = ["--database-url", url, "--accounts"]
        .map(String::from)
        .into();
    args.extend([accounts.to_string(), "--delete".into(), delete.to_string()]);
    args.extend(extra.iter().map(|a| a.to_string()));
    args
}

/// The binary's arguments for `workload` on `url`: the global flags
/// `before`, then `--workers W --accounts A`, then `after` (a length:
/// `--transfers N` or `--duration S`, and more).
pub fn workload_args(
    url: &str,
    before: &[&str],
    workers: u32,
    accounts: u32,
    after: &[&str],
) -> Vec<String> {
    let mut args = vec!["--database-url".to_owned(), url.to_owned()];
    args.extend(before.iter().map(|a| a.to_string()));
    args.extend([
        "workload".into(),
        "--workers".into(),
        workers.to_string(),
        "--accounts".into(),
        accounts.to_string(),
    ]);
    args.extend(after.iter().map(|a| a.to_string()));
    args
}

/// `args` as the `&str`s the runners take.
pub fn strs(args: &[String]) -> Vec<&str> {
    args.iter().map(String::as_str).collect()
}
