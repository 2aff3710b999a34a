//! How a failure is told: one line for stderr, without secrets, and the
//! exit code (2 for a usage error, 1 for anything else).

use std::fmt;

use crate::db;

/// What the user asked for cannot be done as asked: a flag, `DATABASE_URL`
/// or `.env` is wrong. Nothing was written. The exit code is 2.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct UsageError(pub String);

/// `err` as a [`UsageError`].
pub fn usage(err: impl fmt::Display) -> anyhow::Error {
    UsageError(err.to_string()).into()
}

/// The exit code for a failure: 2 for a usage error, 1 for anything else.
pub fn exit_code(err: &anyhow::Error) -> u8 {
    if err.chain().any(|cause| cause.is::<UsageError>()) {
        2
    } else {
        1
    }
}

/// One line for stderr: the context chain. Messages that mention the
/// database name it by [`DbUrl::redacted`](crate::db::DbUrl::redacted), so no password is in them.
pub fn error_line(err: &anyhow::Error) -> String {
    let mut causes: Vec<String> = Vec::new();
    for cause in err.chain() {
        // A wrapper that shows its source's message (the bank's database
        // errors do, so that the retry helper finds them as their source)
        // is followed by that source: said once.
        let said = cause.to_string();
        if causes.last() != Some(&said) {
            causes.push(said);
        }
        // A connection error already says, explained, what its source said.
        if cause.is::<db::ConnectError>() {
            break;
        }
    }
    causes
        .join(": ")
        .split_whitespace()
        .collect::<Vec<_>>()
        .join(" ")
}
