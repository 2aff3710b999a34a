//! The decision table: from where an error came, what it means, the server,
//! the protocol and the unit's options, the next step. Pure, and tested row
//! by row; the crate docs print the same table.

use diesel::result::{DatabaseErrorKind, Error as DieselError};

use crate::{Isolation, Protocol, Server};

/// Where in an attempt an error came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Stage {
    /// `BEGIN` (and `SAVEPOINT cockroach_restart`), or getting a connection.
    Begin,
    /// The unit of work.
    Statement,
    /// `RELEASE SAVEPOINT cockroach_restart`.
    Release,
    /// `COMMIT`.
    Commit,
}

/// What an error means for a transaction.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Class {
    /// SQLSTATE 40001: the transaction did not commit; run it again.
    Conflict,
    /// The connection is gone.
    ConnectionLost,
    /// The server refused the data (constraint, read-only): running the same
    /// unit again would fail the same way.
    Definite,
    /// A prepared statement of the connection's was missing on the server
    /// (SQLSTATE 26000) or there already (42P05): a transaction-mode pooler
    /// (PgBouncer) gave this transaction another server session than the
    /// last one. The statement did not run; on a connection that no longer
    /// names its statements, the unit can run again.
    StaleStatement,
    /// SQLSTATE 25P02: the transaction is aborted, and the server ignores
    /// every statement until it ends. At the commit this means the unit
    /// caught a database error and returned `Ok`: nothing was committed
    /// (PostgreSQL would answer a plain `COMMIT` with `ROLLBACK`, and no
    /// error).
    Aborted,
    /// Anything else, 40003 ("result is ambiguous") among them: Diesel has no
    /// kind for it.
    Other,
    /// Not a database error: the unit's own (its error carries no
    /// `diesel::result::Error`). Running it again would refuse the same way.
    Domain,
}

/// Classifies by Diesel's `DatabaseErrorKind`, which Diesel derives from the
/// SQLSTATE, and, for the SQLSTATEs Diesel has no kind for, by the server's
/// message ([`by_message`]).
pub(crate) fn classify(err: &DieselError) -> Class {
    match err {
        DieselError::DatabaseError(kind, info) => match kind {
            DatabaseErrorKind::SerializationFailure => Class::Conflict,
            DatabaseErrorKind::ClosedConnection | DatabaseErrorKind::UnableToSendCommand => {
                Class::ConnectionLost
            }
            DatabaseErrorKind::UniqueViolation
            | DatabaseErrorKind::ForeignKeyViolation
            | DatabaseErrorKind::NotNullViolation
            | DatabaseErrorKind::CheckViolation
            | DatabaseErrorKind::RestrictViolation
            | DatabaseErrorKind::ExclusionViolation
            | DatabaseErrorKind::ReadOnlyTransaction => Class::Definite,
            _ => by_message(info.message()).unwrap_or(Class::Other),
        },
        // Diesel's word for "this connection's state is lost": only a new
        // connection helps.
        DieselError::BrokenTransactionManager => Class::ConnectionLost,
        // A failed COMMIT that Diesel could not roll back either: the COMMIT's
        // own error says what happened to the transaction.
        DieselError::RollbackErrorOnCommit { commit_error, .. } => classify(commit_error),
        _ => Class::Other,
    }
}

/// The class of a server error whose SQLSTATE Diesel maps to no kind (and
/// does not expose), read from the message's start: the one place the
/// helper reads message text. The messages are PostgreSQL's and
/// CockroachDB's in English; a PostgreSQL whose `lc_messages` translates
/// them gets `None` here, and the error is read as "other" (not retried),
/// the safe side.
///
/// - 40P01, `deadlock detected`: PostgreSQL aborted this transaction to
///   break a lock cycle; its docs advise retrying it like a serialization
///   failure. A conflict. (CockroachDB breaks cycles with 40001.)
/// - 57P01 (`terminating connection due to administrator command`, and
///   CockroachDB's `server is shutting down` when a node drains), 57P02
///   (`terminating connection because of crash of another server
///   process`), the other `terminating connection ...` (idle timeouts,
///   recovery conflicts), and 57P03 (`the database system is starting up`,
///   `... shutting down`, `... in recovery mode`, `... not yet accepting
///   connections`): the server ends this session. The connection is lost,
///   whether or not libpq has read the end of the stream yet.
/// - 25P02, `current transaction is aborted, commands ignored until end of
///   transaction block`: [`Class::Aborted`].
/// - 26000 (`prepared statement "name" does not exist`), 42P05 (`...
///   already exists`), or a Bind whose parameters do not fit the statement
///   of that name (08P01, `bind message supplies 2 parameters, but prepared
///   statement "name" requires 9`): [`Class::StaleStatement`].
pub(crate) fn by_message(message: &str) -> Option<Class> {
    const LOST: [&str; 4] = [
        "terminating connection ",
        "the database system is ",
        "server is shutting down",
        "server is not accepting clients",
    ];
    if message.starts_with("deadlock detected") {
        Some(Class::Conflict)
    } else if LOST.iter().any(|start| message.starts_with(start)) {
        Some(Class::ConnectionLost)
    } else if message.starts_with("current transaction is aborted") {
        Some(Class::Aborted)
    } else if (message.starts_with("prepared statement \"")
        && (message.ends_with("\" does not exist") || message.ends_with("\" already exists")))
        || (message.starts_with("bind message supplies ")
            && message.contains(" parameters, but prepared statement \""))
    {
        Some(Class::StaleStatement)
    } else {
        None
    }
}

/// Which statement failed when `RELEASE SAVEPOINT cockroach_restart;
/// COMMIT`, sent as one message, returned an error, given what libpq knows
/// of the transaction afterwards (`open_after`: `Some(true)` still open,
/// `Some(false)` closed, `None` unknown).
///
/// On CockroachDB it is the RELEASE, whatever libpq says: CockroachDB's docs
/// do not say in which state a non-retry error at RELEASE leaves the
/// session, and a successful RELEASE is the commit, so a COMMIT that fails
/// after it changes nothing. Reading an error of the COMMIT as the
/// RELEASE's reports a committed transaction as ambiguous (never wrong);
/// the other way round would report a transaction that did not commit as
/// committed. On PostgreSQL the session's state after each error is
/// documented: a failed RELEASE leaves the (aborted) transaction open, a
/// failed COMMIT ends it; unknown (tokio-postgres does not report it), the
/// COMMIT's, where an error of no known class reads as ambiguous rather
/// than as "nothing committed".
pub(crate) fn failed_at_savepoint_commit(server: Server, open_after: Option<bool>) -> Stage {
    match (server, open_after) {
        (Server::PostgreSql, Some(false) | None) => Stage::Commit,
        _ => Stage::Release,
    }
}

/// What the helper does after a failure; the module docs describe each.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Step {
    /// Roll back to the restart savepoint and run the unit again at once.
    Rewind,
    /// Roll the transaction back, wait, begin again.
    Restart,
    /// Drop the connection, wait, run again on a fresh one.
    Reconnect,
    /// The transaction committed; return the unit's value.
    Committed,
    /// Report [`TxError::AmbiguousCommit`](crate::TxError::AmbiguousCommit).
    Ambiguous,
    /// Roll back and return the error.
    Fail,
}

/// Everything the next step depends on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Situation {
    /// Where the error came from.
    pub(crate) stage: Stage,
    /// What the error means.
    pub(crate) class: Class,
    /// The server.
    pub(crate) server: Server,
    /// The helper's protocol (what frames the transaction is
    /// [`framing`] of it and the isolation).
    pub(crate) protocol: Protocol,
    /// The isolation level the transaction asked for.
    pub(crate) isolation: Isolation,
    /// Whether the unit may be applied twice.
    pub(crate) idempotent: bool,
    /// Whether an earlier attempt's commit is in doubt, not yet resolved by
    /// the unit (see [`Context`](crate::Context)).
    pub(crate) in_doubt: bool,
    /// Whether the next retry waits first (its backoff delay is not zero).
    pub(crate) waits: bool,
    /// Whether another connection can be had (a pool, not the caller's own).
    pub(crate) replaceable: bool,
}

/// How a transaction at `isolation` is framed by a helper whose protocol is
/// `protocol`: the savepoint protocol under SERIALIZABLE only. Under READ
/// COMMITTED, CockroachDB cannot yet recover from a retry error by rolling
/// back to a savepoint (cockroachdb/cockroach#104233, open), and it retries
/// each statement itself; there every retry the client makes is a new
/// transaction.
pub(crate) fn framing(protocol: Protocol, isolation: Isolation) -> Protocol {
    match isolation {
        Isolation::Serializable => protocol,
        _ => Protocol::Restart,
    }
}

/// Whether the failure in `s` leaves this attempt's commit in doubt: the
/// commit was sent and no verdict came back. The helper retries an
/// idempotent unit after it and keeps the call in doubt until the unit
/// resolves it.
pub(crate) fn commit_in_doubt(s: &Situation) -> bool {
    // Where the commit happens: the RELEASE on CockroachDB with the
    // savepoint protocol, the COMMIT everywhere else.
    let framed = framing(s.protocol, s.isolation);
    let class = match s.class {
        // Never a COMMIT's (it is not prepared); read as "other" anywhere.
        Class::StaleStatement => Class::Other,
        class => class,
    };
    let commit_stage = if s.server == Server::CockroachDb && framed == Protocol::Savepoint {
        Stage::Release
    } else {
        Stage::Commit
    };
    matches!(class, Class::ConnectionLost | Class::Other)
        && (s.stage == commit_stage
            || (s.stage == Stage::Release && class == Class::ConnectionLost))
}

/// The decision table of the module docs, as code.
pub(crate) fn decide(s: &Situation) -> Step {
    let step = decide_alone(s);
    if !s.in_doubt {
        return step;
    }
    // After a commit in doubt nothing may be reported as "not committed":
    // the earlier attempt may have been. A database error before the commit
    // (the retry timed out waiting for the earlier transaction's locks, say)
    // is retried within the budgets; anything else ends in doubt.
    match (step, s.class, s.stage) {
        (Step::Fail, Class::Other, Stage::Begin | Stage::Statement) => Step::Restart,
        (Step::Fail, _, _) => Step::Ambiguous,
        (step, _, _) => step,
    }
}

/// The table for an attempt with no commit in doubt before it.
fn decide_alone(s: &Situation) -> Step {
    // Before the commit nothing ran: begin again on the same connection,
    // which the helper has switched to unnamed statements. Anywhere else it
    // cannot come from a pooler, and reads as "other".
    let s = &match (s.class, s.stage) {
        (Class::StaleStatement, Stage::Begin | Stage::Statement) => return Step::Restart,
        (Class::StaleStatement, _) => Situation {
            class: Class::Other,
            ..*s
        },
        _ => *s,
    };
    let cockroach = s.server == Server::CockroachDb;
    let savepoint = framing(s.protocol, s.isolation) == Protocol::Savepoint;
    // On CockroachDB with the savepoint protocol the RELEASE was the commit;
    // the COMMIT after it only readies the session.
    if cockroach && savepoint && s.stage == Stage::Commit {
        return Step::Committed;
    }
    let reconnect_or = |otherwise| {
        if s.replaceable {
            Step::Reconnect
        } else {
            otherwise
        }
    };
    match s.class {
        Class::Definite => Step::Fail,
        Class::Conflict => {
            let can_rewind =
                cockroach && savepoint && matches!(s.stage, Stage::Statement | Stage::Release);
            if can_rewind && !s.waits {
                Step::Rewind
            } else {
                Step::Restart
            }
        }
        // The commit was sent and no verdict came back. With the savepoint
        // protocol the COMMIT travels with the RELEASE, so a connection lost
        // there is in doubt on PostgreSQL too.
        Class::ConnectionLost | Class::Other if commit_in_doubt(s) => {
            match (s.idempotent, s.class) {
                (false, _) => Step::Ambiguous,
                (true, Class::ConnectionLost) => reconnect_or(Step::Ambiguous),
                (true, _) => Step::Restart,
            }
        }
        // Nothing was committed: the server drops a dead connection's
        // transaction.
        Class::ConnectionLost => reconnect_or(Step::Fail),
        // At the commit: nothing committed, the unit swallowed the error
        // that aborted the transaction; running it again would do the same.
        Class::Aborted | Class::Domain | Class::Other | Class::StaleStatement => Step::Fail,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Protocol, Server};

    #[test]
    fn messages_name_the_classes_diesel_has_no_kind_for() {
        for (message, class) in [
            ("deadlock detected", Some(Class::Conflict)),
            (
                "terminating connection due to administrator command",
                Some(Class::ConnectionLost),
            ),
            (
                "terminating connection because of crash of another server process",
                Some(Class::ConnectionLost),
            ),
            (
                "terminating connection due to idle-in-transaction timeout",
                Some(Class::ConnectionLost),
            ),
            (
                "the database system is shutting down",
                Some(Class::ConnectionLost),
            ),
            (
                "the database system is starting up",
                Some(Class::ConnectionLost),
            ),
            ("server is shutting down", Some(Class::ConnectionLost)),
            (
                "current transaction is aborted, commands ignored until end of transaction block",
                Some(Class::Aborted),
            ),
            (
                "prepared statement \"__diesel_stmt_1\" does not exist",
                Some(Class::StaleStatement),
            ),
            ("relation \"accounts\" does not exist", None),
            ("result is ambiguous (error=rpc error)", None),
            // Not the server's own start: a quoted message, say.
            ("error: deadlock detected", None),
        ] {
            assert_eq!(by_message(message), class, "{message}");
        }
    }

    #[test]
    fn an_error_of_the_savepoint_commit_is_the_releases_on_cockroachdb_whatever_libpq_says() {
        for open_after in [Some(true), Some(false), None] {
            assert_eq!(
                failed_at_savepoint_commit(Server::CockroachDb, open_after),
                Stage::Release
            );
        }
        // PostgreSQL documents the state after each: a failed RELEASE
        // leaves the transaction open, a failed COMMIT ends it.
        assert_eq!(
            failed_at_savepoint_commit(Server::PostgreSql, Some(true)),
            Stage::Release
        );
        assert_eq!(
            failed_at_savepoint_commit(Server::PostgreSql, Some(false)),
            Stage::Commit
        );
        // Unknown (the async front end, whose driver does not say): the
        // COMMIT's, where "other" reads as ambiguous, the safe side.
        assert_eq!(
            failed_at_savepoint_commit(Server::PostgreSql, None),
            Stage::Commit
        );
    }

    #[test]
    fn serialization_failures_are_conflicts_and_constraints_are_definite() {
        let err = |kind| DieselError::DatabaseError(kind, Box::new(String::from("x")));
        assert_eq!(
            classify(&err(DatabaseErrorKind::SerializationFailure)),
            Class::Conflict
        );
        assert_eq!(
            classify(&err(DatabaseErrorKind::ClosedConnection)),
            Class::ConnectionLost
        );
        assert_eq!(
            classify(&DieselError::BrokenTransactionManager),
            Class::ConnectionLost
        );
        assert_eq!(
            classify(&err(DatabaseErrorKind::CheckViolation)),
            Class::Definite
        );
        assert_eq!(
            classify(&err(DatabaseErrorKind::ReadOnlyTransaction)),
            Class::Definite
        );
        assert_eq!(classify(&err(DatabaseErrorKind::Unknown)), Class::Other);
        let said = |message: &str| {
            DieselError::DatabaseError(DatabaseErrorKind::Unknown, Box::new(message.to_owned()))
        };
        for stale in [
            "prepared statement \"__diesel_stmt_1\" does not exist",
            "prepared statement \"__diesel_stmt_0\" already exists",
            "bind message supplies 2 parameters, but prepared statement \"__diesel_stmt_1\" requires 9",
        ] {
            assert_eq!(classify(&said(stale)), Class::StaleStatement, "{stale}");
        }
        for other in [
            "relation \"accounts\" does not exist",
            "prepared statement \"x\" is in use",
        ] {
            assert_eq!(classify(&said(other)), Class::Other, "{other}");
        }
        assert_eq!(classify(&DieselError::NotFound), Class::Other);
    }

    // The decision table, row by row. Each row is checked for every
    // combination of the inputs it leaves open.

    const STAGES: [Stage; 4] = [
        Stage::Begin,
        Stage::Statement,
        Stage::Release,
        Stage::Commit,
    ];
    const CLASSES: [Class; 7] = [
        Class::Conflict,
        Class::ConnectionLost,
        Class::Definite,
        Class::Other,
        Class::StaleStatement,
        Class::Aborted,
        Class::Domain,
    ];
    type Setup = (Server, Protocol, Isolation);
    const SER: Isolation = Isolation::Serializable;
    const RC: Isolation = Isolation::ReadCommitted;
    const CRDB: Setup = (Server::CockroachDb, Protocol::Savepoint, SER);
    const CRDB_RESTART: Setup = (Server::CockroachDb, Protocol::Restart, SER);
    const PG: Setup = (Server::PostgreSql, Protocol::Restart, SER);
    const PG_SAVEPOINT: Setup = (Server::PostgreSql, Protocol::Savepoint, SER);
    /// READ COMMITTED with each helper protocol: the transaction is framed
    /// with BEGIN ... COMMIT whatever the protocol.
    const RC_SETUPS: [Setup; 4] = [
        (Server::CockroachDb, Protocol::Savepoint, RC),
        (Server::CockroachDb, Protocol::Restart, RC),
        (Server::PostgreSql, Protocol::Restart, RC),
        (Server::PostgreSql, Protocol::Savepoint, RC),
    ];
    const SETUPS: [Setup; 8] = [
        CRDB,
        CRDB_RESTART,
        PG,
        PG_SAVEPOINT,
        RC_SETUPS[0],
        RC_SETUPS[1],
        RC_SETUPS[2],
        RC_SETUPS[3],
    ];
    /// Every setup but CockroachDB's savepoint protocol at SERIALIZABLE,
    /// where the RELEASE is the commit.
    const NOT_CRDB: [Setup; 7] = [
        CRDB_RESTART,
        PG,
        PG_SAVEPOINT,
        RC_SETUPS[0],
        RC_SETUPS[1],
        RC_SETUPS[2],
        RC_SETUPS[3],
    ];

    /// Every situation with these stages, classes and setups, in every
    /// combination of the three flags.
    fn situations(stages: &[Stage], classes: &[Class], setups: &[Setup]) -> Vec<Situation> {
        let mut all = Vec::new();
        for &stage in stages {
            for &class in classes {
                for &(server, protocol, isolation) in setups {
                    for flags in 0..8u8 {
                        all.push(Situation {
                            stage,
                            class,
                            server,
                            protocol,
                            isolation,
                            in_doubt: false,
                            idempotent: flags & 1 != 0,
                            waits: flags & 2 != 0,
                            replaceable: flags & 4 != 0,
                        });
                    }
                }
            }
        }
        all
    }

    fn reconnect_or_fail(s: &Situation) -> Step {
        if s.replaceable {
            Step::Reconnect
        } else {
            Step::Fail
        }
    }

    fn rewind_unless_waiting(s: &Situation) -> Step {
        if s.waits {
            Step::Restart
        } else {
            Step::Rewind
        }
    }

    fn ambiguous_unless_idempotent(s: &Situation) -> Step {
        let class = match s.class {
            Class::StaleStatement => Class::Other,
            class => class,
        };
        match (s.idempotent, class, s.replaceable) {
            (false, _, _) => Step::Ambiguous,
            (true, Class::ConnectionLost, true) => Step::Reconnect,
            (true, Class::ConnectionLost, false) => Step::Ambiguous,
            (true, _, _) => Step::Restart,
        }
    }

    struct Row {
        /// The docs' row this entry checks (spaces collapsed).
        doc: &'static str,
        stages: &'static [Stage],
        classes: &'static [Class],
        setups: &'static [Setup],
        expect: fn(&Situation) -> Step,
    }

    /// The crate docs' table in the same order, each entry naming its row
    /// there; a row is split in two where the code's inputs need it (the
    /// first, to leave out a commit on CockroachDB, which the "committed"
    /// row covers; READ COMMITTED's rows, by their setups).
    const ROWS: [Row; 19] = [
        Row {
            doc: "| any (but a commit on CockroachDB, below) | definite, aborted, domain | any | fail (at the commit, aborted: [`TxError::SwallowedError`]) |",
            stages: &STAGES,
            classes: &[Class::Definite, Class::Aborted, Class::Domain],
            setups: &NOT_CRDB,
            expect: |_| Step::Fail,
        },
        // (the same row on CockroachDB, where the RELEASE was the commit)
        Row {
            doc: "| any (but a commit on CockroachDB, below) | definite, aborted, domain | any | fail (at the commit, aborted: [`TxError::SwallowedError`]) |",
            stages: &[Stage::Begin, Stage::Statement, Stage::Release],
            classes: &[Class::Definite, Class::Aborted, Class::Domain],
            setups: &[CRDB],
            expect: |_| Step::Fail,
        },
        Row {
            doc: "| begin | conflict | any | restart |",
            stages: &[Stage::Begin],
            classes: &[Class::Conflict],
            setups: &SETUPS,
            expect: |_| Step::Restart,
        },
        Row {
            doc: "| begin, statement | lost | any | reconnect; fail if the connection is the caller's |",
            stages: &[Stage::Begin, Stage::Statement],
            classes: &[Class::ConnectionLost],
            setups: &SETUPS,
            expect: reconnect_or_fail,
        },
        Row {
            doc: "| begin, statement | other | any | fail |",
            stages: &[Stage::Begin, Stage::Statement],
            classes: &[Class::Other],
            setups: &SETUPS,
            expect: |_| Step::Fail,
        },
        // A pooler moved the connection between server sessions: nothing
        // ran; begin again (never a rewind, which would keep the session).
        Row {
            doc: "| begin, statement | stale statement | any | restart, statements unnamed |",
            stages: &[Stage::Begin, Stage::Statement],
            classes: &[Class::StaleStatement],
            setups: &SETUPS,
            expect: |_| Step::Restart,
        },
        Row {
            doc: "| statement | conflict | CockroachDB, savepoint | rewind if the retry would not wait, else restart |",
            stages: &[Stage::Statement],
            classes: &[Class::Conflict],
            setups: &[CRDB],
            expect: rewind_unless_waiting,
        },
        Row {
            doc: "| statement | conflict | otherwise (READ COMMITTED included) | restart |",
            stages: &[Stage::Statement],
            classes: &[Class::Conflict],
            setups: &[CRDB_RESTART, PG, PG_SAVEPOINT],
            expect: |_| Step::Restart,
        },
        // READ COMMITTED: a 40001 that reaches the client (a deadlock broken
        // by aborting this transaction, the server's own statement retries
        // exhausted) restarts it, on CockroachDB too: never a rewind.
        Row {
            doc: "| statement | conflict | otherwise (READ COMMITTED included) | restart |",
            stages: &[Stage::Statement],
            classes: &[Class::Conflict],
            setups: &RC_SETUPS,
            expect: |_| Step::Restart,
        },
        Row {
            doc: "| release | conflict | CockroachDB | rewind if the retry would not wait, else restart |",
            stages: &[Stage::Release],
            classes: &[Class::Conflict],
            setups: &[CRDB],
            expect: rewind_unless_waiting,
        },
        Row {
            doc: "| release | conflict | PostgreSQL | restart |",
            stages: &[Stage::Release],
            classes: &[Class::Conflict],
            setups: &[PG_SAVEPOINT],
            expect: |_| Step::Restart,
        },
        Row {
            doc: "| release | lost | any | ambiguous; if idempotent: reconnect |",
            stages: &[Stage::Release],
            classes: &[Class::ConnectionLost],
            setups: &[CRDB, PG_SAVEPOINT],
            expect: ambiguous_unless_idempotent,
        },
        Row {
            doc: "| release | other | PostgreSQL | fail |",
            stages: &[Stage::Release],
            classes: &[Class::Other, Class::StaleStatement],
            setups: &[PG_SAVEPOINT],
            expect: |_| Step::Fail,
        },
        Row {
            doc: "| release | other | CockroachDB | ambiguous; if idempotent: restart |",
            stages: &[Stage::Release],
            classes: &[Class::Other, Class::StaleStatement],
            setups: &[CRDB],
            expect: ambiguous_unless_idempotent,
        },
        Row {
            doc: "| commit | any | CockroachDB, savepoint | committed |",
            stages: &[Stage::Commit],
            classes: &CLASSES,
            setups: &[CRDB],
            expect: |_| Step::Committed,
        },
        Row {
            doc: "| commit | conflict | otherwise (READ COMMITTED included) | restart |",
            stages: &[Stage::Commit],
            classes: &[Class::Conflict],
            setups: &[CRDB_RESTART, PG, PG_SAVEPOINT],
            expect: |_| Step::Restart,
        },
        Row {
            doc: "| commit | lost, other | otherwise (READ COMMITTED included) | ambiguous; if idempotent: reconnect (lost) or restart (other) |",
            stages: &[Stage::Commit],
            classes: &[Class::ConnectionLost, Class::Other, Class::StaleStatement],
            setups: &[CRDB_RESTART, PG, PG_SAVEPOINT],
            expect: ambiguous_unless_idempotent,
        },
        // READ COMMITTED: the COMMIT is the commit, on CockroachDB too (no
        // RELEASE was sent), so its conflict restarts and its silence is in
        // doubt, as with the restart protocol.
        Row {
            doc: "| commit | conflict | otherwise (READ COMMITTED included) | restart |",
            stages: &[Stage::Commit],
            classes: &[Class::Conflict],
            setups: &RC_SETUPS,
            expect: |_| Step::Restart,
        },
        Row {
            doc: "| commit | lost, other | otherwise (READ COMMITTED included) | ambiguous; if idempotent: reconnect (lost) or restart (other) |",
            stages: &[Stage::Commit],
            classes: &[Class::ConnectionLost, Class::Other, Class::StaleStatement],
            setups: &RC_SETUPS,
            expect: ambiguous_unless_idempotent,
        },
    ];

    /// A RELEASE is only sent when the savepoint protocol frames the
    /// transaction.
    fn possible(s: &Situation) -> bool {
        s.stage != Stage::Release || framing(s.protocol, s.isolation) == Protocol::Savepoint
    }

    fn all_rows() -> impl Iterator<Item = (usize, &'static Row)> {
        ROWS.iter().enumerate()
    }

    /// After a commit in doubt: every step the table would take stays,
    /// except that nothing ends as "failed, nothing committed".
    #[test]
    fn after_a_commit_in_doubt_no_failure_says_nothing_committed() {
        for alone in situations(&STAGES, &CLASSES, &SETUPS)
            .into_iter()
            .filter(possible)
        {
            let s = Situation {
                in_doubt: true,
                ..alone
            };
            let expected = match (decide(&alone), s.class, s.stage) {
                // The row this adds: a database error before the commit is
                // retried (the retry may have waited on the earlier
                // attempt's locks until its statement bound).
                (Step::Fail, Class::Other, Stage::Begin | Stage::Statement) => Step::Restart,
                // And this one: any other failure stays in doubt.
                (Step::Fail, _, _) => Step::Ambiguous,
                (step, _, _) => step,
            };
            assert_eq!(decide(&s), expected, "{s:?}");
            assert_ne!(decide(&s), Step::Fail, "{s:?}");
        }
    }

    #[test]
    fn a_commit_is_in_doubt_only_where_it_was_sent_and_no_verdict_came() {
        for s in situations(&STAGES, &CLASSES, &SETUPS)
            .into_iter()
            .filter(possible)
        {
            let sent = match framing(s.protocol, s.isolation) {
                Protocol::Savepoint if s.server == Server::CockroachDb => s.stage == Stage::Release,
                // The RELEASE travels with the COMMIT: a lost connection
                // there may have taken the COMMIT with it.
                Protocol::Savepoint => {
                    s.stage == Stage::Commit
                        || (s.stage == Stage::Release && s.class == Class::ConnectionLost)
                }
                Protocol::Restart => s.stage == Stage::Commit,
            };
            let unknown = matches!(
                s.class,
                Class::ConnectionLost | Class::Other | Class::StaleStatement
            );
            assert_eq!(commit_in_doubt(&s), sent && unknown, "{s:?}");
        }
    }

    #[test]
    fn read_committed_is_framed_with_begin_and_commit_on_every_server() {
        for protocol in [Protocol::Savepoint, Protocol::Restart] {
            assert_eq!(
                framing(protocol, Isolation::ReadCommitted),
                Protocol::Restart
            );
            assert_eq!(framing(protocol, Isolation::Serializable), protocol);
        }
    }

    #[test]
    fn every_row_of_the_table_holds_for_every_situation_it_covers() {
        for (number, row) in all_rows() {
            let covered: Vec<Situation> = situations(row.stages, row.classes, row.setups)
                .into_iter()
                .filter(possible)
                .collect();
            assert!(!covered.is_empty(), "row {} covers nothing", number + 1);
            for s in covered {
                assert_eq!(decide(&s), (row.expect)(&s), "row {}: {s:?}", number + 1);
            }
        }
    }

    /// The table in the crate docs (lib.rs) is this one, row for row.
    #[test]
    fn the_docs_print_the_table_the_tests_check() {
        let lib = include_str!("lib.rs");
        let lines: Vec<&str> = lib.lines().collect();
        let header = lines
            .iter()
            .position(|l| l.starts_with("//! | stage "))
            .expect("the docs' table");
        let printed: Vec<String> = lines[header + 2..]
            .iter()
            .take_while(|l| l.starts_with("//! |"))
            .map(|l| {
                l["//! ".len()..]
                    .split_whitespace()
                    .collect::<Vec<_>>()
                    .join(" ")
            })
            .collect();
        // Each docs' row once, in the order the entries first name it.
        let mut checked: Vec<String> = Vec::new();
        for row in &ROWS {
            if !checked.iter().any(|doc| doc == row.doc) {
                checked.push(row.doc.to_owned());
            }
        }
        assert_eq!(printed, checked);
    }

    #[test]
    fn the_rows_cover_every_situation_exactly_once() {
        for s in situations(&STAGES, &CLASSES, &SETUPS)
            .into_iter()
            .filter(possible)
        {
            let rows: Vec<usize> = all_rows()
                .filter(|(_, row)| {
                    row.stages.contains(&s.stage)
                        && row.classes.contains(&s.class)
                        && row.setups.contains(&(s.server, s.protocol, s.isolation))
                })
                .map(|(number, _)| number + 1)
                .collect();
            assert_eq!(rows.len(), 1, "{s:?} is covered by rows {rows:?}");
        }
    }

    #[test]
    fn no_step_breaks_the_rules_behind_the_table() {
        for s in situations(&STAGES, &CLASSES, &SETUPS) {
            let step = decide(&s);
            if step == Step::Rewind {
                assert!(
                    (s.server, s.protocol, s.isolation) == CRDB && !s.waits,
                    "{s:?}"
                );
            }
            if step == Step::Reconnect {
                assert!(s.replaceable, "{s:?}");
            }
            if step == Step::Committed {
                assert!(s.stage == Stage::Commit && (s.server, s.protocol, s.isolation) == CRDB);
            }
            if step == Step::Ambiguous {
                // Only where the commit was sent: the COMMIT, or the
                // RELEASE that carries it.
                assert!(matches!(s.stage, Stage::Release | Stage::Commit), "{s:?}");
            }
        }
    }
}
