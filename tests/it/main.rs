//! Integration tests: each test owns a database on the server `DATABASE_URL`
//! names (`./dev test` starts a throwaway one), so they run in parallel.
#![allow(clippy::unwrap_used)]

mod asynchronous;
mod bad_input;
mod cockroach_only;
mod contention;
mod helpers;
mod main_job;
mod messages;
mod metrics;
mod postgres_only;
mod retry;
mod schema;
mod tls;
mod workload;
