//! `workload --metrics-addr`: the retry helper's metrics in Prometheus's
//! text format at `http://ADDR/metrics` while the run lasts. The exporter
//! crate renders them; a small HTTP/1.1 responder here serves them, so that
//! the app needs no web stack for one read-only page.
//!
//! The `metrics` facade takes one recorder for the whole process: installed
//! here, at the edge, only when the flag asks for it.

use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use anyhow::Context;
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

/// The seconds the duration histogram's buckets end at: a transaction at
/// cloud latency takes tens of milliseconds, a retried one seconds.
const BUCKETS: [f64; 12] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0,
];

/// Serves `/metrics` until dropped.
pub struct Exporter {
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Exporter {
    /// Installs the process's recorder and serves its metrics on `addr`
    /// (port 0 picks a free one: see [`Exporter::addr`]).
    ///
    /// # Errors
    /// The address cannot be bound, or a recorder is installed already.
    pub fn start(addr: SocketAddr) -> anyhow::Result<Self> {
        let listener = TcpListener::bind(addr)
            .with_context(|| format!("serving metrics on {addr} (--metrics-addr)"))?;
        let addr = listener.local_addr()?;
        let handle = PrometheusBuilder::new()
            .set_buckets_for_metric(
                Matcher::Full("db_client_operation_duration_seconds".to_owned()),
                &BUCKETS,
            )
            .context("the metrics' buckets")?
            .set_buckets_for_metric(
                Matcher::Full("db_client_transaction_attempts".to_owned()),
                &[1.0, 2.0, 3.0, 5.0, 8.0, 13.0],
            )
            .context("the metrics' buckets")?
            .install_recorder()
            .context("installing the metrics recorder")?;
        // Polled, so that the thread ends with the run.
        listener.set_nonblocking(true)?;
        let stop = Arc::new(AtomicBool::new(false));
        let thread = std::thread::Builder::new().name("metrics".into()).spawn({
            let stop = Arc::clone(&stop);
            move || serve(&listener, &handle, &stop)
        })?;
        tracing::info!("serving metrics at http://{addr}/metrics");
        Ok(Self {
            addr,
            stop,
            thread: Some(thread),
        })
    }

    /// Where it listens.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }
}

impl Drop for Exporter {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

fn serve(listener: &TcpListener, handle: &PrometheusHandle, stop: &AtomicBool) {
    while !stop.load(Ordering::Relaxed) {
        match listener.accept() {
            Ok((stream, _)) => {
                // One request at a time: a scrape is rare and small.
                let _ = answer(stream, handle);
            }
            Err(err) if err.kind() == std::io::ErrorKind::WouldBlock => {
                std::thread::sleep(Duration::from_millis(20));
            }
            Err(_) => std::thread::sleep(Duration::from_millis(20)),
        }
    }
}

/// Reads one request (its head, within a second) and answers it.
fn answer(stream: TcpStream, handle: &PrometheusHandle) -> std::io::Result<()> {
    stream.set_nonblocking(false)?;
    stream.set_read_timeout(Some(Duration::from_secs(1)))?;
    stream.set_write_timeout(Some(Duration::from_secs(1)))?;
    let mut reader = BufReader::new(&stream);
    let mut request = String::new();
    reader.read_line(&mut request)?;
    // The rest of the head, up to the blank line, at most 8 KiB.
    let mut head = 0;
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line)? == 0 || line == "\r\n" || line == "\n" || head > 8192 {
            break;
        }
        head += line.len();
    }
    let mut out = &stream;
    let path = request.split_whitespace().nth(1).unwrap_or("");
    if request.starts_with("GET ") && (path == "/metrics" || path.starts_with("/metrics?")) {
        handle.run_upkeep();
        let body = handle.render();
        write!(
            out,
            "HTTP/1.1 200 OK\r\nContent-Type: text/plain; version=0.0.4\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        )
    } else {
        let body = "not found; the metrics are at /metrics\n";
        write!(
            out,
            "HTTP/1.1 404 Not Found\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        )
    }
}
