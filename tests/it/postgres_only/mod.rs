//! Tests that need PostgreSQL: fault injection with PL/pgSQL, backends
//! terminated with `pg_terminate_backend`, `pg_stat_activity`, and the
//! command line's PostgreSQL-only refusals. `./dev test-cockroach` skips
//! them by this module's name.

mod bounded_waits;
mod cockroach_behaviours;
mod commits_in_doubt;
mod connection_lifetime;
mod connection_strings;
mod jepsen;
mod main_job_faults;
mod migration_races;
mod netns;
mod partitions;
mod pgbouncer;
mod read_committed;
mod restarts;
mod retry_budget;
mod round_trips;
mod workload_faults;
