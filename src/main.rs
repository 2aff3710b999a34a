//! `bank`: parses the command line, sets up logging, runs the library, and
//! maps the outcome to an exit code.

use std::io::{self, IsTerminal, Write};
use std::process::ExitCode;

use clap::error::ErrorKind;
use clap::Parser;
use tracing_subscriber::EnvFilter;

use bank::config::Cli;

fn main() -> ExitCode {
    // Initialise OpenSSL before libpq does, without its exit-time cleanup:
    // that cleanup runs while r2d2's background threads may still be inside
    // libpq connecting over TLS, and crashed the process at exit (issue #9).
    // The first initialisation decides, and openssl-sys asks for
    // OPENSSL_INIT_NO_ATEXIT; the same system libssl serves both.
    openssl_sys::init();
    if let Err(err) = dotenvy::dotenv() {
        if !err.not_found() {
            eprintln!("bank: could not read .env ({err}); fix or remove the file");
            return ExitCode::from(2);
        }
    }
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(err)
            if matches!(
                err.kind(),
                ErrorKind::DisplayHelp | ErrorKind::DisplayVersion
            ) =>
        {
            err.exit()
        }
        Err(err) => {
            // clap's report spans several lines; what is wrong comes before
            // the first blank line, the usage and tips after it.
            let text = err.render().to_string();
            let what: Vec<&str> = text
                .lines()
                .map(str::trim)
                .take_while(|l| !l.is_empty())
                .collect();
            let what = what.join(" ");
            eprintln!(
                "bank: {} (see bank --help)",
                what.trim_start_matches("error: ")
            );
            return ExitCode::from(2);
        }
    };
    let default_level = if cli.verbose {
        "bank=debug"
    } else {
        "bank=warn"
    };
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default_level)),
        )
        .with_writer(io::stderr)
        .with_ansi(io::stderr().is_terminal())
        .init();
    if cli.verbose {
        bank::db::log_statements();
    }

    let stdout = io::stdout();
    let mut out = io::BufWriter::new(stdout.lock());
    let result = bank::app::run(&cli, &mut out);
    let flushed = out.flush();
    match result.and(flushed.map_err(Into::into)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("bank: {}", bank::app::error_line(&err));
            ExitCode::FAILURE
        }
    }
}
