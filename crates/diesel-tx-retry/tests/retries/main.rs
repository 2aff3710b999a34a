//! The retry helper's own tests, against a real PostgreSQL: a database per
//! test on the server `DATABASE_URL` names, or on one the test bed starts
//! for this process. They use nothing of the app.
#![allow(clippy::unwrap_used)]

mod api;
mod asynchronous;
mod budget;
mod doubt;
mod faults;
mod fixture;
mod harness;
mod lifetime;
mod metrics;
mod pipelining;
mod read_committed;
mod round_trips;
mod server_errors;
mod table;
mod write_skew;
