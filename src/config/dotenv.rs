//! `.env`: the nearest one loaded into the environment, without overriding
//! what is set; a malformed one reported by line and column, never by
//! content (it may hold a password).
//!
//! dotenvy says where its parser stopped only as the rest of the file and
//! an index into it; this turns that into a line and a column without
//! showing either.

use std::path::PathBuf;

/// Loads the nearest `.env` (in this directory or a parent) into the
/// environment, without overriding what is already set. A malformed file is
/// reported by line and column, never by content: it may hold a password.
///
/// # Errors
/// One line naming the file, the line and what is wrong.
pub fn load_dotenv() -> Result<(), String> {
    let Some(path) = find_dotenv() else {
        return Ok(());
    };
    let shown = path.display();
    match dotenvy::from_path(&path) {
        Ok(()) => Ok(()),
        Err(dotenvy::Error::LineParse(rest, index)) => {
            let content = std::fs::read_to_string(&path).unwrap_or_default();
            let (line, column, what) = locate(&content, &rest, index);
            Err(format!(
                "could not read {shown}: line {line}, column {column}: {what}; fix or remove the file"
            ))
        }
        Err(dotenvy::Error::Io(err)) => Err(format!("could not read {shown}: {err}")),
        Err(_) => Err(format!(
            "could not read {shown}: it is not valid UTF-8 text; fix or remove the file"
        )),
    }
}

fn find_dotenv() -> Option<PathBuf> {
    let start = std::env::current_dir().ok()?;
    start
        .ancestors()
        .map(|dir| dir.join(".env"))
        .find(|path| path.is_file())
}

/// Where dotenvy's parse error is in the file, and what it means, from the
/// rest of the file it quotes (never shown) and the position in it.
fn locate(content: &str, rest: &str, index: usize) -> (usize, usize, &'static str) {
    let start = content
        .match_indices(rest)
        .map(|(at, _)| at)
        .find(|at| *at == 0 || content[..*at].ends_with('\n'))
        .unwrap_or(0);
    let line_of = |offset: usize| content[..offset].matches('\n').count() + 1;
    let column_of = |offset: usize| {
        content[..offset]
            .rsplit('\n')
            .next()
            .map_or(0, |l| l.chars().count())
            + 1
    };
    match rest.char_indices().nth(index) {
        Some((at, _)) => (
            line_of(start + at),
            column_of(start + at),
            "expected NAME=value (a name of letters, digits and underscores)",
        ),
        // The parser ran off the end of the file: a quote never closed.
        None => {
            let first_line = rest.lines().next().unwrap_or_default();
            let quote = first_line.find(['"', '\'']).unwrap_or(0);
            (
                line_of(start),
                column_of(start + quote),
                "this quote is never closed",
            )
        }
    }
}
