//! The workspace's test bed, shared by the app's tests and the retry
//! crate's own: a database per test ([`Database`]) on the server
//! `DATABASE_URL` names or on one started for the test process
//! ([`server_url`]), private PostgreSQL clusters ([`cluster`]), PL/pgSQL
//! faults ([`faults`]), and a wire-protocol proxy ([`proxy`]).
#![allow(clippy::unwrap_used, clippy::expect_used)]

pub mod cluster;
pub mod database;
pub mod faults;
pub mod process;
pub mod proxy;

pub use database::{server_url, Database};
