//! A TCP proxy for PostgreSQL's wire protocol on 127.0.0.1: it delays each
//! direction by a fixed time (cloud latency), keeps every message in order,
//! and counts round trips, recording the statements the client sent in each.
//! Used by the tests (round trips pinned per phase, faults, CockroachDB's
//! behaviours played on PostgreSQL) and, as `examples/latency_proxy.rs`, by
//! bench/run.
//!
//! Each direction is a reader thread that cuts what it reads into protocol
//! messages, lets a filter decide what goes on, and stamps it with the time
//! it may be delivered, and a writer thread that delivers it then. The
//! filters are where the faults live:
//! - [`Proxy::cutting_commits`] cuts a connection at chosen `COMMIT`s, before
//!   forwarding the `COMMIT` or just after (the server commits, and its
//!   answer is lost);
//! - [`Faults::inject`] answers chosen statements with an error from the
//!   server (a drain's 57P01, say) without closing the connection;
//! - [`Faults::cockroach`] plays CockroachDB's documented behaviours that
//!   PostgreSQL does not have (see [`Cockroach`]).
//!
//! An error "from the server" is made by the server itself: the client's
//! message is replaced by `DO $$ BEGIN RAISE EXCEPTION ... $$` with the
//! SQLSTATE and text to play, so the server's transaction state (aborted,
//! in a transaction block) stays what the client is told.

use std::collections::BTreeMap;
use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicUsize, Ordering};
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
    /// `<password>`, or `<bind>` for a flight that only runs statements
    /// prepared earlier; the other extended-protocol messages are not
    /// listed.
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

/// CockroachDB's behaviours that PostgreSQL lacks, played at the wire so
/// that tests on PostgreSQL meet them. Each follows a CockroachDB doc:
/// - **autocommit before DDL** (`autocommit_before_ddl`, on by default
///   since v25.1, and since v25.2 for a DDL that is the first statement
///   after `BEGIN` too): "any schema change statement that is sent during an
///   explicit transaction will cause the transaction to commit before
///   executing the schema change"
///   (<https://www.cockroachlabs.com/docs/stable/session-vars#autocommit-before-ddl>,
///   <https://www.cockroachlabs.com/docs/stable/online-schema-changes#enable-automatic-commit-before-running-schema-changes-inside-transactions>).
///   Played: a simple query whose first statement is `CREATE`, `ALTER` or
///   `DROP`, sent while the session is in a transaction block (the last
///   ReadyForQuery said `T`), is preceded by a `COMMIT` whose answer the
///   client never sees. The DDL then runs outside any transaction block, and
///   the client's `COMMIT` after it finds none (a warning on both servers).
/// - **the message size limit** (`sql.conn.max_read_buffer_message_size`,
///   16 MiB by default; cockroachdb/cockroach#63782): a client message
///   larger than it is refused with SQLSTATE 08P01 ("message size ... bigger
///   than maximum allowed message size ..."), and in the extended protocol
///   the messages after it are discarded until Sync, as CockroachDB's
///   pgwire tests show (`pkg/sql/pgwire/testdata/pgtest/large_input`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cockroach {
    /// Commit an open transaction before a DDL.
    pub autocommit_before_ddl: bool,
    /// The largest client message accepted, in bytes.
    pub max_message: usize,
}

impl Default for Cockroach {
    /// Both behaviours, with CockroachDB's default limit (16 MiB).
    fn default() -> Self {
        Self {
            autocommit_before_ddl: true,
            max_message: 16 << 20,
        }
    }
}

/// An error the server answers chosen simple queries with, the connection
/// staying open: the `every`-th query (counted across connections from 1)
/// whose text starts with `starting`.
#[derive(Debug, Clone)]
pub struct Injection {
    /// The start of the queries concerned (`BEGIN`, `COMMIT`, ...).
    pub starting: &'static str,
    /// Which of them: every 1 is all, every 2 the 1st, 3rd, 5th...
    pub every: usize,
    /// The SQLSTATE to answer with.
    pub code: &'static str,
    /// The message to answer with.
    pub message: &'static str,
}

/// What a proxy does besides forwarding.
#[derive(Debug, Clone, Default)]
pub struct Faults {
    /// The delay of each direction.
    pub delay: Duration,
    /// Every connection after the first waits this long before it is
    /// carried.
    pub stall: Option<Duration>,
    /// Cut every `.0`-th `COMMIT`, as `.1` says.
    pub cut_commits: Option<(usize, Cut)>,
    /// Errors to answer chosen queries with.
    pub inject: Option<Injection>,
    /// CockroachDB's behaviours to play.
    pub cockroach: Option<Cockroach>,
}

/// What the filters did, counted across connections.
#[derive(Debug, Default)]
struct Counts {
    commits_seen: AtomicUsize,
    commits_cut: AtomicUsize,
    queries_matched: AtomicUsize,
    injected: AtomicUsize,
    autocommits: AtomicUsize,
    refused: AtomicUsize,
}

/// Whether a simple query's text commits: `COMMIT`, alone or as the last of
/// several statements (the restart protocol's `SET LOCAL statement_timeout
/// = ...; COMMIT` or `SELECT 1; COMMIT`, the savepoint protocol's `RELEASE
/// ...; COMMIT`).
fn commits(sql: &str) -> bool {
    sql.split(';')
        .any(|s| s.trim().eq_ignore_ascii_case("COMMIT"))
}

/// Whether a simple query's first statement is a schema change (`CREATE`,
/// `ALTER`, `DROP`), after any leading comments and blank lines.
fn starts_with_ddl(sql: &str) -> bool {
    let code = sql
        .lines()
        .map(str::trim)
        .find(|l| !l.is_empty() && !l.starts_with("--"))
        .unwrap_or_default();
    let word = code
        .split(|c: char| !c.is_ascii_alphabetic())
        .next()
        .unwrap_or_default();
    ["CREATE", "ALTER", "DROP"]
        .iter()
        .any(|ddl| word.eq_ignore_ascii_case(ddl))
}

/// A simple-query message that makes the server itself answer with
/// `code` and `message` (a plain error, so the connection stays open).
fn raise(code: &str, message: &str) -> Vec<u8> {
    query(&format!(
        "DO $$ BEGIN RAISE EXCEPTION USING ERRCODE = '{code}', MESSAGE = '{}'; END $$",
        message.replace('\'', "''")
    ))
}

/// A simple-query message carrying `sql`.
fn query(sql: &str) -> Vec<u8> {
    let len = u32::try_from(4 + sql.len() + 1).expect("a short query");
    let mut msg = vec![b'Q'];
    msg.extend_from_slice(&len.to_be_bytes());
    msg.extend_from_slice(sql.as_bytes());
    msg.push(0);
    msg
}

/// A size in the unit CockroachDB's message uses.
fn mib(bytes: usize) -> String {
    format!("{:.1} MiB", bytes as f64 / f64::from(1u32 << 20))
}

/// A running proxy; dropping it closes every connection it carries.
pub struct Proxy {
    port: u16,
    counts: Arc<Counts>,
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
        Self::with_faults(
            upstream,
            Faults {
                delay,
                ..Faults::default()
            },
        )
    }

    /// Forwards to `upstream` at once, but every connection after the first
    /// waits `stall` before it is carried: a client's connect attempt is
    /// then inside libpq, waiting for the server's first answer, for that
    /// long (a slow handshake, a server slow to accept).
    ///
    /// # Errors
    /// Binding the listener.
    pub fn stalling(upstream: SocketAddr, stall: Duration) -> io::Result<Self> {
        Self::with_faults(
            upstream,
            Faults {
                stall: Some(stall),
                ..Faults::default()
            },
        )
    }

    /// Forwards to `upstream` at once, and cuts the connection (both sides)
    /// at every `every`-th `COMMIT` it sees, counted across connections from
    /// the first: before forwarding it, or just after. From the moment it
    /// decides to cut, nothing more from the server reaches the client.
    ///
    /// # Errors
    /// Binding the listener.
    pub fn cutting_commits(upstream: SocketAddr, every: usize, when: Cut) -> io::Result<Self> {
        Self::with_faults(
            upstream,
            Faults {
                cut_commits: Some((every.max(1), when)),
                ..Faults::default()
            },
        )
    }

    /// Forwards to `upstream` at once, playing CockroachDB's behaviours
    /// ([`Cockroach::default`]: both, with the 16 MiB limit).
    ///
    /// # Errors
    /// Binding the listener.
    pub fn emulating_cockroach(upstream: SocketAddr) -> io::Result<Self> {
        Self::with_faults(
            upstream,
            Faults {
                cockroach: Some(Cockroach::default()),
                ..Faults::default()
            },
        )
    }

    /// Forwards to `upstream` with `faults`.
    ///
    /// # Errors
    /// Binding the listener.
    pub fn with_faults(upstream: SocketAddr, faults: Faults) -> io::Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0")?;
        listener.set_nonblocking(true)?;
        let port = listener.local_addr()?.port();
        let counts = Arc::new(Counts::default());
        let log = Arc::new(Mutex::new(Log::default()));
        let stop = Arc::new(AtomicBool::new(false));
        let sockets = Arc::new(Mutex::new(Vec::new()));
        let acceptor = {
            let (counts, log, stop, sockets) =
                (counts.clone(), log.clone(), stop.clone(), sockets.clone());
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
                            let carried = Carried {
                                id,
                                upstream,
                                faults: faults.clone(),
                                counts: counts.clone(),
                                log: log.clone(),
                            };
                            let sockets = sockets.clone();
                            let go = move || {
                                if let Err(err) = carried.start(client, &sockets) {
                                    eprintln!("proxy: connection {id}: {err}");
                                }
                            };
                            match faults.stall.filter(|_| id > 0) {
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
            counts,
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

    /// `COMMIT`s cut so far.
    pub fn commits_cut(&self) -> usize {
        self.counts.commits_cut.load(Ordering::Relaxed)
    }

    /// Errors injected so far ([`Faults::inject`]).
    pub fn injected(&self) -> usize {
        self.counts.injected.load(Ordering::Relaxed)
    }

    /// Transactions committed before a DDL ([`Cockroach::autocommit_before_ddl`]).
    pub fn autocommits(&self) -> usize {
        self.counts.autocommits.load(Ordering::Relaxed)
    }

    /// Client messages refused for their size ([`Cockroach::max_message`]).
    pub fn refused(&self) -> usize {
        self.counts.refused.load(Ordering::Relaxed)
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
    let mut last = "? other";
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
        let phase = if rt.sent == [BIND] {
            // Runs what the flight before it prepared.
            last
        } else if sent("<") || sent("SET TIME ZONE") || sent("SET CLIENT_ENCODING") {
            "1 connect"
        } else if sent("version()") {
            "2 setup"
        } else {
            "? other"
        };
        last = phase;
        *counts.entry(phase).or_default() += 1;
    }
    counts
}

/// What a flight that only runs prepared statements (Bind, Execute, Sync)
/// is listed as.
pub const BIND: &str = "<bind>";

/// The session as the two directions of one connection share it.
#[derive(Default)]
struct Session {
    /// The status of the last ReadyForQuery: `I`, `T` or `E`.
    status: AtomicU8,
    /// Answers of the server to drop, each ending with a ReadyForQuery: the
    /// answers to statements the proxy sent on its own.
    swallow: AtomicUsize,
    /// One-byte answers due from the server (to an SSL or GSS request).
    one_byte_answers: AtomicUsize,
    /// Set once this connection is being cut: the server's answers are
    /// dropped from then on.
    cutting: AtomicBool,
    /// Set when the connection is to be cut once the server has answered
    /// the `COMMIT` it was sent: only then is the outcome decided, so a
    /// client that looks at once finds it.
    cut_on_answer: AtomicBool,
}

/// One connection to carry.
struct Carried {
    id: usize,
    upstream: SocketAddr,
    faults: Faults,
    counts: Arc<Counts>,
    log: Arc<Mutex<Log>>,
}

impl Carried {
    /// Connects upstream and starts the four threads.
    fn start(self, client: TcpStream, sockets: &Mutex<Vec<TcpStream>>) -> io::Result<()> {
        client.set_nonblocking(false)?;
        client.set_nodelay(true)?;
        let server = TcpStream::connect(self.upstream)?;
        server.set_nodelay(true)?;
        lock(sockets).extend([client.try_clone()?, server.try_clone()?]);
        let session = Arc::new(Session::default());
        let turn = Arc::new(Mutex::new(Turn::Server));
        let delay = self.faults.delay;
        let mut client_side = ClientSide {
            carried: self,
            session: session.clone(),
            turn: turn.clone(),
            to_server: server.try_clone()?,
            to_client: client.try_clone()?,
            messages: Messages::default(),
            dropping: Dropping::No,
        };
        let mut server_side = ServerSide {
            session,
            turn,
            messages: Messages::default(),
            sockets: [server.try_clone()?, client.try_clone()?],
        };
        pump(client.try_clone()?, server.try_clone()?, delay, move |b| {
            client_side.feed(b)
        });
        pump(server, client, delay, move |b| server_side.feed(b));
        Ok(())
    }
}

/// Cuts a byte stream into protocol messages, in place: a large result of
/// many small rows goes through without a copy or a shift per message.
#[derive(Default)]
struct Messages {
    buffer: Vec<u8>,
    /// Startup messages (no type byte) are over.
    typed: bool,
    /// TLS was agreed: nothing more can be read.
    encrypted: bool,
    /// Bytes of an oversized message still to come, to throw away.
    skipping: usize,
}

/// One message, or what could be read of one.
enum Message<'a> {
    /// A startup-phase message (SSLRequest, StartupMessage...).
    Untyped(&'a [u8]),
    /// A typed message, whole.
    Typed(u8, &'a [u8]),
    /// The header of a message longer than the limit given: its type and
    /// length; its body is skipped as it arrives.
    Oversized(u8, usize),
    /// Bytes after TLS was agreed.
    Opaque(&'a [u8]),
}

/// SSLRequest's and GSSENCRequest's codes, which a startup message follows.
const SSL_REQUEST: u32 = 80_877_103;
const GSS_REQUEST: u32 = 80_877_104;

impl Messages {
    /// Calls `each` with every whole message in what has arrived so far;
    /// messages longer than `limit` are reported by their header and
    /// skipped.
    fn scan(&mut self, bytes: &[u8], limit: usize, mut each: impl FnMut(Message<'_>)) {
        if self.encrypted {
            return each(Message::Opaque(bytes));
        }
        let mut bytes = bytes;
        if self.skipping > 0 {
            let skip = self.skipping.min(bytes.len());
            self.skipping -= skip;
            bytes = &bytes[skip..];
        }
        self.buffer.extend_from_slice(bytes);
        // A TLS handshake record where a startup message would be (after
        // an SSL request the server accepted): the rest is opaque. A startup
        // message opens with its length, whose first byte is 0.
        if !self.typed && self.buffer.first() == Some(&0x16) {
            self.encrypted = true;
            return each(Message::Opaque(&std::mem::take(&mut self.buffer)));
        }
        let mut at = 0;
        loop {
            let rest = &self.buffer[at..];
            let header = if self.typed { 5 } else { 4 };
            if rest.len() < header {
                break;
            }
            let from = header - 4;
            let length =
                u32::from_be_bytes([rest[from], rest[from + 1], rest[from + 2], rest[from + 3]])
                    as usize;
            let total = from + length;
            if self.typed && total > limit {
                let have = rest.len().min(total);
                each(Message::Oversized(rest[0], total));
                at += have;
                self.skipping = total - have;
                if self.skipping > 0 {
                    break;
                }
                continue;
            }
            if rest.len() < total {
                break;
            }
            let message = &rest[..total];
            at += total;
            if self.typed {
                each(Message::Typed(message[0], message));
            } else {
                let code = u32::from_be_bytes([message[4], message[5], message[6], message[7]]);
                // Anything but an SSL or GSS request is the startup message.
                self.typed = !matches!(code, SSL_REQUEST | GSS_REQUEST);
                each(Message::Untyped(message));
            }
        }
        self.buffer.drain(..at);
    }
}

/// Whether, and why, client messages are being thrown away.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Dropping {
    No,
    /// An oversized extended-protocol message: until the next Sync, which
    /// is answered with the refusal.
    UntilSync(usize),
    /// The connection is being cut.
    Everything,
}

/// The client's direction: logs what it sent, and plays the faults.
struct ClientSide {
    carried: Carried,
    session: Arc<Session>,
    turn: Arc<Mutex<Turn>>,
    to_server: TcpStream,
    to_client: TcpStream,
    messages: Messages,
    dropping: Dropping,
}

impl ClientSide {
    /// What to forward of `bytes`.
    fn feed(&mut self, bytes: &[u8]) -> Vec<u8> {
        let limit = self
            .carried
            .faults
            .cockroach
            .map_or(usize::MAX, |c| c.max_message);
        let mut forward = Vec::new();
        let mut sent = Vec::new();
        let mut messages = std::mem::take(&mut self.messages);
        messages.scan(bytes, limit, |message| {
            if self.dropping == Dropping::Everything {
                return;
            }
            match message {
                Message::Opaque(bytes) => {
                    sent.push("<encrypted>".to_owned());
                    forward.extend_from_slice(bytes);
                }
                Message::Untyped(bytes) => {
                    let code = u32::from_be_bytes([bytes[4], bytes[5], bytes[6], bytes[7]]);
                    sent.push(
                        match code {
                            SSL_REQUEST => "<ssl request>",
                            GSS_REQUEST => "<gss request>",
                            _ => "<startup>",
                        }
                        .to_owned(),
                    );
                    if matches!(code, SSL_REQUEST | GSS_REQUEST) {
                        self.session.one_byte_answers.fetch_add(1, Ordering::SeqCst);
                    }
                    forward.extend_from_slice(bytes);
                }
                Message::Oversized(kind, size) => {
                    self.carried.counts.refused.fetch_add(1, Ordering::Relaxed);
                    sent.push(format!("<{size} bytes refused>"));
                    if kind == b'Q' {
                        forward.extend(self.refusal(size));
                    } else {
                        self.dropping = Dropping::UntilSync(size);
                    }
                }
                Message::Typed(kind, bytes) => {
                    if let Dropping::UntilSync(size) = self.dropping {
                        if kind == b'S' {
                            self.dropping = Dropping::No;
                            forward.extend(self.refusal(size));
                        }
                        return;
                    }
                    self.typed(kind, bytes, &mut forward, &mut sent);
                }
            }
        });
        self.messages = messages;
        self.log(sent);
        forward
    }

    /// CockroachDB's refusal of a message of `size` bytes, made by the
    /// server.
    fn refusal(&self, size: usize) -> Vec<u8> {
        let limit = self
            .carried
            .faults
            .cockroach
            .map_or(usize::MAX, |c| c.max_message);
        raise(
            "08P01",
            &format!(
                "message size {} bigger than maximum allowed message size {}",
                mib(size),
                mib(limit)
            ),
        )
    }

    /// One whole typed message: forwarded, replaced, preceded, or the point
    /// where the connection is cut.
    fn typed(&mut self, kind: u8, bytes: &[u8], forward: &mut Vec<u8>, sent: &mut Vec<String>) {
        let body = &bytes[5..];
        let text = |bytes: &[u8]| {
            let end = bytes.iter().position(|b| *b == 0).unwrap_or(bytes.len());
            String::from_utf8_lossy(&bytes[..end]).into_owned()
        };
        let sql = match kind {
            b'Q' => Some(text(body)),
            b'P' => {
                let name_end = body.iter().position(|b| *b == 0).unwrap_or(0);
                sent.push(text(&body[name_end + 1..]));
                None
            }
            b'p' => {
                sent.push("<password>".to_owned());
                None
            }
            b'X' => {
                sent.push("<terminate>".to_owned());
                None
            }
            // A statement prepared earlier, run: a flight of its own when
            // nothing else is in it (see `log`).
            b'B' => {
                sent.push(BIND.to_owned());
                None
            }
            _ => None,
        };
        let Some(sql) = sql else {
            forward.extend_from_slice(bytes);
            return;
        };
        sent.push(sql.clone());
        let faults = &self.carried.faults;
        let counts = &self.carried.counts;
        if let Some(inject) = &faults.inject {
            if sql.trim_start().starts_with(inject.starting) {
                let n = counts.queries_matched.fetch_add(1, Ordering::Relaxed) + 1;
                if (n - 1) % inject.every.max(1) == 0 {
                    counts.injected.fetch_add(1, Ordering::Relaxed);
                    forward.extend(raise(inject.code, inject.message));
                    return;
                }
            }
        }
        let autocommit = faults.cockroach.is_some_and(|c| c.autocommit_before_ddl);
        if autocommit && self.session.status.load(Ordering::SeqCst) == b'T' && starts_with_ddl(&sql)
        {
            counts.autocommits.fetch_add(1, Ordering::Relaxed);
            self.session.swallow.fetch_add(1, Ordering::SeqCst);
            forward.extend(query("COMMIT"));
        }
        if let Some((every, when)) = faults.cut_commits {
            if commits(&sql) {
                let n = counts.commits_seen.fetch_add(1, Ordering::Relaxed) + 1;
                if (n - 1) % every == 0 {
                    counts.commits_cut.fetch_add(1, Ordering::Relaxed);
                    self.cut(when, forward, bytes);
                    return;
                }
            }
        }
        forward.extend_from_slice(bytes);
    }

    /// Cuts the connection at the `COMMIT` in `commit`, after sending what
    /// came before it (and it, when `when` says so) straight to the server:
    /// the client waited for every earlier answer, so nothing is queued
    /// ahead of it.
    ///
    /// After forwarding, the cut waits for the server's answer (which it
    /// drops): cutting at once would let the client see the cut, and look
    /// for the outcome, before the server has even read the `COMMIT`.
    fn cut(&mut self, when: Cut, forward: &mut Vec<u8>, commit: &[u8]) {
        self.dropping = Dropping::Everything;
        match when {
            Cut::BeforeForwarding => self.session.cutting.store(true, Ordering::SeqCst),
            Cut::AfterForwarding => {
                self.session.cut_on_answer.store(true, Ordering::SeqCst);
                forward.extend_from_slice(commit);
            }
        }
        let _ = (&self.to_server).write_all(forward);
        let _ = (&self.to_server).flush();
        forward.clear();
        if when == Cut::BeforeForwarding {
            let _ = self.to_server.shutdown(Shutdown::Both);
            let _ = self.to_client.shutdown(Shutdown::Both);
        }
    }

    /// Records what the client sent as part of the current round trip, or
    /// of a new one if the server spoke last.
    fn log(&self, sent: Vec<String>) {
        if sent.is_empty() {
            return;
        }
        let id = self.carried.id;
        let mut log = lock(&self.carried.log);
        let mut turn = lock(&self.turn);
        let only_terminate = sent.iter().all(|s| s == "<terminate>");
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
            // `<bind>` names a flight that runs prepared statements only:
            // beside SQL text it says nothing, and once is enough.
            if current.sent.iter().any(|s| s != BIND) {
                current.sent.retain(|s| s != BIND);
            } else {
                current.sent.truncate(1);
            }
        }
    }
}

/// The server's direction: tracks the session's status, and drops the
/// answers to what the proxy sent on its own.
struct ServerSide {
    session: Arc<Session>,
    turn: Arc<Mutex<Turn>>,
    messages: Messages,
    /// The server and the client, to cut once the server has answered.
    sockets: [TcpStream; 2],
}

impl ServerSide {
    fn feed(&mut self, mut bytes: &[u8]) -> Vec<u8> {
        *lock(&self.turn) = Turn::Server;
        if self.session.cutting.load(Ordering::SeqCst) {
            return Vec::new();
        }
        if self.session.cut_on_answer.load(Ordering::SeqCst) {
            self.cut_on_ready(bytes);
            return Vec::new();
        }
        let mut forward = Vec::new();
        // The one-byte answer to an SSL or GSS request comes before any
        // message: `S` (or `G`) means encryption from here on.
        while !bytes.is_empty()
            && !self.messages.encrypted
            && self.session.one_byte_answers.load(Ordering::SeqCst) > 0
        {
            self.session.one_byte_answers.fetch_sub(1, Ordering::SeqCst);
            if matches!(bytes[0], b'S' | b'G') {
                self.messages.encrypted = true;
            }
            forward.push(bytes[0]);
            bytes = &bytes[1..];
        }
        self.messages.typed = true;
        let session = &self.session;
        self.messages
            .scan(bytes, usize::MAX, |message| match message {
                Message::Opaque(bytes) | Message::Untyped(bytes) => {
                    forward.extend_from_slice(bytes)
                }
                Message::Typed(kind, bytes) => {
                    if kind == b'Z' {
                        session.status.store(bytes[5], Ordering::SeqCst);
                    }
                    if session.swallow.load(Ordering::SeqCst) > 0 {
                        if kind == b'Z' {
                            session.swallow.fetch_sub(1, Ordering::SeqCst);
                        }
                        return;
                    }
                    forward.extend_from_slice(bytes);
                }
                Message::Oversized(..) => {}
            });
        forward
    }

    /// Drops the server's answer to a forwarded `COMMIT` and, at its
    /// ReadyForQuery, cuts both sides.
    fn cut_on_ready(&mut self, bytes: &[u8]) {
        let mut ready = false;
        self.messages.scan(bytes, usize::MAX, |message| {
            ready |= matches!(message, Message::Typed(b'Z', _));
        });
        if ready {
            self.session.cutting.store(true, Ordering::SeqCst);
            for socket in &self.sockets {
                let _ = socket.shutdown(Shutdown::Both);
            }
        }
    }
}

/// Copies `from` to `to`, each chunk delivered `delay` after it was read,
/// as `filter` rewrites it.
fn pump(
    mut from: TcpStream,
    mut to: TcpStream,
    delay: Duration,
    mut filter: impl FnMut(&[u8]) -> Vec<u8> + Send + 'static,
) {
    let (tx, rx) = mpsc::channel::<(Instant, Vec<u8>)>();
    thread::spawn(move || {
        let mut buf = vec![0; 64 * 1024];
        loop {
            match from.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    let forward = filter(&buf[..n]);
                    if forward.is_empty() {
                        continue;
                    }
                    if tx.send((Instant::now() + delay, forward)).is_err() {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ddl_is_recognised_after_comments_and_commits_inside_batches() {
        assert!(starts_with_ddl(
            "-- a comment\n\nCREATE TABLE IF NOT EXISTS x (id INT)"
        ));
        assert!(starts_with_ddl("alter table x add column y int"));
        assert!(starts_with_ddl("DROP TABLE x;"));
        assert!(!starts_with_ddl("INSERT INTO x VALUES (1)"));
        assert!(!starts_with_ddl("-- CREATE\nSELECT 1"));
        assert!(commits("SELECT 1; COMMIT"));
        assert!(commits("SET LOCAL statement_timeout = 20000; COMMIT"));
        assert!(commits("RELEASE SAVEPOINT cockroach_restart; COMMIT"));
        assert!(!commits("SELECT 'COMMIT'"));
    }

    #[test]
    fn an_oversized_message_is_reported_by_its_header_and_skipped_as_it_arrives() {
        let mut messages = Messages {
            typed: true,
            ..Messages::default()
        };
        let mut big = vec![b'B'];
        big.extend_from_slice(&(4 + 100u32).to_be_bytes());
        big.extend(vec![7; 100]);
        let small = query("SELECT 1");
        let mut stream = big.clone();
        stream.extend(&small);
        let (first, rest) = stream.split_at(40);
        let mut seen = Vec::new();
        let mut note = |m: Message<'_>| match m {
            Message::Oversized(kind, size) => {
                seen.push(format!("oversized {} {size}", kind as char))
            }
            Message::Typed(kind, bytes) => seen.push(format!("{} {}", kind as char, bytes.len())),
            _ => seen.push("other".to_owned()),
        };
        messages.scan(first, 50, &mut note);
        messages.scan(rest, 50, &mut note);
        assert_eq!(seen, ["oversized B 105", "Q 14"]);
    }
}
