//! `bank`: parses the command line, sets up logging, runs the library, and
//! maps the outcome to an exit code: 0 done, 2 usage (a flag, DATABASE_URL or
//! .env is wrong), 1 anything else.

use std::io::{self, IsTerminal};
use std::process::ExitCode;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use tracing_subscriber::EnvFilter;

use bank::config::{self, Cli};

fn main() -> ExitCode {
    // Initialise OpenSSL before libpq does, without its exit-time cleanup,
    // which crashed the process when it ran while a pool thread was still
    // inside libpq (issue #9). The first initialisation decides, and
    // openssl-sys asks for OPENSSL_INIT_NO_ATEXIT; the same system libssl
    // serves both. The wait for background connects below is the fix for
    // every library; this one stays for a wait that runs out.
    openssl_sys::init();
    // Before the command line, which reads DATABASE_URL from it; its errors
    // wait until --help and --version have had their chance.
    let dotenv = config::load_dotenv();
    let parsed = Cli::parse_args(std::env::args_os());
    if let Err(err) = &parsed {
        if err.is_help_or_version() {
            if let config::ArgsError::Clap(err) = err {
                err.exit();
            }
        }
    }
    if let Err(message) = dotenv {
        eprintln!("bank: {message}");
        return ExitCode::from(2);
    }
    let cli = match parsed {
        Ok(cli) => cli,
        Err(err) => {
            eprintln!("bank: {err}");
            return ExitCode::from(2);
        }
    };
    let default_level = if cli.verbose {
        "bank=debug,diesel_tx_retry=debug"
    } else {
        "bank=warn,diesel_tx_retry=warn"
    };
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default_level)),
        )
        .with_writer(io::stderr)
        .with_ansi(io::stderr().is_terminal())
        .init();
    // A server that stops answering without closing anything (a frozen
    // process) is the one wait nothing else bounds: end the run, with one
    // line. What committed is on stdout already (flushed after each batch).
    let connects = bank::db::Connects::default();
    let watchdog = {
        let connects = connects.clone();
        bank::watchdog::Watchdog::start(cli.run.watchdog_slack, move |line| {
            eprintln!("bank: {line}");
            connects.wait(Duration::from_secs(5));
            std::process::exit(1);
        })
    };
    let runtime = bank::app::Runtime {
        watchdog,
        connects: connects.clone(),
    };

    // Shared, not locked for the whole run: if the watchdog ends it, the
    // workload's report so far is written from the watchdog's thread.
    let out: bank::output::Output = Arc::new(Mutex::new(io::BufWriter::new(io::stdout())));
    let result = bank::app::run(&cli, &runtime, &out).and_then(|()| {
        out.lock()
            .unwrap_or_else(PoisonError::into_inner)
            .flush()
            .map_err(|err| anyhow::anyhow!("writing the results to stdout: {err}"))
    });
    // The pools are gone; let any connection r2d2 was still opening in the
    // background finish before the process exits (see db::Manager).
    if !connects.wait(Duration::from_secs(30)) {
        tracing::warn!("exiting while a connection is still being opened");
    }
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("bank: {}", bank::failure::error_line(&err));
            ExitCode::from(bank::failure::exit_code(&err))
        }
    }
}
