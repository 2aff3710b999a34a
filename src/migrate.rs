//! `bank migrate`: applies the embedded migrations and says what it did,
//! and what a table made elsewhere lacks.

use std::io::Write;

use anyhow::{bail, Context};

use crate::db::{self, DbUrl};

/// Applies the migrations that are not applied yet on `url` (statements
/// bounded by `statement_timeout`, logged when `verbose`), writing what it
/// did to `out`.
///
/// # Errors
/// Connecting, the migration, or a table made elsewhere that the app cannot
/// run on.
pub fn run(
    url: &DbUrl,
    statement_timeout: std::time::Duration,
    verbose: bool,
    out: &mut dyn Write,
) -> anyhow::Result<()> {
    let (mut conn, _) = db::establish_with_timeouts(url, statement_timeout)?;
    if verbose {
        db::log_statements(&mut conn);
    }
    // What was there before: the accounts migration creates the table only
    // where none exists, so on a table made elsewhere it applies nothing to
    // it, and must not be reported as if it had.
    let before = db::inspect_fully(&mut conn).context("asking the server what it is")?;
    let applied = db::run_migrations(&mut conn)?;
    let finding = before
        .shape
        .as_ref()
        .and_then(|shape| db::shape::assess(&mut conn, shape));
    if applied.is_empty() {
        match &finding {
            None => writeln!(out, "Schema is up to date.")?,
            Some(finding) => writeln!(out, "Schema is up to date, but {}.", finding.line)?,
        }
    }
    for version in &applied {
        if before.shape.is_some() && version == db::ACCOUNTS_MIGRATION {
            match &finding {
                None => writeln!(
                    out,
                    "Applied migration {version}: kept the existing table \"accounts\", made \
                     elsewhere, which is what the app needs."
                )?,
                Some(finding) => writeln!(
                    out,
                    "Applied migration {version}: kept the existing table \"accounts\", made \
                     elsewhere (the migration creates it only where none exists); {}.",
                    finding.line
                )?,
            }
        } else {
            writeln!(out, "Applied migration {version}.")?;
        }
    }
    // Said above: when nothing was applied, or when the accounts migration
    // kept the table made elsewhere.
    let said = applied.is_empty() || applied.iter().any(|v| v == db::ACCOUNTS_MIGRATION);
    match finding {
        Some(finding) if finding.blocking && said => bail!("{}", finding.refusal()),
        _ => Ok(()),
    }
}
