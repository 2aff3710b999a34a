//! A TCP proxy for PostgreSQL's wire protocol on 127.0.0.1: it delays each
//! direction by a fixed time (cloud latency), keeps every byte in order, and
//! counts round trips, recording the statements the client sent in each.
//! Used by the tests (round trips pinned per phase) and, as
//! `examples/latency_proxy.rs`, by bench/run.
//!
//! Each direction is a reader thread that stamps what it reads with the time
//! it may be delivered, and a writer thread that delivers it then. Faults
//! live in the reader, which is where every message passes: a proxy made by
//! [`Proxy::cutting_commits`] cuts a connection at chosen `COMMIT`s, before
//! forwarding the `COMMIT` or just after (the server commits, and its
//! answer is lost).

use std::collections::BTreeMap;
use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex, PoisonError};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

/// One round trip: a flight of client messages that the server answers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RoundTrip {
    /// The proxied connection it happened on, numbered from 0.
    pub connection: usize,
    /// What the client sent: SQL text, or `<ssl request>`, `<startup>`,
    /// `<password>`; the other extended-protocol messages are not listed.
    pub sent: Vec<String>,
}

#[derive(Debug, Default)]
struct Log {
    round_trips: Vec<RoundTrip>,
    connections: usize,
}

/// Whose bytes were last seen on a connection.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Turn {
    Client,
    Server,
}

/// Where a connection is cut at a `COMMIT`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cut {
    /// The `COMMIT` never reaches the server: the transaction rolls back.
    BeforeForwarding,
    /// The `COMMIT` reaches the server, which commits; its answer is lost.
    AfterForwarding,
}

/// Which `COMMIT`s to cut: the `every`-th, counted across connections from
/// 1 (every 2: the 1st, 3rd, 5th...; every 1: all).
#[derive(Debug, Clone)]
struct CommitCuts {
    every: usize,
    when: Cut,
    seen: Arc<AtomicUsize>,
    done: Arc<AtomicUsize>,
}

impl CommitCuts {
    /// Whether the `COMMIT` just seen is one to cut.
    fn this_one(&self) -> bool {
        let n = self.seen.fetch_add(1, Ordering::Relaxed) + 1;
        let cut = (n - 1) % self.every == 0;
        if cut {
            self.done.fetch_add(1, Ordering::Relaxed);
        }
        cut
    }
}

/// Whether a simple query's text commits: `COMMIT`, alone or as the last of
/// several statements (the savepoint protocol's `RELEASE ...; COMMIT`).
fn commits(sql: &str) -> bool {
    sql.split(';')
        .any(|s| s.trim().eq_ignore_ascii_case("COMMIT"))
}

/// A running proxy; dropping it closes every connection it carries.
pub struct Proxy {
    port: u16,
    cuts: Option<CommitCuts>,
    log: Arc<Mutex<Log>>,
    stop: Arc<AtomicBool>,
    sockets: Arc<Mutex<Vec<TcpStream>>>,
    acceptor: Option<JoinHandle<()>>,
}

impl Proxy {
    /// Listens on 127.0.0.1 (a free port) and forwards to `upstream`,
    /// delaying each direction by `delay`.
    ///
    /// # Errors
    /// Binding the listener.
    pub fn start(upstream: SocketAddr, delay: Duration) -> io::Result<Self> {
        Self::start_with(upstream, delay, None, None)
    }

    /// Forwards to `upstream` at once, but every connection after the first
    /// waits `stall` before it is carried: a client's connect attempt is
    /// then inside libpq, waiting for the server's first answer, for that
    /// long (a slow handshake, a server slow to accept).
    ///
    /// # Errors
    /// Binding the listener.
    pub fn stalling(upstream: SocketAddr, stall: Duration) -> io::Result<Self> {
        Self::start_with(upstream, Duration::ZERO, Some(stall), None)
    }

    /// Forwards to `upstream` at once, and cuts the connection (both sides)
    /// at every `every`-th `COMMIT` it sees, counted across connections from
    /// the first: before forwarding it, or just after. From the moment it
    /// decides to cut, nothing more from the server reaches the client.
    ///
    /// # Errors
    /// Binding the listener.
    pub fn cutting_commits(upstream: SocketAddr, every: usize, when: Cut) -> io::Result<Self> {
        let cuts = CommitCuts {
            every: every.max(1),
            when,
            seen: Arc::default(),
            done: Arc::default(),
        };
        Self::start_with(upstream, Duration::ZERO, None, Some(cuts))
    }

    /// `COMMIT`s cut so far.
    pub fn commits_cut(&self) -> usize {
        self.cuts
            .as_ref()
            .map_or(0, |c| c.done.load(Ordering::Relaxed))
    }

    fn start_with(
        upstream: SocketAddr,
        delay: Duration,
        stall: Option<Duration>,
        cuts: Option<CommitCuts>,
    ) -> io::Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0")?;
        listener.set_nonblocking(true)?;
        let port = listener.local_addr()?.port();
        let log = Arc::new(Mutex::new(Log::default()));
        let stop = Arc::new(AtomicBool::new(false));
        let sockets = Arc::new(Mutex::new(Vec::new()));
        let acceptor = {
            let (log, stop, sockets) = (log.clone(), stop.clone(), sockets.clone());
            let cuts = cuts.clone();
            thread::spawn(move || {
                // Polls so that it notices `stop` within 20 ms.
                while !stop.load(Ordering::Relaxed) {
                    match listener.accept() {
                        Ok((client, _)) => {
                            let id = {
                                let mut log = lock(&log);
                                log.connections += 1;
                                log.connections - 1
                            };
                            let (log, sockets) = (log.clone(), sockets.clone());
                            let cuts = cuts.clone();
                            let go = move || {
                                if let Err(err) =
                                    carry(client, upstream, delay, id, log, &sockets, cuts)
                                {
                                    eprintln!("proxy: connection {id}: {err}");
                                }
                            };
                            match stall.filter(|_| id > 0) {
                                // The stall is the fault itself, bounded by
                                // its length.
                                Some(stall) => drop(thread::spawn(move || {
                                    thread::sleep(stall);
                                    go();
                                })),
                                None => go(),
                            }
                        }
                        Err(err) if err.kind() == io::ErrorKind::WouldBlock => {
                            thread::sleep(Duration::from_millis(20));
                        }
                        Err(err) => eprintln!("proxy: accept: {err}"),
                    }
                }
            })
        };
        Ok(Self {
            port,
            cuts,
            log,
            stop,
            sockets,
            acceptor: Some(acceptor),
        })
    }

    /// The port clients connect to.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Every round trip so far, in the order they began.
    pub fn round_trips(&self) -> Vec<RoundTrip> {
        lock(&self.log).round_trips.clone()
    }

    /// Connections accepted so far.
    pub fn connections(&self) -> usize {
        lock(&self.log).connections
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for socket in lock(&self.sockets).iter() {
            let _ = socket.shutdown(Shutdown::Both);
        }
        if let Some(acceptor) = self.acceptor.take() {
            let _ = acceptor.join();
        }
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Names the phase of the bank's main job each round trip belongs to
/// (connect, setup, create, transfer, delete), and counts them.
pub fn per_phase(round_trips: &[RoundTrip]) -> BTreeMap<&'static str, usize> {
    let mut counts = BTreeMap::new();
    let mut transaction: Vec<&RoundTrip> = Vec::new();
    let label_tx = |tx: &[&RoundTrip]| {
        let all: Vec<&str> = tx
            .iter()
            .flat_map(|r| r.sent.iter().map(String::as_str))
            .collect();
        if all.iter().any(|s| s.starts_with("INSERT")) {
            "3 create"
        } else if all.iter().any(|s| s.contains("FOR UPDATE")) {
            "4 transfer"
        } else if all.iter().any(|s| s.starts_with("DELETE")) {
            "5 delete"
        } else {
            "? other transaction"
        }
    };
    for rt in round_trips {
        let sent = |p: &str| rt.sent.iter().any(|s| s.starts_with(p) || s.contains(p));
        if !transaction.is_empty() || sent("BEGIN") {
            transaction.push(rt);
            if sent("COMMIT") {
                *counts.entry(label_tx(&transaction)).or_default() += transaction.len();
                transaction.clear();
            }
            continue;
        }
        let phase = if sent("<") || sent("SET TIME ZONE") || sent("SET CLIENT_ENCODING") {
            "1 connect"
        } else if sent("version()") {
            "2 setup"
        } else {
            "? other"
        };
        *counts.entry(phase).or_default() += 1;
    }
    counts
}

/// Starts the four threads of one proxied connection.
fn carry(
    client: TcpStream,
    upstream: SocketAddr,
    delay: Duration,
    id: usize,
    log: Arc<Mutex<Log>>,
    sockets: &Mutex<Vec<TcpStream>>,
    cuts: Option<CommitCuts>,
) -> io::Result<()> {
    client.set_nonblocking(false)?;
    client.set_nodelay(true)?;
    let server = TcpStream::connect(upstream)?;
    server.set_nodelay(true)?;
    lock(sockets).extend([client.try_clone()?, server.try_clone()?]);
    let turn = Arc::new(Mutex::new(Turn::Server));
    // Set once this connection is being cut: the server's answers are
    // dropped from then on.
    let cutting = Arc::new(AtomicBool::new(false));
    let mut parser = ClientParser::default();
    let (to_server, to_client) = (server.try_clone()?, client.try_clone()?);
    let from_client = {
        let (log, turn, cutting) = (log.clone(), turn.clone(), cutting.clone());
        move |bytes: &[u8]| -> Forward {
            let sent = parser.feed(bytes);
            let cut = cuts
                .as_ref()
                .filter(|c| sent.iter().any(|s| commits(s)) && c.this_one())
                .map(|c| c.when);
            let mut log = lock(&log);
            let mut turn = lock(&turn);
            let only_terminate = sent.iter().all(|s| s == "<terminate>") && !sent.is_empty();
            if *turn == Turn::Server && !only_terminate {
                log.round_trips.push(RoundTrip {
                    connection: id,
                    sent: Vec::new(),
                });
            }
            *turn = Turn::Client;
            if let Some(current) = log
                .round_trips
                .iter_mut()
                .rev()
                .find(|r| r.connection == id)
            {
                current
                    .sent
                    .extend(sent.into_iter().filter(|s| s != "<terminate>"));
            }
            drop((log, turn));
            let Some(cut) = cut else {
                return Forward::Yes;
            };
            cutting.store(true, Ordering::SeqCst);
            if cut == Cut::AfterForwarding {
                // Straight to the server, not through the (undelayed)
                // writer: the client waited for every earlier answer, so
                // nothing is queued ahead of it.
                let _ = (&to_server).write_all(bytes);
                let _ = (&to_server).flush();
            }
            let _ = to_server.shutdown(Shutdown::Both);
            let _ = to_client.shutdown(Shutdown::Both);
            Forward::No
        }
    };
    let from_server = move |_: &[u8]| {
        *lock(&turn) = Turn::Server;
        if cutting.load(Ordering::SeqCst) {
            Forward::No
        } else {
            Forward::Yes
        }
    };
    pump(client.try_clone()?, server.try_clone()?, delay, from_client);
    pump(server, client, delay, from_server);
    Ok(())
}

/// Whether a chunk read goes on to the other side.
enum Forward {
    Yes,
    No,
}

/// Copies `from` to `to`, each chunk delivered `delay` after it was read,
/// unless `seen` says otherwise.
fn pump(
    mut from: TcpStream,
    mut to: TcpStream,
    delay: Duration,
    mut seen: impl FnMut(&[u8]) -> Forward + Send + 'static,
) {
    let (tx, rx) = mpsc::channel::<(Instant, Vec<u8>)>();
    thread::spawn(move || {
        let mut buf = vec![0; 64 * 1024];
        loop {
            match from.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    if let Forward::No = seen(&buf[..n]) {
                        continue;
                    }
                    if tx
                        .send((Instant::now() + delay, buf[..n].to_vec()))
                        .is_err()
                    {
                        break;
                    }
                }
            }
        }
    });
    thread::spawn(move || {
        for (due, bytes) in rx {
            let now = Instant::now();
            if due > now {
                thread::sleep(due - now);
            }
            if to.write_all(&bytes).is_err() {
                break;
            }
        }
        let _ = to.shutdown(Shutdown::Write);
    });
}

/// Reads the client's side of the protocol far enough to name what it sent.
#[derive(Default)]
struct ClientParser {
    buffer: Vec<u8>,
    started: bool,
    /// After the server accepted TLS nothing more can be read.
    encrypted: bool,
}

impl ClientParser {
    fn feed(&mut self, bytes: &[u8]) -> Vec<String> {
        let mut sent = Vec::new();
        if self.encrypted {
            return vec!["<encrypted>".to_owned()];
        }
        self.buffer.extend_from_slice(bytes);
        // A TLS handshake record after an SSL request: the rest is opaque.
        if !self.started && self.buffer.first() == Some(&0x16) {
            self.encrypted = true;
            return vec!["<encrypted>".to_owned()];
        }
        loop {
            let header = if self.started { 5 } else { 4 };
            if self.buffer.len() < header {
                break;
            }
            let at = header - 4;
            let length = u32::from_be_bytes([
                self.buffer[at],
                self.buffer[at + 1],
                self.buffer[at + 2],
                self.buffer[at + 3],
            ]) as usize;
            let total = at + length;
            if self.buffer.len() < total {
                break;
            }
            let message: Vec<u8> = self.buffer.drain(..total).collect();
            if !self.started {
                let code = u32::from_be_bytes([message[4], message[5], message[6], message[7]]);
                match code {
                    80_877_103 => sent.push("<ssl request>".to_owned()),
                    80_877_104 => sent.push("<gss request>".to_owned()),
                    _ => {
                        self.started = true;
                        sent.push("<startup>".to_owned());
                    }
                }
                continue;
            }
            let body = &message[5..];
            let text = |bytes: &[u8]| {
                let end = bytes.iter().position(|b| *b == 0).unwrap_or(bytes.len());
                String::from_utf8_lossy(&bytes[..end]).into_owned()
            };
            match message[0] {
                b'Q' => sent.push(text(body)),
                b'P' => {
                    let name_end = body.iter().position(|b| *b == 0).unwrap_or(0);
                    sent.push(text(&body[name_end + 1..]));
                }
                b'p' => sent.push("<password>".to_owned()),
                b'X' => sent.push("<terminate>".to_owned()),
                _ => {}
            }
        }
        sent
    }
}
