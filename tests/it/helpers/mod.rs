//! The app's test helpers, by concern: databases, the binary, held locks;
//! the fault machinery, processes and private clusters come from the
//! workspace's `testbed` crate, the one fake clock from the retry crate's
//! own tests (the app's tests need none).

mod binary;
mod databases;
mod locks;

pub use binary::*;
pub use databases::*;
pub use locks::*;
pub use testbed::faults::backend_pid;
pub use testbed::process::{is_root, run, tempdir};
