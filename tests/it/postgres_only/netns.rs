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

use std::path::PathBuf;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use bank::config::DbUrl;
use bank::db;
use diesel::connection::SimpleConnection;
use diesel::sql_types::{Integer, Nullable};
use diesel::PgConnection;

use crate::helpers::*;

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
    dir: PathBuf,
    bin: PathBuf,
}

impl NsServer {
    pub fn start() -> Self {
        let tag = format!("{:08x}", rand::random::<u32>());
        let server = Self {
            server_ns: format!("bks{tag}"),
            client_ns: format!("bkc{tag}"),
            link: format!("vs{tag}"),
            dir: tempdir().keep(),
            bin: pg_bindir(),
        };
        // From here on, Drop removes whatever was made.
        let (s, c) = (server.server_ns.as_str(), server.client_ns.as_str());
        ip(&["netns", "add", s]);
        ip(&["netns", "add", c]);
        let peer = format!("vc{tag}");
        ip(&[
            "-n",
            s,
            "link",
            "add",
            &server.link,
            "type",
            "veth",
            "peer",
            "name",
            &peer,
            "netns",
            c,
        ]);
        ip(&[
            "-n",
            s,
            "addr",
            "add",
            &format!("{SERVER_ADDR}/30"),
            "dev",
            &server.link,
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
        for (ns, dev) in [(s, "lo"), (c, "lo"), (s, server.link.as_str()), (c, &peer)] {
            ip(&["-n", ns, "link", "set", dev, "up"]);
        }

        let data = server.dir.join("data");
        run(Command::new("chown")
            .args(["-R", "postgres:"])
            .arg(&server.dir));
        run(as_postgres(&server.bin.join("initdb"))
            .arg("-D")
            .arg(&data)
            .args(["-U", "postgres", "--auth=trust", "--no-instructions"]));
        // fsync off: the OS keeps what a killed server wrote. Commits stay
        // synchronous: with synchronous_commit off, a crash restart loses
        // the last commits, and the tests would see accounts vanish (they
        // did, before this was on).
        let conf = format!(
            "\nlisten_addresses = '{SERVER_ADDR}'\nport = 5432\nunix_socket_directories = '{d}'\n\
             fsync = off\nmax_connections = 60\n",
            d = server.dir.display()
        );
        let path = data.join("postgresql.conf");
        let mut postgresql_conf = std::fs::read_to_string(&path).unwrap();
        postgresql_conf.push_str(&conf);
        std::fs::write(&path, postgresql_conf).unwrap();
        std::fs::write(
            data.join("pg_hba.conf"),
            format!("local all all trust\nhost all all {CLIENT_ADDR}/32 trust\n"),
        )
        .unwrap();
        server.pg_ctl(&["-l", &server.dir.join("log").to_string_lossy(), "start"]);
        server
            .admin("postgres")
            .batch_execute("CREATE DATABASE bank")
            .unwrap();
        db::run_migrations(&mut server.admin("bank")).expect("migrate");
        server
    }

    /// `pg_ctl` on this server, run inside its namespace; waits for it.
    fn pg_ctl(&self, args: &[&str]) {
        let mut cmd = Command::new("ip");
        cmd.args([
            "netns",
            "exec",
            &self.server_ns,
            "runuser",
            "-u",
            "postgres",
            "--",
        ])
        .arg(self.bin.join("pg_ctl"))
        .arg("-D")
        .arg(self.dir.join("data"))
        .args(["-w", "-t", "60"])
        .args(args)
        // pg_ctl's server inherits these; a pipe would keep the test's
        // output open for as long as the server runs.
        .stdout(Stdio::null())
        .stderr(Stdio::null());
        run(&mut cmd);
    }

    /// Restarts the server: `mode` is `immediate` (a crash: no backend
    /// finishes anything) or `fast` (backends told to end, then a clean
    /// shutdown).
    pub fn restart(&self, mode: &str) {
        self.pg_ctl(&["-m", mode, "restart"]);
    }

    /// The harness's own way in, through the Unix socket.
    pub fn admin_url(&self, database: &str) -> DbUrl {
        DbUrl::parse(&format!(
            "host={} port=5432 user=postgres dbname={database}",
            self.dir.display()
        ))
        .unwrap()
    }

    pub fn admin(&self, database: &str) -> PgConnection {
        db::establish(&self.admin_url(database)).expect("connect through the Unix socket")
    }

    /// The URL the program under test uses, from the client namespace.
    pub fn client_url(&self) -> String {
        format!("postgresql://postgres@{SERVER_ADDR}:5432/bank")
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
    pub fn spawn_bank(&self, args: &[&str]) -> Child {
        Command::new("ip")
            .args(["netns", "exec", &self.client_ns])
            .arg(env!("CARGO_BIN_EXE_bank"))
            .args(args)
            .current_dir(std::env::temp_dir())
            .env_remove("DATABASE_URL")
            .env_remove("RUST_LOG")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start bank in the client namespace")
    }

    /// The pid of a backend of database `bank` waiting for advisory lock
    /// 4242, looked for at most 400 times, 50 ms apart.
    pub fn backend_waiting_for_the_lock(&self, admin: &mut PgConnection) -> i32 {
        for _ in 0..400 {
            let pid: Option<i32> = scalar::<Nullable<Integer>, _>(
                admin,
                "(SELECT pid FROM pg_stat_activity WHERE datname = 'bank' \
                 AND wait_event_type = 'Lock' AND wait_event = 'advisory' LIMIT 1)",
            )
            .unwrap();
            if let Some(pid) = pid {
                return pid;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("no backend ever waited for the lock");
    }
}

impl Drop for NsServer {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args([
                "netns",
                "exec",
                &self.server_ns,
                "runuser",
                "-u",
                "postgres",
                "--",
            ])
            .arg(self.bin.join("pg_ctl"))
            .arg("-D")
            .arg(self.dir.join("data"))
            .args(["-m", "immediate", "-w", "stop"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
        // Deleting a namespace deletes the veth end in it, and so the pair.
        for ns in [&self.server_ns, &self.client_ns] {
            let _ = Command::new("ip").args(["netns", "del", ns]).status();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Waits for `child` to end by itself, `bound` at the most (then kills it);
/// returns its output, how long it ran since `began`, and whether it ended
/// by itself.
pub fn wait_bounded(mut child: Child, began: Instant, bound: Duration) -> (Output, Duration, bool) {
    let mut ended = false;
    while began.elapsed() < bound {
        if child.try_wait().unwrap().is_some() {
            ended = true;
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    if !ended {
        let _ = child.kill();
    }
    let took = began.elapsed();
    (child.wait_with_output().unwrap(), took, ended)
}
