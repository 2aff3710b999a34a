//! A CockroachDB bank in Rust with Diesel: the counterpart of CockroachDB's
//! SQLAlchemy tutorial, with a transaction-retry helper fit for production.
#![deny(unsafe_code)]
#![warn(missing_docs, unreachable_pub)]
#![warn(
    clippy::unwrap_used,
    clippy::cast_possible_truncation,
    clippy::cast_sign_loss
)]
#![cfg_attr(test, allow(clippy::unwrap_used))]

pub mod app;
pub mod bank;
pub mod config;
pub mod create;
pub mod db;
pub mod exporter;
pub mod failure;
pub mod job;
pub mod migrate;
pub mod models;
pub mod output;
pub mod plan;
#[allow(missing_docs)]
pub mod schema;
pub mod teller;
pub mod watchdog;
pub mod workload;
