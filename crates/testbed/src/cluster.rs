//! A private PostgreSQL cluster for the tests that need a server of their
//! own (TLS-only, inside a network namespace, or the test process's own when
//! no `DATABASE_URL` is given): one launcher, so that they all start,
//! configure and stop it the same way. `./dev test` starts the suite's
//! shared server in shell, beside it.
//!
//! initdb and postgres refuse to run as root, so a root caller runs them as
//! the postgres user; the cluster's directory is removed when it stops.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{ChildStdin, Command, Output, Stdio};
use std::sync::{Mutex, OnceLock};

use crate::process::{as_postgres, is_root, pg_bindir, run, tempdir};

/// One cluster: its directory (data in `data/`, the log in `log`, the Unix
/// socket in the directory itself) and, if it runs in one, its namespace.
pub struct Cluster {
    pub dir: PathBuf,
    bin: PathBuf,
    netns: Option<String>,
}

impl Cluster {
    /// Runs initdb (superuser `postgres`, with `initdb_args` added) in a
    /// new directory owned by the postgres user. `prepare` may write files
    /// into the directory first (keys, a password file), which the
    /// arguments may name by relative paths.
    pub fn init(initdb_args: &[&str], prepare: impl FnOnce(&Path)) -> Self {
        let cluster = Self {
            dir: tempdir().keep(),
            bin: pg_bindir(),
            netns: None,
        };
        prepare(&cluster.dir);
        run(Command::new("chown")
            .args(["-R", "postgres:"])
            .arg(&cluster.dir));
        run(as_postgres(&cluster.bin.join("initdb"))
            .arg("-D")
            .arg(cluster.data())
            .args(["-U", "postgres", "--no-instructions"])
            .args(initdb_args)
            // Relative paths in the arguments name the cluster's files.
            .current_dir(&cluster.dir));
        cluster
    }

    /// A cluster that trusts every local and host connection
    /// (`initdb --auth=trust`), copied from one made once per test process:
    /// a copy takes a fraction of initdb's time. The template is removed
    /// when the process exits (see [`Cluster::stop_when_this_process_exits`]).
    pub fn trusting() -> Self {
        static TEMPLATE: OnceLock<(PathBuf, Mutex<ChildStdin>)> = OnceLock::new();
        let (template, _) = TEMPLATE.get_or_init(|| {
            let template = Self::init(&["--auth=trust"], |_| {});
            let data = template.data();
            (data, Mutex::new(template.remove_when_this_process_exits()))
        });
        let cluster = Self {
            dir: tempdir().keep(),
            bin: pg_bindir(),
            netns: None,
        };
        run(Command::new("cp")
            .arg("-a")
            .arg(template)
            .arg(cluster.data()));
        run(Command::new("chown")
            .args(["-R", "postgres:"])
            .arg(&cluster.dir));
        cluster
    }

    /// Runs the server inside network namespace `netns` from now on.
    pub fn in_netns(mut self, netns: &str) -> Self {
        self.netns = Some(netns.to_owned());
        self
    }

    /// The data directory.
    pub fn data(&self) -> PathBuf {
        self.dir.join("data")
    }

    /// Appends `conf` to postgresql.conf (the socket goes in the cluster's
    /// directory) and replaces pg_hba.conf with `hba`.
    pub fn configure(&self, conf: &str, hba: &str) {
        let path = self.data().join("postgresql.conf");
        let mut text = fs::read_to_string(&path).expect("postgresql.conf");
        text.push_str(&format!(
            "\nunix_socket_directories = '{}'\n{conf}\n",
            self.dir.display()
        ));
        fs::write(&path, text).expect("write postgresql.conf");
        fs::write(self.data().join("pg_hba.conf"), hba).expect("write pg_hba.conf");
    }

    /// `pg_ctl ARGS` as the postgres user (in the namespace, if any),
    /// waiting at most 60 s; its output is discarded, since the server it
    /// starts inherits it and a pipe would stay open as long as it runs.
    fn pg_ctl(&self, args: &[&str]) -> bool {
        let mut cmd = match &self.netns {
            Some(ns) => {
                let mut cmd = Command::new("ip");
                cmd.args(["netns", "exec", ns, "runuser", "-u", "postgres", "--"])
                    .arg(self.bin.join("pg_ctl"));
                cmd
            }
            None => as_postgres(&self.bin.join("pg_ctl")),
        };
        cmd.arg("-D")
            .arg(self.data())
            .arg("-l")
            .arg(self.dir.join("log"))
            .args(["-w", "-t", "60"])
            .args(args)
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        cmd.status()
            .unwrap_or_else(|e| panic!("{cmd:?}: {e}"))
            .success()
    }

    /// Starts the server, which must come up.
    pub fn start(&self) {
        assert!(
            self.pg_ctl(&["start"]),
            "the server did not start: {}",
            self.log()
        );
    }

    /// Starts the server on a random port below the kernel's ephemeral range
    /// (so no client socket holds it), trying another when that one is taken:
    /// a port probed free and handed over could be taken in between by a
    /// parallel test. Returns the port.
    pub fn start_on_some_port(&self) -> u16 {
        for _ in 0..5 {
            let port: u16 = rand::random_range(10_000..20_000);
            if self.pg_ctl(&["-o", &format!("-p {port}"), "start"]) {
                return port;
            }
            assert!(
                self.log().contains("could not bind"),
                "the server did not start: {}",
                self.log()
            );
        }
        panic!("no free port in 5 tries: {}", self.log());
    }

    /// `pg_ctl restart -m MODE`: `immediate` (a crash) or `fast`.
    pub fn restart(&self, mode: &str) {
        assert!(
            self.pg_ctl(&["-m", mode, "restart"]),
            "restart: {}",
            self.log()
        );
    }

    /// What the server logged so far.
    pub fn log(&self) -> String {
        fs::read_to_string(self.dir.join("log")).unwrap_or_default()
    }

    /// Conninfo for the harness's own way in, through the Unix socket.
    pub fn socket_conninfo(&self, port: u16, database: &str) -> String {
        format!(
            "host={} port={port} user=postgres dbname={database}",
            self.dir.display()
        )
    }

    /// SQL through psql as the superuser, over the Unix socket; returns
    /// what it printed, unaligned.
    pub fn psql(&self, port: u16, database: &str, args: &[&str]) -> Output {
        run(Command::new("psql")
            .args(["-X", "-q", "-At", "-v", "ON_ERROR_STOP=1"])
            .args(args)
            .arg(self.socket_conninfo(port, database)))
    }

    /// For a cluster shared by a whole test binary, which no test drops: a
    /// guardian process stops it and removes its directory once the test
    /// process has exited, however it exits. It waits for the end of a pipe
    /// from this process (the kernel closes it at exit), so it needs no
    /// timer and no signal.
    pub fn stop_when_this_process_exits(self) -> ChildStdin {
        let as_postgres = if is_root() {
            "runuser -u postgres -- "
        } else {
            ""
        };
        let stop = format!(
            "{as_postgres}'{}' -D '{}' -m immediate -w stop",
            self.bin.join("pg_ctl").display(),
            self.data().display(),
        );
        self.guard(&stop)
    }

    /// The same for a cluster that never ran (a template): its directory
    /// is removed once the test process has exited.
    pub fn remove_when_this_process_exits(self) -> ChildStdin {
        self.guard("true")
    }

    /// Starts the guardian that runs `stop`, then removes the directory.
    // Never waited for: it is meant to outlive this process.
    #[allow(clippy::zombie_processes)]
    fn guard(self, stop: &str) -> ChildStdin {
        let script = format!("cat >/dev/null; {stop}; rm -rf '{}'", self.dir.display());
        let mut guardian = Command::new("sh")
            .args(["-c", &script])
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start the guardian");
        let pipe = guardian.stdin.take().expect("the guardian's stdin");
        // The guardian outlives this process on purpose; its Drop must not
        // stop the server now.
        std::mem::forget(self);
        pipe
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        self.pg_ctl(&["-m", "immediate", "stop"]);
        if !std::thread::panicking() {
            let _ = fs::remove_dir_all(&self.dir);
        }
    }
}
