//! Which server answers, and the retry protocol that works on it.

/// Which server answered: the retry rules differ between them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Server {
    /// CockroachDB.
    CockroachDb,
    /// PostgreSQL, or anything else speaking its protocol.
    PostgreSql,
}

impl Server {
    /// The server that answers `SELECT version()` with `version`.
    pub fn from_version(version: &str) -> Self {
        if version.contains("CockroachDB") {
            Server::CockroachDb
        } else {
            Server::PostgreSql
        }
    }

    /// The retry protocol that works on this server.
    pub(crate) fn retry_protocol(self) -> Protocol {
        match self {
            Server::CockroachDb => Protocol::Savepoint,
            Server::PostgreSql => Protocol::Restart,
        }
    }
}

impl std::fmt::Display for Server {
    /// `cockroachdb` or `postgresql`, OpenTelemetry's `db.system.name`.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Server::CockroachDb => "cockroachdb",
            Server::PostgreSql => "postgresql",
        })
    }
}

/// How a transaction is framed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Protocol {
    /// `BEGIN` ... `COMMIT`; every retry is a new transaction.
    Restart,
    /// CockroachDB's client-side retry protocol: `SAVEPOINT cockroach_restart`
    /// after `BEGIN`, `ROLLBACK TO SAVEPOINT cockroach_restart` to retry at
    /// once in the same transaction, `RELEASE SAVEPOINT cockroach_restart` to
    /// commit. A rewound transaction "holds its place in line" between
    /// attempts, in CockroachDB's words
    /// (<https://www.cockroachlabs.com/docs/stable/advanced-client-side-transaction-retries>);
    /// it no longer raises its priority on each retry, which CockroachDB
    /// removed (cockroachdb/cockroach#117020).
    Savepoint,
}
