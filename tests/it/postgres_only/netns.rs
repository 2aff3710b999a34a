//! A private PostgreSQL in a network namespace of its own, and a second
//! namespace for the program under test, joined by a veth pair: the one
//! link a test can cut (a partition), and a server it can restart or freeze
//! without touching the suite's shared one.
//!
//! Nothing is added to the host's own namespace: the veth pair is created
//! inside the two namespaces, the addresses (10.99.0.1 for the server,
//! 10.99.0.2 for the client) exist only there, and the harness reaches the
//! server through its Unix socket, which namespaces do not separate.
//! Everything is removed when the [`NsServer`] is dropped. Needs root.

use std::process::{Child, Command};

use bank::db;
use bank::db::DbUrl;
use diesel::connection::SimpleConnection;
use diesel::PgConnection;

use crate::helpers::*;
use testbed::cluster::Cluster;

const SERVER_ADDR: &str = "10.99.0.1";
const CLIENT_ADDR: &str = "10.99.0.2";

/// Runs `ip` with `args`, which must succeed.
fn ip(args: &[&str]) {
    run(Command::new("ip").args(args));
}

/// A throwaway server in namespace `server_ns`, with database `bank`
/// migrated, reachable from namespace `client_ns` at 10.99.0.1:5432.
pub struct NsServer {
    pub server_ns: String,
    pub client_ns: String,
    link: String,
    /// Always there until dropped; stopped before the namespaces go.
    cluster: Option<Cluster>,
}

impl NsServer {
    pub fn start() -> Self {
        let tag = format!("{:08x}", rand::random::<u32>());
        let mut server = Self {
            server_ns: format!("bks{tag}"),
            client_ns: format!("bkc{tag}"),
            link: format!("vs{tag}"),
            cluster: None,
        };
        // From here on, Drop removes whatever was made.
        let (s, c) = (server.server_ns.as_str(), server.client_ns.as_str());
        ip(&["netns", "add", s]);
        ip(&["netns", "add", c]);
        let peer = format!("vc{tag}");
        let link = server.link.as_str();
        ip(&[
            "-n", s, "link", "add", link, "type", "veth", "peer", "name", &peer, "netns", c,
        ]);
        ip(&[
            "-n",
            s,
            "addr",
            "add",
            &format!("{SERVER_ADDR}/30"),
            "dev",
            link,
        ]);
        ip(&[
            "-n",
            c,
            "addr",
            "add",
            &format!("{CLIENT_ADDR}/30"),
            "dev",
            &peer,
        ]);
        for (ns, dev) in [(s, "lo"), (c, "lo"), (s, link), (c, &peer)] {
            ip(&["-n", ns, "link", "set", dev, "up"]);
        }

        let cluster = Cluster::trusting().in_netns(s);
        // fsync off: the OS keeps what a killed server wrote. Commits stay
        // synchronous: with synchronous_commit off, a crash restart loses
        // the last commits, and the tests would see accounts vanish (they
        // did, before this was on).
        cluster.configure(
            &format!("listen_addresses = '{SERVER_ADDR}'\nport = 5432\nfsync = off\nmax_connections = 60"),
            &format!("local all all trust\nhost all all {CLIENT_ADDR}/32 trust\n"),
        );
        cluster.start();
        server.cluster = Some(cluster);
        server
            .admin("postgres")
            .batch_execute("CREATE DATABASE bank")
            .unwrap();
        db::run_migrations(&mut server.admin("bank")).expect("migrate");
        server
    }

    fn cluster(&self) -> &Cluster {
        self.cluster.as_ref().expect("the server's cluster")
    }

    /// Restarts the server: `mode` is `immediate` (a crash: no backend
    /// finishes anything) or `fast` (backends told to end, then a clean
    /// shutdown).
    pub fn restart(&self, mode: &str) {
        self.cluster().restart(mode);
    }

    /// The harness's own way in, through the Unix socket.
    pub fn admin_url(&self, database: &str) -> DbUrl {
        DbUrl::parse(&self.cluster().socket_conninfo(5432, database)).unwrap()
    }

    pub fn admin(&self, database: &str) -> PgConnection {
        db::establish(&self.admin_url(database)).expect("connect through the Unix socket")
    }

    /// The URL the program under test uses, from the client namespace.
    pub fn client_url(&self) -> String {
        format!("postgresql://postgres@{SERVER_ADDR}:5432/bank")
    }

    /// The client URL with dead-peer detection in about 2 s instead of the
    /// production 15 s (keepalives after 1 s idle, 1 probe; data
    /// unacknowledged for 1.5 s) and connects given up after 2 s: a fault
    /// test sets the bounds it exercises instead of waiting them out.
    pub fn fast_detection_url(&self) -> String {
        format!(
            "{}?keepalives_idle=1&keepalives_interval=1&keepalives_count=1\
             &tcp_user_timeout=1500&connect_timeout=2",
            self.client_url()
        )
    }

    /// The same URL as the library parses it.
    pub fn client_db_url(&self) -> DbUrl {
        DbUrl::parse(&self.client_url()).unwrap()
    }

    /// Cuts the link (the server's end goes down: the client's packets
    /// go nowhere and nothing answers them, as in a partition).
    pub fn cut(&self) {
        ip(&["-n", &self.server_ns, "link", "set", &self.link, "down"]);
    }

    /// Mends the link.
    pub fn mend(&self) {
        ip(&["-n", &self.server_ns, "link", "set", &self.link, "up"]);
    }

    /// The `bank` binary with `args`, started in the client namespace.
    pub fn spawn_bank(&self, args: &[&str]) -> (Child, tempfile::TempDir) {
        spawn_bank(&["ip", "netns", "exec", &self.client_ns], args)
    }
}

impl Drop for NsServer {
    fn drop(&mut self) {
        // The server first, while its namespace is there to run pg_ctl in.
        drop(self.cluster.take());
        // Deleting a namespace deletes the veth end in it, and so the pair.
        for ns in [&self.server_ns, &self.client_ns] {
            let _ = Command::new("ip").args(["netns", "del", ns]).status();
        }
    }
}

/// What the app says, once, of a server reached over a network without
/// checking who answers: every run here does, the server being at
/// 10.99.0.1, not on loopback.
pub const UNVERIFIED: &str = "the server's identity is not checked (sslmode=prefer) on the way to 10.99.0.1, which is not this machine";

/// `stderr` without the one line that says the server's identity is not
/// checked (which must be there, once).
pub fn apart_from_the_unverified_warning(stderr: &str) -> String {
    let (warned, rest): (Vec<&str>, Vec<&str>) =
        stderr.lines().partition(|l| l.contains(UNVERIFIED));
    assert_eq!(
        warned.len(),
        1,
        "the unverified-server warning, once: {stderr}"
    );
    rest.iter().map(|l| format!("{l}\n")).collect()
}

#[test]
fn a_server_reached_unverified_over_the_network_is_warned_of_once_and_the_job_runs() {
    let server = NsServer::start();
    let (child, _workdir) = server.spawn_bank(&[
        "--database-url",
        &server.client_url(),
        "--accounts",
        "10",
        "--delete",
        "2",
    ]);
    let out = child.wait_with_output().unwrap();
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(stderr.contains(UNVERIFIED), "{stderr}");
    assert!(
        stderr.trim_end().ends_with(
            "whoever answers there gets the password; use sslmode=verify-full&sslrootcert=CA.crt \
             (the CA certificate that signed the server's) in the database url"
        ),
        "{stderr}"
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("Transfer complete."));
}
