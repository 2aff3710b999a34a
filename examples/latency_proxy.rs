//! `latency_proxy`: the tests' latency proxy (`testbed::proxy`) as a
//! program, for bench/run.
//!
//!     latency_proxy UPSTREAM_PORT DELAY_MS [MAX_SECONDS]
//!
//! Forwards 127.0.0.1:PORT (printed on the first line of stdout) to
//! 127.0.0.1:UPSTREAM_PORT, delaying each direction by DELAY_MS. When stdin
//! closes, or after MAX_SECONDS (3600 by default), it prints the round trips
//! it counted, per phase of the bank's main job, and exits.

use testbed::proxy;

use std::io::{self, Write};
use std::process::ExitCode;
use std::sync::mpsc;
use std::thread;
use std::time::Duration;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let number = |i: usize| args.get(i).and_then(|a| a.parse::<f64>().ok());
    let (Some(upstream), Some(delay_ms)) = (
        args.first().and_then(|a| a.parse::<u16>().ok()),
        number(1).filter(|d| (0.0..=10_000.0).contains(d)),
    ) else {
        eprintln!("usage: latency_proxy UPSTREAM_PORT DELAY_MS [MAX_SECONDS]");
        return ExitCode::from(2);
    };
    let max = number(2).filter(|m| *m > 0.0).unwrap_or(3600.0);
    let proxy = match proxy::Proxy::start(
        ([127, 0, 0, 1], upstream).into(),
        Duration::from_secs_f64(delay_ms / 1e3),
    ) {
        Ok(proxy) => proxy,
        Err(err) => {
            eprintln!("latency_proxy: {err}");
            return ExitCode::FAILURE;
        }
    };
    println!("{}", proxy.port());
    let _ = io::stdout().flush();
    let (closed, stdin_closed) = mpsc::channel();
    thread::spawn(move || {
        let _ = io::copy(&mut io::stdin(), &mut io::sink());
        let _ = closed.send(());
    });
    let _ = stdin_closed.recv_timeout(Duration::from_secs_f64(max));
    let round_trips = proxy.round_trips();
    let phases: Vec<String> = proxy::per_phase(&round_trips)
        .into_iter()
        .map(|(phase, n)| format!("{}={n}", phase.replace(' ', "_")))
        .collect();
    println!(
        "round_trips={} connections={} {}",
        round_trips.len(),
        proxy.connections(),
        phases.join(" ")
    );
    ExitCode::SUCCESS
}
