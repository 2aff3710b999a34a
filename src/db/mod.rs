//! The database: first contact with readable errors (`connect.rs`), the
//! blocking pool (`pool.rs`) and the async one ([`asynch`]), the embedded
//! migrations (`migrations.rs`), what the app learns of the server and its
//! tables (`inspect.rs`, [`shape`]), the set-up before a run ([`prepare`]),
//! statement logging (`log.rs`); the
//! connection string and its policy in `url.rs` ([`DbUrl`]) and
//! [`conninfo`].

pub mod asynch;
mod connect;
pub mod conninfo;
mod inspect;
mod log;
mod migrations;
mod pool;
pub mod prepare;
pub mod shape;
mod tls;
mod url;

pub use connect::{establish, establish_with_timeouts, ConnectError};
pub use inspect::{
    inspect, inspect_fully, inspect_quickly, null_balances, AccountsTable, Inspection,
};
pub(crate) use inspect::{quick_check_sql, quick_found_in_text, quick_inspection};
pub use log::log_statements;
pub use migrations::{run_migrations, MigrationError, ACCOUNTS_MIGRATION, MIGRATIONS};
pub use pool::{pool, pool_of, Aged, Connects, Manager, PgPool, POOL_CHECKOUT_WAIT};
pub use url::DbUrl;
