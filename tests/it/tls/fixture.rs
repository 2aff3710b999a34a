//! The TLS tests' server: a private PostgreSQL that accepts only TLS with
//! scram-sha-256 passwords, its certificates made once by a CA of the
//! test's own, and a database per test with the README's grants.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{ChildStdin, Command};
use std::sync::{Mutex, OnceLock};

use crate::helpers::*;
use testbed::cluster::Cluster;

pub(super) const SENTINEL: &str = "Sentinel-tls-Pa55";

/// The TLS-only server with users `maxroach` (the README's application
/// user), `nogrant` (no privileges) and `plainroach` (also admitted
/// without TLS), all with password [`SENTINEL`], and `certroach`, admitted
/// by a client certificate our CA signed (as in CockroachDB's secure
/// cluster tutorial), without a password.
pub(super) struct TlsServer {
    pub(super) dir: PathBuf,
    pub(super) port: u16,
    pub(super) cluster_conninfo: String,
    /// Stops the server when the test process exits (see
    /// [`Cluster::stop_when_this_process_exits`]).
    pub(super) _guardian: Mutex<ChildStdin>,
}

/// The shared server, started on first use.
pub(super) fn server() -> &'static TlsServer {
    static SERVER: OnceLock<TlsServer> = OnceLock::new();
    SERVER.get_or_init(TlsServer::start)
}

impl TlsServer {
    pub(super) fn start() -> Self {
        let cluster = Cluster::init(
            &[
                "--auth-local=trust",
                "--auth-host=scram-sha-256",
                "--pwfile=pw",
            ],
            |dir| {
                make_certificates(dir);
                fs::write(dir.join("pw"), "admin-password\n").unwrap();
            },
        );
        let dir = cluster.dir.clone();
        // Only TLS over TCP, but for one user who shows scram passwords
        // without TLS; the admin works through the Unix socket.
        cluster.configure(
            &format!(
                "ssl = on\nssl_cert_file = '{d}/server.crt'\nssl_key_file = '{d}/server.key'\n\
                 ssl_ca_file = '{d}/ca.crt'\n\
                 listen_addresses = '127.0.0.1'\nfsync = off\nmax_connections = 100",
                d = dir.display()
            ),
            "local all all trust\nhostssl all certroach 127.0.0.1/32 cert\n\
             hostssl all all 127.0.0.1/32 scram-sha-256\n\
             hostssl all all ::1/128 scram-sha-256\nhostnossl all plainroach 127.0.0.1/32 scram-sha-256\n",
        );
        let port = cluster.start_on_some_port();
        cluster.psql(
            port,
            "postgres",
            &[
                "-c",
                &format!(
                    "CREATE USER maxroach WITH PASSWORD '{SENTINEL}';
                     CREATE USER nogrant WITH PASSWORD '{SENTINEL}';
                     CREATE USER plainroach WITH PASSWORD '{SENTINEL}';
                     CREATE USER certroach;"
                ),
            ],
        );
        let cluster_conninfo = cluster.socket_conninfo(port, "postgres");
        Self {
            dir,
            port,
            cluster_conninfo,
            _guardian: Mutex::new(cluster.stop_when_this_process_exits()),
        }
    }

    pub(super) fn ca(&self) -> String {
        self.file("ca.crt")
    }

    /// The path of one of the files [`make_certificates`] made.
    pub(super) fn file(&self, name: &str) -> String {
        self.dir.join(name).display().to_string()
    }
}

/// A database of its own on the shared server: the schema from dbinit.sql
/// (run by the admin), and `maxroach`, `plainroach` and `certroach`
/// granted what the README grants.
pub(super) struct TlsDb {
    pub(super) server: &'static TlsServer,
    pub(super) name: String,
}

impl TlsDb {
    pub(super) fn new() -> Self {
        let server = server();
        let name = format!("bank_{:08x}", rand::random::<u32>());
        let db = Self { server, name };
        db.admin_sql_in("postgres", &format!("CREATE DATABASE {}", db.name));
        run(Command::new("psql")
            .args(["-X", "-q", "-v", "ON_ERROR_STOP=1", "-f"])
            .arg(repo_root().join("dbinit.sql"))
            .arg(db.admin_conninfo(&db.name)));
        // The README's grant, verbatim.
        db.admin_sql(
            "GRANT SELECT, INSERT, UPDATE, DELETE ON TABLE accounts TO maxroach;
             GRANT SELECT, INSERT, UPDATE, DELETE ON TABLE accounts TO plainroach;
             GRANT SELECT, INSERT ON TABLE transfers TO maxroach;
             GRANT SELECT, INSERT ON TABLE transfers TO plainroach;
             GRANT SELECT, INSERT, UPDATE, DELETE ON TABLE accounts TO certroach;
             GRANT SELECT, INSERT ON TABLE transfers TO certroach;",
        );
        db
    }

    pub(super) fn admin_conninfo(&self, database: &str) -> String {
        self.server
            .cluster_conninfo
            .replace("dbname=postgres", &format!("dbname={database}"))
    }

    pub(super) fn admin_sql_in(&self, database: &str, sql: &str) -> String {
        let out = run(Command::new("psql")
            .args(["-X", "-q", "-At", "-v", "ON_ERROR_STOP=1", "-c", sql])
            .arg(self.admin_conninfo(database)));
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    }

    pub(super) fn admin_sql(&self, sql: &str) -> String {
        self.admin_sql_in(&self.name, sql)
    }

    /// The application's URL: TLS verified against our CA, host `localhost`.
    pub(super) fn url(&self) -> String {
        self.url_with(
            "localhost",
            SENTINEL,
            &format!("sslmode=verify-full&sslrootcert={}", self.server.ca()),
        )
    }

    pub(super) fn url_with(&self, host: &str, password: &str, params: &str) -> String {
        self.url_on(host, self.server.port, password, params)
    }

    pub(super) fn url_on(&self, host: &str, port: u16, password: &str, params: &str) -> String {
        format!(
            "postgresql://maxroach:{password}@{host}:{port}/{}?{params}",
            self.name
        )
    }
}

/// URLs that cannot connect, each with the words its failure must hold:
/// a missing CA file, a CA that did not sign the server's certificate, a
/// host name the certificate does not list, no TLS for a TLS-only server,
/// a wrong password.
pub(super) fn misconfigurations(db: &TlsDb) -> Vec<(String, &'static str)> {
    let ca = db.server.ca();
    let other_ca = db.server.file("other-ca.crt");
    vec![
        (
            db.url_with(
                "localhost",
                SENTINEL,
                "sslmode=verify-full&sslrootcert=/nonexistent/ca.crt",
            ),
            "the CA certificate file /nonexistent/ca.crt does not exist",
        ),
        (
            db.url_with(
                "localhost",
                SENTINEL,
                &format!("sslmode=verify-full&sslrootcert={other_ca}"),
            ),
            "certificate could not be verified",
        ),
        (
            db.url_with(
                "127.0.0.1",
                SENTINEL,
                &format!("sslmode=verify-full&sslrootcert={ca}"),
            ),
            "does not match the host name",
        ),
        (
            db.url_with("localhost", SENTINEL, "sslmode=disable"),
            "requires an encrypted connection",
        ),
        (
            db.url_with(
                "localhost",
                "wrong-password",
                &format!("sslmode=verify-full&sslrootcert={ca}"),
            ),
            "password authentication failed",
        ),
    ]
}

/// A CA, a server certificate it signed for `localhost` only, a client
/// certificate it signed for `certroach`, a second CA, and a client
/// certificate for `certroach` that the second CA signed.
pub(super) fn make_certificates(dir: &Path) {
    let openssl = |args: &[&str]| {
        run(Command::new("openssl").args(args).current_dir(dir));
    };
    for ca in ["ca", "other-ca"] {
        openssl(&[
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "2",
            "-subj",
            &format!("/CN=bank test {ca}"),
            "-keyout",
            &format!("{ca}.key"),
            "-out",
            &format!("{ca}.crt"),
        ]);
    }
    openssl(&[
        "req",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-subj",
        "/CN=localhost",
        "-keyout",
        "server.key",
        "-out",
        "server.csr",
    ]);
    fs::write(dir.join("san.ext"), "subjectAltName = DNS:localhost\n").unwrap();
    openssl(&[
        "x509",
        "-req",
        "-in",
        "server.csr",
        "-CA",
        "ca.crt",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-days",
        "2",
        "-extfile",
        "san.ext",
        "-out",
        "server.crt",
    ]);
    for (client, ca) in [("client", "ca"), ("other-client", "other-ca")] {
        openssl(&[
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-subj",
            "/CN=certroach",
            "-keyout",
            &format!("{client}.key"),
            "-out",
            &format!("{client}.csr"),
        ]);
        openssl(&[
            "x509",
            "-req",
            "-in",
            &format!("{client}.csr"),
            "-CA",
            &format!("{ca}.crt"),
            "-CAkey",
            &format!("{ca}.key"),
            "-CAcreateserial",
            "-days",
            "2",
            "-out",
            &format!("{client}.crt"),
        ]);
    }
    // PostgreSQL, and libpq, refuse a key others can read.
    for key in ["server.key", "client.key", "other-client.key"] {
        run(Command::new("chmod").arg("600").arg(dir.join(key)));
    }
}
