//! What the program says, exactly, to a user who got something wrong: the
//! command line's grammar, .env files, repeated seeds, a closed stdout; and
//! the exit codes (2 for usage, 1 for everything else).

use std::fs;
use std::process::Stdio;

use crate::helpers::*;

const SENTINEL: &str = "Secr3t-env-Pa55";

fn stderr_line(out: &std::process::Output) -> String {
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(stderr.lines().count(), 1, "not one line: {stderr}");
    stderr.trim_end().to_owned()
}

#[test]
fn main_job_flags_before_a_subcommand_are_refused() {
    for (args, expected) in [
        (
            &["--accounts", "7", "workload", "--transfers", "5"][..],
            "bank: --accounts is a flag of the main job and does nothing for `bank workload`; \
             give it after the subcommand: bank workload --accounts ...",
        ),
        (
            &["-q", "migrate"][..],
            "bank: --quiet is a flag of the main job and does nothing for `bank migrate`; leave it out",
        ),
    ] {
        let out = bank(&[&["--database-url", "postgresql://x@127.0.0.1:1/x"], args].concat());
        assert_eq!(out.status.code(), Some(2), "{args:?}");
        assert_eq!(stderr_line(&out), expected);
    }
}

#[test]
fn the_exit_codes_are_documented_in_help() {
    let out = bank(&["--help"]);
    assert_eq!(out.status.code(), Some(0));
    let help = String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .collect::<Vec<_>>()
        .join(" ");
    assert!(
        help.contains(
            "Exit status: 0 when everything was done; 2 when a flag, DATABASE_URL or .env is wrong"
        ),
        "{help}"
    );
}

#[test]
fn a_malformed_env_file_is_reported_by_line_never_by_content() {
    for (content, expected) in [
        (
            format!("# settings\nDATABASE_URL=\"postgresql://u:{SENTINEL}@h/x\nOTHER=1\n"),
            "line 2, column 14: this quote is never closed",
        ),
        (
            format!("A=1\nDATABASE URL=postgresql://u:{SENTINEL}@h/x\n"),
            "line 2, column 10: expected NAME=value (a name of letters, digits and underscores)",
        ),
    ] {
        let dir = tempdir();
        fs::write(dir.path().join(".env"), &content).unwrap();
        let out = bank_cmd(dir.path()).output().unwrap();
        assert_eq!(out.status.code(), Some(2));
        let line = stderr_line(&out);
        let path = dir.path().join(".env");
        assert_eq!(
            line,
            format!(
                "bank: could not read {}: {expected}; fix or remove the file",
                path.display()
            )
        );
        assert!(!line.contains(SENTINEL));
        // --help and --version still work beside it.
        for flag in ["--help", "--version"] {
            let out = bank_cmd(dir.path()).arg(flag).output().unwrap();
            assert_eq!(out.status.code(), Some(0), "{flag}");
            assert!(!out.stdout.is_empty(), "{flag}");
            assert!(!String::from_utf8_lossy(&out.stdout).contains(SENTINEL));
        }
    }
}

#[test]
fn the_same_seed_twice_says_the_seed_repeats_the_ids() {
    let db = TestDb::migrated();
    let args = [
        "--database-url",
        &db.url_string(),
        "--seed",
        "7",
        "--accounts",
        "4",
        "--delete",
        "1",
    ];
    assert_ok(&bank(&args));
    let out = bank(&args);
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(
        stderr_line(&out),
        "bank: creating accounts: the accounts of --seed 7 are already in the table \
         (the same seed gives the same ids); use another seed, or none"
    );
    assert_eq!(db.count("accounts"), 3, "the second run wrote nothing");
}

#[test]
fn a_closed_stdout_is_one_line_with_context() {
    let db = TestDb::migrated();
    let dir = tempdir();
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_bank"))
        .current_dir(dir.path())
        .env_remove("DATABASE_URL")
        .args([
            "--database-url",
            &db.url_string(),
            "--accounts",
            "500",
            "--delete",
            "1",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Close the reading end at once: every write fails with EPIPE.
    drop(child.stdout.take());
    let out = child.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    let line = stderr_line(&out);
    assert!(
        line.starts_with("bank: writing the results to stdout: Broken pipe"),
        "{line}"
    );
}

/// Values that break parsers: signs, overflow, fractions, words, blanks,
/// non-ASCII digits.
const NASTY: [&str; 22] = [
    "0",
    "1",
    "2",
    "-1",
    "-5",
    "7",
    "1024",
    "1025",
    "100000001",
    "4294967295",
    "18446744073709551615",
    "18446744073709551616",
    "-9223372036854775809",
    "999999999999999999999999999999999999999999",
    "1e9",
    "0.5",
    "-0.5",
    "NaN",
    "inf",
    "",
    "ten",
    "٣",
];

const MAIN_FLAGS: [&str; 9] = [
    "--accounts",
    "--delete",
    "--seed",
    "--rows-per-insert",
    "--rows-per-transaction",
    "--max-retries",
    "--tx-deadline",
    "--backoff-base-ms",
    "--backoff-cap-ms",
];

const WORKLOAD_FLAGS: [&str; 5] = [
    "--workers",
    "--accounts",
    "--transfers",
    "--duration",
    "--seed",
];

/// The command lines of the flag fuzz: the main job, the workload or
/// migrate, each with one to four of its flags set to random or nasty
/// values, drawn from a fixed seed.
fn fuzzed_command_lines(url: &str, cases: usize) -> Vec<Vec<String>> {
    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};
    let mut rng = StdRng::seed_from_u64(9);
    (0..cases)
        .map(|_| {
            let mut args: Vec<String> = vec!["bank".into(), "--database-url".into(), url.into()];
            let subcommand = rng.random_range(0..3);
            let flags: &[&str] = match subcommand {
                0 => &MAIN_FLAGS,
                1 => &WORKLOAD_FLAGS,
                _ => &["--max-retries", "--tx-deadline", "--pool-timeout"],
            };
            match subcommand {
                1 => args.push("workload".into()),
                2 => args.push("migrate".into()),
                _ => {}
            }
            for _ in 0..rng.random_range(1..=4) {
                args.push(flags[rng.random_range(0..flags.len())].into());
                let value = match rng.random_range(0..4) {
                    0 => rng.random::<i64>().to_string(),
                    _ => NASTY[rng.random_range(0..NASTY.len())].to_owned(),
                };
                args.push(value);
            }
            if subcommand == 1 && rng.random_bool(0.7) {
                args.extend(["--transfers".into(), "1".into()]);
            }
            if rng.random_bool(0.2) {
                args.push(["--protocol", "--quiet", "--json"][rng.random_range(0..3)].into());
            }
            args
        })
        .collect()
}

/// What the program does with `args`, in-process: the exit code and the
/// line it prints, as `main` would (2 for a usage error, 1 for a failure).
fn outcome(args: &[String]) -> (u8, String) {
    match bank::config::Cli::parse_args(args) {
        Err(err) => (2, format!("bank: {err}")),
        Ok(cli) => {
            let out: bank::output::Output = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
            match bank::app::run(&cli, &bank::app::Runtime::default(), &out) {
                Ok(()) => (0, String::new()),
                Err(err) => (
                    bank::failure::exit_code(&err),
                    format!("bank: {}", bank::failure::error_line(&err)),
                ),
            }
        }
    }
}

#[test]
fn no_value_of_any_flag_crashes_the_program() {
    // Every case points at a port that refuses, so whatever is accepted ends
    // at the connection, with exit 1, and nothing is written anywhere; what
    // is refused ends before it, with exit 2.
    let (_reserved, port) = refusing_port();
    let url = format!("postgresql://app:{SENTINEL}@127.0.0.1:{port}/bank");
    let cases = fuzzed_command_lines(&url, 300);
    let mut codes = [0usize; 3];
    for (case, args) in cases.iter().enumerate() {
        let (code, line) = outcome(args);
        // Accepted: the connection is refused, exit 1. Anything else is a
        // usage error, exit 2.
        let refused = format!(
            "bank: could not connect to app@127.0.0.1:{port}/bank: connection refused; \
             is the server running and listening on that host and port?"
        );
        let expected = if line == refused { 1 } else { 2 };
        assert_eq!(code, expected, "case {case} {args:?}: {line}");
        assert!(!line.contains('\n'), "case {case} {args:?}: {line}");
        assert!(!line.contains(SENTINEL), "case {case} {args:?}: {line}");
        codes[usize::from(code)] += 1;
    }
    eprintln!(
        "flag fuzz: {} refused (2), {} reached the connection (1)",
        codes[2], codes[1]
    );
    assert!(
        codes[1] > 0 && codes[2] > 0,
        "the cases cover both ends: {codes:?}"
    );
    // A few through the binary: the same exit code and the same one line,
    // no panic.
    for (case, args) in cases.iter().enumerate().step_by(30) {
        let (code, line) = outcome(args);
        let arg_refs: Vec<&str> = args[1..].iter().map(String::as_str).collect();
        let out = bank(&arg_refs);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(
            out.status.code(),
            Some(i32::from(code)),
            "case {case} {args:?}: {stderr}"
        );
        assert_eq!(stderr.trim_end(), line, "case {case} {args:?}");
    }
}
